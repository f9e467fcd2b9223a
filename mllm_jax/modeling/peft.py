"""Parameter-efficient fine-tuning of the decoder, behind `peft.method`.

Methods (`PeftConfig`, modeling/peft_config.py):

  lora     W x + scale * B(A(dropout(x))) on chosen projections (q, k, v, o,
           gate, up, down, embed, lm_head); merges into the base exactly
           (`merge_lora`), and imports/exports HF PEFT adapters
           (convert/peft.py).
  prompt   learned virtual-token embeddings before every sequence.
  ptuning  the same, the embeddings produced by a prompt encoder (MLP or
           bidirectional LSTM).
  prefix   learned keys and values before every sequence, in every layer
           (optionally through an MLP, PEFT's `prefix_projection`).
  adapter  bottleneck adapters x + up(act(down(x))) on the attention and/or
           MLP output (Houlsby; Pfeiffer with the MLP alone).

How it plugs into the decoder: `build_model(model_cfg, peft_cfg, rngs)`
hands the Decoder an `Adapters` builder, and each module (Embed, Attention,
MLP, Block, Decoder) asks it for its own adapter, kept as `module.peft`
(None for the plain Decoder, whose computation is then unchanged). Adapters
are created in their module's constructor, so those of the scanned blocks
are stacked on the `layers` axis by the same `nnx.vmap`, and each factor
carries the logical axis names of the weight dimension it shares: LoRA's A
of `q` [embed, lora_rank] shards over fsdp like the weight's input, B
[lora_rank, heads, head_dim] over tensor like its output.

Prompt, P-tuning and prefix tuning all end as keys and values in front of
every layer's keys (`LayerInputs.prepend`). Virtual tokens only attend to
each other, so their keys and values do not depend on the input: they are
computed once per forward pass by running the virtual tokens through the
frozen model (a KV-cache prefill), and every query that is not padding sees
them, in every packed segment, at positions -P..-1 (RoPE and ALiBi see the
distances PEFT's prepended tokens have). A KV cache works unchanged: the
prefix is added at every step, never stored.

Every adapter parameter is an `AdapterParam` (LoRA's factors a `LoraParam`,
also an `nnx.LoRAParam`), so a trainer's filter selects exactly them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling.attention import KVCache
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.modeling.layers import alibi_bias
from mllm_jax.modeling.peft_config import (ALL_LINEAR, LORA_TARGETS, METHODS,
                                           PREFIX_METHODS, PeftConfig)
from mllm_jax.parallel.sharding import constrain

__all__ = [
    "AdapterParam", "LoraParam", "PeftConfig", "METHODS", "ALL_LINEAR",
    "build_model", "peft_config", "adapter_params", "base_model",
    "adapters_disabled", "merge_lora", "merge_lora_params", "lora_dropout",
    "init_prompt_from_tokens", "peft_loss", "peft_task",
]


class AdapterParam(nnx.Param):
  """Parameters of every PEFT method (the trainable set of a PEFT run)."""


class LoraParam(AdapterParam, nnx.LoRAParam):
  """LoRA's factors A and B; also an `nnx.LoRAParam`, so filters written for
  Flax's and Tunix's LoRA select them too."""


# LoRA target -> (native path of its adapter module, of the adapted weight,
# input dims of the weight, stacked per layer?). The weight's first `in_dims`
# axes are its input (contracted with the activation), the rest its output.
LORA_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int, bool]] = {
    **{t: (("blocks", "attn", "peft", t), ("blocks", "attn", t),
           2 if t == "o" else 1, True) for t in ("q", "k", "v", "o")},
    **{t: (("blocks", "mlp", "peft", t), ("blocks", "mlp", t), 1, True)
       for t in ("gate", "up", "down")},
    "embed": (("embed", "peft"), ("embed", "table"), 1, False),
    "lm_head": (("peft", "lm_head"), ("lm_head",), 1, False),
}
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "tanh": jnp.tanh}


def _adapter_param(kind, value: jax.Array, axes) -> AdapterParam:
  """An adapter parameter tagged with logical axis names, like layers.param."""
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)
          ).astype(dtype)


# ----------------------------------------------------------------------------
# Switches read while tracing
# ----------------------------------------------------------------------------

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = (
    contextvars.ContextVar("mllm_jax_lora_dropout", default=None))


@contextlib.contextmanager
def lora_dropout(key: jax.Array) -> Iterator[None]:
  """Applies LoRA dropout (`peft.dropout`) with `key` to the forward passes
  traced inside; without it LoRA is deterministic (evaluation, inference).
  `peft_loss` enters it around the training loss."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """The base model, adapters switched off, for what runs inside (e.g. a DPO
  or PPO reference pass in the same loss as the policy): every module's
  `peft` is None meanwhile, so it computes exactly the plain Decoder. The
  switch is part of the model's graph, so jit traces each state apart."""
  stash = [(m, m.peft) for _, m in nnx.iter_modules(model)
           if getattr(m, "peft", None) is not None]
  for module, _ in stash:
    module.peft = None
  try:
    yield model
  finally:
    for module, adapter in stash:
      module.peft = adapter


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------


