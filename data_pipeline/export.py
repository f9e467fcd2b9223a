"""Mixing and export: sources with proportions and epochs, written as JSONL or
Parquet shards that the pretraining pipeline reads.

The mixture is deterministic given the seed: each source contributes
``proportion * total`` documents, taken by cycling through a seeded
permutation of its documents (``epochs`` caps how many passes one source may
make; a source that runs out contributes less and the shortfall is reported).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from data_pipeline.document import Document


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  docs: Sequence[Document]
  proportion: float
  max_epochs: float = 1.0


def mix(sources: Sequence[Source], total: int, seed: int = 0
        ) -> tuple[list[Document], dict[str, dict[str, float]]]:
  """Returns the interleaved mixture and per-source counts/epochs."""
  weights = np.array([s.proportion for s in sources], np.float64)
  if (weights < 0).any() or weights.sum() <= 0:
    raise ValueError("mixing proportions must be >= 0 and sum to > 0")
  weights /= weights.sum()
  rng = np.random.default_rng(seed)
  picked, report = [], {}
  for src, w in zip(sources, weights):
    want = int(round(w * total))
    cap = int(np.floor(src.max_epochs * len(src.docs)))
    n = min(want, cap)
    perm = rng.permutation(len(src.docs)) if len(src.docs) else np.zeros(0, int)
    idx = [perm[i % len(perm)] for i in range(n)] if len(perm) else []
    picked.extend((rng.random(), src.name, src.docs[i]) for i in idx)
    report[src.name] = {"docs": n, "wanted": want,
                        "epochs": n / max(1, len(src.docs))}
  picked.sort(key=lambda x: x[0])
  return [d for _, _, d in picked], report


def write_shards(docs: Sequence[Document], out_dir: str, prefix: str,
                 docs_per_shard: int = 10_000, fmt: str = "jsonl") -> list[str]:
  """Writes ``prefix-00000-of-0000N.{jsonl,parquet}``; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  n_shards = max(1, -(-len(docs) // docs_per_shard))
  paths = []
  for k in range(n_shards):
    part = docs[k * docs_per_shard:(k + 1) * docs_per_shard]
    path = os.path.join(out_dir, f"{prefix}-{k:05d}-of-{n_shards:05d}.{fmt}")
    tmp = path + ".tmp"
    if fmt == "jsonl":
      with open(tmp, "w", encoding="utf-8") as f:
        for d in part:
          f.write(json.dumps(d.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
    elif fmt == "parquet":
      import pyarrow as pa
      import pyarrow.parquet as pq
      table = pa.table({
          "id": [d.id for d in part], "url": [d.url for d in part],
          "text": [d.text for d in part],
          "metadata": [json.dumps(d.metadata, sort_keys=True) for d in part]})
      pq.write_table(table, tmp)
    else:
      raise ValueError(f"export.format={fmt!r}; expected 'jsonl' or 'parquet'")
    os.replace(tmp, path)
    paths.append(path)
  return paths


def read_shard(path: str) -> list[Document]:
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
    return [Document(r["id"], r["url"], r["text"],
                     metadata=json.loads(r["metadata"])) for r in rows]
  with open(path, encoding="utf-8") as f:
    return [Document.from_json(json.loads(line)) for line in f]
