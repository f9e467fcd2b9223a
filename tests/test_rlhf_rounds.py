"""launch.rlhf_rounds as a user runs it, at tiny scale: a round labelled by
the reward model of record is killed during PPO and resumed (sampling,
labelling and the finished reward model are not redone; PPO restores its
checkpoint); a second round, labelled by a person through the export /
import round trip, waits for the labels, counts a missing and a
contradictory one, samples from the best policy and retrains on old plus
new comparisons; bad configs are refused naming the field.

The reward model of record is the test base model with a random head: the
test checks the plumbing, not what the rounds learn (docs/alignment.md has
a measured round)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from flax import nnx

from mllm_jax.convert import native
from mllm_jax.data import chat, comparisons
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.rl.prompts import read_prompts, split_held_out
from mllm_jax.rl.reward import RewardModel, save_reward_model
from tests.test_alignment_runs import PPO, REWARD, SMALL, prompts  # noqa: F401
from tests.test_pretrain import train_losses
from tests.test_stages import base  # noqa: F401  (the fixture)
from tests.test_stages import REPO

ROUNDS = ["--config=configs/rlhf_rounds.py:tiny",
          "--config.sampling.prompts_per_round=16",
          "--config.sampling.responses_per_prompt=2",
          "--config.sampling.max_new_tokens=8",
          "--config.sampling.max_prompt_tokens=112"]
# The stages' test sizes (tests/test_alignment_runs.py) without their preset
# and data flags (the driver sets those).
STAGE_ARGS = {
    "reward": [a for a in REWARD if not a.startswith((
        "--config=", "--config.data.sources", "--config.data.limit",
        "--config.train.steps", "--config.train.eval_every"))]
              + ["--config.train.steps=4", "--config.train.eval_every=0"],
    "ppo": [a for a in PPO if not a.startswith("--config=")]}
assert set(SMALL) <= set(STAGE_ARGS["ppo"])


def as_tuple(args):
  return "(" + ",".join(repr(a) for a in args) + ",)"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, base):  # noqa: F811
  """The base model with a random scalar head, saved as launch.reward
  saves a reward model."""
  path = tmp_path_factory.mktemp("rm") / "reward_model"
  _, trunk = native.load_model(str(base))
  save_reward_model(str(path), RewardModel(trunk, nnx.Rngs(1)), str(base),
                    {"end_of_context_id": load_tokenizer(str(base)).eos_id,
                     "format": "vicuna_v1", "note": "random head (test)"})
  return path


def start(workdir, base_dir, rm_dir, prompt_file, *extra):
  """The driver in its own process group (killing the group is a
  preemption: the driver and the stage it runs go together), its output
  in a file (`output` reads it)."""
  logs = workdir.parent / "logs"
  os.makedirs(logs, exist_ok=True)
  log = open(logs / f"{len(os.listdir(logs))}.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.rlhf_rounds", f"--workdir={workdir}",
       *ROUNDS, f"--config.policy={base_dir}",
       f"--config.reward_model={rm_dir}", f"--config.prompts={prompt_file}",
       f"--config.comparisons.train_files={prompt_file}",
       f"--config.reward.args={as_tuple(STAGE_ARGS['reward'])}",
       f"--config.ppo.args={as_tuple(STAGE_ARGS['ppo'])}", *extra],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  proc.log = log
  return proc


def output(proc, code=0, timeout=600):
  """Waits for the driver; its output, checked to end with exit `code`."""
  proc.wait(timeout=timeout)
  proc.log.seek(0)
  out = proc.log.read()
  assert proc.returncode == code, out[-3000:]
  return out


def test_rounds_resume_and_take_human_labels(  # noqa: F811  (fixtures)
    tmp_path, base, reward_model, prompts):
  run = lambda *extra: start(tmp_path / "run", base, reward_model, prompts,
                             *extra)
  round1 = tmp_path / "run" / "round_001"

  # Round 1, labelled by the reward model of record, killed during PPO.
  proc = run()
  deadline = time.time() + 600
  while max(train_losses(round1 / "ppo"), default=0) < 3:
    assert proc.poll() is None and time.time() < deadline, output(proc)
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (round1 / "summary.json").exists()
  kept = {name: os.path.getmtime(round1 / name) for name in (
      "samples.jsonl", "comparisons.jsonl", "reward/summary.json")}
  log = output(run())
  assert "samples.jsonl there, not sampled again" in log
  assert "comparisons.jsonl there, not labelled again" in log
  assert "reward finished earlier" in log
  assert "restored iteration 2" in log
  assert kept == {name: os.path.getmtime(round1 / name) for name in kept}
  assert "NOT human preferences" in log
  record = json.loads(open(round1 / "comparisons.jsonl").readline())
  assert "not a human preference" in record["origin"]
  # The rounds never sample the prompts PPO holds out to measure itself.
  tokenizer = load_tokenizer(str(base))
  fmt = chat.get_format("vicuna_v1", tokenizer)
  ppo_prompts, _ = read_prompts(str(prompts), tokenizer, fmt, 112)
  held_out = {tuple(p) for p in split_held_out(ppo_prompts, 4)[1]}
  sampled = [json.loads(line)["prompt"] for line in open(
      round1 / "samples.jsonl")]
  assert len(held_out) == 4 and len(sampled) == 16
  assert not held_out & {tuple(chat.encode_prompt(
      comparisons.prompt_conversation(comparisons.parse_prompt(p), "t"),
      tokenizer, fmt).tolist()) for p in sampled}

  rounds = json.load(open(tmp_path / "run" / "rounds.json"))
  first, = rounds["rounds"]
  assert first["labeller"] == "reward_model"
  held = first["reward_model"]["held_out"]
  assert held["pairs"] > 0 and 0 <= held["after"] <= 1
  # The reward model of record ranked these itself: it agrees with them all.
  assert held["per_source"]["rlhf_round_001:reward_model"]["before"] == 1.0
  for key in ("reward_before", "reward_after", "kl_last_iteration"):
    assert isinstance(first["ppo"][key], float)
  assert first["ppo"]["iterations"] == 4
  assert "RM held-out acc" in log and "PPO reward before -> after" in log

  # Round 2, labelled by a person: export, stop, fill, import.
  out = output(run("--config.rounds=2", "--config.labeller.name=human"), 3)
  assert "round 1: finished earlier" in out
  round2 = tmp_path / "run" / "round_002"
  assert f"Save the filled file as {round2 / 'labels.jsonl'}" in out
  lines = [json.loads(line) for line in open(round2 / "to_label.jsonl")]
  assert len(lines) >= 4
  lines[1]["preferred"] = "A"
  lines[1]["ranking"] = ["B", "A"]  # contradicts "preferred"
  for line in lines[2:]:
    line["preferred"] = "B"
  # lines[0] is left unlabelled.
  with open(round2 / "labels.jsonl", "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  log = output(run("--config.rounds=2", "--config.labeller.name=human"))
  labels = json.load(open(round2 / "label_summary.json"))
  assert labels["needs_attention"] == {"contradictory_label": 1,
                                       "missing_label": 1}
  assert labels["labelled"] == labels["comparisons"] == len(lines) - 2
  assert {json.loads(line)["origin"] for line in
          open(round2 / "comparisons.jsonl")} == {comparisons.HUMAN}
  second = json.load(open(tmp_path / "run" / "rounds.json"))["rounds"][1]
  assert second["labeller"] == "human"
  assert second["sampled_from"] == first["best_policy_after"]
  assert second["reward_model_of_record"] == first["reward_model"]["dir"]
  reward_log = open(round2 / "reward.log").read()
  assert str(round1 / "comparisons_train.jsonl") in reward_log  # old + new
  assert "labelled by a person" in log

  # A rerun may not change what the finished rounds were made with.
  out = output(run("--config.rounds=2", "--config.sampling.temperature=0.5"),
               1)
  assert "error: sampling.temperature: 0.5 differs from 1.0" in out


@pytest.mark.parametrize("extra, field", [
    (["--config.rounds=0"], "rounds:"),
    (["--config.labeller.name=oracle"], "labeller.name:"),
    (["--config.labeller.name=judge"], "labeller.judge_model:"),
    (["--config.policy=/no/such/dir"], "policy:"),
])
def test_bad_config_is_named(  # noqa: F811  (fixtures)
    tmp_path, base, reward_model, prompts, extra, field):
  out = output(start(tmp_path / "bad", base, reward_model, prompts, *extra),
               1, timeout=300)
  assert f"error: {field}" in out, out[-2000:]
  assert not (tmp_path / "bad" / "round_001").exists()
