"""Runs untrusted programs (model-written code) in a limited subprocess.

Limits, in layers:
  * a fresh Python (`-I`: no user site, no PYTHONPATH) in a scratch temp
    directory that is deleted afterwards (with anything it wrote);
  * resource.setrlimit in the child (a launcher sets them, then execs the
    program): CPU seconds, address space, file size, number of processes;
    plus a wall-clock timeout that kills the whole session's process group;
  * no network: a new network namespace (`unshare -n`, which needs root or
    user namespaces) when available, and always an audit hook installed
    before the program runs that refuses socket creation and connections.
This is containment for benchmark code, not a security boundary against a
determined attacker (use a VM or gVisor for that).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile

# Prepended to the program: blocks sockets at the audit-event level, which
# also covers modules that call the C socket API through Python.
_GUARD = '''\
import sys as _sys
def _no_network(event, args):
  if event in ("socket.__new__", "socket.connect", "socket.bind",
               "socket.getaddrinfo", "socket.sendto"):
    raise PermissionError("network access is disabled in the sandbox")
_sys.addaudithook(_no_network)
del _sys, _no_network
'''


@dataclasses.dataclass(frozen=True)
class RunResult:
  """status: 'passed' (exit 0), 'failed' (non-zero exit), 'timeout' or
  'memory' (MemoryError / killed for memory)."""
  status: str
  returncode: int | None
  stdout: str
  stderr: str

  @property
  def passed(self) -> bool:
    return self.status == "passed"


@functools.lru_cache(maxsize=1)
def _can_unshare() -> bool:
  if not shutil.which("unshare"):
    return False
  try:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                          timeout=10, check=False).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


# Sets the limits in the child itself and then execs the program, so the
# parent never runs Python between fork and exec (unsafe in a multithreaded
# process such as one running JAX).
_LAUNCHER = '''\
import os, resource, sys
cpu, mem, procs = (int(x) for x in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NPROC, (procs, procs))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[4]])
'''


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 512,
                max_procs: int = 64) -> RunResult:
  """Runs `program` (Python source) under the limits above."""
  scratch = tempfile.mkdtemp(prefix="mllm_sandbox_")
  try:
    path = os.path.join(scratch, "program.py")
    with open(path, "w") as f:
      f.write(_GUARD + program)
    launcher = os.path.join(scratch, "launcher.py")
    with open(launcher, "w") as f:
      f.write(_LAUNCHER)
    cmd = [sys.executable, "-I", "-B", launcher, str(int(timeout_s) + 1),
           str(memory_mb * 2**20), str(max_procs), path]
    if _can_unshare():
      cmd = ["unshare", "-n", *cmd]
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
           "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
      out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, err = proc.communicate()
      return RunResult("timeout", None, out, err)
    code = proc.returncode
    if code == 0:
      status = "passed"
    elif code == -signal.SIGXCPU or code == -signal.SIGKILL and not err:
      status = "timeout"
    elif "MemoryError" in err or "Cannot allocate memory" in err:
      status = "memory"
    else:
      status = "failed"
    return RunResult(status, code, out, err)
  finally:
    # Kill anything the program left running in its group, then the files.
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # pylint: disable=used-before-assignment
    except (ProcessLookupError, PermissionError, NameError, UnboundLocalError):
      pass
    shutil.rmtree(scratch, ignore_errors=True)
