"""The native checkpoint: `model_config.json` plus an Orbax tree of params.

    DIR/model_config.json   the architecture: every ModelConfig field but the
                            run choices (RUN_FIELDS: attention backend, remat,
                            custom backward passes, ...), which each run
                            takes from its own config
    DIR/params/             Orbax checkpoint of nnx.state(Decoder) as a pure
                            dict: {"embed": {"table": ...}, "blocks": ...}

The params are stored as a pure dict (no NNX Variable wrappers) so a
checkpoint outlives changes to Flax's state classes. Loading restores each
array straight into its shard of the mesh; no host or device ever holds a full
copy unless no mesh is given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.modeling.config import RUN_FIELDS, ModelConfig
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import param_shardings

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"

Path = tuple[str, ...]

# ----------------------------------------------------------------------------
# Param trees
# ----------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """Nested dict -> {("blocks", "attn", "q"): leaf}, in sorted key order."""
  flat = {}
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def dotted(path: Path) -> str:
  return ".".join(path)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The decoder's graph and shape-only state (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def param_shapes(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every parameter's shape and dtype under `cfg`, by path."""
  _, state = abstract_model(cfg)
  return flatten(nnx.to_pure_dict(state))


def to_pure(model_or_state: Any) -> dict[str, Any]:
  """A Decoder, its nnx.State or a pure dict -> the pure dict of params."""
  if isinstance(model_or_state, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_state, nnx.Param))
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  if isinstance(model_or_state, Mapping):
    return dict(model_or_state)
  raise TypeError(f"expected a Decoder, an nnx.State or a dict of params, got "
                  f"{type(model_or_state).__name__}")


def check_params(cfg: ModelConfig, shapes: Mapping[Path, Any],
                 source: str) -> None:
  """Fails naming the parameter when `shapes` (path -> anything with a
  .shape) does not match what `cfg` builds: missing, unexpected or resized."""
  expected = param_shapes(cfg)
  for path in expected:
    if path not in shapes:
      raise ConfigError(f"{source}: parameter {dotted(path)} is missing "
                        f"(the model config expects it)")
  for path, value in shapes.items():
    if path not in expected:
      raise ConfigError(f"{source}: unexpected parameter {dotted(path)} "
                        f"(not in a model built from the config)")
    want, got = tuple(expected[path].shape), tuple(value.shape)
    if want != got:
      raise ConfigError(f"{source}: parameter {dotted(path)} has shape {got} "
                        f"but the model config implies {want}")


# ----------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------


def shardings(cfg: ModelConfig, mesh: Mesh | None,
              rules: Rules | None) -> dict[Path, jax.sharding.Sharding]:
  """Each param's sharding: by the rules on `mesh`, else the first device."""
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    return {path: device for path in param_shapes(cfg)}
  _, state = abstract_model(cfg)
  named = param_shardings(state, mesh, DEFAULT_RULES if rules is None
                          else rules)
  return flatten(nnx.to_pure_dict(named))


def build_model(cfg: ModelConfig, params: Mapping[str, Any]) -> Decoder:
  """Puts already-placed param arrays into a Decoder (no initialisation)."""
  graphdef, state = abstract_model(cfg)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def model_from_params(cfg: ModelConfig, params: Mapping[str, Any],
                      mesh: Mesh | None = None,
                      rules: Rules | None = None) -> Decoder:
  """Host (numpy) params -> Decoder; with a mesh each device gets only its
  own slices, cut from the host arrays (no full device copy)."""
  flat = flatten(params)
  check_params(cfg, flat, "params")
  placed = {}
  dtypes = param_shapes(cfg)
  for path, sharding in shardings(cfg, mesh, rules).items():
    host, dtype = flat[path], dtypes[path].dtype
    placed[path] = jax.make_array_from_callback(
        host.shape, sharding,
        lambda index, host=host, dtype=dtype: np.asarray(host[index], dtype))
  return build_model(cfg, unflatten(placed))


# ----------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------


def save_model(path: str, cfg: ModelConfig, model_or_state: Any,
               overwrite: bool = False) -> None:
  """Writes DIR/model_config.json and the params as an Orbax checkpoint.

  Accepts a Decoder, its state, or a pure dict of numpy / jax arrays (the
  converters hand over numpy so nothing needs to fit on a device).
  """
  path = os.path.abspath(path)
  params = to_pure(model_or_state)
  check_params(cfg, flatten(params), f"save_model({path})")
  _prepare_dir(path, overwrite)
  if jax.process_index() == 0:
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
      json.dump(cfg.architecture(), f, indent=2, sort_keys=True)
      f.write("\n")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), params)


def _prepare_dir(path: str, overwrite: bool) -> None:
  """Creates `path`; an earlier checkpoint there is replaced only on request
  (Orbax refuses to write over an existing item)."""
  taken = [name for name in (CONFIG_FILE, PARAMS_DIR)
           if os.path.exists(os.path.join(path, name))]
  if taken and not overwrite:
    raise FileExistsError(f"{path} already holds a checkpoint ({taken[0]}); "
                          f"pass overwrite=True (--overwrite) to replace it")
  if jax.process_index() == 0:
    if os.path.isdir(os.path.join(path, PARAMS_DIR)):
      shutil.rmtree(os.path.join(path, PARAMS_DIR))
    os.makedirs(path, exist_ok=True)


