"""The steps both runners schedule: one shard through the per-document chain,
one language through the corpus-level stages, then mixing and the report.

Runners (``data_pipeline/runners``) only decide where these run; keeping the
work here is what makes the local and Beam outputs byte-identical. Order is
fixed everywhere: shards by sorted input path, documents by (shard, position),
languages sorted, so the output does not depend on scheduling.

Memory stays bounded by a shard, not the corpus. A shard's survivors go to
one file per language (``<shard>.<lang>.jsonl``); each language's corpus
stages then stream those files in shard order, three times at most: URL keys
into spilled buckets (a keep bit per document), texts into MinHash (band keys
spilled per bucket; union-find holds one int64 per document), and a last pass
that applies both masks, runs exact dedup on groups of ``exact.group_bytes``
and streams the survivors into the output shards. No stage holds the
corpus's text.

Corpus stages run per language (the output is split by language anyway, and a
near-copy in another language is not a copy): URL dedup first (cheapest, and
it keeps the latest crawl of a page before MinHash would keep an arbitrary
one), then MinHash fuzzy dedup, then exact substring dedup.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterator, Sequence

import numpy as np

from data_pipeline.config import CleanConfig
from data_pipeline.document import Document, Funnel, Stage, apply_chain
from data_pipeline.exact_dedup import duplicate_spans, remove_spans
from data_pipeline.export import ShardWriter, doc_line, iter_shard, write_mixture
from data_pipeline.minhash import (MinHashParams, minhash_duplicates,
                                   simhash_duplicates)
from data_pipeline.report import write_report
from data_pipeline.url_dedup import LatestPerURL
from data_pipeline.warc import STAGE as READ_STAGE, read_warc
from data_pipeline import words as word_units

CORPUS_DIR = "corpus"  # OUT/corpus/<language>/<language>-0000k-of-0000n.jsonl
MIXED_DIR = "mixed"
WORK_DIR = "_work"  # Intermediate files; never part of the output.
UNKNOWN_LANGUAGE = "und"  # When language ID is disabled.


def corpus_stage_names(cfg: CleanConfig) -> list[str]:
  return [name for name in ("url_dedup", "minhash", "exact")
          if getattr(cfg, name).enabled]


def stage_names(cfg: CleanConfig, stages: Sequence[Stage]) -> list[str]:
  """Every stage of the run in order; the report lists even empty ones."""
  return [READ_STAGE] + [s.name for s in stages] + corpus_stage_names(cfg)


def language(doc: Document) -> str:
  return doc.metadata.get("language") or UNKNOWN_LANGUAGE


# --- Per shard ---------------------------------------------------------------

def run_shard(path: str, stages: Sequence[Stage], samples_per_reason: int = 3
              ) -> tuple[list[Document], Funnel]:
  """One input file through read + the per-document chain, in memory."""
  funnel = Funnel(samples_per_reason=samples_per_reason)
  docs = list(apply_chain(stages, read_warc(path, funnel), funnel))
  funnel.check()
  return docs, funnel


def shard_file(shard_dir: str, index: int, lang: str) -> str:
  return os.path.join(shard_dir, f"{index:05d}.{lang}.jsonl")


def clean_shard(path: str, stages: Sequence[Stage], shard_dir: str, index: int,
                samples_per_reason: int = 3) -> tuple[Funnel, list[str]]:
  """One input file through read + the chain, survivors streamed to one file
  per language (``shard_file``; written .tmp, then renamed); returns the
  funnel and the languages written, sorted."""
  funnel = Funnel(samples_per_reason=samples_per_reason)
  files = {}
  try:
    for doc in apply_chain(stages, read_warc(path, funnel), funnel):
      lang = language(doc)
      if lang not in files:
        files[lang] = open(shard_file(shard_dir, index, lang) + ".tmp", "w",
                           encoding="utf-8")
      files[lang].write(doc_line(doc))
  finally:
    for f in files.values():
      f.close()
  for lang in files:
    final = shard_file(shard_dir, index, lang)
    os.replace(final + ".tmp", final)
  funnel.check()
  return funnel, sorted(files)


# --- Per language --------------------------------------------------------------

def _docs(paths: Sequence[str]) -> Iterator[Document]:
  return (doc for path in paths for doc in iter_shard(path))


def _record(funnel: Funnel, stage: str, doc: Document, kept: bool,
            reason: str) -> bool:
  stats = funnel.stage(stage)
  stats.record_in(doc.nbytes())
  if kept:
    stats.record_out(doc.nbytes())
  else:
    stats.record_drop(reason, doc.nbytes())
    funnel.sample_drop(stage, reason, doc)
  return kept


def url_keep_mask(paths: Sequence[str], cfg: CleanConfig, work: str
                  ) -> np.ndarray:
  dedup = LatestPerURL(os.path.join(work, "urls"), cfg.url_dedup.buckets)
  for doc in _docs(paths):
    dedup.add(doc.url, doc.metadata.get("date", ""))
  return dedup.keep()


def minhash_keep_mask(texts: Iterator[str], cfg: CleanConfig, work: str
                      ) -> np.ndarray:
  """Fuzzy dedup keep mask: MinHash + LSH, or SimHash (``minhash.method``)."""
  params = MinHashParams.preset(cfg.minhash.preset, cfg.seed)
  if cfg.minhash.method == "simhash":
    roots = simhash_duplicates(texts, cfg.minhash.simhash_max_distance,
                               params.ngram)
  else:
    roots = minhash_duplicates(texts, params, os.path.join(work, "minhash"),
                               cfg.minhash.buckets)
  return roots == np.arange(len(roots))


def min_words_after(cfg: CleanConfig, lang: str) -> int:
  """Exact dedup's minimum in word units: the language's Gopher minimum
  (``language_rules.<lang>.min_words``) where one is set."""
  rules = cfg.language_rules.by_language().get(lang)
  if rules is not None and rules.min_words is not None:
    return rules.min_words
  return cfg.exact.min_words_after


def exact_dedup(docs: Sequence[Document], cfg: CleanConfig,
                funnel: Funnel) -> list[Document]:
  """Removes spans repeated within ``docs``; drops docs that lost spans and
  fell below the language's minimum (``min_words_after``, in
  ``data_pipeline.words`` units; a doc untouched here is never dropped)."""
  stats = funnel.stage("exact")
  spans = duplicate_spans([d.text for d in docs], cfg.exact.min_bytes)
  out = []
  for doc, doc_spans in zip(docs, spans):
    stats.record_in(doc.nbytes())
    if doc_spans:
      text = remove_spans(doc.text, doc_spans)
      if word_units.count(text) < min_words_after(cfg, language(doc)):
        stats.record_drop("too_short_after_dedup", doc.nbytes())
        funnel.sample_drop("exact", "too_short_after_dedup", doc)
        continue
      doc.text = text
      doc.metadata["exact_removed_bytes"] = sum(h - l for l, h in doc_spans)
    stats.record_out(doc.nbytes())
    out.append(doc)
  return out


def _exact_groups(docs: Iterator[Document], cfg: CleanConfig, funnel: Funnel
                  ) -> Iterator[Document]:
  """Exact dedup over consecutive groups of about ``exact.group_bytes``."""
  group, size = [], 0
  for doc in docs:
    group.append(doc)
    size += len(doc.text)
    if size >= cfg.exact.group_bytes:
      yield from exact_dedup(group, cfg, funnel)
      group, size = [], 0
  if group:
    yield from exact_dedup(group, cfg, funnel)


def clean_language(lang: str, paths: Sequence[str], cfg: CleanConfig,
                   workdir: str) -> Funnel:
  """Corpus stages over one language's per-shard files (``paths``, in shard
  order), then its shards under ``OUT/corpus/<lang>/``; returns this
  language's funnel."""
  funnel = Funnel(samples_per_reason=cfg.samples_per_reason)
  work = os.path.join(workdir, WORK_DIR, "corpus", lang)
  url_keep = url_keep_mask(paths, cfg, work) if cfg.url_dedup.enabled else None
  near_keep = None
  if cfg.minhash.enabled:
    near_keep = minhash_keep_mask(
        (d.text for i, d in enumerate(_docs(paths))
         if url_keep is None or url_keep[i]), cfg, work)

  def survivors() -> Iterator[Document]:
    j = 0  # Index among URL survivors: MinHash's document numbering.
    for i, doc in enumerate(_docs(paths)):
      if url_keep is not None and not _record(
          funnel, "url_dedup", doc, url_keep[i], "duplicate_url"):
        continue
      j += 1
      if near_keep is not None and not _record(
          funnel, "minhash", doc, near_keep[j - 1], "near_duplicate"):
        continue
      yield doc

  docs = survivors()
  if cfg.exact.enabled:
    docs = _exact_groups(docs, cfg, funnel)
  writer = ShardWriter(os.path.join(workdir, CORPUS_DIR, lang), lang,
                       cfg.export.docs_per_shard, cfg.export.format)
  for doc in docs:
    writer.write(doc)
  writer.close()
  shutil.rmtree(work, ignore_errors=True)
  funnel.check()
  return funnel


