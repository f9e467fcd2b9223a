"""The code-execution sandbox refuses network, stops runaway programs by time
and memory, and leaves nothing behind."""

import glob
import os
import tempfile

from mllm_jax.eval import generative
from mllm_jax.eval.sandbox import run_program


def scratch_dirs():
  return set(glob.glob(os.path.join(tempfile.gettempdir(), "mllm_sandbox_*")))


def test_passing_and_failing_programs():
  assert run_program("print(6 * 7)").stdout.strip() == "42"
  result = run_program("assert 1 == 2, 'nope'")
  assert result.status == "failed" and "nope" in result.stderr


def test_refuses_network():
  result = run_program(
      "import socket\n"
      "s = socket.create_connection(('127.0.0.1', 9), timeout=2)\n")
  assert result.status == "failed"
  assert "network access is disabled" in result.stderr
  # Even a raw socket object cannot be made.
  raw = run_program("import _socket\n_socket.socket()\n")
  assert raw.status == "failed", raw


def test_stops_runaway_cpu_and_memory():
  spin = run_program("while True:\n  pass\n", timeout_s=1.0)
  assert spin.status == "timeout"
  hog = run_program("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
  assert hog.status == "memory", hog


def test_leaves_nothing_behind():
  before = scratch_dirs()
  marker = os.path.join(tempfile.gettempdir(), "sandbox_escape_probe")
  result = run_program(
      "import os\n"
      "open('left_behind.txt', 'w').write('x')\n"
      "print(os.getcwd())\n")
  assert result.passed
  assert not os.path.exists(result.stdout.strip())
  assert scratch_dirs() == before
  assert not os.path.exists(marker)
  # A background child is killed with the process group.
  spawn = run_program(
      "import subprocess, sys\n"
      "p = subprocess.Popen([sys.executable, '-c', 'import time; "
      "time.sleep(30)'])\n"
      "print(p.pid)\n")
  pid = int(spawn.stdout.strip())
  try:
    os.kill(pid, 0)
    alive = os.path.exists(f"/proc/{pid}") and "Z" not in open(
        f"/proc/{pid}/stat").read().split()[2]
  except ProcessLookupError:
    alive = False
  assert not alive


def test_humaneval_canonical_solution_passes():
  problem = generative.load_humaneval()[0]
  solution = ("    for i, a in enumerate(numbers):\n"
              "        for b in numbers[i + 1:]:\n"
              "            if abs(a - b) < threshold:\n"
              "                return True\n"
              "    return False\n\n\ndef unrelated():\n    pass\n")
  assert run_program(generative.humaneval_program(problem, solution)).passed
  wrong = "    return False\n"
  assert not run_program(generative.humaneval_program(problem, wrong)).passed
  mbpp = generative.load_mbpp()[0]
  code = ("def remove_Occ(s, ch):\n"
          "    i = s.find(ch)\n"
          "    if i >= 0: s = s[:i] + s[i + 1:]\n"
          "    j = s.rfind(ch)\n"
          "    if j >= 0: s = s[:j] + s[j + 1:]\n"
          "    return s\n")
  assert run_program(generative.mbpp_program(mbpp, code)).passed
