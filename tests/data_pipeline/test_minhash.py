"""Fuzzy dedup on near-duplicates planted by editing real Python docs pages."""

import glob
import os

import numpy as np
import pytest

from data_pipeline.minhash import (MinHasher, MinHashParams, collision_probability,
                                   minhash_duplicates, simhash, simhash_duplicates)
from data_pipeline.shingles import shingle_hashes
from data_pipeline.union_find import UnionFind
from dp_corpora import python_doc_pairs

EDIT_RATES = (0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5)


def _edit(text, rate, rng):
  """Replaces, deletes or inserts about ``rate`` of the words."""
  words = text.split()
  out = []
  for w in words:
    u = rng.random()
    if u < rate / 3:
      continue
    if u < 2 * rate / 3:
      out.append(w[::-1] + "x")
      continue
    out.append(w)
    if u < rate:
      out.append(words[rng.integers(len(words))])
  return " ".join(out)


def _jaccard(a, b):
  sa, sb = shingle_hashes(a), shingle_hashes(b)
  return len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))


@pytest.fixture(scope="module")
def corpus():
  """~250 real pages (first 1,500 words) plus one edited copy of each."""
  rng = np.random.default_rng(0)
  originals = []
  for _, src in python_doc_pairs():
    words = open(src, encoding="utf-8").read().split()
    if len(words) >= 300:
      originals.append(" ".join(words[:1500]))
  originals = originals[:250]
  copies = [_edit(t, EDIT_RATES[i % len(EDIT_RATES)], rng)
            for i, t in enumerate(originals)]
  sims = np.array([_jaccard(a, b) for a, b in zip(originals, copies)])
  return originals, copies, sims


def test_planted_near_duplicates_precision_recall(corpus, tmp_path):
  originals, copies, sims = corpus
  n = len(originals)
  texts = originals + copies
  params = MinHashParams.preset("fineweb")
  roots = minhash_duplicates(texts, params, str(tmp_path / "spill"))
  same = roots[:n] == roots[n:]
  truth = sims >= 0.8
  recall = same[truth].mean()
  # Precision over every reported pair, planted or not, by exact Jaccard.
  pairs = [(i, j) for i in range(2 * n) for j in range(i + 1, 2 * n)
           if roots[i] == roots[j]]
  good = sum(_jaccard(texts[i], texts[j]) >= 0.6 for i, j in pairs)
  precision = good / max(1, len(pairs))
  far_found = same[sims < 0.5].mean()
  print(f"fineweb preset: {truth.sum()} true pairs, recall {recall:.3f}, "
        f"{len(pairs)} reported pairs, precision {precision:.3f}, "
        f"J<0.5 found {far_found:.3f}")
  assert truth.sum() >= 50 and (sims < 0.5).sum() >= 20
  assert recall >= 0.95 and precision >= 0.95
  assert far_found <= 0.05
  kept = roots == np.arange(2 * n)
  assert kept[:n].all()  # The first copy of every cluster is the one kept.


def test_collision_rate_follows_the_s_curve(corpus):
  originals, copies, sims = corpus
  agree, collide = [], []
  for seed in range(4):  # Independent hash families: 4x the pairs.
    params = MinHashParams(bands=10, rows=5, seed=seed)
    hasher = MinHasher(params)
    for a, b in zip(originals, copies):
      sa, sb = hasher.signature(a), hasher.signature(b)
      agree.append((sa == sb).mean())
      collide.append((hasher.band_keys(sa) == hasher.band_keys(sb)).any())
  agree, collide = np.array(agree), np.array(collide)
  sims = np.tile(sims, 4)
  # Each hash agrees with probability J: unbiased estimate, error ~ 1/sqrt(50).
  assert abs((agree - sims).mean()) < 0.02
  assert np.abs(agree - sims).mean() < 0.06
  # Band collisions per similarity bin against 1 - (1 - s^r)^b.
  edges = np.array([0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01])
  checked = 0
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (sims >= lo) & (sims < hi)
    if sel.sum() < 10:
      continue
    expected = collision_probability(sims[sel], params.bands, params.rows).mean()
    observed = collide[sel].mean()
    sigma = np.sqrt(max(expected * (1 - expected), 0.01) / sel.sum())
    print(f"s in [{lo:.1f},{hi:.1f}): n={sel.sum()} observed {observed:.3f} "
          f"expected {expected:.3f}")
    assert abs(observed - expected) <= 3 * sigma + 0.02
    checked += 1
  assert checked >= 4