# --- Whole run ----------------------------------------------------------------

def finish(cfg: CleanConfig, stages: Sequence[Stage], workdir: str,
           shard_funnels: Sequence[Funnel],
           language_funnels: dict[str, Funnel]) -> Funnel:
  """Merges funnels in a fixed order, writes the mixture and the report."""
  funnel = Funnel(stage_names(cfg, stages), cfg.samples_per_reason)
  for f in shard_funnels:
    funnel.merge(f)
  for lang in sorted(language_funnels):
    funnel.merge(language_funnels[lang])
  funnel.check()
  if cfg.mix.sources:
    write_languages_mixture(cfg, workdir)
  write_report(funnel, workdir)
  return funnel


def language_shards(workdir: str, lang: str) -> list[str]:
  folder = os.path.join(workdir, CORPUS_DIR, lang)
  if not os.path.isdir(folder):
    return []
  return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if not f.endswith(".tmp")]


def write_languages_mixture(cfg: CleanConfig, workdir: str) -> None:
  """Languages as sources with the configured proportions -> OUT/mixed/."""
  sources = [(lang, language_shards(workdir, lang), weight)
             for lang, weight in sorted(cfg.mix.proportions().items())]
  write_mixture(sources, cfg.mix.max_epochs, cfg.mix.total, cfg.seed,
                os.path.join(workdir, MIXED_DIR), cfg.export.docs_per_shard,
                cfg.export.format)


def reset_outputs(workdir: str) -> None:
  """Clears the previous run's corpus so no stale shard survives a rerun."""
  for name in (CORPUS_DIR, MIXED_DIR):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def funnel_to_text(funnel: Funnel) -> str:
  return json.dumps(funnel.to_json(), sort_keys=True, ensure_ascii=False)


def funnel_from_text(text: str) -> Funnel:
  return Funnel.from_json(json.loads(text))

