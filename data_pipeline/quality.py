"""Document quality filters: Gopher/BLOOM (default), C4 and FineWeb (selectable).

Each rule's threshold is a constructor argument with the cited default; drop
reasons name the rule. Words are ``data_pipeline.words`` units (whitespace
words, one unit per Chinese/Japanese character), and thresholds a language
needs changed come from ``per_language`` (``config.language_rules``). The
stop-word rule only applies to languages with a stop-word list, so other
languages are not dropped for lacking English stop words.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from data_pipeline.document import Document, Drop
from data_pipeline import text_stats, words as word_units

GOPHER_STOP_WORDS = {"en": ("the", "be", "to", "of", "and", "that", "have", "with")}
BULLETS = ("•", "-", "*", "‣", "●", "▪", "–", "◦", "·")
ELLIPSES = ("...", "…")
TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", ":")
# Sentence ends: Latin ones before a space or the end; CJK full-width ones
# anywhere (no space follows them).
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|[。！？]")


class PerLanguage:
  """Thresholds overridden per ``metadata['language']``: ``per_language``
  maps a language to {attribute: value}; other languages keep the
  constructor's values."""

  per_language: dict[str, dict[str, Any]] = {}

  def set_languages(self, per_language: dict[str, dict[str, Any]] | None):
    self.per_language = {}
    for lang, values in (per_language or {}).items():
      unknown = sorted(k for k in values if not hasattr(self, k))
      if unknown:
        raise ValueError(f"{type(self).__name__} has no threshold "
                         f"{unknown[0]!r} (language {lang!r})")
      self.per_language[lang] = dict(values)
    self._variants: dict[str, Any] = {}

  def rules(self, doc: Document):
    """This filter with the document's language's thresholds."""
    lang = doc.metadata.get("language")
    if lang not in self.per_language:
      return self
    if lang not in self._variants:
      variant = copy.copy(self)
      variant.per_language = {}
      for key, value in self.per_language[lang].items():
        setattr(variant, key, value)
      self._variants[lang] = variant
    return self._variants[lang]


class GopherQuality(PerLanguage):
  """Rae et al. 2021 (MassiveText) quality rules, as used by RefinedWeb/BLOOM."""

  def __init__(self, min_words: int = 50, max_words: int = 100_000,
               min_mean_word_len: float = 3.0, max_mean_word_len: float = 10.0,
               max_hash_ratio: float = 0.1, max_ellipsis_ratio: float = 0.1,
               max_bullet_lines: float = 0.9, max_ellipsis_lines: float = 0.3,
               min_alpha_words: float = 0.8, min_stop_words: int = 2,
               stop_words: dict[str, tuple[str, ...]] | None = None,
               per_language: dict[str, dict[str, Any]] | None = None):
    self.min_words, self.max_words = min_words, max_words
    self.min_mean, self.max_mean = min_mean_word_len, max_mean_word_len
    self.max_hash_ratio = max_hash_ratio
    self.max_ellipsis_ratio = max_ellipsis_ratio
    self.max_bullet_lines = max_bullet_lines
    self.max_ellipsis_lines = max_ellipsis_lines
    self.min_alpha_words = min_alpha_words
    self.min_stop_words = min_stop_words
    self.stop_words = {k: frozenset(v) for k, v in
                       (GOPHER_STOP_WORDS if stop_words is None
                        else stop_words).items()}
    self.language_stop_words: frozenset[str] | None = None
    self.set_languages(per_language)

  def __call__(self, doc: Document) -> Document | Drop:
    return self.rules(doc)._check(doc)

  def _check(self, doc: Document) -> Document | Drop:
    text = doc.text
    words = word_units.units(text)
    n = len(words)
    if n < self.min_words:
      return Drop("too_few_words")
    if n > self.max_words:
      return Drop("too_many_words")
    mean = sum(map(len, words)) / n
    if not self.min_mean <= mean <= self.max_mean:
      return Drop("mean_word_length")
    if text.count("#") / n > self.max_hash_ratio:
      return Drop("hash_ratio")
    if (text.count("...") + text.count("…")) / n > self.max_ellipsis_ratio:
      return Drop("ellipsis_ratio")
    lines = [l for l in text.split("\n") if l.strip()]
    if lines:
      bullets = sum(l.lstrip().startswith(BULLETS) for l in lines)
      if bullets / len(lines) > self.max_bullet_lines:
        return Drop("bullet_lines")
      ellipsis = sum(l.rstrip().endswith(ELLIPSES) for l in lines)
      if ellipsis / len(lines) > self.max_ellipsis_lines:
        return Drop("ellipsis_lines")
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    if alpha / n < self.min_alpha_words:
      return Drop("alpha_words")
    stops = self.language_stop_words
    if stops is None:
      stops = self.stop_words.get(doc.metadata.get("language", "en"))
    if stops:
      if sum(w.lower() in stops for w in words) < self.min_stop_words:
        return Drop("stop_words")
    return doc


