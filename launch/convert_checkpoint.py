r"""Converts LLaMA checkpoints between HuggingFace and native (Orbax) formats,
imports llama.cpp GGUF files, and converts LoRA adapters between HF PEFT and
native adapter checkpoints.

  # HuggingFace directory (config.json + *.safetensors) -> native checkpoint
  python -m launch.convert_checkpoint --from=hf --input=HF_DIR --output=DIR

  # LLaMA-architecture GGUF file (any quantisation) -> native checkpoint,
  # float32, with the file's tokenizer and chat template in DIR
  python -m launch.convert_checkpoint --from=gguf --input=FILE.gguf \
      --output=DIR

  # native checkpoint -> a directory LlamaForCausalLM.from_pretrained loads
  # (a native multimodal checkpoint -> LlavaForConditionalGeneration's)
  python -m launch.convert_checkpoint --from=native --input=DIR \
      --output=HF_DIR [--weight_dtype=bfloat16] [--max_shard_mb=5120]

  # HF LlavaForConditionalGeneration directory -> native multimodal
  # checkpoint (CLIP tower + projector + LLaMA; convert/multimodal.py)
  python -m launch.convert_checkpoint --from=llava --input=HF_DIR \
      --output=DIR [--dtype=float32]

  # HF PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
  # -> native adapter (peft_config.json + adapter/), checked against the base
  # (a native or HF checkpoint directory) it was trained on
  python -m launch.convert_checkpoint --from=peft --input=PEFT_DIR \
      --base=BASE_DIR --output=ADAPTER_DIR

  # native LoRA adapter -> a directory peft.PeftModel.from_pretrained loads
  python -m launch.convert_checkpoint --from=adapter --input=ADAPTER_DIR \
      --output=PEFT_DIR [--base_model_name_or_path=NAME]

Only plain LlamaForCausalLM models convert; anything our decoder would compute
differently (biases, other activations or RoPE variants) is refused with the
config field named. --from=hf copies no tokenizer files: copy them alongside.
A GGUF file that is not a plain LLaMA (another architecture, biases, experts),
truncated, or holds a tensor type the `gguf` package cannot dequantise is
refused with the file and the problem named (docs/modeling.md, "Base models
from GGUF").
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import gguf, hf, multimodal, native
from mllm_jax.convert import peft as peft_io
from launch.flags import quiet_library_logs, require_flags

_FROM = flags.DEFINE_enum(
    "from", None, ["hf", "native", "gguf", "peft", "adapter", "llava"],
    "Format of --input: 'hf' (a HuggingFace LLaMA directory), 'llava' (a "
    "HuggingFace LlavaForConditionalGeneration directory; the output is a "
    "native multimodal checkpoint), 'native' (model_config.json or "
    "multimodal_config.json + Orbax params; the output is HF), 'gguf' (a "
    "llama.cpp GGUF file of a LLaMA-architecture model; the output is "
    "native, with the tokenizer), 'peft' (an HF PEFT LoRA adapter "
    "directory; the output is a native adapter for --base) or 'adapter' (a "
    "native LoRA adapter: peft_config.json + Orbax adapter/; the output is "
    "HF PEFT).")
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
    "the checkpoint's param_dtype). --from=peft with an HF --base: the "
    "model.param_dtype the adapter records for its base and stores its "
    "arrays in (default float32; give the value given to --from=hf; a "
    "native base's own is used). "
    "--from=adapter: dtype of adapter_model.safetensors (default: the "
    "adapter's param_dtype).")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"],
    "--from=hf/gguf only, and --from=peft with an HF --base: the native "
    "model.dtype used for compute (default: ModelConfig's; with "
    "--from=peft the adapter records it as its base's, so give the value "
    "given to --from=hf).")
_BASE = flags.DEFINE_string(
    "base", None, "--from=peft only (required there): the base model the "
    "adapter was trained on, a native or HuggingFace checkpoint directory. "
    "The adapter's shapes are checked against it and it records the base's "
    "architecture.")
_BASE_MODEL_NAME = flags.DEFINE_string(
    "base_model_name_or_path", None, "--from=adapter only: the "
    "base_model_name_or_path written into adapter_config.json (a hub name "
    "or a directory; default: none).")
_MAX_SHARD_MB = flags.DEFINE_integer(
    "max_shard_mb", 5120,
    "--from=native only: split model.safetensors into shards of at most this "
    "many MiB, with a model.safetensors.index.json.")


def check_flags() -> None:
  """Usage errors naming the flag, for flags this --from needs or ignores."""
  source = _FROM.value
  if source == "peft":
    require_flags(_BASE)
  elif _BASE.value is not None:
    why = ("the adapter records its base's architecture"
           if source == "adapter" else "this conversion has no base")
    raise app.UsageError(f"--base applies to --from=peft only ({why})")
  if _BASE_MODEL_NAME.value is not None and source != "adapter":
    raise app.UsageError("--base_model_name_or_path applies to "
                         "--from=adapter only")
  if _DTYPE.value and source not in ("hf", "gguf", "peft", "llava"):
    raise app.UsageError("--dtype applies to --from=hf, --from=gguf, "
                         "--from=llava and --from=peft only")


def _check_adapter_dir(path: str, expected: str, kind: str, other: str,
                       other_from: str) -> None:
  """Fails naming the missing file, with a hint when --input holds the
  other kind of adapter."""
  if (os.path.isdir(path) and not os.path.isfile(os.path.join(path, expected))
      and os.path.isfile(os.path.join(path, other))):
    raise FileNotFoundError(
        f"{os.path.join(path, expected)} is missing: {path} is not {kind} "
        f"({other} is there: use --from={other_from})")


def _check_base_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"base checkpoint directory {path} (--base) "
                            f"does not exist")
  if not any(os.path.isfile(os.path.join(path, name))
             for name in (native.CONFIG_FILE, hf.CONFIG_FILE)):
    raise FileNotFoundError(
        f"{path} (--base) is neither a native checkpoint "
        f"({native.CONFIG_FILE}) nor a HuggingFace one ({hf.CONFIG_FILE})")


def _check_output_free(path: str, names: tuple[str, ...]) -> None:
  taken = [n for n in names if os.path.exists(os.path.join(path, n))]
  if taken and not _OVERWRITE.value:
    raise FileExistsError(f"{path} already holds an adapter ({taken[0]}); "
                          f"pass --overwrite to replace it")


def convert_adapter() -> None:
  """--from=peft / --from=adapter, logging what was written."""
  path = os.path.abspath(_INPUT.value)
  output = os.path.abspath(_OUTPUT.value)
  if _FROM.value == "peft":
    _check_adapter_dir(path, peft_io.PEFT_CONFIG, "an HF PEFT adapter",
                       peft_io.ADAPTER_CONFIG, "adapter")
    base = os.path.abspath(_BASE.value)
    _check_base_dir(base)
    if os.path.isfile(os.path.join(base, native.CONFIG_FILE)):
      for holder in (_WEIGHT_DTYPE, _DTYPE):
        if holder.value:  # the adapter would record another base
          raise app.UsageError(
              f"--{holder.name} applies to an HF --base only: a native "
              f"base's {native.CONFIG_FILE} fixes the adapter's dtypes")
    _check_output_free(output, (peft_io.ADAPTER_CONFIG,
                                peft_io.ADAPTER_PARAMS))
    overrides = {}
    if _WEIGHT_DTYPE.value:
      overrides["param_dtype"] = _WEIGHT_DTYPE.value
    if _DTYPE.value:
      overrides["dtype"] = _DTYPE.value
    lora = peft_io.peft_to_native(path, output, base, _OVERWRITE.value,
                                  **overrides)
  else:
    _check_adapter_dir(path, peft_io.ADAPTER_CONFIG, "a native adapter",
                       peft_io.PEFT_CONFIG, "peft")
    _, lora = peft_io.read_adapter_config(path)
    if lora.method != "lora":
      raise ConfigError(f"{os.path.join(path, peft_io.ADAPTER_CONFIG)}: "
                        f"peft.method is {lora.method!r}; only LoRA adapters "
                        f"convert to HF PEFT")
    params_dir = os.path.join(path, peft_io.ADAPTER_PARAMS)
    if not os.path.isdir(params_dir):
      raise FileNotFoundError(f"{params_dir} is missing: the adapter has a "
                              f"config but no parameters")
    _check_output_free(output, (peft_io.PEFT_CONFIG, peft_io.PEFT_WEIGHTS))
    lora = peft_io.native_to_peft(path, output, _BASE_MODEL_NAME.value,
                                  _WEIGHT_DTYPE.value, _OVERWRITE.value)
  logging.info("wrote %s (LoRA rank %d, alpha %g%s, targets %s)", output,
               lora.rank, lora.alpha, ", rsLoRA" if lora.rslora else "",
               " ".join(lora.targets))


def convert_multimodal() -> None:
  """--from=llava, or --from=native on a multimodal checkpoint."""
  if _FROM.value == "llava":
    overrides = {}
    if _WEIGHT_DTYPE.value:
      overrides["param_dtype"] = _WEIGHT_DTYPE.value
    cfg = multimodal.llava_to_native(_INPUT.value, _OUTPUT.value,
                                     _OVERWRITE.value, _DTYPE.value,
                                     **overrides)
  else:
    cfg = multimodal.native_to_llava(_INPUT.value, _OUTPUT.value,
                                     _WEIGHT_DTYPE.value, _OVERWRITE.value)
  logging.info("wrote %s (LLaVA: CLIP %d layers / width %d, %s projector, "
               "LLaMA %d layers / embed %d, %d tokens per image)",
               _OUTPUT.value, cfg.vision.num_layers, cfg.vision.embed_dim,
               cfg.projector.projector, cfg.model.num_layers,
               cfg.model.embed_dim, cfg.tokens_per_image)


def convert() -> None:
  """Runs the conversion the flags ask for and logs what was written."""
  if _FROM.value in ("peft", "adapter"):
    convert_adapter()
    return
  if _FROM.value == "llava" or (_FROM.value == "native" and
                                multimodal.is_multimodal(_INPUT.value)):
    convert_multimodal()
    return
  if _FROM.value in ("hf", "gguf"):
    overrides = {}
    if _WEIGHT_DTYPE.value:
      overrides["param_dtype"] = _WEIGHT_DTYPE.value
    if _DTYPE.value:
      overrides["dtype"] = _DTYPE.value
    to_native = hf.hf_to_native if _FROM.value == "hf" else gguf.gguf_to_native
    cfg = to_native(_INPUT.value, _OUTPUT.value, _OVERWRITE.value,
                    **overrides)
  else:  # --dtype was refused by check_flags
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
  check_flags()
  if _MAX_SHARD_MB.value <= 0:
    raise app.UsageError("--max_shard_mb must be positive")
  try:
    convert()
  except (ConfigError, FileNotFoundError, FileExistsError) as e:
    # Bad input is the user's to fix: say what, without a traceback.
    sys.exit(f"convert_checkpoint: error: {e}")


if __name__ == "__main__":
  app.run(main)
