"""Exact substring deduplication with a suffix array (Lee et al. 2022).

The documents' UTF-8 bytes are joined with 0xFF separators (a byte that never
occurs in UTF-8), the suffix array and LCP array are built by libdivsufsort
(C, via pydivsufsort; about 10 MB/s for both together on one core), and every
repeated span of at least ``min_bytes`` (default 100 bytes, ~50 tokens) is
removed from all of its occurrences but the first. Matches are clipped at the
separators so they never cross documents. Documents left shorter than
``min_chars_after`` are dropped.

Memory is ~17 bytes per input byte (the text, int32 suffix and LCP arrays,
match lengths clipped at separators in chunks). Larger corpora run it per group
of ``exact.group_bytes`` (``corpus.clean_language``), after MinHash has
removed near-copies across the whole language; spans repeated across groups
stay.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SEP = 0xFF
_CHUNK = 1 << 22  # Suffix-array entries per step of the separator clipping.


def duplicate_spans(texts: Sequence[str], min_bytes: int = 100
                    ) -> list[list[tuple[int, int]]]:
  """Byte ranges (per document, merged, sorted) to remove."""
  import pydivsufsort
  blobs = [t.encode("utf-8") for t in texts]
  starts = np.concatenate([[0], np.cumsum([len(b) + 1 for b in blobs])])
  blobs.append(b"")  # The trailing separator.
  data = np.frombuffer(bytearray(b"\xff").join(blobs), dtype=np.uint8)
  del blobs
  if len(data) < 2:
    return [[] for _ in texts]
  sa = pydivsufsort.divsufsort(data)  # int32 below 2 GiB: 4 bytes per byte.
  lcp = pydivsufsort.kasai(data, sa)  # lcp[i]: common prefix of sa[i], sa[i+1].
  # A match is clipped at the next separator, so it never crosses documents;
  # computed in chunks so no int64 array spans the corpus.
  seps = np.nonzero(data == SEP)[0].astype(sa.dtype)
  length = np.empty(len(sa) - 1, sa.dtype)
  for lo in range(0, len(length), _CHUNK):
    hi = min(lo + _CHUNK, len(length))
    pos = sa[lo:hi + 1]
    to_sep = (seps[np.searchsorted(seps, pos)] - pos).astype(sa.dtype)
    out = length[lo:hi]
    np.minimum(lcp[lo:hi], to_sep[:-1], out=out)
    np.minimum(out, to_sep[1:], out=out)
  del lcp, seps
  hit = length >= min_bytes
  member = np.zeros(len(sa), bool)
  member[:-1] |= hit
  member[1:] |= hit
  idx = np.nonzero(member)[0]
  if len(idx) == 0:
    return [[] for _ in texts]
  run_start = np.concatenate([[True], ~hit[idx[1:] - 1]])
  starts_at = np.nonzero(run_start)[0]
  pos = sa[idx].astype(np.int64)
  run_min = np.minimum.reduceat(pos, starts_at)
  # Pair i links idx positions i, i+1; a run of k members has k-1 pairs
  # (the pair after a run's last member is not a hit: it never counts).
  big = np.iinfo(np.int64).max
  pair_len = np.where(hit[idx[:-1]], length[idx[:-1]].astype(np.int64), big)
  run_len = np.minimum.reduceat(np.concatenate([pair_len, [big]]), starts_at)
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
