"""Builds the per-document chain (read -> url -> extract -> language ->
repetition -> quality -> lines) from a config, in the order of the recipe."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from data_pipeline.document import Document, Funnel, Stage, apply_chain
from data_pipeline.extract import Extractor
from data_pipeline.langid import LanguageFilter
from data_pipeline.lines import LineCorrections
from data_pipeline.quality import QUALITY_FILTERS
from data_pipeline.repetition import GopherRepetition
from data_pipeline.url_filter import DEFAULT_BLOCKLIST, DEFAULT_WORDS, URLFilter
from data_pipeline.warc import read_warc


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
  stages.append(Stage("extract", Extractor(get("extract", "backend", "resiliparse"))))
  if on("langid"):
    stages.append(Stage("langid", LanguageFilter(
        get("langid", "threshold", 0.65), tuple(get("langid", "keep", ())),
        get("langid", "model_path", "") or None)))
  if on("repetition"):
    stages.append(Stage("repetition", GopherRepetition()))
  if on("quality"):
    for name in get("quality", "filters", ("gopher",)):
      if name not in QUALITY_FILTERS:
        raise ValueError(f"quality.filters has {name!r}; expected names from "
                         f"{sorted(QUALITY_FILTERS)}")
      stages.append(Stage(f"quality_{name}", QUALITY_FILTERS[name]()))
  if on("lines"):
    stages.append(Stage("lines", LineCorrections(
        get("lines", "max_removed_word_frac", 0.05))))
  return stages


def process_files(paths: Iterable[str], stages: list[Stage],
                  funnel: Funnel) -> Iterator[Document]:
  """Reads each WARC and streams its documents through the chain."""
  for path in paths:
    yield from apply_chain(stages, read_warc(path, funnel), funnel)
