"""The device mesh built from the config, and multi-host start-up."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
from absl import logging
from jax.sharding import Mesh

from mllm_jax.configlib import ConfigError, check
from mllm_jax.parallel.sharding import DEFAULT_RULES, Rules

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Mesh axis sizes (-1: whatever the other axes leave) and the rules table.

  `data` replicates parameters; `fsdp` shards them (ZeRO-3) and the batch;
  `tensor` shards heads and MLP width (Megatron style); `stage` and `sequence`
  are reserved for pipeline and sequence parallelism and default to 1.
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


def parse_mesh(text: str) -> ParallelConfig:
  """'data=2,fsdp=2,tensor=2' -> ParallelConfig (unnamed axes are 1); the
  command-line form of a mesh, for binaries without an ml_collections config."""
  sizes = {name: 1 for name in MESH_AXES}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    check(bool(sep) and name.strip() in MESH_AXES, "mesh",
          f"{item!r} is not axis=size with an axis in {MESH_AXES}")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      check(False, "mesh", f"{item!r}: size {value!r} is not an integer")
  cfg = ParallelConfig(**sizes)
  cfg.validate("mesh")
  return cfg


def make_mesh(cfg: ParallelConfig,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes MESH_AXES over `devices` (default: all of them).

  `jax.make_mesh` orders devices to follow the physical interconnect, so the
  innermost axis (`tensor`) gets the fastest links. Axes are `Auto`: the
  compiler propagates shardings from parameters and `constrain` calls.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.resolved_shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def check_divisible(cfg: ParallelConfig, num_devices: int, *, num_heads: int,
                    num_kv_heads: int, batch_size: int | None = None) -> None:
  """Fails before compiling when the model or batch cannot be split evenly."""
  sizes = dict(zip(MESH_AXES, cfg.resolved_shape(num_devices)))
  tensor = sizes["tensor"]
  check(num_heads % tensor == 0, "model.num_heads",
        f"{num_heads} heads are not divisible by the tensor axis "
        f"(parallel.tensor={tensor})")
  kv_rule = dict(cfg.rules).get("kv_heads")
  if kv_rule is not None:
    check(num_kv_heads % tensor == 0, "model.num_kv_heads",
          f"{num_kv_heads} K/V heads are not divisible by the tensor axis "
          f"(parallel.tensor={tensor}); replicate them with the rule "
          f"('kv_heads', None)")
  if batch_size is not None:
    shards = sizes["data"] * sizes["fsdp"]
    check(batch_size % shards == 0, "train.batch_size",
          f"{batch_size} is not divisible by the data-parallel size "
          f"data*fsdp={shards}")


def initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when more than one process runs.

  Multi-process runs are recognised from JAX_COORDINATOR_ADDRESS (with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID), or from a TPU pod slice's worker
  list, where JAX discovers everything itself. Returns True if initialised.
  """
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif "," in tpu_workers:
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
