"""Multimodal checkpoints: the native format, and HF LLaVA both ways.

    DIR/multimodal_config.json   MultimodalConfig.to_dict(): the decoder's
                                 architecture, the vision and projector
                                 configs, the image token
    DIR/params/                  Orbax pure dict {"vision": ..., "projector":
                                 ..., "decoder": ...} of MultimodalModel

    transformers LlavaForConditionalGeneration  <->  MultimodalModel
      vision tower (CLIP)          convert.vision.clip_layout
      multi_modal_projector        convert.vision.llava_projector_layout
      language model (LLaMA)       convert.hf.layout
      config.json                  text_config -> hf.config_from_hf,
                                   vision_config -> clip_config_from_hf,
                                   vision_feature_layer / _select_strategy,
                                   image_token_index

No tensor is converted here: each part goes through its own module's layout
table, read under the part's prefix. transformers 5 writes the legacy names
(`language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.*`, `multi_modal_projector.*`); its in-memory names
(`model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`) and
LLaVA-1.5 hub files (`vision_tower.vision_model.*`) read too, and the writer
uses transformers 5's own file layout. Anything LLaVA would compute
differently from ours (a projector without biases or with another
activation, several feature layers, a non-LLaMA language model) is refused
naming the config field.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from mllm_jax.configlib import ConfigError, check
from mllm_jax.convert import hf, native
from mllm_jax.convert import vision as vision_io
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.multimodal import MultimodalConfig, MultimodalModel
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import param_shardings

CONFIG_FILE = "multimodal_config.json"
PARAMS_DIR = native.PARAMS_DIR
_SELECT = {"default": "patch", "full": "cls_patch"}
# What transformers 5 writes (LlavaForConditionalGeneration.save_pretrained).
_TEXT_PREFIX = "language_model."
_VISION_PREFIX = "vision_tower."

# ----------------------------------------------------------------------------
# Native checkpoints
# ----------------------------------------------------------------------------


def _abstract(cfg: MultimodalConfig) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: MultimodalModel(cfg, nnx.Rngs(0))))


def param_shapes(cfg: MultimodalConfig) -> dict[native.Path, Any]:
  return native.flatten(nnx.to_pure_dict(_abstract(cfg)))


def _check_shapes(cfg: MultimodalConfig, shapes: Mapping[native.Path, Any],
                  source: str) -> None:
  """Fails naming the parameter when `shapes` is not what `cfg` builds."""
  want = param_shapes(cfg)
  for path in sorted(set(want) | set(shapes)):
    if path not in shapes:
      raise ConfigError(f"{source}: parameter {native.dotted(path)} is "
                        f"missing")
    if path not in want:
      raise ConfigError(f"{source}: unexpected parameter "
                        f"{native.dotted(path)}")
    if tuple(shapes[path].shape) != tuple(want[path].shape):
      raise ConfigError(
          f"{source}: parameter {native.dotted(path)} has shape "
          f"{tuple(shapes[path].shape)} but the config implies "
          f"{tuple(want[path].shape)}")


def pure_params(model_or_params: Any) -> dict[str, Any]:
  """A MultimodalModel, its state or a pure dict -> the pure dict of params
  with string keys (what the checkpoint holds)."""
  if isinstance(model_or_params, nnx.Module):
    return vision_io._pure(nnx.state(model_or_params, nnx.Param))  # pylint: disable=protected-access
  return vision_io._pure(model_or_params)  # pylint: disable=protected-access


def save_model(path: str, cfg: MultimodalConfig, model_or_params: Any,
               overwrite: bool = False) -> None:
  """Writes DIR/multimodal_config.json and the params (Orbax)."""
  path = os.path.abspath(path)
  params = pure_params(model_or_params)
  _check_shapes(cfg, native.flatten(params), f"save_model({path})")
  taken = [n for n in (CONFIG_FILE, PARAMS_DIR)
           if os.path.exists(os.path.join(path, n))]
  if taken and not overwrite:
    raise FileExistsError(f"{path} already holds a checkpoint ({taken[0]}); "
                          f"pass overwrite=True (--overwrite) to replace it")
  if jax.process_index() == 0:
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
      shutil.rmtree(os.path.join(path, PARAMS_DIR))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
      f.write("\n")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), params)


def is_multimodal(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(path: str, **model_overrides: Any) -> MultimodalConfig:
  """DIR/multimodal_config.json -> MultimodalConfig; `model_overrides`
  replace decoder fields (run choices such as attention_backend)."""
  path = os.path.abspath(path)
  values = native.read_checkpoint_json(
      path, CONFIG_FILE, "native multimodal checkpoint",
      " (convert one with `python -m launch.convert_checkpoint "
      "--from=llava`)")
  # Run fields saved by older checkpoints are dropped: each run picks its
  # own (the defaults here).
  parts = {part: {k: v for k, v in values.get(part, {}).items()
                  if k not in cls.run_fields}
           for part, cls in (("model", ModelConfig), ("vision", VisionConfig),
                             ("projector", ProjectorConfig))}
  return MultimodalConfig.from_dict({**values, **parts},
                                    os.path.join(path, CONFIG_FILE),
                                    **model_overrides)


def check_architecture(path: str, cfg: MultimodalConfig, field: str) -> None:
  """Fails naming `field` and the first differing part when the checkpoint
  at `path` is another architecture than `cfg`."""
  saved, wanted = read_config(path).to_dict(), cfg.to_dict()
  for part in wanted:
    if saved[part] != wanted[part]:
      differ = (part if not isinstance(wanted[part], dict) else ", ".join(
          f"{part}.{k}: {saved[part].get(k)!r} saved, {v!r} wanted"
          for k, v in wanted[part].items() if saved[part].get(k) != v))
      raise ConfigError(f"{field}: {path} is another architecture ({differ})")


def restore_params(path: str, targets: Mapping[str, Any]) -> dict[str, Any]:
  """Straight into the targets' shardings (native.restore_params)."""
  return native.restore_params(path, targets)


