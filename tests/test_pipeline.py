"""Pipeline parallelism on the `stage` axis: same loss and gradients as no
pipeline, the schedule's bubble, checkpoints across pipeline layouts, and a
pipelined launch.pretrain killed with SIGKILL resuming bitwise."""

from __future__ import annotations

import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.vision import projector_config, vision_config
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.convert import native
from mllm_jax.data import mm_batch
from mllm_jax.modeling.multimodal import MultimodalConfig
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.pipeline import Schedule, run
from mllm_jax.parallel.sharding import use_mesh
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.compile import build_program, check_layout, initial_state
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.multimodal_task import STAGE_TRAINABLE, multimodal_task
from mllm_jax.train.task import language_model_task
from tests.helpers import (checkpoint_steps, finish, rel_err, tiny_config,
                           train_losses, wait_for_checkpoint)
# The pretrain binary's small run and its prepared Shakespeare shards
# (`prepared` is a module-scoped fixture).
from tests.test_pretrain import prepared, start, workdir_with_data  # pylint: disable=unused-import

# 8 layers: 2 or 4 stages, with 1 or 2 repeats, all cut evenly.
CFG = tiny_config("tiny", num_layers=8, remat="full")
BATCH, SEQ = 16, 16
# Unclipped, so that AdamW's first moment holds the gradients (`gradients`).
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, clip_norm=0)
TRAIN = TrainConfig(steps=4, batch_size=BATCH)
BASELINE = dict(data=2, fsdp=2, tensor=2)
# (mesh and pipeline fields): 2 and 4 stages, 2, 4 and 8 micro-batches,
# both schedules, with fsdp and tensor beside them (GPIPE_2X2 runs the
# multimodal model, the decoder's other caller).
GPIPE_2X2 = dict(stage=2, fsdp=2, tensor=2, pipeline_microbatches=2)
PIPELINES = {
    "gpipe-4x8": dict(stage=4, fsdp=2, pipeline_microbatches=8),
    "circular-2x4x2": dict(stage=2, fsdp=2, tensor=2, pipeline_microbatches=4,
                           pipeline_schedule="circular", pipeline_repeats=2),
    "circular-4x4x2": dict(stage=4, tensor=2, pipeline_microbatches=4,
                           pipeline_schedule="circular", pipeline_repeats=2),
}


def parallel_config(fields) -> ParallelConfig:
  fields = {"data": 1, **fields}
  return from_config(ParallelConfig, fields, "parallel")


