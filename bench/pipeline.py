r"""Pipeline parallelism on 8 CPU devices: step time and bubble of GPipe and
circular schedules against no pipeline, same model, same batch, same run.

  python bench/pipeline.py [--stages=2] [--microbatches=8] [--repeats=2]
      [--steps=5] [--warmup=2] [--batch=32] [--seq=128] [--layers=8]

Each side is the trainer's own program (`build_program`: jitted step,
donated state) on the 8 simulated CPU devices the tests use: no pipeline on
data=2 x fsdp=2 x tensor=2, the pipelines on stage=S x tensor=2 with fsdp=2
when S=2 (fsdp=1 when S=4). Steps alternate between the three programs so all see
the same machine load; the first `--warmup` of each are not timed; times are
medians. Every simulated device shares this host's cores, so a stage's idle
iterations are not free here: they run on stale data whose result is never
used, and the step time of a pipeline should sit near no-pipeline x
1 / (1 - bubble) plus the ring's copies. On real chips the bubble is idle
time instead. The bubble column is the schedule's formula,
(S - 1) / (M R + S - 1), which tests/test_pipeline.py checks against the
executed loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402

os.environ["JAX_PLATFORMS"] = "cpu"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mllm_jax.modeling import ModelConfig, count_params  # noqa: E402
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import make_mesh  # noqa: E402
from mllm_jax.parallel.sharding import use_mesh  # noqa: E402
from mllm_jax.train.compile import (build_program, check_layout,  # noqa: E402
                                    initial_state)
from mllm_jax.train.config import OptimizerConfig, TrainConfig  # noqa: E402
from mllm_jax.train.task import language_model_task  # noqa: E402


def meshes(stages: int, microbatches: int, repeats: int):
  """name -> ParallelConfig: no pipeline, GPipe, circular. Tensor 2 on every
  side; fsdp 2 where the stages leave room for it (8 devices in all); data
  fills the rest."""
  base = dict(data=-1, fsdp=2, tensor=2)
  pipe = dict(base, fsdp=min(2, 8 // (2 * stages)),
              stage=stages, pipeline_microbatches=microbatches)
  return {
      "none": ParallelConfig(**base),
      "gpipe": ParallelConfig(**pipe),
      "circular": ParallelConfig(**pipe, pipeline_schedule="circular",
                                 pipeline_repeats=repeats),
  }


def batch(size: int, seq: int, vocab: int):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (size, seq + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_weights": np.ones((size, seq), np.float32),
          "segment_ids": np.ones((size, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32),
                                       (size, seq)).copy()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", type=int, default=2)
  parser.add_argument("--microbatches", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--remat", default="full")
  args = parser.parse_args()
  print(host_line(), flush=True)

  cfg = ModelConfig(vocab_size=2048, embed_dim=256, num_heads=8,
                    num_kv_heads=4, num_layers=args.layers, mlp_dim=704,
                    max_seq_len=args.seq, dtype="float32", remat=args.remat)
  cfg.validate()
  data = batch(args.batch, args.seq, cfg.vocab_size)
  print(f"model: {count_params(cfg):,} parameters, {args.layers} layers, "
        f"remat {args.remat}; batch {args.batch} x {args.seq}; "
        f"{jax.device_count()} CPU devices", flush=True)

  runs = {}
  for name, parallel in meshes(args.stages, args.microbatches,
                               args.repeats).items():
    check_layout(cfg, parallel, args.batch, 1, jax.device_count())
    mesh = make_mesh(parallel)
    program = build_program(
        language_model_task(cfg), parallel, OptimizerConfig(warmup_steps=0),
        TrainConfig(steps=1000, batch_size=args.batch), mesh)
    state, frozen = initial_state(program, seed=0)
    runs[name] = [program, state, frozen,
                  jax.device_put(data, program.batch_sharding), [], None]
    print(f"{name}: mesh {dict((k, v) for k, v in mesh.shape.items() if v > 1)}"
          + (f"; {program.pipeline.describe()}" if program.pipeline else ""),
          flush=True)

  for i in range(args.warmup + args.steps):
    for run in runs.values():
      program, state, frozen, device_batch, times, _ = run
      with use_mesh(program.mesh, program.rules):
        start = time.perf_counter()
        state, metrics = program.step(state, frozen, device_batch)
        loss = float(metrics["loss"])  # waits for the step
        elapsed = time.perf_counter() - start
      run[1], run[5] = state, loss
      if i >= args.warmup:
        times.append(elapsed)

  base = statistics.median(runs["none"][4])
  print(f"\n{'schedule':<10}{'step s':>9}{'vs none':>9}{'bubble':>9}"
        f"{'1/(1-b)':>9}{'loss':>9}")
  for name, (program, *_, times, loss) in runs.items():
    seconds = statistics.median(times)
    bubble = program.pipeline.bubble if program.pipeline else 0.0
    print(f"{name:<10}{seconds:>9.3f}{seconds / base:>8.2f}x{bubble:>9.1%}"
          f"{1 / (1 - bubble):>8.2f}x{loss:>9.4f}")
  print(f"(medians of {args.steps} steps after {args.warmup} warm-up each; "
        f"the losses are the last step's and agree when the schedules "
        f"compute the same function)")


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
