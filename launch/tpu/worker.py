"""Runs one launch binary on a TPU VM worker, with jax.distributed started
before the binary's own code.

  MLLM_JAX_DISTRIBUTED=auto MLLM_JAX_EXPECT_PROCESSES=32 \
      python -m launch.tpu.worker launch.pretrain --config=... --workdir=...

launch.tpu.launch runs this on every worker of every slice. Why a wrapper:
the training binaries join the other hosts in `start_process`, but others
(generate, evaluate, aot_compile) never call it, and on a TPU VM the worker
list is in the VM's metadata, not in environment variables. Starting JAX's
multi-controller runtime here makes every binary multi-host, and the
binaries' own `initialize_distributed` then finds it running and does
nothing. A worker that sees fewer processes than the slice has hosts stops
with a message instead of hanging in the first collective.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

USAGE = ("usage: python -m launch.tpu.worker launch.BINARY [FLAGS...] "
         "(e.g. launch.pretrain --config=configs/pretrain.py:7b ...)")


def check_binary(module: str) -> None:
  """SystemExit unless `module` is one of the project's launch binaries."""
  if not module.startswith("launch.") or module.startswith("launch.tpu"):
    raise SystemExit(f"{USAGE}\nnot a launch binary: {module!r}")
  if importlib.util.find_spec(module) is None:
    raise SystemExit(f"{USAGE}\nno such binary: {module!r}")


def start_distributed() -> None:
  """jax.distributed via the project's helper; checks the process count."""
  import jax  # pylint: disable=g-import-not-at-top
  from mllm_jax.parallel.mesh import initialize_distributed  # pylint: disable=g-import-not-at-top
  initialize_distributed()
  expected = os.environ.get("MLLM_JAX_EXPECT_PROCESSES")
  if expected and jax.process_count() != int(expected):
    raise SystemExit(
        f"jax.distributed joined {jax.process_count()} processes, expected "
        f"{expected} (one per TPU VM host of every slice): is a worker down?")
  slices = {getattr(d, "slice_index", 0) for d in jax.devices()}
  print(f"[worker] process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} devices, "
        f"{len(slices)} slice(s)", flush=True)


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    raise SystemExit(USAGE)
  module = argv[1]
  check_binary(module)
  start_distributed()
  sys.argv = [module, *argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main(sys.argv)
