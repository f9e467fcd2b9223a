"""The multimodal model: vision tower + projector + decoder (LLaVA's shape).

    images [B, K, H, W, C] ──VisionEncoder──▶ features [B·K, N, D_vision]
        ──projector──▶ [B, K·N_tok, D_llm] ──spliced at `image_slots`──▶
    embed_tokens(inputs) with image rows replaced ──Decoder(embeddings=)──▶

The batch says where image embeddings go with `image_slots` [B, T]: for each
input position, the index of the image token it holds among the row's K·N_tok
image embeddings (image k's j-th token is k·N_tok + j), or -1 for text. The
host builds it (`mllm_jax.data.mm_batch`) after checking that every example
has exactly N_tok placeholder tokens per image, so a misaligned example fails
there, named, instead of being silently shifted inside the step. A row with
fewer than K images has zero images in the unused places; their embeddings
are computed (shapes are static) and never read. A text-only row is a row
with no image slot, so text-only and image examples mix in one batch.

With `bidirectional_images` the decoder's `prefix_mask` is the image
positions: the image tokens of one example attend to each other in both
directions (all of that example's images together), text stays causal. Every
attention backend supports it; splash builds its kernel per example from
the dense mask then (modeling/attention.py, `splash_attention`).

Parameters live under `vision.`, `projector.` and `decoder.`; stages pick
what trains with `task.path_filter` over those prefixes. The decoder may
carry LoRA adapters (`peft`), for stage 2 with LoRA on the LLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.decoder import ACTIVATION
from mllm_jax.modeling.peft import build_model
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.modeling.projectors import build_projector
from mllm_jax.modeling.vision import VisionEncoder
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.sharding import constrain

# Batch fields beyond the text schema (task.LM_BATCH): pixels per image
# place, and where each input position's embedding comes from.
IMAGE_FIELDS = {"images": jnp.float32, "image_slots": jnp.int32}


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
  """The three parts' configs plus what ties them together.

  image_token_id: the placeholder token (`<image>`) that marks image slots
    in `inputs`; its own embedding is never used.
  bidirectional_images: image tokens attend to each other both ways.
  """
  model: ModelConfig
  vision: VisionConfig
  projector: ProjectorConfig
  image_token_id: int
  bidirectional_images: bool = False

  @property
  def tokens_per_image(self) -> int:
    """Placeholder tokens one image_size image occupies in the sequence."""
    return self.projector.tokens_per_image(self.vision.num_features)

  def validate(self) -> None:
    self.model.validate("model")
    self.vision.validate("vision")
    self.projector.validate("projector")
    self.projector.check_dims(self.vision.embed_dim)
    check(0 <= self.image_token_id < self.model.vocab_size,
          "multimodal.image_token_id",
          f"{self.image_token_id} is not a token id of the model (vocab "
          f"size {self.model.vocab_size})")

  def to_dict(self) -> dict[str, Any]:
    """The architecture as JSON-able dicts (each part's run fields left
    out, as native checkpoints do)."""
    return {"model": self.model.architecture(),
            "vision": self.vision.architecture(),
            "projector": self.projector.architecture(),
            "image_token_id": self.image_token_id,
            "bidirectional_images": self.bidirectional_images}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], source: str = "multimodal",
                **model_overrides: Any) -> "MultimodalConfig":
    """The inverse of to_dict; errors name `source` and the field."""
    for key in ("model", "vision", "projector", "image_token_id"):
      check(key in values, f"{source}:{key}", "required")
    unknown = sorted(set(values) - {"model", "vision", "projector",
                                    "image_token_id", "bidirectional_images"})
    check(not unknown, f"{source}:{unknown[0] if unknown else ''}",
          "unknown field")
    try:
      cfg = cls(
          model=from_config(ModelConfig, {**values["model"],
                                          **model_overrides}, "model"),
          vision=from_config(VisionConfig, values["vision"], "vision"),
          projector=from_config(ProjectorConfig, values["projector"],
                                "projector"),
          image_token_id=int(values["image_token_id"]),
          bidirectional_images=bool(values.get("bidirectional_images",
                                               False)))
      cfg.validate()
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from e
    return cfg


def splice(text: jax.Array, image: jax.Array, image_slots: jax.Array
           ) -> jax.Array:
  """text [B, T, D] with position t replaced by image[b, image_slots[b, t]]
  where that index is >= 0 (image [B, M, D]). A gather, so the projector's
  gradient is the sum over the slots each image token fills."""
  if image.shape[1] == 0:
    return text
  index = jnp.clip(image_slots, 0, image.shape[1] - 1)
  gathered = jnp.take_along_axis(image, index[..., None], axis=1)
  return jnp.where((image_slots >= 0)[..., None],
                   gathered.astype(text.dtype), text)


class MultimodalModel(nnx.Module):
  """Vision tower, projector and decoder; see the module docstring."""

  def __init__(self, cfg: MultimodalConfig, rngs: nnx.Rngs,
               peft: PeftConfig | None = None):
    """peft: LoRA on the decoder (other PEFT methods change the sequence
    the decoder sees and are refused)."""
    cfg.validate()
    if peft is not None and peft.method not in ("none", "lora"):
      raise ConfigError(f"peft.method: {peft.method!r} is not supported by "
                        f"the multimodal model; use 'lora' or 'none'")
    self.mm_cfg = cfg
    self.vision = VisionEncoder(cfg.vision, rngs)
    self.projector = build_projector(cfg.projector, cfg.vision.embed_dim,
                                     cfg.model.embed_dim, rngs)
    self.decoder = build_model(cfg.model, peft, rngs)

  @property
  def cfg(self) -> ModelConfig:
    """The decoder's config (what text-side code such as losses reads)."""
    return self.mm_cfg.model

  def image_embeddings(self, images: jax.Array) -> jax.Array:
    """images [B, K, H, W, C] -> [B, K * tokens, D_llm] in image order."""
    if images.ndim != 5:
      raise ValueError(f"images have shape {tuple(images.shape)}; the model "
                       f"takes [batch, images per example, height, width, "
                       f"channels]")
    b, k = images.shape[:2]
    if k == 0:
      return jnp.zeros((b, 0, self.cfg.embed_dim), self.cfg.compute_dtype)
    features = self.vision(images.reshape(b * k, *images.shape[2:]))
    tokens = self.projector(features)  # [B*K, N, D]
    tokens = tokens.reshape(b, k * tokens.shape[1], tokens.shape[2])
    return constrain(tokens, ACTIVATION)

  def input_embeddings(self, inputs: jax.Array, images: jax.Array,
                       image_slots: jax.Array) -> jax.Array:
    """Token embeddings with the image tokens spliced in, [B, T, D]."""
    return splice(self.decoder.embed_tokens(inputs),
                  self.image_embeddings(images), image_slots)

  def prefix_mask(self, image_slots: jax.Array) -> jax.Array | None:
    return image_slots >= 0 if self.mm_cfg.bidirectional_images else None

  def hidden_states(self, inputs: jax.Array, positions: jax.Array | None,
                    segment_ids: jax.Array | None, images: jax.Array,
                    image_slots: jax.Array) -> jax.Array:
    """The decoder's final-norm output [B, T, D] (no cache)."""
    x, _ = self.decoder.hidden_states(
        None, positions, segment_ids, self.prefix_mask(image_slots),
        embeddings=self.input_embeddings(inputs, images, image_slots))
    return x

  def head_weight(self) -> jax.Array:
    return self.decoder.head_weight()

  def __call__(self, inputs: jax.Array, images: jax.Array,
               image_slots: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Float32 logits [B, T, V]."""
    return self.decoder(None, positions, segment_ids,
                        self.prefix_mask(image_slots),
                        embeddings=self.input_embeddings(inputs, images,
                                                         image_slots))


def image_loss_mask(batch: Mapping[str, jax.Array], image_token_id: int
                    ) -> jax.Array:
  """[B, T] float32, 0 where the target is an image placeholder: image
  positions never carry loss, whatever `loss_weights` says."""
  return (batch["targets"] != image_token_id).astype(jnp.float32)


def multimodal_loss(z_loss: float = 0.0, peft: PeftConfig | None = None,
                    seed: int = 0):
  """Next-token cross-entropy of a MultimodalModel, weighted by
  `loss_weights` with image targets masked (`image_loss_mask`); with LoRA
  dropout when `peft` asks for it (its mask drawn from the batch, as for
  text: `peft.batch_key`)."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.modeling.peft import batch_key, lora_dropout
  from mllm_jax.train.losses import head_cross_entropy
  # pylint: enable=g-import-not-at-top

  def loss(model: MultimodalModel, batch):
    x = model.hidden_states(batch["inputs"], batch["positions"],
                            batch["segment_ids"], batch["images"],
                            batch["image_slots"])
    weights = batch["loss_weights"].astype(jnp.float32) * image_loss_mask(
        batch, model.mm_cfg.image_token_id)
    loss_sum, ce_sum = head_cross_entropy(
        x, model.head_weight(), batch["targets"], weights, z_loss,
        model.cfg.loss_chunk_len, model.cfg.loss_positions)
    return loss_sum, {"weight": jnp.sum(weights), "loss": ce_sum}

  if peft is None or peft.method != "lora" or not peft.dropout:
    return loss

  def with_dropout(model, batch):
    with lora_dropout(batch_key(batch, seed)):
      return loss(model, batch)
  return with_dropout
