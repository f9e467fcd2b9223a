"""Direct preference optimisation (DPO) as a `TrainTask` for the one trainer.

For a prompt x with responses ranked y_1 > ... > y_K, every ranked pair
(chosen c, rejected r) contributes, with h = [log pi(c|x) - log ref(c|x)] -
[log pi(r|x) - log ref(r|x)] (log-probabilities summed over the response's
tokens, its end-of-turn included):

  sigmoid  -log sigmoid(beta h)                                 (DPO)
  cdpo     -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
           (conservative DPO: each label wrong with probability eps)
  ipo      (h - 1 / (2 beta))^2                                 (IPO)

K > 2 uses all K (K - 1) / 2 ranked pairs of a prompt (each response
encoded once). beta (log pi - log ref) is a response's implicit reward; the
metrics are the chosen and rejected implicit rewards, their margin
(beta h), reward accuracy (h > 0) and the policy's own log-probability
margin log pi(c) - log pi(r), all averaged over pairs.

The reference is the SFT model, frozen:
  cached      its log-probabilities computed once before training and
              attached to every batch as `ref_logps` [G, K] (no reference
              forward pass per step);
  on_the_fly  full fine-tuning: a frozen copy of the SFT weights held as
              frozen parameters of the task's model (`PolicyAndReference`:
              no gradient, no optimizer state, not checkpointed, restored
              from the SFT checkpoint on resume); a PEFT policy: the same
              model with its adapters switched off (`adapters_disabled`),
              so nothing is copied.

Batches are the grouped comparison batches of mllm_jax.data.comparisons:
inputs etc. [G, K, T], ranks [G, K] (-1: absent row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.modeling import Decoder
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.parallel.sharding import on_mesh_of
from mllm_jax.rl.config import DPOConfig, LOSSES, REFERENCES
from mllm_jax.rl.reward import GroupedBatches, group_batch, ranked_pairs
from mllm_jax.train.losses import (head_plan, on_weighted_positions,
                                   token_cross_entropy)

DPO_BATCH = {"inputs": jnp.int32, "targets": jnp.int32,
             "loss_weights": jnp.float32, "segment_ids": jnp.int32,
             "positions": jnp.int32, "ranks": jnp.int32}


# ----------------------------------------------------------------------------
# Log-probabilities and the loss
# ----------------------------------------------------------------------------


def sequence_logps(model, inputs, targets, loss_weights, segment_ids,
                   positions) -> jax.Array:
  """Sum over each row's weighted tokens of log p(target): rows [B, T] ->
  float32 [B]. The logits exist `model.cfg.loss_chunk_len` positions at a
  time (0: all), recomputed in the backward pass chunk by chunk; with
  `model.loss_positions` < 1 only on each row's weighted positions
  (losses.head_plan: the prompt's positions skip the head)."""
  x, _ = model.hidden_states(inputs, positions, segment_ids)
  w = model.head_weight()

  def row_logps(x, targets, weights, chunks):
    def chunk_logps(xc, tc):
      logits = jnp.einsum("btd,dv->btv", xc, w,
                          preferred_element_type=jnp.float32)
      return -token_cross_entropy(logits, tc)
    b, t, d = x.shape
    if chunks == 1:
      logps = chunk_logps(x, targets)
    else:
      c = t // chunks
      xs = x.reshape(b, chunks, c, d).swapaxes(0, 1)
      ts = targets.reshape(b, chunks, c).swapaxes(0, 1)
      logps = jax.lax.map(jax.checkpoint(lambda a: chunk_logps(*a)), (xs, ts))
      logps = logps.swapaxes(0, 1).reshape(b, t)
    return jnp.sum(logps * weights, axis=-1)

  plan = head_plan(x.shape[1], model.cfg.loss_positions,
                   model.cfg.loss_chunk_len)
  return on_weighted_positions(row_logps, x, targets,
                               loss_weights.astype(jnp.float32), plan,
                               lambda sums, *_: sums)


def grouped_logps(model, batch: Mapping[str, jax.Array]) -> jax.Array:
  """[G, K] response log-probabilities of a grouped batch."""
  g, k, t = batch["inputs"].shape
  flat = [batch[name].reshape(g * k, t) for name in (
      "inputs", "targets", "loss_weights", "segment_ids", "positions")]
  return sequence_logps(model, *flat).reshape(g, k)


def pair_losses(policy: jax.Array, reference: jax.Array, ranks: jax.Array,
                beta: float, loss: str = "sigmoid",
                label_smoothing: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss sum, sums) over every ranked pair of each group; policy and
  reference are [G, K] log-probabilities, ranks [G, K]. sums["weight"] is
  the pair count; the others are sums over pairs (the trainer divides)."""
  pairs = ranked_pairs(ranks).astype(jnp.float32)  # [G, i chosen, j rejected]
  ratio = (policy - reference).astype(jnp.float32)
  h = ratio[:, :, None] - ratio[:, None, :]
  if loss == "ipo":
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    per_pair = -jax.nn.log_sigmoid(beta * h)
    if loss == "cdpo":
      per_pair = ((1.0 - label_smoothing) * per_pair -
                  label_smoothing * jax.nn.log_sigmoid(-beta * h))
  total = lambda x: jnp.sum(x * pairs)
  reward = beta * ratio
  pol = policy.astype(jnp.float32)
  loss_sum = total(per_pair)
  return loss_sum, {
      "weight": jnp.sum(pairs), "loss": loss_sum,
      "chosen_reward": total(jnp.broadcast_to(reward[:, :, None], h.shape)),
      "rejected_reward": total(jnp.broadcast_to(reward[:, None, :],
                                                h.shape)),
      "reward_margin": total(beta * h),
      "reward_accuracy": total((h > 0).astype(jnp.float32)),
      "logp_margin": total(pol[:, :, None] - pol[:, None, :])}


def dpo_loss(cfg: DPOConfig, peft: PeftConfig | None = None, seed: int = 0):
  """The trainer's loss over grouped batches, for the config's reference."""
  from mllm_jax.modeling import peft as peft_lib  # pylint: disable=g-import-not-at-top
  dropout = peft is not None and peft.method == "lora" and peft.dropout > 0

  def policy_logps(model, batch):
    if not dropout:
      return grouped_logps(model, batch)
    flat = {"inputs": batch["inputs"].reshape(-1, batch["inputs"].shape[-1])}
    with peft_lib.lora_dropout(peft_lib.batch_key(flat, seed)):
      return grouped_logps(model, batch)

  def loss(model, batch):
    if isinstance(model, PolicyAndReference):
      policy = policy_logps(model.policy, batch)
      reference = grouped_logps(model.reference, batch)
    elif "ref_logps" in batch:
      policy, reference = policy_logps(model, batch), batch["ref_logps"]
    else:
      policy = policy_logps(model, batch)
      with peft_lib.adapters_disabled(model) as base:
        reference = grouped_logps(base, batch)
    return pair_losses(policy, jax.lax.stop_gradient(reference),
                       batch["ranks"], cfg.beta, cfg.loss,
                       cfg.label_smoothing)
  return loss


# ----------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------


class PolicyAndReference(nnx.Module):
  """The policy and a frozen copy of the SFT model (full fine-tuning with
  the reference on the fly): the task trains only `policy.*`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.policy = Decoder(cfg, rngs=rngs)
    self.reference = Decoder(cfg, rngs=rngs)

  @property
  def cfg(self) -> ModelConfig:
    return self.policy.cfg


def _under_policy(inner):
  """An NNX filter: `inner` applied to the path below `policy.`."""
  from mllm_jax.train.optimizer import path_name  # pylint: disable=g-import-not-at-top

  def select(path, value) -> bool:
    return bool(path) and path_name(path[:1]) == "policy" and inner(
        path[1:], value)
  return select


def policy_of(model: nnx.Module) -> nnx.Module:
  """The trained policy of what the trainer returns."""
  return model.policy if isinstance(model, PolicyAndReference) else model


def dpo_task(model_cfg: ModelConfig, peft: PeftConfig, cfg: DPOConfig, *,
             init_checkpoint: str, trainable: tuple[str, ...] = (),
             seed: int = 0, name: str = "dpo"):
  """A TrainTask: the policy starts from `init_checkpoint` (the SFT
  model, which is also the reference); PEFT methods as in `peft_task`."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native
  from mllm_jax.modeling.peft import peft_task
  from mllm_jax.train.metrics import train_flops_per_token
  from mllm_jax.train.task import path_filter
  # pylint: enable=g-import-not-at-top
  if not init_checkpoint:
    raise ConfigError("init_checkpoint: is empty; DPO starts from the SFT "
                      "model, which is also its frozen reference")
  base = peft_task(model_cfg, peft, trainable=trainable,
                   init_checkpoint=init_checkpoint, name=name, seed=seed)
  fields = dict(DPO_BATCH)
  flops = lambda seq_len: train_flops_per_token(model_cfg, seq_len)
  if cfg.reference == "cached":
    fields["ref_logps"] = jnp.float32
    return dataclasses.replace(
        base, loss=dpo_loss(cfg, peft, seed), batch_fields=fields,
        flops_per_token=flops, perplexity=False)
  # On the fly: the reference's forward pass is a third of a step's FLOPs.
  flops = lambda seq_len: train_flops_per_token(model_cfg, seq_len) * 4 / 3
  if peft.method != "none":
    return dataclasses.replace(
        base, loss=dpo_loss(cfg, peft, seed), batch_fields=fields,
        flops_per_token=flops, perplexity=False)

  def load(targets):
    return {part: native.restore_params(init_checkpoint, targets[part])
            for part in ("policy", "reference")}

  return dataclasses.replace(
      base, build_model=lambda rngs: PolicyAndReference(model_cfg, rngs),
      loss=dpo_loss(cfg, peft, seed),
      trainable=_under_policy(path_filter(trainable)), load_weights=load,
      batch_fields=fields, flops_per_token=flops, perplexity=False)


# ----------------------------------------------------------------------------
# Batches, cached reference log-probabilities, held-out evaluation
# ----------------------------------------------------------------------------


class DPOBatches(GroupedBatches):
  """Grouped comparison batches ([G, K, T]); a cached `ref_logps` [G*K]
  becomes [G, K] like the rows."""

  def __next__(self) -> dict[str, np.ndarray]:
    return group(next(self.iterator))


def group(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = group_batch(batch)
  if "ref_logps" in out:
    out["ref_logps"] = np.asarray(out["ref_logps"]).reshape(
        out["ranks"].shape)
  return out


_LOGPS = jax.jit(grouped_logps)


def comparison_logps(model, batches, counts: list[int]) -> list[np.ndarray]:
  """Per comparison, the log-probability of each of its responses under
  `model`, from unshuffled one-pass grouped batches of the comparisons in
  order (`counts`: responses per comparison)."""
  out: list[np.ndarray] = []
  with on_mesh_of(model) as put:
    for batch in batches:
      logps = np.asarray(_LOGPS(model, {k: put(v) for k, v in batch.items()
                                        if k in DPO_BATCH}))
      for row in logps:
        if len(out) < len(counts):
          out.append(row[:counts[len(out)]].astype(np.float64))
  if len(out) != len(counts):
    raise ValueError(f"{len(out)} comparisons scored of {len(counts)}")
  return out


def heldout_report(comparisons, policy: list[np.ndarray],
                   reference: list[np.ndarray], beta: float
                   ) -> dict[str, Any]:
  """Pair metrics of held-out comparisons, overall and per source family:
  the policy's log-probability margin log pi(c) - log pi(r), the chosen and
  rejected log-probabilities (which of them moves), the implicit reward
  margin and the reward accuracy (vs the reference)."""
  rows: dict[str, list[tuple[float, ...]]] = {"all": []}
  for c, pol, ref in zip(comparisons, policy, reference):
    family = c.source.split(":")[0]
    for better, worse in c.pairs():
      h = (pol[better] - ref[better]) - (pol[worse] - ref[worse])
      row = (pol[better] - pol[worse], pol[better], pol[worse], beta * h,
             float(h > 0), float(pol[better] > pol[worse]))
      rows["all"].append(row)
      rows.setdefault(family, []).append(row)
  names = ("logp_margin", "chosen_logp", "rejected_logp", "reward_margin",
           "reward_accuracy", "prefers_chosen")
  return {group: dict(pairs=len(r), **{n: float(np.mean([x[i] for x in r]))
                                       for i, n in enumerate(names)})
          for group, r in rows.items() if r}


__all__ = ["DPOBatches", "DPOConfig", "DPO_BATCH", "LOSSES",
           "PolicyAndReference", "REFERENCES", "comparison_logps",
           "dpo_loss", "dpo_task", "group", "grouped_logps", "heldout_report",
           "pair_losses", "policy_of", "sequence_logps"]