def batch():
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, CFG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  segments = np.ones((BATCH, SEQ), np.int32)
  segments[::3, SEQ // 2:] = 2  # packed rows: two sequences
  positions = np.where(segments == 2, np.arange(SEQ) - SEQ // 2,
                       np.arange(SEQ)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_weights": (rng.rand(BATCH, SEQ) > 0.2).astype(np.float32),
          "segment_ids": segments, "positions": positions}


@functools.lru_cache(maxsize=None)
def trained(name: str):
  """(program, parameters before, metrics and state after one training step)
  on the mesh and schedule PIPELINES names (or the baseline's)."""
  parallel = parallel_config(PIPELINES.get(name, BASELINE))
  check_layout(CFG, parallel, BATCH, 1, jax.device_count())
  mesh = make_mesh(parallel)
  program = build_program(language_model_task(CFG), parallel, OPTIMIZER,
                          TRAIN, mesh)
  state, frozen = initial_state(program, seed=0)
  before = jax.device_get(state["params"])
  with use_mesh(mesh, program.rules):
    state, metrics = program.step(state, frozen, jax.device_put(
        batch(), program.batch_sharding))
  return program, before, jax.device_get((metrics, state))


def gradients(state):
  """The step's gradients, read back from AdamW's first moment: after one
  unclipped step it holds (1 - b1) x gradient (and the second moment
  (1 - b2) x gradient squared)."""
  return jax.tree.map(lambda mu: mu / (1 - OPTIMIZER.b1),
                      jax.tree.leaves(state["opt_state"], is_leaf=lambda x:
                                      hasattr(x, "mu"))[0].mu)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_matches_no_pipeline(name):
  _, before, (metrics, state) = trained(name)
  _, want_before, (want_metrics, want_state) = trained("baseline")
  for got, want in zip(jax.tree.leaves(before), jax.tree.leaves(want_before)):
    np.testing.assert_array_equal(got, want)  # the same starting point
  for key in ("loss", "grad_norm", "weight"):
    assert rel_err(metrics[key], want_metrics[key]) < 1e-5, key
  grads = jax.tree.leaves_with_path(gradients(state))
  want_grads = jax.tree.leaves(gradients(want_state))
  assert len(grads) == len(want_grads) == len(jax.tree.leaves(before))
  for (path, got), want in zip(grads, want_grads):
    assert rel_err(got, want) < 1e-5, jax.tree_util.keystr(path)


def test_multimodal_model_matches_no_pipeline():
  """The decoder with a vision tower and projector (the multimodal stages'
  model): image features are spliced in before the pipelined layers, so
  loss and gradients (projector and LM trained, tower frozen) match. The
  tower's stacked layers shard over `stage` as FSDP (2 layers here)."""
  model = tiny_config("tiny")
  vision = from_config(VisionConfig, vision_config("tiny", num_layers=2),
                       "vision")
  projector = from_config(ProjectorConfig, projector_config(
      "mlp2x_gelu", dtype="float32"), "projector")
  cfg = MultimodalConfig(model, vision, projector, image_token_id=7)
  rng = np.random.RandomState(0)
  examples = [{"ids": np.r_[rng.randint(10, 500, 3), 7,
                            rng.randint(10, 500, 9)].astype(np.int32),
               "weights": np.r_[np.zeros(4), np.ones(9)].astype(np.float32),
               "images": rng.randn(1, 32, 32, 3).astype(np.float32)}
              for _ in range(8)]
  data = mm_batch.make_batch(examples, seq_len=32, max_images=1,
                             image_shape=(32, 32, 3), image_token_id=7,
                             tokens_per_image=cfg.tokens_per_image)
  results = []
  for fields in (BASELINE, GPIPE_2X2):
    parallel = parallel_config(fields)
    mesh = make_mesh(parallel)
    program = build_program(
        multimodal_task(cfg, trainable=STAGE_TRAINABLE["instruct"]), parallel,
        OPTIMIZER, TrainConfig(steps=4, batch_size=8), mesh)
    state, frozen = initial_state(program, seed=0)
    with use_mesh(mesh, program.rules):
      state, metrics = program.step(state, frozen, jax.device_put(
          data, program.batch_sharding))
    results.append(jax.device_get((metrics, gradients(state))))
  (metrics, grads), (want_metrics, want_grads) = results[1], results[0]
  assert rel_err(metrics["loss"], want_metrics["loss"]) < 1e-5
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert rel_err(got, want) < 1e-5


def test_checkpoint_restores_across_pipeline_layouts(tmp_path):
  """Parameters keep their [layers, ...] layout under every schedule, so a
  checkpoint written with stages restores without them and back, bit for
  bit (Orbax reshards to the target mesh)."""
  piped, _, (_, after) = trained("circular-2x4x2")
  plain = trained("baseline")[0]
  params = after["params"]
  state = {"params": params}

  def save_restore(directory, tree, target):
    checkpointer = Checkpointer(str(directory), every=1, keep=1,
                                async_save=False)
    checkpointer.save(1, tree, {}, force=True)
    restored, _ = checkpointer.restore(1, {"params": target.state["params"]})
    checkpointer.close()
    return restored

  without = save_restore(tmp_path / "a", state, plain)
  back = save_restore(tmp_path / "b", without, piped)
  for got, mid, want in zip(jax.tree.leaves(back), jax.tree.leaves(without),
                            jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(mid), want)
    np.testing.assert_array_equal(np.asarray(got), want)
  q = back["params"]["blocks"]["attn"]["q"]
  assert q.sharding == piped.state["params"]["blocks"]["attn"]["q"].sharding


# launch.pretrain's small run (tests/test_pretrain.py: 2 layers, d=64, batch
# 8 x 64, 12 steps, a checkpoint every 4) on 2 GPipe stages of one layer:
# data 4 x stage 2, 2 pieces of 4 sequences (one per data shard). No
# evaluation and a set peak (no matmul timing): only what the test needs.
PIPELINED = ["--config.parallel.stage=2",
             "--config.parallel.pipeline_microbatches=2",
             "--config.train.eval_every=0", "--config.train.peak_flops=1e10"]


def test_killed_pipelined_run_resumes_bitwise(tmp_path, prepared,
                                              monkeypatch):
  """SIGKILL right after a checkpoint is written, then the same command
  again: the per-step losses and the final parameters are those of the run
  that was never stopped, bit for bit."""
  # The three runs share JAX's persistent compilation cache, so only the
  # first pays for compiling (the init and the step, and the dozens of small
  # slice programs Orbax's first save compiles): the other two start about
  # 3x faster.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  straight = workdir_with_data(tmp_path, prepared, "straight")
  log = finish(start(straight, *PIPELINED))
  assert "pipeline: gpipe, 2 stages x 2 micro-batches" in log
  want = train_losses(straight)
  assert sorted(want) == list(range(1, 13))

  killed = workdir_with_data(tmp_path, prepared, "killed")
  proc = start(killed, *PIPELINED)
  wait_for_checkpoint(proc, killed, 4)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  # A step takes about 0.1 s: the run may finish another checkpoint between
  # the poll and the kill. It resumes from the last one it finished.
  saved = max(checkpoint_steps(killed))
  assert 4 <= saved < 12
  log = finish(start(killed, *PIPELINED))
  assert f"restored step {saved}" in log
  assert train_losses(killed) == want
  (_, got), (_, params) = (native.load_params(str(d / "model"))
                           for d in (killed, straight))
  for (path, a), b in zip(jax.tree.leaves_with_path(got),
                          jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stages,micro,repeats", [
    (2, 1, 1), (4, 8, 1), (2, 3, 4), (4, 6, 2)])
