"""launch/tpu: the dry run prints the documented gcloud commands for a pod
slice and a multislice run, bad input is refused naming the flag, and the
worker wrapper runs a real binary. No cloud: a fake `gcloud` and `git` on
PATH record any call, and the dry runs must leave them uncalled."""

from __future__ import annotations

import ast
import dataclasses
import os
import shlex
import subprocess
import sys

import pytest

from launch.tpu import accelerators
from mllm_jax.configlib import ConfigError
from mllm_jax.parallel import mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--project=my-proj", "--zone=us-east5-a", "--name=llama"]


@pytest.fixture(name="fake_cloud")
def fixture_fake_cloud(tmp_path):
  """PATH with `gcloud` and `git` stubs that log their calls to a file."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  for tool in ("gcloud", "git"):
    stub = bin_dir / tool
    stub.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n")
    stub.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def launch(args, env=None, check=True):
  result = subprocess.run(
      [sys.executable, "-m", "launch.tpu.launch", *args], cwd=REPO,
      capture_output=True, text=True, env={**os.environ, **(env or {})})
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(stdout: str) -> list[list[str]]:
  """The printed commands (comment lines dropped), split like a shell."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line and not line.startswith("#")]


def flag(argv: list[str], name: str) -> str | None:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return values[0] if values else None


def gcloud(argv: list[str], *words: str) -> bool:
  return argv[:3 + len(words)] == ["gcloud", "compute", "tpus", *words]


def remote(argv: list[str]) -> list[str]:
  """The shell words of an ssh command's --command (after its env setup)."""
  return shlex.split(flag(argv, "command"))


def check_location(argv: list[str]) -> None:
  assert flag(argv, "project") == "my-proj", argv
  assert flag(argv, "zone") == "us-east5-a", argv


def test_pod_slice_dry_run(fake_cloud):
  """65B on v5p-256 (32 hosts): tpu-vm create/scp/ssh with --worker=all."""
  env, log = fake_cloud
  out = launch(["--config=configs/tpu.py:65b-v5p-256", *BASE, "--dry_run",
                "--config.data.bucket=gs://my-bucket/llama",
                "--steps=create,install,data,run,delete"], env).stdout
  assert not log.exists(), "the dry run ran a command"
  assert "128 chips, 32 host(s) per slice x 1 slice(s) = 32 JAX" in out
  cmds = commands(out)
  create, archive, copy, install, data, run, delete = cmds
  assert gcloud(create, "tpu-vm", "create", "llama")
  assert flag(create, "accelerator-type") == "v5p-256"
  assert flag(create, "version") == "v2-alpha-tpuv5"
  assert archive[:2] == ["git", "-C"] and "archive" in archive
  assert gcloud(copy, "tpu-vm", "scp", archive[-2], "llama:mllm_jax.tar.gz")
  for argv in (create, copy, install, data, run, delete):
    check_location(argv)
  for argv in (copy, install, data, run):
    assert "--worker=all" in argv, argv
    assert "--node=all" not in argv
  for argv in (install, data, run):
    assert gcloud(argv, "tpu-vm", "ssh", "llama")
  assert ".venv/bin/pip install -q -e '.[tpu]'" in flag(install, "command")
  assert "tar -xzf ~/mllm_jax.tar.gz" in flag(install, "command")
  assert ("gcsfuse --implicit-dirs --only-dir=llama my-bucket /gcs"
          in flag(data, "command"))
  words = remote(run)
  assert "MLLM_JAX_DISTRIBUTED=auto" in words
  assert "MLLM_JAX_EXPECT_PROCESSES=32" in words
  python = words.index(".venv/bin/python")
  assert words[python:python + 5] == [
      ".venv/bin/python", "-m", "launch.tpu.worker", "launch.pretrain",
      "--config=configs/pretrain.py:65b-pod"]
  assert "--workdir=/gcs/runs/llama" in words
  sources = ast.literal_eval(flag(words, "config.data.sources"))
  assert sources[0] == ("commoncrawl", "/gcs/tokens/commoncrawl/*.tokens.npy",
                        67.0, 1.1)
  assert gcloud(delete, "tpu-vm", "delete", "llama") and "--quiet" in delete


def test_multislice_dry_run(fake_cloud):
  """Two v5p-256 slices: a queued resource with --node-count/--node-prefix,
  waited for, then scp/ssh over --node=all --worker=all."""
  env, log = fake_cloud
  out = launch(["--config=configs/tpu.py:65b-2xv5p-256", *BASE, "--dry_run",
                "--steps=create,install,run,delete"], env).stdout
  assert not log.exists(), "the dry run ran a command"
  assert "nodes llama-0, llama-1" in out
  create, describe, _, copy, install, run, delete = commands(out)
  assert gcloud(create, "queued-resources", "create", "llama")
  assert flag(create, "accelerator-type") == "v5p-256"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
  assert flag(create, "node-count") == "2"
  assert flag(create, "node-prefix") == "llama"
  assert flag(create, "node-id") is None and flag(create, "version") is None
  assert gcloud(describe, "queued-resources", "describe", "llama")
  assert flag(describe, "format") == "value(state.state)"
  assert gcloud(copy, "queued-resources", "scp")
  for argv in (copy, install, run):
    assert "--node=all" in argv and "--worker=all" in argv, argv
  for argv in (create, describe, copy, install, run, delete):
    check_location(argv)
  assert gcloud(run, "queued-resources", "ssh", "llama")
  words = remote(run)
  assert "MLLM_JAX_EXPECT_PROCESSES=64" in words
  assert "--config.parallel.data=2" in words
  assert gcloud(delete, "queued-resources", "delete", "llama")
  assert "--force" in delete


