r"""Judges a multimodal checkpoint's answers to held-out visual instructions
against the teacher's (LLaVA-Bench's relative score on our own data).

  # held-out questions: stage 2's test scenes, described by a teacher
  python -m launch.generate_visual_instructions --held_out \
      --teacher=openai:http://localhost:8000/v1 --teacher_model=NAME \
      --num_scenes=60 --output=data/visual_test.jsonl
  # our stage-2 model answers them; a judge rates both answers
  JUDGE_KEY=... python -m launch.judge_images --checkpoint=S2/model \
      --questions=data/visual_test.jsonl --judge=openai:URL \
      --judge_model=NAME --api_key_env=JUDGE_KEY --output=runs/judge \
      [--limit=100] [--order=both] [--format=minigpt4]

Each assistant turn of a record is one question (`eval.image_judge`),
asked with its image in the checkpoint's chat format (--format); the judge
(--judge=openai:URL or native:DIR, `eval.judge`) reads the image's context
(captions and boxes), the question, the reference and our answer. Writes
DIR/judge.json (`JudgeResult.to_dict()` plus what was read and skipped)
and DIR/answers.jsonl (question, reference, our answer), and prints the
relative score 100 x mean(ours) / mean(reference) per category and
overall with the counts and failures. Bad records are counted and
skipped. See docs/multimodal.md ("Judging answers about images").
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from launch import flags as launch_flags
from launch.flags import quiet_library_logs, require_flags
from mllm_jax.eval import judge

(_CHECKPOINT, _TOKENIZER, _MESH,
 _VOCAB_PADDING) = launch_flags.define_inference_flags()
_JUDGE = launch_flags.define_teacher_flags("judge")
flags.adopt_module_key_flags(launch_flags)
_QUESTIONS = flags.DEFINE_string(
    "questions", None, "Visual instruction JSONL (launch."
    "generate_visual_instructions --held_out; images beside it).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Judge the first N questions "
                              "(0: all).")
_ORDER = flags.DEFINE_enum(
    "order", "both", list(judge.ORDERS), "Where the reference stands: "
    "both (each item judged in both orders), random, reference_first, "
    "ours_first.")
_FORMAT = flags.DEFINE_string(
    "format", "llava_v1", "Chat format the checkpoint's stage trained with "
    "(llava_v1, minigpt4, ...).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256,
                                "Tokens per answer of our model.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 8, "Questions per batch of our model; also a native "
    "judge's batch.")
_JUDGE_MAX_NEW = flags.DEFINE_integer("judge_max_new_tokens", 512,
                                      "Tokens per judge reply.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the judge's sampling and "
                             "of --order=random.")


def _check_flags() -> None:
  _JUDGE.check()
  require_flags(_CHECKPOINT, _QUESTIONS, _OUTPUT)
  for holder in (_MAX_NEW, _BATCH, _JUDGE_MAX_NEW):
    if holder.value < 1:
      raise app.UsageError(f"--{holder.name} must be >= 1")
  if _LIMIT.value < 0:
    raise app.UsageError("--limit must be >= 0")
  if not os.path.isfile(_QUESTIONS.value):
    raise app.UsageError(f"--questions: {_QUESTIONS.value} is not a file")


def _load_ours():
  """(sampler, tokenizer, chat format, image size) of --checkpoint."""
  from mllm_jax.convert import multimodal as mm_io  # pylint: disable=g-import-not-at-top
  from mllm_jax.data import chat  # pylint: disable=g-import-not-at-top
  from mllm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from mllm_jax.generate.multimodal import MultimodalSampler  # pylint: disable=g-import-not-at-top
  path = _CHECKPOINT.value
  if not mm_io.is_multimodal(path):
    raise FileNotFoundError(f"--checkpoint: {path} is not a multimodal "
                            f"checkpoint (no {mm_io.CONFIG_FILE})")
  tokenizer = load_tokenizer(_TOKENIZER.value or path)
  problem = launch_flags.vocab_mismatch(tokenizer, path, _VOCAB_PADDING.value)
  if problem:
    raise ValueError(problem)
  fmt = chat.get_format(_FORMAT.value, tokenizer)
  mesh = launch_flags.mesh_from_flag(_MESH)
  cfg, model = mm_io.load_model(path, mesh=mesh)
  sampler = MultimodalSampler(model, tokenizer, mesh,
                              pad_id=max(tokenizer.pad_id, 0),
                              prompt_multiple=32)
  return sampler, tokenizer, fmt, cfg.vision.image_size


def _report(result: judge.JudgeResult, read: dict, say) -> None:
  say(result.table())
  say(f"judge {result.judge}: {result.ratings_asked} ratings asked "
      f"(--order={result.order}), {result.items_failed} items unscored; "
      f"failures {dict(result.failures) or 'none'}"
      + (f"; first exception: {result.first_exception}"
         if result.first_exception else ""))
  if result.position_bias is not None:
    say(f"position bias: {result.position_bias:+.2f} points towards "
        f"Assistant 1")
  say(f"records skipped: {read['dropped'] or 'none'}")


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _check_flags()
  from mllm_jax.data import chat  # pylint: disable=g-import-not-at-top
  from mllm_jax.eval import image_judge  # pylint: disable=g-import-not-at-top
  say = lambda message: print(message, flush=True)
  stats = chat.ChatStats()
  questions = image_judge.read_questions(_QUESTIONS.value, stats)
  if _LIMIT.value:
    questions = questions[:_LIMIT.value]
  if not questions:
    sys.exit(f"judge_images: error: --questions: no usable question in "
             f"{_QUESTIONS.value} (skipped: {dict(stats.counts)})")
  if stats.notes["not_held_out"]:
    say(f"warning: {stats.notes['not_held_out']} records of "
        f"{_QUESTIONS.value} were not generated with --held_out: stage 2 "
        f"may have trained on them")
  try:
    judge_model = launch_flags.teacher_from_flags(_JUDGE, _BATCH.value)
    sampler, tokenizer, fmt, size = _load_ours()
  except (ValueError, FileNotFoundError, KeyError) as e:
    sys.exit(f"judge_images: error: {e}")
  say(f"{len(questions)} questions from {_QUESTIONS.value}; "
      f"{_CHECKPOINT.value} answers, {judge_model.describe()} judges")
  items = image_judge.answer_questions(
      sampler, tokenizer, fmt, questions, size, _MAX_NEW.value, _BATCH.value,
      stats)
  result = judge.judge_answers(items, judge_model, order=_ORDER.value,
                               seed=_SEED.value,
                               max_new_tokens=_JUDGE_MAX_NEW.value)
  read = stats.summary()
  os.makedirs(_OUTPUT.value, exist_ok=True)
  with open(os.path.join(_OUTPUT.value, "judge.json"), "w",
            encoding="utf-8") as f:
    json.dump({"checkpoint": _CHECKPOINT.value,
               "questions": _QUESTIONS.value, "read": read,
               **result.to_dict()}, f, indent=1)
  with open(os.path.join(_OUTPUT.value, "answers.jsonl"), "w",
            encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps({"id": item.id, "category": item.category,
                          "question": item.question,
                          "reference": item.reference,
                          "answer": item.answer}) + "\n")
  _report(result, read, say)
  say(f"wrote {os.path.join(_OUTPUT.value, 'judge.json')}")


if __name__ == "__main__":
  app.run(main)
