"""Union-find over document indices, fed with edge batches (NumPy, no Python
loop per edge): hook each edge's larger root onto the smaller, then pointer-jump
until every node points at its root. Roots are cluster minima, so "keep the
first document of each cluster" is deterministic."""

from __future__ import annotations

import numpy as np


class UnionFind:

  def __init__(self, n: int):
    self.parent = np.arange(n, dtype=np.int64)

  def _compress(self) -> None:
    while True:
      grand = self.parent[self.parent]
      if np.array_equal(grand, self.parent):
        return
      self.parent = grand

  def union(self, a: np.ndarray, b: np.ndarray) -> None:
    """Merges the sets of a[i] and b[i] for every i."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    while len(a):
      self._compress()
      ra, rb = self.parent[a], self.parent[b]
      live = ra != rb
      if not live.any():
        return
      a, b, ra, rb = a[live], b[live], ra[live], rb[live]
      lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
      np.minimum.at(self.parent, hi, lo)  # Conflicting hooks: others retry.

  def roots(self) -> np.ndarray:
    self._compress()
    return self.parent.copy()
