"""Two processes joined by jax.distributed compute the single-process result."""

import json
import os
import socket
import subprocess
import sys

import jax
from flax import nnx

from mllm_jax.modeling import Decoder
from tests import distributed_worker as worker


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  procs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    procs.append(subprocess.Popen(
        [sys.executable, worker.__file__, str(tmp_path / f"{process_id}.json")],
        env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  results = []
  for process_id, proc in enumerate(procs):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads((tmp_path / f"{process_id}.json").read_text()))
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
  want = float(jax.jit(worker.loss)(Decoder(worker.CFG, rngs=nnx.Rngs(0)),
                                    worker.TOKENS))
  for r in results:
    assert abs(r["loss"] - want) <= 1e-5 * abs(want)
