"""Visual instruction data from captions and boxes, as LLaVA built its 158K
set: a text-only teacher never sees the image, only what is in it (the
objects' captions and their boxes), and writes three kinds of data about
it, each with its own system prompt and few-shot demonstrations:

  conversation  several Question/Answer exchanges about the image
                (what, how many, where, relations, uses);
  detail        one detailed description, asked by an instruction drawn
                from DETAIL_INSTRUCTIONS;
  reasoning     one question that needs reasoning beyond what is visible
                and a step-by-step answer.

Images (`VisualSource`: id, image bytes or path, the teacher's context):
  scenes     the composited scenes of `data.scenes` (stage 2's training
             split: scene indices below `train_scenes`, so no scene whose
             questions are stage 2's test set is described); context = the
             scene's caption sentence, the per-object captions and
             `name: [x0, y0, x1, y1]` boxes normalised to [0, 1]
             (`Scene.context`).
  tuxpaint, gcompris, skimage
             the captioned images of `data.image_sources` (caption, plus the
             description where the source has one; no boxes), leaving out
             the ones `image_sets.caption_split` holds out.

Teachers are `data.instructions`' (`NativeTeacher`, `OpenAITeacher`: retries,
timeouts and failures counted there), and so are the resumable output file
and its stats file (`instructions.Checkpoint`) and the round loop
(`instructions.run_rounds`: outages, stalls, `max_rounds`). Work is the
list of (image, kind) jobs, image-major; round r asks the teacher for jobs
[r*batch_size, (r+1)*batch_size). Replies are parsed (`parse_qa`: labelled
Question/Answer turns, also inline, markdown or Q:/A:; `parse_detail`) and
checked (`parse_reply`: box numbers or "captions" in the text, refusals,
loops, replies cut off by max_new_tokens, replies naming none of the
image's objects); a malformed reply is dropped with a counted reason
(stats file `dropped`, `KIND_REASON`), never raised.

Output: FILE.jsonl of the project's conversation records
(`chat.Conversation.to_json`), the first user turn starting with the
`<image>` placeholder, `images` naming one PNG/WebP/JPEG file under
FILE.images/ (relative to the JSONL's folder, so
`image_readers.read_folder` and stage 2's `data.instruction_files` read it
as it is), and `meta` (kind, source, source_id, round, the context the
teacher read, and held_out when set) that readers ignore; the judge
(`eval.image_judge`) reads the context and the kind from it.

Held-out questions (`held_out=True`, for evaluation only): the same
kinds about stage 2's test scenes (indices from `train_scenes` on) and
the captioned images `caption_split` holds out, never trained on.
Image files are written before the records that name them; records are
appended and fsync'd per round, then the stats file is replaced
atomically, so a killed run resumes where it stopped and, with a
deterministic teacher, ends with the file an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Callable, Sequence

from mllm_jax.configlib import check, check_choice
from mllm_jax.data import image_sets, image_sources, readers, scenes
from mllm_jax.data.chat import (ASSISTANT, USER, ChatStats, Conversation,
                                ConversationError, Turn)
from mllm_jax.data.instructions import (Checkpoint, Message, Round, Teacher,
                                        _derive, _rng, _snippet, run_rounds,
                                        stats_path_for)
from mllm_jax.data.tokenizer import IMAGE

KINDS = ("conversation", "detail", "reasoning")
SOURCES = ("scenes", "tuxpaint", "gcompris", "skimage")


@dataclasses.dataclass(frozen=True)
class VisualSource:
  id: str        # "scene/0/17", "gcompris/explore_farm_animals/cow.webp"
  image: Any     # encoded bytes or a file path
  context: str   # what the teacher reads instead of the image
  source: str    # one of SOURCES


# ----------------------------------------------------------------------------
# Prompts (written for this project)
# ----------------------------------------------------------------------------

_SEEING = (
    "You are a visual assistant describing one image. You cannot see it: "
    "instead you are told what it contains, as short captions of the "
    "objects and, when given, each object's box as name: [x0, y0, x1, y1], "
    "coordinates between 0 and 1 measured from the top left corner (x to "
    "the right, y downwards). Write as someone who is looking at the "
    "image: never mention captions, boxes, coordinates, numbers from them "
    "or the text you were given; speak of the picture and of left, right, "
    "top, bottom, near and far. Say only what the information supports.")

SYSTEM_PROMPTS = {
    "conversation": _SEEING + (
        "\n\nWrite a conversation about the image between a curious person "
        "and you: 2 to 4 exchanges. Vary the questions (what the objects "
        "are, how many there are, where each one is, how they are placed "
        "relative to each other, what they are for) and ask only questions "
        "with a definite answer. Use exactly this form and nothing else:\n"
        "Question: <question>\nAnswer: <answer>"),
    "detail": _SEEING + (
        "\n\nWrite a detailed description of the image in one paragraph: "
        "every object, where it is in the picture, how large it is compared "
        "with the picture and with the other objects, and how the objects "
        "are arranged. Reply with the description only."),
    "reasoning": _SEEING + (
        "\n\nWrite one question about the image that cannot be answered by "
        "naming what is visible: it asks about purposes, what someone could "
        "do, what the arrangement suggests, or compares the objects. Then "
        "answer it in detail, reasoning step by step from what the image "
        "shows. Use exactly this form:\nQuestion: <question>\n"
        "Answer: <answer>"),
}

# Few-shot demonstrations: (context, answer) pairs in the form scenes give.
_DEMO_CONTEXTS = (
    "Two objects: a tractor at the bottom left and an apple at the top "
    "right.\nA red tractor.\nAn apple.\n"
    "tractor: [0.071, 0.560, 0.452, 0.905]\n"
    "apple: [0.690, 0.098, 0.912, 0.333]",
    "Three objects: a guitar on the left, a cat at the bottom and a "
    "lighthouse at the top right.\nA guitar.\nA cat.\n"
    "A lighthouse on a rocky shore.\n"
    "guitar: [0.040, 0.287, 0.301, 0.702]\n"
    "cat: [0.405, 0.663, 0.690, 0.962]\n"
    "lighthouse: [0.732, 0.031, 0.958, 0.420]",
)

DEMOS = {
    "conversation": (
        (_DEMO_CONTEXTS[0],
         "Question: What vehicle is in the picture?\n"
         "Answer: A red tractor, in the lower left part of the picture.\n"
         "Question: Is there any fruit?\n"
         "Answer: Yes, an apple, near the top right corner.\n"
         "Question: Which looks bigger, the tractor or the apple?\n"
         "Answer: The tractor. It takes up about a third of the picture's "
         "width, while the apple is much smaller."),
        (_DEMO_CONTEXTS[1],
         "Question: How many objects can you see?\n"
         "Answer: Three: a guitar, a cat and a lighthouse.\n"
         "Question: What is on the left side?\n"
         "Answer: A guitar, standing upright along the left edge.\n"
         "Question: Is the cat above or below the lighthouse?\n"
         "Answer: Below it. The cat is at the bottom of the picture and the "
         "lighthouse is in the top right corner.\n"
         "Question: Where does the lighthouse stand?\n"
         "Answer: On a rocky shore."),
    ),
    "detail": (
        (_DEMO_CONTEXTS[0],
         "The picture shows two objects on a plain background. In the lower "
         "left part there is a red tractor, wide enough to fill about a "
         "third of the picture. In the opposite corner, at the top right, "
         "there is a single apple, much smaller than the tractor. The two "
         "are far apart, with empty space across the middle."),
        (_DEMO_CONTEXTS[1],
         "Three objects are spread over a plain background. A guitar stands "
         "upright along the left side, reaching from above the middle to "
         "below it. At the bottom, a little right of centre, sits a cat. In "
         "the top right corner there is a tall, narrow lighthouse on a rocky "
         "shore. Nothing overlaps, and the centre of the picture is mostly "
         "empty."),
    ),
    "reasoning": (
        (_DEMO_CONTEXTS[0],
         "Question: What might connect the two objects in this picture?\n"
         "Answer: Both belong to farming. A tractor is a farm vehicle used "
         "to plough fields and pull trailers, and apples grow in orchards "
         "that farmers look after, often with a tractor to carry the "
         "harvest. So the picture could stand for a farm or an apple "
         "harvest, even though the two are shown apart and at very "
         "different sizes."),
        (_DEMO_CONTEXTS[1],
         "Question: If this picture were a poster for a seaside town, which "
         "object would fit the theme best, and why?\n"
         "Answer: The lighthouse. Lighthouses stand on coasts to guide "
         "ships, and this one is on a rocky shore, so it points straight to "
         "the sea. The guitar could suggest a music festival and the cat "
         "could be anyone's pet, but neither says anything about the "
         "seaside, so the lighthouse in the top right corner carries the "
         "theme."),
    ),
}

# The user turn of a detail record (one drawn per image and seed).
DETAIL_INSTRUCTIONS = (
    "Describe the image in detail.",
    "What do you see in this picture? Describe it thoroughly.",
    "Give a detailed account of everything in the image.",
    "Describe what each thing in the image is and where it is.",
    "Write a careful, detailed description of this picture.",
    "Walk me through the contents of the image.",
    "Explain in detail what the image shows.",
    "Describe this image as fully as you can.",
)


def teacher_prompt(kind: str, context: str, shots: int = 2
                   ) -> list[Message]:
  """The system prompt of `kind`, `shots` demonstrations as user (context)
  / assistant (answer) turns, then the image's context."""
  check_choice(kind, KINDS, "kind")
  messages = [{"role": "system", "content": SYSTEM_PROMPTS[kind]}]
  for demo_context, answer in DEMOS[kind][:shots]:
    messages += [{"role": "user", "content": demo_context},
                 {"role": "assistant", "content": answer}]
  messages.append({"role": "user", "content": context})
  return messages


