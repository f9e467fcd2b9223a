"""Comparison data for the alignment stages: responses to one prompt, ranked.

One JSONL schema serves pairs and K-wise rankings (the reward model, DPO and
the online rounds all read it):

    {"id": "gsm8k:17",
     "prompt": [{"role": "system", "content": "..."},        # optional, first
                {"role": "user", "content": "How many ...?"}],  # ends with user
     "responses": ["... So the answer is 18.", "... So the answer is 21."],
     "ranking": [0, 1],          # indices into responses, best first, all K
     "source": "gsm8k:gold_vs_wrong_final",
     "origin": "synthetic: ... (not a human preference)",   # or "human"
     "margin": 1.0}              # optional: how much better (reward model)

A plain string prompt means one user turn. K >= 2 responses, each non-empty
and all distinct. `parse_comparison` validates a record and raises
`ComparisonError(reason)`; `read_comparisons` drops and counts bad records
(`chat.ChatStats`), never raises on one.

Encoding (`encode_comparison`) renders each response as the final assistant
turn of the prompt conversation with `chat.encode` and keeps the loss
weights on that turn alone (its content and end-of-turn); `ComparisonIterator`
groups the K encodings of a comparison in K consecutive rows of a batch:

    inputs, targets, positions, segment_ids [G*K, T] int32; loss_weights
    [G*K, T] float32; ranks [G, K] int32 (0 = best, -1 = absent row);
    optionally ref_logps [G*K] float32 (cached reference log-probabilities).

segment_ids is 1 on real tokens and 0 on right padding, so the last real
token of a row is found from segment_ids, never by comparing ids with the
pad id (SmolLM2's pad equals its eos). The stages regroup the rows as
[G, K, T] (`mllm_jax.rl.reward.GroupedBatches`) so that the trainer's batch
axis is the comparison: sharding and gradient accumulation never split a
prompt's responses.

Human labelling round trip: `export_for_labelling` writes a JSONL a person
fills in (a letter in "preferred", or letters best first in "ranking");
`import_labels` reads it back: labelled lines become records with origin
"human"; a line left empty, a ranking that is not a permutation, a line
whose two fields disagree, or an id labelled differently in two lines goes
to a needs-attention list with its reason. Nothing is lost: every line
ends in exactly one of the two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from mllm_jax.data import chat, readers
from mllm_jax.data.pipeline import derive_seed, host_rows
from mllm_jax.data.tokenizer import Tokenizer

SYNTHETIC = "synthetic"
HUMAN = "human"
NOT_HUMAN = "(not a human preference)"
ROLES = (chat.SYSTEM, chat.USER, chat.ASSISTANT)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COMPARISON_FIELDS = {"inputs": np.int32, "targets": np.int32,
                     "loss_weights": np.float32, "segment_ids": np.int32,
                     "positions": np.int32}


class ComparisonError(ValueError):
  """A record that cannot be a comparison; `reason` is the drop reason."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A validated comparison record (see the module docstring)."""
  id: str
  prompt: tuple[tuple[str, str], ...]  # (role, content), ends with user
  responses: tuple[str, ...]
  ranking: tuple[int, ...]
  source: str
  origin: str
  margin: float | None = None

  @property
  def k(self) -> int:
    return len(self.responses)

  def ranks(self) -> list[int]:
    """Rank of each response (0 = best)."""
    out = [0] * self.k
    for rank, index in enumerate(self.ranking):
      out[index] = rank
    return out

  def pairs(self) -> list[tuple[int, int]]:
    """(better, worse) response indices: all K (K - 1) / 2 ranked pairs."""
    return [(self.ranking[a], self.ranking[b]) for a in range(self.k)
            for b in range(a + 1, self.k)]

  def prompt_key(self) -> str:
    """What identifies the prompt (held-out splits are by prompt)."""
    return json.dumps(self.prompt, ensure_ascii=False)

  def conversation(self, response: int | str | None) -> chat.Conversation:
    """The prompt as a Conversation, answered by response `response` (an
    index or a text) or, with None, left ending in the user's turn."""
    text = self.responses[response] if isinstance(response, int) else (
        response)
    return prompt_conversation(self.prompt, self.id, text)

  def to_json(self) -> dict[str, Any]:
    record = {"id": self.id,
              "prompt": [{"role": r, "content": c} for r, c in self.prompt],
              "responses": list(self.responses),
              "ranking": list(self.ranking), "source": self.source,
              "origin": self.origin}
    if self.margin is not None:
      record["margin"] = self.margin
    return record


