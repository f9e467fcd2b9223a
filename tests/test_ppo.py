"""PPO's unit truths: GAE equals a float64 loop, the KL controller follows
its formula with beta changed between compiled calls, the first minibatch
of an iteration has ratio exactly 1 for left- and right-padded rollouts,
rewards land on the last response token; and launch.ppo runs, resumes and
refuses bad settings."""

import json
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.rl import ppo
from mllm_jax.rl.config import PPOConfig
from tests.helpers import tiny_config

CFG = tiny_config("tiny", vocab_size=64, max_seq_len=64)


def gae_reference(rewards, values, mask, gamma, lam):
  rewards, values, mask = (np.asarray(x, np.float64)
                           for x in (rewards, values, mask))
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    last = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        last = 0.0
        continue
      nxt = values[b, t + 1] if t + 1 < rewards.shape[1] and mask[b, t + 1] \
          else 0.0
      delta = rewards[b, t] + gamma * nxt - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, (adv + values) * mask


def test_scan_gae_equals_a_float64_loop():
  rng = np.random.default_rng(0)
  b, t = 3, 12
  mask = np.zeros((b, t), np.float32)
  mask[0, 3:12] = 1  # response to the end
  mask[1, 5:8] = 1  # right padding after
  mask[2, 0:1] = 1  # one token
  rewards = rng.normal(size=(b, t)).astype(np.float32) * mask
  values = rng.normal(size=(b, t)).astype(np.float32)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
    adv, ret = jax.jit(ppo.gae, static_argnums=(3, 4))(
        rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, atol=1e-5)


def test_kl_controller_follows_its_formula_between_compiled_calls():
  control = ppo.AdaptiveKL(0.1, target=6.0, horizon=100)
  shaped = jax.jit(ppo.shaped_rewards)
  mask = jnp.ones((2, 4))
  logp, ref = jnp.full((2, 4), -1.0), jnp.full((2, 4), -2.0)
  beta, seen = 0.1, []
  for kl in (12.0, 3.0, 6.6, 0.0):
    rewards, _ = shaped(jnp.zeros(2), logp, ref, mask,
                        jnp.float32(control.beta))
    seen.append(float(-rewards[0, 0]))  # beta * KL_t with KL_t = 1
    new = control.update(kl, n=10)
    beta *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 10 / 100
    assert new == pytest.approx(beta, rel=1e-12)
  # KL 12 -> +20% (clipped) over 10/100 of the horizon, 3 -> -20%, 6.6 ->
  # +10%: each compiled call saw the beta of its iteration.
  np.testing.assert_allclose(seen, [0.1, 0.1 * 1.02, 0.1 * 1.02 * 0.98,
                                    0.1 * 1.02 * 0.98 * 1.01], rtol=1e-6)
  assert shaped._cache_size() == 1  # beta never recompiled
  fixed = ppo.AdaptiveKL(0.3, target=0.0, horizon=100)
  assert fixed.update(50.0, 10) == 0.3


def test_score_lands_on_the_last_response_token():
  mask = jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], jnp.float32)
  rewards, kl = ppo.shaped_rewards(jnp.asarray([2.0, -1.0]),
                                   jnp.zeros((2, 5)), jnp.zeros((2, 5)), mask,
                                   jnp.float32(0.5))
  np.testing.assert_array_equal(np.asarray(rewards),
                                [[0, 0, 0, 2, 0], [0, 0, -1, 0, 0]])


def _model(peft=PeftConfig(), value="shared", seed=0):
  model = ppo.build_model(CFG, peft, value, nnx.Rngs(seed))
  if model.reference is not None:  # the reference starts as the policy
    nnx.update(model.reference, nnx.state(model.policy))
  return model


@pytest.mark.parametrize("peft,value", [
    (PeftConfig(), "shared"),
    (PeftConfig(method="lora", rank=4, targets=("q", "v")), "separate")])
