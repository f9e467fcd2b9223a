"""Pretrain a decoder by next-token prediction on a mixture of token shards.

  python -m launch.pretrain --config=configs/pretrain.py:tiny --workdir=DIR \
      [--config.train.steps=100 ...]

Run the same command again to resume from the latest checkpoint in DIR. On a
pod slice, run it on every host (JAX's multi-controller model). Writes
DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/, DIR/summary.json and
the final weights with the tokenizer as a native checkpoint in DIR/model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert.native import read_config, save_model
from mllm_jax.data import shards
from mllm_jax.data.config import DataConfig
from mllm_jax.data.pipeline import (check_data, make_eval_batches,
                                    make_pretrain_iterator)
from mllm_jax.data.samples import prepare_shakespeare
from mllm_jax.modeling import ModelConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.train.metrics import console
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.compile import check_run
from mllm_jax.train.task import language_model_task
from mllm_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config file and preset, e.g. "
    "configs/pretrain.py:tiny; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory for checkpoints, metrics and summaries; "
    "an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

RECIPES = ("", "shakespeare")


def resolve_data(config, workdir: str) -> DataConfig:
  """The data config, building the built-in recipe's shards if asked."""
  check(config.data_recipe in RECIPES, "data_recipe",
        f"got {config.data_recipe!r}; choose one of {RECIPES}")
  if config.data_recipe == "shakespeare":
    prepared = prepare_shakespeare(workdir, vocab_size=config.model.vocab_size,
                                   seq_len=config.data.seq_len,
                                   seed=config.data.seed)
    return dataclasses.replace(prepared, repeat=config.data.repeat,
                               prefetch=config.data.prefetch)
  return from_config(DataConfig, config.data, "data")


def unigram_baseline(data: DataConfig, eval_batches) -> float:
  """Held-out loss of a unigram model fitted on the training tokens (add-one
  smoothing): the bar a language model must clear by a wide margin."""
  counts = None
  for source in data.source_list:
    opened = shards.open_shards(source.path)
    for doc in range(opened.num_docs):
      tokens = opened[doc]
      doc_counts = np.bincount(tokens, minlength=opened.vocab_size)
      counts = doc_counts if counts is None else counts + doc_counts
  log_p = np.log((counts + 1.0) / (counts.sum() + len(counts)))
  total, weight = 0.0, 0.0
  for batch in eval_batches:
    total -= float((log_p[batch["targets"]] * batch["loss_weights"]).sum())
    weight += float(batch["loss_weights"].sum())
  return total / max(weight, 1.0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    model_cfg = from_config(ModelConfig, config.model, "model")
    parallel = from_config(ParallelConfig, config.parallel, "parallel")
    optimizer_cfg = from_config(OptimizerConfig, config.optimizer, "optimizer")
    train_cfg = from_config(TrainConfig, config.train, "train")
    data_cfg = resolve_data(config, workdir)
    data_info = check_data(data_cfg)
    check(data_info["vocab_size"] <= model_cfg.vocab_size, "data.tokenizer",
          f"{data_cfg.tokenizer} has {data_info['vocab_size']} tokens but "
          f"model.vocab_size is {model_cfg.vocab_size}; ids would index past "
          f"the embedding")
    check_run(model_cfg, parallel, optimizer_cfg, train_cfg, data_cfg.seq_len)
    if config.init_checkpoint:
      init_vocab = read_config(config.init_checkpoint).vocab_size
      check(init_vocab == model_cfg.vocab_size, "init_checkpoint",
            f"{config.init_checkpoint} has vocab_size={init_vocab} but the "
            f"model/tokenizer need {model_cfg.vocab_size}; resize it with "
            f"launch.train_tokenizer --extend")
    task = language_model_task(model_cfg, z_loss=train_cfg.z_loss,
                               trainable=train_cfg.trainable,
                               init_checkpoint=config.init_checkpoint)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"config": config.to_dict(), "data": dataclasses.asdict(
          data_cfg), "data_info": data_info}, f, indent=2, default=str)
  train_iter = make_pretrain_iterator(data_cfg, train_cfg.batch_size)
  eval_batches = list(make_eval_batches(
      data_cfg, train_cfg.batch_size, train_cfg.eval_batches)) if (
          data_cfg.eval_sources) else []
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter, eval_batches)
  # The final weights as a native model checkpoint (generate / evaluate /
  # convert_checkpoint read this), with the tokenizer beside it.
  model_dir = os.path.join(workdir, "model")
  save_model(model_dir, model_cfg, model, overwrite=True)
  if jax.process_index() == 0:
    shutil.copy(data_cfg.tokenizer, os.path.join(
        model_dir, "tokenizer" + os.path.splitext(data_cfg.tokenizer)[1]))

  if eval_batches and "eval_loss" in last and jax.process_index() == 0:
    baseline = unigram_baseline(data_cfg, eval_batches)
    summary = {"eval_loss": last["eval_loss"],
               "eval_perplexity": last["eval_perplexity"],
               "unigram_loss": baseline,
               "unigram_perplexity": math.exp(baseline)}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    console(f"held-out loss {last['eval_loss']:.3f} vs unigram baseline "
            f"{baseline:.3f}")


if __name__ == "__main__":
  app.run(main)