def prompt_conversation(prompt: Sequence[tuple[str, str]], conv_id: str,
                        response: str | None = None) -> chat.Conversation:
  """(role, content) prompt pairs as a Conversation, answered by `response`
  or, with None, left ending in the user's turn."""
  system = None
  turns = []
  for role, content in prompt:
    if role == chat.SYSTEM:
      system = content
    else:
      turns.append(chat.Turn(role, content))
  if response is not None:
    turns.append(chat.Turn(chat.ASSISTANT, response))
  return chat.Conversation(conv_id, tuple(turns), system)


def synthetic_origin(how: str) -> str:
  """The origin of a builder's records: says they are not human
  preferences (every report and record carries it)."""
  return f"{SYNTHETIC}: {how} {NOT_HUMAN}"


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def parse_prompt(value: Any) -> tuple[tuple[str, str], ...]:
  """A prompt (a string, or messages ending with the user's) as (role,
  content) pairs; raises ComparisonError naming the problem. PPO reads its
  prompts through this too."""
  if isinstance(value, str):
    value = [{"role": chat.USER, "content": value}]
  if not isinstance(value, list) or not value:
    raise ComparisonError("bad_prompt", "prompt must be a string or a "
                          "non-empty list of messages")
  out = []
  for i, message in enumerate(value):
    if not isinstance(message, dict):
      raise ComparisonError("bad_prompt", f"message {i} is not an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
      raise ComparisonError("bad_prompt", f"message {i}: role {role!r}")
    if not isinstance(content, str) or not content.strip():
      raise ComparisonError("empty_prompt", f"message {i} has no text")
    if role == chat.SYSTEM and i:
      raise ComparisonError("bad_prompt", f"message {i}: a system message "
                            f"may only come first")
    out.append((role, content.strip()))
  if out[-1][0] != chat.USER:
    raise ComparisonError("bad_prompt", "the prompt must end with a user "
                          "message")
  return tuple(out)


def check_ranking(ranking: Any, k: int) -> tuple[int, ...]:
  """The ranking as a tuple, or ComparisonError("bad_ranking") when it is
  not a permutation of range(k)."""
  if not isinstance(ranking, (list, tuple)) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in ranking):
    raise ComparisonError("bad_ranking", f"{ranking!r} is not a list of "
                          f"response indices")
  if sorted(ranking) != list(range(k)):
    raise ComparisonError("bad_ranking", f"{list(ranking)} is not a "
                          f"permutation of the {k} responses")
  return tuple(ranking)


def parse_comparison(record: Any, default_id: str = "") -> Comparison:
  """A JSON record -> Comparison; raises ComparisonError naming the
  problem (the drop reason)."""
  if not isinstance(record, dict):
    raise ComparisonError("not_an_object")
  for key in ("prompt", "responses", "ranking", "source", "origin"):
    if key not in record:
      raise ComparisonError("missing_field", key)
  prompt = parse_prompt(record["prompt"])
  responses = record["responses"]
  if not isinstance(responses, list) or not all(
      isinstance(r, str) for r in responses):
    raise ComparisonError("bad_responses", "responses must be a list of "
                          "strings")
  if len(responses) < 2:
    raise ComparisonError("too_few_responses", f"{len(responses)} < 2")
  responses = [r.strip() for r in responses]
  empty = [i for i, r in enumerate(responses) if not r]
  if empty:
    raise ComparisonError("empty_response", f"response {empty[0]}")
  if len(set(responses)) < len(responses):
    raise ComparisonError("equal_responses", "two responses have the same "
                          "text")
  ranking = check_ranking(record["ranking"], len(responses))
  source, origin = record["source"], record["origin"]
  if not isinstance(source, str) or not source:
    raise ComparisonError("bad_source", "source must be a non-empty string")
  if not isinstance(origin, str) or not (
      origin == HUMAN or origin.startswith(SYNTHETIC + ":")):
    raise ComparisonError("bad_origin", f"{origin!r}: use 'human' or "
                          f"'synthetic: <how>'")
  margin = record.get("margin")
  if margin is not None and (isinstance(margin, bool) or not isinstance(
      margin, (int, float)) or not np.isfinite(margin)):
    raise ComparisonError("bad_margin", f"{margin!r} is not a number")
  conv_id = record.get("id", default_id)
  return Comparison(str(conv_id), prompt, tuple(responses), ranking, source,
                    origin, None if margin is None else float(margin))


