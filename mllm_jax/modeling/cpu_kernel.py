"""The fused CPU attention kernel (`cpu_attention.cc`) as a differentiable op.

The C++ source is compiled on first use for this machine's CPU (`-O3
-march=native`, with the compiler in `$CXX` or g++) into a cache directory
keyed by the source, the flags, jaxlib's version and the CPU, then
registered as two XLA FFI targets: the forward pass (output and per-row
log-sum-exp) and the backward pass (dq, dk, dv from recomputed
probabilities and rowsum(dO * O)). `model.attention_backend='cpu_fused'`
selects it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FORWARD = "mllm_jax_cpu_attention_forward"
BACKWARD = "mllm_jax_cpu_attention_backward"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-Wno-attributes", "-Wno-return-type")


def cache_dir() -> pathlib.Path:
  """Where compiled kernels live: $MLLM_JAX_KERNEL_CACHE, else
  ~/.cache/mllm_jax/kernels, else (home not writable) the temp directory."""
  if "MLLM_JAX_KERNEL_CACHE" in os.environ:
    return pathlib.Path(os.environ["MLLM_JAX_KERNEL_CACHE"])
  home = pathlib.Path.home() / ".cache" / "mllm_jax" / "kernels"
  try:
    home.mkdir(parents=True, exist_ok=True)
    return home
  except OSError:
    temp = pathlib.Path(tempfile.gettempdir())
    return temp / f"mllm_jax_kernels_{os.getuid()}"


def _cpu_identity() -> str:
  """The CPU model and feature flags: `-march=native` code is only valid on
  the CPU it was compiled for."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform
    return platform.processor() + platform.machine()
  wanted = ("model name", "flags", "Features", "CPU part")
  seen = {}
  for line in lines:
    key = line.split(":")[0].strip()
    if key in wanted and key not in seen:
      seen[key] = line
  return "\n".join(seen.values())


def _compiler() -> str:
  compiler = (os.environ.get("CXX") or shutil.which("g++")
              or shutil.which("c++") or shutil.which("clang++"))
  if not compiler:
    raise RuntimeError(
        "model.attention_backend='cpu_fused' compiles a C++ kernel on first "
        "use, but no C++ compiler was found: install g++ or set $CXX, or use "
        "model.attention_backend='xla'")
  return compiler


def build() -> pathlib.Path:
  """Compiles the kernel unless this source, compiler, jaxlib and CPU
  already have a build; returns the shared library."""
  compiler = _compiler()
  include = f"-I{jax.ffi.include_dir()}"
  key = hashlib.sha256("\n".join(
      [SOURCE.read_text(), compiler, *FLAGS, jaxlib.__version__,
       _cpu_identity()]).encode()).hexdigest()[:16]
  library = cache_dir() / f"cpu_attention-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name and rename: parallel test workers may race.
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    target = pathlib.Path(tmp) / library.name
    result = subprocess.run([compiler, *FLAGS, include, str(SOURCE), "-o",
                             str(target)], capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE} with {compiler} failed:\n"
                         f"{result.stderr[-4000:]}")
    os.replace(target, library)
  return library


@functools.cache
def load() -> None:
  """Builds (if needed) and registers the FFI targets, once per process."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for name, symbol in ((FORWARD, library.MllmAttentionForward),
                       (BACKWARD, library.MllmAttentionBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol),
                                platform="cpu")


def _like(x: jax.Array, shape=None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape if shape is None else shape,
                              jnp.float32)


def _forward(q, k, v, bias):
  b, t, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(FORWARD, (_like(q), _like(q, (b, h, t))))(
      q, k, v, bias)
  return out, (q, k, v, bias, out, lse)


def _backward(residuals, d_out):
  q, k, v, bias, out, lse = residuals
  # rowsum(P * dP) == rowsum(dO * O), one streaming pass here.
  deltas = jnp.einsum("bthd,bthd->bth", d_out, out)
  d_q, d_k, d_v = jax.ffi.ffi_call(BACKWARD, (_like(q), _like(k), _like(v)))(
      q, k, v, bias, deltas, lse, d_out)
  return d_q, d_k, d_v, None


@jax.custom_vjp
def fused_attention_core(q, k, v, bias):
  """Softmax attention in float32: q [B,T,H,D], k/v [B,S,KV,D], additive
  bias [B, 1|H, T, S] (masked entries at MASK_VALUE) -> [B,T,H,D]."""
  return _forward(q, k, v, bias)[0]


fused_attention_core.defvjp(_forward, _backward)
