"""launch.mm_align (stage 1) and launch.mm_instruct (stage 2) as a user runs
them, on real captioned images and easy-vqa questions: stage 1 killed and
resumed continues bitwise; stage 1 moved what its preset trains (the
projector, and the random tiny tower), the LLM is bit-identical to where
it started; stage 2 in MiniGPT-4's format
starts from stage 1's model, with text-only conversations mixed into its
batches, and moves projector and LLM, not the tower."""

import json
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from launch import demo_multimodal
from mllm_jax.convert import multimodal as mm_io
from mllm_jax.convert import native
from mllm_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from mllm_jax.modeling import Decoder
from mllm_jax.modeling.multimodal import MultimodalModel
from mllm_jax.paths import data_path
from tests.helpers import tiny_config
from tests.test_pretrain import finish, train_losses, wait_for_step
from tests.test_stages import REPO

COMMON = ["--config.train.log_every=1", "--config.optimizer.warmup_ratio=0",
          "--config.train.async_checkpoint=False",
          "--config.data.eval_examples=8", "--config.eval.limit=4",
          "--config.eval.max_new_tokens=6"]
ALIGN = ["--config=configs/mm.py:align_tiny", *COMMON,
         "--config.train.steps=12", "--config.train.checkpoint_every=3",
         "--config.train.eval_every=6", "--config.data.max_examples=48"]
INSTRUCT = ["--config=configs/mm.py:instruct_tiny", *COMMON,
            "--config.train.steps=2", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=2", "--config.data.max_examples=32",
            "--config.data.format=minigpt4"]


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The stage runs share JAX's persistent compilation cache, so the
  killed, resumed and later runs reuse what the first one compiled."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR",
                 str(tmp_path_factory.mktemp("jax_cache")))
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    yield


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
  """A tiny random decoder with a 600-piece BPE tokenizer that has the
  special tokens (`<image>` among them), as launch.pretrain writes it."""
  root = tmp_path_factory.mktemp("mm_base")
  model = train_sentencepiece(
      [data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                 "botchan.txt")], str(root / "sp" / "tok"), 600)
  cfg = tiny_config("tiny", vocab_size=640, max_seq_len=256)
  native.save_model(str(root / "ckpt"), cfg, Decoder(cfg, rngs=nnx.Rngs(0)))
  shutil.copy(model, root / "ckpt" / "tokenizer.model")
  assert load_tokenizer(str(root / "ckpt")).special_token_id("<image>") >= 0
  return root / "ckpt"


def run(binary, workdir, *args):
  return subprocess.Popen(
      [sys.executable, "-m", f"launch.{binary}", f"--workdir={workdir}",
       *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def params(model_dir):
  return mm_io.load_params(str(model_dir))[1]


def assert_parts(got, want, same, moved):
  for part in same:
    for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part])):
      np.testing.assert_array_equal(a, b, err_msg=part)
  for part in moved:
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(got[part]), jax.tree.leaves(want[part]))), part


