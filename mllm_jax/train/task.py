"""A stage is a value handed to the one training loop: `TrainTask`.

Pretraining, FLAN, SFT, the reward model, DPO and both multimodal stages
differ in what they build, what they minimise and what they train, never in
the loop (`trainer.train`). A task says:

  build_model   how to construct the model from an `nnx.Rngs` (the loop
                builds it sharded at birth, or only its shapes for an
                ahead-of-time compile);
  loss          (model, batch) -> (weighted loss sum, sums): `sums["weight"]`
                is what the loss is normalised by over the whole (accumulated)
                batch, every other entry a weighted sum reported as a metric
                divided by that weight;
  trainable     an NNX filter over the model's variables: what gets
                gradients and optimizer state (`path_filter` turns regular
                expressions over parameter paths into one; a PEFT method can
                use its own Variable type). Everything else is frozen;
  load_weights  where starting weights come from, restored straight into
                their shardings (`native.restore_params`);
  batch_fields  the batch's fields and dtypes, each [batch, length].
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.modeling import Decoder, ModelConfig
from mllm_jax.train.losses import head_cross_entropy
from mllm_jax.train.metrics import train_flops_per_token
from mllm_jax.train.optimizer import path_name

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]
# path (dotted) -> ShapeDtypeStruct with its target sharding, and back arrays.
WeightLoader = Callable[[dict[str, jax.ShapeDtypeStruct]], dict[str, Any]]

# The batch schema of every supervised text stage (data.pipeline fills it).
LM_BATCH = {"inputs": jnp.int32, "targets": jnp.int32,
            "loss_weights": jnp.float32, "segment_ids": jnp.int32,
            "positions": jnp.int32}


@dataclasses.dataclass(frozen=True)
class TrainTask:
  """What one stage hands the loop (see the module docstring)."""
  name: str
  build_model: Callable[[nnx.Rngs], nnx.Module]
  loss: LossFn
  trainable: Any = nnx.Param
  load_weights: WeightLoader | None = None
  weights_source: str = ""  # where load_weights reads, for messages
  batch_fields: dict[str, Any] = dataclasses.field(
      default_factory=lambda: dict(LM_BATCH))
  # Model FLOPs per trained token for MFU (6N + attention), given seq_len.
  flops_per_token: Callable[[int], float] | None = None
  perplexity: bool = False  # eval reports exp(eval_loss)


def path_filter(patterns: tuple[str, ...] | list[str]):
  """An NNX filter: parameters whose dotted path matches any pattern
  (`re.search`); no patterns means every parameter."""
  compiled = []
  for i, pattern in enumerate(patterns):
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ConfigError(f"train.trainable[{i}]: bad regular expression "
                        f"{pattern!r} ({e})") from e

  def matches(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    return not compiled or any(c.search(path_name(path)) for c in compiled)
  return matches


def split_trainable(module_or_state, trainable):
  """(graphdef, trainable state, frozen state) of a module."""
  return nnx.split(module_or_state, trainable, ...)


def lm_loss(z_loss: float = 0.0) -> LossFn:
  """Next-token cross-entropy weighted by `loss_weights` (plus optional
  z-loss), for any decoder-shaped model. An optional `prefix_mask` field
  (bool) makes attention bidirectional inside the prefix (prefix-LM)."""
  def loss(model, batch):
    x, _ = model.hidden_states(batch["inputs"], batch["positions"],
                               batch["segment_ids"],
                               prefix_mask=batch.get("prefix_mask"))
    weights = batch["loss_weights"].astype(jnp.float32)
    loss_sum, ce_sum = head_cross_entropy(
        x, model.head_weight(), batch["targets"], weights, z_loss,
        model.cfg.loss_chunk_len, model.cfg.loss_positions)
    return loss_sum, {"weight": jnp.sum(weights), "loss": ce_sum}
  return loss


def language_model_task(model_cfg: ModelConfig, *, z_loss: float = 0.0,
                        trainable: tuple[str, ...] = (),
                        init_checkpoint: str = "",
                        name: str = "pretrain") -> TrainTask:
  """A decoder trained by (weighted) next-token prediction: pretraining,
  FLAN and SFT, which differ only in how their data fills the batch.
  `init_checkpoint`: a native checkpoint whose architecture equals
  `model_cfg`'s, loaded straight into the mesh's shardings."""
  load = None
  if init_checkpoint:
    from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
    native.check_architecture(init_checkpoint, model_cfg, "init_checkpoint")
    load = lambda targets: native.restore_params(init_checkpoint, targets)
  return TrainTask(
      name=name,
      build_model=lambda rngs: Decoder(model_cfg, rngs=rngs),
      loss=lm_loss(z_loss),
      trainable=path_filter(trainable),
      load_weights=load,
      weights_source=init_checkpoint,
      flops_per_token=lambda seq_len: train_flops_per_token(model_cfg,
                                                            seq_len),
      perplexity=True)


def perplexity(loss: float) -> float:
  return math.exp(min(loss, 50.0))
