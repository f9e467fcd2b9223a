"""Shared fixtures for the data pipeline tests."""

import pytest

from dp_corpora import pywb_warcs


@pytest.fixture(scope="session")
def pywb_dir():
  return pywb_warcs()
