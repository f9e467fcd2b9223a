"""URL filter, Gopher repetition/quality, C4/FineWeb and RefinedWeb lines on
real pages, with faults planted into them."""

import os
import re
import time

import numpy as np
import pytest

from data_pipeline import text_stats
from data_pipeline.document import Document, Drop
from data_pipeline.extract import Extractor
from data_pipeline.lines import LineCorrections, line_drop_reason
from data_pipeline.quality import C4Quality, FineWebQuality, GopherQuality
from data_pipeline.repetition import GopherRepetition
from data_pipeline.url_filter import URLFilter, load_domains
from data_pipeline.warc import read_warc
from data_pipeline.document import Funnel
from dp_corpora import libreoffice_pages, python_doc_pairs


def _doc(path, lang="en"):
  doc = Extractor()(Document(path, "http://x", html=open(path, encoding="utf-8").read()))
  doc.metadata["language"] = lang
  return doc


@pytest.fixture(scope="module")
def python_docs():
  return [_doc(page) for page, _ in python_doc_pairs()[::8]]


# --- URL filter --------------------------------------------------------------

def test_url_filter_big_blocklist_words_and_exclusions(tmp_path, pywb_dir):
  # A million-domain list built from real page words, in UT1 format.
  words = sorted({w.lower() for p in libreoffice_pages("en")[:400]
                  for w in re.findall(r"[A-Za-z]{4,}", open(p).read())})
  assert len(words) > 1000
  rng = np.random.default_rng(0)
  a = rng.choice(words, 1_000_000)
  b = rng.choice(words, 1_000_000)
  domains = [f"{x}-{y}.com" for x, y in zip(a, b)]
  path = tmp_path / "domains"
  path.write_text("# UT1-style list\n" + "\n".join(domains) + "\n")
  start = time.perf_counter()
  blocked = load_domains(str(path))
  print(f"loaded {len(blocked)} domains in {time.perf_counter() - start:.2f}s")
  assert len(blocked) == len(set(domains))
  f = URLFilter(blocklist=str(path))
  doc = lambda url: Document("i", url, text="t")
  assert f(doc(f"http://{domains[7]}/x")) == Drop("blocklist")
  assert f(doc(f"https://www.sub.{domains[99]}:8080/a")) == Drop("blocklist")
  assert f(doc(f"http://not{domains[7]}/x")).url  # Not a parent domain.
  assert f(doc("https://en.wikipedia.org/wiki/Web")) == Drop("excluded_source")
  assert f(doc("http://arxiv.org/abs/1234")) == Drop("excluded_source")
  assert f(doc("http://shop.test/xxx-videos")) == Drop("hard_word")
  assert f(doc("http://a.test/nude-adult-erotic")) == Drop("soft_words")
  assert f(doc("http://a.test/adult-education")).url  # One soft word is fine.
  assert f(doc("not a url")) == Drop("bad_url")
  funnel = Funnel()
  iana = list(read_warc(os.path.join(pywb_dir, "iana.warc.gz"), funnel))
  assert all(not isinstance(URLFilter()(d), Drop) for d in iana)


# --- Gopher repetition -------------------------------------------------------

def _naive_dup_ngram_frac(words, n):
  seen, covered = set(), [False] * len(words)
  for i in range(len(words) - n + 1):
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered[i:i + n] = [True] * n
    seen.add(gram)
  total = sum(map(len, words))
  return sum(len(w) for w, c in zip(words, covered) if c) / total


def test_vectorised_ngram_stats_match_a_naive_count(python_docs):
  for doc in python_docs[:20]:
    words = doc.text.split()
    h = text_stats.word_hashes(words)
    lengths = np.array([len(w) for w in words])
    for n in (5, 7, 10):
      assert text_stats.duplicate_ngram_char_fraction(h, lengths, n) == \
          pytest.approx(_naive_dup_ngram_frac(words, n))


