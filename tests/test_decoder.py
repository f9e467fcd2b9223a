"""Numerics of the decoder: attention variants, masks, the KV cache, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.modeling import KVCache
from mllm_jax.modeling.layers import alibi_slopes, rope_frequencies
from mllm_jax.train.losses import token_cross_entropy
from tests.helpers import (numpy_forward, rel_err, replace, tiny_config,
                           tiny_model, with_config)

TOKENS = np.random.RandomState(0).randint(0, 512, (2, 11))


@pytest.mark.parametrize("preset", ["tiny_mha", "tiny", "tiny_mqa"])
def test_matches_independent_numpy_reference(preset):
  _, model = tiny_model(preset)
  assert rel_err(model(TOKENS), numpy_forward(model, TOKENS)) < 1e-5


def test_gqa_with_all_kv_heads_is_multi_head():
  """num_kv_heads == num_heads is plain MHA: same as repeating GQA's K/V."""
  cfg, gqa = tiny_model("tiny")  # 4 query heads share 2 K/V heads
  _, mha = tiny_model("tiny_mha")
  assert mha.cfg.kv_heads == mha.cfg.num_heads
  state = nnx.state(gqa)
  groups = cfg.num_heads // cfg.kv_heads
  mha_state = nnx.state(mha)
  attn = state["blocks"]["attn"]
  for name in ("k", "v"):
    attn[name] = attn[name].replace(
        value=jnp.repeat(attn[name].get_value(), groups, axis=2))
  nnx.update(mha, state)
  assert rel_err(mha(TOKENS), gqa(TOKENS)) < 1e-6


def test_packed_batch_equals_examples_one_by_one():
  _, model = tiny_model("tiny")
  rng = np.random.RandomState(1)
  lengths = [5, 7, 3]
  examples = [rng.randint(1, 512, n) for n in lengths]
  pad = 2
  tokens = np.concatenate(examples + [np.zeros(pad, int)])[None]
  segment_ids = np.concatenate(
      [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
  positions = np.concatenate([np.arange(n) for n in lengths + [pad]])
  targets = np.roll(tokens, -1, axis=1)
  packed = token_cross_entropy(
      model(tokens, positions[None], segment_ids[None].astype(np.int32)),
      targets)[0]
  start = 0
  for ex in examples:
    alone = token_cross_entropy(model(ex[None]), np.roll(ex, -1)[None])[0]
    n = len(ex) - 1  # the last token's target belongs to the next example
    np.testing.assert_allclose(packed[start:start + n], alone[:n], rtol=1e-5,
                               atol=1e-6)
    start += len(ex)


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}), ("tiny_mqa", {}), ("tiny", {"position": "alibi"}),
    ("tiny", {"tie_embeddings": True})])
def test_kv_cache_decoding_equals_full_forward(preset, overrides):
  cfg, model = tiny_model(preset, **overrides)
  full = model(TOKENS)
  cache = KVCache.create(cfg, batch=2, max_len=16)
  step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c))
  logits, cache = step(model, TOKENS[:, :4], jnp.tile(jnp.arange(4), (2, 1)),
                       cache)
  pieces = [logits]
  for i in range(4, TOKENS.shape[1]):
    logits, cache = step(model, TOKENS[:, i:i + 1], jnp.full((2, 1), i), cache)
    pieces.append(logits)
  assert int(cache.index) == TOKENS.shape[1]
  assert rel_err(jnp.concatenate(pieces, axis=1), full) < 1e-5


def test_prefix_is_bidirectional_and_the_rest_causal():
  _, model = tiny_model("tiny")
  prefix = np.zeros((2, 11), bool)
  prefix[:, :4] = True
  base = model(TOKENS, prefix_mask=prefix)
  changed = TOKENS.copy()
  changed[:, 3] = (changed[:, 3] + 1) % 512  # last prefix token
  out = model(changed, prefix_mask=prefix)
  # Earlier prefix tokens see the change (bidirectional) ...
  assert np.abs(out[:, 0] - base[:, 0]).max() > 1e-4
  # ... while without a prefix they cannot (causal).
  assert np.allclose(model(changed)[:, :3], model(TOKENS)[:, :3], atol=1e-6)
  # Tokens after the prefix still only see the past.
  later = changed.copy()
  later[:, 8] = (later[:, 8] + 1) % 512
  np.testing.assert_allclose(model(later, prefix_mask=prefix)[:, :8],
                             out[:, :8], atol=1e-6)


