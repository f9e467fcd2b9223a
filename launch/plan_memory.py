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

Search (see `candidates` and `Search`): every mesh whose axes divide the chips,
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

import dataclasses
import gc
import json
import math
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import aot
from launch.aot import GIB, Target
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
# Relative recomputation cost, for ordering only (the report uses the
# traced FLOPs of each compiled plan).
REMAT_ORDER = {"none": 0, "offload_dots": 1, "save_dots": 1, "full": 2}
# Device memory the policies keep, most first: offloading the saved dots to
# the host keeps less than saving them on the device.
REMAT_KEEPS = {"none": 0, "save_dots": 1, "offload_dots": 2, "full": 3}


@dataclasses.dataclass(frozen=True)
class Plan:
  """One candidate: mesh sizes, remat policy and micro-batch per shard."""
  data: int
  fsdp: int
  tensor: int
  stage: int
  remat: str
  micro: int  # sequences per data shard per accumulation step
  accum: int  # gradient accumulation steps that keep the global batch

  @property
  def mesh(self) -> str:
    axes = (("data", self.data), ("fsdp", self.fsdp),
            ("tensor", self.tensor), ("stage", self.stage))
    return " x ".join(f"{n} {s}" for n, s in axes if s > 1) or "1 chip"

  def needs_at_least(self, other: "Plan") -> bool:
    """Same mesh, and at least `other`'s micro-batch with no more
    recomputation: then it needs at least `other`'s memory."""
    return (self.same_mesh(other) and self.micro >= other.micro and
            REMAT_KEEPS[self.remat] <= REMAT_KEEPS[other.remat])

  def same_mesh(self, other: "Plan") -> bool:
    return ((self.data, self.fsdp, self.tensor, self.stage) ==
            (other.data, other.fsdp, other.tensor, other.stage))


