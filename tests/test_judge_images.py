"""launch.judge_images end to end: held-out visual instructions written by
the generator (a scripted teacher on 127.0.0.1, the server of
test_instructions), a tiny random multimodal checkpoint answering them,
and the same server as the judge; bad records counted and skipped,
judge failures counted, the relative score exact."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from mllm_jax.data import chat
from mllm_jax.data import visual_instructions as vi
from mllm_jax.eval import image_judge, judge
from tests.test_instructions import REPO, Server, server  # noqa: F401
from tests.test_visual_instructions import config, fixture_png  # noqa: F401
from tests.test_visual_instructions import scripted, synthetic, teacher

TAG = re.compile(r"\([0-9a-f]{6}\)")  # in every scripted teacher answer


def judge_or_teacher(body) -> str:
  """As the judge: 9 for an answer with the teacher's tag, else 3, in the
  order shown; an unreadable rating for "How many" questions. Otherwise
  the scripted teacher of test_visual_instructions."""
  messages = body["messages"]
  if messages[0]["content"] != judge.SYSTEM_PROMPT:
    return scripted(body)
  text = messages[-1]["content"]
  if "How many" in text:
    return "Both answers are fine."
  first, second = re.findall(r"\[Assistant \d\]\n(.*?)\n\[End of", text,
                             re.S)
  score = lambda answer: 9 if TAG.search(answer) else 3
  return f"{score(first)} {score(second)}\nThe first is better."


@pytest.fixture(name="questions")
def fixture_questions(server, tmp_path, png):  # noqa: F811
  """Two images x three kinds from the generator (8 questions: a
  conversation has two), then four bad records."""
  server.reply = judge_or_teacher
  out = tmp_path / "held.jsonl"
  sources = synthetic(png, ["cat: [0.1, 0.2, 0.5, 0.6]",
                            "dog: [0.3, 0.1, 0.9, 0.7]"])
  vi.generate_visual(teacher(server), str(out), config(held_out=True),
                     sources=sources)
  good = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(good) == 6 and all(r["meta"]["held_out"] for r in good)
  no_context = dict(good[1], id="no_context",
                    meta={"kind": "detail"})
  no_reference = dict(good[1], id="no_reference",
                      messages=good[1]["messages"][:1])
  no_image = dict(good[1], id="no_image", images=["held.images/none.png"])
  with open(out, "a", encoding="utf-8") as f:
    for record in (no_context, no_reference, no_image):
      f.write(json.dumps(record) + "\n")
    f.write('{"id": "broken", "messages": [\n')
    f.write(json.dumps(good[0]) + "\n")  # an id seen before
  return out


def test_read_questions_counts_bad_records(questions):
  stats = chat.ChatStats()
  got = image_judge.read_questions(str(questions), stats)
  assert len(got) == 8
  assert stats.counts == {"no_context": 1, "no_reference": 1,
                          "missing_image": 1, "invalid_json": 1,
                          "duplicate_id": 1}
  assert stats.notes["records"] == 6 and stats.notes["not_held_out"] == 0
  second = next(q for q in got if q.id.endswith("#1"))
  # Asked after the first question and its reference answer.
  assert [t.role for t in second.conversation.turns] == [
      "user", "assistant", "user", "assistant"]
  assert second.question.startswith("How many")
  assert second.category == "conversation"
  assert "cat: [0.1" in second.context or "dog: [0.3" in second.context


def tiny_checkpoint(root):
  """A random tiny multimodal model with a 600-piece BPE tokenizer that
  has <image>, saved as stage 2 writes WORKDIR/model."""
  from configs.vision import projector_config, vision_config
  from mllm_jax.configlib import from_config
  from mllm_jax.convert import multimodal as mm_io
  from mllm_jax.data.tokenizer import load_tokenizer, train_sentencepiece
  from mllm_jax.modeling.multimodal import MultimodalConfig
  from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
  from mllm_jax.paths import data_path
  from tests.helpers import tiny_config
  from tests.test_multimodal import build

  spm = train_sentencepiece([data_path("sentencepiece", "sentencepiece-0.2.3",
                                       "test", "botchan.txt")],
                            str(root / "sp" / "tok"), 600)
  tok = load_tokenizer(spm)
  cfg = MultimodalConfig(
      tiny_config("tiny", vocab_size=tok.vocab_size, max_seq_len=512),
      from_config(VisionConfig, vision_config("tiny"), "vision"),
      from_config(ProjectorConfig, projector_config(
          "mlp2x_gelu", dtype="float32"), "projector"),
      tok.special_token_id("<image>"))
  mm_io.save_model(str(root / "model"), cfg, build(cfg))
  shutil.copy(spm, root / "model" / "tokenizer.model")
  return root / "model"


def run(*args):
  return subprocess.run(
      [sys.executable, "-m", "launch.judge_images", *args], cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=300, check=False)


def test_judge_images_end_to_end(server, questions, tmp_path):  # noqa: F811
  ckpt = tiny_checkpoint(tmp_path)
  out = tmp_path / "judged"
  done = run(f"--checkpoint={ckpt}", f"--questions={questions}",
             f"--judge=openai:{server.url}/v1", "--judge_model=scripted",
             "--timeout_s=10", f"--output={out}", "--max_new_tokens=4",
             "--batch_size=4")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((out / "judge.json").read_text())
  # Our 4-token answers never carry the teacher's tag: 3 against 9 in
  # both orders; the two "How many" questions get no readable rating.
  overall = result["overall"]
  assert (overall["items"], overall["scored"]) == (8, 6)
  assert overall["relative"] == pytest.approx(100 * 3 / 9)
  assert result["position_bias"] == 0
  assert result["failures"] == {"malformed": 4}
  assert {k: (v["items"], v["scored"])
          for k, v in result["categories"].items()} == {
              "conversation": (4, 2), "detail": (2, 2), "reasoning": (2, 2)}
  assert sum(result["read"]["dropped"].values()) == 5
  answers = [json.loads(line) for line in
             (out / "answers.jsonl").read_text().splitlines()]
  assert len(answers) == 8 and all(TAG.search(a["reference"])
                                   for a in answers
                                   if not a["question"].startswith("How"))
  assert "| detail | 2 | 2 | 9.00 | 3.00 | 33.3 |" in done.stdout
  assert "malformed" in done.stdout and "no_context" in done.stdout

  bad_judge = run(f"--checkpoint={ckpt}", f"--questions={questions}",
                  "--judge=gpt4", f"--output={out}")
  no_file = run(f"--checkpoint={ckpt}", f"--questions={tmp_path}/none.jsonl",
                f"--judge=openai:{server.url}", "--judge_model=m",
                f"--output={out}")
  for proc, text in ((bad_judge, "--judge must be"),
                     (no_file, "none.jsonl")):
    assert proc.returncode != 0 and text in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_held_out_scenes_are_stage2_test_scenes():
  cfg = vi.VisualConfig(num_scenes=1, first_scene=2, held_out=True)
  cfg.validate()  # past train_scenes, allowed for held-out questions
  (source,) = vi.read_sources(cfg)
  assert source.id == vi.scene_sources(cfg.train_scenes + 2, 1)[0].id
