"""Multimodal stage presets: `--config=configs/mm.py:NAME`.

  align_tiny     stage 1 (launch.mm_align): a text checkpoint (with a
                 tokenizer that has `<image>`) + the tiny ViT + a fresh
                 mlp2x_gelu projector; the projector and the (random) tower
                 train, on real captioned images (Tux Paint stamps) in
                 LLaVA's "plain" stage-1 form (image, caption, newline),
                 32 px, 64-token rows.
  instruct_tiny  stage 2 (launch.mm_instruct): from stage 1's WORKDIR/model,
                 projector + LLM train on easy-vqa questions through the VQA
                 templates, LLaVA's conversation format (`llava_v1`),
                 256-token rows;
                 `--config.data.format=minigpt4` for MiniGPT-4's.

The run, mesh, optimizer and train sections are configs/stages.py's; the
`vision` and `projector` sections are configs/vision.py's presets. Stage 1
builds the tower and projector from them; stage 2 takes all three parts
from its init_checkpoint and reads only their run fields (attention
backend, remat, scan unrolling), refusing an override of any other.
"""

import dataclasses

import ml_collections

from configs.stages import finetune_config
from configs.vision import projector_config, vision_config

STAGES = ("align", "instruct")


@dataclasses.dataclass(frozen=True)
class _Preset:
  stage: str
  format: str
  caption_sources: tuple = ("tuxpaint",)
  caption_kind: str = "plain"
  vqa_sources: tuple = ("easy_vqa",)
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 64
  learning_rate: float = 1e-3
  trainable: tuple = ()


PRESETS = {
    # The tiny tower has random weights, so stage 1 trains it with the
    # projector (captioning as the tower's pretraining); LLaVA's stage 1
    # freezes a pretrained CLIP (trainable=() gives STAGE_TRAINABLE).
    "align_tiny": _Preset("align", "llava_plain",
                          trainable=(r"^projector\.", r"^vision\.")),
    "instruct_tiny": _Preset("instruct", "llava_v1", seq_len=256,
                             learning_rate=3e-4),
}


def get_config(name: str = "align_tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown multimodal preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  p = PRESETS[name]
  config = finetune_config(tiny=True, steps=p.steps,
                           batch_size=p.batch_size, seq_len=p.seq_len,
                           learning_rate=p.learning_rate)
  config.stage = p.stage
  # Path patterns of what trains (empty: the stage's, multimodal_task.
  # STAGE_TRAINABLE: stage 1 the projector, stage 2 projector and LLM).
  config.trainable = p.trainable
  config.optimizer.backend = "optax"
  config.vision = vision_config("tiny")
  config.projector = projector_config("mlp2x_gelu", dtype="float32")
  config.bidirectional_images = False
  config.data = ml_collections.ConfigDict(dict(
      # A chat format (chat.FORMATS; mm_stage adds "llava_plain" and
      # "minigpt4").
      format=p.format,
      caption_sources=p.caption_sources,  # stage 1 (image_sets)
      caption_kind=p.caption_kind,  # "plain" or "instruct"
      vqa_sources=p.vqa_sources,  # stage 2 (image_sets)
      # Stage 2: keep only these question types, train and test (empty:
      # all). easy-vqa's yes/no questions are 82% answerable from the
      # question alone; ("color", "shape") keeps the ones the image decides.
      question_types=(),
      max_examples=2000,  # training examples read (0: all)
      eval_examples=64,  # held-out examples
      max_images=1,  # image places per row
      # Text-only conversations mixed in (stage 2): "" (none), "random" (in
      # the same batches, LaVIN) or "sequential" (text first, MultiInstruct),
      # text_fraction of the training examples, from text_files (chat
      # JSON/JSONL; "": the fetched ShareGPT dump).
      text_mix="",
      text_fraction=0.2,
      text_files="",
      # Stage 2: visual instruction JSONL (launch.generate_visual_instructions;
      # comma-separated files or globs, images beside them) trained on with
      # the VQA examples ("": none).
      instruction_files="",
      # Composited scenes (caption and VQA source "scenes"): how many train
      # and test scenes, which Tux Paint categories their stamps come from
      # (empty: all 457 cut-outs; a few categories give a vocabulary small
      # enough to learn at tiny scale), and how they are drawn. The values
      # are image_sets.ImageSetsConfig's and scenes.SceneConfig's defaults,
      # written out because configs import no JAX (tests/test_config.py).
      train_scenes=1000,
      test_scenes=200,
      stamp_categories=(),
      scene=ml_collections.ConfigDict(dict(
          size=336, min_objects=1, max_objects=4,
          object_scale=(0.25, 0.42), max_overlap=0.05)),
      seed=0))
  config.lock()
  return config
