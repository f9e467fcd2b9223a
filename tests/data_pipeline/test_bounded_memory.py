"""The corpus-level stages stream: their memory does not grow with the corpus.

Real text (the Python docs' reST sources, 11 MB) is written as per-shard
files the way the runners write them; a corpus three times as large (the same
pages with their words reversed, two different ways, so nothing is a copy)
must peak at about the same traced memory."""

import json
import os
import tracemalloc

import numpy as np
import pytest

from configs.data import refinedweb
from data_pipeline import config as config_lib
from data_pipeline import corpus, export
from data_pipeline.document import Document
from data_pipeline.export import (Source, doc_line, mix, read_shard,
                                  write_mixture, write_shards)
from data_pipeline.url_dedup import LatestPerURL, latest_per_url
from dp_corpora import python_doc_pairs


def _variant(text: str, k: int) -> str:
  lines = text.splitlines()
  if k == 1:
    return "\n".join(" ".join(line.split()[::-1]) for line in lines)
  if k == 2:
    return "\n".join(" ".join(w[::-1] for w in line.split()) for line in lines)
  return text


def _write_language(folder, copies, texts):
  os.makedirs(folder)
  paths, chars = [], 0
  for k in range(copies):
    for half in range(2):
      paths.append(corpus.shard_file(folder, 2 * k + half, "en"))
      with open(paths[-1], "w", encoding="utf-8") as f:
        for i, text in enumerate(texts[half::2]):
          text = _variant(text, k)
          chars += len(text)
          f.write(doc_line(Document(
              f"{k}-{half}-{i}", f"https://docs.example/{k}/{half}/{i}", text,
              metadata={"language": "en", "date": "2024-01-01"})))
  return paths, chars


def _config(**fields):
  cfg = refinedweb.get_config()
  cfg.input = "unused"
  cfg.minhash.preset = "fineweb"
  cfg.exact.group_bytes = 1 << 20
  cfg.export.docs_per_shard = 100
  for key, value in fields.items():
    section, field = key.split(".")
    setattr(cfg[section], field, value)
  return config_lib.load(cfg)


def test_corpus_stages_peak_memory_does_not_grow_with_the_corpus(tmp_path):
  texts = [open(src, encoding="utf-8").read() for _, src in python_doc_pairs()]
  cfg = _config()
  peaks, sizes = [], []
  for copies in (1, 3):
    paths, chars = _write_language(str(tmp_path / f"in{copies}"), copies, texts)
    tracemalloc.start()
    funnel = corpus.clean_language("en", paths, cfg, str(tmp_path / f"o{copies}"))
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    sizes.append(chars)
    stages = funnel.to_json()["stages"]
    assert [s["docs_in"] for s in stages] == [len(texts) * copies] * 3
    out = sorted(os.listdir(tmp_path / f"o{copies}" / "corpus" / "en"))
    kept = sum(len(read_shard(str(tmp_path / f"o{copies}" / "corpus" / "en" / p)))
               for p in out)
    assert kept == stages[-1]["docs_out"]
  assert sizes[1] > 2.8 * sizes[0] > 3e7  # Chars: 11 MB, then 31.5 MB.
  # Same peak for 3x the text (measured: 36 MB and 31 MB; MinHash's fixed
  # NumPy blocks dominate). Holding the corpus would add 66+ MB of str.
  assert peaks[1] < 1.25 * peaks[0], peaks
  assert peaks[1] < sizes[1], peaks


def test_exact_dedup_groups_remove_repeats_within_a_group(tmp_path):
  texts = [open(src, encoding="utf-8").read()
           for _, src in python_doc_pairs()[:40]]
  para = texts[0][:400]
  # Pages 10 and 39 carry a copy of page 0's opening: the one in page 0's
  # group goes, the one past the group boundary stays.
  docs = [Document(str(i), f"https://d/{i}", t + ("\n" + para if i in (10, 39) else ""),
                   metadata={"language": "en"}) for i, t in enumerate(texts)]
  folder = tmp_path / "in"
  folder.mkdir()
  path = corpus.shard_file(str(folder), 0, "en")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(doc_line(d) for d in docs)
  sizes = np.cumsum([len(d.text) for d in docs])
  group = int(sizes[20]) + 1  # Documents 0..21 form the first group.
  assert sizes[10] < group < sizes[38]
  cfg = _config(**{"exact.group_bytes": group,
                   "url_dedup.enabled": False, "minhash.enabled": False})
  corpus.clean_language("en", [path], cfg, str(tmp_path / "out"))
  out = {d.id: d for p in sorted(os.listdir(tmp_path / "out" / "corpus" / "en"))
         for d in read_shard(str(tmp_path / "out" / "corpus" / "en" / p))}
  assert para not in out["10"].text  # Same group as page 0.
  assert para in out["39"].text  # Past the group boundary: left as is.


