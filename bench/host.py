"""The host a bench ran on: CPU model, cores, load average.

Every bench prints `host_line()` first and `load_line()` last. A ratio
measured while the machine is busy is not a result (a loaded host once turned
a 0.8x decode into a recorded 8x), and the same machine kind lands on
different processors (an Intel Xeon gave the training-step bench 0.8x where
an AMD Zen 5 gave 1.8-2.0x): docs/benchmarks.md records both with each
figure.

`OtherLoad` measures what the rest of the machine used while a bench timed
its sides, and `alternate` runs the sides in turn.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any, Callable


def cpu_model() -> str:
  """The processor's name, family/model and whether it has AVX-512, from
  /proc/cpuinfo (Linux; a bare "AMD EPYC" has been both a Zen 3 without
  AVX-512, family 25, and a Zen 5 with it, family 26), else platform's."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags"):
          fields.setdefault(key, value.strip())
        if not line.strip() and fields:  # the first processor is enough
          break
  except OSError:
    pass
  if "model name" not in fields:
    return platform.processor() or platform.machine()
  avx512 = "avx512f" in fields.get("flags", "").split()
  return (f"{fields['model name']} (family {fields.get('cpu family', '?')} "
          f"model {fields.get('model', '?')}, "
          f"{'AVX-512' if avx512 else 'no AVX-512'})")


def load_line() -> str:
  one, five, fifteen = os.getloadavg()
  return (f"load average {one:.2f} {five:.2f} {fifteen:.2f} "
          f"({os.cpu_count()} CPUs); a busy host makes ratios meaningless")


def host_line() -> str:
  return (f"host: {cpu_model()}, {len(os.sched_getaffinity(0))} usable of "
          f"{os.cpu_count()} CPUs; {load_line()}")


# A ratio is called a result only when the rest of the machine used less
# than this many cores on average while the sides were timed (the load
# average cannot tell: it counts the bench's own threads too).
QUIET_OTHER_CORES = 0.25


def process_cpu_seconds() -> float:
  """User + system CPU time of this process, all its threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _busy_and_own() -> tuple[float, float]:
  """(CPU seconds the whole machine was busy, this process's CPU seconds,
  all threads). Steal time counts as busy: another guest had the core."""
  with open("/proc/stat") as f:
    ticks = [int(x) for x in f.readline().split()[1:9]]
  user, nice, system, _, _, irq, softirq, steal = ticks
  return ((user + nice + system + irq + softirq + steal)
          / os.sysconf("SC_CLK_TCK"), process_cpu_seconds())


class OtherLoad:
  """How many cores other processes kept busy between `start()` and
  `cores()`: the machine's busy CPU time (/proc/stat) less this process's
  own (all its threads: in-process peers included), over the wall time."""

  def __init__(self):
    self.start()

  def start(self) -> None:
    self._wall = time.perf_counter()
    self._busy, self._own = _busy_and_own()

  def cores(self) -> float:
    busy, own = _busy_and_own()
    wall = max(time.perf_counter() - self._wall, 1e-9)
    return max(0.0, (busy - self._busy) - (own - self._own)) / wall


def load_verdict(others: float) -> str:
  """'' when other processes kept under QUIET_OTHER_CORES cores busy (an
  OtherLoad's `cores()`), else why a ratio measured then is not a result."""
  if others < QUIET_OTHER_CORES:
    return ""
  return (f"NOT A RESULT: other processes kept {others:.2f} cores busy on "
          f"average while the sides were timed (quiet: under "
          f"{QUIET_OTHER_CORES}); rerun on a quiet host before quoting the "
          f"ratio")


def alternate(sides: dict[str, Callable[[int], Any]], rounds: int,
              warmup: int, cpu: dict[str, list[float]] | None = None
              ) -> tuple[dict[str, list[float]], dict[str, list]]:
  """Calls every side's `call(i)` for i in range(rounds), the sides in turn
  each round, so all see the same machine load. Returns (each side's wall
  times of rounds >= warmup, each side's return values of every round);
  `cpu`, when given, gets each side's CPU seconds of this process for the
  same rounds (sides that run in this process only)."""
  times = {name: [] for name in sides}
  results = {name: [] for name in sides}
  for name in sides:
    if cpu is not None:
      cpu[name] = []
  for i in range(rounds):
    for name, call in sides.items():
      start, start_cpu = time.perf_counter(), process_cpu_seconds()
      results[name].append(call(i))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
        if cpu is not None:
          cpu[name].append(process_cpu_seconds() - start_cpu)
  return times, results
