"""Local runner: input files as shards over worker processes, resumable.

Each shard's survivors (one file per language) and funnel are written to
``OUT/_work/shards/`` (file then rename) and only then its ``.done`` marker
(which lists the languages written), so a run killed at any point
(SIGKILL included) and started again skips finished shards and redoes the
rest. Shards are independent and everything after them reads them in index
order, so the output is byte-identical whether or not the run was interrupted
and whatever the number of workers. A changed config or input list wipes the
markers (``fingerprint.json``) rather than mixing two runs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import shutil

from tqdm import tqdm

from data_pipeline import corpus
from data_pipeline.config import CleanConfig
from data_pipeline.document import Funnel, Stage
from data_pipeline.pipeline import build_stages

# Fields that change how a run is scheduled, not what it outputs.
_SCHEDULING = ("runner", "workers", "progress", "beam_options")
_STAGES: list[Stage] = []  # Built once per worker process.


def _init_worker(cfg: CleanConfig) -> None:
  global _STAGES
  _STAGES = build_stages(cfg)


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _shard_base(shard_dir: str, index: int) -> str:
  return os.path.join(shard_dir, f"{index:05d}")


def process_shard(task: tuple[int, str, str, int]) -> int:
  """Runs one shard and commits it; returns its index."""
  index, path, shard_dir, samples = task
  funnel, languages = corpus.clean_shard(path, _STAGES, shard_dir, index,
                                         samples)
  base = _shard_base(shard_dir, index)
  _write(base + ".funnel.json", corpus.funnel_to_text(funnel))
  _write(base + ".done", json.dumps({"input": path, "languages": languages}))
  return index


def fingerprint(cfg: CleanConfig, paths: list[str]) -> str:
  fields = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _SCHEDULING}
  inputs = [(os.path.abspath(p), os.path.getsize(p)) for p in paths]
  return json.dumps({"config": fields, "inputs": inputs}, sort_keys=True)


def _prepare(shard_dir: str, stamp: str) -> None:
  stamp_path = os.path.join(os.path.dirname(shard_dir), "fingerprint.json")
  if os.path.exists(stamp_path):
    with open(stamp_path, encoding="utf-8") as f:
      if f.read() == stamp:
        return
  shutil.rmtree(shard_dir, ignore_errors=True)
  os.makedirs(shard_dir)
  _write(stamp_path, stamp)


def run_shards(cfg: CleanConfig, paths: list[str], shard_dir: str) -> None:
  """Runs every shard without a marker, ``cfg.workers`` processes at a time."""
  todo = [(i, p, shard_dir, cfg.samples_per_reason) for i, p in enumerate(paths)
          if not os.path.exists(_shard_base(shard_dir, i) + ".done")]
  workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
  with tqdm(total=len(paths), initial=len(paths) - len(todo), unit="shard",
            desc="per-document chain", disable=not cfg.progress) as bar:
    if workers <= 1:
      _init_worker(cfg)
      for task in todo:
        process_shard(task)
        bar.update()
      return
    # spawn: workers must not inherit fastText or thread state by fork.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _init_worker, (cfg,)) as pool:
      for _ in pool.imap_unordered(process_shard, todo):
        bar.update()


def read_shards(shard_dir: str, n: int
                ) -> tuple[list[Funnel], dict[str, list[str]]]:
  """Shard funnels in index order and, per language, its shard files in
  index order."""
  funnels, by_lang = [], collections.defaultdict(list)
  for i in range(n):
    base = _shard_base(shard_dir, i)
    with open(base + ".funnel.json", encoding="utf-8") as f:
      funnels.append(corpus.funnel_from_text(f.read()))
    with open(base + ".done", encoding="utf-8") as f:
      for lang in json.load(f)["languages"]:
        by_lang[lang].append(corpus.shard_file(shard_dir, i, lang))
  return funnels, dict(by_lang)


def run(cfg: CleanConfig, workdir: str) -> Funnel:
  paths = cfg.input_files()
  shard_dir = os.path.join(workdir, corpus.WORK_DIR, "shards")
  os.makedirs(workdir, exist_ok=True)
  _prepare(shard_dir, fingerprint(cfg, paths))
  run_shards(cfg, paths, shard_dir)
  funnels, by_lang = read_shards(shard_dir, len(paths))
  corpus.reset_outputs(workdir)
  per_lang = {lang: corpus.clean_language(lang, by_lang[lang], cfg, workdir)
              for lang in tqdm(sorted(by_lang), unit="language",
                               desc="corpus stages", disable=not cfg.progress)}
  return corpus.finish(cfg, build_stages(cfg), workdir, funnels, per_lang)
