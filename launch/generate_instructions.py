r"""Generates instruction-tuning conversations with a teacher model:
self-instruct (Wang et al. 2022) or Evol-Instruct (Xu et al. 2023).

  # our own checkpoint as the teacher (its chat template renders prompts)
  python -m launch.generate_instructions --method=self_instruct \
      --teacher=native:runs/smollm2 --output=data/self_instruct.jsonl \
      --num_instructions=200 [--seed_tasks=seed_tasks.jsonl]
  # any OpenAI-compatible endpoint (vLLM, llama.cpp server, ...)
  OPENAI_API_KEY=... python -m launch.generate_instructions \
      --method=evol_instruct --teacher=openai:http://localhost:8000 \
      --teacher_model=NAME --api_key_env=OPENAI_API_KEY --generations=4 \
      --output=data/evol.jsonl --num_instructions=1000

Writes FILE.jsonl (the native conversation schema: one user turn, with
Alpaca-style input when there is one, and one assistant turn; `meta` holds
the provenance) and FILE.stats.json (rounds done, every drop by reason with
examples, teacher request counts). Rounds are appended with fsync and
checkpointed in the stats file: rerunning the same command after a kill or
an outage resumes where it stopped, and with a deterministic teacher gives
the same file as an uninterrupted run. A larger --num_instructions extends
a finished run. See docs/training.md ("Instruction data generation").
"""

from __future__ import annotations

import sys

from absl import app, flags

from mllm_jax.configlib import ConfigError
from mllm_jax.data import instructions
from mllm_jax.data.chat import ChatStats
from launch import flags as launch_flags
from launch.flags import quiet_library_logs, require_flags

_METHOD = flags.DEFINE_enum("method", None, list(instructions.METHODS),
                            "Generation method.")
_TEACHER = launch_flags.define_teacher_flags("teacher")
flags.adopt_module_key_flags(launch_flags)
_OUTPUT = flags.DEFINE_string("output", None, "Output FILE.jsonl.")
_NUM = flags.DEFINE_integer("num_instructions", 100,
                            "Conversations to generate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice and of "
                             "the teacher's sampling.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512,
                                "Tokens per teacher reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7,
                                  "Teacher sampling temperature (0: greedy).")
_SEED_TASKS = flags.DEFINE_string(
    "seed_tasks", None, "JSON/JSONL seed tasks (self-instruct's "
    "seed_tasks.jsonl format, Alpaca records or native conversations); "
    "default: the 21 bundled ones.")
_GENERATIONS = flags.DEFINE_integer(
    "generations", 4, "--method=evol_instruct: evolution steps per lineage.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 8, "Proposal prompts (self-instruct) or lineages "
    "(Evol-Instruct) per round; also the native teacher's batch.")
_K = flags.DEFINE_integer(
    "num_prompt_instructions", 8, "--method=self_instruct: in-context "
    "instructions per proposal prompt.")
_NEW = flags.DEFINE_integer(
    "new_per_prompt", 8, "--method=self_instruct: new instructions asked "
    "for per prompt.")
_ROUGE = flags.DEFINE_float(
    "rouge_threshold", 0.7, "--method=self_instruct: drop a new instruction "
    "whose ROUGE-L F against any instruction in the pool is >= this.")
_MAX_ROUNDS = flags.DEFINE_integer(
    "max_rounds", None, "Stop after this many rounds (rerun to continue).")
_MAX_IDLE = flags.DEFINE_integer(
    "max_idle_rounds", 50, "Stop after this many rounds in a row without a "
    "new record.")
_MAX_OUTAGE = flags.DEFINE_integer(
    "max_outage_rounds", 5, "Give up after this many attempts in a row at "
    "which every teacher request failed (waiting 10s, 20s, ... between).")

_SELF_ONLY = (_K, _NEW, _ROUGE)
_EVOL_ONLY = (_GENERATIONS,)


def _present(holder: flags.FlagHolder) -> bool:
  return flags.FLAGS[holder.name].present


def _check_flags() -> None:
  """The usage checks, the teacher's first."""
  _TEACHER.check()
  require_flags(_METHOD, _OUTPUT)
  method = _METHOD.value
  for holder in {"self_instruct": _EVOL_ONLY,
                 "evol_instruct": _SELF_ONLY}[method]:
    if _present(holder):
      raise app.UsageError(f"--{holder.name} does not apply to "
                           f"--method={method}")
  if not _OUTPUT.value.endswith(".jsonl"):
    raise app.UsageError("--output must name a .jsonl file")
  if _MAX_ROUNDS.value is not None and _MAX_ROUNDS.value < 1:
    raise app.UsageError("--max_rounds must be >= 1")


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _check_flags()
  config = instructions.GenerateConfig(
      method=_METHOD.value, num_instructions=_NUM.value, seed=_SEED.value,
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
      batch_size=_BATCH.value, num_prompt_instructions=_K.value,
      new_per_prompt=_NEW.value, rouge_threshold=_ROUGE.value,
      generations=_GENERATIONS.value, max_idle_rounds=_MAX_IDLE.value,
      max_outage_rounds=_MAX_OUTAGE.value)
  try:
    config.validate()
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  say = lambda message: print(message, flush=True)
  try:
    seeds = None
    if _SEED_TASKS.value:
      seed_stats = ChatStats()
      seeds = instructions.read_seed_tasks(_SEED_TASKS.value, seed_stats)
      dropped = dict(seed_stats.counts)
      say(f"{len(seeds)} seed tasks from {_SEED_TASKS.value}"
          + (f" (dropped: {dropped})" if dropped else ""))
    teacher = launch_flags.teacher_from_flags(_TEACHER, _BATCH.value)
    say(f"{_METHOD.value} with {teacher.describe()} -> {_OUTPUT.value}")
    stats = instructions.generate(
        _METHOD.value, teacher, _OUTPUT.value, config, seeds,
        max_rounds=_MAX_ROUNDS.value, progress=say)
  except KeyboardInterrupt:
    sys.exit("generate_instructions: interrupted; rerun the same command to "
             "resume")
  except (ConfigError, ValueError, FileNotFoundError, ImportError,
          instructions.TeacherUnavailable, instructions.Stalled) as e:
    sys.exit(f"generate_instructions: error: {e}")
  path = instructions.stats_path_for(_OUTPUT.value)
  state = "done" if stats["complete"] else "stopped early"
  say(f"{state}: {stats['records']} records in {_OUTPUT.value} after "
      f"{stats['rounds_done']} rounds; dropped {stats['dropped']}; "
      f"teacher {stats['teacher_requests']}; stats in {path}")


if __name__ == "__main__":
  app.run(main)
