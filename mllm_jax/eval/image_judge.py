"""Our multimodal model judged against a teacher's answers to held-out
visual instructions (LLaVA-Bench's protocol on our own data).

The questions are records of `launch.generate_visual_instructions
--held_out` (`data.visual_instructions`): a conversation about one image
file, the teacher's answers as the assistant turns, and in `meta` the
context the teacher read (captions and boxes) and the kind
(conversation, detail, reasoning), which is the question's category.
Every assistant turn is one question; a later question of a conversation
is asked after the earlier questions and the *reference* answers (teacher
forcing), so each question sees the context it was written in.

Our model is asked exactly as stage 2 evaluates (`eval.image_tasks`:
the conversation up to the answer in the checkpoint's chat format, the
image preprocessed for its tower, greedy, ending on the format's end of
turn); the judge (`eval.judge`) rates our reply and the reference from the
context, never seeing the image.

Bad records are counted by reason and skipped (`read_questions`): not a
conversation, no assistant turn ("no_reference"), no context in `meta`
("no_context", e.g. a file written before the generator recorded it), an
image file that is missing or unreadable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from mllm_jax.data import chat, images, readers
from mllm_jax.data.tokenizer import IMAGE
from mllm_jax.eval import image_tasks
from mllm_jax.eval.judge import JudgeItem
from mllm_jax.train.mm_stage import image_conversation


@dataclasses.dataclass(frozen=True)
class Question:
  """One question: `conversation` ends with its reference answer."""
  id: str
  category: str
  context: str
  image: str  # a file path
  conversation: chat.Conversation

  @property
  def question(self) -> str:
    return self.conversation.turns[-2].content.replace(IMAGE, "").strip()

  @property
  def reference(self) -> str:
    return self.conversation.turns[-1].content


def _questions_of(record, where: str, root: str) -> list[Question]:
  """The record's questions; raises ConversationError with the reason."""
  try:
    conv = chat.native_conversation(record, where)
  except chat.ConversationError as e:
    if e.reason == "no_assistant_turn":
      raise chat.ConversationError("no_reference") from e
    raise
  meta = record.get("meta")
  context = meta.get("context") if isinstance(meta, dict) else None
  if not isinstance(context, str) or not context.strip():
    raise chat.ConversationError("no_context")
  if len(conv.images) != 1:
    raise chat.ConversationError("not_one_image")
  image = os.path.join(root, conv.images[0])
  if not os.path.isfile(image):
    raise chat.ConversationError("missing_image")
  answers = [i for i, t in enumerate(conv.turns) if t.role == chat.ASSISTANT]
  return [Question(f"{conv.id}#{n}" if len(answers) > 1 else conv.id,
                   str(meta.get("kind") or "all"), context, image,
                   chat.Conversation(conv.id, conv.turns[:i + 1],
                                     conv.system, conv.images))
          for n, i in enumerate(answers)]


def read_questions(path: str, stats: chat.ChatStats) -> list[Question]:
  """The questions of a visual instruction JSONL (images relative to its
  folder), in file order; bad records counted in `stats` with their
  file:line and skipped. `stats.notes`: records, questions, and
  not_held_out (records the generator did not mark held out)."""
  root = os.path.dirname(os.path.abspath(path))
  out, seen = [], set()
  for item in chat.iter_json_records(path):
    if isinstance(item, readers.Drop):
      stats.add(item)
      continue
    record, where = item
    try:
      questions = _questions_of(record, where, root)
    except chat.ConversationError as e:
      stats.add(readers.Drop(e.reason, where))
      continue
    if questions[0].id in seen:
      stats.add(readers.Drop("duplicate_id", where))
      continue
    seen.add(questions[0].id)
    stats.note("records")
    stats.note("questions", len(questions))
    if not record["meta"].get("held_out"):
      stats.note("not_held_out")
    out += questions
  return out


def answer_questions(sampler, tokenizer, fmt: chat.ChatFormat,
                     questions: Sequence[Question], image_size: int,
                     max_new_tokens: int, batch_size: int,
                     stats: chat.ChatStats) -> list[JudgeItem]:
  """Our model's greedy replies (a `MultimodalSampler`), as judge items; a
  question whose image does not decode is counted and left out."""
  cfg = images.ImageConfig(size=image_size)
  asked, records = [], []
  for q in questions:
    example = images.ImageExample(
        q.id, image_conversation(q.conversation, fmt), (q.image,))
    record = images.prepare(example, cfg, stats)
    if record is not None:
      asked.append(q)
      records.append(record)
  if not records:
    return []
  replies = image_tasks.answer_images(sampler, tokenizer, fmt, records,
                                      max_new_tokens, batch_size)
  return [JudgeItem(q.id, q.context, q.question, q.reference, r.text,
                    q.category) for q, r in zip(asked, replies)]
