"""URL deduplication across dumps: one document per normalised URL, the one
with the latest crawl date wins (ties: the later one in input order).

``LatestPerURL`` streams: each document adds a 128-bit hash of its normalised
URL, its date and its index to one of ``buckets`` spill files (by hash), so
memory holds one bucket at a time plus a keep bit per document, never the
URLs themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
from typing import Sequence

import numpy as np

_TRACKING = ("utm_", "fbclid", "gclid", "mc_", "ref")
_DIGITS = re.compile(r"\d")


def normalise_url(url: str) -> str:
  """Lower-case scheme/host, no default port, 'www.', fragment or tracking
  parameters; sorted query; http and https treated alike."""
  try:
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port
  except ValueError:
    return url.strip()
  if host.startswith("www."):
    host = host[4:]
  netloc = host if port in (None, 80, 443) else f"{host}:{port}"
  query = sorted((k, v) for k, v in urllib.parse.parse_qsl(
      parts.query, keep_blank_values=True) if not k.lower().startswith(_TRACKING))
  path = re.sub(r"/{2,}", "/", parts.path or "/")
  if len(path) > 1:
    path = path.rstrip("/") or "/"
  return f"{netloc}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def date_key(date: str) -> int:
  """An ISO 8601 date (WARC-Date) as an integer that sorts like it:
  YYYYMMDDhhmmss from its first 14 digits, padded; no date sorts first."""
  digits = "".join(_DIGITS.findall(date or ""))[:14]
  return int(digits.ljust(14, "0")) if digits else 0


class LatestPerURL:
  """Streaming keep mask: ``add`` every document in corpus order, then
  ``keep()`` is True for the winning document of each normalised URL."""

  def __init__(self, workdir: str, buckets: int = 1,
               flush_rows: int = 1 << 16):
    """``flush_rows``: records buffered before they go to the bucket files."""
    self.workdir, self.buckets, self.flush_rows = workdir, buckets, flush_rows
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    self._rows: list[tuple[int, int, int, int]] = []
    self.count = 0

  def add(self, url: str, date: str) -> None:
    digest = hashlib.blake2b(normalise_url(url).encode("utf-8", "replace"),
                             digest_size=16).digest()
    self._rows.append((int.from_bytes(digest[:8], "little"),
                       int.from_bytes(digest[8:], "little"),
                       date_key(date), self.count))
    self.count += 1
    if len(self._rows) >= self.flush_rows:
      self._flush()

  def _path(self, bucket: int) -> str:
    return os.path.join(self.workdir, f"bucket{bucket:03d}.bin")

  def _flush(self) -> None:
    if not self._rows:
      return
    rows = np.array(self._rows, np.uint64)
    bucket = rows[:, 0] % np.uint64(self.buckets)
    for b in range(self.buckets):
      sel = rows[bucket == b]
      if len(sel):
        with open(self._path(b), "ab") as f:
          f.write(sel.tobytes())
    self._rows = []

  def keep(self) -> np.ndarray:
    self._flush()
    keep = np.zeros(self.count, bool)
    for b in range(self.buckets):
      if not os.path.exists(self._path(b)):
        continue
      rows = np.fromfile(self._path(b), np.uint64).reshape(-1, 4)
      # Sorted by URL, then date, then index: the last of each URL wins.
      rows = rows[np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))]
      same = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
      last = np.concatenate([~same, [True]])
      keep[rows[last, 3].astype(np.int64)] = True
    shutil.rmtree(self.workdir, ignore_errors=True)
    return keep


def latest_per_url(urls: Sequence[str], dates: Sequence[str]) -> list[bool]:
  """Keep mask for in-memory lists (``LatestPerURL`` in a temp dir)."""
  with tempfile.TemporaryDirectory() as tmp:
    dedup = LatestPerURL(os.path.join(tmp, "urls"))
    for url, date in zip(urls, dates):
      dedup.add(url, date)
    return dedup.keep().tolist()
