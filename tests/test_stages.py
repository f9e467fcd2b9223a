"""The FLAN and SFT binaries as a user runs them: from a base checkpoint,
killed and resumed bitwise exactly, and refusing bad input by name."""

import json
import shutil
import signal
import subprocess
import sys

import pytest
from flax import nnx

from mllm_jax.convert import native
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.modeling import Decoder
from mllm_jax.paths import alpaca_eval_json, data_path
from tests.helpers import tiny_config
from tests.test_pretrain import REPO, finish, train_losses, wait_for_step

COMMON = ["--config.train.batch_size=8", "--config.train.steps=12",
          "--config.train.log_every=1", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=0", "--config.seq_len=128",
          "--config.eval.limit=4", "--config.eval.max_new_tokens=8",
          "--config.optimizer.warmup_steps=2",
          "--config.optimizer.warmup_ratio=0"]
STAGES = {
    "sft": ["--config=configs/sft.py:tiny", "--config.data.max_conversations=64",
            "--config.data.eval_conversations=8", "--config.eval.benchmarks=()"],
    "flan": ["--config=configs/flan.py:tiny", "--config.flan.cap=40",
             "--config.flan.max_examples_per_task=40",
             "--config.flan.max_input_tokens=96",
             "--config.flan.max_target_tokens=32",
             "--config.flan.tasks=('boolq','piqa','sst2','rte')"],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A small random decoder with a real 1,000-piece SentencePiece tokenizer,
  saved as a native checkpoint (what launch.pretrain writes)."""
  root = tmp_path_factory.mktemp("base")
  sp = data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                 "botchan_en_bpe_1000.model")
  cfg = tiny_config("tiny", vocab_size=1024, max_seq_len=128)
  native.save_model(str(root), cfg, Decoder(cfg, rngs=nnx.Rngs(0)))
  shutil.copy(sp, root / "tokenizer.model")
  assert load_tokenizer(str(root)).vocab_size <= 1024
  return root


def start(stage, workdir, base_dir, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", f"launch.{stage}", f"--workdir={workdir}",
       *STAGES[stage], f"--config.init_checkpoint={base_dir}", *COMMON,
       *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


@pytest.mark.parametrize("stage", ["sft", "flan"])
def test_killed_run_resumes_bitwise(tmp_path, base, stage):
  straight = tmp_path / "straight"
  finish(start(stage, straight, base), timeout=600)
  want = train_losses(straight)
  assert sorted(want) == list(range(1, 13))
  summary = json.load(open(straight / "summary.json"))
  assert set(summary["before"]) == set(summary["after"])
  assert (straight / "model" / "tokenizer.model").exists()

  run = tmp_path / "killed"
  proc = start(stage, run, base)
  wait_for_step(proc, run, 7, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  log = finish(start(stage, run, base), timeout=600)
  assert "restored step" in log
  assert train_losses(run) == want


def test_sft_counts_bad_conversations_and_refuses_bad_config(tmp_path, base):
  data = tmp_path / "chats.jsonl"
  good = [{"conversations": [{"from": "human", "value": f"Hello there {i}"},
                             {"from": "gpt", "value": "Hi! How can I help?"}]}
          for i in range(20)]
  bad = [{"conversations": [{"from": "gpt", "value": "no question"}]},
         {"conversations": [{"from": "human", "value": ""},
                            {"from": "gpt", "value": "empty question"}]},
         {"conversations": [{"from": "alien", "value": "?"},
                            {"from": "gpt", "value": "unknown role"}]}]
  with open(data, "w") as f:
    for record in good + bad:
      f.write(json.dumps(record) + "\n")
    f.write('{"conversations": [{"from": "human", "val')  # cut mid-record
  out = finish(start("sft", tmp_path / "run", base,
                     f"--config.data.train_files={data}",
                     f"--config.data.eval_files={data}",
                     "--config.data.max_conversations=0",
                     "--config.data.train_skip=4",
                     "--config.train.steps=2"), timeout=600)
  # Evaluation holds the first 8 good conversations; training passes over
  # the first 4 read and drops the other 4 held-out ones as copies.
  assert "train: 12 conversations kept" in out
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  dropped = summary["train_data"]["dropped"]
  assert dropped.pop("held_out") == 4
  assert summary["train_data"]["notes"]["skipped"] == 4
  assert sum(dropped.values()) == len(bad) + 1

  for flag, message in [("--config.data.format=klingon", "data.format"),
                        ("--config.data.overflow=wrap", "data.overflow"),
                        ("--config.data.train_skip=-1", "data.train_skip"),
                        ("--config.run.num_layers=3", "num_layers")]:
    proc = start("sft", tmp_path / "bad", base, flag)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and message in err, err[-2000:]
  assert alpaca_eval_json()  # the default held-out set is fetched


def test_sft_with_lora_writes_the_adapter_and_the_merged_model(tmp_path, base):
  out = finish(start("sft", tmp_path / "lora", base,
                     "--config.peft.method=lora", "--config.train.steps=3",
                     "--config.peft.targets=('q','v','down')"), timeout=600)
  assert "trained" in out
  run = tmp_path / "lora"
  assert (run / "adapter" / "peft_config.json").exists()
  assert (run / "model" / native.CONFIG_FILE).exists()
  summary = json.load(open(run / "summary.json"))
  assert summary["peft"] == "lora"
  # Only the adapter trained: the merged model differs from the base only
  # in the adapted projections.
  _, merged = native.load_params(str(run / "model"))
  _, original = native.load_params(str(base))
  flat_m, flat_o = native.flatten(merged), native.flatten(original)
  changed = {".".join(k) for k in flat_o
             if not (flat_m[k] == flat_o[k]).all()}
  assert changed == {"blocks.attn.q", "blocks.attn.v", "blocks.mlp.down"}
