"""Word units for every script: whitespace words, and one unit per character
in scripts written without spaces (Chinese, Japanese).

Gopher, C4, FineWeb and the RefinedWeb line rules count words with
``str.split()``; a Chinese or Japanese paragraph is then one "word", so
length rules drop good pages and repetition rules see nothing. Here each Han,
Hiragana or Katakana character is its own unit and everything else splits on
whitespace ("LibreOfficeのヘルプ" -> LibreOffice, の, ヘ, ル, プ). Character
units need no model or dictionary and are what CJK dedup practice hashes
(character n-gram shingles); thresholds counted in units are set per
language in the config (``language_rules``), calibrated against English on
parallel pages (docs/data_pipeline.md). A real segmenter (jieba, SudachiPy)
would give dictionary words, at the cost of a dictionary dependency per
language and a slower pass; no rule here needs word identity, only counts
and repeats. Korean writes spaces between
words, so Hangul stays whitespace-split.
"""

from __future__ import annotations

import re

import numpy as np

# Han (CJK unified ideographs, extensions A..H, compatibility), Hiragana,
# Katakana (with the phonetic extensions, halfwidth forms and the iteration
# marks 々〆〇).
CJK_RANGES = ((0x3005, 0x3007), (0x3040, 0x30FF), (0x31F0, 0x31FF),
              (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
              (0xFF66, 0xFF9F), (0x20000, 0x2FA1F), (0x30000, 0x323AF))
_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in CJK_RANGES)
_CJK = re.compile(f"[{_CLASS}]")
_UNITS = re.compile(f"[{_CLASS}]|[^\\s{_CLASS}]+")

CJK_TABLE = np.zeros(0x110000, bool)
for _lo, _hi in CJK_RANGES:
  CJK_TABLE[_lo:_hi + 1] = True


def has_cjk(text: str) -> bool:
  return not text.isascii() and _CJK.search(text) is not None


def units(text: str) -> list[str]:
  """Whitespace words, with each CJK character a unit of its own."""
  if not has_cjk(text):
    return text.split()
  return _UNITS.findall(text)


def count(text: str) -> int:
  """Number of units (``len(units(text))`` without building the list when
  the text has no CJK)."""
  if not has_cjk(text):
    return len(text.split())
  return len(_UNITS.findall(text))
