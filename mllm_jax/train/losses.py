"""Next-token losses, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        z_loss: float = 0.0) -> jax.Array:
  """Per-token -log p(target), plus z_loss * logsumexp^2 (PaLM) if asked.

  logits [..., V] (any float dtype), targets [...] int -> float32 [...].
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = log_z - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return loss


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of `values` under `weights` (0 where there is no target)."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
