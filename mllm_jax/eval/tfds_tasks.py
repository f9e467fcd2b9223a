"""The same multiple-choice tasks read from TFDS, for machines that have the
prepared TFDS data (e.g. a TPU VM with a GCS data_dir).

Records are mapped onto the document dicts `tasks.TASKS` formats, so the
prompts are identical whichever source is used (HellaSwag: TFDS keeps the
context whole, so its second half is not re-capitalised as in the bundled
split). Builders in the TFDS catalogue are covered: BoolQ (`bool_q`), PIQA,
HellaSwag, WinoGrande, ARC-Easy/Challenge and OpenBookQA; SIQA and MMLU have
no TFDS builder in tensorflow-datasets 4.9, so those use the bundled data. No
TensorFlow needed: `tfds.data_source` reads array_record files.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

import numpy as np

LETTERS = "ABCDE"


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _boolq(r):
  return {"passage": _text(r["passage"]), "question": _text(r["question"]),
          "answer": bool(r["answer"])}


def _piqa(r):
  return {"goal": _text(r["goal"]), "sol1": _text(r["sol1"]),
          "sol2": _text(r["sol2"]), "label": int(r["label"])}


def _hellaswag(r):
  return {"activity_label": _text(r["activity_label"]),
          "ctx_a": _text(r["context"]), "ctx_b": "",
          "endings": [_text(e) for e in r["endings"]],
          "label": int(r["label"])}


def _winogrande(r):
  return {"sentence": _text(r["sentence"]), "option1": _text(r["option1"]),
          "option2": _text(r["option2"]), "answer": str(int(r["label"]) + 1)}


def _arc(r):
  labels = [LETTERS[int(i)] for i in np.asarray(r["choices"]["label"])]
  return {"question": _text(r["question"]),
          "choices": {"text": [_text(t) for t in r["choices"]["text"]],
                      "label": labels},
          "answerKey": LETTERS[int(r["answerKey"])]}


def _obqa(r):
  q = r["question"]
  return {"question_stem": _text(q["stem"]),
          "choices": {"text": [_text(q[f"choice_{c}"]) for c in "ABCD"],
                      "label": list("ABCD")},
          "answerKey": LETTERS[int(r["answerKey"])]}


# task -> (TFDS name, split, record -> doc)
TFDS_TASKS: dict[str, tuple[str, str, Callable[[dict], dict]]] = {
    "boolq": ("bool_q", "validation", _boolq),
    "piqa": ("piqa", "validation", _piqa),
    "hellaswag": ("hellaswag", "validation", _hellaswag),
    "winogrande": ("winogrande", "validation", _winogrande),
    "arc_easy": ("ai2_arc/ARC-Easy", "validation", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "validation", _arc),
    "openbookqa": ("openbookqa", "validation", _obqa),
}


def load_tfds_docs(task: str, data_dir: str | None = None,
                   limit: int | None = None) -> list[dict]:
  """Docs of `task` from TFDS, in the format tasks.TASKS[task] formats."""
  if task not in TFDS_TASKS:
    raise ValueError(f"no TFDS loader for {task!r}; available: "
                     f"{sorted(TFDS_TASKS)} (others use the bundled data)")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name, split, convert = TFDS_TASKS[task]
  # Without TensorFlow the legacy `text/` builders register only when their
  # module is imported.
  module = f"tensorflow_datasets.text.{name.split('/')[0]}"
  if importlib.util.find_spec(module) is not None:
    importlib.import_module(module)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  n = len(source) if limit is None else min(limit, len(source))
  return [convert(source[i]) for i in range(n)]
