"""Deterministic, vectorised word n-gram (shingle) hashes.

Text is lower-cased, split into words at non-alphanumeric code points, and
every word is hashed from prefix sums of a polynomial over its code points, so
no Python code runs per character, word or shingle. Hashes are stable across processes
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
  """The word sequence word_hashes sees, as a string (for reading and tests)."""
  return " ".join(_NON_WORD.sub(" ", text.lower()).split())


_WORD_CHAR = np.array([chr(c).isalnum() for c in range(0x10000)], bool)
_POWERS = {"p": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
  """P**i and P**-i for i < n, cached and grown by doubling."""
  if len(_POWERS["p"]) < n:
    m = max(n, 2 * len(_POWERS["p"]))
    with np.errstate(over="ignore"):
      _POWERS["p"] = np.concatenate([[np.uint64(1)], np.cumprod(
          np.full(m - 1, _P, np.uint64))])
      _POWERS["inv"] = np.concatenate([[np.uint64(1)], np.cumprod(
          np.full(m - 1, _P_INV, np.uint64))])
  return _POWERS["p"][:n], _POWERS["inv"][:n]


def word_hashes(text: str) -> np.ndarray:
  """uint64 hash per word of the normalised text.

  Works on code points in NumPy (a regex pass over the text cost as much as
  all the hashing): a word is a maximal run of alphanumeric code points (as
  ``[\\W_]`` splits; code points above U+FFFF count as letters), hashed by a
  prefix-sum polynomial so no Python code runs per word.
  """
  cp = np.frombuffer(text.lower().encode("utf-32-le"), np.uint32)
  is_word = np.ones(len(cp), bool)
  bmp = cp < 0x10000
  is_word[bmp] = _WORD_CHAR[cp[bmp]]
  return _run_hashes(cp, is_word)


def token_hashes(words: list[str]) -> np.ndarray:
  """uint64 hash per given token (no whitespace inside), the same in every
  process (unlike ``hash()``, which is salted per process)."""
  cp = np.frombuffer(" ".join(words).encode("utf-32-le"), np.uint32)
  return _run_hashes(cp, cp != 32)


def _run_hashes(cp: np.ndarray, is_word: np.ndarray) -> np.ndarray:
  """Hash of each maximal run of ``is_word`` code points."""
  if len(cp) == 0:
    return np.zeros(0, np.uint64)
  edges = np.diff(is_word.astype(np.int8), prepend=0, append=0)
  starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
  if len(starts) == 0:
    return np.zeros(0, np.uint64)
  powers, inv = _powers(len(cp))
  with np.errstate(over="ignore"):
    prefix = np.concatenate([[np.uint64(0)], np.cumsum(
        (cp.astype(np.uint64) + np.uint64(1)) * powers, dtype=np.uint64)])
    h = (prefix[ends] - prefix[starts]) * inv[starts]
  return mix64(h ^ (ends - starts).astype(np.uint64))


def shingle_hashes(text: str, n: int = 5, unique: bool = True) -> np.ndarray:
  """uint64 hashes of the word n-grams (the whole text if shorter); MinHash
  passes ``unique=False``: repeats cannot change a minimum, and sorting them
  away costs more than hashing them."""
  w = word_hashes(text)
  if len(w) == 0:
    return w
  m = max(1, len(w) - n + 1)
  k_max = min(n, len(w))
  with np.errstate(over="ignore"):
    out = w[:m].copy()
    for k in range(1, k_max):
      out = out * _Q + w[k:k + m]
  out = mix64(out)
  return np.unique(out) if unique else out
