"""optimizer.backend='cpu_fused': optax's clip + AdamW update in one C++ pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.modeling import Decoder
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import (create_sharded, param_shardings,
                                        use_mesh)
from mllm_jax.train.config import OptimizerConfig
from mllm_jax.train.optimizer import make_optimizer
from mllm_jax.train.step import init_train_state
from tests.helpers import NOTHING_FROZEN, lm_train_step, rel_err, tiny_config
from tests.test_trainer import CountingIterator

CFG = tiny_config("tiny", num_heads=8, num_kv_heads=4)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2)
FUSED = dataclasses.replace(OPT, backend="cpu_fused")


def params_of(cfg=CFG):
  return nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))[1]


def gradients(params, seed, scale):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree.map(
      lambda p: scale * jax.random.normal(next(keys), p.shape, p.dtype),
      params)


def run(optimizer, params, steps, scale):
  """`steps` optimizer steps on fixed random gradients."""
  state = optimizer.init(params)
  update = jax.jit(lambda g, s, p: optimizer.apply(g, s, p))
  for i in range(steps):
    params, state = update(gradients(params, i, scale), state, params)
  return params, state


@pytest.mark.parametrize("clip_norm, scale", [
    (1.0, 0.1),    # global norm ~20: every step clipped
    (1e3, 0.1),    # never clipped
    (0.0, 0.1),    # clipping off
    (1.0, 1e-4),   # tiny gradients, under the clip norm
])
def test_matches_optax_and_keeps_its_state_layout(clip_norm, scale):
  params = params_of()
  ref_cfg = dataclasses.replace(OPT, clip_norm=clip_norm)
  fused_cfg = dataclasses.replace(ref_cfg, backend="cpu_fused")
  fused = make_optimizer(fused_cfg, params, 10)
  want = run(make_optimizer(ref_cfg, params, 10), params, 4, scale)
  got = run(fused, params, 4, scale)
  # Same tree (a checkpoint of either resumes with the other) ...
  assert jax.tree.structure(got) == jax.tree.structure(want)
  named = jax.tree_util.tree_leaves_with_path(want)
  for (path, w), g in zip(named, jax.tree.leaves(got)):
    # ... and the same numbers up to float32 rounding (XLA may fuse
    # multiply-adds that the kernel rounds separately).
    assert g.dtype == w.dtype, jax.tree_util.keystr(path)
    assert rel_err(g, w) < 1e-6, jax.tree_util.keystr(path)
  # Weight decay follows the mask: the norms' scales (no decay, zero
  # gradient) stay put, the decayed weights shrink.
  no_warmup = make_optimizer(dataclasses.replace(fused_cfg, warmup_steps=0),
                             params, 10)
  zero = jax.tree.map(jnp.zeros_like, params)
  new, _ = jax.jit(lambda s, p: no_warmup.apply(zero, s, p))(
      no_warmup.init(params), params)
  np.testing.assert_array_equal(new["final_norm"]["scale"][...],
                                params["final_norm"]["scale"][...])
  before, after = params["lm_head"][...], new["lm_head"][...]
  np.testing.assert_allclose(after, before * (1 - 1e-2 * 0.1), rtol=1e-6)


def test_sharded_update_matches_one_device():
  """On a (2, 2, 2) mesh each device updates its own shard."""
  params = params_of()
  fused = make_optimizer(FUSED, params, 10)
  want = run(fused, params, 2, 0.1)
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(parallel, jax.devices()[:8])
  sharded = create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh,
                           parallel.rules)
  sharded_params = nnx.split(sharded)[1]
  assert any(len(x.sharding.device_set) == 8 and not x.is_fully_replicated
             for x in jax.tree.leaves(sharded_params))
  with use_mesh(mesh, parallel.rules):
    got = run(fused, sharded_params, 2, 0.1)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-6
  shardings = param_shardings(got[0], mesh, parallel.rules)
  for g, s in zip(jax.tree.leaves(got[0]), jax.tree.leaves(shardings)):
    assert g.sharding.is_equivalent_to(s, g.ndim)


def test_train_step_skips_a_nan_update():
  graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
  fused = make_optimizer(FUSED, params, 10)
  step = jax.jit(lm_train_step(graphdef, fused, lambda count: 1e-2, 1))
  batch = next(CountingIterator())
  state, metrics = step(init_train_state(params, fused), NOTHING_FROZEN,
                        batch)
  assert int(metrics["skipped"]) == 0
  batch["loss_weights"][0, 0] = np.nan
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, NOTHING_FROZEN, batch)
  assert int(metrics["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(state["params"]),
                  jax.tree.leaves(before["params"])):
    np.testing.assert_array_equal(a, b)


def test_bad_settings_are_refused_by_name():
  with pytest.raises(ConfigError, match="optimizer.backend"):
    OptimizerConfig(backend="fused").validate()
  with pytest.raises(ConfigError, match="optimizer.mu_dtype.*'optax'"):
    dataclasses.replace(FUSED, mu_dtype="bfloat16").validate()
  for platform in ("gpu", "tpu"):
    with pytest.raises(ConfigError, match="optimizer.backend.*'optax'"):
      FUSED.check_platform(platform)
  FUSED.check_platform("cpu")
  with pytest.raises(ConfigError, match="blocks.attn.k is bfloat16.*'optax'"):
    make_optimizer(FUSED, params_of(tiny_config("tiny",
                                                param_dtype="bfloat16")), 10)
