"""Conversations for supervised fine-tuning: records, readers, chat formats and
the encoder that turns a conversation into token ids with an exact loss mask.

Conversation JSONL schema (this project's own; one object per line):

    {"id": "conv-17",                         # any string, unique per file
     "system": "You are a careful assistant.", # optional; absent/null: the
                                               #   format's default, "": none
     "messages": [                            # user first, then alternating
       {"role": "user", "content": "<image>\\nWhat is in the picture?",
        "input": ""},                         # optional extra context
                                               #   (Alpaca's "input")
       {"role": "assistant", "content": "A cat on a mat."}],
     "images": ["coco/000001.jpg"]}           # optional; one per <image>

`<image>` placeholders stay in the text where the image goes; their count
over all turns must equal len(images) (a record with images must say where
each goes, and a text-only record must not contain the placeholder).

Readers (`read_conversations`) also take the FastChat/ShareGPT schema
(`{"id", "conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}`,
LLaVA's `"image"` included) and Alpaca's (`instruction`, `input`, `output`),
from JSON arrays, JSONL or concatenated objects, streamed with
`json.JSONDecoder.raw_decode` so a truncated file (the ShareGPT dumps often
are) gives every complete record before the cut. A record that cannot be a
conversation is dropped and counted with a reason (`ChatStats`), never
raised: roles that do not alternate, an empty turn, an unknown role name, no
assistant turn. Contents are stripped of surrounding whitespace; a final user
turn with no answer is trimmed (counted in `ChatStats.notes`).

Chat formats (`FORMATS`, `get_format`) turn a conversation into parts:
prompt text (loss weight 0), assistant content and each turn's end-of-turn
token(s) (weight 1). `encode` tokenises each part on its own and joins the
ids, so the mask comes from part lengths and cannot drift; it checks that the
joined ids equal the tokenisation of the whole text (or, for tokenizers that
add a dummy prefix space to every call, that each part boundary is a token
boundary of the whole text) and raises `ChatFormatError` naming the
conversation and the format when a boundary falls inside a token. It never
compares ids with the pad id (SmolLM2's pad == eos) and never returns a mask
without an assistant token.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mllm_jax.data import readers
from mllm_jax.data.config import OVERFLOWS as OVERFLOW
from mllm_jax.data.tokenizer import IMAGE, Tokenizer

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
EOS = "</s>"  # how the tokenizer's EOS is written in formats and renders

# FastChat/ShareGPT speaker names (lower-cased) -> our roles.
SHAREGPT_ROLES = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
    "bing": ASSISTANT, "bard": ASSISTANT, "model": ASSISTANT,
    "system": SYSTEM,
}


class ConversationError(ValueError):
  """A record that cannot be a conversation; `reason` is the drop reason."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class ChatFormatError(ValueError):
  """A format cannot encode a conversation exactly with this tokenizer."""


# ----------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str  # USER or ASSISTANT
  content: str
  input: str = ""  # extra context of a user turn (Alpaca's "input")

  @property
  def text(self) -> str:
    """Content and input as one text (formats without an input slot)."""
    return f"{self.content}\n\n{self.input}" if self.input else self.content

  @property
  def num_images(self) -> int:
    return self.content.count(IMAGE) + self.input.count(IMAGE)


@dataclasses.dataclass(frozen=True)
class Conversation:
  """An optional system prompt and user/assistant turns, user first,
  alternating. Constructing an invalid one raises ConversationError. It may
  end with a user turn (a prompt to answer); training needs it to end with
  an assistant turn (`encode` checks)."""
  id: str
  turns: tuple[Turn, ...]
  system: str | None = None  # None: the format's default; "": none
  images: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "turns", tuple(self.turns))
    object.__setattr__(self, "images", tuple(self.images))
    if not self.turns:
      raise ConversationError("no_turns")
    for i, turn in enumerate(self.turns):
      if turn.role not in (USER, ASSISTANT):
        raise ConversationError("unknown_role", f"turn {i}: {turn.role!r}")
      if not isinstance(turn.content, str) or not isinstance(turn.input, str):
        raise ConversationError("bad_turn", f"turn {i}: content is not text")
      if not turn.content.strip():
        raise ConversationError("empty_turn", f"turn {i}")
      if turn.input and turn.role != USER:
        raise ConversationError("bad_turn", f"turn {i}: only user turns "
                                f"have an input")
      expected = USER if i % 2 == 0 else ASSISTANT
      if turn.role != expected:
        reason = "starts_with_assistant" if i == 0 else "not_alternating"
        raise ConversationError(reason, f"turn {i} is {turn.role}")
    if self.system is not None and not isinstance(self.system, str):
      raise ConversationError("bad_turn", "system prompt is not text")
    placed = self.num_images
    if placed != len(self.images):
      raise ConversationError(
          "image_count_mismatch", f"{placed} {IMAGE} placeholder(s) for "
          f"{len(self.images)} image(s)")

  @property
  def num_images(self) -> int:
    return sum(t.num_images for t in self.turns) + (
        (self.system or "").count(IMAGE))

  def pairs(self) -> list[tuple[Turn, Turn | None]]:
    """(user, assistant) per round; the last assistant is None for a prompt."""
    turns = list(self.turns)
    return [(turns[i], turns[i + 1] if i + 1 < len(turns) else None)
            for i in range(0, len(turns), 2)]

  def messages(self) -> list[dict[str, str]]:
    """HF-style messages (what jinja chat templates read)."""
    out = [{"role": SYSTEM, "content": self.system}] if self.system else []
    return out + [{"role": t.role, "content": t.text} for t in self.turns]

  def to_json(self) -> dict[str, Any]:
    record: dict[str, Any] = {"id": self.id}
    if self.system is not None:
      record["system"] = self.system
    record["messages"] = [
        {"role": t.role, "content": t.content, **({"input": t.input}
                                                   if t.input else {})}
        for t in self.turns]
    if self.images:
      record["images"] = list(self.images)
    return record


