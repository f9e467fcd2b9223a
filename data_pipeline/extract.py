"""Main-text extraction: HTML in, plain text out, menus/headers/footers gone.

resiliparse's main-content heuristics are the fast default; trafilatura is
selectable for precision at several times the cost. Both outputs get the same
clean-up: URLs removed and at most two consecutive newlines (one blank line).
"""

from __future__ import annotations

import re

from data_pipeline.document import Document, Drop

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]]+", re.I)
_NEWLINES = re.compile(r"\n\s*\n\s*\n+")


def clean_text(text: str) -> str:
  """Removes URLs, trims line ends (indentation stays) and caps newline runs."""
  text = _URL.sub("", text).replace("\u00a0", " ")
  lines = [line.rstrip() for line in text.splitlines()]
  text = "\n".join(lines)
  return _NEWLINES.sub("\n\n", text).strip()


def resiliparse_text(html: str) -> str:
  from resiliparse.extract.html2text import extract_plain_text
  return extract_plain_text(html, main_content=True, alt_texts=False,
                            links=False, list_bullets=True, form_fields=False,
                            noscript=False, comments=False)


def trafilatura_text(html: str) -> str:
  import trafilatura
  return trafilatura.extract(html, favor_precision=True, include_comments=False,
                             include_tables=True, deduplicate=False) or ""


EXTRACTORS = {"resiliparse": resiliparse_text, "trafilatura": trafilatura_text}


class Extractor:
  """Fills ``text`` from ``html`` (documents that already have text, as from
  WET, pass through) and drops pages that yield nothing."""

  def __init__(self, backend: str = "resiliparse", min_chars: int = 1):
    if backend not in EXTRACTORS:
      raise ValueError(f"extract.backend={backend!r}; expected one of "
                       f"{sorted(EXTRACTORS)}")
    self.backend = backend
    self.min_chars = min_chars

  def __call__(self, doc: Document) -> Document | Drop:
    if doc.html is None:
      text = doc.text
    else:
      text = EXTRACTORS[self.backend](doc.html)
    text = clean_text(text)
    if len(text) < self.min_chars:
      return Drop("empty_text")
    return Document(doc.id, doc.url, text, None, doc.metadata)
