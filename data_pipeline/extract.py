"""Main-text extraction: HTML in, plain text out, menus/headers/footers gone.

resiliparse's main-content heuristics are the fast default; trafilatura is
selectable for precision at several times the cost. Both outputs get the same
clean-up: URLs removed and at most two consecutive newlines (one blank line).

Work per page is bounded before either extractor runs: a page over
``max_html_bytes`` is dropped (``html_too_large``), and a page whose element
nesting exceeds ``max_depth`` is extracted as plain text by a linear tag
strip and counted as a ``too_deep`` fallback (resiliparse's main-content
pass grows with the square of the depth: 32,000 nested ``<div>`` took 64 s).
The depth is measured by a regex scan of the tags (C speed, linear) only
when a cheaper bound (``str.count`` per 2,048 characters) exceeds the limit,
so normal pages pay a few counts.
"""

from __future__ import annotations

import html as html_lib
import re

import numpy as np

from data_pipeline.document import Document, Drop, fallback

_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]]+", re.I)
_NEWLINES = re.compile(r"\n\s*\n\s*\n+")
# Element tags that can nest: void elements and those whose end tag is
# optional (a parser closes them implicitly, so they never stack up) are
# left out.
_NESTING_TAG = re.compile(
    r"<(/?)(?!(?:area|base|br|col|embed|hr|img|input|link|meta|param|source|"
    r"track|wbr|p|li|dt|dd|tr|td|th|option|optgroup|rb|rt|rtc|rp|thead|tbody|"
    r"tfoot|colgroup|caption)\b)[a-z]", re.I)
_INVISIBLE = re.compile(
    r"<(script|style|noscript|template)\b.*?</\1\s*>|<!--.*?-->", re.I | re.S)
_BLOCK_TAG = re.compile(
    r"<\s*/?\s*(?:p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|header|"
    r"footer|nav|pre|blockquote|dt|dd|hr)\b[^>]*>", re.I)
_ANY_TAG = re.compile(r"<[^>]*>")


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


def plain_text(html: str) -> str:
  """All visible text, block elements as line breaks: linear in the page,
  whatever its nesting (the fallback for pages too deep to extract)."""
  text = _INVISIBLE.sub(" ", html)
  text = _ANY_TAG.sub(" ", _BLOCK_TAG.sub("\n", text))
  lines = (" ".join(line.split()) for line in text.split("\n"))
  return html_lib.unescape("\n".join(line for line in lines if line))


EXTRACTORS = {"resiliparse": resiliparse_text, "trafilatura": trafilatura_text}


def depth_bound(html: str, chunk: int = 2048) -> int:
  """A cheap upper bound of the nesting depth: per chunk of characters, the
  depth before it (opens - closes, every ``<`` not ``</`` an open) plus the
  chunk's opens. Two ``str.count`` per chunk; normal pages stay far below
  any sane limit (all help pages in 7 languages and the Python docs:
  <= 380 at 2,048)."""
  depth = best = 0
  for i in range(0, len(html), chunk):
    opens = html.count("<", i, i + chunk)
    closes = html.count("</", i, i + chunk)
    best = max(best, depth + opens - closes)
    depth += opens - 2 * closes
  return best


def nesting_depth(html: str) -> int:
  """Deepest element nesting, from open and close tags in order (void and
  optional-end elements ignored); an upper bound a parser would not exceed
  on well-formed pages."""
  marks = _NESTING_TAG.findall(html)
  if not marks:
    return 0
  steps = np.where(np.array(marks) == "/", -1, 1).astype(np.int32)
  return int(np.cumsum(steps).max())


def too_deep(html: str, max_depth: int) -> bool:
  return (depth_bound(html) > max_depth
          and nesting_depth(html) > max_depth)


def utf8_size_over(text: str, limit: int) -> bool:
  """len(text.encode()) > limit, without encoding texts that cannot be."""
  if len(text) > limit:
    return True
  if 4 * len(text) <= limit:
    return False
  return len(text.encode("utf-8", "surrogatepass")) > limit


class Extractor:
  """Fills ``text`` from ``html`` (documents that already have text, as from
  WET, pass through) and drops pages that yield nothing; bounds the work per
  page (module docstring)."""

  def __init__(self, backend: str = "resiliparse", min_chars: int = 1,
               max_html_bytes: int = 8 << 20, max_depth: int = 512):
    if backend not in EXTRACTORS:
      raise ValueError(f"extract.backend={backend!r}; expected one of "
                       f"{sorted(EXTRACTORS)}")
    self.backend = backend
    self.min_chars = min_chars
    self.max_html_bytes = max_html_bytes
    self.max_depth = max_depth

  def __call__(self, doc: Document) -> Document | Drop:
    deep = False
    if doc.html is None:
      text = doc.text
    elif utf8_size_over(doc.html, self.max_html_bytes):
      return Drop("html_too_large")
    elif too_deep(doc.html, self.max_depth):
      text, deep = plain_text(doc.html), True
    else:
      text = EXTRACTORS[self.backend](doc.html)
    text = clean_text(text)
    if len(text) < self.min_chars:
      return Drop("empty_text")
    out = Document(doc.id, doc.url, text, None, doc.metadata)
    return fallback(out, "too_deep") if deep else out
