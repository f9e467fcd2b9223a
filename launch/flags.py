"""Flag helpers shared by the binaries in launch/ (never imported by the
library): console hygiene, required flags, and the flag groups several
binaries define the same way."""

from absl import app, flags, logging


def quiet_library_logs() -> None:
  """Shows warnings and errors only, unless the user passed --verbosity/-v.

  Orbax and JAX log every checkpoint step at INFO through absl; the binaries
  print their own progress lines, so library INFO is opt-in (`-v 0`).
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def require_flags(*holders: flags.FlagHolder) -> None:
  """Usage error naming the first flag left unset or empty."""
  for holder in holders:
    if not holder.value:
      raise app.UsageError(f"--{holder.name} is required")


def define_text_flags() -> tuple[flags.FlagHolder, ...]:
  """--text_field, --text_split and --chunk_chars: how the text binaries
  (train_tokenizer, tokenize_corpus) read documents (readers.read_documents).

  Binaries then call ``flags.adopt_module_key_flags(launch_flags)`` so that
  ``--help`` lists flags defined here (absl lists the main module's only)."""
  from mllm_jax.data import readers  # pylint: disable=g-import-not-at-top
  return (
      flags.DEFINE_string("text_field", "text",
                          "JSONL key / Parquet column holding the text."),
      flags.DEFINE_enum(
          "text_split", "file", list(readers.TEXT_SPLITS),
          "How .txt files divide into documents: whole file, runs of "
          "paragraphs of about --chunk_chars characters, paragraphs, or "
          "lines."),
      flags.DEFINE_integer("chunk_chars", 4000,
                           "--text_split=chunk: characters per document."))


def define_inference_flags() -> tuple[flags.FlagHolder, ...]:
  """--checkpoint, --tokenizer, --mesh and --allow_vocab_padding of the
  binaries that load a native checkpoint to run it (generate, evaluate);
  adopt them as in define_text_flags. The mesh is read with mesh_from_flag,
  the last one passed to vocab_mismatch."""
  return (
      flags.DEFINE_string("checkpoint", None, "Native checkpoint directory."),
      flags.DEFINE_string(
          "tokenizer", None, "Tokenizer file or directory, or 'bytes'; "
          "default: the tokenizer saved in the checkpoint directory."),
      flags.DEFINE_string(
          "mesh", "", "Device mesh as axis=size pairs, e.g. 'data=2,fsdp=2,"
          "tensor=2' (axes data, stage, fsdp, sequence, tensor; unnamed axes "
          "are 1; one may be -1 for the remaining devices). Parameters are "
          "sharded by the default rules and batches split over data x fsdp. "
          "Empty: one device."),
      flags.DEFINE_bool(
          "allow_vocab_padding", False, "Run a model whose vocabulary is "
          "larger than the tokenizer's because it was padded (e.g. "
          "train_tokenizer --pad_vocab_multiple, or HF models padded to a "
          "multiple of 64); a sampled padding id prints as U+FFFD."))


def vocab_mismatch(tokenizer, checkpoint: str,
                   allow_padding: bool = False) -> str | None:
  """Why ``tokenizer`` cannot drive the checkpoint's model, or None.

  Checked before the weights load: a tokenizer larger than the model feeds
  it ids it has no embedding for (always refused); a model larger than the
  tokenizer samples ids the tokenizer cannot decode and was usually trained
  with another tokenizer (refused unless ``allow_padding`` says the extra
  rows are padding; then only logged).
  """
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  model_size = native.read_config(checkpoint).vocab_size
  if tokenizer.vocab_size == model_size:
    return None
  sizes = (f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids "
           f"but the model in {checkpoint} has vocab_size {model_size}")
  if tokenizer.vocab_size > model_size:
    return (f"vocabulary mismatch: {sizes} (the tokenizer is larger); give "
            "the --tokenizer the model was trained with")
  if allow_padding:
    logging.warning("%s: ids past the tokenizer's are padding "
                    "(--allow_vocab_padding)", sizes)
    return None
  return (f"vocabulary mismatch: {sizes} (the model is larger); give the "
          "--tokenizer the model was trained with, or --allow_vocab_padding "
          "if the extra rows are padding")


def mesh_from_flag(holder: flags.FlagHolder):
  """The Mesh the --mesh flag names, or None when it is empty."""
  if not holder.value:
    return None
  from mllm_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  cfg = mesh.parse_mesh(holder.value)
  return mesh.make_mesh(cfg)


def start_process() -> None:
  """What every training binary does first: quiet library logs, join the
  other hosts (jax.distributed), and on CPU keep freed memory mapped."""
  import jax  # pylint: disable=g-import-not-at-top
  from mllm_jax.parallel.mesh import initialize_distributed  # pylint: disable=g-import-not-at-top
  from mllm_jax.runtime import keep_freed_memory  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  initialize_distributed()
  if jax.default_backend() == "cpu":
    keep_freed_memory()
