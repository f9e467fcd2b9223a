"""Mixing and export: sources with proportions and epochs, written as JSONL or
Parquet shards that the pretraining pipeline reads.

The mixture is deterministic given the seed: each source contributes
``proportion * total`` documents, taken by cycling through a seeded
permutation of its documents (``epochs`` caps how many passes one source may
make; a source that runs out contributes less and the shortfall is reported).
Picks are interleaved by a random key each. ``write_mixture`` does this out of
core: only the plan (a few integers per pick) is in memory; documents stream
from the source shards into key-range bucket files, and each bucket is sorted
alone, so the output is the same as sorting every pick by key in memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Iterable, Iterator, Sequence

import numpy as np

from data_pipeline.document import Document

FORMATS = ("jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  docs: Sequence[Document]
  proportion: float
  max_epochs: float = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which documents the mixture takes, in output order: pick i is document
  ``index[i]`` of source ``source[i]``; ``report`` has per-source counts."""
  source: np.ndarray
  index: np.ndarray
  key: np.ndarray
  report: dict[str, dict[str, float]]


def plan_mixture(sizes: Sequence[int], proportions: Sequence[float],
                 max_epochs: Sequence[float], names: Sequence[str], total: int,
                 seed: int = 0) -> Plan:
  """The mixture of sources with ``sizes`` documents each, sorted by key."""
  weights = np.array(proportions, np.float64)
  if (weights < 0).any() or weights.sum() <= 0:
    raise ValueError("mixing proportions must be >= 0 and sum to > 0")
  weights /= weights.sum()
  rng = np.random.default_rng(seed)
  sources, indices, keys, report = [], [], [], {}
  for s, (size, w, epochs, name) in enumerate(
      zip(sizes, weights, max_epochs, names)):
    want = int(round(w * total))
    n = min(want, int(np.floor(epochs * size)))
    perm = rng.permutation(size) if size else np.zeros(0, np.int64)
    idx = perm[np.arange(n) % size] if n else np.zeros(0, np.int64)
    sources.append(np.full(n, s, np.int32))
    indices.append(idx.astype(np.int64))
    keys.append(rng.random(n))
    report[name] = {"docs": n, "wanted": want, "epochs": n / max(1, size)}
  source, index, key = (np.concatenate(a) for a in (sources, indices, keys))
  order = np.argsort(key, kind="stable")
  return Plan(source[order], index[order], key[order], report)


def mix(sources: Sequence[Source], total: int, seed: int = 0
        ) -> tuple[list[Document], dict[str, dict[str, float]]]:
  """In-memory mixture of in-memory sources (same plan as ``write_mixture``)."""
  plan = plan_mixture([len(s.docs) for s in sources],
                      [s.proportion for s in sources],
                      [s.max_epochs for s in sources],
                      [s.name for s in sources], total, seed)
  docs = [sources[s].docs[i] for s, i in zip(plan.source, plan.index)]
  return docs, plan.report


class ShardWriter:
  """Streams documents into ``prefix-0000k-of-0000n.{jsonl,parquet}``.

  Shards are written as ``prefix-0000k.tmp`` and renamed when the writer
  closes (only then is n known); an empty output still gets one empty
  shard. At most one shard's documents are in memory (Parquet only)."""

  def __init__(self, out_dir: str, prefix: str, docs_per_shard: int = 10_000,
               fmt: str = "jsonl"):
    if fmt not in FORMATS:
      raise ValueError(f"export.format={fmt!r}; expected 'jsonl' or 'parquet'")
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir, self.prefix, self.fmt = out_dir, prefix, fmt
    self.docs_per_shard = docs_per_shard
    self.tmp_paths: list[str] = []
    self._rows: list[Document] = []
    self._file = None
    self._in_shard = 0

  def _start(self) -> None:
    path = os.path.join(self.out_dir,
                        f"{self.prefix}-{len(self.tmp_paths):05d}.tmp")
    self.tmp_paths.append(path)
    self._in_shard = 0
    if self.fmt == "jsonl":
      self._file = open(path, "w", encoding="utf-8")

  def _end(self) -> None:
    if self.fmt == "jsonl":
      self._file.close()
      self._file = None
    else:
      _write_parquet(self._rows, self.tmp_paths[-1])
      self._rows = []

  def write(self, doc: Document) -> None:
    if not self.tmp_paths or self._in_shard == self.docs_per_shard:
      if self.tmp_paths:
        self._end()
      self._start()
    if self.fmt == "jsonl":
      self._file.write(doc_line(doc))
    else:
      self._rows.append(doc)
    self._in_shard += 1

  def close(self) -> list[str]:
    """Finishes the last shard and names them all; returns the paths."""
    if not self.tmp_paths:
      self._start()
    self._end()
    n = len(self.tmp_paths)
    paths = []
    for k, tmp in enumerate(self.tmp_paths):
      path = os.path.join(self.out_dir,
                          f"{self.prefix}-{k:05d}-of-{n:05d}.{self.fmt}")
      os.replace(tmp, path)
      paths.append(path)
    return paths


