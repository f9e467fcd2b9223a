r"""Compile the full training step for a TPU or GPU topology this machine lacks.

  python -m launch.aot_compile --config=configs/pretrain.py:65b \
      --topology=v5p:4x4x8 [--mfu=0.5] [--config.train.batch_size=...]

Answers "does this config fit, and how long will a step take?" before anyone
books the pod. The step is the trainer's own (same function, shardings and
donation, see mllm_jax/train/compile.py), lowered with abstract inputs
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

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch.gpu_targets import GPUS, GpuChip, topology_string
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.modeling import ModelConfig, count_params
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.train.compile import (build_program, check_layout,
                                    traced_matmul_flops)
from mllm_jax.train.task import language_model_task
from mllm_jax.train.metrics import (DATASHEET_PEAK_FLOPS,
                                    measure_cpu_peak_flops,
                                    train_flops_per_token)
from mllm_jax.train.config import OptimizerConfig, TrainConfig

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
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: datasheet HBM, peak key, grid rank, chip config."""
  kind: str  # key into DATASHEET_PEAK_FLOPS
  hbm_gib: float
  grid_dims: int
  chip_config: str  # "megacore": one JAX device per chip (both TensorCores)


# HBM per chip from the Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e).
CHIPS = {
    "v4": Chip("TPU v4", 32.0, 3, "megacore"),
    "v5p": Chip("TPU v5p", 95.0, 3, "megacore"),
    "v5e": Chip("TPU v5e", 16.0, 2, "default"),
    "v6e": Chip("TPU v6e", 32.0, 2, "default"),
}
_TPU_RE = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)$")
_SLICE_RE = re.compile(r"^(v4|v5p|v5e|v6e)-(\d+)$")
_GPU_RE = re.compile(r"^(\d+)x(" + "|".join(GPUS) + r")$")
_CPU_RE = re.compile(r"^cpu:(\d+)$")
# v4 and v5p slice names count TensorCores, two per chip; v5e/v6e count chips.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


@dataclasses.dataclass(frozen=True)
class Target:
  """Resolved --topology: the devices to compile for and their limits."""
  name: str
  devices: list
  hbm_bytes: float
  peak_flops: float  # per device
  peak_source: str
  platform: str = "tpu"  # what the kernels must run on: tpu, gpu or cpu


def _topology_error(text: str, why: str) -> ConfigError:
  return ConfigError(
      f"--topology={text}: {why}. Use GEN:AxBxC with GEN in {sorted(CHIPS)} "
      f"(v4/v5p take 3 dims, v5e/v6e 2; e.g. v5p:4x4x8, v4:2x2x1, v5e:4x4), "
      f"a Cloud slice name (v5p-256, v4-8, v5e-8), NxGPU with GPU in "
      f"{sorted(GPUS)} (e.g. 8xH100) or cpu:N")


