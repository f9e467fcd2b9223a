"""PPO's prompts: read from comparison records or {"prompt"} JSONL with
every drop counted, split into training and held-out prompts by a hash of
their tokens, and served in a resumable seeded order. Kept out of
launch.ppo so that launch.rlhf_rounds (which must not sample the prompts PPO
holds out) and bench/ppo.py read them the same way."""

from __future__ import annotations

import hashlib

import numpy as np

from mllm_jax.data import chat
from mllm_jax.data import comparisons


def read_prompts(path: str, tokenizer, fmt, max_tokens: int
                 ) -> tuple[list[list[int]], dict[str, int]]:
  """Encoded prompts from a JSONL of comparison records (their `prompt`:
  a list of {role, content} ending with a user turn, or a string) or of
  {"prompt": ...} records; duplicates, bad records and prompts longer than
  `max_tokens` are dropped and counted."""
  drops: dict[str, int] = {}
  seen, prompts = set(), []
  for item in chat.iter_json_records(path):
    if not isinstance(item, tuple):  # a readers.Drop: unreadable JSON
      drops[item.reason] = drops.get(item.reason, 0) + 1
      continue
    record, where = item
    try:
      if not isinstance(record, dict) or "prompt" not in record:
        raise comparisons.ComparisonError("missing_prompt")
      conv = comparisons.prompt_conversation(
          comparisons.parse_prompt(record["prompt"]), where)
      ids = chat.encode_prompt(conv, tokenizer, fmt).tolist()
    except (comparisons.ComparisonError, chat.ChatFormatError,
            ValueError) as e:
      reason = getattr(e, "reason", "bad_prompt")
      drops[reason] = drops.get(reason, 0) + 1
      continue
    key = tuple(ids)
    if key in seen:
      drops["duplicate_prompt"] = drops.get("duplicate_prompt", 0) + 1
    elif len(ids) > max_tokens:
      drops["prompt_too_long"] = drops.get("prompt_too_long", 0) + 1
    else:
      seen.add(key)
      prompts.append(ids)
  return prompts, drops


class PromptOrder:
  """Prompts in a seeded order, reshuffled every pass; its state is two
  integers (checkpointed with the run)."""

  def __init__(self, prompts: list[list[int]], seed: int):
    self.prompts, self.seed = prompts, seed
    self.epoch, self.index = 0, 0

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(
        len(self.prompts))

  def take(self, n: int) -> list[list[int]]:
    out = []
    while len(out) < n:
      if self.index == len(self.prompts):
        self.epoch, self.index = self.epoch + 1, 0
      out.append(self.prompts[self._order()[self.index]])
      self.index += 1
    return out

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def split_held_out(prompts, n: int):
  """(train, held out): the held-out prompts are chosen by a hash of their
  tokens, so the split does not depend on file order."""
  digest = lambda p: hashlib.sha1(np.asarray(p, np.int32).tobytes()).digest()
  ranked = sorted(range(len(prompts)), key=lambda i: digest(prompts[i]))
  held = set(ranked[:n])
  return ([p for i, p in enumerate(prompts) if i not in held],
          [prompts[i] for i in sorted(held)])