def test_repetition_keeps_prose_and_drops_planted_repeats(python_docs):
  rep = GopherRepetition()
  kept = [d for d in python_docs if not isinstance(rep(d), Drop)]
  assert len(kept) >= 0.6 * len(python_docs)  # measured ~0.75 on these pages
  doc = max(kept, key=lambda d: len(d.text))
  paras = doc.text.split("\n\n")
  doubled = Document("d", "u", "\n\n".join(paras + paras))
  assert rep(doubled).reason == "dup_para_frac"
  lines = doc.text.split("\n")
  spam = "Buy cheap widgets today at our store now"
  planted = Document("d", "u", "\n".join(
      l for line in lines for l in (line, spam)))
  assert rep(planted).reason in ("dup_line_frac", "dup_line_char_frac")
  words = doc.text.split()
  looped = Document("d", "u", " ".join(words[:300] + words[100:300]))
  assert rep(looped).reason.startswith(("dup_", "top_"))


# --- quality -----------------------------------------------------------------

def test_gopher_quality_reasons_on_planted_pages(python_docs):
  q = GopherQuality()
  good = [d for d in python_docs if not isinstance(q(d), Drop)]
  assert len(good) >= 0.8 * len(python_docs)
  doc = max(good, key=lambda d: len(d.text))
  words = doc.text.split()
  make = lambda text: Document("d", "u", text, metadata={"language": "en"})
  assert q(make(" ".join(words[:40]))).reason == "too_few_words"
  assert q(make(" ".join(["#tag"] * (len(words) // 5) + words))).reason == "hash_ratio"
  assert q(make("\n".join("• " + l for l in doc.text.split("\n") if l.strip()))
           ).reason == "bullet_lines"
  assert q(make("\n".join(l + "..." for l in doc.text.split("\n") if l.strip()))
           ).reason in ("ellipsis_lines", "ellipsis_ratio")
  assert q(make(" ".join(w for w in words if w.lower() not in
                         GopherQuality().stop_words["en"]))).reason == "stop_words"
  assert q(make(" ".join(["12345"] * 60 + words[:200]))).reason == "alpha_words"
  german = _doc(libreoffice_pages("de")[300], "de")
  assert GopherQuality(min_words=5)(german).text  # No English stop words needed.


def test_c4_and_fineweb_filters_on_python_docs(python_docs):
  c4, fw = C4Quality(), FineWebQuality()
  c4_reasons = [getattr(c4(d), "reason", "kept") for d in python_docs]
  fw_reasons = [getattr(fw(d), "reason", "kept") for d in python_docs]
  # Code samples carry '{' -- C4 drops such pages by design.
  with_brace = sum("{" in d.text for d in python_docs)
  assert c4_reasons.count("curly_brace") == with_brace > 0
  kept = [c4(d) for d in python_docs if "{" not in d.text]
  for doc in kept:
    if not isinstance(doc, Drop):
      assert all(l.rstrip().endswith((".", "!", "?", '"', "'", ":", "”", "’"))
                 for l in doc.text.split("\n"))
  assert set(fw_reasons) - {"kept"} <= {"line_punct_ratio", "short_line_ratio",
                                        "char_dup_ratio", "list_ratio"}
  assert "kept" in fw_reasons


# --- RefinedWeb line corrections ---------------------------------------------

def test_line_rules():
  assert line_drop_reason("SIGN UP FOR OUR NEWSLETTER TODAY") == "uppercase"
  assert line_drop_reason("12,345 / 2024") == "numeric"
  assert line_drop_reason("3 likes") == "counter"
  assert line_drop_reason("12 Comments") == "counter"
  assert line_drop_reason("Menu") == "single_word"
  assert line_drop_reason("Read more about this") == "navigation"
  assert line_drop_reason("Sign in to your account") == "navigation"
  assert line_drop_reason("The json module can be used to read more data.") is None


def test_line_corrections_remove_planted_lines_and_drop_when_over_5pct(python_docs):
  lc = LineCorrections()
  results = [lc(d) for d in python_docs]
  kept = [(d, r) for d, r in zip(python_docs, results) if not isinstance(r, Drop)]
  assert kept
  doc, clean = max(kept, key=lambda x: len(x[1].text))
  base = clean.text.split("\n")
  n_words = len(clean.text.split())
  planted = list(base)
  for i, line in enumerate(["3 likes", "Read more", "HOME ABOUT CONTACT"]):
    planted.insert(10 * (i + 1), line)
  out = lc(Document("d", "u", "\n".join(planted)))
  assert out.text == clean.text  # Exactly the planted lines went.
  heavy = list(base) + ["Sign in to read more"] * (n_words // 40 + 1)
  assert lc(Document("d", "u", "\n".join(heavy))).reason == "too_many_lines_removed"
