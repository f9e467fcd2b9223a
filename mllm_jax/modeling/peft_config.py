"""Parameter-efficient fine-tuning: which method, and its hyper-parameters.

One switch, `peft.method`, picks the method; "none" builds the plain
Decoder (full fine-tuning or pretraining, bit for bit as without PEFT). The
model itself is built by `mllm_jax.modeling.peft.build_model`.

Imports no JAX at module level: config files import this.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mllm_jax.configlib import check, check_choice

# none: no adapters. lora: low-rank updates of chosen projections. prompt:
# learned virtual tokens before every sequence. prefix: learned keys and
# values before every sequence, in every layer. ptuning: virtual tokens
# produced by a small prompt encoder (MLP or LSTM). adapter: bottleneck
# adapters (Houlsby) after attention and/or the MLP.
METHODS = ("none", "lora", "prompt", "prefix", "ptuning", "adapter")
# LoRA targets: the projections by their native names (HF names in
# convert/peft.py): attention q, k, v, o; MLP gate, up, down; the token
# embedding; the output projection (also with tied embeddings).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")
# PEFT's "all-linear" for a causal LM: every projection but the output one.
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
PROMPT_ENCODERS = ("mlp", "lstm")
ADAPTER_PLACES = ("attn", "mlp")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
# Methods that put keys and values before every sequence.
PREFIX_METHODS = ("prompt", "prefix", "ptuning")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """A PEFT method and its hyper-parameters (only the chosen method's
  fields matter; every field is validated).

  LoRA (`method="lora"`): W x + scale * B(A(dropout(x))) for each target,
  scale = alpha / rank (alpha / sqrt(rank) with `rslora`), A random, B zero
  (the model starts equal to the base).
  Prompt / P-tuning: `num_virtual_tokens` embeddings (P-tuning: through a
  prompt encoder of width `encoder_hidden`, 0 meaning embed_dim) run through
  the frozen model before every sequence; each token attends to them.
  Prefix tuning: `num_virtual_tokens` learned keys and values per layer
  (`encoder_hidden` > 0 reparameterises them through an MLP of that width,
  PEFT's `prefix_projection`).
  Adapters: x + up(act(down(x))), width `adapter_dim`, on the output of each
  sublayer named in `adapter_places` ("attn", "mlp": Houlsby; "mlp" alone:
  Pfeiffer); `up` starts at zero.
  """
  method: str = "none"
  # LoRA
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "v")
  rslora: bool = False
  # Prompt, prefix and P-tuning
  num_virtual_tokens: int = 20
  encoder: str = "mlp"
  encoder_hidden: int = 0
  # Bottleneck adapters
  adapter_dim: int = 64
  adapter_places: tuple[str, ...] = ("attn", "mlp")
  adapter_activation: str = "relu"

  @property
  def scale(self) -> float:
    """LoRA's factor on B·A: alpha / rank, or alpha / sqrt(rank) (rsLoRA)."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def validate(self, prefix: str = "peft") -> None:
    check_choice(self.method, METHODS, f"{prefix}.method")
    check(self.rank > 0, f"{prefix}.rank", "must be positive")
    check(self.alpha > 0, f"{prefix}.alpha", "must be positive")
    check(0 <= self.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)")
    for target in self.targets:
      check_choice(target, LORA_TARGETS, f"{prefix}.targets")
    check(len(set(self.targets)) == len(self.targets), f"{prefix}.targets",
          f"{self.targets} names a projection twice")
    check(self.method != "lora" or bool(self.targets), f"{prefix}.targets",
          "LoRA needs at least one target projection")
    check(self.num_virtual_tokens > 0, f"{prefix}.num_virtual_tokens",
          "must be positive")
    check_choice(self.encoder, PROMPT_ENCODERS, f"{prefix}.encoder")
    check(self.encoder_hidden >= 0, f"{prefix}.encoder_hidden",
          "must be >= 0 (0: embed_dim for P-tuning, direct keys and values "
          "for prefix tuning)")
    check(self.adapter_dim > 0, f"{prefix}.adapter_dim", "must be positive")
    for place in self.adapter_places:
      check_choice(place, ADAPTER_PLACES, f"{prefix}.adapter_places")
    check(self.method != "adapter" or bool(self.adapter_places),
          f"{prefix}.adapter_places", "adapters need at least one place")
    check_choice(self.adapter_activation, ACTIVATIONS,
                 f"{prefix}.adapter_activation")

  def check_model(self, model_cfg: Any, prefix: str = "peft") -> None:
    """Fails naming the field when the model cannot run this method."""
    if self.method in PREFIX_METHODS:
      check(model_cfg.attention_backend != "splash", f"{prefix}.method",
            f"{self.method!r} adds keys before every sequence, which "
            f"model.attention_backend='splash' (causal within segments "
            f"only) cannot see; use 'xla', 'dot_product', 'cudnn' or "
            f"'cpu_fused'")
