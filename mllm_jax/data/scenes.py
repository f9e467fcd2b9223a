"""Composited scenes: cut-out Tux Paint stamps pasted onto a background at
known places, giving real images with exact boxes, per-object captions and
questions whose answers are known.

    cutouts = cutout_stamps(image_sources.tuxpaint_stamps())
    scene = make_scene(cutouts, index=17, cfg=SceneConfig(seed=0))
    scene.image        # PNG bytes
    scene.objects      # SceneObject(name, caption, box=(x0, y0, x1, y1))
    scene.caption      # "Two objects: a badger at the top left and ..."
    scene.context()    # captions and normalised boxes, as LLaVA's teacher saw
    scene_questions(scene, names)  # SceneQuestion(question, answer, ...)

A scene is a pure function of (cutouts, index, cfg): the generator is seeded
with (cfg.seed, index), so scene 17 is the same whatever other scenes are
made and in which order. Boxes are the tight boxes of the pasted alpha mask
(alpha >= 128), not of the stamp's canvas; objects overlap by at most
`max_overlap` of the smaller box, and a name appears once per scene, so
every question has one answer.

Questions (type: answers; chance is one over the number of answers):
  count        How many objects ...?                one ... four (1/range)
  presence     Is there a <name> in the image?       yes / no (1/2; "no"
               asks about a stamp that is not in the scene)
  relation_lr  Is the <a> to the left or to the right of the <b>?
                                                     left / right (1/2)
  relation_tb  Is the <a> above or below the <b>?     above / below (1/2)
  half_lr      Is the <a> in the left or the right half of the image?
  half_tb      Is the <a> in the top or the bottom half of the image?
  leftmost     Which object is furthest to the left? a name (1/objects)
Relations are asked only between boxes that do not overlap along that axis,
halves only for objects whose centre is clear of the middle by 10% of the
canvas, "leftmost" only when it is clear of the next object by 10%.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mllm_jax.configlib import check
from mllm_jax.data import chat, readers
from mllm_jax.data.image_sources import CaptionedImage
from mllm_jax.data.pipeline import derive_seed

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six",
                "seven", "eight", "nine")
_ARTICLE = re.compile(r"^(a|an|the|some)\s+", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  size: int = 336
  min_objects: int = 1
  max_objects: int = 4
  object_scale: tuple = (0.25, 0.42)  # longer side / canvas side
  max_overlap: float = 0.05  # intersection / smaller box area
  seed: int = 0

  def validate(self, prefix: str = "scenes") -> None:
    check(self.size >= 32, f"{prefix}.size", f"must be >= 32, got "
          f"{self.size}")
    check(1 <= self.min_objects <= self.max_objects <= len(NUMBER_WORDS) - 1,
          f"{prefix}.min_objects/max_objects",
          f"need 1 <= min <= max <= 9, got {self.min_objects}, "
          f"{self.max_objects}")
    lo, hi = self.object_scale
    check(0 < lo <= hi <= 1, f"{prefix}.object_scale",
          f"needs 0 < low <= high <= 1, got {self.object_scale!r}")
    check(0 <= self.max_overlap < 1, f"{prefix}.max_overlap",
          f"must be in [0, 1), got {self.max_overlap}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  name: str       # "badger"
  caption: str    # "A badger."
  box: tuple      # (x0, y0, x1, y1) pixels, exclusive ends
  stamp_id: str

  @property
  def centre(self) -> tuple[float, float]:
    x0, y0, x1, y1 = self.box
    return (x0 + x1) / 2, (y0 + y1) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
  id: str
  image: bytes  # PNG
  size: int
  objects: tuple

  @property
  def caption(self) -> str:
    """What is where, in one sentence."""
    parts = [f"{_noun_phrase(o.caption)} {_where(o, self.size)}"
             for o in self.objects]
    listed = parts[0] if len(parts) == 1 else (
        ", ".join(parts[:-1]) + " and " + parts[-1])
    n = len(self.objects)
    head = "One object" if n == 1 else f"{NUMBER_WORDS[n].capitalize()} objects"
    return f"{head}: {listed}."

  def context(self) -> str:
    """Captions, then `name: [x0, y0, x1, y1]` boxes normalised to [0, 1]
    with three decimals (the form LLaVA's teacher prompts took)."""
    lines = [o.caption for o in self.objects]
    for o in self.objects:
      box = ", ".join(f"{v / self.size:.3f}" for v in o.box)
      lines.append(f"{o.name}: [{box}]")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SceneQuestion:
  id: str
  image: bytes
  question: str
  answer: str
  question_type: str
  chance: float  # accuracy of a uniform guess among the possible answers
  about: tuple = ()  # the names the question mentions, in order


_HEAD_END = re.compile(r"\s*(?:[\u2014\u2013]|\s-\s|\(|[.!?:;\u2026]+(?:\s|$))")
_QUOTES = str.maketrans({"\u201c": None, "\u201d": None, '"': None,
                         "\u2018": "'", "\u2019": "'"})


def _head(caption: str) -> tuple[str, str]:
  """(article, head noun phrase) of a stamp caption: the text before a
  dash, a parenthesis or a second sentence, quotes removed."""
  text = caption.translate(_QUOTES).strip().lstrip("-\u2013\u2014 ")
  text = _HEAD_END.split(text, maxsplit=1)[0].strip()
  text = re.sub(r"(^|\s)'([^']*)'(?=\s|$)", r"\1\2", text)  # ginger 'root'
  article = _ARTICLE.match(text)
  if article:
    return article.group(1).lower(), text[article.end():]
  return "", text


@functools.lru_cache(maxsize=4096)
def object_name(caption: str) -> str:
  """"A Tamworth pig." -> "Tamworth pig"; "Ice cream." -> "ice cream";
  "A tux—the Linux mascot." -> "tux"; "A “Fuji” apple." -> "Fuji apple"."""
  article, name = _head(caption)
  if not article and len(name) > 1 and name[0].isupper() and name[1].islower():
    name = name[0].lower() + name[1:]  # the capital began the sentence
  return name


def _noun_phrase(caption: str) -> str:
  article, _ = _head(caption)
  name = object_name(caption)
  return f"{article} {name}" if article else name


def _where(obj: SceneObject, size: int) -> str:
  x, y = obj.centre
  col = ("left", "centre", "right")[min(2, int(3 * x / size))]
  row = ("top", "middle", "bottom")[min(2, int(3 * y / size))]
  if (col, row) == ("centre", "middle"):
    return "in the centre"
  if col == "centre":
    return f"at the {row}"
  if row == "middle":
    return f"on the {col}"
  return f"at the {row} {col}"


# ----------------------------------------------------------------------------
# Cut-outs
# ----------------------------------------------------------------------------


def _alpha_cutout(image: Any) -> Image.Image | None:
  """The stamp as RGBA cropped to its alpha mask, or None when it has no
  mask worth the name (under 10% transparent or under 10% opaque)."""
  with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as im:
    if im.mode not in ("RGBA", "LA", "PA") and not (
        im.mode == "P" and "transparency" in im.info):
      return None
    rgba = im.convert("RGBA")
  alpha = np.asarray(rgba)[..., 3]
  opaque = float(np.mean(alpha >= 128))
  if opaque < 0.1 or opaque > 0.9:
    return None
  box = Image.fromarray(((alpha >= 128) * 255).astype(np.uint8)).getbbox()
  return rgba.crop(box) if box else None


def cutout_stamps(stamps: Sequence[CaptionedImage],
                  stats: chat.ChatStats | None = None,
                  max_name_words: int = 3,
                  exclude_categories: Sequence[str] = ("symbols",)
                  ) -> list[CaptionedImage]:
  """The stamps usable in scenes: a real alpha mask, a name of at most
  `max_name_words` words (answers stay short), and not in
  `exclude_categories` (Tux Paint's "symbols" are letters, signs and
  arrows, not objects). Counted: excluded_category, long_name,
  no_alpha_mask, unreadable_image."""
  out = []
  for stamp in stamps:
    if stamp.category in exclude_categories:
      reason = "excluded_category"
    elif len(object_name(stamp.caption).split()) > max_name_words:
      reason = "long_name"
    else:
      try:
        reason = None if _alpha_cutout(stamp.image) else "no_alpha_mask"
      except Exception:  # pylint: disable=broad-except  # a bad PNG
        reason = "unreadable_image"
    if reason is None:
      out.append(stamp)
    elif stats is not None:
      stats.add(readers.Drop(reason, stamp.id))
  return out


# ----------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> Image.Image:
  """A light vertical gradient between two random colours."""
  top, bottom = rng.integers(150, 256, 3), rng.integers(150, 256, 3)
  t = np.linspace(0.0, 1.0, size)[:, None, None]
  rows = (1 - t) * top + t * bottom
  arr = np.broadcast_to(rows, (size, size, 3)).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(arr))


