"""Adapters on disk: native adapter checkpoints, and HF PEFT's LoRA format.

Native adapter (any PEFT method), small and apart from the base:

    DIR/peft_config.json   {"peft": PeftConfig fields, "model": the base's
                           architecture (ModelConfig without run choices)}
    DIR/adapter/           Orbax checkpoint of the adapter parameters alone,
                           a pure dict ({"blocks": {"attn": {"peft": ...}}})

HF PEFT (LoRA only): `adapter_config.json` and `adapter_model.safetensors`
with tensors named `base_model.model.<HF module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r] (embeddings: `lora_embedding_A` [r, vocab] and
`lora_embedding_B` [embed, r]); the update is scale * B A with scale =
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Our factors keep the
weights' layouts instead (A [*in, r], B [r, *out], e.g. q's B [r, H, Dh]),
so each converts as a torch Linear weight does, through `convert.hf`'s
layout table (`hf.layout`, `hf.Tensor`): HF names, native paths and layer
indices come from there.

    peft_to_native(PEFT_DIR, DIR, base)   base: ModelConfig, or a native or
                                          HF checkpoint directory
    native_to_peft(DIR, PEFT_DIR)         loads with peft.PeftModel
    load_peft_model(base, adapter)        a PEFT Decoder, base + adapter
    save_adapter(DIR, model) / load_adapter(DIR, model)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors.numpy import save_file

from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.convert import hf, native
from mllm_jax.modeling import peft as peft_lib
from mllm_jax.modeling.config import RUN_FIELDS, ModelConfig
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.modeling.peft_config import ALL_LINEAR, PeftConfig
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import param_shardings

ADAPTER_CONFIG = "peft_config.json"
ADAPTER_PARAMS = "adapter"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TORCH = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# HF module name -> our LoRA target.
HF_TARGETS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
              "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
              "embed_tokens": "embed", "lm_head": "lm_head"}
# adapter_config.json fields whose non-default values this decoder cannot
# apply (DoRA, biases, per-layer or per-module ranks, ...): refused.
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save",
                "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "exclude_modules", "target_parameters",
                "trainable_token_indices", "layer_replication",
                "alora_invocation_tokens", "fan_in_fan_out", "use_qalora",
                "use_bdlora", "megatron_config")
# Tensors PEFT writes beside LoRA's when embeddings are targeted (a copy of
# the base's weights, for resized vocabularies).
_BASE_COPY = ".base_layer.weight"

Path = native.Path


# ----------------------------------------------------------------------------
# Native adapter checkpoints
# ----------------------------------------------------------------------------


def adapter_shapes(model_cfg: ModelConfig, peft: PeftConfig
                   ) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every adapter parameter's shape and dtype, by path (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: peft_lib.build_model(model_cfg, peft,
                                                         nnx.Rngs(0)))
  return native.flatten(peft_lib.adapter_params(abstract))


def _check_shapes(expected: Mapping[Path, Any], got: Mapping[Path, Any],
                  source: str) -> None:
  for path in expected:
    if path not in got:
      raise ConfigError(f"{source}: adapter parameter {native.dotted(path)} "
                        f"is missing")
  for path, value in got.items():
    if path not in expected:
      raise ConfigError(f"{source}: unexpected adapter parameter "
                        f"{native.dotted(path)}")
    if tuple(value.shape) != tuple(expected[path].shape):
      raise ConfigError(f"{source}: adapter parameter {native.dotted(path)} "
                        f"has shape {tuple(value.shape)}, the configs imply "
                        f"{tuple(expected[path].shape)}")


def _prepare_dir(path: str, names: tuple[str, ...], overwrite: bool) -> None:
  taken = [n for n in names if os.path.exists(os.path.join(path, n))]
  if taken and not overwrite:
    raise FileExistsError(f"{path} already holds an adapter ({taken[0]}); "
                          f"pass overwrite=True to replace it")
  if jax.process_index() == 0:
    for name in taken:
      target = os.path.join(path, name)
      shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    os.makedirs(path, exist_ok=True)


def _write_json(file: str, value: Any) -> None:
  if jax.process_index() == 0:
    with open(file, "w") as f:
      json.dump(value, f, indent=2, sort_keys=True)
      f.write("\n")


def save_adapter_params(path: str, model_cfg: ModelConfig, peft: PeftConfig,
                        params: Mapping[str, Any],
                        overwrite: bool = False) -> None:
  """Writes a native adapter: the configs and `params` (the adapter's pure
  dict, numpy or jax arrays, sharded or not)."""
  path = os.path.abspath(path)
  _check_shapes(adapter_shapes(model_cfg, peft), native.flatten(params),
                f"save_adapter({path})")
  _prepare_dir(path, (ADAPTER_CONFIG, ADAPTER_PARAMS), overwrite)
  _write_json(os.path.join(path, ADAPTER_CONFIG),
              {"peft": peft.to_dict(), "model": model_cfg.architecture()})
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, ADAPTER_PARAMS), dict(params))


def save_adapter(path: str, model: Decoder, overwrite: bool = False) -> None:
  """Writes a PEFT model's adapter alone (its base is not copied)."""
  peft = peft_lib.peft_config(model)
  check(peft.method != "none", "peft.method",
        "the model has no adapter (a plain Decoder); save it with "
        "native.save_model")
  save_adapter_params(path, model.cfg, peft, peft_lib.adapter_params(model),
                      overwrite)


