"""The host a bench ran on: CPU model, cores, load average.

Every bench prints `host_line()` first and `load_line()` last. A ratio
measured while the machine is busy is not a result (a loaded host once turned
a 0.8x decode into a recorded 8x), and the same machine kind lands on
different processors (an Intel Xeon gave the training-step bench 0.8x where
an AMD Zen 5 gave 1.8-2.0x): docs/benchmarks.md records both with each
figure.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The processor's name from /proc/cpuinfo (Linux), else platform's."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_line() -> str:
  one, five, fifteen = os.getloadavg()
  return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} "
          f"({os.cpu_count()} CPUs); a busy host makes ratios meaningless")


def host_line() -> str:
  return (f"host: {cpu_model()}, {len(os.sched_getaffinity(0))} usable of "
          f"{os.cpu_count()} CPUs; {load_line()}")
