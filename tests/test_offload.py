"""Optimizer-state offload (optimizer.offload_state): the layer-streamed
update gives the plain update's parameters and moments, moves one layer's
moments at a time, runs through the trainer's program with the moments in
host memory, and bad configs name the field."""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.modeling import Decoder
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import use_mesh
from mllm_jax.train.compile import build_program, initial_state
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.offload import HOST, stacked_leaves
from mllm_jax.train.optimizer import make_optimizer
from mllm_jax.train.task import language_model_task
from tests.helpers import tiny_config

CFG = tiny_config("tiny", num_layers=2, attention_backend="xla",
                  custom_vjp=False)
STEPS = 3
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def params_and_grads(seed: int = 0):
  """The tiny decoder's parameters and gradient-like trees for STEPS steps."""
  params = nnx.state(Decoder(CFG, rngs=nnx.Rngs(seed)), nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), STEPS * len(leaves))
  grads = [treedef.unflatten([
      jax.random.normal(keys[s * len(leaves) + i], x.shape, x.dtype) * 0.1
      for i, x in enumerate(leaves)]) for s in range(STEPS)]
  return params, grads


def run_updates(cfg: OptimizerConfig, params, grads):
  """(params, opt_state) after len(grads) jitted updates."""
  optimizer = make_optimizer(cfg, params, 10)
  state = optimizer.init(params)
  apply = jax.jit(optimizer.apply)
  for g in grads:
    params, state = apply(g, state, params)
  return params, state


@pytest.mark.parametrize("fields", [
    # clip_norm small enough that every step clips; warmup schedule
    dict(clip_norm=0.5, warmup_steps=2),
    dict(clip_norm=0.0, mu_dtype="bfloat16", weight_decay=0.0),
], ids=["clipped", "unclipped-mu-bf16"])
def test_streamed_update_equals_plain(fields):
  """Plain device memory: the streaming logic alone, against optax's chain."""
  params, grads = params_and_grads()
  plain = OptimizerConfig(learning_rate=1e-2, **fields)
  streamed = OptimizerConfig(learning_rate=1e-2, offload_state=True, **fields)
  want = run_updates(plain, params, grads)
  got = run_updates(streamed, params, grads)
  assert (jax.tree.structure(got) == jax.tree.structure(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    assert a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-6,
                               atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_update_moves_one_layer_at_a_time():
  """With the moments in host memory, every host-to-device copy in the
  traced update is inside a loop over layers (one layer's slice) or of an
  unstacked leaf: never a whole stacked [layers, ...] moment."""
  params, grads = params_and_grads()
  cfg = OptimizerConfig(learning_rate=1e-2, offload_state=True)
  optimizer = make_optimizer(cfg, params, 10)
  state = optimizer.init(params)
  # A NamedSharding: its memory kind becomes the traced value's memory space.
  host = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)),
      jax.sharding.PartitionSpec(), memory_kind=HOST)
  on_host = lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=host if x.ndim else None)
  abstract = lambda t: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  jaxpr = jax.make_jaxpr(optimizer.apply)(
      abstract(grads[0]), jax.tree.map(on_host, state), abstract(params))

  def copies(jaxpr, depth=0):
    """(loop depth, shape) of every device_put to device memory (a
    fori_loop with static bounds is a scan)."""
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "device_put":
        found += [(depth, v.aval.shape) for v in eqn.outvars
                  if v.aval.memory_space == jax.memory.Space.Device]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        found += copies(sub, depth + (eqn.primitive.name in ("scan", "while")))
    return found

  found = copies(jaxpr.jaxpr)
  flags = stacked_leaves(params)
  leaves = jax.tree.leaves(params)
  stacked = {x.shape for x, s in zip(leaves, flags) if s}
  layer = {x.shape[1:] for x, s in zip(leaves, flags) if s}
  unstacked = {x.shape for x, s in zip(leaves, flags) if not s}
  assert stacked and unstacked
  # mu and nu of every leaf come over once per step (or per layer).
  assert len(found) == 2 * len(leaves)
  for depth, shape in found:
    assert shape not in stacked
    assert (depth == 1 and shape in layer) or (depth == 0
                                                and shape in unstacked)