# ----------------------------------------------------------------------------
# Parsing and checks
# ----------------------------------------------------------------------------

_QUESTION = ("question", "q", "user", "human")
# A label at the start of a line (markdown, numbering or quotes around it),
# or "Question:"/"Answer:" after whitespace inside a line.
_LINE_LABEL = re.compile(
    r"^[ \t>*#_-]*(?:\d{1,2}[.)][ \t]*)?[*_]*(question|answer|q|a|user|"
    r"human|assistant)(?:[ \t]*\d{1,2})?[ \t]*[*_]*[:：][*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE)
_INLINE_LABEL = re.compile(r"(?<=\s)[*_]*(question|answer)[*_]*[ \t]*:"
                           r"[*_]*[ \t]*", re.IGNORECASE)
_SEPARATOR = re.compile(r"^\s*(?:={3,}|-{3,}|\*{3,})\s*$", re.MULTILINE)


def _labels(text: str) -> list[tuple[int, int, str]]:
  """(start, end, "q"|"a") of every turn label, in order."""
  found = []
  for rx in (_LINE_LABEL, _INLINE_LABEL):
    for m in rx.finditer(text):
      role = "q" if m.group(1).lower() in _QUESTION else "a"
      found.append((m.start(), m.end(), role))
  found.sort()
  out: list[tuple[int, int, str]] = []
  for start, end, role in found:
    if out and start < out[-1][1]:
      continue  # the same label found by both patterns
    out.append((start, end, role))
  return out


def _clean(text: str) -> str:
  text = _SEPARATOR.sub("", text).strip()
  text = text.strip("*_ \t\n")
  return " ".join(text.split()) if "\n\n" not in text else "\n\n".join(
      " ".join(p.split()) for p in text.split("\n\n") if p.strip())


def parse_qa(text: str, stats: ChatStats | None = None
             ) -> list[tuple[str, str]] | str:
  """Question/Answer pairs of a reply, or the drop reason: no_qa_labels,
  no_answer (a question alone), starts_with_answer, not_alternating (two
  questions or two answers in a row), empty_turn. Text before the first label is ignored and a final
  question without an answer trimmed (noted in `stats`)."""
  labels = _labels(text)
  if not labels:
    return "no_qa_labels"
  if text[:labels[0][0]].strip() and stats is not None:
    stats.note("preamble_ignored")
  turns = []
  for i, (_, end, role) in enumerate(labels):
    stop = labels[i + 1][0] if i + 1 < len(labels) else len(text)
    turns.append((role, _clean(text[end:stop])))
  if turns[0][0] != "q":
    return "starts_with_answer"
  if turns[-1][0] == "q":
    turns = turns[:-1]
    if stats is not None:
      stats.note("trailing_question_trimmed")
  if not turns:
    return "no_answer"  # a lone question
  pairs = []
  for i in range(0, len(turns), 2):
    if i + 1 >= len(turns) or turns[i][0] != "q" or turns[i + 1][0] != "a":
      return "not_alternating"
    question, answer = turns[i][1], turns[i + 1][1]
    if not question or not answer:
      return "empty_turn"
    pairs.append((question, answer))
  return pairs


_DETAIL_LABEL = re.compile(r"^[ \t*#_]*(?:description|answer|assistant)"
                           r"[ \t*_]*:[ \t*_]*", re.IGNORECASE)


def parse_detail(text: str) -> str:
  """The description of a detail reply: a leading "Description:"-style
  label and separators removed."""
  return _clean(_DETAIL_LABEL.sub("", text.strip(), count=1))


_CONTEXT_WORDS = re.compile(
    r"\b(?:bounding box(?:es)?|coordinates?|captions?|the (?:given |provided "
    r")?(?:description|context|information|text)|(?:given|provided) "
    r"(?:information|description|text))\b", re.IGNORECASE)
_BOX = re.compile(r"\[\s*[01]?\.\d+\s*,|\b0\.\d{2,3}\b")
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|as an ai\b|i cannot see|i can'?t see|"
    r"i am unable|i'?m unable|without seeing)", re.IGNORECASE)
