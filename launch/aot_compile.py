r"""Compile the full training step for a TPU or GPU topology this machine lacks.

  python -m launch.aot_compile --config=configs/pretrain.py:65b \
      --topology=v5p:4x4x8 [--mfu=0.5] [--config.train.batch_size=...]

Answers "does this config fit, and how long will a step take?" before anyone
books the pod. The step is the trainer's own (same function, shardings and
donation, see mllm_jax/train/compile.py; built and compiled by
`launch/aot.py`, which launch.plan_memory shares), lowered with abstract inputs
(nothing is allocated) and compiled by libtpu for compile-only devices of the
named topology (needs the `tpu` extra, no TPU). `--topology=8xH100` compiles
for NVIDIA GPUs the same way (needs the `gpu` extra's CUDA plugin, no GPU: the
chip is described to XLA by `gpu_targets.py`). `--topology=cpu:N` compiles
for N local CPU devices instead (tests, no libtpu).

Prints per-chip memory (arguments, outputs, temporaries, code, the peak) against
the chip's HBM, FLOPs per step three ways (analytic model FLOPs, traced matmul
FLOPs with scans expanded, XLA's cost analysis) and the step time implied by
--mfu. Exit status: 0 fits, 1 bad flags/config/topology, 2 does not fit.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch.aot import (GIB, Target, compile_step, parse_topology,  # noqa: F401
                        platform_of, prepare, read_configs, remedies,
                        resolve_target, analyse)
from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling import count_params
from mllm_jax.parallel.pipeline import schedule_of

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file and preset, e.g. "
    "configs/pretrain.py:65b; override fields with --config.a.b=value "
    "(parallel.* for the mesh, model.remat, train.batch_size, "
    "train.grad_accum_steps, data.seq_len).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Target devices: GEN:AxBxC with GEN one of v4, v5p "
    "(3-D chip grid, e.g. v5p:4x4x8 = v5p-256 = 128 chips), v5e, v6e (2-D, "
    "e.g. v5e:4x4); a Cloud slice name (v5p-256, v4-8, v5e-8); NxH100 or "
    "NxH200 for N GPUs (8 per host); or cpu:N for N local CPU devices (no "
    "libtpu needed).")
_MFU = flags.DEFINE_float(
    "mfu", 0.5, "Model FLOPs utilisation assumed for the implied step time "
    "(model FLOPs / (chips x datasheet bf16 peak x mfu)).")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", 0.0, "Memory per device in GiB to check against; 0 = the "
    "chip's HBM from its datasheet (cpu:N: host RAM / N).")
_OUTPUT_JSON = flags.DEFINE_string(
    "output_json", "", "Also write the report as JSON to this path.")
flags.mark_flags_as_required(["config", "topology"])

EXIT_DOES_NOT_FIT = 2


def _gib(x: float) -> str:
  return f"{x / GIB:9.3f} GiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # TPUs here are compile-only
  config = _CONFIG.value

  # ------------------------------------------------------------ configs
  try:
    check(0 < _MFU.value <= 1, "--mfu", f"must be in (0, 1], got {_MFU.value}")
    check(_HBM_GIB.value >= 0, "--hbm_gib", "must be >= 0")
    configs = read_configs(config,
                           platform_of(parse_topology(_TOPOLOGY.value)[0]))
    target = resolve_target(_TOPOLOGY.value, _HBM_GIB.value,
                            configs.train.peak_flops)
    run = prepare(configs, target)
  except ConfigError as e:
    sys.exit(f"error: {e}")

  chips = len(target.devices)
  model_cfg, parallel, train_cfg = run.model, run.parallel, run.train
  print(f"target   {target.name}: {chips} x {target.devices[0].device_kind}, "
        f"{_gib(target.hbm_bytes).strip()} each, peak "
        f"{target.peak_flops:.3g} FLOP/s ({target.peak_source})")
  print(f"model    {count_params(model_cfg):,} parameters "
        f"({model_cfg.param_dtype} weights, {model_cfg.dtype} compute), "
        f"remat={model_cfg.remat!r}")
  print(f"mesh     {dict(run.mesh.shape)}")
  if (schedule := schedule_of(parallel)) is not None:
    print(f"pipeline {schedule.describe()} (idle time the implied step time "
          f"below leaves out)")
  print(f"batch    {train_cfg.batch_size} x {run.seq_len} = {run.tokens:,} "
        f"tokens per step, grad_accum_steps={train_cfg.grad_accum_steps} "
        f"(micro-batch of {run.micro_per_shard(chips)} sequences per data "
        f"shard)")

  # ------------------------------------------------------------ compile
  result = compile_step(run)
  if result.drift:
    print(f"WARNING: the step changes the dtype of {len(result.drift)} state "
          f"leaves (e.g. {result.drift[0]}); the trainer recompiles on step 2 "
          f"with that state, so this report covers step 1 only")
  if result.compiled is None:
    sys.stderr.write(f"DOES NOT FIT: the compiler ran out of device memory "
                     f"on {target.name}:\n{result.out_of_memory[:2000]}\n"
                     f"{remedies(model_cfg, parallel)}\n")
    sys.exit(EXIT_DOES_NOT_FIT)
  print(f"compiled in {result.seconds:.0f} s")

  # ------------------------------------------------------------ report
  report = analyse(run, result, target, _MFU.value)
  memory = report["memory_bytes"]
  print("memory per device:")
  for key in ("arguments", "outputs", "aliased", "temporaries",
              "generated_code", "sum_of_parts", "peak", "total", "capacity"):
    print(f"  {key:15s}{_gib(memory[key])}")
  if memory["host_offloaded"]:
    print(f"  {'host_offloaded':15s}{_gib(memory['host_offloaded'])}")
    for kind, moves in report["host_transfers"].items():
      print(f"  {kind:15s}{moves['count']} copies (largest "
            f"{moves['largest_bytes'] / 2**20:.2f} MiB), "
            f"{moves['layer_slices']} of them one layer's slice (largest "
            f"{moves['largest_slice_bytes'] / 2**20:.2f} MiB)")
  print(f"  {'used':15s}{100 * memory['total'] / memory['capacity']:7.1f} %")

  analytic, traced_flops = report["flops_analytic"], report["flops_traced"]
  xla, step_s = report["flops_xla"], report["step_seconds"]
  print("FLOPs per step (all devices):")
  print(f"  analytic model {analytic:.4g}  (6 x matmul params + causal "
        f"attention once, x {run.tokens:,} tokens)")
  print(f"  traced matmuls {traced_flops:.4g}  ({traced_flops / analytic:.2f}x"
        f"; scans expanded, remat recompute and full attention squares)")
  print(f"  XLA cost       {xla:.4g}  ({xla / analytic:.2f}x; "
        f"cost_analysis() x {chips} devices, counts each loop body once)")
  print(f"implied step time {step_s:.3g} s at MFU {_MFU.value:g} "
        f"({run.tokens / step_s:,.0f} tokens/s)")

  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(report, f, indent=2)
  if not report["fits"]:
    sys.stderr.write(
        f"DOES NOT FIT: {_gib(memory['total']).strip()} per device exceeds "
        f"{_gib(target.hbm_bytes).strip()} on {target.name}; "
        f"{remedies(model_cfg, parallel)}\n")
    sys.exit(EXIT_DOES_NOT_FIT)
  print(f"FITS on {target.name}")


if __name__ == "__main__":
  app.run(main)