def _write_parquet(docs: Sequence[Document], path: str) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({
      "id": [d.id for d in docs], "url": [d.url for d in docs],
      "text": [d.text for d in docs],
      "metadata": [json.dumps(d.metadata, sort_keys=True) for d in docs]}),
      path)


def doc_line(doc: Document) -> str:
  """A document as one JSONL line (the one serialisation every file uses)."""
  return json.dumps(doc.to_json(), ensure_ascii=False, sort_keys=True) + "\n"


def write_shards(docs: Iterable[Document], out_dir: str, prefix: str,
                 docs_per_shard: int = 10_000, fmt: str = "jsonl") -> list[str]:
  """Writes ``prefix-00000-of-0000N.{jsonl,parquet}``; returns the paths."""
  writer = ShardWriter(out_dir, prefix, docs_per_shard, fmt)
  for doc in docs:
    writer.write(doc)
  return writer.close()


def iter_shard(path: str) -> Iterator[Document]:
  """A shard's documents, streamed (Parquet one row group at a time)."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    table = pq.ParquetFile(path)
    for group in range(table.num_row_groups):
      for r in table.read_row_group(group).to_pylist():
        yield Document(r["id"], r["url"], r["text"],
                       metadata=json.loads(r["metadata"]))
    return
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield Document.from_json(json.loads(line))


def read_shard(path: str) -> list[Document]:
  return list(iter_shard(path))


def count_docs(paths: Sequence[str]) -> int:
  """Documents in shards without parsing them (lines; Parquet metadata)."""
  n = 0
  for path in paths:
    if path.endswith(".parquet"):
      import pyarrow.parquet as pq
      n += pq.ParquetFile(path).metadata.num_rows
    else:
      with open(path, "rb") as f:
        n += sum(1 for _ in f)
  return n


def write_mixture(sources: Sequence[tuple[str, Sequence[str], float]],
                  max_epochs: float, total: int, seed: int, out_dir: str,
                  docs_per_shard: int = 10_000, fmt: str = "jsonl",
                  docs_per_bucket: int = 100_000) -> dict[str, dict[str, float]]:
  """Mixes sources given as (name, shard paths, proportion) into ``out_dir``
  with bounded memory; ``total`` 0 means as many as the sources hold.

  Pass 1 streams each source once, appending every picked document (as often
  as it is picked) with its key to the bucket file of its key range; pass 2
  sorts each bucket (``docs_per_bucket`` documents on average) and writes it.
  """
  sizes = [count_docs(paths) for _, paths, _ in sources]
  plan = plan_mixture(sizes, [p for _, _, p in sources],
                      [max_epochs] * len(sources), [n for n, _, _ in sources],
                      total or sum(sizes), seed)
  shutil.rmtree(out_dir, ignore_errors=True)
  buckets = max(1, -(-len(plan.key) // docs_per_bucket))
  tmp = os.path.join(out_dir, "_buckets")
  os.makedirs(tmp)
  files = [open(os.path.join(tmp, f"{b:05d}.jsonl"), "w", encoding="utf-8")
           for b in range(buckets)]
  bucket_of = np.minimum((plan.key * buckets).astype(np.int64), buckets - 1)
  for s, (_, paths, _) in enumerate(sources):
    picks = np.flatnonzero(plan.source == s)
    picks = picks[np.argsort(plan.index[picks], kind="stable")]
    want = plan.index[picks]
    j = 0
    docs = (d for p in paths for d in iter_shard(p))
    for i, doc in enumerate(docs if len(picks) else ()):
      while j < len(picks) and want[j] == i:
        line = json.dumps([float(plan.key[picks[j]]), doc.to_json()],
                          ensure_ascii=False, sort_keys=True)
        files[bucket_of[picks[j]]].write(line + "\n")
        j += 1
      if j == len(picks):  # the last pick is written: read no further
        break
    docs.close()
  for f in files:
    f.close()
  writer = ShardWriter(out_dir, "mixed", docs_per_shard, fmt)
  for b in range(buckets):
    path = os.path.join(tmp, f"{b:05d}.jsonl")
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    rows.sort(key=lambda row: row[0])
    for _, row in rows:
      writer.write(Document.from_json(row))
    os.remove(path)
  writer.close()
  shutil.rmtree(tmp)
  with open(os.path.join(out_dir, "mixture.json"), "w", encoding="utf-8") as f:
    json.dump(plan.report, f, indent=1, sort_keys=True)
  return plan.report