def read_checkpoint_json(path: str, filename: str, kind: str,
                         hint: str = "") -> dict[str, Any]:
  """PATH/FILENAME of a checkpoint directory as a dict; a missing directory
  or file, or bad JSON, fails naming it (``kind``: what PATH should be)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{kind} directory {path} does not exist")
  config_file = os.path.join(path, filename)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file} is missing: {path} is not a "
                            f"{kind}{hint}")
  try:
    with open(config_file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{config_file}: not valid JSON ({e})") from e


def read_config(path: str, **overrides: Any) -> ModelConfig:
  """DIR/model_config.json -> ModelConfig, with fields optionally replaced
  (e.g. dtype="float32"); errors name the file and the field.

  Run choices (RUN_FIELDS) come from `overrides` or ModelConfig's defaults,
  never from the file: a checkpoint written by a run that used the CPU
  kernels loads with the portable XLA paths unless this run asks otherwise.
  """
  path = os.path.abspath(path)
  config_file = os.path.join(path, CONFIG_FILE)
  values = read_checkpoint_json(
      path, CONFIG_FILE, "native checkpoint", " (convert one with "
      "`python -m launch.convert_checkpoint --from=hf`)")
  # Older checkpoints recorded them; ignore those.
  values = {k: v for k, v in values.items() if k not in RUN_FIELDS}
  try:
    return from_config(ModelConfig, {**values, **overrides}, "model")
  except ConfigError as e:
    raise ConfigError(f"{config_file}: {e}") from e


def saved_shapes(path: str) -> dict[Path, Any]:
  """Shapes and dtypes recorded in the Orbax metadata (no array is read)."""
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{params_dir} is missing: the checkpoint has a "
                            f"config but no params")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(params_dir)
  # Orbax wraps the tree (StepMetadata.item_metadata.tree) in newer versions.
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return flatten(tree)


def check_architecture(path: str, cfg: ModelConfig, field: str) -> None:
  """Fails naming `field`, the checkpoint and each differing field when the
  native checkpoint at `path` is not the architecture `cfg` describes (run
  choices may differ)."""
  saved = read_config(path).architecture()
  wanted = cfg.architecture()
  differ = [f"{k}: {saved[k]!r} in the checkpoint, {wanted[k]!r} in model"
            for k in wanted if saved.get(k) != wanted[k]]
  if differ:
    raise ConfigError(f"{field}: {path} is another architecture than "
                      f"model.* ({'; '.join(differ)})")


def restore_params(path: str, targets: Mapping[str, Any]) -> dict[str, Any]:
  """Restores a native checkpoint's params straight into `targets`: a pure
  dict (as `nnx.to_pure_dict` gives) of ShapeDtypeStructs carrying each
  array's dtype and sharding. Every device reads only its own slices; no
  device or host holds a whole array. Fails naming the parameter when the
  checkpoint lacks one or stores another shape."""
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  saved = saved_shapes(path)
  for key, target in flatten(targets).items():
    if key not in saved:
      raise ConfigError(f"{params_dir}: parameter {dotted(key)} is missing")
    if tuple(saved[key].shape) != tuple(target.shape):
      raise ConfigError(f"{params_dir}: parameter {dotted(key)} has shape "
                        f"{tuple(saved[key].shape)}, the model needs "
                        f"{tuple(target.shape)}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(params_dir, dict(targets))


def load_model(path: str, mesh: Mesh | None = None, rules: Rules | None = None,
               **overrides: Any) -> tuple[ModelConfig, Decoder]:
  """Reads a native checkpoint into a Decoder.

  With a mesh, every array is restored straight into the sharding that
  `param_shardings` gives it under `rules` (default DEFAULT_RULES); without,
  onto the first local device. `overrides` replace config fields that leave
  shapes alone (dtype, param_dtype (arrays are cast), and the run choices:
  attention_backend, remat, ...).
  """
  cfg = read_config(path, **overrides)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  check_params(cfg, saved_shapes(path), params_dir)
  dtypes = param_shapes(cfg)
  target = {p: jax.ShapeDtypeStruct(dtypes[p].shape, dtypes[p].dtype,
                                    sharding=s)
            for p, s in shardings(cfg, mesh, rules).items()}
  return cfg, build_model(cfg, restore_params(path, unflatten(target)))


def load_params(path: str, **overrides: Any
                ) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a native checkpoint into host numpy arrays (for export), without
  placing anything on a device."""
  cfg = read_config(path, **overrides)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  check_params(cfg, saved_shapes(path), params_dir)
  args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)
          for p, s in param_shapes(cfg).items()}
  with ocp.PyTreeCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        restore_args=unflatten(args)))
  return cfg, params


def host_arrays(params: Mapping[str, Any]) -> Iterator[tuple[Path, Callable]]:
  """(path, fetch) pairs; `fetch(index)` copies one slice to host numpy, so
  exporting a device-resident model never gathers a whole stacked array."""
  for path, value in flatten(params).items():
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      raise ConfigError(f"parameter {dotted(path)} spans several processes; "
                        f"export from a single-process run or use "
                        f"load_params()")
    yield path, lambda index=(), value=value: np.asarray(value[index])


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize
