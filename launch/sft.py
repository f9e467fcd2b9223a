r"""Supervised fine-tuning on conversations, with the loss on the assistant's
turns only (their end-of-turn tokens included).

  python -m launch.sft --config=configs/sft.py:tiny --workdir=DIR \
      --config.init_checkpoint=BASE [--config.data.format=chatml ...]

BASE is a native checkpoint with its tokenizer. Conversations come from
`data.train_files` (ShareGPT, Alpaca or our JSONL schema; default: the
fetched ShareGPT dump; never a copy of a held-out conversation), are
rendered in one chat format, tokenised part by part so the mask cannot
drift, packed several to a row, and trained through the one trainer.
Before and after: the held-out response loss (default: alpaca-eval's
instructions with their reference answers), how often the model ends its
turn on held-out prompts, and zero-shot benchmarks (to see that they do
not collapse). Writes DIR/summary.json and DIR/model.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax import paths
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert import native
from mllm_jax.data import chat
from mllm_jax.data.config import ChatDataConfig
from mllm_jax.data.packing import PackedExampleIterator
from mllm_jax.eval import chat_eval as chat_eval_lib
from mllm_jax.eval import runner
from mllm_jax.generate.sampler import Sampler
from mllm_jax.modeling.peft import peft_task
from mllm_jax.train.finetune import (heldout_loss, load_result, save_result,
                                     stage_configs)
from mllm_jax.train.metrics import console
from mllm_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "SFT config file and preset, e.g. configs/sft.py:tiny; "
    "override fields with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

# A format that shifts tokens on more than this share of conversations is
# the wrong format for this tokenizer, not a few odd records.
MAX_SHIFTED = 0.01


def read_examples(files: str, schema: str, limit: int, tokenizer, fmt,
                  max_len: int, overflow: str, what: str, skip: int = 0,
                  held_out=()):
  """(conversations, examples) read and encoded, passing over the first
  `skip` conversations read; bad records, those the format cannot tokenise
  exactly and copies of `held_out` conversations are dropped and counted,
  never fatal."""
  stats = chat.ChatStats()
  conversations, examples = [], []
  held_out = {_content(c) for c in held_out}
  for i, conv in enumerate(chat.read_conversations(files, schema, stats)):
    if i < skip:
      stats.note("skipped")
      continue
    if _content(conv) in held_out:
      stats.add(chat.readers.Drop("held_out", conv.id))
      continue
    try:
      example = chat.encode(conv, tokenizer, fmt, max_len, overflow, stats)
    except chat.ChatFormatError as e:
      stats.add(chat.readers.Drop("format_shift", str(e)[:200]))
      continue
    if example is not None:
      conversations.append(conv)
      examples.append(example)
    if limit and len(examples) >= limit:
      break
  summary = stats.summary()
  shifted = summary["dropped"].get("format_shift", 0)
  if shifted > MAX_SHIFTED * max(len(examples) + shifted, 1):
    raise ConfigError(
        f"data.format: {fmt.name} shifts tokens in {shifted} {what} "
        f"conversations ({summary['dropped_examples']['format_shift'][:2]}); "
        f"choose a format this tokenizer renders exactly")
  check(bool(examples), f"data.{what}_files",
        f"no usable conversation in {files} ({summary})")
  console(f"{what}: {len(examples):,} conversations kept; dropped "
          f"{summary['dropped'] or 'none'}; {summary['notes']}")
  return conversations, examples, summary


def _content(conv: chat.Conversation) -> tuple:
  """What a conversation says, without its id (which names its file)."""
  return conv.system, conv.turns, conv.images


def eval_batches(examples, seq_len: int, batch_size: int) -> list[dict]:
  """The held-out examples packed once, in order (no repeat)."""
  it = PackedExampleIterator(examples, seq_len=seq_len,
                             global_batch_size=batch_size,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  return list(it)


def chat_eval(model, tokenizer, fmt, conversations, batches, limit: int,
              max_new_tokens: int, benchmarks: list[str]) -> dict:
  """Held-out response loss, end-of-turn rate on held-out prompts (the
  format's own end of turn, as `launch.evaluate`'s chat tasks count it),
  and zero-shot benchmark accuracy of one model."""
  out = {"response_loss": heldout_loss(model, batches)}
  prompts = [chat.encode_prompt(chat.Conversation(
      c.id, c.turns[:-1], c.system), tokenizer, fmt).tolist()
             for c in conversations[:limit]]
  sampler = Sampler(model, tokenizer=tokenizer,
                    pad_id=max(tokenizer.pad_id, 0), prompt_multiple=64)
  replies = chat_eval_lib.reply_to_prompts(
      sampler, tokenizer, chat_eval_lib.end_of_turn(fmt, tokenizer), prompts,
      max_new_tokens)
  out.update(chat_eval_lib.reply_metrics(replies), prompts=len(prompts),
             example_reply=replies[0].text[:500])
  if benchmarks:
    results = runner.evaluate(model, tokenizer, benchmarks, 0, limit)
    out["benchmarks"] = {name: results[name]["acc"] for name in benchmarks}
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  config, workdir = _CONFIG.value, _WORKDIR.value

  # ------------------------------------------------------------------ configs
  try:
    model_cfg, parallel, optimizer_cfg, train_cfg, peft_cfg, tokenizer = (
        stage_configs(config))
    data = from_config(ChatDataConfig, config.data, "data")
    try:
      fmt = chat.get_format(data.format, tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"data.format: {e}") from e
    max_len = config.seq_len + 1

    # ---------------------------------------------------------------- data
    eval_convs, eval_examples, eval_stats = read_examples(
        paths.chat_files(data.eval_files or "alpaca_eval"), data.eval_schema,
        data.eval_conversations, tokenizer, fmt, max_len, data.overflow,
        "eval")
    _, train_examples, train_stats = read_examples(
        paths.chat_files(data.train_files or "sharegpt"), data.train_schema,
        data.max_conversations, tokenizer, fmt, max_len, data.overflow,
        "train", data.train_skip, held_out=eval_convs)
    task = peft_task(model_cfg, peft_cfg, trainable=train_cfg.trainable,
                     init_checkpoint=config.init_checkpoint, name="sft",
                     seed=config.seed)
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  train_iter = PackedExampleIterator(
      train_examples, seq_len=config.seq_len,
      global_batch_size=train_cfg.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle=True, repeat=True, seed=data.seed, window=data.pack_window)
  held_out = eval_batches(eval_examples, config.seq_len, train_cfg.batch_size)
  os.makedirs(workdir, exist_ok=True)
  evaluate = lambda model: chat_eval(
      model, tokenizer, fmt, eval_convs, held_out, config.eval.limit,
      config.eval.max_new_tokens, list(config.eval.benchmarks))

  # ------------------------------------------------------------------ before
  before_file = os.path.join(workdir, "before.json")
  if not os.path.exists(before_file):
    before = evaluate(native.load_model(config.init_checkpoint)[1])
    if jax.process_index() == 0:
      with open(before_file, "w") as f:
        json.dump(before, f, indent=2)
  before = json.load(open(before_file))

  # ------------------------------------------------------------------ train
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter, held_out)
  save_result(workdir, model, config.init_checkpoint)
  del model

  # ------------------------------------------------------------------ after
  after = evaluate(load_result(workdir, config.init_checkpoint)[1])
  if jax.process_index() == 0:
    summary = {"base": config.init_checkpoint, "format": fmt.name,
               "peft": peft_cfg.method,
               "train_data": train_stats, "eval_data": eval_stats,
               "train_conversations": len(train_examples),
               "packing_efficiency": train_iter.efficiency,
               "final_train_loss": last.get("loss"),
               "before": before, "after": after}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    console(f"held-out response loss {before['response_loss']:.3f} -> "
            f"{after['response_loss']:.3f}; turns ended "
            f"{before['end_of_turn_rate']:.0%} -> "
            f"{after['end_of_turn_rate']:.0%} of {after['prompts']} prompts")


if __name__ == "__main__":
  app.run(main)