MIN_DETAIL_WORDS, MIN_REASONING_WORDS = 15, 12


def text_problem(text: str) -> str | None:
  """Why a teacher's text must not become training data, or None:
  mentions_context (speaks of captions, boxes, coordinates or the given
  text instead of the image, or copies box numbers), refusal."""
  if _CONTEXT_WORDS.search(text) or _BOX.search(text):
    return "mentions_context"
  if _REFUSAL.search(text):
    return "refusal"
  return None


def _words(text: str) -> int:
  return len(re.findall(r"[A-Za-z0-9']+", text))


_BOX_LINE = re.compile(r"^(.+?):\s*\[", re.MULTILINE)


def object_names(context: str) -> list[str]:
  """The objects a context names: its `name: [box]` lines, or (a captioned
  image) the head noun of its first line ("Horse." -> "horse")."""
  names = _BOX_LINE.findall(context)
  if not names and context.strip():
    names = [scenes.object_name(context.strip().splitlines()[0])]
  return [n.strip() for n in names if n.strip()]


def _mentions(text: str, names: Sequence[str]) -> bool:
  """Whether the text names one of the objects (the whole name or its last
  word: "blackbuck" for "Indian blackbuck")."""
  for name in names:
    for form in {name, name.split()[-1]}:
      if len(form) >= 3 and re.search(r"\b" + re.escape(form) + r"\b",
                                      text, re.IGNORECASE):
        return True
  return False