def validate_all(records: Iterable[tuple[Any, str]],
                 stats: chat.ChatStats) -> list[Comparison]:
  """(record, where) pairs -> valid comparisons; bad ones and repeated ids
  are dropped and counted in `stats`."""
  out, seen = [], set()
  for record, where in records:
    try:
      comparison = parse_comparison(record, where)
    except ComparisonError as e:
      stats.add(readers.Drop(e.reason, f"{where}: {e}"[:300]))
      continue
    if comparison.id in seen:
      stats.add(readers.Drop("duplicate_id", f"{where}: {comparison.id}"))
      continue
    seen.add(comparison.id)
    out.append(comparison)
  stats.note("comparisons", len(out))
  return out


def read_comparisons(files: str | Sequence[str],
                     stats: chat.ChatStats | None = None
                     ) -> list[Comparison]:
  """Comparisons from JSONL files (globs, comma-separated); bad records
  (and undecodable text) are dropped and counted in `stats`."""
  stats = stats if stats is not None else chat.ChatStats()

  def records():
    for path in readers.expand(files):
      for item in chat.iter_json_records(path, lambda v: isinstance(v, dict)):
        if isinstance(item, readers.Drop):
          stats.add(item)
        else:
          yield item
  return validate_all(records(), stats)


def write_comparisons(path: str, comparisons: Iterable[Comparison]) -> int:
  n = 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for c in comparisons:
      f.write(json.dumps(c.to_json(), ensure_ascii=False) + "\n")
      n += 1
  return n


