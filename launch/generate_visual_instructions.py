r"""Generates visual instruction data from captions and boxes, as LLaVA built
its 158K set: a text-only teacher writes conversations, detailed
descriptions and complex reasoning about images it knows only from their
objects' captions and boxes.

  # our own (text) checkpoint as the teacher
  python -m launch.generate_visual_instructions \
      --teacher=native:runs/smollm2 --output=data/visual.jsonl \
      --num_scenes=200 [--kinds=conversation,detail,reasoning]
  # any OpenAI-compatible endpoint (vLLM, llama.cpp server, ...)
  OPENAI_API_KEY=... python -m launch.generate_visual_instructions \
      --teacher_url=http://localhost:8000/v1 --teacher_model=NAME \
      --api_key_env=OPENAI_API_KEY --output=data/visual.jsonl \
      --sources=scenes,gcompris --num_scenes=1000

Writes FILE.jsonl (the project's conversation records: the first user turn
starts with `<image>`, `images` names a file under FILE.images/, `meta`
holds kind and source), the images under FILE.images/, and
FILE.stats.json (rounds done, every drop by reason with examples, teacher
request counts). Rounds are appended with fsync and checkpointed: rerunning
the same command after a kill or an outage resumes where it stopped. Stage
2 trains on the file with `--config.data.instruction_files=FILE.jsonl`.
See docs/multimodal.md ("Visual instruction data").
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from launch.flags import quiet_library_logs, require_flags
from mllm_jax.configlib import ConfigError
from mllm_jax.data import instructions
from mllm_jax.data import visual_instructions as vi

_TEACHER = flags.DEFINE_string(
    "teacher", None, "native:DIR (a native checkpoint, sampled with the "
    "compiled sampler) or openai:URL (same as --teacher_url=URL).")
_TEACHER_URL = flags.DEFINE_string(
    "teacher_url", None, "An OpenAI-compatible server (requests go to "
    "URL/v1/chat/completions; a trailing /v1 is accepted).")
_TEACHER_MODEL = flags.DEFINE_string(
    "teacher_model", None, "With an OpenAI-compatible teacher: the model "
    "name to ask.")
_API_KEY_ENV = flags.DEFINE_string(
    "api_key_env", None, "With an OpenAI-compatible teacher: environment "
    "variable holding the API key (sent as a Bearer token; never printed).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "--teacher=native:DIR: tokenizer file or directory, "
    "or 'bytes'; default: the one saved in DIR.")
_OUTPUT = flags.DEFINE_string("output", None, "Output FILE.jsonl.")
_SOURCES = flags.DEFINE_list(
    "sources", ["scenes"], f"Images to describe, from {list(vi.SOURCES)}: "
    "composited scenes (captions and boxes) and captioned image sets.")
_KINDS = flags.DEFINE_list("kinds", list(vi.KINDS),
                           "What to write for each image.")
_NUM_SCENES = flags.DEFINE_integer("num_scenes", 100,
                                   "--sources=scenes: scenes to describe.")
_FIRST_SCENE = flags.DEFINE_integer("first_scene", 0,
                                    "--sources=scenes: the first scene index.")
_TRAIN_SCENES = flags.DEFINE_integer(
    "train_scenes", 1000, "Stage 2's training scenes are [0, N) "
    "(image_sets.ImageSetsConfig.train_scenes); scenes past them are its "
    "test set and are refused.")
_MAX_CAPTIONED = flags.DEFINE_integer(
    "max_captioned", 0, "Captioned images (tuxpaint/gcompris/skimage) to "
    "describe in all; 0: every one on the training side.")
_SHOTS = flags.DEFINE_integer("shots", 2, "Few-shot demonstrations per "
                              "teacher prompt (0-2).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice and of "
                             "the teacher's sampling.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512,
                                "Tokens per teacher reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7,
                                  "Teacher sampling temperature (0: greedy).")
_BATCH = flags.DEFINE_integer(
    "batch_size", 8, "(image, kind) jobs per round; also the native "
    "teacher's batch.")
_TIMEOUT = flags.DEFINE_float(
    "timeout_s", 120.0, "OpenAI-compatible teacher: seconds per request "
    "attempt.")
_RETRIES = flags.DEFINE_integer(
    "max_retries", 3, "OpenAI-compatible teacher: retries of a failed "
    "request (timeouts, connection errors, HTTP 408/429/5xx, malformed "
    "JSON).")
_CONCURRENCY = flags.DEFINE_integer(
    "concurrency", 8, "OpenAI-compatible teacher: requests in flight.")
_MAX_ROUNDS = flags.DEFINE_integer(
    "max_rounds", None, "Stop after this many rounds (rerun to continue).")
_MAX_IDLE = flags.DEFINE_integer(
    "max_idle_rounds", 50, "Stop after this many rounds in a row without a "
    "new record.")
_MAX_OUTAGE = flags.DEFINE_integer(
    "max_outage_rounds", 5, "Give up after this many attempts in a row at "
    "which every teacher request failed (waiting 10s, 20s, ... between).")

_OPENAI_ONLY = (_TEACHER_MODEL, _API_KEY_ENV, _TIMEOUT, _RETRIES,
                _CONCURRENCY)
_NATIVE_ONLY = (_TOKENIZER,)


def _present(holder: flags.FlagHolder) -> bool:
  return flags.FLAGS[holder.name].present


def _check_flags() -> tuple[str, str]:
  """(teacher kind, location) after the usage checks."""
  require_flags(_OUTPUT)
  if _TEACHER.value and _TEACHER_URL.value:
    raise app.UsageError("give --teacher or --teacher_url, not both")
  if _TEACHER_URL.value:
    kind, where = "openai", _TEACHER_URL.value
  elif _TEACHER.value:
    kind, _, where = _TEACHER.value.partition(":")
    if kind not in ("native", "openai") or not where:
      raise app.UsageError(f"--teacher must be native:DIR or openai:URL, "
                           f"got {_TEACHER.value!r}")
  else:
    raise app.UsageError("a teacher is required: --teacher=native:DIR or "
                         "--teacher_url=URL --teacher_model=NAME")
  if kind == "openai":
    if not _TEACHER_MODEL.value:
      raise app.UsageError("--teacher_model is required with an "
                           "OpenAI-compatible teacher")
    if not where.startswith(("http://", "https://")):
      raise app.UsageError(f"--teacher_url needs an http:// or https:// "
                           f"URL, got {where!r}")
  for holder in {"openai": _NATIVE_ONLY, "native": _OPENAI_ONLY}[kind]:
    if _present(holder):
      other = "--teacher=native:DIR" if kind == "openai" else "--teacher_url"
      raise app.UsageError(f"--{holder.name} applies to {other} only")
  if not _OUTPUT.value.endswith(".jsonl"):
    raise app.UsageError("--output must name a .jsonl file")
  if _TIMEOUT.value <= 0:
    raise app.UsageError("--timeout_s must be > 0")
  if _RETRIES.value < 0:
    raise app.UsageError("--max_retries must be >= 0")
  if _CONCURRENCY.value < 1:
    raise app.UsageError("--concurrency must be >= 1")
  if _MAX_ROUNDS.value is not None and _MAX_ROUNDS.value < 1:
    raise app.UsageError("--max_rounds must be >= 1")
  return kind, where


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  kind, where = _check_flags()
  config = vi.VisualConfig(
      sources=tuple(_SOURCES.value), kinds=tuple(_KINDS.value),
      num_scenes=_NUM_SCENES.value, first_scene=_FIRST_SCENE.value,
      train_scenes=_TRAIN_SCENES.value, max_captioned=_MAX_CAPTIONED.value,
      shots=_SHOTS.value, seed=_SEED.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, batch_size=_BATCH.value,
      max_idle_rounds=_MAX_IDLE.value, max_outage_rounds=_MAX_OUTAGE.value)
  try:
    config.validate()
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  say = lambda message: print(message, flush=True)
  try:
    if kind == "openai":
      teacher = instructions.OpenAITeacher(
          where, _TEACHER_MODEL.value, _API_KEY_ENV.value,
          timeout_s=_TIMEOUT.value, max_retries=_RETRIES.value,
          concurrency=_CONCURRENCY.value)
    else:
      if not os.path.isdir(where):
        raise FileNotFoundError(f"--teacher: checkpoint directory {where} "
                                f"does not exist")
      teacher = instructions.NativeTeacher.from_checkpoint(
          where, _TOKENIZER.value, batch_size=_BATCH.value)
    say(f"visual instructions ({','.join(config.kinds)}) from "
        f"{','.join(config.sources)} with {teacher.describe()} -> "
        f"{_OUTPUT.value}")
    stats = vi.generate_visual(teacher, _OUTPUT.value, config,
                               max_rounds=_MAX_ROUNDS.value, progress=say)
  except KeyboardInterrupt:
    sys.exit("generate_visual_instructions: interrupted; rerun the same "
             "command to resume")
  except (ConfigError, ValueError, FileNotFoundError, ImportError,
          instructions.TeacherUnavailable, instructions.Stalled) as e:
    sys.exit(f"generate_visual_instructions: error: {e}")
  path = instructions.stats_path_for(_OUTPUT.value)
  state = "done" if stats["complete"] else "stopped early"
  say(f"{state}: {stats['records']} records in {_OUTPUT.value} from "
      f"{stats['jobs']} jobs after {stats['rounds_done']} rounds; dropped "
      f"{stats['dropped']}; teacher {stats['teacher_requests']}; stats in "
      f"{path}")


if __name__ == "__main__":
  app.run(main)
