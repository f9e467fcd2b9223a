r"""FLAN instruction tuning: NLP tasks through instruction templates, mixed,
packed, trained with the loss on the targets only.

  python -m launch.flan --config=configs/flan.py:tiny --workdir=DIR \
      --config.init_checkpoint=BASE [--config.train.steps=200 ...]

BASE is a native checkpoint with its tokenizer (launch.pretrain's
WORKDIR/model, or launch.convert_checkpoint's output). Held-in tasks are
scored on their evaluation halves (never trained on), held-out families
(`flan.held_out_families`) measure generalisation to unseen tasks; both
before and after tuning, zero-shot. Writes DIR/summary.json, DIR/model (with
the tokenizer), DIR/metrics.jsonl and checkpoints; run again to resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert import native
from mllm_jax.data import flan
from mllm_jax.eval.scoring import Scorer
from mllm_jax.generate.sampler import Sampler
from mllm_jax.modeling.peft import peft_task
from mllm_jax.train.finetune import load_result, save_result, stage_configs
from mllm_jax.train.metrics import console
from mllm_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "FLAN config file and preset, e.g. configs/flan.py:tiny; "
    "override fields with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

# Held-in tasks scored before and after (their evaluation halves).
HELD_IN = ("boolq", "piqa", "arc_easy", "sst2", "copa")


def zero_shot(model, tokenizer, flan_cfg: flan.FlanConfig,
              held_in: list[str], limit: int, max_new_tokens: int) -> dict:
  """{"held_in": {task: metrics}, "held_out": {...}} of one model: option
  log-likelihood accuracy, and greedy answers' well-formedness."""
  scorer = Scorer(model)
  sampler = Sampler(model, tokenizer=tokenizer, pad_id=tokenizer.pad_id)
  families = tuple(sorted({flan.TASKS[t].family for t in held_in}))
  held_in_cfg = dataclasses.replace(flan_cfg, tasks=tuple(held_in),
                                    held_out_families=families)
  run = lambda cfg: flan.evaluate_heldout(cfg, scorer, tokenizer, sampler,
                                          limit=limit,
                                          max_new_tokens=max_new_tokens)
  return {"held_in": run(held_in_cfg), "held_out": run(flan_cfg)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  config, workdir = _CONFIG.value, _WORKDIR.value

  # ------------------------------------------------------------------ configs
  try:
    model_cfg, parallel, optimizer_cfg, train_cfg, peft_cfg, tokenizer = (
        stage_configs(config))
    flan_cfg = from_config(flan.FlanConfig, config.flan, "flan")
    held_in = [t for t in HELD_IN if t in flan.training_tasks(flan_cfg)]
    check(bool(held_in) or not flan.training_tasks(flan_cfg), "flan.tasks",
          f"none of the held-in evaluation tasks {HELD_IN} is trained")
    task = peft_task(model_cfg, peft_cfg, trainable=train_cfg.trainable,
                     init_checkpoint=config.init_checkpoint, name="flan",
                     seed=config.seed)
    train_iter = flan.make_flan_iterator(
        flan_cfg, tokenizer, seq_len=config.seq_len,
        global_batch_size=train_cfg.batch_size)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(workdir, exist_ok=True)
  console(f"training tasks: {', '.join(flan.training_tasks(flan_cfg))}; "
          f"held out: {', '.join(flan.heldout_tasks(flan_cfg)) or 'none'}")

  # ------------------------------------------------------------------ before
  before_file = os.path.join(workdir, "before.json")
  if not os.path.exists(before_file):
    before = zero_shot(native.load_model(config.init_checkpoint)[1],
                       tokenizer, flan_cfg, held_in, config.eval.limit,
                       config.eval.max_new_tokens)
    if jax.process_index() == 0:
      with open(before_file, "w") as f:
        json.dump(before, f, indent=2)
  before = json.load(open(before_file))

  # ------------------------------------------------------------------ train
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter)
  save_result(workdir, model, config.init_checkpoint)
  del model

  # ------------------------------------------------------------------ after
  after = zero_shot(load_result(workdir, config.init_checkpoint)[1],
                    tokenizer, flan_cfg, held_in, config.eval.limit,
                    config.eval.max_new_tokens)
  if jax.process_index() == 0:
    summary = {"base": config.init_checkpoint, "peft": peft_cfg.method,
               "final_loss": last.get("loss"),
               "before": before, "after": after,
               "packing_efficiency": getattr(train_iter, "efficiency", None)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    for split in ("held_in", "held_out"):
      for name, r in after[split].items():
        b = before[split].get(name, {})
        console(f"{split} {name}: acc {b.get('acc', float('nan')):.3f} -> "
                f"{r.get('acc', float('nan')):.3f}, well-formed "
                f"{b.get('well_formed', float('nan')):.2f} -> "
                f"{r.get('well_formed', float('nan')):.2f} "
                f"({r['num_examples']} examples)")


if __name__ == "__main__":
  app.run(main)
