"""NVIDIA GPUs described to XLA, so a CPU-only machine can compile for them.

XLA's CUDA plugin builds compile-only devices from a `GpuTargetConfigProto`
(the `target_config` option of `jax.experimental.topologies.get_topology_desc`)
instead of asking a driver. The figures below are each card's datasheet and
`cudaGetDeviceProperties` values; only the memory size enters our reports, the
rest steers XLA's fusion and tiling heuristics.
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GpuChip:
  """One card: what its driver would report, and its bf16 datasheet key."""
  name: str  # the device_kind XLA reports
  peak_key: str  # key into metrics.DATASHEET_PEAK_FLOPS
  memory_bytes: int  # totalGlobalMem
  compute_capability: tuple[int, int]
  sms: int
  l2_bytes: int
  bandwidth_bytes_per_s: float
  clock_ghz: float
  shared_per_sm: int
  shared_per_block_optin: int

  @property
  def hbm_gib(self) -> float:
    return self.memory_bytes / GIB

  def target_config(self) -> str:
    """The text-format GpuTargetConfigProto for this card."""
    major, minor = self.compute_capability
    fields = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": self.shared_per_sm,
        "shared_memory_per_block_optin": self.shared_per_block_optin,
        "threads_per_core_limit": 2048, "core_count": self.sms,
        "fpus_per_core": 128, "block_dim_limit_x": 2 ** 31 - 1,
        "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(self.bandwidth_bytes_per_s),
        "l2_cache_size": self.l2_bytes, "clock_rate_ghz": self.clock_ghz,
        "device_memory_size": self.memory_bytes,
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    info = "\n".join(f"  {key}: {value}" for key, value in fields.items())
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ "
            f"major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: 9 minor: 8 }}\n"
            f'device_description_str: "{self.name}"\n')


# Hopper SXM cards: 132 SMs, 228 KiB shared memory per SM (227 KiB usable by
# one block), 50 MiB L2. Memory is what the driver reports (nvidia-smi's
# 81559 MiB for the 80 GB H100, 143771 MiB for the 141 GB H200).
GPUS = {
    "H100": GpuChip("NVIDIA H100 80GB HBM3", "H100", 81559 * 2 ** 20, (9, 0),
                    132, 50 * 2 ** 20, 3.35e12, 1.98, 228 * 1024,
                    227 * 1024),
    "H200": GpuChip("NVIDIA H200", "H200", 143771 * 2 ** 20, (9, 0), 132,
                    50 * 2 ** 20, 4.8e12, 1.98, 228 * 1024, 227 * 1024),
}

# GPUs per host (NVLink domain) in the topology string "slices x hosts x gpus".
GPUS_PER_HOST = 8


def topology_string(count: int) -> str:
  """XLA's 'slices x hosts x devices' for `count` GPUs, 8 to a host."""
  if count <= GPUS_PER_HOST:
    return f"1x1x{count}"
  return f"1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}"
