"""Instruction templates for FLAN-style tuning: promptsource's and our own.

A template is Jinja text whose rendering is split at ``|||`` into the input
and the target (promptsource's convention), plus optional ``answer_choices``
(Jinja too, rendered and split at ``|||``) that name the options of a
classification or multiple-choice task. Three sources:

  * ``promptsource``: the human-written templates of promptsource 0.2.3
    (scripts/fetch_data.py --only promptsource), read from its
    ``templates/<dataset>/<subset>/templates.yaml`` files with a YAML loader
    that knows its ``!Template`` / ``!TemplateMetadata`` tags. Never imported.
  * ``flan``: our own templates in the style of FLAN 2021, several per task
    kind, written against a canonical view of each row (``flan.py``). An
    ``{{options_}}`` placeholder marks where the OPTIONS block goes.
  * ``cot``: our own chain-of-thought templates (target: a rationale ending
    in "So the answer is N.").

Forms (FLAN 2022's names): ``zs``/``fs`` zero- or few-shot, ``opt``/``noopt``
with or without the answer options in the input. A template whose choices
are already written into its prompt (promptsource's ``choices_in_prompt``)
has only the ``opt`` forms; one without answer choices (generative QA,
chain of thought) has only ``noopt``; any other gets the OPTIONS block
(``OPTIONS:\\n- a\\n- b``) at its placeholder or after its input for ``opt``.

Templates are data, so they are rendered in Jinja's *immutable sandbox*: a
template can read the row it is given and call harmless methods, but cannot
reach Python internals (attributes starting with ``_``, ``__class__``...),
mutate its arguments or call anything we did not hand it. Undefined names
are errors (``StrictUndefined``), which is how a template whose fields the
row does not have is detected and skipped. promptsource's ``choice`` filter
(random pick) draws from a per-render ``random.Random(key)``, so a rendering
is a pure function of (template, row, key).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Any, Mapping, Sequence

from mllm_jax.paths import data_path

FORMS = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
SOURCES = ("flan", "promptsource", "cot")
PIPE = "|||"
OPTIONS_PLACEHOLDER = "options_"
PROMPTSOURCE_VERSION = "0.2.3"
# Stands in for "|||" inside row text while a template renders (promptsource
# does the same), so data can never split a rendering.
_PIPE_ESCAPE = "\ue000\ue001\ue000"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """One template. `jinja` renders to "input ||| target"."""
  name: str
  jinja: str
  answer_choices: str | None = None  # Jinja rendering to "a ||| b ||| ..."
  choices_in_prompt: bool = False
  original_task: bool = True
  source: str = "flan"
  id: str = ""

  def forms(self) -> tuple[str, ...]:
    """The forms this template can produce (see module docstring)."""
    if self.answer_choices is None:
      return ("zs_noopt", "fs_noopt")
    if self.choices_in_prompt:
      return ("zs_opt", "fs_opt")
    return FORMS


@dataclasses.dataclass(frozen=True)
class Rendered:
  input: str
  target: str
  options: tuple[str, ...] | None  # the answer choices, in template order

  def demo(self, target_separator: str) -> str:
    """The whole example, as a few-shot exemplar."""
    return self.input + target_separator + self.target


def options_block(options: Sequence[str]) -> str:
  return "OPTIONS:\n" + "\n".join(f"- {o}" for o in options)


def few_shot_input(exemplars: Sequence[str], query: str,
                   separator: str = "\n\n") -> str:
  return "".join(e + separator for e in exemplars) + query


# ----------------------------------------------------------------------------
# Rendering (sandboxed Jinja)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _environment():
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

  @jinja2.pass_context
  def choice(context, items):
    return context["_rng"].choice(list(items))

  def most_frequent(items):
    items = list(items)
    return max(items, key=items.count) if items else None

  env = sandbox.ImmutableSandboxedEnvironment(
      undefined=jinja2.StrictUndefined, autoescape=False)
  env.filters["choice"] = choice
  env.filters["most_frequent"] = most_frequent
  env.globals["zip"] = zip
  return env


@functools.lru_cache(maxsize=4096)
def _compiled(text: str):
  return _environment().from_string(text)


def _escape(value: Any) -> Any:
  if isinstance(value, str):
    return value.replace(PIPE, _PIPE_ESCAPE)
  if isinstance(value, Mapping):
    return {k: _escape(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_escape(v) for v in value]
  return value


def _unescape(text: str) -> str:
  return text.replace(_PIPE_ESCAPE, PIPE)


def render(template: PromptTemplate, row: Mapping[str, Any], key: str,
           with_options: bool) -> Rendered | None:
  """Renders `template` on `row` (random draws seeded by `key`); None when the
  template does not apply to this row (an empty input or target). Raises
  jinja2 errors (e.g. UndefinedError) when the row lacks a field."""
  rng = random.Random(key)
  row = _escape(dict(row))
  choices = None
  if template.answer_choices is not None:
    text = _compiled(template.answer_choices).render(**row, _rng=rng)
    choices = [c.strip() for c in text.split(PIPE)]
    if not all(choices):
      return None
  block = ""
  if with_options and choices and not template.choices_in_prompt:
    block = options_block(choices)
  inline = OPTIONS_PLACEHOLDER in template.jinja
  text = _compiled(template.jinja).render(
      **row, answer_choices=choices, _rng=rng,
      **({OPTIONS_PLACEHOLDER: "\n\n" + block if block else ""}
         if inline else {}))
  parts = text.split(PIPE)
  if len(parts) != 2:
    return None
  source, target = (_unescape(p.strip()) for p in parts)
  if not source or not target:
    return None
  if block and not inline:
    source = source + "\n\n" + _unescape(block)
  options = None if choices is None else tuple(_unescape(c) for c in choices)
  return Rendered(source, target, options)


# ----------------------------------------------------------------------------
# promptsource
# ----------------------------------------------------------------------------


def promptsource_root() -> str:
  return data_path("promptsource", f"promptsource-{PROMPTSOURCE_VERSION}",
                   "promptsource", "templates")


def _yaml_loader():
  import yaml  # pylint: disable=import-outside-toplevel

  class Loader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
    """SafeLoader plus promptsource's two tags, read as plain mappings."""

  def mapping(loader, node):
    return loader.construct_mapping(node, deep=True)

  Loader.add_constructor("!Template", mapping)
  Loader.add_constructor("!TemplateMetadata", mapping)
  return Loader


