"""PPO with a KL penalty to the SFT policy and pretraining-gradient mixing.

The pieces `launch.ppo`'s rollout/learn loop puts together:

  PolicyAndValue  the policy (a decoder, plain or with LoRA), a value head
                  on the policy's trunk or a separate critic (by config),
                  and the reference: a frozen copy of the starting weights,
                  or, for a LoRA policy, the same base with its adapters
                  switched off (no copy). The reference and the policy's
                  frozen parts are the trainer's frozen parameters: no
                  gradient, no optimizer state, never donated.
  rollout_rows    sampler output -> one row per sample: the prompt left-
                  padded, the response right-padded, positions counting
                  real tokens only (so a left-padded row computes exactly
                  what the unpadded one would).
  forward         per-token log-probabilities, entropies and values from
                  the training forward pass (the sampler's own
                  log-probabilities are only compared with them, a metric).
  shaped_rewards  -beta * (log pi - log pi_ref) at every response token and
                  the reward model's score at the last one; beta is an
                  array argument, so the adaptive controller changes it
                  between compiled calls without recompiling.
  gae             generalised advantage estimation by a reverse scan.
  ppo_loss        clipped policy loss, clipped value loss, entropy bonus and
                  (PPO-ptx) the language-model loss on pretraining batches.

All per-token arrays are in target coordinates: entry t is about token
t + 1 of the row (predicted from tokens 0..t).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.layers import param
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.rl.config import PPOConfig
from mllm_jax.train.losses import (head_cross_entropy, head_plan,
                                   on_weighted_positions, put_rows)
from mllm_jax.train.optimizer import path_name

ROLLOUT_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32,
                  "segment_ids": jnp.int32, "positions": jnp.int32,
                  "loss_weights": jnp.float32, "old_logp": jnp.float32,
                  "old_values": jnp.float32, "advantages": jnp.float32,
                  "returns": jnp.float32}
PTX_FIELDS = {"ptx_" + k: v for k, v in (
    ("inputs", jnp.int32), ("targets", jnp.int32),
    ("loss_weights", jnp.float32), ("segment_ids", jnp.int32),
    ("positions", jnp.int32))}


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


class ValueHead(nnx.Module):
  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.head = param(rngs, (dim,), ("embed",), jnp.float32, dim ** -0.5)
    self.bias = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (jnp.einsum("btd,d->bt", x.astype(jnp.float32), self.head[...])
            + self.bias[...])


class PolicyAndValue(nnx.Module):
  """See the module docstring. `reference` is None for a LoRA policy."""

  def __init__(self, policy: nnx.Module, reference: nnx.Module | None,
               critic: nnx.Module | None, rngs: nnx.Rngs):
    self.policy = policy
    self.reference = reference
    self.critic = critic
    self.value_head = ValueHead(policy.cfg.embed_dim, rngs)

  @property
  def cfg(self) -> ModelConfig:
    return self.policy.cfg


def build_model(model_cfg: ModelConfig, peft: PeftConfig, value: str,
                rngs: nnx.Rngs) -> PolicyAndValue:
  from mllm_jax.modeling import Decoder, peft as peft_lib  # pylint: disable=g-import-not-at-top
  policy = peft_lib.build_model(model_cfg, peft, rngs)
  reference = (Decoder(model_cfg, rngs=rngs) if peft.method == "none"
               else None)
  critic = Decoder(model_cfg, rngs=rngs) if value == "separate" else None
  return PolicyAndValue(policy, reference, critic, rngs)


def trainable_filter(peft: PeftConfig):
  """The policy (or its adapters), the value head and a separate critic's
  trunk train; the reference and the critic's unused LM head do not."""
  from mllm_jax.modeling.peft import AdapterParam  # pylint: disable=g-import-not-at-top

  def select(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    name = path_name(path)
    if name.startswith("reference.") or name.startswith("critic.lm_head"):
      return False
    if name.startswith("policy.") and peft.method != "none":
      return isinstance(value, AdapterParam)
    return True
  return select


def _log_probs(x: jax.Array, head: jax.Array, targets: jax.Array,
               weights: jax.Array, share: float
               ) -> tuple[jax.Array, jax.Array]:
  """Log-probabilities of `targets` and entropies, [B, T] float32, at the
  positions of nonzero weight (the response) and 0 elsewhere; with `share`
  (model.loss_positions) < 1 the head runs on those positions only
  (gathered: losses.head_plan)."""
  def at(x, targets, weights, _):
    logits = jnp.einsum("btd,dv->btv", x, head,
                        preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    response = weights != 0
    return chosen * response, entropy * response

  def scatter(out, index, length):
    return tuple(put_rows(o, index, length) for o in out)
  return on_weighted_positions(at, x, targets, weights,
                               head_plan(x.shape[1], share), scatter)


def forward(model: PolicyAndValue, batch: Mapping[str, jax.Array],
            reference: bool = False) -> dict[str, jax.Array]:
  """Per-token `logp`, `entropy` and `values` of the policy (and `ref_logp`
  with reference=True) on rollout rows; `logp`, `entropy` and `ref_logp`
  are 0 off the response."""
  from mllm_jax.modeling.peft import adapters_disabled  # pylint: disable=g-import-not-at-top
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  head = lambda x, decoder: _log_probs(
      x, decoder.head_weight(), batch["targets"],
      batch["loss_weights"].astype(jnp.float32), decoder.cfg.loss_positions)
  x, _ = model.policy.hidden_states(*args)
  logp, entropy = head(x, model.policy)
  if model.critic is None:
    values = model.value_head(x)
  else:
    values = model.value_head(model.critic.hidden_states(*args)[0])
  out = {"logp": logp, "entropy": entropy, "values": values}
  if reference:
    if model.reference is not None:
      ref = model.reference
      xr, _ = ref.hidden_states(*args)
      out["ref_logp"] = head(xr, ref)[0]
    else:
      with adapters_disabled(model.policy) as base:
        xr, _ = base.hidden_states(*args)
        out["ref_logp"] = head(xr, base)[0]
    out["ref_logp"] = jax.lax.stop_gradient(out["ref_logp"])
  return out


# ----------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------


def rollout_rows(prompts: Sequence[Sequence[int]],
                 responses: Sequence[Sequence[int]], prompt_width: int,
                 response_width: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows [B, prompt_width + response_width] in target coordinates:
  inputs/targets (shifted by one), segment_ids (1 on real input tokens),
  positions (real tokens counted from 0, so left padding changes nothing)
  and loss_weights (1 where the target is a response token)."""
  b, width = len(prompts), prompt_width + response_width
  tokens = np.full((b, width), pad_id, np.int32)
  real = np.zeros((b, width), bool)
  response = np.zeros((b, width), bool)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    if not p or len(p) > prompt_width or len(r) > response_width:
      raise ValueError(f"rollout {i}: prompt of {len(p)} tokens / response "
                       f"of {len(r)} do not fit {prompt_width} + "
                       f"{response_width}")
    tokens[i, prompt_width - len(p):prompt_width] = p
    tokens[i, prompt_width:prompt_width + len(r)] = r
    real[i, prompt_width - len(p):prompt_width + len(r)] = True
    response[i, prompt_width:prompt_width + len(r)] = True
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": real[:, :-1].astype(np.int32),
          "positions": positions[:, :-1],
          "loss_weights": response[:, 1:].astype(np.float32)}


def shaped_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array,
                   mask: jax.Array, beta: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(per-token rewards, per-token KL): -beta * KL_t on every response
  token, plus the score on the last one. KL_t = log pi - log pi_ref (the
  sampled-token estimator, whose mean over samples is the KL)."""
  kl = (logp - ref_logp) * mask
  t = mask.shape[1]
  last = jnp.max(jnp.where(mask > 0, jnp.arange(t), -1), axis=1)
  at_last = (jnp.arange(t)[None] == last[:, None]) & (last[:, None] >= 0)
  return -beta * kl + at_last * scores[:, None], kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array,
        gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) over the masked (response) tokens of each row by
  a reverse scan; the value after a row's last response token is 0."""
  rewards, values, mask = (jnp.swapaxes(x.astype(jnp.float32), 0, 1)
                           for x in (rewards, values, mask))

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = (delta + gamma * lam * next_adv) * m
    return (v * m, adv), adv

  zeros = jnp.zeros(rewards.shape[1], jnp.float32)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards, values, mask),
                        reverse=True)
  adv = jnp.swapaxes(adv, 0, 1)
  mask = jnp.swapaxes(mask, 0, 1)
  return adv, (adv + jnp.swapaxes(values, 0, 1)) * mask


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / n
  var = (((x - mean) * mask) ** 2).sum() / n
  return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


