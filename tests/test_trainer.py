"""The training step and loop: accumulation, NaN guard, checkpoints, resume."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mllm_jax.modeling import Decoder
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import create_sharded, param_shardings
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.compile import with_shardings
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.optimizer import (decay_mask, learning_rate_schedule,
                                      make_optimizer, path_name)
from mllm_jax.train.step import init_train_state
from mllm_jax.train.task import language_model_task
from mllm_jax.train.trainer import train
from tests.helpers import NOTHING_FROZEN, lm_train_step, tiny_config

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
  step = jax.jit(lm_train_step(graphdef, optimizer,
                               learning_rate_schedule(OPT, 10), accum))
  return step(init_train_state(params, optimizer), NOTHING_FROZEN, batch)


def test_default_no_decay_finds_norms_and_embeddings_inside_any_model():
  """The decoder's table is embed.table alone, decoder.embed.table in the
  multimodal model, policy.embed.table in PPO's: none is decayed."""
  params = {name: {"table": 0.0} for name in ("embed", "patch_embed")}
  params.update(decoder={"embed": {"table": 0.0},
                         "blocks": {"attn_norm": {"scale": 0.0},
                                    "q": {"kernel": 0.0}}},
                policy={"embed": {"table": 0.0}})
  mask = decay_mask(params, OptimizerConfig().no_decay)
  assert not mask["embed"]["table"] and not mask["policy"]["embed"]["table"]
  assert not mask["decoder"]["embed"]["table"]
  assert not mask["decoder"]["blocks"]["attn_norm"]["scale"]
  assert mask["decoder"]["blocks"]["q"]["kernel"]
  assert mask["patch_embed"]["table"]  # a name that merely ends in embed


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
    train(language_model_task(CFG), ParallelConfig(), OPT,
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
        restorer.latest_step(), with_shardings(state, shardings))
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
      train(language_model_task(CFG), ParallelConfig(data=2, fsdp=2,
                                                     tensor=2),
            OPT, cfg, 0, str(workdir), CrashingIterator(crash_at))
    except Crash:
      pass
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]

  straight = run(tmp_path / "a")
  crashed = run(tmp_path / "b", crash_at=5)
  assert [r["step"] for r in crashed] == [1, 2, 3, 4, 5]
  resumed = run(tmp_path / "b")  # restores step 3, drops logged steps 4-5
  assert [r["step"] for r in resumed] == list(range(1, 8))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


# ---------------------------------------------------------------------------
# Stages as values: frozen parameters, starting weights, no host round-trips
# ---------------------------------------------------------------------------

FROZEN_OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2,
                             weight_decay=0.5, no_decay=())
# Train only the attention projections: norms, embeddings, MLP and the head
# stay frozen (decay on everything, so a frozen leaf that drifted would show).
ATTENTION_ONLY = (r"^blocks\.attn\.",)


def _leaves(tree):
  return {path_name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_parameters_stay_bit_identical_and_resume(tmp_path):
  task = language_model_task(CFG, trainable=ATTENTION_ONLY)
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2)
  cfg = TrainConfig(steps=6, batch_size=8, log_every=1, checkpoint_every=3,
                    eval_every=0, async_checkpoint=False)
  before = _leaves(nnx.state(Decoder(CFG, rngs=nnx.Rngs(0))))

  def run(workdir, crash_at=None):
    try:
      return train(task, parallel, FROZEN_OPT, cfg, 0, str(workdir),
                   CrashingIterator(crash_at))[1]
    except Crash:
      return None

  model = run(tmp_path / "a")
  after = _leaves(nnx.state(model))
  trained = {k for k in before if k.startswith("blocks.attn.")}
  assert trained and trained == {k for k in before
                                 if not np.array_equal(before[k], after[k])}

  # The checkpoint holds only what trains (and its optimizer state).
  with ocp.StandardCheckpointer() as reader:
    meta = reader.metadata(str(tmp_path / "a" / "checkpoints" / "6" /
                               "state"))
  meta = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
  saved = set(meta)
  assert any(k.startswith("params.blocks.attn.q") for k in saved)
  assert not any(("embed" in k or "mlp" in k or "norm" in k
                  or "lm_head" in k) for k in saved), sorted(saved)
  adam_leaves = [k for k in saved if k.startswith("opt_state")
                 and k.endswith("attn.q")]
  assert len(adam_leaves) == 2  # mu and nu, for trainable leaves only

  # Killed after step 4, restarted: the frozen part comes back from its
  # source (the seed here) and the run ends bit-identical.
  assert run(tmp_path / "b", crash_at=4) is None
  resumed = _leaves(nnx.state(run(tmp_path / "b")))
  for k in after:
    np.testing.assert_array_equal(resumed[k], after[k], err_msg=k)