@functools.lru_cache(maxsize=None)
def one_step(offload: bool):
  """The trainer's program on 8 CPU devices (data 2 x fsdp 4), one step;
  CPU devices have a pinned_host memory kind, so the moments really live
  there (the binaries refuse this on CPU, where it saves nothing)."""
  parallel = from_config(ParallelConfig, dict(data=2, fsdp=4), "parallel")
  mesh = make_mesh(parallel)
  optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                              offload_state=offload)
  program = build_program(language_model_task(CFG), parallel, optimizer,
                          TrainConfig(steps=4, batch_size=8), mesh)
  state, frozen = initial_state(program, seed=0)
  rng = np.random.RandomState(0)
  tokens = rng.randint(1, CFG.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_weights": np.ones((8, 16), np.float32),
           "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state["opt_state"])
           if x.ndim}
  with use_mesh(mesh, program.rules):
    for _ in range(2):
      state, metrics = program.step(state, frozen, jax.device_put(
          batch, program.batch_sharding))
  out_kinds = {x.sharding.memory_kind
               for x in jax.tree.leaves(state["opt_state"]) if x.ndim}
  return kinds, out_kinds, jax.device_get((metrics, state))


def test_trainer_program_with_moments_in_host_memory():
  kinds, out_kinds, (metrics, state) = one_step(True)
  assert kinds == out_kinds == {HOST}
  _, _, (want_metrics, want_state) = one_step(False)
  assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]),
                                                 rel=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                          jax.tree.leaves(want_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_bad_configs_name_the_field():
  with pytest.raises(ConfigError, match="optimizer.offload_state"):
    OptimizerConfig(backend="cpu_fused", offload_state=True).validate()
  cfg = OptimizerConfig(offload_state=True)
  with pytest.raises(ConfigError, match="optimizer.offload_state.*'cpu'"):
    cfg.check_platform("cpu")
  cfg.check_platform("tpu")  # and ahead-of-time compiles for TPU or GPU
  cfg.check_platform("gpu")
  parallel = from_config(ParallelConfig, dict(
      stage=2, fsdp=4, pipeline_microbatches=2),
                         "parallel")
  with pytest.raises(ConfigError, match="optimizer.offload_state"):
    build_program(language_model_task(CFG), parallel, cfg,
                  TrainConfig(steps=4, batch_size=8), make_mesh(parallel))


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the tpu extra) missing")
def test_tpu_compile_moves_the_moments_to_host_per_layer():
  """Ahead of time for v5p:2x2x1: the moments leave device memory for host
  memory, and the compiled update copies them a layer slice at a time."""
  from launch import aot  # pylint: disable=g-import-not-at-top
  target = aot.resolve_target("v5p:2x2x1", 0.0, 1e12)
  reports = []
  for offload in (False, True):
    parallel = from_config(ParallelConfig, dict(data=1, fsdp=-1), "parallel")
    configs = aot.Configs(CFG, parallel, OptimizerConfig(
        offload_state=offload), TrainConfig(steps=4, batch_size=8), 16, 0)
    run = aot.prepare(configs, target)
    reports.append(aot.analyse(run, aot.compile_step(run), target, 0.5))
  plain, offloaded = (r["memory_bytes"] for r in reports)
  host = offloaded["host_offloaded"]
  assert plain["host_offloaded"] == 0 and reports[0]["host_transfers"] is None
  # What left the device is what host memory holds: mu and nu, twice the
  # f32 parameters that stay (the rest of the arguments is the batch).
  assert plain["arguments"] - offloaded["arguments"] == host
  assert host == pytest.approx(2 * offloaded["arguments"], rel=0.05)
  moves = reports[1]["host_transfers"]
  leaves = jax.tree.leaves(params_and_grads()[0])
  assert moves["to_device"]["count"] == moves["to_host"]["count"] == (
      2 * len(leaves))  # mu and nu of each leaf (a loop body per layer)
  flags = stacked_leaves(params_and_grads()[0])
  # Each stacked moment moves as one layer's slice, in the update's loop.
  assert moves["to_device"]["layer_slices"] == 2 * sum(flags)
  assert moves["to_host"]["layer_slices"] == 2 * sum(flags)
  # No slice is more than one layer of the largest stacked leaf.
  layer = max(x.nbytes // x.shape[0] for x, s in zip(leaves, flags) if s)
  assert 0 < moves["to_device"]["largest_slice_bytes"] <= layer
