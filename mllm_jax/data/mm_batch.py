"""Multimodal examples -> the batch schema of `modeling.multimodal`, on the host.

An example is what `images.prepare` gives with a tokenizer: {"id", "ids",
"weights", "images": float32[k, S, S, 3]}, with one `<image>` token per image
in `ids` (or, as HF processors write them, already `tokens_per_image` copies
per image). This module

  1. expands each placeholder to `tokens_per_image` positions of weight 0,
     after checking that the placeholders match the images (an error naming
     the example otherwise: a misaligned example is a data bug, not a drop);
  2. fits the example to the row, never cutting an image span: when the row
     ends inside a span, the text is cut before that image (and the images
     past the cut are removed); an example with no answer token left is
     dropped and counted (`no_answer_after_truncation`);
  3. lays one example per row: the text fields of `data.packing` (inputs,
     targets, loss_weights, segment_ids, positions) plus `images`
     [B, max_images, S, S, 3] and `image_slots` [B, T] (the index of each
     image position among the row's image tokens, -1 for text). A text-only
     example has no slot; its image places stay zero.

Imports no JAX: the data pipeline runs on the host.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mllm_jax.data import readers
from mllm_jax.data.chat import ChatStats

Example = Mapping[str, Any]


class PlaceholderError(ValueError):
  """An example's image placeholders do not match its images."""


def _image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
  """(start, length) of each maximal run of image tokens."""
  runs, start = [], None
  for i, is_image in enumerate(np.append(ids == image_token_id, False)):
    if is_image and start is None:
      start = i
    elif not is_image and start is not None:
      runs.append((start, i - start))
      start = None
  return runs


def expand_placeholders(example: Example, image_token_id: int,
                        tokens_per_image: int) -> dict[str, Any]:
  """The example with each image's placeholder spanning `tokens_per_image`
  positions, all of loss weight 0. Raises PlaceholderError naming the
  example when the placeholders and the images disagree."""
  ids = np.asarray(example["ids"], np.int32)
  weights = np.asarray(example["weights"], np.float32)
  num_images = len(example["images"])
  runs = _image_runs(ids, image_token_id)
  found = sum(n for _, n in runs)
  out = dict(example)
  if found == num_images:  # one token per image: expand
    repeat = np.where(ids == image_token_id, tokens_per_image, 1)
    out["ids"] = np.repeat(ids, repeat)
    out["weights"] = np.where(out["ids"] == image_token_id, 0.0,
                              np.repeat(weights, repeat)).astype(np.float32)
    return out
  if (found == num_images * tokens_per_image
      and all(n % tokens_per_image == 0 for _, n in runs)):
    out["ids"] = ids  # already expanded
    out["weights"] = np.where(ids == image_token_id, 0.0,
                              weights).astype(np.float32)
    return out
  raise PlaceholderError(
      f"example {example.get('id', '?')!r}: {found} image placeholder "
      f"token(s) (id {image_token_id}) for {num_images} image(s); expected "
      f"{num_images} (one per image) or {num_images * tokens_per_image} "
      f"({tokens_per_image} per image, in whole runs)")


