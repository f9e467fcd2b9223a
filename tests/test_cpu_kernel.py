"""The fused C++ CPU attention kernel computes `xla_attention` and its
gradients: odd sizes, GQA/MQA, packed segments, padding rows whose every key
is masked, bidirectional prefixes and per-head ALiBi biases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.configlib import ConfigError
from mllm_jax.kernels import build as native
from mllm_jax.kernels import cpu_attention
from mllm_jax.modeling.attention import (attention_bias, attention_mask,
                                         cpu_fused_attention, xla_attention)
from mllm_jax.modeling.layers import alibi_slopes
from tests.helpers import rel_err, tiny_config


def inputs(b, t, h, kv, d, pad=0, prefix=0, alibi=False, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, kv, d))
  v = jax.random.normal(keys[2], (b, t, kv, d))
  # Two packed documents per row, then `pad` padding positions.
  segments = np.where(np.arange(t) < t // 3, 1, 2)[None].repeat(b, 0)
  positions = np.where(np.arange(t) < t // 3, np.arange(t),
                       np.arange(t) - t // 3)[None].repeat(b, 0)
  if pad:
    segments[:, t - pad:] = 0
  slots = np.broadcast_to(np.arange(t), (b, t))
  in_prefix = np.broadcast_to(np.arange(t) < prefix, (b, t))
  mask = attention_mask(jnp.asarray(segments), jnp.asarray(segments), slots,
                        slots, in_prefix if prefix else None,
                        in_prefix if prefix else None)
  bias = None
  if alibi:
    distance = positions[:, None, :] - positions[:, :, None]  # [B, T, S]
    bias = jnp.asarray(alibi_slopes(h))[None, :, None, None] * distance[:, None]
  return q, k, v, mask, bias


CASES = [
    dict(b=1, t=7, h=2, kv=1, d=8),  # MQA, shorter than a vector
    dict(b=2, t=33, h=4, kv=2, d=20, pad=3),  # GQA, odd sizes, padding rows
    dict(b=2, t=130, h=4, kv=4, d=64, pad=5, prefix=9),  # 3 query blocks
    dict(b=1, t=70, h=4, kv=2, d=128, alibi=True, prefix=4),  # per-head bias
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_xla_attention_and_its_gradients(case):
  q, k, v, mask, bias = inputs(**case)
  cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

  def run(attention):
    out, vjp = jax.vjp(lambda *x: attention(*x, mask, bias), q, k, v)
    return (out, *vjp(cotangent))

  want = run(xla_attention)
  got = jax.jit(lambda: run(cpu_fused_attention))()
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(g, w) < 2e-6, name


def test_padding_rows_match_the_reference_uniform_softmax():
  """A row with no key to attend to averages every value, as the reference
  softmax over all-masked scores does, and passes no gradient to q."""
  q, k, v, mask, _ = inputs(b=1, t=20, h=2, kv=2, d=16, pad=4)
  out = cpu_fused_attention(q, k, v, mask)
  np.testing.assert_allclose(out[0, -1], v[0].mean(0), rtol=1e-5, atol=1e-6)
  dq = jax.grad(lambda q: cpu_fused_attention(q, k, v, mask).sum())(q)
  assert np.all(np.asarray(dq[0, -4:]) == 0)


def test_bfloat16_inputs_run_in_float32_and_keep_their_dtype():
  q, k, v, mask, _ = inputs(b=1, t=16, h=2, kv=1, d=16)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = cpu_fused_attention(q, k, v, mask)
  assert out.dtype == jnp.bfloat16
  want = xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
  assert rel_err(out, want) < 1e-2


def test_second_build_reuses_the_cached_library(tmp_path, monkeypatch):
  monkeypatch.setenv("MLLM_JAX_KERNEL_CACHE", str(tmp_path))
  library = cpu_attention.build()
  assert library.parent == tmp_path and library.exists()
  stamp = library.stat().st_mtime_ns
  assert cpu_attention.build() == library
  assert library.stat().st_mtime_ns == stamp  # not rebuilt


def test_missing_compiler_names_the_backend_and_the_fix(monkeypatch):
  monkeypatch.setenv("CXX", "")
  monkeypatch.setattr(native.shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match="attention_backend='xla'"):
    cpu_attention.build()


def test_mismatched_shapes_are_refused_by_the_kernel():
  cpu_attention.load()  # registered here, whichever test ran before
  q, k, v, mask, _ = inputs(b=1, t=16, h=2, kv=1, d=16)
  bias = attention_bias(mask)
  with pytest.raises(Exception, match="bias must be"):
    cpu_attention.fused_attention_core(q, k, v, bias[:, :, :8])
  with pytest.raises(Exception, match="k and v shapes differ"):
    cpu_attention.fused_attention_core(q, k, v[:, :8], bias)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_refused_off_cpu_with_a_named_alternative(platform):
  cfg = tiny_config("tiny", attention_backend="cpu_fused")
  with pytest.raises(ConfigError, match="attention_backend.*'xla'"):
    cfg.check_platform(platform)
