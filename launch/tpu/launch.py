"""Create a Cloud TPU VM, pod slice or multislice; install the project on
every worker; copy or mount data; run a launch binary on all workers.

  python -m launch.tpu.launch --config=configs/tpu.py:65b-v5p-256 \
      --project=P --zone=us-east5-a --name=llama65 \
      --config.data.bucket=gs://BUCKET [--steps=create,install,data,run] \
      [--dry_run] [-- launch.BINARY FLAGS...]

Steps run in the order given (create, install, data, run, delete). After
`--` comes the binary to run and its flags (default: the preset's `binary`
and `args`); it runs under launch.tpu.worker on every host, so
jax.distributed is up before the binary starts. --dry_run prints every
command (local and gcloud) and runs none. See docs/scale.md, "TPU VMs and
pods".
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

from absl import app, flags
from ml_collections import config_flags

from launch.flags import require_flags
from launch.tpu import accelerators, commands
from launch.tpu.worker import check_binary

STEPS = ("create", "install", "data", "run", "delete")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "TPU launch preset, e.g. configs/tpu.py:7b-v5p-8; "
    "override fields with --config.a.b=value.", lock_config=True)
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project ID.")
_ZONE = flags.DEFINE_string("zone", None,
                            "Zone of the TPUs, e.g. us-east5-a (v5p).")
_NAME = flags.DEFINE_string(
    "name", None, "TPU (or queued resource) name; multislice nodes are "
    "NAME-0, NAME-1, ...")
_STEPS = flags.DEFINE_list("steps", ["create", "install", "data", "run"],
                           f"Which of {', '.join(STEPS)} to run, in order.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print every command instead of running it.")
_WAIT_MINUTES = flags.DEFINE_integer(
    "wait_minutes", 120, "How long to wait for a queued resource to become "
    "ACTIVE before giving up (it stays queued).")
flags.mark_flags_as_required(["config"])

_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,46}[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")


def _fail(flag: str, message: str):
  raise app.UsageError(f"{flag}: {message}")


def target_from_flags(config) -> commands.Target:
  """The Target the flags and config name; UsageError naming the flag."""
  require_flags(_PROJECT, _ZONE, _NAME)
  if not _ZONE_RE.fullmatch(_ZONE.value):
    _fail("--zone", f"{_ZONE.value!r} is not a zone like us-east5-a")
  if not _NAME_RE.fullmatch(_NAME.value):
    _fail("--name", f"{_NAME.value!r}: use lowercase letters, digits and "
          "hyphens, starting with a letter (at most 48 characters)")
  try:
    accel = accelerators.parse(config.accelerator_type)
  except ValueError as e:
    _fail("--config.accelerator_type", str(e))
  if config.num_slices < 1:
    _fail("--config.num_slices", f"{config.num_slices} is not >= 1")
  if config.provisioning not in commands.PROVISIONING:
    _fail("--config.provisioning", f"{config.provisioning!r}; choose one "
          f"of {commands.PROVISIONING}")
  return commands.Target(
      name=_NAME.value, project=_PROJECT.value, zone=_ZONE.value,
      accelerator=accel,
      runtime_version=config.runtime_version or accel.family.runtime_version,
      num_slices=config.num_slices, queued=config.queued,
      provisioning=config.provisioning)


def check_config(config, steps: list[str]) -> None:
  """The checks that need no cloud, before any command runs."""
  unknown = [s for s in steps if s not in STEPS]
  if unknown or not steps:
    _fail("--steps", f"{unknown or 'nothing'}; choose from {STEPS}")
  if not (config.source == "local" or config.source.startswith("git+")):
    _fail("--config.source", f"{config.source!r}; use 'local' or "
          "'git+URL[@REF]'")
  if config.data.mode not in ("mount", "copy"):
    _fail("--config.data.mode", f"{config.data.mode!r}; use 'mount' or "
          "'copy'")
  if not config.data.dir.startswith("/"):
    _fail("--config.data.dir", f"{config.data.dir!r} is not an absolute path")
  if "data" in steps and not config.data.bucket.startswith("gs://"):
    _fail("--config.data.bucket", f"{config.data.bucket!r}: the data step "
          "needs gs://BUCKET[/PATH] (or leave 'data' out of --steps)")
  for item in config.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      _fail("--config.env", f"{item!r} is not KEY=VALUE")


def binary_and_args(config, argv: list[str], name: str) -> tuple[str, list[str]]:
  """The binary after `--` (or the preset's), with {data_dir}/{name} filled."""
  binary, args = (argv[0], argv[1:]) if argv else (config.binary,
                                                   list(config.args))
  try:
    check_binary(binary)
  except SystemExit as e:
    _fail("binary (after --)" if argv else "--config.binary", str(e))
  fill = {"{data_dir}": config.data.dir, "{name}": name}
  for key, value in fill.items():
    args = [a.replace(key, value) for a in args]
  return binary, args


class Runner:
  """Runs (or, with --dry_run, prints) one command at a time."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def note(self, text: str) -> None:
    print(f"# {text}", flush=True)

  def __call__(self, argv: list[str], capture: bool = False) -> str:
    print(shlex.join(argv), flush=True)
    if self.dry_run:
      return ""
    result = subprocess.run(argv, check=True, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return (result.stdout or "").strip()


def wait_until_active(run: Runner, target: commands.Target) -> None:
  """Polls the queued resource until ACTIVE; stops on FAILED/SUSPENDED."""
  run.note("poll until the queued resource is ACTIVE:")
  deadline = time.time() + 60 * _WAIT_MINUTES.value
  while True:
    state = run(commands.describe_state(target), capture=True)
    if run.dry_run or state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"queued resource {target.name} is {state}")
    if time.time() > deadline:
      raise SystemExit(f"queued resource {target.name} still {state} after "
                       f"--wait_minutes={_WAIT_MINUTES.value}; it stays in "
                       "the queue (delete it with --steps=delete)")
    time.sleep(30)


def launch(config, argv: list[str]) -> None:
  steps = _STEPS.value
  target = target_from_flags(config)
  check_config(config, steps)
  binary, args = binary_and_args(config, argv, target.name)
  run = Runner(_DRY_RUN.value)
  accel = target.accelerator
  run.note(f"{accel.name} ({target.runtime_version}): {accel.chips} chips, "
           f"{accel.hosts} host(s) per slice x {target.num_slices} slice(s) "
           f"= {target.processes} JAX processes; nodes "
           f"{', '.join(target.nodes)}")
  for step in steps:
    run.note(f"step: {step}")
    if step == "create":
      run(commands.create(target))
      if target.uses_queue:
        wait_until_active(run, target)
    elif step == "install":
      if config.source == "local":
        tarball = os.path.join("/tmp", f"mllm_jax-{target.name}.tar.gz")
        run.note("the committed tree (HEAD); uncommitted edits stay behind")
        run(["git", "-C", REPO, "archive", "--format=tar.gz", "-o", tarball,
             "HEAD"])
        run(commands.scp(target, tarball, commands.TARBALL))
      script = commands.install_script(config.source, config.extras)
      if config.fetch:
        script += (" && .venv/bin/python scripts/fetch_data.py --only "
                   + " ".join(shlex.quote(f) for f in config.fetch))
      run(commands.ssh(target, script))
    elif step == "data":
      run(commands.ssh(target, commands.data_script(
          config.data.bucket, config.data.mode, config.data.dir)))
    elif step == "run":
      env = dict(item.split("=", 1) for item in config.env)
      run(commands.ssh(target, commands.run_script(
          target, binary, args, env, config.log, config.detach)))
    elif step == "delete":
      run(commands.delete(target))


def main(argv: list[str]) -> None:
  rest = argv[1:]
  if rest and rest[0] == "--":
    rest = rest[1:]
  try:
    launch(_CONFIG.value, rest)
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"command failed (exit {e.returncode}): "
                     f"{shlex.join(e.cmd)}") from None


if __name__ == "__main__":
  app.run(main)