class AdaptiveKL:
  """Ziegler et al.'s controller: beta *= 1 + clip(KL/target - 1, +-0.2) *
  n / horizon after each iteration of n rollouts; fixed when target is 0."""

  def __init__(self, beta: float, target: float, horizon: int):
    self.beta, self.target, self.horizon = float(beta), target, horizon

  def update(self, kl: float, n: int) -> float:
    if self.target > 0:
      error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
      self.beta *= 1.0 + error * n / self.horizon
    return self.beta


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------


def ppo_loss(cfg: PPOConfig):
  """The trainer's loss over a minibatch of processed rollouts (plus
  `ptx_*` pretraining rows when cfg.ptx_coef > 0). Normalised by the
  response tokens; the ptx term is its own token mean times ptx_coef."""
  def loss(model, batch):
    out = forward(model, batch)
    mask = batch["loss_weights"]
    n = jnp.sum(mask)
    log_ratio = (out["logp"] - batch["old_logp"]) * mask
    ratio = jnp.exp(log_ratio)
    adv = batch["advantages"]
    pg = jnp.maximum(-adv * ratio,
                     -adv * jnp.clip(ratio, 1 - cfg.clip, 1 + cfg.clip))
    old_v = batch["old_values"]
    v = out["values"]
    v_clipped = old_v + jnp.clip(v - old_v, -cfg.value_clip, cfg.value_clip)
    vf = 0.5 * jnp.maximum((v - batch["returns"]) ** 2,
                           (v_clipped - batch["returns"]) ** 2)
    per_token = pg + cfg.value_coef * vf - cfg.entropy_coef * out["entropy"]
    sums = {
        "weight": n,
        "policy_loss": jnp.sum(pg * mask),
        "value_loss": jnp.sum(vf * mask),
        "entropy": jnp.sum(out["entropy"] * mask),
        "clip_fraction": jnp.sum((jnp.abs(ratio - 1) > cfg.clip) * mask),
        # k3 = (r - 1) - log r >= 0, Schulman's low-variance estimator.
        "approx_kl": jnp.sum(((ratio - 1) - log_ratio) * mask),
    }
    total = jnp.sum(per_token * mask)
    if cfg.ptx_coef > 0:
      x, _ = model.policy.hidden_states(batch["ptx_inputs"],
                                        batch["ptx_positions"],
                                        batch["ptx_segment_ids"])
      w = batch["ptx_loss_weights"]
      # The first output carries the gradient (the second is a metric).
      ce, _ = head_cross_entropy(x, model.policy.head_weight(),
                                 batch["ptx_targets"], w, 0.0,
                                 model.policy.cfg.loss_chunk_len,
                                 model.policy.cfg.loss_positions)
      ptx_mean = ce / jnp.maximum(jnp.sum(w), 1.0)
      sums["ptx_loss"] = ptx_mean * n
      total = total + cfg.ptx_coef * ptx_mean * n
    sums["loss"] = total
    return total, sums
  return loss