def test_input_embeddings_replace_the_token_lookup():
  """The multimodal path: embeddings given directly (here the tokens' own,
  then one position replaced by a foreign vector) drive the decoder."""
  _, model = tiny_model("tiny")
  embedded = model.embed_tokens(TOKENS)
  np.testing.assert_array_equal(model(None, embeddings=embedded),
                                model(TOKENS))
  spliced = embedded.at[:, 2].set(0.5)  # an "image feature" at position 2
  out = model(TOKENS, embeddings=spliced)
  np.testing.assert_array_equal(out[:, :2], model(TOKENS)[:, :2])
  assert np.abs(out[:, 2:] - model(TOKENS)[:, 2:]).max() > 1e-4
  with pytest.raises(ValueError, match="embed_dim"):
    model(None, embeddings=embedded[..., :8])


def test_the_train_step_trains_a_bidirectional_prefix():
  """A `prefix_mask` field in the batch reaches attention: the prefix-LM
  loss differs from the causal one, and training on it lowers it."""
  from mllm_jax.train.config import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from mllm_jax.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from mllm_jax.train.step import init_train_state  # pylint: disable=g-import-not-at-top
  from tests.helpers import NOTHING_FROZEN, lm_train_step  # pylint: disable=g-import-not-at-top
  _, model = tiny_model("tiny")
  graphdef, params = nnx.split(model)
  b, t = TOKENS.shape
  prefix = np.zeros((b, t - 1), bool)
  prefix[:, :5] = True
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "loss_weights": (~prefix).astype(np.float32),  # loss after it
           "segment_ids": np.ones((b, t - 1), np.int32),
           "positions": np.tile(np.arange(t - 1, dtype=np.int32), (b, 1))}
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2,
                                             warmup_steps=0), params, 10)
  step = jax.jit(lm_train_step(graphdef, optimizer, lambda count: 1e-2))
  state = init_train_state(params, optimizer)
  _, causal = step(state, NOTHING_FROZEN, batch)
  losses = []
  for _ in range(5):
    state, metrics = step(state, NOTHING_FROZEN,
                          {**batch, "prefix_mask": prefix})
    losses.append(float(metrics["loss"]))
  assert abs(losses[0] - float(causal["loss"])) > 1e-5
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["dot_product", "splash", "cpu_fused"])
def test_attention_backends_agree_with_reference(backend):
  cfg, model = tiny_model("tiny")
  other = with_config(model, replace(cfg, attention_backend=backend))
  t = 128  # splash works in whole blocks
  tokens = np.random.RandomState(2).randint(0, 512, (2, t))
  segment_ids = np.where(np.arange(t) < 50, 1, 2)[None].repeat(2, 0)
  positions = np.where(np.arange(t) < 50, np.arange(t), np.arange(t) - 50)
  positions = positions[None].repeat(2, 0)
  assert rel_err(other(tokens, positions, segment_ids),
                 model(tokens, positions, segment_ids)) < 1e-5


@pytest.mark.parametrize("backend", ["dot_product", "cpu_fused"])
def test_backend_with_prefix_and_alibi(backend):
  cfg, model = tiny_model("tiny", position="alibi")
  other = with_config(model, replace(cfg, attention_backend=backend))
  prefix = np.zeros((2, 11), bool)
  prefix[:, :3] = True
  assert rel_err(other(TOKENS, prefix_mask=prefix),
                 model(TOKENS, prefix_mask=prefix)) < 1e-5


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_leave_gradients_unchanged(policy):
  cfg, model = tiny_model("tiny")
  remat = with_config(model, replace(cfg, remat=policy))

  def grads(m):
    def loss(m):
      return token_cross_entropy(m(TOKENS), np.roll(TOKENS, -1, 1)).mean()
    return jax.tree.leaves(nnx.grad(loss)(m))

  for a, b in zip(grads(remat), grads(model)):
    assert rel_err(a, b) < 1e-5