def slice_grid(gen: str, count: int) -> tuple[int, ...]:
  """Chip grid of a Cloud slice name: ('v5p', 256) -> (4, 4, 8).

  v4/v5p names count TensorCores (v5p-256 = 128 chips); v5e/v6e count chips.
  The grid grows from 2x2(x1) by doubling one axis at a time, the shapes the
  Cloud TPU pages list for the standard slices.
  """
  per_chip = _CORES_PER_CHIP[gen]
  chips, rest = divmod(count, per_chip)
  rank = CHIPS[gen].grid_dims
  if rest or chips < 1 or chips & (chips - 1):
    raise ConfigError(f"{gen}-{count} is not a standard slice: {gen} slice "
                      f"names count {'TensorCores' if per_chip == 2 else 'chips'}"
                      f" and need a power-of-two chip count")
  grid = [1] * rank
  while math.prod(grid) < chips:
    # The first four chips fill a 2x2 face; then the smallest axis doubles
    # (the last of equals first): 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4.
    axes = range(2) if math.prod(grid) < 4 else range(rank)
    grid[max(axes, key=lambda i: (-grid[i], i))] *= 2
  return tuple(grid)


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x8' or 'v5p-256' -> ('v5p', (4, 4, 8)); 'cpu:8' -> ('cpu', (8,));
  '8xH100' -> ('H100', (8,))."""
  if match := _CPU_RE.match(text):
    gen, dims = "cpu", (int(match.group(1)),)
  elif match := _GPU_RE.match(text):
    gen, dims = match.group(2), (int(match.group(1)),)
  elif match := _SLICE_RE.match(text):
    gen = match.group(1)
    try:
      dims = slice_grid(gen, int(match.group(2)))
    except ConfigError as e:
      raise _topology_error(text, str(e)) from e
  elif match := _TPU_RE.match(text):
    gen = match.group(1)
    dims = tuple(int(d) for d in match.group(2).split("x"))
    want = CHIPS[match.group(1)].grid_dims
    if len(dims) != want:
      raise _topology_error(text, f"{match.group(1)} chips form a {want}-D "
                            f"grid but {len(dims)} dims were given")
  else:
    raise _topology_error(text, "not a topology")
  if min(dims) < 1:
    raise _topology_error(text, "every dimension must be >= 1")
  return gen, dims


def resolve_target(text: str, hbm_gib: float, peak_flops: float) -> Target:
  """Compile-only TPU devices (via libtpu), compile-only GPUs (via XLA's CUDA
  plugin and a described card) or local CPU devices."""
  gen, dims = parse_topology(text)
  if gen == "cpu":
    return _cpu_target(text, dims[0], hbm_gib, peak_flops)
  if gen in GPUS:
    return _gpu_target(text, GPUS[gen], dims[0], hbm_gib, peak_flops)
  chip = CHIPS[gen]
  from jax.experimental import topologies
  name = f"TPU {gen}:{'x'.join(map(str, dims))}"
  try:
    devices = topologies.get_topology_desc(
        name, "tpu", chip_config_name=chip.chip_config).devices
  except RuntimeError as e:  # includes JaxRuntimeError
    if "TPU support not installed" in str(e):
      raise ConfigError(
          f"--topology={text}: compiling for TPU needs libtpu; install the "
          f"tpu extra (pip install -e '.[tpu]') or use --topology=cpu:N") from e
    raise _topology_error(text, f"libtpu rejected it ({e})") from e
  return Target(text, list(devices), (hbm_gib or chip.hbm_gib) * GIB,
                peak_flops or DATASHEET_PEAK_FLOPS[chip.kind],
                "configured" if peak_flops else f"{chip.kind} datasheet bf16")


def _gpu_target(text: str, chip: GpuChip, count: int, hbm_gib: float,
                peak_flops: float) -> Target:
  from jax.experimental import topologies
  try:
    devices = topologies.get_topology_desc(
        platform="cuda", topology=topology_string(count),
        target_config=chip.target_config()).devices
  except NotImplementedError as e:  # no CUDA plugin registered
    raise ConfigError(
        f"--topology={text}: compiling for GPU needs XLA's CUDA plugin; "
        f"install the gpu extra (pip install -e '.[gpu]', no GPU needed) or "
        f"use --topology=cpu:N") from e
  except RuntimeError as e:
    raise _topology_error(text, f"the CUDA plugin rejected it ({e})") from e
  return Target(text, list(devices), (hbm_gib or chip.hbm_gib) * GIB,
                peak_flops or DATASHEET_PEAK_FLOPS[chip.peak_key],
                "configured" if peak_flops else f"{chip.peak_key} datasheet "
                f"bf16 dense", platform="gpu")


def _cpu_target(text: str, count: int, hbm_gib: float,
                peak_flops: float) -> Target:
  devices = jax.devices("cpu")
  if count > len(devices):
    raise _topology_error(
        text, f"only {len(devices)} CPU devices exist; start with XLA_FLAGS="
        f"--xla_force_host_platform_device_count={count}")
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  hbm = hbm_gib * GIB if hbm_gib else ram / count
  if peak_flops:
    return Target(text, devices[:count], hbm, peak_flops, "configured",
                  platform="cpu")
  # Simulated devices share the real cores: the peak is per process.
  return Target(text, devices[:count], hbm,
                measure_cpu_peak_flops() / len(devices),
                "measured float32 matmul on this CPU", platform="cpu")


def memory_report(stats, hbm_bytes: float) -> dict[str, float]:
  """Per-device bytes from `compiled.memory_analysis()`.

  `total` is the compiler's peak (`peak_memory_in_bytes`: arguments plus the
  temporaries live at the worst point, the figure libtpu checks against HBM)
  plus generated code. `sum_of_parts` adds every component instead
  (arguments + outputs - aliased + temporaries + code; donated state is
  aliased, so outputs that reuse argument buffers are not counted twice): an
  upper bound, since on TPU `temp_size_in_bytes` is larger than the heap the
  peak is taken from. Without a peak (older jax) `total` is that sum.
  """
  report = {
      "arguments": stats.argument_size_in_bytes,
      "outputs": stats.output_size_in_bytes,
      "aliased": stats.alias_size_in_bytes,
      "temporaries": stats.temp_size_in_bytes,
      "generated_code": stats.generated_code_size_in_bytes,
  }
  report["sum_of_parts"] = (report["arguments"] + report["outputs"]
                            - report["aliased"] + report["temporaries"]
                            + report["generated_code"])
  peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
  report["peak"] = peak
  report["total"] = (peak + report["generated_code"] if peak
                     else report["sum_of_parts"])
  host = (stats.host_argument_size_in_bytes + stats.host_output_size_in_bytes
          - stats.host_alias_size_in_bytes + stats.host_temp_size_in_bytes)
  report["host_offloaded"] = host
  report["capacity"] = hbm_bytes
  return report


def xla_flops(compiled) -> float:
  """FLOPs XLA's cost analysis counts for one device (loop bodies once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def dtype_drift(state, out_state) -> list[str]:
  """State leaves whose dtype the step changes (the trainer would then
  recompile on step 2 with a different, usually larger, state)."""
  return [f"{jax.tree_util.keystr(path)}: {a.dtype} -> {b.dtype}"
          for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                  jax.tree.leaves(out_state))
          if a.dtype != b.dtype]