def test_any_binary_single_host_spot(fake_cloud):
  """7B on one v5p-8 host, as a spot queued resource, running the binary
  given after `--` with its flags untouched."""
  env, log = fake_cloud
  out = launch(["--config=configs/tpu.py:7b-v5p-8", *BASE, "--dry_run",
                "--config.queued=True", "--config.provisioning=spot",
                "--config.env=('XLA_FLAGS=--xla_dump_to=/tmp/x',)",
                "--steps=create,run", "--", "launch.generate",
                "--checkpoint=/gcs/runs/7b/model", "--prompt=Hello there"],
               env).stdout
  assert not log.exists()
  create, _, run = commands(out)
  assert flag(create, "node-id") == "llama" and "--spot" in create
  words = remote(run)
  assert "MLLM_JAX_EXPECT_PROCESSES=1" in words
  assert "XLA_FLAGS=--xla_dump_to=/tmp/x" in words
  tail = words[words.index("launch.tpu.worker") + 1:]
  assert tail[:3] == ["launch.generate", "--checkpoint=/gcs/runs/7b/model",
                      "--prompt=Hello there"]


def test_detached_run(fake_cloud):
  """--config.detach: the binary starts under nohup on every worker and the
  ssh returns; its output goes to the log."""
  env, _ = fake_cloud
  out = launch(["--config=configs/tpu.py:65b-v5p-256", *BASE, "--dry_run",
                "--steps=run", "--config.detach=True"], env).stdout
  (run,) = commands(out)
  assert "--worker=all" in run
  words = remote(run)
  assert words[:5] == ["cd", "~/mllm_jax", "&&", "nohup", "env"]
  assert "MLLM_JAX_DISTRIBUTED=auto" in words
  assert words[-6:] == [">>", "~/mllm_jax_run.log", "2>&1", "<", "/dev/null",
                        "&"]


