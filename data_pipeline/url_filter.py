"""URL filtering: domain blocklist, URL word scoring, sources kept elsewhere.

The blocklist is a set of domains (UT1 ``domains`` format: one per line, '#'
comments); a URL is blocked when its host or any parent domain is listed, so
lookups cost a handful of set probes. Loading reads the file in one go and
splits it in C, which takes about a second for millions of domains.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from data_pipeline.document import Document, Drop

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_BLOCKLIST = os.path.join(ASSETS, "blocklist_default.txt")
DEFAULT_WORDS = os.path.join(ASSETS, "url_words.txt")
_TOKEN = re.compile(r"[a-z0-9]+")


def load_domains(path: str) -> frozenset[str]:
  """Reads a domain list fast: one domain per line, blanks and '#' ignored."""
  with open(path, "rb") as f:
    data = f.read().decode("utf-8", "ignore").lower()
  lines = (line.strip() for line in data.splitlines())
  return frozenset(d.lstrip(".") for d in lines if d and d[0] != "#")


def load_words(path: str) -> tuple[frozenset[str], dict[str, float]]:
  """Reads ``hard WORD`` / ``soft WORD [WEIGHT]`` lines into the two lists."""
  hard, soft = set(), {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.split("#")[0].split()
      if not parts:
        continue
      if parts[0] == "hard":
        hard.add(parts[1].lower())
      elif parts[0] == "soft":
        soft[parts[1].lower()] = float(parts[2]) if len(parts) > 2 else 1.0
      else:
        raise ValueError(f"{path}: expected 'hard WORD' or 'soft WORD [W]': {line!r}")
  return frozenset(hard), soft


def host_of(url: str) -> str:
  try:
    host = urllib.parse.urlsplit(url).hostname or ""
  except ValueError:
    return ""
  return host.lower().rstrip(".")


def _parents(host: str):
  """example.co.uk -> example.co.uk, co.uk, uk (cheap; suffixes never match)."""
  while host:
    yield host
    _, _, host = host.partition(".")


class URLFilter:
  """Drops blocked domains, URLs with hard words or too much soft-word score,
  and sources curated elsewhere (e.g. wikipedia, arxiv)."""

  def __init__(self, blocklist: str | None = DEFAULT_BLOCKLIST,
               words: str | None = DEFAULT_WORDS, soft_threshold: float = 3.0,
               excluded_domains: tuple[str, ...] = ("wikipedia.org", "arxiv.org")):
    self.blocked = load_domains(blocklist) if blocklist else frozenset()
    self.hard, self.soft = load_words(words) if words else (frozenset(), {})
    self.soft_threshold = soft_threshold
    self.excluded = frozenset(d.lower() for d in excluded_domains)

  def __call__(self, doc: Document) -> Document | Drop:
    host = host_of(doc.url)
    if not host:
      return Drop("bad_url")
    for parent in _parents(host):
      if parent in self.excluded:
        return Drop("excluded_source")
      if parent in self.blocked:
        return Drop("blocklist")
    tokens = set(_TOKEN.findall(doc.url.lower()))
    if tokens & self.hard:
      return Drop("hard_word")
    score = sum(self.soft.get(t, 0.0) for t in tokens)
    if score >= self.soft_threshold:
      return Drop("soft_words")
    return doc
