"""The losses' hand-written backward passes against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.train.losses import (head_cross_entropy, head_plan,
                                   token_cross_entropy, weighted_mean)


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


@pytest.mark.parametrize("chunk_len", [0, 4])
@pytest.mark.parametrize("longest", [8, 16, 20])
def test_head_on_weighted_positions_only_gives_the_same_loss(chunk_len,
                                                             longest):
  """model.loss_positions < 1 gathers each row's weighted positions before
  the head, into 8, 16 or all 32 slots as the longest row needs. The sums
  and the gradients of x and w are the full head's on every branch."""
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(3, 32, 8), jnp.float32)
  w = jnp.asarray(rng.randn(8, 23) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.randint(0, 23, (3, 32)))
  weights = np.zeros((3, 32), np.float32)
  weights[0, 24:32] = 1.0      # an answer at the end of the row
  weights[1, [2, 5, 6]] = 0.5  # scattered, fractional weights
  weights[2, 1:1 + longest] = 1.0
  weights = jnp.asarray(weights)
  assert head_plan(32, 0.25, chunk_len) == (
      ((8, 2), (16, 4), (32, 8)) if chunk_len else ((8, 1), (16, 1), (32, 1)))

  def head(x, w, positions):
    return head_cross_entropy(x, w, targets, weights, 1e-3, chunk_len,
                              positions)
  for a, b in zip(head(x, w, 0.25), head(x, w, 1.0)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  grad = lambda positions: jax.jit(jax.grad(
      lambda x, w: 0.5 * head(x, w, positions)[0], argnums=(0, 1)))(x, w)
  for g, g_full in zip(grad(0.25), grad(1.0)):
    np.testing.assert_allclose(g, g_full, rtol=1e-5, atol=1e-7)
  # Where a weight is nonzero its cotangent (the position's loss) is kept.
  d_weights = jax.grad(lambda wt: head_cross_entropy(
      x, w, targets, wt, 0.0, chunk_len, 0.25)[0])(weights)
  d_full = jax.grad(lambda wt: head_cross_entropy(
      x, w, targets, wt, 0.0, chunk_len)[0])(weights)
  np.testing.assert_allclose(np.where(weights != 0, d_weights, 0),
                             np.where(weights != 0, d_full, 0), rtol=1e-6)
  # Which branch ran: a NaN at a weight-0 position reaches the sum (as
  # 0 * NaN) only when every position goes through the head.
  probe = x.at[0, 20].set(jnp.nan)  # never gathered: row 0 fills 16 first
  loss = head_cross_entropy(probe, w, targets, weights, 0.0, chunk_len,
                            0.25)[0]
  assert bool(jnp.isnan(loss)) == (longest > 16)


def test_head_plan_rounds_to_the_chunk_and_checks_the_share():
  assert head_plan(320, 0.125) == ((40, 1), (80, 1), (160, 1), (320, 1))
  assert head_plan(320, 0.1) == ((32, 1), (64, 1), (128, 1), (256, 1),
                                 (320, 1))
  assert head_plan(1024, 0.1, 128) == ((128, 1), (256, 2), (512, 4),
                                       (1024, 8))
  assert head_plan(320, 0.99) == ((320, 1),)  # every position: no selection
  assert head_plan(320) == ((320, 1),)
  x = jnp.zeros((1, 8, 4))
  with pytest.raises(ValueError, match="loss_positions"):
    head_cross_entropy(x, jnp.zeros((4, 5)), jnp.zeros((1, 8), jnp.int32),
                       jnp.ones((1, 8)), 0.0, 0, 0.0)
