"""Data mixtures: the LLaMA pretraining table and the tiny Shakespeare one.

`mixture(name, root=..., tokenizer=...)` returns an ml_collections ConfigDict
with every DataConfig field, so `--config.data.seq_len=...` overrides work
and a misspelt field is rejected. Sources point at ROOT/<source>/*.tokens.npy
as written by `python -m launch.tokenize_corpus --name=<source>`.
"""

import os

import ml_collections

from mllm_jax.data.samples import shakespeare_mixture

# LLaMA (Touvron et al. 2023, Table 1): (source, sampling proportion %,
# epochs over the 1.4T tokens). Proportions are of tokens.
LLAMA = (
    ("commoncrawl", 67.0, 1.10),
    ("c4", 15.0, 1.06),
    ("github", 4.5, 0.64),
    ("wikipedia", 4.5, 2.45),
    ("books", 4.5, 2.23),
    ("arxiv", 2.5, 1.06),
    ("stackexchange", 2.0, 1.03),
)


def llama_mixture(root: str, tokenizer: str, seq_len: int = 2048,
                  seed: int = 0) -> dict:
  return dict(
      sources=tuple((name, os.path.join(root, name, "*.tokens.npy"), weight,
                     epochs) for name, weight, epochs in LLAMA),
      eval_sources=(("held_out", os.path.join(root, "held_out",
                                              "*.tokens.npy")),),
      tokenizer=tokenizer, seq_len=seq_len, seed=seed, weight_by="tokens",
      repeat=False)


def mixture(name: str, root: str = "data", tokenizer: str = "",
            **overrides) -> ml_collections.ConfigDict:
  """'llama' (root = shard directory) or 'shakespeare' (root = the data dir
  that mllm_jax.data.samples.prepare_shakespeare fills)."""
  if name == "llama":
    values = llama_mixture(root, tokenizer or os.path.join(root,
                                                           "tokenizer.model"))
  elif name == "shakespeare":
    values = shakespeare_mixture(root)
  else:
    raise ValueError(f"unknown mixture {name!r}; known: llama, shakespeare")
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f"unknown data field {sorted(unknown)[0]!r}")
  config = ml_collections.ConfigDict({**values, **overrides})
  config.lock()
  return config


def get_config(name: str = "shakespeare") -> ml_collections.ConfigDict:
  """`--config=configs/mixtures.py:llama` prints or checks one mixture."""
  return ml_collections.ConfigDict({"data": mixture(name)})