@functools.lru_cache(maxsize=None)
def load_promptsource(dataset: str, subset: str | None = None
                      ) -> tuple[PromptTemplate, ...]:
  """Every template of one promptsource dataset (file order)."""
  import yaml  # pylint: disable=import-outside-toplevel
  parts = [dataset] + ([subset] if subset else [])
  path = os.path.join(promptsource_root(), *parts, "templates.yaml")
  with open(path, encoding="utf-8") as f:
    data = yaml.load(f, Loader=_yaml_loader())  # noqa: S506 (safe subclass)
  out = []
  for tid, t in data["templates"].items():
    meta = t.get("metadata") or {}
    out.append(PromptTemplate(
        name=str(t["name"]), jinja=str(t["jinja"]),
        answer_choices=t.get("answer_choices") or None,
        choices_in_prompt=bool(meta.get("choices_in_prompt")),
        original_task=bool(meta.get("original_task")),
        source="promptsource", id=str(t.get("id", tid))))
  return tuple(out)


# ----------------------------------------------------------------------------
# Our own templates, per task kind (rows: the canonical views of flan.py)
# ----------------------------------------------------------------------------
#
# Canonical view fields by kind:
#   yes_no_passage  passage, question, options, label
#   nli             premise, hypothesis, options, label
#   paraphrase      sentence1, sentence2, options, label
#   sentiment       sentence, options, label
#   mc_question     question, context ("" if none), subject ("" if none),
#                   options, label
#   goal            goal, options, label
#   social          context, question, options, label
#   completion      context, activity, options, label
#   coreference     sentence, options, label
#   copa            premise, question ("cause" / "effect"), options, label
#   qa              question, answer
#   math            question, answer, rationale

_OPT = '{{ options | join("|||") }}'
_GOLD = "|||{{ answer_choices[label] }}"


def _own(kind: str, *texts: str, answer_choices: str | None = _OPT,
         target: str = _GOLD, source: str = "flan"
         ) -> tuple[PromptTemplate, ...]:
  return tuple(PromptTemplate(name=f"{kind}_{i}", jinja=t + target,
                              answer_choices=answer_choices, source=source)
               for i, t in enumerate(texts))