def load_params(path: str, **model_overrides: Any
                ) -> tuple[MultimodalConfig, dict[str, Any]]:
  """(config, host numpy params), nothing placed on a device."""
  cfg = read_config(path, **model_overrides)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  _check_shapes(cfg, native.saved_shapes(path), params_dir)
  args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)
          for p, s in param_shapes(cfg).items()}
  with ocp.PyTreeCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        restore_args=native.unflatten(args)))
  return cfg, params


def load_model(path: str, mesh: Mesh | None = None, rules: Rules | None = None,
               **model_overrides: Any
               ) -> tuple[MultimodalConfig, MultimodalModel]:
  """A native multimodal checkpoint -> MultimodalModel, restored straight
  into its shardings on `mesh` (else onto the first device)."""
  cfg = read_config(path, **model_overrides)
  _check_shapes(cfg, native.saved_shapes(path),
                os.path.join(path, PARAMS_DIR))
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: MultimodalModel(cfg, nnx.Rngs(0))))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shard = jax.tree.map(lambda _: device, state)
  else:
    shard = param_shardings(state, mesh, rules or DEFAULT_RULES)
  targets = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.to_pure_dict(state), nnx.to_pure_dict(shard))
  nnx.replace_by_pure_dict(state, restore_params(path, targets))
  return cfg, nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------
# HF LLaVA configs
# ----------------------------------------------------------------------------


