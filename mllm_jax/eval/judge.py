"""Judge-based relative score for answers about images (LLaVA-Bench style).

A judge model cannot see the image; it reads the image's context as text
(captions and boxes: `data.scenes.Scene.context()` for composited
scenes),
the question, a reference answer and our answer, and rates both from 1 to
10. The relative score is 100 x mean(ours) / mean(reference), per question
category and overall, with the counts behind it.

    from mllm_jax.data.instructions import OpenAITeacher
    from mllm_jax.eval import judge
    items = [judge.JudgeItem(id="q1", context=scene.context(),
                             question="How many cats are there?",
                             reference="There are two cats.",
                             answer=our_reply, category="counting"), ...]
    result = judge.judge_answers(items, OpenAITeacher(url, "gpt-4o",
                                 api_key_env="OPENAI_API_KEY"))
    result.overall.relative, result.categories["counting"].relative
    result.to_dict()   # JSON-ready: scores, counts, failures, every reply

The judge is any `data.instructions.Teacher` (`OpenAITeacher` for an
OpenAI-compatible endpoint, `NativeTeacher` for one of our checkpoints, or
a scripted one in tests): `complete(conversations, max_new_tokens,
temperature, seed)` gives one reply per conversation or None for a failed
request (the teacher counts why).

Order and position bias: the judge sees "Assistant 1" and "Assistant 2".
`order="reference_first"` always puts the reference first (LLaVA-Bench's
layout); "ours_first" the opposite; "random" flips a coin per item
(seeded by `seed` and the item id, so the same on every machine); "both"
(default) asks each item twice, once in each order, and each answer's
score is the mean of its two ratings, so a judge that prefers a position
helps and hurts both answers equally. With "both" the result also reports
`position_bias`: the mean over items of (score in position 1 - score in
position 2) averaged over the two orders, in points (positive: the judge
favours Assistant 1).

Parsing (`parse_scores`): the first non-empty line with a number (one or
two heading lines without numbers are skipped) must hold exactly two
numbers, Assistant 1's then Assistant 2's (separators of any kind, labels
such as "Assistant 1:", markdown emphasis, "/10" and "out of 10"
tolerated; "8-7" is 8 and 7, not 8 and -7); failing that, lines
labelled "Assistant 1 ... N" and "Assistant 2 ... M" anywhere in the
reply are taken. A score outside [1, 10] is `out_of_range`; anything else
unreadable is `malformed`; a failed request is `judge_error`; a judge
whose `complete` raised counts `judge_exception` for each request of the
batch (the first message is kept), and the run goes on. An item is scored
only when every rating it asked for parsed (with "both": both orders), so
failures never tilt the ratio towards one order; the failures are counted
per reason in `failures` and per item in `items_failed`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import Any, Sequence

from mllm_jax.data.instructions import Message, Teacher

ORDERS = ("both", "random", "reference_first", "ours_first")
SCORE_MIN, SCORE_MAX = 1.0, 10.0

SYSTEM_PROMPT = (
    "You are a careful and impartial judge of answers to questions about "
    "an image. You cannot see the image. Instead you are given a "
    "description of it: captions of what it shows and, for each object, a "
    "bounding box [x0, y0, x1, y1] in coordinates normalised to 0..1, "
    "where x grows to the right and y grows downward (so a small y0 means "
    "near the top). Treat the description as the truth about the image.")

USER_PROMPT = """\
[Image description]
{context}

[Question]
{question}

[Assistant 1]
{first}
[End of Assistant 1]

[Assistant 2]
{second}
[End of Assistant 2]

Rate how well each assistant answers the question about this image. \
Consider whether the answer is correct according to the description, \
whether it answers what was asked, and whether it is helpful, relevant \
and as detailed as the question needs. Claims about the image that the \
description contradicts are mistakes; a longer answer is not better for \
its length alone, and the order in which the answers are shown must not \
influence you.