def _repeats(text: str) -> bool:
  """The same sentence (4 words or more) twice: a teacher looping."""
  seen = set()
  for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
    key = " ".join(re.findall(r"[a-z0-9']+", sentence.lower()))
    if len(key.split()) >= 4:
      if key in seen:
        return True
      seen.add(key)
  return False


def parse_reply(kind: str, reply: str, stats: ChatStats | None = None,
                names: Sequence[str] = ()) -> list[tuple[str, str]] | str:
  """(question, answer) pairs to write for a `kind` reply (the detail
  kind's one question is "" : the record draws an instruction), or the
  drop reason: parse_qa's, wrong_format, too_short, answer_too_short,
  text_problem's, repetitive (a sentence or a question twice), unfinished
  (the last answer stops mid-sentence: the reply hit max_new_tokens),
  off_topic (none of `names`, the image's objects, is mentioned)."""
  if kind == "detail":
    text = parse_detail(reply)
    if len(_labels(text)) >= 2:
      return "wrong_format"  # a conversation where a description was asked
    if _words(text) < MIN_DETAIL_WORDS:
      return "too_short"
    pairs = [("", text)]
  else:
    pairs = parse_qa(reply, stats)
    if isinstance(pairs, str):
      return pairs
    if kind == "reasoning":
      if len(pairs) > 1 and stats is not None:
        stats.note("extra_pairs_ignored")
      pairs = pairs[:1]
      if _words(pairs[0][1]) < MIN_REASONING_WORDS:
        return "answer_too_short"
  for question, answer in pairs:
    reason = text_problem(question) or text_problem(answer)
    if reason is not None:
      return reason
  text = "\n".join(q + "\n" + a for q, a in pairs)
  questions = [" ".join(q.lower().split()) for q, _ in pairs]
  if _repeats(text) or len(set(questions)) < len(questions):
    return "repetitive"
  if not re.search(r"[.!?)\"'\u2019\u201d]$", pairs[-1][1]):
    return "unfinished"
  if names and not _mentions(text, names):
    return "off_topic"
  return pairs


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------