def read_adapter_config(path: str, **overrides: Any
                        ) -> tuple[ModelConfig, PeftConfig]:
  """DIR/peft_config.json -> (the base's ModelConfig, PeftConfig);
  `overrides` set the base's run choices and dtypes."""
  file = os.path.join(os.path.abspath(path), ADAPTER_CONFIG)
  values = native.read_checkpoint_json(path, ADAPTER_CONFIG,
                                       "native adapter")
  try:
    peft = from_config(PeftConfig, values["peft"], "peft")
    model = {k: v for k, v in values["model"].items()
             if k not in RUN_FIELDS}
    model_cfg = from_config(ModelConfig, {**model, **overrides}, "model")
  except KeyError as e:
    raise ConfigError(f"{file}: lacks {e}") from e
  except ConfigError as e:
    raise ConfigError(f"{file}: {e}") from e
  return model_cfg, peft


def check_adapter(path: str, model_cfg: ModelConfig, peft: PeftConfig,
                  field: str) -> None:
  """Fails naming `field` and each differing field when the adapter at
  `path` is not for this architecture and method."""
  saved_cfg, saved_peft = read_adapter_config(path)
  saved, wanted = saved_cfg.architecture(), model_cfg.architecture()
  differ = [f"{k}: {saved[k]!r} in the adapter, {wanted[k]!r} in model"
            for k in wanted if saved.get(k) != wanted[k]]
  if differ:
    raise ConfigError(f"{field}: {path} adapts another architecture than "
                      f"model.* ({'; '.join(differ)})")
  peft_lib.check_same_method(saved_peft, peft, f"{field}: {path}")


def restore_adapter(path: str, targets: Mapping[str, Any]) -> dict[str, Any]:
  """Restores a native adapter's parameters straight into `targets` (a pure
  dict of ShapeDtypeStructs with shardings): each device reads its slices."""
  params_dir = os.path.join(os.path.abspath(path), ADAPTER_PARAMS)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir} is missing: the adapter has a "
                            f"config but no parameters")
  _check_shapes(native.flatten(targets), _saved_shapes(params_dir),
                params_dir)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(params_dir, dict(targets))


def _saved_shapes(params_dir: str) -> dict[Path, Any]:
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(params_dir)
  tree = getattr(meta, "item_metadata", meta)
  return native.flatten(getattr(tree, "tree", tree))


def load_adapter(path: str, model: Decoder) -> Decoder:
  """Puts the adapter at `path` into `model` (built with the same method
  and architecture), each array restored into the sharding it has there."""
  check_adapter(path, model.cfg, peft_lib.peft_config(model), "load_adapter")
  state = peft_lib.adapter_state(model)
  targets = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restore_adapter(path, targets))
  nnx.update(model, state)
  return model


