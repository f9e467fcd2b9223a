"""The vision tower's and the projector's hyper-parameters.

`VisionConfig` describes a CLIP-style ViT and which of its hidden states the
language model sees; `ProjectorConfig` picks how those features become
language-model input embeddings (one field, `projector`). Both say how many
tokens an image turns into, so data code can count image placeholders without
building a model.

Imports no JAX at module level: config files import this.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mllm_jax.configlib import check, check_choice
from mllm_jax.modeling.config import (ATTENTION_BACKENDS, DTYPES,
                                      REMAT_POLICIES, Architecture, Dtypes)

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
# normal: CLIP's random table; sincos2d: the table starts as fixed 2-D sine
# and cosine waves (MAE, big_vision's "sincos2d"), so each patch's value
# carries its row and column from the first step.
POSITION_INITS = ("normal", "sincos2d")
# patch: the patch tokens only (LLaVA's "default"); cls_patch: the class
# token first, then the patches (LLaVA's "full").
FEATURE_SELECTS = ("patch", "cls_patch")
# linear: LLaVA; mlp2x_gelu: LLaVA-1.5; qformer: BLIP-2's Query Transformer;
# abstractor: mPLUG-Owl's visual abstractor.
PROJECTORS = ("linear", "mlp2x_gelu", "qformer", "abstractor")
QUERY_PROJECTORS = ("qformer", "abstractor")
# Backends for bidirectional attention of any query/key lengths: the splash
# kernel is causal-only in this codebase, so the towers refuse it.
VISION_BACKENDS = tuple(b for b in ATTENTION_BACKENDS if b != "splash")


def _check_backend_and_dtypes(cfg, prefix: str) -> None:
  check_choice(cfg.attention_backend, VISION_BACKENDS,
               f"{prefix}.attention_backend")
  check_choice(cfg.param_dtype, DTYPES, f"{prefix}.param_dtype")
  check_choice(cfg.dtype, DTYPES, f"{prefix}.dtype")
  check(cfg.init_std > 0, f"{prefix}.init_std", "must be positive")


@dataclasses.dataclass(frozen=True)
class VisionConfig(Dtypes, Architecture):
  """A ViT as in CLIP: patch embedding, a class token, learned positions,
  a LayerNorm before the blocks, pre-LN blocks with biases, quick-GELU.

  feature_layer: which hidden state the projector reads, counted like
    transformers' `hidden_states` tuple: 0 is the embeddings (after the
    pre-block LayerNorm), k the output of block k, negative from the end
    (-1 the last block, -2 the penultimate as LLaVA). Blocks after it are
    not run.
  image_size: the size the position table was trained for; other sizes
    (multiples of patch_size) interpolate it bicubically as transformers.
  position_init: how a fresh tower's position table starts (it is learned
    either way; converted towers bring their own). With "normal" a random
    tower's positions are init_std small beside its patch embeddings, and a
    token's value says little about where it is.
  """
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  embed_dim: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  activation: str = "quick_gelu"
  norm_eps: float = 1e-5
  init_std: float = 0.02
  position_init: str = "normal"
  feature_layer: int = -2
  feature_select: str = "patch"
  attention_backend: str = "xla"
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  remat: str = "none"
  scan_unroll: int = 1
  # As the decoder's RUN_FIELDS: not recorded in checkpoints, so stage 2
  # (and any later run) picks its own.
  run_fields: ClassVar[tuple[str, ...]] = ("attention_backend", "remat",
                                           "scan_unroll")

  @property
  def head_size(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def grid(self) -> int:
    """Patches per side at image_size."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_features(self) -> int:
    """Feature vectors per image_size image that the projector receives."""
    return self.num_patches + (self.feature_select == "cls_patch")

  @property
  def layers_run(self) -> int:
    """Blocks run to reach feature_layer."""
    return (self.feature_layer if self.feature_layer >= 0 else
            self.num_layers + 1 + self.feature_layer)

  def validate(self, prefix: str = "vision") -> None:
    for name in ("image_size", "patch_size", "num_channels", "embed_dim",
                 "num_layers", "num_heads", "mlp_dim", "scan_unroll"):
      check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
    check(self.image_size % self.patch_size == 0, f"{prefix}.patch_size",
          f"image_size={self.image_size} is not a multiple of patch_size="
          f"{self.patch_size}")
    check(self.embed_dim % self.num_heads == 0, f"{prefix}.num_heads",
          f"embed_dim={self.embed_dim} is not divisible by num_heads="
          f"{self.num_heads}")
    check(-self.num_layers - 1 <= self.feature_layer <= self.num_layers,
          f"{prefix}.feature_layer",
          f"got {self.feature_layer}; with num_layers={self.num_layers} it "
          f"must be in [{-self.num_layers - 1}, {self.num_layers}]")
    check_choice(self.activation, ACTIVATIONS, f"{prefix}.activation")
    check_choice(self.position_init, POSITION_INITS,
                 f"{prefix}.position_init")
    check(self.position_init == "normal" or self.embed_dim % 4 == 0,
          f"{prefix}.position_init", f"sincos2d needs embed_dim divisible "
          f"by 4 (sine and cosine per axis); got {self.embed_dim}")
    check_choice(self.feature_select, FEATURE_SELECTS,
                 f"{prefix}.feature_select")
    check_choice(self.remat, REMAT_POLICIES, f"{prefix}.remat")
    check(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
    _check_backend_and_dtypes(self, prefix)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(Dtypes, Architecture):
  """Vision features [B, N, D_vision] -> embeddings [B, N_tokens, D_llm].

  linear: one affine map per feature (N_tokens = N).
  mlp2x_gelu: affine, GELU, affine, both to the LLM width (N_tokens = N).
  qformer: BLIP-2's Q-Former: `num_queries` learned queries of width
    `hidden_dim` through `num_layers` BERT-style post-LN layers
    (self-attention among the queries, cross-attention to the features in
    every `cross_attention_frequency`-th layer starting with the first, a
    GELU MLP), then a linear map to the LLM width (N_tokens = num_queries).
  abstractor: mPLUG-Owl's visual abstractor: `num_queries` learned queries
    of the vision width through `num_layers` pre-LN layers in which the
    queries attend to themselves concatenated with the features, a SwiGLU
    MLP, then a linear map to the LLM width (N_tokens = num_queries).
  Zero sizes mean the projector's default (`hidden`, `heads`, `mlp`, `eps`).
  """
  projector: str = "mlp2x_gelu"
  num_queries: int = 32
  num_layers: int = 0  # 0: 12 (qformer), 6 (abstractor)
  hidden_dim: int = 0  # qformer width; 0: 768 (the abstractor's is D_vision)
  num_heads: int = 0  # 0: 12 (qformer), D_vision / 64 (abstractor)
  mlp_dim: int = 0  # 0: 4 * width (qformer), 2/3 * 4 * width (abstractor)
  cross_attention_frequency: int = 2
  norm_eps: float = 0.0  # 0: 1e-12 (qformer, as BERT), 1e-6 (abstractor)
  init_std: float = 0.02
  attention_backend: str = "xla"
  param_dtype: str = "float32"
  dtype: str = "float32"
  run_fields: ClassVar[tuple[str, ...]] = ("attention_backend",)

  def tokens_per_image(self, num_features: int) -> int:
    """Embeddings one image becomes, from its `num_features` vectors."""
    return (self.num_queries if self.projector in QUERY_PROJECTORS
            else num_features)

  @property
  def layers(self) -> int:
    return self.num_layers or (12 if self.projector == "qformer" else 6)

  def width(self, vision_dim: int) -> int:
    """The query transformer's width."""
    if self.projector == "abstractor":
      return vision_dim
    return self.hidden_dim or 768

  def heads(self, vision_dim: int) -> int:
    if self.num_heads:
      return self.num_heads
    return 12 if self.projector == "qformer" else max(1, vision_dim // 64)

  def hidden(self, vision_dim: int) -> int:
    """The query transformer's MLP width."""
    if self.mlp_dim:
      return self.mlp_dim
    width = self.width(vision_dim)
    return 4 * width if self.projector == "qformer" else int(8 * width / 3)

  @property
  def eps(self) -> float:
    return self.norm_eps or (1e-12 if self.projector == "qformer" else 1e-6)

  def validate(self, prefix: str = "projector") -> None:
    check_choice(self.projector, PROJECTORS, f"{prefix}.projector")
    for name in ("num_queries", "cross_attention_frequency"):
      check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
    for name in ("num_layers", "hidden_dim", "num_heads", "mlp_dim"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}",
            "must be >= 0 (0 means the projector's default)")
    check(self.norm_eps >= 0, f"{prefix}.norm_eps",
          "must be >= 0 (0 means the projector's default)")
    check(self.projector != "abstractor" or not self.hidden_dim,
          f"{prefix}.hidden_dim", "the abstractor's width is the vision "
          "width (its queries are concatenated with the features); leave 0")
    _check_backend_and_dtypes(self, prefix)

  def check_dims(self, vision_dim: int, prefix: str = "projector") -> None:
    """Fails naming the field when the widths cannot split into heads."""
    if self.projector in QUERY_PROJECTORS:
      width, heads = self.width(vision_dim), self.heads(vision_dim)
      check(width % heads == 0, f"{prefix}.num_heads",
            f"the {self.projector} width {width} is not divisible by "
            f"{heads} heads")
