"""The vision tower: a CLIP-style ViT in Flax NNX, sharded by logical axes.

Images [B, H, W, C] (channels last, already normalised) -> patch embedding
(a strided convolution written as one matmul over flattened patches) -> a
class token in front -> learned positions (interpolated bicubically, as
transformers does, when the grid differs from the trained one) -> LayerNorm
-> scanned pre-LN blocks (attention and MLP with biases, quick-GELU) ->
the hidden state of `feature_layer`, with or without the class token.

Also the pieces the projectors share: biased dense layers, LayerNorm, and
bidirectional multi-head attention (self or cross) over the decoder's
attention backends. Parameters use the decoder's logical axis names
(`embed`, `heads`, `head_dim`, `mlp`, `layers`), so one rules table shards
the whole multimodal model; vectors over the model width (biases, norms)
are `norm`, i.e. replicated by the default rules.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.modeling.attention import (cpu_fused_attention,
                                         fused_attention, xla_attention)
from mllm_jax.modeling.decoder import ACTIVATION, remat_policy
from mllm_jax.modeling.layers import param
from mllm_jax.modeling.vision_config import VisionConfig
from mllm_jax.parallel.sharding import constrain

# ----------------------------------------------------------------------------
# Shared layers
# ----------------------------------------------------------------------------


def zeros(shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype) -> nnx.Param:
  """A zero-initialised parameter (biases) tagged with logical axes."""
  return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(axes),
                   eager_sharding=False)


def activation(name: str, x: jax.Array) -> jax.Array:
  """quick_gelu is CLIP's x * sigmoid(1.702 x); gelu is the exact (erf)
  GELU of BERT, BLIP-2 and LLaVA's projector; gelu_tanh the tanh form."""
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=name == "gelu_tanh")


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, computed in float32."""

  def __init__(self, dim: int, eps: float, cfg):
    self.scale = param(None, (dim,), ("norm",), cfg.weight_dtype, None)
    self.bias = zeros((dim,), ("norm",), cfg.weight_dtype)
    self.eps = eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
        jnp.float32)
    return y.astype(self.dtype)


class Dense(nnx.Module):
  """y = x . kernel + bias, contracting x's last len(in_shape) axes with the
  kernel's first ones; `axes` names the kernel's axes, the bias takes the
  output's (or `bias_axes`)."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               axes: Sequence[str | None], cfg, rngs: nnx.Rngs,
               std: float | None = None,
               bias_axes: Sequence[str | None] | None = None):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    self.kernel = param(rngs, in_shape + out_shape, axes, cfg.weight_dtype,
                        cfg.init_std if std is None else std)
    self.bias = zeros(out_shape, bias_axes or tuple(axes)[len(in_shape):],
                      cfg.weight_dtype)
    self.num_in = len(in_shape)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.tensordot(x.astype(self.dtype),
                      self.kernel[...].astype(self.dtype), axes=self.num_in)
    return y + self.bias[...].astype(self.dtype)


def attend(backend: str, q, k, v) -> jax.Array:
  """Bidirectional attention (no mask) over the decoder's backends:
  q [B,T,H,D], k/v [B,S,H,D] -> [B,T,H,D]."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  mask = jnp.ones((b, t, s), bool)
  if backend == "cpu_fused":
    return cpu_fused_attention(q, k, v, mask)
  if backend in ("dot_product", "cudnn"):
    impl = "cudnn" if backend == "cudnn" else None
    return fused_attention(q, k, v, mask, implementation=impl)
  return xla_attention(q, k, v, mask)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with biases: queries from x, keys and values from
  `context` (x itself for self-attention), which may be wider or longer."""

  def __init__(self, dim: int, context_dim: int, num_heads: int, cfg,
               rngs: nnx.Rngs, out_std: float | None = None):
    head = dim // num_heads
    qkv_axes = ("embed", "heads", "head_dim")
    self.q = Dense((dim,), (num_heads, head), qkv_axes, cfg, rngs)
    self.k = Dense((context_dim,), (num_heads, head), qkv_axes, cfg, rngs)
    self.v = Dense((context_dim,), (num_heads, head), qkv_axes, cfg, rngs)
    self.o = Dense((num_heads, head), (dim,), ("heads", "head_dim", "embed"),
                   cfg, rngs, std=out_std, bias_axes=("norm",))
    self.backend = cfg.attention_backend

  def __call__(self, x: jax.Array, context: jax.Array | None = None
               ) -> jax.Array:
    context = x if context is None else context
    heads = ("act_batch", "act_length", "act_heads", None)
    q = constrain(self.q(x), heads)
    k = constrain(self.k(context), heads)
    v = constrain(self.v(context), heads)
    out = constrain(attend(self.backend, q, k, v), heads)
    return constrain(self.o(out), ACTIVATION)


