"""Locates the real sample data fetched by scripts/fetch_data.py (DATA.md).

A plain module (not conftest) so tests can import it by a unique name."""

import glob
import os

from mllm_jax.paths import data_path

LO_LANGS = {"en": "en-US", "de": "de", "fr": "fr", "es": "es", "ja": "ja"}


def pywb_warcs() -> str:
  return data_path("pywb", "pywb-2.10.0", "sample_archive", "warcs")


def libreoffice_pages(lang: str) -> list[str]:
  """Sorted HTML help pages of one language (same relative paths in all)."""
  code = LO_LANGS[lang]
  root = data_path(f"libreoffice-help-{code.lower()}", "usr", "share",
                   "libreoffice", "help", code, "text")
  return sorted(glob.glob(os.path.join(root, "**", "*.html"), recursive=True))


def python_doc_pairs() -> list[tuple[str, str]]:
  """(html page, its _sources/*.rst.txt) pairs from the Python 3.11 docs."""
  root = data_path("python3.11-doc", "usr", "share", "doc", "python3.11", "html")
  pairs = []
  for src in sorted(glob.glob(os.path.join(root, "_sources", "**", "*.rst.txt"),
                              recursive=True)):
    rel = os.path.relpath(src, os.path.join(root, "_sources"))[:-len(".rst.txt")]
    page = os.path.join(root, rel + ".html")
    if os.path.exists(page):
      pairs.append((page, src))
  return pairs