def remedies(model_cfg: ModelConfig, parallel: ParallelConfig) -> str:
  return (
      "remedies: shard parameters and optimizer state over more devices "
      f"(parallel.fsdp={parallel.fsdp}, parallel.tensor={parallel.tensor}, "
      f"parallel.data={parallel.data}), recompute more activations "
      f"(model.remat={model_cfg.remat!r}; 'full' keeps the least), "
      "or cut the per-step micro-batch (train.batch_size, or raise "
      "train.grad_accum_steps), or compile for a larger topology")


def _gib(x: float) -> str:
  return f"{x / GIB:9.3f} GiB"


@dataclasses.dataclass
class Run:
  """One training run's checked configs and its program, nothing allocated."""
  model: ModelConfig
  parallel: ParallelConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  seq_len: int
  mesh: jax.sharding.Mesh
  program: Any

  @property
  def tokens(self) -> int:
    return self.train.batch_size * self.seq_len

  def micro_per_shard(self, chips: int) -> int:
    return (self.train.batch_size // self.train.grad_accum_steps //
            self.parallel.batch_shards(chips))


def platform_of(gen: str) -> str:
  """'cpu', 'gpu' or 'tpu' for a parsed topology's generation."""
  return "cpu" if gen == "cpu" else "gpu" if gen in GPUS else "tpu"


@dataclasses.dataclass(frozen=True)
class Configs:
  """The typed configs a step is built from."""
  model: ModelConfig
  parallel: ParallelConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  seq_len: int
  seed: int


