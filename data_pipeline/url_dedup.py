"""URL deduplication across dumps: one document per normalised URL, the one
with the latest crawl date wins (ties: the later one in input order)."""

from __future__ import annotations

import re
import urllib.parse
from typing import Sequence

_TRACKING = ("utm_", "fbclid", "gclid", "mc_", "ref")


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


def latest_per_url(urls: Sequence[str], dates: Sequence[str]) -> list[bool]:
  """Keep mask: True for the winning document of each normalised URL."""
  best: dict[str, int] = {}
  for i, (url, date) in enumerate(zip(urls, dates)):
    key = normalise_url(url)
    j = best.get(key)
    if j is None or date >= dates[j]:
      best[key] = i
  keep = [False] * len(urls)
  for i in best.values():
    keep[i] = True
  return keep
