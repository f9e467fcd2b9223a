"""C++ kernels for CPU, compiled on first use and registered with XLA's FFI.

A kernel's source is compiled for this machine's CPU (`-O3 -march=native`,
with the compiler in `$CXX` or g++) into a cache directory keyed by the
source, the compiler and its flags, jaxlib's version and the CPU, so the
build (a few seconds) happens once per machine. Used by the fused attention
(`kernels/cpu_attention.py`) and the fused AdamW (`kernels/cpu_adamw.py`).
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
import jaxlib

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


def _compiler(alternative: str) -> str:
  compiler = (os.environ.get("CXX") or shutil.which("g++")
              or shutil.which("c++") or shutil.which("clang++"))
  if not compiler:
    raise RuntimeError(
        "this option compiles a C++ kernel on first use, but no C++ compiler "
        f"was found: install g++ or set $CXX, or use {alternative}")
  return compiler


def build(source: pathlib.Path, extra_flags: tuple[str, ...] = (),
          alternative: str = "the XLA path") -> pathlib.Path:
  """Compiles `source` unless this source, compiler, flags, jaxlib and CPU
  already have a build; returns the shared library. `alternative` names the
  option to use instead when no compiler is found."""
  compiler = _compiler(alternative)
  flags = (*FLAGS, *extra_flags)
  include = f"-I{jax.ffi.include_dir()}"
  key = hashlib.sha256("\n".join(
      [source.read_text(), compiler, *flags, jaxlib.__version__,
       _cpu_identity()]).encode()).hexdigest()[:16]
  library = cache_dir() / f"{source.stem}-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name and rename: parallel test workers may race.
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    target = pathlib.Path(tmp) / library.name
    result = subprocess.run([compiler, *flags, include, str(source), "-o",
                             str(target)], capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {source} with {compiler} failed:\n"
                         f"{result.stderr[-4000:]}")
    os.replace(target, library)
  return library


@functools.cache
def load(source: pathlib.Path, targets: tuple[tuple[str, str], ...],
         extra_flags: tuple[str, ...] = (),
         alternative: str = "the XLA path") -> None:
  """Builds `source` (if needed) and registers each (FFI target name,
  exported handler symbol) pair for the CPU, once per process."""
  library = ctypes.cdll.LoadLibrary(
      str(build(source, extra_flags, alternative)))
  for name, symbol in targets:
    jax.ffi.register_ffi_target(
        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
