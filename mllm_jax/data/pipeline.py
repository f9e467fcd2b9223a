"""The pretraining input pipeline: mixture -> global shuffle -> packed batches.

Document order is a Grain `MapDataset` of (source, document) references:

    per source   range(num_docs) -> shuffle -> repeat/slice to `epochs`
    mixture      MapDataset.mix(sources, weights)   (proportions exact per pass)
                 -> shuffle                          (global, seeded)

`PackedBatchIterator` walks that order and concatenates documents into rows
of seq_len + 1 tokens (inputs = row[:-1], targets = row[1:]). A document longer
than the space left continues at the start of the next row (the one token
at the seam is a target in the first row and not repeated), and a document
never starts in a row's target-only last slot (it is padded instead), so
every token is trained on. The layout of
every row of a global batch is computed from document lengths alone (every
host agrees on it); a host reads only the tokens of its own rows.

Batch schema (numpy, each [local_batch, seq_len]), shared by every supervised
stage: inputs, targets (int32), loss_weights (float32), segment_ids (int32,
1, 2, ... per document piece in the row, 0 = padding), positions (int32, from
0 in each piece). loss_weights is 0 where the target belongs to another
document or to padding, so no document is ever trained to predict the next.

The iterator state is three integers and a flag (pass, position in the
mixture, tokens already used of that document, batches): JSON, the same on
every host, and independent of the host count.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from mllm_jax.configlib import ConfigError
from mllm_jax.data import shards as shards_lib
from mllm_jax.data.config import DataConfig
from mllm_jax.data.tokenizer import load_tokenizer

Batch = dict[str, np.ndarray]
Piece = tuple[int, int, int, int]  # (source, doc, start, stop)


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def open_sources(cfg: DataConfig, prefix: str = "data",
                 evaluation: bool = False) -> list[shards_lib.TokenShards]:
  """Opens every source's shards, checking they exist, are non-empty and were
  tokenized with `cfg.tokenizer`'s vocabulary; errors name the source."""
  try:
    vocab_size = load_tokenizer(cfg.tokenizer).vocab_size
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{prefix}.tokenizer: {e}") from e
  if evaluation:
    entries = [(f"{prefix}.eval_sources[{i}] ({name})", path)
               for i, (name, path) in enumerate(cfg.eval_source_list)]
    if not entries:
      raise ConfigError(f"{prefix}.eval_sources: is empty; give held-out "
                        f"(name, path) shards for evaluation")
  else:
    entries = [(f"{prefix}.sources[{i}] ({s.name})", s.path)
               for i, s in enumerate(cfg.source_list)]
  opened = []
  for field, path in entries:
    try:
      source = shards_lib.open_shards(path)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"{field}: {e}") from e
    if source.num_tokens == 0:
      raise ConfigError(f"{field}: {path} holds no documents")
    if source.vocab_size != vocab_size:
      raise ConfigError(
          f"{field}: shards were tokenized with a {source.vocab_size}-token "
          f"vocabulary ({source.meta.get('tokenizer')}) but {prefix}.tokenizer "
          f"{cfg.tokenizer} has {vocab_size}")
    opened.append(source)
  return opened


def check_data(cfg: DataConfig, prefix: str = "data") -> dict[str, Any]:
  """Everything that can be checked before compiling: returns the tokenizer
  vocab size and each source's document / token counts."""
  sources = open_sources(cfg, prefix)
  return {"vocab_size": load_tokenizer(cfg.tokenizer).vocab_size,
          "sources": {s.name: {"documents": o.num_docs, "tokens": o.num_tokens}
                      for s, o in zip(cfg.source_list, sources)}}


# ----------------------------------------------------------------------------
# Document order
# ----------------------------------------------------------------------------


def derive_seed(*parts: Any) -> int:
  """A 32-bit seed from a tuple of names/numbers (stable across processes)."""
  return zlib.crc32("/".join(str(p) for p in parts).encode())


def _tag(source: int, doc: int) -> tuple[int, int]:
  return source, int(doc)


