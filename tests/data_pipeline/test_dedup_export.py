"""Exact substring dedup, URL dedup, mixing and shard export on real pages."""

import os

import numpy as np
import pytest

from data_pipeline.document import Document, Funnel
from data_pipeline.exact_dedup import duplicate_spans, remove_spans
from data_pipeline.export import Source, mix, read_shard, write_shards
from data_pipeline.extract import Extractor
from data_pipeline.url_dedup import latest_per_url, normalise_url
from data_pipeline.warc import read_warc
from dp_corpora import libreoffice_pages, python_doc_pairs


@pytest.fixture(scope="module")
def help_texts():
  ex = Extractor()
  out = []
  for p in libreoffice_pages("en")[::5]:
    doc = ex(Document(p, "u", html=open(p, encoding="utf-8").read()))
    if hasattr(doc, "text"):
      out.append(doc.text)
  return out


def test_removed_spans_really_occur_earlier(help_texts):
  texts = help_texts
  spans = duplicate_spans(texts, min_bytes=100)
  blobs = [t.encode() for t in texts]
  joined = b"\xff".join(blobs)
  offsets = np.concatenate([[0], np.cumsum([len(b) + 1 for b in blobs])])
  removed = 0
  for d, doc_spans in enumerate(spans):
    for lo, hi in doc_spans:
      assert hi - lo >= 100 and hi <= len(blobs[d])
      piece = blobs[d][lo:lo + 100]
      assert joined.find(piece) < offsets[d] + lo  # An earlier copy exists.
      removed += hi - lo
  total = sum(map(len, blobs))
  print(f"{len(texts)} help pages, {total} bytes, {removed} removed "
        f"({removed / total:.1%})")
  assert 0 < removed < 0.5 * total
  assert not spans[0]  # Nothing is removed from the first document.
  # A second pass finds little left (edge effects only).
  cleaned = [remove_spans(t, s) for t, s in zip(texts, spans)]
  again = sum(h - l for s in duplicate_spans(cleaned) for l, h in s)
  assert again < 0.1 * removed


def test_planted_paragraph_survives_once():
  texts = [open(src, encoding="utf-8").read()[:5000]
           for _, src in python_doc_pairs()[:40]]
  para = texts[0][1000:1400]
  planted = [t if i % 4 or i == 0 else t[:2000] + para + t[2000:]
             for i, t in enumerate(texts)]
  spans = duplicate_spans(planted, min_bytes=100)
  cleaned = [remove_spans(t, s) for t, s in zip(planted, spans)]
  assert sum(c.count(para) for c in cleaned) == 1
  assert cleaned[0] == planted[0]
  assert sum(para[:100] in c for c in cleaned) == 1
  assert duplicate_spans(["x", "", "x"]) == [[], [], []]  # Short: nothing.


def test_url_dedup_latest_wins(pywb_dir):
  funnel = Funnel()
  docs = list(read_warc(os.path.join(pywb_dir, "iana.warc.gz"), funnel))
  urls = [d.url for d in docs]
  variants = [u.replace("http://www.", "https://") + "/?utm_source=x#top"
              for u in urls]
  all_urls = urls + variants + urls
  dates = (["2013-01-01"] * len(urls) + ["2024-05-01"] * len(urls)
           + ["2019-01-01"] * len(urls))
  keep = latest_per_url(all_urls, dates)
  assert sum(keep) == len({normalise_url(u) for u in urls}) == len(urls)
  assert keep[len(urls):2 * len(urls)] == [True] * len(urls)
  assert normalise_url("HTTP://WWW.Example.com:80/a/?b=2&a=1&utm_x=3") == \
      "example.com/a?a=1&b=2"


def test_mixing_proportions_epochs_and_shard_roundtrip(tmp_path):
  def docs(lang, n):
    return [Document(f"{lang}{i}", p, text=open(p, encoding="utf-8").read()[:300],
                     metadata={"language": lang})
            for i, p in enumerate(libreoffice_pages(lang)[:n])]
  en, de, fr = docs("en", 400), docs("de", 100), docs("fr", 50)
  mixed, report = mix([Source("en", en, 0.5), Source("de", de, 0.3, max_epochs=2),
                       Source("fr", fr, 0.2, max_epochs=1)], total=400, seed=1)
  assert report["en"]["docs"] == 200 and report["de"]["docs"] == 120
  assert report["de"]["epochs"] == pytest.approx(1.2)
  assert report["fr"]["docs"] == 50 < report["fr"]["wanted"]  # Capped at 1 epoch.
  assert len(mixed) == 370
  langs = [d.metadata["language"] for d in mixed]
  assert langs[:100].count("en") not in (0, 100)  # Interleaved, not blocked.
  again, _ = mix([Source("en", en, 0.5), Source("de", de, 0.3, max_epochs=2),
                  Source("fr", fr, 0.2, max_epochs=1)], total=400, seed=1)
  assert [d.id for d in again] == [d.id for d in mixed]
  for fmt in ("jsonl", "parquet"):
    paths = write_shards(mixed, str(tmp_path / fmt), "mix", 100, fmt)
    assert len(paths) == 4 and paths[0].endswith(f"-00000-of-00004.{fmt}")
    back = [d for p in paths for d in read_shard(p)]
    assert [d.to_json() for d in back] == [d.to_json() for d in mixed]
