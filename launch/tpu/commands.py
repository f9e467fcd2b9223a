"""The gcloud commands and the remote shell scripts of a TPU launch, as data.

Everything here is a pure function from a `Target` (which slice, where) to
argv lists or shell text, so `--dry_run` prints exactly what a real launch
runs and the tests can check each command against gcloud's documented
syntax without a cloud account. The syntax followed (gcloud reference,
`compute tpus`):

  tpu-vm create NAME --zone --accelerator-type --version [--spot|--reserved]
  queued-resources create NAME --zone --accelerator-type --runtime-version
      (--node-id=ID | --node-count=K --node-prefix=P) [--spot|--reserved]
  tpu-vm ssh NAME --zone --worker=all --command=...
  queued-resources ssh NAME --zone --node=all --worker=all --command=...
  tpu-vm scp SRC NAME:DEST --zone --worker=all
  queued-resources scp SRC NAME:DEST --zone --node=all --worker=all

Multislice always goes through a queued resource (Cloud TPU provisions the
slices of one job together only that way); its nodes are NAME-0 ... NAME-K-1.
"""

from __future__ import annotations

import dataclasses
import shlex

from launch.tpu.accelerators import Accelerator

PROVISIONING = ("", "spot", "reserved")
REPO_DIR = "~/mllm_jax"           # where the project lives on every worker
TARBALL = "mllm_jax.tar.gz"  # the local tree, scp'd into the home directory
PYTHON = "python3.11"             # jax 0.10 needs Python >= 3.11
# Set on every worker: launch.tpu.worker (through initialize_distributed)
# then calls jax.distributed.initialize() with no arguments, which reads the
# worker list and, for multislice, the MEGASCALE_* settings from the TPU
# VM's metadata; the expected count lets the worker refuse a partial join.
DISTRIBUTED_ENV = "MLLM_JAX_DISTRIBUTED"
EXPECT_ENV = "MLLM_JAX_EXPECT_PROCESSES"


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a launch runs: one slice, or `num_slices` slices (multislice)."""
  name: str
  project: str
  zone: str
  accelerator: Accelerator
  runtime_version: str
  num_slices: int = 1
  queued: bool = False     # a queued resource even for one slice
  provisioning: str = ""   # '', 'spot' or 'reserved'

  @property
  def uses_queue(self) -> bool:
    return self.queued or self.num_slices > 1

  @property
  def processes(self) -> int:
    """JAX processes that must join: one per host of every slice."""
    return self.accelerator.hosts * self.num_slices

  @property
  def nodes(self) -> list[str]:
    """TPU node names: NAME, or NAME-0 ... for multislice (--node-prefix)."""
    if self.num_slices > 1:
      return [f"{self.name}-{i}" for i in range(self.num_slices)]
    return [self.name]


def _gcloud(target: Target, *words: str) -> list[str]:
  return ["gcloud", "compute", "tpus", *words,
          f"--project={target.project}", f"--zone={target.zone}"]


def _provisioning(target: Target) -> list[str]:
  return [f"--{target.provisioning}"] if target.provisioning else []


def create(target: Target) -> list[str]:
  """The command that asks for the slice(s)."""
  accel = f"--accelerator-type={target.accelerator.name}"
  if not target.uses_queue:
    return _gcloud(target, "tpu-vm", "create", target.name) + [
        accel, f"--version={target.runtime_version}",
        *_provisioning(target)]
  nodes = ([f"--node-count={target.num_slices}", f"--node-prefix={target.name}"]
           if target.num_slices > 1 else [f"--node-id={target.name}"])
  return _gcloud(target, "queued-resources", "create", target.name) + [
      accel, f"--runtime-version={target.runtime_version}", *nodes,
      *_provisioning(target)]


def describe_state(target: Target) -> list[str]:
  """The queued resource's state (WAITING_FOR_RESOURCES ... ACTIVE)."""
  return _gcloud(target, "queued-resources", "describe", target.name) + [
      "--format=value(state.state)"]


def ssh(target: Target, command: str) -> list[str]:
  """Runs `command` on every worker of every slice at once."""
  if target.uses_queue:
    return _gcloud(target, "queued-resources", "ssh", target.name) + [
        "--node=all", "--worker=all", f"--command={command}"]
  return _gcloud(target, "tpu-vm", "ssh", target.name) + [
      "--worker=all", f"--command={command}"]


