"""Typed view of the cleaning config (``configs/data/refinedweb.py``).

Runners read the config through these frozen dataclasses (via
``mllm_jax.configlib.from_config``), so a typo'd field or a threshold out of
range fails before any file is read, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from mllm_jax.configlib import ConfigError, check, check_choice, from_config

PREFIX = "config"


def _check_frac(value: float, field: str) -> None:
  check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, field,
        f"got {value!r}; expected a fraction in [0, 1]")


def _check_file(path: str, field: str) -> None:
  check(not path or os.path.isfile(path), field, f"{path!r} is not a file")


@dataclasses.dataclass(frozen=True)
class URLFilterConfig:
  enabled: bool = True
  blocklist: str = ""
  words: str = ""
  soft_threshold: float = 3.0
  excluded_domains: tuple[str, ...] = ("wikipedia.org", "arxiv.org")

  def validate(self, prefix: str) -> None:
    _check_file(self.blocklist, f"{prefix}.blocklist")
    _check_file(self.words, f"{prefix}.words")
    check(self.soft_threshold > 0, f"{prefix}.soft_threshold",
          f"got {self.soft_threshold!r}; expected > 0")


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  backend: str = "resiliparse"

  def validate(self, prefix: str) -> None:
    check_choice(self.backend, ("resiliparse", "trafilatura"),
                 f"{prefix}.backend")


@dataclasses.dataclass(frozen=True)
class BoundsConfig:
  """Work per document: pages past these are dropped (or, for depth,
  extracted as plain text) with a counted reason, so one hostile page
  cannot stall a worker."""
  max_html_bytes: int = 8 << 20
  max_depth: int = 512  # Element nesting; main-content extraction is
  # quadratic in it.
  time_budget_s: float = 30.0  # Per document through the chain; checked
  # after each stage (a stage in C cannot be interrupted without killing it).

  def validate(self, prefix: str) -> None:
    check(self.max_html_bytes >= 1024, f"{prefix}.max_html_bytes",
          f"got {self.max_html_bytes!r}; expected >= 1024")
    check(self.max_depth >= 16, f"{prefix}.max_depth",
          f"got {self.max_depth!r}; expected >= 16")
    check(self.time_budget_s > 0, f"{prefix}.time_budget_s",
          f"got {self.time_budget_s!r}; expected > 0 seconds")


@dataclasses.dataclass(frozen=True)
class LangIDConfig:
  enabled: bool = True
  threshold: float = 0.65
  keep: tuple[str, ...] = ("en",)
  model_path: str = ""

  def validate(self, prefix: str) -> None:
    _check_frac(self.threshold, f"{prefix}.threshold")
    _check_file(self.model_path, f"{prefix}.model_path")


@dataclasses.dataclass(frozen=True)
class EnabledConfig:
  enabled: bool = True


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  enabled: bool = True
  filters: tuple[str, ...] = ("gopher",)

  def validate(self, prefix: str) -> None:
    from data_pipeline.quality import QUALITY_FILTERS
    for name in self.filters:
      check_choice(name, sorted(QUALITY_FILTERS), f"{prefix}.filters")


@dataclasses.dataclass(frozen=True)
class LinesConfig:
  enabled: bool = True
  max_removed_word_frac: float = 0.05

  def validate(self, prefix: str) -> None:
    _check_frac(self.max_removed_word_frac, f"{prefix}.max_removed_word_frac")


@dataclasses.dataclass(frozen=True)
class LanguageRules:
  """One language's thresholds in word units (data_pipeline.words); None
  keeps the recipe's (English) value. Set for languages whose words are not
  whitespace-separated or are much shorter or longer than English's."""
  min_words: int | None = None  # Gopher; also exact dedup's minimum after.
  max_words: int | None = None
  min_mean_word_len: float | None = None
  max_mean_word_len: float | None = None
  stop_words: tuple[str, ...] | None = None  # Gopher: >= 2 must occur.
  min_words_per_line: int | None = None  # C4.
  short_line_length: int | None = None  # FineWeb, characters.
  # Units per English word: Gopher's repetition n-grams are this much longer.
  ngram_scale: float | None = None

  def validate(self, prefix: str) -> None:
    for name in ("min_words", "max_words", "min_words_per_line",
                 "short_line_length"):
      value = getattr(self, name)
      check(value is None or (isinstance(value, int) and value >= 0),
            f"{prefix}.{name}", f"got {value!r}; expected an int >= 0")
    lo, hi = self.min_mean_word_len, self.max_mean_word_len
    check(lo is None or hi is None or 0 <= lo <= hi,
          f"{prefix}.min_mean_word_len",
          f"got {lo!r}..{hi!r}; expected 0 <= min <= max")
    check(self.ngram_scale is None or 0.25 <= self.ngram_scale <= 4,
          f"{prefix}.ngram_scale",
          f"got {self.ngram_scale!r}; expected 0.25..4 units per word")

  def overrides(self, mapping: dict[str, str]) -> dict[str, object]:
    """{filter attribute: value} for the fields set and named in mapping."""
    out = {}
    for field, attr in mapping.items():
      value = getattr(self, field)
      if value is not None:
        out[attr] = frozenset(value) if field == "stop_words" else value
    return out


