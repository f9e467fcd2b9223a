"""HuggingFace LLaMA checkpoints <-> our Decoder, with numpy only.

HF stores one tensor per layer as torch Linear weights [out, in]; we stack
layers on axis 0 and keep heads as their own axis ([D, H, Dh], [H, Dh, D]).
RoPE uses the rotate-half layout on both sides, so q/k are reshaped and
transposed, never permuted (Meta's original checkpoints are another matter,
see convert/meta.py).

Anything this decoder cannot compute exactly (biases, other activations, RoPE
variants, other architectures) is refused with the config field named, rather
than converted into a model that is silently wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes  # Registers bfloat16 with numpy, which safetensors needs.
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert import native
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.parallel.config import Rules

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# transformers' LlamaConfig defaults, for keys an older config.json omits.
_HF_DEFAULTS = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}
# HF rope_type -> ModelConfig.rope_scaling; every other type is refused.
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# Tensors that hold no parameter (precomputed RoPE tables in old files).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)

# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


def read_hf_config(path: str) -> dict[str, Any]:
  """HF_DIR/config.json as a dict; fails naming the missing file."""
  return native.read_checkpoint_json(path, CONFIG_FILE,
                                     "HuggingFace checkpoint")


def _check_supported(hf: Mapping[str, Any], source: str) -> None:
  """Refuses configs whose model our decoder would compute differently."""
  def field(name):
    return f"{source}:{name}"

  model_type = hf.get("model_type")
  check(model_type == "llama", field("model_type"),
        f"got {model_type!r}; only 'llama' checkpoints (LlamaForCausalLM) can "
        f"be converted")
  architectures = hf.get("architectures") or ["LlamaForCausalLM"]
  check(list(architectures) == ["LlamaForCausalLM"], field("architectures"),
        f"got {architectures}; only LlamaForCausalLM can be converted")
  for name in ("attention_bias", "mlp_bias"):
    check(not hf.get(name, False), field(name),
          "biases are not supported (our decoder's projections have none)")
  act = hf.get("hidden_act", _HF_DEFAULTS["hidden_act"])
  check(act == "silu", field("hidden_act"),
        f"got {act!r}; our MLP is SwiGLU, i.e. 'silu'")
  check(hf.get("sliding_window") is None, field("sliding_window"),
        "sliding-window attention is not supported")
  check(hf.get("quantization_config") is None, field("quantization_config"),
        "quantized checkpoints are not supported; dequantize them first")
  check(hf.get("partial_rotary_factor", 1.0) == 1.0,
        field("partial_rotary_factor"), "partial RoPE is not supported")


def _rope_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
  """ModelConfig's RoPE fields from either spelling of HF's settings.

  transformers 5 writes `rope_parameters` (theta inside); earlier versions
  wrote `rope_scaling` (None for plain RoPE) beside a top-level `rope_theta`.
  As in transformers 5, a non-empty `rope_scaling` takes precedence.
  """
  name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  rope = dict(hf.get(name) or {})
  check(not any(isinstance(v, Mapping) for v in rope.values()),
        f"{source}:{name}", "per-layer-type RoPE settings are not supported")
  theta = rope.get("rope_theta", hf.get("rope_theta",
                                        _HF_DEFAULTS["rope_theta"]))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  check(rope_type in _ROPE_TYPES, f"{source}:{name}.rope_type",
        f"got {rope_type!r}; supported: {sorted(_ROPE_TYPES)}")
  check(rope.get("partial_rotary_factor", 1.0) == 1.0,
        f"{source}:{name}.partial_rotary_factor",
        "partial RoPE is not supported")
  fields = {"rope_theta": float(theta),
            "rope_scaling": _ROPE_TYPES[rope_type]}
  if rope_type == "default":
    return fields
  check("factor" in rope, f"{source}:{name}.factor",
        f"required for rope_type {rope_type!r}")
  fields["rope_scaling_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    for key in ("low_freq_factor", "high_freq_factor"):
      check(key in rope, f"{source}:{name}.{key}", "required for 'llama3'")
    fields.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        # transformers falls back to max_position_embeddings likewise.
        rope_original_max_len=int(rope.get(
            "original_max_position_embeddings",
            hf.get("max_position_embeddings",
                   _HF_DEFAULTS["max_position_embeddings"]))))
  return fields


def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE,
                   **overrides: Any) -> ModelConfig:
  """A HF LlamaConfig dict -> ModelConfig; `overrides` set fields HF has no
  word for (dtype, param_dtype, attention_backend, ...)."""
  _check_supported(hf, source)
  for key in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads"):
    check(key in hf, f"{source}:{key}", "required")
  hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
  hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim", hidden // heads)
  fields = dict(
      vocab_size=hf["vocab_size"],
      embed_dim=hidden,
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads", heads),
      # 0 keeps the derived default, so round trips leave configs unchanged.
      head_dim=0 if heads * head_dim == hidden else head_dim,
      mlp_dim=hf["intermediate_size"],
      tie_embeddings=bool(hf["tie_word_embeddings"]),
      norm_eps=float(hf["rms_norm_eps"]),
      init_std=float(hf["initializer_range"]),
      max_seq_len=hf["max_position_embeddings"],
      position="rope",
      **_rope_fields(hf, source))
  try:
    return from_config(ModelConfig, {**fields, **overrides}, "model")
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """ModelConfig -> a config.json that transformers 4.43+ and 5 both read:
  `rope_parameters` for 5, `rope_theta` and `rope_scaling` for 4."""
  check(cfg.position == "rope", "model.position",
        f"{cfg.position!r} has no LlamaForCausalLM equivalent (RoPE only)")
  rope: dict[str, Any] = {"rope_type": "default"}
  if cfg.rope_scaling != "none":
    rope = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.hidden_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_size,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "initializer_range": cfg.init_std,
      "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling == "none" else rope,
      "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
      "dtype": cfg.param_dtype,
  }


# ----------------------------------------------------------------------------
# Tensor layout
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the native parameter (or layer slice) it fills.

  in_dims: 0 when both sides agree; else HF holds a torch Linear [out, in]
  and we hold [in..., out...] with the first `in_dims` axes as the input.
  """
  name: str
  path: native.Path
  layer: int | None
  in_dims: int
  shape: tuple[int, ...]  # native, without the layers axis

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if not self.in_dims:
      return self.shape
    return (math.prod(self.shape[self.in_dims:]),
            math.prod(self.shape[:self.in_dims]))

  def to_native(self, w: np.ndarray) -> np.ndarray:
    return w.T.reshape(self.shape) if self.in_dims else w

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if not self.in_dims:
      return x
    rows = math.prod(self.shape[:self.in_dims])
    return np.ascontiguousarray(x.reshape(rows, -1).T)