def load_adapter_params(path: str, **overrides: Any
                        ) -> tuple[ModelConfig, PeftConfig, dict[str, Any]]:
  """A native adapter as host numpy arrays (for export), with its configs."""
  model_cfg, peft = read_adapter_config(path, **overrides)
  params_dir = os.path.join(os.path.abspath(path), ADAPTER_PARAMS)
  shapes = adapter_shapes(model_cfg, peft)
  _check_shapes(shapes, _saved_shapes(params_dir), params_dir)
  args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)
          for p, s in shapes.items()}
  with ocp.PyTreeCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        restore_args=native.unflatten(args)))
  return model_cfg, peft, params


# ----------------------------------------------------------------------------
# HF PEFT's LoRA format
# ----------------------------------------------------------------------------


def lora_layout(model_cfg: ModelConfig, peft: PeftConfig
                ) -> list[tuple[hf.Tensor, hf.Tensor]]:
  """(A, B) of every PEFT LoRA tensor pair, in HF's order: each an
  hf.Tensor whose `name` is PEFT's and whose `path`/`layer` are our factor's.
  A holds the weight's input dims and the rank, B the rank and its outputs;
  both convert like torch Linear weights ([out, in] <-> [in..., out...])."""
  weights = hf.layout(model_cfg)
  if model_cfg.tie_embeddings:  # PEFT's lm_head wraps the tied table
    weights.append(hf.Tensor("lm_head.weight", ("lm_head",), None, 1,
                             (model_cfg.embed_dim, model_cfg.vocab_size)))
  by_weight = {weight_path: (target, lora_path, in_dims)
               for target, (lora_path, weight_path, in_dims, _)
               in peft_lib.LORA_PATHS.items() if target in peft.targets}
  r, pairs = peft.rank, []
  for t in weights:
    if t.path not in by_weight:
      continue
    target, lora_path, in_dims = by_weight[t.path]
    module = PEFT_PREFIX + t.name[:-len(".weight")]
    suffixes = (("lora_embedding_A", "lora_embedding_B") if target == "embed"
                else ("lora_A.weight", "lora_B.weight"))
    a_name, b_name = (f"{module}.{suffix}" for suffix in suffixes)
    ins, outs = t.shape[:in_dims], t.shape[in_dims:]
    pairs.append((hf.Tensor(a_name, lora_path + ("lora_a",), t.layer, in_dims,
                            ins + (r,)),
                  hf.Tensor(b_name, lora_path + ("lora_b",), t.layer, 1,
                            (r,) + outs)))
  return pairs