def test_spilling_to_many_small_buckets_gives_the_same_clusters(corpus, tmp_path):
  originals, copies, _ = corpus
  texts = originals[:80] + copies[:80]
  params = MinHashParams.preset("fineweb")
  a = minhash_duplicates(texts, params, str(tmp_path / "a"))
  b = minhash_duplicates(texts, params, str(tmp_path / "b"), buckets=4,
                         flush_docs=7)
  assert np.array_equal(a, b) and (a != np.arange(len(texts))).sum() > 10
  files = glob.glob(str(tmp_path / "b" / "*.bin"))
  assert len(files) == params.bands * 4
  sizes = sum(os.path.getsize(f) for f in files)
  assert sizes == len(texts) * params.bands * 16  # (key, doc) per band.


def test_refinedweb_preset_shape_and_threshold(corpus, tmp_path):
  originals, copies, sims = corpus
  p = MinHashParams.preset("refinedweb")
  assert (p.bands, p.rows, p.num_hashes, p.ngram) == (450, 20, 9000, 5)
  assert abs(p.threshold() - 0.737) < 0.001
  idx = [i for i in range(len(sims)) if sims[i] > 0.9 or sims[i] < 0.4][:30]
  texts = [originals[i] for i in idx] + [copies[i] for i in idx]
  roots = minhash_duplicates(texts, p, str(tmp_path / "rw"))
  same = roots[:len(idx)] == roots[len(idx):]
  assert np.array_equal(same, sims[idx] > 0.9)


def test_signatures_are_pinned_and_batching_does_not_change_them(
    corpus, monkeypatch, tmp_path):
  """Batched, chunked signing (texts spanning chunks, several row blocks) is
  bitwise the per-text result, which is pinned to the pre-batching values."""
  import data_pipeline.minhash as mh
  hasher = MinHasher(MinHashParams.preset("fineweb"))
  sig = hasher.signature("The quick brown fox jumps over the lazy dog, again "
                         "and again.")
  assert sig[:4].tolist() == [71911081, 82040461, 79713109, 589868320]
  assert int(sig.astype(np.uint64).sum()) == 55320009779
  assert hasher.band_keys(sig)[:2].tolist() == [4731664609435159502,
                                                12699184844802315600]
  originals, copies, _ = corpus
  texts = ["", "one", "a b c d"] + originals[:6] + ["", "x y"] + copies[:6] + [""]
  monkeypatch.setattr(mh, "_ROWS", 48)
  monkeypatch.setattr(mh, "_COLS", 700)
  for params in (MinHashParams(bands=14, rows=8), MinHashParams(bands=9, rows=20)):
    hasher = MinHasher(params)
    xs = [shingle_hashes(t, unique=False) for t in texts]
    batch = hasher.signatures(np.concatenate(xs),
                              np.cumsum([0] + [len(x) for x in xs]))
    one = np.stack([hasher.signature(t) for t in texts])
    assert np.array_equal(batch, one) and (batch[0] == 2**32 - 1).all()
    with np.errstate(over="ignore"):  # The plain definition, one text.
      plain = (xs[3][:, None] * hasher.a + hasher.b).min(axis=0) >> np.uint64(32)
    assert np.array_equal(batch[3], plain)
    assert np.array_equal(hasher.band_keys(batch),
                          np.stack([hasher.band_keys(s) for s in one]))
  params = MinHashParams.preset("fineweb")
  whole = minhash_duplicates(texts, params, str(tmp_path / "a"))
  monkeypatch.setattr(mh, "_BATCH_SHINGLES", 500)  # Many small batches.
  assert np.array_equal(whole, minhash_duplicates(texts, params,
                                                  str(tmp_path / "b")))


def test_union_find_matches_a_plain_python_version():
  rng = np.random.default_rng(3)
  n = 2000
  a, b = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
  uf = UnionFind(n)
  uf.union(a[:700], b[:700])
  uf.union(a[700:], b[700:])
  parent = list(range(n))

  def find(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x
  for x, y in zip(a, b):
    rx, ry = find(x), find(y)
    parent[max(rx, ry)] = min(rx, ry)
  assert uf.roots().tolist() == [find(x) for x in range(n)]


def test_simhash_finds_light_edits(corpus):
  originals, copies, sims = corpus
  n = 100
  roots = simhash_duplicates(originals[:n] + copies[:n], max_distance=3)
  same = roots[:n] == roots[n:]
  dist = np.array([np.bitwise_count(simhash(a) ^ simhash(b))
                   for a, b in zip(originals[:n], copies[:n])])
  assert np.array_equal(same, dist <= 3)
  # 64-bit SimHash is coarser than MinHash: measured 0.64 found at J > 0.95.
  assert same[sims[:n] > 0.95].mean() >= 0.5 and same[sims[:n] < 0.5].mean() == 0
