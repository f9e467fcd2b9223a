"""Exact substring deduplication with a suffix array (Lee et al. 2022).

The documents' UTF-8 bytes are joined with 0xFF separators (a byte that never
occurs in UTF-8), the suffix array and LCP array are built by libdivsufsort
(C, via pydivsufsort; about 10 MB/s for both together on one core), and every
repeated span of at least ``min_bytes`` (default 100 bytes, ~50 tokens) is
removed from all of its occurrences but the first. Matches are clipped at the
separators so they never cross documents. Documents left shorter than
``min_chars_after`` are dropped.

Larger than memory (SA + LCP take ~9 bytes per input byte): run it per shard of
a few GB (repeats within a shard), after MinHash has already clustered
near-copies across shards; to also catch cross-shard spans, build the suffix
array of each shard pair or merge per-shard suffix arrays as Lee et al. do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SEP = 0xFF


def duplicate_spans(texts: Sequence[str], min_bytes: int = 100
                    ) -> list[list[tuple[int, int]]]:
  """Byte ranges (per document, merged, sorted) to remove."""
  import pydivsufsort
  blobs = [t.encode("utf-8") for t in texts]
  data = np.frombuffer(bytearray(b"\xff".join(blobs) + b"\xff"), dtype=np.uint8)
  starts = np.concatenate([[0], np.cumsum([len(b) + 1 for b in blobs])])
  if len(data) < 2:
    return [[] for _ in texts]
  sa = pydivsufsort.divsufsort(data).astype(np.int64)
  lcp = pydivsufsort.kasai(data, sa).astype(np.int64)  # lcp[i]: sa[i], sa[i+1]
  # Distance from each position to the next separator clips matches.
  seps = np.nonzero(data == SEP)[0]
  to_sep = seps[np.searchsorted(seps, np.arange(len(data)))] - np.arange(len(data))
  a, b = sa[:-1], sa[1:]
  length = np.minimum(lcp[:-1], np.minimum(to_sep[a], to_sep[b]))
  hit = length >= min_bytes
  # Runs of SA neighbours that pairwise share >= min_bytes all share the run's
  # minimum length; the earliest occurrence stays, the others go.
  member = np.zeros(len(sa), bool)
  member[:-1] |= hit
  member[1:] |= hit
  idx = np.nonzero(member)[0]
  if len(idx) == 0:
    return [[] for _ in texts]
  run_start = np.concatenate([[True], ~hit[idx[1:] - 1]])
  starts_at = np.nonzero(run_start)[0]
  pos = sa[idx]
  run_min = np.minimum.reduceat(pos, starts_at)
  pair_len = np.where(hit, length, np.iinfo(np.int64).max)
  # Pair i links idx positions i, i+1; a run of k members has k-1 pairs.
  run_len = np.minimum.reduceat(
      np.concatenate([pair_len[idx[:-1]], [np.iinfo(np.int64).max]]), starts_at)
  run_id = np.cumsum(run_start) - 1
  later = pos[pos != run_min[run_id]]
  length = run_len[run_id][pos != run_min[run_id]]
  doc = np.searchsorted(starts, later, side="right") - 1
  spans: list[list[tuple[int, int]]] = [[] for _ in texts]
  order = np.lexsort((later, doc))
  for d, s, n in zip(doc[order], later[order], length[order]):
    lo, hi = int(s - starts[d]), int(s - starts[d] + n)
    if spans[d] and lo <= spans[d][-1][1]:
      spans[d][-1] = (spans[d][-1][0], max(hi, spans[d][-1][1]))
    else:
      spans[d].append((lo, hi))
  return spans


def remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
  if not spans:
    return text
  data = text.encode("utf-8")
  parts, pos = [], 0
  for lo, hi in spans:
    parts.append(data[pos:lo])
    pos = hi
  parts.append(data[pos:])
  return b"".join(parts).decode("utf-8", "ignore")