def fit_to_row(example: Example, max_len: int, image_token_id: int,
               tokens_per_image: int, stats: ChatStats | None = None
               ) -> dict[str, Any] | None:
  """An expanded example cut to at most `max_len` ids (seq_len + 1) without
  cutting an image span (see the module docstring); None when no answer
  token is left (counted in `stats`)."""
  ids = np.asarray(example["ids"])
  if len(ids) <= max_len:
    return dict(example)
  cut = max_len
  spans = [(start + j * tokens_per_image, start + (j + 1) * tokens_per_image)
           for start, n in _image_runs(ids, image_token_id)
           for j in range(n // tokens_per_image)]
  # An image is kept only if its span ends before the last id (the last id
  # is a target only, so a span ending there would lose its last input).
  kept = [s for s in spans if s[1] < cut]
  if len(kept) < len(spans):
    cut = min(cut, spans[len(kept)][0])
  out = dict(example)
  out["ids"] = ids[:cut]
  out["weights"] = np.asarray(example["weights"])[:cut]
  out["images"] = np.asarray(example["images"])[:len(kept)]
  where = f"{example.get('id', '?')} ({len(ids)} tokens > {max_len})"
  if cut < 2 or not out["weights"][1:].any():
    if stats is not None:
      stats.add(readers.Drop("no_answer_after_truncation", where))
    return None
  if stats is not None:
    stats.note("truncated")
    if len(kept) < len(spans):
      stats.note("images_cut_with_text", len(spans) - len(kept))
  return out


def make_batch(examples: Sequence[Example | None], *, seq_len: int,
               max_images: int, image_shape: tuple[int, int, int],
               image_token_id: int, tokens_per_image: int,
               stats: ChatStats | None = None) -> dict[str, np.ndarray]:
  """One row per example (None: an empty, all-padding row) -> the batch.

  Examples are expanded and fitted here, so every row's image slots are
  checked against its images before any step sees them.
  """
  rows = len(examples)
  batch = {
      "inputs": np.zeros((rows, seq_len), np.int32),
      "targets": np.zeros((rows, seq_len), np.int32),
      "loss_weights": np.zeros((rows, seq_len), np.float32),
      "segment_ids": np.zeros((rows, seq_len), np.int32),
      "positions": np.zeros((rows, seq_len), np.int32),
      "images": np.zeros((rows, max_images, *image_shape), np.float32),
      "image_slots": np.full((rows, seq_len), -1, np.int32),
  }
  for r, example in enumerate(examples):
    if example is None:
      continue
    name = example.get("id", f"row {r}")
    example = expand_placeholders(example, image_token_id, tokens_per_image)
    example = fit_to_row(example, seq_len + 1, image_token_id,
                         tokens_per_image, stats)
    if example is None:
      continue
    images = np.asarray(example["images"], np.float32)
    if len(images) > max_images:
      raise PlaceholderError(
          f"example {name!r} has {len(images)} images; rows hold at most "
          f"max_images={max_images}")
    if len(images) and tuple(images.shape[1:]) != tuple(image_shape):
      raise PlaceholderError(
          f"example {name!r}: images of shape {tuple(images.shape[1:])}, "
          f"the batch takes {tuple(image_shape)}")
    ids, weights = example["ids"], example["weights"]
    n = len(ids) - 1
    inputs = ids[:-1]
    is_image = inputs == image_token_id
    if int(is_image.sum()) != len(images) * tokens_per_image:
      raise PlaceholderError(
          f"example {name!r}: {int(is_image.sum())} image positions in its "
          f"inputs for {len(images)} image(s) x {tokens_per_image} tokens")
    batch["inputs"][r, :n] = inputs
    batch["targets"][r, :n] = ids[1:]
    batch["loss_weights"][r, :n] = np.where(ids[1:] == image_token_id, 0.0,
                                            weights[1:])
    batch["segment_ids"][r, :n] = 1
    batch["positions"][r, :n] = np.arange(n)
    batch["images"][r, :len(images)] = images
    batch["image_slots"][r, :n][is_image] = np.arange(int(is_image.sum()))
  return batch


class MultimodalBatches:
  """Batches of `make_batch` over a list of examples, in a seeded order
  reshuffled every pass (or in their own order with shuffle=False: a
  sequential text-then-image mixture), forever; the state (pass and
  position) is small
  JSON, so the trainer checkpoints it with the train state and a resumed
  run sees the same batches. Examples dropped by truncation leave their row
  empty (all padding): the layout never depends on what was dropped."""

  def __init__(self, examples: Sequence[Example], *, batch_size: int,
               seed: int, shuffle: bool = True, **batch_args: Any):
    if not len(examples):
      raise ValueError("MultimodalBatches: no examples")
    self.examples = examples
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.batch_args = batch_args
    self.stats = batch_args.pop("stats", None) or ChatStats()
    self.epoch, self.position = 0, 0

  def _order(self) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.examples))
    return np.random.default_rng([self.seed, self.epoch]).permutation(
        len(self.examples))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    order, chosen = self._order(), []
    while len(chosen) < self.batch_size:
      if self.position == len(order):
        self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
      chosen.append(self.examples[int(order[self.position])])
      self.position += 1
    return make_batch(chosen, stats=self.stats, **self.batch_args)

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
