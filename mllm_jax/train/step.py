"""The training step: a pure function of (state, frozen, batch), compiled once.

The step serves every stage: the stage's loss (`task.TrainTask.loss`)
returns weighted sums and the weight to normalise by, and the step
differentiates only the trainable parameters (`state["params"]`); frozen ones
(`frozen`) are read, never differentiated, updated, decayed or donated.
Gradients are accumulated over micro-batches and normalised by the total
weight, so accumulation gives the same update as one large batch.

Memory: a parameter the model only ever reads through one cast to a narrower
compute dtype (float32 weights used as bfloat16) has a gradient that is a
bfloat16 number, stored as float32. The step therefore casts such parameters
once per step and differentiates with respect to the cast copy, so each
micro-batch's gradients take half the memory; they are summed in float32.
The values are the same bits as differentiating the float32 parameters (see
`gradient_dtypes`). For 7B on 4 chips this is 3.1 GiB per chip.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mllm_jax.parallel.pipeline import split_rows
from mllm_jax.train.optimizer import Optimizer
from mllm_jax.train.task import Batch, LossFn

# params (trainable only), opt_state, step, bad_steps, bad_streak,
# worst_streak
TrainState = dict[str, Any]


def init_train_state(params: nnx.State, optimizer: Optimizer) -> TrainState:
  """The checkpointed state: trainable params, their optimizer state, counters."""
  return {
      "params": params,
      "opt_state": optimizer.init(params),
      "step": jnp.zeros((), jnp.int32),
      "bad_steps": jnp.zeros((), jnp.int32),   # skipped for NaN/Inf, in total
      "bad_streak": jnp.zeros((), jnp.int32),  # ... in a row, up to now
      "worst_streak": jnp.zeros((), jnp.int32),  # longest streak so far
  }


def model_loss(graphdef: nnx.GraphDef, loss: LossFn) -> Callable:
  """loss(model, batch) -> the same as a function of (params, frozen, batch)."""
  def loss_fn(params, frozen, batch):
    return loss(nnx.merge(graphdef, params, frozen), batch)
  return loss_fn


def split_micro_batches(batch: Batch, count: int) -> Batch:
  """[B, ...] -> [count, B / count, ...], micro-batch i = rows i, i+count, ...
  (`pipeline.split_rows`: the cut moves no data)."""
  return jax.tree.map(lambda x: split_rows(x, count), batch)


# Primitives whose sub-jaxpr receives the equation's operands one to one.
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint")


def _sub_jaxpr_invar(eqn, index: int):
  """The variable operand `index` of `eqn` becomes inside its body, or None
  when the body does not see it as a plain copy (or slice, for scan `xs`)."""
  name = eqn.primitive.name
  if name in _CALLS:
    jaxpr = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  elif name == "scan":
    # consts and xs only: a carry is loop state, not the parameter.
    num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    if num_consts <= index < num_consts + num_carry:
      return None
    jaxpr = eqn.params["jaxpr"]
  else:
    return None
  if jaxpr is None:
    return None
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  return jaxpr, jaxpr.invars[index]


def _only_cast_dtype(jaxpr, var):
  """The dtype `var` is cast to, if its single use (followed into nested
  calls, remat and scans) is one cast to a narrower float dtype; else None."""
  uses = [(eqn, i) for eqn in jaxpr.eqns
          for i, v in enumerate(eqn.invars) if v is var]
  if len(uses) != 1 or any(v is var for v in jaxpr.outvars):
    return None
  eqn, index = uses[0]
  if eqn.primitive.name == "convert_element_type":
    new = jnp.dtype(eqn.params["new_dtype"])
    old = jnp.dtype(var.aval.dtype)
    if (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(old, jnp.floating)
        and new.itemsize < old.itemsize):
      return new
    return None
  inner = _sub_jaxpr_invar(eqn, index)
  return None if inner is None else _only_cast_dtype(*inner)


def gradient_dtypes(loss_fn: Callable, params, *args) -> list:
  """Per leaf of `params`: the dtype to differentiate `loss_fn` in.

  A leaf that `loss_fn(params, *args)` reads only through one cast to a
  narrower float dtype (e.g. float32 weights used as bfloat16) gets that
  dtype: its cotangent is computed in it anyway, and converting before or
  after the cast gives the same bits. Every other leaf (used in its own
  dtype, used twice, or through an opaque primitive) keeps its dtype.
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          (params, args))
  closed = jax.make_jaxpr(lambda p, a: loss_fn(p, *a))(*abstract)
  leaves = jax.tree.leaves(params)
  invars = closed.jaxpr.invars[:len(leaves)]
  return [_only_cast_dtype(closed.jaxpr, v) or jnp.dtype(x.dtype)
          for v, x in zip(invars, leaves)]


