"""Token shards: a flat token array plus an offsets index, read by memmap.

    NAME-00000.tokens.npy    1-D uint16 (vocab <= 65536) or uint32: every
                             document's ids, back to back, each ending in EOS
                             (and starting with BOS when asked)
    NAME-00000.offsets.npy   int64 [num_docs + 1]: document i is
                             tokens[offsets[i]:offsets[i + 1]]
    NAME-00000.meta.json     tokenizer, vocab size, BOS/EOS ids, counts
    NAME.summary.json        the run: documents and tokens kept, drops by
                             reason with example locations, the shard list;
                             written last, so it marks a finished run

Why not ArrayRecord: packing cuts documents at arbitrary token offsets and
lays out rows from document lengths alone. A memmapped flat array gives both
for free (lengths are one subtraction, a slice reads only the tokens asked
for, nothing is decoded), so each host reads only the tokens of its own rows.
ArrayRecord would store opaque records that must be read and decoded whole.
`TokenShards` is a Grain random-access source (`__len__`, `__getitem__`).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Iterable, Sequence

import numpy as np

from mllm_jax.data import readers
from mllm_jax.data.tokenizer import Tokenizer

TOKENS_SUFFIX = ".tokens.npy"
OFFSETS_SUFFIX = ".offsets.npy"
META_SUFFIX = ".meta.json"
SUMMARY_SUFFIX = ".summary.json"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def summary_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, name + SUMMARY_SUFFIX)


def write_shards(texts: Iterable[str | readers.Drop], tok: Tokenizer,
                 out_dir: str, name: str, *, add_bos: bool = False,
                 shard_tokens: int = 1 << 28, batch_docs: int = 256,
                 drops: readers.DropCounter | None = None,
                 inputs: Sequence[str] = ()) -> dict:
  """Tokenizes documents (Drops are counted) into shards; returns the summary.

  Every document ends with EOS (and starts with BOS if add_bos), so packed
  rows mark document ends even after concatenation. A shard is closed once it
  holds `shard_tokens` tokens; a document is never split between shards.
  """
  if tok.eos_id < 0:
    raise ValueError(f"{tok.path}: the tokenizer has no EOS token; documents "
                     f"could not be separated after packing")
  if add_bos and tok.bos_id < 0:
    raise ValueError(f"{tok.path}: add_bos is set but the tokenizer has no BOS")
  drops = drops if drops is not None else readers.DropCounter()
  os.makedirs(out_dir, exist_ok=True)
  dtype = token_dtype(tok.vocab_size)
  writer = _ShardWriter(out_dir, name, dtype, shard_tokens, {
      "tokenizer": os.path.abspath(tok.path), "vocab_size": tok.vocab_size,
      "bos_id": tok.bos_id if add_bos else -1, "eos_id": tok.eos_id})
  batch: list[str] = []
  for text in drops.texts(texts):
    batch.append(text)
    if len(batch) == batch_docs:
      writer.add(tok.encode_batch(batch, add_bos=add_bos, add_eos=True))
      batch = []
  if batch:
    writer.add(tok.encode_batch(batch, add_bos=add_bos, add_eos=True))
  shards = writer.close()
  summary = {
      "name": name, "inputs": list(inputs),
      "documents": sum(s["documents"] for s in shards),
      "tokens": sum(s["tokens"] for s in shards),
      **drops.summary(), "shards": shards, **writer.meta,
      "add_bos": add_bos, "dtype": dtype.name,
  }
  _write_json(summary_path(out_dir, name), summary)
  return summary


class _ShardWriter:
  """Accumulates tokenized documents and writes one shard at a time."""

  def __init__(self, out_dir: str, name: str, dtype: np.dtype,
               shard_tokens: int, meta: dict):
    self.out_dir, self.name, self.dtype = out_dir, name, dtype
    self.shard_tokens, self.meta = shard_tokens, meta
    self.docs: list[list[int]] = []
    self.count = 0
    self.shards: list[dict] = []

  def add(self, docs: list[list[int]]) -> None:
    for doc in docs:
      self.docs.append(doc)
      self.count += len(doc)
      if self.count >= self.shard_tokens:
        self._flush()

  def close(self) -> list[dict]:
    if self.docs or not self.shards:
      self._flush()
    return self.shards

  def _flush(self) -> None:
    stem = os.path.join(self.out_dir, f"{self.name}-{len(self.shards):05d}")
    lengths = np.array([len(d) for d in self.docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (np.concatenate([np.asarray(d, self.dtype) for d in self.docs])
              if self.docs else np.zeros(0, self.dtype))
    _save_npy(stem + TOKENS_SUFFIX, tokens)
    _save_npy(stem + OFFSETS_SUFFIX, offsets)
    info = {"documents": len(self.docs), "tokens": int(offsets[-1])}
    _write_json(stem + META_SUFFIX, {**self.meta, **info})
    self.shards.append({"path": os.path.basename(stem + TOKENS_SUFFIX), **info})
    self.docs, self.count = [], 0


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)  # a killed run never leaves a half-written shard


def _write_json(path: str, value: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class TokenShards:
  """Documents of one or more shards, by global document index.

  A Grain random-access data source: `len()` documents and `[i]` returns
  document i's ids. The packer uses `lengths` and `read` to fetch parts.
  """

  def __init__(self, token_files: Sequence[str]):
    if not token_files:
      raise FileNotFoundError("no token shard given")
    self.files = list(token_files)
    self._tokens, self._offsets, metas = [], [], []
    for path in self.files:
      tokens, offsets, meta = _open_shard(path)
      self._tokens.append(tokens)
      self._offsets.append(offsets)
      metas.append(meta)
    self.meta = metas[0]
    for path, meta in zip(self.files, metas):
      if meta.get("vocab_size") != self.meta.get("vocab_size"):
        raise ValueError(f"{path}: vocab_size {meta.get('vocab_size')} differs "
                         f"from {self.files[0]}'s {self.meta.get('vocab_size')}")
    counts = [len(o) - 1 for o in self._offsets]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.lengths = np.concatenate(
        [np.diff(o) for o in self._offsets]).astype(np.int64)

  @property
  def num_docs(self) -> int:
    return int(self._starts[-1])

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())

  @property
  def vocab_size(self) -> int:
    return int(self.meta.get("vocab_size", -1))

  def __len__(self) -> int:
    return self.num_docs

  def __getitem__(self, doc: int) -> np.ndarray:
    return self.read(doc, 0, int(self.lengths[doc]))

  def read(self, doc: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of document `doc` (int32; a fresh array)."""
    shard = bisect.bisect_right(self._starts, doc) - 1
    base = int(self._offsets[shard][doc - self._starts[shard]])
    return np.asarray(self._tokens[shard][base + start:base + stop], np.int32)

  def __repr__(self) -> str:
    return (f"TokenShards({len(self.files)} files, {self.num_docs} docs, "
            f"{self.num_tokens} tokens)")