_TOP_BEFORE = ((("embed", "table"), "model.embed_tokens.weight", 0),)
_LAYER = (
    (("blocks", "attn", "q"), "self_attn.q_proj.weight", 1),
    (("blocks", "attn", "k"), "self_attn.k_proj.weight", 1),
    (("blocks", "attn", "v"), "self_attn.v_proj.weight", 1),
    (("blocks", "attn", "o"), "self_attn.o_proj.weight", 2),
    (("blocks", "mlp", "gate"), "mlp.gate_proj.weight", 1),
    (("blocks", "mlp", "up"), "mlp.up_proj.weight", 1),
    (("blocks", "mlp", "down"), "mlp.down_proj.weight", 1),
    (("blocks", "attn_norm", "scale"), "input_layernorm.weight", 0),
    (("blocks", "mlp_norm", "scale"), "post_attention_layernorm.weight", 0),
)
_TOP_AFTER = ((("final_norm", "scale"), "model.norm.weight", 0),
              (("lm_head",), "lm_head.weight", 1))


def layout(cfg: ModelConfig) -> list[Tensor]:
  """Every HF tensor of `cfg`'s model, in HF's order (layer by layer)."""
  shapes = {p: tuple(s.shape) for p, s in native.param_shapes(cfg).items()}
  tensors = [Tensor(name, path, None, n, shapes[path])
             for path, name, n in _TOP_BEFORE]
  for i in range(cfg.num_layers):
    tensors += [Tensor(f"model.layers.{i}.{name}", path, i, n, shapes[path][1:])
                for path, name, n in _LAYER]
  tensors += [Tensor(name, path, None, n, shapes[path])
              for path, name, n in _TOP_AFTER if path in shapes]
  return tensors


# ----------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------


class WeightReader:
  """Tensor name -> numpy array, read one at a time from the weight files."""

  def __init__(self, where: Mapping[str, str],
               load: Callable[[str, str], np.ndarray]):
    self.where = dict(where)  # name -> file
    self._load = load

  @property
  def names(self) -> set[str]:
    return set(self.where)

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      files = sorted({os.path.basename(f) for f in self.where.values()})
      raise ConfigError(f"tensor {name!r} is missing from the checkpoint "
                        f"(read {', '.join(files) or 'no files'})")
    return self._load(self.where[name], name)