def scene_sources(first: int, count: int,
                  sets: image_sets.ImageSetsConfig | None = None
                  ) -> list[VisualSource]:
  """Scenes [first, first + count) exactly as `image_sets.scene_split`
  makes them (same cut-outs, same config)."""
  sets = sets or image_sets.ImageSetsConfig()
  sets.scene.validate()
  cutouts = image_sets._cutouts(sets.stamp_categories)  # pylint: disable=protected-access
  out = []
  for index in range(first, first + count):
    scene = scenes.make_scene(cutouts, index, sets.scene)
    out.append(VisualSource(scene.id, scene.image,
                            f"{scene.caption}\n{scene.context()}", "scenes"))
  return out


def captioned_sources(names: Sequence[str], limit: int = 0,
                      sets: image_sets.ImageSetsConfig | None = None,
                      stats: ChatStats | None = None,
                      held_out: bool = False) -> list[VisualSource]:
  """The captioned images of `names` (tuxpaint, gcompris, skimage) that
  `image_sets.caption_split` puts on the training side (held_out: on the
  held-out side), in source order, at most `limit` in all (0: every
  one)."""
  sets = sets or image_sets.ImageSetsConfig()
  read = {"tuxpaint": image_sources.tuxpaint_stamps,
          "gcompris": image_sources.gcompris_photos,
          "skimage": image_sources.skimage_photos}
  out = []
  for name in names:
    for item in read[name](stats=stats):
      if image_sets._held_out(item.caption, sets.held_out_fraction,  # pylint: disable=protected-access
                              sets.seed) != held_out:
        continue
      context = item.caption + (f"\n{item.description}"
                                if item.description else "")
      out.append(VisualSource(item.id, item.image, context, name))
      if limit and len(out) >= limit:
        return out
  return out


_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"))


def image_file_name(source: VisualSource) -> str:
  """A file name for the image: the id made safe, with its format's
  extension."""
  if isinstance(source.image, (bytes, bytearray)):
    data = bytes(source.image[:12])
    ext = next((e for magic, e in _MAGIC if data.startswith(magic)),
               ".webp" if data[8:12] == b"WEBP" else ".img")
  else:
    ext = os.path.splitext(str(source.image))[1].lower() or ".img"
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.id).strip("._") or "image"
  if stem.endswith(ext):
    stem = stem[:-len(ext)]
  return stem + ext


def images_dir_for(output: str) -> str:
  """FILE.jsonl -> FILE.images (beside it)."""
  root, ext = os.path.splitext(output)
  return (root if ext else output) + ".images"


