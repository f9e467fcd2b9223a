"""Chat evaluation on held-out instructions: alpaca-eval and MT-bench.

Data (scripts/fetch_data.py):
  * `alpaca_eval`: alpaca-eval's 805 instructions, one reference output
    each (`paths.alpaca_eval_json()`, source "alpaca-eval"). `limit`: the
    first N in file order (the file is grouped by source set, helpful_base
    first).
  * `mt_bench`: MT-bench's 80 two-turn questions, 10 in each of 8 categories
    (`paths.mt_bench_questions()`), and GPT-4's reference answers to both
    turns of the 30 reasoning / math / coding questions
    (`paths.mt_bench_references()`), source "mt-bench". `limit`: N questions
    taken round-robin over the categories (first of each category, then
    second, ...), so a small limit still covers every category and some
    references.

Metrics (all deterministic: greedy generation, references fixed):
  * `response_loss`: mean negative log-likelihood in nats per token of the
    reference answers, the conversation rendered with a chat format
    (`chat.get_format`: a registered one or "hf_template"), exactly the
    tokens `chat.encode` trains in SFT: the answer's content and its
    end-of-turn token(s). Token-weighted over all scored turns. For a second
    turn the earlier answer in the context is the *reference* first answer
    (teacher forcing), so the loss depends only on the references and is
    comparable across models. Only turns with a reference are scored (all
    of alpaca-eval; 30 of MT-bench's 80 questions). A sequence longer than
    the model's max_seq_len keeps at most half the window of prompt (cut
    from the left) and cuts the reference on the right (`loss_truncated`).
  * `end_of_turn_rate`: share of greedy replies that end with the format's
    own end-of-turn (its token, or its text when that is not one token)
    within `max_new_tokens`. Generation also stops on the tokenizer's other
    end-of-turn ids (`Tokenizer.end_of_turn_ids`: EOS, <|im_end|>, ...);
    `stop_rate` counts any stop.
  * `mean_reply_tokens`: generated tokens per reply, the end-of-turn token
    included (what the reply cost; max_new_tokens when it never ended);
    `mean_reply_chars`: the reply text's length, end-of-turn excluded.
  * MT-bench asks the second question after the model's *own* first answer
    (its reply text, stripped; an empty reply stays empty), as MT-bench
    does; rates are also given per turn and per category.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from mllm_jax import paths
from mllm_jax.data import chat
from mllm_jax.data.tokenizer import Tokenizer

TASKS = ("alpaca_eval", "mt_bench")
DEFAULT_FORMAT = "vicuna_v1"  # when the tokenizer has no chat template
MAX_NEW_TOKENS = 512


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatItem:
  """A held-out prompt: the user's turns, one reference answer per turn
  (None where there is none) and a category (alpaca-eval: its source set)."""
  id: str
  turns: tuple[str, ...]
  references: tuple[str | None, ...]
  category: str = ""


def load_alpaca_eval(path: str | None = None, limit: int | None = None
                     ) -> list[ChatItem]:
  """alpaca-eval's instructions with their reference outputs, the first
  `limit` in file order; ids "outputs.json:INDEX" as `chat.read_conversations`
  names them (what launch.sft evaluates on)."""
  path = path or paths.alpaca_eval_json()
  with open(path, encoding="utf-8") as f:
    records = json.load(f)
  name = os.path.basename(path)
  items = []
  for i, record in enumerate(records):
    try:
      conv = chat.alpaca_conversation(record, f"{name}:{i}")
    except chat.ConversationError:
      continue
    user, answer = conv.turns
    items.append(ChatItem(conv.id, (user.text,), (answer.content,),
                          str(record.get("dataset", ""))))
    if limit is not None and len(items) >= limit:
      break
  return items


def _jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load_mt_bench(questions: str | None = None,
                  references: str | None = None,
                  limit: int | None = None) -> list[ChatItem]:
  """MT-bench's questions (file order) with GPT-4's reference answers where
  they exist; `limit` takes N questions round-robin over the categories."""
  refs = {}
  for record in _jsonl(references or paths.mt_bench_references()):
    refs[record["question_id"]] = record["choices"][0]["turns"]
  items = []
  for record in _jsonl(questions or paths.mt_bench_questions()):
    turns = tuple(t.strip() for t in record["turns"])
    answers = list(refs.get(record["question_id"], ()))
    answers += [None] * (len(turns) - len(answers))
    items.append(ChatItem(
        str(record["question_id"]), turns,
        tuple(a.strip() if isinstance(a, str) and a.strip() else None
              for a in answers[:len(turns)]), record.get("category", "")))
  return round_robin(items, limit)


def round_robin(items: Sequence[ChatItem], limit: int | None
                ) -> list[ChatItem]:
  """The first `limit` items taking categories in turn (the 1st item of
  each category in order of first appearance, then the 2nd, ...), returned
  in their original order."""
  if limit is None or limit >= len(items):
    return list(items)
  by_category: dict[str, list[int]] = {}
  for i, item in enumerate(items):
    by_category.setdefault(item.category, []).append(i)
  chosen: list[int] = []
  for rank in range(max(len(v) for v in by_category.values())):
    for indices in by_category.values():
      if rank < len(indices) and len(chosen) < limit:
        chosen.append(indices[rank])
  return [items[i] for i in sorted(chosen)]


def load_items(task: str, limit: int | None = None) -> list[ChatItem]:
  if task == "alpaca_eval":
    return load_alpaca_eval(limit=limit)
  if task == "mt_bench":
    return load_mt_bench(limit=limit)
  raise ValueError(f"unknown chat task {task!r}; known: {TASKS}")


# ----------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------


def default_format(tokenizer: Tokenizer) -> str:
  """"hf_template" when the tokenizer has its own chat template, else
  DEFAULT_FORMAT."""
  return "hf_template" if tokenizer.chat_template else DEFAULT_FORMAT


def conversation(conv_id: str, users: Sequence[str],
                 answers: Sequence[str]) -> chat.Conversation:
  """users[0], answers[0], users[1], ... (answers may be one shorter: a
  prompt). An empty answer (a model's reply that ended at once) is kept
  empty, which `chat.Conversation` itself refuses for training data."""
  turns = []
  for i, user in enumerate(users):
    turns.append(chat.Turn(chat.USER, user))
    if i < len(answers):
      turns.append(chat.Turn(chat.ASSISTANT, answers[i]))
  placeholder = tuple(t if t.content.strip() else
                      dataclasses.replace(t, content=".") for t in turns)
  conv = chat.Conversation(conv_id, placeholder)
  if placeholder != tuple(turns):
    object.__setattr__(conv, "turns", tuple(turns))
  return conv


@dataclasses.dataclass(frozen=True)
class EndOfTurn:
  """How a format ends an assistant turn: its token id(s) or, when its
  end-of-turn text is not a single vocabulary entry, that text (a stop
  string). `other`: further ids that end generation without being the
  format's own end of turn (EOS or another format's end-of-turn token)."""
  tokens: tuple[int, ...]
  strings: tuple[str, ...]
  other: tuple[int, ...]

  @property
  def stop_tokens(self) -> list[int]:
    return list(self.tokens) + list(self.other)


def end_of_turn(fmt: chat.ChatFormat, tokenizer: Tokenizer) -> EndOfTurn:
  """The end-of-turn of `fmt`, read from how it renders a probe
  conversation: the trained parts after the answer's content."""
  probe = chat.Conversation("probe", (chat.Turn(chat.USER, "Hi"),
                                      chat.Turn(chat.ASSISTANT, "Hello")), "")
  trained = [p for p in fmt.parts(probe) if p.train]
  ends = trained[1:]
  if not ends:
    raise chat.ChatFormatError(f"format {fmt.name!r} writes no end-of-turn "
                               f"after an answer")
  tokens, strings = [], []
  if any(p.eos for p in ends):
    if tokenizer.eos_id < 0:
      raise chat.ChatFormatError(f"format {fmt.name!r} ends turns with EOS "
                                 f"but tokenizer {tokenizer.path} has none")
    tokens.append(tokenizer.eos_id)
  else:
    text = "".join(p.text for p in ends)
    try:
      tokens.append(tokenizer.special_token_id(text))
    except KeyError:
      strings.append(text)
  other = [i for i in tokenizer.end_of_turn_ids() if i not in tokens]
  return EndOfTurn(tuple(tokens), tuple(strings), tuple(other))


