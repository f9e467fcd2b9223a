"""The demo's multimodal stages (launch.demo calls them after SFT): stage 1
aligns a fresh projector on real captioned images (easy-vqa's shapes
described from their labels, and Tux Paint stamps), stage
2 tunes projector and LLM on real visual questions (easy-vqa's shapes and
colours, and questions about composited scenes of several stamps), each
with its report section: held-out losses with and without the image, the
captions or answers it generates, and VQA accuracy per question type beside
the majority-answer and chance baselines.

The vision tower is a tiny randomly initialised ViT (no CLIP weights
install offline). Where LLaVA freezes a pretrained CLIP, the tiny preset
trains the tower in stage 1 with the projector (captioning as its
pretraining; a frozen random tower gave the LLM nothing it used,
docs/multimodal.md), and freezes it in stage 2.

Like demo_alignment, the stages take launch.demo's `run(stage, args)`:

  from launch import demo_multimodal
  report += demo_multimodal.multimodal(workdir, run)
"""

from __future__ import annotations

import json
import os
from typing import Callable

from launch.demo_alignment import curves
from mllm_jax.train.multimodal_task import STAGE_TRAINABLE

Runner = Callable[..., str]  # launch.demo.run(stage, args, capture=False)

ALIGN_STEPS = 800
ALIGN_LR = 3e-3
CAPTION_SOURCES = ("easy_vqa", "tuxpaint")  # held out: easy-vqa's first
INSTRUCT_STEPS = 300
INSTRUCT_LR = 1e-3  # 3e-4 (the preset) answered "no" to everything after 150 steps
EVAL_EVERY = 50
VQA_SOURCES = ("easy_vqa", "scenes")
# The question types the image decides: easy-vqa's yes/no questions are
# 82% answerable from their wording alone (docs/multimodal.md), so they
# would only teach the text prior.
QUESTION_TYPES = ("color", "shape", *(f"scene_{kind}" for kind in (
    "count", "presence", "half_lr", "half_tb", "leftmost", "relation_lr",
    "relation_tb")))
HELD_OUT = 200  # held-out questions (stage 2) scored by generation


def multimodal(workdir: str, run: Runner) -> list[str]:
  """Stage 1 from the SFT model, then stage 2 from stage 1's model."""
  align = align_stage(workdir, run, os.path.join(workdir, "sft", "model"))
  return align + instruct_stage(workdir, run, os.path.join(
      workdir, "mm_align", "model"))


def align_stage(workdir: str, run: Runner, text_model: str) -> list[str]:
  out = os.path.join(workdir, "mm_align")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("mm_align", ["--config=configs/mm.py:align_tiny", f"--workdir={out}",
                     f"--config.init_checkpoint={text_model}",
                     f"--config.data.caption_sources={CAPTION_SOURCES!r}",
                     "--config.data.max_examples=0",  # all of both
                     f"--config.train.steps={ALIGN_STEPS}",
                     f"--config.optimizer.learning_rate={ALIGN_LR}",
                     f"--config.train.eval_every={EVAL_EVERY}",
                     "--config.data.eval_examples=100",
                     "--config.eval.max_new_tokens=24"])
  return align_report(out)


def _losses(s: dict) -> str:
  b, a = s["before"], s["after"]
  return (f"held-out loss **{b['loss']:.3f} -> {a['loss']:.3f}** nats/token; "
          f"with every image zeroed {b['loss_zero_images']:.3f} -> "
          f"{a['loss_zero_images']:.3f} (the gap is what the image is worth)")


def _trained(s: dict) -> str:
  parts = {r"^projector\.": "projector", r"^vision\.": "tower",
           r"^decoder\.": "LLM"}
  trainable = s.get("trainable", STAGE_TRAINABLE[s["stage"]])
  moved = [name for pattern, name in parts.items() if pattern in trainable]
  frozen = [name for name in parts.values() if name not in moved]
  verb = "stays" if len(frozen) == 1 else "stay"
  return (f"the {' and '.join(moved)} train, the {' and '.join(frozen)} "
          f"{verb} bit-identical (tests/test_mm_stages.py)")


def _examples(s: dict, n: int = 4) -> list[str]:
  rows = ["| prompt | reference | before | after |", "| --- | --- | --- | --- |"]
  clean = lambda t: t.replace("\n", " ").replace("|", "/")[:80]
  for b, a in list(zip(s["before"]["examples"], s["after"]["examples"]))[:n]:
    rows.append(f"| {clean(a['prompt'])} | {clean(a['reference'])} | "
                f"{clean(b['reply'])} | {clean(a['reply'])} |")
  return rows