Give each assistant an overall score from 1 to 10, where 10 is best. \
On the first line write only the two scores, Assistant 1's then \
Assistant 2's, separated by a space (for example: 7 4). From the second \
line on, explain your ratings briefly."""


@dataclasses.dataclass(frozen=True)
class JudgeItem:
  """One question about one image: its context as text (captions and
  boxes), the reference answer and our answer."""
  id: str
  context: str
  question: str
  reference: str
  answer: str
  category: str = "all"


def judge_messages(item: JudgeItem, reference_first: bool) -> list[Message]:
  """The conversation the judge gets for one item in one order."""
  first, second = ((item.reference, item.answer) if reference_first
                   else (item.answer, item.reference))
  user = USER_PROMPT.format(context=item.context.strip(),
                            question=item.question.strip(),
                            first=first.strip(), second=second.strip())
  return [{"role": "system", "content": SYSTEM_PROMPT},
          {"role": "user", "content": user}]


# ----------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------

_NUMBER = r"(?<![\w.])[-+]?\d+(?:\.\d+)?"
_OUT_OF = re.compile(r"\s*(?:/|out\s+of)\s*10(?:\.0+)?\b", re.I)
_LABELS = re.compile(r"(?:assistant|score)\s*[12]\s*[:=)\]]?", re.I)
_LABELLED = {i: re.compile(
    rf"assistant\s*{i}\b[^\n\d]{{0,40}}?({_NUMBER})(?!\s*(?:\.\d|\d))", re.I)
             for i in (1, 2)}


@dataclasses.dataclass(frozen=True)
class Parsed:
  scores: tuple[float, float] | None  # (Assistant 1, Assistant 2)
  failure: str | None  # None, "malformed" or "out_of_range"


def parse_scores(text: str) -> Parsed:
  """The two scores of a judge reply (module docstring); never raises."""
  if not isinstance(text, str):
    return Parsed(None, "malformed")
  scores = None
  # The first non-empty line that has a number (a heading such as
  # "Scores:" before it is skipped, at most two such lines).
  for line in [ln for ln in text.splitlines() if ln.strip()][:3]:
    line = _OUT_OF.sub(" ", line.replace("*", " ").replace("#", " "))
    numbers = re.findall(_NUMBER, _LABELS.sub(" ", line))
    if numbers:
      if len(numbers) == 2:
        scores = (float(numbers[0]), float(numbers[1]))
      break
  if scores is None:
    found = {}
    for i, pattern in _LABELLED.items():
      m = pattern.search(_OUT_OF.sub(" ", text.replace("*", " ")))
      if m:
        found[i] = float(m.group(1))
    if len(found) == 2:
      scores = (found[1], found[2])
  if scores is None:
    return Parsed(None, "malformed")
  if not all(SCORE_MIN <= s <= SCORE_MAX for s in scores):
    return Parsed(scores, "out_of_range")
  return Parsed(scores, None)


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CategoryScore:
  """items: asked; scored: with every rating parsed; the means are over the
  scored items; relative = 100 x mean_ours / mean_reference (None when no
  item was scored)."""
  items: int
  scored: int
  mean_reference: float | None
  mean_ours: float | None
  relative: float | None


@dataclasses.dataclass
class JudgeResult:
  overall: CategoryScore
  categories: dict[str, CategoryScore]
  failures: collections.Counter  # per rating: reason -> count
  items_failed: int
  ratings_asked: int
  order: str
  judge: str
  position_bias: float | None
  records: list[dict[str, Any]]  # per item: its ratings and replies
  first_exception: str | None = None
  judge_counts: dict[str, int] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return {"overall": dataclasses.asdict(self.overall),
            "categories": {k: dataclasses.asdict(v)
                           for k, v in self.categories.items()},
            "failures": dict(self.failures), "items_failed": self.items_failed,
            "ratings_asked": self.ratings_asked, "order": self.order,
            "judge": self.judge, "position_bias": self.position_bias,
            "first_exception": self.first_exception,
            "judge_counts": self.judge_counts, "records": self.records}

  def table(self) -> str:
    """A markdown table: category, items, scored, means, relative score."""
    rows = ["| category | items | scored | reference | ours | relative |",
            "|---|---|---|---|---|---|"]

    def fmt(x, spec):
      return "-" if x is None else format(x, spec)
    for name, s in [*sorted(self.categories.items()), ("all", self.overall)]:
      rows.append(f"| {name} | {s.items} | {s.scored} | "
                  f"{fmt(s.mean_reference, '.2f')} | {fmt(s.mean_ours, '.2f')}"
                  f" | {fmt(s.relative, '.1f')} |")
    return "\n".join(rows)


def _summarise(rows: Sequence[tuple[float, float] | None]) -> CategoryScore:
  scored = [r for r in rows if r is not None]
  if not scored:
    return CategoryScore(len(rows), 0, None, None, None)
  ref = sum(r[0] for r in scored) / len(scored)
  ours = sum(r[1] for r in scored) / len(scored)
  return CategoryScore(len(rows), len(scored), ref, ours, 100.0 * ours / ref)


def _coin(seed: int, item_id: str) -> bool:
  digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
  return digest[0] % 2 == 0


# ----------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------


def judge_answers(items: Sequence[JudgeItem], judge: Teacher,
                  order: str = "both", seed: int = 0,
                  max_new_tokens: int = 512, temperature: float = 0.2,
                  batch_size: int = 64) -> JudgeResult:
  """Rates our answers against the references with `judge` (module
  docstring). batch_size: conversations per `judge.complete` call (an
  OpenAITeacher sends its own `concurrency` of them at once)."""
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
  if batch_size < 1:
    raise ValueError("batch_size must be >= 1")
  seen = set()
  for item in items:
    if item.id in seen:
      raise ValueError(f"item id {item.id!r} appears twice")
    seen.add(item.id)

  # (item index, reference_first) for every rating asked.
  asks: list[tuple[int, bool]] = []
  for i, item in enumerate(items):
    if order == "both":
      asks += [(i, True), (i, False)]
    elif order == "random":
      asks.append((i, _coin(seed, item.id)))
    else:
      asks.append((i, order == "reference_first"))

  replies: list[Any] = [None] * len(asks)
  errors: list[str | None] = [None] * len(asks)
  first_exception = None
  for start in range(0, len(asks), batch_size):
    chunk = asks[start:start + batch_size]
    conversations = [judge_messages(items[i], ref_first)
                     for i, ref_first in chunk]
    try:
      out = judge.complete(conversations, max_new_tokens, temperature,
                           (seed + start) % (1 << 31))
      if len(out) != len(chunk):
        raise RuntimeError(f"the judge gave {len(out)} replies to "
                           f"{len(chunk)} conversations")
    except Exception as e:  # pylint: disable=broad-except
      first_exception = first_exception or f"{type(e).__name__}: {e}"
      for j in range(len(chunk)):
        errors[start + j] = "judge_exception"
      continue
    for j, reply in enumerate(out):
      replies[start + j] = reply

  failures: collections.Counter = collections.Counter()
  per_item: list[list[dict[str, Any]]] = [[] for _ in items]
  for (i, ref_first), reply, error in zip(asks, replies, errors):
    rating: dict[str, Any] = {"reference_first": ref_first, "reply": reply}
    if error is None and not isinstance(reply, str):
      error = "judge_error"
    if error is None:
      parsed = parse_scores(reply)
      error = parsed.failure
      if parsed.scores is not None:
        rating["scores"] = list(parsed.scores)
      if error is None:
        s1, s2 = parsed.scores
        rating["reference"], rating["ours"] = ((s1, s2) if ref_first
                                               else (s2, s1))
    if error is not None:
      rating["failure"] = error
      failures[error] += 1
    per_item[i].append(rating)

  rows: list[tuple[float, float] | None] = []
  biases = []
  records = []
  for item, ratings in zip(items, per_item):
    ok = all("failure" not in r for r in ratings)
    row = None
    if ok:
      row = (sum(r["reference"] for r in ratings) / len(ratings),
             sum(r["ours"] for r in ratings) / len(ratings))
      if order == "both":
        biases.append(sum(r["scores"][0] - r["scores"][1] for r in ratings)
                      / len(ratings))
    rows.append(row)
    records.append({"id": item.id, "category": item.category,
                    "reference": None if row is None else row[0],
                    "ours": None if row is None else row[1],
                    "ratings": ratings})

  by_cat: dict[str, list] = collections.defaultdict(list)
  for item, row in zip(items, rows):
    by_cat[item.category].append(row)
  return JudgeResult(
      overall=_summarise(rows),
      categories={k: _summarise(v) for k, v in by_cat.items()},
      failures=failures, items_failed=sum(r is None for r in rows),
      ratings_asked=len(asks), order=order, judge=judge.describe(),
      position_bias=(sum(biases) / len(biases)) if biases else None,
      records=records, first_exception=first_exception,
      judge_counts=dict(getattr(judge, "counts", {})))
