"""LLaMA-architecture GGUF files (llama.cpp's format) -> native checkpoints.

A GGUF file holds the weights (often quantised), the model's hyper-parameters
and its tokenizer as metadata under llama.cpp's key names. Importing one:

  * reads the file with the `gguf` package (llama.cpp's own Python reader,
    maintained alongside the format), so every quantisation type that package
    can dequantise imports, to float32;
  * maps the metadata (`llama.block_count`, `llama.embedding_length`, ...) to
    a HuggingFace LlamaConfig dict and goes through `convert.hf`'s config
    checks, so GGUF and HF imports refuse the same things;
  * renames tensors to HF's names, undoes the row permutation llama.cpp's
    converter applies to q/k (it stores RoPE pairs interleaved; we rotate
    halves) and hands them to `hf.params_from_hf`;
  * rebuilds the tokenizer stored in the metadata as a HuggingFace
    tokenizer.json + tokenizer_config.json (with the chat template), the way
    transformers' GGUF loader does, for byte-level BPE ("gpt2") vocabularies.

Anything the decoder would compute differently (another architecture, biases,
mixture of experts, partial or YaRN RoPE) is refused with the file named.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import hf, native
from mllm_jax.modeling.config import ModelConfig

ARCHITECTURE = "llama"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# GGUF tensor name -> HF name ({i}: the layer). q/k also need un-permuting.
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# LLaMA 3.1+ files store the RoPE scaling as per-frequency divisors.
ROPE_FREQS = "rope_freqs.weight"
# Meta's LLaMA-3 RoPE settings; rope_freqs.weight must match them.
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

# llama.cpp token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, for the byte-level
# vocabularies whose split is not GPT-2's (transformers' GGUF loader makes the
# same choice; any other name gets GPT-2's regex, as there).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|"
                 r"\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx",
                     "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
# Names known to use GPT-2's regex (or one that splits this vocabulary the
# same way); others are warned about.
_GPT2_SPLIT_NAMES = ("default", "gpt2", "gpt-2", "smollm", "starcoder",
                     "refact", "codeshell", "olmo", "stablelm2")


# ----------------------------------------------------------------------------
# Reading the file
# ----------------------------------------------------------------------------


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError("reading GGUF files needs the `gguf` package "
                      "(pip install gguf; it is in requirements/core.txt)"
                      ) from e
  return gguf


class GGUFFile:
  """One GGUF file: its metadata as Python values and its tensors by name.

  Every problem (not GGUF, truncated, an unknown tensor type) is a
  ConfigError naming the file.
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if os.path.isdir(self.path):
      raise ConfigError(f"{self.path} is a directory; give the .gguf file "
                        f"itself")
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"GGUF file {self.path} does not exist")
    gguf = _gguf()
    self.size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      magic = f.read(4)
    if magic != b"GGUF":
      raise ConfigError(f"{self.path}: not a GGUF file (starts with "
                        f"{magic!r}, not b'GGUF')")
    try:
      self.reader = gguf.GGUFReader(self.path)
    except Exception as e:  # pylint: disable=broad-except
      # The reader fails with whatever numpy says when a read runs past the
      # end; say what that means.
      if "GGMLQuantizationType" in str(e):
        raise ConfigError(
            f"{self.path}: a tensor has a type the gguf package "
            f"{_version()} does not know ({e}); it cannot be dequantised "
            f"(a newer gguf may know it, or requantise the file)") from e
      raise ConfigError(f"{self.path}: cannot read this GGUF file "
                        f"({self.size} bytes): it is truncated or corrupt "
                        f"({type(e).__name__}: {e})") from e
    self.tensors = {t.name: t for t in self.reader.tensors}
    parts = self.reader.fields.get("split.count")
    if parts is not None and int(parts.contents()) > 1:
      raise ConfigError(
          f"{self.path}: one of {int(parts.contents())} parts of a split GGUF "
          f"file; merge the parts first (llama.cpp's `llama-gguf-split "
          f"--merge`)")
    for t in self.reader.tensors:
      end = int(t.data_offset) + int(t.n_bytes)
      if end > self.size or t.data.nbytes != int(t.n_bytes):
        raise ConfigError(f"{self.path}: truncated: tensor {t.name} needs "
                          f"bytes up to {end} but the file has {self.size}")
    self.metadata = {}
    for name, field in self.reader.fields.items():
      try:
        self.metadata[name] = field.contents()
      except Exception as e:  # pylint: disable=broad-except
        raise ConfigError(f"{self.path}: metadata key {name} is unreadable "
                          f"({e}); the file is corrupt") from e

  def get(self, key: str, default: Any = None) -> Any:
    return self.metadata.get(key, default)

  def require(self, key: str) -> Any:
    if key not in self.metadata:
      raise ConfigError(f"{self.path}: metadata key {key} is missing (a "
                        f"{ARCHITECTURE} GGUF file needs it)")
    return self.metadata[key]

  def field(self, key: str) -> str:
    return f"{self.path}:{key}"

  def shape(self, name: str) -> tuple[int, ...]:
    """A tensor's shape in numpy (row-major) order, e.g. [out, in]."""
    return tuple(int(d) for d in reversed(self.tensors[name].shape))

  def tensor(self, name: str) -> np.ndarray:
    """One tensor dequantised to float32, in numpy order."""
    t = self.tensors[name]
    check_dequantizable(self.path, name, t.tensor_type)
    gguf = _gguf()
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{self.path}: tensor {name} ({t.tensor_type.name}) "
                        f"could not be dequantised ({e})") from e
    return np.asarray(x, np.float32).reshape(self.shape(name))