def _index(path: str, index_name: str) -> dict[str, str]:
  """A sharded checkpoint's weight_map, with each shard checked to exist."""
  index_file = os.path.join(path, index_name)
  with open(index_file) as f:
    weight_map = json.load(f).get("weight_map")
  check(isinstance(weight_map, dict) and weight_map, index_file,
        "has no 'weight_map'")
  where = {name: os.path.join(path, file) for name, file in weight_map.items()}
  for file in sorted(set(where.values())):
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} is missing (listed in {index_file})")
  return where


@contextlib.contextmanager
def open_weights(path: str) -> Iterator[WeightReader]:
  """Reads model.safetensors, a sharded safetensors index, any *.safetensors,
  or (only where torch is installed) pytorch_model.bin[.index.json]."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
    files = sorted(set(_index(path, SAFETENSORS_INDEX).values()))
  else:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    with contextlib.ExitStack() as stack:
      handles = {f: stack.enter_context(safe_open(f, framework="numpy"))
                 for f in files}
      where = {name: f for f, h in handles.items() for name in h.keys()}
      yield WeightReader(where, lambda f, name: handles[f].get_tensor(name))
    return
  if os.path.isfile(os.path.join(path, TORCH_INDEX)):
    yield _torch_reader(_index(path, TORCH_INDEX))
    return
  if os.path.isfile(os.path.join(path, TORCH_FILE)):
    yield _torch_reader({None: os.path.join(path, TORCH_FILE)})
    return
  raise FileNotFoundError(
      f"{path} has no weights: expected {SAFETENSORS_FILE}, "
      f"{SAFETENSORS_INDEX} or (with torch installed) {TORCH_FILE}")


def _torch_reader(where: Mapping[str | None, str]) -> WeightReader:
  """PyTorch pickles, memory-mapped, with weights_only so that loading a
  file cannot run code. `where` maps None -> file for an unsharded one."""
  file = next(iter(where.values()))
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConfigError(f"{file} is a PyTorch pickle and torch is not "
                      f"installed; install torch or convert the checkpoint to "
                      f"safetensors") from e
  loaded: dict[str, dict[str, Any]] = {}

  def state(f):
    if f not in loaded:
      loaded[f] = torch.load(f, map_location="cpu", weights_only=True,
                             mmap=True)
    return loaded[f]

  if None in where:
    where = {name: file for name in state(file)}

  def load(f, name):
    t = state(f)[name].detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

  return WeightReader(where, load)


# ----------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------


def _check_no_extra(cfg: ModelConfig, tensors: list[Tensor],
                    reader: WeightReader) -> None:
  """Fails on tensors with no native place (names only, before any read)."""
  used = {t.name for t in tensors}
  if cfg.tie_embeddings:
    used.add("lm_head.weight")  # Some writers keep the tied copy.
  extra = sorted(n for n in reader.names - used
                 if not n.endswith(_BUFFER_SUFFIXES))
  if extra:
    raise ConfigError(
        f"{reader.where[extra[0]]}: {len(extra)} tensor(s) have no place in "
        f"our decoder, e.g. {extra[:3]}; the checkpoint is not a plain "
        f"LLaMA (biases? another architecture?)")


def params_from_hf(cfg: ModelConfig, reader: WeightReader) -> dict[str, Any]:
  """HF tensors -> the native pure dict of numpy arrays (cfg.param_dtype).

  Tensors left over (biases, another architecture's extras) are an error:
  dropping them would give a model that differs from the checkpoint.
  """
  tensors = layout(cfg)
  _check_no_extra(cfg, tensors, reader)
  return read_layout(tensors, reader, cfg.weight_dtype)


def read_layout(tensors: list[Any], reader: WeightReader, dtype: Any,
                prefix: str = "") -> dict[str, Any]:
  """Reads every tensor of a layout table (entries with name, path, layer,
  hf_shape and to_native: this module's `Tensor` or convert.vision's) under
  `prefix` -> the native pure dict, per-layer slices stacked on axis 0.
  Fails naming the tensor and its file on a shape the config does not imply.
  """
  flat: dict[native.Path, Any] = {}
  layers: dict[native.Path, list[np.ndarray]] = {}
  for t in tensors:
    name = prefix + t.name
    w = reader.get(name)
    if tuple(w.shape) != t.hf_shape:
      raise ConfigError(
          f"{reader.where[name]}: tensor {name} has shape "
          f"{tuple(w.shape)} but the config implies {t.hf_shape}")
    x = np.asarray(t.to_native(np.asarray(w)), dtype)
    if t.layer is None:
      flat[t.path] = x
    else:
      layers.setdefault(t.path, []).append(x)
  flat.update({path: np.stack(xs) for path, xs in layers.items()})
  return native.unflatten(flat)


def params_to_hf(cfg: ModelConfig, params: Any,
                 dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Native params (a Decoder, its state or a pure dict; numpy or jax) ->
  (HF name, numpy tensor), lazily, one layer slice at a time so exporting
  needs little host memory."""
  params = native.to_pure(params)
  native.check_params(cfg, native.flatten(params), "params")
  fetch = dict(native.host_arrays(params))
  for t in layout(cfg):
    x = fetch[t.path]() if t.layer is None else fetch[t.path](t.layer)
    yield t.name, np.asarray(t.to_hf(x), dtype or cfg.weight_dtype)


def load_hf(path: str, **overrides: Any
            ) -> tuple[ModelConfig, dict[str, Any]]:
  """HF_DIR -> (ModelConfig, native params as host numpy arrays)."""
  cfg = config_from_hf(read_hf_config(path),
                       os.path.join(path, CONFIG_FILE), **overrides)
  with open_weights(path) as reader:
    return cfg, params_from_hf(cfg, reader)


def load_hf_model(path: str, mesh: Mesh | None = None,
                  rules: Rules | None = None,
                  **overrides: Any) -> tuple[ModelConfig, Decoder]:
  """HF_DIR -> Decoder, sharded over `mesh` when given (for evaluating a HF
  checkpoint without writing a native one)."""
  cfg, params = load_hf(path, **overrides)
  return cfg, native.model_from_params(cfg, params, mesh, rules)


def _plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
  """Consecutive tensors grouped into shards of at most max_bytes (a single
  larger tensor gets a shard of its own)."""
  shards: list[list[int]] = [[]]
  total = 0
  for i, size in enumerate(sizes):
    if shards[-1] and total + size > max_bytes:
      shards.append([])
      total = 0
    shards[-1].append(i)
    total += size
  return shards


def save_hf(path: str, cfg: ModelConfig, params: Any, dtype: Any = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False) -> None:
  """Writes config.json and model.safetensors (sharded with an index when
  larger than max_shard_bytes) that LlamaForCausalLM.from_pretrained reads.

  params: a Decoder, its state or a pure dict (numpy or single-process jax).
  dtype: of the written tensors (default cfg.param_dtype).
  """
  hf_config = config_to_hf(cfg)
  params = native.to_pure(params)
  native.check_params(cfg, native.flatten(params), "params")
  dtype = np.dtype(dtype or cfg.weight_dtype)
  hf_config["dtype"] = str(dtype)
  _prepare_hf_dir(path, overwrite)
  tensors = layout(cfg)
  shards = _plan_shards(
      [native.nbytes(t.hf_shape, dtype) for t in tensors], max_shard_bytes)
  names = ([SAFETENSORS_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for i in range(len(shards))])
  exported = params_to_hf(cfg, params, dtype)
  weight_map = {}
  for name, shard in zip(names, shards):
    arrays = dict(next(exported) for _ in shard)
    save_file(arrays, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({key: name for key in arrays})
  if len(shards) > 1:
    total = sum(native.nbytes(t.hf_shape, dtype) for t in tensors)
    _write_json(os.path.join(path, SAFETENSORS_INDEX),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_json(os.path.join(path, CONFIG_FILE), hf_config)


def _prepare_hf_dir(path: str, overwrite: bool) -> None:
  """Creates `path`; old weights there are removed on request only, so that
  stale shards never mix with new ones."""
  os.makedirs(path, exist_ok=True)
  old = [os.path.join(path, CONFIG_FILE)] if os.path.exists(
      os.path.join(path, CONFIG_FILE)) else []
  old += glob.glob(os.path.join(path, "*.safetensors"))
  old += glob.glob(os.path.join(path, "*.safetensors.index.json"))
  if old and not overwrite:
    raise FileExistsError(f"{path} already holds a checkpoint "
                          f"({os.path.basename(old[0])}); pass overwrite=True "
                          f"(--overwrite) to replace it")
  for file in old:
    os.remove(file)


def _write_json(file: str, value: Any) -> None:
  with open(file, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def hf_to_native(input_dir: str, output_dir: str, overwrite: bool = False,
                 **overrides: Any) -> ModelConfig:
  """Converts a HF LLaMA directory into a native checkpoint."""
  cfg, params = load_hf(input_dir, **overrides)
  native.save_model(output_dir, cfg, params, overwrite=overwrite)
  return cfg


def native_to_hf(input_dir: str, output_dir: str, dtype: Any = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False) -> ModelConfig:
  """Converts a native checkpoint into a HF LlamaForCausalLM directory."""
  cfg, params = native.load_params(input_dir)
  save_hf(output_dir, cfg, params, dtype, max_shard_bytes, overwrite)
  return cfg
