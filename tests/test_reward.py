"""Reward model: the score is read at the last real token whatever the
padding (and when pad equals EOS), K-wise batches equal their pairs one by
one, the trainer trains it with only the intended parameters, and a saved
model loads back with the same scores."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.modeling import Decoder
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.rl import reward
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.trainer import train
from tests.helpers import replace, tiny_config

CFG = tiny_config("tiny", vocab_size=64, max_seq_len=32)


def reward_model(seed=0, peft=None):
  from mllm_jax.modeling import peft as peft_lib
  rngs = nnx.Rngs(seed)
  return reward.RewardModel(
      peft_lib.build_model(CFG, peft or PeftConfig(), rngs), rngs)


def test_reward_is_read_at_the_last_real_token_on_either_padding_side():
  model = reward_model()
  eos = pad = 2  # pad equals eos, as in SmolLM2
  seq = [1, 17, 5, 9, 33, eos]  # the response ends with eos: it counts
  n, t = len(seq), 12
  alone = reward.score_rows(model, np.array([seq]), np.ones((1, n)))[0]
  right = np.full((1, t), pad)
  right[0, :n] = seq
  left = np.full((1, t), pad)
  left[0, t - n:] = seq
  scores = reward.score_rows(
      model, np.concatenate([right, left]),
      np.concatenate([(np.arange(t) < n)[None], (np.arange(t) >= t - n)[None]]
                     ).astype(np.int32))
  np.testing.assert_allclose(scores, [alone, alone], atol=2e-6)
  # Not the score at the first pad (what searching for the pad id finds).
  cut = reward.score_rows(model, np.array([seq[:-1]]), np.ones((1, n - 1)))[0]
  assert abs(cut - alone) > 1e-4


def test_kwise_loss_equals_its_pairs_one_by_one():
  rng = np.random.default_rng(0)
  rewards = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  ranks = jnp.asarray([[2, 0, 3, 1], [1, 0, -1, -1]], jnp.int32)
  sums = reward.pairwise_loss(rewards, ranks, margin=0.5)
  total, pairs, correct = 0.0, 0, 0
  for g in range(2):
    for i, j in itertools.permutations(range(4), 2):
      ri, rj = int(ranks[g, i]), int(ranks[g, j])
      if ri >= 0 and rj >= 0 and ri < rj:
        d = float(rewards[g, i] - rewards[g, j])
        total += -np.log(1 / (1 + np.exp(-(d - 0.5))))
        pairs += 1
        correct += d > 0
  assert pairs == 6 + 1
  np.testing.assert_allclose(float(sums["loss"]), total, rtol=1e-6)
  assert float(sums["weight"]) == pairs
  assert float(sums["accuracy"]) == correct


def _separable_batches(n_batches, g=8, k=3, t=16, seed=0):
  """Responses whose quality is how many 7s they hold: rank by count."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(n_batches):
    inputs = np.zeros((g * k, t), np.int32)
    seg = np.zeros((g * k, t), np.int32)
    ranks = np.zeros((g, k), np.int32)
    for row in range(g * k):
      n = int(rng.integers(6, t))
      seq = rng.integers(10, 60, n)
      sevens = (k - 1 - row % k) * 2
      seq[rng.choice(np.arange(1, n), sevens, replace=False)] = 7
      inputs[row, :n] = seq
      seg[row, :n] = 1
    ranks[:] = np.arange(k)[None]
    batches.append({
        "inputs": inputs, "targets": np.roll(inputs, -1, 1),
        "loss_weights": seg.astype(np.float32), "segment_ids": seg,
        "positions": np.where(seg > 0, np.arange(t)[None], 0).astype(np.int32),
        "ranks": ranks})
  return batches


class _Repeat:
  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    b = self.batches[self.i % len(self.batches)]
    self.i += 1
    return reward.group_batch(b)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_trainer_learns_a_ranking_and_freezes_the_lm_head(tmp_path):
  cfg = replace(CFG, tie_embeddings=False)
  task = reward.reward_task(cfg, PeftConfig())
  train_batches = _separable_batches(8)
  held_out = _separable_batches(2, seed=1)
  before = reward.batch_metrics(
      nnx.merge(*nnx.split(task.build_model(nnx.Rngs(0)))), held_out)
  last, model = train(
      task, ParallelConfig(data=-1),
      OptimizerConfig(learning_rate=3e-3, warmup_steps=2, weight_decay=0.0,
                      end_learning_rate_ratio=1.0),
      TrainConfig(steps=30, batch_size=8, log_every=10, eval_every=0,
                  checkpoint_every=30),
      0, str(tmp_path), _Repeat(train_batches))
  after = reward.batch_metrics(model, held_out)
  assert after["accuracy"] > 0.9 > before["accuracy"]
  assert np.isfinite(last["loss"]) and "accuracy" in last
  fresh = task.build_model(nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.trunk.lm_head[...]),
                                np.asarray(fresh.trunk.lm_head[...]))


def test_saved_reward_model_scores_the_same_and_normalises(tmp_path):
  model = reward_model(seed=3)
  tokens = np.array([[1, 5, 6, 7, 2, 2], [1, 9, 9, 2, 2, 2]])
  seg = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
  want = reward.score_rows(model, tokens, seg)
  reward.normalise(model, float(want.mean()))
  want = reward.score_rows(model, tokens, seg)
  np.testing.assert_allclose(want.mean(), 0.0, atol=1e-5)
  path = tmp_path / "rm"
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  reward.save_reward_model(str(path), model, str(tok_dir),
                           {"end_of_context_id": 2})
  loaded, info = reward.load_reward_model(str(path))
  assert info["end_of_context_id"] == 2
  np.testing.assert_allclose(reward.score_rows(loaded, tokens, seg), want,
                             atol=1e-6)


def test_reward_task_refuses_bad_settings(tmp_path):
  with pytest.raises(ConfigError, match="peft.method"):
    reward.reward_task(CFG, PeftConfig(method="prompt", num_virtual_tokens=4))
  with pytest.raises(ConfigError, match="init_checkpoint.*reward_head"):
    reward.reward_task(CFG, PeftConfig(), init_checkpoint=str(tmp_path),
                       with_head=True)
