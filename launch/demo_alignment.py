"""The demo's alignment stages (launch.demo calls them after SFT): the
comparison data, a reward model, PPO against it (with the pretraining loss
mixed in) and DPO, all from the tiny SFT model, each with its report section
(numbers, per-source table, PNG curves).

They take launch.demo's `run(stage, args)` so that every command is printed
and timed like the other stages' (this module defines no flags and does not
import launch.demo, which is the `__main__` module when the demo runs):

  from launch import demo_alignment
  report += demo_alignment.alignment(workdir, run)
"""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

Runner = Callable[..., str]  # launch.demo.run(stage, args, capture=False)

# Real data whose better answer is known (NOT human preferences): the tiny
# DPO preset's sources; `limit` records read per source.
SOURCES = ("arc_easy", "gsm8k", "bfcl_simple")
LIMIT = 600
EVAL_EVERY = 25  # steps between held-out evaluations (points of the curve)
# Half the tiny preset's 300 steps (1.75 passes over the comparisons): the
# held-out accuracy has levelled by then, and a step of 16 comparisons
# takes ~3.5 s on 2 CPU cores.
REWARD_STEPS = 150
PPO_ITERATIONS = 20
PTX_COEF = 0.1  # PPO-ptx: the pretraining loss joins every PPO step

# A panel of a curves figure: (title, y label, ((metric key, label), ...)).
Panel = tuple[str, str, Sequence[tuple[str, str]]]


def alignment(workdir: str, run: Runner) -> list[str]:
  """Comparisons -> reward model -> PPO-ptx and, beside it, DPO: the
  report sections of all three."""
  sft_model = os.path.join(workdir, "sft", "model")
  cmp_dir = comparisons(workdir, run)
  lines = reward_stage(workdir, run, sft_model, cmp_dir)
  lines += ppo_stage(workdir, run, sft_model, cmp_dir)
  return lines + dpo_stage(workdir, run, sft_model, cmp_dir)


def comparisons(workdir: str, run: Runner) -> str:
  """WORKDIR/comparisons (train.jsonl, eval.jsonl split by prompt), built
  once by launch.build_comparisons; returns the directory."""
  out = os.path.join(workdir, "comparisons")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("build_comparisons", [f"--sources={','.join(SOURCES)}",
                              f"--output={out}", f"--limit={LIMIT}"])
  return out


def _data_args(comparison_dir: str) -> list[str]:
  return ["--config.data.train_files=" + os.path.join(comparison_dir,
                                                      "train.jsonl"),
          "--config.data.eval_files=" + os.path.join(comparison_dir,
                                                     "eval.jsonl")]


