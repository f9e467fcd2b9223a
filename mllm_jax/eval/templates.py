"""Prompt templates with an input slot [X] and an answer slot [Z], and
k-shot demonstrations drawn deterministically.

Two styles:
  * prefix: [Z] ends the template ("Review: [X]\nSentiment: [Z]"); the
    context is everything before [Z] and the continuation is the answer.
  * cloze: [Z] sits inside the text ("[X], it is [Z]."); the continuation is
    the answer *and* the rest of the template after it, so each candidate is
    scored as the whole sentence it completes.
Demonstrations are whole filled templates (gold answers) joined by the
separator before the query.

`MCExample` (one context and one continuation per choice) is what both the
template tasks here and the benchmarks in `tasks` produce; `tasks` imports
this module, never the other way round.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

X, Z = "[X]", "[Z]"


@dataclasses.dataclass(frozen=True)
class MCExample:
  """One multiple-choice item, scored by the log-likelihood of each
  continuation after its context."""
  contexts: list[str]  # one per choice (equal unless partial scoring)
  continuations: list[str]
  gold: int


@dataclasses.dataclass(frozen=True)
class Template:
  text: str

  def __post_init__(self):
    if self.text.count(X) != 1 or self.text.count(Z) != 1:
      raise ValueError(f"template {self.text!r} needs exactly one {X} and "
                       f"one {Z}")
    if self.text.index(X) > self.text.index(Z):
      raise ValueError(f"template {self.text!r}: {X} must come before {Z}")

  @property
  def style(self) -> str:
    return "prefix" if self.text.endswith(Z) else "cloze"

  def split(self, x: str, z: str) -> tuple[str, str]:
    """(context, continuation) with the input and one answer filled in.

    The space before [Z] belongs to the continuation, as tokenizers attach
    leading spaces to words.
    """
    before, after = self.text.split(Z)
    context = before.replace(X, x)
    space = ""
    if context.endswith(" "):
      context, space = context[:-1], " "
    return context, space + z + after

  def fill(self, x: str, z: str) -> str:
    return "".join(self.split(x, z))


def draw_demonstrations(pool_size: int, k: int, seed: int, index: int,
                        exclude_self: bool) -> list[int]:
  """k distinct pool indices for query `index`, the same on every run and
  machine (a per-query `random.Random`), never the query itself when the
  demonstrations come from the evaluated split."""
  if k <= 0:
    return []
  candidates = [i for i in range(pool_size)
                if not (exclude_self and i == index)]
  if k > len(candidates):
    raise ValueError(f"{k}-shot needs {k} demonstrations but the pool has "
                     f"{len(candidates)}")
  return random.Random(f"{seed}:{index}").sample(candidates, k)


def few_shot(demos: Sequence[str], query: str, separator: str = "\n\n",
             header: str = "") -> str:
  """header + demonstrations + query, each separated."""
  return header + "".join(d + separator for d in demos) + query


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """A template task: inputs and gold labels, scored over verbalised labels.

  The seeds' sentiment example is `ClassificationTask(Template("[X], it is
  [Z]."), ("terrible", "great"), ...)`.
  """
  template: Template
  verbalizers: tuple[str, ...]
  inputs: Sequence[str]
  labels: Sequence[int]
  demo_inputs: Sequence[str] | None = None  # default: the inputs themselves
  demo_labels: Sequence[int] | None = None

  def examples(self, k: int = 0, seed: int = 0) -> list[MCExample]:
    own = self.demo_inputs is None
    demo_x = self.inputs if own else self.demo_inputs
    demo_y = self.labels if own else self.demo_labels
    out = []
    for i, (x, y) in enumerate(zip(self.inputs, self.labels)):
      picks = draw_demonstrations(len(demo_x), k, seed, i, own)
      demos = [self.template.fill(demo_x[j], self.verbalizers[demo_y[j]])
               for j in picks]
      pairs = [self.template.split(x, v) for v in self.verbalizers]
      out.append(MCExample(
          contexts=[few_shot(demos, c) for c, _ in pairs],
          continuations=[c for _, c in pairs], gold=int(y)))
    return out
