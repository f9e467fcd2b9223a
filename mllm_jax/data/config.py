"""The pretraining data config: a mixture of token-shard sources.

    sources = (("commoncrawl", "/data/cc/*.tokens.npy", 67.0, 1.10), ...)

Each source is (name, shard glob, weight, epochs). Weights are sampling
proportions of *tokens* (as in the LLaMA table) unless weight_by="documents";
they need not sum to one. `epochs` caps how often a source is seen in one pass
of the mixture: a pass ends when the first source reaches its cap (so no
source is ever over-sampled), after which the iterator stops, or with
repeat=True starts a freshly shuffled pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from mllm_jax.configlib import check, check_choice

WEIGHT_BY = ("tokens", "documents")


class Source(NamedTuple):
  name: str
  path: str      # glob of *.tokens.npy files, or a directory of shards
  weight: float
  epochs: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Fields are validated by `validate` (run by configlib.from_config)."""
  sources: tuple = ()
  tokenizer: str = ""
  seq_len: int = 2048
  seed: int = 0
  weight_by: str = "tokens"
  repeat: bool = False
  # Batches packed ahead on a background thread (Grain's thread prefetch)
  # while the accelerator runs the step; 0 packs on the calling thread.
  prefetch: int = 2
  # Held-out data for perplexity: (name, shard glob) pairs, read in order.
  eval_sources: tuple = ()

  @property
  def source_list(self) -> tuple[Source, ...]:
    return tuple(_source(s) for s in self.sources)

  @property
  def eval_source_list(self) -> tuple[tuple[str, str], ...]:
    return tuple((str(s[0]), str(s[1])) if not isinstance(s, Mapping)
                 else (str(s["name"]), str(s["path"]))
                 for s in self.eval_sources)

  def validate(self, prefix: str = "data") -> None:
    check(len(self.sources) > 0, f"{prefix}.sources",
          "is empty; list at least one (name, path, weight, epochs)")
    names = set()
    for i, entry in enumerate(self.sources):
      field = f"{prefix}.sources[{i}]"
      try:
        src = _source(entry)
      except (TypeError, ValueError, KeyError) as e:
        raise_error(field, f"expected (name, path, weight, epochs), got "
                    f"{entry!r} ({e})")
      field = f"{prefix}.sources[{i}] ({src.name})"
      check(bool(src.name), field, "name is empty")
      check(src.name not in names, field, "duplicate source name")
      names.add(src.name)
      check(bool(src.path), field, "path is empty")
      check(src.weight > 0, field, f"weight must be positive, got {src.weight}")
      check(src.epochs > 0, field, f"epochs must be positive, got {src.epochs}")
    for i, entry in enumerate(self.eval_sources):
      field = f"{prefix}.eval_sources[{i}]"
      check(isinstance(entry, Mapping) or
            (isinstance(entry, (tuple, list)) and len(entry) == 2),
            field, f"expected (name, path), got {entry!r}")
    check(bool(self.tokenizer), f"{prefix}.tokenizer",
          "is empty; give a .model or tokenizer.json path")
    check(self.seq_len > 0, f"{prefix}.seq_len", "must be positive")
    check(0 <= self.seed < 2**32, f"{prefix}.seed", "must be in [0, 2**32)")
    check(self.prefetch >= 0, f"{prefix}.prefetch", "must be >= 0")
    check_choice(self.weight_by, WEIGHT_BY, f"{prefix}.weight_by")


def _source(entry: Any) -> Source:
  if isinstance(entry, Mapping):
    unknown = set(entry) - set(Source._fields)
    if unknown:
      raise KeyError(f"unknown key {sorted(unknown)[0]!r}")
    entry = tuple(entry[k] for k in Source._fields)
  name, path, weight, epochs = entry
  return Source(str(name), str(path), float(weight), float(epochs))


def raise_error(field: str, message: str) -> None:
  check(False, field, message)


SCHEMAS = ("auto", "native", "sharegpt", "alpaca")
# What happens to a conversation longer than a row (mllm_jax.data.chat.encode).
OVERFLOWS = ("rounds", "truncate", "drop")


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
  """Supervised fine-tuning data: conversations in files, one chat format.

  train_files / eval_files: globs or comma-separated paths of JSON / JSONL
  conversations (mllm_jax.data.chat: native, ShareGPT or Alpaca schema;
  "auto" detects per record), or a fetched set by name (paths.chat_files:
  "sharegpt", "alpaca_eval"). Empty: the ShareGPT dump for training and
  alpaca-eval's 805 instructions with references for evaluation. A
  training conversation identical to a held-out one is dropped and counted
  ("held_out"), whatever its file.
  format: a registered chat format (chat.FORMATS) or "hf_template" (the
  template carried by the base checkpoint's tokenizer). max_conversations /
  eval_conversations: the first N kept (0: all). train_skip: the first N
  training conversations read are passed over (to train on the part of a
  file after the records evaluation reads). overflow: what happens to a
  conversation longer than seq_len + 1 tokens.
  """
  train_files: str = ""
  train_schema: str = "auto"
  eval_files: str = ""
  eval_schema: str = "auto"
  format: str = "vicuna_v1"
  max_conversations: int = 0
  eval_conversations: int = 200
  train_skip: int = 0
  overflow: str = "rounds"
  pack_window: int = 64
  seed: int = 0

  def validate(self, prefix: str = "data") -> None:
    check_choice(self.train_schema, SCHEMAS, f"{prefix}.train_schema")
    check_choice(self.eval_schema, SCHEMAS, f"{prefix}.eval_schema")
    check_choice(self.overflow, OVERFLOWS, f"{prefix}.overflow")
    check(bool(self.format), f"{prefix}.format", "is empty")
    for name in ("max_conversations", "eval_conversations", "train_skip"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
    check(self.pack_window >= 1, f"{prefix}.pack_window", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ComparisonDataConfig:
  """Comparison data of the alignment stages (mllm_jax.data.comparisons).

  train_files / eval_files: comparison JSONL (globs, comma-separated), e.g.
  launch.build_comparisons' DIR/train.jsonl and DIR/eval.jsonl. Empty
  train_files: built here from `sources` (comparison_sources.SOURCES; not
  human preferences) with `limit_per_source` records each, split by prompt
  with `eval_fraction` held out. max_responses: K, the rows each comparison
  takes in a batch (comparisons with more responses are dropped, counted).
  max_comparisons / eval_comparisons: the first N kept (0: all).
  """
  train_files: str = ""
  eval_files: str = ""
  sources: tuple[str, ...] = ("arc_easy", "gsm8k", "bfcl_simple")
  limit_per_source: int = 0
  eval_fraction: float = 0.1
  format: str = "vicuna_v1"
  max_responses: int = 3
  max_comparisons: int = 0
  eval_comparisons: int = 200
  seed: int = 0

  def validate(self, prefix: str = "data") -> None:
    check(bool(self.format), f"{prefix}.format", "is empty")
    check(bool(self.train_files) or bool(self.sources), f"{prefix}.sources",
          "is empty and no train_files are given")
    check(not self.eval_files or bool(self.train_files), f"{prefix}.eval_files",
          "given without train_files (built sources are split by prompt)")
    check(0.0 <= self.eval_fraction < 1.0, f"{prefix}.eval_fraction",
          f"must be in [0, 1), got {self.eval_fraction}")
    check(self.max_responses >= 2, f"{prefix}.max_responses",
          f"must be >= 2, got {self.max_responses}")
    for name in ("limit_per_source", "max_comparisons", "eval_comparisons"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
