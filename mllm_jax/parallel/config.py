"""The mesh and sharding config: axis sizes and the logical-axis rules table.

Imports no JAX: config files (configs/*.py) import this, and reading or
checking a config never starts a backend. `mesh.make_mesh` builds the mesh
and `sharding` applies the rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mllm_jax.configlib import ConfigError, check

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")

# (logical name, mesh axis / tuple of mesh axes / None for replicated), ...
Rules = tuple[tuple[str, Any], ...]

# Parameters and activations have separate names so that, e.g., FSDP shards the
# `embed` dimension of weights but not of activations.
DEFAULT_RULES: Rules = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", "stage"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Mesh axis sizes (-1: whatever the other axes leave) and the rules table.

  `data` replicates parameters; `fsdp` shards them (ZeRO-3) and the batch;
  `tensor` shards heads and MLP width (Megatron style); `stage` and `sequence`
  are reserved for pipeline and sequence parallelism and default to 1.
  There is no pipeline schedule yet, so `validate` refuses `stage` > 1 (the
  rules would only shard the stacked layers across it, FSDP over layers).
  """
  data: int = -1
  stage: int = 1
  fsdp: int = 1
  sequence: int = 1
  tensor: int = 1
  rules: Rules = DEFAULT_RULES

  def validate(self, prefix: str = "parallel") -> None:
    sizes = self.axis_sizes()
    check(sum(s == -1 for s in sizes) <= 1, prefix,
          "at most one mesh axis may be -1")
    for name, size in zip(MESH_AXES, sizes):
      check(size == -1 or size >= 1, f"{prefix}.{name}",
            f"mesh axis size must be >= 1 or -1, got {size}")
    check(self.stage == 1, f"{prefix}.stage",
          f"got {self.stage}, but pipeline parallelism does not exist yet: "
          f"the stage axis must be 1 (a larger one would only shard the "
          f"stacked layers, FSDP over layers, not a pipeline); use fsdp or "
          f"data instead")
    for i, rule in enumerate(self.rules):
      check(len(rule) == 2 and isinstance(rule[0], str), f"{prefix}.rules[{i}]",
            f"a rule is (logical_name, mesh_axes), got {rule!r}")
      axes = rule[1]
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      for axis in axes:
        check(axis in MESH_AXES, f"{prefix}.rules[{i}]",
              f"unknown mesh axis {axis!r} for {rule[0]!r}; mesh axes are "
              f"{MESH_AXES}")

  def axis_sizes(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with -1 filled in; fails naming the axes that don't fit."""
    sizes = self.axis_sizes()
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(
            f"parallel: the fixed mesh axes multiply to {known}, which does not "
            f"divide the {num_devices} devices")
      sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
      shown = ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
      raise ConfigError(
          f"parallel: mesh {shown} has {math.prod(sizes)} devices but "
          f"{num_devices} are available; make the product match or set one "
          f"axis to -1")
    return sizes

  def batch_shards(self, num_devices: int) -> int:
    """How many ways the global batch is split (data x fsdp)."""
    sizes = dict(zip(MESH_AXES, self.resolved_shape(num_devices)))
    return sizes["data"] * sizes["fsdp"]
