"""The training step: a pure function of (state, batch), compiled once.

Every supervised stage feeds the same batch schema (`inputs`, `targets`,
`loss_weights`, `segment_ids`, `positions`), so this one step serves
pretraining, instruction tuning and SFT alike. Gradients are accumulated over
micro-batches and normalised by the total loss weight, so accumulation gives
the same update as one large batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mllm_jax.parallel.sharding import constrain
from mllm_jax.train.losses import token_cross_entropy

Batch = dict[str, jax.Array]
TrainState = dict[str, Any]  # params, opt_state, step, bad_steps, bad_streak


def init_train_state(params: nnx.State,
                     optimizer: optax.GradientTransformation) -> TrainState:
  return {
      "params": params,
      "opt_state": optimizer.init(params),
      "step": jnp.zeros((), jnp.int32),
      "bad_steps": jnp.zeros((), jnp.int32),   # skipped for NaN/Inf, in total
      "bad_streak": jnp.zeros((), jnp.int32),  # ... in a row, up to now
  }


def weighted_loss_sums(graphdef: nnx.GraphDef, params: nnx.State,
                       batch: Batch, z_loss: float = 0.0):
  """(sum of weighted loss incl. z-loss, (sum of weights, sum of weighted CE))."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  weights = batch["loss_weights"].astype(jnp.float32)
  ce = token_cross_entropy(logits, batch["targets"])
  loss = ce
  if z_loss:
    loss = token_cross_entropy(logits, batch["targets"], z_loss)
  return jnp.sum(loss * weights), (jnp.sum(weights), jnp.sum(ce * weights))


def split_micro_batches(batch: Batch, count: int) -> Batch:
  """[B, ...] -> [count, B / count, ...], micro-batch i = rows i, i+count, ...

  Interleaving keeps every micro-batch spread over all data-parallel devices
  (each holds a contiguous block of rows), so splitting moves no data.
  """
  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef,
                    optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    grad_accum_steps: int = 1,
                    z_loss: float = 0.0) -> Callable:
  """Returns step(state, batch) -> (state, metrics)."""

  grad_fn = jax.value_and_grad(
      lambda params, batch: weighted_loss_sums(graphdef, params, batch,
                                               z_loss), has_aux=True)

  def step(state: TrainState, batch: Batch):
    params = state["params"]
    if grad_accum_steps == 1:
      (loss_sum, (weight_sum, ce_sum)), grad_sum = grad_fn(params, batch)
    else:
      def accumulate(carry, micro_batch):
        (loss_sum, (weight_sum, ce_sum)), grads = grad_fn(params, micro_batch)
        acc_grads, acc_loss, acc_weight, acc_ce = carry
        return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss_sum,
                acc_weight + weight_sum, acc_ce + ce_sum), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grad_sum, loss_sum, weight_sum, ce_sum), _ = jax.lax.scan(
          accumulate, (zeros, 0.0, 0.0, 0.0),
          split_micro_batches(batch, grad_accum_steps))

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

    def update(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    new_params, opt_state = jax.lax.cond(
        finite, update, lambda params, opt_state: (params, opt_state),
        params, state["opt_state"])
    bad = 1 - finite.astype(jnp.int32)
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "bad_steps": state["bad_steps"] + bad,
        "bad_streak": (state["bad_streak"] + 1) * bad,
    }
    metrics = {
        "loss": ce_sum / denominator, "total_loss": loss,
        "grad_norm": grad_norm, "lr": schedule(state["step"]),
        "tokens": weight_sum, "skipped": bad,
        "bad_streak": new_state["bad_streak"],
    }
    return new_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
  """Returns eval(params, batch) -> (sum of weighted CE, sum of weights)."""
  def evaluate(params, batch):
    _, (weight_sum, ce_sum) = weighted_loss_sums(graphdef, params, batch)
    return ce_sum, weight_sum
  return evaluate
