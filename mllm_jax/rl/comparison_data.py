"""Comparison data as the reward-model and DPO stages read it: one data
config (ComparisonDataConfig), split by prompt, encoded with counted drops,
batched by ComparisonIterator. Kept here so both binaries read the same
way (the reward model additionally appends its end-of-context token)."""

from __future__ import annotations

from typing import Sequence

from mllm_jax.configlib import check
from mllm_jax.data import chat, readers
from mllm_jax.data import comparison_sources as sources_lib
from mllm_jax.data import comparisons as cmp
from mllm_jax.data.config import ComparisonDataConfig
from mllm_jax.train.metrics import console

NOTE = "comparisons built from real data are NOT human preferences"


def provenance(comparisons: Sequence[cmp.Comparison]) -> str:
  """What the comparisons are, from their records' origin: NOTE when none
  was labelled by a person, else how many were (online rounds mix human
  labels with model-ranked and built comparisons)."""
  human = sum(c.origin == cmp.HUMAN for c in comparisons)
  if not human:
    return NOTE
  if human == len(comparisons):
    return f"all {human:,} comparisons labelled by people"
  return (f"{human:,} of {len(comparisons):,} comparisons labelled by "
          f"people; the other {len(comparisons) - human:,} are synthetic, "
          f"NOT human preferences")


def read_splits(data: ComparisonDataConfig):
  """(train, held-out) comparisons and their read statistics, from
  data.train_files / eval_files or built from data.sources; a prompt is
  never on both sides (a train record whose prompt is held out is dropped,
  counted)."""
  train_stats, eval_stats = chat.ChatStats(), chat.ChatStats()
  if data.train_files:
    train_set = cmp.read_comparisons(data.train_files, train_stats)
    if data.eval_files:
      held_out = cmp.read_comparisons(data.eval_files, eval_stats)
    else:
      train_set, held_out = cmp.split_by_prompt(train_set, data.eval_fraction,
                                                data.seed)
  else:
    built, counts = sources_lib.build(list(data.sources),
                                      data.limit_per_source, data.seed)
    train_stats.notes.update({f"built_{k}": v for k, v in counts.items()})
    train_set, held_out = cmp.split_by_prompt(built, data.eval_fraction,
                                              data.seed)
  held_prompts = {c.prompt_key() for c in held_out}
  kept = []
  for c in train_set:
    if c.prompt_key() in held_prompts:
      train_stats.add(readers.Drop("prompt_in_eval", c.id))
    else:
      kept.append(c)
  return kept, held_out, train_stats, eval_stats


def encode_split(comparisons: Sequence[cmp.Comparison], tokenizer, fmt,
                 seq_len: int, k: int, limit: int, stats: chat.ChatStats,
                 what: str, end_of_context_id: int | None = None):
  """(kept, encodings, drop summary): comparisons with at most K responses
  that fit seq_len, encoded (end_of_context_id appended to each response
  when given); the first `limit` (0: all). Fails naming data.<what>_files
  when nothing is left."""
  fitting = []
  for c in comparisons:
    if c.k > k:
      stats.add(readers.Drop("too_many_responses", f"{c.id}: {c.k} > "
                             f"data.max_responses={k}"))
    else:
      fitting.append(c)
  kept, encoded = cmp.encode_all(fitting, tokenizer, fmt, seq_len + 1,
                                 end_of_context_id, stats)
  if limit:
    kept, encoded = kept[:limit], encoded[:limit]
  summary = stats.summary()
  check(bool(kept), f"data.{what}_files",
        f"no usable {what} comparison ({summary})")
  console(f"{what}: {len(kept):,} comparisons ({sum(c.k for c in kept):,} "
          f"responses, {sum(len(c.pairs()) for c in kept):,} pairs) per "
          f"source {sources_lib.per_source(kept)}; dropped "
          f"{summary['dropped'] or 'none'}; {provenance(kept)}")
  return kept, encoded, summary


def comparison_batches(kept, encoded, per_batch: int, k: int, seq_len: int,
                       **kwargs) -> cmp.ComparisonIterator:
  """Batches of `per_batch` comparisons of K rows (one pass in order unless
  kwargs say shuffle/repeat)."""
  return cmp.ComparisonIterator(
      encoded, [c.ranking for c in kept], comparisons_per_batch=per_batch,
      max_responses=k, seq_len=seq_len, **kwargs)
