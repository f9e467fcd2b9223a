r"""Comparison data (mllm_jax.data.comparisons' JSONL schema) from real
offline data, split by prompt; and the human-labelling round trip.

  python -m launch.build_comparisons --sources=arc_easy,gsm8k,bfcl_simple \
      --output=DIR [--limit=500] [--eval_fraction=0.1] [--seed=0] \
      [--checkpoint=SFT_MODEL --format=vicuna_v1]   # alpaca_eval_samples

writes DIR/train.jsonl, DIR/eval.jsonl (no prompt on both sides) and
DIR/summary.json (counts per source, drops with reasons). None of these
comparisons is a human preference; every record's `origin` says how it was
made (mllm_jax/data/comparison_sources.py).

  python -m launch.build_comparisons --export_for_labelling=FILE \
      --input=DIR/eval.jsonl         # a JSONL a person fills in
  python -m launch.build_comparisons --import_labels=FILE --output=DIR

The import writes DIR/labelled.jsonl (origin "human") and
DIR/needs_attention.jsonl (each line with its reason: missing label, bad or
contradictory label, an id labelled differently twice), and prints the
counts; every line of FILE is in one of the two.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from mllm_jax.data import chat
from mllm_jax.data import comparison_sources as sources_lib
from mllm_jax.data import comparisons as cmp

_SOURCES = flags.DEFINE_list(
    "sources", ["arc_easy", "gsm8k", "bfcl_simple"],
    f"Comparison sources: {sorted(sources_lib.SOURCES)} and "
    f"{list(sources_lib.MODEL_SOURCES)} (needs --checkpoint).")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Records read per source (0: all).")
_EVAL_FRACTION = flags.DEFINE_float(
    "eval_fraction", 0.1, "Share of prompts held out (split by prompt).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of distractors, perturbations "
                             "and the split.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "SFT model (native checkpoint with its tokenizer) that "
    "samples responses for alpaca_eval_samples.")
_FORMAT = flags.DEFINE_string("format", "vicuna_v1",
                              "Chat format the model is prompted in.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64,
                                       "Longest sampled response.")
_EXPORT = flags.DEFINE_string(
    "export_for_labelling", "", "Write this labelling file from --input.")
_INPUT = flags.DEFINE_string("input", "", "Comparison JSONL(s) to export.")
_IMPORT = flags.DEFINE_string(
    "import_labels", "", "Read this filled labelling file into --output.")


def build(output: str) -> dict:
  names = list(_SOURCES.value)
  model_names = [n for n in names if n in sources_lib.MODEL_SOURCES]
  data_names = [n for n in names if n not in sources_lib.MODEL_SOURCES]
  if not 0.0 <= _EVAL_FRACTION.value < 1.0:
    raise ValueError(f"--eval_fraction={_EVAL_FRACTION.value}: must be in "
                     f"[0, 1)")
  comparisons, counts = sources_lib.build(data_names, _LIMIT.value,
                                          _SEED.value)
  if model_names:
    if not _CHECKPOINT.value:
      raise ValueError(f"--sources={','.join(model_names)} samples from a "
                       f"model: give --checkpoint=DIR")
    # pylint: disable=import-outside-toplevel
    from mllm_jax.convert import native
    from mllm_jax.data.tokenizer import load_tokenizer
    # pylint: enable=import-outside-toplevel
    tokenizer = load_tokenizer(_CHECKPOINT.value)
    _, model = native.load_model(_CHECKPOINT.value)
    made = sources_lib.sampled_comparisons(
        model, tokenizer, chat.get_format(_FORMAT.value, tokenizer),
        _LIMIT.value, _SEED.value, _MAX_NEW_TOKENS.value)
    counts["alpaca_eval_samples"] = len(made)
    comparisons += made
  # Re-validated as any file would be: duplicates across sources counted.
  stats = chat.ChatStats()
  comparisons = cmp.validate_all(((c.to_json(), c.id) for c in comparisons),
                                 stats)
  train, held_out = cmp.split_by_prompt(comparisons, _EVAL_FRACTION.value,
                                        _SEED.value)
  os.makedirs(output, exist_ok=True)
  cmp.write_comparisons(os.path.join(output, "train.jsonl"), train)
  cmp.write_comparisons(os.path.join(output, "eval.jsonl"), held_out)
  summary = {
      "note": "synthetic comparisons built from real data; NOT human "
              "preferences (see each record's origin)",
      "built": counts, "train": len(train), "eval": len(held_out),
      "train_per_source": sources_lib.per_source(train),
      "eval_per_source": sources_lib.per_source(held_out),
      "responses_per_comparison": {
          str(k): sum(c.k == k for c in comparisons)
          for k in sorted({c.k for c in comparisons})},
      **stats.summary(), "seed": _SEED.value,
      "eval_fraction": _EVAL_FRACTION.value}
  with open(os.path.join(output, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def import_labels(path: str, output: str) -> dict:
  labelled, attention, counts = cmp.import_labels(path)
  os.makedirs(output, exist_ok=True)
  cmp.write_comparisons(os.path.join(output, "labelled.jsonl"), labelled)
  with open(os.path.join(output, "needs_attention.jsonl"), "w",
            encoding="utf-8") as f:
    for line in attention:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  with open(os.path.join(output, "import_summary.json"), "w") as f:
    json.dump(counts, f, indent=2)
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if _EXPORT.value:
      if not _INPUT.value:
        raise ValueError("--export_for_labelling needs --input=COMPARISONS")
      stats = chat.ChatStats()
      comparisons = cmp.read_comparisons(_INPUT.value, stats)
      n = cmp.export_for_labelling(_EXPORT.value, comparisons)
      print(f"wrote {n} comparisons to label to {_EXPORT.value} (dropped "
            f"{stats.summary()['dropped'] or 'none'})")
      return
    if not _OUTPUT.value:
      raise ValueError("--output is required")
    if _IMPORT.value:
      counts = import_labels(_IMPORT.value, _OUTPUT.value)
      print(f"{counts['lines']} lines: {counts['labelled']} labelled "
            f"comparisons, {counts['agreeing_duplicates']} agreeing "
            f"duplicates, needs attention: {counts['needs_attention'] or 'none'}"
            f" -> {_OUTPUT.value}/labelled.jsonl, needs_attention.jsonl")
      return
    summary = build(_OUTPUT.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"{summary['train']} train / {summary['eval']} held-out comparisons "
        f"(split by prompt) in {_OUTPUT.value}; per source "
        f"{summary['built']}; dropped {summary['dropped'] or 'none'}. "
        f"{summary['note']}.")


if __name__ == "__main__":
  app.run(main)
