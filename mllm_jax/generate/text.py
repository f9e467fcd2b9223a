"""Tokenizers as the sampler and evaluation see them.

Anything with `encode(text, add_bos=False, add_eos=False)`, `decode(ids)`,
`vocab_size`, `bos_id`, `eos_id` and `pad_id` works (the project tokenizer in
mllm_jax.data.tokenizer is one). `ByteTokenizer` needs no file, so tests and
tiny byte-level models run anywhere.
"""

from __future__ import annotations

import os
from typing import Any


class ByteTokenizer:
  """UTF-8 bytes shifted past three specials: pad 0, BOS 1, EOS 2."""
  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = [b + self.offset for b in text.encode("utf-8")]
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")


def load_tokenizer(path: str) -> Any:
  """'bytes' -> ByteTokenizer; otherwise the project tokenizer at `path`."""
  if path == "bytes":
    return ByteTokenizer()
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path} does not exist (give a "
                            f"tokenizer file, or 'bytes' for byte-level ids)")
  try:
    from mllm_jax.data import tokenizer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"cannot load {path}: mllm_jax.data.tokenizer is not "
                      f"available ({e})") from e
  return tokenizer.load_tokenizer(path)