def mixture(cfg: DataConfig, sources: Sequence[shards_lib.TokenShards],
            pass_index: int = 0) -> grain.MapDataset:
  """One pass of the mixture: (source, doc) pairs in globally shuffled order.

  Each source is shuffled and cut to `epochs` passes over its documents (each
  pass reshuffled); `MapDataset.mix` interleaves them by weight and ends when
  the first source runs out, so none is seen more than its epochs.
  """
  parts, weights = [], []
  for i, (src, shards) in enumerate(zip(cfg.source_list, sources)):
    n = shards.num_docs
    docs = grain.MapDataset.range(n).shuffle(
        seed=derive_seed(cfg.seed, pass_index, src.name))
    total = max(1, round(src.epochs * n))
    docs = docs.repeat(math.ceil(total / n)).slice(slice(0, total))
    parts.append(docs.map(functools.partial(_tag, i)))
    weight = src.weight
    if cfg.weight_by == "tokens":  # documents to draw per token wanted
      weight /= shards.num_tokens / n
    weights.append(weight)
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  return mixed.shuffle(seed=derive_seed(cfg.seed, pass_index, "mixture"))


def _in_order(sources: Sequence[shards_lib.TokenShards]) -> grain.MapDataset:
  """Every document of every source, in order (held-out evaluation)."""
  parts = [grain.MapDataset.range(s.num_docs).map(functools.partial(_tag, i))
           for i, s in enumerate(sources)]
  return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------


