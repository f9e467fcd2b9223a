"""Vectorised word and n-gram statistics shared by the quality filters.

Words are whitespace-separated (as in Gopher). N-grams are hashed with a
polynomial over per-word hashes in wrapping uint64 arithmetic, so duplicate
n-gram detection is a ``np.unique`` instead of a Python dict of tuples.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.shingles import token_hashes

_MULT = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(words: list[str]) -> np.ndarray:
  # Not hash(): it is salted per process, and ties among top n-grams then
  # break differently, so a rerun or another worker could drop other docs.
  return token_hashes(words)


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
  """Hash of every n-gram starting at 0..len-n (empty when too short)."""
  m = len(h) - n + 1
  if m <= 0:
    return np.zeros(0, np.uint64)
  out = h[:m].copy()
  with np.errstate(over="ignore"):
    for k in range(1, n):
      out = out * _MULT + h[k:k + m]
  return out


def duplicate_ngram_char_fraction(h: np.ndarray, lengths: np.ndarray,
                                  n: int) -> float:
  """Fraction of word characters inside repeated n-grams (first copy free,
  overlaps counted once), as in Gopher's 5..10-gram rule."""
  grams = ngram_hashes(h, n)
  total = lengths.sum()
  if len(grams) == 0 or total == 0:
    return 0.0
  _, first, inverse = np.unique(grams, return_index=True, return_inverse=True)
  dup_starts = np.nonzero(first[inverse] != np.arange(len(grams)))[0]
  if len(dup_starts) == 0:
    return 0.0
  cover = np.zeros(len(h) + 1, np.int64)
  np.add.at(cover, dup_starts, 1)
  np.add.at(cover, dup_starts + n, -1)
  covered = np.cumsum(cover[:-1]) > 0
  return float(lengths[covered].sum() / total)


def top_ngram_char_fraction(h: np.ndarray, lengths: np.ndarray, n: int) -> float:
  """Characters of the most frequent n-gram times its count, over all chars."""
  grams = ngram_hashes(h, n)
  total = lengths.sum()
  if len(grams) == 0 or total == 0:
    return 0.0
  _, first, counts = np.unique(grams, return_index=True, return_counts=True)
  top = np.argmax(counts)
  if counts[top] < 2:
    return 0.0
  start = first[top]
  return float(lengths[start:start + n].sum() * counts[top] / total)


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
  """(by count, by characters) fraction of items that repeat an earlier one."""
  items = [x for x in items if x.strip()]
  if not items:
    return 0.0, 0.0
  seen, dup, dup_chars, chars = set(), 0, 0, 0
  for item in items:
    chars += len(item)
    if item in seen:
      dup += 1
      dup_chars += len(item)
    else:
      seen.add(item)
  return dup / len(items), dup_chars / max(1, chars)
