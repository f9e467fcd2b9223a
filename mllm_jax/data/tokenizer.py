"""One tokenizer interface over SentencePiece `.model` and HF `tokenizer.json`.

Training makes a LLaMA-style SentencePiece BPE model: byte fallback (no text is
ever unknown), digits split one per token, identity normalisation and no dummy
prefix (decode gives back exactly the input), plus the project's special tokens as user-defined
pieces, which always encode to one id wherever they appear in the text.

Id layout of models trained here: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, then
SPECIAL_TOKENS, then the 256 byte pieces, then the learned merges.
"""

from __future__ import annotations

import abc
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece as spm

from mllm_jax.data import readers

# The one list of special tokens: chat roles, end of turn, image placeholder,
# tool-call markers. Chat templates, the multimodal stages and the tool-use
# stages look tokens up by these names with `special_token_id`.
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
END_OF_TURN = "<|eot|>"
IMAGE = "<image>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESULT, TOOL_RESULT_END = "<tool_result>", "</tool_result>"
SPECIAL_TOKENS = (SYSTEM, USER, ASSISTANT, END_OF_TURN, IMAGE, TOOL_CALL,
                  TOOL_CALL_END, TOOL_RESULT, TOOL_RESULT_END)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Tokens that end an assistant turn in common chat formats (ours, ChatML,
# LLaMA 3, Phi-3, Gemma); Tokenizer.end_of_turn_ids keeps those in the vocab.
END_OF_TURN_TOKENS = (END_OF_TURN, "<|im_end|>", "<|eot_id|>", "<|end|>",
                      "<end_of_turn>")


class Tokenizer(abc.ABC):
  """What every stage needs from a tokenizer; ids are plain Python ints."""

  path: str

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    """Text -> ids; BOS/EOS only when asked (and when the vocab has them)."""

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos, add_eos) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text, special tokens included as their text. An id outside
    the vocabulary (a model whose vocabulary is larger than this tokenizer's
    emitted it) becomes U+FFFD instead of raising, so a sampled id never
    crashes a caller."""
    ids = [int(i) for i in ids]
    size = self.vocab_size
    if all(0 <= i < size for i in ids):
      return self._decode(ids)
    parts, run = [], []
    for i in ids:
      if 0 <= i < size:
        run.append(i)
        continue
      if run:
        parts.append(self._decode(run))
        run = []
      parts.append("\ufffd")
    if run:
      parts.append(self._decode(run))
    return "".join(parts)

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """decode() for ids known to be inside the vocabulary."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (a model's vocab_size must be at least this)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """-1 when the vocabulary has no BOS token."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """-1 when the vocabulary has no EOS token."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """-1 when the vocabulary has no padding token."""

  @abc.abstractmethod
  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary entry for an id (e.g. '▁the', '<0x0A>')."""

  @abc.abstractmethod
  def _lookup(self, piece: str) -> int | None:
    """The id of a whole vocabulary entry, None when absent."""

  @property
  def chat_template(self) -> str | None:
    """The model's Jinja chat template (HF's `chat_template`), if it has one."""
    return None

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Renders [{"role": ..., "content": ...}, ...] with the chat template,
    as transformers' `apply_chat_template(tokenize=False)` does. Encode the
    result without BOS: templates write their own special tokens."""
    if not self.chat_template:
      raise ValueError(f"{self.path} has no chat template")
    return render_chat_template(
        self.chat_template, messages, add_generation_prompt,
        **{name: self._piece_or_empty(token_id) for name, token_id in
           (("bos_token", self.bos_id), ("eos_token", self.eos_id),
            ("pad_token", self.pad_id))})

  def _piece_or_empty(self, token_id: int) -> str:
    return self.id_to_piece(token_id) if token_id >= 0 else ""

  def end_of_turn_ids(self) -> list[int]:
    """EOS and the end-of-turn tokens of the common chat formats that this
    vocabulary has (ChatML's <|im_end|>, LLaMA-3's <|eot_id|>, ...): where a
    reply ends."""
    ids = [self.eos_id] if self.eos_id >= 0 else []
    for name in END_OF_TURN_TOKENS:
      token_id = self._lookup(name)
      if token_id is not None and token_id not in ids:
        ids.append(token_id)
    return ids

  def special_token_id(self, name: str) -> int:
    """The single id of a special token such as '<|eot|>'; a clear KeyError
    when this vocabulary lacks it (e.g. a base model never extended)."""
    token_id = self._lookup(name)
    if token_id is None:
      raise KeyError(f"special token {name!r} is not in the vocabulary of "
                     f"{self.path}")
    return token_id


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file."""

  def __init__(self, path: str):
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a SentencePiece model ({e})") from e

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    return self._sp.Encode(text, add_bos=add_bos and self.bos_id >= 0,
                           add_eos=add_eos and self.eos_id >= 0)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return self._sp.Encode(list(texts), add_bos=add_bos and self.bos_id >= 0,
                           add_eos=add_eos and self.eos_id >= 0)

  def _decode(self, ids: list[int]) -> str:
    return self._sp.Decode(ids)

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))

  def _lookup(self, piece: str) -> int | None:
    token_id = self._sp.PieceToId(piece)
    if token_id == self._sp.unk_id() and piece != self.id_to_piece(token_id):
      return None
    return token_id