def _version() -> str:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version("gguf")
  except Exception:  # pylint: disable=broad-except
    return "(unknown version)"


_DEQUANTIZABLE: dict[Any, bool] = {}


def dequantizable(qtype: Any) -> bool:
  """Whether `gguf.quants.dequantize` handles the type (tried once per type
  on one zero block)."""
  if qtype not in _DEQUANTIZABLE:
    gguf = _gguf()
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
      gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
      _DEQUANTIZABLE[qtype] = True
    except NotImplementedError:
      _DEQUANTIZABLE[qtype] = False
  return _DEQUANTIZABLE[qtype]


def check_dequantizable(path: str, name: str, qtype: Any) -> None:
  """Fails naming the tensor and its type when the gguf package cannot
  dequantise that type."""
  if not dequantizable(qtype):
    known = sorted(t.name for t in _gguf().GGMLQuantizationType
                   if dequantizable(t))
    raise ConfigError(
        f"{path}: tensor {name} has type {qtype.name}, which the gguf "
        f"package {_version()} cannot dequantise (it can: "
        f"{', '.join(known)})")


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def _scalar(g: GGUFFile, key: str, kind: type, value: Any) -> Any:
  if isinstance(value, (list, tuple)) or isinstance(value, (str, bytes)) != (
      kind is str):
    raise ConfigError(f"{g.field(key)}: got {value!r}; expected one "
                      f"{kind.__name__} (per-layer values are not supported)")
  if kind is float:
    # GGUF stores float32: keep its shortest spelling (1e-05, not
    # 9.999999747378752e-06), the value the model's own config had.
    return float(str(np.float32(value)))
  return kind(value)


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
  """The file's hyper-parameters as a HF LlamaConfig dict (refusing what our
  decoder cannot compute), ready for `hf.config_from_hf`."""
  arch = g.get("general.architecture")
  if arch is None:
    raise ConfigError(f"{g.field('general.architecture')}: missing; not a "
                      f"model file llama.cpp would load")
  if arch != ARCHITECTURE:
    raise ConfigError(
        f"{g.field('general.architecture')}: got {arch!r}; only "
        f"{ARCHITECTURE!r} GGUF files (the LLaMA architecture: LLaMA 1-3, "
        f"Mistral 7B, SmolLM, TinyLlama, ...) can be imported")

  def need(key, kind=int):
    return _scalar(g, f"{arch}.{key}", kind, g.require(f"{arch}.{key}"))

  def opt(key, default, kind=int):
    value = g.get(f"{arch}.{key}")
    return default if value is None else _scalar(g, f"{arch}.{key}", kind,
                                                 value)

  experts = opt("expert_count", 0)
  if experts:
    raise ConfigError(f"{g.field(arch + '.expert_count')}: {experts} experts; "
                      f"mixture-of-experts models are not supported")
  hidden, heads = need("embedding_length"), need("attention.head_count")
  head_dim = opt("attention.key_length", hidden // heads if heads else 0)
  value_dim = opt("attention.value_length", head_dim)
  if value_dim != head_dim:
    raise ConfigError(f"{g.field(arch + '.attention.value_length')}: "
                      f"{value_dim} differs from the key length {head_dim}")
  rope_dims = opt("rope.dimension_count", head_dim)
  if rope_dims != head_dim:
    raise ConfigError(f"{g.field(arch + '.rope.dimension_count')}: RoPE on "
                      f"{rope_dims} of {head_dim} head dimensions; partial "
                      f"RoPE is not supported")
  embed = "token_embd.weight"
  if embed not in g.tensors:
    raise ConfigError(f"{g.path}: tensor {embed} is missing")
  vocab = g.shape(embed)[0]
  stated = opt("vocab_size", vocab)
  if stated != vocab:
    raise ConfigError(f"{g.field(arch + '.vocab_size')}: {stated}, but "
                      f"{embed} has {vocab} rows")
  config = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": need("feed_forward_length"),
      "num_hidden_layers": need("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": opt("attention.head_count_kv", heads),
      "head_dim": head_dim,
      "rms_norm_eps": need("attention.layer_norm_rms_epsilon", float),
      "max_position_embeddings": opt("context_length", 2048),
      "rope_theta": opt("rope.freq_base", 10000.0, float),
      "tie_word_embeddings": "output.weight" not in g.tensors,
      "hidden_act": "silu",
  }
  config["rope_scaling"] = _rope_scaling(g, arch, config)
  return config


def _rope_scaling(g: GGUFFile, arch: str,
                  config: Mapping[str, Any]) -> dict[str, Any] | None:
  """HF's rope_scaling from `{arch}.rope.scaling.*` (or the older
  `rope.scale_linear`), or LLaMA-3's recipe when rope_freqs.weight is there."""
  kind = g.get(f"{arch}.rope.scaling.type")
  factor = g.get(f"{arch}.rope.scaling.factor")
  if kind is None and g.get(f"{arch}.rope.scale_linear") is not None:
    kind, factor = "linear", g.get(f"{arch}.rope.scale_linear")
  if kind not in (None, "none", "linear"):
    raise ConfigError(f"{g.field(arch + '.rope.scaling.type')}: got {kind!r}; "
                      f"supported: 'none', 'linear' (and LLaMA-3 scaling "
                      f"through {ROPE_FREQS})")
  if ROPE_FREQS in g.tensors:
    if kind == "linear" and float(factor or 1.0) != 1.0:
      raise ConfigError(f"{g.path}: both {ROPE_FREQS} and linear RoPE "
                        f"scaling are set; only one is supported")
    return _llama3_rope(g, config)
  if kind == "linear" and factor is not None and float(factor) != 1.0:
    return {"rope_type": "linear", "factor": float(factor)}
  return None


def _llama3_rope(g: GGUFFile, config: Mapping[str, Any]) -> dict[str, Any]:
  """LLaMA-3 RoPE settings that reproduce rope_freqs.weight (llama.cpp
  divides each inverse frequency by its entry), with Meta's band settings;
  a file whose divisors follow another recipe is refused."""
  from mllm_jax.modeling.layers import rope_frequencies  # pylint: disable=import-outside-toplevel
  divisors = g.tensor(ROPE_FREQS).reshape(-1).astype(np.float64)
  half = config["head_dim"] // 2
  if divisors.shape != (half,):
    raise ConfigError(f"{g.path}: tensor {ROPE_FREQS} has {divisors.size} "
                      f"entries; the head size implies {half}")
  rope = {"rope_type": "llama3", "factor": float(divisors.max()),
          **_LLAMA3_ROPE}
  base = dict(embed_dim=config["hidden_size"],
              num_heads=config["num_attention_heads"],
              head_dim=config["head_dim"], rope_theta=config["rope_theta"])
  plain = rope_frequencies(ModelConfig(**base))
  scaled = rope_frequencies(ModelConfig(
      **base, rope_scaling="llama3", rope_scaling_factor=rope["factor"],
      rope_low_freq_factor=rope["low_freq_factor"],
      rope_high_freq_factor=rope["high_freq_factor"],
      rope_original_max_len=rope["original_max_position_embeddings"]))
  if not np.allclose(plain / scaled, divisors, rtol=1e-4):
    raise ConfigError(
        f"{g.path}: tensor {ROPE_FREQS} does not follow LLaMA-3 RoPE scaling "
        f"(factor {rope['factor']:g}, low/high frequency factors 1/4, "
        f"original length 8192); other per-frequency scalings are not "
        f"supported")
  return rope


def config_from_gguf(g: GGUFFile, **overrides: Any) -> ModelConfig:
  """The ModelConfig of a GGUF file; `overrides` as in hf.config_from_hf."""
  return hf.config_from_hf(hf_config_from_gguf(g), g.path, **overrides)


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def hf_name(name: str) -> str | None:
  """GGUF tensor name -> HF name; None for names with no LLaMA place."""
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
    local = _LAYER_NAMES.get(parts[2])
    if local is not None:
      return f"model.layers.{int(parts[1])}.{local}"
  return None


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation.

  Its converter reorders each head's rows from rotate-half (pair i at rows i
  and i + D/2) to interleaved (pair i at rows 2i and 2i + 1), the layout of
  its RoPE kernel. Row (head, i, a) of the file is row (head, a, i) of HF's.
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ConfigError(f"cannot split {rows} rows into {num_heads} heads of "
                      f"even size")
  half = rows // num_heads // 2
  return np.ascontiguousarray(
      w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
      .reshape(w.shape))


