"""launch.reward and launch.ppo as a user runs them, from an SFT-style
checkpoint: the reward model reports held-out accuracy per source and can
be fine-tuned from itself (preference-model pretraining, then fine-tuning);
PPO killed and resumed continues bitwise, its first minibatch has ratio 1,
and it refuses a reward model of another tokenizer and a KL that explodes,
naming the setting."""

import json
import shutil
import signal
import subprocess
import sys

import pytest

from launch import demo_alignment
from mllm_jax.data import comparison_sources, comparisons
from mllm_jax.paths import data_path
from tests.test_pretrain import finish, train_losses, wait_for_step
from tests.test_stages import base  # noqa: F401  (the fixture)
from tests.test_stages import REPO

SMALL = ["--config.seq_len=128", "--config.train.log_every=1",
         "--config.optimizer.warmup_ratio=0"]
REWARD = ["--config=configs/reward.py:tiny", *SMALL,
          "--config.train.batch_size=8", "--config.train.steps=6",
          "--config.train.checkpoint_every=3", "--config.train.eval_every=3",
          "--config.data.limit_per_source=30",
          "--config.data.eval_comparisons=12",
          "--config.data.sources=('arc_easy','gsm8k','bfcl_simple')"]
PPO = ["--config=configs/ppo.py:tiny", *SMALL,
       "--config.ppo.iterations=4", "--config.ppo.prompts_per_iteration=16",
       "--config.ppo.minibatches=2", "--config.ppo.max_new_tokens=8",
       "--config.ppo.checkpoint_every=2", "--config.data.max_prompt_tokens=112",
       "--config.data.eval_prompts=4"]


def run(binary, workdir, *args):
  return subprocess.Popen(
      [sys.executable, "-m", f"launch.{binary}", f"--workdir={workdir}",
       *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, base):  # noqa: F811
  workdir = tmp_path_factory.mktemp("reward")
  log = finish(run("reward", workdir, *REWARD,
                   f"--config.init_checkpoint={base}"), timeout=600)
  return workdir, log


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  built, _ = comparison_sources.build(["arc_easy"], 60, 0)
  comparisons.write_comparisons(str(path), built)
  return path


def test_reward_model_reports_per_source_and_fine_tunes_itself(
    tmp_path, base, reward_run):  # noqa: F811
  workdir, log = reward_run
  assert "a new head" in log and "NOT human preferences" in log
  summary = json.load(open(workdir / "summary.json"))
  held = summary["held_out"]
  families = {name.split(":")[0] for name in held}
  assert {"all", "arc_easy", "gsm8k", "bfcl_simple_python"} <= families
  assert held["all"]["pairs"] > 0 and 0 <= held["all"]["accuracy"] <= 1
  assert 0 <= held["all"]["longer_is_better"] <= 1
  assert summary["chance_accuracy"] == 0.5
  info = json.load(open(workdir / "reward_model" / "reward.json"))
  assert info["format"] == "vicuna_v1"
  assert sorted(train_losses(workdir)) == list(range(1, 7))
  # The demo's section: the run's numbers, a row per source, the curves.
  report = "\n".join(demo_alignment.reward_report(str(workdir)))
  assert f"**{held['all']['accuracy']:.1%}**" in report
  assert "| gsm8k:" in report and "not human preferences" in report
  assert (workdir / "reward.png").stat().st_size > 0

  # The second step of preference-model pretraining -> fine-tuning: the same
  # binary from the reward model it wrote, on one source; the head is kept.
  tuned = tmp_path / "tuned"
  log = finish(run("reward", tuned, *REWARD,
                   f"--config.init_checkpoint={workdir / 'reward_model'}",
                   "--config.data.sources=('gsm8k',)",
                   "--config.train.steps=2"), timeout=600)
  assert "its head kept" in log
  assert json.load(open(tuned / "summary.json"))["continued_reward_model"]


def test_ppo_resumes_bitwise_and_refuses_bad_input(tmp_path, base, reward_run,  # noqa: F811
                                                   prompts):
  rm_dir = reward_run[0] / "reward_model"
  args = [*PPO, f"--config.init_checkpoint={base}",
          f"--config.reward_model={rm_dir}", f"--config.data.prompts={prompts}"]
  straight = tmp_path / "straight"
  finish(run("ppo", straight, *args), timeout=600)
  want = train_losses(straight)
  assert sorted(want) == [1, 2, 3, 4]
  logged = [json.loads(line) for line in open(straight / "metrics.jsonl")]
  first = [r for r in logged if "first_minibatch_approx_kl" in r]
  assert all(r["first_minibatch_approx_kl"] == 0.0 for r in first)
  assert first[0]["kl"] == 0.0  # iteration 1: the policy is the reference
  assert all(r["sampler_logp_gap"] < 1e-3 for r in first)
  summary = json.load(open(straight / "summary.json"))
  assert set(summary["before"]) == set(summary["after"])
  assert summary["prompts"]["held_out"] == 4
  assert (straight / "model" / "tokenizer.model").exists()
  report = "\n".join(demo_alignment.ppo_report(str(straight)))
  assert (f"{summary['before']['reward']:.3f} -> "
          f"{summary['after']['reward']:.3f}**") in report
  assert (straight / "ppo.png").stat().st_size > 0

  killed = tmp_path / "killed"
  proc = run("ppo", killed, *args)
  wait_for_step(proc, killed, 3, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log = finish(run("ppo", killed, *args), timeout=600)
  assert "restored iteration 2" in log
  assert train_losses(killed) == want

  # A reward model whose tokenizer is not the policy's.
  other = tmp_path / "other_rm"
  shutil.copytree(rm_dir, other)
  shutil.copy(data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                        "botchan_en_unigram_1000.model"),
              other / "tokenizer.model")
  bad = run("ppo", tmp_path / "bad_tok", *args,
            f"--config.reward_model={other}")
  _, err = bad.communicate(timeout=300)
  assert bad.returncode != 0 and "reward_model:" in err
  assert "differs from the policy's" in err

  # A KL above ppo.max_kl stops the run with a message naming it.
  exploded = run("ppo", tmp_path / "kl", *args, "--config.ppo.max_kl=1e-9",
                 "--config.optimizer.learning_rate=1e-2")
  _, err = exploded.communicate(timeout=300)
  assert exploded.returncode != 0 and "ppo.max_kl" in err