def read_configs(config, platform: str) -> Configs:
  """Typed, checked configs; needs no device, so it fails first (naming the
  field) whatever the topology's runtime is."""
  model_cfg = from_config(ModelConfig, config.model, "model")
  optimizer_cfg = from_config(OptimizerConfig, config.optimizer, "optimizer")
  configs = Configs(model_cfg,
                    from_config(ParallelConfig, config.parallel, "parallel"),
                    optimizer_cfg,
                    from_config(TrainConfig, config.train, "train"),
                    int(config.data.seq_len), int(config.seed))
  model_cfg.check_seq_len(configs.seq_len)
  model_cfg.check_platform(platform)
  optimizer_cfg.check_platform(platform)
  return configs


def prepare(configs: Configs, target: Target) -> Run:
  """The trainer's program for `target`'s devices, after the trainer's own
  layout checks (ConfigError naming the field when heads or batches do not
  divide the mesh)."""
  model_cfg, parallel = configs.model, configs.parallel
  train_cfg = configs.train
  check_layout(model_cfg, parallel, train_cfg.batch_size,
               train_cfg.grad_accum_steps, len(target.devices))
  mesh = make_mesh(parallel, target.devices)
  # The trainer's own program for this stage, built without allocating.
  task = language_model_task(model_cfg, z_loss=train_cfg.z_loss,
                             trainable=train_cfg.trainable)
  program = build_program(task, parallel, configs.optimizer, train_cfg, mesh,
                          configs.seed)
  return Run(model_cfg, parallel, configs.optimizer, train_cfg,
             configs.seq_len, mesh, program)


@dataclasses.dataclass
class Compilation:
  """The compiled step, or why the compiler refused it for lack of memory."""
  traced: Any
  compiled: Any  # None when the compiler ran out of device memory
  out_of_memory: str  # the compiler's message, "" when it compiled
  drift: list[str]
  seconds: float


def compile_step(run: Run) -> Compilation:
  """Traces, lowers and compiles the step; out-of-memory is a result, not an
  error (every other compiler failure propagates)."""
  start = time.perf_counter()
  traced = run.program.trace(run.train.batch_size, run.seq_len)
  lowered = traced.lower()
  drift = dtype_drift(run.program.state, lowered.out_info[0])
  try:
    compiled, message = lowered.compile(), ""
  except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, message = None, str(e)
  return Compilation(traced, compiled, message, drift,
                     time.perf_counter() - start)


def step_seconds(flops: float, chips: int, peak_flops: float,
                 mfu: float) -> float:
  """Step time when `flops` run at `mfu` of every chip's peak."""
  return flops / (chips * peak_flops * mfu)


def analyse(run: Run, result: Compilation, target: Target,
            mfu: float) -> dict:
  """Memory and FLOPs of a compiled step, as the JSON report holds them."""
  chips = len(target.devices)
  memory = memory_report(result.compiled.memory_analysis(), target.hbm_bytes)
  analytic = train_flops_per_token(run.model, run.seq_len) * run.tokens
  return {
      "topology": target.name, "devices": chips,
      "device_kind": target.devices[0].device_kind,
      "mesh": dict(run.mesh.shape), "remat": run.model.remat,
      "batch_size": run.train.batch_size, "seq_len": run.seq_len,
      "grad_accum_steps": run.train.grad_accum_steps,
      "memory_bytes": memory, "flops_analytic": analytic,
      "flops_traced": traced_matmul_flops(result.traced.jaxpr),
      "flops_xla": xla_flops(result.compiled) * chips, "mfu": mfu,
      "peak_flops": target.peak_flops,
      "step_seconds": step_seconds(analytic, chips, target.peak_flops, mfu),
      "compile_seconds": result.seconds, "state_dtype_drift": result.drift,
      "fits": memory["total"] <= target.hbm_bytes,
  }


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
