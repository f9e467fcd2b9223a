"""Deterministic, vectorised word n-gram (shingle) hashes.

Text is lower-cased, split into words at non-alphanumeric code points (each
Han/Kana character a word of its own, as ``data_pipeline.words`` counts them,
so shingles of Chinese and Japanese are character n-grams), and
every word is hashed from prefix sums of a polynomial over its code points, so
no Python code runs per character, word or shingle. Hashes are stable across processes
and machines (unlike ``hash()``), which fuzzy dedup across shards needs.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipeline.words import CJK_TABLE, has_cjk, units

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
  return " ".join(units(_NON_WORD.sub(" ", text.lower())))


_WORD_CHAR = np.array([chr(c).isalnum() for c in range(0x10000)], bool)
# Code points above U+FFFF count as letters; a full table is one gather.
_WORD_TABLE = np.concatenate([_WORD_CHAR, np.ones(0x110000 - 0x10000, bool)])
_ASCII_WORD = _WORD_CHAR[:256].astype(np.uint8).tobytes()  # bytes.translate map.
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


def _mix64_(x: np.ndarray) -> np.ndarray:
  """mix64 in place (no temporaries the size of x beyond one)."""
  t = np.empty_like(x)
  with np.errstate(over="ignore"):
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
      np.right_shift(x, np.uint64(shift), out=t)
      np.bitwise_xor(x, t, out=x)
      np.multiply(x, np.uint64(mult), out=x)
    np.right_shift(x, np.uint64(31), out=t)
    np.bitwise_xor(x, t, out=x)
  return x


def word_hashes(text: str) -> np.ndarray:
  """uint64 hash per word of the normalised text.

  Works on code points in NumPy (a regex pass over the text cost as much as
  all the hashing): a word is a maximal run of alphanumeric code points (as
  ``[\\W_]`` splits; code points above U+FFFF count as letters), hashed by a
  prefix-sum polynomial so no Python code runs per word.
  """
  low = text.lower()
  if low.isascii():  # Most web text: 1 byte per code point, no gather.
    raw = low.encode("ascii")
    cp = np.frombuffer(raw, np.uint8)
    return _run_hashes(cp, np.frombuffer(raw.translate(_ASCII_WORD), bool))[0]
  cp = np.frombuffer(low.encode("utf-32-le"), np.uint32)
  single = CJK_TABLE[cp] if has_cjk(low) else None
  return _run_hashes(cp, _WORD_TABLE[cp], single)[0]


def token_hashes(words: list[str]) -> np.ndarray:
  """uint64 hash per given token (no whitespace inside), the same in every
  process (unlike ``hash()``, which is salted per process)."""
  cp = np.frombuffer(" ".join(words).encode("utf-32-le"), np.uint32)
  return _run_hashes(cp, cp != 32)[0]


def _run_hashes(cp: np.ndarray, is_word: np.ndarray,
                single: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Hash and start offset of each maximal run of ``is_word`` code points;
  a code point marked in ``single`` (CJK) is a run of its own."""
  flags = np.zeros(len(cp) + 2, bool)
  flags[1:-1] = is_word
  if single is None or not single.any():
    edges = np.flatnonzero(flags[1:] != flags[:-1])  # Start, end, start, ...
    starts, ends = edges[0::2], edges[1::2]
  else:
    alone = np.zeros(len(cp) + 2, bool)
    alone[1:-1] = single
    # A run starts where a word code point follows a non-word one or where
    # either side is a CJK character; ends mirror that.
    word, cjk = flags[1:-1], alone[1:-1]
    starts = np.flatnonzero(word & (~flags[:-2] | alone[:-2] | cjk))
    ends = np.flatnonzero(word & (~flags[2:] | alone[2:] | cjk)) + 1
  if len(starts) == 0:
    return np.zeros(0, np.uint64), starts
  powers, inv = _powers(len(cp))
  # prefix[i] = sum_{j < i} (cp[j] + 1) * P**j, wrapping mod 2**64.
  prefix = np.empty(len(cp) + 1, np.uint64)
  prefix[0] = 0
  with np.errstate(over="ignore"):
    np.add(cp, np.uint64(1), out=prefix[1:])
    np.multiply(prefix[1:], powers, out=prefix[1:])
    np.cumsum(prefix, out=prefix)
    h = prefix[ends]
    h -= prefix[starts]
    h *= inv[starts]
    h ^= (ends - starts).astype(np.uint64)
  return _mix64_(h), starts


def _ngrams(w: np.ndarray, n: int) -> np.ndarray:
  """Unmixed n-gram polynomial of each window of w (the whole of w if
  shorter)."""
  m = max(1, len(w) - n + 1)
  with np.errstate(over="ignore"):
    out = w[:m].copy()
    for k in range(1, min(n, len(w))):
      out *= _Q
      out += w[k:k + m]
  return out


def shingle_hashes(text: str, n: int = 5, unique: bool = True) -> np.ndarray:
  """uint64 hashes of the word n-grams (the whole text if shorter); MinHash
  passes ``unique=False``: repeats cannot change a minimum, and sorting them
  away costs more than hashing them."""
  w = word_hashes(text)
  if len(w) == 0:
    return w
  out = _mix64_(_ngrams(w, n))
  return np.unique(out) if unique else out
