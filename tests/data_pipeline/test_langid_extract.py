"""Extraction and language ID measured on real LibreOffice and Python docs.

Gold labels come from the data, not the model: a LibreOffice page counts as
translated when < 20% of its text lines also appear verbatim in the en-US page
at the same path; extraction gold is the ``DisplayArea`` div (LibreOffice) and
the ``_sources/*.rst.txt`` reStructuredText (Python docs).
"""

import collections
import re

import lxml.html
import pytest
from resiliparse.extract.html2text import extract_plain_text

from data_pipeline.document import Document, Drop
from data_pipeline.extract import Extractor, clean_text
from data_pipeline.langid import LanguageFilter, predict
from dp_corpora import LO_LANGS, libreoffice_pages, python_doc_pairs

EXTRACT = Extractor("resiliparse")


def _text(path):
  """Extracted text of a page ('' for the few pages with no text at all)."""
  doc = EXTRACT(Document(path, "x", html=open(path, encoding="utf-8").read()))
  return "" if isinstance(doc, Drop) else doc.text


def _rel(path):
  return path.split("/text/", 1)[1]


def _tokens(s):
  return collections.Counter(re.findall(r"\w+", s.lower()))


def _precision_recall(out, gold):
  o, g = _tokens(out), _tokens(gold)
  hit = sum((o & g).values())
  return hit / max(1, sum(o.values())), hit / max(1, sum(g.values()))


@pytest.fixture(scope="module")
def english_lines():
  return {_rel(p): set(_text(p).split("\n")) for p in libreoffice_pages("en")[::12]}


@pytest.mark.parametrize("lang", sorted(LO_LANGS))
def test_langid_accuracy_per_language(lang, english_lines):
  stats = collections.Counter()
  for path in libreoffice_pages(lang)[::12]:
    text = _text(path)
    if len(text) < 100 or _rel(path) not in english_lines:
      continue
    lines = [l for l in text.split("\n") if l.strip()]
    same = sum(len(l) for l in lines if l in english_lines[_rel(path)])
    translated = lang == "en" or same < 0.2 * sum(map(len, lines))
    label, score = predict(text)
    stats["all"] += 1
    stats["all_ok"] += label == lang
    if translated:
      stats["gold"] += 1
      stats["gold_ok"] += label == lang
      stats["kept"] += score >= 0.65
    elif same > 0.8 * sum(map(len, lines)):  # An untranslated page is English.
      stats["untranslated"] += 1
      stats["untranslated_en"] += label == "en"
  print(lang, dict(stats))
  assert stats["gold"] >= 25
  assert stats["gold_ok"] / stats["gold"] >= 0.98  # measured 1.00 everywhere
  assert stats["kept"] / stats["gold"] >= 0.90  # measured 0.95 (en) .. 1.00
  # Pages with > 80% English lines are mostly called English (measured ja .76,
  # the others 1.0); their translated titles pull the rest the other way.
  assert stats["untranslated_en"] >= 0.7 * stats["untranslated"]
  # Mixed pages lower the raw accuracy: measured en/de/fr >= .99, es .93, ja .70.
  assert stats["all_ok"] / stats["all"] >= {"es": 0.85, "ja": 0.65}.get(lang, 0.95)


def test_language_filter_threshold_keep_list_and_tags():
  docs = [Document(p, "http://x", text=_text(p))
          for lang in ("en", "de", "fr") for p in libreoffice_pages(lang)[200:230]]
  docs = [d for d in docs if len(d.text) > 200]
  keep_de = LanguageFilter(threshold=0.65, keep=("de",))
  results = [keep_de(Document(d.id, d.url, d.text)) for d in docs]
  kept = [r for r in results if not isinstance(r, Drop)]
  assert kept and all(r.metadata["language"] == "de" for r in kept)
  assert all("/de/" in r.id for r in kept)
  assert {r.reason for r in results if isinstance(r, Drop)} <= {"not_kept", "low_score"}
  strict = LanguageFilter(threshold=0.9999)
  assert sum(isinstance(strict(Document(d.id, d.url, d.text)), Drop)
             for d in docs) > sum(isinstance(r, Drop) and r.reason == "low_score"
                                  for r in results)


@pytest.mark.parametrize("lang", ["en", "de", "ja"])
def test_libreoffice_extraction_keeps_display_area_and_drops_chrome(lang):
  precision = recall = n = 0
  for path in libreoffice_pages(lang)[::25]:
    html = open(path, encoding="utf-8").read()
    tree = lxml.html.fromstring(html)
    gold = tree.get_element_by_id("DisplayArea").text_content()
    out = _text(path)
    chrome = {t.strip() for el in tree.xpath("//header|//aside|//footer")
              for t in el.itertext() if len(t.strip()) > 3}
    assert not chrome & set(out.split("\n")), path
    p, r = _precision_recall(out, gold)
    precision, recall, n = precision + p, recall + r, n + 1
    full_p, _ = _precision_recall(clean_text(extract_plain_text(html)), gold)
    assert p >= full_p
  print(lang, "precision", precision / n, "recall", recall / n)
  assert precision / n >= 0.97  # measured 0.99 (en)
  assert recall / n >= 0.85  # measured 0.91 (en); hidden OS-switch spans dropped


def test_python_docs_extraction_against_rst_sources():
  scores = collections.defaultdict(list)
  for page, source in python_doc_pairs()[::10]:
    html = open(page, encoding="utf-8").read()
    gold = open(source, encoding="utf-8").read()
    for name, text in [("main", _text(page)),
                       ("full", clean_text(extract_plain_text(html)))]:
      scores[name].append(_precision_recall(text, gold))
  mean = {k: [sum(x) / len(v) for x in zip(*v)] for k, v in scores.items()}
  print("python docs P/R", mean)
  (p, r), (full_p, _) = mean["main"], mean["full"]
  assert p >= 0.93 and r >= 0.82  # measured 0.963 / 0.864 on 50 pages
  assert p >= full_p + 0.15  # measured 0.737 for the whole page


def test_clean_text_removes_urls_and_caps_newlines():
  text = "See https://example.com/a?b=1 now.\n\n\n\n\nNext www.python.org line\n \n\t\nEnd"
  out = clean_text(text)
  assert "http" not in out and "www." not in out
  assert "\n\n\n" not in out and out.count("\n\n") == 2


def test_trafilatura_backend_is_selectable():
  path = libreoffice_pages("en")[100]
  doc = Extractor("trafilatura")(Document(path, "u", html=open(path).read()))
  assert not isinstance(doc, Drop) and len(doc.text) > 50
  with pytest.raises(ValueError, match="extract.backend"):
    Extractor("nope")