def host_rows(global_batch_size: int, process_index: int,
              process_count: int) -> tuple[int, int]:
  """This host's contiguous rows [lo, hi) of each global batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, process_count={process_count})")
  if global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} is not divisible "
                      f"by the number of processes ({process_count})")
  local = global_batch_size // process_count
  return process_index * local, (process_index + 1) * local


def assemble(rows: Sequence[Sequence[Piece]], seq_len: int,
             sources: Sequence[shards_lib.TokenShards]) -> Batch:
  """Rows of document pieces -> the batch schema (see module docstring)."""
  n = len(rows)
  tokens = np.zeros((n, seq_len + 1), np.int32)
  segments = np.zeros((n, seq_len + 1), np.int32)
  positions = np.zeros((n, seq_len + 1), np.int32)
  for r, pieces in enumerate(rows):
    at = 0
    for k, (src, doc, start, stop) in enumerate(pieces, 1):
      size = stop - start
      tokens[r, at:at + size] = sources[src].read(doc, start, stop)
      segments[r, at:at + size] = k
      positions[r, at:at + size] = np.arange(size, dtype=np.int32)
      at += size
  same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] != 0)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:] * same_doc,
      "loss_weights": same_doc.astype(np.float32),
      "segment_ids": segments[:, :-1],
      "positions": positions[:, :-1],
  }


class PackedBatchIterator(grain.DatasetIterator):
  """Packs a document order into fixed-length rows; yields this host's slice
  of each global batch. Checkpoint with get_state()/set_state() (Grain's
  Orbax handler, grain.checkpoint.CheckpointSave, works as is)."""

  def __init__(self, order_fn, sources: Sequence[shards_lib.TokenShards],
               seq_len: int, global_batch_size: int, process_index: int,
               process_count: int, repeat: bool, identity: dict[str, Any]):
    super().__init__()
    if global_batch_size <= 0:
      raise ConfigError(f"global batch size must be positive, got "
                        f"{global_batch_size}")
    self._order_fn = order_fn
    self._sources = sources
    self._lengths = [s.lengths for s in sources]
    self._seq_len = seq_len
    self._global = global_batch_size
    self._lo, self._hi = host_rows(global_batch_size, process_index,
                                   process_count)
    self._repeat = repeat
    self._identity = {**identity, "seq_len": seq_len,
                      "global_batch_size": global_batch_size}
    self._set(0, 0, 0, 0, False)

  def _set(self, pass_index: int, position: int, offset: int, batches: int,
           exhausted: bool) -> None:
    if not hasattr(self, "_pass") or pass_index != self._pass:
      self._order = self._order_fn(pass_index)
    self._pass, self._position, self._offset = pass_index, position, offset
    self._batches, self._exhausted = batches, exhausted

  def __next__(self) -> Batch:
    if self._exhausted:
      raise StopIteration
    pass_index, position, offset = self._pass, self._position, self._offset
    order, width = self._order, self._seq_len + 1
    rows: list[list[Piece]] = []
    exhausted, placed = False, 0
    for r in range(self._global):
      pieces, fill = [], 0
      while fill < width and not exhausted:
        if position >= len(order):
          if not self._repeat:
            exhausted = True
            break
          pass_index, position, offset = pass_index + 1, 0, 0
          order = self._order_fn(pass_index)
        if fill == width - 1 and offset == 0:
          break  # the target-only last slot never starts a document
        src, doc = order[position]
        length = int(self._lengths[src][doc])
        take = min(width - fill, length - offset)
        pieces.append((src, doc, offset, offset + take))
        fill, offset = fill + take, offset + take
        if offset == length:
          position, offset = position + 1, 0
      placed += fill
      if self._lo <= r < self._hi:
        rows.append(pieces)
    if placed == 0:
      self._exhausted = True
      raise StopIteration
    if pass_index != self._pass:
      self._order = order
    self._pass, self._position, self._offset = pass_index, position, offset
    self._batches += 1
    self._exhausted = exhausted
    return assemble(rows, self._seq_len, self._sources)

  def get_state(self) -> dict[str, Any]:
    return {"pass": self._pass, "position": self._position,
            "offset": self._offset, "batches": self._batches,
            "exhausted": self._exhausted, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(
            f"data iterator state was saved with {key}={state.get(key)!r} but "
            f"this pipeline has {key}={value!r}; it cannot resume from it")
    self._set(int(state["pass"]), int(state["position"]),
              int(state["offset"]), int(state["batches"]),
              bool(state["exhausted"]))

  def __str__(self) -> str:
    return (f"PackedBatchIterator(batches={self._batches}, pass={self._pass}, "
            f"rows {self._lo}:{self._hi} of {self._global})")


def _identity(cfg: DataConfig, names: Sequence[str]) -> dict[str, Any]:
  # Only what changes the document order; the state is refused if it differs.
  return {"seed": cfg.seed, "sources": [list(n) for n in names]}


def make_pretrain_iterator(data_cfg: DataConfig, global_batch_size: int,
                           process_index: int | None = None,
                           process_count: int | None = None
                           ) -> grain.DatasetIterator:
  """This host's slice of each packed global batch of the training mixture.

  process_index/count default to jax.process_index()/process_count(). With
  ``data_cfg.prefetch`` > 0, Grain's ThreadPrefetchDatasetIterator packs that
  many batches ahead; its get_state() is the state after the last batch
  handed out, so checkpoints and resume are the same as without it.
  """
  process_index, process_count = _process(process_index, process_count)
  sources = open_sources(data_cfg)
  names = [(s.name, s.weight, s.epochs) for s in data_cfg.source_list]
  packed = PackedBatchIterator(
      functools.partial(mixture, data_cfg, sources), sources,
      data_cfg.seq_len, global_batch_size, process_index, process_count,
      data_cfg.repeat, _identity(data_cfg, names))
  if data_cfg.prefetch == 0:
    return packed
  return grain.experimental.ThreadPrefetchDatasetIterator(
      packed, data_cfg.prefetch)


def make_eval_batches(data_cfg: DataConfig, global_batch_size: int,
                      num_batches: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[Batch]:
  """The held-out `eval_sources`, packed in file order: the same batches on
  every call (for comparable perplexities). The last batch is padded with
  loss_weights 0; num_batches caps the count (None: all of the data)."""
  process_index, process_count = _process(process_index, process_count)
  sources = open_sources(data_cfg, evaluation=True)
  order = _in_order(sources)
  it = PackedBatchIterator(
      lambda _: order, sources, data_cfg.seq_len, global_batch_size,
      process_index, process_count, False, {"eval": True})
  yield from itertools.islice(it, num_batches)


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  if index is None or count is None:
    import jax  # pylint: disable=g-import-not-at-top
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  return index, count
