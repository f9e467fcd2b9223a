"""Evaluating the multimodal model: answers to questions about images.

Prompts are the held-out examples' own conversations up to the answer, in
the chat format and VQA template the model was trained with, so evaluation
asks exactly what training taught; replies are greedy and end on the
format's end of turn. VQA accuracy is the normalised exact match of the
reply against the answer (VQA's answer normalisation: case, punctuation,
articles, number words), per question type, beside the majority-answer and
chance baselines (`image_sets.answer_baselines`). `zero_images=True` asks
the same questions with every image replaced by zeros: the ablation that
says whether the model reads the image or only the question.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

from mllm_jax.data import chat
from mllm_jax.eval.chat_eval import Reply, end_of_turn, reply_to_prompts

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
            "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
            "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Punctuation becomes a space, except an apostrophe or a period inside a
# word or number ("3.5", "it's"), which VQA's normalisation keeps.
_PUNCT = re.compile(r"(?!(?<=\w)[.'](?=\w))[" + re.escape(string.punctuation)
                    + "]")


def normalize_answer(text: str) -> str:
  """Lower case, first line only, punctuation to spaces (periods and
  apostrophes inside words kept), number words to digits, articles
  dropped, whitespace collapsed."""
  text = text.strip().split("\n", 1)[0].lower()
  words = _PUNCT.sub(" ", text).split()
  return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def prompt_of(record: Mapping[str, Any], tokenizer, fmt) -> list[int]:
  """A prepared example's conversation without its last (assistant) turn,
  encoded as the format prompts for the answer."""
  conv = record["conversation"]
  prompt = chat.Conversation(conv.id, conv.turns[:-1], conv.system,
                             conv.images)
  return chat.encode_prompt(prompt, tokenizer, fmt).tolist()


def reference_of(record: Mapping[str, Any]) -> str:
  """The example's own answer (its last turn)."""
  return record["conversation"].turns[-1].content


def answer_images(sampler, tokenizer, fmt, records: Sequence[Mapping],
                  max_new_tokens: int, batch_size: int = 16,
                  zero_images: bool = False) -> list[Reply]:
  """Greedy replies of a `MultimodalSampler` to prepared examples
  (`data.images.prepare` records with "conversation" and "images")."""
  fmt = chat.get_format(fmt, tokenizer)
  prompts = [prompt_of(r, tokenizer, fmt) for r in records]
  pixels = [np.zeros_like(r["images"]) if zero_images else r["images"]
            for r in records]
  return reply_to_prompts(sampler, tokenizer, end_of_turn(fmt, tokenizer),
                          prompts, max_new_tokens, batch_size, pixels)


def vqa_accuracy(replies: Sequence[str], answers: Sequence[str],
                 question_types: Sequence[str]) -> dict[str, dict[str, float]]:
  """Per question type (and "all"): count, accuracy (normalised exact
  match) and the share of replies that are non-empty ("answered")."""
  groups = collections.defaultdict(list)
  for reply, answer, kind in zip(replies, answers, question_types,
                                 strict=True):
    hit = normalize_answer(reply) == normalize_answer(answer)
    answered = bool(normalize_answer(reply))
    groups[kind].append((hit, answered))
    groups["all"].append((hit, answered))
  return {kind: {"count": float(len(rows)),
                 "accuracy": float(np.mean([h for h, _ in rows])),
                 "answered": float(np.mean([a for _, a in rows]))}
          for kind, rows in sorted(groups.items())}
