"""Next-token losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import functools

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
