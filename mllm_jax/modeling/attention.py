"""Attention: masks, interchangeable backends, the KV cache and the layer.

Every backend computes the same function: causal attention restricted to the
query's segment (packed examples never see each other), widened to full
attention inside an optional bidirectional prefix (image tokens, prompts).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mllm_jax.kernels import cpu_attention
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.layers import apply_rope, param, rope_frequencies
from mllm_jax.parallel.sharding import constrain, current_mesh, current_spec

if TYPE_CHECKING:
  from mllm_jax.modeling.peft import Adapters, LayerInputs

# Large but finite, so a fully masked row (padding) gives no NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segments: jax.Array, k_segments: jax.Array,
                   q_slots: jax.Array, k_slots: jax.Array,
                   q_prefix: jax.Array | None = None,
                   k_prefix: jax.Array | None = None) -> jax.Array:
  """[B, T, S] bool: may query t attend to key s?

  Segments: equal and non-zero (0 marks padding / empty cache slots).
  Order: key slot <= query slot, or both inside the bidirectional prefix.
  """
  same = ((q_segments[:, :, None] == k_segments[:, None, :])
          & (k_segments[:, None, :] != 0))
  allowed = k_slots[:, None, :] <= q_slots[:, :, None]
  if q_prefix is not None:
    allowed = allowed | (q_prefix[:, :, None] & k_prefix[:, None, :])
  return same & allowed


def xla_attention(q, k, v, mask, bias=None, layouts=("bskd", "bskd")):
  """Reference path: plain einsums, scores and softmax in float32.

  q [B,T,H,D], k/v [B,S,KV,D] (or as `layouts` says, e.g. "bksd" for the
  sampler's cache) with H a multiple of KV (GQA shares each K/V
  head across H/KV query heads), mask [B,T,S], bias [B,H,T,S] or None.
  """
  b, t, h, d = q.shape
  k_layout, v_layout = layouts
  kv = k.shape[k_layout.index("k")]
  q = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum(f"btkgd,{k_layout}->bkgts", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  if bias is not None:
    scores = scores + bias.reshape(b, kv, h // kv, t, -1)
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{v_layout}->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def attention_bias(mask: jax.Array, bias: jax.Array | None = None
                   ) -> jax.Array:
  """The mask (and ALiBi bias) as one additive float32 bias, [B, 1|H, T, S].

  Adding MASK_VALUE gives the same probabilities as selecting it: any score
  is far below half an ulp of MASK_VALUE, so the sum rounds to MASK_VALUE.
  """
  allowed = mask[:, None]
  return jnp.where(allowed, 0.0 if bias is None else bias, MASK_VALUE)


def _core_specs(ndim: int) -> tuple[str, str, str]:
  """einsum letters of q, k/v and the scores, heads before positions: MHA q
  [B,H,T,D], else GQA with q [B,KV,G,T,D] (no size-1 group axis for MHA: XLA
  would copy around it)."""
  return (("bhtd", "bhsd", "bhts") if ndim == 4 else
          ("bkgtd", "bksd", "bkgts"))


def _core_fwd(q, k, v, bias, row_scale):
  qs, ks, ss = _core_specs(q.ndim)
  scale = math.sqrt(q.shape[-1])
  scores = jnp.einsum(f"{qs},{ks}->{ss}", q, k,
                      preferred_element_type=jnp.float32) / scale + bias
  scores = scores - jnp.max(scores, axis=-1, keepdims=True)
  exp = jnp.exp(scores)
  probs = exp / jnp.sum(exp, axis=-1, keepdims=True)
  out = jnp.einsum(f"{ss},{ks}->{qs}", probs.astype(v.dtype), v)
  return out, (q, k, v, row_scale, probs, out)


def _core_bwd(residuals, d_out):
  """Softmax backward as in flash attention: dS = P * (dP - rowsum(dO * O)),
  one pass over the [T, S] scores instead of autodiff's several."""
  q, k, v, row_scale, probs, out = residuals
  qs, ks, ss = _core_specs(q.ndim)
  d_v = jnp.einsum(f"{ss},{qs}->{ks}", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum(f"{qs},{ks}->{ss}", d_out, v,
                       preferred_element_type=jnp.float32)
  # rowsum(P * dP) == rowsum(dO * O), summed over D instead of S.
  row = jnp.einsum(f"{qs},{qs}->{ss[:-1]}", d_out.astype(jnp.float32),
                   out.astype(jnp.float32))[..., None]
  # Masked scores get no gradient, as with jnp.where: P is 0 there, except
  # in rows whose every key is masked (padding), which row_scale zeroes.
  d_scores = (probs * (d_probs - row) * row_scale).astype(q.dtype)
  d_q = jnp.einsum(f"{ss},{ks}->{qs}", d_scores, k)
  d_k = jnp.einsum(f"{ss},{qs}->{ks}", d_scores, q)
  return d_q, d_k, d_v, None, None


@jax.custom_vjp
def _attention_core(q, k, v, bias, row_scale):
  """Softmax attention; row_scale [B, 1, (1,) T, 1] is 1/sqrt(D) for query
  rows with at least one key and 0 for the others (backward only)."""
  return _core_fwd(q, k, v, bias, row_scale)[0]


_attention_core.defvjp(_core_fwd, _core_bwd)


def custom_vjp_attention(q, k, v, mask, bias=None):
  """`xla_attention` with a hand-written backward (model.custom_vjp): the
  same function; gradients equal up to float rounding."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  bias = attention_bias(mask, bias)  # [B, 1|H, T, S]
  row_scale = jnp.where(jnp.any(mask, axis=-1), 1 / math.sqrt(d),
                        0.0)[:, None, :, None].astype(jnp.float32)
  # Heads before positions: each head's products then read and write whole
  # contiguous [T, D] and [T, S] blocks (forward + backward ~15% faster on
  # CPU, same bits).
  k, v = (jnp.swapaxes(x, 1, 2) for x in (k, v))  # [B, KV, S, D]
  if kv == h:
    out = _attention_core(jnp.swapaxes(q, 1, 2), k, v, bias, row_scale)
    return jnp.swapaxes(out, 1, 2)
  q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
  heads = (kv, h // kv) if bias.shape[1] == h else (1, 1)
  bias = bias.reshape(b, *heads, *bias.shape[2:])
  out = _attention_core(q, k, v, bias, row_scale[:, None])
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def cpu_fused_attention(q, k, v, mask, bias=None):
  """The fused C++ kernel for CPU (`kernels/cpu_attention.py`, model.attention_backend=
  'cpu_fused'): `xla_attention` in float32 with each query block's scores
  kept in cache, and key blocks that the mask hides from a whole query block
  skipped. Runs per device under shard_map (batch over the batch axes, heads
  over the tensor axis when K/V heads split with them), since XLA cannot
  partition a custom call."""
  cpu_attention.load()
  dtype = q.dtype
  bias = attention_bias(mask, bias)  # [B, 1|H, T, S]

  def per_device(q, k, v, bias):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return cpu_attention.fused_attention_core(q, k, v, bias).astype(dtype)

  mesh = current_mesh()
  # One device needs no shard_map (whose transpose would add all-reduces).
  if mesh is not None and mesh.size > 1:
    batch = current_spec(("act_batch",))[0]
    heads = current_spec(("act_heads",))[0]
    if heads != current_spec(("act_kv_heads",))[0]:
      heads = None  # K/V heads not split like the query heads: keep whole
    spec = PartitionSpec(batch, None, heads)
    bias_spec = PartitionSpec(batch, heads if bias.shape[1] > 1 else None)
    per_device = jax.shard_map(
        per_device, mesh=mesh, in_specs=(spec, spec, spec, bias_spec),
        out_specs=spec, check_vma=False)
  return per_device(q, k, v, bias)


def fused_attention(q, k, v, mask, bias=None, implementation=None):
  """jax.nn.dot_product_attention: XLA's fused op, or cuDNN flash attention."""
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask[:, None], implementation=implementation)