# Names that mark BOS / EOS / padding in common tokenizer.json files, used when
# no tokenizer_config.json sits next to the file.
_HF_BOS = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
_HF_EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_HF_PAD = ("<pad>", "<|padding|>", "[PAD]")


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizers` JSON file (GPT-NeoX, OLMo, LLaMA-3, ...).

  Which tokens are BOS/EOS/pad is not part of tokenizer.json: it is read from
  a sibling tokenizer_config.json when present, else from well-known names.
  That file may also hold the chat template (or a sibling
  chat_template.jinja), and `"add_bos_token": false`, which marks a model
  trained without BOS (e.g. SmolLM2, whose BOS id is <|im_start|>): then
  `encode(add_bos=True)` adds none, as transformers' tokenizer would not.
  Added tokens (special or not) always encode to their single id.
  """

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  # Rust-side error
      raise ValueError(f"{path}: not a HuggingFace tokenizer.json ({e})") from e
    named = _hf_config_tokens(os.path.join(os.path.dirname(path),
                                           "tokenizer_config.json"))
    self._bos = self._find(named.get("bos_token"), _HF_BOS)
    self._eos = self._find(named.get("eos_token"), _HF_EOS)
    self._pad = self._find(named.get("pad_token"), _HF_PAD)
    self._adds_bos = named.get("add_bos_token") is not False
    self._template = named.get("chat_template")
    jinja_file = os.path.join(os.path.dirname(path), "chat_template.jinja")
    if self._template is None and os.path.isfile(jinja_file):
      with open(jinja_file) as f:
        self._template = f.read()

  def _find(self, configured: str | None, names: Sequence[str]) -> int:
    for name in ((configured,) if configured else names):
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    return -1

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    return self._wrap(self._tok.encode(text, add_special_tokens=False).ids,
                      add_bos, add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

  def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    ids = list(ids)
    if add_bos and self._bos >= 0 and self._adds_bos:
      ids.insert(0, self._bos)
    if add_eos and self._eos >= 0:
      ids.append(self._eos)
    return ids

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  def id_to_piece(self, token_id: int) -> str:
    piece = self._tok.id_to_token(int(token_id))
    if piece is None:
      raise IndexError(f"id {token_id} is outside the vocabulary of "
                       f"{self.path} (size {self.vocab_size})")
    return piece

  def _lookup(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  @property
  def chat_template(self) -> str | None:
    return self._template


def _hf_config_tokens(path: str) -> dict[str, Any]:
  """BOS/EOS/pad token names, add_bos_token and chat_template from a
  tokenizer_config.json ({} when there is none)."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable tokenizer config ({e})") from e
  tokens = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": ...}
      value = value.get("content")
    if isinstance(value, str):
      tokens[key] = value
  if isinstance(config.get("add_bos_token"), bool):
    tokens["add_bos_token"] = config["add_bos_token"]
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}]
    named = {t.get("name"): t.get("template") for t in template
             if isinstance(t, dict)}
    template = named.get("default")
  if isinstance(template, str):
    tokens["chat_template"] = template
  return tokens


def render_chat_template(template: str, messages: Sequence[dict[str, str]],
                         add_generation_prompt: bool = True,
                         **variables: Any) -> str:
  """Renders a HuggingFace chat template the way transformers does: a
  sandboxed Jinja environment with trim_blocks and lstrip_blocks, loop
  controls, `raise_exception` and a `tojson` filter. `variables`: what the
  template may read besides `messages` (bos_token, eos_token, ...)."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    import datetime  # pylint: disable=g-import-not-at-top
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=strftime_now)
  try:
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        **variables)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template failed: {e}") from e


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past three specials (pad 0, BOS 1, EOS 2): needs no
  file, so tests and tiny byte-level models run anywhere (path "bytes")."""
  path = "bytes"
  offset = 3

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    ids = [b + self.offset for b in text.encode("utf-8")]
    return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

  def _decode(self, ids: list[int]) -> str:
    data = bytes(i - self.offset for i in ids if i >= self.offset)
    return data.decode("utf-8", errors="replace")

  vocab_size = 256 + offset
  pad_id, bos_id, eos_id = 0, 1, 2

  def id_to_piece(self, token_id: int) -> str:
    if token_id < self.offset:
      return ("<pad>", "<s>", "</s>")[token_id]
    return f"<0x{token_id - self.offset:02X}>"

  def _lookup(self, piece: str) -> int | None:
    return {"<pad>": 0, "<s>": 1, "</s>": 2}.get(piece)


def load_tokenizer(path: str) -> Tokenizer:
  """A `.model` (SentencePiece) or `.json` (HF tokenizers) file, a directory
  holding tokenizer.model / tokenizer.json (e.g. a model checkpoint), or
  "bytes" for the file-less ByteTokenizer."""
  if not path:
    raise FileNotFoundError("no tokenizer path given")
  if path == "bytes":
    return ByteTokenizer()
  if os.path.isdir(path):
    for name in ("tokenizer.model", "tokenizer.json"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"{path}: directory holds neither tokenizer.model "
                            f"nor tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist (train one "
                            f"with `python -m launch.train_tokenizer`)")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(f"{path}: unknown tokenizer file type; expected a "
                   f"SentencePiece .model or a HuggingFace tokenizer.json")


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def sentences(texts: Iterable[str]) -> Iterator[str]:
  """SentencePiece trains on lines: each non-empty line of each document."""
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def train_sentencepiece(files: Sequence[str], model_prefix: str,
                        vocab_size: int, *, text_field: str = "text",
                        text_split: str = "file", chunk_chars: int = 4000,
                        special_tokens: Sequence[str] = SPECIAL_TOKENS,
                        byte_fallback: bool = True,
                        max_sentences: int = 0, num_threads: int = 2,
                        character_coverage: float = 0.9995,
                        drops: readers.DropCounter | None = None) -> str:
  """Trains a BPE model on text/JSONL/Parquet files; returns PREFIX.model.

  max_sentences: train on a random sample of this many lines (0: all).
  Bad records are counted in `drops` (see readers.read_documents).
  """
  drops = drops if drops is not None else readers.DropCounter()
  docs = drops.texts(readers.read_documents(files, text_field, text_split,
                                            chunk_chars))
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.Train(
      sentence_iterator=sentences(docs),
      model_prefix=model_prefix,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=byte_fallback,
      split_digits=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,  # encode(a) + encode(b) == encode(a + b) at
                               # special tokens: templates join encoded parts
      allow_whitespace_only_pieces=True,
      character_coverage=character_coverage,
      required_chars="0123456789",  # digits are pieces even in digit-poor text
      user_defined_symbols=list(special_tokens),
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      input_sentence_size=max_sentences,
      shuffle_input_sentence=bool(max_sentences),
      num_threads=num_threads,
      minloglevel=2,
  )
  return model_prefix + ".model"