OWN_TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "yes_no_passage": _own(
        "yes_no_passage",
        "{{passage}}\n\nCan we conclude that {{question}}?{{options_}}",
        "{{passage}}\n\nIs it true that {{question}}?{{options_}}",
        "Read the text and answer the question.\n\n{{passage}}\n\n"
        "Question: {{question}}?{{options_}}",
        "Passage: {{passage}}\n\nAfter reading this passage, answer the "
        "question: {{question}}?{{options_}}",
        "{{passage}}\n\nBased on the text above, {{question}}?{{options_}}"),
    "nli": _own(
        "nli",
        '{{premise}}\n\nBased on the paragraph above, can we conclude that '
        '"{{hypothesis}}"?{{options_}}',
        "Premise: {{premise}}\nHypothesis: {{hypothesis}}\n\nDoes the premise "
        "entail the hypothesis?{{options_}}",
        "Read the text and decide whether the sentence after it follows from "
        "it.\n\n{{premise}}\n\nSentence: {{hypothesis}}{{options_}}",
        "{{premise}}\n\nIf the text above is true, is this true as well? "
        "{{hypothesis}}{{options_}}",
        'Here is a premise: "{{premise}}"\n\nHere is a hypothesis: '
        '"{{hypothesis}}"\n\nIf the premise is true, does that make the '
        "hypothesis true?{{options_}}"),
    "paraphrase": _own(
        "paraphrase",
        "Do these two sentences mean the same thing?\n{{sentence1}}\n"
        "{{sentence2}}{{options_}}",
        "Sentence 1: {{sentence1}}\nSentence 2: {{sentence2}}\n\nAre the two "
        "sentences paraphrases of each other?{{options_}}",
        '"{{sentence1}}"\n"{{sentence2}}"\n\nDo the sentences above say the '
        "same thing?{{options_}}",
        'Is "{{sentence2}}" a paraphrase of "{{sentence1}}"?{{options_}}'),
    "sentiment": _own(
        "sentiment",
        "Review: {{sentence}}\n\nWhat is the sentiment of this review?"
        "{{options_}}",
        "{{sentence}}\n\nHow would you describe the sentiment of this "
        "sentence?{{options_}}",
        "What is the sentiment of the following movie review sentence?\n\n"
        "{{sentence}}{{options_}}",
    ) + _own(
        "sentiment_liked",
        '"{{sentence}}"\n\nDid the reviewer like the movie?{{options_}}',
        answer_choices="no ||| yes"),
    "mc_question": _own(
        "mc_question",
        "{% if context %}{{context}}\n\n{% endif %}{{question}}{{options_}}",
        "{% if subject %}The following is a question about {{subject}}.\n\n"
        "{% endif %}Answer the following question.\n\n{{question}}"
        "{{options_}}",
        "Q: {{question}}{{options_}}\nA:",
        "{% if context %}Read this and answer the question.\n\n{{context}}\n\n"
        "{% endif %}{{question}}\n\nWhat is the answer?{{options_}}",
        "Choose the answer to this question: {{question}}{{options_}}"),
    "goal": _own(
        "goal",
        "Here is a goal: {{goal}}\n\nHow would you accomplish it?{{options_}}",
        "Goal: {{goal}}\n\nWhich way of doing it is correct?{{options_}}",
        "How would someone do the following? {{goal}}{{options_}}",
        "Solve this practical problem: {{goal}}{{options_}}"),
    "social": _own(
        "social",
        "{{context}}\n\nQuestion: {{question}}{{options_}}",
        "Context: {{context}}\n\n{{question}}{{options_}}\nAnswer:",
        "{{context}}\n\nGiven that context, answer the question: "
        "{{question}}{{options_}}"),
    "completion": _own(
        "completion",
        "{{context}}...\n\nHow does the description most likely continue?"
        "{{options_}}",
        "Complete the next sentence.\n\n{{context}}{{options_}}",
        "{{activity}}: {{context}}\n\nWhat happens next?{{options_}}",
        "Write the most plausible ending.\n\n{{context}}{{options_}}"),
    "coreference": _own(
        "coreference",
        "{{sentence}}\n\nWho or what does the _ in the sentence above refer "
        "to?{{options_}}",
        "Fill in the blank (_) in this sentence.\n\n{{sentence}}{{options_}}",
        'In the sentence "{{sentence}}", what should replace the _?'
        "{{options_}}"),
    "copa": _own(
        "copa",
        "{{premise}} What was the {{question}}?{{options_}}",
        "Premise: {{premise}}\n\nWhat is the {{question}} of this?"
        "{{options_}}",
        "{% if question == 'cause' %}{{premise}} This happened because..."
        "{% else %}{{premise}} As a result...{% endif %}{{options_}}",
        "Pick the more plausible {{question}} of the following: {{premise}}"
        "{{options_}}"),
    "qa": _own(
        "qa",
        "{{question}}",
        "Answer the following question: {{question}}",
        "Q: {{question}}\nA:",
        "Please answer this question: {{question}}",
        "Write the answer: {{question}}",
        answer_choices=None, target="|||{{ answer }}"),
    "math": _own(
        "math",
        "{{question}}",
        "Solve this math word problem. Give only the final number.\n\n"
        "{{question}}",
        "Question: {{question}}\nAnswer:",
        answer_choices=None, target="|||{{ answer }}"),
}

COT_TEMPLATES: dict[str, tuple[PromptTemplate, ...]] = {
    "math": _own(
        "math_cot",
        "{{question}} Let's think step by step.",
        "Answer the following question, reasoning step by step.\n\n"
        "{{question}}",
        "Question: {{question}}\nLet's think first. Step-by-step reasoning:",
        "{{question}}\n\nGive your reasoning, then the final answer.",
        "Solve the problem and explain your solution.\n\n{{question}}",
        answer_choices=None, target="|||{{ rationale }}", source="cot"),
}
