"""Perplexity on held-out text, per token and per byte.

Per-token perplexity depends on the tokenizer; per-byte numbers (bits per
byte, byte perplexity) do not, so they compare models with different
vocabularies. Long documents are cut into disjoint windows of `max_len`
tokens; each window's first token is conditioned on the previous window's
last token only (a cheap approximation that slightly overstates
perplexity; lm-eval's rolling windows do the same).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np


def _windows(ids: Sequence[int], max_len: int) -> list[list[int]]:
  """Overlap-by-one windows: each predicts max_len - 1 new tokens."""
  step = max_len - 1
  return [list(ids[s:s + max_len]) for s in range(0, len(ids) - 1, step)]


def token_nll(scorer, documents: Sequence[Sequence[int]]) -> tuple[float, int]:
  """Total negative log-likelihood (nats) of every token after the first of
  each document, and how many tokens that is."""
  windows = [w for doc in documents for w in _windows(doc, scorer.max_len)
             if len(w) > 1]
  total, count = 0.0, 0
  for logp, _ in scorer.sequence_logprobs(windows):
    total -= float(np.sum(logp, dtype=np.float64))
    count += len(logp)
  return total, count


def summarise(nll: float, tokens: int, num_bytes: int | None) -> dict:
  out = {"tokens": tokens, "nll": nll,
         "token_perplexity": math.exp(nll / tokens) if tokens else math.nan}
  if num_bytes:
    out.update(bytes=num_bytes, bits_per_byte=nll / num_bytes / math.log(2),
               byte_perplexity=math.exp(nll / num_bytes))
  return out


def text_perplexity(scorer, tokenizer, texts: Sequence[str]) -> dict:
  """Each text is encoded with BOS; every real token (and EOS) is scored.
  Bytes are the UTF-8 bytes of the texts."""
  docs = [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
  nll, count = token_nll(scorer, docs)
  return summarise(nll, count, sum(len(t.encode("utf-8")) for t in texts))


def read_token_file(path: str) -> list[list[int]]:
  """Token ids from .npy (1-D: one document; 2-D: one per row) or a text file
  with one document per line of space-separated ids."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"token file {path} does not exist")
  if path.endswith(".npy"):
    array = np.load(path)
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{path}: expected a 1-D or 2-D integer array, got "
                       f"{array.dtype} {array.shape}")
    return [array.tolist()] if array.ndim == 1 else array.tolist()
  docs = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        ids = [int(x) for x in line.split()]
      except ValueError as e:
        raise ValueError(f"{path}:{n}: not a list of integer ids") from e
      if ids:
        docs.append(ids)
  return docs


def file_perplexity(scorer, path: str, vocab_size: int | None = None) -> dict:
  """Per-token perplexity of a token-id file (no bytes: ids only)."""
  docs = read_token_file(path)
  if vocab_size is not None:
    for d in docs:
      bad = [t for t in d if not 0 <= t < vocab_size]
      if bad:
        raise ValueError(f"{path}: ids outside [0, {vocab_size}): {bad[:5]}")
  nll, count = token_nll(scorer, docs)
  return summarise(nll, count, None)