def make_train_step(graphdef: nnx.GraphDef, optimizer: Optimizer,
                    schedule: Callable[[jax.Array], jax.Array], loss: LossFn,
                    grad_accum_steps: int = 1) -> Callable:
  """Returns step(state, frozen, batch) -> (state, metrics)."""
  loss_fn = model_loss(graphdef, loss)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen: nnx.State, batch: Batch):
    params = state["params"]
    micro_batches = (batch if grad_accum_steps == 1 else
                     split_micro_batches(batch, grad_accum_steps))
    first = (batch if grad_accum_steps == 1 else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro_batches))
    # Differentiate with respect to the compute-dtype copy where that gives
    # the same gradient (see the module docstring): smaller micro-batch
    # gradients, and one cast per step instead of one per micro-batch.
    leaves, treedef = jax.tree.flatten(params)
    dtypes = gradient_dtypes(lambda p, f, b: loss_fn(p, f, b)[0], params,
                             frozen, first)
    diff_params = treedef.unflatten(
        [x.astype(d) for x, d in zip(leaves, dtypes)])
    # Sums of gradients are float32 (or wider) whatever the parameter dtype.
    acc_dtypes = treedef.unflatten(
        [jnp.promote_types(x.dtype, jnp.float32) for x in leaves])
    widen = lambda grads: jax.tree.map(lambda g, d: g.astype(d), grads,
                                       acc_dtypes)
    if grad_accum_steps == 1:
      (loss_sum, sums), grads = grad_fn(diff_params, frozen, batch)
      grad_sum = widen(grads)
    else:
      def accumulate(carry, micro_batch):
        (loss_sum, sums), grads = grad_fn(diff_params, frozen, micro_batch)
        acc_grads, acc_loss, acc_sums = carry
        acc_grads = jax.tree.map(lambda a, g: a + g.astype(a.dtype),
                                 acc_grads, grads)
        acc_sums = jax.tree.map(lambda a, s: a + s, acc_sums, sums)
        return (acc_grads, acc_loss + loss_sum, acc_sums), None
      zeros = jax.tree.map(lambda x, d: jnp.zeros(x.shape, d), params,
                           acc_dtypes)
      sum_shapes = jax.eval_shape(loss_fn, diff_params, frozen, first)[1]
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               sum_shapes)
      (grad_sum, loss_sum, sums), _ = jax.lax.scan(
          accumulate, (zeros, 0.0, zero_sums), micro_batches)

    weight_sum = sums["weight"]
    denominator = jnp.maximum(weight_sum, 1.0)
    # Gradients in the parameters' dtype, so the optimizer state keeps it.
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype),
                         grad_sum, params)
    loss = loss_sum / denominator
    grad_norm = optax.tree.norm(grads)

    # NaN/Inf guard: skip the update. A cond (not a select over the whole
    # state) computes the update only when it is taken, and never holds the
    # old and the new parameters and moments at once.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    new_params, opt_state = jax.lax.cond(
        finite,
        lambda params, opt_state: optimizer.apply(grads, opt_state, params,
                                                  grad_norm),
        lambda params, opt_state: (params, opt_state),
        params, state["opt_state"])
    bad = 1 - finite.astype(jnp.int32)
    streak = (state["bad_streak"] + 1) * bad
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "bad_steps": state["bad_steps"] + bad,
        "bad_streak": streak,
        "worst_streak": jnp.maximum(state["worst_streak"], streak),
    }
    metrics = {name: value / denominator for name, value in sums.items()
               if name != "weight"}
    metrics.update({
        "total_loss": loss, "grad_norm": grad_norm,
        "lr": schedule(state["step"]), "weight": weight_sum, "skipped": bad,
    })
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, loss: LossFn) -> Callable:
  """Returns eval(params, frozen, batch) -> the loss's sums (weight included),
  to be added over batches and divided by the total weight."""
  loss_fn = model_loss(graphdef, loss)
  return lambda params, frozen, batch: loss_fn(params, frozen, batch)[1]