def test_a_filter_that_selects_nothing_is_refused(tmp_path):
  from mllm_jax.configlib import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="train.trainable"):
    train(language_model_task(CFG, trainable=("no_such_param",)),
          ParallelConfig(), OPT, TrainConfig(steps=1, batch_size=8), 0,
          str(tmp_path), CountingIterator())


def test_steps_between_logs_read_nothing_from_the_device(tmp_path,
                                                        monkeypatch):
  """Dispatch never waits on a step: every device-to-host read (an array's
  host value, or a host copy started) happens on a logging or checkpoint
  step, none on the steps between. Reads are counted by the batch the loop
  has drawn when they happen."""
  from jax._src import array  # pylint: disable=g-import-not-at-top
  data = CountingIterator()
  reads = []
  value = array.ArrayImpl._value
  copy = array.ArrayImpl.copy_to_host_async
  monkeypatch.setattr(array.ArrayImpl, "_value", property(
      lambda self: reads.append(data.position) or value.fget(self)))
  monkeypatch.setattr(array.ArrayImpl, "copy_to_host_async",
                      lambda self: reads.append(data.position) or copy(self))
  cfg = TrainConfig(steps=8, batch_size=8, log_every=4, checkpoint_every=4,
                    eval_every=0, async_checkpoint=False)
  last, _ = train(language_model_task(CFG), ParallelConfig(), OPT, cfg, 0,
                  str(tmp_path), data)
  assert np.isfinite(last["loss"])
  assert {4, 8} <= set(reads)  # the counter sees the loop's real reads
  assert set(reads) <= {0, 4, 8}, sorted(set(reads))  # 0: set-up


def test_init_checkpoint_restores_straight_into_shards(tmp_path):
  """Starting weights land on an 8-device mesh already sharded: each device
  holds only its slice of every sharded parameter, and the values are the
  saved ones."""
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  from mllm_jax.train.compile import (build_program,  # pylint: disable=g-import-not-at-top
                                      initial_state)
  saved = Decoder(CFG, rngs=nnx.Rngs(7))
  native.save_model(str(tmp_path / "base"), CFG, saved)
  parallel = ParallelConfig(data=1, fsdp=8)
  mesh = make_mesh(parallel)
  task = language_model_task(CFG, init_checkpoint=str(tmp_path / "base"))
  program = build_program(task, parallel, OPT, TrainConfig(steps=2), mesh,
                          seed=0)
  state, frozen = initial_state(program, seed=0)
  loaded = state["params"]
  want = _leaves(nnx.state(saved))
  targets = param_shardings(loaded, mesh, parallel.rules)
  sharded = 0
  for (path, got), target in zip(
      jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(targets)):
    name = path_name(path)
    assert got.sharding.is_equivalent_to(target, got.ndim), name
    if not got.is_fully_replicated:
      sharded += 1
      assert all(shard.data.size < got.size
                 for shard in got.addressable_shards), name
    np.testing.assert_array_equal(np.asarray(got), want[name], err_msg=name)
  # Every parameter but the norm scales (replicated by the rules) is split.
  assert sharded == len([k for k in want if "norm" not in k]) > 0
  assert not jax.tree.leaves(frozen)


def test_init_checkpoint_of_another_architecture_is_refused(tmp_path):
  from mllm_jax.configlib import ConfigError  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  other = tiny_config("tiny", num_heads=8, num_kv_heads=4, mlp_dim=96)
  native.save_model(str(tmp_path / "base"), other,
                    Decoder(other, rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match="init_checkpoint.*mlp_dim: 96"):
    language_model_task(CFG, init_checkpoint=str(tmp_path / "base"))


def test_cpu_kernel_checkpoint_runs_with_the_portable_backends(tmp_path):
  """Run choices are not saved: weights trained with the fused CPU kernels
  and custom backward passes load with the XLA paths (what a GPU or TPU run
  gets) and give the same logits."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  kernels = dataclasses.replace(CFG, attention_backend="cpu_fused",
                                custom_vjp=True, remat="full", scan_unroll=2)
  fused_opt = dataclasses.replace(OPT, backend="cpu_fused")
  _, model = train(language_model_task(kernels), ParallelConfig(), fused_opt,
                   TrainConfig(steps=3, batch_size=8, eval_every=0), 0,
                   str(tmp_path / "run"), CountingIterator())
  native.save_model(str(tmp_path / "model"), kernels, model)
  with open(tmp_path / "model" / native.CONFIG_FILE) as f:
    recorded = json.load(f)
  assert not {"attention_backend", "custom_vjp", "remat",
              "scan_unroll"} & set(recorded)
  cfg, portable = native.load_model(str(tmp_path / "model"))
  assert (cfg.attention_backend, cfg.custom_vjp, cfg.remat) == (
      "xla", False, "none")
  batch = next(CountingIterator())
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  want = jax.jit(lambda m, *a: m(*a))(model, *args)
  got = jax.jit(lambda m, *a: m(*a))(portable, *args)
  assert float(np.abs(np.asarray(got) - np.asarray(want)).max()) <= 1e-5