def write_conversations(path: str, conversations: Iterable[Conversation]
                        ) -> int:
  """Writes the JSONL schema; returns the number written."""
  n = 0
  with open(path, "w", encoding="utf-8") as f:
    for conv in conversations:
      f.write(json.dumps(conv.to_json(), ensure_ascii=False) + "\n")
      n += 1
  return n


class ChatStats(readers.DropCounter):
  """Dropped records by reason (with the first locations of each), plus
  `notes`: counts of what was kept or changed (read, trimmed_final_user_turn,
  encoded, truncated)."""

  def __init__(self, examples_per_reason: int = 5):
    super().__init__(examples_per_reason)
    self.notes: collections.Counter[str] = collections.Counter()

  def note(self, what: str, n: int = 1) -> None:
    self.notes[what] += n

  def summary(self) -> dict:
    return {**super().summary(), "notes": dict(sorted(self.notes.items()))}


# ----------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------


def iter_json_records(path: str,
                      is_record: Callable[[Any], bool] | None = None,
                      chunk_chars: int = 1 << 20,
                      max_record_chars: int = 1 << 27
                      ) -> Iterator[tuple[Any, str] | readers.Drop]:
  """Top-level JSON values of a file, streamed: a JSON array of records,
  JSONL, or objects one after another, in any mix. Yields (value, "path:line")
  or a Drop.

  Undecodable text is skipped to the next '{' that starts a value
  `is_record` accepts (any value when None) and counted once: "invalid_json"
  when a good record follows, "truncated_json" when the bad text runs to the
  end of the file (a dump cut mid-record). A record longer than
  `max_record_chars` counts as undecodable; invalid UTF-8 becomes U+FFFD.
  """
  decoder = json.JSONDecoder()
  try:
    f = open(path, encoding="utf-8", errors="replace")
  except OSError as e:
    yield readers.Drop("unreadable_file", f"{path} ({e.strerror})")
    return
  buf, pos, line, eof = "", 0, 1, False
  bad_at: str | None = None  # where the current undecodable text began

  def more() -> bool:
    nonlocal buf, pos, eof
    chunk = f.read(chunk_chars)
    if not chunk:
      eof = True
      return False
    buf, pos = buf[pos:] + chunk, 0
    return True

  with f:
    first = True  # a "[" before the first value opens an array of records
    while True:
      while True:  # separators between top-level values
        while pos < len(buf) and (buf[pos] in " \t\r\n,]" or
                                  (first and buf[pos] == "[")):
          line += buf[pos] == "\n"
          first = first and buf[pos] != "["
          pos += 1
        if pos < len(buf) or not more():
          break
      if pos >= len(buf):
        break
      first = False
      where = f"{path}:{line}"
      try:
        value, end = decoder.raw_decode(buf, pos)
        ok = bad_at is None or is_record is None or is_record(value)
      except json.JSONDecodeError:
        if not eof and len(buf) - pos < max_record_chars:
          more()  # perhaps only cut by the chunk: retry with more text
          continue
        ok, end = False, None
      if ok:
        if bad_at is not None:
          yield readers.Drop("invalid_json", bad_at)
          bad_at = None
        line += buf.count("\n", pos, end)
        pos = end
        yield value, where
        continue
      if bad_at is None:
        bad_at = where
      nxt = buf.find("{", pos + 1)
      while nxt < 0 and not eof:
        line += buf.count("\n", pos, len(buf))
        pos = len(buf)
        more()
        nxt = buf.find("{", pos)
      if nxt < 0:
        break
      line += buf.count("\n", pos, nxt)
      pos = nxt
  if bad_at is not None:
    yield readers.Drop("truncated_json", bad_at)


