"""The memory planner's search: candidate plans, what one result decides
about another, step-time estimates and the tables.

`launch.plan_memory` is the binary (flags, then this); the search lives here,
apart from any flags, so tests and notebooks import it without defining
absl flags twice. Each plan is compiled with `launch.aot`.
"""

from __future__ import annotations

import dataclasses
import gc

import jax
from absl import logging

from launch import aot
from launch.aot import GIB, Target
from mllm_jax.configlib import ConfigError, check

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


def state_bytes_per_chip(params: int, param_bytes: int, moment_bytes: int,
                         plan: Plan) -> float:
  """Weights and the AdamW moments kept in device memory (`moment_bytes` per
  parameter: 0 with optimizer.offload_state), sharded over fsdp x tensor x
  stage: a lower bound on a plan's memory (the compiler adds gradients and
  activations)."""
  return (params * (param_bytes + moment_bytes) /
          (plan.fsdp * plan.tensor * plan.stage))


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
          f"moments on the device alone: {state / GIB:.3g} GiB (not "
          f"compiled)"}


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
