"""Next-token losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _cross_entropy_fwd(logits, targets, z_loss):
  logits32 = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits32, axis=-1)
  target_logit = jnp.take_along_axis(logits32, targets[..., None],
                                     axis=-1)[..., 0]
  loss = log_z - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return loss, (logits, targets, log_z)


def _cross_entropy_bwd(z_loss, residuals, d_loss):
  """d logits = (softmax * (1 + 2 z log_z) - onehot(target)) * d_loss, in one
  pass over the logits (autodiff makes several, plus a scatter)."""
  logits, targets, log_z = residuals
  d_loss = d_loss.astype(jnp.float32)
  d_log_z = d_loss * (1 + 2 * z_loss * log_z) if z_loss else d_loss
  d_logits = jnp.exp(logits.astype(jnp.float32) - log_z[..., None]) * (
      d_log_z[..., None])
  # - d_loss at each target: a scatter of one value per token, in place
  # (an iota == target select would be a second pass over the logits).
  flat = d_logits.reshape(-1, d_logits.shape[-1])
  flat = flat.at[jnp.arange(flat.shape[0]), targets.reshape(-1)].add(
      -d_loss.reshape(-1), indices_are_sorted=True, unique_indices=True)
  return flat.reshape(d_logits.shape).astype(logits.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, targets, z_loss):
  return _cross_entropy_fwd(logits, targets, z_loss)[0]


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        z_loss: float = 0.0) -> jax.Array:
  """Per-token -log p(target), plus z_loss * logsumexp^2 (PaLM) if asked.

  logits [..., V] (any float dtype), targets [...] int -> float32 [...].
  The backward is written by hand (one pass over the logits); it equals
  autodiff's up to float rounding (tests/test_losses.py).
  """
  return _cross_entropy(logits, jnp.asarray(targets), float(z_loss))


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of `values` under `weights` (0 where there is no target)."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ----------------------------------------------------------------------------
# The output projection and the loss in one: chunked, gradients in the forward
# ----------------------------------------------------------------------------


def _chunks(x: jax.Array, count: int) -> jax.Array:
  """[B, T, ...] -> [count, B, T / count, ...]: chunk j holds positions
  j, j + count, j + 2 count, ... so every chunk spans every sequence shard."""
  b, t = x.shape[:2]
  x = x.reshape(b, t // count, count, *x.shape[2:])
  return jnp.moveaxis(x, 2, 0)


def _unchunk(x: jax.Array) -> jax.Array:
  """Inverse of `_chunks`."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_losses(x, w, targets, z_loss):
  """Logits of one chunk and its per-token (loss, CE, log Z), all float32."""
  logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
  ce, (_, _, log_z) = _cross_entropy_fwd(logits, targets, 0.0)
  loss = ce + z_loss * jnp.square(log_z) if z_loss else ce
  return logits, loss, ce, log_z


def _head_sums(x, w, targets, weights, z_loss, count):
  """Primal: (sum of weighted loss, sum of weighted CE), chunk by chunk."""
  def body(sums, chunk):
    x_c, t_c, w_c = chunk
    _, loss, ce, _ = _chunk_losses(x_c, w, t_c, z_loss)
    return (sums[0] + jnp.sum(loss * w_c), sums[1] + jnp.sum(ce * w_c)), None
  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero), (
      _chunks(x, count), _chunks(targets, count), _chunks(weights, count)))
  return sums


def _head_grads(x, w, targets, weights, z_loss, count):
  """The loss sums and, chunk by chunk, their gradient: the chunk's
  logits are used while they are still in cache and never all exist at
  once. The gradient is exact for any cotangent, which only scales it."""
  def body(carry, chunk):
    sums, d_w = carry
    x_c, t_c, w_c = chunk
    logits, loss, ce, log_z = _chunk_losses(x_c, w, t_c, z_loss)
    # The per-token loss's backward with each token's weight as cotangent.
    d_logits, _ = _cross_entropy_bwd(z_loss, (logits, t_c, log_z), w_c)
    d_logits = d_logits.astype(x.dtype)
    d_x = jnp.einsum("btv,dv->btd", d_logits, w,
                     preferred_element_type=jnp.float32).astype(x.dtype)
    d_w = d_w + jnp.einsum("btd,btv->dv", x_c, d_logits,
                           preferred_element_type=jnp.float32)
    sums = (sums[0] + jnp.sum(loss * w_c), sums[1] + jnp.sum(ce * w_c))
    return (sums, d_w), (d_x, loss)
  zero = jnp.zeros((), jnp.float32)
  ((loss_sum, ce_sum), d_w), (d_x, losses) = jax.lax.scan(
      body, ((zero, zero), jnp.zeros(w.shape, jnp.float32)),
      (_chunks(x, count), _chunks(targets, count), _chunks(weights, count)))
  return (loss_sum, ce_sum), (_unchunk(d_x), d_w.astype(w.dtype),
                              _unchunk(losses))


# Selection: the head on each row's weighted positions only.


def _take_rows(a, index):
  """a [B, T, ...] at index [B, K] -> [B, K, ...]."""
  index = index.reshape(index.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, index, axis=1)


def put_rows(values, index, length):
  """Inverse of `_take_rows` for distinct indices: zeros elsewhere."""
  rows = jnp.arange(index.shape[0])[:, None]
  full = jnp.zeros((index.shape[0], length) + values.shape[2:], values.dtype)
  return full.at[rows, index].set(values, unique_indices=True)


