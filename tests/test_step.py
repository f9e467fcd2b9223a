"""The step's memory savings keep its numbers: compute-dtype gradients, mu_dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.modeling import Decoder
from mllm_jax.train.config import OptimizerConfig
from mllm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mllm_jax.train.step import (gradient_dtypes, init_train_state,
                                 model_loss, split_micro_batches)
from mllm_jax.train.task import lm_loss
from tests.helpers import NOTHING_FROZEN, lm_train_step, tiny_config
from tests.test_trainer import CountingIterator

OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=2)


def split(**overrides):
  return nnx.split(Decoder(tiny_config("tiny", **overrides),
                           rngs=nnx.Rngs(0)))


def loss_of(graphdef):
  loss = model_loss(graphdef, lm_loss())
  return lambda params, batch: loss(params, NOTHING_FROZEN, batch)[0]


@pytest.mark.parametrize("overrides, expected", [
    # float32 weights used as bfloat16: every leaf is differentiated in bf16.
    (dict(dtype="bfloat16"), lambda path: jnp.bfloat16),
    # A tied table is cast twice (embedding and logits), so its cotangents
    # are summed in float32 and it keeps float32.
    (dict(dtype="bfloat16", tie_embeddings=True),
     lambda path: jnp.float32 if "embed" in path else jnp.bfloat16),
    # Nothing to gain when compute and weights share a dtype.
    (dict(dtype="float32"), lambda path: jnp.float32),
    (dict(dtype="bfloat16", param_dtype="bfloat16"),
     lambda path: jnp.bfloat16),
])
def test_gradient_dtypes(overrides, expected):
  graphdef, params = split(**overrides)
  batch = next(CountingIterator())
  dtypes = gradient_dtypes(loss_of(graphdef), params, batch)
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert [jnp.dtype(d) for d in dtypes] == [
      jnp.dtype(expected(p)) for p in paths]


def test_gradient_dtypes_keeps_a_leaf_also_used_in_float32():
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  def loss(p, x):
    y = x @ p["w"].astype(jnp.bfloat16)
    return jnp.sum(y.astype(jnp.float32) * p["b"]) + jnp.sum(
        p["b"].astype(jnp.bfloat16).astype(jnp.float32))
  dtypes = gradient_dtypes(loss, params, jnp.ones((2, 4), jnp.bfloat16))
  assert dict(zip(["b", "w"], dtypes)) == {"b": jnp.dtype(jnp.float32),
                                           "w": jnp.dtype(jnp.bfloat16)}


def reference_step(graphdef, optimizer, accum):
  """The step as it was: gradients of the float32 parameters themselves."""
  grad_fn = jax.grad(loss_of(graphdef))

  def step(params, opt_state, batch):
    grads = jax.tree.map(jnp.zeros_like, params)
    weight = 0.0
    micro = split_micro_batches(batch, accum) if accum > 1 else None
    for i in range(accum):
      b = batch if accum == 1 else jax.tree.map(lambda x: x[i], micro)
      grads = jax.tree.map(jnp.add, grads, grad_fn(params, b))
      weight += jnp.sum(b["loss_weights"])
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
    return optimizer.apply(grads, opt_state, params)[0]
  return jax.jit(step)


@pytest.mark.parametrize("accum", [1, 4])
def test_compute_dtype_gradients_change_no_bits(accum):
  graphdef, params = split(dtype="bfloat16")
  batch = next(CountingIterator(batch_size=8))
  optimizer = make_optimizer(OPT, params, 10)
  state = init_train_state(params, optimizer)
  step = jax.jit(lm_train_step(graphdef, optimizer,
                               learning_rate_schedule(OPT, 10), accum))
  new_state, _ = step(state, NOTHING_FROZEN, batch)
  want = reference_step(graphdef, optimizer, accum)(
      params, state["opt_state"], batch)
  for got, ref in zip(jax.tree.leaves(new_state["params"]),
                      jax.tree.leaves(want)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, ref)


def test_accumulation_is_float32_for_bfloat16_weights():
  graphdef, params = split(param_dtype="bfloat16", dtype="bfloat16")
  optimizer = make_optimizer(OPT, params, 10)
  step = lm_train_step(graphdef, optimizer, learning_rate_schedule(OPT, 10),
                       4)
  state = init_train_state(params, optimizer)
  jaxpr = jax.make_jaxpr(step)(state, NOTHING_FROZEN,
                               next(CountingIterator(batch_size=8)))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  carry = scans[0].outvars[:len(jax.tree.leaves(params))]
  assert {v.aval.dtype for v in carry} == {jnp.dtype(jnp.float32)}


def test_mu_dtype_bfloat16_keeps_the_rest_float32():
  graphdef, params = split(dtype="bfloat16")
  cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2,
                        mu_dtype="bfloat16")
  optimizer = make_optimizer(cfg, params, 10)
  state = init_train_state(params, optimizer)
  step = jax.jit(lm_train_step(graphdef, optimizer,
                               learning_rate_schedule(cfg, 10), 2))
  new_state, metrics = step(state, NOTHING_FROZEN,
                            next(CountingIterator(batch_size=8)))
  adam = new_state["opt_state"][1][0]
  dtypes = lambda tree: {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}
  assert dtypes(adam.mu) == {jnp.dtype(jnp.bfloat16)}
  assert dtypes(adam.nu) == {jnp.dtype(jnp.float32)}
  assert dtypes(new_state["params"]) == {jnp.dtype(jnp.float32)}
  # The state keeps its dtypes from step to step (no recompile on step 2).
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))
  assert np.isfinite(metrics["loss"]) and int(metrics["skipped"]) == 0


def test_mu_dtype_is_validated():
  with pytest.raises(ConfigError, match="optimizer.mu_dtype"):
    OptimizerConfig(mu_dtype="float16").validate()


def test_warmup_ratio_follows_the_run_length():
  """A stage preset's warmup is a fraction of train.steps, so overriding the
  steps keeps the schedule's shape instead of a run that never warms up."""
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, warmup_ratio=0.1,
                        end_learning_rate_ratio=0.0)
  for steps in (20, 400):
    schedule = learning_rate_schedule(cfg, steps)
    peak = steps // 10
    assert float(schedule(peak)) == pytest.approx(1.0)
    assert float(schedule(peak // 2)) == pytest.approx(0.5)
    assert float(schedule(steps)) == pytest.approx(0.0)
  with pytest.raises(ConfigError, match="optimizer.warmup_steps.*warmup_ratio"):
    OptimizerConfig(warmup_steps=5, warmup_ratio=0.1).validate()
  with pytest.raises(ConfigError, match="optimizer.warmup_ratio"):
    OptimizerConfig(warmup_steps=0, warmup_ratio=1.5).validate()
