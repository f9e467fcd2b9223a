r"""Which meshes and remat policies fit a model on a topology, and how fast.

  python -m launch.plan_memory --config=configs/pretrain.py:65b \
      --topology=v5p-256 [--mfu=0.5] [--remat=save_dots,full] \
      [--micro_batch=4,1] [--tensor=1,2,4,8] [--data=1] [--stage=1,4] \
      [--max_plans=8] \
      [--output_dir=/tmp/plan_65b_v5p256]

Booking a pod is expensive and finding out that the chosen mesh does not fit
is slow; this compiles the trainer's own step ahead of time
(`launch.aot_compile`'s `prepare` / `compile_step` / `analyse`, for TPU,
GPU or CPU topologies) for a series of candidate plans, one at a time, and
reports per-chip memory from the compiler and the step time implied by a
stated MFU. A plan is a mesh (data x fsdp x tensor x stage), a remat policy
and a micro-batch (sequences per data shard per accumulation step; the
global batch stays the config's, so gradient accumulation makes up the rest).

Search (see `candidates` and `Search` in launch/memory_plans.py): every mesh whose axes divide the chips,
the heads (tensor), the layers (stage) and the batch, pruned when the sharded
parameters and optimizer state alone exceed the chip's memory; ordered by
the estimated step time (least recomputation first), then the largest
micro-batch, the least tensor and pipeline parallelism and the most FSDP.
Memory only grows with a larger micro-batch or less recomputation, so a plan
that does not fit rules out, without compiling, every plan on the same mesh
that needs at least as much; and a plan that fits rules out the slower,
smaller ones on its mesh. At most --max_plans plans are compiled to an
executable (refusals for lack of memory come in seconds and are not counted).

Writes DIR/plans.md and DIR/plans.json. Exit status: 0 at least one plan
fits, 1 bad flags/config/topology, 2 none fits.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import aot
from launch.aot import GIB
from launch.memory_plans import (Plan, Search, best, candidates, markdown,
                                 parse_ints, plan_config, pruned_row,
                                 state_bytes_per_chip, to_json)
from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling import count_params
from mllm_jax.modeling.config import REMAT_POLICIES

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file and preset, e.g. "
    "configs/pretrain.py:65b; its model, optimizer, global batch and "
    "sequence length are kept, its mesh, remat and accumulation are what "
    "the planner varies.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Target devices, as launch.aot_compile takes them: "
    "v5p-256, v4:8x8x4, v5e-8, 8xH100, cpu:8, ...")
_MFU = flags.DEFINE_float(
    "mfu", 0.5, "Model FLOPs utilisation the step-time estimate assumes.")
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib", 0.0, "Memory per chip in GiB to fit into; 0 = datasheet HBM.")
_REMAT = flags.DEFINE_list(
    "remat", ["save_dots", "full"], f"Remat policies to try, of "
    f"{REMAT_POLICIES}.")
_MICRO = flags.DEFINE_list(
    "micro_batch", ["4", "1"], "Sequences per data shard per accumulation "
    "step to try (global batch / (micro_batch x data x fsdp) accumulation "
    "steps).")
_TENSOR = flags.DEFINE_list(
    "tensor", ["1", "2", "4", "8"], "Tensor-parallel sizes to try (those that "
    "divide the heads and the chips are kept).")
_DATA = flags.DEFINE_list(
    "data", [], "Data-parallel (replicated) sizes to try; empty = every size "
    "the other axes leave (fsdp takes the rest of the chips).")
_STAGE = flags.DEFINE_list(
    "stage", ["1"], "Pipeline stage counts to try (parallel.stage; > 1 needs "
    "the pipeline fields parallel.pipeline_*; each micro-batch is cut into "
    "micro_batch pipeline pieces).")
_MAX_PLANS = flags.DEFINE_integer(
    "max_plans", 8, "Compile at most this many plans to an executable (each "
    "takes seconds on CPU to minutes for a 65B model on a pod topology); "
    "plans the compiler refuses for lack of memory, which it does in "
    "seconds, are not counted.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "", "Write plans.md and plans.json here.")
flags.mark_flags_as_required(["config", "topology"])

EXIT_NONE_FITS = 2


# ---------------------------------------------------------------- main

def _overrides() -> list[str]:
  """The --config.a.b=value arguments, for the table's header."""
  return [arg for arg in sys.argv[1:] if arg.startswith("--config.")]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # accelerators: compile-only
  config = _CONFIG.value

  # ------------------------------------------------------------ flags
  try:
    check(0 < _MFU.value <= 1, "--mfu", f"must be in (0, 1], got {_MFU.value}")
    check(_HBM_GIB.value >= 0, "--hbm_gib", "must be >= 0")
    check(_MAX_PLANS.value >= 1, "--max_plans",
          f"must be >= 1, got {_MAX_PLANS.value}")
    for remat in _REMAT.value:
      check(remat in REMAT_POLICIES, "--remat",
            f"unknown policy {remat!r}; choose from {REMAT_POLICIES}")
    check(bool(_REMAT.value), "--remat", "name at least one policy")
    micros = parse_ints(_MICRO.value, "micro_batch")
    tensors = parse_ints(_TENSOR.value, "tensor")
    stages = parse_ints(_STAGE.value, "stage")
    datas = parse_ints(_DATA.value, "data") if _DATA.value else []
    check(stages == [1] or "pipeline_microbatches" in config.parallel,
          "--stage", "this tree has no pipeline (parallel.pipeline_* fields);"
          " only --stage=1 can be planned")
    gen, _ = aot.parse_topology(_TOPOLOGY.value)
    platform = aot.platform_of(gen)
    for remat in _REMAT.value:  # e.g. offload_dots needs device memory kinds
      with config.unlocked():
        trial = config.copy_and_resolve_references()
      trial.model.remat = remat
      aot.read_configs(trial, platform)
    base = aot.read_configs(config, platform)
    target = aot.resolve_target(_TOPOLOGY.value, _HBM_GIB.value,
                                        base.train.peak_flops)
  except ConfigError as e:
    sys.exit(f"error: {e}")

  chips = len(target.devices)
  model = base.model
  plans = candidates(chips, heads=model.num_heads, kv_heads=model.kv_heads,
                     layers=model.num_layers, batch=base.train.batch_size,
                     tensors=tensors, stages=stages, remats=_REMAT.value,
                     micros=micros, datas=datas)
  if not plans:
    sys.exit(f"error: --tensor={_TENSOR.value}, --stage={_STAGE.value}, "
             f"--data={_DATA.value}, --micro_batch={_MICRO.value}: no plan "
             f"divides {chips} chips, "
             f"{model.num_heads} heads, {model.num_layers} layers and the "
             f"batch of {base.train.batch_size}")
  params = count_params(model)
  param_bytes = 2 if model.param_dtype == "bfloat16" else 4
  mu_bytes = {"": param_bytes, "bfloat16": 2}.get(base.optimizer.mu_dtype, 4)
  # AdamW's second moment takes the weights' dtype; offloaded moments live
  # in host memory.
  moment_bytes = (0 if getattr(base.optimizer, "offload_state", False)
                  else mu_bytes + param_bytes)
  kept, too_big = [], {}
  for plan in plans:
    state = state_bytes_per_chip(params, param_bytes, moment_bytes, plan)
    if state <= target.hbm_bytes:
      kept.append(plan)
    else:  # one row per mesh: no remat or micro-batch can save it
      too_big.setdefault(plan.mesh, pruned_row(plan, state))
  print(f"{_TOPOLOGY.value}: {chips} x {target.devices[0].device_kind}; "
        f"{len(plans)} plans, {len(plans) - len(kept)} ruled out without "
        f"compiling (state alone exceeds {target.hbm_bytes / GIB:.2f} GiB), "
        f"compiling up to {_MAX_PLANS.value} of {len(kept)}", flush=True)

  def configs_of(plan: Plan) -> aot.Configs:
    return aot.read_configs(plan_config(config, plan), platform)

  search = Search(config, target, _MFU.value, _MAX_PLANS.value)
  header = {
      "config": config_flags.get_config_filename(flags.FLAGS["config"]),
      "overrides": _overrides(), "topology": _TOPOLOGY.value,
      "chips": chips, "device_kind": target.devices[0].device_kind,
      "hbm_gib": target.hbm_bytes / GIB, "params": params,
      "batch_size": base.train.batch_size, "seq_len": base.seq_len,
      "tokens": base.train.batch_size * base.seq_len, "mfu": _MFU.value,
      "peak_flops": target.peak_flops, "peak_source": target.peak_source,
      "pruned": len(plans) - len(kept), "max_plans": _MAX_PLANS.value,
      "pipeline": "pipeline_microbatches" in config.parallel,
  }

  def write(rows: list[dict]) -> str:
    header.update(untried=search.untried, compiled=search.compiled)
    rows = rows + list(too_big.values())
    table = markdown(rows, header)
    if _OUTPUT_DIR.value:
      os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
      with open(os.path.join(_OUTPUT_DIR.value, "plans.md"), "w") as f:
        f.write(table)
      with open(os.path.join(_OUTPUT_DIR.value, "plans.json"), "w") as f:
        json.dump(to_json(rows, header), f, indent=2)
    return table

  rows = search.search(kept, configs_of, write)
  print(write(rows))
  rows = rows + list(too_big.values())
  if best(rows) is None:
    sys.stderr.write("NO PLAN FITS among those compiled\n")
    sys.exit(EXIT_NONE_FITS)


if __name__ == "__main__":
  app.run(main)