def test_stage1_resumes_bitwise_and_stage2_starts_from_it(tmp_path,
                                                          text_base):
  base = f"--config.init_checkpoint={text_base}"
  straight = tmp_path / "straight"
  finish(run("mm_align", straight, *ALIGN, base), timeout=600)
  want = train_losses(straight)
  assert sorted(want) == list(range(1, 13))

  killed = tmp_path / "killed"
  quick = "--config.eval.limit=0"  # held-out losses only, no generation
  proc = run("mm_align", killed, *ALIGN, base, quick)
  wait_for_step(proc, killed, 4, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  # Tiny steps take milliseconds: the run may pass another checkpoint
  # between the poll and the kill. It resumes from the last one it wrote.
  saved = max(int(p.name) for p in (killed / "checkpoints").iterdir()
              if p.name.isdigit())
  assert 3 <= saved < 12
  log = finish(run("mm_align", killed, *ALIGN, base, quick), timeout=600)
  assert f"restored step {saved}" in log
  assert train_losses(killed) == want

  # Stage 1 trained the projector and the tiny random tower (the preset's
  # `trainable`); the LLM is the text checkpoint's, bit for bit.
  stage1 = params(straight / "model")
  cfg = mm_io.read_config(str(straight / "model"))
  seeded = nnx.to_pure_dict(jax.jit(lambda: nnx.state(
      MultimodalModel(cfg, nnx.Rngs(0))))())
  seeded["decoder"] = native.load_params(str(text_base))[1]
  assert_parts(stage1, seeded, same=("decoder",),
               moved=("projector", "vision"))
  assert (straight / "model" / "tokenizer.model").exists()
  # Before and after, measured by the run: held-out caption loss (also
  # with the images zeroed), captions generated and scored.
  summary_1 = json.load(open(straight / "summary.json"))
  for when in ("before", "after"):
    got = summary_1[when]
    assert np.isfinite([got["loss"], got["loss_zero_images"]]).all()
    assert got["replies"]["count"] == 4
    assert 0 <= got["captions"]["CIDEr-D"] and got["captions"]["images"] == 4
  assert summary_1["after"]["loss"] < summary_1["before"]["loss"]

  # Stage 2 (MiniGPT-4 format, text-only conversations in the same
  # batches) from stage 1: projector and LLM move.
  texts = tmp_path / "texts.jsonl"
  texts.write_text("".join(json.dumps({"id": f"t{i}", "messages": [
      {"role": "user", "content": f"Say the number {i}."},
      {"role": "assistant", "content": f"{i}."}]}) + "\n" for i in range(8)))
  instruct = tmp_path / "instruct"
  finish(run("mm_instruct", instruct, *INSTRUCT,
             f"--config.init_checkpoint={straight / 'model'}",
             "--config.data.text_mix=random",
             # The LM head on the answer positions only (gathered).
             "--config.run.loss_positions=0.125",
             "--config.data.question_types=('color','shape')",
             f"--config.data.text_files={texts}"), timeout=600)
  assert sorted(train_losses(instruct)) == [1, 2]
  summary = json.load(open(instruct / "summary.json"))
  assert summary["format"] == "minigpt4"
  assert summary["data"]["notes"]["text_only_examples"] == 8
  assert_parts(params(instruct / "model"), stage1, same=("vision",),
               moved=("projector", "decoder"))
  # VQA accuracy per question type beside its baselines, and the ablation.
  baselines = summary["data"]["answer_baselines"]
  assert set(baselines) <= {"all", "color", "shape"}
  assert all(0 <= row["question_only"] <= 1 for row in baselines.values())
  for when in ("before", "after"):
    for key in ("vqa", "vqa_zero_images"):
      got = summary[when][key]
      assert got["all"]["count"] == 4 and 0 <= got["all"]["accuracy"] <= 1
      assert set(got) <= set(baselines)

  # The demo's report sections read these summaries.
  report = "\n".join(demo_multimodal.align_report(str(straight)))
  assert f"{summary_1['after']['captions']['CIDEr-D']:.3f}" in report
  report = "\n".join(demo_multimodal.instruct_report(str(instruct)))
  for kind, row in summary["after"]["vqa"].items():
    assert f"| {kind} | {row['count']:.0f} |" in report
  assert (instruct / "loss.png").exists()

  # Chat with an image through launch.generate, in the stage's format.
  image = tmp_path / "shape.png"
  Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(image)
  out = subprocess.run(
      [sys.executable, "-m", "launch.generate",
       f"--checkpoint={instruct / 'model'}", f"--image={image}",
       "--prompt=What color is the shape?", "--format=minigpt4",
       "--max_new_tokens=4"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(out.stdout.strip().splitlines()) == 1
  out = subprocess.run(
      [sys.executable, "-m", "launch.generate",
       f"--checkpoint={instruct / 'model'}", f"--image={tmp_path}/none.png",
       "--prompt=Hi"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0 and "none.png" in out.stderr


def test_stage2_refuses_a_text_checkpoint(tmp_path, text_base):
  out = subprocess.run(
      [sys.executable, "-m", "launch.mm_instruct", f"--workdir={tmp_path}",
       *INSTRUCT, f"--config.init_checkpoint={text_base}"], cwd=REPO,
      capture_output=True, text=True)
  assert out.returncode != 0
  assert "init_checkpoint" in out.stderr and "stage 1" in out.stderr


def test_stage2_refuses_a_tower_override_it_would_ignore(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "launch.mm_instruct", f"--workdir={tmp_path}",
       *INSTRUCT, f"--config.init_checkpoint={tmp_path}",
       "--config.vision.remat=full", "--config.vision.position_init=sincos2d"],
      cwd=REPO, capture_output=True, text=True)
  assert out.returncode != 0
  assert ("vision.position_init: stage 2 takes the vision tower from "
          "init_checkpoint" in out.stderr), out.stderr[-2000:]
