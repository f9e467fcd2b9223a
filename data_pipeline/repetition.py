"""Gopher repetition removal (Rae et al. 2021, Table A1).

A document is dropped when its duplicate lines/paragraphs or its repeated
n-grams exceed the cited fractions; the reason names the first rule that fired.
N-grams are of ``data_pipeline.words`` units (one per Chinese/Japanese
character); fractions are of characters, so they mean the same in every
script.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipeline.document import Document, Drop
from data_pipeline import text_stats, words as word_units
from data_pipeline.quality import PerLanguage

TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
_PARAGRAPHS = re.compile(r"\n{2,}")


def scale_ngrams(limits: dict[int, float], scale: float) -> dict[int, float]:
  """The same limits on n-grams ``scale`` times longer (in units): for a
  language with ``scale`` units per English word, an English 5-gram spans
  about round(5 * scale) units."""
  return {max(1, round(n * scale)): v for n, v in limits.items()}


class GopherRepetition(PerLanguage):

  def __init__(self, dup_line_frac: float = 0.30, dup_para_frac: float = 0.30,
               dup_line_char_frac: float = 0.20,
               dup_para_char_frac: float = 0.20,
               top_ngram: dict[int, float] | None = None,
               dup_ngram: dict[int, float] | None = None,
               ngram_scale: dict[str, float] | None = None):
    self.dup_line_frac = dup_line_frac
    self.dup_para_frac = dup_para_frac
    self.dup_line_char_frac = dup_line_char_frac
    self.dup_para_char_frac = dup_para_char_frac
    self.top_ngram = dict(TOP_NGRAM if top_ngram is None else top_ngram)
    self.dup_ngram = dict(DUP_NGRAM if dup_ngram is None else dup_ngram)
    self.set_languages({
        lang: {"top_ngram": scale_ngrams(self.top_ngram, scale),
               "dup_ngram": scale_ngrams(self.dup_ngram, scale)}
        for lang, scale in (ngram_scale or {}).items()})

  def __call__(self, doc: Document) -> Document | Drop:
    return self.rules(doc)._check(doc)

  def _check(self, doc: Document) -> Document | Drop:
    text = doc.text
    paras = _PARAGRAPHS.split(text.strip())
    by_count, by_chars = text_stats.duplicate_fractions(paras)
    if by_count > self.dup_para_frac:
      return Drop("dup_para_frac")
    if by_chars > self.dup_para_char_frac:
      return Drop("dup_para_char_frac")
    by_count, by_chars = text_stats.duplicate_fractions(text.split("\n"))
    if by_count > self.dup_line_frac:
      return Drop("dup_line_frac")
    if by_chars > self.dup_line_char_frac:
      return Drop("dup_line_char_frac")
    words = word_units.units(text)
    h = text_stats.word_hashes(words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    for n, limit in sorted(self.top_ngram.items()):
      if text_stats.top_ngram_char_fraction(h, lengths, n) > limit:
        return Drop(f"top_{n}gram")
    for n, limit in sorted(self.dup_ngram.items()):
      if text_stats.duplicate_ngram_char_fraction(h, lengths, n) > limit:
        return Drop(f"dup_{n}gram")
    return doc