def weight_reader(g: GGUFFile, cfg: ModelConfig) -> hf.WeightReader:
  """The file's tensors under HF names, dequantised and un-permuted on read,
  for `hf.params_from_hf`. Names with no LLaMA place keep their GGUF name,
  so the extra-tensor check reports them (biases, another model's parts)."""
  where, gguf_names = {}, {}
  for name, t in g.tensors.items():
    if name == ROPE_FREQS:  # Folded into the config.
      continue
    check_dequantizable(g.path, name, t.tensor_type)
    key = hf_name(name) or name
    where[key], gguf_names[key] = g.path, name
  heads = {"q_proj": cfg.num_heads, "k_proj": cfg.kv_heads}

  def load(_, key: str) -> np.ndarray:
    w = g.tensor(gguf_names[key])
    proj = key.split(".")[-2]
    if proj in heads and key.startswith("model.layers."):
      try:
        w = unpermute_rows(w, heads[proj])
      except ConfigError as e:
        raise ConfigError(f"{g.path}: tensor {gguf_names[key]}: {e}") from e
    return w

  return hf.WeightReader(where, load)


def load_gguf(path: str, **overrides: Any
              ) -> tuple[ModelConfig, dict[str, Any]]:
  """FILE.gguf -> (ModelConfig, native params as host numpy arrays)."""
  g = GGUFFile(path)
  cfg = config_from_gguf(g, **overrides)
  return cfg, hf.params_from_hf(cfg, weight_reader(g, cfg))


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table: printable Latin-1 bytes
  stand for themselves, the rest map to code points from 256 up, in order."""
  kept = (list(range(ord("!"), ord("~") + 1)) +
          list(range(ord("\xa1"), ord("\xac") + 1)) +
          list(range(ord("\xae"), ord("\xff") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in kept:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def build_tokenizer(g: GGUFFile) -> tuple[Any, dict[str, Any]] | None:
  """(tokenizers.Tokenizer, tokenizer_config dict) from the file's
  `tokenizer.*` metadata, or None (with a warning) when the file has no
  tokenizer or one of a kind other than byte-level BPE."""
  kind = g.get("tokenizer.ggml.model")
  if kind is None:
    logging.warning("%s has no tokenizer; none is written", g.path)
    return None
  if kind != "gpt2":
    logging.warning(
        "%s: tokenizer.ggml.model is %r; only byte-level BPE ('gpt2') "
        "tokenizers are rebuilt, so none is written (pass --tokenizer to "
        "the binaries)", g.path, kind)
    return None
  from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,  # pylint: disable=import-outside-toplevel
                          pre_tokenizers)
  tokens = list(g.require("tokenizer.ggml.tokens"))
  merges = g.require("tokenizer.ggml.merges")
  types = list(g.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
  if len(types) != len(tokens):
    raise ConfigError(f"{g.field('tokenizer.ggml.token_type')}: {len(types)} "
                      f"entries for {len(tokens)} tokens")
  vocab_rows = g.shape("token_embd.weight")[0]
  if len(tokens) > vocab_rows:
    raise ConfigError(f"{g.field('tokenizer.ggml.tokens')}: {len(tokens)} "
                      f"tokens but the embedding has {vocab_rows} rows")
  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())

  def spell(token: str) -> str:
    if set(token) <= spelled:
      return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))

  vocab: dict[str, int] = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(spell(token), i)
  pairs = []
  for merge in merges:
    left, sep, right = merge.partition(" ")
    if not sep:
      raise ConfigError(f"{g.field('tokenizer.ggml.merges')}: bad merge "
                        f"{merge!r} (expected 'left right')")
    pairs.append((left, right))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                             byte_fallback=False))
  pre = g.get("tokenizer.ggml.pre", "default")
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    if pre not in _GPT2_SPLIT_NAMES:
      logging.warning("%s: tokenizer.ggml.pre %r is not one this importer "
                      "knows; using GPT-2's pre-tokenizer (as transformers "
                      "does)", g.path, pre)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                 use_regex=True)
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, <|endoftext|>) match whole wherever they
  # appear in the text; user-defined ones too, but are not special.
  control = [t for t, k in zip(tokens, types)
             if k == CONTROL and set(t) <= spelled]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in control])
  user = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
  if user:
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in user])
  return tok, _tokenizer_config(g, tokens)


def _tokenizer_config(g: GGUFFile, tokens: Sequence[str]) -> dict[str, Any]:
  config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "clean_up_tokenization_spaces": False,
      "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
      "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
  }
  for name, key in (("bos_token", "bos_token_id"),
                    ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"),
                    ("pad_token", "padding_token_id")):
    token_id = g.get(f"tokenizer.ggml.{key}")
    if token_id is None:
      continue
    if not 0 <= int(token_id) < len(tokens):
      raise ConfigError(f"{g.field('tokenizer.ggml.' + key)}: id {token_id} "
                        f"is outside the vocabulary ({len(tokens)} tokens)")
    config[name] = tokens[int(token_id)]
  template = g.get("tokenizer.chat_template")
  if template:
    config["chat_template"] = template
  context = g.get(f"{g.get('general.architecture')}.context_length")
  if context:
    config["model_max_length"] = int(context)
  return config


def save_tokenizer(path: str, built: tuple[Any, dict[str, Any]]) -> None:
  """Writes DIR/tokenizer.json and DIR/tokenizer_config.json."""
  tok, config = built
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, TOKENIZER_JSON))
  with open(os.path.join(path, TOKENIZER_CONFIG), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")


# ----------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------


def gguf_to_native(input_file: str, output_dir: str, overwrite: bool = False,
                   **overrides: Any) -> ModelConfig:
  """Converts a LLaMA GGUF file into a native checkpoint, with the file's
  tokenizer and chat template beside it. Everything is read and checked
  before anything is written."""
  g = GGUFFile(input_file)
  cfg = config_from_gguf(g, **overrides)
  tokenizer = build_tokenizer(g)
  params = hf.params_from_hf(cfg, weight_reader(g, cfg))
  native.save_model(output_dir, cfg, params, overwrite=overwrite)
  if tokenizer is not None:
    save_tokenizer(output_dir, tokenizer)
  return cfg


__all__ = ["GGUFFile", "build_tokenizer", "config_from_gguf",
           "gguf_to_native", "hf_config_from_gguf", "load_gguf",
           "save_tokenizer", "unpermute_rows"]