def _clean(value: Any, i: int) -> str:
  if not isinstance(value, str):
    raise ConversationError("bad_turn", f"turn {i}: value is not text")
  return value.strip()


def _build(conv_id: str, system: str | None, turns: list[tuple[str, str, str]],
           images: Any, stats: ChatStats | None) -> Conversation:
  """(role, content, input) triples -> Conversation; raises
  ConversationError. A final unanswered user turn is trimmed."""
  if images is None:
    images = ()
  elif isinstance(images, str):
    images = (images,)
  elif not (isinstance(images, (list, tuple))
            and all(isinstance(x, str) for x in images)):
    raise ConversationError("bad_images", "images must be a list of strings")
  trimmed = bool(turns) and turns[-1][0] == USER
  if trimmed:
    turns = turns[:-1]
    if turns and turns[-1][0] == USER:  # two user turns in a row at the end
      raise ConversationError("not_alternating", "two final user turns")
  if not any(role == ASSISTANT for role, _, _ in turns):
    raise ConversationError("no_assistant_turn")
  conv = Conversation(str(conv_id), tuple(Turn(r, c, x) for r, c, x in turns),
                      system, tuple(images))
  if trimmed and stats is not None:
    stats.note("trimmed_final_user_turn")
  return conv


def sharegpt_conversation(record: Any, default_id: str,
                          stats: ChatStats | None = None) -> Conversation:
  """A FastChat/ShareGPT record -> Conversation (raises ConversationError).
  Turns may also be {"role", "content"}; a system turn may only come first."""
  if not isinstance(record, dict):
    raise ConversationError("not_an_object")
  turns_in = record.get("conversations")
  if not isinstance(turns_in, list):
    raise ConversationError("missing_conversations")
  system, turns = None, []
  for i, turn in enumerate(turns_in):
    if not isinstance(turn, dict):
      raise ConversationError("bad_turn", f"turn {i} is not an object")
    speaker = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    role = SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(
        speaker, str) else None
    if role is None:
      raise ConversationError("unknown_role", f"turn {i}: {speaker!r}")
    text = _clean(value, i)
    if role == SYSTEM:
      if i != 0:
        raise ConversationError("misplaced_system", f"turn {i}")
      system = text
      continue
    if not text:
      raise ConversationError("empty_turn", f"turn {i}")
    if role == ASSISTANT and not turns:
      # Dumps often open with the assistant's greeting: FastChat skips it.
      if stats is not None:
        stats.note("skipped_leading_assistant_turn")
      continue
    turns.append((role, text, ""))
  if record.get("system") is not None and system is None:
    system = _clean(record["system"], -1)
  images = record.get("images", record.get("image"))
  return _build(record.get("id", default_id), system, turns, images, stats)


def alpaca_conversation(record: Any, default_id: str,
                        stats: ChatStats | None = None) -> Conversation:
  """An Alpaca record (instruction, optional input, output) -> Conversation."""
  del stats
  if not isinstance(record, dict):
    raise ConversationError("not_an_object")
  for key in ("instruction", "output"):
    if key not in record or record[key] is None:
      raise ConversationError("missing_field", key)
  instruction, output = _clean(record["instruction"], 0), _clean(
      record["output"], 1)
  extra = record.get("input") or ""
  extra = _clean(extra, 0)
  if not instruction or not output:
    raise ConversationError("empty_turn")
  system = record.get("system")
  return _build(record.get("id", default_id),
                None if system is None else _clean(system, -1),
                [(USER, instruction, extra), (ASSISTANT, output, "")],
                record.get("images", record.get("image")), None)


def native_conversation(record: Any, default_id: str,
                        stats: ChatStats | None = None) -> Conversation:
  """A record of this project's JSONL schema (module docstring)."""
  if not isinstance(record, dict):
    raise ConversationError("not_an_object")
  messages = record.get("messages")
  if not isinstance(messages, list):
    raise ConversationError("missing_messages")
  system = record.get("system")
  system = None if system is None else _clean(system, -1)
  turns = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ConversationError("bad_turn", f"turn {i} is not an object")
    role = message.get("role")
    text = _clean(message.get("content"), i)
    if role == SYSTEM:
      if i != 0 or system is not None:
        raise ConversationError("misplaced_system", f"turn {i}")
      system = text
      continue
    if role not in (USER, ASSISTANT):
      raise ConversationError("unknown_role", f"turn {i}: {role!r}")
    if not text:
      raise ConversationError("empty_turn", f"turn {i}")
    turns.append((role, text, _clean(message.get("input") or "", i)))
  return _build(record.get("id", default_id), system, turns,
                record.get("images"), stats)


SCHEMAS = {"sharegpt": sharegpt_conversation, "alpaca": alpaca_conversation,
           "native": native_conversation}