def lora_product(a, b, stacked: bool = False, xp: Any = jnp):
  """A [(L,) *in, r] times B [(L,) r, *out] -> [(L,) *in, *out] (numpy or
  jax: `xp`), the weight-shaped update without its scale."""
  lead = "l" if stacked else ""
  n_in = a.ndim - 1 - len(lead)
  n_out = b.ndim - 1 - len(lead)
  ins, outs = "abcdefg"[:n_in], "mnopq"[:n_out]
  return xp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a, b)


class Lora(nnx.Module):
  """One weight's low-rank update: scale * (x A) B.

  A is the weight's input dims + (rank,), B (rank,) + its output dims, each
  named like the weight dimensions it shares, so it shards like them. A
  starts uniform in +-1/sqrt(fan_in) and B at zero (PEFT's default), so the
  adapted model starts equal to the base; an embedding's A starts at zero
  and its B normal, as in PEFT.
  """

  def __init__(self, shape, axes, dtype, in_dims: int, cfg: PeftConfig,
               rngs: nnx.Rngs, salt: int, embedding: bool = False):
    ins, outs = tuple(shape[:in_dims]), tuple(shape[in_dims:])
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    r = cfg.rank
    a_shape, b_shape = ins + (r,), (r,) + outs
    if embedding:
      a = jnp.zeros(a_shape, dtype)
      b = _normal(rngs, b_shape, 1.0, dtype)
    else:
      bound = 1 / math.sqrt(math.prod(ins))
      a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound,
                             bound).astype(dtype)
      b = jnp.zeros(b_shape, dtype)
    self.lora_a = _adapter_param(LoraParam, a, axes[:in_dims] + ("lora_rank",))
    self.lora_b = _adapter_param(LoraParam, b, ("lora_rank",) + axes[in_dims:])
    self.in_dims = in_dims
    self.scale = cfg.scale
    self.dropout = cfg.dropout
    self.salt = salt  # tells this weight's dropout mask from the others'

  @classmethod
  def of(cls, weight: nnx.Variable, in_dims: int, cfg: PeftConfig,
         rngs: nnx.Rngs, name: str, embedding: bool = False) -> "Lora":
    axes = weight.get_metadata().get("out_sharding") or ()
    return cls(weight.shape, axes, weight.dtype, in_dims, cfg, rngs,
               LORA_TARGETS.index(name), embedding)

  def delta(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """scale * (dropout(x) A) B for x [..., *in] -> [..., *out] in x's dtype."""
    dt = x.dtype
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt),
                                  1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(dt)
    h = jnp.tensordot(x, self.lora_a[...].astype(dt), axes=self.in_dims)
    return jnp.tensordot(h, self.lora_b[...].astype(dt), axes=1) * jnp.asarray(
        self.scale, dt)

  def merged(self, w: jax.Array) -> jax.Array:
    """W + scale * A B, in W's dtype (the update formed in float32)."""
    update = lora_product(self.lora_a[...].astype(jnp.float32),
                          self.lora_b[...].astype(jnp.float32))
    return (w.astype(jnp.float32) + self.scale * update).astype(w.dtype)


