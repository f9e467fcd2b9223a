"""Image data as conversations: VQA adaptation templates, caption examples
for stage 1, and mixing text-only conversations into multimodal data.

VQA sets become instruction data through templates (InstructBLIP's and
LLaVA-1.5's recipe): each question is put into one template, drawn with a
seeded generator, so the model learns several phrasings that all ask for a
short answer. `VQA_TEMPLATES` holds eleven; `{question}` is the question
text, `<image>` is where the image goes (mllm_jax.data.chat's placeholder).

Stage-1 caption data (image-caption alignment, the projector alone trains)
comes in two kinds: "plain", where the user turn is only the image and the
answer is the caption (LLaVA's plain pretraining format), and "instruct",
where the user turn adds a "describe the image briefly" instruction drawn
from `BRIEF_CAPTION_INSTRUCTIONS` (twelve).

Text-only conversations join multimodal training by `TextMixConfig`:
"random" interleaves them with the image examples in one seeded shuffle, so
a batch holds both (LaVIN's mixture); "sequential" puts all text-only
examples first, then the multimodal ones (MultiInstruct's order).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

import grain

from mllm_jax.configlib import check, check_choice
from mllm_jax.data import chat, readers
from mllm_jax.data.images import ImageExample
from mllm_jax.data.pipeline import derive_seed

IMAGE = chat.IMAGE

VQA_TEMPLATES = (
    "<image>\n{question}",
    "<image>\nQuestion: {question} Short answer:",
    "<image>\nQ: {question} A:",
    "<image>\nGiven the image, answer the following question with no more "
    "than three words. {question}",
    "<image>\n{question}\nAnswer the question using a single word or phrase.",
    "<image>\nQuestion: {question} Answer:",
    "<image>\nLook at the image and answer briefly: {question}",
    "<image>\nBased on the image, give a short answer to this question: "
    "{question}",
    "<image>\n{question} Reply with one or two words.",
    "<image>\nUsing only what the picture shows, answer: {question}",
    "<image>\nA question about the image: {question} A short answer is:",
)

BRIEF_CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of this image.",
    "What does the picture show? Answer in one sentence.",
    "Write a brief caption for the image.",
    "Summarise the content of the image in a few words.",
    "Provide a one-sentence description of the picture.",
    "Say briefly what is in this image.",
    "Caption this image concisely.",
    "In one short sentence, what can be seen here?",
    "Describe the photo in a few words.",
    "Give a concise summary of the image.",
    "What is shown in the image? Keep it short.",
)

CAPTION_KINDS = ("plain", "instruct")
MIX_STRATEGIES = ("random", "sequential")


def _rng(seed: int, *parts: Any) -> random.Random:
  return random.Random(derive_seed(seed, *parts))


def vqa_example(example_id: str, image: Any, question: str, answer: str,
                template: str) -> ImageExample:
  """One question in `template` -> a one-image, one-round ImageExample."""
  if template.count(IMAGE) != 1 or "{question}" not in template:
    raise ValueError(f"VQA template {template!r} needs one {IMAGE} and a "
                     f"{{question}} field")
  turns = (chat.Turn(chat.USER, template.format(question=question.strip())),
           chat.Turn(chat.ASSISTANT, answer.strip()))
  conv = chat.Conversation(example_id, turns, None, ("image",))
  return ImageExample(example_id, conv, (image,))


def vqa_examples(items: Sequence[Any], seed: int = 0,
                 templates: Sequence[str] = VQA_TEMPLATES,
                 stats: chat.ChatStats | None = None) -> list[ImageExample]:
  """Items with .id, .image, .question, .answer (image_sources.VQAItem,
  scenes.SceneQuestion) -> examples, each in a template drawn by a
  generator seeded with (seed, item id): the same template for an item
  whatever else is in the list. Items with an empty question or answer are
  counted ("empty_turn") and left out."""
  if not templates:
    raise ValueError("no VQA templates given")
  out = []
  for item in items:
    template = _rng(seed, "vqa", item.id).choice(list(templates))
    try:
      out.append(vqa_example(item.id, item.image, item.question, item.answer,
                             template))
    except chat.ConversationError as e:
      if stats is not None:
        stats.add(readers.Drop(e.reason, item.id))
  return out


def caption_conversation(conv_id: str, caption: str, kind: str = "plain",
                         seed: int = 0, image: str = "image"
                         ) -> chat.Conversation:
  """A stage-1 conversation: "plain" (the image, then the caption) or
  "instruct" (the image and a brief-description instruction drawn with
  (seed, id)); `image` names the one image."""
  check_choice(kind, CAPTION_KINDS, "caption kind")
  user = IMAGE
  if kind == "instruct":
    instruction = _rng(seed, "caption", conv_id).choice(
        BRIEF_CAPTION_INSTRUCTIONS)
    user = f"{IMAGE}\n{instruction}"
  turns = (chat.Turn(chat.USER, user), chat.Turn(chat.ASSISTANT,
                                                 caption.strip()))
  return chat.Conversation(conv_id, turns, None, (image,))


def caption_example(example_id: str, image: Any, caption: str,
                    kind: str = "plain", seed: int = 0) -> ImageExample:
  """caption_conversation with the image's data."""
  return ImageExample(example_id, caption_conversation(
      example_id, caption, kind, seed), (image,))


