"""Packing supervised examples (SFT conversations, FLAN prompts) into rows.

An example is `{"ids": int[n], "weights": float[n]}` with 2 <= n <= seq_len+1,
where weights[i] is the loss weight for predicting ids[i] from ids[:i]
(weights[0] is unused; `chat.encode` makes these). Each example becomes one
segment of a row, never split and never continued in another row:

    inputs        ids[:-1]          segment_ids   k (the k-th example of the
    targets       ids[1:]                         row, 1, 2, ...; 0 = padding)
    loss_weights  weights[1:]       positions     0 .. n-2

so an example occupies n-1 of a row's seq_len slots, attends only to itself
(segment ids; `Decoder` masks across segments) and its loss equals its loss
alone. Padding has segment 0, target 0 and weight 0. This is the batch schema
of `mllm_jax.data.pipeline` ([local_batch, seq_len] numpy arrays).

Layout of a global batch: the examples are taken in order (the dataset's
order, or a seeded shuffle per pass) and each goes to the first row with room
for it (first fit). One that fits nowhere waits in a look-ahead window and
goes first into the next batch; the batch is closed when `window` examples
wait (or every row is full, or the data ends). A row's free space only
shrinks, so a waiting example is not retried in the same batch. The layout
depends only on example lengths, so every host computes the same one and
materialises only its own rows.

State (get_state/set_state): the next example of the stream, the waiting
examples (at most `window` integers), batch and token counters: small JSON,
the same on every host and independent of the host count.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import numpy as np

from mllm_jax.configlib import ConfigError
from mllm_jax.data.pipeline import derive_seed, host_rows

Batch = dict[str, np.ndarray]
_MAX_SKIPS = 1 << 20  # None examples in a row, nothing packed: give up
Example = Mapping[str, Any]  # {"ids": int[n], "weights": float[n]}


class PackedExampleIterator(grain.DatasetIterator):
  """This host's rows of packed global batches of supervised examples.

  examples: an indexable sequence (list, grain.MapDataset, ...) of examples;
    an element that is None (e.g. removed by MapDataset.filter) is skipped
    and counted.
  lengths: optional token count of every example (0 for a None one), so
    the layout is computed without materialising other hosts' examples.
  shuffle/seed: a fresh seeded order for every pass over the data.
  repeat: pass after pass, forever; else one pass (the last batch is padded).
  window: how many examples may wait for room (the look-ahead); more packs
    tighter and delays an example by at most about one batch.
  """

  def __init__(self, examples: Sequence[Example | None], *, seq_len: int,
               global_batch_size: int, process_index: int = 0,
               process_count: int = 1, shuffle: bool = False, seed: int = 0,
               repeat: bool = False, window: int = 64,
               lengths: Sequence[int] | None = None):
    super().__init__()
    if seq_len < 1:
      raise ConfigError(f"seq_len must be positive, got {seq_len}")
    if global_batch_size <= 0:
      raise ConfigError(f"global batch size must be positive, got "
                        f"{global_batch_size}")
    if window < 1:
      raise ConfigError(f"window must be at least 1, got {window}")
    self._examples = examples
    self._n = len(examples)
    if self._n == 0:
      raise ValueError("no examples to pack")
    if lengths is not None and len(lengths) != self._n:
      raise ValueError(f"{len(lengths)} lengths for {self._n} examples")
    self._lengths = lengths
    self._seq_len = seq_len
    self._global = global_batch_size
    self._lo, self._hi = host_rows(global_batch_size, process_index,
                                   process_count)
    self._shuffle, self._seed = shuffle, seed
    self._repeat = repeat
    self._window = window
    self._identity = {"seq_len": seq_len,
                      "global_batch_size": global_batch_size,
                      "num_examples": self._n, "shuffle": shuffle,
                      "seed": seed, "repeat": repeat, "window": window}
    self._orders: dict[int, Any] = {}
    self._set(0, [], 0, 0, 0, 0)

  # --- the example stream ----------------------------------------------------

  def _index(self, g: int) -> int:
    """Dataset index of the g-th example of the stream (pass g // n)."""
    pass_index, position = divmod(g, self._n)
    if not self._shuffle:
      return position
    order = self._orders.get(pass_index)
    if order is None:
      order = grain.MapDataset.range(self._n).shuffle(
          seed=derive_seed(self._seed, pass_index, "sft"))
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      self._orders[pass_index] = order
    return int(order[position])

  def _end(self) -> int | None:
    return None if self._repeat else self._n

  def _example(self, index: int) -> Example | None:
    example = self._examples[index]
    if example is None:
      return None
    ids, weights = example["ids"], example["weights"]
    n = len(ids)
    if len(weights) != n:
      raise ValueError(f"example {index}: {n} ids but {len(weights)} weights")
    self._check_length(index, n)
    return example

  def _check_length(self, index: int, n: int) -> None:
    if n > self._seq_len + 1:
      raise ValueError(
          f"example {index} has {n} tokens, more than seq_len + 1 = "
          f"{self._seq_len + 1}; truncate or drop it when encoding "
          f"(chat.encode(max_len=seq_len + 1))")
    if n < 2:
      raise ValueError(f"example {index} has {n} token(s); an example needs "
                       f"at least 2 (one target)")

  def _length(self, index: int, cache: dict[int, Example | None]) -> int:
    """Token count of an example, 0 for a skipped (None) one."""
    if self._lengths is not None:
      n = int(self._lengths[index])
      if n:
        self._check_length(index, n)
      return n
    if index not in cache:
      cache[index] = self._example(index)
    example = cache[index]
    return 0 if example is None else len(example["ids"])

  # --- iteration ---------------------------------------------------------------

  def _set(self, next_g: int, waiting: list[int], batches: int,
           real_tokens: int, slots: int, skipped: int) -> None:
    self._next, self._waiting = next_g, list(waiting)
    self._batches, self._real, self._slots = batches, real_tokens, slots
    self._skipped = skipped

  def _layout(self, cache: dict[int, Example | None]):
    cap = self._seq_len
    free = np.full(self._global, cap, np.int64)
    rows: list[list[int]] = [[] for _ in range(self._global)]
    waiting: list[int] = []
    next_g, skipped, end = self._next, 0, self._end()
    queue = iter(list(self._waiting))
    while len(waiting) < self._window and free.max() > 0:
      g = next(queue, None)
      if g is None:
        if end is not None and next_g >= end:
          break
        g, next_g = next_g, next_g + 1
      size = self._length(self._index(g), cache) - 1
      if size < 0:
        skipped += 1
        if free.min() == cap and skipped > min(
            self._n if self._repeat else _MAX_SKIPS, _MAX_SKIPS):
          raise ValueError(f"{skipped} examples in a row are None (skipped); "
                           f"none is usable")
        continue
      fits = np.flatnonzero(free >= size)
      if fits.size:
        rows[fits[0]].append(g)
        free[fits[0]] -= size
      else:
        waiting.append(g)
    waiting.extend(queue)  # not reached when the window filled up
    real = int(self._global * cap - free.sum())
    return rows, next_g, waiting, skipped, real

  def __next__(self) -> Batch:
    cache: dict[int, Example | None] = {}
    rows, next_g, waiting, skipped, real = self._layout(cache)
    if real == 0:
      self._next, self._skipped = next_g, self._skipped + skipped
      raise StopIteration
    batch = self._assemble(rows[self._lo:self._hi], cache)
    self._set(next_g, waiting, self._batches + 1, self._real + real,
              self._slots + self._global * self._seq_len,
              self._skipped + skipped)
    return batch

  def _assemble(self, rows: list[list[int]],
                cache: dict[int, Example | None]) -> Batch:
    shape = (len(rows), self._seq_len)
    inputs = np.zeros(shape, np.int32)
    targets = np.zeros(shape, np.int32)
    loss_weights = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
      at = 0
      for k, g in enumerate(row, 1):
        index = self._index(g)
        example = cache[index] if index in cache else self._example(index)
        if example is None:
          raise ValueError(f"example {index} is None but lengths[{index}] = "
                           f"{self._lengths[index]}")
        ids = np.asarray(example["ids"], np.int32)
        weights = np.asarray(example["weights"], np.float32)
        size = len(ids) - 1
        if self._lengths is not None and size + 1 != int(self._lengths[index]):
          raise ValueError(f"example {index} has {size + 1} tokens but "
                           f"lengths[{index}] = {self._lengths[index]}")
        span = slice(at, at + size)
        inputs[r, span] = ids[:-1]
        targets[r, span] = ids[1:]
        loss_weights[r, span] = weights[1:]
        segment_ids[r, span] = k
        positions[r, span] = np.arange(size, dtype=np.int32)
        at += size
    return {"inputs": inputs, "targets": targets,
            "loss_weights": loss_weights, "segment_ids": segment_ids,
            "positions": positions}

  # --- state and reporting -----------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    return {"next": self._next, "waiting": list(self._waiting),
            "batches": self._batches, "real_tokens": self._real,
            "slots": self._slots, "skipped": self._skipped,
            **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(
            f"packed example iterator state was saved with "
            f"{key}={state.get(key)!r} but this one has {key}={value!r}; it "
            f"cannot resume from it")
    self._set(int(state["next"]), [int(g) for g in state["waiting"]],
              int(state["batches"]), int(state["real_tokens"]),
              int(state["slots"]), int(state["skipped"]))

  @property
  def efficiency(self) -> float:
    """Real (non-padding) token slots / all slots of the batches so far."""
    return self._real / self._slots if self._slots else 0.0

  def stats(self) -> dict[str, Any]:
    return {"batches": self._batches, "real_tokens": self._real,
            "slots": self._slots, "efficiency": self.efficiency,
            "skipped": self._skipped, "waiting": len(self._waiting),
            "epoch": self._next / self._n if self._n else 0.0}

  def __str__(self) -> str:
    return (f"PackedExampleIterator(batches={self._batches}, "
            f"efficiency={self.efficiency:.3f}, rows {self._lo}:{self._hi} "
            f"of {self._global})")


def packing_efficiency(lengths: Sequence[int], seq_len: int,
                       global_batch_size: int, window: int = 64) -> float:
  """Efficiency of packing examples of these token counts (one pass, in
  order), computed from the layout alone."""
  it = PackedExampleIterator([None] * len(lengths), seq_len=seq_len,
                             global_batch_size=global_batch_size,
                             window=window, lengths=lengths)
  real = slots = 0
  while True:
    rows, next_g, waiting, _, used = it._layout({})  # pylint: disable=protected-access
    if used == 0:
      break
    real += used
    slots += global_batch_size * seq_len
    it._set(next_g, waiting, 0, 0, 0, 0)  # pylint: disable=protected-access
    del rows
  return real / slots if slots else 0.0


__all__ = ["PackedExampleIterator", "packing_efficiency"]