_SCHEMA_KEYS = (("messages", "native"), ("conversations", "sharegpt"),
                ("instruction", "alpaca"))


def _detect(record: Any) -> str | None:
  if isinstance(record, dict):
    for key, schema in _SCHEMA_KEYS:
      if key in record:
        return schema
  return None


def read_conversations(paths: str | Sequence[str], schema: str = "auto",
                       stats: ChatStats | None = None
                       ) -> Iterator[Conversation]:
  """Conversations from files (globs, comma-separated or a list) in one of
  SCHEMAS, or "auto" (per record: `messages` -> native, `conversations` ->
  sharegpt, `instruction` -> alpaca; none of these: "unknown_schema"). Drops are counted in `stats` with the
  record's file:line; records without an id get "FILE:INDEX"."""
  if schema != "auto" and schema not in SCHEMAS:
    raise ValueError(f"schema={schema!r}; choose auto or one of "
                     f"{sorted(SCHEMAS)}")
  stats = stats if stats is not None else ChatStats()
  if schema == "auto":
    is_record = lambda r: _detect(r) is not None
  else:
    key = {s: k for k, s in _SCHEMA_KEYS}[schema]
    is_record = lambda r: isinstance(r, dict) and key in r
  for path in readers.expand(paths):
    name = os.path.basename(path)
    index = 0
    for item in iter_json_records(path, is_record):
      if isinstance(item, readers.Drop):
        stats.add(item)
        continue
      record, where = item
      kind = schema if schema != "auto" else _detect(record)
      try:
        if kind is None:
          raise ConversationError("unknown_schema" if isinstance(record, dict)
                                  else "not_an_object")
        conv = SCHEMAS[kind](record, f"{name}:{index}", stats)
      except ConversationError as e:
        stats.add(readers.Drop(e.reason, where))
      else:
        stats.note("read")
        yield conv
      index += 1


# ----------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
  """A piece of rendered text; `train` marks assistant content and
  end-of-turn tokens (loss weight 1). An `eos` part is the tokenizer's EOS id
  (its text is only how renders show it)."""
  text: str
  train: bool
  eos: bool = False


