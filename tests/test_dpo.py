"""DPO: the loss on a hand-computed case, K-wise batches against their pairs,
response log-probabilities against the model's logits, the three reference
modes agreeing, and launch.dpo from an SFT-style checkpoint: killed and
resumed bitwise, held-out margins before and after, bad config by name."""

import dataclasses
import json
import math
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from launch import demo_alignment

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.data.config import ComparisonDataConfig
from mllm_jax.modeling import Decoder
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.rl import dpo
from tests.helpers import tiny_config
from tests.test_pretrain import finish, train_losses, wait_for_step
from tests.test_stages import base  # noqa: F401  (the fixture)
from tests.test_stages import REPO

RUN = ["--config=configs/dpo.py:tiny", "--config.seq_len=128",
       "--config.train.batch_size=8", "--config.train.steps=8",
       "--config.train.log_every=1", "--config.train.checkpoint_every=4",
       "--config.train.eval_every=4", "--config.optimizer.warmup_steps=2",
       "--config.optimizer.warmup_ratio=0",
       "--config.optimizer.learning_rate=1e-3",
       "--config.data.limit_per_source=40", "--config.data.eval_comparisons=16",
       "--config.data.sources=('arc_easy','gsm8k','bfcl_simple')"]


def test_implicit_reward_margin_on_a_hand_computed_case():
  # Chosen: policy -1, reference -2; rejected: policy -3, reference -2.
  policy, reference = jnp.array([[-1.0, -3.0]]), jnp.array([[-2.0, -2.0]])
  ranks, beta = jnp.array([[0, 1]]), 0.5
  # h = (-1 - -2) - (-3 - -2) = 2; implicit rewards beta * (pi - ref).
  loss, sums = dpo.pair_losses(policy, reference, ranks, beta)
  assert float(sums["weight"]) == 1
  assert float(sums["chosen_reward"]) == pytest.approx(0.5)
  assert float(sums["rejected_reward"]) == pytest.approx(-0.5)
  assert float(sums["reward_margin"]) == pytest.approx(1.0)
  assert float(sums["reward_accuracy"]) == 1
  assert float(sums["logp_margin"]) == pytest.approx(2.0)
  assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
  ipo, _ = dpo.pair_losses(policy, reference, ranks, beta, "ipo")
  assert float(ipo) == pytest.approx((2 - 1 / (2 * beta)) ** 2)
  cdpo, _ = dpo.pair_losses(policy, reference, ranks, beta, "cdpo", 0.1)
  assert float(cdpo) == pytest.approx(0.9 * math.log1p(math.exp(-1)) +
                                      0.1 * math.log1p(math.exp(1)), rel=1e-6)
  # The same responses ranked the other way round.
  loss, sums = dpo.pair_losses(policy, reference, jnp.array([[1, 0]]), beta)
  assert float(sums["reward_margin"]) == pytest.approx(-1.0)
  assert float(sums["reward_accuracy"]) == 0
  assert float(loss) == pytest.approx(math.log1p(math.exp(1.0)), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "cdpo"])
def test_kwise_batches_equal_their_pairs_one_by_one(loss_type):
  rng = np.random.default_rng(0)
  policy = jnp.asarray(rng.normal(size=(2, 3)) - 5, jnp.float32)
  reference = jnp.asarray(rng.normal(size=(2, 3)) - 5, jnp.float32)
  ranks = jnp.array([[2, 0, 1], [1, 0, -1]])  # the second: a pair + absent
  eps = 0.2 if loss_type == "cdpo" else 0.0
  loss, sums = dpo.pair_losses(policy, reference, ranks, 0.3, loss_type, eps)
  total, count = 0.0, 0
  for g in range(2):
    order = [int(i) for i in np.argsort(np.asarray(ranks[g]))
             if ranks[g, i] >= 0]
    for a in range(len(order)):
      for b in range(a + 1, len(order)):
        i, j = order[a], order[b]
        one, s = dpo.pair_losses(policy[g:g + 1, [i, j]],
                                 reference[g:g + 1, [i, j]],
                                 jnp.array([[0, 1]]), 0.3, loss_type, eps)
        total, count = total + float(one), count + 1
  assert count == 4 and float(sums["weight"]) == 4
  assert float(loss) == pytest.approx(total, rel=1e-6)