class C4Quality(PerLanguage):
  """Raffel et al. 2020 (C4): keeps lines that end in terminal punctuation and
  have >= 5 words; drops pages with < 3 sentences, 'lorem ipsum' or '{', and
  removes javascript/cookie-policy lines."""

  POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
            "use of cookies", "use cookies")

  def __init__(self, min_words_per_line: int = 5, min_sentences: int = 3,
               drop_curly_brace: bool = True,
               per_language: dict[str, dict[str, Any]] | None = None):
    self.min_words_per_line = min_words_per_line
    self.min_sentences = min_sentences
    self.drop_curly_brace = drop_curly_brace
    self.set_languages(per_language)

  def __call__(self, doc: Document) -> Document | Drop:
    return self.rules(doc)._check(doc)

  def _check(self, doc: Document) -> Document | Drop:
    text = doc.text
    lower = text.lower()
    if "lorem ipsum" in lower:
      return Drop("lorem_ipsum")
    if self.drop_curly_brace and "{" in text:
      return Drop("curly_brace")
    kept = []
    for line in text.split("\n"):
      line = line.strip()
      low = line.lower()
      if not line.endswith(TERMINAL) or line.endswith("..."):
        continue
      if word_units.count(line) < self.min_words_per_line:
        continue
      if "javascript" in low or any(p in low for p in self.POLICY):
        continue
      kept.append(line)
    body = "\n".join(kept)
    if len(_SENTENCE_END.findall(body)) < self.min_sentences:
      return Drop("too_few_sentences")
    return Document(doc.id, doc.url, body, None, doc.metadata)


class FineWebQuality(PerLanguage):
  """Penedo et al. 2024 (FineWeb) custom filters."""

  def __init__(self, line_punct_thr: float = 0.12, short_line_thr: float = 0.67,
               short_line_length: int = 30, char_dup_ratio: float = 0.01,
               new_line_ratio: float = 0.3,
               per_language: dict[str, dict[str, Any]] | None = None):
    self.line_punct_thr = line_punct_thr
    self.short_line_thr = short_line_thr
    self.short_line_length = short_line_length
    self.char_dup_ratio = char_dup_ratio
    self.new_line_ratio = new_line_ratio
    self.set_languages(per_language)

  def __call__(self, doc: Document) -> Document | Drop:
    return self.rules(doc)._check(doc)

  def _check(self, doc: Document) -> Document | Drop:
    lines = [l for l in doc.text.split("\n") if l.strip()]
    if not lines:
      return Drop("empty")
    if sum(l.rstrip().endswith(TERMINAL) for l in lines) / len(lines) < \
        self.line_punct_thr:
      return Drop("line_punct_ratio")
    short = sum(len(l) <= self.short_line_length for l in lines)
    if short / len(lines) > self.short_line_thr:
      return Drop("short_line_ratio")
    _, dup_chars = text_stats.duplicate_fractions(lines)
    if dup_chars > self.char_dup_ratio:
      return Drop("char_dup_ratio")
    if doc.text.count("\n") / max(1, word_units.count(doc.text)) > \
        self.new_line_ratio:
      return Drop("list_ratio")
    return doc


QUALITY_FILTERS = {"gopher": GopherQuality, "c4": C4Quality,
                   "fineweb": FineWebQuality}
