"""Generation with images in the prompt.

The prompt's prefill feeds the multimodal model's input embeddings (the
projected image features spliced in at the placeholders, exactly as in
training) through the decoder's KV cache; everything after the prompt is
the text sampler's decode loop, unchanged: an image costs nothing per
generated token beyond its cache slots. Image positions are marked in the
cache as bidirectional when the model was trained so
(`bidirectional_images`), so later tokens see the same attention pattern as
in training.

Placeholders are checked per prompt before anything runs (one `<image>`
token per image, or `tokens_per_image` per image as HF processors write
them), with `data.mm_batch`'s check and message.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from mllm_jax.data import mm_batch
from mllm_jax.generate.sampler import Generation, Sampler
from mllm_jax.modeling.multimodal import MultimodalModel


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_embeddings(graphdef, params, tokens, images, slots):
  return nnx.merge(graphdef, params).input_embeddings(tokens, images, slots)


class MultimodalSampler(Sampler):
  """A `Sampler` over a `MultimodalModel`: `generate(prompts, images, ...)`.

  prompts: strings (encoded with BOS) or token-id lists holding the image
    placeholders; images: per prompt, a sequence of preprocessed images
    [H, W, C] float32 (`data.images.preprocess`), in placeholder order,
    empty for a text-only prompt. Other arguments are `Sampler.generate`'s;
    `resume` continues with text as for the text sampler.
  """

  def __init__(self, model: MultimodalModel, tokenizer: Any = None,
               mesh=None, rules=None, pad_id: int = 0,
               prompt_multiple: int = 16):
    super().__init__(model.decoder, tokenizer, mesh, rules, pad_id,
                     prompt_multiple)
    self.mm_cfg = model.mm_cfg
    # The same arrays as the decoder's (no copy): the tower and projector
    # run once per prompt, in the prefill.
    self.mm_graphdef, self.mm_params = nnx.split(model)
    self._images: list[np.ndarray] | None = None

  def generate(self, prompts, images: Sequence[Sequence[np.ndarray]],
               max_new_tokens: int, **options) -> Generation:
    rows = self._encode(prompts)
    if len(images) != len(rows):
      raise ValueError(f"{len(rows)} prompts but images for {len(images)}; "
                       f"give one (possibly empty) list of images per prompt")
    cfg = self.mm_cfg
    shape = (cfg.vision.image_size, cfg.vision.image_size,
             cfg.vision.num_channels)
    expanded, pixels = [], []
    for i, (row, imgs) in enumerate(zip(rows, images)):
      imgs = np.asarray(imgs, np.float32).reshape((-1, *shape)) if len(
          imgs) else np.zeros((0, *shape), np.float32)
      example = mm_batch.expand_placeholders(
          {"id": f"prompt {i}", "ids": row, "weights": np.zeros(len(row)),
           "images": imgs}, cfg.image_token_id, cfg.tokens_per_image)
      expanded.append(example["ids"].tolist())
      pixels.append(imgs)
    self._images = pixels
    try:
      return super().generate(expanded, max_new_tokens, **options)
    finally:
      self._images = None

  def _prompt_inputs(self, tokens: np.ndarray) -> dict[str, Any]:
    """Image embeddings spliced into the left-padded prompt [B, T], and the
    bidirectional mask over image positions when the model uses one."""
    cfg = self.mm_cfg
    batch = tokens.shape[0]
    most = max(1, max(len(p) for p in self._images))
    shape = (cfg.vision.image_size, cfg.vision.image_size,
             cfg.vision.num_channels)
    pixels = np.zeros((batch, most, *shape), np.float32)
    slots = np.full(tokens.shape, -1, np.int32)
    for r, imgs in enumerate(self._images):
      pixels[r, :len(imgs)] = imgs
      is_image = tokens[r] == cfg.image_token_id
      slots[r][is_image] = np.arange(int(is_image.sum()))
    with self._context():
      embeddings = _prompt_embeddings(
          self.mm_graphdef, self.mm_params,
          self._put(tokens, ("act_batch", None)),
          self._put(pixels, ("act_batch", None, None, None, None)),
          self._put(slots, ("act_batch", None)))
    out = {"embeddings": embeddings}
    if cfg.bidirectional_images:
      out["prefix"] = self._put(slots >= 0, ("act_batch", None))
    return out