def curves(run_dir: str, name: str, panels: Sequence[Panel]) -> str:
  """RUN_DIR/NAME.png: one panel per entry, each metric of metrics.jsonl
  against the step (held-out metrics, logged sparsely, with markers)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = [json.loads(line) for line in open(
      os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5),
                           squeeze=False)
  for ax, (title, ylabel, keys) in zip(axes[0], panels):
    for key, label in keys:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points), label=label,
                marker="o" if key.startswith("eval") else None)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if len(keys) > 1:
      ax.legend(fontsize="small")
  fig.tight_layout()
  path = os.path.join(run_dir, f"{name}.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------- reward model
def reward_stage(workdir: str, run: Runner, sft_model: str,
                 comparison_dir: str) -> list[str]:
  """A reward model from the SFT model on the comparisons' train split,
  scored on the held-out split against chance and "the longer wins"."""
  out = os.path.join(workdir, "reward")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("reward", ["--config=configs/reward.py:tiny", f"--workdir={out}",
                   f"--config.init_checkpoint={sft_model}",
                   *_data_args(comparison_dir),
                   f"--config.train.steps={REWARD_STEPS}",
                   f"--config.train.eval_every={EVAL_EVERY}"])
  return reward_report(out)


def reward_report(run_dir: str) -> list[str]:
  """The report section of a finished launch.reward run in RUN_DIR."""
  s = json.load(open(os.path.join(run_dir, "summary.json")))
  held_out = s["held_out"]
  a = held_out["all"]
  lines = [
      "## Reward model: the SFT trunk with a scalar head", "",
      f"- {s['train_data']['notes'].get('encoded', 0):,} training "
      f"comparisons, {a['comparisons']:,} held out ({a['pairs']:,} ranked "
      f"pairs), built from real data: **not human preferences**; dropped "
      f"{s['train_data']['dropped'] or 'none'}",
      f"- score read at the end-of-context token (id "
      f"{s['end_of_context_id']}), shifted so the best-ranked training "
      f"responses average 0",
      f"- held-out pair accuracy **{a['accuracy']:.1%}** (chance 50%, "
      f"\"the longer response wins\" {a['longer_is_better']:.1%}); held-out "
      f"loss {a['loss']:.3f} (ln 2 = 0.693 at chance), mean margin "
      f"{a['reward_margin']:.3f}", "",
      "| source | pairs | accuracy | longer wins |",
      "| --- | ---: | ---: | ---: |"]
  for name, r in sorted(held_out.items()):
    if name != "all":
      lines.append(f"| {name} | {r['pairs']} | {r['accuracy']:.1%} | "
                   f"{r['longer_is_better']:.1%} |")
  path = curves(run_dir, "reward", [
      ("loss", "-log sigmoid(r_better - r_worse)",
       (("loss", "training"), ("eval_loss", "held-out"))),
      ("pair accuracy", "accuracy",
       (("accuracy", "training"), ("eval_accuracy", "held-out")))])
  return lines + ["", f"- curves: `{path}`", ""]


# ------------------------------------------------------------------------ PPO
def ppo_stage(workdir: str, run: Runner, sft_model: str,
              comparison_dir: str) -> list[str]:
  """PPO-ptx from the SFT model against the reward model above, on the
  comparisons' prompts; held-out prompts and the pretraining loss measured
  before and after."""
  out = os.path.join(workdir, "ppo")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("ppo", ["--config=configs/ppo.py:tiny", f"--workdir={out}",
                f"--config.init_checkpoint={sft_model}",
                "--config.reward_model=" + os.path.join(
                    workdir, "reward", "reward_model"),
                "--config.data.prompts=" + os.path.join(comparison_dir,
                                                        "train.jsonl"),
                f"--config.ppo.iterations={PPO_ITERATIONS}",
                f"--config.ppo.ptx_coef={PTX_COEF}",
                "--config.ptx_workdir=" + os.path.join(workdir, "pretrain")])
  return ppo_report(out)


def ppo_report(run_dir: str) -> list[str]:
  """The report section of a finished launch.ppo run in RUN_DIR."""
  s = json.load(open(os.path.join(run_dir, "summary.json")))
  b, a, cfg = s["before"], s["after"], s["ppo"]
  records = [json.loads(line) for line in open(
      os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
  last = records[-1]
  ptx = (f"pretraining loss mixed in with coefficient {cfg['ptx_coef']}"
         if cfg["ptx_coef"] else "no pretraining loss mixed in")
  lines = [
      f"## {'PPO-ptx' if cfg['ptx_coef'] else 'PPO'}: the SFT policy "
      f"against the reward model", "",
      f"- {cfg['iterations']} iterations of {cfg['prompts_per_iteration']} "
      f"prompts (<= {cfg['max_new_tokens']} new tokens), "
      f"{cfg['epochs']} epochs x {cfg['minibatches']} minibatches; KL "
      f"penalty beta {cfg['kl_coef']} (final {s['final_beta']:.3f}); "
      f"{ptx}; "
      f"rewards from the reward model above (trained on comparisons built "
      f"from real data, **not human preferences**)",
      f"- on {s['prompts']['held_out']} held-out prompts, "
      f"{cfg['eval_samples']} replies each sampled as in training: reward "
      f"(score minus the missing-end penalty) **{b['reward']:.3f} -> "
      f"{a['reward']:.3f}**, reward-model score {b['raw_reward']:.3f} -> "
      f"{a['raw_reward']:.3f}, replies that end their turn {b['ended']:.0%} "
      f"-> {a['ended']:.0%}, mean reply {b['reply_tokens']:.1f} -> "
      f"{a['reply_tokens']:.1f} tokens; one greedy reply each: reward "
      f"{b['greedy_reward']:.3f} -> {a['greedy_reward']:.3f}, ended "
      f"{b['greedy_ended']:.0%} -> {a['greedy_ended']:.0%}",
      f"- KL to the SFT reference at the last iteration {last['kl']:.2f} "
      f"nats per reply; first minibatch's approximate KL <= "
      f"{max(r['first_minibatch_approx_kl'] for r in records):.1e} in every "
      f"iteration (the probability ratio starts at 1); sampler-vs-trainer "
      f"log-prob gap <= {max(r['sampler_logp_gap'] for r in records):.1e}"]
  if "pretrain_loss" in a:
    lines.append(f"- pretraining loss (held-out batches of the pretraining "
                 f"data) {b['pretrain_loss']:.3f} -> {a['pretrain_loss']:.3f}"
                 f" nats/token (a rise is what PPO costs the language "
                 f"model; the ptx term holds it down)")
  lines.append(f"- one iteration after compilation: rollout "
               f"{last['rollout_sec']:.1f} s, scoring {last['score_sec']:.1f}"
               f" s, learning {last['learn_sec']:.1f} s")
  path = curves(run_dir, "ppo", [
      ("reward", "per reply", (("reward", "with penalty"),
                               ("raw_reward", "reward-model score"))),
      ("KL to the reference", "nats per reply", (("kl", "KL"),)),
      ("replies", "tokens", (("response_length", "mean reply length"),))])
  return lines + ["", f"- curves: `{path}`", ""]


# ------------------------------------------------------------------------ DPO
def dpo_stage(workdir: str, run: Runner, sft_model: str,
              comparison_dir: str) -> list[str]:
  """DPO from the SFT model (also its frozen reference) on the comparisons'
  train split, the held-out split measured before and after."""
  out = os.path.join(workdir, "dpo")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("dpo", ["--config=configs/dpo.py:tiny", f"--workdir={out}",
                f"--config.init_checkpoint={sft_model}",
                *_data_args(comparison_dir),
                f"--config.train.eval_every={EVAL_EVERY}"])
  return dpo_report(out)


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
  path = curves(run_dir, "dpo", [
      ("loss", "DPO loss (nats / pair)",
       (("loss", "training"), ("eval_loss", "held-out"))),
      ("held-out pairs", "accuracy",
       (("eval_reward_accuracy", "implicit reward accuracy"),)),
      ("held-out pairs", "log pi(chosen) - log pi(rejected), nats",
       (("eval_logp_margin", "log-prob margin"),))])
  return lines + ["", f"- curves: `{path}`", ""]
