"""launch.plan_memory (and launch.memory_plans): plans compiled ahead of time,
ranked, written out.

Runs on the 8 simulated CPU devices (`--topology=cpu:8`), so no libtpu or
CUDA plugin is needed; the search, pruning, tables and step-time formula are
the same code that plans pod topologies.
"""

import json
import os
import subprocess
import sys

import pytest

from launch import memory_plans as plan_memory
from launch.memory_plans import Plan

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# aot_compile's tiny step (XLA attention, optax AdamW, a given peak): 656,000
# parameters, whose weights and two AdamW moments take 7.9 MB replicated and
# a little under 1 MB per device with fsdp=8. 3 MiB per device holds the
# second and not the first.
TINY = ("--config=configs/pretrain.py:tiny", "--config.model.num_layers=2",
        "--config.data.seq_len=64", "--config.train.peak_flops=1e10",
        "--config.model.attention_backend=xla",
        "--config.optimizer.backend=optax", "--topology=cpu:8")


def start(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.Popen([sys.executable, "-m", "launch.plan_memory", *args],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every CLI run of this module, started together to share the wall time."""
  out = tmp_path_factory.mktemp("plans")
  procs = {
      "plan": start(*TINY, "--remat=none,full", "--micro_batch=1",
                    "--tensor=1,2", "--data=1,8", "--hbm_gib=0.003",
                    "--max_plans=1", f"--output_dir={out}"),
      "bad_topology": start(*TINY[:-1], "--topology=v5p-12"),
      "bad_remat": start(*TINY, "--remat=save_dots,sometimes"),
      "bad_micro": start(*TINY, "--micro_batch=4,x"),
      "bad_max_plans": start(*TINY, "--max_plans=0"),
      "bad_field": start(*TINY, "--config.model.remat=sometimes"),
      "bad_stage": start(*TINY, "--stage=3"),  # 3 stages of 2 layers
  }
  results = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    results[name] = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                stdout, stderr)
  results["out"] = out
  return results


def test_plan_that_fits_fits_and_oversized_does_not(runs):
  result = runs["plan"]
  assert result.returncode == 0, result.stderr
  report = json.loads((runs["out"] / "plans.json").read_text())
  rows = {(p["mesh_name"], p["plan"]["remat"]): p for p in report["plans"]}
  # fsdp=8 holds about 1 MB per device: it fits, and with remat='none' it
  # rules out the slower 'full' on its mesh without compiling it.
  fits = rows[("fsdp 8", "none")]
  assert fits["status"] == "fits"
  assert 0 < fits["memory_bytes"]["total"] <= 0.003 * 2 ** 30
  assert rows[("fsdp 8", "full")]["status"] == "skipped"
  assert report["best"]["fsdp"] == 8 and report["best"]["remat"] == "none"
  # Replicated (data=8), the weights and moments alone exceed 3 MiB: ruled
  # out for every remat policy and micro-batch, without a compile.
  oversized = rows[("data 8", "any")]
  assert oversized["status"] == "does not fit"
  assert "not compiled" in oversized["why"]
  # --max_plans=1: fsdp 4 x tensor 2 was not compiled (with either policy).
  assert report["compiled"] == 1 and report["untried"] == 2
  assert "Not compiled: 2 more plans after --max_plans=1." in result.stdout
  table = (runs["out"] / "plans.md").read_text()
  assert "| fsdp 8 | none | 1 / 2 | **best** fits |" in table
  assert table in result.stdout


def test_step_time_follows_its_formula(runs):
  report = json.loads((runs["out"] / "plans.json").read_text())
  for row in report["plans"]:
    if row["status"] != "fits":
      continue
    # model FLOPs / (chips x peak x MFU), then x (executed / model FLOPs).
    step = row["flops_analytic"] / (8 * 1e10 * 0.5)
    assert row["step_seconds"] == pytest.approx(step)
    recompute = row["flops_traced"] / row["flops_analytic"]
    assert row["recompute_factor"] == pytest.approx(recompute)
    assert row["step_seconds_recompute"] == pytest.approx(step * recompute)
    assert row["pipeline_bubble"] == 0.0


def test_pipeline_bubble_is_reported_and_not_applied_twice():
  # The pipeline's idle stages compute on stale data, so the traced FLOPs
  # (130 here) already hold the bubble's work.
  report = {"flops_analytic": 100.0, "flops_traced": 130.0, "devices": 4,
            "peak_flops": 10.0}
  plan = Plan(data=1, fsdp=1, tensor=1, stage=4, remat="full", micro=4,
              accum=1)
  est = plan_memory.step_estimates(report, plan, mfu=0.5)
  assert est["step_seconds"] == pytest.approx(100 / (4 * 10 * 0.5))
  assert est["pipeline_bubble"] == pytest.approx(3 / 7)
  assert est["step_seconds_recompute"] == pytest.approx(5 * 1.3)


def test_bad_flags_fail_by_name(runs):
  for name, words in {
      "bad_topology": ("--topology=v5p-12", "not a standard slice"),
      "bad_remat": ("--remat", "'sometimes'"),
      "bad_micro": ("--micro_batch",),
      "bad_max_plans": ("--max_plans",),
      "bad_field": ("model.remat", "'sometimes'"),
      "bad_stage": ("--stage",),
  }.items():
    result = runs[name]
    assert result.returncode == 1, (name, result.stderr)
    for word in words:
      assert word in result.stderr, (name, result.stderr)


def test_candidates_divide_and_order():
  plans = plan_memory.candidates(
      16, heads=6, kv_heads=2, layers=4, batch=32, tensors=[1, 2, 4],
      stages=[1, 2], remats=["full", "save_dots"], micros=[4, 1])
  for p in plans:
    assert p.data * p.fsdp * p.tensor * p.stage == 16
    assert 6 % p.tensor == 0 and 4 % p.stage == 0
    assert p.micro * p.data * p.fsdp * p.accum == 32
  assert {p.tensor for p in plans} == {1, 2}  # 4 does not divide 6 heads
  # Least recomputation first, then the largest micro-batch, then the
  # least replication.
  assert (plans[0].remat, plans[0].micro, plans[0].data) == ("save_dots", 4, 1)
  assert plans[-1].remat == "full" and plans[-1].micro == 1
  # micro 4 x 16 shards exceeds the batch of 32: only micro 1 there.
  assert not [p for p in plans if p.fsdp * p.data == 16 and p.micro == 4]
