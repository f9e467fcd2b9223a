"""Deterministic, vectorised word n-gram (shingle) hashes.

Text is normalised (lower case, punctuation to spaces), encoded once to UTF-8,
and every word is hashed from prefix sums of a polynomial over its bytes, so no
Python code runs per word or per shingle. Hashes are stable across processes
and machines (unlike ``hash()``), which fuzzy dedup across shards needs.
"""

from __future__ import annotations

import re

import numpy as np

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_P = np.uint64(0x100000001B3)  # Odd, so it is invertible modulo 2**64.
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_Q = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: spreads polynomial hashes over all 64 bits."""
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def normalise(text: str) -> str:
  return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def word_hashes(text: str) -> np.ndarray:
  """uint64 hash per word of the normalised text."""
  data = np.frombuffer(normalise(text).encode("utf-8"), dtype=np.uint8)
  if len(data) == 0:
    return np.zeros(0, np.uint64)
  n = len(data)
  with np.errstate(over="ignore"):
    powers = np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, _P, np.uint64))])
    inv = np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, _P_INV, np.uint64))])
    prefix = np.concatenate([[np.uint64(0)],
                             np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers,
                                       dtype=np.uint64)])
    spaces = np.nonzero(data == 32)[0]
    starts = np.concatenate([[0], spaces + 1])
    ends = np.concatenate([spaces, [n]])
    h = (prefix[ends] - prefix[starts]) * inv[starts]
  return mix64(h ^ (ends - starts).astype(np.uint64))


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
  """Unique uint64 hashes of the word n-grams (the whole text if shorter)."""
  w = word_hashes(text)
  if len(w) == 0:
    return w
  m = max(1, len(w) - n + 1)
  k_max = min(n, len(w))
  with np.errstate(over="ignore"):
    out = w[:m].copy()
    for k in range(1, k_max):
      out = out * _Q + w[k:k + m]
  return np.unique(mix64(out))