def _module_names(model_cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
  """Every LoRA-able HF module name -> (our target, layer or None)."""
  names = {"model.embed_tokens": ("embed", None), "lm_head": ("lm_head", None)}
  for i in range(model_cfg.num_layers):
    for hf_name, target in HF_TARGETS.items():
      if target in ("q", "k", "v", "o"):
        names[f"model.layers.{i}.self_attn.{hf_name}"] = (target, i)
      elif target in ("gate", "up", "down"):
        names[f"model.layers.{i}.mlp.{hf_name}"] = (target, i)
  return names


def _targets_from_hf(value: Any, model_cfg: ModelConfig, source: str
                     ) -> tuple[str, ...]:
  """PEFT's target_modules (a list of names or suffixes, "all-linear", or a
  regular expression over full module names) -> our targets. A target must
  be chosen in every layer or in none: adapters are stacked over layers."""
  field = f"{source}:target_modules"
  if value == "all-linear":
    return ALL_LINEAR
  modules = _module_names(model_cfg)
  if isinstance(value, str):  # PEFT: a regular expression over full names
    matches = lambda name: re.fullmatch(value, name) is not None
  else:  # PEFT: a name matches a key equal to it or to a suffix after a dot
    check(isinstance(value, (list, tuple)) and bool(value), field,
          f"expected a list of module names or a regular expression, got "
          f"{value!r}")
    suffix = lambda name, key: name == key or name.endswith("." + key)
    unknown = [k for k in value if not any(suffix(n, k) for n in modules)]
    check(not unknown, field, f"{unknown} name no LoRA-able LLaMA module "
          f"(these are {sorted(HF_TARGETS)})")
    matches = lambda name: any(suffix(name, key) for key in value)
  chosen: dict[str, set] = {}
  for name, (target, layer) in modules.items():
    if matches(name):
      chosen.setdefault(target, set()).add(layer)
  check(bool(chosen), field, f"{value!r} selects no module")
  for target, layers in chosen.items():
    if layers != {None}:
      check(len(layers) == model_cfg.num_layers, field,
            f"{value!r} adapts {target} in layers {sorted(layers)} only; "
            f"adapters here cover every layer")
  return tuple(t for t in peft_lib.LORA_PATHS if t in chosen)


def peft_config_from_hf(values: Mapping[str, Any], model_cfg: ModelConfig,
                        source: str = PEFT_CONFIG) -> PeftConfig:
  """adapter_config.json -> PeftConfig; refuses what this decoder would
  compute differently, naming the field."""
  peft_type = values.get("peft_type")
  check(peft_type == "LORA", f"{source}:peft_type",
        f"got {peft_type!r}; only LoRA adapters can be converted")
  for name in _UNSUPPORTED:
    check(not values.get(name), f"{source}:{name}",
          f"{values.get(name)!r} is not supported (plain LoRA only)")
  check(values.get("bias", "none") == "none", f"{source}:bias",
        "adapters with biases are not supported")
  try:
    return from_config(PeftConfig, dict(
        method="lora", rank=int(values["r"]),
        alpha=float(values.get("lora_alpha", 8)),
        dropout=float(values.get("lora_dropout") or 0.0),
        targets=_targets_from_hf(values.get("target_modules"), model_cfg,
                                 source),
        rslora=bool(values.get("use_rslora", False))), "peft")
  except KeyError as e:
    raise ConfigError(f"{source}: lacks {e}") from e
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from e


def peft_config_to_hf(peft: PeftConfig,
                      base_model_name_or_path: str | None = None
                      ) -> dict[str, Any]:
  """PeftConfig -> an adapter_config.json that peft.PeftModel loads."""
  check(peft.method == "lora", "peft.method",
        f"only LoRA exports to HF PEFT, not {peft.method!r}")
  names = {t: n for n, t in HF_TARGETS.items()}
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": peft.rank, "lora_alpha": peft.alpha,
      "lora_dropout": peft.dropout, "use_rslora": peft.rslora,
      "target_modules": sorted(names[t] for t in peft.targets),
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "use_dora": False, "lora_bias": False,
      "modules_to_save": None, "layers_to_transform": None,
      "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
      "revision": None,
  }


def _open_peft_weights(path: str):
  if os.path.isfile(os.path.join(path, PEFT_WEIGHTS)):
    return hf.open_weights(path)  # reads every *.safetensors there
  if os.path.isfile(os.path.join(path, PEFT_TORCH)):
    # pylint: disable-next=protected-access
    reader = hf._torch_reader({None: os.path.join(path, PEFT_TORCH)})
    return contextlib.nullcontext(reader)
  raise FileNotFoundError(f"{path} has no adapter weights: expected "
                          f"{PEFT_WEIGHTS} (or {PEFT_TORCH} with torch)")


def _check_base_copies(model_cfg: ModelConfig, reader: hf.WeightReader,
                       base_params: Mapping[str, Any] | None) -> None:
  """PEFT saves the embedding weights when they are targeted. They must be
  the base's (else the adapter is for another, e.g. resized, model)."""
  copies = sorted(n for n in reader.names if n.endswith(_BASE_COPY))
  if not copies or base_params is None:
    return
  flat = native.flatten(base_params)
  weights = {t.name: t for t in hf.layout(model_cfg)}
  for name in copies:
    hf_name = name[len(PEFT_PREFIX):-len(_BASE_COPY)] + ".weight"
    if hf_name == "lm_head.weight" and model_cfg.tie_embeddings:
      hf_name = "model.embed_tokens.weight"
    check(hf_name in weights, f"{reader.where[name]}:{name}",
          "has no place in the base model")
    t = weights[hf_name]
    base = np.asarray(flat[t.path], np.float32)
    copy = np.asarray(t.to_native(reader.get(name)), np.float32)
    if base.shape != copy.shape or not np.allclose(copy, base, rtol=1e-2,
                                                   atol=1e-3):
      raise ConfigError(f"{reader.where[name]}: {name} (PEFT's copy of the "
                        f"base weight) differs from the base model's "
                        f"{t.name}: the adapter is for another base")


