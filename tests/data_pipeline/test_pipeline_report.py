"""The whole per-document chain on a WARC of real pages, and its report."""

import json
import os
import re

import pytest

from data_pipeline.document import Funnel
from data_pipeline.pipeline import build_stages, process_files
from data_pipeline.report import write_report
from data_pipeline.warc_write import write_pages
from dp_corpora import libreoffice_pages, python_doc_pairs


@pytest.fixture(scope="module")
def warcs(tmp_path_factory):
  root = tmp_path_factory.mktemp("warc")
  paths = []
  for lang in ("en", "de", "ja"):
    pages = [(f"https://help.libreoffice.org/{lang}/{i}", open(p, "rb").read())
             for i, p in enumerate(libreoffice_pages(lang)[::20])]
    path = str(root / f"lo-{lang}.warc.gz")
    write_pages(path, pages)
    paths.append(path)
  path = str(root / "py.warc.gz")
  write_pages(path, [(f"https://docs.python.org/3.11/{i}", open(p, "rb").read())
                     for i, (p, _) in enumerate(python_doc_pairs()[::4])])
  return paths + [path]


def test_chain_counts_add_up_and_report_is_written(warcs, pywb_dir, tmp_path):
  funnel = Funnel()
  inputs = warcs + [os.path.join(pywb_dir, "iana.warc.gz"),
                    os.path.join(pywb_dir, "bad.arc")]
  out = list(process_files(inputs, build_stages(), funnel))
  funnel.check()
  names = list(funnel.stages)
  assert names[:3] == ["read", "url_filter", "extract"]
  for prev, cur in zip(names, names[1:]):
    assert funnel.stages[prev].docs_out == funnel.stages[cur].docs_in
  assert funnel.stages[names[-1]].docs_out == len(out) > 20
  langs = {d.metadata["language"] for d in out}
  assert {"en", "de"} <= langs
  assert all(d.text and not re.search(r"https?://\w", d.text) for d in out)
  files = write_report(funnel, str(tmp_path))
  stats = json.load(open(files["stats"]))
  assert [s["name"] for s in stats["stages"]] == names
  assert all(s["docs_in"] == s["docs_out"] + sum(s["dropped"].values())
             for s in stats["stages"])
  assert "read/skip:request" in stats["dropped_samples"]
  report = open(files["markdown"]).read()
  assert all(f"| {n} |" in report for n in names)
  png = open(files["plot"], "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_config_errors_name_the_field():
  class Cfg:
    class quality:
      filters = ("gopher", "c5")
  with pytest.raises(ValueError, match="quality.filters"):
    build_stages(Cfg)


def test_refinedweb_config_builds_the_chain(warcs):
  from configs.data import refinedweb
  cfg = refinedweb.get_config()
  stages = build_stages(cfg)
  assert [s.name for s in stages] == ["url_filter", "extract", "langid",
                                      "repetition", "quality_gopher", "lines"]
  funnel = Funnel()
  out = list(process_files(warcs[:2], stages, funnel))
  assert out and {d.metadata["language"] for d in out} == {"en"}
  assert funnel.stages["langid"].dropped["not_kept"] > 0  # German pages.
  cfg.quality.filters = ("gopher", "fineweb")
  cfg.langid.enabled = False
  names = [s.name for s in build_stages(cfg)]
  assert "langid" not in names and "quality_fineweb" in names
