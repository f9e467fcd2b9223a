"""Generation with images (generate.multimodal): the cached prefill with
spliced image embeddings, then the text decode loop, must give the tokens a
full forward of the multimodal model picks greedily, for several prompts of
different lengths and image counts in one batch (text-only included), with
causal and bidirectional image attention; wrong placeholder counts fail
naming the prompt."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.data.mm_batch import PlaceholderError
from mllm_jax.generate.multimodal import MultimodalSampler
from tests.test_multimodal import IMAGE_ID, build, tiny_mm_config

STEPS = 5


def _prompts(rng):
  """(ids, images): two images, one image at the start, text only."""
  pic = lambda: rng.randn(32, 32, 3).astype(np.float32)
  return [
      ([1, 20, IMAGE_ID, 31, 32, IMAGE_ID, 40, 41, 42], [pic(), pic()]),
      ([1, IMAGE_ID, 55, 56], [pic()]),
      ([1, 60, 61, 62, 63, 64, 65], []),
  ]


WIDTH = 64  # every reference row padded to one width: one compile


def _greedy_by_full_forward(model, ids, images, steps):
  """The reference: re-run the whole multimodal forward for every token
  (padding after the row's end is invisible to its causal positions)."""
  n = model.mm_cfg.tokens_per_image
  ids = [t for i in ids for t in ([i] * n if i == IMAGE_ID else [i])]
  pixels = np.zeros((1, 2, 32, 32, 3), np.float32)
  if images:
    pixels[0, :len(images)] = images
  out = []
  for _ in range(steps):
    row = ids + out
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, :len(row)] = row
    slots = np.full(tokens.shape, -1, np.int32)
    is_image = tokens[0] == IMAGE_ID
    slots[0][is_image] = np.arange(int(is_image.sum()))
    logits = _forward(model, tokens, pixels, slots)
    out.append(int(np.argmax(np.asarray(logits)[0, len(row) - 1])))
  return out


@nnx.jit
def _forward(model, tokens, pixels, slots):
  return model(tokens, pixels, slots)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_generation_with_images_equals_full_forward(bidirectional):
  cfg = dataclasses.replace(tiny_mm_config(),
                            bidirectional_images=bidirectional)
  model = build(cfg, seed=3)
  prompts = _prompts(np.random.RandomState(0))
  sampler = MultimodalSampler(model, pad_id=0)
  ids = [p for p, _ in prompts]
  gen = sampler.generate(ids, [im for _, im in prompts], STEPS)
  for row, (ids_row, images) in enumerate(prompts):
    assert gen.tokens[row] == _greedy_by_full_forward(model, ids_row, images,
                                                      STEPS), row
  # The image changes what is generated: row 1 again, its image zeroed.
  zeroed = [im for _, im in prompts]
  zeroed[1] = [np.zeros((32, 32, 3), np.float32)]
  other = sampler.generate(ids, zeroed, STEPS)
  assert not np.allclose(other.logprobs[1], gen.logprobs[1])
  np.testing.assert_array_equal(other.logprobs[0], gen.logprobs[0])


def test_placeholder_mismatch_names_the_prompt():
  model = build(tiny_mm_config())
  sampler = MultimodalSampler(model, pad_id=0)
  with pytest.raises(PlaceholderError, match="prompt 1"):
    sampler.generate([[1, IMAGE_ID, 5], [1, 5, 6]],
                     [[np.zeros((32, 32, 3))], [np.zeros((32, 32, 3))]], 2)
  with pytest.raises(ValueError, match="one .*list of images per prompt"):
    sampler.generate([[1, 5]], [], 2)
