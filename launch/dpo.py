r"""Direct preference optimisation from the SFT model, through the one trainer.

  python -m launch.dpo --config=configs/dpo.py:tiny --workdir=DIR \
      --config.init_checkpoint=SFT_MODEL [--config.dpo.loss=ipo ...]

SFT_MODEL (a native checkpoint with its tokenizer) is the policy's start
and the frozen reference. Comparisons come from `data.train_files` /
`data.eval_files` (launch.build_comparisons' JSONL) or are built here from
`data.sources` (real data, NOT human preferences) and split by prompt. Each
response is the last assistant turn of its prompt in one chat format, loss
weights on its tokens; a batch holds `train.batch_size` comparisons of
`data.max_responses` rows. The reference's log-probabilities are cached
once (DIR/ref_logps.npz, reused on resume) or computed on the fly
(`dpo.reference`). Before and after: held-out pair metrics (the policy's
chosen-over-rejected log-probability margin, implicit reward margin and
accuracy, chosen and rejected log-probabilities), overall and per source.
Writes DIR/summary.json and DIR/model (DIR/adapter with PEFT).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.convert import native
from mllm_jax.data import chat
from mllm_jax.data.config import ComparisonDataConfig
from mllm_jax.rl import dpo
from mllm_jax.rl.comparison_data import (comparison_batches, encode_split,
                                         provenance, read_splits)
from mllm_jax.train.finetune import load_result, save_result, stage_configs
from mllm_jax.train.metrics import console
from mllm_jax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "DPO config file and preset, e.g. configs/dpo.py:tiny; "
    "override fields with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

REF_FILE = "ref_logps.npz"  # the reference on the training comparisons
REF_EVAL_FILE = "ref_eval_logps.npz"  # ... on the held-out ones
REF_CHUNK = 64  # comparisons scored between saves of the cache


def batches(kept, encoded, per_batch: int, k: int, seq_len: int, **kwargs):
  """DPO batches of these comparisons (one pass in order unless kwargs
  say otherwise)."""
  return dpo.DPOBatches(comparison_batches(kept, encoded, per_batch, k,
                                           seq_len, **kwargs))


def fingerprint(init_checkpoint: str, encoded) -> str:
  """What the cached reference log-probabilities depend on."""
  h = hashlib.sha256(os.path.abspath(init_checkpoint).encode())
  for examples in encoded:
    for e in examples:
      h.update(np.asarray(e["ids"], np.int32).tobytes())
      h.update(np.asarray(e["weights"], np.float32).tobytes())
  return h.hexdigest()


def save_rows(path: str, rows: list[np.ndarray], k: int, key: str) -> None:
  """Per-comparison log-probabilities as one [N, K] array (NaN-padded)."""
  padded = np.full((len(rows), k), np.nan)
  for i, row in enumerate(rows):
    padded[i, :len(row)] = row
  if jax.process_index() == 0:
    np.savez(path + ".tmp.npz", logps=padded, fingerprint=key)
    os.replace(path + ".tmp.npz", path)


def load_rows(path: str, kept, key: str) -> list[np.ndarray]:
  """What save_rows wrote, if it was written for `key` (else nothing)."""
  if not os.path.exists(path):
    return []
  saved = np.load(path)
  if str(saved["fingerprint"]) != key:
    return []
  return [row[:c.k] for row, c in zip(saved["logps"], kept)]


def cached_reference(path: str, model, kept, encoded, per_batch: int, k: int,
                     seq_len: int, key: str) -> list[np.ndarray]:
  """The reference's log-probabilities of every response of `kept`,
  computed REF_CHUNK comparisons at a time and saved after each chunk, so
  a killed run resumes the cache where it stopped (and reuses a finished
  one). A cache made for other data or another model is recomputed."""
  done = load_rows(path, kept, key)
  for start in range(len(done), len(kept), REF_CHUNK):
    part = slice(start, start + REF_CHUNK)
    done += dpo.comparison_logps(
        model, batches(kept[part], encoded[part], per_batch, k, seq_len),
        [c.k for c in kept[part]])
    save_rows(path, done, k, key)
    console(f"reference log-probabilities: {len(done):,} of {len(kept):,} "
            f"comparisons ({os.path.basename(path)})")
  return done


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
    dpo_cfg = from_config(dpo.DPOConfig, config.dpo, "dpo")
    try:
      fmt = chat.get_format(data.format, tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"data.format: {e}") from e
    k, seq_len, per_batch = (data.max_responses, config.seq_len,
                             train_cfg.batch_size)
    task = dpo.dpo_task(model_cfg, peft_cfg, dpo_cfg,
                        init_checkpoint=config.init_checkpoint,
                        trainable=train_cfg.trainable, seed=config.seed)

    # ---------------------------------------------------------------- data
    train_set, held_out, train_stats, eval_stats = read_splits(data)
    kept, encoded, train_summary = encode_split(
        train_set, tokenizer, fmt, seq_len, k, data.max_comparisons,
        train_stats, "train")
    eval_kept, eval_encoded, eval_summary = encode_split(
        held_out, tokenizer, fmt, seq_len, k, data.eval_comparisons,
        eval_stats, "eval")
  except (ConfigError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  os.makedirs(workdir, exist_ok=True)

  # ------------------------------------------------------------------ before
  # The SFT model is the reference: its held-out log-probabilities are the
  # "before" numbers and the reference of every held-out metric.
  reference = native.load_model(config.init_checkpoint)[1]
  ref_eval = cached_reference(
      os.path.join(workdir, REF_EVAL_FILE), reference, eval_kept,
      eval_encoded, per_batch, k, seq_len,
      fingerprint(config.init_checkpoint, eval_encoded))
  before = dpo.heldout_report(eval_kept, ref_eval, ref_eval, dpo_cfg.beta)
  ref_train = None
  if dpo_cfg.reference == "cached":
    ref_train = cached_reference(
        os.path.join(workdir, REF_FILE), reference, kept, encoded, per_batch,
        k, seq_len, fingerprint(config.init_checkpoint, encoded))
  del reference

  # ------------------------------------------------------------------ train
  train_iter = batches(kept, encoded, per_batch, k, seq_len,
                       process_index=jax.process_index(),
                       process_count=jax.process_count(), shuffle=True,
                       repeat=True, seed=data.seed, ref_logps=ref_train)
  held_out_batches = list(batches(
      eval_kept, eval_encoded, per_batch, k, seq_len,
      process_index=jax.process_index(), process_count=jax.process_count(),
      ref_logps=ref_eval))
  last, model = train(task, parallel, optimizer_cfg, train_cfg, config.seed,
                      workdir, train_iter, held_out_batches)
  save_result(workdir, dpo.policy_of(model), config.init_checkpoint)
  del model

  # ------------------------------------------------------------------ after
  policy = load_result(workdir, config.init_checkpoint)[1]
  after_logps = dpo.comparison_logps(
      policy, batches(eval_kept, eval_encoded, per_batch, k, seq_len),
      [c.k for c in eval_kept])
  after = dpo.heldout_report(eval_kept, after_logps, ref_eval, dpo_cfg.beta)
  if jax.process_index() == 0:
    summary = {
        "note": provenance(kept),
        "base": config.init_checkpoint, "format": fmt.name,
        "peft": peft_cfg.method, "dpo": config.dpo.to_dict(),
        "train_data": train_summary, "eval_data": eval_summary,
        "train_comparisons": len(kept), "eval_comparisons": len(eval_kept),
        "final_train": {name: last.get(name) for name in (
            "loss", "reward_accuracy", "reward_margin", "logp_margin")},
        "before": before, "after": after}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    b, a = before["all"], after["all"]
    console(f"held-out ({b['pairs']} pairs): log-prob margin chosen - "
            f"rejected {b['logp_margin']:.3f} -> {a['logp_margin']:.3f} "
            f"nats; prefers chosen {b['prefers_chosen']:.0%} -> "
            f"{a['prefers_chosen']:.0%}; implicit reward accuracy "
            f"{a['reward_accuracy']:.0%}, margin {a['reward_margin']:.3f}")


if __name__ == "__main__":
  app.run(main)
