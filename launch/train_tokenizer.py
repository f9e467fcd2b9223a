r"""Trains a SentencePiece BPE tokenizer, or extends one with a new language.

  # a new tokenizer (byte fallback, split digits, the project's special tokens)
  python -m launch.train_tokenizer --input='corpus/*.txt' \
      --output=DIR/tokenizer --vocab_size=32000

  # extend BASE.model with pieces learned on Spanish text, keep English ids,
  # and grow a native checkpoint's embedding / LM head to match
  python -m launch.train_tokenizer --extend=BASE.model --input='es/*.jsonl' \
      --output=DIR/tokenizer_es --new_pieces=8000 --protect='en/*.txt' \
      --resize_checkpoint=CKPT --resized_checkpoint=CKPT_ES

Writes OUTPUT.model; JSONL/Parquet records that cannot be read are counted
and logged, not fatal.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from mllm_jax.configlib import ConfigError
from mllm_jax.data import readers, tokenizer, vocab
from launch import flags as launch_flags
from launch.flags import define_text_flags, require_flags

_INPUT = flags.DEFINE_string(
    "input", None, "Comma-separated globs of training text: .txt (see "
    "--text_split), .jsonl (one JSON object per line, text in --text_field) "
    "or .parquet (column --text_field).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Output prefix: writes OUTPUT.model (and OUTPUT.vocab "
    "for a new tokenizer).")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 32000, "New tokenizer: total vocabulary size, including "
    "the 4 control tokens, the special tokens and 256 byte pieces.")
_TEXT_FIELD, _TEXT_SPLIT, _CHUNK_CHARS = define_text_flags()
flags.adopt_module_key_flags(launch_flags)
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 0, "New tokenizer: train on a random sample of this "
    "many lines (0: every line). Large corpora need a cap (memory).")
_THREADS = flags.DEFINE_integer("num_threads", 2, "SentencePiece threads.")
_EXTEND = flags.DEFINE_string(
    "extend", None, "A SentencePiece BPE .model to extend instead of "
    "training from scratch: pieces learned on --input are appended (old ids "
    "unchanged).")
_NEW_PIECES = flags.DEFINE_integer(
    "new_pieces", 8000, "--extend: how many pieces to learn and append.")
_PROTECT = flags.DEFINE_string(
    "protect", None, "--extend: comma-separated globs of old-language text "
    "whose encoding must not change; merges that would alter it are skipped.")
_RESIZE = flags.DEFINE_string(
    "resize_checkpoint", None, "--extend: a native checkpoint whose "
    "embedding rows and LM-head columns grow to the new vocabulary (new "
    "entries = mean of the old ones).")
_RESIZED = flags.DEFINE_string(
    "resized_checkpoint", None, "Where to write the resized checkpoint.")
_MULTIPLE = flags.DEFINE_integer(
    "pad_vocab_multiple", 1, "Round the resized model's vocab_size up to a "
    "multiple of this (e.g. 128 for TPU-friendly shapes).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing --resized_checkpoint.")


def _texts(patterns: str, drops: readers.DropCounter) -> list[str]:
  docs = readers.read_documents(readers.expand(patterns), _TEXT_FIELD.value,
                                _TEXT_SPLIT.value, _CHUNK_CHARS.value)
  return list(drops.texts(docs))


def run() -> None:
  drops = readers.DropCounter()
  if not _EXTEND.value:
    path = tokenizer.train_sentencepiece(
        readers.expand(_INPUT.value), _OUTPUT.value, _VOCAB_SIZE.value,
        text_field=_TEXT_FIELD.value, text_split=_TEXT_SPLIT.value,
        chunk_chars=_CHUNK_CHARS.value, max_sentences=_MAX_SENTENCES.value,
        num_threads=_THREADS.value,
        drops=drops)
    logging.info("wrote %s (%d pieces)", path,
                 tokenizer.load_tokenizer(path).vocab_size)
  else:
    path = _OUTPUT.value + ".model"
    protect = _texts(_PROTECT.value, drops) if _PROTECT.value else []
    stats = vocab.extend_sentencepiece(
        _EXTEND.value, _texts(_INPUT.value, drops), path, _NEW_PIECES.value,
        protect_texts=protect)
    logging.info("wrote %s: %s", path, stats)
    if _RESIZE.value:
      size = -(-stats.new_size // _MULTIPLE.value) * _MULTIPLE.value
      cfg = vocab.resize_checkpoint(_RESIZE.value, _RESIZED.value, size,
                                    overwrite=_OVERWRITE.value)
      logging.info("wrote %s with vocab_size %d", _RESIZED.value,
                   cfg.vocab_size)
  if drops.counts:
    logging.warning("dropped records: %s", drops.summary())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  require_flags(_INPUT, _OUTPUT)
  if _RESIZE.value and not (_EXTEND.value and _RESIZED.value):
    raise app.UsageError("--resize_checkpoint needs --extend and "
                         "--resized_checkpoint")
  if _MULTIPLE.value < 1:
    raise app.UsageError("--pad_vocab_multiple must be positive")
  if _CHUNK_CHARS.value < 1:
    raise app.UsageError("--chunk_chars must be positive")
  try:
    run()
  except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f"train_tokenizer: error: {e}")


if __name__ == "__main__":
  app.run(main)
