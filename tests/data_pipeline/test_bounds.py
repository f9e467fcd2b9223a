"""Bounded work per document: hostile nesting, oversized pages and the time
budget each end as a counted fallback or drop; normal pages are untouched."""

import pytest

from data_pipeline.document import Document, Funnel, Stage, apply_chain
from data_pipeline.extract import (Extractor, clean_text, depth_bound,
                                   nesting_depth, resiliparse_text)
from data_pipeline.pipeline import build_stages, process_files
from data_pipeline.warc_write import write_pages
from dp_corpora import libreoffice_pages


def _deep_page(depth):
  return ("<html><head><title>t</title></head><body>" + "<div>" * depth
          + "<p>Deeply nested words stay readable &amp; counted.</p>"
          + "</div>" * depth + "</body></html>")


def test_nesting_depth_ignores_void_and_optional_end_tags():
  page = ("<html><body><div><p>a<p>b<br><img src=x><ul><li>x<li>y</ul>"
          "<div><span>c</span></div></div></body></html>")
  assert nesting_depth(page) == 5  # html body div div span.
  assert nesting_depth(_deep_page(1000)) == 1002
  for html in (page, _deep_page(1000), _deep_page(30)):
    assert depth_bound(html) >= nesting_depth(html)


def test_page_nested_200000_deep_falls_back_to_plain_text():
  html = _deep_page(200_000)
  assert len(html) > 2_000_000
  funnel = Funnel()
  stage = Stage("extract", Extractor())
  (doc,) = apply_chain([stage], [Document("d", "http://x/", html=html)],
                       funnel)
  assert doc.text == "t\nDeeply nested words stay readable & counted."
  assert doc.metadata["fallback"] == "too_deep"
  assert funnel.stages["extract"].fallbacks == {"too_deep": 1}


def test_30_mb_page_is_dropped_with_its_reason():
  page = open(libreoffice_pages("en")[50], encoding="utf-8").read()
  body = page.split("<body", 1)[1]
  html = page + body * (30_000_000 // len(body) + 1)
  assert len(html.encode()) > 30_000_000
  funnel = Funnel()
  out = list(apply_chain([Stage("extract", Extractor())],
                         [Document("big", "http://x/", html=html)], funnel))
  assert out == []
  assert funnel.stages["extract"].dropped == {"html_too_large": 1}


def test_normal_pages_extract_exactly_as_before():
  extractor = Extractor()
  for path in libreoffice_pages("en")[::200] + libreoffice_pages("ja")[::400]:
    html = open(path, encoding="utf-8").read()
    assert nesting_depth(html) < 100 and depth_bound(html) < 512, path
    doc = extractor(Document("p", "http://x/", html=html))
    assert doc.text == clean_text(resiliparse_text(html))
    assert "fallback" not in doc.metadata


def test_time_budget_drops_and_counts_without_stopping_the_chain():
  docs = [Document(str(i), "http://x/", text="word " * 60) for i in range(3)]
  slow = Stage("slow", lambda d: d, budget_s=0.0)
  funnel = Funnel()
  assert list(apply_chain([slow], docs, funnel)) == []
  assert funnel.stages["slow"].dropped == {"time_budget": 3}
  funnel = Funnel()
  relaxed = Stage("slow", lambda d: d, budget_s=60.0)
  assert len(list(apply_chain([relaxed], docs, funnel))) == 3


def test_chain_counts_each_bound_in_the_report(tmp_path):
  from configs.data import refinedweb
  pages = [(f"https://help.libreoffice.org/en/{i}", open(p, "rb").read())
           for i, p in enumerate(libreoffice_pages("en")[:6])]
  pages.append(("https://a.example/deep", _deep_page(20_000).encode()))
  pages.append(("https://a.example/big", b"<html><body>" + b"<p>word</p>"
                * 1_000_000 + b"</body></html>"))
  path = tmp_path / "bounds.warc.gz"
  write_pages(str(path), pages)
  cfg = refinedweb.get_config()
  cfg.langid.keep = ()
  cfg.bounds.max_html_bytes = 4 << 20
  funnel = Funnel()
  list(process_files([str(path)], build_stages(cfg), funnel))
  extract = funnel.stages["extract"]
  assert extract.dropped["html_too_large"] == 1
  assert extract.fallbacks == {"too_deep": 1}
  assert extract.docs_in == 8


@pytest.mark.parametrize("field,value", [("max_depth", 3),
                                         ("max_html_bytes", 10),
                                         ("time_budget_s", 0)])
def test_bad_bounds_name_the_field(field, value):
  from configs.data import refinedweb
  from data_pipeline import config
  cfg = refinedweb.get_config()
  setattr(cfg.bounds, field, value)
  with pytest.raises(config.ConfigError, match=f"config.bounds.{field}"):
    config.load(cfg)