def ppo_task(model_cfg: ModelConfig, peft: PeftConfig, cfg: PPOConfig, *,
             init_checkpoint: str, reward_model: str = "",
             name: str = "ppo"):
  """The TrainTask whose step `launch.ppo` runs on each minibatch. Weights:
  policy (and reference) from the SFT checkpoint `init_checkpoint`; a
  separate critic from the reward model's trunk and its head as the value
  head (InstructGPT), else from the SFT checkpoint with a fresh head."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native
  from mllm_jax.modeling import peft as peft_lib
  from mllm_jax.rl import reward as reward_lib
  from mllm_jax.train.metrics import train_flops_per_token
  from mllm_jax.train.task import TrainTask
  # pylint: enable=g-import-not-at-top
  cfg.validate()
  check(peft.method in ("none", "lora"), "peft.method",
        f"a PPO policy trains fully or through LoRA, not {peft.method!r}")
  check(not (peft.method == "lora" and peft.dropout), "peft.dropout",
        "LoRA dropout makes the policy stochastic, so the PPO ratio of the "
        "first minibatch would not be 1; set it to 0")
  check(bool(init_checkpoint), "init_checkpoint", "PPO starts from an SFT "
        "checkpoint; give its directory")
  native.check_architecture(init_checkpoint, model_cfg, "init_checkpoint")
  critic_source = reward_model if (cfg.value == "separate" and
                                   reward_model) else init_checkpoint
  if critic_source != init_checkpoint:
    native.check_architecture(critic_source, model_cfg, "reward_model")

  def load(targets):
    plain = lambda tree: peft_lib.without_adapters(tree)
    loaded = {"policy": native.restore_params(init_checkpoint,
                                              plain(targets["policy"]))}
    if "reference" in targets:
      loaded["reference"] = native.restore_params(init_checkpoint,
                                                  targets["reference"])
    if "critic" in targets:
      loaded["critic"] = native.restore_params(critic_source,
                                               targets["critic"])
      if critic_source == reward_model:
        head = reward_lib.read_head(reward_model)
        vh = targets["value_head"]
        loaded["value_head"] = {
            "head": jax.device_put(head["head"], vh["head"].sharding),
            "bias": jax.device_put(head["bias"], vh["bias"].sharding)}
    return loaded

  return TrainTask(
      name=name,
      build_model=lambda rngs: build_model(model_cfg, peft, cfg.value, rngs),
      loss=ppo_loss(cfg),
      trainable=trainable_filter(peft),
      load_weights=load,
      weights_source=init_checkpoint,
      batch_fields={**ROLLOUT_FIELDS,
                    **(PTX_FIELDS if cfg.ptx_coef > 0 else {})},
      flops_per_token=lambda seq_len: train_flops_per_token(model_cfg,
                                                            seq_len))


def check_same_tokenizer(policy_tok, reward_tok, policy_dir: str,
                         reward_dir: str) -> None:
  """Refuses a reward model whose tokenizer differs from the policy's: its
  scores would be of other token ids."""
  probe = ("The quick brown fox: 12 + 30 = 42. ¿Qué? 日本語 <|im_end|>\n"
           "def f(x):\n    return x")
  same = (policy_tok.vocab_size == reward_tok.vocab_size and
          list(policy_tok.encode(probe)) == list(reward_tok.encode(probe)) and
          policy_tok.eos_id == reward_tok.eos_id)
  if not same:
    raise ConfigError(
        f"reward_model: {reward_dir}'s tokenizer (vocab "
        f"{reward_tok.vocab_size}) differs from the policy's at {policy_dir} "
        f"(vocab {policy_tok.vocab_size}); train the reward model from the "
        f"same SFT checkpoint family")


def kl_explodes(mean_kl: float, cfg: PPOConfig) -> str | None:
  """A message naming the setting when the policy has run away from the
  reference (or the KL is not a number), else None."""
  if not np.isfinite(mean_kl) or mean_kl > cfg.max_kl:
    return (f"mean KL to the reference per response is {mean_kl:.3g} nats, "
            f"above ppo.max_kl={cfg.max_kl}: the policy ran away from the SFT "
            f"model (raise ppo.kl_coef, set ppo.kl_target, or lower the "
            f"learning rate)")
  return None



__all__ = ["PPOConfig", "PolicyAndValue", "AdaptiveKL", "build_model",
           "forward", "gae", "kl_explodes", "ppo_loss", "ppo_task",
           "rollout_rows", "shaped_rewards", "whiten"]
