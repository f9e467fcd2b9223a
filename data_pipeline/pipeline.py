"""Builds the per-document chain (read -> url -> extract -> language ->
repetition -> quality -> lines) from a config, in the order of the recipe,
with the per-language thresholds (``language_rules``) and the per-document
bounds (``bounds``)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from data_pipeline.config import LanguageRulesConfig
from data_pipeline.document import Document, Funnel, Stage, apply_chain
from data_pipeline.extract import Extractor
from data_pipeline.langid import LanguageFilter
from data_pipeline.lines import LineCorrections
from data_pipeline.quality import QUALITY_FILTERS
from data_pipeline.repetition import GopherRepetition
from data_pipeline.url_filter import DEFAULT_BLOCKLIST, DEFAULT_WORDS, URLFilter
from data_pipeline.warc import read_warc
from mllm_jax.configlib import from_config

# LanguageRules field -> the attribute each filter reads.
_GOPHER_RULES = {"min_words": "min_words", "max_words": "max_words",
                 "min_mean_word_len": "min_mean",
                 "max_mean_word_len": "max_mean",
                 "stop_words": "language_stop_words"}
_FILTER_RULES = {"gopher": _GOPHER_RULES,
                 "c4": {"min_words_per_line": "min_words_per_line"},
                 "fineweb": {"short_line_length": "short_line_length"}}


def _language_rules(cfg: Any) -> LanguageRulesConfig | None:
  rules = getattr(cfg, "language_rules", None) if cfg is not None else None
  if rules is not None and not isinstance(rules, LanguageRulesConfig):
    rules = from_config(LanguageRulesConfig, rules, "config.language_rules")
  return rules


def language_overrides(cfg: Any, name: str) -> dict[str, dict[str, Any]]:
  """{language: {attribute: value}} for quality filter ``name``."""
  rules = _language_rules(cfg)
  if rules is None:
    return {}
  out = {}
  for lang, lang_rules in rules.by_language().items():
    values = lang_rules.overrides(_FILTER_RULES[name])
    if values:
      out[lang] = values
  return out


def ngram_scales(cfg: Any) -> dict[str, float]:
  rules = _language_rules(cfg)
  if rules is None:
    return {}
  return {lang: r.ngram_scale for lang, r in rules.by_language().items()
          if r.ngram_scale is not None}


def build_stages(cfg: Any = None) -> list[Stage]:
  """Stages from a config with optional sections url_filter, extract, langid,
  quality (``filters`` names from QUALITY_FILTERS) and lines; a section with
  ``enabled=False`` is skipped. ``cfg=None`` gives the RefinedWeb defaults."""
  get = lambda section, key, default: (
      getattr(getattr(cfg, section), key, default)
      if cfg is not None and hasattr(cfg, section) else default)
  on = lambda section: get(section, "enabled", True)
  stages = []
  if on("url_filter"):
    stages.append(Stage("url_filter", URLFilter(
        get("url_filter", "blocklist", "") or DEFAULT_BLOCKLIST,
        get("url_filter", "words", "") or DEFAULT_WORDS,
        get("url_filter", "soft_threshold", 3.0),
        tuple(get("url_filter", "excluded_domains", ("wikipedia.org", "arxiv.org"))))))
  stages.append(Stage("extract", Extractor(
      get("extract", "backend", "resiliparse"),
      max_html_bytes=get("bounds", "max_html_bytes", 8 << 20),
      max_depth=get("bounds", "max_depth", 512))))
  if on("langid"):
    stages.append(Stage("langid", LanguageFilter(
        get("langid", "threshold", 0.65), tuple(get("langid", "keep", ())),
        get("langid", "model_path", "") or None)))
  if on("repetition"):
    stages.append(Stage("repetition", GopherRepetition(
        ngram_scale=ngram_scales(cfg))))
  if on("quality"):
    for name in get("quality", "filters", ("gopher",)):
      if name not in QUALITY_FILTERS:
        raise ValueError(f"quality.filters has {name!r}; expected names from "
                         f"{sorted(QUALITY_FILTERS)}")
      stages.append(Stage(f"quality_{name}", QUALITY_FILTERS[name](
          per_language=language_overrides(cfg, name))))
  if on("lines"):
    stages.append(Stage("lines", LineCorrections(
        get("lines", "max_removed_word_frac", 0.05))))
  budget = get("bounds", "time_budget_s", 30.0)
  for stage in stages:
    stage.budget_s = budget
  return stages


def process_files(paths: Iterable[str], stages: list[Stage],
                  funnel: Funnel) -> Iterator[Document]:
  """Reads each WARC and streams its documents through the chain."""
  for path in paths:
    yield from apply_chain(stages, read_warc(path, funnel), funnel)
