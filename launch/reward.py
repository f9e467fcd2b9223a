r"""Trains a reward model on ranked responses through the one trainer.

  python -m launch.reward --config=configs/reward.py:tiny --workdir=DIR \
      --config.init_checkpoint=SFT_DIR \
      [--config.data.train_files=CMP/train.jsonl \
       --config.data.eval_files=CMP/eval.jsonl]

Comparisons are read, or built from data.sources, exactly as launch.dpo
does (mllm_jax/rl/comparison_data.py). The SFT model without its LM head plus a scalar head read at the last real
token, after an end-of-context token appended to every response;
InstructGPT's loss over all ranked pairs of each prompt, every response
encoded once (mllm_jax/rl/reward.py). When init_checkpoint is itself a
reward model (it holds reward_head.npz) its head is kept: preference-model
pretraining, then fine-tuning, are two runs of this binary. After training,
the bias is shifted so that the best-ranked training responses score 0 on
average. Reports held-out pair accuracy overall and per source against
chance (0.5) and a "longer is better" baseline. Writes
DIR/reward_model (the trunk as a native checkpoint with its tokenizer,
reward_head.npz, reward.json) and DIR/summary.json.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.data import chat
from mllm_jax.data.config import ComparisonDataConfig
from mllm_jax.rl import reward as reward_lib
from mllm_jax.rl.comparison_data import (comparison_batches, encode_split,
                                         provenance, read_splits)
from mllm_jax.train.finetune import stage_configs
from mllm_jax.train.metrics import console
from mllm_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Reward config file and preset, e.g. "
    "configs/reward.py:tiny; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

def end_of_context_id(value: str, tokenizer) -> int:
  """The end-of-context token: "eos" or a token the tokenizer has."""
  if value == "eos":
    check(tokenizer.eos_id >= 0, "reward.end_of_context",
          "the tokenizer has no EOS; name a token")
    return tokenizer.eos_id
  try:
    return tokenizer.special_token_id(value)
  except KeyError as e:
    raise ConfigError(f"reward.end_of_context: {value!r} is not one token of "
                      f"the tokenizer") from e


def batches(encoded, kept, k: int, seq_len: int, size: int, **kwargs):
  return comparison_batches(
      kept, encoded, size, k, seq_len, process_index=jax.process_index(),
      process_count=jax.process_count(), **kwargs)


def length_baseline(encoded, kept) -> float:
  """Pair accuracy of "the longer response is better" (ties count half)."""
  right = total = 0.0
  for examples, c in zip(encoded, kept):
    lengths = [float(e["weights"].sum()) for e in examples]
    for better, worse in c.pairs():
      total += 1
      right += 1.0 if lengths[better] > lengths[worse] else (
          0.5 if lengths[better] == lengths[worse] else 0.0)
  return right / total if total else float("nan")


def held_out_report(model, kept, encoded, k, seq_len, size) -> dict:
  """Accuracy and loss overall and per source, with the baselines."""
  report = {}
  groups = {"all": list(range(len(kept)))}
  for i, c in enumerate(kept):
    groups.setdefault(c.source, []).append(i)
  for name, idx in groups.items():
    sub_kept = [kept[i] for i in idx]
    sub_enc = [encoded[i] for i in idx]
    metrics = reward_lib.batch_metrics(
        model, batches(sub_enc, sub_kept, k, seq_len, size))
    metrics.update(comparisons=len(idx),
                   longer_is_better=length_baseline(sub_enc, sub_kept))
    report[name] = metrics
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  config, workdir = _CONFIG.value, _WORKDIR.value

  # ------------------------------------------------------------------ configs
  try:
    model_cfg, parallel, optimizer_cfg, train_cfg, peft_cfg, tokenizer = (
        stage_configs(config))
    data = from_config(ComparisonDataConfig, config.data, "data")
    try:
      fmt = chat.get_format(data.format, tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"data.format: {e}") from e
    eoc = end_of_context_id(config.reward.end_of_context, tokenizer)
    train_set, held_out, train_stats, eval_stats = read_splits(data)
    train_kept, train_enc, train_stats = encode_split(
        train_set, tokenizer, fmt, config.seq_len, data.max_responses,
        data.max_comparisons, train_stats, "train", eoc)
    eval_kept, eval_enc, eval_stats = encode_split(
        held_out, tokenizer, fmt, config.seq_len, data.max_responses,
        data.eval_comparisons, eval_stats, "eval", eoc)
    from_reward_model = os.path.exists(os.path.join(
        config.init_checkpoint, reward_lib.HEAD_FILE))
    task = reward_lib.reward_task(
        model_cfg, peft_cfg, init_checkpoint=config.init_checkpoint,
        with_head=from_reward_model, margin=config.reward.margin,
        trainable=train_cfg.trainable, seed=config.seed)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(workdir, exist_ok=True)
  k, seq_len = data.max_responses, config.seq_len
  train_iter = reward_lib.GroupedBatches(batches(
      train_enc, train_kept, k, seq_len, train_cfg.batch_size, shuffle=True,
      repeat=True, seed=data.seed))
  held_out = [reward_lib.group_batch(b) for b in batches(
      eval_enc, eval_kept, k, seq_len, train_cfg.batch_size)]
  note = provenance(train_kept)
  console(f"reward model from {config.init_checkpoint} "
          f"({'its head kept' if from_reward_model else 'a new head'}): "
          f"{len(train_kept)} training comparisons, {len(eval_kept)} "
          f"held out; {note}")

  # ------------------------------------------------------------------ train
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter, held_out)

  # ------------------------------------------------------------------ after
  offset = 0.0
  if config.reward.normalise:
    n = min(len(train_kept), config.reward.normalise_comparisons)
    offset = reward_lib.batch_metrics(model, batches(
        train_enc[:n], train_kept[:n], k, seq_len,
        train_cfg.batch_size))["best_reward"]
    reward_lib.normalise(model, offset)
  report = held_out_report(model, eval_kept, eval_enc, k, seq_len,
                           train_cfg.batch_size)
  reward_lib.save_reward_model(
      os.path.join(workdir, "reward_model"), model, config.init_checkpoint,
      {"end_of_context_id": eoc, "format": fmt.name,
       "normalisation_offset": offset, "init_checkpoint":
       config.init_checkpoint, "note": note})
  if jax.process_index() == 0:
    summary = {"init_checkpoint": config.init_checkpoint,
               "continued_reward_model": from_reward_model,
               "format": fmt.name, "end_of_context_id": eoc,
               "train_data": train_stats, "eval_data": eval_stats,
               "final_train": last, "held_out": report,
               "chance_accuracy": 0.5, "note": note}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    overall = report["all"]
    console(f"held-out pair accuracy {overall['accuracy']:.3f} over "
            f"{overall['pairs']} pairs (chance 0.5, longer-is-better "
            f"{overall['longer_is_better']:.3f}); per source: " + ", ".join(
                f"{name} {r['accuracy']:.2f}" for name, r in report.items()
                if name != "all"))


if __name__ == "__main__":
  app.run(main)