# ----------------------------------------------------------------------------
# Response loss
# ----------------------------------------------------------------------------


def loss_sequence(item: ChatItem, turn: int, tokenizer: Tokenizer,
                  fmt: chat.ChatFormat) -> tuple[np.ndarray, np.ndarray, int]:
  """(ids, weights, prompt length) of `item` up to its reference answer to
  `turn` (earlier answers: the references); weights 1 exactly on that
  answer's trained tokens (content and end-of-turn), as `chat.encode`
  weights them."""
  answers = list(item.references[:turn + 1])
  if any(a is None for a in answers):
    raise ValueError(f"{item.id}: turn {turn} lacks a reference answer for "
                     f"itself or an earlier turn")
  users = item.turns[:turn + 1]
  example = chat.encode(conversation(item.id, users, answers), tokenizer, fmt)
  prompt = chat.encode_prompt(conversation(item.id, users, answers[:-1]),
                              tokenizer, fmt)
  ids, weights = example["ids"], example["weights"].copy()
  n = len(prompt)
  if not np.array_equal(ids[:n], prompt):
    raise chat.ChatFormatError(
        f"conversation {item.id!r}: format {fmt.name!r} tokenises the prompt "
        f"differently alone and followed by the answer")
  weights[:n] = 0.0
  return ids, weights, n


