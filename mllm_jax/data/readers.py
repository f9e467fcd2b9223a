"""Documents out of text, JSONL and Parquet files, with counted drops.

Tokenizer training and corpus tokenization read the same inputs the same way.
A record that cannot become a document (invalid JSON, a missing or non-text
field, an unreadable file) is reported as a `Drop` with a reason and a location,
never raised: one bad line must not stop a corpus-sized job.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Iterable, Iterator, Sequence

TEXT_SPLITS = ("file", "chunk", "paragraph", "line")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclasses.dataclass(frozen=True)
class Drop:
  """A record that was skipped: why, and where (file:line or file:row)."""
  reason: str
  where: str


def expand(patterns: str | Sequence[str]) -> list[str]:
  """Globs (comma-separated or a list) -> sorted files; a pattern that matches
  nothing is an error naming it, so a typo never yields an empty corpus."""
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",") if p.strip()]
  files = []
  for pattern in patterns:
    matched = sorted(p for p in glob.glob(os.path.expanduser(pattern.strip()))
                     if os.path.isfile(p))
    if not matched:
      raise FileNotFoundError(f"no input file matches {pattern!r}")
    files.extend(matched)
  return files


def file_format(path: str) -> str:
  """'jsonl', 'parquet' or 'text', from the suffix (.gz is not supported)."""
  lower = path.lower()
  if lower.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if lower.endswith(PARQUET_SUFFIXES):
    return "parquet"
  return "text"


def read_documents(files: Iterable[str], text_field: str = "text",
                   text_split: str = "file",
                   chunk_chars: int = 4000) -> Iterator[str | Drop]:
  """Yields each document's text, or a Drop, from every file in order.

  text_field: the JSONL key / Parquet column holding the text.
  text_split: how plain-text files divide into documents: the whole file,
    runs of whole paragraphs of about `chunk_chars` characters (long books
    become many documents, so a shuffled batch mixes them), blank-line
    separated paragraphs, or single lines.
  """
  if text_split not in TEXT_SPLITS:
    raise ValueError(f"text_split={text_split!r}; choose one of {TEXT_SPLITS}")
  for path in files:
    fmt = file_format(path)
    if fmt == "jsonl":
      yield from _jsonl(path, text_field)
    elif fmt == "parquet":
      yield from _parquet(path, text_field)
    else:
      yield from _text(path, text_split, chunk_chars)


def _text(path: str, split: str, chunk_chars: int) -> Iterator[str | Drop]:
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    yield Drop("unreadable_file", f"{path} ({e.strerror})")
    return
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    yield Drop("invalid_utf8", f"{path}:byte {e.start}")
    return
  if split == "file":
    pieces = [text]
  elif split == "paragraph":
    pieces = text.replace("\r\n", "\n").split("\n\n")
  elif split == "chunk":
    pieces = chunk_paragraphs(text, chunk_chars)
  else:
    pieces = text.splitlines()
  for piece in pieces:
    if piece.strip():
      yield piece.strip("\n") if split != "file" else piece
    elif split == "file":
      yield Drop("empty", path)


def chunk_paragraphs(text: str, chunk_chars: int) -> list[str]:
  """Consecutive paragraphs joined until a chunk reaches chunk_chars."""
  chunks, current, size = [], [], 0
  for paragraph in text.replace("\r\n", "\n").split("\n\n"):
    if not paragraph.strip():
      continue
    current.append(paragraph)
    size += len(paragraph) + 2
    if size >= chunk_chars:
      chunks.append("\n\n".join(current))
      current, size = [], 0
  if current:
    chunks.append("\n\n".join(current))
  return chunks


def _jsonl(path: str, field: str) -> Iterator[str | Drop]:
  try:
    f = open(path, "rb")
  except OSError as e:
    yield Drop("unreadable_file", f"{path} ({e.strerror})")
    return
  with f:
    for number, line in enumerate(f, 1):
      where = f"{path}:{number}"
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except (json.JSONDecodeError, UnicodeDecodeError):
        yield Drop("invalid_json", where)
        continue
      yield _text_of(record, field, where)


def _parquet(path: str, field: str) -> Iterator[str | Drop]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    yield Drop("parquet_unsupported", f"{path} (pip install pyarrow)")
    return
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except  # corrupt file
    yield Drop("unreadable_file", f"{path} ({type(e).__name__})")
    return
  if field not in table.schema_arrow.names:
    yield Drop("missing_field", f"{path} (no column {field!r}; has "
               f"{table.schema_arrow.names}; all {table.metadata.num_rows} "
               f"rows)")
    return
  row = 0
  for batch in table.iter_batches(columns=[field]):
    for value in batch.column(0).to_pylist():
      yield _text_of({field: value}, field, f"{path}:row {row}")
      row += 1


def _text_of(record, field: str, where: str) -> str | Drop:
  if not isinstance(record, dict):
    return Drop("not_an_object", where)
  if field not in record or record[field] is None:
    return Drop("missing_field", where)
  text = record[field]
  if not isinstance(text, str):
    return Drop("not_text", where)
  if not text.strip():
    return Drop("empty", where)
  return text


class DropCounter:
  """Counts drops by reason and keeps the first few locations of each."""

  def __init__(self, examples_per_reason: int = 5):
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self._keep = examples_per_reason

  def add(self, drop: Drop) -> None:
    self.counts[drop.reason] += 1
    if len(self.examples[drop.reason]) < self._keep:
      self.examples[drop.reason].append(drop.where)

  def texts(self, items: Iterable[str | Drop]) -> Iterator[str]:
    """Passes texts through, counting the drops."""
    for item in items:
      if isinstance(item, Drop):
        self.add(item)
      else:
        yield item

  def summary(self) -> dict:
    return {"dropped": dict(sorted(self.counts.items())),
            "dropped_examples": {k: v for k, v in sorted(self.examples.items())}}
