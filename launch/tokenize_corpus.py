r"""Tokenizes text / JSONL / Parquet files into token shards for Grain.

  python -m launch.tokenize_corpus --input='corpus/*.jsonl' \
      --tokenizer=DIR/tokenizer.model --output_dir=SHARDS --name=train

Writes SHARDS/NAME-00000.tokens.npy (+ .offsets.npy, .meta.json) and
SHARDS/NAME.summary.json: documents and tokens kept, and records dropped by
reason (invalid_json, missing_field, not_text, empty, ...) with examples of
where. Bad records never stop the run. Point a DataConfig source at
'SHARDS/NAME-*' (see configs/mixtures.py and docs/data.md).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from mllm_jax.data import readers, shards
from mllm_jax.data.tokenizer import load_tokenizer
from launch import flags as launch_flags
from launch.flags import define_text_flags, require_flags

_INPUT = flags.DEFINE_string(
    "input", None, "Comma-separated globs: .txt (see --text_split), .jsonl "
    "(text in --text_field) or .parquet (column --text_field).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "SentencePiece .model or HuggingFace tokenizer.json.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Shard directory.")
_NAME = flags.DEFINE_string(
    "name", "train", "Shard name prefix (e.g. train, eval, commoncrawl).")
_TEXT_FIELD, _TEXT_SPLIT, _CHUNK_CHARS = define_text_flags()
flags.adopt_module_key_flags(launch_flags)
_ADD_BOS = flags.DEFINE_bool(
    "add_bos", False, "Start every document with BOS (EOS always ends it).")
_SHARD_TOKENS = flags.DEFINE_integer(
    "shard_tokens", 1 << 28, "Close a shard once it holds this many tokens.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Re-tokenize even if NAME.summary.json exists.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  require_flags(_INPUT, _TOKENIZER, _OUTPUT_DIR)
  if _SHARD_TOKENS.value <= 0 or _CHUNK_CHARS.value <= 0:
    raise app.UsageError("--shard_tokens and --chunk_chars must be positive")
  done = shards.summary_path(_OUTPUT_DIR.value, _NAME.value)
  if os.path.exists(done) and not _OVERWRITE.value:
    sys.exit(f"tokenize_corpus: error: {done} exists (pass --overwrite)")
  try:
    tok = load_tokenizer(_TOKENIZER.value)
    files = readers.expand(_INPUT.value)
    docs = readers.read_documents(files, _TEXT_FIELD.value, _TEXT_SPLIT.value,
                                  _CHUNK_CHARS.value)
    summary = shards.write_shards(docs, tok, _OUTPUT_DIR.value, _NAME.value,
                                  add_bos=_ADD_BOS.value,
                                  shard_tokens=_SHARD_TOKENS.value,
                                  inputs=files)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"tokenize_corpus: error: {e}")
  logging.info("wrote %s", done)
  print(json.dumps({k: summary[k] for k in ("documents", "tokens", "dropped")},
                   sort_keys=True))


if __name__ == "__main__":
  app.run(main)