def load_peft(path: str, model_cfg: ModelConfig,
              base_params: Mapping[str, Any] | None = None
              ) -> tuple[PeftConfig, dict[str, Any]]:
  """An HF PEFT LoRA directory -> (PeftConfig, the adapter's native pure
  dict of numpy arrays in model_cfg.param_dtype). With `base_params`, the
  embedding copies PEFT may have saved are checked against the base."""
  path = os.path.abspath(path)
  values = native.read_checkpoint_json(path, PEFT_CONFIG, "PEFT adapter")
  peft = peft_config_from_hf(values, model_cfg,
                             os.path.join(path, PEFT_CONFIG))
  pairs = lora_layout(model_cfg, peft)
  dtype = model_cfg.weight_dtype
  with _open_peft_weights(path) as reader:
    used = {t.name for pair in pairs for t in pair}
    extra = sorted(n for n in reader.names - used
                   if not n.endswith(_BASE_COPY))
    if extra:
      raise ConfigError(f"{reader.where[extra[0]]}: {len(extra)} tensor(s) "
                        f"are not plain LoRA factors of the targets "
                        f"{peft.targets}, e.g. {extra[:3]}")
    _check_base_copies(model_cfg, reader, base_params)
    flat: dict[Path, Any] = {}
    layers: dict[Path, list[np.ndarray]] = {}
    for t in (t for pair in pairs for t in pair):
      w = reader.get(t.name)
      if tuple(w.shape) != t.hf_shape:
        raise ConfigError(f"{reader.where[t.name]}: tensor {t.name} has "
                          f"shape {tuple(w.shape)} but the configs imply "
                          f"{t.hf_shape} (r={peft.rank})")
      x = np.asarray(t.to_native(w), dtype)
      if t.layer is None:
        flat[t.path] = x
      else:
        layers.setdefault(t.path, []).append(x)
  flat.update({p: np.stack(xs) for p, xs in layers.items()})
  return peft, native.unflatten(flat)


def save_peft(path: str, model_cfg: ModelConfig, peft: PeftConfig,
              params: Mapping[str, Any],
              base_model_name_or_path: str | None = None, dtype: Any = None,
              overwrite: bool = False) -> None:
  """Writes adapter_config.json and adapter_model.safetensors from a LoRA
  adapter's pure dict (numpy or single-process jax arrays); `dtype` of the
  tensors defaults to model_cfg.param_dtype."""
  path = os.path.abspath(path)
  hf_config = peft_config_to_hf(peft, base_model_name_or_path)
  flat = native.flatten(params)
  _check_shapes(adapter_shapes(model_cfg, peft), flat, f"save_peft({path})")
  fetch = dict(native.host_arrays(params))
  dtype = np.dtype(dtype or model_cfg.weight_dtype)
  tensors = {}
  for t in (t for pair in lora_layout(model_cfg, peft) for t in pair):
    x = fetch[t.path]() if t.layer is None else fetch[t.path](t.layer)
    tensors[t.name] = np.asarray(t.to_hf(x), dtype)
  _prepare_dir(path, (PEFT_CONFIG, PEFT_WEIGHTS), overwrite)
  if jax.process_index() == 0:
    save_file(tensors, os.path.join(path, PEFT_WEIGHTS),
              metadata={"format": "pt"})
  _write_json(os.path.join(path, PEFT_CONFIG), hf_config)


# ----------------------------------------------------------------------------
# Conversions and loading
# ----------------------------------------------------------------------------