def parse_ints(values: list[str], flag: str) -> list[int]:
  """--flag=1,2,4 -> [1, 2, 4]; fails naming the flag."""
  try:
    ints = [int(v) for v in values]
  except ValueError:
    raise ConfigError(f"--{flag}: {values} are not all integers") from None
  check(bool(ints) and min(ints) >= 1, f"--{flag}",
        f"needs one or more sizes >= 1, got {values}")
  return sorted(set(ints))


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(chips: int, *, heads: int, kv_heads: int, layers: int,
               batch: int, tensors: list[int], stages: list[int],
               remats: list[str], micros: list[int],
               datas: list[int] | None = None) -> list[Plan]:
  """Every plan whose sizes divide: tensor the heads (and K/V heads), stage
  the layers, data x fsdp x tensor x stage the chips, and micro x data x
  fsdp the global batch. Ordered as the search tries them."""
  plans = []
  for tensor in tensors:
    if heads % tensor or kv_heads % tensor or chips % tensor:
      continue
    for stage in stages:
      if layers % stage or (chips // tensor) % stage:
        continue
      shards = chips // tensor // stage
      for fsdp in divisors(shards):
        data = shards // fsdp
        if datas and data not in datas:
          continue
        for micro in micros:
          accum, rest = divmod(batch, micro * shards)
          if rest or accum < 1:
            continue
          plans.extend(Plan(data, fsdp, tensor, stage, remat, micro, accum)
                       for remat in remats)
  return sorted(plans, key=lambda p: (REMAT_ORDER[p.remat], -p.micro,
                                      p.data, p.stage, p.tensor))


def state_bytes_per_chip(params: int, param_bytes: int, mu_bytes: int,
                         plan: Plan) -> float:
  """Weights, AdamW's first moment (optimizer.mu_dtype) and second moment
  (the weights' dtype), sharded over fsdp x tensor x stage: a lower bound on
  a plan's memory (the compiler adds gradients and activations)."""
  per_param = 2 * param_bytes + mu_bytes
  return params * per_param / (plan.fsdp * plan.tensor * plan.stage)


def step_estimates(report: dict, plan: Plan, mfu: float) -> dict:
  """Step time at the stated MFU, two ways (both over all chips):

  - `step_seconds` = analytic model FLOPs / (chips x peak x MFU), the
    trainer's MFU definition: the same for every plan of one batch.
  - `step_seconds_recompute` = that x (traced matmul FLOPs / analytic
    FLOPs): the MFU read as the share of peak every executed matmul runs
    at, so recomputation costs time. Plans are ranked by this one. With a
    pipeline the traced FLOPs already hold the bubble: idle stages compute
    on stale data (mllm_jax/parallel/pipeline.py), so the bubble
    (S - 1) / (M + S - 1) is reported, not applied a second time.
  """
  bubble = ((plan.stage - 1) / (plan.micro + plan.stage - 1)
            if plan.stage > 1 else 0.0)
  base = aot.step_seconds(report["flops_analytic"], report["devices"],
                          report["peak_flops"], mfu)
  recompute = report["flops_traced"] / report["flops_analytic"]
  return {"step_seconds": base, "recompute_factor": recompute,
          "pipeline_bubble": bubble,
          "step_seconds_recompute": base * recompute}


def plan_config(config, plan: Plan):
  """A copy of `config` with the plan's mesh, remat and accumulation."""
  config = config.copy_and_resolve_references()
  parallel = config.parallel
  parallel.data, parallel.fsdp = plan.data, plan.fsdp
  parallel.tensor, parallel.stage = plan.tensor, plan.stage
  if "pipeline_microbatches" in parallel:
    parallel.pipeline_microbatches = plan.micro if plan.stage > 1 else 0
  config.model.remat = plan.remat
  config.train.grad_accum_steps = plan.accum
  return config


class Search:
  """Compiles plans in order, skipping those another result decides."""

  def __init__(self, config, target: Target, mfu: float, max_plans: int):
    self.config, self.target = config, target
    self.mfu, self.max_plans = mfu, max_plans
    self.rows: list[dict] = []
    # Executables built; a refusal for lack of memory (libtpu's
    # RESOURCE_EXHAUSTED, before code generation, in seconds) is not one.
    self.compiled = 0
    self.untried = 0  # left when --max_plans was reached

  def decided(self, plan: Plan) -> str:
    """Why `plan` need not be compiled, or ''."""
    for row in self.rows:
      done = row["plan"]
      if row["status"] == "invalid" and plan.same_mesh(done):
        return f"its mesh is invalid: {row['why']}"
      if row["status"] == "does not fit" and plan.needs_at_least(done):
        return f"needs at least {done.remat}, micro {done.micro}'s memory"
      if (row["status"] == "fits" and done.needs_at_least(plan)
          and done != plan):
        return (f"slower than or as fast as {done.remat}, micro {done.micro}"
                f", which fits on this mesh")
    return ""

  def run(self, plan: Plan, configs: aot.Configs) -> dict:
    """Compiles one plan, freeing its executable before the next."""
    row = {"plan": plan, "status": "", "why": ""}
    try:
      run = aot.prepare(configs, self.target)
    except ConfigError as e:
      return {**row, "status": "invalid", "why": str(e)}
    except NotImplementedError as e:
      # jax.make_mesh cannot lay this mesh on the chips' physical torus
      # (an axis that is no product of whole physical axes).
      return {**row, "status": "invalid", "why": "no device layout: " +
              str(e).split(". ")[0]}
    result = aot.compile_step(run)
    if result.compiled is None:
      need = _out_of_memory_gib(result.out_of_memory)
      row.update(status="does not fit", why="compiler out of memory" +
                 (f" (libtpu: {need:.2f} GiB needed)" if need else ""),
                 compiler_message=result.out_of_memory[:1000],
                 compile_seconds=result.seconds)
    else:
      report = aot.analyse(run, result, self.target, self.mfu)
      report.update(step_estimates(report, plan, self.mfu))
      row.update(report, status="fits" if report["fits"] else "does not fit")
      self.compiled += 1
    del run, result
    jax.clear_caches()
    gc.collect()
    return row

  def search(self, plans: list[Plan], configs_of,
             after_each=lambda rows: None) -> list[dict]:
    """Walks `plans` in order; `after_each(rows)` runs after every compile,
    so a run stopped midway still leaves its table."""
    for plan in plans:
      why = self.decided(plan)
      if why:
        self.rows.append({"plan": plan, "status": "skipped", "why": why})
        continue
      if self.compiled >= self.max_plans:
        self.untried += 1
        continue
      row = self.run(plan, configs_of(plan))
      self.rows.append(row)
      after_each(self.rows)
      logging.warning("%s %s micro %d: %s %s", plan.mesh, plan.remat,
                      plan.micro, row["status"], row.get("why", ""))
    return self.rows


def _out_of_memory_gib(message: str) -> float:
  """What libtpu's RESOURCE_EXHAUSTED message says the temporaries need
  ("... memory required for HLO temporaries (119.53G) exceeds available
  HBM (30.75G)"), in GiB; 0 when it says no figure."""
  import re  # pylint: disable=g-import-not-at-top
  match = re.search(r"\(([\d.]+)([KMG])\) exceeds", message)
  if not match:
    return 0.0
  return float(match.group(1)) / {"K": 2 ** 20, "M": 2 ** 10, "G": 1}[
      match.group(2)]


def pruned_row(plan: Plan, state: float) -> dict:
  """A mesh ruled out before compiling: its weights and moments alone
  exceed the chip's memory, whatever the remat policy and micro-batch."""
  plan = dataclasses.replace(plan, remat="any", micro=0, accum=0)
  return {"plan": plan, "status": "does not fit", "why": f"weights + AdamW "
          f"moments alone: {state / GIB:.3g} GiB (not compiled)"}


def best(rows: list[dict]) -> dict | None:
  """The fitting plan with the shortest estimated step, then the most
  headroom."""
  fits = [r for r in rows if r["status"] == "fits"]
  return min(fits, key=lambda r: (round(r["step_seconds_recompute"], 6),
                                  r["memory_bytes"]["total"]), default=None)


# ---------------------------------------------------------------- tables

def markdown(rows: list[dict], header: dict) -> str:
  """The plan table as markdown, best plan first among those that fit."""
  top = best(rows)
  lines = [
      f"# Plans for {header['config']} on {header['topology']}",
      "",
      *([" ".join(header["overrides"]), ""] if header["overrides"] else []),
      f"{header['chips']} x {header['device_kind']}, "
      f"{header['hbm_gib']:.4g} GiB each; {header['params']:,} parameters; "
      f"global batch {header['batch_size']} x {header['seq_len']}; "
      f"MFU {header['mfu']:g} of {header['peak_flops']:.3g} FLOP/s per "
      f"chip ({header['peak_source']}).",
      "",
      "| mesh | remat | micro / accum | status | args / total GiB per chip "
      "| HBM | step @ MFU (model / with recompute) | tokens/s | compile |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  order = {"fits": 0, "does not fit": 1, "invalid": 2}
  shown = [r for r in rows if r["status"] != "skipped"]
  for row in sorted(shown, key=lambda r: (r is not top, order[r["status"]])):
    plan = row["plan"]
    cells = [plan.mesh, plan.remat,
             f"{plan.micro} / {plan.accum}" if plan.micro else "any",
             ("**best** " if row is top else "") + row["status"]]
    if "memory_bytes" in row:
      mem = row["memory_bytes"]
      step = row["step_seconds_recompute"]
      cells += [f"{mem['arguments'] / GIB:.3g} / {mem['total'] / GIB:.3g}",
                f"{100 * mem['total'] / mem['capacity']:.0f}%",
                f"{row['step_seconds']:.3g} s / {step:.3g} s",
                f"{header['tokens'] / step:,.0f}",
                f"{row['compile_seconds']:.0f} s"]
    else:
      secs = row.get("compile_seconds")
      cells += [row["why"], "", "", "", f"{secs:.0f} s" if secs else ""]
    lines.append("| " + " | ".join(cells) + " |")
  skipped = [r for r in rows if r["status"] == "skipped"]
  if skipped:
    lines += ["", f"Skipped without compiling, as decided by the rows above: "
              f"{len(skipped)} plans (a plan that fits rules out slower ones "
              f"on its mesh, one that does not fit rules out hungrier ones)."]
  untried = header["untried"]
  if untried:
    lines += ["", f"Not compiled: {untried} more plans after --max_plans="
              f"{header['max_plans']}."]
  return "\n".join(lines) + "\n"


def to_json(rows: list[dict], header: dict) -> dict:
  out = []
  for row in rows:
    entry = {k: v for k, v in row.items() if k != "plan"}
    entry["plan"] = dataclasses.asdict(row["plan"])
    entry["mesh_name"] = row["plan"].mesh
    out.append(entry)
  top = best(rows)
  return {**header, "best": None if top is None else dataclasses.asdict(
      top["plan"]), "plans": out}


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
  kept, too_big = [], {}
  for plan in plans:
    state = state_bytes_per_chip(params, param_bytes, mu_bytes, plan)
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