def splash_attention(q, k, v, segment_ids, interpret=False, mask=None):
  """Pallas splash (flash) attention for TPU: causal within segments, or,
  given `mask` [B, T, T] (a bidirectional prefix: image tokens), that mask.

  The causal kernel's mask is static, so whole blocks above the diagonal
  are skipped. A prefix differs per example: the kernel is then built per
  example from its dense mask (splash's dynamic masks), which still skips
  the blocks that mask empties but costs T x T bytes per example and query
  head. Runs per device under shard_map (batch over the batch axes, K/V
  heads over the tensor axis) because Pallas kernels are not
  auto-partitioned. `interpret=True` runs the same kernel on CPU, for tests.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, t, h, d = q.shape
  kv = k.shape[2]
  groups = h // kv
  q = (q / math.sqrt(d)).reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4)
  k = k.transpose(0, 2, 1, 3)  # [B, KV, S, D]
  v = v.transpose(0, 2, 1, 3)
  block = min(512, t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block,
                            block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)

  def make(kernel_mask):
    return splash.make_splash_mqa(kernel_mask, block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1,
                                  interpret=interpret)

  def causal(q, k, v, segment_ids):
    kernel = make(masks.MultiHeadMask([masks.CausalMask((t, t))] * groups))
    segments = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    over_heads = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    return jax.vmap(over_heads)(q, k, v, segments)

  def dense(q, k, v, mask):
    def one_example(q, k, v, mask):
      # Every row keeps its diagonal, so padding rows (masked everywhere)
      # never make a block row empty, whose output would be 0 / 0.
      mask = mask | jnp.eye(t, dtype=bool)
      kernel = make(jnp.broadcast_to(mask, (groups, t, t)))
      # make_splash_mqa turns the mask infos' `is_dynamic_mask` flag into an
      # array, which under jit is a tracer its __call__ cannot branch on.
      for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        info = getattr(kernel, name)
        if info is not None:
          setattr(kernel, name, info._replace(is_dynamic_mask=True))
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(one_example)(q, k, v, mask)

  per_device, extra = (causal, segment_ids) if mask is None else (dense, mask)
  mesh = current_mesh()
  if mesh is not None:
    batch = current_spec(("act_batch",))[0]
    heads = current_spec(("act_kv_heads",))[0]
    per_device = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(PartitionSpec(batch, heads), PartitionSpec(batch, heads),
                  PartitionSpec(batch, heads), PartitionSpec(batch)),
        out_specs=PartitionSpec(batch, heads), check_vma=False)
  out = per_device(q, k, v, extra)  # [B, KV, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for up to `max_len` slots per sequence.

  `segment_ids` (0 = empty slot), `positions` and `prefix` describe each slot
  so that masks and ALiBi work on cached keys; `index` is the next free slot.
  """
  k: jax.Array  # [L, B, S, KV, D]; per_layer: L arrays [B, KV, S, D]
  v: jax.Array
  segment_ids: jax.Array  # [B, S] int32
  positions: jax.Array  # [B, S] int32
  prefix: jax.Array  # [B, S] bool
  index: jax.Array  # int32 scalar
  # The sampler's layout (Decoder(..., layers=) only): one array per layer,
  # heads before slots, as the attention's dots read them. XLA on CPU would
  # otherwise copy each layer's whole cache on every decode step, out of the
  # stacked array and into that layout (about half of a batch-8 step).
  per_layer: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int,
             per_layer: bool = False) -> "KVCache":
    if per_layer:
      shape = (batch, cfg.kv_heads, max_len, cfg.head_size)
      k, v = (tuple(jnp.zeros(shape, cfg.compute_dtype)
                    for _ in range(cfg.num_layers)) for _ in range(2))
    else:
      shape = (cfg.num_layers, batch, max_len, cfg.kv_heads, cfg.head_size)
      k = v = jnp.zeros(shape, cfg.compute_dtype)
    return cls(k=k, v=v,
               segment_ids=jnp.zeros((batch, max_len), jnp.int32),
               positions=jnp.zeros((batch, max_len), jnp.int32),
               prefix=jnp.zeros((batch, max_len), bool),
               index=jnp.zeros((), jnp.int32), per_layer=per_layer)

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  def append_slots(self, segment_ids, positions, prefix) -> "KVCache":
    """Records the metadata of T new tokens at slots [index, index + T)."""
    at = (0, self.index)
    put = jax.lax.dynamic_update_slice
    return self.replace(
        segment_ids=put(self.segment_ids, segment_ids.astype(jnp.int32), at),
        positions=put(self.positions, positions.astype(jnp.int32), at),
        prefix=put(self.prefix, prefix, at))


