"""Fuzzy deduplication: MinHash + LSH banding + union-find (and SimHash).

Per document: shingle hashes -> ``num_hashes`` minima under multiply-shift hash
functions -> one 64-bit key per band of ``rows`` minima. Documents are signed
in batches: a NumPy (hashes x shingles) block over many documents' shingles,
reduced per document with ``minimum.reduceat``. Keys are spilled to one file per (band, bucket) as
they are made, so memory stays bounded by one bucket, whatever the corpus size;
clustering then loads each bucket file, sorts it, and unions documents with
equal keys. One document (the first) is kept per connected component.

Presets: RefinedWeb 9,000 hashes = 450 bands x 20 rows on 5-grams; FineWeb
112 = 14 x 8 on 5-grams. A pair with Jaccard similarity s collides in some band
with probability 1 - (1 - s**rows)**bands.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Iterable

import numpy as np

from data_pipeline.shingles import mix64, shingle_hashes
from data_pipeline.union_find import UnionFind

PRESETS = {"refinedweb": (450, 20, 5), "fineweb": (14, 8, 5)}
# NumPy block of hash functions x shingles (uint64): 128 x 8192 x 8 bytes.
# Long rows amortise per-row loop overhead: on the bench, 8,192 shingles beat
# both 4,096 (and smaller, L2-sized blocks) and 16,384.
_ROWS, _COLS = 128, 8192
# A batch ends at this many shingles or (documents x hashes) minima (uint64:
# 32 MB, so 9,000-hash batches of short documents stay small).
_BATCH_SHINGLES, _BATCH_MINIMA = 1 << 18, 1 << 22


@dataclasses.dataclass(frozen=True)
class MinHashParams:
  bands: int = 14
  rows: int = 8
  ngram: int = 5
  seed: int = 0

  @classmethod
  def preset(cls, name: str, seed: int = 0) -> "MinHashParams":
    if name not in PRESETS:
      raise ValueError(f"minhash.preset={name!r}; expected one of {sorted(PRESETS)}")
    bands, rows, ngram = PRESETS[name]
    return cls(bands, rows, ngram, seed)

  @property
  def num_hashes(self) -> int:
    return self.bands * self.rows

  def threshold(self) -> float:
    """Similarity where the S-curve is steepest: (1/bands)**(1/rows)."""
    return (1.0 / self.bands) ** (1.0 / self.rows)


def collision_probability(s, bands: int, rows: int):
  return 1.0 - (1.0 - np.asarray(s, np.float64) ** rows) ** bands


class MinHasher:

  def __init__(self, params: MinHashParams):
    self.params = params
    rng = np.random.default_rng(params.seed)
    k = params.num_hashes
    self.a = rng.integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)
    self.b = rng.integers(0, 2**63, size=k, dtype=np.uint64)
    self.band_mult = rng.integers(1, 2**63, size=params.rows,
                                  dtype=np.uint64) | np.uint64(1)

  def signature(self, text: str) -> np.ndarray:
    """uint32 minima, one per hash function (all max for an empty text)."""
    x = shingle_hashes(text, self.params.ngram, unique=False)
    return self.signatures(x, np.array([0, len(x)]))[0]

  def signatures(self, x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(texts, hashes) uint32 minima; text i's shingle hashes are
    ``x[offsets[i]:offsets[i + 1]]`` (all max for an empty text).

    h = (a * x + b) mod 2**64 is built as a (hashes x shingles) block, a
    chunk of shingles of many texts at a time: reducing along the contiguous
    axis with ``minimum.reduceat`` over text segments is ~3x faster than a
    (shingles x hashes) block per text, whose per-text calls and strided
    reductions dominated. The top 32 bits are the hash; min commutes with
    the shift, so it is taken once at the end.
    """
    k = self.params.num_hashes
    n_docs = len(offsets) - 1
    sig = np.full((n_docs, k), np.iinfo(np.uint64).max, np.uint64)
    docs = np.flatnonzero(np.diff(offsets) > 0)
    starts = offsets[docs]
    rows = min(k, _ROWS)
    buf = np.empty((rows, _COLS), np.uint64)
    for lo in range(0, len(x), _COLS):
      hi = min(len(x), lo + _COLS)
      # Texts with shingles in [lo, hi): the one holding lo, then those
      # starting inside.
      i0 = np.searchsorted(starts, lo, side="right") - 1
      i1 = np.searchsorted(starts, hi, side="left")
      seg = np.concatenate([[0], starts[i0 + 1:i1] - lo])
      d = docs[i0:i1]
      xs = x[lo:hi]
      for r0 in range(0, k, rows):
        r1 = min(k, r0 + rows)
        h = buf[:r1 - r0, :hi - lo]
        np.multiply(self.a[r0:r1, None], xs, out=h)  # Wraps mod 2**64.
        np.add(h, self.b[r0:r1, None], out=h)
        m = np.minimum.reduceat(h, seg, axis=1).T
        sig[d, r0:r1] = np.minimum(sig[d, r0:r1], m)
    return (sig >> np.uint64(32)).astype(np.uint32)

  def band_keys(self, sig: np.ndarray) -> np.ndarray:
    """One uint64 key per band (equal rows -> equal key); ``sig`` may be one
    signature or a (texts, hashes) batch."""
    rows = sig.reshape(*sig.shape[:-1], self.params.bands,
                       self.params.rows).astype(np.uint64)
    with np.errstate(over="ignore"):
      keys = (rows * self.band_mult).sum(axis=-1, dtype=np.uint64)
      keys = mix64(keys + np.arange(self.params.bands, dtype=np.uint64))
    return keys