def config_from_llava(values: Mapping[str, Any],
                      source: str = hf.CONFIG_FILE,
                      dtype: str | None = None, **model_overrides: Any
                      ) -> MultimodalConfig:
  """A LlavaConfig dict -> MultimodalConfig. `dtype` sets the compute dtype
  of all three parts; `model_overrides` other decoder fields."""
  check(values.get("model_type") == "llava", f"{source}:model_type",
        f"got {values.get('model_type')!r}; only 'llava' "
        f"(LlavaForConditionalGeneration) converts")
  for key in ("text_config", "vision_config"):
    check(isinstance(values.get(key), Mapping), f"{source}:{key}",
          "required")
  act = values.get("projector_hidden_act", "gelu")
  check(act == "gelu", f"{source}:projector_hidden_act",
        f"got {act!r}; the projector computes exact GELU ('gelu')")
  check(values.get("multimodal_projector_bias", True),
        f"{source}:multimodal_projector_bias",
        "False is not supported (our projector has biases)")
  layer = values.get("vision_feature_layer", -2)
  check(isinstance(layer, int), f"{source}:vision_feature_layer",
        f"got {layer!r}; one feature layer only (not a list)")
  select = values.get("vision_feature_select_strategy", "default")
  check(select in _SELECT, f"{source}:vision_feature_select_strategy",
        f"got {select!r}; choose one of {sorted(_SELECT)}")
  check(not values.get("tie_word_embeddings", False),
        f"{source}:tie_word_embeddings",
        "tied LLaVA embeddings are not supported")
  dtypes = {"dtype": dtype} if dtype else {}
  model = hf.config_from_hf(values["text_config"],
                            f"{source}:text_config",
                            **{**dtypes, **model_overrides})
  vision = vision_io.clip_config_from_hf(
      values["vision_config"], source, feature_layer=layer,
      feature_select=_SELECT[select], **dtypes)
  projector = ProjectorConfig(projector="mlp2x_gelu",
                              init_std=vision.init_std, **dtypes)
  image_token = values.get("image_token_index",
                           values.get("image_token_id", 32000))
  try:
    cfg = MultimodalConfig(model, vision, projector, int(image_token))
    cfg.validate()
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e
  seq = values.get("image_seq_length")
  check(seq is None or seq == cfg.tokens_per_image,
        f"{source}:image_seq_length",
        f"{seq}, but the vision tower gives {cfg.tokens_per_image} tokens "
        f"per {vision.image_size} px image")
  return cfg


def config_to_llava(cfg: MultimodalConfig) -> dict[str, Any]:
  """MultimodalConfig -> a config.json LlavaForConditionalGeneration reads."""
  check(cfg.projector.projector == "mlp2x_gelu", "projector.projector",
        f"got {cfg.projector.projector!r}; LLaVA's projector is "
        f"'mlp2x_gelu'")
  check(not cfg.model.tie_embeddings, "model.tie_embeddings",
        "tied LLaVA embeddings are not supported")
  text = hf.config_to_hf(cfg.model)
  text.pop("architectures")
  return {
      "architectures": ["LlavaForConditionalGeneration"],
      "model_type": "llava",
      "text_config": text,
      "vision_config": vision_io.clip_config_to_hf(cfg.vision),
      "image_token_index": cfg.image_token_id,
      "image_seq_length": cfg.tokens_per_image,
      "projector_hidden_act": "gelu",
      "multimodal_projector_bias": True,
      "vision_feature_layer": cfg.vision.feature_layer,
      "vision_feature_select_strategy": {
          v: k for k, v in _SELECT.items()}[cfg.vision.feature_select],
      "tie_word_embeddings": False,
      "dtype": cfg.model.param_dtype,
  }


# ----------------------------------------------------------------------------
# HF LLaVA weights
# ----------------------------------------------------------------------------


def _text_reader(reader: hf.WeightReader) -> hf.WeightReader:
  """The language model's tensors under LlamaForCausalLM's own names."""
  names = reader.names
  if "language_model.model.embed_tokens.weight" in names:  # file layout
    rename = {n[len(_TEXT_PREFIX):]: n for n in names
              if n.startswith(_TEXT_PREFIX)}
  elif "model.language_model.embed_tokens.weight" in names:  # in memory
    rename = {"model." + n[len("model.language_model."):]: n for n in names
              if n.startswith("model.language_model.")}
    if "lm_head.weight" in names:
      rename["lm_head.weight"] = "lm_head.weight"
  else:
    raise ConfigError("no LLaVA language model among the tensors (looked "
                      "for language_model.model.embed_tokens.weight and "
                      "model.language_model.embed_tokens.weight)")
  return hf.WeightReader({k: reader.where[v] for k, v in rename.items()},
                         lambda _, name: reader.get(rename[name]))


def _vision_prefix(names) -> str:
  """Where the checkpoint keeps its CLIP tower (any prefix ending in
  `embeddings.class_embedding`, outside the language model)."""
  suffix = "embeddings.class_embedding"
  found = sorted(n[:-len(suffix)] for n in names
                 if n.endswith(suffix) and "language_model" not in n)
  if len(found) != 1:
    raise ConfigError(f"expected one CLIP vision tower among the tensors, "
                      f"found {len(found)} ({found})")
  return found[0]


