"""The pretrain binary as a user runs it: preemption, kills, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mllm_jax.data.samples import prepare_shakespeare
# finish, train_losses and wait_for_step are also imported from here by
# other tests.
from tests.helpers import finish, train_losses, wait_for_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.model.vocab_size=512", "--config.model.num_layers=2",
    "--config.model.embed_dim=64", "--config.model.mlp_dim=160",
    "--config.model.max_seq_len=64", "--config.data.seq_len=64",
    "--config.train.batch_size=8", "--config.train.steps=12",
    "--config.train.log_every=1", "--config.train.checkpoint_every=4",
    "--config.train.eval_every=6", "--config.train.eval_batches=2",
    "--config.optimizer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Tokenizer and shards built once, copied into each run's workdir."""
  root = tmp_path_factory.mktemp("prepared")
  prepare_shakespeare(str(root), vocab_size=512, seq_len=64)
  return root / "data"


def workdir_with_data(tmp_path, prepared, name):
  workdir = tmp_path / name
  shutil.copytree(prepared, workdir / "data")
  return workdir


def start(workdir, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.pretrain",
       "--config=configs/pretrain.py:tiny", f"--workdir={workdir}", *SMALL,
       *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def test_preempted_and_killed_run_continues_exactly(tmp_path, prepared):
  straight = workdir_with_data(tmp_path, prepared, "straight")
  finish(start(straight))
  want = train_losses(straight)
  assert sorted(want) == list(range(1, 13))
  summary = json.load(open(straight / "summary.json"))
  assert summary["eval_loss"] > 0 and summary["unigram_loss"] > 0

  run = workdir_with_data(tmp_path, prepared, "interrupted")
  # 1. SIGTERM: the trainer saves where it is and exits 0 within seconds.
  proc = start(run)
  wait_for_step(proc, run, 3)
  proc.send_signal(signal.SIGTERM)
  sent = time.time()
  log = finish(proc, timeout=60)
  assert time.time() - sent < 30
  assert "SIGTERM: saving step" in log
  stopped = max(train_losses(run))
  assert stopped < 12
  assert str(stopped) in os.listdir(run / "checkpoints")

  # 2. SIGKILL mid-way: nothing is saved beyond the last periodic checkpoint.
  proc = start(run)
  wait_for_step(proc, run, stopped + 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()

  # 3. The same command again: from the restored step on, bitwise the same.
  log = finish(start(run))
  assert "restored step" in log
  assert train_losses(run) == want


@pytest.mark.parametrize("flags,message", [
    (["--config.train.batch_sise=8"], "batch_sise"),
    (["--config.train.batch_size=12"], "train.batch_size: 12 is not divisible"),
    (["--config.data_recipe=", "--config.data.tokenizer=x.model"],
     "data.sources: is empty"),
    (["--config.data_recipe=", "--config.data.tokenizer=DATA/tokenizer.model",
      "--config.data.sources=(('web','DATA/nothing-*.tokens.npy',1.0,1.0),)"],
     r"data.sources\[0\] \(web\)"),
    (["--config.model.vocab_size=256"], "data.tokenizer: .* has 512 tokens"),
])
def test_bad_input_stops_before_compiling(tmp_path, prepared, flags, message):
  workdir = workdir_with_data(tmp_path, prepared, "bad")
  if "--config.model.vocab_size=256" in flags:
    # Keep the prepared 512-token tokenizer: the data recipe is off.
    flags = flags + [
        "--config.data_recipe=",
        f"--config.data.tokenizer={workdir}/data/tokenizer.model",
        f"--config.data.sources=(('s','{workdir}/data/train-*.tokens.npy',"
        "1.0,1.0),)"]
  flags = [f.replace("DATA", str(workdir / "data")) for f in flags]
  proc = start(workdir, *flags)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert re.search(message, err), err[-2000:]
  assert not (workdir / "checkpoints").exists()
