"""The device mesh built from the config, and multi-host start-up."""

from __future__ import annotations

import os
from typing import Sequence

import jax
from absl import logging
from jax.sharding import Mesh

from mllm_jax.configlib import check
from mllm_jax.parallel.config import MESH_AXES, ParallelConfig


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
  cfg.validate()
  devices = list(devices if devices is not None else jax.devices())
  shape = cfg.resolved_shape(len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if num_slices(devices) > 1:
    return Mesh(multislice_grid(shape, devices), MESH_AXES, axis_types=auto)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def num_slices(devices: Sequence[jax.Device]) -> int:
  """TPU slices the devices span (multislice); 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def multislice_grid(shape: Sequence[int], devices: Sequence[jax.Device]):
  """Devices arranged for a multislice run: the `data` axis is split across
  slices, which talk over the data-centre network, and every other axis
  stays inside a slice on the fast inter-chip links (`jax.make_mesh`
  refuses devices from several slices)."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  slices, axis = num_slices(devices), MESH_AXES.index("data")
  check(shape[axis] % slices == 0, "parallel.data",
        f"{shape[axis]} is not divisible by the {slices} TPU slices: "
        f"multislice runs data parallelism across slices, so set "
        f"parallel.data to a multiple of {slices}")
  inside, across = list(shape), [1] * len(shape)
  inside[axis], across[axis] = shape[axis] // slices, slices
  return mesh_utils.create_hybrid_device_mesh(inside, across, devices)


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
  JAX_NUM_PROCESSES and JAX_PROCESS_ID), from a TPU pod slice's worker
  list, or from MLLM_JAX_DISTRIBUTED=auto (set by launch/tpu on every TPU
  VM, where the worker list and multislice settings live in the VM's
  metadata); in the last two JAX discovers everything itself. A second call
  finds the runtime started and does nothing (launch.tpu.worker starts it
  before the binary's own start_process). Returns True if initialised.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  auto = os.environ.get("MLLM_JAX_DISTRIBUTED", "") == "auto"
  if coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif auto or "," in tpu_workers:
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True