def _fit(ids: np.ndarray, weights: np.ndarray, prompt_len: int,
         max_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """At most max_len tokens: the prompt cut from the left to no less than
  half the window (unless the rest fits), then the answer cut on the
  right."""
  if len(ids) <= max_len:
    return ids, weights, False
  rest = len(ids) - prompt_len
  keep_prompt = min(prompt_len, max(max_len // 2, max_len - rest))
  start = prompt_len - keep_prompt
  return (ids[start:start + max_len], weights[start:start + max_len], True)


def response_loss(scorer, tokenizer: Tokenizer, fmt: chat.ChatFormat,
                  items: Sequence[ChatItem]) -> dict[str, Any]:
  """Mean nats per reference-answer token, overall and per turn (turn1,
  turn2, ...), over the turns that have references. scorer: an
  `eval.scoring.Scorer` (anything with `sequence_logprobs` and `max_len`)."""
  seqs, weights, turns = [], [], []
  truncated = format_errors = 0
  for item in items:
    for turn, ref in enumerate(item.references):
      if ref is None or any(r is None for r in item.references[:turn]):
        continue
      try:
        ids, w, n = loss_sequence(item, turn, tokenizer, fmt)
      except chat.ChatFormatError:
        format_errors += 1
        continue
      ids, w, cut = _fit(ids, w, n, scorer.max_len)
      truncated += cut
      seqs.append(ids.tolist())
      weights.append(w)
      turns.append(turn)
  nll: dict[int, float] = {}
  count: dict[int, float] = {}
  if seqs:
    for (logp, _), w, turn in zip(scorer.sequence_logprobs(seqs), weights,
                                  turns):
      nll[turn] = nll.get(turn, 0.0) - float(np.dot(logp, w[1:]))
      count[turn] = count.get(turn, 0.0) + float(w[1:].sum())
  total = sum(count.values())
  out: dict[str, Any] = {
      "response_loss": sum(nll.values()) / total if total else None,
      "response_tokens": int(total), "loss_turns": len(seqs),
      "loss_truncated": truncated}
  if format_errors:
    out["loss_format_errors"] = format_errors
  if any(len(item.turns) > 1 for item in items):
    for turn in sorted(count):
      out[f"response_loss_turn{turn + 1}"] = nll[turn] / count[turn]
  return out


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completion:
  """One greedy completion: its tokens (the stop token included), why it
  stopped ('stop_token', 'stop_string' or 'length') and its text without
  the stop token or string."""
  tokens: tuple[int, ...]
  reason: str
  text: str


def generate_batched(sampler, tokenizer: Tokenizer,
                     prompts: Sequence[str | Sequence[int]],
                     max_new_tokens: int, batch_size: int = 16,
                     stop_tokens: Sequence[int] = (),
                     stop_strings: Sequence[str] = (),
                     images: Sequence[Sequence[np.ndarray]] | None = None
                     ) -> list[Completion]:
  """Greedy completions of many prompts (strings are encoded with BOS), in
  batches of `batch_size` sorted by length (longest first; the last batch
  is filled with copies so every batch has the same shape). images: per
  prompt, its images for a `MultimodalSampler`."""
  rows = [tokenizer.encode(p, add_bos=True) if isinstance(p, str)
          else [int(t) for t in p] for p in prompts]
  order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
  out: list[Completion | None] = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    ids = order[start:start + batch_size]
    if len(order) > batch_size:
      ids_padded = ids + [ids[-1]] * (batch_size - len(ids))
    else:
      ids_padded = ids
    batch = [rows[i] for i in ids_padded]
    with_images = {} if images is None else {
        "images": [images[i] for i in ids_padded]}
    gen = sampler.generate(batch, max_new_tokens=max_new_tokens,
                           stop_tokens=stop_tokens,
                           stop_strings=stop_strings, **with_images)
    for row, i in enumerate(ids):
      tokens, reason = gen.tokens[row], gen.stop_reasons[row]
      if reason == "stop_string":
        text = gen.texts[row]
      else:
        text = tokenizer.decode(tokens[:-1] if reason == "stop_token"
                                else tokens)
      out[i] = Completion(tuple(tokens), reason, text)
  return out


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str  # stripped, end-of-turn excluded
  num_tokens: int  # generated, end-of-turn included
  ended: bool  # on the format's own end of turn
  stopped: bool  # on any stop


def generate_replies(sampler, tokenizer: Tokenizer, fmt: chat.ChatFormat,
                     items: Sequence[ChatItem], max_new_tokens: int,
                     batch_size: int = 16) -> list[list[Reply]]:
  """Greedy replies to every turn of every item, turn by turn: turn k is
  asked after the model's own replies to the earlier turns."""
  eot = end_of_turn(fmt, tokenizer)
  replies: list[list[Reply]] = [[] for _ in items]
  for turn in range(max((len(item.turns) for item in items), default=0)):
    which = [i for i, item in enumerate(items) if len(item.turns) > turn]
    prompts = [chat.encode_prompt(conversation(
        items[i].id, items[i].turns[:turn + 1],
        [r.text for r in replies[i]]), tokenizer, fmt) for i in which]
    for i, reply in zip(which, reply_to_prompts(
        sampler, tokenizer, eot, prompts, max_new_tokens, batch_size)):
      replies[i].append(reply)
  return replies


def reply_to_prompts(sampler, tokenizer: Tokenizer, eot: EndOfTurn,
                     prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     batch_size: int = 16,
                     images: Sequence[Sequence[np.ndarray]] | None = None
                     ) -> list[Reply]:
  """Greedy replies to encoded chat prompts; a reply `ended` only on the
  format's own end of turn (`end_of_turn`), not on EOS alone. images: as
  `generate_batched`'s."""
  replies = []
  for c in generate_batched(sampler, tokenizer, prompts, max_new_tokens,
                            batch_size, eot.stop_tokens, eot.strings,
                            images):
    ended = (c.reason == "stop_string" or
             (c.reason == "stop_token" and c.tokens[-1] in eot.tokens))
    replies.append(Reply(c.text.strip(), len(c.tokens), ended,
                         c.reason in ("stop_token", "stop_string")))
  return replies


def reply_metrics(replies: Sequence[Reply]) -> dict[str, float]:
  return {
      "end_of_turn_rate": float(np.mean([r.ended for r in replies])),
      "stop_rate": float(np.mean([r.stopped for r in replies])),
      "mean_reply_tokens": float(np.mean([r.num_tokens for r in replies])),
      "mean_reply_chars": float(np.mean([len(r.text) for r in replies]))}


# ----------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------


def evaluate_items(items: Sequence[ChatItem], scorer, sampler,
                   tokenizer: Tokenizer, fmt: str | chat.ChatFormat,
                   max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 16) -> dict[str, Any]:
  """Response loss and reply metrics of one model on `items` (see the
  module docstring). sampler: a `generate.sampler.Sampler` with the
  tokenizer (stop strings need it)."""
  if not items:
    raise ValueError("no chat items to evaluate")
  fmt = chat.get_format(fmt, tokenizer)
  out: dict[str, Any] = {}
  out.update(response_loss(scorer, tokenizer, fmt, items))
  replies = generate_replies(sampler, tokenizer, fmt, items, max_new_tokens,
                             batch_size)
  out.update(reply_metrics([r for rs in replies for r in rs]))
  turns = max(len(item.turns) for item in items)
  if turns > 1:
    for turn in range(turns):
      out.update({f"{k}_turn{turn + 1}": v for k, v in reply_metrics(
          [rs[turn] for rs in replies if len(rs) > turn]).items()
                  if k in ("end_of_turn_rate", "mean_reply_tokens")})
    categories: dict[str, list[Reply]] = {}
    for item, rs in zip(items, replies):
      categories.setdefault(item.category, []).extend(rs)
    out["categories"] = {c: reply_metrics(rs) for c, rs in categories.items()}
  out.update(num_examples=len(items), format=fmt.name,
             max_new_tokens=max_new_tokens,
             example_reply=replies[0][0].text[:500])
  return out


def evaluate(task: str, scorer, sampler, tokenizer: Tokenizer,
             fmt: str | chat.ChatFormat | None = None,
             limit: int | None = None,
             max_new_tokens: int | None = None,
             batch_size: int = 16) -> dict[str, Any]:
  """One of TASKS ('alpaca_eval', 'mt_bench'); fmt None: `default_format`."""
  return evaluate_items(
      load_items(task, limit), scorer, sampler, tokenizer,
      default_format(tokenizer) if fmt is None else fmt,
      MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
      batch_size)
