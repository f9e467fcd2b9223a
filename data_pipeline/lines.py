"""RefinedWeb line-wise corrections (Penedo et al. 2023, §G.2 / Table 11).

Drops lines that are mostly upper case, only numbers, counters ("3 likes"),
single words, or short navigation/sign-in/"read more" lines; when those lines
hold more than 5% of the document's words the whole document goes, since so
much boilerplate means the extraction failed. Words are
``data_pipeline.words`` units, so a Chinese or Japanese line is not one
"single word" and its share of the document is counted in characters.
"""

from __future__ import annotations

import re

from data_pipeline.document import Document, Drop
from data_pipeline import words as word_units

_COUNTER = re.compile(
    r"^\s*[\d.,kKmM+]+\s+(likes?|comments?|shares?|views?|followers?|"
    r"replies|reply|retweets?|votes?|reviews?|answers?|points?|reads?|"
    r"subscribers?|downloads?)\s*$", re.I)
_NUMERIC = re.compile(r"^[\d\s.,:;/%+\-–()#$€£¥]+$")
_NAV = re.compile(
    r"^\W*(sign[ -]?in|sign[ -]?up|log[ -]?in|log[ -]?out|register|"
    r"read more|click here|skip to (main )?content|back to top|next|previous|"
    r"home|menu|share( this)?|subscribe|print|tweet|reply|"
    r"items? in (your )?cart|view cart|add to cart|accept( all)? cookies?|"
    r"powered by|all rights reserved|copyright|©)\b", re.I)


def line_drop_reason(line: str, max_nav_words: int = 10,
                     upper_frac: float = 0.5) -> str | None:
  """Why a line should go (None: keep it)."""
  stripped = line.strip()
  if not stripped:
    return None
  words = word_units.units(stripped)
  letters = [c for c in stripped if c.isalpha()]
  cased = [c for c in letters if c.isupper() or c.islower()]
  # Over all letters: a Chinese or Korean line quoting "UNO API" is not an
  # upper-case line (its letters are uncased).
  if len(cased) >= 2 and sum(c.isupper() for c in cased) / len(letters) > upper_frac:
    return "uppercase"
  if _NUMERIC.match(stripped):
    return "numeric"
  if _COUNTER.match(stripped):
    return "counter"
  if len(words) == 1:
    return "single_word"
  if len(words) <= max_nav_words and _NAV.match(stripped):
    return "navigation"
  return None


class LineCorrections:

  def __init__(self, max_removed_word_frac: float = 0.05,
               max_nav_words: int = 10, upper_frac: float = 0.5):
    self.max_removed = max_removed_word_frac
    self.max_nav_words = max_nav_words
    self.upper_frac = upper_frac

  def __call__(self, doc: Document) -> Document | Drop:
    kept, removed_words, total_words = [], 0, 0
    count = (word_units.count if word_units.has_cjk(doc.text)
             else lambda line: len(line.split()))
    for line in doc.text.split("\n"):
      n = count(line)
      total_words += n
      if line_drop_reason(line, self.max_nav_words, self.upper_frac):
        removed_words += n
      else:
        kept.append(line)
    if total_words == 0:
      return Drop("empty")
    if removed_words / total_words > self.max_removed:
      return Drop("too_many_lines_removed")
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    meta = dict(doc.metadata, line_removed_frac=round(removed_words / total_words, 4))
    return Document(doc.id, doc.url, text, None, meta)
