"""Cleans Common Crawl WARC files into a deduplicated corpus split by language.

  python -m launch.clean_corpus --config=configs/data/refinedweb.py \\
      --config.input='DIR/*.warc.gz' --workdir=OUT [--config.runner=beam]

Stages (RefinedWeb order): read -> url_filter -> extract -> langid ->
repetition -> quality_<filter> -> lines, per input file; then per language
url_dedup -> minhash -> exact over the whole corpus. Writes
  OUT/corpus/<lang>/<lang>-0000k-of-0000n.{jsonl,parquet}  the cleaned corpus
  OUT/mixed/          the mixture, when --config.mix.sources is set
  OUT/stats.json      per stage: docs/bytes in and out, drops per reason, and
                      sample dropped documents per reason (dropped_samples)
  OUT/report.md, OUT/funnel.png   the funnel
  OUT/_work/          per-shard results and .done markers; a rerun with the
                      same config and inputs resumes from them

Override any config field as --config.<section>.<field>=VALUE:
  input, runner (local|beam), seed, workers (0 = all cores), progress,
  beam_options ('--runner=DataflowRunner --project=...'), samples_per_reason,
  url_filter.{enabled,blocklist,words,soft_threshold,excluded_domains},
  extract.backend (resiliparse|trafilatura),
  langid.{enabled,threshold,keep,model_path}, repetition.enabled,
  quality.{enabled,filters} (gopher, c4, fineweb),
  lines.{enabled,max_removed_word_frac}, url_dedup.enabled,
  minhash.{enabled,preset (refinedweb|fineweb),buckets},
  exact.{enabled,min_bytes,min_words_after},
  export.{format (jsonl|parquet),docs_per_shard},
  mix.{sources ('en=0.7,de=0.3'),total,max_epochs},
  bounds.{max_html_bytes,max_depth,time_budget_s} (work per document),
  language_rules.{zh,ja,ko}.{min_words,max_words,min_mean_word_len,
    max_mean_word_len,stop_words,min_words_per_line,short_line_length,
    ngram_scale} (thresholds in word units: one per Chinese/Japanese
    character).
Fields are checked before any file is read (data_pipeline/config.py); an
unknown field, an empty input glob or a bad threshold exits with status 2 and
a message naming the field.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _config_error(message: str) -> None:
  print(f"clean_corpus: config error: {message}", file=sys.stderr)
  sys.exit(2)


def _message(e: Exception) -> str:
  return str(e.args[0] if e.args else e).replace("\n", "; ")


try:  # ml_collections applies --config.* overrides already here.
  config_flags.DEFINE_config_file(
      "config", "configs/data/refinedweb.py",
      "Cleaning recipe (a Python config file); override fields with "
      "--config.<section>.<field>=VALUE (see above).", lock_config=True)
except (KeyError, AttributeError, TypeError, ValueError) as err:
  _config_error(f"unknown field or bad value in --config overrides: "
                f"{_message(err)}")
flags.DEFINE_string("workdir", None, "Output folder (corpus, stats.json, "
                    "report.md, funnel.png, resume markers).", required=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, but a config override naming an unknown field or giving a
  value of the wrong type is a one-line error (status 2), not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _config_error(str(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    _config_error(_message(e))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from data_pipeline import config, runners
  try:
    cfg = config.load(FLAGS.config)
    if "://" in cfg.input:  # gs://, s3://, hdfs://: Beam's filesystems
      config.check(cfg.runner == "beam", "config.input",
                   f"{cfg.input!r} is a URL; remote inputs need "
                   "--config.runner=beam")
    else:
      cfg.input_files()  # a local glob that matches nothing fails here
  except config.ConfigError as e:
    _config_error(str(e))
  funnel = runners.run(cfg, FLAGS.workdir)
  read = funnel.stages["read"]
  last = list(funnel.stages.values())[-1]
  print(f"{read.docs_in} records read, {last.docs_out} documents kept; "
        f"corpus, stats.json, report.md and funnel.png in {FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