def _write_image(source: VisualSource, path: str) -> None:
  if isinstance(source.image, (bytes, bytearray)):
    data = bytes(source.image)
  else:
    with open(source.image, "rb") as f:
      data = f.read()
  if os.path.exists(path) and os.path.getsize(path) == len(data):
    return
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisualConfig:
  """What a run does; the fields are the binary's flags. All but the
  outage/idle guards must match to resume.

  sources: "scenes" first (scene indices [first_scene, first_scene +
    num_scenes), which must stay below train_scenes, stage 2's split),
    then the captioned sources in order (at most max_captioned images;
    0: all of their training side).
  held_out: questions for evaluation instead: scenes from train_scenes on
    (first_scene counts from there) and the captioned images held out.
  kinds: what to ask for each image (KINDS).
  shots: few-shot demonstrations per prompt (0 to 2).
  batch_size: jobs (image, kind) per round; also the native teacher's
    batch.
  """
  sources: tuple = ("scenes",)
  kinds: tuple = KINDS
  num_scenes: int = 100
  first_scene: int = 0
  train_scenes: int = 1000
  max_captioned: int = 0
  held_out: bool = False
  shots: int = 2
  seed: int = 0
  max_new_tokens: int = 512
  temperature: float = 0.7
  batch_size: int = 8
  max_idle_rounds: int = 50
  max_outage_rounds: int = 5
  outage_wait_s: float = 10.0

  def validate(self) -> None:
    check(bool(self.sources), "--sources", "name at least one source")
    for name in self.sources:
      check_choice(name, SOURCES, "--sources")
    check(len(set(self.sources)) == len(self.sources), "--sources",
          "names a source twice")
    check(bool(self.kinds), "--kinds", "name at least one kind")
    for kind in self.kinds:
      check_choice(kind, KINDS, "--kinds")
    check(len(set(self.kinds)) == len(self.kinds), "--kinds",
          "names a kind twice")
    check(self.num_scenes >= 0 and self.first_scene >= 0, "--num_scenes",
          "--num_scenes and --first_scene must be >= 0")
    if "scenes" in self.sources:
      check(self.num_scenes >= 1, "--num_scenes", "must be >= 1 with "
            "--sources=scenes")
      check(self.held_out or
            self.first_scene + self.num_scenes <= self.train_scenes,
            "--num_scenes",
            f"scenes [{self.first_scene}, "
            f"{self.first_scene + self.num_scenes}) reach past stage 2's "
            f"training scenes [0, {self.train_scenes}) (--train_scenes); "
            f"later scenes are its test set")
    check(self.max_captioned >= 0, "--max_captioned", "must be >= 0")
    check(0 <= self.shots <= 2, "--shots", "must be 0, 1 or 2")
    check(self.max_new_tokens >= 1, "--max_new_tokens", "must be >= 1")
    check(self.temperature >= 0, "--temperature", "must be >= 0")
    check(self.batch_size >= 1, "--batch_size", "must be >= 1")
    check(self.max_idle_rounds >= 1, "--max_idle_rounds", "must be >= 1")
    check(self.max_outage_rounds >= 1, "--max_outage_rounds", "must be >= 1")
    check(self.outage_wait_s >= 0, "--outage_wait_s", "must be >= 0")


def read_sources(config: VisualConfig, stats: ChatStats | None = None
                 ) -> list[VisualSource]:
  out = []
  if "scenes" in config.sources:
    first = config.first_scene + (config.train_scenes if config.held_out
                                  else 0)
    out += scene_sources(first, config.num_scenes)
  captioned = [s for s in config.sources if s != "scenes"]
  if captioned:
    out += captioned_sources(captioned, config.max_captioned, stats=stats,
                             held_out=config.held_out)
  return out


def _jobs_digest(sources: Sequence[VisualSource], kinds: Sequence[str]
                 ) -> str:
  h = hashlib.sha256()
  for s in sources:
    h.update(f"{s.id}\0{s.context}\0".encode())
  h.update("\0".join(kinds).encode())
  return h.hexdigest()[:16]


def to_record(source: VisualSource, kind: str, pairs: Sequence[tuple],
              image_name: str, seed: int, meta: dict[str, Any]
              ) -> dict[str, Any]:
  """The conversation record (raises ConversationError when the texts
  cannot form one, e.g. a teacher that wrote an <image> placeholder)."""
  turns = []
  for i, (question, answer) in enumerate(pairs):
    if kind == "detail":
      question = _rng(seed, "detail", source.id).choice(DETAIL_INSTRUCTIONS)
    turns += [Turn(USER, f"{IMAGE}\n{question}" if i == 0 else question),
              Turn(ASSISTANT, answer)]
  conv = Conversation(f"{kind}/{source.id}", tuple(turns), None,
                      (image_name,))
  return {**conv.to_json(), "meta": {"kind": kind, "source": source.source,
                                     "source_id": source.id,
                                     "context": source.context, **meta}}