class ChatFormat:
  """Turns a conversation into Parts. `add_bos`: put the tokenizer's BOS id
  (when it has one) before the text. `required_tokens`: text that must be
  one token of the vocabulary (checked by `encode`). Subclasses are frozen
  dataclasses that set all three."""
  name: str
  add_bos: bool
  required_tokens: tuple[str, ...]

  def parts(self, conv: Conversation) -> list[Part]:
    """The whole conversation; when it ends with a user turn, the parts end
    with the prompt for the assistant's answer."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TurnFormat(ChatFormat):
  """A fixed-text format. Per round (r = 1, 2, ...):

      user.format(content, input, round) + assistant      weight 0
      answer.format(content)                               weight 1
      end_of_turn (the tokenizer's EOS when it is EOS)     weight 1
      after_turn                                           weight 0

  after system.format(system=...) (weight 0, left out when the system text
  is empty). Whitespace that belongs in front of a word is put in the part
  that holds the word (" {content}"), as byte-level BPE joins a space to
  the word after it. A user turn with an input uses user_input when set,
  else its content and input joined by a blank line.
  """
  name: str
  system: str
  user: str
  assistant: str
  answer: str
  end_of_turn: str
  after_turn: str = ""
  default_system: str = ""
  default_system_input: str = ""  # default when some user turn has an input
  user_input: str = ""
  required_tokens: tuple[str, ...] = ()
  add_bos: bool = True

  def parts(self, conv: Conversation) -> list[Part]:
    system = conv.system
    if system is None:
      has_input = any(t.input for t in conv.turns)
      system = (self.default_system_input if has_input and
                self.default_system_input else self.default_system)
    parts = [Part(self.system.format(system=system), False)] if system else []
    for r, (user, answer) in enumerate(conv.pairs(), 1):
      if user.input and self.user_input:
        text = self.user_input.format(content=user.content, input=user.input,
                                      round=r)
      else:
        text = self.user.format(content=user.text, round=r)
      parts.append(Part(text + self.assistant.format(round=r), False))
      if answer is None:
        break
      parts.append(Part(self.answer.format(content=answer.content), True))
      parts.append(Part(self.end_of_turn, True, eos=self.end_of_turn == EOS))
      if self.after_turn:
        parts.append(Part(self.after_turn, False))
    return parts


VICUNA_SYSTEM = ("A chat between a curious user and an artificial "
                 "intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
HUMAN_SYSTEM = ("A chat between a curious human and an artificial "
                "intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the human's questions.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a "
                 "response that appropriately completes the request.")
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired "
                       "with an input that provides further context. Write a "
                       "response that appropriately completes the request.")

# FastChat's vicuna_v1.1 / LLaVA's llava_v1 ("TWO" separator style):
# SYSTEM USER: q ASSISTANT: a</s>USER: q ASSISTANT: a</s>
_VICUNA = dict(system="{system} ", user="USER: {content} ",
               assistant="ASSISTANT:", answer=" {content}", end_of_turn=EOS)

FORMATS: dict[str, ChatFormat] = {}


def register_format(fmt: ChatFormat) -> ChatFormat:
  """Adds a format to the registry under fmt.name (replacing any)."""
  FORMATS[fmt.name] = fmt
  return fmt


register_format(TurnFormat("vicuna_v1", default_system=VICUNA_SYSTEM,
                           **_VICUNA))
register_format(TurnFormat("llava_v1", default_system=HUMAN_SYSTEM, **_VICUNA))
# "###" after every message ("SINGLE" style), on its own line so that it
# never joins the punctuation that ends an answer into one token; the "###"
# after an answer is its end of turn (the stop string).
register_format(TurnFormat(
    "human_assistant", system="{system}\n###", user="Human: {content}\n###",
    assistant="Assistant:", answer=" {content}", end_of_turn="\n###",
    default_system=HUMAN_SYSTEM))
register_format(TurnFormat(
    "chatml", system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n", answer="{content}",
    end_of_turn="<|im_end|>", after_turn="\n",
    required_tokens=("<|im_start|>", "<|im_end|>"), add_bos=False))
register_format(TurnFormat(
    "alpaca", system="{system}\n\n",
    user="### Instruction:\n{content}\n\n",
    user_input="### Instruction:\n{content}\n\n### Input:\n{input}\n\n",
    assistant="### Response:\n", answer="{content}", end_of_turn=EOS,
    after_turn="\n\n", default_system=ALPACA_SYSTEM,
    default_system_input=ALPACA_SYSTEM_INPUT))
register_format(TurnFormat(
    "chatglm", system="{system}\n\n", user="[Round {round}]\n\n问：{content}\n\n",
    assistant="答：", answer="{content}", end_of_turn=EOS, after_turn="\n\n"))
# This project's own special tokens (mllm_jax.data.tokenizer.SPECIAL_TOKENS).
register_format(TurnFormat(
    "mllm", system="<|system|>\n{system}<|eot|>\n",
    user="<|user|>\n{content}<|eot|>\n", assistant="<|assistant|>\n",
    answer="{content}", end_of_turn="<|eot|>", after_turn="\n",
    required_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|eot|>")))


# --- HF jinja2 chat templates -------------------------------------------------


class _TemplateRaised(Exception):
  pass


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
  """A jinja2 template compiled the way transformers' apply_chat_template
  does: sandboxed, trim_blocks + lstrip_blocks, loop controls,
  raise_exception(), strftime_now(), and a tojson that keeps non-ASCII and
  does not HTML-escape."""
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise _TemplateRaised(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = (
      lambda fmt: datetime.datetime.now().strftime(fmt))
  return env.from_string(template)


@dataclasses.dataclass(frozen=True)
class HFTemplateFormat(ChatFormat):
  """A jinja2 chat template from an HF tokenizer directory (or a GGUF import,
  which writes one). Rendered with jinja2 as transformers renders it (the
  special token strings as variables, `add_generation_prompt`); no BOS is
  added (the template writes it when it wants one).

  The assistant spans are found by rendering prefixes: the conversation up
  to each assistant turn with the generation prompt, then with the turn. The
  text between is what the model must write: up to the end of the content
  it is trained, then the end-of-turn text (trained) and trailing whitespace
  (not). Every render must extend the one before; a template whose earlier
  text depends on later messages is refused.
  """
  template: str
  variables: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ...
  name: str = "hf_template"
  source: str = ""
  add_bos: bool = False
  required_tokens: tuple[str, ...] = ()

  def render(self, messages: list[dict[str, str]],
             add_generation_prompt: bool) -> str:
    return compile_template(self.template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        tools=None, documents=None, **dict(self.variables))

  def parts(self, conv: Conversation) -> list[Part]:
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return self._parts(conv)
    except (_TemplateRaised, jinja2.TemplateError) as e:
      raise ChatFormatError(
          f"conversation {conv.id!r}: the chat template of format "
          f"{self.name!r} ({self.source or 'inline'}) refused it: {e}") from e

  def _parts(self, conv: Conversation) -> list[Part]:
    messages = conv.messages()
    offset = len(messages) - len(conv.turns)  # a system message first
    parts: list[Part] = []
    done = ""
    for i, turn in enumerate(conv.turns):
      if turn.role != ASSISTANT:
        continue
      k = offset + i
      prompt = self.render(messages[:k], True)
      full = self.render(messages[:k + 1], False)
      self._extends(conv, done, prompt, k)
      self._extends(conv, prompt, full, k + 1)
      parts.append(Part(prompt[len(done):], False))
      span = full[len(prompt):]
      at = span.find(turn.content)
      if at < 0:
        raise ChatFormatError(
            f"conversation {conv.id!r}: format {self.name!r} does not render "
            f"assistant turn {i} verbatim (the template changes its text), so "
            f"its tokens cannot be found")
      content_end = at + len(turn.content)
      end = span[content_end:].rstrip()
      if not end.strip():
        raise ChatFormatError(
            f"conversation {conv.id!r}: format {self.name!r} writes nothing "
            f"after assistant turn {i}: there is no end-of-turn token to "
            f"train, so the model would never learn to stop")
      parts.append(Part(span[:content_end], True))
      parts.append(Part(end, True))
      parts.append(Part(span[content_end + len(end):], False))
      done = full
    if conv.turns[-1].role == USER:
      final = self.render(messages, True)
    else:
      final = self.render(messages, False)
    self._extends(conv, done, final, len(messages))
    parts.append(Part(final[len(done):], False))
    return [p for p in parts if p.text]

  def _extends(self, conv: Conversation, before: str, after: str,
               n: int) -> None:
    if not after.startswith(before):
      raise ChatFormatError(
          f"conversation {conv.id!r}: format {self.name!r} renders the first "
          f"{n} messages with a different beginning than fewer of them, so "
          f"the assistant spans cannot be located (the template's earlier "
          f"text depends on later messages)")


def read_chat_template(path: str) -> tuple[str, dict[str, str]]:
  """(template, special token strings) from an HF tokenizer directory or a
  file inside one: chat_template.jinja, else tokenizer_config.json's
  chat_template (a string, or a list of named templates: "default")."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, "tokenizer_config.json")
  config: dict[str, Any] = {}
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  template = None
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()
  else:
    template = config.get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template
               if isinstance(t, dict)}
      template = named.get("default")
  if not isinstance(template, str) or not template:
    raise FileNotFoundError(
        f"{directory}: no chat template (neither chat_template.jinja nor a "
        f"chat_template in tokenizer_config.json)")
  variables = {}
  for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      variables[key] = value
  return template, variables