@pytest.mark.parametrize("args, message", [
    (["--config.accelerator_type=v9-8"], "--config.accelerator_type: unknown "
     "accelerator type 'v9-8'"),
    (["--config.accelerator_type=v5p-7"], "--config.accelerator_type"),
    (["--config.accelerator_type=v5litepod-12"], "--config.accelerator_type"),
    (["--project="], "--project is required"),
    (["--zone=us-east5"], "--zone: 'us-east5' is not a zone"),
    (["--name=Bad_Name"], "--name"),
    (["--config.num_slices=0"], "--config.num_slices"),
    (["--config.provisioning=cheap"], "--config.provisioning"),
    (["--config.data.mode=rsync"], "--config.data.mode"),
    (["--config.data.dir=data"], "--config.data.dir"),
    (["--steps=create,launch"], "--steps"),
    (["--steps=data"], "--config.data.bucket"),
    (["--", "launch.nope"], "no such binary: 'launch.nope'"),
    (["--", "os"], "not a launch binary"),
])
def test_bad_input_names_the_flag(fake_cloud, args, message):
  env, log = fake_cloud
  base = {a.split("=")[0]: a for a in BASE}
  for a in args:  # an argument given here replaces the default one
    base.pop(a.split("=")[0], None)
  rest = args[args.index("--"):] if "--" in args else []
  given = [a for a in args if a not in rest]
  result = launch(["--config=configs/tpu.py:7b-v5p-8", *base.values(),
                   "--steps=create,run", *given, "--dry_run", *rest], env,
                  check=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert not log.exists()


def test_missing_zone_is_named(fake_cloud):
  env, _ = fake_cloud
  result = launch(["--config=configs/tpu.py:7b-v5p-8", "--project=p",
                   "--name=x", "--dry_run"], env, check=False)
  assert result.returncode != 0 and "--zone is required" in result.stderr


@pytest.mark.parametrize("name, chips, hosts", [
    ("v5p-8", 4, 1), ("v5p-256", 128, 32), ("v4-32", 16, 4),
    ("v4-8", 4, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v6e-256", 256, 64)])
def test_accelerator_hosts(name, chips, hosts):
  accel = accelerators.parse(name)
  assert (accel.chips, accel.hosts) == (chips, hosts)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """Enough of a TPU device for mesh_utils: two slices of four."""
  id: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"
  process_index: int = 0


def test_multislice_mesh_puts_data_across_slices():
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  grid = mesh.multislice_grid((2, 1, 4, 1, 1), devices)
  assert grid.shape == (2, 1, 4, 1, 1)
  for s in range(2):  # each data row is one whole slice
    assert {d.slice_index for d in grid[s].flat} == {s}
  with pytest.raises(ConfigError, match="parallel.data"):
    mesh.multislice_grid((1, 1, 8, 1, 1), devices)


def test_worker_runs_a_binary(tmp_path):
  """launch.tpu.worker on one CPU process: runs the binary with its flags,
  and refuses to go on when fewer processes joined than expected."""
  text = tmp_path / "text.txt"
  text.write_text("\n\n".join(f"paragraph {i} of some words, " * 5
                              for i in range(200)))
  args = [sys.executable, "-m", "launch.tpu.worker", "launch.train_tokenizer",
          f"--input={text}", "--vocab_size=300", f"--output={tmp_path}/tok"]
  env = {**os.environ, "MLLM_JAX_EXPECT_PROCESSES": "1"}
  env.pop("MLLM_JAX_DISTRIBUTED", None)
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          env=env)
  assert result.returncode == 0, result.stderr
  assert "[worker] process 0 of 1" in result.stdout
  assert (tmp_path / "tok.model").exists()
  env["MLLM_JAX_EXPECT_PROCESSES"] = "32"
  result = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                          env=env)
  assert result.returncode != 0
  assert "joined 1 processes, expected 32" in result.stderr


PARSE_CONFIG = """
import sys
from absl import flags
from ml_collections import config_flags
from mllm_jax.configlib import from_config
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.train.config import OptimizerConfig, TrainConfig
config = config_flags.DEFINE_config_file("config", None, "", lock_config=True)
flags.FLAGS(sys.argv)
for section, cls in (("model", ModelConfig), ("parallel", ParallelConfig),
                     ("optimizer", OptimizerConfig), ("train", TrainConfig)):
  from_config(cls, config.value[section], section)
print(len(config.value.data.sources), config.value.parallel.data)
"""


@pytest.mark.parametrize("preset, sources, data", [
    ("7b-v5p-8", 7, 1), ("65b-v5p-256", 7, 1), ("65b-2xv5p-256", 7, 2),
    ("tiny-v5litepod-8", 0, -1)])
def test_preset_flags_are_the_binarys(preset, sources, data):
  """Each preset's run command passes flags its binary's config accepts (a
  misspelt override would only fail on the pod)."""
  out = launch([f"--config=configs/tpu.py:{preset}", *BASE, "--steps=run",
                "--dry_run"]).stdout
  words = remote(commands(out)[0])
  args = words[words.index("launch.pretrain") + 1:words.index("2>&1")]
  config_args = [a for a in args if a.startswith("--config")]
  assert len(config_args) == len(args) - 1  # and --workdir
  result = subprocess.run([sys.executable, "-c", PARSE_CONFIG, *config_args],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(sources), str(data)]


def _stub_cloud(tmp_path, state: str, fail_on: str = ""):
  """gcloud/git stubs: log each call; `describe` answers `state`; a call
  containing `fail_on` exits 1."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
  bin_dir.mkdir()
  for tool in ("gcloud", "git"):
    stub = bin_dir / tool
    stub.write_text(
        f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n"
        f"case \"$*\" in *describe*) echo {state};; esac\n"
        + (f"case \"$*\" in *{fail_on}*) exit 1;; esac\n" if fail_on else ""))
    stub.chmod(0o755)
  return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_real_run_calls_in_order(tmp_path):
  """Without --dry_run the same commands run, in order, the queued resource
  polled until ACTIVE."""
  env, log = _stub_cloud(tmp_path, "ACTIVE")
  out = launch(["--config=configs/tpu.py:65b-2xv5p-256", *BASE,
                "--config.data.bucket=gs://b", "--steps=create,install,data,run"],
               env).stdout
  calls = log.read_text().splitlines()
  printed = [" ".join(c) for c in commands(out)]
  assert calls == printed  # every printed command ran, nothing else
  assert [c.split()[4] for c in calls if c.startswith("gcloud")] == [
      "create", "describe", "scp", "ssh", "ssh", "ssh"]


@pytest.mark.parametrize("state, fail_on, message", [
    ("FAILED", "", "queued resource llama is FAILED"),
    ("ACTIVE", "scp", "command failed (exit 1): gcloud compute tpus "
     "queued-resources scp"),
])
def test_real_run_stops_on_failure(tmp_path, state, fail_on, message):
  env, log = _stub_cloud(tmp_path, state, fail_on)
  result = launch(["--config=configs/tpu.py:65b-2xv5p-256", *BASE,
                   "--steps=create,install,run"], env, check=False)
  assert result.returncode != 0 and message in result.stderr, result.stderr
  assert "ssh" not in log.read_text()  # nothing ran after the failure