def test_first_minibatch_ratio_is_one_for_left_and_right_padding(peft,
                                                                 value):
  cfg = PPOConfig(minibatches=1, prompts_per_iteration=4)
  model = _model(peft, value)
  prompts = [[1, 5, 9], [1, 7, 7, 7, 7, 7, 7], [1], [1, 2, 3, 4]]
  responses = [[11, 12, 13, 2], [21], [31, 32, 33, 34, 35], [41, 42]]
  rows = ppo.rollout_rows(prompts, responses, 8, 6, pad_id=2)
  graphdef, params, frozen = nnx.split(model, ppo.trainable_filter(peft), ...)
  out = jax.jit(lambda p, f, r: ppo.forward(nnx.merge(graphdef, p, f), r,
                                            reference=True))(
      params, frozen, {k: jnp.asarray(v) for k, v in rows.items()})
  # The policy starts as its reference: KL 0 at every token.
  np.testing.assert_array_equal(np.asarray(out["logp"] * rows["loss_weights"]),
                                np.asarray(out["ref_logp"]
                                           * rows["loss_weights"]))
  # Left padding changes nothing: each row equals its unpadded self.
  for i, (p, r) in enumerate(zip(prompts, responses)):
    alone = ppo.rollout_rows([p], [r], len(p), len(r), pad_id=2)
    single = ppo.forward(model, {k: jnp.asarray(v) for k, v in alone.items()})
    n = len(r)
    np.testing.assert_allclose(
        np.asarray(out["logp"][i, 8 - 1:8 - 1 + n]),
        np.asarray(single["logp"][0, -n:]), atol=2e-5)
  batch = {**{k: jnp.asarray(v) for k, v in rows.items()},
           "old_logp": out["logp"], "old_values": out["values"],
           "advantages": jnp.asarray(np.random.default_rng(0).normal(
               size=rows["loss_weights"].shape), jnp.float32),
           "returns": out["values"] + 1.0}

  def loss(p):
    return ppo.ppo_loss(cfg)(nnx.merge(graphdef, p, frozen), batch)
  (_, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert float(sums["approx_kl"]) == 0.0
  assert float(sums["clip_fraction"]) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_ptx_adds_the_gradient_of_the_pretraining_loss():
  """PPO-ptx: the loss with ptx_coef = c has the gradient of the loss
  without it plus c * (response tokens) * the gradient of the mean
  language-model loss on the ptx rows, computed here from the logits."""
  model = _model()
  prompts, responses = [[1, 5, 9], [1, 7]], [[11, 12, 2], [21, 22, 23]]
  rows = ppo.rollout_rows(prompts, responses, 3, 3, pad_id=2)
  graphdef, params, frozen = nnx.split(model, ppo.trainable_filter(
      PeftConfig()), ...)
  out = ppo.forward(model, {k: jnp.asarray(v) for k, v in rows.items()})
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, CFG.vocab_size, size=(2, 9))
  ptx = {"ptx_inputs": tokens[:, :-1], "ptx_targets": tokens[:, 1:],
         "ptx_loss_weights": np.ones((2, 8), np.float32),
         "ptx_segment_ids": np.ones((2, 8), np.int32),
         "ptx_positions": np.tile(np.arange(8), (2, 1))}
  batch = {**{k: jnp.asarray(v) for k, v in {**rows, **ptx}.items()},
           "old_logp": out["logp"], "old_values": out["values"],
           "advantages": jnp.ones_like(out["logp"]),
           "returns": out["values"] + 1.0}

  def grads(coef):
    loss = ppo.ppo_loss(PPOConfig(ptx_coef=coef))
    return jax.grad(lambda p: loss(nnx.merge(graphdef, p, frozen),
                                   batch)[0])(params)

  def lm_loss(p):
    policy = nnx.merge(graphdef, p, frozen).policy
    logits = policy(batch["ptx_inputs"], batch["ptx_positions"],
                    batch["ptx_segment_ids"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(
        logp, batch["ptx_targets"][..., None], -1))

  n = float(rows["loss_weights"].sum())
  want = jax.tree.map(lambda a, b: a + 0.5 * n * b, grads(0.0),
                      jax.grad(lm_loss)(params))
  got = grads(0.5)
  assert float(optax.tree.norm(jax.grad(lm_loss)(params))) > 0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5,
                               rtol=1e-4)


def test_head_on_the_response_only_gives_the_same_update():
  """model.loss_positions < 1: log-probabilities, entropies and the
  reference's are computed at the response positions only (gathered); on
  the response they equal the full head's, and so do the loss and every
  gradient (the PPO loss reads them under the response mask only)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  prompts = [[1, 5, 9, 4, 4, 4, 4], [1, 7], [1, 3, 3, 3]]
  responses = [[11, 12, 2], [21, 22, 23, 24], [31]]
  rows = {k: jnp.asarray(v) for k, v in ppo.rollout_rows(
      prompts, responses, 12, 4, pad_id=2).items()}
  mask = np.asarray(rows["loss_weights"])
  grads, outs = [], []
  for share in (1.0, 0.25):
    cfg = dataclasses.replace(CFG, loss_positions=share)
    model = ppo.build_model(cfg, PeftConfig(), "separate", nnx.Rngs(0))
    nnx.update(model.reference, nnx.state(model.policy))
    out = jax.jit(lambda m, r: ppo.forward(m, r, reference=True))(model,
                                                                  rows)
    outs.append(out)
    graphdef, params, frozen = nnx.split(model, ppo.trainable_filter(
        PeftConfig()), ...)
    batch = {**rows, "old_logp": outs[0]["logp"],
             "old_values": outs[0]["values"],
             "advantages": jnp.asarray(np.random.default_rng(0).normal(
                 size=mask.shape), jnp.float32),
             "returns": outs[0]["values"] + 1.0}
    grads.append(jax.jit(jax.grad(lambda p: ppo.ppo_loss(PPOConfig(
        entropy_coef=0.01))(nnx.merge(graphdef, p, frozen), batch)[0]))(
            params))
  for name in ("logp", "entropy", "ref_logp"):
    np.testing.assert_allclose(np.asarray(outs[1][name]) * mask,
                               np.asarray(outs[0][name]) * mask, atol=1e-5)
    assert not np.any(np.asarray(outs[1][name])[mask == 0])  # 0 off it
  for g, w in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5,
                               rtol=1e-4)


def test_rollout_rows_count_positions_from_the_first_real_token():
  rows = ppo.rollout_rows([[1, 2, 3]], [[4, 5]], 6, 4, pad_id=0)
  np.testing.assert_array_equal(rows["inputs"][0], [0, 0, 0, 1, 2, 3, 4, 5, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 0, 0, 0, 1, 2, 3, 4,
                                                       4])
  np.testing.assert_array_equal(rows["loss_weights"][0],
                                [0, 0, 0, 0, 0, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="rollout 0"):
    ppo.rollout_rows([[1] * 7], [[4]], 6, 4, pad_id=0)


def test_ppo_config_refuses_bad_settings():
  from mllm_jax.configlib import ConfigError
  with pytest.raises(ConfigError, match="ppo.minibatches"):
    PPOConfig(prompts_per_iteration=6, minibatches=4).validate()
  with pytest.raises(ConfigError, match="ppo.value"):
    PPOConfig(value="twin").validate()
  with pytest.raises(ConfigError, match="ppo.temperature"):
    PPOConfig(temperature=0.0).validate()
  assert "ppo.max_kl" in ppo.kl_explodes(float("nan"), PPOConfig())
  assert ppo.kl_explodes(1.0, PPOConfig()) is None
