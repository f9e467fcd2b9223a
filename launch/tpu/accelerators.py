"""Cloud TPU accelerator types: what a name like `v5p-256` means for launching.

The launcher needs three facts per slice, all derived from the name: how
many hosts (TPU VM workers) it has, so it can tell how many JAX processes
must join; how many chips, for the log; and which runtime image (software
version) to boot, since each generation has its own. Names follow Cloud
TPU's convention: v4 and v5p count TensorCores (two per chip), v5e
(`v5litepod-N`) and v6e count chips. Hosts carry 4 chips, except the
single-host v5e/v6e machines with up to 8.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Family:
  """One TPU generation as the gcloud accelerator-type names spell it."""
  prefix: str            # the name before '-N'
  runtime_version: str   # default TPU VM software version for JAX
  cores_per_chip: int    # N in the name counts cores (v4, v5p) or chips
  single_host_chips: int  # the largest slice that is one VM
  max_size: int          # the largest N accepted
  sizes: tuple[int, ...] = ()  # the only Ns accepted, where the list is short


FAMILIES = {
    f.prefix: f for f in (
        Family("v4", "tpu-ubuntu2204-base", 2, 4, 4096),
        Family("v5p", "v2-alpha-tpuv5", 2, 4, 12288),
        Family("v5litepod", "v2-alpha-tpuv5-lite", 1, 8, 256,
               (1, 4, 8, 16, 32, 64, 128, 256)),
        Family("v6e", "v2-alpha-tpuv6e", 1, 8, 256,
               (1, 4, 8, 16, 32, 64, 128, 256)),
    )
}
CHIPS_PER_HOST = 4  # every multi-host slice of these generations


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A parsed accelerator type, e.g. Accelerator('v5p', 256)."""
  family: Family
  size: int

  @property
  def name(self) -> str:
    return f"{self.family.prefix}-{self.size}"

  @property
  def chips(self) -> int:
    return self.size // self.family.cores_per_chip

  @property
  def hosts(self) -> int:
    """TPU VM workers in one slice: one JAX process each."""
    if self.chips <= self.family.single_host_chips:
      return 1
    return self.chips // CHIPS_PER_HOST


def parse(name: str) -> Accelerator:
  """`v5p-256` -> Accelerator; ValueError saying what is accepted."""
  known = ", ".join(f"{p}-N" for p in FAMILIES)
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name or "")
  if not match or match.group(1) not in FAMILIES:
    raise ValueError(f"unknown accelerator type {name!r}; expected one of "
                     f"{known} (e.g. v5p-8, v5p-256, v4-32, v5litepod-16)")
  family, size = FAMILIES[match.group(1)], int(match.group(2))
  if family.sizes:
    ok = size in family.sizes
    rule = f"N in {family.sizes}"
  else:
    # v4/v5p: whole hosts of 4 chips = 8 cores.
    ok = size % 8 == 0 and 8 <= size <= family.max_size
    rule = f"N a multiple of 8 up to {family.max_size}"
  if not ok:
    raise ValueError(f"unknown accelerator type {name!r}: {family.prefix} "
                     f"slices need {rule}")
  return Accelerator(family, size)
