"""Apache Beam runner: the same steps as the local runner, as a Beam graph.

  Create(shards) -> ParDo(per-document chain per shard) --docs--> key by
  language -> GroupByKey -> ParDo(corpus stages + export per language)
                                  \\--funnels (side output)--> finish (report)

Each ParDo calls the functions of data_pipeline.corpus that the local runner
calls; GroupByKey gives values in no particular order, so each language's
documents are sorted back into (shard, position) order first, which makes the
output byte-identical to the local runner's. ``cfg.beam_options`` goes to
PipelineOptions; without a ``--runner`` there, FnApiRunner runs it in process
(the engine DirectRunner falls back to; DirectRunner itself first tries Prism,
whose binary it would download at run time). Inputs and the workdir may be
local paths or ``gs://``/``s3://``/``hdfs://`` URLs: file access goes through
``runners.fs`` (Beam's FileSystems), which stages remote files locally.
"""

import json
import os
import shlex
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipeline import config, corpus
from data_pipeline.config import CleanConfig
from data_pipeline.document import Document, Funnel
from data_pipeline.pipeline import build_stages
from data_pipeline.runners import fs

LOCAL_RUNNER = "FnApiRunner"


class ChainShard(beam.DoFn):
  """One input file through the per-document chain: emits
  (language, (shard, position, doc json)) and, tagged 'funnel', the shard's
  (shard, funnel json)."""

  def __init__(self, cfg: CleanConfig):
    self.cfg = cfg
    self.stages = None

  def setup(self):
    self.stages = build_stages(self.cfg)

  def process(self, shard: tuple[int, str]) -> Iterator:
    index, path = shard
    with fs.open_local(path) as local:
      docs, funnel = corpus.run_shard(local, self.stages,
                                      self.cfg.samples_per_reason)
    yield beam.pvalue.TaggedOutput(
        "funnel", (index, corpus.funnel_to_text(funnel)))
    for pos, doc in enumerate(docs):
      yield corpus.language(doc), (index, pos, json.dumps(
          doc.to_json(), ensure_ascii=False, sort_keys=True))


class CleanLanguage(beam.DoFn):
  """Corpus stages and export for one language; emits (language, funnel)."""

  def __init__(self, cfg: CleanConfig, workdir: str):
    self.cfg, self.workdir = cfg, workdir

  def process(self, group) -> Iterator[tuple[str, str]]:
    lang, rows = group
    docs = [Document.from_json(json.loads(row)) for _, _, row in sorted(rows)]
    with fs.staged(self.workdir) as workdir:
      funnel = corpus.clean_language(lang, docs, self.cfg, workdir)
    yield lang, corpus.funnel_to_text(funnel)


def _finish(_, shard_funnels, language_funnels, cfg: CleanConfig,
            workdir: str) -> None:
  # The mixture reads the corpus shards back, so a remote run fetches them.
  with fs.staged(workdir, fetch=(corpus.CORPUS_DIR,)) as local:
    corpus.finish(
        cfg, build_stages(cfg), local,
        [corpus.funnel_from_text(t) for _, t in sorted(shard_funnels)],
        {lang: corpus.funnel_from_text(t) for lang, t in language_funnels})


def build(p: beam.Pipeline, cfg: CleanConfig, paths: list[str],
          workdir: str) -> None:
  """Adds the cleaning graph to pipeline ``p``."""
  shards = (p | "Shards" >> beam.Create(list(enumerate(paths)))
            | "Spread" >> beam.Reshuffle())
  chained = shards | "Chain" >> beam.ParDo(ChainShard(cfg)).with_outputs(
      "funnel", main="docs")
  languages = (chained.docs | "ByLanguage" >> beam.GroupByKey()
               | "CorpusStages" >> beam.ParDo(CleanLanguage(cfg, workdir)))
  _ = (p | "Once" >> beam.Create([None])
       | "Report" >> beam.Map(_finish,
                              beam.pvalue.AsList(chained.funnel),
                              beam.pvalue.AsList(languages),
                              cfg=cfg, workdir=workdir))


def input_paths(cfg: CleanConfig) -> list[str]:
  """The sorted input files: a local glob as the local runner matches it (same
  shard numbers), a URL glob through Beam's FileSystems."""
  if not fs.is_remote(cfg.input):
    return [os.path.abspath(p) for p in cfg.input_files()]
  paths = fs.match(cfg.input)
  config.check(bool(paths), f"{config.PREFIX}.input",
               f"{cfg.input!r} matches no file")
  return paths


def run(cfg: CleanConfig, workdir: str):
  paths = input_paths(cfg)
  if fs.is_remote(workdir):
    for name in (corpus.CORPUS_DIR, corpus.MIXED_DIR):
      fs.delete_under(FileSystems.join(workdir, name))
  else:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    corpus.reset_outputs(workdir)
  argv = shlex.split(cfg.beam_options)
  if not any(a.startswith("--runner") for a in argv):
    argv.append(f"--runner={LOCAL_RUNNER}")
  options = PipelineOptions(argv)
  with beam.Pipeline(options=options) as p:
    build(p, cfg, paths, workdir)
  with fs.open_local(FileSystems.join(workdir, "stats.json")) as path, \
      open(path, encoding="utf-8") as f:
    return Funnel.from_json(json.load(f))
