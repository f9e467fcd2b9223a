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