def test_mixed_precision_keeps_float32_params_and_logits():
  cfg, model = tiny_model("tiny", dtype="bfloat16")
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  logits = model(TOKENS)
  assert logits.dtype == jnp.float32
  exact = with_config(model, replace(cfg, dtype="float32"))(TOKENS)
  assert rel_err(logits, exact) < 5e-2  # bf16 rounding, not a different model
  cfg16, model16 = tiny_model("tiny", param_dtype="bfloat16")
  assert all(p.dtype == jnp.bfloat16
             for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  assert model16(TOKENS).dtype == jnp.float32


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  # Not a power of two: the 8 slopes of 8 heads, then odd ones of 16.
  np.testing.assert_allclose(
      alibi_slopes(12)[8:], (2.0 ** -(np.arange(1, 17) / 2))[0::2][:4])


def test_rope_scaling_variants():
  base = rope_frequencies(tiny_config("tiny"))
  linear = rope_frequencies(tiny_config("tiny", rope_scaling="linear",
                                        rope_scaling_factor=4.0))
  np.testing.assert_allclose(linear, base / 4, rtol=1e-6)
  cfg = tiny_config("tiny", rope_scaling="llama3", rope_scaling_factor=8.0,
                    rope_original_max_len=64, rope_theta=500000.0)
  scaled = rope_frequencies(cfg)
  plain = rope_frequencies(replace(cfg, rope_scaling="none"))
  wavelen = 2 * np.pi / plain
  high = wavelen < 64 / 4.0   # short wavelengths: unchanged
  low = wavelen > 64 / 1.0    # long wavelengths: slowed by the factor
  np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
  np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
  mid = ~high & ~low
  assert np.all((scaled[mid] <= plain[mid]) & (scaled[mid] >= plain[mid] / 8))


@pytest.mark.parametrize("backend", ["xla", "cpu_fused"])
@pytest.mark.parametrize("preset,overrides,prefix", [
    ("tiny", {}, False), ("tiny_mha", {}, False), ("tiny_mqa", {}, False),
    ("tiny", {"position": "alibi"}, True), ("tiny", {"remat": "full"}, False),
    ("tiny", {"tie_embeddings": True}, True)])
def test_custom_vjp_gradients_equal_autodiff(preset, overrides, prefix,
                                             backend):
  """model.custom_vjp (hand-written attention, SwiGLU and RMSNorm backward
  passes), alone or with the fused CPU attention kernel, computes the same
  loss and gradients as plain autodiff, on a packed batch with padding (rows
  whose every key is masked)."""
  cfg, model = tiny_model(preset, **overrides)
  fused = with_config(model, replace(cfg, custom_vjp=True,
                                     attention_backend=backend))
  segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11])
  positions = np.array([list(range(5)) + list(range(4)) + [0, 1],
                        list(range(11))])
  prefix_mask = np.zeros((2, 11), bool)
  if prefix:
    prefix_mask[:, :3] = True

  def loss(m):
    logits = m(TOKENS, positions, segment_ids,
               prefix_mask=prefix_mask if prefix else None)
    ce = token_cross_entropy(logits, np.roll(TOKENS, -1, 1))
    return (ce * (segment_ids > 0)).mean()

  loss_a, grads_a = nnx.value_and_grad(loss)(fused)
  loss_b, grads_b = nnx.value_and_grad(loss)(model)
  assert rel_err(loss_a, loss_b) < 1e-6
  flat_a = nnx.to_flat_state(grads_a)
  flat_b = dict(nnx.to_flat_state(grads_b))
  for path, g in flat_a:
    assert rel_err(g.get_value(), flat_b[path].get_value()) < 1e-5, path


def test_custom_vjp_in_bfloat16_is_as_close_to_float32_as_autodiff():
  """In bfloat16 both backward passes round differently; the hand-written one
  must stay as close to the float32 gradients as autodiff's is."""
  cfg, model = tiny_model("tiny", dtype="float32")

  def grads(c):
    m = with_config(model, c)
    return jax.tree.leaves(nnx.grad(lambda m: token_cross_entropy(
        m(TOKENS), np.roll(TOKENS, -1, 1)).mean())(m))

  exact = grads(cfg)
  plain = grads(replace(cfg, dtype="bfloat16"))
  fused = grads(replace(cfg, dtype="bfloat16", custom_vjp=True))
  err = lambda g: max(rel_err(a, b) for a, b in zip(g, exact))
  assert err(fused) < max(1.5 * err(plain), 1e-2)