def test_url_dedup_buckets_give_the_same_mask(tmp_path):
  rng = np.random.default_rng(0)
  urls = [f"https://www.site{rng.integers(50)}.org/p{rng.integers(40)}?utm_x=1"
          for _ in range(3000)]
  dates = [f"20{rng.integers(10, 25)}-0{rng.integers(1, 9)}-01T00:00:00Z"
           for _ in urls]
  masks = []
  for buckets in (1, 7):
    dedup = LatestPerURL(str(tmp_path / f"b{buckets}"), buckets,
                         flush_rows=500)  # Several flushes per bucket.
    for u, d in zip(urls, dates):
      dedup.add(u, d)
    masks.append(dedup.keep())
  assert np.array_equal(masks[0], masks[1])
  assert masks[0].tolist() == latest_per_url(urls, dates)
  # Reference: a dict of normalised URL -> (date, index), latest wins.
  best = {}
  for i, (u, d) in enumerate(zip(urls, dates)):
    key = u.split("?")[0].replace("www.", "")
    if key not in best or (d, i) >= best[key]:
      best[key] = (d, i)
  assert sorted(np.flatnonzero(masks[0])) == sorted(i for _, i in best.values())


def test_streamed_mixture_equals_the_in_memory_mixture(tmp_path):
  texts = [open(src, encoding="utf-8").read()[:200]
           for _, src in python_doc_pairs()[:300]]
  sources, shard_sources = [], []
  for name, lo, hi, weight in (("a", 0, 200, 0.6), ("b", 200, 300, 0.4)):
    docs = [Document(f"{name}{i}", "", t) for i, t in enumerate(texts[lo:hi])]
    sources.append(Source(name, docs, weight, max_epochs=2.0))
    paths = write_shards(docs, str(tmp_path / name), name, 30)
    shard_sources.append((name, paths, weight))
  expected, report = mix(sources, total=400, seed=3)
  got = write_mixture(shard_sources, 2.0, 400, 3, str(tmp_path / "mixed"),
                      docs_per_shard=64, docs_per_bucket=50)
  assert got == report
  out = sorted(p for p in os.listdir(tmp_path / "mixed") if p.endswith(".jsonl"))
  assert out[0] == "mixed-00000-of-00007.jsonl"
  back = [d.id for p in out for d in read_shard(str(tmp_path / "mixed" / p))]
  assert back == [d.id for d in expected] and len(back) == 400
  summary = json.load(open(tmp_path / "mixed" / "mixture.json"))
  assert summary["b"]["docs"] == 160 and summary["b"]["epochs"] == 1.6


def test_mixture_reads_a_source_only_up_to_its_last_pick(tmp_path,
                                                         monkeypatch):
  texts = [f"document {i}" for i in range(500)]
  docs = [Document(f"a{i}", "", t) for i, t in enumerate(texts)]
  paths = write_shards(docs, str(tmp_path / "a"), "a", 50)
  read, original = [], export.iter_shard

  def counting(path):
    for doc in original(path):
      read.append(doc.id)
      yield doc

  monkeypatch.setattr(export, "iter_shard", counting)
  got = write_mixture([("a", paths, 1.0)], 1.0, 20, 5,
                      str(tmp_path / "mixed"))
  plan = export.plan_mixture([500], [1.0], [1.0], ["a"], 20, 5)
  last = int(plan.index.max())
  assert got["a"]["docs"] == 20 and last < 499
  assert len(read) == last + 1  # no document parsed past the last pick


def test_fuzzy_dedup_method_is_selectable(tmp_path):
  """minhash.method: MinHash+LSH (default) or SimHash; both drop copies of
  real pages that gained one word, and keep every original."""
  texts = [open(src, encoding="utf-8").read()
           for _, src in python_doc_pairs()[:60]]
  texts = [t for t in texts if len(t.split()) > 300][:30]
  docs = [Document(f"o{i}", f"https://a/{i}", t, metadata={"language": "en"})
          for i, t in enumerate(texts)]
  docs += [Document(f"c{i}", f"https://mirror/{i}", t + " mirrored",
                    metadata={"language": "en"}) for i, t in enumerate(texts[:8])]
  folder = tmp_path / "in"
  folder.mkdir()
  path = corpus.shard_file(str(folder), 0, "en")
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(doc_line(d) for d in docs)
  for method in ("minhash", "simhash"):
    cfg = _config(**{"minhash.method": method, "exact.enabled": False})
    funnel = corpus.clean_language("en", [path], cfg, str(tmp_path / method))
    stats = funnel.stage("minhash")
    assert stats.dropped == {"near_duplicate": 8}, (method, stats.dropped)
    out = tmp_path / method / "corpus" / "en"
    kept = [d.id for p in sorted(os.listdir(out)) for d in read_shard(str(out / p))]
    assert kept == [f"o{i}" for i in range(len(texts))]
  with pytest.raises(config_lib.ConfigError, match="minhash.method"):
    _config(**{"minhash.method": "lsh"})
