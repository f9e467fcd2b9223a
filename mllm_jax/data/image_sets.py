"""The offline image sources as ready splits for the two multimodal stages:
stage-1 caption examples (train / held out) and stage-2 VQA items (train /
test) with the answer baselines a trained model must beat.

    cfg = ImageSetsConfig(train_scenes=1000, test_scenes=200)
    train, held_out = caption_split(cfg, stats)      # ImageExamples
    vqa_train, vqa_test = vqa_items(cfg, stats)      # VQAItem | SceneQuestion
    examples = image_templates.vqa_examples(vqa_train, cfg.seed)
    answer_baselines(vqa_train, vqa_test)            # per question type

Splits never share what would let a model pass by memory:
  captions   a caption goes to held-out when a seeded hash of its text
             falls under `held_out_fraction` (Tux Paint has several stamps
             with one caption: they land on one side together); easy-vqa
             captions keep easy-vqa's own train / test images; composited
             scenes are split by index, train scenes [0, train_scenes) and
             test scenes after them, so a scene whose caption names where
             each object is never trains a model tested on its questions.
  VQA        easy-vqa's own train and test images; scene questions from the
             train and test scenes above.
Scenes are made once per (config, range) and cached, since both stages use
them. Everything is a pure function of the config.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Any, Sequence

from mllm_jax.configlib import check, check_choice
from mllm_jax.data import chat, image_sources, image_templates, scenes

CAPTION_SOURCES = ("tuxpaint", "gcompris", "skimage", "scenes", "easy_vqa")
VQA_SOURCES = ("easy_vqa", "scenes")


@dataclasses.dataclass(frozen=True)
class ImageSetsConfig:
  """Which sources and how much of each (module docstring); empty
  `stamp_categories`: every Tux Paint category scenes may use."""
  caption_sources: tuple = CAPTION_SOURCES
  caption_kind: str = "plain"
  held_out_fraction: float = 0.1
  vqa_sources: tuple = VQA_SOURCES
  scene: scenes.SceneConfig = scenes.SceneConfig()
  stamp_categories: tuple = ()
  train_scenes: int = 1000
  test_scenes: int = 200
  seed: int = 0

  def validate(self, prefix: str = "image_sets") -> None:
    for field, allowed in (("caption_sources", CAPTION_SOURCES),
                           ("vqa_sources", VQA_SOURCES)):
      for name in getattr(self, field):
        check_choice(name, allowed, f"{prefix}.{field}")
    check_choice(self.caption_kind, image_templates.CAPTION_KINDS,
                 f"{prefix}.caption_kind")
    check(0.0 < self.held_out_fraction < 1.0, f"{prefix}.held_out_fraction",
          f"must be in (0, 1), got {self.held_out_fraction!r}")
    check(self.train_scenes >= 1 and self.test_scenes >= 1,
          f"{prefix}.train_scenes/test_scenes",
          f"need at least one of each, got {self.train_scenes}, "
          f"{self.test_scenes}")
    self.scene.validate(f"{prefix}.scene")


def _held_out(key: str, fraction: float, seed: int) -> bool:
  digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@functools.lru_cache(maxsize=4)
def _cutouts(categories: tuple) -> tuple:
  stamps = image_sources.tuxpaint_stamps()
  if categories:
    known = sorted({s.category for s in stamps})
    for name in categories:
      check_choice(name, known, "stamp_categories")
    stamps = [s for s in stamps if s.category in categories]
  return tuple(scenes.cutout_stamps(stamps))


@functools.lru_cache(maxsize=4)
def _scenes(scene_cfg: scenes.SceneConfig, categories: tuple, start: int,
            count: int) -> tuple:
  return tuple(scenes.make_scenes(_cutouts(categories), count, scene_cfg,
                                  start))


def scene_split(cfg: ImageSetsConfig, split: str) -> tuple:
  """The composited scenes of "train" or "test" (module docstring)."""
  check_choice(split, ("train", "test"), "scene split")
  cfg.validate()
  start, count = ((0, cfg.train_scenes) if split == "train" else
                  (cfg.train_scenes, cfg.test_scenes))
  return _scenes(cfg.scene, cfg.stamp_categories, start, count)


def caption_split(cfg: ImageSetsConfig, stats: chat.ChatStats | None = None
                  ) -> tuple[list, list]:
  """(train, held_out) stage-1 ImageExamples of `cfg.caption_kind`, in
  source order. What a source drops is counted in `stats`."""
  cfg.validate()
  train, held_out = [], []
  readers_by_name = {"tuxpaint": image_sources.tuxpaint_stamps,
                     "gcompris": image_sources.gcompris_photos,
                     "skimage": image_sources.skimage_photos}
  for name in cfg.caption_sources:
    if name == "scenes":
      train += scene_split(cfg, "train")
      held_out += scene_split(cfg, "test")
      continue
    if name == "easy_vqa":  # its own train / test images
      train += image_sources.easy_vqa_captions("train", stats=stats)
      held_out += image_sources.easy_vqa_captions("test", stats=stats)
      continue
    for item in readers_by_name[name](stats=stats):
      side = held_out if _held_out(item.caption, cfg.held_out_fraction,
                                   cfg.seed) else train
      side.append(item)
  return tuple(image_templates.caption_examples(
      items, cfg.caption_kind, cfg.seed, stats) for items in (train, held_out))


def vqa_items(cfg: ImageSetsConfig, stats: chat.ChatStats | None = None
              ) -> tuple[list, list]:
  """(train, test) question items (image_sources.VQAItem and
  scenes.SceneQuestion, both with id, image, question, answer,
  question_type; scene types are prefixed "scene_")."""
  cfg.validate()
  out = {"train": [], "test": []}
  for split, items in out.items():
    for name in cfg.vqa_sources:
      if name == "easy_vqa":
        items += image_sources.easy_vqa(split, stats=stats)
        continue
      names = sorted({scenes.object_name(c.caption)
                      for c in _cutouts(cfg.stamp_categories)})
      for scene in scene_split(cfg, split):
        items += [dataclasses.replace(q, question_type="scene_" +
                                      q.question_type)
                  for q in scenes.scene_questions(scene, names, cfg.scene)]
  return out["train"], out["test"]


def answer_baselines(train: Sequence[Any], test: Sequence[Any]
                     ) -> dict[str, dict[str, float]]:
  """Per question type of `test` (and "all"): how many questions, the
  accuracy of always giving the type's most common training answer
  ("majority"), of the most common training answer to the same question
  text ("question_only": the best a model that never looks at the image can
  learn from these questions; the type's majority for a question never
  seen), and of a uniform guess where the items say ("chance", scene
  questions). Exact match: both sides come from one generator."""
  by_type = collections.defaultdict(collections.Counter)
  by_question = collections.defaultdict(collections.Counter)
  for item in train:
    by_type[item.question_type][item.answer] += 1
    by_question[item.question.lower()][item.answer] += 1
  majority = {kind: counts.most_common(1)[0][0]
              for kind, counts in by_type.items()}
  prior = {question: counts.most_common(1)[0][0]
           for question, counts in by_question.items()}
  out = {}
  groups = collections.defaultdict(list)
  for item in test:
    groups[item.question_type].append(item)
    groups["all"].append(item)
  for kind, items in sorted(groups.items()):
    guess = [majority.get(item.question_type) for item in items]
    text_guess = [prior.get(item.question.lower(), g)
                  for item, g in zip(items, guess)]
    row = {"count": float(len(items)),
           "majority": _share(items, guess),
           "question_only": _share(items, text_guess)}
    chances = [getattr(item, "chance", None) for item in items]
    if all(c is not None for c in chances):
      row["chance"] = sum(chances) / len(chances)
    out[kind] = row
  return out


def _share(items: Sequence[Any], answers: Sequence[str | None]) -> float:
  return sum(item.answer == a for item, a in zip(items, answers)) / len(items)
