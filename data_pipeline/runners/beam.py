"""Apache Beam runner: the same steps as the local runner, as a Beam graph.

  Create(shards) -> ParDo(per-document chain per shard) --(language, shard)-->
  GroupByKey -> ParDo(corpus stages + export per language)
                 \\--funnels (side output)--> finish (report)

Each ParDo calls the functions of data_pipeline.corpus that the local runner
calls. Documents do not travel through the shuffle: the chain writes each
shard's survivors per language under ``WORKDIR/_work/beam_shards/`` and emits
only (language, shard index); the language step streams those files in shard
order, which keeps its memory bounded and makes the output byte-identical to
the local runner's. On a cluster the workdir must therefore be storage every
worker reaches (``gs://`` etc.). ``cfg.beam_options`` goes to PipelineOptions;
without a ``--runner`` there, FnApiRunner runs it in process (the engine
DirectRunner falls back to; DirectRunner itself first tries Prism, whose binary
it would download at run time). Inputs and the workdir may be local paths or
``gs://``/``s3://``/``hdfs://`` URLs: file access goes through ``runners.fs``
(Beam's FileSystems), which stages remote files locally.
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
from data_pipeline.document import Funnel
from data_pipeline.pipeline import build_stages
from data_pipeline.runners import fs

LOCAL_RUNNER = "FnApiRunner"
SHARD_DIR = (corpus.WORK_DIR, "beam_shards")


def _shard_dir(workdir: str) -> str:
  return FileSystems.join(workdir, *SHARD_DIR)


class ChainShard(beam.DoFn):
  """One input file through the per-document chain, its survivors written per
  language; emits (language, shard) and, tagged 'funnel', (shard, funnel)."""

  def __init__(self, cfg: CleanConfig, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.stages = None

  def setup(self):
    self.stages = build_stages(self.cfg)

  def process(self, shard: tuple[int, str]) -> Iterator:
    index, path = shard
    with fs.open_local(path) as local, \
        fs.staged_dir(_shard_dir(self.workdir)) as out:
      funnel, languages = corpus.clean_shard(local, self.stages, out, index,
                                             self.cfg.samples_per_reason)
    yield beam.pvalue.TaggedOutput(
        "funnel", (index, corpus.funnel_to_text(funnel)))
    for lang in languages:
      yield lang, index


class CleanLanguage(beam.DoFn):
  """Corpus stages and export for one language; emits (language, funnel)."""

  def __init__(self, cfg: CleanConfig, workdir: str):
    self.cfg, self.workdir = cfg, workdir

  def process(self, group) -> Iterator[tuple[str, str]]:
    lang, indices = group
    names = [os.path.basename(corpus.shard_file("", i, lang))
             for i in sorted(indices)]
    with fs.fetched(_shard_dir(self.workdir), names) as paths, \
        fs.staged(self.workdir) as workdir:
      funnel = corpus.clean_language(lang, paths, self.cfg, workdir)
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
  chained = shards | "Chain" >> beam.ParDo(
      ChainShard(cfg, workdir)).with_outputs("funnel", main="shards")
  languages = (chained.shards | "ByLanguage" >> beam.GroupByKey()
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
    for name in (corpus.CORPUS_DIR, corpus.MIXED_DIR, SHARD_DIR[0]):
      fs.delete_under(FileSystems.join(workdir, name))
  else:
    workdir = os.path.abspath(workdir)
    os.makedirs(_shard_dir(workdir), exist_ok=True)
    corpus.reset_outputs(workdir)
  argv = shlex.split(cfg.beam_options)
  if not any(a.startswith("--runner") for a in argv):
    argv.append(f"--runner={LOCAL_RUNNER}")
  options = PipelineOptions(argv)
  with beam.Pipeline(options=options) as p:
    build(p, cfg, paths, workdir)
  fs.delete_under(_shard_dir(workdir))  # Intermediate; the output is done.
  with fs.open_local(FileSystems.join(workdir, "stats.json")) as path, \
      open(path, encoding="utf-8") as f:
    return Funnel.from_json(json.load(f))
