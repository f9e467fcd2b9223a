"""The training step and loop: accumulation, NaN guard, checkpoints, resume."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.modeling import Decoder
from mllm_jax.parallel.mesh import ParallelConfig, make_mesh
from mllm_jax.parallel.sharding import create_sharded, param_shardings
from mllm_jax.train.checkpoint import Checkpointer, abstract_like
from mllm_jax.train.optimizer import (OptimizerConfig, learning_rate_schedule,
                                      make_optimizer)
from mllm_jax.train.step import init_train_state, make_train_step
from mllm_jax.train.trainer import TrainConfig, train
from tests.helpers import tiny_config

CFG = tiny_config("tiny", num_heads=8, num_kv_heads=4)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2)


class CountingIterator:
  """Deterministic packed batches keyed by position (a stand-in pipeline)."""

  def __init__(self, batch_size=8, seq_len=16, seed=0):
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.position = 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    tokens = rng.integers(1, CFG.vocab_size, (self.batch_size,
                                              self.seq_len + 1))
    split = rng.integers(2, self.seq_len - 2)
    positions = np.arange(self.seq_len)
    positions = np.where(positions < split, positions, positions - split)
    segments = np.where(np.arange(self.seq_len) < split, 1, 2)
    weights = np.ones(self.seq_len, np.float32)
    weights[split - 1] = 0  # no target across the document boundary
    tile = lambda x: np.tile(x, (self.batch_size, 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": tile(positions).astype(np.int32),
            "segment_ids": tile(segments).astype(np.int32),
            "loss_weights": tile(weights)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def one_step(params, graphdef, batch, accum):
  optimizer = make_optimizer(OPT, params, 10)
  step = jax.jit(make_train_step(graphdef, optimizer,
                                 learning_rate_schedule(OPT, 10), accum))
  return step(init_train_state(params, optimizer), batch)


def test_gradient_accumulation_equals_one_large_batch():
  graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
  batch = next(CountingIterator(batch_size=16))
  batch["loss_weights"][3, 5:] = 0  # uneven weights across micro-batches
  big, big_metrics = one_step(params, graphdef, batch, 1)
  acc, acc_metrics = one_step(params, graphdef, batch, 4)
  np.testing.assert_allclose(acc_metrics["loss"], big_metrics["loss"],
                             rtol=1e-6)
  np.testing.assert_allclose(acc_metrics["grad_norm"],
                             big_metrics["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc["params"]),
                  jax.tree.leaves(big["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nan_step_is_skipped_and_counted():
  graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
  batch = next(CountingIterator())
  batch["loss_weights"][0, 0] = np.nan
  state, metrics = one_step(params, graphdef, batch, 1)
  assert int(metrics["skipped"]) == 1 and int(state["bad_steps"]) == 1
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_training_stops_after_too_many_bad_steps(tmp_path):
  class NaNIterator(CountingIterator):
    def __next__(self):
      batch = super().__next__()
      batch["loss_weights"][:] = np.nan
      return batch

  with pytest.raises(FloatingPointError, match="train.max_bad_steps=3"):
    train(CFG, ParallelConfig(), OPT,
          TrainConfig(steps=10, batch_size=8, max_bad_steps=3, log_every=1,
                      checkpoint_every=0), 0, str(tmp_path), NaNIterator())


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(parallel)
  params = nnx.state(create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(3)),
                                    mesh, parallel.rules))
  optimizer = make_optimizer(OPT, params, 10)
  state = init_train_state(params, optimizer)
  saver = Checkpointer(str(tmp_path), every=1, keep=1)
  saver.save(7, state, {"position": 7})
  saver.close()
  for target in (ParallelConfig(data=1, fsdp=4, tensor=1),
                 ParallelConfig(data=1)):
    devices = jax.devices()[:4 if target.fsdp == 4 else 1]
    target_mesh = make_mesh(target, devices)
    shardings = param_shardings(jax.eval_shape(lambda: state), target_mesh,
                                target.rules)
    restorer = Checkpointer(str(tmp_path), every=1, keep=1)
    restored, data_state = restorer.restore(
        restorer.latest_step(), abstract_like(state, shardings))
    restorer.close()
    assert data_state == {"position": 7}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      assert got.sharding.mesh.devices.size == len(devices)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class Crash(Exception):
  pass


class CrashingIterator(CountingIterator):
  """Dies when asked for batch `crash_at` (a stand-in for a killed host)."""

  def __init__(self, crash_at=None):
    super().__init__()
    self.crash_at = crash_at

  def __next__(self):
    if self.position == self.crash_at:
      raise Crash()
    return super().__next__()


def test_loop_resumes_exactly(tmp_path):
  """A run that dies after step 5 and is restarted matches a straight run."""
  def run(workdir, crash_at=None):
    cfg = TrainConfig(steps=7, batch_size=8, log_every=1, checkpoint_every=3,
                      eval_every=0, async_checkpoint=False)
    try:
      train(CFG, ParallelConfig(data=2, fsdp=2, tensor=2), OPT, cfg, 0,
            str(workdir), CrashingIterator(crash_at))
    except Crash:
      pass
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]

  straight = run(tmp_path / "a")
  crashed = run(tmp_path / "b", crash_at=5)
  assert [r["step"] for r in crashed] == [1, 2, 3, 4, 5]
  resumed = run(tmp_path / "b")  # restores step 3, drops logged steps 4-5
  assert [r["step"] for r in resumed] == list(range(1, 8))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
