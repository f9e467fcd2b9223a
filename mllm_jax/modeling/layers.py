"""Building blocks of the LLaMA decoder: parameters with logical axes,
RMSNorm, the SwiGLU MLP, token embedding, RoPE and ALiBi."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.modeling.config import ModelConfig
from mllm_jax.parallel.sharding import constrain

if TYPE_CHECKING:
  from mllm_jax.modeling.peft import Adapters, LayerInputs


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype, std: float | None) -> nnx.Param:
  """A parameter tagged with logical axis names (std=None means ones).

  The names become shardings through the config's rules table; Flax's own
  eager sharding is off so that modules build the same with or without a mesh.
  """
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = std * jax.random.truncated_normal(
        rngs.params(), -2.0, 2.0, shape, jnp.float32)
    value = value.astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def _rms_norm_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv).astype(scale.dtype) * scale, (x, inv, scale)


def _rms_norm_bwd(eps, residuals, d_out):
  """dx = r * (g - x_hat * mean(g * x_hat)) with g = dy * scale, x_hat = x * r."""
  del eps
  x, inv, scale = residuals
  x_hat = x.astype(jnp.float32) * inv
  dy = d_out.astype(jnp.float32)
  d_scale = jnp.sum((x_hat.astype(scale.dtype) * d_out).astype(jnp.float32),
                    axis=tuple(range(x.ndim - 1)))
  g = dy * scale.astype(jnp.float32)
  d_x = inv * (g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps):
  """RMSNorm in float32 with a hand-written backward (model.custom_vjp);
  scale in the compute dtype, which is also the output's."""
  return _rms_norm_fwd(x, scale, eps)[0]


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (no bias, no mean removal)."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ("norm",), cfg.weight_dtype, None)
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype
    self.custom_vjp = cfg.custom_vjp

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.scale[...].astype(self.dtype)
    if self.custom_vjp:
      return rms_norm(x, scale, self.eps)
    return _rms_norm_fwd(x, scale, self.eps)[0]  # Autodiff's backward.


def _swiglu_fwd(x, w_gate, w_up, w_down):
  gate = jnp.einsum("btd,dh->bth", x, w_gate)
  up = jnp.einsum("btd,dh->bth", x, w_up)
  hidden = constrain(jax.nn.silu(gate) * up,
                     ("act_batch", "act_length", "act_mlp"))
  out = jnp.einsum("bth,hd->btd", hidden, w_down)
  return out, (x, gate, up, hidden, w_gate, w_up, w_down)


def _swiglu_bwd(residuals, d_out):
  """silu(g)' = s * (1 + g * (1 - s)) with s = sigmoid(g): the gate and up
  gradients come out of one elementwise pass over the saved g and u."""
  x, gate, up, hidden, w_gate, w_up, w_down = residuals
  d_hidden = jnp.einsum("btd,hd->bth", d_out, w_down)
  d_w_down = jnp.einsum("bth,btd->hd", hidden, d_out)
  g = gate.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  dh = d_hidden.astype(jnp.float32)
  d_gate = (dh * up.astype(jnp.float32) * sig * (1 + g * (1 - sig))).astype(
      gate.dtype)
  d_up = (dh * g * sig).astype(up.dtype)
  d_x = (jnp.einsum("bth,dh->btd", d_gate, w_gate)
         + jnp.einsum("bth,dh->btd", d_up, w_up))
  d_w_gate = jnp.einsum("btd,bth->dh", x, d_gate)
  d_w_up = jnp.einsum("btd,bth->dh", x, d_up)
  return d_x, d_w_gate, d_w_up, d_w_down


@jax.custom_vjp
def swiglu(x, w_gate, w_up, w_down):
  """down(silu(x @ gate) * (x @ up)) with a hand-written backward
  (model.custom_vjp); x [B, T, D], weights in the compute dtype."""
  return _swiglu_fwd(x, w_gate, w_up, w_down)[0]


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               peft: Adapters | None = None):
    d, h, dt = cfg.embed_dim, cfg.hidden_dim, cfg.weight_dtype
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.gate = param(rngs, (d, h), ("embed", "mlp"), dt, cfg.init_std)
    self.up = param(rngs, (d, h), ("embed", "mlp"), dt, cfg.init_std)
    self.down = param(rngs, (h, d), ("mlp", "embed"), dt, out_std)
    self.dtype = cfg.compute_dtype
    self.custom_vjp = cfg.custom_vjp
    # PEFT (modeling/peft.py): LoRA on gate/up/down, or None.
    self.peft = None if peft is None else peft.mlp(self, rngs)

  def __call__(self, x: jax.Array,
               peft_inputs: LayerInputs | None = None) -> jax.Array:
    weights = [w[...].astype(self.dtype) for w in (self.gate, self.up,
                                                   self.down)]
    if self.peft is not None:  # LoRA updates, autodiff's backward
      return self.peft.swiglu(x, *weights, peft_inputs)
    if self.custom_vjp:
      return swiglu(x, *weights)
    return _swiglu_fwd(x, *weights)[0]  # Autodiff's backward.


class Embed(nnx.Module):
  """Token embedding. With tied embeddings its table is also the output
  projection (`Decoder.head_weight`)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               peft: Adapters | None = None):
    self.table = param(rngs, (cfg.vocab_size, cfg.embed_dim),
                       ("vocab", "embed"), cfg.weight_dtype, cfg.init_std)
    self.dtype = cfg.compute_dtype
    # PEFT (modeling/peft.py): LoRA on the embedding, or None.
    self.peft = None if peft is None else peft.embed(self, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # Look up in a whole (replicated) table, cast first to halve the gather:
    # a batch-sharded lookup cannot be partitioned over a sharded table.
    table = constrain(self.table[...].astype(self.dtype), (None, None))
    x = jnp.take(table, tokens, axis=0)
    if self.peft is not None:  # + scale * A[tokens] B
      x = self.peft(tokens, x)
    return x


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies (head_size/2,), with linear or LLaMA-3 scaling."""
  dim = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64)
                                       / dim))
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    inv_freq = inv_freq / factor
  elif cfg.rope_scaling == "llama3":
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between interpolated smoothly (LLaMA 3.1's recipe).
    old_len = cfg.rope_original_max_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > old_len / low, inv_freq / factor,
                        np.where(wavelen < old_len / high, inv_freq,
                                 interpolated))
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: np.ndarray) -> jax.Array:
  """Rotates [B, T, H, D] by position, in the rotate-half layout.

  The two rotated coordinates of a pair sit D/2 apart (the HuggingFace layout);
  Meta's original checkpoints interleave them instead, see convert/.
  """
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B,T,D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes: a geometric sequence, interleaved when the head
  count is not a power of two (as in the ALiBi paper's reference code)."""
  def power_of_2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(num_heads).is_integer():
    slopes = power_of_2(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][
        :num_heads - closest]
  return np.asarray(slopes, np.float32)


def alibi_bias(q_positions: jax.Array, k_positions: jax.Array,
               num_heads: int) -> jax.Array:
  """[B, H, T, S] additive bias: -slope * distance between positions."""
  distance = (q_positions[:, :, None] - k_positions[:, None, :]).astype(
      jnp.float32)
  slopes = jnp.asarray(alibi_slopes(num_heads))
  return -jnp.abs(distance)[:, None] * slopes[None, :, None, None]
