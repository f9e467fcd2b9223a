"""The fused CPU attention kernel (`cpu_attention.cc`) as a differentiable op.

The C++ source is compiled on first use (`kernels/build.py`) and registered
as two XLA FFI targets: the forward pass (output and per-row
log-sum-exp) and the backward pass (dq, dk, dv from recomputed
probabilities and rowsum(dO * O)). `model.attention_backend='cpu_fused'`
selects it.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from mllm_jax.kernels import build as native

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FORWARD = "mllm_jax_cpu_attention_forward"
BACKWARD = "mllm_jax_cpu_attention_backward"
ALTERNATIVE = "model.attention_backend='xla'"


def build() -> pathlib.Path:
  """The kernel's shared library, compiled unless already cached."""
  return native.build(SOURCE, alternative=ALTERNATIVE)


def load() -> None:
  """Builds (if needed) and registers the FFI targets, once per process."""
  native.load(SOURCE, ((FORWARD, "MllmAttentionForward"),
                       (BACKWARD, "MllmAttentionBackward")),
              alternative=ALTERNATIVE)


# Under vmap (the pipeline's stages, `parallel/pipeline.py`) the kernel runs
# once per vmapped index: each stage's device holds one, so the loop is 1 long.
VMAP_METHOD = "sequential"


def _like(x: jax.Array, shape=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape if shape is None else shape,
                              jnp.float32)


def _forward(q, k, v, bias):
  b, t, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(FORWARD, (_like(q), _like(q, (b, h, t))),
                              vmap_method=VMAP_METHOD)(q, k, v, bias)
  return out, (q, k, v, bias, out, lse)


def _backward(residuals, d_out):
  q, k, v, bias, out, lse = residuals
  # rowsum(P * dP) == rowsum(dO * O), one streaming pass here.
  deltas = jnp.einsum("bthd,bthd->bth", d_out, out)
  d_q, d_k, d_v = jax.ffi.ffi_call(
      BACKWARD, (_like(q), _like(k), _like(v)), vmap_method=VMAP_METHOD)(
          q, k, v, bias, deltas, lse, d_out)
  return d_q, d_k, d_v, None


@jax.custom_vjp
def fused_attention_core(q, k, v, bias):
  """Softmax attention in float32: q [B,T,H,D], k/v [B,S,KV,D], additive
  bias [B, 1|H, T, S] (masked entries at MASK_VALUE) -> [B,T,H,D]."""
  return _forward(q, k, v, bias)[0]


fused_attention_core.defvjp(_forward, _backward)
