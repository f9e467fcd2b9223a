"""The losses' hand-written backward passes against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.train.losses import (head_cross_entropy, token_cross_entropy,
                                   weighted_mean)


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


def reference_head_sums(x, w, targets, weights, z_loss):
  """Logits, then the weighted loss sums, all differentiated by JAX."""
  logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
  loss = reference_cross_entropy(logits, targets, z_loss)
  ce = reference_cross_entropy(logits, targets)
  return jnp.sum(loss * weights), jnp.sum(ce * weights)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("chunk_len", [0, 2, 4])
def test_head_cross_entropy_matches_logits_then_loss(z_loss, chunk_len):
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(3, 8, 16), jnp.float32)
  w = jnp.asarray(rng.randn(16, 29) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.randint(0, 29, (3, 8)))
  weights = jnp.asarray(rng.rand(3, 8) > 0.3, jnp.float32)  # some padding

  def ours(x, w, weights):
    return head_cross_entropy(x, w, targets, weights, z_loss, chunk_len)

  def theirs(x, w, weights):
    return reference_head_sums(x, w, targets, weights, z_loss)

  for a, b in zip(ours(x, w, weights), theirs(x, w, weights)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # The step scales the loss sum's cotangent; weights get d/dweight = loss.
  grad = jax.jit(jax.grad(lambda *a: 0.5 * ours(*a)[0], argnums=(0, 1, 2)))
  grad_ref = jax.grad(lambda *a: 0.5 * theirs(*a)[0], argnums=(0, 1, 2))
  for g, g_ref in zip(grad(x, w, weights), grad_ref(x, w, weights)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
  # The CE sum is a metric: no gradient flows from it.
  zero = jax.grad(lambda x: ours(x, w, weights)[1])(x)
  assert not np.any(zero)


def test_head_cross_entropy_bfloat16_and_bad_chunk():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 6, 8), jnp.bfloat16)
  w = jnp.asarray(rng.randn(8, 13) * 0.5, jnp.bfloat16)
  targets = jnp.asarray(rng.randint(0, 13, (2, 6)))
  weights = jnp.ones((2, 6), jnp.float32)
  grads = jax.grad(lambda x, w: head_cross_entropy(
      x, w, targets, weights, 0.0, 3)[0], argnums=(0, 1))(x, w)
  grads_ref = jax.grad(lambda x, w: reference_head_sums(
      x, w, targets, weights, 0.0)[0], argnums=(0, 1))(x, w)
  for g, g_ref in zip(grads, grads_ref):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g), np.float32(g_ref), rtol=2e-2,
                               atol=2e-2)
  with pytest.raises(ValueError, match="loss_chunk_len"):
    head_cross_entropy(x, w, targets, weights, 0.0, 4)