class EmbedLora(Lora):
  """LoRA on the token embedding: + scale * A[tokens] B (no dropout)."""

  def __call__(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
    a = constrain(self.lora_a[...].astype(x.dtype), (None, None))
    h = jnp.take(a, tokens, axis=0)
    return x + jnp.tensordot(h, self.lora_b[...].astype(x.dtype),
                             axes=1) * jnp.asarray(self.scale, x.dtype)


class LoraSet(nnx.Module):
  """LoRA on some of one module's weights (attention q/k/v/o or MLP
  gate/up/down), one `Lora` per targeted weight, named like it."""

  def __init__(self, module: nnx.Module, in_dims: Mapping[str, int],
               cfg: PeftConfig, rngs: nnx.Rngs):
    self.targets = tuple(in_dims)
    for name, n in in_dims.items():
      setattr(self, name, Lora.of(getattr(module, name), n, cfg, rngs, name))

  def update(self, name: str, x: jax.Array, y: jax.Array,
             inputs: LayerInputs | None) -> jax.Array:
    """y (= x through weight `name`) plus that weight's LoRA update, if any."""
    if name not in self.targets:
      return y
    key = None if inputs is None else inputs.dropout_key
    return y + getattr(self, name).delta(x, key)

  def swiglu(self, x, w_gate, w_up, w_down, inputs: LayerInputs | None):
    """The SwiGLU MLP (layers.MLP) with LoRA on its weights; autodiff's
    backward."""
    gate = self.update("gate", x, jnp.einsum("btd,dh->bth", x, w_gate), inputs)
    up = self.update("up", x, jnp.einsum("btd,dh->bth", x, w_up), inputs)
    hidden = constrain(jax.nn.silu(gate) * up,
                       ("act_batch", "act_length", "act_mlp"))
    return self.update("down", hidden,
                       jnp.einsum("bth,hd->btd", hidden, w_down), inputs)


# ----------------------------------------------------------------------------
# Bottleneck adapters
# ----------------------------------------------------------------------------


class Bottleneck(nnx.Module):
  """x + up(act(down(x) + b_down)) + b_up, `up` starting at zero."""

  def __init__(self, cfg: ModelConfig, peft: PeftConfig, rngs: nnx.Rngs):
    d, m, dt = cfg.embed_dim, peft.adapter_dim, cfg.weight_dtype
    self.down = _adapter_param(AdapterParam, _normal(rngs, (d, m), cfg.init_std,
                                                     dt), ("embed", "adapter"))
    self.down_bias = _adapter_param(AdapterParam, jnp.zeros((m,), dt),
                                    ("adapter",))
    self.up = _adapter_param(AdapterParam, jnp.zeros((m, d), dt),
                             ("adapter", "embed"))
    self.up_bias = _adapter_param(AdapterParam, jnp.zeros((d,), dt),
                                  ("embed",))
    self.activation = peft.adapter_activation

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    h = jnp.einsum("btd,dm->btm", x, self.down[...].astype(dt))
    h = ACTIVATIONS[self.activation](h + self.down_bias[...].astype(dt))
    return x + jnp.einsum("btm,md->btd", h, self.up[...].astype(dt)) + (
        self.up_bias[...].astype(dt))


class BlockAdapters(nnx.Module):
  """A block's bottleneck adapters, on the attention and/or MLP output
  (before the residual sum, as in Houlsby et al. 2019)."""

  def __init__(self, cfg: ModelConfig, peft: PeftConfig, rngs: nnx.Rngs):
    places = peft.adapter_places
    self.attn = Bottleneck(cfg, peft, rngs) if "attn" in places else None
    self.mlp = Bottleneck(cfg, peft, rngs) if "mlp" in places else None

  def after_attention(self, h: jax.Array) -> jax.Array:
    return h if self.attn is None else self.attn(h)

  def after_mlp(self, h: jax.Array) -> jax.Array:
    return h if self.mlp is None else self.mlp(h)


# ----------------------------------------------------------------------------
# Virtual tokens and prefixes
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class LayerInputs:
  """What the adapters of one layer get besides its activations: keys and
  values to put before every sequence ([L, B, P, KV, Dh] for the stack,
  [B, P, KV, Dh] inside a layer) and a LoRA dropout key per layer."""
  prefix_k: jax.Array | None = None
  prefix_v: jax.Array | None = None
  dropout_key: jax.Array | None = None

  def prepend(self, k: jax.Array, v: jax.Array):
    """k, v [B, S, KV, Dh] -> [B, P + S, KV, Dh] with the prefix first."""
    if self.prefix_k is None:
      return k, v
    return (jnp.concatenate([self.prefix_k.astype(k.dtype), k], axis=1),
            jnp.concatenate([self.prefix_v.astype(v.dtype), v], axis=1))


def _dense(rngs, shape, axes, dtype, zero=False) -> AdapterParam:
  value = (jnp.zeros(shape, dtype) if zero else
           _normal(rngs, shape, 1 / math.sqrt(shape[0]), dtype))
  return _adapter_param(AdapterParam, value, axes)


class Mlp(nnx.Module):
  """Dense layers with biases and an activation between them (the prompt
  encoder's and the prefix reparameterisation's): w0, b0, w1, b1, ..."""

  def __init__(self, sizes, axes, activation: str, dtype, rngs: nnx.Rngs):
    self.depth = len(sizes) - 1
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
      setattr(self, f"w{i}", _dense(rngs, (m, n), (axes[i], axes[i + 1]),
                                    dtype))
      setattr(self, f"b{i}", _dense(rngs, (n,), (axes[i + 1],), dtype,
                                    zero=True))
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      if i:
        x = ACTIVATIONS[self.activation](x)
      w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
      x = x @ w[...].astype(x.dtype) + b[...].astype(x.dtype)
    return x


class Lstm(nnx.Module):
  """One LSTM direction over [P, D] (gates i, f, g, o)."""

  def __init__(self, d: int, h: int, dtype, rngs: nnx.Rngs):
    self.w_in = _dense(rngs, (d, 4 * h), ("embed", "mlp"), dtype)
    self.w_hidden = _dense(rngs, (h, 4 * h), (None, "mlp"), dtype)
    self.bias = _dense(rngs, (4 * h,), ("mlp",), dtype, zero=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    inputs = x @ self.w_in[...].astype(dt) + self.bias[...].astype(dt)
    w_hidden = self.w_hidden[...].astype(dt)
    h0 = jnp.zeros((w_hidden.shape[0],), dt)

    def step(carry, z):
      h, c = carry
      i, f, g, o = jnp.split(z + h @ w_hidden, 4)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h
    return jax.lax.scan(step, (h0, h0), inputs)[1]


class PromptEncoder(nnx.Module):
  """P-tuning's encoder of the virtual-token embeddings [P, D]: an MLP
  (D -> H -> H -> D, ReLU), or a bidirectional LSTM (H per direction)
  followed by an MLP head (2H -> 2H -> D)."""

  def __init__(self, cfg: ModelConfig, peft: PeftConfig, rngs: nnx.Rngs):
    d, dt = cfg.embed_dim, cfg.weight_dtype
    h = peft.encoder_hidden or d
    self.kind = peft.encoder
    if peft.encoder == "lstm":
      self.forward = Lstm(d, h, dt, rngs)
      self.backward = Lstm(d, h, dt, rngs)
      self.head = Mlp((2 * h, 2 * h, d), (None, "mlp", "embed"), "relu", dt,
                      rngs)
    else:
      self.head = Mlp((d, h, h, d), ("embed", "mlp", None, "embed"), "relu",
                      dt, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "lstm":
      x = jnp.concatenate([self.forward(x), self.backward(x[::-1])[::-1]], -1)
    return self.head(x)


class DecoderAdapter(nnx.Module):
  """The decoder-level part of a PEFT model: its `PeftConfig`, LoRA on the
  output projection, and the virtual tokens or prefixes."""

  def __init__(self, decoder: Decoder, peft: PeftConfig, rngs: nnx.Rngs):
    cfg = decoder.cfg
    self.config = peft
    self.num_layers = cfg.num_layers
    head = None
    if peft.method == "lora" and "lm_head" in peft.targets:
      if cfg.tie_embeddings:  # the head is the embedding table, transposed
        head = Lora((cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                    cfg.weight_dtype, 1, peft, rngs,
                    LORA_TARGETS.index("lm_head"))
      else:
        head = Lora.of(decoder.lm_head, 1, peft, rngs, "lm_head")
    self.lm_head = head
    p, d, dt = peft.num_virtual_tokens, cfg.embed_dim, cfg.weight_dtype
    if peft.method in ("prompt", "ptuning"):
      self.prompt = _adapter_param(AdapterParam,
                                   _normal(rngs, (p, d), cfg.init_std, dt),
                                   ("virtual_tokens", "embed"))
    if peft.method == "ptuning":
      self.encoder = PromptEncoder(cfg, peft, rngs)
    if peft.method == "prefix":
      kv_shape = (cfg.num_layers, p, cfg.kv_heads, cfg.head_size)
      kv_axes = ("layers", "virtual_tokens", "kv_heads", "head_dim")
      if peft.encoder_hidden:  # PEFT's prefix_projection
        self.prefix_embed = _adapter_param(
            AdapterParam, _normal(rngs, (p, d), cfg.init_std, dt),
            ("virtual_tokens", "embed"))
        self.prefix_mlp = Mlp((d, peft.encoder_hidden, 2 * math.prod(
            kv_shape) // p), ("embed", "mlp", None), "tanh", dt, rngs)
      else:
        std = cfg.init_std * math.sqrt(d)  # about the scale of real keys
        self.prefix_k = _adapter_param(
            AdapterParam, _normal(rngs, kv_shape, std, dt), kv_axes)
        self.prefix_v = _adapter_param(
            AdapterParam, _normal(rngs, kv_shape, std, dt), kv_axes)

  def head_weight(self, w: jax.Array) -> jax.Array:
    return w if self.lm_head is None else self.lm_head.merged(w)

  def prompt_embeddings(self) -> jax.Array:
    """[P, D]: the virtual tokens (P-tuning: through the prompt encoder)."""
    prompt = self.prompt[...]
    return prompt if self.config.method == "prompt" else self.encoder(
        prompt.astype(jnp.float32)).astype(prompt.dtype)

  def _prefix(self, model: Decoder, batch: int):
    """Keys and values [L, B, P, KV, Dh] put before every sequence."""
    cfg, p = model.cfg, self.config.num_virtual_tokens
    if self.config.method == "prefix":
      if self.config.encoder_hidden:
        kv = self.prefix_mlp(self.prefix_embed[...].astype(jnp.float32))
        kv = kv.reshape(p, 2, cfg.num_layers, cfg.kv_heads, cfg.head_size)
        k, v = kv.transpose(1, 2, 0, 3, 4)
      else:
        k, v = self.prefix_k[...], self.prefix_v[...]
      shape = (cfg.num_layers, batch, p, cfg.kv_heads, cfg.head_size)
      return (jnp.broadcast_to(k[:, None], shape),
              jnp.broadcast_to(v[:, None], shape))
    # Virtual tokens attend only to each other: their keys and values come
    # from a prefill of the frozen model, at positions -P..-1.
    prompt = jnp.broadcast_to(self.prompt_embeddings(), (batch, p,
                                                         cfg.embed_dim))
    positions = jnp.broadcast_to(jnp.arange(-p, 0, dtype=jnp.int32), (batch, p))
    cache = KVCache.create(cfg, batch, p)
    with adapters_disabled(model):
      _, cache = model.hidden_states(None, positions,
                                     jnp.ones((batch, p), jnp.int32),
                                     cache=cache, embeddings=prompt)
    return cache.k, cache.v

  def layer_inputs(self, model: Decoder, positions, segment_ids, mask, bias):
    """(mask, bias, LayerInputs or None) for the decoder's scan: the mask
    [B, T, S] and ALiBi bias widened by the P prefix keys, which every query
    but padding sees."""
    method = self.config.method
    inputs = LayerInputs()
    if method in PREFIX_METHODS:
      b, t = segment_ids.shape
      p = self.config.num_virtual_tokens
      k, v = self._prefix(model, b)
      inputs = inputs.replace(prefix_k=k, prefix_v=v)
      visible = jnp.broadcast_to((segment_ids != 0)[:, :, None], (b, t, p))
      mask = jnp.concatenate([visible, mask], axis=-1)
      if bias is not None:
        prefix_positions = jnp.broadcast_to(jnp.arange(-p, 0, dtype=jnp.int32),
                                            (b, p))
        bias = jnp.concatenate(
            [alibi_bias(positions, prefix_positions, model.cfg.num_heads),
             bias], axis=-1)
    key = _DROPOUT_KEY.get()
    if method == "lora" and self.config.dropout > 0 and key is not None:
      inputs = inputs.replace(dropout_key=jax.random.split(key,
                                                           self.num_layers))
    if inputs.prefix_k is None and inputs.dropout_key is None:
      return mask, bias, None
    return mask, bias, inputs


# ----------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------


class Adapters:
  """What each decoder module asks for its adapter (`peft=` of Decoder,
  Block, Attention, MLP, Embed): a module, or None where the method leaves
  that module alone. Modules pass themselves, weights already created, so
  adapters take their shapes and logical axes from the weights."""

  def __init__(self, model_cfg: ModelConfig, peft: PeftConfig):
    self.model_cfg = model_cfg
    self.config = peft

  def _lora_targets(self, names) -> dict[str, int]:
    if self.config.method != "lora":
      return {}
    return {t: LORA_PATHS[t][2] for t in names if t in self.config.targets}

  def embed(self, embed: nnx.Module, rngs: nnx.Rngs) -> EmbedLora | None:
    if not self._lora_targets(("embed",)):
      return None
    return EmbedLora.of(embed.table, 1, self.config, rngs, "embed",
                        embedding=True)

  def attention(self, attn: nnx.Module, rngs: nnx.Rngs) -> LoraSet | None:
    targets = self._lora_targets(("q", "k", "v", "o"))
    return LoraSet(attn, targets, self.config, rngs) if targets else None

  def mlp(self, mlp: nnx.Module, rngs: nnx.Rngs) -> LoraSet | None:
    targets = self._lora_targets(("gate", "up", "down"))
    return LoraSet(mlp, targets, self.config, rngs) if targets else None

  def block(self, cfg: ModelConfig, rngs: nnx.Rngs) -> BlockAdapters | None:
    if self.config.method != "adapter":
      return None
    return BlockAdapters(cfg, self.config, rngs)

  def decoder(self, decoder: Decoder, rngs: nnx.Rngs) -> DecoderAdapter:
    return DecoderAdapter(decoder, self.config, rngs)


def build_model(model_cfg: ModelConfig, peft: PeftConfig | None,
                rngs: nnx.Rngs) -> Decoder:
  """The model a run builds: the plain Decoder when `peft.method` is "none"
  (or peft is None), else the Decoder with the method's adapters."""
  if peft is None or peft.method == "none":
    return Decoder(model_cfg, rngs=rngs)
  peft.validate()
  peft.check_model(model_cfg)
  return Decoder(model_cfg, rngs=rngs, peft=Adapters(model_cfg, peft))


def peft_config(model: Decoder) -> PeftConfig:
  """The model's PeftConfig (method "none" for a plain Decoder)."""
  adapter = getattr(model, "peft", None)
  return PeftConfig() if adapter is None else adapter.config


def adapter_state(model: nnx.Module) -> nnx.State:
  return nnx.state(model, AdapterParam)


def adapter_params(model: nnx.Module) -> dict[str, Any]:
  """The adapter parameters alone, as a pure dict (what save_adapter
  writes)."""
  return nnx.to_pure_dict(adapter_state(model))


def without_adapters(params: Mapping[str, Any]) -> dict[str, Any]:
  """A PEFT model's pure dict of parameters without its adapters: the
  plain Decoder's."""
  return {k: without_adapters(v) if isinstance(v, Mapping) else v
          for k, v in params.items() if k != "peft"}


def _plain(cfg: ModelConfig, params: Mapping[str, Any]) -> Decoder:
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def base_model(model: Decoder) -> Decoder:
  """The plain Decoder of a PEFT model, sharing its base arrays (nothing is
  copied): the reference model of later stages (DPO, PPO)."""
  return _plain(model.cfg, without_adapters(nnx.to_pure_dict(
      nnx.state(model))))


def merge_lora_params(model_cfg: ModelConfig, peft: PeftConfig,
                      params: Mapping[str, Any], xp: Any = jnp
                      ) -> tuple[ModelConfig, dict[str, Any]]:
  """A LoRA model's pure dict (base + adapters; numpy with xp=np) -> the
  plain Decoder's config and params with W + scale * A B in every target.

  Tied embeddings with LoRA on `embed` or `lm_head` are untied: the input
  and output projections then differ (as they do in the adapted model), so
  the merged config has tie_embeddings=False and its own lm_head.
  """
  check(peft.method == "lora", "peft.method",
        f"only LoRA merges into the base; {peft.method!r} adds computation")

  def get(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  def put(tree, path, value):
    for key in path[:-1]:
      tree = tree[key]
    tree[path[-1]] = value

  def update(lora_path, stacked):
    lora = get(params, lora_path)
    a, b = (xp.asarray(lora[k]).astype(np.float32) for k in ("lora_a",
                                                            "lora_b"))
    return peft.scale * lora_product(a, b, stacked, xp)

  merged = without_adapters(params)
  untie = model_cfg.tie_embeddings and bool(
      {"embed", "lm_head"} & set(peft.targets))
  table = merged["embed"]["table"]
  for target in peft.targets:
    lora_path, weight_path, _, stacked = LORA_PATHS[target]
    if target == "lm_head" and model_cfg.tie_embeddings:
      weight = xp.asarray(table).T
    else:
      weight = get(merged, weight_path)
    new = (xp.asarray(weight).astype(np.float32) + update(lora_path, stacked)
           ).astype(weight.dtype)
    put(merged, weight_path, new)
  if untie and "lm_head" not in peft.targets:
    merged["lm_head"] = xp.asarray(table).T
  cfg = dataclasses.replace(model_cfg, tie_embeddings=False) if untie else (
      model_cfg)
  return cfg, merged


def merge_lora(model: Decoder) -> Decoder:
  """A plain Decoder with the LoRA updates merged into its weights (same
  logits up to float rounding); `merged.cfg` is untied when the adapter
  touched tied embeddings (see merge_lora_params)."""
  cfg, params = merge_lora_params(model.cfg, peft_config(model),
                                  nnx.to_pure_dict(nnx.state(model)))
  return _plain(cfg, params)


def init_prompt_from_tokens(model: Decoder, token_ids) -> None:
  """Starts the virtual tokens (prompt tuning, P-tuning) at the embeddings
  of `token_ids` (repeated to num_virtual_tokens), as PEFT's TEXT init."""
  adapter = model.peft
  check(adapter is not None and hasattr(adapter, "prompt"), "peft.method",
        "the model has no virtual tokens (prompt or ptuning)")
  p = adapter.config.num_virtual_tokens
  ids = np.resize(np.asarray(token_ids, np.int32), p)
  adapter.prompt[...] = model.embed.table[...][ids].astype(
      adapter.prompt.dtype)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def batch_key(batch: Mapping[str, jax.Array], seed: int = 0) -> jax.Array:
  """A dropout key from the batch's tokens: new for each batch, the same
  when a resumed run sees the batch again (no state to checkpoint)."""
  tokens = batch["inputs"].astype(jnp.uint32)
  weights = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.uint32) * jnp.uint32(
      2654435761)
  fingerprint = jnp.sum(tokens * weights[None]) + jnp.sum(
      tokens[:, :1] * jnp.arange(1, tokens.shape[0] + 1, dtype=jnp.uint32
                                 )[:, None])
  return jax.random.fold_in(jax.random.key(seed), fingerprint)


def peft_loss(peft: PeftConfig, z_loss: float = 0.0, seed: int = 0):
  """The language-model loss (train.task.lm_loss), with LoRA dropout when
  `peft.dropout` > 0 (its mask drawn from the batch, see batch_key)."""
  from mllm_jax.train.task import lm_loss  # pylint: disable=g-import-not-at-top
  loss = lm_loss(z_loss)
  if peft.method != "lora" or not peft.dropout:
    return loss

  def with_dropout(model, batch):
    with lora_dropout(batch_key(batch, seed)):
      return loss(model, batch)
  return with_dropout


def peft_task(model_cfg: ModelConfig, peft: PeftConfig, *,
              z_loss: float = 0.0, trainable: tuple[str, ...] = (),
              init_checkpoint: str = "", init_adapter: str = "",
              name: str = "finetune", seed: int = 0):
  """A TrainTask (train/task.py) for fine-tuning with `peft`.

  method "none": exactly `language_model_task` (full fine-tuning).
  Otherwise the model is `build_model(model_cfg, peft)`, only its
  AdapterParams train (plus parameters matching the `trainable` regular
  expressions, e.g. the norms), the base comes from the native checkpoint
  `init_checkpoint` (else the seed) and the adapter from the native adapter
  `init_adapter` (else its initialisation), each restored straight into
  its shardings.
  """
  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native
  from mllm_jax.convert import peft as peft_io
  from mllm_jax.train import task as task_lib
  from mllm_jax.train.metrics import train_flops_per_token
  # pylint: enable=g-import-not-at-top
  if peft.method == "none":
    return task_lib.language_model_task(
        model_cfg, z_loss=z_loss, trainable=trainable,
        init_checkpoint=init_checkpoint, name=name)
  if init_checkpoint:
    native.check_architecture(init_checkpoint, model_cfg, "init_checkpoint")
  if init_adapter:
    peft_io.check_adapter(init_adapter, model_cfg, peft, "init_adapter")
  select = AdapterParam if not trainable else nnx.Any(
      AdapterParam, task_lib.path_filter(trainable))

  def load(targets):
    loaded = {}
    if init_checkpoint:
      loaded = native.restore_params(init_checkpoint,
                                     without_adapters(targets))
    if init_adapter:
      adapter = peft_io.restore_adapter(init_adapter,
                                        _only_adapters(targets))
      loaded = merge_trees(loaded, adapter)
    return loaded

  return task_lib.TrainTask(
      name=name,
      build_model=lambda rngs: build_model(model_cfg, peft, rngs),
      loss=peft_loss(peft, z_loss, seed),
      trainable=select,
      load_weights=load if init_checkpoint or init_adapter else None,
      weights_source=", ".join(p for p in (init_checkpoint, init_adapter)
                               if p),
      flops_per_token=lambda seq_len: train_flops_per_token(model_cfg,
                                                            seq_len),
      perplexity=True)


def _only_adapters(tree: Mapping[str, Any], inside: bool = False
                   ) -> dict[str, Any]:
  """The adapter subtrees (under a `peft` key) of a pure dict."""
  out = {}
  for key, value in tree.items():
    here = inside or key == "peft"
    if isinstance(value, Mapping):
      sub = _only_adapters(value, here)
      if sub:
        out[key] = sub
    elif here:
      out[key] = value
  return out


def merge_trees(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dicts a and b in one (b's leaves win): base + adapter params."""
  out = dict(a)
  for key, value in b.items():
    out[key] = (merge_trees(out[key], value) if key in out and isinstance(
        value, Mapping) else value)
  return out


def check_same_method(got: PeftConfig, want: PeftConfig, source: str) -> None:
  """Fails naming each field where an adapter's config differs from the
  model's in what its parameters are or compute (shapes, LoRA's scale;
  dropout may differ)."""
  shaping = {"lora": ("rank", "targets", "alpha", "rslora"),
             "prompt": ("num_virtual_tokens",),
             "ptuning": ("num_virtual_tokens", "encoder", "encoder_hidden"),
             "prefix": ("num_virtual_tokens", "encoder_hidden"),
             "adapter": ("adapter_dim", "adapter_places",
                         "adapter_activation")}
  if got.method != want.method:
    raise ConfigError(f"{source}: the adapter is {got.method!r}, peft.method "
                      f"is {want.method!r}")
  differ = [f"peft.{f}: {getattr(got, f)!r} in the adapter, "
            f"{getattr(want, f)!r} in the config"
            for f in shaping.get(want.method, ())
            if getattr(got, f) != getattr(want, f)]
  if want.method == "lora" and set(got.targets) == set(want.targets):
    differ = [d for d in differ if not d.startswith("peft.targets")]
  if differ:
    raise ConfigError(f"{source}: {'; '.join(differ)}")
