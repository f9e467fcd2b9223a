"""Comparisons built from real offline data (none of them is a human
preference; every record's origin says so).

Sources (`SOURCES`, each `name -> builder(limit, seed) -> [Comparison]`):

  arc_easy, arc_challenge, piqa, siqa, openbookqa, boolq (through
  mllm_jax.eval.tasks), sciq, csqa
      the question; gold answer > one distractor drawn with the seed (K=2).
  gsm8k
      the problem; K=3, graded by what is wrong: the gold rationale >
      the same rationale with one intermediate result changed but the right
      final answer > the gold rationale with a wrong final number. Where no
      intermediate result can be changed, K=2 (gold > wrong final).
  bfcl_simple, bfcl_multiple
      the user's request with the functions' JSON-schema docs as the system
      message; the correct call (BFCL's possible answer, first accepted value
      of each argument) > a perturbed call: one argument's value changed, a
      required argument left out, or (multiple) another function called.
  alpaca_eval_samples (needs a model: `sampled_comparisons`)
      the instruction; K=3: the reference answer > the model's sample at
      T=0.7 > its sample at T=1.3 (a hotter sample of a small model is
      further from a good answer; a sample equal to a better response is
      left out).
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Sequence

import numpy as np

from mllm_jax import paths
from mllm_jax.data import chat
from mllm_jax.data.comparisons import (Comparison, ComparisonError,
                                       parse_comparison, synthetic_origin)

Builder = Callable[[int, int], list[Comparison]]


def _record(conv_id, prompt, responses, ranking, source, how):
  """A builder's record, validated like any file's (ComparisonError)."""
  return parse_comparison({"id": conv_id, "prompt": prompt,
                           "responses": responses, "ranking": ranking,
                           "source": source,
                           "origin": synthetic_origin(how)})


def _first(limit: int, items):
  return items if not limit else items[:limit]


# ----------------------------------------------------------------------------
# Multiple choice: gold vs distractor
# ----------------------------------------------------------------------------


def _mc_rows(name: str) -> list[tuple[str, list[str], int]]:
  """(question, choices, gold index) of a multiple-choice set."""
  # pylint: disable=import-outside-toplevel
  from mllm_jax.eval import tasks
  # pylint: enable=import-outside-toplevel
  if name == "sciq":
    return [(d["question"], [d["correct_answer"], d["distractor1"],
                             d["distractor2"], d["distractor3"]], 0)
            for d in tasks.hf_split("sciq", "none", "validation")]
  if name == "csqa":
    return [(d["question"], list(d["choices"]["text"]),
             d["choices"]["label"].index(d["answerKey"]))
            for d in tasks.hf_split("tau", "commonsense_qa", "none",
                                    "validation")]
  task = tasks.TASKS[name]
  rows = []
  for doc in task.load():
    question = {"boolq": lambda d: f"{d['passage']}\n\n{d['question']}?",
                "piqa": lambda d: d["goal"],
                "siqa": lambda d: f"{d['context']} {d['question']}",
                "openbookqa": lambda d: d["question_stem"]}.get(
                    name, lambda d: d["question"])(doc)
    rows.append((question, [c.strip() for c in task.choices(doc)],
                 task.gold(doc)))
  return rows


def _capitalised(text: str) -> str:
  text = text.strip()
  return text[:1].upper() + text[1:]


def mc_builder(name: str) -> Builder:
  def build(limit: int, seed: int) -> list[Comparison]:
    rng = random.Random(f"{seed}:{name}")
    out = []
    for i, (question, choices, gold) in enumerate(_first(limit,
                                                         _mc_rows(name))):
      texts = [_capitalised(c) for c in choices]
      wrong = [j for j, c in enumerate(texts) if j != gold and c and
               c != texts[gold]]
      if not texts[gold] or not wrong:
        continue
      j = rng.choice(wrong)
      order = [texts[gold], texts[j]]
      if rng.random() < 0.5:  # chosen not always first
        order.reverse()
      try:
        out.append(_record(f"{name}:{i}", question, order,
                           [order.index(texts[gold]),
                            order.index(texts[j])],
                           f"{name}:gold_vs_distractor",
                           f"{name}'s gold answer over a random distractor"))
      except ComparisonError:
        continue
    return out
  return build


# ----------------------------------------------------------------------------
# GSM8K: gold rationale vs perturbed ones
# ----------------------------------------------------------------------------

_RESULT = re.compile(r"= \$?(-?\d[\d,]*(?:\.\d+)?)")
_FINAL = re.compile(r"So the answer is (-?[\d,]*\.?\d+)\.?\s*$")


def _shift(number: str, rng: random.Random) -> str:
  value = float(number.replace(",", ""))
  delta = rng.choice([-3, -2, -1, 1, 2, 3, 5, 10])
  new = value + delta
  return str(int(new)) if new == int(new) and "." not in number else (
      f"{new:.2f}")


def gsm8k_responses(solution: str, rng: random.Random
                    ) -> tuple[list[str], str] | None:
  """(gold, [corrupted step,] wrong final) rationales of one solution, and
  the description of the grading; None when the solution has no final
  number."""
  final = _FINAL.search(solution)
  if final is None:
    return None
  wrong_final = (solution[:final.start(1)] + _shift(final.group(1), rng) +
                 solution[final.end(1):])
  steps = [m for m in _RESULT.finditer(solution[:final.start()])
           if m.group(1).replace(",", "") != final.group(1).replace(",", "")]
  if not steps:
    return [solution, wrong_final], "gold_vs_wrong_final"
  m = rng.choice(steps)
  corrupted = (solution[:m.start(1)] + _shift(m.group(1), rng) +
               solution[m.end(1):])
  return [solution, corrupted, wrong_final], "gold_gt_corrupted_step_gt_wrong_final"


def gsm8k(limit: int, seed: int) -> list[Comparison]:
  # pylint: disable=import-outside-toplevel
  from mllm_jax.eval import generative
  # pylint: enable=import-outside-toplevel
  rng = random.Random(f"{seed}:gsm8k")
  out = []
  requests = generative._olmo_requests(  # pylint: disable=protected-access
      "gsm8k", "gold_bpb_5shot")
  for r in _first(limit, requests):
    doc = r["doc"]
    made = gsm8k_responses(doc["choices"][0].strip(), rng)
    if made is None:
      continue
    responses, grading = made
    try:
      out.append(_record(f"gsm8k:{doc['id']}", doc["question"], responses,
                         list(range(len(responses))), f"gsm8k:{grading}",
                         "GSM8K's gold rationale over copies with a changed "
                         "intermediate result and with a wrong final number"))
    except ComparisonError:
      continue
  return out


# ----------------------------------------------------------------------------
# BFCL: correct vs perturbed function calls
# ----------------------------------------------------------------------------


def _jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def format_call(name: str, args: dict) -> str:
  """A Python-style call: name(a=1, b='x')."""
  return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"


def _perturb_value(value, rng: random.Random):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + rng.choice([-2, -1, 1, 2, 10]) * (1 if isinstance(
        value, int) else 0.5)
  if isinstance(value, str) and value:
    words = value.split()
    return " ".join(reversed(words)) if len(words) > 1 else value + "s"
  if isinstance(value, list) and value:
    return value[:-1] if len(value) > 1 else value + value
  return None


def bfcl_calls(question: dict, answer: dict, rng: random.Random
               ) -> tuple[str, str, str] | None:
  """(correct call, perturbed call, how it was perturbed), or None."""
  (name, accepted), = answer["ground_truth"][0].items()
  args = {k: v[0] for k, v in accepted.items() if v and v[0] != ""}
  correct = format_call(name, args)
  docs = {f["name"]: f for f in question["function"]}
  required = docs.get(name, {}).get("parameters", {}).get("required", [])
  options = []
  for key, value in args.items():
    new = _perturb_value(value, rng)
    if new is not None and new != value and all(new != v for v in
                                                accepted[key]):
      options.append(("wrong_value", {**args, key: new}, name))
    if key in required:
      options.append(("missing_required", {k: v for k, v in args.items()
                                           if k != key}, name))
  others = [n for n in docs if n != name]
  if others:
    options.append(("wrong_function", args, rng.choice(others)))
  if not options:
    return None
  how, bad_args, bad_name = rng.choice(options)
  return correct, format_call(bad_name, bad_args), how


def bfcl_builder(name: str) -> Builder:
  def build(limit: int, seed: int) -> list[Comparison]:
    rng = random.Random(f"{seed}:bfcl_{name}")
    questions = _jsonl(paths.bfcl_file(name))
    answers = {a["id"]: a for a in _jsonl(paths.bfcl_file(name, True))}
    out = []
    for q in _first(limit, questions):
      a = answers.get(q["id"])
      if a is None or len(a["ground_truth"]) != 1:
        continue
      made = bfcl_calls(q, a, rng)
      if made is None:
        continue
      correct, bad, how = made
      system = ("You can call these functions; answer with one call.\n" +
                json.dumps(q["function"], ensure_ascii=False))
      user = q["question"][0][-1]["content"]
      order = [correct, bad]
      if rng.random() < 0.5:
        order.reverse()
      try:
        out.append(_record(
            f"bfcl_{q['id']}",
            [{"role": "system", "content": system},
             {"role": "user", "content": user}],
            order, [order.index(correct), order.index(bad)],
            f"bfcl_{name}:correct_vs_{how}",
            "BFCL's possible answer over a perturbed call"))
      except ComparisonError:
        continue
    return out
  return build


# ----------------------------------------------------------------------------
# Reference answers vs a model's samples
# ----------------------------------------------------------------------------

SAMPLE_TEMPERATURES = (0.7, 1.3)


def sampled_comparisons(model, tokenizer, fmt: str | chat.ChatFormat,
                        limit: int, seed: int, max_new_tokens: int = 64,
                        batch_size: int = 16,
                        temperatures: Sequence[float] = SAMPLE_TEMPERATURES
                        ) -> list[Comparison]:
  """alpaca-eval's instructions: reference > sample at T=0.7 > sample at
  T=1.3, samples from `model` (an SFT checkpoint) through the compiled
  sampler, ended at the format's end of turn. A sample that is empty or
  equals a better response is left out (K shrinks; < 2 left: no record)."""
  # pylint: disable=import-outside-toplevel
  from mllm_jax.eval.chat_eval import end_of_turn
  from mllm_jax.generate.sampler import Sampler
  from mllm_jax.generate.sampling import SamplingParams
  # pylint: enable=import-outside-toplevel
  fmt = chat.get_format(fmt, tokenizer)
  with open(paths.alpaca_eval_json(), encoding="utf-8") as f:
    records = json.load(f)
  items = []
  for i, record in enumerate(records):
    try:
      items.append(chat.alpaca_conversation(record, f"alpaca_eval:{i}"))
    except chat.ConversationError:
      continue
    if limit and len(items) >= limit:
      break
  eot = end_of_turn(fmt, tokenizer)
  stops, stop_strings = eot.stop_tokens, list(eot.strings)
  sampler = Sampler(model, tokenizer=tokenizer,
                    pad_id=max(tokenizer.pad_id, 0), prompt_multiple=64)
  prompts = [chat.encode_prompt(chat.Conversation(c.id, c.turns[:1],
                                                  c.system),
                                tokenizer, fmt).tolist() for c in items]
  samples = {t: [] for t in temperatures}
  for t_index, temperature in enumerate(temperatures):
    for start in range(0, len(prompts), batch_size):
      gen = sampler.generate(
          prompts[start:start + batch_size], max_new_tokens,
          SamplingParams(temperature=temperature), stop_tokens=stops,
          stop_strings=stop_strings, seed=seed * 1000 + t_index * 100 + start)
      for row, tokens in enumerate(gen.tokens):
        text = gen.texts[row] if gen.stop_reasons[row] == "stop_string" else (
            tokenizer.decode(tokens[:-1] if gen.stop_reasons[row] ==
                             "stop_token" else tokens))
        for s in stop_strings:
          text = text.split(s)[0]
        samples[temperature].append(text.strip())
  out = []
  for i, conv in enumerate(items):
    responses = [conv.turns[1].content]
    for temperature in temperatures:
      text = samples[temperature][i]
      if text and text not in responses:
        responses.append(text)
    if len(responses) < 2:
      continue
    temps = "_gt_".join(f"T{t:g}" for t in temperatures)
    try:
      out.append(_record(
          conv.id, conv.turns[0].text, responses,
          list(range(len(responses))), f"alpaca_eval:reference_gt_{temps}",
          "alpaca-eval's reference answer over an SFT model's samples, the "
          "cooler sample ranked higher"))
    except ComparisonError:
      continue
  return out


SOURCES: dict[str, Builder] = {
    **{name: mc_builder(name) for name in (
        "arc_easy", "arc_challenge", "piqa", "siqa", "openbookqa", "boolq",
        "sciq", "csqa")},
    "gsm8k": gsm8k,
    "bfcl_simple": bfcl_builder("simple_python"),
    "bfcl_multiple": bfcl_builder("multiple"),
}
MODEL_SOURCES = ("alpaca_eval_samples",)  # need --checkpoint


def build(sources: Sequence[str], limit: int, seed: int
          ) -> tuple[list[Comparison], dict[str, int]]:
  """Comparisons of the data sources (not MODEL_SOURCES), in order, and
  the count per source."""
  unknown = [s for s in sources if s not in SOURCES]
  if unknown:
    raise ValueError(f"unknown comparison source(s) {unknown}; known: "
                     f"{sorted(SOURCES) + list(MODEL_SOURCES)}")
  out, counts = [], {}
  for name in sources:
    made = SOURCES[name](limit, seed)
    counts[name] = len(made)
    out += made
  return out, counts


def per_source(comparisons: Sequence[Comparison]) -> dict[str, int]:
  """Comparisons per source family (the part of `source` before ':')."""
  names = [c.source.split(":")[0] for c in comparisons]
  values, counts = np.unique(names, return_counts=True) if names else ([], [])
  return {str(v): int(c) for v, c in zip(values, counts)}


__all__ = ["MODEL_SOURCES", "SAMPLE_TEMPERATURES", "SOURCES", "bfcl_calls",
           "build", "format_call", "gsm8k_responses", "mc_builder",
           "per_source", "sampled_comparisons"]