def _overlap(a: tuple, b: tuple) -> float:
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
  return w * h / smaller


def make_scene(cutouts: Sequence[CaptionedImage], index: int,
               cfg: SceneConfig, tries: int = 50) -> Scene:
  """Scene `index` (see the module docstring). An object that finds no free
  place in `tries` draws is left out, so a scene may hold fewer objects
  than drawn (never fewer than one)."""
  names = [object_name(s.caption) for s in cutouts]
  if len(set(names)) < cfg.max_objects:
    raise ValueError(f"{len(set(names))} distinct stamp names for scenes of "
                     f"up to {cfg.max_objects} objects")
  rng = np.random.default_rng(derive_seed(cfg.seed, "scene", index))
  wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  canvas = _background(rng, cfg.size)
  objects: list[SceneObject] = []
  used: set[str] = set()
  for k in rng.permutation(len(cutouts)):
    if len(objects) == wanted:
      break
    stamp, name = cutouts[int(k)], names[int(k)]
    if name in used:
      continue
    cut = _alpha_cutout(stamp.image)
    if cut is None:
      continue
    longest = rng.uniform(*cfg.object_scale) * cfg.size
    scale = longest / max(cut.size)
    w, h = max(1, round(cut.width * scale)), max(1, round(cut.height * scale))
    cut = cut.resize((w, h), Image.Resampling.LANCZOS)
    mask = np.asarray(cut)[..., 3] >= 128
    if not mask.any():
      continue
    ys, xs = np.nonzero(mask)
    for _ in range(tries):
      x, y = (int(rng.integers(0, cfg.size - w + 1)),
              int(rng.integers(0, cfg.size - h + 1)))
      box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1,
             y + int(ys.max()) + 1)
      if all(_overlap(box, o.box) <= cfg.max_overlap for o in objects):
        canvas.paste(cut, (x, y), cut)
        objects.append(SceneObject(name, stamp.caption, box, stamp.id))
        used.add(name)
        break
  if not objects:
    raise ValueError(f"scene {index}: no stamp could be placed")
  buf = io.BytesIO()
  canvas.save(buf, format="PNG")
  return Scene(f"scene/{cfg.seed}/{index}", buf.getvalue(), cfg.size,
               tuple(objects))


