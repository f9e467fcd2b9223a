"""Test set-up: CPU JAX with 8 simulated devices, before JAX is imported."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

# One persistent compilation cache for the run, shared by the xdist workers
# and by the stage binaries the tests start (they inherit the environment):
# a tiny model's train step compiles once, not once per test and process.
# Its keys hold the HLO, the flags and the JAX version, so a stale entry is
# never used. Every executable is kept, the small ones too: a stage binary
# compiles about 90, most in under 0.5 s, and a warm SFT test run took 22 s
# with all of them cached against 30 s with only those over 0.5 s.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"mllm_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
