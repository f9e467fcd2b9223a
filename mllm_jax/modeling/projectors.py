"""Projectors: vision features [B, N, D_vision] -> LLM input embeddings
[B, N_tokens, D_llm], chosen by `projector.projector`.

linear (LLaVA) and mlp2x_gelu (LLaVA-1.5) map each feature on its own, so an
image keeps all N of its tokens; qformer (BLIP-2) and abstractor (mPLUG-Owl)
pull a fixed number of learned queries out of the features, a bottleneck of
`num_queries` tokens whatever N is. `ProjectorConfig.tokens_per_image` says
how many, without building anything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.modeling.decoder import ACTIVATION
from mllm_jax.modeling.layers import param, swiglu
from mllm_jax.modeling.vision import (Dense, LayerNorm, MultiHeadAttention,
                                      activation)
from mllm_jax.modeling.vision_config import ProjectorConfig
from mllm_jax.parallel.sharding import constrain


def _check_features(features: jax.Array, vision_dim: int) -> None:
  if features.ndim != 3 or features.shape[-1] != vision_dim:
    raise ValueError(f"features have shape {tuple(features.shape)}; the "
                     f"projector takes [batch, tokens, {vision_dim}] (the "
                     f"vision tower's width)")


class LinearProjector(nnx.Module):
  """LLaVA: one affine map per feature."""

  def __init__(self, cfg: ProjectorConfig, vision_dim: int, llm_dim: int,
               rngs: nnx.Rngs):
    self.cfg, self.vision_dim = cfg, vision_dim
    self.proj = Dense((vision_dim,), (llm_dim,), ("embed", "mlp"), cfg, rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.vision_dim)
    return constrain(self.proj(features), ACTIVATION)


class MLPProjector(nnx.Module):
  """LLaVA-1.5's mlp2x_gelu: affine to the LLM width, exact GELU, affine
  (transformers' `LlavaMultiModalProjector` with its default GELU)."""

  def __init__(self, cfg: ProjectorConfig, vision_dim: int, llm_dim: int,
               rngs: nnx.Rngs):
    self.cfg, self.vision_dim = cfg, vision_dim
    self.fc1 = Dense((vision_dim,), (llm_dim,), ("embed", "mlp"), cfg, rngs)
    self.fc2 = Dense((llm_dim,), (llm_dim,), ("mlp", "embed"), cfg, rngs,
                     bias_axes=("norm",))

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.vision_dim)
    h = constrain(activation("gelu", self.fc1(features)),
                  ("act_batch", "act_length", "act_mlp"))
    return constrain(self.fc2(h), ACTIVATION)


class QFormerLayer(nnx.Module):
  """BERT-style post-LN: x = LN(x + SelfAttn(x)); in cross layers
  x = LN(x + CrossAttn(x, features)); x = LN(x + fc2(gelu(fc1(x))))."""

  def __init__(self, cfg: ProjectorConfig, width: int, vision_dim: int,
               cross: bool, rngs: nnx.Rngs):
    heads, eps = cfg.heads(vision_dim), cfg.eps
    hidden = cfg.hidden(vision_dim)
    self.self_attn = MultiHeadAttention(width, width, heads, cfg, rngs)
    self.self_norm = LayerNorm(width, eps, cfg)
    self.cross_attn = (MultiHeadAttention(width, vision_dim, heads, cfg, rngs)
                       if cross else None)
    self.cross_norm = LayerNorm(width, eps, cfg) if cross else None
    self.fc1 = Dense((width,), (hidden,), ("embed", "mlp"), cfg, rngs)
    self.fc2 = Dense((hidden,), (width,), ("mlp", "embed"), cfg, rngs,
                     bias_axes=("norm",))
    self.mlp_norm = LayerNorm(width, eps, cfg)

  def __call__(self, x: jax.Array, features: jax.Array) -> jax.Array:
    x = self.self_norm(x + self.self_attn(x))
    if self.cross_attn is not None:
      x = self.cross_norm(x + self.cross_attn(x, features))
    h = constrain(activation("gelu", self.fc1(x)),
                  ("act_batch", "act_length", "act_mlp"))
    return constrain(self.mlp_norm(x + self.fc2(h)), ACTIVATION)


