"""Visual instruction data generation (mllm_jax.data.visual_instructions and
launch.generate_visual_instructions), and stage 2 reading its output.

The OpenAI-compatible teacher is test_instructions' scripted
chat-completions server on 127.0.0.1 (replies a pure function of the
request, so runs are deterministic; modes answer HTTP 500, malformed JSON
or hang). Real composited scenes where the images matter; small synthetic
sources (one PNG, a context that says how the teacher misbehaves) where
only the parsing does. The native teacher is a tiny random byte model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from mllm_jax.configlib import ConfigError
from mllm_jax.data import image_readers, images
from mllm_jax.data import instructions as ins
from mllm_jax.data import visual_instructions as vi
from mllm_jax.data.chat import ChatStats
from tests.test_instructions import REPO, Killer, Server, lines  # noqa: F401
from tests.test_instructions import server  # noqa: F401  # the fixture

KIND_OF_PROMPT = {"Write a conversation": "conversation",
                  "Write a detailed description": "detail",
                  "Write one question": "reasoning"}


def prompt_kind(messages) -> str:
  return next(k for text, k in KIND_OF_PROMPT.items()
              if text in messages[0]["content"])


def good_reply(messages, seed) -> str:
  """A well-formed reply of the prompt's kind about the context's first
  object, in a different surface form per kind."""
  context = messages[-1]["content"]
  names = vi.object_names(context)
  tag = hashlib.sha256(f"{context}|{seed}".encode()).hexdigest()[:6]
  kind = prompt_kind(messages)
  if kind == "conversation":
    return (f"Sure, here it is.\nQuestion: What is in the picture?\n"
            f"Answer: A {names[0]} ({tag}).\n===\n"
            f"**Question 2:** How many objects are there?\n"
            f"**Answer:** {len(names)}.")
  if kind == "detail":
    return (f"Description: The picture shows a {names[0]} on a light "
            f"background, drawn clearly and placed away from the edges of "
            f"the image ({tag}).")
  return (f"Question: What could the {names[0]} be used for? Answer: It "
          f"could be used in many ways, for example as a toy or as an "
          f"illustration in a book ({tag}).")


BAD = {  # context -> (kind that misbehaves, reply, drop reason)
    "no_labels": ("conversation", "It is a nice picture with things.",
                  "conversation_no_qa_labels"),
    "answer_first": ("conversation", "Answer: yes\nQuestion: what?",
                     "conversation_starts_with_answer"),
    "two_questions": ("conversation", "Q: What?\nQ: Where?\nA: Here.",
                      "conversation_not_alternating"),
    "short": ("detail", "A cat.", "detail_too_short"),
    "boxes": ("detail", "The cat sits in the bounding box at the top left "
              "corner of the picture, near the edge, looking at the dog.",
              "detail_mentions_context"),
    "numbers": ("conversation", "Question: Where is it?\nAnswer: At "
                "[0.120, 0.400, 0.300, 0.610].",
                "conversation_mentions_context"),
    "brief": ("reasoning", "Question: Why?\nAnswer: Because.",
              "reasoning_answer_too_short"),
    "sorry": ("reasoning", "Question: What is it for?\nAnswer: I'm sorry, "
              "but I cannot see the image, so I can not say anything about "
              "what it is for.", "reasoning_refusal"),
    "placeholder": ("detail", "The <image> shows a placeholder sitting on "
                    "a red mat in the middle of a sunny and quiet kitchen.",
                    "detail_invalid_conversation"),
    "off_topic": ("reasoning", "Question: What is the sum of two and two? "
                  "Answer: Two and two make four, which is the sum of the "
                  "two numbers added together.", "reasoning_off_topic"),
    "cut": ("detail", "The picture shows a cat on a light background, drawn "
            "clearly and placed away from the", "detail_unfinished"),
    "as_conversation": ("detail", "Question: What is it?\nAnswer: A cat "
                        "sitting on a red mat in the middle of a quiet "
                        "kitchen.", "detail_wrong_format"),
}


def scripted(body) -> str:
  messages = body["messages"]
  mode = BAD.get(messages[-1]["content"])
  if mode and mode[0] == prompt_kind(messages):
    return mode[1]
  return good_reply(messages, body.get("seed", 0))


@pytest.fixture(name="png", scope="module")
def fixture_png() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def synthetic(png, contexts):
  return [vi.VisualSource(f"syn/{i}", png, c, "scenes")
          for i, c in enumerate(contexts)]


@pytest.fixture(name="scene_sources", scope="module")
def fixture_scene_sources():
  return vi.scene_sources(0, 3)


def teacher(server, **kw):  # noqa: F811
  kw = {"timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.01,
        "concurrency": 4, **kw}
  return ins.OpenAITeacher(server.url + "/v1", "scripted", **kw)


def config(**kw) -> vi.VisualConfig:
  return vi.VisualConfig(**{"batch_size": 4, "max_new_tokens": 64,
                            "outage_wait_s": 0.0, "num_scenes": 3, **kw})


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def test_parse_replies():
  stats = ChatStats()
  assert vi.parse_qa("Here you go:\n1. **Question:** What is it?\n"
                     "**Answer:** A cat.\n---\nQ: Where?\nA: On the left.\n"
                     "Question: And then?", stats) == [
                         ("What is it?", "A cat."), ("Where?", "On the left.")]
  assert stats.notes == {"preamble_ignored": 1,
                         "trailing_question_trimmed": 1}
  assert vi.parse_qa("Question: Why? Answer: Because it is.") == [
      ("Why?", "Because it is.")]
  assert vi.parse_qa("User: hi\nAssistant: hello") == [("hi", "hello")]
  assert vi.parse_qa("no labels") == "no_qa_labels"
  assert vi.parse_qa("Question: What is the cat doing?") == "no_answer"
  assert vi.parse_qa("Question:\nAnswer: x") == "empty_turn"
  assert vi.parse_detail("**Description:** A  cat\non a mat.") == (
      "A cat on a mat.")
  assert vi.text_problem("A cat on the left of the picture.") is None
  assert vi.text_problem("Its coordinates are known.") == "mentions_context"
  assert vi.text_problem("As an AI I cannot see.") == "refusal"
  messages = vi.teacher_prompt("reasoning", "ctx", shots=2)
  assert [m["role"] for m in messages] == ["system", "user", "assistant",
                                           "user", "assistant", "user"]
  assert messages[-1]["content"] == "ctx"
  for kind in vi.KINDS:  # the demonstrations pass our own checks
    for context, answer in vi.DEMOS[kind]:
      names = vi.object_names(context)
      assert names and not isinstance(
          vi.parse_reply(kind, answer, names=names), str), (kind, answer)
  assert vi.object_names("Horse.\nThe horse goes 'neigh'.") == ["horse"]
  says = lambda text: vi.parse_reply("detail", text, names=[
      "Indian blackbuck"])
  assert says("A " + "long " * 14 + "blackbuck.") == [("", "A " + "long " * 14
                                                       + "blackbuck.")]
  assert says("A " + "long " * 14 + "planet.") == "off_topic"
  assert says("A " + "long " * 14 + "blackbuck and") == "unfinished"
  assert says("The blackbuck is big and brown. It runs fast over the "
              "grass. The blackbuck is big and brown.") == "repetitive"
  assert vi.parse_reply("conversation", "Q: Is it a cat?\nA: Yes.\n"
                        "Q: Is it a cat?\nA: No.") == "repetitive"


# --------------------------------------------------------------------------
# Over HTTP
# --------------------------------------------------------------------------


def test_three_kinds_from_scenes_train_in_stage2_form(server, tmp_path,  # noqa: F811
                                                      scene_sources):
  server.reply = scripted
  out = tmp_path / "visual.jsonl"
  stats = vi.generate_visual(teacher(server), str(out), config(),
                             sources=scene_sources)
  records = lines(out)
  assert stats["complete"] and stats["jobs"] == 9 and not stats["dropped"]
  assert [r["meta"]["kind"] for r in records] == list(vi.KINDS) * 3
  assert stats["notes"]["accepted_conversation"] == 3
  for r in records:
    turns = r["messages"]
    assert turns[0]["content"].startswith("<image>\n")
    assert not any("<image>" in t["content"] for t in turns[1:])
    assert [t["role"] for t in turns] == ["user", "assistant"] * (
        len(turns) // 2)
    assert r["images"] == [f"visual.images/scene_0_"
                           f"{r['meta']['source_id'].split('/')[-1]}.png"]
  conv = records[0]["messages"]
  objects = re.findall(r"^.+?: \[", scene_sources[0].context, re.M)
  assert len(conv) == 4 and conv[3]["content"] == f"{len(objects)}."
  assert records[1]["messages"][0]["content"][len("<image>\n"):] in (
      vi.DETAIL_INSTRUCTIONS)
  assert records[1]["messages"][1]["content"].startswith("The picture shows")
  # The teacher saw the system prompt, two demonstrations and the scene's
  # captions and boxes, never the image.
  sent = [json.loads(k) for k in server.attempts]
  assert all(len(b["messages"]) == 6 for b in sent)
  assert any("[0." in b["messages"][-1]["content"] for b in sent)
  # The images are the scenes' PNGs, and the folder reader gives examples
  # whose pixels decode: what stage 2's data.instruction_files reads.
  read = ChatStats()
  examples = list(image_readers.read_folder(str(out), stats=read))
  assert len(examples) == 9 and not read.counts
  with open(examples[0].images[0], "rb") as f:
    assert f.read() == scene_sources[0].image
  pixels = images.prepare(examples[2], images.ImageConfig(size=32))["images"]
  assert pixels.shape == (1, 32, 32, 3)


def test_malformed_replies_are_dropped_and_counted(server, tmp_path, png):  # noqa: F811
  server.reply = scripted
  out = tmp_path / "bad.jsonl"
  sources = synthetic(png, list(BAD) + ["fine: [0.1, 0.1, 0.5, 0.5]"])
  stats = vi.generate_visual(teacher(server), str(out), config(),
                             sources=sources)
  assert stats["dropped"] == {reason: 1 for _, _, reason in BAD.values()}
  assert stats["records"] == 3 * len(sources) - len(BAD)
  kept = {(r["meta"]["source_id"], r["meta"]["kind"]) for r in lines(out)}
  for i, (kind, _, _) in enumerate(BAD.values()):
    assert (f"syn/{i}", kind) not in kept
  examples = stats["dropped_examples"]["reasoning_refusal"]
  assert "syn/7" in examples[0]


def test_errors_hangs_and_a_dead_teacher(server, tmp_path, png):  # noqa: F811
  server.reply = scripted
  sources = synthetic(png, [f"object{i}: [0.1, 0.2, 0.3, 0.4]"
                            for i in range(6)])
  hangs, lock = set(), threading.Lock()

  def mode(body, attempt):
    context = body["messages"][-1]["content"]
    kind = prompt_kind(body["messages"])
    if context.startswith("object1") and kind == "detail":
      with lock:
        hangs.add(context)
      return "hang"  # every attempt: failed_timeout, counted
    if context.startswith("object2") and kind == "reasoning":
      return "malformed"
    if context.startswith("object3") and attempt == 0:
      return "500"  # once: the retry succeeds
    return None

  server.mode = mode
  out = tmp_path / "flaky.jsonl"
  cfg = config(max_outage_rounds=2)
  stats = vi.generate_visual(teacher(server, timeout_s=0.4), str(out), cfg,
                             sources=sources, max_rounds=3)
  requests = stats["teacher_requests"]
  assert requests["failed_timeout"] == 1
  assert requests["failed_malformed_response"] == 1
  assert requests["retried_http_500"] == 3
  assert stats["dropped"] == {"teacher_failed": 2}
  assert stats["rounds_done"] == 3 and not stats["complete"]
  kept = out.read_text()
  assert len(lines(out)) == 12 - 2
  # Every request fails now: stops with what it has, nothing half-written.
  server.mode = lambda body, attempt: "500"
  with pytest.raises(ins.TeacherUnavailable, match="rerun"):
    vi.generate_visual(teacher(server), str(out), cfg, sources=sources)
  assert out.read_text() == kept
  server.mode = lambda body, attempt: None
  done = vi.generate_visual(teacher(server), str(out), cfg, sources=sources)
  assert done["complete"] and done["records"] == 18 - 2


def test_kill_and_resume_without_duplicates(server, tmp_path,  # noqa: F811
                                            scene_sources):
  server.reply = scripted
  cfg = config(batch_size=2)
  reference = tmp_path / "ref.jsonl"
  ref_stats = vi.generate_visual(teacher(server), str(reference), cfg,
                                 sources=scene_sources)
  out = tmp_path / "run.jsonl"
  with pytest.raises(KeyboardInterrupt):
    vi.generate_visual(Killer(teacher(server), at=3), str(out), cfg,
                       sources=scene_sources)
  partial = lines(out)
  assert len(partial) == 4
  # A kill between the records' fsync and the checkpoint, then a torn line.
  with open(out, "a", encoding="utf-8") as f:
    f.write(json.dumps(partial[-1]) + "\n" + '{"id": "torn", "messa')
  said = []
  stats = vi.generate_visual(teacher(server), str(out), cfg,
                             sources=scene_sources, progress=said.append)
  assert any("resume" in m for m in said)
  want = reference.read_text().replace("ref.images/", "run.images/")
  assert out.read_text() == want
  ids = [r["id"] for r in lines(out)]
  assert len(ids) == len(set(ids)) == 9
  same = {"output": "", "images_dir": ""}
  assert {**stats, **same} == {**ref_stats, **same}
  assert sorted(os.listdir(tmp_path / "run.images")) == [
      "scene_0_0.png", "scene_0_1.png", "scene_0_2.png"]
  again = vi.generate_visual(teacher(server), str(out), cfg,
                             sources=scene_sources)
  assert again["records"] == 9 and out.read_text() == want
  with pytest.raises(ins.ResumeError, match="--seed"):
    vi.generate_visual(teacher(server), str(out), config(batch_size=2,
                                                         seed=1),
                       sources=scene_sources)
  with pytest.raises(ins.ResumeError, match="--kinds"):
    vi.generate_visual(teacher(server), str(out), config(
        batch_size=2, kinds=("detail",)), sources=scene_sources)


def test_cli(server, tmp_path):  # noqa: F811
  server.reply = scripted
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "cli.jsonl"
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "launch.generate_visual_instructions", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
      check=False)
  done = run(f"--teacher=openai:{server.url}/v1", "--teacher_model=scripted",
             f"--output={out}", "--num_scenes=2", "--kinds=detail,reasoning",
             "--batch_size=4", "--max_new_tokens=64")
  assert done.returncode == 0, done.stderr
  assert "done: 4 records" in done.stdout
  assert len(lines(out)) == 4 and (tmp_path / "cli.stats.json").exists()
  no_model = run(f"--teacher=openai:{server.url}", "--first_scene=999",
                 f"--output={tmp_path / 'x.jsonl'}")
  assert no_model.returncode != 0 and "--teacher_model" in no_model.stderr
  assert "Traceback" not in no_model.stderr
  # What the binary turns into a usage error, in process (a subprocess
  # each costs seconds): a scene of stage 2's test set, a bad kind.
  with pytest.raises(ConfigError, match="test set"):
    config(first_scene=999, num_scenes=2).validate()
  with pytest.raises(ConfigError, match="--kinds"):
    config(kinds=("detail", "poem")).validate()


# --------------------------------------------------------------------------
# Native teacher
# --------------------------------------------------------------------------


def test_native_teacher(tmp_path, png):
  from mllm_jax.convert import native
  from mllm_jax.data.tokenizer import ByteTokenizer
  from tests.helpers import tiny_model

  cfg, model = tiny_model(vocab_size=ByteTokenizer.vocab_size,
                          max_seq_len=1280)
  ckpt = tmp_path / "ckpt"
  native.save_model(str(ckpt), cfg, model)
  t = ins.NativeTeacher.from_checkpoint(str(ckpt), "bytes", batch_size=3)
  out = tmp_path / "native.jsonl"
  sources = synthetic(png, ["cat: [0.1, 0.2, 0.5, 0.6]"])
  stats = vi.generate_visual(t, str(out), config(batch_size=3, shots=0,
                                                 max_new_tokens=16),
                             sources=sources)
  # A random model writes noise: every job is answered and accounted for.
  assert stats["complete"] and stats["rounds_done"] == 1
  assert stats["teacher_requests"]["completed"] == 3
  assert stats["records"] + sum(stats["dropped"].values()) == 3
  assert sum(stats["notes"][f"asked_{k}"] for k in vi.KINDS) == 3


# --------------------------------------------------------------------------
# Stage 2 reads the file
# --------------------------------------------------------------------------


def test_stage2_trains_on_instruction_files(server, tmp_path,  # noqa: F811
                                            scene_sources):
  from configs.mm import get_config
  from configs.vision import projector_config, vision_config
  from mllm_jax.configlib import from_config
  from mllm_jax.data import chat
  from mllm_jax.data.tokenizer import load_tokenizer, train_sentencepiece
  from mllm_jax.modeling.multimodal import MultimodalConfig
  from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
  from mllm_jax.paths import data_path
  from mllm_jax.train import mm_stage
  from tests.helpers import tiny_config

  server.reply = scripted
  out = tmp_path / "v.jsonl"
  vi.generate_visual(teacher(server), str(out), config(),
                     sources=scene_sources[:2])
  tok = load_tokenizer(train_sentencepiece(
      [data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                 "botchan.txt")], str(tmp_path / "tok"), 600))
  cfg = MultimodalConfig(
      tiny_config("tiny", vocab_size=640, max_seq_len=256),
      from_config(VisionConfig, vision_config("tiny"), "vision"),
      from_config(ProjectorConfig, projector_config("mlp2x_gelu"),
                  "projector"), tok.special_token_id("<image>"))
  conf = get_config("instruct_tiny")
  with conf.unlocked():
    conf.data.vqa_sources = ()  # the generated file only
    conf.data.instruction_files = str(out)
  train, _, summary = mm_stage.read_examples(
      conf, cfg, tok, chat.get_format("llava_v1", tok))
  assert summary["notes"]["instruction_examples"] == 6
  ours = [r for r in train if "/scene/" in r["id"]]
  assert len(train) == len(ours) == 6
  for r in ours:
    ids, weights = np.asarray(r["ids"]), np.asarray(r["weights"])
    image = ids == cfg.image_token_id
    assert image.sum() == cfg.tokens_per_image and not weights[image].any()
    assert weights.sum() > 0
