"""Meta's original (consolidated.*.pth) RoPE layout -> ours.

Meta's reference code rotates adjacent pairs (2i, 2i+1) of each head; we (and
HuggingFace) rotate (i, i + Dh/2). Moving q/k output column 2i + c to
c * Dh/2 + i makes our RoPE on the moved projection equal Meta's RoPE moved
the same way; as q and k move alike, q.k and hence attention are unchanged.
v and o need nothing. A full reader of Meta's files is not provided.
"""

from __future__ import annotations

from typing import TypeVar

Array = TypeVar("Array")  # numpy or jax: only .shape/.reshape/.swapaxes


def interleaved_to_half(w: Array) -> Array:
  """Permutes the last (head_dim) axis from interleaved to rotate-half.

  Works on any native q/k layout whose last axis is head_dim: [D, H, Dh],
  stacked [L, D, H, Dh], or activations [B, T, H, Dh].
  """
  *lead, dim = w.shape
  return w.reshape(*lead, dim // 2, 2).swapaxes(-1, -2).reshape(*lead, dim)


def half_to_interleaved(w: Array) -> Array:
  """The inverse of `interleaved_to_half`."""
  *lead, dim = w.shape
  return w.reshape(*lead, 2, dim // 2).swapaxes(-1, -2).reshape(*lead, dim)


def meta_qk_to_native(w: Array, num_heads: int) -> Array:
  """Meta's wq / wk weight [H*Dh, D] (torch Linear: out, in) -> our [D, H, Dh]
  in rotate-half layout (pass the K/V head count for wk)."""
  out, dim = w.shape
  return interleaved_to_half(w.T.reshape(dim, num_heads, out // num_heads))