class QFormer(nnx.Module):
  """BLIP-2's Query Transformer (the query path of transformers'
  `Blip2QFormerModel`) and its language projection: learned queries, a
  LayerNorm, the layers (cross-attention in layers 0, f, 2f, ... for
  f = cross_attention_frequency), a linear map to the LLM width."""

  def __init__(self, cfg: ProjectorConfig, vision_dim: int, llm_dim: int,
               rngs: nnx.Rngs):
    cfg.check_dims(vision_dim)
    self.cfg, self.vision_dim = cfg, vision_dim
    width = cfg.width(vision_dim)
    self.queries = param(rngs, (cfg.num_queries, width), (None, "embed"),
                         cfg.weight_dtype, cfg.init_std)
    self.embed_norm = LayerNorm(width, cfg.eps, cfg)
    self.layers = nnx.List([
        QFormerLayer(cfg, width, vision_dim,
                     i % cfg.cross_attention_frequency == 0, rngs)
        for i in range(cfg.layers)])
    self.proj = Dense((width,), (llm_dim,), ("embed", "mlp"), cfg, rngs)

  def query_states(self, features: jax.Array) -> jax.Array:
    """[B, N, D_vision] -> the last layer's queries [B, Q, width]."""
    _check_features(features, self.vision_dim)
    features = features.astype(self.cfg.compute_dtype)
    queries = self.queries[...].astype(self.cfg.compute_dtype)
    x = self.embed_norm(jnp.broadcast_to(
        queries, (features.shape[0],) + queries.shape))
    for layer in self.layers:
      x = layer(x, features)
    return x

  def __call__(self, features: jax.Array) -> jax.Array:
    return constrain(self.proj(self.query_states(features)), ACTIVATION)


class AbstractorLayer(nnx.Module):
  """q = LN(x); x = x + Attn(q, [q; LN(features)]); x = x + SwiGLU(LN(x))."""

  def __init__(self, cfg: ProjectorConfig, width: int, rngs: nnx.Rngs):
    heads, eps, hidden = cfg.heads(width), cfg.eps, cfg.hidden(width)
    self.query_norm = LayerNorm(width, eps, cfg)
    self.feature_norm = LayerNorm(width, eps, cfg)
    self.attn = MultiHeadAttention(width, width, heads, cfg, rngs)
    self.mlp_norm = LayerNorm(width, eps, cfg)
    dt, std = cfg.weight_dtype, cfg.init_std
    self.gate = param(rngs, (width, hidden), ("embed", "mlp"), dt, std)
    self.up = param(rngs, (width, hidden), ("embed", "mlp"), dt, std)
    self.down = param(rngs, (hidden, width), ("mlp", "embed"), dt, std)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array, features: jax.Array) -> jax.Array:
    q = self.query_norm(x)
    context = jnp.concatenate([q, self.feature_norm(features)], axis=1)
    x = constrain(x + self.attn(q, context), ACTIVATION)
    weights = [w[...].astype(self.dtype) for w in (self.gate, self.up,
                                                   self.down)]
    return constrain(x + swiglu(self.mlp_norm(x), *weights), ACTIVATION)


class Abstractor(nnx.Module):
  """mPLUG-Owl's visual abstractor: learned queries of the vision width
  that attend to themselves and the features together, layer by layer,
  then a LayerNorm and a linear map to the LLM width."""

  def __init__(self, cfg: ProjectorConfig, vision_dim: int, llm_dim: int,
               rngs: nnx.Rngs):
    cfg.check_dims(vision_dim)
    self.cfg, self.vision_dim = cfg, vision_dim
    self.queries = param(rngs, (cfg.num_queries, vision_dim), (None, "embed"),
                         cfg.weight_dtype, cfg.init_std)
    self.layers = nnx.List([AbstractorLayer(cfg, vision_dim, rngs)
                            for _ in range(cfg.layers)])
    self.final_norm = LayerNorm(vision_dim, cfg.eps, cfg)
    self.proj = Dense((vision_dim,), (llm_dim,), ("embed", "mlp"), cfg, rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    _check_features(features, self.vision_dim)
    dt = self.cfg.compute_dtype
    features = features.astype(dt)
    x = jnp.broadcast_to(self.queries[...].astype(dt),
                         (features.shape[0],) + self.queries.shape)
    for layer in self.layers:
      x = layer(x, features)
    return constrain(self.proj(self.final_norm(x)), ACTIVATION)


PROJECTOR_CLASSES = {
    "linear": LinearProjector,
    "mlp2x_gelu": MLPProjector,
    "qformer": QFormer,
    "abstractor": Abstractor,
}


def build_projector(cfg: ProjectorConfig, vision_dim: int, llm_dim: int,
                    rngs: nnx.Rngs) -> nnx.Module:
  """The projector `cfg.projector` names, from the vision width to the LLM
  width; every kind maps [B, N, vision_dim] -> [B, tokens, llm_dim] with
  tokens = cfg.tokens_per_image(N)."""
  cfg.validate()
  return PROJECTOR_CLASSES[cfg.projector](cfg, vision_dim, llm_dim, rngs)
