"""The demo's alignment stages (launch.demo calls them after SFT): the
comparison data and DPO from the tiny SFT model, each with its report
section (numbers, per-source table, PNG curve).

They take launch.demo's `run(stage, args)` so that every command is printed
and timed like the other stages' (this module defines no flags and does not
import launch.demo, which is the `__main__` module when the demo runs):

  from launch import demo_alignment
  cmp_dir = demo_alignment.comparisons(workdir, run)
  report += demo_alignment.dpo_stage(workdir, run,
                                     os.path.join(workdir, "sft", "model"),
                                     cmp_dir)
"""

from __future__ import annotations

import json
import os
from typing import Callable

Runner = Callable[..., str]  # launch.demo.run(stage, args, capture=False)

# Real data whose better answer is known (NOT human preferences): the tiny
# DPO preset's sources; `limit` records read per source.
SOURCES = ("arc_easy", "gsm8k", "bfcl_simple")
LIMIT = 600
EVAL_EVERY = 25  # steps between held-out evaluations (points of the curve)


def comparisons(workdir: str, run: Runner) -> str:
  """WORKDIR/comparisons (train.jsonl, eval.jsonl split by prompt), built
  once by launch.build_comparisons; returns the directory."""
  out = os.path.join(workdir, "comparisons")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("build_comparisons", [f"--sources={','.join(SOURCES)}",
                              f"--output={out}", f"--limit={LIMIT}"])
  return out


def dpo_stage(workdir: str, run: Runner, sft_model: str,
              comparison_dir: str) -> list[str]:
  """DPO from the SFT model (also its frozen reference) on the comparisons'
  train split, the held-out split measured before and after."""
  out = os.path.join(workdir, "dpo")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("dpo", ["--config=configs/dpo.py:tiny", f"--workdir={out}",
                f"--config.init_checkpoint={sft_model}",
                "--config.data.train_files=" + os.path.join(
                    comparison_dir, "train.jsonl"),
                "--config.data.eval_files=" + os.path.join(
                    comparison_dir, "eval.jsonl"),
                f"--config.train.eval_every={EVAL_EVERY}"])
  return dpo_report(out)


def dpo_curves(run_dir: str) -> str:
  """RUN_DIR/dpo.png from metrics.jsonl: the loss (training and held-out)
  and the held-out implicit-reward accuracy and log-prob margin."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = [json.loads(line) for line in open(
      os.path.join(run_dir, "metrics.jsonl")) if line.strip()]

  def series(key):
    return [(r["step"], r[key]) for r in records if key in r]

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
  for key, label in (("loss", "training"), ("eval_loss", "held-out")):
    if series(key):
      left.plot(*zip(*series(key)), label=label,
                marker="o" if key.startswith("eval") else None)
  left.set(xlabel="step", ylabel="DPO loss (nats / pair)", title="loss")
  left.legend()
  if series("eval_reward_accuracy"):
    right.plot(*zip(*series("eval_reward_accuracy")), marker="o",
               color="C2", label="implicit reward accuracy")
  right.set(xlabel="step", ylabel="accuracy", title="held-out pairs")
  margin = right.twinx()
  if series("eval_logp_margin"):
    margin.plot(*zip(*series("eval_logp_margin")), marker="s", color="C3",
                label="log-prob margin")
  margin.set_ylabel("log pi(chosen) - log pi(rejected), nats")
  handles = (right.get_legend_handles_labels()[0] +
             margin.get_legend_handles_labels()[0])
  right.legend(handles=handles, fontsize="small")
  fig.tight_layout()
  path = os.path.join(run_dir, "dpo.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def dpo_report(run_dir: str) -> list[str]:
  """The report section of a finished launch.dpo run in RUN_DIR."""
  s = json.load(open(os.path.join(run_dir, "summary.json")))
  before, after = s["before"], s["after"]
  b, a = before["all"], after["all"]
  d = s["dpo"]
  loss = d["loss"] + (f" (eps {d['label_smoothing']})"
                      if d["loss"] == "cdpo" else "")
  lines = [
      "## DPO: preference optimisation from the SFT model", "",
      f"- {s['train_comparisons']:,} training comparisons, "
      f"{s['eval_comparisons']:,} held out (no prompt on both sides), "
      f"built from real data: **not human preferences**; dropped "
      f"{s['train_data']['dropped'] or 'none'}",
      f"- loss {loss}, beta {d['beta']}, reference {d['reference']}; "
      f"the SFT model is the policy's start and the frozen reference",
      f"- held-out pairs ({a['pairs']}): log-prob margin log pi(chosen) - "
      f"log pi(rejected) **{b['logp_margin']:.3f} -> {a['logp_margin']:.3f}"
      f"** nats; the policy prefers the chosen response in "
      f"{b['prefers_chosen']:.0%} -> **{a['prefers_chosen']:.0%}** of pairs;"
      f" implicit reward accuracy {a['reward_accuracy']:.0%}, margin "
      f"{a['reward_margin']:.3f} (0% and 0 before: the policy is the "
      f"reference, every pair a tie)",
      f"- chosen log-prob {b['chosen_logp']:.2f} -> {a['chosen_logp']:.2f}, "
      f"rejected {b['rejected_logp']:.2f} -> {a['rejected_logp']:.2f} "
      f"(which of them moves)", "",
      "| source | pairs | margin before | margin after | prefers chosen "
      "before | after | reward accuracy |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in sorted(after.items()):
    if name == "all":
      continue
    q = before[name]
    lines.append(f"| {name} | {r['pairs']} | {q['logp_margin']:.3f} | "
                 f"{r['logp_margin']:.3f} | {q['prefers_chosen']:.0%} | "
                 f"{r['prefers_chosen']:.0%} | {r['reward_accuracy']:.0%} |")
  return lines + ["", f"- curves: `{dpo_curves(run_dir)}`", ""]
