"""C-Eval-format multiple choice: a folder of CSV files per subject,
`{subject}_dev.csv` (5 demonstrations with answers) and `{subject}_val.csv`
(or `_test.csv`), columns id,question,A,B,C,D,answer[,explanation].

The prompt follows C-Eval's answer-only format: a Chinese header naming the
subject, k demonstrations, then the question, scored over " A".." D"-style
letter continuations (no leading space: Chinese text has none).
"""

from __future__ import annotations

import csv
import os

from mllm_jax.eval.tasks import MCTask

CHOICES = "ABCD"


def read_csv(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"C-Eval file {path} does not exist")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for n, row in enumerate(rows, 2):
    missing = [c for c in ("question", *CHOICES) if not row.get(c)]
    if missing:
      raise ValueError(f"{path}:{n}: missing column(s) {missing}")
  return rows


def ceval_query(doc: dict) -> str:
  options = "".join(f"\n{c}. {doc[c]}" for c in CHOICES)
  return f"{doc['question']}{options}\n答案："


def ceval_task(folder: str, subject: str, subject_name: str | None = None,
               split: str = "val") -> MCTask:
  """A C-Eval subject as an MCTask (5-shot demonstrations from dev)."""
  name = subject_name or subject
  header = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"
  return MCTask(
      name=f"ceval_{subject}",
      load=lambda: read_csv(os.path.join(folder, f"{subject}_{split}.csv")),
      load_demos=lambda: read_csv(os.path.join(folder, f"{subject}_dev.csv")),
      query=ceval_query, header=lambda doc: header,
      choices=lambda doc: list(CHOICES),
      gold=lambda doc: CHOICES.index(doc["answer"].strip()),
      separator="\n\n")
