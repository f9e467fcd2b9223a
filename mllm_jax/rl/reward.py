"""Reward models trained on ranked responses, as a `TrainTask`.

The model is the SFT decoder without its LM head (the head's weights stay
in the trunk, frozen and unused, so the trunk remains a loadable native
checkpoint) plus a scalar head read at the last real token of each
sequence. "Last real" comes from `segment_ids` (0 on padding), never from
searching for a pad id: SmolLM2's pad id equals its EOS, which ends every
response. An end-of-context token is appended to each response before
scoring (Anthropic's preference models read their score there), so the
score position is the same kind of token for every response.

Loss (InstructGPT): for each prompt with K ranked responses, all
K(K-1)/2 pairs (better, worse) in the same batch, each response encoded
once: -log sigmoid(r_better - r_worse - margin), averaged over pairs.
Batches are grouped: `inputs`, `targets`, `loss_weights`, `segment_ids`,
`positions` are [G, K, T] and `ranks` [G, K] (0 = best, -1 = an absent
row), so the trainer's batch axis is the comparison and gradient
accumulation and data sharding never split a prompt's responses.

After training the bias is shifted so that the reference (best-ranked)
responses score 0 on average (InstructGPT's normalisation), which makes a
PPO reward of 0 mean "as good as the references".
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.layers import param
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.parallel.sharding import on_mesh_of
from mllm_jax.train.optimizer import path_name

HEAD_FILE = "reward_head.npz"
INFO_FILE = "reward.json"
GROUPED_FIELDS = ("inputs", "targets", "loss_weights", "segment_ids",
                  "positions")
REWARD_BATCH = {"inputs": jnp.int32, "targets": jnp.int32,
                "loss_weights": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "ranks": jnp.int32}


class RewardModel(nnx.Module):
  """A decoder trunk (plain, or with LoRA adapters) and a scalar head."""

  def __init__(self, trunk: nnx.Module, rngs: nnx.Rngs):
    cfg = trunk.cfg
    self.trunk = trunk
    self.head = param(rngs, (cfg.embed_dim,), ("embed",), jnp.float32,
                      cfg.embed_dim ** -0.5)
    self.bias = nnx.Param(jnp.zeros((), jnp.float32))

  @property
  def cfg(self) -> ModelConfig:
    return self.trunk.cfg

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
    """Rows [B, T] -> float32 rewards [B], read at each row's last real
    token (any padding side). A row with no real token scores the bias."""
    x, _ = self.trunk.hidden_states(tokens, positions, segment_ids)
    last = last_real_index(segment_ids)
    h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return (jnp.einsum("bd,d->b", h.astype(jnp.float32), self.head[...])
            + self.bias[...])


def last_real_index(segment_ids: jax.Array) -> jax.Array:
  """Index of each row's last non-padding position ([B, T] -> [B])."""
  t = segment_ids.shape[-1]
  slots = jnp.arange(t, dtype=jnp.int32)
  return jnp.max(jnp.where(segment_ids > 0, slots, 0), axis=-1)


def ranked_pairs(ranks: jax.Array) -> jax.Array:
  """[G, K] ranks -> [G, K, K] bool, True where response i is ranked
  strictly better than response j (equal ranks are no pair; -1 absent)."""
  valid = ranks >= 0
  return ((ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None]
          & valid[:, None, :])


def pairwise_loss(rewards: jax.Array, ranks: jax.Array, margin: float = 0.0
                  ) -> dict[str, jax.Array]:
  """Sums over every ranked pair of each group: the loss
  -log sigmoid(r_i - r_j - margin), the pair count ("weight"), correctly
  ordered pairs and the reward difference."""
  pairs = ranked_pairs(ranks).astype(jnp.float32)
  diff = rewards[:, :, None] - rewards[:, None, :]
  loss = -jax.nn.log_sigmoid(diff - margin)
  return {"loss": jnp.sum(loss * pairs), "weight": jnp.sum(pairs),
          "accuracy": jnp.sum((diff > 0) * pairs),
          "reward_margin": jnp.sum(diff * pairs)}


def group_rewards(model: RewardModel, batch: Mapping[str, jax.Array]
                  ) -> jax.Array:
  """Rewards [G, K] of a grouped batch (see the module docstring)."""
  g, k, t = batch["inputs"].shape
  flat = lambda name: batch[name].reshape(g * k, t)
  return model(flat("inputs"), flat("positions"), flat("segment_ids")
               ).reshape(g, k)