def align_report(run_dir: str) -> list[str]:
  """The report section of a finished launch.mm_align run in RUN_DIR."""
  s = json.load(open(os.path.join(run_dir, "summary.json")))
  b, a = s["before"]["captions"], s["after"]["captions"]
  path = curves(run_dir, "loss", [("stage 1: caption loss", "nats/token", (
      ("loss", "training"), ("eval_loss", "held-out")))])
  return [
      "## Multimodal stage 1: describing images", "",
      f"- {s['train_examples']:,} real captioned images ("
      f"{', '.join(CAPTION_SOURCES)}), {s['tokens_per_image']} image tokens "
      f"each from a tiny ViT (random at the start); {_trained(s)}",
      f"- {s['held_out_examples']} held-out images: {_losses(s)}",
      f"- greedy captions of {a['images']} held-out images against their "
      f"captions: CIDEr-D {b['CIDEr-D']:.3f} -> **{a['CIDEr-D']:.3f}**, "
      f"BLEU-4 {b['BLEU-4']:.3f} -> {a['BLEU-4']:.3f}, ROUGE-L "
      f"{b['ROUGE-L']:.3f} -> {a['ROUGE-L']:.3f}", "",
      *_examples(s), "", f"- curves: `{path}`", ""]


def instruct_stage(workdir: str, run: Runner, stage1_model: str
                   ) -> list[str]:
  out = os.path.join(workdir, "mm_instruct")
  if not os.path.exists(os.path.join(out, "summary.json")):
    run("mm_instruct", ["--config=configs/mm.py:instruct_tiny",
                        f"--workdir={out}",
                        f"--config.init_checkpoint={stage1_model}",
                        f"--config.data.vqa_sources={VQA_SOURCES!r}",
                        f"--config.data.question_types={QUESTION_TYPES!r}",
                        f"--config.train.steps={INSTRUCT_STEPS}",
                        f"--config.optimizer.learning_rate={INSTRUCT_LR}",
                        f"--config.train.eval_every={EVAL_EVERY}",
                        f"--config.data.eval_examples={HELD_OUT}",
                        f"--config.eval.limit={HELD_OUT}",
                        "--config.eval.max_new_tokens=8"])
  return instruct_report(out)


def instruct_report(run_dir: str) -> list[str]:
  """The report section of a finished launch.mm_instruct run in RUN_DIR."""
  s = json.load(open(os.path.join(run_dir, "summary.json")))
  base = s["data"]["answer_baselines"]
  b, a = s["before"], s["after"]
  path = curves(run_dir, "loss", [("stage 2: answer loss", "nats/token", (
      ("loss", "training"), ("eval_loss", "held-out")))])
  lines = [
      "## Multimodal stage 2: visual questions, loss on the answers", "",
      f"- {s['train_examples']:,} training questions ({', '.join(VQA_SOURCES)}: "
      f"easy-vqa's colour and shape questions, not its yes/no ones, "
      f"and questions about composited scenes) "
      f"through the VQA templates in the `{s['format']}` format; {_trained(s)}",
      f"- {s['held_out_examples']} held-out test questions: {_losses(s)}",
      "- VQA accuracy (normalised exact match of the greedy answer), per "
      "question type; *majority*: always the type's most common training "
      "answer; *question only*: the most common training answer to the same "
      "question text (what a model blind to the image can reach); *zeroed*: "
      "the same questions with the image zeroed", "",
      "| type | questions | chance | majority | question only | before | "
      "after | after, image zeroed |", "| --- | ---: | ---: | ---: | ---: | "
      "---: | ---: | ---: |"]
  for kind, row in a["vqa"].items():
    chance = base.get(kind, {}).get("chance")
    lines.append(
        f"| {kind} | {row['count']:.0f} | "
        f"{'' if chance is None else f'{chance:.1%}'} | "
        f"{base.get(kind, {}).get('majority', float('nan')):.1%} | "
        f"{base.get(kind, {}).get('question_only', float('nan')):.1%} | "
        f"{b['vqa'].get(kind, {}).get('accuracy', float('nan')):.1%} | "
        f"**{row['accuracy']:.1%}** | "
        f"{a['vqa_zero_images'][kind]['accuracy']:.1%} |")
  return lines + ["", *_examples(s), "", f"- curves: `{path}`", ""]