def hf_template_format(path: str, name: str = "hf_template"
                       ) -> HFTemplateFormat:
  template, variables = read_chat_template(path)
  return HFTemplateFormat(template, tuple(sorted(variables.items())), name,
                          path)


def get_format(fmt: str | ChatFormat,
               tokenizer: Tokenizer | None = None) -> ChatFormat:
  """A registered format by name; "hf_template" reads the template next to
  `tokenizer`'s file (an HF tokenizer directory or a GGUF import)."""
  if isinstance(fmt, ChatFormat):
    return fmt
  if fmt == "hf_template":
    if tokenizer is None:
      raise ValueError("format 'hf_template' needs the tokenizer whose "
                       "directory holds the chat template")
    return hf_template_format(tokenizer.path)
  if fmt not in FORMATS:
    raise ValueError(f"unknown chat format {fmt!r}; known: "
                     f"{sorted(FORMATS) + ['hf_template']}")
  return FORMATS[fmt]


def render(conv: Conversation, fmt: str | ChatFormat,
           tokenizer: Tokenizer | None = None) -> str:
  """The conversation as text (EOS shown as the tokenizer's EOS piece, or
  "</s>" without a tokenizer). No BOS."""
  fmt = get_format(fmt, tokenizer)
  eos = EOS if tokenizer is None else tokenizer.id_to_piece(tokenizer.eos_id)
  return "".join(eos if p.eos else p.text for p in fmt.parts(conv))


# ----------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------


def _merge(parts: Sequence[Part]) -> list[Part]:
  """Joins neighbouring text parts of the same weight (fewer boundaries to
  check; the mask is the same)."""
  out: list[Part] = []
  for p in parts:
    if not p.text and not p.eos:
      continue
    if out and not p.eos and not out[-1].eos and out[-1].train == p.train:
      out[-1] = Part(out[-1].text + p.text, p.train)
    else:
      out.append(p)
  return out


def _tokenize_run(texts: list[str], tokenizer: Tokenizer, conv_id: str,
                  fmt_name: str) -> list[list[int]]:
  """Ids of each text, tokenised on its own; they must join into the ids of
  the whole text. Else (a tokenizer that adds a dummy prefix space to each
  call) each part boundary must be a token boundary of the whole text, and
  the parts take the whole text's ids between them."""
  pieces = tokenizer.encode_batch(texts)
  whole_text = "".join(texts)
  whole = tokenizer.encode(whole_text)
  if [i for p in pieces for i in p] == whole:
    return pieces
  bounds = np.cumsum([len(t) for t in texts])
  prefixes = tokenizer.encode_batch([whole_text[:b] for b in bounds[:-1]])
  out, before = [], []
  for k, ids in enumerate(prefixes + [whole]):
    if ids[:len(before)] != before:
      left, right = texts[k - 1], texts[k]
      raise ChatFormatError(
          f"conversation {conv_id!r}: format {fmt_name!r} shifts tokens with "
          f"tokenizer {tokenizer.path}: the boundary between "
          f"...{left[-24:]!r} and {right[:24]!r}... falls inside a token of "
          f"the whole text (alone they tokenise to "
          f"{tokenizer.encode(left)[-3:]} + {tokenizer.encode(right)[:3]}), so "
          f"a loss mask from part lengths would be shifted; change the "
          f"format's separators or the text")
    out.append(ids[len(before):])
    before = ids
  return out