def reward_loss(margin: float = 0.0, peft: PeftConfig | None = None,
                seed: int = 0):
  """The trainer's loss: pairwise ranking loss over grouped batches (with
  LoRA dropout when the trunk's LoRA asks for it)."""
  from mllm_jax.modeling import peft as peft_lib  # pylint: disable=g-import-not-at-top

  def loss(model, batch):
    def run():
      sums = pairwise_loss(group_rewards(model, batch), batch["ranks"],
                           margin)
      return sums["loss"], sums
    if peft is not None and peft.method == "lora" and peft.dropout:
      with peft_lib.lora_dropout(peft_lib.batch_key(
          {"inputs": batch["inputs"].reshape(-1, batch["inputs"].shape[-1])},
          seed)):
        return run()
    return run()
  return loss


def trainable_filter(peft: PeftConfig, patterns: tuple[str, ...] = ()):
  """What trains: the head and bias, plus every trunk parameter but the
  (unused) LM head, or with LoRA only the adapters; `patterns` (regular
  expressions over dotted paths, train.trainable) narrow the trunk's part."""
  from mllm_jax.modeling.peft import AdapterParam  # pylint: disable=g-import-not-at-top
  from mllm_jax.train.task import path_filter  # pylint: disable=g-import-not-at-top
  chosen = path_filter(patterns)

  def select(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    name = path_name(path)
    if name in ("head", "bias"):
      return True
    if name.startswith("trunk.lm_head"):
      return False
    if peft.method != "none":
      return isinstance(value, AdapterParam) or (
          bool(patterns) and chosen(path, value))
    return chosen(path, value)
  return select


def reward_task(model_cfg: ModelConfig, peft: PeftConfig, *,
                init_checkpoint: str = "", with_head: bool = False,
                margin: float = 0.0, trainable: tuple[str, ...] = (),
                seed: int = 0, name: str = "reward"):
  """A TrainTask: trunk weights from `init_checkpoint` (a native LM
  checkpoint, e.g. the SFT model) and, with `with_head`, the head too (it
  is then a reward model this module saved: preference-model pretraining,
  then fine-tuning), restored into their shardings."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native
  from mllm_jax.modeling import peft as peft_lib
  from mllm_jax.train.metrics import train_flops_per_token
  from mllm_jax.train.task import TrainTask
  # pylint: enable=g-import-not-at-top
  check(peft.method in ("none", "lora"), "peft.method",
        f"a reward model trains its whole trunk or LoRA adapters on it, "
        f"not {peft.method!r}")
  if with_head and not os.path.exists(os.path.join(init_checkpoint,
                                                   HEAD_FILE)):
    raise ConfigError(f"init_checkpoint: {init_checkpoint} has no "
                      f"{HEAD_FILE} (not a reward model saved by "
                      f"launch.reward)")
  if init_checkpoint:
    native.check_architecture(init_checkpoint, model_cfg, "init_checkpoint")

  def load(targets):
    loaded = {"trunk": native.restore_params(
        init_checkpoint, peft_lib.without_adapters(targets["trunk"]))}
    if with_head:
      head = read_head(init_checkpoint)
      loaded.update(
          head=jax.device_put(head["head"], targets["head"].sharding),
          bias=jax.device_put(head["bias"], targets["bias"].sharding))
    return loaded

  return TrainTask(
      name=name,
      build_model=lambda rngs: RewardModel(
          peft_lib.build_model(model_cfg, peft, rngs), rngs),
      loss=reward_loss(margin, peft, seed),
      trainable=trainable_filter(peft, trainable),
      load_weights=load if init_checkpoint else None,
      weights_source=init_checkpoint,
      batch_fields=dict(REWARD_BATCH),
      flops_per_token=lambda seq_len: train_flops_per_token(model_cfg,
                                                            seq_len))


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


class GroupedBatches:
  """Wraps a comparison iterator whose batches hold G*K rows ([G*K, T])
  and `ranks` [G, K]: yields the rows as [G, K, T], so that the batch axis
  is the comparison. get_state / set_state pass through."""

  def __init__(self, iterator):
    self.iterator = iterator

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return group_batch(next(self.iterator))

  def get_state(self) -> dict[str, Any]:
    return self.iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.iterator.set_state(state)


def group_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  g, k = batch["ranks"].shape
  out = dict(batch)
  for name in GROUPED_FIELDS:
    x = np.asarray(batch[name])
    if x.shape[0] == g * k:
      out[name] = x.reshape(g, k, *x.shape[1:])
    elif x.shape[:2] != (g, k):
      raise ValueError(f"comparison batch field {name!r} has shape "
                       f"{x.shape}; expected [{g * k}, T] or [{g}, {k}, T]")
  return out


# ----------------------------------------------------------------------------
# Scoring, normalisation, saving
# ----------------------------------------------------------------------------


@nnx.jit
def _score(model: RewardModel, tokens, positions, segment_ids):
  return model(tokens, positions, segment_ids)


def score_rows(model: RewardModel, tokens: np.ndarray,
               segment_ids: np.ndarray,
               positions: np.ndarray | None = None) -> np.ndarray:
  """Rewards of rows [B, T] (any padding side; positions default to the
  count of real tokens before each slot, so left padding is harmless)."""
  tokens = np.asarray(tokens, np.int32)
  segment_ids = np.asarray(segment_ids, np.int32)
  if positions is None:
    positions = np.maximum(np.cumsum(segment_ids > 0, axis=1) - 1, 0)
  with on_mesh_of(model) as put:
    return np.asarray(_score(model, put(tokens),
                             put(np.asarray(positions, np.int32)),
                             put(segment_ids)))


def batch_metrics(model: RewardModel, batches) -> dict[str, Any]:
  """Pair accuracy, mean loss and reward margin over grouped batches (host
  sums), plus the mean reward of the best-ranked responses."""
  totals: dict[str, float] = {}
  best, best_n = 0.0, 0
  for batch in batches:
    batch = group_batch(batch)
    g, k, t = batch["inputs"].shape
    rewards = score_rows(model, batch["inputs"].reshape(g * k, t),
                         batch["segment_ids"].reshape(g * k, t),
                         batch["positions"].reshape(g * k, t)).reshape(g, k)
    sums = jax.device_get(pairwise_loss(jnp.asarray(rewards),
                                        jnp.asarray(batch["ranks"])))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
    top = np.asarray(batch["ranks"]) == 0
    best += float(rewards[top].sum())
    best_n += int(top.sum())
  pairs = totals.pop("weight", 0.0)
  out = {key: value / pairs for key, value in totals.items()} if pairs else {}
  out.update(pairs=int(pairs), best_reward=best / best_n if best_n else None)
  return out


def normalise(model: RewardModel, reference_mean: float) -> None:
  """Shifts the bias so that responses scoring `reference_mean` score 0."""
  model.bias[...] = model.bias[...] - jnp.float32(reference_mean)


def read_head(path: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(path, HEAD_FILE)) as f:
    return {"head": np.asarray(f["head"], np.float32),
            "bias": np.asarray(f["bias"], np.float32)}


def read_info(path: str) -> dict[str, Any]:
  file = os.path.join(path, INFO_FILE)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path} is not a reward model (no {INFO_FILE})")
  with open(file) as f:
    return json.load(f)


def save_reward_model(path: str, model: RewardModel, tokenizer_dir: str,
                      info: Mapping[str, Any]) -> None:
  """The trunk as a native checkpoint with its tokenizer (LoRA merged in),
  the head in reward_head.npz, and `info` (end-of-context id, chat format,
  normalisation) in reward.json."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.modeling import peft as peft_lib
  from mllm_jax.train.finetune import save_with_tokenizer
  # pylint: enable=g-import-not-at-top
  trunk = model.trunk
  if peft_lib.peft_config(trunk).method == "lora":
    trunk = peft_lib.merge_lora(trunk)
  save_with_tokenizer(path, trunk.cfg, trunk, tokenizer_dir)
  if jax.process_index() == 0:
    np.savez(os.path.join(path, HEAD_FILE),
             head=np.asarray(jax.device_get(model.head[...]), np.float32),
             bias=np.asarray(jax.device_get(model.bias[...]), np.float32))
    with open(os.path.join(path, INFO_FILE), "w") as f:
      json.dump(dict(info), f, indent=2)


def load_reward_model(path: str, mesh=None, rules=None, **overrides
                      ) -> tuple[RewardModel, dict[str, Any]]:
  """(model, info) of what `save_reward_model` wrote."""
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  info = read_info(path)
  _, trunk = native.load_model(path, mesh=mesh, rules=rules, **overrides)
  model = RewardModel(trunk, nnx.Rngs(0))
  head = read_head(path)
  model.head[...] = jnp.asarray(head["head"])
  model.bias[...] = jnp.asarray(head["bias"])
  return model, info