def make_scenes(cutouts: Sequence[CaptionedImage], count: int,
                cfg: SceneConfig, start: int = 0) -> list[Scene]:
  cfg.validate()
  return [make_scene(cutouts, i, cfg) for i in range(start, start + count)]


# ----------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------


def scene_questions(scene: Scene, all_names: Sequence[str],
                    cfg: SceneConfig) -> list[SceneQuestion]:
  """Every question the module docstring lists that has one clear answer
  in `scene` (made with `cfg`); `all_names` (every cut-out's name) supplies
  the absent object of the "no" presence question. Which object and which
  order a question names are drawn with (cfg.seed, scene id)."""
  rng = np.random.default_rng(derive_seed(cfg.seed, "questions", scene.id))
  objs, size = scene.objects, scene.size
  out: list[SceneQuestion] = []

  def ask(kind: str, question: str, answer: str, chance: float,
          *about: str) -> None:
    out.append(SceneQuestion(f"{scene.id}/q{len(out)}", scene.image,
                             question, answer, kind, chance, about))

  ask("count", "How many objects are in the image?",
      NUMBER_WORDS[len(objs)],
      1.0 / (cfg.max_objects - cfg.min_objects + 1))
  present = {o.name for o in objs}
  target = objs[int(rng.integers(len(objs)))]
  ask("presence", f"Is there a {target.name} in the image?", "yes", 0.5,
      target.name)
  absent = sorted(set(all_names) - present)
  if absent:
    name = absent[int(rng.integers(len(absent)))]
    ask("presence", f"Is there a {name} in the image?", "no", 0.5, name)
  margin = 0.1 * size
  for o in objs:
    x, y = o.centre
    if abs(x - size / 2) >= margin:
      ask("half_lr", f"Is the {o.name} in the left or the right half of the "
          f"image?", "left" if x < size / 2 else "right", 0.5, o.name)
    if abs(y - size / 2) >= margin:
      ask("half_tb", f"Is the {o.name} in the top or the bottom half of the "
          f"image?", "top" if y < size / 2 else "bottom", 0.5, o.name)
  for i, first in enumerate(objs):
    for second in objs[i + 1:]:
      a, b = (first, second) if rng.random() < 0.5 else (second, first)
      if a.box[2] <= b.box[0] or b.box[2] <= a.box[0]:
        ask("relation_lr", f"Is the {a.name} to the left or to the right of "
            f"the {b.name}?", "left" if a.box[2] <= b.box[0] else "right",
            0.5, a.name, b.name)
      if a.box[3] <= b.box[1] or b.box[3] <= a.box[1]:
        ask("relation_tb", f"Is the {a.name} above or below the {b.name}?",
            "above" if a.box[3] <= b.box[1] else "below", 0.5, a.name,
          b.name)
  if len(objs) >= 2:
    xs = sorted((o.centre[0], o.name) for o in objs)
    if xs[1][0] - xs[0][0] >= margin:
      ask("leftmost", "Which object is furthest to the left?", xs[0][1],
          1.0 / len(objs))
  return out

