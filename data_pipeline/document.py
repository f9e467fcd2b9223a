"""The document model and the stage protocol every pipeline step follows.

A per-document stage is a pure function ``Document -> Document | Drop``. Runners
only schedule stages; this module owns the bookkeeping, so that for every stage
``docs_in == docs_out + sum(dropped)`` holds by construction (a stage that
raises is counted as a drop with reason ``error:<ExceptionName>``, never a
crash and never a silent loss). A stage that keeps a document but had to
degrade its work (e.g. plain-text extraction of a page nested too deep) marks
it with ``fallback(doc, reason)``; the stage counts it under ``fallbacks``.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Union


@dataclasses.dataclass
class Document:
  """One web page on its way through the pipeline.

  ``html`` holds the raw (decoded) page until extraction fills ``text``;
  ``metadata`` carries everything else (WARC date, language, scores, source).
  """
  id: str
  url: str
  text: str = ""
  html: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def nbytes(self) -> int:
    """Size used by the funnel: the text once extracted, else the HTML."""
    body = self.text if self.text or self.html is None else self.html
    return len(body.encode("utf-8", "surrogatepass"))

  def to_json(self) -> dict[str, Any]:
    return {"id": self.id, "url": self.url, "text": self.text,
            "metadata": self.metadata}

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> "Document":
    return cls(id=row["id"], url=row["url"], text=row.get("text", ""),
               html=row.get("html"), metadata=dict(row.get("metadata") or {}))


@dataclasses.dataclass(frozen=True)
class Drop:
  """Why a stage removed a document; ``reason`` is a short stable key."""
  reason: str


StageFn = Callable[[Document], Union[Document, Drop]]
_FALLBACK = "_fallback"  # Transient metadata key, popped by apply_stage.
TIME_BUDGET = "time_budget"


def fallback(doc: Document, reason: str) -> Document:
  """Marks ``doc`` as kept by a degraded path; the stage counts ``reason``
  and ``metadata['fallback']`` keeps it in the output."""
  doc.metadata[_FALLBACK] = reason
  doc.metadata.setdefault("fallback", reason)
  return doc


@dataclasses.dataclass
class Stage:
  """A named per-document function (the name keys the funnel report).

  ``budget_s``: CPU seconds a document may have spent in the chain when it
  leaves this stage; past that it is dropped here as ``time_budget``. The
  check runs between stages, so it bounds the rest of the chain, not a stage
  already running (extraction bounds its own input: ``extract.Extractor``).
  """
  name: str
  fn: StageFn
  budget_s: float | None = None

  def __call__(self, doc: Document) -> Document | Drop:
    return self.fn(doc)


@dataclasses.dataclass
class StageStats:
  """Counts for one stage; ``merge`` makes shard-level stats add up."""
  name: str
  docs_in: int = 0
  docs_out: int = 0
  bytes_in: int = 0
  bytes_out: int = 0
  dropped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  dropped_bytes: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  fallbacks: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)

  def record_in(self, nbytes: int) -> None:
    self.docs_in += 1
    self.bytes_in += nbytes

  def record_out(self, nbytes: int) -> None:
    self.docs_out += 1
    self.bytes_out += nbytes

  def record_drop(self, reason: str, nbytes: int) -> None:
    self.dropped[reason] += 1
    self.dropped_bytes[reason] += nbytes

  def check(self) -> None:
    """Raises when the books do not balance (a runner bug, never data)."""
    total = self.docs_out + sum(self.dropped.values())
    if self.docs_in != total:
      raise AssertionError(
          f"stage {self.name}: in={self.docs_in} != out+dropped={total}")

  def merge(self, other: "StageStats") -> None:
    self.docs_in += other.docs_in
    self.docs_out += other.docs_out
    self.bytes_in += other.bytes_in
    self.bytes_out += other.bytes_out
    self.dropped.update(other.dropped)
    self.dropped_bytes.update(other.dropped_bytes)
    self.fallbacks.update(other.fallbacks)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "docs_in": self.docs_in,
            "docs_out": self.docs_out, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_bytes": dict(sorted(self.dropped_bytes.items())),
            "fallbacks": dict(sorted(self.fallbacks.items()))}

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> "StageStats":
    return cls(name=row["name"], docs_in=row["docs_in"],
               docs_out=row["docs_out"], bytes_in=row["bytes_in"],
               bytes_out=row["bytes_out"],
               dropped=collections.Counter(row["dropped"]),
               dropped_bytes=collections.Counter(row["dropped_bytes"]),
               fallbacks=collections.Counter(row.get("fallbacks", {})))


class Funnel:
  """Ordered per-stage stats, a small sample of dropped docs per reason, and
  the input spans readers skipped (file, byte offset, length, reason; the
  first ``MAX_LOST_SPANS``, the counts are in the stages)."""

  MAX_LOST_SPANS = 1000

  def __init__(self, names: Iterable[str] = (), samples_per_reason: int = 3):
    self.stages: dict[str, StageStats] = {}
    self.samples: dict[str, list[dict[str, Any]]] = {}
    self.lost_spans: list[dict[str, Any]] = []
    self.samples_per_reason = samples_per_reason
    for name in names:
      self.stage(name)

  def stage(self, name: str) -> StageStats:
    if name not in self.stages:
      self.stages[name] = StageStats(name)
    return self.stages[name]

  def sample_drop(self, stage: str, reason: str, doc: Document | None,
                  extra: str = "") -> None:
    key = f"{stage}/{reason}"
    bucket = self.samples.setdefault(key, [])
    if len(bucket) < self.samples_per_reason:
      if doc is None:
        bucket.append({"detail": extra[:500]})
      else:
        body = doc.text or (doc.html or "")
        bucket.append({"id": doc.id, "url": doc.url, "text": body[:500]})

  def lost_span(self, source: str, offset: int, length: int,
                reason: str) -> None:
    if len(self.lost_spans) < self.MAX_LOST_SPANS:
      self.lost_spans.append({"file": source, "offset": offset,
                              "length": length, "reason": reason})

  def merge(self, other: "Funnel") -> None:
    for name, stats in other.stages.items():
      self.stage(name).merge(stats)
    room = self.MAX_LOST_SPANS - len(self.lost_spans)
    self.lost_spans.extend(other.lost_spans[:max(0, room)])
    for key, rows in other.samples.items():
      bucket = self.samples.setdefault(key, [])
      bucket.extend(rows[:max(0, self.samples_per_reason - len(bucket))])

  def check(self) -> None:
    for stats in self.stages.values():
      stats.check()

  def to_json(self) -> dict[str, Any]:
    return {"stages": [s.to_json() for s in self.stages.values()],
            "dropped_samples": dict(sorted(self.samples.items())),
            "lost_spans": list(self.lost_spans)}

  @classmethod
  def from_json(cls, row: dict[str, Any]) -> "Funnel":
    funnel = cls()
    for stage in row["stages"]:
      funnel.stages[stage["name"]] = StageStats.from_json(stage)
    funnel.samples = {k: list(v) for k, v in row["dropped_samples"].items()}
    funnel.lost_spans = list(row.get("lost_spans", []))
    return funnel


def apply_stage(stage: Stage, doc: Document, funnel: Funnel,
                started: float | None = None) -> Document | None:
  """Runs one stage on one doc, counting it; returns None when dropped.
  ``started``: the doc's ``time.thread_time()`` on entering the chain, for
  ``stage.budget_s``."""
  stats = funnel.stage(stage.name)
  stats.record_in(doc.nbytes())
  try:
    result = stage(doc)
  except Exception as e:  # A stage bug must not lose the shard; count it.
    result = Drop(f"error:{type(e).__name__}")
  if (stage.budget_s is not None and started is not None
      and not isinstance(result, Drop)
      and time.thread_time() - started > stage.budget_s):
    result = Drop(TIME_BUDGET)
  if isinstance(result, Drop):
    stats.record_drop(result.reason, doc.nbytes())
    funnel.sample_drop(stage.name, result.reason, doc)
    return None
  reason = result.metadata.pop(_FALLBACK, None)
  if reason is not None:
    stats.fallbacks[reason] += 1
  stats.record_out(result.nbytes())
  return result


def apply_chain(stages: Iterable[Stage], docs: Iterable[Document],
                funnel: Funnel) -> Iterator[Document]:
  """Streams docs through stages in order, yielding the survivors."""
  stages = list(stages)
  timed = any(s.budget_s is not None for s in stages)
  for doc in docs:
    started = time.thread_time() if timed else None
    for stage in stages:
      doc = apply_stage(stage, doc, funnel, started)
      if doc is None:
        break
    else:
      yield doc