# ----------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------


def bicubic_matrix(old: int, new: int, a: float = -0.75) -> np.ndarray:
  """[new, old] weights of 1-D bicubic resampling exactly as torch's
  `interpolate(mode="bicubic", align_corners=False)`: Keys' kernel with
  a = -0.75, half-pixel centres, taps clamped at the borders, no
  antialiasing. Applied along both axes it reproduces transformers'
  `interpolate_pos_encoding`."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.zeros((new, old), np.float64)
  for i in range(new):
    src = (i + 0.5) * old / new - 0.5
    base = int(np.floor(src))
    t = src - base
    for offset, w in zip((-1, 0, 1, 2),
                         (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(base + offset, 0), old - 1)] += w
  return weights.astype(np.float32)


def sincos2d_positions(grid: int, dim: int) -> np.ndarray:
  """[1 + grid**2, dim] table: zeros for the class token, then for patch
  (row, col) sines and cosines of the row over dim/4 frequencies and of the
  column over the other dim/4 (MAE's fixed embedding; unit amplitude)."""
  quarter = dim // 4
  freqs = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  waves = [f(axis.reshape(-1, 1) * freqs) for axis in (rows, cols)
           for f in (np.sin, np.cos)]
  table = np.concatenate(waves, axis=1)
  return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


def patch_positions(table: jax.Array, grid: int, height: int,
                    width: int) -> jax.Array:
  """The [1 + grid**2, D] position table for a height x width patch grid:
  the class position as is, the patch positions resampled bicubically."""
  if (height, width) == (grid, grid):
    return table
  patches = table[1:].reshape(grid, grid, -1).astype(jnp.float32)
  rows = jnp.asarray(bicubic_matrix(grid, height))
  cols = jnp.asarray(bicubic_matrix(grid, width))
  resized = jnp.einsum("hy,yxd,wx->hwd", rows, patches, cols)
  return jnp.concatenate([table[:1], resized.reshape(
      height * width, -1).astype(table.dtype)], axis=0)


# ----------------------------------------------------------------------------
# The ViT
# ----------------------------------------------------------------------------


class VisionBlock(nnx.Module):
  """x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

  def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
    d, out_std = cfg.embed_dim, cfg.init_std / np.sqrt(2 * cfg.num_layers)
    self.attn_norm = LayerNorm(d, cfg.norm_eps, cfg)
    self.attn = MultiHeadAttention(d, d, cfg.num_heads, cfg, rngs, out_std)
    self.mlp_norm = LayerNorm(d, cfg.norm_eps, cfg)
    self.fc1 = Dense((d,), (cfg.mlp_dim,), ("embed", "mlp"), cfg, rngs)
    self.fc2 = Dense((cfg.mlp_dim,), (d,), ("mlp", "embed"), cfg, rngs,
                     std=out_std, bias_axes=("norm",))
    self.activation = cfg.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x + self.attn(self.attn_norm(x)), ACTIVATION)
    h = constrain(activation(self.activation, self.fc1(self.mlp_norm(x))),
                  ("act_batch", "act_length", "act_mlp"))
    return constrain(x + self.fc2(h), ACTIVATION)


class VisionEncoder(nnx.Module):
  """Images -> the features the projector reads (`cfg.feature_layer`,
  `cfg.feature_select`); `hidden_state` and `pooled` give the others."""

  def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    p, c, d, dt = cfg.patch_size, cfg.num_channels, cfg.embed_dim, (
        cfg.weight_dtype)
    self.patch_embed = param(rngs, (p, p, c, d), (None, None, None, "embed"),
                             dt, cfg.init_std)
    self.class_token = param(rngs, (d,), ("norm",), dt, d ** -0.5)
    self.positions = param(rngs, (cfg.num_patches + 1, d), (None, "embed"),
                           dt, cfg.init_std)
    if cfg.position_init == "sincos2d":
      # Drawn above all the same, so the other parameters get the values
      # they get with "normal".
      self.positions[...] = jnp.asarray(sincos2d_positions(cfg.grid, d), dt)
    self.pre_norm = LayerNorm(d, cfg.norm_eps, cfg)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_blocks(rngs):
      return VisionBlock(cfg, rngs)

    self.blocks = stacked_blocks(rngs)
    # Applied to the class token of the last block only (CLIP's pooled
    # output); kept so that converted checkpoints round-trip.
    self.post_norm = LayerNorm(d, cfg.norm_eps, cfg)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> features [B, N, D] in the compute dtype."""
    x = self.hidden_state(images, self.cfg.layers_run)
    return x if self.cfg.feature_select == "cls_patch" else x[:, 1:]

  def num_features(self, height: int, width: int) -> int:
    """Feature vectors of one height x width image."""
    p = self.cfg.patch_size
    return (height // p) * (width // p) + (
        self.cfg.feature_select == "cls_patch")

  def embed(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> class token and patches with positions, normed:
    transformers' `hidden_states[0]`."""
    cfg = self.cfg
    b, h, w, c = images.shape
    p = cfg.patch_size
    if c != cfg.num_channels or h % p or w % p:
      raise ValueError(
          f"images have shape {tuple(images.shape)}; the vision tower takes "
          f"[batch, height, width, {cfg.num_channels}] with height and width "
          f"multiples of vision.patch_size={p}")
    gh, gw = h // p, w // p
    dt = cfg.compute_dtype
    patches = images.astype(dt).reshape(b, gh, p, gw, p, c)
    x = jnp.einsum("byixjc,ijcd->byxd", patches,
                   self.patch_embed[...].astype(dt)).reshape(b, gh * gw, -1)
    cls = jnp.broadcast_to(self.class_token[...].astype(dt),
                           (b, 1, cfg.embed_dim))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + patch_positions(self.positions[...], cfg.grid, gh, gw).astype(dt)
    return self.pre_norm(constrain(x, ACTIVATION))

  def hidden_state(self, images: jax.Array, num_layers: int) -> jax.Array:
    """The output of the first `num_layers` blocks (0: the embeddings),
    [B, 1 + patches, D]; later blocks are not run."""
    cfg = self.cfg
    if not 0 <= num_layers <= cfg.num_layers:
      raise ValueError(f"num_layers={num_layers} is not in [0, "
                       f"vision.num_layers={cfg.num_layers}]")
    x = self.embed(images)
    if not num_layers:
      return x
    graphdef, state = nnx.split(self.blocks)
    if num_layers < cfg.num_layers:
      state = jax.tree.map(lambda a: a[:num_layers], state)

    def layer(x, block_state):
      return nnx.merge(graphdef, block_state)(x), None

    use_remat, policy = remat_policy(cfg.remat)
    if use_remat:
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(layer, x, state,
                        unroll=min(cfg.scan_unroll, num_layers))
    return x

  def pooled(self, images: jax.Array) -> jax.Array:
    """CLIP's pooled output: the last block's class token, normed, [B, D]."""
    return self.post_norm(self.hidden_state(images, self.cfg.num_layers)[:, 0])