def params_from_llava(cfg: MultimodalConfig, reader: hf.WeightReader
                      ) -> dict[str, Any]:
  """HF LLaVA tensors -> the native pure dict (host numpy). Tensors outside
  the three parts are an error naming one."""
  names = reader.names
  vision_prefix = _vision_prefix(names)
  projector_prefix = ("model." if f"model.{vision_io.LLAVA_PROJECTOR}"
                      "linear_1.weight" in names else "")
  text_reader = _text_reader(reader)
  owned = {n for n in names if n.startswith(
      (vision_prefix, projector_prefix + vision_io.LLAVA_PROJECTOR,
       "language_model.", "model.language_model."))} | {"lm_head.weight"}
  other = sorted(n for n in names - owned if not n.endswith("position_ids"))
  if other:
    raise ConfigError(f"{reader.where[other[0]]}: {len(other)} tensor(s) "
                      f"belong to no part of LLaVA, e.g. {other[:3]}")
  vision = vision_io.params_from_hf(
      vision_io.clip_layout(cfg.vision), reader, vision_prefix,
      cfg.vision.weight_dtype)
  projector = vision_io.params_from_hf(
      vision_io.llava_projector_layout(cfg.vision.embed_dim,
                                       cfg.model.embed_dim),
      reader, projector_prefix, cfg.projector.weight_dtype,
      (vision_io.LLAVA_PROJECTOR,))
  decoder = hf.params_from_hf(cfg.model, text_reader)
  return {"vision": vision, "projector": projector, "decoder": decoder}


def params_to_llava(cfg: MultimodalConfig, params: Any, dtype: Any = None
                    ) -> dict[str, np.ndarray]:
  """Native params (a MultimodalModel or its pure dict) -> the tensors
  LlavaForConditionalGeneration.save_pretrained writes."""
  params = pure_params(params)
  for part in ("vision", "projector", "decoder"):
    if part not in params:
      raise ConfigError(f"params: part {part!r} is missing")
  out = dict(vision_io.params_to_hf(
      vision_io.clip_layout(cfg.vision), params["vision"], _VISION_PREFIX,
      dtype or cfg.vision.weight_dtype))
  out.update(vision_io.params_to_hf(
      vision_io.llava_projector_layout(cfg.vision.embed_dim,
                                       cfg.model.embed_dim),
      params["projector"], "", dtype or cfg.projector.weight_dtype))
  out.update({_TEXT_PREFIX + name: x for name, x in hf.params_to_hf(
      cfg.model, params["decoder"], dtype)})
  return out


def llava_to_native(input_dir: str, output_dir: str, overwrite: bool = False,
                    dtype: str | None = None, **model_overrides: Any
                    ) -> MultimodalConfig:
  """A HF LLaVA directory -> a native multimodal checkpoint."""
  cfg = config_from_llava(hf.read_hf_config(input_dir),
                          os.path.join(input_dir, hf.CONFIG_FILE), dtype,
                          **model_overrides)
  with hf.open_weights(input_dir) as reader:
    params = params_from_llava(cfg, reader)
  save_model(output_dir, cfg, params, overwrite=overwrite)
  return cfg


def save_llava(path: str, cfg: MultimodalConfig, params: Any,
               dtype: Any = None, overwrite: bool = False) -> None:
  """Writes config.json and model.safetensors for
  LlavaForConditionalGeneration.from_pretrained."""
  config = config_to_llava(cfg)
  tensors = params_to_llava(cfg, params, dtype)
  if dtype is not None:
    config["dtype"] = str(np.dtype(dtype))
  hf._prepare_hf_dir(path, overwrite)  # pylint: disable=protected-access
  save_file(tensors, os.path.join(path, hf.SAFETENSORS_FILE),
            metadata={"format": "pt"})
  hf._write_json(os.path.join(path, hf.CONFIG_FILE), config)  # pylint: disable=protected-access


def native_to_llava(input_dir: str, output_dir: str, dtype: Any = None,
                    overwrite: bool = False) -> MultimodalConfig:
  cfg, params = load_params(input_dir)
  save_llava(output_dir, cfg, params, dtype, overwrite)
  return cfg