class Attention(nnx.Module):
  """Multi-head, grouped-query or multi-query self-attention (no biases)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               peft: Adapters | None = None):
    d, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
    dt, std = cfg.weight_dtype, cfg.init_std
    self.cfg = cfg
    self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt, std)
    self.k = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt,
                   std)
    self.v = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt,
                   std)
    self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt,
                   std / math.sqrt(2 * cfg.num_layers))
    # PEFT (modeling/peft.py): LoRA on q/k/v/o, or None.
    self.peft = None if peft is None else peft.attention(self, rngs)

  def __call__(self, x, positions, segment_ids, mask, bias, layer_cache=None,
               cache_index=None, has_prefix=False,
               peft_inputs: LayerInputs | None = None):
    """x [B,T,E] -> ([B,T,E], updated layer_cache or None).

    layer_cache: (k, v, layer): every layer's cache [L, B, S, KV, D] and this
    layer's index (an int or a traced scalar), or with layer None this
    layer's own cache [B, KV, S, D] (KVCache.per_layer). The T new keys and
    values are written in place at slot `cache_index`; only this layer's
    slice is read.

    peft_inputs (PEFT only): keys and values to put before the sequence's
    (prefix, prompt and P-tuning; `mask` and `bias` already cover them) and
    the LoRA dropout key.
    """
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))
    if self.peft is not None:  # + scale * (x A) B on the targeted ones
      q, k, v = (self.peft.update(name, x, y, peft_inputs)
                 for name, y in (("q", q), ("k", k), ("v", v)))
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
    if cfg.position == "rope":
      inv_freq = rope_frequencies(cfg)
      q = apply_rope(q, positions, inv_freq)
      k = apply_rope(k, positions, inv_freq)

    heads_major = False
    if layer_cache is not None:
      k_all, v_all, layer = layer_cache
      put = lambda c, x, at: jax.lax.dynamic_update_slice(
          c, x.astype(c.dtype), at)
      if layer is None:  # this layer's alone, [B, KV, S, D]
        heads_major = True
        at = (0, 0, cache_index, 0)
        k_all = put(k_all, jnp.swapaxes(k, 1, 2), at)
        v_all = put(v_all, jnp.swapaxes(v, 1, 2), at)
        k, v = k_all.astype(dt), v_all.astype(dt)
      else:
        at = (layer, 0, cache_index, 0, 0)
        k_all, v_all = put(k_all, k[None], at), put(v_all, v[None], at)
        k, v = k_all[layer].astype(dt), v_all[layer].astype(dt)
      layer_cache = (k_all, v_all, layer)
    if peft_inputs is not None:
      if heads_major:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        heads_major = False
      k, v = peft_inputs.prepend(k, v)

    if layer_cache is not None:
      # Decoding is memory-bound: the reference path over the whole cache.
      out = xla_attention(q, k, v, mask, bias, layouts=(
          ("bksd", "bksd") if heads_major else ("bskd", "bskd")))
    elif cfg.attention_backend == "xla" and cfg.custom_vjp:
      out = custom_vjp_attention(q, k, v, mask, bias)
    elif cfg.attention_backend == "xla":
      out = xla_attention(q, k, v, mask, bias)
    elif cfg.attention_backend == "cpu_fused":
      out = cpu_fused_attention(q, k, v, mask, bias)
    elif cfg.attention_backend in ("dot_product", "cudnn"):
      impl = "cudnn" if cfg.attention_backend == "cudnn" else None
      out = fused_attention(q, k, v, mask, bias, implementation=impl)
    else:
      if bias is not None or k.shape[1] != q.shape[1]:
        raise ValueError(
            "model.attention_backend='splash' supports masks over the "
            "sequence itself only (no ALiBi bias, no PEFT keys before it); "
            "use 'xla' or 'dot_product'")
      out = splash_attention(q, k, v, segment_ids,
                             interpret=jax.default_backend() != "tpu",
                             mask=mask if has_prefix else None)
    heads = constrain(out, ("act_batch", "act_length", "act_heads", None))
    out = jnp.einsum("bthk,hkd->btd", heads, self.o[...].astype(dt))
    if self.peft is not None:
      out = self.peft.update("o", heads, out, peft_inputs)
    return out, layer_cache
