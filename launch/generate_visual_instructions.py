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
      --teacher=openai:http://localhost:8000/v1 --teacher_model=NAME \
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

import sys

from absl import app, flags

from launch import flags as launch_flags
from launch.flags import quiet_library_logs, require_flags
from mllm_jax.configlib import ConfigError
from mllm_jax.data import instructions
from mllm_jax.data import visual_instructions as vi

_TEACHER = launch_flags.define_teacher_flags("teacher")
flags.adopt_module_key_flags(launch_flags)
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
_HELD_OUT = flags.DEFINE_bool(
    "held_out", False, "Questions for evaluation (launch.judge_images) "
    "instead: stage 2's test scenes (from --train_scenes on, --first_scene "
    "counting from there) and the captioned images held out; never train "
    "on them.")
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
_MAX_ROUNDS = flags.DEFINE_integer(
    "max_rounds", None, "Stop after this many rounds (rerun to continue).")
_MAX_IDLE = flags.DEFINE_integer(
    "max_idle_rounds", 50, "Stop after this many rounds in a row without a "
    "new record.")
_MAX_OUTAGE = flags.DEFINE_integer(
    "max_outage_rounds", 5, "Give up after this many attempts in a row at "
    "which every teacher request failed (waiting 10s, 20s, ... between).")

def _check_flags() -> None:
  """The usage checks, the teacher's first."""
  _TEACHER.check()
  require_flags(_OUTPUT)
  if not _OUTPUT.value.endswith(".jsonl"):
    raise app.UsageError("--output must name a .jsonl file")
  if _MAX_ROUNDS.value is not None and _MAX_ROUNDS.value < 1:
    raise app.UsageError("--max_rounds must be >= 1")


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _check_flags()
  config = vi.VisualConfig(
      sources=tuple(_SOURCES.value), kinds=tuple(_KINDS.value),
      num_scenes=_NUM_SCENES.value, first_scene=_FIRST_SCENE.value,
      train_scenes=_TRAIN_SCENES.value, max_captioned=_MAX_CAPTIONED.value,
      held_out=_HELD_OUT.value,
      shots=_SHOTS.value, seed=_SEED.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, batch_size=_BATCH.value,
      max_idle_rounds=_MAX_IDLE.value, max_outage_rounds=_MAX_OUTAGE.value)
  try:
    config.validate()
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  say = lambda message: print(message, flush=True)
  try:
    teacher = launch_flags.teacher_from_flags(_TEACHER, _BATCH.value)
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