def test_response_logps_equal_the_models_log_softmax():
  cfg = tiny_config("tiny", vocab_size=256, max_seq_len=32, num_layers=2)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, size=(4, 33)).astype(np.int32)
  weights = (rng.random((4, 32)) < 0.5).astype(np.float32)
  segments = np.ones((4, 32), np.int32)
  segments[1, 20:] = 0  # right padding
  weights[1, 20:] = 0
  positions = np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32))
  args = tuple(map(jnp.asarray, (tokens[:, :-1], tokens[:, 1:], weights,
                                 segments, positions)))
  logps = nnx.jit(dpo.sequence_logps)
  got = logps(model, *args)
  logits = np.asarray(model(jnp.asarray(tokens[:, :-1]), jnp.asarray(positions),
                            jnp.asarray(segments)), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  want = (np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
          * weights).sum(-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
  # Chunked logits: the same values and gradients.
  chunked = Decoder(dataclasses.replace(cfg, loss_chunk_len=8),
                    rngs=nnx.Rngs(1))

  grad_of = nnx.jit(nnx.grad(lambda m: dpo.sequence_logps(m, *args).sum()))
  np.testing.assert_allclose(np.asarray(logps(chunked, *args)),
                             np.asarray(got), rtol=1e-6)
  g1, g2 = grad_of(model), grad_of(chunked)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
  # The head on the weighted positions only (model.loss_positions): the
  # same values and gradients when the longest row fits 8 of 32 slots (a
  # response after its prompt) and when it needs every position.
  gathered = Decoder(dataclasses.replace(cfg, loss_chunk_len=8,
                                         loss_positions=0.25),
                     rngs=nnx.Rngs(1))
  response = np.zeros_like(weights)
  response[:, 24:31] = 1.0
  for w in (response, weights):
    rows = args[:2] + (jnp.asarray(w),) + args[3:]
    value = nnx.jit(lambda m: dpo.sequence_logps(m, *rows))
    grad = nnx.jit(nnx.grad(lambda m: dpo.sequence_logps(m, *rows).sum()))
    np.testing.assert_allclose(np.asarray(value(gathered)),
                               np.asarray(value(model)), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad(gathered)),
                    jax.tree.leaves(grad(model))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-6)


def test_every_reference_mode_starts_at_log_2():
  """At the start the policy is the reference: h = 0 and the DPO loss is
  log 2 per pair, whether the reference is cached, a frozen copy, or the
  LoRA model with its adapters off."""
  from mllm_jax.modeling.peft import build_model  # pylint: disable=import-outside-toplevel
  cfg = tiny_config("tiny", vocab_size=256, max_seq_len=16, num_layers=2)
  rng = np.random.default_rng(0)
  g, k, t = 2, 3, 16
  batch = {"inputs": rng.integers(1, 256, (g, k, t)).astype(np.int32),
           "targets": rng.integers(1, 256, (g, k, t)).astype(np.int32),
           "loss_weights": np.ones((g, k, t), np.float32),
           "segment_ids": np.ones((g, k, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                        (g, k, t)).copy(),
           "ranks": np.array([[0, 1, 2], [1, 0, -1]], np.int32)}
  batch = {key: jnp.asarray(v) for key, v in batch.items()}
  config = dpo.DPOConfig(beta=0.1)
  pair = dpo.PolicyAndReference(cfg, nnx.Rngs(0))
  nnx.update(pair.reference, nnx.state(pair.policy))
  lora = build_model(cfg, PeftConfig(method="lora", rank=4), nnx.Rngs(0))
  cached = {**batch, "ref_logps": dpo.grouped_logps(pair.policy, batch)}
  loss_fn = nnx.jit(dpo.dpo_loss(config))
  for model, b in ((pair, batch), (lora, batch), (pair.policy, cached)):
    loss, sums = loss_fn(model, b)
    assert float(sums["weight"]) == 4
    assert float(loss) / 4 == pytest.approx(math.log(2), rel=1e-5)
  # Only the policy of the frozen-copy model trains.
  select = dpo._under_policy(lambda path, value: isinstance(value, nnx.Param))  # pylint: disable=protected-access
  names = {".".join(str(getattr(p, "key", p)) for p in path)
           for path, _ in nnx.to_flat_state(nnx.state(pair, select))}
  assert names and all(n.startswith("policy.") for n in names)


def test_bad_config_is_refused_by_name():
  for fields, name in [({"loss": "klingon"}, "dpo.loss"),
                       ({"beta": 0.0}, "dpo.beta"),
                       ({"label_smoothing": 0.1}, "dpo.label_smoothing"),
                       ({"loss": "cdpo"}, "dpo.label_smoothing"),
                       ({"reference": "none"}, "dpo.reference")]:
    with pytest.raises(ConfigError, match=name):
      from_config(dpo.DPOConfig, fields, "dpo")
  for fields, name in [({"max_responses": 1}, "data.max_responses"),
                       ({"eval_fraction": 1.0}, "data.eval_fraction"),
                       ({"sources": ()}, "data.sources"),
                       ({"typo": 1}, "data.typo")]:
    with pytest.raises(ConfigError, match=name):
      from_config(ComparisonDataConfig, fields, "data")
  with pytest.raises(ConfigError, match="init_checkpoint"):
    dpo.dpo_task(tiny_config("tiny"), PeftConfig(), dpo.DPOConfig(),
                 init_checkpoint="")


def start(workdir, base_dir, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.dpo", f"--workdir={workdir}", *RUN,
       f"--config.init_checkpoint={base_dir}", *extra], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_dpo_run_resumes_bitwise_and_reports_heldout_margins(tmp_path, base):  # noqa: F811
  straight = tmp_path / "straight"
  out = finish(start(straight, base), timeout=600)
  assert "NOT human preferences" in out
  want = train_losses(straight)
  assert sorted(want) == list(range(1, 9))
  assert want[1] == pytest.approx(math.log(2), rel=1e-5)  # policy == ref
  summary = json.load(open(straight / "summary.json"))
  before, after = summary["before"]["all"], summary["after"]["all"]
  assert before["pairs"] == after["pairs"] > 0
  assert before["reward_margin"] == 0  # the reference against itself
  assert {"arc_easy", "gsm8k"} <= set(summary["after"])
  assert (straight / "model" / "tokenizer.model").exists()
  # The demo's section: the run's numbers, a row per source, the curves.
  report = "\n".join(demo_alignment.dpo_report(str(straight)))
  assert f"{after['logp_margin']:.3f}** nats" in report
  assert "| gsm8k | " in report and "not human preferences" in report
  assert (straight / "dpo.png").stat().st_size > 0

  run = tmp_path / "killed"
  proc = start(run, base)
  wait_for_step(proc, run, 7, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log = finish(start(run, base), timeout=600)
  assert "restored step" in log
  assert train_losses(run) == want
  assert json.load(open(run / "summary.json"))["after"] == summary["after"]

  # The reference on the fly (a frozen copy) gives the cached run's losses.
  fly = tmp_path / "on_the_fly"
  finish(start(fly, base, "--config.dpo.reference=on_the_fly",
               "--config.train.steps=2"), timeout=600)
  got = train_losses(fly)
  for step in (1, 2):
    assert got[step] == pytest.approx(want[step], rel=1e-4)