def _open_shard(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  if not path.endswith(TOKENS_SUFFIX):
    raise ValueError(f"{path}: not a token shard (expected *{TOKENS_SUFFIX})")
  stem = path[:-len(TOKENS_SUFFIX)]
  for suffix in (OFFSETS_SUFFIX, META_SUFFIX):
    if not os.path.isfile(stem + suffix):
      raise FileNotFoundError(f"{stem + suffix} is missing: {path} is not a "
                              f"complete shard (re-run launch.tokenize_corpus)")
  try:
    tokens = np.load(path, mmap_mode="r")
    offsets = np.load(stem + OFFSETS_SUFFIX)
    with open(stem + META_SUFFIX) as f:
      meta = json.load(f)
  except (ValueError, OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable shard ({e})") from e
  if (tokens.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or
      offsets[0] != 0 or offsets[-1] != len(tokens) or
      np.any(np.diff(offsets) <= 0)):
    raise ValueError(f"{path}: offsets index does not match the token array "
                     f"({len(tokens)} tokens, {len(offsets) - 1} documents)")
  return tokens, offsets, meta


def find_shards(pattern: str) -> list[str]:
  """Token files matching a glob; a directory means every shard in it."""
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*" + TOKENS_SUFFIX)
  elif not pattern.endswith(TOKENS_SUFFIX) and not pattern.endswith("*"):
    pattern += "*" + TOKENS_SUFFIX
  return sorted(p for p in glob.glob(pattern) if p.endswith(TOKENS_SUFFIX))


def open_shards(pattern: str) -> TokenShards:
  files = find_shards(pattern)
  if not files:
    raise FileNotFoundError(f"no token shard matches {pattern!r}")
  return TokenShards(files)
