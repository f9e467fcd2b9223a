"""The steps both runners schedule: one shard through the per-document chain,
one language through the corpus-level stages, then mixing and the report.

Runners (``data_pipeline/runners``) only decide where these run; keeping the
work here is what makes the local and Beam outputs byte-identical. Order is
fixed everywhere: shards by sorted input path, documents by (shard, position),
languages sorted, so the output does not depend on scheduling.

Corpus stages run per language (the output is split by language anyway, and a
near-copy in another language is not a copy): URL dedup first (cheapest, and
it keeps the latest crawl of a page before MinHash would keep an arbitrary
one), then MinHash fuzzy dedup, then exact substring dedup.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Sequence

import numpy as np

from data_pipeline.config import CleanConfig
from data_pipeline.document import Document, Funnel, Stage, apply_chain
from data_pipeline.exact_dedup import duplicate_spans, remove_spans
from data_pipeline.export import Source, mix, read_shard, write_shards
from data_pipeline.minhash import MinHashParams, minhash_duplicates
from data_pipeline.report import write_report
from data_pipeline.url_dedup import latest_per_url
from data_pipeline.warc import STAGE as READ_STAGE, read_warc

CORPUS_DIR = "corpus"  # OUT/corpus/<language>/<language>-0000k-of-0000n.jsonl
MIXED_DIR = "mixed"
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
  """One input file through read + the per-document chain."""
  funnel = Funnel(samples_per_reason=samples_per_reason)
  docs = list(apply_chain(stages, read_warc(path, funnel), funnel))
  funnel.check()
  return docs, funnel


# --- Per language --------------------------------------------------------------

def _filter(docs: Sequence[Document], keep: Iterable[bool], stage: str,
            reason: str, funnel: Funnel) -> list[Document]:
  stats = funnel.stage(stage)
  out = []
  for doc, kept in zip(docs, keep):
    stats.record_in(doc.nbytes())
    if kept:
      stats.record_out(doc.nbytes())
      out.append(doc)
    else:
      stats.record_drop(reason, doc.nbytes())
      funnel.sample_drop(stage, reason, doc)
  return out


def url_dedup(docs: Sequence[Document], funnel: Funnel) -> list[Document]:
  keep = latest_per_url([d.url for d in docs],
                        [d.metadata.get("date", "") for d in docs])
  return _filter(docs, keep, "url_dedup", "duplicate_url", funnel)


def minhash_dedup(docs: Sequence[Document], cfg: CleanConfig, tmp_dir: str,
                  funnel: Funnel) -> list[Document]:
  params = MinHashParams.preset(cfg.minhash.preset, cfg.seed)
  roots = minhash_duplicates((d.text for d in docs), params, tmp_dir,
                             cfg.minhash.buckets)
  shutil.rmtree(tmp_dir, ignore_errors=True)
  keep = roots == np.arange(len(docs))
  return _filter(docs, keep, "minhash", "near_duplicate", funnel)


def exact_dedup(docs: Sequence[Document], cfg: CleanConfig,
                funnel: Funnel) -> list[Document]:
  """Removes repeated spans; drops docs that lost spans and fell below
  ``exact.min_words_after`` words (a doc untouched here is never dropped)."""
  stats = funnel.stage("exact")
  spans = duplicate_spans([d.text for d in docs], cfg.exact.min_bytes)
  out = []
  for doc, doc_spans in zip(docs, spans):
    stats.record_in(doc.nbytes())
    if doc_spans:
      text = remove_spans(doc.text, doc_spans)
      if len(text.split()) < cfg.exact.min_words_after:
        stats.record_drop("too_short_after_dedup", doc.nbytes())
        funnel.sample_drop("exact", "too_short_after_dedup", doc)
        continue
      doc.text = text
      doc.metadata["exact_removed_bytes"] = sum(h - l for l, h in doc_spans)
    stats.record_out(doc.nbytes())
    out.append(doc)
  return out


def clean_language(lang: str, docs: list[Document], cfg: CleanConfig,
                   workdir: str) -> Funnel:
  """Corpus stages over one language's docs (in corpus order), then its
  shards under ``OUT/corpus/<lang>/``; returns this language's funnel."""
  funnel = Funnel(samples_per_reason=cfg.samples_per_reason)
  if cfg.url_dedup.enabled:
    docs = url_dedup(docs, funnel)
  if cfg.minhash.enabled:
    docs = minhash_dedup(docs, cfg, os.path.join(workdir, "_work", "minhash",
                                                 lang), funnel)
  if cfg.exact.enabled:
    docs = exact_dedup(docs, cfg, funnel)
  write_shards(docs, os.path.join(workdir, CORPUS_DIR, lang), lang,
               cfg.export.docs_per_shard, cfg.export.format)
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
    write_mixture(cfg, workdir)
  write_report(funnel, workdir)
  return funnel


def language_shards(workdir: str, lang: str) -> list[str]:
  folder = os.path.join(workdir, CORPUS_DIR, lang)
  if not os.path.isdir(folder):
    return []
  return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if not f.endswith(".tmp")]


def write_mixture(cfg: CleanConfig, workdir: str) -> None:
  """Languages as sources with the configured proportions -> OUT/mixed/."""
  sources = []
  for lang, weight in sorted(cfg.mix.proportions().items()):
    docs = [d for p in language_shards(workdir, lang) for d in read_shard(p)]
    sources.append(Source(lang, docs, weight, cfg.mix.max_epochs))
  total = cfg.mix.total or sum(len(s.docs) for s in sources)
  docs, summary = mix(sources, total, cfg.seed)
  out = os.path.join(workdir, MIXED_DIR)
  shutil.rmtree(out, ignore_errors=True)
  write_shards(docs, out, "mixed", cfg.export.docs_per_shard, cfg.export.format)
  with open(os.path.join(out, "mixture.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True)


def reset_outputs(workdir: str) -> None:
  """Clears the previous run's corpus so no stale shard survives a rerun."""
  for name in (CORPUS_DIR, MIXED_DIR):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


def funnel_to_text(funnel: Funnel) -> str:
  return json.dumps(funnel.to_json(), sort_keys=True, ensure_ascii=False)


def funnel_from_text(text: str) -> Funnel:
  return Funnel.from_json(json.loads(text))

