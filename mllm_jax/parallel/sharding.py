"""Logical axis names -> mesh axes, through one rules table.

Model code names every parameter and activation dimension logically (`embed`,
`heads`, `act_batch`, ...). The config's rules table maps each name to mesh
axes, so changing the parallelism is a config edit. Names absent from the
table, or mapped to None, are replicated. The table (`DEFAULT_RULES`) and the
mesh config live in `mllm_jax.parallel.config`, which imports no JAX.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.configlib import ConfigError
from mllm_jax.parallel.config import DEFAULT_RULES, Rules


def _mesh_axes(name: str | None, rules: Rules) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  return ()


def logical_to_spec(names: Sequence[str | None], rules: Rules,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Logical names of each dimension -> PartitionSpec over mesh axes.

  Mesh axes absent from `mesh` (e.g. `stage` on a 3-axis mesh) are dropped, and
  a mesh axis is used at most once (the first dimension that claims it wins).
  """
  used: set[str] = set()
  spec = []
  for name in names:
    axes = [a for a in _mesh_axes(name, rules)
            if (mesh is None or a in mesh.shape) and a not in used]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def shard_size(spec: PartitionSpec, dim: int, mesh: Mesh) -> int:
  entry = spec[dim] if dim < len(spec) else None
  if entry is None:
    return 1
  axes = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in axes)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical names a parameter was declared with (see modeling.layers)."""
  names = tuple(variable.get_metadata().get("out_sharding") or ())
  return names + (None,) * (variable.get_value().ndim - len(names))


def param_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """The state's structure with a NamedSharding in place of each value.

  Parameters (and optimizer moments, which keep their Variable wrappers) are
  sharded by their logical axes; other arrays (step counters) are replicated.
  Works on abstract (eval_shape) or concrete state. Fails naming the parameter
  when a dimension does not divide the mesh axes its rule maps it to.
  """
  def sharding(path, leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    names = logical_axes(leaf)
    spec = logical_to_spec(names, rules, mesh)
    for dim, size in enumerate(leaf.get_value().shape):
      parts = shard_size(spec, dim, mesh)
      if size % parts:
        raise ConfigError(
            f"parallel.rules: parameter {jax.tree_util.keystr(path)} dimension "
            f"{dim} ('{names[dim]}', size {size}) is not divisible by mesh "
            f"axes {spec[dim]} of size {parts}; change the mesh or map "
            f"'{names[dim]}' to None in the rules")
    return leaf.replace(value=NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(
      sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "mllm_jax_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes activation constraints active (trace model code inside this)."""
  token = _CONTEXT.set(_Context(mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_mesh`."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  spec = logical_to_spec(names, ctx.rules, ctx.mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def current_mesh() -> Mesh | None:
  ctx = _CONTEXT.get()
  return None if ctx is None else ctx.mesh


def current_spec(names: Sequence[str | None]) -> PartitionSpec | None:
  """The PartitionSpec `names` would get under the active mesh, if any."""
  ctx = _CONTEXT.get()
  return None if ctx is None else logical_to_spec(names, ctx.rules, ctx.mesh)


def mesh_of(model: Any) -> Mesh | None:
  """The mesh of more than one device that `model`'s parameters (a module
  or its state) are sharded on, if any."""
  state = nnx.state(model) if isinstance(model, nnx.Module) else model
  leaf = next((x for x in jax.tree.leaves(state)
               if isinstance(x, jax.Array)), None)
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
    return sharding.mesh
  return None


@contextlib.contextmanager
def on_mesh_of(model: Any, rules: Rules = DEFAULT_RULES
               ) -> Iterator[Callable[[Any], jax.Array]]:
  """For calls on a sharded model outside the trainer (held-out losses,
  reward scores, reference log-probabilities): runs the body under the
  model's mesh, as the trainer's steps run, and yields `put`, which places
  host rows [B, ...] (the same whole array on every process) split over
  the mesh's batch axes (`act_batch`; whole when B does not divide).
  Without both, every device computes every row, and a kernel that runs
  per device under shard_map (cpu_fused attention) runs unsplit on each.
  A model on one device gets `jnp.asarray` and no mesh."""
  mesh = mesh_of(model)
  if mesh is None:
    yield jax.numpy.asarray
    return
  spec = logical_to_spec(("act_batch",), rules, mesh)

  def put(rows):
    whole = np.shape(rows)[0] % shard_size(spec, 0, mesh)
    return jax.device_put(rows, NamedSharding(
        mesh, PartitionSpec() if whole else spec))
  with use_mesh(mesh, rules):
    yield put


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Rules) -> nnx.Module:
  """Builds `factory()` with every parameter born on its shard.

  Shapes come from `nnx.eval_shape` (nothing allocated); the real
  initialisation runs under jit with those shardings as outputs, so no device
  or host ever holds a full copy. Random values do not depend on the mesh.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(factory())

  with use_mesh(mesh, rules):
    state = init()
  return nnx.merge(graphdef, state)