@dataclasses.dataclass(frozen=True)
class LanguageRulesConfig:
  """Per-language thresholds (docs/data_pipeline.md says where each comes
  from); languages not listed use the recipe's values."""
  zh: LanguageRules = LanguageRules()
  ja: LanguageRules = LanguageRules()
  ko: LanguageRules = LanguageRules()

  def by_language(self) -> dict[str, LanguageRules]:
    return {f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class URLDedupConfig:
  enabled: bool = True
  buckets: int = 1  # Spill files for the URL keys; raise for corpora beyond RAM.

  def validate(self, prefix: str) -> None:
    check(self.buckets >= 1, f"{prefix}.buckets", "expected >= 1")


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
  enabled: bool = True
  preset: str = "refinedweb"
  buckets: int = 1  # Spill files per band; raise for corpora beyond RAM.
  method: str = "minhash"  # or 'simhash' (64-bit, Hamming <= max_distance).
  simhash_max_distance: int = 3

  def validate(self, prefix: str) -> None:
    from data_pipeline.minhash import PRESETS
    check_choice(self.preset, sorted(PRESETS), f"{prefix}.preset")
    check(self.buckets >= 1, f"{prefix}.buckets", "expected >= 1")
    check_choice(self.method, ("minhash", "simhash"), f"{prefix}.method")
    check(0 <= self.simhash_max_distance <= 16,
          f"{prefix}.simhash_max_distance", "expected 0..16 bits")


@dataclasses.dataclass(frozen=True)
class ExactConfig:
  enabled: bool = True
  min_bytes: int = 100
  min_words_after: int = 50
  # Suffix arrays are built per group of this many characters of consecutive
  # documents (peak memory ~17 bytes per character); spans repeated across
  # groups are not found.
  group_bytes: int = 1 << 28

  def validate(self, prefix: str) -> None:
    check(self.group_bytes >= 1 << 16, f"{prefix}.group_bytes",
          f"got {self.group_bytes!r}; expected >= 65536")
    check(self.min_bytes >= 20, f"{prefix}.min_bytes",
          f"got {self.min_bytes!r}; expected >= 20 (shorter spans remove "
          "common phrases)")
    check(self.min_words_after >= 0, f"{prefix}.min_words_after",
          "expected >= 0")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  format: str = "jsonl"
  docs_per_shard: int = 10_000

  def validate(self, prefix: str) -> None:
    check_choice(self.format, ("jsonl", "parquet"), f"{prefix}.format")
    check(self.docs_per_shard >= 1, f"{prefix}.docs_per_shard", "expected >= 1")


@dataclasses.dataclass(frozen=True)
class MixConfig:
  sources: str = ""  # 'en=0.7,de=0.3': languages as sources; '' = no mixture.
  total: int = 0  # Documents in the mixture; 0 = as many as the sources hold.
  max_epochs: float = 1.0

  def proportions(self) -> dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in self.sources.split(","))):
      lang, eq, weight = item.partition("=")
      try:
        out[lang.strip()] = float(weight) if eq else float("nan")
      except ValueError:
        out[lang.strip()] = float("nan")
    return out

  def validate(self, prefix: str) -> None:
    props = self.proportions()
    check(all(v >= 0 for v in props.values()) and
          (not props or sum(props.values()) > 0), f"{prefix}.sources",
          f"got {self.sources!r}; expected 'lang=weight,...' with weights >= 0")
    check(self.total >= 0, f"{prefix}.total", "expected >= 0")
    check(self.max_epochs > 0, f"{prefix}.max_epochs", "expected > 0")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
  input: str = ""
  runner: str = "local"
  seed: int = 0
  workers: int = 0  # 0 = one per CPU core.
  progress: bool = True
  beam_options: str = ""  # Extra Beam pipeline flags, space separated.
  samples_per_reason: int = 3
  url_filter: URLFilterConfig = URLFilterConfig()
  extract: ExtractConfig = ExtractConfig()
  langid: LangIDConfig = LangIDConfig()
  repetition: EnabledConfig = EnabledConfig()
  quality: QualityConfig = QualityConfig()
  lines: LinesConfig = LinesConfig()
  url_dedup: URLDedupConfig = URLDedupConfig()
  minhash: MinHashConfig = MinHashConfig()
  exact: ExactConfig = ExactConfig()
  export: ExportConfig = ExportConfig()
  mix: MixConfig = MixConfig()
  language_rules: LanguageRulesConfig = LanguageRulesConfig()
  bounds: BoundsConfig = BoundsConfig()

  def validate(self, prefix: str) -> None:
    check_choice(self.runner, ("local", "beam"), f"{prefix}.runner")
    check(self.workers >= 0, f"{prefix}.workers", "expected >= 0")
    check(self.samples_per_reason >= 0, f"{prefix}.samples_per_reason",
          "expected >= 0")

  def input_files(self) -> list[str]:
    """The sorted input glob; sorted so shard numbering is reproducible."""
    check(bool(self.input), f"{PREFIX}.input", "empty; give a glob of WARC files")
    paths = sorted(glob.glob(self.input, recursive=True))
    check(bool(paths), f"{PREFIX}.input", f"{self.input!r} matches no file")
    return paths


def load(config: Any) -> CleanConfig:
  """Validated CleanConfig from a ConfigDict (or mapping); raises ConfigError."""
  return from_config(CleanConfig, config, PREFIX)


__all__ = ["CleanConfig", "ConfigError", "load"]