def test_bubble_matches_the_schedule_formula(stages, micro, repeats):
  """The loop, run on the stage axis, keeps each stage idle (S - 1) of
  M R + S - 1 iterations, and puts every row through every layer once in
  order (each layer here is x -> 2x + its index)."""
  schedule = Schedule(stages, micro, repeats)
  layers = stages * repeats * 2
  mesh = make_mesh(parallel_config(dict(stage=stages, data=8 // stages,
                                        pipeline_microbatches=micro)))

  def stack(w, x, rows):
    return jax.lax.scan(lambda x, wi: (2 * x + wi + rows[:, None], None),
                        x, w)[0]

  x = jnp.arange(micro * 8 * 2, dtype=jnp.float32).reshape(-1, 2) / 64
  offsets = jnp.ones(x.shape[0]) * 0.5
  with use_mesh(mesh, ParallelConfig().rules):
    out, busy = jax.jit(functools.partial(
        run, schedule, stack, names=("act_batch", None), return_busy=True))(
            jnp.arange(layers, dtype=jnp.float32), x, offsets)
  want = np.asarray(x, np.float64)
  for i in range(layers):
    want = 2 * want + i + 0.5
  np.testing.assert_allclose(out, want, rtol=1e-6)
  measured = 1 - np.asarray(busy).mean()
  formula = (stages - 1) / (micro * repeats + stages - 1)
  assert busy.shape == (micro * repeats + stages - 1, stages)
  assert measured == pytest.approx(formula) == pytest.approx(schedule.bubble)
  assert (schedule.table() == "").mean() == pytest.approx(formula)
  # Each stage works on every (micro-batch, repeat) exactly once.
  for column in schedule.table().T:
    assert sorted(c for c in column if c) == sorted(
        f"{m}.{r}" for m in range(micro) for r in range(repeats))


@pytest.mark.parametrize("fields,field", [
    (dict(stage=2), r"parallel\.pipeline_microbatches: .*needs the number"),
    (dict(stage=-1), r"parallel\.stage: .*fixed"),
    (dict(stage=1, pipeline_microbatches=4), r"parallel\.stage: .*no pipeline"),
    (dict(stage=2, pipeline_microbatches=4, pipeline_schedule="1f1b"),
     r"parallel\.pipeline_schedule: got '1f1b'"),
    (dict(stage=2, pipeline_microbatches=4, pipeline_repeats=2),
     r"parallel\.pipeline_repeats: .*gpipe runs"),
    (dict(stage=2, pipeline_microbatches=4, pipeline_schedule="circular"),
     r"parallel\.pipeline_repeats: circular needs >= 2"),
    (dict(stage=4, pipeline_microbatches=2, pipeline_schedule="circular",
          pipeline_repeats=2), r"parallel\.pipeline_microbatches: circular"),
    (dict(stage=2, pipeline_microbatches=2, rules=(("layers", None),)),
     r"parallel\.rules: .*'layers' must map to 'stage'"),
])
def test_bad_pipeline_configs_name_the_field(fields, field):
  with pytest.raises(ConfigError, match=field):
    parallel_config(fields)


def test_layers_and_batch_that_do_not_cut_evenly_are_refused():
  parallel = parallel_config(dict(stage=4, fsdp=2, pipeline_microbatches=4,
                                  pipeline_schedule="circular",
                                  pipeline_repeats=4))
  with pytest.raises(ConfigError, match=r"parallel\.pipeline_repeats: .*"
                     r"num_layers=8 .* 16 equal groups"):
    check_layout(CFG, parallel, BATCH, 1, 8)
  parallel = parallel_config(dict(stage=2, fsdp=4, pipeline_microbatches=8))
  with pytest.raises(ConfigError, match=r"parallel\.pipeline_microbatches: "
                     r"8 pipeline micro-batches of a 16-sequence batch"):
    check_layout(CFG, parallel, BATCH, 1, 8)
