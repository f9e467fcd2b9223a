"""The LLaMA-family decoder: embed -> scanned pre-norm blocks -> norm -> logits.

Blocks are created stacked (a leading `layers` axis on every parameter) and
run with `jax.lax.scan`, so compile time does not grow with depth; the scan
body is rematerialised according to `model.remat`. Under a pipeline schedule
(`mllm_jax.parallel.pipeline`, set by the training step) the same scan runs
per stage on micro-batches.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.modeling.attention import Attention, KVCache, attention_mask
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.layers import MLP, Embed, RMSNorm, alibi_bias, param
from mllm_jax.parallel import pipeline
from mllm_jax.parallel.sharding import constrain

if TYPE_CHECKING:
  from mllm_jax.modeling.peft import Adapters, LayerInputs

ACTIVATION = ("act_batch", "act_length", "act_embed")


def remat_policy(name: str):
  """`model.remat` -> (wrap with jax.checkpoint?, saveable policy)."""
  policies = jax.checkpoint_policies
  return {
      "none": (False, None),
      "full": (True, policies.nothing_saveable),
      "save_dots": (True, policies.dots_with_no_batch_dims_saveable),
      "offload_dots": (True, policies.offload_dot_with_no_batch_dims(
          "device", "pinned_host")),
  }[name]


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               peft: Adapters | None = None):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg, rngs)
    self.attn = Attention(cfg, rngs, peft)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg, rngs)
    self.mlp = MLP(cfg, rngs, peft)
    # PEFT (modeling/peft.py): bottleneck adapters, or None.
    self.peft = None if peft is None else peft.block(cfg, rngs)

  def __call__(self, x, positions, segment_ids, mask, bias, layer_cache,
               cache_index, has_prefix, peft_inputs: LayerInputs | None = None):
    h, layer_cache = self.attn(self.attn_norm(x), positions, segment_ids, mask,
                               bias, layer_cache, cache_index, has_prefix,
                               peft_inputs)
    if self.peft is not None:
      h = self.peft.after_attention(h)
    x = constrain(x + h, ACTIVATION)
    h = self.mlp(self.mlp_norm(x), peft_inputs)
    if self.peft is not None:
      h = self.peft.after_mlp(h)
    x = constrain(x + h, ACTIVATION)
    return x, layer_cache


class Decoder(nnx.Module):
  """Token ids -> float32 logits, optionally through a KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               peft: Adapters | None = None):
    """peft: what `mllm_jax.modeling.peft.build_model` passes for a PEFT
    method; each module then holds its adapter as `.peft` (else None)."""
    self.cfg = cfg
    self.embed = Embed(cfg, rngs, peft)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_blocks(rngs):
      return Block(cfg, rngs, peft)

    self.blocks = stacked_blocks(rngs)
    self.final_norm = RMSNorm(cfg.embed_dim, cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.embed_dim, cfg.vocab_size),
                           ("embed", "vocab"), cfg.weight_dtype, cfg.init_std)
    # PEFT: the method's config, LoRA on the head, virtual tokens, prefixes.
    self.peft = None if peft is None else peft.decoder(self, rngs)

  def __call__(self, tokens: jax.Array | None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               prefix_mask: jax.Array | None = None,
               cache: KVCache | None = None,
               embeddings: jax.Array | None = None,
               layers: list[nnx.State] | None = None):
    """Runs the decoder on tokens [B, T] (or their embeddings).

    positions: [B, T] ids for RoPE/ALiBi (default 0..T-1).
    segment_ids: [B, T] packed-example ids, 0 for padding (default all 1).
    prefix_mask: [B, T] bool, True where attention is bidirectional.
    cache: a KVCache to append these T tokens to (prefill or decode step).
    embeddings: [B, T, D] input embeddings used instead of embedding
      `tokens` (which may then be None): the multimodal model splices image
      features into `embed_tokens(tokens)` and passes the result here.
    layers: see `hidden_states`.
    Returns logits [B, T, V] (float32), or (logits, cache) with a cache.
    """
    x, cache = self.hidden_states(tokens, positions, segment_ids, prefix_mask,
                                  cache, embeddings, layers)
    logits = jnp.einsum("btd,dv->btv", x, self.head_weight(),
                        preferred_element_type=jnp.float32)
    logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
    return logits if cache is None else (logits, cache)

  def head_weight(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the training loss
    applies it itself, a chunk at a time: `losses.head_cross_entropy`)."""
    w = self.embed.table[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    if self.peft is not None:  # LoRA on the head, merged: W + scale * A B
      w = self.peft.head_weight(w)
    return w.astype(self.cfg.compute_dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token ids [B, T] -> input embeddings [B, T, D] in the compute dtype."""
    return self.embed(tokens)

  def hidden_states(self, tokens: jax.Array | None,
                    positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None,
                    prefix_mask: jax.Array | None = None,
                    cache: KVCache | None = None,
                    embeddings: jax.Array | None = None,
                    layers: list[nnx.State] | None = None):
    """`__call__` up to the final norm: ([B, T, D] in the compute dtype,
    the updated cache or None).

    layers: `layer_states()` to run the blocks one by one with those
      arrays instead of scanning the stacked ones (same function).
    """
    cfg = self.cfg
    if embeddings is None:
      b, t = tokens.shape
    else:
      b, t, d = embeddings.shape
      if d != cfg.embed_dim:
        raise ValueError(f"embeddings have width {d}, the model's "
                         f"embed_dim is {cfg.embed_dim}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    has_prefix = prefix_mask is not None
    q_prefix = (prefix_mask if has_prefix else jnp.zeros((b, t), bool))

    q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      k_segments, k_positions, k_prefix, k_slots = (
          segment_ids, positions, q_prefix, q_slots)
    else:
      cache = cache.append_slots(segment_ids, positions, q_prefix)
      q_slots = q_slots + cache.index
      k_slots = jnp.broadcast_to(
          jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
      k_segments, k_positions, k_prefix = (
          cache.segment_ids, cache.positions, cache.prefix)
    mask = attention_mask(segment_ids, k_segments, q_slots, k_slots,
                          q_prefix if has_prefix or cache is not None else None,
                          k_prefix)
    bias = (alibi_bias(positions, k_positions, cfg.num_heads)
            if cfg.position == "alibi" else None)
    peft_inputs = None
    if self.peft is not None:  # keys and values before every sequence, ...
      mask, bias, peft_inputs = self.peft.layer_inputs(self, positions,
                                                       segment_ids, mask, bias)

    x = self.embed(tokens) if embeddings is None else embeddings.astype(
        cfg.compute_dtype)
    x = constrain(x, ACTIVATION)
    graphdef, block_state = nnx.split(self.blocks)
    cache_index = None if cache is None else cache.index

    # What goes with each row of x into every layer (the pipeline cuts these
    # into micro-batches along with x).
    rows = (positions, segment_ids, mask, bias)

    # The cache travels whole in the carry and each layer writes its slice in
    # place (as scan outputs, every step would copy all of it).
    def layer(carry, scanned, rows=rows):
      x, kv = carry
      state, layer_peft, index = scanned
      block = nnx.merge(graphdef, state)
      layer_cache = None if kv is None else (*kv, index)
      x, layer_cache = block(x, *rows, layer_cache, cache_index, has_prefix,
                             layer_peft)
      return (x, None if kv is None else layer_cache[:2]), None

    use_remat, policy = remat_policy(cfg.remat)

    def scan_layers(carry, scanned, rows=rows):
      """Runs the stacked layers in `scanned`, each rematerialised."""
      body = functools.partial(layer, rows=rows)
      if use_remat:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      count = jax.tree.leaves(scanned[0])[0].shape[0]
      return jax.lax.scan(body, carry, scanned,
                          unroll=min(cfg.scan_unroll, count))[0]

    carry = (x, None if cache is None else (cache.k, cache.v))
    per_layer = cache is not None and cache.per_layer
    schedule = pipeline.current_pipeline() if cache is None and layers is None else None
    if schedule is not None:  # Training forward under a pipeline schedule.
      if peft_inputs is not None:
        raise ValueError("pipeline stages do not take per-layer PEFT inputs "
                         "(prefix keys, LoRA dropout) yet; use parallel."
                         "stage=1 with this method")
      stack = lambda state, x, rows: scan_layers(
          (x, None), (state, None, None), rows)[0]
      carry = (pipeline.run(schedule, stack, block_state, x, rows), None)
    elif layers is None:
      if per_layer:
        raise ValueError("a per-layer KVCache needs layers=layer_states()")
      scanned = (block_state, peft_inputs, jnp.arange(cfg.num_layers))
      carry = scan_layers(carry, scanned)
    else:  # One traced copy per layer, each reading its own arrays.
      for i, state in enumerate(layers):
        layer_peft = jax.tree.map(lambda a, i=i: a[i], peft_inputs)
        if per_layer:
          x, (ks, vs) = carry
          (x, (k, v)), _ = layer((x, (ks[i], vs[i])), (state, layer_peft,
                                                       None))
          carry = (x, (ks[:i] + (k,) + ks[i + 1:], vs[:i] + (v,) + vs[i + 1:]))
        else:
          carry, _ = layer(carry, (state, layer_peft, i))
    x, kv = carry

    x = self.final_norm(x)
    if cache is not None:
      cache = cache.replace(k=kv[0], v=kv[1], index=cache.index + t)
    return x, cache

  def layer_states(self) -> list[nnx.State]:
    """Each block's parameters as separate arrays, for `layers=`.

    Under jit this slices every stacked parameter once (a copy of the block
    weights). Worth it in a loop of small steps (decoding): inside a scan,
    XLA on CPU copies each layer's weights out of the stacked arrays on every
    iteration before the matmuls read them, tripling the weight traffic.
    """
    state = nnx.state(self.blocks)
    return [jax.tree.map(lambda a, i=i: a[i], state)
            for i in range(self.cfg.num_layers)]
