r"""Converts LLaMA checkpoints between HuggingFace and native (Orbax) formats,
and imports llama.cpp GGUF files.

  # HuggingFace directory (config.json + *.safetensors) -> native checkpoint
  python -m launch.convert_checkpoint --from=hf --input=HF_DIR --output=DIR

  # LLaMA-architecture GGUF file (any quantisation) -> native checkpoint,
  # float32, with the file's tokenizer and chat template in DIR
  python -m launch.convert_checkpoint --from=gguf --input=FILE.gguf \
      --output=DIR

  # native checkpoint -> a directory LlamaForCausalLM.from_pretrained loads
  python -m launch.convert_checkpoint --from=native --input=DIR \
      --output=HF_DIR [--weight_dtype=bfloat16] [--max_shard_mb=5120]

Only plain LlamaForCausalLM models convert; anything our decoder would compute
differently (biases, other activations or RoPE variants) is refused with the
config field named. --from=hf copies no tokenizer files: copy them alongside.
A GGUF file that is not a plain LLaMA (another architecture, biases, experts),
truncated, or holds a tensor type the `gguf` package cannot dequantise is
refused with the file and the problem named (docs/modeling.md, "Base models
from GGUF").
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import gguf, hf
from launch.flags import quiet_library_logs, require_flags

_FROM = flags.DEFINE_enum(
    "from", None, ["hf", "native", "gguf"],
    "Format of --input: 'hf' (a HuggingFace LLaMA directory), 'native' "
    "(model_config.json + Orbax params; the output is HF) or 'gguf' (a "
    "llama.cpp GGUF file of a LLaMA-architecture model; the output is "
    "native, with the tokenizer).")
_INPUT = flags.DEFINE_string(
    "input", None, "Checkpoint directory to read (a .gguf file for "
    "--from=gguf).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a checkpoint already in --output.")
_WEIGHT_DTYPE = flags.DEFINE_enum(
    "weight_dtype", None, ["float32", "bfloat16", "float16"],
    "--from=hf/gguf: the native model.param_dtype (default float32, exact "
    "for any HF dtype and any dequantised GGUF tensor). --from=native: dtype of the written safetensors (default: "
    "the checkpoint's param_dtype).")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"],
    "--from=hf/gguf only: the native model.dtype used for compute (default: "
    "ModelConfig's).")
_MAX_SHARD_MB = flags.DEFINE_integer(
    "max_shard_mb", 5120,
    "--from=native only: split model.safetensors into shards of at most this "
    "many MiB, with a model.safetensors.index.json.")


def convert() -> None:
  """Runs the conversion the flags ask for and logs what was written."""
  if _FROM.value in ("hf", "gguf"):
    overrides = {}
    if _WEIGHT_DTYPE.value:
      overrides["param_dtype"] = _WEIGHT_DTYPE.value
    if _DTYPE.value:
      overrides["dtype"] = _DTYPE.value
    to_native = hf.hf_to_native if _FROM.value == "hf" else gguf.gguf_to_native
    cfg = to_native(_INPUT.value, _OUTPUT.value, _OVERWRITE.value,
                    **overrides)
  else:
    if _DTYPE.value:
      raise app.UsageError("--dtype applies to --from=hf and --from=gguf "
                           "only")
    cfg = hf.native_to_hf(_INPUT.value, _OUTPUT.value, _WEIGHT_DTYPE.value,
                          _MAX_SHARD_MB.value * 2**20, _OVERWRITE.value)
  logging.info("wrote %s (%d layers, embed %d, %d heads / %d kv heads)",
               _OUTPUT.value, cfg.num_layers, cfg.embed_dim, cfg.num_heads,
               cfg.kv_heads)


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  require_flags(_FROM, _INPUT, _OUTPUT)
  if _MAX_SHARD_MB.value <= 0:
    raise app.UsageError("--max_shard_mb must be positive")
  try:
    convert()
  except (ConfigError, FileNotFoundError, FileExistsError) as e:
    # Bad input is the user's to fix: say what, without a traceback.
    sys.exit(f"convert_checkpoint: error: {e}")


if __name__ == "__main__":
  app.run(main)
