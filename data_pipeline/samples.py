"""The real sample pages fetched by scripts/fetch_data.py (DATA.md), and a
small multilingual crawl built from them for the demo.
"""

from __future__ import annotations

import glob
import os
import shutil

from data_pipeline.warc_write import write_pages
from mllm_jax.paths import data_path

LO_LANGS = {"en": "en-US", "de": "de", "fr": "fr", "es": "es", "ja": "ja"}
# Languages fetched for the multilingual checks (Chinese and Korean too); the
# demo's sample crawl keeps to LO_LANGS.
LO_ALL_LANGS = dict(LO_LANGS, zh="zh-CN", ko="ko")


def pywb_warcs() -> str:
  """pywb's sample_archive/warcs: real crawls, revisits and broken files."""
  return data_path("pywb", "pywb-2.10.0", "sample_archive", "warcs")


def libreoffice_pages(lang: str) -> list[str]:
  """Sorted HTML help pages of one language (same relative paths in all)."""
  code = LO_ALL_LANGS[lang]
  root = data_path(f"libreoffice-help-{code.lower()}", "usr", "share",
                   "libreoffice", "help", code, "text")
  return sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True))


def python_doc_pairs() -> list[tuple[str, str]]:
  """(html page, its _sources/*.rst.txt) pairs from the Python 3.11 docs."""
  root = data_path("python3.11-doc", "usr", "share", "doc", "python3.11",
                   "html")
  pairs = []
  for src in sorted(glob.glob(os.path.join(root, "_sources", "**", "*.rst.txt"),
                              recursive=True)):
    rel = os.path.relpath(src, os.path.join(root, "_sources"))[
        :-len(".rst.txt")]
    page = os.path.join(root, rel + ".html")
    if os.path.exists(page):
      pairs.append((page, src))
  return pairs


def write_sample_crawl(out_dir: str, every: int = 8, shards: int = 4) -> str:
  """WARC shards of LibreOffice help pages in five languages (every N-th
  page), Python docs pages, and pywb's iana.org crawl; returns their glob."""
  os.makedirs(out_dir, exist_ok=True)
  pages = []
  for lang in LO_LANGS:
    for path in libreoffice_pages(lang)[::every]:
      url = f"https://help.libreoffice.org/{lang}/{path.split('/text/')[1]}"
      pages.append((url, open(path, "rb").read()))
  for page, _ in python_doc_pairs()[::every]:
    url = "https://docs.python.org/3.11/" + page.split("/html/")[1]
    pages.append((url, open(page, "rb").read()))
  for k in range(shards):
    write_pages(os.path.join(out_dir, f"crawl-{k}.warc.gz"), pages[k::shards])
  shutil.copy(os.path.join(pywb_warcs(), "iana.warc.gz"), out_dir)
  return os.path.join(out_dir, "*.warc.gz")
