"""The main job: the whole chain at tiny scale on CPU, one binary per stage.

Each stage runs exactly the command a user would type (printed before it
runs), in WORKDIR/<stage>, and contributes its headline numbers to
WORKDIR/report.md: the evidence that the stage did its job, not only that it
ran. Stages already finished are skipped when the demo is run again.

  python -m launch.demo --workdir=workdir/demo
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/demo", "Where every stage writes.")
flags.DEFINE_integer("pretrain_steps", 300, "Steps of the tiny pretraining.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(stage: str, args: list[str], capture: bool = False) -> str:
  """Runs `python -m launch.<stage> ARGS`; streams (or returns) its output."""
  command = [sys.executable, "-m", f"launch.{stage}", *args]
  print(f"\n$ {' '.join(shlex.quote(a) for a in command[1:])}", flush=True)
  start = time.time()
  result = subprocess.run(command, cwd=REPO, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
  print(f"[demo] {stage} took {time.time() - start:.0f} s", flush=True)
  if capture:
    print(result.stdout)
  return result.stdout or ""


def loss_plot(stage_dir: str, title: str) -> str:
  """WORKDIR/<stage>/loss.png from the run's metrics.jsonl: training loss
  and, where the run evaluated, held-out loss; returns a report line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = [json.loads(line) for line in open(
      os.path.join(stage_dir, "metrics.jsonl")) if line.strip()]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key, label in (("loss", "training loss"), ("eval_loss", "held-out")):
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None,
              label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(stage_dir, "loss.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return f"- loss curve: `{path}`"


def clean_web(workdir: str) -> list[str]:
  """WARC -> clean, deduplicated text (the RefinedWeb recipe), on real pages:
  LibreOffice help in five languages, Python docs and pywb's iana.org crawl."""
  from data_pipeline.samples import write_sample_crawl
  out = os.path.join(workdir, "clean_web")
  if not os.path.exists(os.path.join(out, "stats.json")):
    warcs = write_sample_crawl(os.path.join(workdir, "crawl"))
    run("clean_corpus", ["--config=configs/data/refinedweb.py",
                         f"--config.input={warcs}", f"--workdir={out}"])
  stages = json.load(open(os.path.join(out, "stats.json")))["stages"]
  first, last = stages[0], stages[-1]
  lines = ["## Web data: Common Crawl-style WARCs to a clean corpus", "",
           f"- {first['docs_in']:,} WARC records ({first['bytes_in']:,} bytes)"
           f" -> {last['docs_out']:,} documents ({last['bytes_out']:,} bytes "
           f"of text); funnel plot `{out}/funnel.png`", "",
           "| stage | docs in | docs out | top drop reason |",
           "| --- | ---: | ---: | --- |"]
  for stage in stages:
    assert stage["docs_in"] == stage["docs_out"] + sum(
        stage["dropped"].values()), f"counts do not add up in {stage['name']}"
    top = max(stage["dropped"].items(), key=lambda kv: kv[1],
              default=("", 0))
    lines.append(f"| {stage['name']} | {stage['docs_in']:,} | "
                 f"{stage['docs_out']:,} | {top[0]} {top[1] or ''} |")
  return lines + [""]


def tokenize(workdir: str) -> list[str]:
  """One tokenizer over both sources, then token shards of each: Shakespeare
  (two plays held out for perplexity) and the web corpus just cleaned."""
  from mllm_jax.data.samples import shakespeare_files
  out = os.path.join(workdir, "tokens")
  plays = os.path.join(workdir, "plays")
  for split, files in zip(("train", "held_out"), shakespeare_files()):
    os.makedirs(os.path.join(plays, split), exist_ok=True)
    for path in files:
      link = os.path.join(plays, split, os.path.basename(path))
      if not os.path.exists(link):
        os.symlink(path, link)
  train_plays, held_out_plays = (os.path.join(plays, "train", "*.txt"),
                                 os.path.join(plays, "held_out", "*.txt"))
  web = os.path.join(workdir, "clean_web", "corpus", "en", "*.jsonl")
  tokenizer = os.path.join(out, "tokenizer")
  if not os.path.exists(tokenizer + ".model"):
    run("train_tokenizer", [f"--input={train_plays},{web}",
                            "--text_split=paragraph", "--vocab_size=1024",
                            f"--output={tokenizer}"])
  jobs = (("shakespeare", train_plays, "chunk"),
          ("held_out", held_out_plays, "chunk"), ("web", web, "file"))
  lines = ["## Tokens: a 1,024-piece SentencePiece BPE over both sources", "",
           "| shards | documents | tokens | dropped |", "| --- | ---: | ---: | ---: |"]
  for name, inputs, split in jobs:
    if not os.path.exists(os.path.join(out, f"{name}.summary.json")):
      run("tokenize_corpus", [f"--input={inputs}",
                              f"--tokenizer={tokenizer}.model",
                              f"--output_dir={out}", f"--name={name}",
                              f"--text_split={split}"])
    summary = json.load(open(os.path.join(out, f"{name}.summary.json")))
    lines.append(f"| {name} | {summary['documents']:,} | "
                 f"{summary['tokens']:,} | {sum(summary['dropped'].values())} |")
  return lines + [""]


def pretrain(workdir: str) -> list[str]:
  """A tiny LLaMA on a mixture of Shakespeare and the cleaned web text."""
  out = os.path.join(workdir, "pretrain")
  tokens = os.path.join(workdir, "tokens")
  sources = (("shakespeare", f"{tokens}/shakespeare-*", 0.8, 1.0),
             ("web", f"{tokens}/web-*", 0.2, 3.0))
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("pretrain", [
        "--config=configs/pretrain.py:tiny", f"--workdir={out}",
        f"--config.train.steps={FLAGS.pretrain_steps}",
        "--config.data_recipe=",
        f"--config.data.tokenizer={tokens}/tokenizer.model",
        f"--config.data.sources={sources!r}",
        f"--config.data.eval_sources={(('held_out', f'{tokens}/held_out-*'),)!r}"])
  summary = json.load(open(os.path.join(out, "summary.json")))
  config = json.load(open(os.path.join(out, "config.json")))
  counts = config["data_info"]["sources"]
  lines = [
      "## Pretraining: a tiny LLaMA on Shakespeare + clean web text", "",
      "- mixture by tokens: " + ", ".join(
          f"{name} {weight:.0%} (up to {epochs:g} epochs of "
          f"{counts[name]['tokens']:,} tokens)"
          for name, _, weight, epochs in sources),
      f"- held-out plays: loss **{summary['eval_loss']:.3f}** nats/token "
      f"(perplexity {summary['eval_perplexity']:.1f}) vs the unigram "
      f"baseline {summary['unigram_loss']:.3f} "
      f"(perplexity {summary['unigram_perplexity']:.1f})",
      f"- model: `{out}/model`; metrics: `{out}/metrics.jsonl`",
      loss_plot(out, "pretraining"), ""]
  if summary["eval_loss"] >= summary["unigram_loss"]:
    raise SystemExit("pretraining did not beat the unigram baseline")
  return lines


def model_args(workdir: str) -> list[str]:
  # The checkpoint directory holds the tokenizer too.
  return [f"--checkpoint={os.path.join(workdir, 'pretrain', 'model')}"]


def generate(workdir: str) -> list[str]:
  """Greedy continuation from the pretrained model (compiled KV-cache loop)."""
  text = run("generate", model_args(workdir) + [
      "--prompt=ROMEO.", "--max_new_tokens=48"], capture=True)
  quoted = "\n".join("> " + line for line in text.strip().splitlines())
  return ["## Generation: greedy continuation of `ROMEO.`", "", quoted, ""]


EVAL_TASKS = {"piqa": 2, "arc_easy": 4, "hellaswag": 4}  # task -> choices


def evaluate(workdir: str) -> list[str]:
  """Zero-shot multiple choice by log-likelihood on real benchmark data."""
  out = os.path.join(workdir, "eval", "results.json")
  if not os.path.exists(out):
    run("evaluate", model_args(workdir) + [
        f"--tasks={','.join(EVAL_TASKS)}", "--num_fewshot=0", "--limit=200",
        f"--output={out}"])
  results = json.load(open(out))["results"]
  lines = ["## Evaluation: zero-shot multiple choice (first 200 examples)", "",
           "A model trained on Shakespeare alone is expected near chance; the "
           "numbers show the harness end to end.", "",
           "| task | acc | acc_norm | chance |", "| --- | ---: | ---: | ---: |"]
  for task, choices in EVAL_TASKS.items():
    r = results[task]
    lines.append(f"| {task} | {r['acc']:.3f} | {r['acc_norm']:.3f} | "
                 f"{1 / choices:.3f} |")
  return lines + [""]


def _score_table(before: dict, after: dict, chance: dict) -> list[str]:
  rows = ["| task | examples | acc before | acc after | well-formed before | "
          "well-formed after | chance |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in after.items():
    b = before.get(name, {})
    rows.append(
        f"| {name} | {r['num_examples']} | {b.get('acc', float('nan')):.3f} | "
        f"{r.get('acc', float('nan')):.3f} | "
        f"{b.get('well_formed', float('nan')):.2f} | "
        f"{r.get('well_formed', float('nan')):.2f} | "
        f"{chance.get(name, float('nan')):.3f} |")
  return rows


def flan_stage(workdir: str) -> list[str]:
  """FLAN instruction tuning of the tiny pretrained model: real task data
  through promptsource's and our templates, packed, loss on the targets."""
  from mllm_jax.data import flan
  out = os.path.join(workdir, "flan")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("flan", ["--config=configs/flan.py:tiny", f"--workdir={out}",
                 "--config.init_checkpoint=" + os.path.join(
                     workdir, "pretrain", "model")])
  summary = json.load(open(os.path.join(out, "summary.json")))
  chance = {name: 1 / len(r.options) for split in ("held_in", "held_out")
            for name in summary["after"][split]
            for _, r in flan.heldout_prompts(name, 0, 1) if r.options}
  lines = ["## FLAN: instruction tuning on a task mixture", "",
           f"- from the tiny pretrained model; final training loss "
           f"{summary['final_loss']:.3f} (targets only); zero-shot on each "
           f"task's evaluation half (never trained on), first "
           f"{next(iter(summary['after']['held_in'].values()))['num_examples']}"
           f" examples; `acc` ranks the options by log-likelihood, "
           f"`well-formed` is the share of greedy answers that are one of "
           f"the options", loss_plot(out, "FLAN (loss on targets)"), "",
           "Held-in tasks:", ""]
  lines += _score_table(summary["before"]["held_in"],
                        summary["after"]["held_in"], chance)
  lines += ["", "Held-out families (never trained on):", ""]
  lines += _score_table(summary["before"]["held_out"],
                        summary["after"]["held_out"], chance)
  return lines + [""]


def sft_stage(workdir: str) -> list[str]:
  """SFT of the tiny pretrained model on real ShareGPT conversations, loss on
  the assistant's turns; held-out: alpaca-eval's instructions."""
  out = os.path.join(workdir, "sft")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("sft", ["--config=configs/sft.py:tiny", f"--workdir={out}",
                "--config.init_checkpoint=" + os.path.join(
                    workdir, "pretrain", "model")])
  s = json.load(open(os.path.join(out, "summary.json")))
  b, a = s["before"], s["after"]
  lines = ["## SFT: conversations, loss on the assistant's turns", "",
           f"- {s['train_conversations']:,} ShareGPT conversations in the "
           f"`{s['format']}` format (dropped: "
           f"{s['train_data']['dropped'] or 'none'}; "
           f"{s['train_data']['notes'].get('cut_to_leading_rounds', 0)} cut "
           f"to the leading rounds that fit a 256-token row), packed at "
           f"{s['packing_efficiency']:.1%} real tokens per row",
           f"- held-out response loss on {s['eval_data']['notes'].get('encoded', 0)} "
           f"alpaca-eval instructions (reference answers): "
           f"**{b['response_loss']:.3f} -> {a['response_loss']:.3f}** nats/token",
           f"- turns ended with the end-of-turn token within "
           f"{a['prompts']} held-out prompts: {b['end_of_turn_rate']:.0%} -> "
           f"**{a['end_of_turn_rate']:.0%}** (mean reply "
           f"{b['mean_reply_tokens']:.0f} -> {a['mean_reply_tokens']:.0f} "
           f"tokens)",
           "- zero-shot benchmarks before -> after (they should not "
           "collapse): " + ", ".join(
               f"{k} {b['benchmarks'][k]:.3f} -> {a['benchmarks'][k]:.3f}"
               for k in a["benchmarks"]),
           loss_plot(out, "SFT (loss on assistant turns)"), ""]
  return lines


def alignment_stage(workdir: str) -> list[str]:
  """Comparisons built from real data, a reward model, PPO-ptx and DPO,
  all from the SFT model (launch/demo_alignment.py)."""
  from launch import demo_alignment  # pylint: disable=g-import-not-at-top
  return demo_alignment.alignment(workdir, run)


def multimodal_stage(workdir: str) -> list[str]:
  """Eyes for the SFT model: stage 1 (projector on captioned images) and
  stage 2 (projector + LLM on visual questions), launch/demo_multimodal.py."""
  from launch import demo_multimodal  # pylint: disable=g-import-not-at-top
  return demo_multimodal.multimodal(workdir, run)


BASE_TASKS = {"piqa": 2, "arc_easy": 4}  # task -> choices


def base_model(workdir: str) -> list[str]:
  """Or start from an open base model: SmolLM2-135M-Instruct imported from
  its GGUF file (weights, tokenizer, chat template), asked a question through
  its chat template and scored on the same benchmarks as the tiny model."""
  from mllm_jax.paths import smollm2_gguf
  out = os.path.join(workdir, "smollm2")
  model = os.path.join(out, "model")
  if not os.path.exists(os.path.join(model, "model_config.json")):
    run("convert_checkpoint", ["--from=gguf", f"--input={smollm2_gguf()}",
                               f"--output={model}"])
  question = "What is the capital of France?"
  answer = run("generate", [f"--checkpoint={model}", "--chat_template",
                            f"--prompt={question}", "--max_new_tokens=24"],
               capture=True).strip()
  results_file = os.path.join(out, "eval", "results.json")
  if not os.path.exists(results_file):
    run("evaluate", [f"--checkpoint={model}",
                     f"--tasks={','.join(BASE_TASKS)}", "--num_fewshot=0",
                     "--limit=100", f"--output={results_file}"])
  results = json.load(open(results_file))["results"]
  lines = ["## A real base model: SmolLM2-135M-Instruct from GGUF", "",
           f"- imported from `{os.path.basename(smollm2_gguf())}` (Q4_1, "
           f"dequantised to float32) with its tokenizer and ChatML template; "
           f"logits match transformers' own GGUF loader within 1.6e-4 "
           f"(`tests/test_convert_gguf.py`)",
           f"- asked through its chat template: *{question}* -> "
           f"*{answer}*", "",
           "Zero-shot multiple choice, first 100 examples (the tiny model's "
           "numbers above are its baseline):", "",
           "| task | acc | acc_norm | chance |", "| --- | ---: | ---: | ---: |"]
  for task, choices in BASE_TASKS.items():
    r = results[task]
    lines.append(f"| {task} | {r['acc']:.3f} | {r['acc_norm']:.3f} | "
                 f"{1 / choices:.3f} |")
  return lines + [""]


STAGES: list[Callable[[str], list[str]]] = [clean_web, tokenize, pretrain,
                                            generate, evaluate, flan_stage,
                                            sft_stage, multimodal_stage,
                                            alignment_stage, base_model]


def main(argv):
  del argv
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  report = ["# mllm_jax demo report", ""]
  for stage in STAGES:
    report += stage(workdir)
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(report))
  print("\n" + "\n".join(report))
  print(f"[demo] report: {path}")


if __name__ == "__main__":
  app.run(main)
