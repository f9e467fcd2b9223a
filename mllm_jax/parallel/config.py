"""The mesh and sharding config: axis sizes and the logical-axis rules table.

Imports no JAX: config files (configs/*.py) import this, and reading or
checking a config never starts a backend. `mesh.make_mesh` builds the mesh
and `sharding` applies the rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mllm_jax.configlib import ConfigError, check, check_choice

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")
PIPELINE_SCHEDULES = ("gpipe", "circular")

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
  `tensor` shards heads and MLP width (Megatron style); `sequence` is
  reserved for sequence parallelism and defaults to 1.

  `stage` > 1 turns on pipeline parallelism (`mllm_jax.parallel.pipeline`):
  the decoder's layers are split into `stage` contiguous groups, one per
  position on the `stage` axis, and each (accumulation) micro-batch is cut
  into `pipeline_microbatches` pieces that flow through them. The schedule
  is "gpipe" (each stage runs its layers once per piece) or "circular"
  (each stage holds `pipeline_repeats` groups of layers and every piece
  goes round the ring that many times, shrinking the bubble by as much).
  Its size must be fixed (not -1): it decides how the layers are cut.
  """
  data: int = -1
  stage: int = 1
  fsdp: int = 1
  sequence: int = 1
  tensor: int = 1
  rules: Rules = DEFAULT_RULES
  # Pipeline (only with stage > 1): pieces per micro-batch, the schedule,
  # and for "circular" how many times each piece goes round the stages.
  pipeline_microbatches: int = 0
  pipeline_schedule: str = "gpipe"
  pipeline_repeats: int = 1

  def validate(self, prefix: str = "parallel") -> None:
    sizes = self.axis_sizes()
    check(sum(s == -1 for s in sizes) <= 1, prefix,
          "at most one mesh axis may be -1")
    for name, size in zip(MESH_AXES, sizes):
      check(size == -1 or size >= 1, f"{prefix}.{name}",
            f"mesh axis size must be >= 1 or -1, got {size}")
    self._validate_pipeline(prefix)
    for i, rule in enumerate(self.rules):
      check(len(rule) == 2 and isinstance(rule[0], str), f"{prefix}.rules[{i}]",
            f"a rule is (logical_name, mesh_axes), got {rule!r}")
      axes = rule[1]
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      for axis in axes:
        check(axis in MESH_AXES, f"{prefix}.rules[{i}]",
              f"unknown mesh axis {axis!r} for {rule[0]!r}; mesh axes are "
              f"{MESH_AXES}")

  def _validate_pipeline(self, prefix: str) -> None:
    check(self.stage >= 1, f"{prefix}.stage",
          f"got {self.stage}; the pipeline's stage count must be fixed (it "
          f"decides how the layers are cut), not -1")
    check_choice(self.pipeline_schedule, PIPELINE_SCHEDULES,
                 f"{prefix}.pipeline_schedule")
    check(self.pipeline_repeats >= 1, f"{prefix}.pipeline_repeats",
          f"must be >= 1, got {self.pipeline_repeats}")
    if self.stage == 1:
      check(self.pipeline_microbatches == 0 and self.pipeline_repeats == 1,
            f"{prefix}.stage", "pipeline_microbatches / pipeline_repeats "
            "are set but stage is 1, so there is no pipeline; set stage > 1 "
            "or leave them at 0 / 1")
      return
    check(self.pipeline_microbatches >= 1, f"{prefix}.pipeline_microbatches",
          f"stage={self.stage} pipelines the layers, which needs the number "
          f"of micro-batches that flow through the stages (>= 1, best a few "
          f"times stage), got {self.pipeline_microbatches}")
    if self.pipeline_schedule == "gpipe":
      check(self.pipeline_repeats == 1, f"{prefix}.pipeline_repeats",
            f"got {self.pipeline_repeats}, but gpipe runs each stage's "
            f"layers once; use pipeline_schedule='circular' for repeats")
    else:
      check(self.pipeline_repeats >= 2, f"{prefix}.pipeline_repeats",
            f"circular needs >= 2 repeats (with 1 it is gpipe), got "
            f"{self.pipeline_repeats}")
      check(self.pipeline_microbatches >= self.stage,
            f"{prefix}.pipeline_microbatches",
            f"circular needs at least as many micro-batches as stages "
            f"({self.stage}) so that a micro-batch leaving the last stage "
            f"finds the first one free, got {self.pipeline_microbatches}")
    layers = dict(self.rules).get("layers")
    check(layers == "stage" or layers == ("stage",), f"{prefix}.rules",
          f"a pipeline keeps each stage's layers on its own devices, so "
          f"'layers' must map to 'stage', got {layers!r}")

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