def generate_visual(teacher: Teacher, output: str,
                    config: VisualConfig | None = None,
                    sources: Sequence[VisualSource] | None = None,
                    stats_path: str | None = None,
                    max_rounds: int | None = None,
                    progress: Callable[[str], None] | None = None
                    ) -> dict[str, Any]:
  """Generates (or resumes) the records of every (image, kind) job into
  `output` (JSONL), images under images_dir_for(output); returns the stats
  written to `stats_path` (default FILE.stats.json).

  sources: the images (default `read_sources(config)`).
  max_rounds: stop after this many rounds in this call (resume later).
  Raises instructions.ResumeError, TeacherUnavailable, Stalled; the output
  up to the last round is kept.
  """
  config = config or VisualConfig()
  config.validate()
  progress = progress or (lambda message: None)
  read_stats = ChatStats()
  if sources is None:
    sources = read_sources(config, read_stats)
  sources = list(sources)
  if not sources:
    raise ValueError(f"no image to describe from --sources="
                     f"{','.join(config.sources)} "
                     f"(dropped: {dict(read_stats.counts)})")
  jobs = [(s, kind) for s in sources for kind in config.kinds]
  num_rounds = -(-len(jobs) // config.batch_size)
  stats_path = stats_path or stats_path_for(output)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  images_dir = images_dir_for(output)
  os.makedirs(images_dir, exist_ok=True)
  rel_dir = os.path.relpath(images_dir,
                            os.path.dirname(os.path.abspath(output)))
  key = {"seed": config.seed, "max_new_tokens": config.max_new_tokens,
         "temperature": config.temperature, "batch_size": config.batch_size,
         "shots": config.shots, "jobs": _jobs_digest(sources, config.kinds)}
  ckpt = Checkpoint(
      output, stats_path, key, teacher, progress,
      header={"method": "visual_instructions", "kinds": list(config.kinds),
              "sources": list(config.sources),
              "held_out": config.held_out, "images": len(sources),
              "jobs": len(jobs), "images_dir": rel_dir},
      flag_names={"jobs": "--sources/--kinds/--num_scenes/--first_scene/"
                          "--max_captioned (the images and kinds)"})
  ckpt.load()
  if not os.path.exists(stats_path):
    ckpt.write_stats(False)

  def next_round(r: int) -> Round:
    stats = ChatStats()
    batch = jobs[r * config.batch_size:(r + 1) * config.batch_size]
    prompts = [teacher_prompt(kind, s.context, config.shots)
               for s, kind in batch]
    replies = teacher.complete(prompts, config.max_new_tokens,
                               config.temperature,
                               _derive(config.seed, "visual", r))
    if batch and all(reply is None for reply in replies):
      return Round([], stats, outage=True)
    accepted = []
    for (source, kind), reply in zip(batch, replies):
      where = f"round {r} {kind} {source.id}"
      stats.note(f"asked_{kind}")
      if reply is None:
        stats.add(readers.Drop("teacher_failed", where))
        continue
      pairs = parse_reply(kind, reply, stats, object_names(source.context))
      if isinstance(pairs, str):
        stats.add(readers.Drop(f"{kind}_{pairs}",
                               f"{where}: {_snippet(reply)!r}"))
        continue
      name = f"{rel_dir}/{image_file_name(source)}"
      try:
        split = {"held_out": True} if config.held_out else {}
        row = to_record(source, kind, pairs, name, config.seed,
                        {"round": r, **split})
      except ConversationError as e:
        stats.add(readers.Drop(f"{kind}_invalid_conversation",
                               f"{where}: {e}"))
        continue
      stats.note(f"accepted_{kind}")
      stats.note(f"turns_{kind}", len(pairs))
      accepted.append((source, row))
    return Round(accepted, stats)

  def to_rows(accepted: list, base: int) -> list[dict[str, Any]]:
    del base
    for source, row in accepted:  # images first: a record never lacks one
      _write_image(source, os.path.join(images_dir,
                                        image_file_name(source)))
    return [row for _, row in accepted]

  if ckpt.rounds_done >= num_rounds:
    progress(f"{output} already holds the {ckpt.rounds_done} rounds of "
             f"{len(jobs)} jobs; nothing to do")
    return ckpt.write_stats(True)
  return run_rounds(ckpt, teacher, config, next_round, to_rows,
                    lambda records, rounds: rounds >= num_rounds,
                    max_rounds=max_rounds, progress=progress)


__all__ = [
    "DEMOS", "DETAIL_INSTRUCTIONS", "KINDS", "SOURCES", "SYSTEM_PROMPTS",
    "VisualConfig", "VisualSource", "captioned_sources", "generate_visual",
    "image_file_name", "images_dir_for", "object_names", "parse_detail", "parse_qa",
    "parse_reply", "read_sources", "scene_sources", "teacher_prompt",
    "text_problem", "to_record",
]
