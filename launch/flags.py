"""Flag helpers shared by the binaries in launch/ (never imported by the
library): console hygiene, required flags, and the flag groups several
binaries define the same way."""

import dataclasses
import os

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


@dataclasses.dataclass(frozen=True)
class TeacherFlags:
  """The flags of one teacher (a model that answers chat conversations:
  `data.instructions.Teacher`) under a role name, e.g. "teacher" or "judge":
  --ROLE=native:DIR|openai:URL, --ROLE_model, --ROLE_tokenizer, and the
  request flags --api_key_env, --timeout_s, --max_retries, --concurrency."""
  role: str
  spec: flags.FlagHolder
  model: flags.FlagHolder
  tokenizer: flags.FlagHolder
  api_key_env: flags.FlagHolder
  timeout_s: flags.FlagHolder
  max_retries: flags.FlagHolder
  concurrency: flags.FlagHolder

  def check(self) -> tuple[str, str]:
    """(kind, DIR or URL) after the usage checks, which name the flag; cheap,
    so a binary calls it with its other checks, before anything loads."""
    require_flags(self.spec)
    flag = f"--{self.role}"
    kind, _, where = self.spec.value.partition(":")
    if kind not in ("native", "openai") or not where:
      raise app.UsageError(f"{flag} must be native:DIR or openai:URL, got "
                           f"{self.spec.value!r}")
    openai_only = (self.model, self.api_key_env, self.timeout_s,
                   self.max_retries, self.concurrency)
    for holder in {"openai": (self.tokenizer,), "native": openai_only}[kind]:
      if flags.FLAGS[holder.name].present:
        other = "native:DIR" if kind == "openai" else "openai:URL"
        raise app.UsageError(f"--{holder.name} applies to {flag}={other} "
                             f"only")
    if kind == "openai":
      require_flags(self.model)
      if not where.startswith(("http://", "https://")):
        raise app.UsageError(f"{flag}=openai:URL needs an http:// or "
                             f"https:// URL, got {where!r}")
      if self.timeout_s.value <= 0:
        raise app.UsageError("--timeout_s must be > 0")
      if self.max_retries.value < 0:
        raise app.UsageError("--max_retries must be >= 0")
      if self.concurrency.value < 1:
        raise app.UsageError("--concurrency must be >= 1")
    return kind, where


def define_teacher_flags(role: str = "teacher") -> TeacherFlags:
  """Defines one teacher's flags (TeacherFlags) in the calling binary, which
  checks them early with `.check()` and builds the teacher with
  teacher_from_flags: one spelling for every binary that asks a model for
  text (the data generators' teacher, the image judge). Adopt them as in
  define_text_flags."""
  openai = f"--{role}=openai:URL"
  return TeacherFlags(
      role=role,
      spec=flags.DEFINE_string(
          role, None, "native:DIR (a native checkpoint, sampled with the "
          "compiled sampler) or openai:URL (an OpenAI-compatible server; "
          "requests go to URL/v1/chat/completions, a trailing /v1 is "
          "accepted)."),
      model=flags.DEFINE_string(f"{role}_model", None,
                                f"{openai}: the model name to ask."),
      tokenizer=flags.DEFINE_string(
          f"{role}_tokenizer", None, f"--{role}=native:DIR: tokenizer file "
          "or directory, or 'bytes'; default: the one saved in DIR."),
      api_key_env=flags.DEFINE_string(
          "api_key_env", None, f"{openai}: environment variable holding the "
          "API key (sent as a Bearer token; never printed)."),
      timeout_s=flags.DEFINE_float("timeout_s", 120.0,
                                   f"{openai}: seconds per request attempt."),
      max_retries=flags.DEFINE_integer(
          "max_retries", 3, f"{openai}: retries of a failed request "
          "(timeouts, connection errors, HTTP 408/429/5xx, malformed JSON)."),
      concurrency=flags.DEFINE_integer("concurrency", 8,
                                       f"{openai}: requests in flight."))


def teacher_from_flags(tf: TeacherFlags, batch_size: int):
  """The Teacher the flags name, after `tf.check()` (usage errors naming
  the flag). A missing checkpoint, a bad URL or an unset API key raise
  FileNotFoundError / instructions.TeacherError. batch_size: prompts per
  batch of a native teacher."""
  from mllm_jax.data import instructions  # pylint: disable=g-import-not-at-top
  kind, where = tf.check()
  if kind == "openai":
    return instructions.OpenAITeacher(
        where, tf.model.value, tf.api_key_env.value,
        timeout_s=tf.timeout_s.value, max_retries=tf.max_retries.value,
        concurrency=tf.concurrency.value)
  if not os.path.isdir(where):
    raise FileNotFoundError(f"--{tf.role}: checkpoint directory {where} "
                            f"does not exist")
  return instructions.NativeTeacher.from_checkpoint(
      where, tf.tokenizer.value, batch_size=batch_size)


def vocab_mismatch(tokenizer, checkpoint: str,
                   allow_padding: bool = False) -> str | None:
  """Why ``tokenizer`` cannot drive the checkpoint's model (text or
  multimodal), or None.

  Checked before the weights load: a tokenizer larger than the model feeds
  it ids it has no embedding for (always refused); a model larger than the
  tokenizer samples ids the tokenizer cannot decode and was usually trained
  with another tokenizer (refused unless ``allow_padding`` says the extra
  rows are padding; then only logged).
  """
  from mllm_jax.convert import multimodal as mm_io  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
  model_size = (mm_io.read_config(checkpoint).model.vocab_size
                if mm_io.is_multimodal(checkpoint)
                else native.read_config(checkpoint).vocab_size)
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