def scp(target: Target, local: str, remote: str) -> list[str]:
  """Copies a local file to `remote` on every worker of every slice."""
  if target.uses_queue:
    return _gcloud(target, "queued-resources", "scp", local,
                   f"{target.name}:{remote}") + ["--node=all", "--worker=all"]
  return _gcloud(target, "tpu-vm", "scp", local,
                 f"{target.name}:{remote}") + ["--worker=all"]


def delete(target: Target) -> list[str]:
  """Gives the slice(s) back (a queued resource with its nodes: --force)."""
  if target.uses_queue:
    return _gcloud(target, "queued-resources", "delete", target.name) + [
        "--force", "--quiet"]
  return _gcloud(target, "tpu-vm", "delete", target.name) + ["--quiet"]


# ------------------------------------------------------------ remote scripts


def install_script(source: str, extras: str) -> str:
  """Shell run on every worker: Python 3.11, the project and its extras.

  `source` is 'local' (the tarball scp'd to TARBALL) or 'git+URL[@REF]'.
  The TPU VM images are Ubuntu 22.04 with Python 3.10, hence the apt step.
  """
  steps = ["set -e",
           "sudo apt-get update -qq",
           f"sudo apt-get install -y -qq {PYTHON} {PYTHON}-venv git"]
  if source == "local":
    steps += [f"rm -rf {REPO_DIR}", f"mkdir -p {REPO_DIR}",
              f"tar -xzf ~/{TARBALL} -C {REPO_DIR}"]
  else:
    url, _, ref = source.removeprefix("git+").partition("@")
    steps += [f"rm -rf {REPO_DIR}",
              f"git clone -q {shlex.quote(url)} {REPO_DIR}"]
    if ref:
      steps.append(f"git -C {REPO_DIR} checkout -q {shlex.quote(ref)}")
  pkg = f".[{extras}]" if extras else "."
  steps += [f"cd {REPO_DIR}", f"{PYTHON} -m venv .venv",
            ".venv/bin/pip install -q --upgrade pip",
            f".venv/bin/pip install -q -e {shlex.quote(pkg)}"]
  return " && ".join(steps)


def data_script(bucket: str, mode: str, data_dir: str) -> str:
  """Shell run on every worker: the bucket copied to, or mounted at, data_dir.

  'mount' uses Cloud Storage FUSE (installed from Google's apt repository),
  which every multi-host run needs for a workdir all hosts see; 'copy' puts
  a private copy on each worker's disk (fast reads, no shared writes).
  """
  target = shlex.quote(data_dir)
  if mode == "copy":
    return " && ".join([
        "set -e", f"mkdir -p {target}",
        f"gcloud storage cp -r {shlex.quote(bucket.rstrip('/') + '/*')} "
        f"{target}/"])
  name, _, prefix = bucket.removeprefix("gs://").partition("/")
  only_dir = f" --only-dir={shlex.quote(prefix)}" if prefix else ""
  return " && ".join([
      "set -e",
      "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
      "| sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null",
      'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
      'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) '
      'main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null',
      "sudo apt-get update -qq", "sudo apt-get install -y -qq gcsfuse",
      f"sudo mkdir -p {target}", f"sudo chown $USER {target}",
      f"(mountpoint -q {target} || gcsfuse --implicit-dirs{only_dir} "
      f"{shlex.quote(name)} {target})"])


def run_script(target: Target, binary: str, args: list[str],
               env: dict[str, str], log: str, detach: bool = False) -> str:
  """Shell run on every worker: the binary under launch.tpu.worker, which
  starts jax.distributed before the binary's own code runs.

  Attached (the default) the ssh session streams the output and ends with
  the binary; `detach` starts it under nohup and returns at once, so a run
  of days survives the launcher's connection (read the log on a worker).
  """
  variables = {DISTRIBUTED_ENV: "auto", EXPECT_ENV: str(target.processes),
               **env}
  assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
  python = " ".join(shlex.quote(a) for a in
                    [".venv/bin/python", "-m", "launch.tpu.worker", binary,
                     *args])
  if detach:
    return (f"cd {REPO_DIR} && nohup env {assignments} {python} >> {log} "
            "2>&1 < /dev/null &")
  return (f"set -o pipefail && cd {REPO_DIR} && {assignments} {python} 2>&1 "
          f"| tee -a {log}")
