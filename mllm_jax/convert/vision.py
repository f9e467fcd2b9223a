"""HuggingFace vision towers and projectors <-> our modules, with numpy only.

    transformers.CLIPVisionModel            <-> modeling.vision.VisionEncoder
    Blip2QFormerModel + query_tokens +      <-> modeling.projectors.QFormer
      language_projection (BLIP-2)
    LlavaMultiModalProjector (linear_1/2)   <-> modeling.projectors.MLPProjector

Each direction goes through one layout table per module: (HF name, native
path, layer, native shape, HF shape, axis order). HF holds torch Linear
weights [out, in] and Conv2d kernels [out, in, kh, kw]; we hold [in..., out...]
with heads as their own axis and stack the ViT's blocks on axis 0, so every
tensor converts by one transpose and one reshape, both ways.

Tensor names are HF's own module names under an optional prefix, so the
same tables read a bare CLIPVisionModel, a CLIPModel's `vision_model.`, a
LLaVA checkpoint's vision tower or a BLIP-2 checkpoint. Tensors under the
prefix with no place in our module, and anything our module would compute
differently (other activations, text input to the Q-Former), are refused
with the field or tensor named.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert import hf, native
from mllm_jax.modeling.projectors import MLPProjector, QFormer
from mllm_jax.modeling.vision import VisionEncoder
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import param_shardings

Path = tuple[str, ...]
# transformers' hidden_act -> VisionConfig.activation.
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu",
                   "gelu_tanh": "gelu_pytorch_tanh"}
CLIP_PREFIXES = ("", "vision_model.", "vision_tower.vision_model.",
                 "model.vision_tower.vision_model.")
BLIP2_QFORMER = "qformer."
LLAVA_PROJECTOR = "multi_modal_projector."
# The parts of a BLIP-2 checkpoint that the Q-Former converter owns.
QFORMER_SCOPES = ("query_tokens", BLIP2_QFORMER, "language_projection.")

# ----------------------------------------------------------------------------
# Layout tables
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and the native parameter (or stacked-layer slice) it
  fills: native = transpose(hf, perm).reshape(shape), and back."""
  name: str
  path: Path
  layer: int | None
  shape: tuple[int, ...]
  hf_shape: tuple[int, ...]
  perm: tuple[int, ...] | None = None

  def to_native(self, w: np.ndarray) -> np.ndarray:
    w = w if self.perm is None else np.transpose(w, self.perm)
    return w.reshape(self.shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.perm is None:
      return x.reshape(self.hf_shape)
    permuted = tuple(self.hf_shape[p] for p in self.perm)
    return np.ascontiguousarray(
        x.reshape(permuted).transpose(np.argsort(self.perm)))


def _linear(name: str, path: Path, layer: int | None,
            in_shape: tuple[int, ...], out_shape: tuple[int, ...]
            ) -> list[Tensor]:
  """A torch Linear (`name`.weight [out, in], .bias [out]) as our Dense."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return [Tensor(f"{name}.weight", path + ("kernel",), layer,
                 in_shape + out_shape, (n_out, n_in), (1, 0)),
          Tensor(f"{name}.bias", path + ("bias",), layer, out_shape,
                 (n_out,))]


def _norm(name: str, path: Path, layer: int | None, dim: int) -> list[Tensor]:
  return [Tensor(f"{name}.weight", path + ("scale",), layer, (dim,), (dim,)),
          Tensor(f"{name}.bias", path + ("bias",), layer, (dim,), (dim,))]


def _attention(name: str, path: Path, layer: int | None, dim: int,
               context_dim: int, heads: int, q: str, k: str, v: str,
               o: str) -> list[Tensor]:
  """Our MultiHeadAttention from HF's four Linears (names under `name`)."""
  split = (heads, dim // heads)
  return (_linear(f"{name}{q}", path + ("q",), layer, (dim,), split)
          + _linear(f"{name}{k}", path + ("k",), layer, (context_dim,), split)
          + _linear(f"{name}{v}", path + ("v",), layer, (context_dim,), split)
          + _linear(f"{name}{o}", path + ("o",), layer, split, (dim,)))


def clip_layout(cfg: VisionConfig) -> list[Tensor]:
  """Every tensor of a CLIPVisionModel with `cfg`'s shape, HF's order."""
  d, p, c = cfg.embed_dim, cfg.patch_size, cfg.num_channels
  tensors = [
      Tensor("embeddings.class_embedding", ("class_token",), None, (d,), (d,)),
      Tensor("embeddings.patch_embedding.weight", ("patch_embed",), None,
             (p, p, c, d), (d, c, p, p), (2, 3, 1, 0)),
      Tensor("embeddings.position_embedding.weight", ("positions",), None,
             (cfg.num_patches + 1, d), (cfg.num_patches + 1, d)),
      *_norm("pre_layrnorm", ("pre_norm",), None, d)]
  for i in range(cfg.num_layers):
    at, blk = f"encoder.layers.{i}.", ("blocks",)
    tensors += (
        _attention(f"{at}self_attn.", blk + ("attn",), i, d, d, cfg.num_heads,
                   "q_proj", "k_proj", "v_proj", "out_proj")
        + _norm(f"{at}layer_norm1", blk + ("attn_norm",), i, d)
        + _linear(f"{at}mlp.fc1", blk + ("fc1",), i, (d,), (cfg.mlp_dim,))
        + _linear(f"{at}mlp.fc2", blk + ("fc2",), i, (cfg.mlp_dim,), (d,))
        + _norm(f"{at}layer_norm2", blk + ("mlp_norm",), i, d))
  return tensors + _norm("post_layernorm", ("post_norm",), None, d)


def qformer_layout(cfg: ProjectorConfig, vision_dim: int,
                   llm_dim: int) -> list[Tensor]:
  """BLIP-2's `query_tokens`, `qformer.*` and `language_projection.*`."""
  w, heads = cfg.width(vision_dim), cfg.heads(vision_dim)
  hidden = cfg.hidden(vision_dim)
  tensors = [Tensor("query_tokens", ("queries",), None,
                    (cfg.num_queries, w), (1, cfg.num_queries, w)),
             *_norm(f"{BLIP2_QFORMER}layernorm", ("embed_norm",), None, w)]
  for i in range(cfg.layers):
    at, lay = f"{BLIP2_QFORMER}encoder.layer.{i}.", ("layers", str(i))
    tensors += (
        _attention(f"{at}attention.", lay + ("self_attn",), None, w, w, heads,
                   "attention.query", "attention.key", "attention.value",
                   "output.dense")
        + _norm(f"{at}attention.output.LayerNorm", lay + ("self_norm",), None,
                w))
    if i % cfg.cross_attention_frequency == 0:
      tensors += (
          _attention(f"{at}crossattention.", lay + ("cross_attn",), None, w,
                     vision_dim, heads, "attention.query", "attention.key",
                     "attention.value", "output.dense")
          + _norm(f"{at}crossattention.output.LayerNorm",
                  lay + ("cross_norm",), None, w))
    tensors += (
        _linear(f"{at}intermediate_query.dense", lay + ("fc1",), None, (w,),
                (hidden,))
        + _linear(f"{at}output_query.dense", lay + ("fc2",), None, (hidden,),
                  (w,))
        + _norm(f"{at}output_query.LayerNorm", lay + ("mlp_norm",), None, w))
  return tensors + _linear("language_projection", ("proj",), None, (w,),
                           (llm_dim,))


def llava_projector_layout(vision_dim: int, llm_dim: int) -> list[Tensor]:
  """LlavaMultiModalProjector: linear_1, GELU, linear_2."""
  return (_linear(f"{LLAVA_PROJECTOR}linear_1", ("fc1",), None, (vision_dim,),
                  (llm_dim,))
          + _linear(f"{LLAVA_PROJECTOR}linear_2", ("fc2",), None, (llm_dim,),
                    (llm_dim,)))


# ----------------------------------------------------------------------------
# Tensors <-> native params
# ----------------------------------------------------------------------------


def reader_for(tensors: Mapping[str, Any], source: str = "state_dict"
               ) -> hf.WeightReader:
  """A WeightReader over in-memory tensors (a torch state_dict or numpy)."""
  def load(_, name):
    value = tensors[name]
    if hasattr(value, "detach"):  # torch
      value = value.detach().float().numpy()
    return np.asarray(value)
  return hf.WeightReader({name: source for name in tensors}, load)


def params_from_hf(layout: list[Tensor], reader: hf.WeightReader,
                   prefix: str = "", dtype: Any = np.float32,
                   scopes: tuple[str, ...] = ("",)) -> dict[str, Any]:
  """HF tensors (names under `prefix`) -> the native pure dict.

  Tensors under prefix + one of `scopes` (the module's own part of the
  checkpoint) with no place in the layout are an error: a model that
  dropped them would differ from the checkpoint.
  """
  used = {prefix + t.name for t in layout}
  extra = sorted(n for n in reader.names
                 if n.startswith(tuple(prefix + s for s in scopes))
                 and n not in used and not n.endswith("position_ids"))
  if extra:
    raise ConfigError(
        f"{reader.where[extra[0]]}: {len(extra)} tensor(s) under "
        f"{prefix or 'the checkpoint root'!r} have no place in our module, "
        f"e.g. {extra[:3]}")
  return hf.read_layout(layout, reader, dtype, prefix)


def params_to_hf(layout: list[Tensor], params: Any, prefix: str = "",
                 dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """Native params (a module, its state or a pure dict) -> (HF name, numpy
  tensor), one stacked-layer slice at a time."""
  flat = native.flatten(_pure(params))
  missing = sorted(native.dotted(t.path) for t in layout
                   if t.path not in flat)
  if missing:
    raise ConfigError(f"params: parameter {missing[0]} is missing")
  for t in layout:
    value = flat[t.path]
    x = np.asarray(value if t.layer is None else value[t.layer])
    yield prefix + t.name, np.asarray(t.to_hf(x), dtype)


def _pure(params: Any) -> dict[str, Any]:
  """A module, its state or a pure dict -> a pure dict with string keys
  (nnx.List indices become "0", "1", ... as in the layouts)."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)

  def strings(tree):
    if isinstance(tree, Mapping):
      return {str(k): strings(v) for k, v in tree.items()}
    return tree
  return strings(params)


def module_from_params(factory: Callable[[], nnx.Module],
                       params: Mapping[str, Any], mesh: Mesh | None = None,
                       rules: Rules | None = None) -> nnx.Module:
  """Host params -> the module `factory` builds (nothing initialised),
  placed by the rules on `mesh` when given. Fails naming a parameter that
  is missing, unexpected or of another shape."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  want = native.flatten(_pure(state))
  got = native.flatten(_pure(params))
  for path in sorted(set(want) | set(got)):
    if path not in got:
      raise ConfigError(f"params: parameter {native.dotted(path)} is missing")
    if path not in want:
      raise ConfigError(f"params: unexpected parameter "
                        f"{native.dotted(path)}")
    if tuple(got[path].shape) != tuple(want[path].shape):
      raise ConfigError(
          f"params: parameter {native.dotted(path)} has shape "
          f"{tuple(got[path].shape)} but the config implies "
          f"{tuple(want[path].shape)}")

  def fill(path, variable):
    key = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return variable.replace(
        value=np.asarray(got[key], variable.get_value().dtype))

  state = jax.tree_util.tree_map_with_path(
      fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if mesh is not None:
    state = jax.device_put(state, param_shardings(
        state, mesh, DEFAULT_RULES if rules is None else rules))
  else:
    state = jax.device_put(state)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def _square(value: Any, field: str) -> int:
  if isinstance(value, (list, tuple)):
    check(len(value) == 2 and value[0] == value[1], field,
          f"got {value}; only square images and patches are supported")
    value = value[0]
  return int(value)


def clip_config_from_hf(values: Mapping[str, Any], source: str = "config.json",
                        **overrides: Any) -> VisionConfig:
  """A CLIPVisionConfig dict (or a config with a `vision_config`: CLIP,
  LLaVA) -> VisionConfig; `overrides` set what HF has no word for
  (feature_layer, feature_select, dtype, attention_backend, ...)."""
  if isinstance(values.get("vision_config"), Mapping):
    values, source = values["vision_config"], f"{source}:vision_config"
  model_type = values.get("model_type", "clip_vision_model")
  check(model_type == "clip_vision_model", f"{source}:model_type",
        f"got {model_type!r}; only CLIP vision towers can be converted")
  act = values.get("hidden_act", "quick_gelu")
  check(act in _ACTIVATIONS, f"{source}:hidden_act",
        f"got {act!r}; supported: {sorted(_ACTIVATIONS)}")
  defaults = dict(hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12,
                  num_channels=3, image_size=224, patch_size=32,
                  layer_norm_eps=1e-5, initializer_range=0.02)
  v = {**defaults, **{k: x for k, x in values.items() if x is not None}}
  fields = dict(
      image_size=_square(v["image_size"], f"{source}:image_size"),
      patch_size=_square(v["patch_size"], f"{source}:patch_size"),
      num_channels=v["num_channels"], embed_dim=v["hidden_size"],
      num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], activation=_ACTIVATIONS[act],
      norm_eps=float(v["layer_norm_eps"]),
      init_std=float(v["initializer_range"]))
  try:
    return from_config(VisionConfig, {**fields, **overrides}, "vision")
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e


def clip_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
  """VisionConfig -> a config.json that CLIPVisionModel reads."""
  return {
      "architectures": ["CLIPVisionModel"],
      "model_type": "clip_vision_model",
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_channels": cfg.num_channels,
      "image_size": cfg.image_size,
      "patch_size": cfg.patch_size,
      "hidden_act": _HF_ACTIVATIONS[cfg.activation],
      "layer_norm_eps": cfg.norm_eps,
      "initializer_range": cfg.init_std,
      "dtype": cfg.param_dtype,
  }


def qformer_config_from_hf(values: Mapping[str, Any], num_query_tokens: int,
                           source: str = "config.json", **overrides: Any
                           ) -> tuple[ProjectorConfig, int]:
  """A Blip2QFormerConfig dict -> (ProjectorConfig, vision width it reads).
  A whole Blip2Config (with `qformer_config` and `num_query_tokens`) works
  too; num_query_tokens then comes from it."""
  if isinstance(values.get("qformer_config"), Mapping):
    num_query_tokens = values.get("num_query_tokens", num_query_tokens)
    values, source = values["qformer_config"], f"{source}:qformer_config"
  check(not values.get("use_qformer_text_input", False),
        f"{source}:use_qformer_text_input",
        "the Q-Former's text path (InstructBLIP, retrieval) is not supported; "
        "only the query path that BLIP-2 feeds its language model")
  act = values.get("hidden_act", "gelu")
  check(act == "gelu", f"{source}:hidden_act",
        f"got {act!r}; the Q-Former's MLP is exact GELU ('gelu')")
  v = {**dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, layer_norm_eps=1e-12,
              cross_attention_frequency=2, encoder_hidden_size=1408,
              initializer_range=0.02),
       **{k: x for k, x in values.items() if x is not None}}
  fields = dict(
      projector="qformer", num_queries=int(num_query_tokens),
      num_layers=v["num_hidden_layers"], hidden_dim=v["hidden_size"],
      num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
      cross_attention_frequency=v["cross_attention_frequency"],
      norm_eps=float(v["layer_norm_eps"]),
      init_std=float(v["initializer_range"]))
  try:
    cfg = from_config(ProjectorConfig, {**fields, **overrides}, "projector")
    cfg.check_dims(v["encoder_hidden_size"])
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e
  return cfg, int(v["encoder_hidden_size"])


def qformer_config_to_hf(cfg: ProjectorConfig, vision_dim: int
                         ) -> dict[str, Any]:
  """ProjectorConfig (qformer) -> Blip2QFormerConfig fields."""
  check(cfg.projector == "qformer", "projector.projector",
        f"got {cfg.projector!r}; only 'qformer' has a Blip2QFormerConfig")
  return {
      "model_type": "blip_2_qformer",
      "hidden_size": cfg.width(vision_dim),
      "num_hidden_layers": cfg.layers,
      "num_attention_heads": cfg.heads(vision_dim),
      "intermediate_size": cfg.hidden(vision_dim),
      "hidden_act": "gelu",
      "layer_norm_eps": cfg.eps,
      "cross_attention_frequency": cfg.cross_attention_frequency,
      "encoder_hidden_size": vision_dim,
      "initializer_range": cfg.init_std,
      "use_qformer_text_input": False,
  }


# ----------------------------------------------------------------------------
# Whole modules
# ----------------------------------------------------------------------------


def clip_prefix(names: Iterable[str]) -> str:
  """Where a checkpoint keeps its CLIP vision tower (CLIP_PREFIXES)."""
  names = set(names)
  for prefix in CLIP_PREFIXES:
    if f"{prefix}embeddings.class_embedding" in names:
      return prefix
  raise ConfigError(f"no CLIP vision tower among the tensors (looked for "
                    f"embeddings.class_embedding under {CLIP_PREFIXES})")


def clip_from_hf(cfg: VisionConfig, reader: hf.WeightReader,
                 prefix: str | None = None, mesh: Mesh | None = None,
                 rules: Rules | None = None) -> VisionEncoder:
  """A CLIP vision tower's tensors -> VisionEncoder (prefix found if None)."""
  prefix = clip_prefix(reader.names) if prefix is None else prefix
  params = params_from_hf(clip_layout(cfg), reader, prefix,
                          cfg.weight_dtype)
  return module_from_params(lambda: VisionEncoder(cfg, nnx.Rngs(0)), params,
                            mesh, rules)


def clip_to_hf(model: VisionEncoder, prefix: str = "",
               dtype: Any = None) -> dict[str, np.ndarray]:
  """VisionEncoder -> CLIPVisionModel's state dict as numpy arrays."""
  cfg = model.cfg
  return dict(params_to_hf(clip_layout(cfg), model, prefix,
                           dtype or cfg.weight_dtype))


def load_clip(path: str, mesh: Mesh | None = None, rules: Rules | None = None,
              **overrides: Any) -> tuple[VisionConfig, VisionEncoder]:
  """A HF directory holding a CLIP vision tower (CLIPVisionModel, CLIPModel
  or LLaVA) -> (VisionConfig, VisionEncoder)."""
  cfg = clip_config_from_hf(hf.read_hf_config(path),
                            os.path.join(path, hf.CONFIG_FILE), **overrides)
  with hf.open_weights(path) as reader:
    return cfg, clip_from_hf(cfg, reader, None, mesh, rules)


def save_clip(path: str, model: VisionEncoder, dtype: Any = None,
              overwrite: bool = False) -> None:
  """Writes config.json and model.safetensors for
  `CLIPVisionModel.from_pretrained`."""
  hf._prepare_hf_dir(path, overwrite)  # pylint: disable=protected-access
  config = clip_config_to_hf(model.cfg)
  if dtype is not None:
    config["dtype"] = str(np.dtype(dtype))
  save_file(clip_to_hf(model, dtype=dtype), os.path.join(
      path, hf.SAFETENSORS_FILE), metadata={"format": "pt"})
  hf._write_json(os.path.join(path, hf.CONFIG_FILE), config)  # pylint: disable=protected-access


def qformer_from_hf(cfg: ProjectorConfig, vision_dim: int,
                    reader: hf.WeightReader, prefix: str = "",
                    mesh: Mesh | None = None, rules: Rules | None = None
                    ) -> QFormer:
  """BLIP-2 tensors (query_tokens, qformer.*, language_projection.*; under
  `prefix`) -> QFormer. The LLM width comes from the language projection."""
  name = f"{prefix}language_projection.weight"
  llm_dim = int(reader.get(name).shape[0])
  layout = qformer_layout(cfg, vision_dim, llm_dim)
  params = params_from_hf(layout, reader, prefix, cfg.weight_dtype,
                          QFORMER_SCOPES)
  return module_from_params(
      lambda: QFormer(cfg, vision_dim, llm_dim, nnx.Rngs(0)), params, mesh,
      rules)


def qformer_to_hf(model: QFormer, prefix: str = "", dtype: Any = None
                  ) -> dict[str, np.ndarray]:
  """QFormer -> BLIP-2's query_tokens, qformer.* and language_projection.*
  (numpy); load `qformer.*` (prefix stripped) into Blip2QFormerModel."""
  llm_dim = model.proj.kernel.shape[-1]
  layout = qformer_layout(model.cfg, model.vision_dim, llm_dim)
  return dict(params_to_hf(layout, model, prefix,
                           dtype or model.cfg.weight_dtype))


def llava_projector_from_hf(cfg: ProjectorConfig, reader: hf.WeightReader,
                            prefix: str = "") -> MLPProjector:
  """LLaVA's multi_modal_projector.linear_1/2 -> MLPProjector."""
  check(cfg.projector == "mlp2x_gelu", "projector.projector",
        f"got {cfg.projector!r}; LLaVA's projector is 'mlp2x_gelu'")
  llm_dim, vision_dim = reader.get(
      f"{prefix}{LLAVA_PROJECTOR}linear_1.weight").shape
  params = params_from_hf(llava_projector_layout(vision_dim, llm_dim),
                          reader, prefix, cfg.weight_dtype,
                          (LLAVA_PROJECTOR,))
  return module_from_params(
      lambda: MLPProjector(cfg, vision_dim, llm_dim, nnx.Rngs(0)), params)


def llava_projector_to_hf(model: MLPProjector, prefix: str = "",
                          dtype: Any = None) -> dict[str, np.ndarray]:
  vision_dim, llm_dim = model.fc1.kernel.shape
  return dict(params_to_hf(llava_projector_layout(vision_dim, llm_dim),
                           model, prefix, dtype or model.cfg.weight_dtype))
