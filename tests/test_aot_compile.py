"""launch.aot_compile: the trainer's step compiled ahead of time, with reports.

The CPU "topology" (cpu:N over the 8 simulated devices) runs the same code
path as a TPU topology, so these tests need no libtpu; TPU topologies are
tested only where libtpu is importable.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from launch import aot_compile
from mllm_jax.configlib import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# A small, fast variant of the tiny preset, on XLA's attention (whose FLOPs
# the report traces; the preset's CPU kernel is a custom call) and optax's
# AdamW (as at pod scale); the peak is given so that nothing is measured.
TINY = ("--config=configs/pretrain.py:tiny", "--config.model.num_layers=2",
        "--config.data.seq_len=64", "--config.train.peak_flops=1e10",
        "--config.model.attention_backend=xla",
        "--config.optimizer.backend=optax")


def start(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.Popen([sys.executable, "-m", "launch.aot_compile", *args],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every CLI run of this module, started together to share the wall time."""
  report = tmp_path_factory.mktemp("aot") / "report.json"
  procs = {
      "fits": start(*TINY, "--topology=cpu:8", "--config.parallel.fsdp=2",
                    f"--output_json={report}"),
      "tight": start(*TINY, "--topology=cpu:8", "--hbm_gib=0.0001"),
      "bad_topology": start(*TINY, "--topology=v5p:4x4"),
      "bad_batch": start(*TINY, "--topology=cpu:8",
                         "--config.train.batch_size=12"),
      # The tiny preset's CPU attention kernel cannot compile for a TPU.
      "cpu_kernel_on_tpu": start(*TINY, "--topology=v5p:2x2x1",
                                 "--config.model.attention_backend=cpu_fused"),
      "cpu_adamw_on_tpu": start(*TINY, "--topology=v5p:2x2x1",
                                "--config.optimizer.backend=cpu_fused"),
  }
  results = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    results[name] = subprocess.CompletedProcess(proc.args, proc.returncode,
                                                stdout, stderr)
  results["report"] = report
  return results


def test_tiny_fits_on_cpu_topology_and_reports(runs):
  result = runs["fits"]
  assert result.returncode == 0, result.stderr
  for text in ("mesh     {'data': 4, 'stage': 1, 'fsdp': 2",
               "remat='none'", "arguments", "temporaries", "peak", "total",
               "analytic model", "XLA cost", "implied step time",
               "FITS on cpu:8"):
    assert text in result.stdout
  report = json.loads(runs["report"].read_text())
  assert report["devices"] == 8 and report["fits"]
  memory = report["memory_bytes"]
  assert 0 < memory["arguments"] <= memory["total"] <= memory["capacity"]
  # The total is the compiler's peak (plus code), never more than adding up
  # every component.
  assert 0 < memory["peak"] <= memory["total"] <= memory["sum_of_parts"]
  # Scans expanded, the traced matmuls cover the analytic model FLOPs (plus
  # the full attention squares); XLA counts the layer loop body once.
  assert 1.0 <= report["flops_traced"] / report["flops_analytic"] < 1.5
  assert 0 < report["flops_xla"] < report["flops_traced"]
  expected = report["flops_analytic"] / (8 * 1e10 * 0.5)
  assert report["step_seconds"] == pytest.approx(expected)


def test_does_not_fit_exits_2_naming_remedies(runs):
  result = runs["tight"]
  assert result.returncode == aot_compile.EXIT_DOES_NOT_FIT, result.stderr
  assert "DOES NOT FIT" in result.stderr
  for knob in ("parallel.fsdp", "model.remat", "train.grad_accum_steps"):
    assert knob in result.stderr


def test_bad_flags_exit_1_before_compiling(runs):
  result = runs["bad_topology"]
  assert result.returncode == 1
  assert "--topology=v5p:4x4" in result.stderr
  assert "compiled in" not in result.stdout
  result = runs["bad_batch"]
  assert result.returncode == 1
  assert "train.batch_size" in result.stderr
  assert "compiled in" not in result.stdout
  result = runs["cpu_kernel_on_tpu"]
  assert result.returncode == 1
  assert "model.attention_backend" in result.stderr
  assert "'cpu_fused'" in result.stderr and "'xla'" in result.stderr
  result = runs["cpu_adamw_on_tpu"]
  assert result.returncode == 1
  assert "optimizer.backend" in result.stderr and "'optax'" in result.stderr


@pytest.mark.parametrize("topology, message", [
    ("v5p-128x", "not a topology"),
    ("v5p-12", "not a standard slice"),
    ("8xA999", "not a topology"),
    ("v7:2x2", "not a topology"),
    ("v5p:4x4", "v5p chips form a 3-D grid"),
    ("v5e:2x2x2", "v5e chips form a 2-D grid"),
    ("v4:0x2x2", "every dimension must be >= 1"),
    ("cpu:64", "only 8 CPU devices exist"),
])
def test_bad_topology_is_named(topology, message):
  with pytest.raises(ConfigError, match=message):
    aot_compile.resolve_target(topology, hbm_gib=0.0, peak_flops=1.0)


def test_parse_topology():
  assert aot_compile.parse_topology("v5p:4x4x8") == ("v5p", (4, 4, 8))
  assert aot_compile.parse_topology("v6e:8x8") == ("v6e", (8, 8))
  assert aot_compile.parse_topology("cpu:4") == ("cpu", (4,))
  # Cloud slice names: v4/v5p count TensorCores (two per chip).
  assert aot_compile.parse_topology("v5p-256") == ("v5p", (4, 4, 8))
  assert aot_compile.parse_topology("v5p-8") == ("v5p", (2, 2, 1))
  assert aot_compile.parse_topology("v4-512") == ("v4", (4, 8, 8))
  assert aot_compile.parse_topology("v5e-8") == ("v5e", (2, 4))
  assert aot_compile.parse_topology("8xH100") == ("H100", (8,))


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the tpu extra) missing")
def test_tpu_topology_compiles_tiny():
  proc = start(*TINY, "--topology=v5p:2x2x1")
  stdout, stderr = proc.communicate(timeout=300)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                       stderr)
  assert result.returncode == 0, result.stderr
  assert "4 x TPU v5" in result.stdout and "FITS" in result.stdout