class BandSpill:
  """Appends (key, doc index) pairs to per-(band, bucket) files, flushing every
  ``flush_docs`` documents so the in-memory part stays small."""

  def __init__(self, workdir: str, bands: int, buckets: int = 1,
               flush_docs: int = 4096):
    self.workdir, self.bands, self.buckets = workdir, bands, buckets
    self.flush_docs = flush_docs
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    self._keys: list[np.ndarray] = []
    self._ids: list[np.ndarray] = []
    self._n = 0

  def path(self, band: int, bucket: int) -> str:
    return os.path.join(self.workdir, f"band{band:04d}_bucket{bucket:03d}.bin")

  def add(self, index: int, keys: np.ndarray) -> None:
    self.add_many(index, keys[None])

  def add_many(self, first: int, keys: np.ndarray) -> None:
    """Keys of documents first, first + 1, ...: a (docs, bands) array."""
    self._keys.append(keys)
    self._ids.append(np.arange(first, first + len(keys), dtype=np.uint64))
    self._n += len(keys)
    if self._n >= self.flush_docs:
      self.flush()

  def flush(self) -> None:
    if not self._keys:
      return
    keys = np.concatenate(self._keys)  # (docs, bands)
    ids = np.concatenate(self._ids)
    bucket = (keys >> np.uint64(40)) % np.uint64(self.buckets)
    for band in range(self.bands):
      for b in range(self.buckets):
        sel = bucket[:, band] == b
        if sel.any():
          pairs = np.stack([keys[sel, band], ids[sel]], axis=1)
          with open(self.path(band, b), "ab") as f:
            f.write(pairs.tobytes())
    self._keys, self._ids, self._n = [], [], 0

  def edges(self) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Per bucket file: (first doc of each equal-key run, other doc) pairs."""
    self.flush()
    for band in range(self.bands):
      for b in range(self.buckets):
        path = self.path(band, b)
        if not os.path.exists(path):
          continue
        pairs = np.fromfile(path, np.uint64).reshape(-1, 2)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        keys, ids = pairs[order, 0], pairs[order, 1].astype(np.int64)
        new_run = np.concatenate([[True], keys[1:] != keys[:-1]])
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(keys)), 0))
        dup = ~new_run
        yield ids[run_start[dup]], ids[dup]


def cluster(num_docs: int, spill: BandSpill) -> np.ndarray:
  """Connected components over all band collisions; returns roots."""
  uf = UnionFind(num_docs)
  for a, b in spill.edges():
    uf.union(a, b)
  return uf.roots()


def minhash_duplicates(texts: Iterable[str], params: MinHashParams, workdir: str,
                       buckets: int = 1, flush_docs: int = 4096) -> np.ndarray:
  """Cluster root per document (root == own index: kept).

  Texts are shingled one at a time (their code point arrays stay in cache;
  shingling a whole batch at once measured slower) and signed in batches
  (long NumPy rows, few calls per text)."""
  hasher = MinHasher(params)
  spill = BandSpill(workdir, params.bands, buckets, flush_docs)
  n, batch, size = 0, [], 0

  def sign() -> None:
    offsets = np.cumsum([0] + [len(x) for x in batch])
    keys = hasher.band_keys(hasher.signatures(np.concatenate(batch), offsets))
    spill.add_many(n - len(batch), keys)
    batch.clear()

  for n, text in enumerate(texts, 1):
    batch.append(shingle_hashes(text, params.ngram, unique=False))
    size += len(batch[-1])
    if (size >= _BATCH_SHINGLES
        or len(batch) * params.num_hashes >= _BATCH_MINIMA):
      sign()
      size = 0
  if batch:
    sign()
  return cluster(n, spill)


# --- SimHash ------------------------------------------------------------------

def simhash(text: str, ngram: int = 5) -> np.uint64:
  """64-bit SimHash of the shingles: each bit is the majority vote."""
  x = shingle_hashes(text, ngram)
  if len(x) == 0:
    return np.uint64(0)
  bits = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
  vote = bits.sum(axis=0, dtype=np.int64) * 2 > len(x)
  return np.packbits(vote, bitorder="little").view(np.uint64)[0]


def simhash_duplicates(texts: Iterable[str], max_distance: int = 3,
                       ngram: int = 5) -> np.ndarray:
  """Cluster roots for SimHash near-duplicates (Hamming distance <= k).

  By pigeonhole, two hashes within k bits agree exactly on at least one of
  k + 1 blocks, so candidates come from equal blocks and are then verified.
  """
  hashes = np.array([simhash(t, ngram) for t in texts], np.uint64)
  uf = UnionFind(len(hashes))
  blocks = max_distance + 1
  width = 64 // blocks
  for i in range(blocks):
    shift = np.uint64(i * width)
    mask = np.uint64((1 << (64 - i * width if i == blocks - 1 else width)) - 1)
    key = (hashes >> shift) & mask
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.nonzero(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]]))[0]
    ends = np.concatenate([starts[1:], [len(order)]])
    for s, e in zip(starts, ends):
      if e - s < 2:
        continue
      members = order[s:e]
      for j, a in enumerate(members[:-1]):
        others = members[j + 1:]
        dist = np.bitwise_count(hashes[others] ^ hashes[a])
        close = others[dist <= max_distance]
        if len(close):
          uf.union(np.full(len(close), a), close)
  return uf.roots()
