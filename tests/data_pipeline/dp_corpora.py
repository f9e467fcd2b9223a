"""Locates the real sample data fetched by scripts/fetch_data.py (DATA.md).

A plain module (not conftest) so tests can import it by a unique name."""

from data_pipeline.samples import (LO_LANGS, libreoffice_pages,  # noqa: F401
                                   python_doc_pairs, pywb_warcs)
