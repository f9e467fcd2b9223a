"""Ahead-of-time compilation of the training step, for binaries to share.

`launch.aot_compile` (one config, one report) and `launch.plan_memory` (many
meshes and remat policies, one table) both build the trainer's own step
(`mllm_jax/train/compile.py`: same function, shardings and donation) for
devices this machine lacks and read memory and FLOPs from the compiler:

- `resolve_target`: compile-only TPU devices from libtpu (`v5p:4x4x8`,
  `v5p-256`), compile-only NVIDIA GPUs from XLA's CUDA plugin and a card
  description (`8xH100`, see `gpu_targets.py`), or local CPU devices.
- `read_configs` (no device needed) then `prepare`: typed, checked configs and
  the unallocated program; bad input raises ConfigError naming the field.
- `compile_step`: trace, lower, compile; running out of device memory is a
  result, not an exception.
- `analyse`: per-device memory, FLOPs three ways and the implied step time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax

from launch.gpu_targets import GPUS, GpuChip, topology_string
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.modeling import ModelConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.train.compile import (build_program, check_layout,
                                    traced_matmul_flops)
from mllm_jax.train.task import language_model_task
from mllm_jax.train.metrics import (DATASHEET_PEAK_FLOPS,
                                    measure_cpu_peak_flops,
                                    train_flops_per_token)
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.offload import host_transfers

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
  Buffers in host memory (`host_offloaded`: the optimizer state with
  optimizer.offload_state) are taken out of the peak: they use no HBM.
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
  host = (stats.host_argument_size_in_bytes + stats.host_output_size_in_bytes
          - stats.host_alias_size_in_bytes + stats.host_temp_size_in_bytes)
  report["host_offloaded"] = host
  # libtpu's peak counts buffers in host memory too: for 7B on v4-8 with
  # optimizer.offload_state it is 32.94 GiB, while the dumped memory-usage
  # report holds 20.49 GiB in device memory and 12.55 GiB in host memory
  # (and the compiler accepts the program under its 30.75 GiB limit).
  peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
  peak = max(peak - host, 0) if peak else 0
  report["peak"] = peak
  report["total"] = (peak + report["generated_code"] if peak
                     else report["sum_of_parts"])
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
      # optimizer.offload_state: how the moments move (per layer or whole)
      "host_transfers": (host_transfers(result.compiled.as_text())
                         if memory["host_offloaded"] else None),
  }
