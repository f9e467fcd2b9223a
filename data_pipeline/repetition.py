"""Gopher repetition removal (Rae et al. 2021, Table A1).

A document is dropped when its duplicate lines/paragraphs or its repeated
n-grams exceed the cited fractions; the reason names the first rule that fired.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipeline.document import Document, Drop
from data_pipeline import text_stats

TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
_PARAGRAPHS = re.compile(r"\n{2,}")


class GopherRepetition:

  def __init__(self, dup_line_frac: float = 0.30, dup_para_frac: float = 0.30,
               dup_line_char_frac: float = 0.20,
               dup_para_char_frac: float = 0.20,
               top_ngram: dict[int, float] | None = None,
               dup_ngram: dict[int, float] | None = None):
    self.dup_line_frac = dup_line_frac
    self.dup_para_frac = dup_para_frac
    self.dup_line_char_frac = dup_line_char_frac
    self.dup_para_char_frac = dup_para_char_frac
    self.top_ngram = dict(TOP_NGRAM if top_ngram is None else top_ngram)
    self.dup_ngram = dict(DUP_NGRAM if dup_ngram is None else dup_ngram)

  def __call__(self, doc: Document) -> Document | Drop:
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
    words = text.split()
    h = text_stats.word_hashes(words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    for n, limit in sorted(self.top_ngram.items()):
      if text_stats.top_ngram_char_fraction(h, lengths, n) > limit:
        return Drop(f"top_{n}gram")
    for n, limit in sorted(self.dup_ngram.items()):
      if text_stats.duplicate_ngram_char_fraction(h, lengths, n) > limit:
        return Drop(f"dup_{n}gram")
    return doc