def _check_tokens(fmt: ChatFormat, tokenizer: Tokenizer) -> None:
  for text in fmt.required_tokens:
    try:
      token_id = tokenizer.special_token_id(text)
    except KeyError:
      token_id = None
    if token_id is None or token_id not in tokenizer.encode(text):
      raise ChatFormatError(
          f"format {fmt.name!r} needs {text!r} to be a single token, but "
          f"tokenizer {tokenizer.path} has no such token: add it to the "
          f"vocabulary (mllm_jax.data.vocab / the tokenizer's added tokens) "
          f"or choose another format")


def tokenize_parts(parts: Sequence[Part], tokenizer: Tokenizer,
                   fmt: ChatFormat, conv_id: str = "?"
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Parts -> (ids int32, weights float32): each part tokenised on its own,
  weights 1 on the tokens of `train` parts; checked as in _tokenize_run."""
  _check_tokens(fmt, tokenizer)
  ids: list[int] = []
  weights: list[float] = []
  if fmt.add_bos and tokenizer.bos_id >= 0:
    ids.append(tokenizer.bos_id)
    weights.append(0.0)
  run: list[Part] = []

  def flush():
    if run:
      pieces = _tokenize_run([p.text for p in run], tokenizer, conv_id,
                             fmt.name)
      for p, piece in zip(run, pieces):
        ids.extend(piece)
        weights.extend([float(p.train)] * len(piece))
      run.clear()

  for p in _merge(parts):
    if p.eos:
      flush()
      if tokenizer.eos_id < 0:
        raise ChatFormatError(f"format {fmt.name!r} ends turns with EOS but "
                              f"tokenizer {tokenizer.path} has none")
      ids.append(tokenizer.eos_id)
      weights.append(float(p.train))
    else:
      run.append(p)
  flush()
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def _check_images(conv: Conversation, ids: np.ndarray,
                  tokenizer: Tokenizer) -> None:
  if not conv.num_images:
    return
  try:
    image_id = tokenizer.special_token_id(IMAGE)
  except KeyError as e:
    raise ChatFormatError(
        f"conversation {conv.id!r} has {conv.num_images} {IMAGE} "
        f"placeholder(s) but tokenizer {tokenizer.path} has no {IMAGE} "
        f"token") from e
  found = int(np.sum(ids == image_id))
  if found != conv.num_images:
    raise ChatFormatError(
        f"conversation {conv.id!r}: {conv.num_images} {IMAGE} placeholder(s) "
        f"became {found} {IMAGE} token(s)")


def encode(conversation: Conversation, tokenizer: Tokenizer,
           fmt: str | ChatFormat, max_len: int | None = None,
           overflow: str = "truncate", stats: ChatStats | None = None
           ) -> dict[str, np.ndarray] | None:
  """A conversation ending with an assistant turn -> {"ids": int32[n],
  "weights": float32[n]}, weights[i] the loss weight for predicting ids[i]:
  1 exactly on assistant content and end-of-turn tokens, 0 elsewhere (the
  example schema of mllm_jax.data.packing; max_len = seq_len + 1 there).

  Longer than max_len: "rounds" keeps the leading whole rounds (user turn,
  answer and its end-of-turn) that fit, so every kept answer is trained to
  end its turn (None, counted, when not even the first round fits);
  "truncate" keeps the first max_len tokens (None, and counted, when no
  assistant token is left); "drop" returns None. Raises
  ChatFormatError naming the conversation and the format when the format
  cannot be tokenised exactly (see _tokenize_run) or trains nothing.
  """
  if overflow not in OVERFLOW:
    raise ValueError(f"overflow={overflow!r}; choose one of {OVERFLOW}")
  fmt = get_format(fmt, tokenizer)
  if conversation.turns[-1].role != ASSISTANT:
    raise ValueError(f"conversation {conversation.id!r} ends with a user "
                     f"turn; training needs an answer (use encode_prompt)")
  if max_len is not None and overflow == "rounds":
    return _leading_rounds(conversation, tokenizer, fmt, max_len, stats)
  ids, weights = _tokenize_conversation(conversation, tokenizer, fmt)
  if max_len is not None and len(ids) > max_len:
    where = f"{conversation.id} ({len(ids)} tokens > {max_len})"
    if overflow == "drop":
      if stats is not None:
        stats.add(readers.Drop("too_long", where))
      return None
    ids, weights = ids[:max_len], weights[:max_len]
    if not weights[1:].any():
      if stats is not None:
        stats.add(readers.Drop("no_assistant_token_after_truncation", where))
      return None
    if stats is not None:
      stats.note("truncated")
  if stats is not None:
    stats.note("encoded")
  return {"ids": ids, "weights": weights}


def _tokenize_conversation(conversation: Conversation, tokenizer: Tokenizer,
                           fmt: ChatFormat) -> tuple[np.ndarray, np.ndarray]:
  """tokenize_parts of the whole conversation, checked: its image
  placeholders survive as tokens and it trains at least one token."""
  ids, weights = tokenize_parts(fmt.parts(conversation), tokenizer, fmt,
                                conversation.id)
  _check_images(conversation, ids, tokenizer)
  if not weights[1:].any():
    raise ChatFormatError(f"conversation {conversation.id!r}: format "
                          f"{fmt.name!r} gives no assistant token to train")
  return ids, weights


def _leading_rounds(conversation: Conversation, tokenizer: Tokenizer,
                    fmt: ChatFormat, max_len: int, stats: ChatStats | None
                    ) -> dict[str, np.ndarray] | None:
  """The longest prefix of whole rounds of `conversation` within max_len.

  Tried shortest first: a longer prefix of rounds never has fewer tokens,
  so the first prefix that does not fit ends the search. A long
  conversation (most of a ShareGPT dump against a short row) then costs
  the encoding of its first rounds, never of the whole of it."""
  rounds = [i + 1 for i, t in enumerate(conversation.turns)
            if t.role == ASSISTANT]
  best, kept = None, 0
  for end in rounds:
    prefix = dataclasses.replace(conversation, turns=conversation.turns[:end])
    ids, weights = _tokenize_conversation(prefix, tokenizer, fmt)
    if len(ids) > max_len:
      if best is None and stats is not None:
        stats.add(readers.Drop(
            "first_round_too_long",
            f"{conversation.id} ({len(ids)} tokens > {max_len})"))
      break
    best, kept = {"ids": ids, "weights": weights}, end
  if best is None:
    return None
  if stats is not None:
    if kept < len(conversation.turns):
      stats.note("cut_to_leading_rounds")
    stats.note("encoded")
  return best


def encode_prompt(conversation: Conversation, tokenizer: Tokenizer,
                  fmt: str | ChatFormat) -> np.ndarray:
  """Ids of a conversation ending with a user turn, followed by the format's
  prompt for the answer: what a sampler feeds to generate the next
  assistant turn, tokenised exactly as `encode` tokenises it in training."""
  fmt = get_format(fmt, tokenizer)
  if conversation.turns[-1].role != USER:
    raise ValueError(f"conversation {conversation.id!r} ends with an "
                     f"assistant turn; a prompt ends with a user turn")
  ids, _ = tokenize_parts(fmt.parts(conversation), tokenizer, fmt,
                          conversation.id)
  return ids


def encode_all(conversations: Iterable[Conversation], tokenizer: Tokenizer,
               fmt: str | ChatFormat, max_len: int | None = None,
               overflow: str = "truncate", stats: ChatStats | None = None
               ) -> list[dict[str, np.ndarray]]:
  """`encode` over many conversations, keeping the examples that survive."""
  fmt = get_format(fmt, tokenizer)
  out = []
  for conv in conversations:
    example = encode(conv, tokenizer, fmt, max_len, overflow, stats)
    if example is not None:
      out.append(example)
  return out


def weighted_spans(ids: Sequence[int], weights: Sequence[float]
                   ) -> list[tuple[bool, list[int]]]:
  """Runs of consecutive tokens with the same (weight > 0): for inspecting
  what a mask covers, e.g. decoding each trained span."""
  spans: list[tuple[bool, list[int]]] = []
  for token, w in zip(ids, weights):
    trained = bool(w > 0)
    if spans and spans[-1][0] == trained:
      spans[-1][1].append(int(token))
    else:
      spans.append((trained, [int(token)]))
  return spans


__all__ = [
    "ASSISTANT", "ChatFormat", "ChatFormatError", "ChatStats",
    "Conversation", "ConversationError", "EOS", "FORMATS", "HFTemplateFormat",
    "Part", "SCHEMAS", "SYSTEM", "Turn", "TurnFormat", "USER",
    "alpaca_conversation", "compile_template", "encode", "encode_all",
    "encode_prompt", "get_format", "hf_template_format", "iter_json_records",
    "native_conversation", "read_chat_template", "read_conversations",
    "register_format", "render", "sharegpt_conversation", "tokenize_parts",
    "weighted_spans", "write_conversations",
]