def on_weighted_positions(fn, x, targets, weights, plan, scatter):
  """fn(x, targets, weights, chunks) on each row's weighted positions,
  gathered in order into the smallest of `plan`'s (slots, chunks) that
  holds the batch's longest row (the last entry is every position, as
  they are). A switch: one branch runs. `scatter(out, index, T)` maps a
  gathered run's outputs back to full positions, so branches agree (the
  identity for per-row sums). Used by every loss that applies the head."""
  if len(plan) == 1:
    return fn(x, targets, weights, plan[0][1])
  weighted = weights != 0
  # Each row's weighted positions first, in order, then the rest.
  order = jnp.argsort(jnp.logical_not(weighted).astype(jnp.int8), axis=1,
                      stable=True)
  longest = jnp.max(jnp.sum(weighted, axis=1))
  branch = sum((longest > keep).astype(jnp.int32) for keep, _ in plan[:-1])

  def gathered(keep, chunks):
    def run(x, targets, weights):
      index = order[:, :keep]
      out = fn(_take_rows(x, index), _take_rows(targets, index),
               _take_rows(weights, index), chunks)
      return scatter(out, index, x.shape[1])
    return run
  branches = [gathered(*entry) for entry in plan[:-1]]
  branches.append(lambda x, t, wt: fn(x, t, wt, plan[-1][1]))
  return jax.lax.switch(branch, branches, x, targets, weights)


def _scatter_grads(out, index, length):
  sums, (d_x, d_w, losses) = out
  return sums, (put_rows(d_x, index, length), d_w,
                put_rows(losses, index, length))


def _head_fwd(x, w, targets, weights, z_loss, plan):
  fn = lambda x, t, wt, chunks: _head_grads(x, w, t, wt, z_loss, chunks)
  return on_weighted_positions(fn, x, targets, weights, plan, _scatter_grads)


def _head_bwd(z_loss, plan, residuals, cotangents):
  del z_loss, plan
  d_x, d_w, losses = residuals
  g = cotangents[0]  # the CE sum is a metric: its derivative is zero
  return ((g * d_x).astype(d_x.dtype), (g * d_w).astype(d_w.dtype), None,
          g * losses)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_cross_entropy(x, w, targets, weights, z_loss, plan):
  fn = lambda x, t, wt, chunks: _head_sums(x, w, t, wt, z_loss, chunks)
  loss_sum, ce_sum = on_weighted_positions(fn, x, targets, weights, plan,
                                  lambda sums, *_: sums)
  return loss_sum, jax.lax.stop_gradient(ce_sum)


_head_cross_entropy.defvjp(_head_fwd, _head_bwd)


def head_plan(length: int, share: float = 1.0, chunk_len: int = 0
              ) -> tuple[tuple[int, int], ...]:
  """The (slots, chunks) sizes the head may run on for
  `model.loss_positions=share`: ceil(share * length) slots, then twice
  that, and so on, each rounded up to the loss chunk (or to 8), ending
  with every position. `length` must be a multiple of `chunk_len`."""
  multiple = chunk_len or 8
  chunks = lambda slots: slots // chunk_len if chunk_len else 1
  plan = []
  keep = math.ceil(share * length)
  while True:
    keep = -(-keep // multiple) * multiple
    if keep >= length:
      break
    plan.append((keep, chunks(keep)))
    keep *= 2
  plan.append((length, chunks(length)))
  return tuple(plan)


def head_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array,
                       weights: jax.Array, z_loss: float = 0.0,
                       chunk_len: int = 0, positions: float = 1.0
                       ) -> tuple[jax.Array, jax.Array]:
  """The output projection and the weighted loss, without the logits tensor.

  x [B, T, D] final hidden states, w [D, V] the output projection (both in
  the compute dtype), targets [B, T] int, weights [B, T]. Returns float32
  (sum of weights * (CE + z_loss * log Z^2), sum of weights * CE); the second
  is a metric whose derivative is taken as zero.

  The sequence is processed `chunk_len` positions at a time (0: all at
  once), so the float32 logits of one chunk exist at a time (2 GiB -> 2 GiB /
  chunks at batch 8 x 2048 x 32k). Under differentiation the gradient is
  formed in the same pass, while the chunk's logits are hot, instead of in a
  second pass over stored logits; the result equals autodiff's up to float
  rounding (tests/test_losses.py).

  `positions` < 1 (`model.loss_positions`) runs the projection on each
  row's positions of nonzero weight only, gathered in order into
  ceil(positions * T) slots, or 2x, 4x ... that when the batch's longest
  row needs more (`head_plan`; one branch of a switch runs). Where the
  loss covers a small part of the sequence (answers after a prompt and
  576 image tokens), the head's FLOPs and logits shrink with it. The sums
  and the gradients of x and w are the same either way; the cotangent of
  `weights` is exact where a weight is nonzero (elsewhere it may be 0).
  """
  t = x.shape[1]
  if not 0 < positions <= 1:
    raise ValueError(f"model.loss_positions={positions} must be in (0, 1]")
  if chunk_len and t % chunk_len:
    raise ValueError(f"sequence length {t} is not a multiple of the loss "
                     f"chunk length {chunk_len} (model.loss_chunk_len)")
  return _head_cross_entropy(x, w, jnp.asarray(targets),
                             weights.astype(jnp.float32), float(z_loss),
                             head_plan(t, positions, chunk_len))
