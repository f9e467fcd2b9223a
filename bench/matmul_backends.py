r"""Which library does XLA:CPU's matmul, and does another one close the gap
to torch (oneDNN/MKL on Intel)? Same process kind, same shapes, same run.

  python bench/matmul_backends.py [--threads=N] [--repeats=7]

Times float32 matmuls with JAX under each XLA:CPU dot backend (default
Eigen/YNNPACK choice, oneDNN, XNNPACK, YNNPACK: selected by XLA flags, each in
its own process because XLA reads its flags once) and with torch, on the
square 2048^2 peak shape and on the training-step bench's own GEMMs
(bench/train_step.py: 2048 tokens x d=512 x SwiGLU 1408, vocab 8192), and
prints GFLOP/s and the ratio to torch. No result in a busy host: the host
line and the load average print first and last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402

# (name, XLA_FLAGS): each flag routes XLA:CPU's dots to another library.
BACKENDS = (
    ("xla default", ""),
    ("xla onednn", "--xla_cpu_use_onednn=true "
                   "--xla_cpu_experimental_onednn_fusion_type=dot"),
    ("xla xnnpack", "--xla_cpu_use_xnnpack=true "
                    "--xla_cpu_experimental_xnn_fusion_type=dot"),
    ("xla ynnpack", "--xla_cpu_experimental_ynn_fusion_type=dot"),
    ("xla eigen", "--xla_cpu_experimental_ynn_fusion_type= "
                  "--xla_cpu_use_xnnpack=false"),
)
# (label, m, k, n): the square peak and bench/train_step.py's GEMMs.
SHAPES = (("2048^2 square", 2048, 2048, 2048),
          ("tokens x d -> mlp", 2048, 512, 1408),
          ("tokens x mlp -> d", 2048, 1408, 512),
          ("tokens x d -> vocab", 2048, 512, 8192))

_JAX = r"""
import json, sys, time
import jax, jax.numpy as jnp
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for label, m, k, n in shapes:
  a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter(); f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  out[label] = 2 * m * k * n / best / 1e9
print(json.dumps(out))
"""

_TORCH = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for label, m, k, n in shapes:
  a, b = torch.randn(m, k), torch.randn(k, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter(); a @ b
    best = min(best, time.perf_counter() - t)
  out[label] = 2 * m * k * n / best / 1e9
print(json.dumps(out))
"""


def run(code: str, flags: str, repeats: int, threads: int) -> dict | str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  result = subprocess.run(
      [sys.executable, "-c", code, json.dumps(SHAPES), str(repeats),
       str(threads)], env=env, capture_output=True, text=True)
  if result.returncode != 0:
    return result.stderr.strip().splitlines()[-1][:160]
  return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--threads", type=int,
                      default=len(os.sched_getaffinity(0)))
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  torch_rates = run(_TORCH, "", args.repeats, args.threads)
  rows = [("torch", torch_rates)] + [
      (name, run(_JAX, flags, args.repeats, args.threads))
      for name, flags in BACKENDS]
  labels = [label for label, *_ in SHAPES]
  print(f"{'GFLOP/s (ratio to torch)':24s}" + "".join(
      f"{label:>26s}" for label in labels))
  for name, rates in rows:
    if isinstance(rates, str):
      print(f"{name:24s} failed: {rates}")
      continue
    cells = []
    for label in labels:
      ratio = (rates[label] / torch_rates[label]
               if isinstance(torch_rates, dict) else float("nan"))
      cells.append(f"{rates[label]:14.1f} ({ratio:5.2f}x)")
    print(f"{name:24s}" + "".join(f"{c:>26s}" for c in cells))


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