def text_only_example(conversation: chat.Conversation) -> ImageExample:
  """A conversation without images, as the record the pipeline takes (its
  prepared `images` are float32[0, S, S, 3])."""
  return ImageExample(conversation.id, conversation, ())


def caption_examples(items: Sequence[Any], kind: str = "plain",
                     seed: int = 0, stats: chat.ChatStats | None = None
                     ) -> list[ImageExample]:
  """Items with .id, .image, .caption (image_sources.CaptionedImage,
  scenes.Scene) -> stage-1 examples; empty captions counted and left out."""
  out = []
  for item in items:
    try:
      out.append(caption_example(item.id, item.image, item.caption, kind,
                                 seed))
    except chat.ConversationError as e:
      if stats is not None:
        stats.add(readers.Drop(e.reason, item.id))
  return out


# ----------------------------------------------------------------------------
# Text-only mixing
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextMixConfig:
  """How text-only conversations join multimodal examples (module
  docstring). text_fraction: the share of text-only examples in the
  "random" mixture (the mixture ends when either side runs out)."""
  strategy: str = "random"
  text_fraction: float = 0.2
  seed: int = 0

  def validate(self, prefix: str = "text_mix") -> None:
    check_choice(self.strategy, MIX_STRATEGIES, f"{prefix}.strategy")
    check(0.0 < self.text_fraction < 1.0, f"{prefix}.text_fraction",
          f"must be in (0, 1), got {self.text_fraction!r}")


def mix_text_only(image_data: Sequence[Any], text_data: Sequence[Any],
                  cfg: TextMixConfig) -> grain.MapDataset:
  """Multimodal and text-only elements (examples, prepared records, ...)
  as one Grain MapDataset, ordered by `cfg.strategy`."""
  cfg.validate()
  if not len(image_data) or not len(text_data):
    raise ValueError(f"mixing needs both kinds of data: {len(image_data)} "
                     f"multimodal and {len(text_data)} text-only elements")
  images = _as_dataset(image_data)
  texts = _as_dataset(text_data)
  if cfg.strategy == "sequential":
    return grain.MapDataset.concatenate([texts, images])
  images = images.shuffle(seed=derive_seed(cfg.seed, "mix", "images"))
  texts = texts.shuffle(seed=derive_seed(cfg.seed, "mix", "texts"))
  mixed = grain.MapDataset.mix(
      [images, texts], [1.0 - cfg.text_fraction, cfg.text_fraction])
  return mixed.shuffle(seed=derive_seed(cfg.seed, "mix"))


def _as_dataset(data: Sequence[Any]) -> grain.MapDataset:
  if isinstance(data, grain.MapDataset):
    return data
  return grain.MapDataset.source(list(data))