def split_by_prompt(comparisons: Sequence[Comparison], eval_fraction: float,
                    seed: int = 0) -> tuple[list[Comparison],
                                            list[Comparison]]:
  """(train, eval): a prompt goes to eval when a seeded hash of its text
  falls under `eval_fraction`, so one prompt is never on both sides (even
  when several sources or records share it)."""
  train, held_out = [], []
  for c in comparisons:
    digest = hashlib.sha256(f"{seed}:{c.prompt_key()}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    (held_out if u < eval_fraction else train).append(c)
  return train, held_out


# ----------------------------------------------------------------------------
# Human labelling: export, then import with validation
# ----------------------------------------------------------------------------

LABEL_HELP = ("Fill 'preferred' with the letter of the better response (A "
              "is the first), or 'ranking' with every letter, best first; "
              "leave the other field empty.")


def export_for_labelling(path: str, comparisons: Iterable[Comparison]) -> int:
  """One line per comparison, the responses shown under letters, the label
  fields empty (the ranking a builder gave is not shown)."""
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for c in comparisons:
      f.write(json.dumps({
          "id": c.id,
          "prompt": [{"role": r, "content": t} for r, t in c.prompt],
          "responses": {LETTERS[i]: r for i, r in enumerate(c.responses)},
          "source": c.source, "preferred": "", "ranking": [],
          "how_to_label": LABEL_HELP}, ensure_ascii=False) + "\n")
      n += 1
  return n


def _label_ranking(line: Mapping[str, Any], k: int) -> tuple[int, ...] | None:
  """The ranking a labelled line gives (None: unlabelled); raises
  ComparisonError for a bad or self-contradictory label."""
  preferred, ranking = line.get("preferred") or "", line.get("ranking") or []
  if not preferred and not ranking:
    return None
  letters = LETTERS[:k]

  def index(letter, what):
    if not isinstance(letter, str) or letter.strip().upper() not in letters:
      raise ComparisonError("bad_label", f"{what} {letter!r} is not one of "
                            f"{list(letters)}")
    return letters.index(letter.strip().upper())
  order = None
  if ranking:
    if not isinstance(ranking, list):
      raise ComparisonError("bad_label", "ranking must be a list of letters")
    order = check_ranking([index(x, "ranking entry") for x in ranking], k)
  if preferred:
    best = index(preferred, "preferred")
    if order is not None and order[0] != best:
      raise ComparisonError("contradictory_label", f"preferred {preferred!r}"
                            f" but the ranking puts {letters[order[0]]} first")
    if order is None:
      if k != 2:
        raise ComparisonError("incomplete_label", f"'preferred' ranks only "
                              f"one of {k} responses; give the full ranking")
      order = (best, 1 - best)
  return order


def import_labels(path: str) -> tuple[list[Comparison], list[dict], dict]:
  """Reads a filled labelling file back.

  Returns (labelled comparisons with origin "human", lines needing
  attention each with its "reason", counts). Lines with the same id and the
  same label count once; the same id with different labels is
  "contradictory_duplicates" (every such line goes to needs-attention).
  Each input line is in exactly one of the two outputs (or merged into an
  agreeing duplicate, counted).
  """
  attention: list[dict] = []
  by_id: dict[str, list[tuple[dict, tuple[int, ...]]]] = {}
  order: list[str] = []
  counts = {"lines": 0, "labelled": 0, "agreeing_duplicates": 0}

  def flag(line, reason, detail, where):
    attention.append({"reason": reason, "detail": detail, "where": where,
                      "line": line})

  for item in chat.iter_json_records(path):
    if isinstance(item, readers.Drop):
      counts["lines"] += 1
      flag(None, item.reason, "", item.where)
      continue
    line, where = item
    counts["lines"] += 1
    try:
      if not isinstance(line, dict) or not isinstance(line.get("responses"),
                                                      dict):
        raise ComparisonError("bad_line", "not an exported labelling line")
      responses = [line["responses"][x] for x in sorted(line["responses"])]
      ranking = _label_ranking(line, len(responses))
      if ranking is None:
        raise ComparisonError("missing_label", "neither 'preferred' nor "
                              "'ranking' is filled")
      comparison = parse_comparison({
          "id": line.get("id"), "prompt": line.get("prompt"),
          "responses": responses, "ranking": list(ranking),
          "source": line.get("source") or "labelled", "origin": HUMAN})
    except ComparisonError as e:
      flag(line, e.reason, str(e), where)
      continue
    if comparison.id not in by_id:
      order.append(comparison.id)
    by_id.setdefault(comparison.id, []).append((line, comparison))
  labelled = []
  for conv_id in order:
    entries = by_id[conv_id]
    rankings = {c.ranking for _, c in entries}
    if len(rankings) > 1:
      for line, c in entries:
        flag(line, "contradictory_duplicates", f"id {conv_id!r} is labelled "
             f"{sorted(''.join(LETTERS[i] for i in r) for r in rankings)} "
             f"in {len(entries)} lines", conv_id)
      continue
    counts["agreeing_duplicates"] += len(entries) - 1
    labelled.append(entries[0][1])
  counts["labelled"] = len(labelled)
  reasons: dict[str, int] = {}
  for a in attention:
    reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
  counts["needs_attention"] = dict(sorted(reasons.items()))
  assert counts["lines"] == (len(labelled) + counts["agreeing_duplicates"]
                             + len(attention)), counts
  return labelled, attention, counts


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def _last_trained_span(weights: np.ndarray) -> int:
  """Start of the last run of weighted tokens: the final assistant turn's
  content and end-of-turn (chat formats weight them as one run)."""
  trained = np.flatnonzero(weights > 0)
  end = trained[-1]
  start = end
  while start > 0 and weights[start - 1] > 0:
    start -= 1
  return int(start)


def encode_response(comparison: Comparison, response: int,
                    tokenizer: Tokenizer, fmt: chat.ChatFormat,
                    max_len: int | None,
                    end_of_context_id: int | None = None
                    ) -> dict[str, np.ndarray] | str:
  """One response as the prompt's final assistant turn -> {"ids",
  "weights"} (weights 1 on that turn's content and end-of-turn only), or
  the drop reason "response_too_long" when the response alone (with one
  prompt token before it) does not fit `max_len`. A longer example loses
  prompt tokens from the left (after BOS, which is kept); it then also
  has "prompt_cut", the number of tokens cut. With end_of_context_id the
  response ends with that token and one filler copy of it (weight 0)."""
  example = chat.encode(comparison.conversation(response), tokenizer, fmt)
  ids, weights = example["ids"], example["weights"].copy()
  start = _last_trained_span(weights)
  weights[:start] = 0.0
  if end_of_context_id is not None:
    # The score is read at the end-of-context token, so it must be an
    # input: a filler after it is its target once ComparisonIterator shifts
    # (launch.ppo scores prompt + response + end-of-context the same way).
    ids = np.append(ids, np.int32([end_of_context_id] * 2))
    weights = np.append(weights, np.float32([0.0, 0.0]))
  if max_len is None or len(ids) <= max_len:
    return {"ids": ids, "weights": weights}
  keep_bos = int(fmt.add_bos and tokenizer.bos_id >= 0 and start > 0
                 and ids[0] == tokenizer.bos_id)
  room = max_len - keep_bos - (len(ids) - start)
  if room < 1 - keep_bos:  # need a token before the response's first
    return "response_too_long"
  cut = len(ids) - max_len  # prompt tokens to remove, after the BOS
  keep = np.r_[np.arange(keep_bos), np.arange(keep_bos + cut, len(ids))]
  return {"ids": ids[keep], "weights": weights[keep], "prompt_cut": cut}


def encode_comparison(comparison: Comparison, tokenizer: Tokenizer,
                      fmt: str | chat.ChatFormat, max_len: int | None,
                      end_of_context_id: int | None = None,
                      stats: chat.ChatStats | None = None
                      ) -> list[dict[str, np.ndarray]] | None:
  """Every response of `comparison` encoded (`encode_response`), in the
  record's order; None (counted in `stats`) when one does not fit, the
  format cannot tokenise it exactly, or two responses become the same
  tokens (a pair with nothing to learn, read as a tie by every metric):
  the comparison is dropped whole, so its ranking stays complete."""
  fmt = chat.get_format(fmt, tokenizer)
  out = []
  for k in range(comparison.k):
    try:
      example = encode_response(comparison, k, tokenizer, fmt, max_len,
                                end_of_context_id)
    except chat.ChatFormatError as e:
      example = "format_shift"
      detail = str(e)[:200]
    else:
      detail = f"response {k}"
    if isinstance(example, str):
      if stats is not None:
        stats.add(readers.Drop(example, f"{comparison.id}: {detail}"))
      return None
    if stats is not None and example.pop("prompt_cut", 0):
      stats.note("prompt_truncated_left")
    out.append(example)
  seen: dict[bytes, int] = {}
  for k, example in enumerate(out):
    key = np.asarray(example["ids"], np.int64).tobytes()
    if key in seen:  # e.g. texts that differ only in unknown characters
      if stats is not None:
        stats.add(readers.Drop("equal_after_encoding", f"{comparison.id}: "
                               f"responses {seen[key]} and {k}"))
      return None
    seen[key] = k
  if stats is not None:
    stats.note("encoded")
  return out


def encode_all(comparisons: Iterable[Comparison], tokenizer: Tokenizer,
               fmt: str | chat.ChatFormat, max_len: int | None,
               end_of_context_id: int | None = None,
               stats: chat.ChatStats | None = None
               ) -> tuple[list[Comparison], list[list[dict]]]:
  """(kept comparisons, their encodings): `encode_comparison` over many."""
  fmt = chat.get_format(fmt, tokenizer)
  kept, encoded = [], []
  for c in comparisons:
    e = encode_comparison(c, tokenizer, fmt, max_len, end_of_context_id,
                          stats)
    if e is not None:
      kept.append(c)
      encoded.append(e)
  return kept, encoded


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


class ComparisonIterator(grain.DatasetIterator):
  """This host's comparisons of global batches of G comparisons, K rows each.

  encoded: per comparison, its responses' {"ids", "weights"} (at most K);
  rankings: per comparison, its ranking (best first). ref_logps: optional
  per comparison, one cached reference log-probability per response
  (attached as the `ref_logps` field). Comparison g of a batch fills rows
  g*K .. g*K+K-1 (response k in row g*K+k; rows past its responses and
  whole comparisons past the data's end are padding with rank -1).
  shuffle/seed: a fresh seeded order each pass; repeat: forever, else one
  pass (the last batch padded). The layout depends on nothing but the
  count, so every host computes the same one and builds only its rows
  (`host_rows` over comparisons).
  """

  def __init__(self, encoded: Sequence[Sequence[Mapping[str, Any]]],
               rankings: Sequence[Sequence[int]], *, comparisons_per_batch: int,
               max_responses: int, seq_len: int, process_index: int = 0,
               process_count: int = 1, shuffle: bool = False, seed: int = 0,
               repeat: bool = False,
               ref_logps: Sequence[Sequence[float]] | None = None):
    super().__init__()
    if not encoded:
      raise ValueError("no comparisons to batch")
    if len(rankings) != len(encoded):
      raise ValueError(f"{len(rankings)} rankings for {len(encoded)} "
                       f"comparisons")
    if ref_logps is not None and len(ref_logps) != len(encoded):
      raise ValueError(f"{len(ref_logps)} cached reference rows for "
                       f"{len(encoded)} comparisons")
    for i, (examples, ranking) in enumerate(zip(encoded, rankings)):
      if not 2 <= len(examples) <= max_responses:
        raise ValueError(f"comparison {i} has {len(examples)} responses; "
                         f"batches hold 2 to {max_responses} (the config's "
                         f"max responses)")
      check_ranking(list(ranking), len(examples))
      for e in examples:
        if not 2 <= len(e["ids"]) <= seq_len + 1:
          raise ValueError(f"comparison {i}: an example of {len(e['ids'])} "
                           f"tokens does not fit seq_len + 1 = {seq_len + 1}")
    self._encoded, self._rankings = encoded, rankings
    self._ref = ref_logps
    self._n = len(encoded)
    self._g, self._k, self._seq_len = (comparisons_per_batch, max_responses,
                                       seq_len)
    self._lo, self._hi = host_rows(comparisons_per_batch, process_index,
                                   process_count)
    self._shuffle, self._seed, self._repeat = shuffle, seed, repeat
    self._identity = {"num_comparisons": self._n,
                      "comparisons_per_batch": comparisons_per_batch,
                      "max_responses": max_responses, "seq_len": seq_len,
                      "shuffle": shuffle, "seed": seed, "repeat": repeat}
    self._orders: dict[int, Any] = {}
    self._next, self._batches = 0, 0

  def _index(self, g: int) -> int:
    pass_index, position = divmod(g, self._n)
    if not self._shuffle:
      return position
    order = self._orders.get(pass_index)
    if order is None:
      order = grain.MapDataset.range(self._n).shuffle(
          seed=derive_seed(self._seed, pass_index, "comparisons"))
      self._orders = {pass_index: order}
    return int(order[position])

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._repeat and self._next >= self._n:
      raise StopIteration
    first = self._next
    batch = self._assemble([first + j for j in range(self._lo, self._hi)])
    self._next = first + self._g
    self._batches += 1
    return batch

  def _assemble(self, stream: list[int]) -> dict[str, np.ndarray]:
    k, t = self._k, self._seq_len
    rows = len(stream) * k
    out = {name: np.zeros((rows, t), dtype)
           for name, dtype in COMPARISON_FIELDS.items()}
    ranks = np.full((len(stream), k), -1, np.int32)
    ref = np.zeros((rows,), np.float32)
    for j, g in enumerate(stream):
      if not self._repeat and g >= self._n:
        continue  # past the data's end: an absent comparison
      index = self._index(g)
      examples = self._encoded[index]
      for rank, r in enumerate(self._rankings[index]):
        ranks[j, r] = rank
      for r, example in enumerate(examples):
        row = j * k + r
        ids = np.asarray(example["ids"], np.int32)
        n = len(ids) - 1
        out["inputs"][row, :n] = ids[:-1]
        out["targets"][row, :n] = ids[1:]
        out["loss_weights"][row, :n] = np.asarray(example["weights"],
                                                  np.float32)[1:]
        out["segment_ids"][row, :n] = 1
        out["positions"][row, :n] = np.arange(n, dtype=np.int32)
        if self._ref is not None:
          ref[row] = self._ref[index][r]
    out["ranks"] = ranks
    if self._ref is not None:
      out["ref_logps"] = ref
    return out

  def get_state(self) -> dict[str, Any]:
    return {"next": self._next, "batches": self._batches, **self._identity}

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(
            f"comparison iterator state was saved with {key}="
            f"{state.get(key)!r} but this one has {key}={value!r}; it "
            f"cannot resume from it")
    self._next, self._batches = int(state["next"]), int(state["batches"])

  def __str__(self) -> str:
    return (f"ComparisonIterator(batches={self._batches}, comparisons "
            f"{self._lo}:{self._hi} of {self._g} x {self._k} rows)")


__all__ = [
    "COMPARISON_FIELDS", "Comparison", "ComparisonError",
    "ComparisonIterator", "HUMAN", "LABEL_HELP", "NOT_HUMAN", "SYNTHETIC",
    "check_ranking", "encode_all", "encode_comparison", "encode_response",
    "export_for_labelling", "import_labels",
    "parse_comparison", "read_comparisons", "split_by_prompt",
    "synthetic_origin", "validate_all", "write_comparisons",
]