def is_native_adapter(path: str) -> bool:
  return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_base(base: str, **overrides: Any
              ) -> tuple[ModelConfig, dict[str, Any]]:
  """A native or HF checkpoint directory -> (ModelConfig, host params)."""
  if os.path.isfile(os.path.join(base, native.CONFIG_FILE)):
    return native.load_params(base, **overrides)
  return hf.load_hf(base, **overrides)


def base_config(base: ModelConfig | str, **overrides: Any) -> ModelConfig:
  """A ModelConfig, or that of a native or HF checkpoint directory."""
  if isinstance(base, ModelConfig):
    return base
  if os.path.isfile(os.path.join(base, native.CONFIG_FILE)):
    return native.read_config(base, **overrides)
  return hf.config_from_hf(hf.read_hf_config(base),
                           os.path.join(base, hf.CONFIG_FILE), **overrides)


def peft_to_native(input_dir: str, output_dir: str,
                   base: ModelConfig | str, overwrite: bool = False,
                   **overrides: Any) -> PeftConfig:
  """Converts an HF PEFT LoRA adapter into a native adapter for `base` (a
  ModelConfig, or a native or HF checkpoint directory, whose weights are
  then also checked against PEFT's embedding copies)."""
  model_cfg = base_config(base, **overrides)
  base_params = None if isinstance(base, ModelConfig) else load_base(
      base, **overrides)[1]
  peft, params = load_peft(input_dir, model_cfg, base_params)
  save_adapter_params(output_dir, model_cfg, peft, params, overwrite)
  return peft


def native_to_peft(input_dir: str, output_dir: str,
                   base_model_name_or_path: str | None = None,
                   dtype: Any = None, overwrite: bool = False) -> PeftConfig:
  """Converts a native LoRA adapter into an HF PEFT directory."""
  model_cfg, peft, params = load_adapter_params(input_dir)
  save_peft(output_dir, model_cfg, peft, params, base_model_name_or_path,
            dtype, overwrite)
  return peft


def model_from_params(model_cfg: ModelConfig, peft: PeftConfig,
                      params: Mapping[str, Any], mesh: Mesh | None = None,
                      rules: Rules | None = None) -> Decoder:
  """Host params (base and adapter in one pure dict) -> the PEFT model;
  with a mesh each device gets only its slices."""
  abstract = nnx.eval_shape(lambda: peft_lib.build_model(model_cfg, peft,
                                                         nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = native.flatten(nnx.to_pure_dict(state))
  flat = native.flatten(params)
  _check_shapes(expected, flat, "params")
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = {path: device for path in expected}
  else:
    shardings = native.flatten(nnx.to_pure_dict(param_shardings(
        state, mesh, DEFAULT_RULES if rules is None else rules)))
  placed = {}
  for path, sharding in shardings.items():
    host, dtype = flat[path], expected[path].dtype
    placed[path] = jax.make_array_from_callback(
        host.shape, sharding,
        lambda index, host=host, dtype=dtype: np.asarray(host[index], dtype))
  nnx.replace_by_pure_dict(state, native.unflatten(placed))
  return nnx.merge(graphdef, state)


def load_peft_model(base: str, adapter: str, mesh: Mesh | None = None,
                    rules: Rules | None = None, **overrides: Any
                    ) -> tuple[ModelConfig, Decoder]:
  """A base checkpoint (native or HF directory) plus an adapter (native
  adapter or HF PEFT directory) -> the PEFT Decoder. `overrides` set run
  choices and dtypes (e.g. dtype="float32")."""
  model_cfg, base_params = load_base(base, **overrides)
  if is_native_adapter(adapter):
    check_adapter(adapter, model_cfg, read_adapter_config(adapter)[1],
                  "adapter")
    _, peft, params = load_adapter_params(adapter, **overrides)
  else:
    peft, params = load_peft(adapter, model_cfg, base_params)
  merged = peft_lib.merge_trees(base_params, params)
  return model_cfg, model_from_params(model_cfg, peft, merged, mesh, rules)
