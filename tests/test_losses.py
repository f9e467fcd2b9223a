"""The cross-entropy's hand-written backward against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.train.losses import token_cross_entropy, weighted_mean


def reference_cross_entropy(logits, targets, z_loss=0.0):
  """The plain formula, differentiated by JAX."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target + z_loss * jnp.square(log_z)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_and_gradient_match_autodiff(z_loss, dtype):
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 5, 37) * 4, dtype)
  targets = jnp.asarray(rng.randint(0, 37, (3, 5)))
  weights = jnp.asarray(rng.rand(3, 5), jnp.float32)

  def total(fn):
    return lambda x: weighted_mean(fn(x, targets, z_loss), weights)

  ours, grad = jax.value_and_grad(total(token_cross_entropy))(logits)
  theirs, grad_ref = jax.value_and_grad(total(reference_cross_entropy))(
      logits)
  assert ours.dtype == jnp.float32 and grad.dtype == dtype
  np.testing.assert_array_equal(
      token_cross_entropy(logits, targets, z_loss),
      reference_cross_entropy(logits, targets, z_loss))
  assert float(ours) == float(theirs)
  np.testing.assert_allclose(np.float32(grad), np.float32(grad_ref),
                             rtol=1e-5, atol=1e-7)


def test_cross_entropy_under_jit_and_vmap():
  rng = np.random.RandomState(1)
  logits = jnp.asarray(rng.randn(4, 6, 11), jnp.float32)
  targets = jnp.asarray(rng.randint(0, 11, (4, 6)))
  mapped = jax.jit(jax.vmap(jax.grad(
      lambda x, t: token_cross_entropy(x, t).sum())))(logits, targets)
  direct = jax.grad(lambda x: token_cross_entropy(x, targets).sum())(logits)
  np.testing.assert_allclose(mapped, direct, rtol=1e-6, atol=1e-7)
