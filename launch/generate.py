r"""Samples text from a native checkpoint.

  python -m launch.generate --checkpoint=DIR --tokenizer=PATH \
      --prompt="Once upon a time" [--max_new_tokens=64] [--temperature=0.8]
  python -m launch.generate --checkpoint=DIR --tokenizer=PATH --chat
  ... [--mesh=fsdp=4,tensor=2]   # shard the model over 8 devices
  # chat models (e.g. imported from GGUF): the tokenizer's chat template
  python -m launch.generate --checkpoint=DIR --chat_template \
      --prompt="What is the capital of France?" [--system="Be brief."]

With a multimodal checkpoint (launch.mm_align / mm_instruct's WORKDIR/model,
or a converted LLaVA) and --image, each --prompt (or the first --chat turn)
is a user turn about the images, rendered in the chat format the model was
trained with (--format, default LLaVA's llava_v1; minigpt4 for MiniGPT-4's):

  python -m launch.generate --checkpoint=S2/model --image=shapes.png \
      --prompt="What shape is in the image?" [--format=minigpt4]
  python -m launch.generate --checkpoint=S2/model --image=scene.png --chat

The images' placeholders go before the text unless it holds `<image>`
itself; replies stop at the format's end of turn; a --chat conversation
continues from the KV cache as for text.

`--tokenizer=bytes` uses byte-level ids (for byte-level test models). In
--chat mode each stdin line is a user turn appended to the conversation; the
reply streams as it is generated, and the conversation continues from the KV
cache (the history is never re-encoded). An empty line or EOF ends the chat.

--chat_template renders each --prompt (or each --chat turn) as a user turn
with the tokenizer's Jinja chat template (tokenizer_config.json's
`chat_template`, rendered as transformers does, with the generation prompt),
encodes it without an extra BOS, and stops at EOS or the format's end-of-turn
token (<|im_end|>, <|eot_id|>, ...); only the replies are printed. A prompt
already rendered by hand works without the flag too: special tokens such as
<|im_start|> in the text encode to their ids.
"""

from __future__ import annotations

import sys

from absl import app, flags

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import multimodal as mm_io
from mllm_jax.convert import native
from mllm_jax.data import chat, images, readers
from mllm_jax.data.tokenizer import IMAGE, load_tokenizer
from mllm_jax.eval import chat_eval
from mllm_jax.generate.multimodal import MultimodalSampler
from mllm_jax.generate.sampler import Sampler, check_sampling_flags
from mllm_jax.train import mm_stage
from launch import flags as launch_flags
from launch.flags import (mesh_from_flag, quiet_library_logs, require_flags,
                          vocab_mismatch)

(_CHECKPOINT, _TOKENIZER, _MESH,
 _VOCAB_PADDING) = launch_flags.define_inference_flags()
flags.adopt_module_key_flags(launch_flags)
_PROMPT = flags.DEFINE_multi_string("prompt", [],
                                    "Prompt(s); repeat for a batch.")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive chat on stdin.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = no top-k filter.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = no nucleus filter.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string(s).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Override the compute dtype.")
_CHAT_TEMPLATE = flags.DEFINE_bool(
    "chat_template", False,
    "Render each --prompt / --chat turn as a user message with the "
    "tokenizer's chat template (and the assistant's generation prompt); "
    "stop at EOS or the end-of-turn token; print the replies only.")
_SYSTEM = flags.DEFINE_string(
    "system", None, "--chat_template: a system message before the first "
    "user turn (default: none; the template may add its own).")
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "Image file(s) for a multimodal checkpoint; each --prompt "
    "(or the first --chat turn) is asked about them.")
_FORMAT = flags.DEFINE_string(
    "format", "llava_v1", "Chat format of a multimodal checkpoint (the one "
    "its stage trained with: llava_v1, minigpt4, ...).")
USER, ASSISTANT = "User: ", "Assistant:"


def _print_stream(tokenizer, state, hidden=()):
  """on_chunk callback printing row 0's new text as it arrives (without
  the `hidden` ids, e.g. the end-of-turn token)."""
  def on_chunk(new):
    state["ids"] += [t for t in new[0] if t not in hidden]
    text = tokenizer.decode(state["ids"])
    sys.stdout.write(text[state["shown"]:])
    sys.stdout.flush()
    state["shown"] = len(text)
  return on_chunk


def text_chat(sampler, tokenizer, sampling) -> None:
  """A multi-turn loop that resumes from the cache after each reply."""
  previous = None
  for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
      break
    turn = tokenizer.encode(f"{USER}{line}\n{ASSISTANT}",
                            add_bos=previous is None)
    stream = {"ids": [], "shown": 0}
    kwargs = dict(sampling=sampling, stop_strings=["\nUser:"] + _STOP.value,
                  stop_tokens=[tokenizer.eos_id], chunk_size=8,
                  on_chunk=_print_stream(tokenizer, stream))
    if previous is None:
      previous = sampler.generate([turn], _MAX_NEW.value, seed=_SEED.value,
                                  **kwargs)
    else:
      previous = sampler.resume(previous, [turn], _MAX_NEW.value, rows=[0],
                                **kwargs)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _system() -> list[dict[str, str]]:
  if not _SYSTEM.value:
    return []
  return [{"role": "system", "content": _SYSTEM.value}]


def _reply(tokenizer, tokens, stops) -> str:
  """A reply's text, without the end-of-turn token that ended it."""
  if tokens and tokens[-1] in stops:
    tokens = tokens[:-1]
  return tokenizer.decode(tokens)


def chat_with_template(sampler, tokenizer, sampling) -> None:
  """--chat with the chat template: each turn renders the conversation so
  far; the text past what the cache holds is appended to it (when the
  template re-renders earlier turns differently, the conversation is
  encoded afresh)."""
  stops = tokenizer.end_of_turn_ids()
  messages = _system()
  previous, held = None, ""
  for line in sys.stdin:
    line = line.rstrip("\n")
    if not line:
      break
    messages.append({"role": "user", "content": line})
    rendered = tokenizer.apply_chat_template(messages)
    stream = {"ids": [], "shown": 0}
    kwargs = dict(sampling=sampling, stop_strings=_STOP.value,
                  stop_tokens=stops, chunk_size=8,
                  on_chunk=_print_stream(tokenizer, stream, set(stops)))
    if previous is not None and rendered.startswith(held):
      turn = tokenizer.encode(rendered[len(held):])
      previous = sampler.resume(previous, [turn], _MAX_NEW.value, rows=[0],
                                **kwargs)
    else:
      previous = sampler.generate([tokenizer.encode(rendered)],
                                  _MAX_NEW.value, seed=_SEED.value, **kwargs)
    tokens = previous.tokens[0]
    held = rendered + tokenizer.decode(tokens)
    messages.append({"role": "assistant",
                     "content": _reply(tokenizer, tokens, stops)})
    sys.stdout.write("\n")
    sys.stdout.flush()


class ImageChat:
  """A conversation about images with a multimodal checkpoint, rendered in
  its chat format; each reply continues from the KV cache when the
  rendered conversation extends what the cache holds."""

  def __init__(self, sampler, tokenizer, fmt, pixels, sampling):
    self.sampler, self.tokenizer, self.fmt = sampler, tokenizer, fmt
    self.pixels, self.sampling = pixels, sampling
    self.eot = chat_eval.end_of_turn(fmt, tokenizer)
    self.turns: list = []
    self.previous, self.held = None, []

  def prompt(self, turns) -> list[int]:
    conv = chat.Conversation("chat", tuple(turns), None,
                             ("image",) * len(self.pixels))
    return chat.encode_prompt(mm_stage.image_conversation(conv, self.fmt),
                              self.tokenizer, self.fmt).tolist()

  def ask(self, text: str, on_chunk=None) -> str:
    if not self.turns and IMAGE not in text:
      text = f"{IMAGE}\n" * len(self.pixels) + text
    self.turns.append(chat.Turn(chat.USER, text))
    ids = self.prompt(self.turns)
    kwargs = dict(sampling=self.sampling, stop_tokens=self.eot.stop_tokens,
                  stop_strings=list(self.eot.strings) + _STOP.value,
                  chunk_size=8, on_chunk=on_chunk)
    if self.previous is not None and ids[:len(self.held)] == self.held:
      self.previous = self.sampler.resume(
          self.previous, [ids[len(self.held):]], _MAX_NEW.value, rows=[0],
          **kwargs)
    else:
      self.previous = self.sampler.generate([ids], [self.pixels],
                                            _MAX_NEW.value, seed=_SEED.value,
                                            **kwargs)
    tokens = self.previous.tokens[0]
    reply = (self.previous.texts[0]
             if self.previous.stop_reasons[0] == "stop_string"
             else _reply(self.tokenizer, tokens, self.eot.stop_tokens))
    self.held = ids + tokens
    self.turns.append(chat.Turn(chat.ASSISTANT, reply.strip()))
    return reply.strip()


def image_main(mesh, sampling) -> None:
  """--prompt / --chat with a multimodal checkpoint (and --image)."""
  try:
    cfg = mm_io.read_config(_CHECKPOINT.value)
    tokenizer = load_tokenizer(_TOKENIZER.value or _CHECKPOINT.value)
    fmt = chat.get_format(_FORMAT.value, tokenizer)
    image_cfg = images.ImageConfig(size=cfg.vision.image_size)
    pixels = []
    for path in _IMAGE.value:
      out = images.pixels_of(path, image_cfg, path)
      if isinstance(out, readers.Drop):
        raise ConfigError(f"--image: {out.where}: {out.reason}")
      pixels.append(out)
    _, model = mm_io.load_model(_CHECKPOINT.value, mesh=mesh)
  except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f"generate: error: {e}")
  sampler = MultimodalSampler(model, tokenizer, pad_id=max(
      tokenizer.pad_id, 0), mesh=mesh)
  if _CHAT.value:
    session = ImageChat(sampler, tokenizer, fmt, pixels, sampling)
    for line in sys.stdin:
      if not line.strip():
        break
      print(session.ask(line.rstrip("\n")), flush=True)
    return
  for prompt in _PROMPT.value:  # each a fresh conversation about the images
    print(ImageChat(sampler, tokenizer, fmt, pixels, sampling).ask(prompt))


def main(argv: list[str]) -> None:
  quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  require_flags(_CHECKPOINT)
  if bool(_PROMPT.value) == _CHAT.value:
    raise app.UsageError("give --prompt (one or more) or --chat, not both")
  if _MAX_NEW.value < 1:
    raise app.UsageError("--max_new_tokens must be >= 1")
  if _SYSTEM.value is not None and not _CHAT_TEMPLATE.value:
    raise app.UsageError("--system needs --chat_template")
  if _IMAGE.value and not mm_io.is_multimodal(_CHECKPOINT.value):
    sys.exit(f"generate: error: --image: {_CHECKPOINT.value} is not a "
             f"multimodal checkpoint (no {mm_io.CONFIG_FILE})")
  if mm_io.is_multimodal(_CHECKPOINT.value):
    try:
      sampling = check_sampling_flags(_TEMPERATURE.value, _TOP_K.value,
                                      _TOP_P.value)
    except ConfigError as e:
      sys.exit(f"generate: error: {e}")
    image_main(mesh_from_flag(_MESH), sampling)
    return
  try:
    sampling = check_sampling_flags(_TEMPERATURE.value, _TOP_K.value,
                                    _TOP_P.value)
    tokenizer = load_tokenizer(_TOKENIZER.value or _CHECKPOINT.value)
    mismatch = vocab_mismatch(tokenizer, _CHECKPOINT.value,
                              _VOCAB_PADDING.value)
    if mismatch:
      sys.exit(f"generate: error: {mismatch}")
    overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
    mesh = mesh_from_flag(_MESH)
    _, model = native.load_model(_CHECKPOINT.value, mesh=mesh, **overrides)
  except (ConfigError, FileNotFoundError, ImportError) as e:
    sys.exit(f"generate: error: {e}")
  if _CHAT_TEMPLATE.value and not tokenizer.chat_template:
    sys.exit(f"generate: error: --chat_template: the tokenizer "
             f"{tokenizer.path} has no chat template (tokenizer_config.json "
             f"'chat_template')")
  sampler = Sampler(model, tokenizer=tokenizer, pad_id=tokenizer.pad_id,
                    mesh=mesh)
  if _CHAT.value:
    try:
      if _CHAT_TEMPLATE.value:
        chat_with_template(sampler, tokenizer, sampling)
      else:
        text_chat(sampler, tokenizer, sampling)
    except ValueError as e:  # A chat template that raised.
      sys.exit(f"generate: error: {e}")
    return
  if _CHAT_TEMPLATE.value:
    stops = tokenizer.end_of_turn_ids()
    try:
      prompts = [tokenizer.encode(tokenizer.apply_chat_template(
          _system() + [{"role": "user", "content": p}]))
                 for p in _PROMPT.value]
    except ValueError as e:
      sys.exit(f"generate: error: --chat_template: {e}")
    out = sampler.generate(prompts, _MAX_NEW.value, sampling=sampling,
                           stop_strings=_STOP.value, stop_tokens=stops,
                           seed=_SEED.value)
    for tokens, text, cut in zip(out.tokens, out.texts, out.stop_reasons):
      print(text if cut == "stop_string" else _reply(tokenizer, tokens, stops))
    return
  out = sampler.generate(list(_PROMPT.value), _MAX_NEW.value,
                         sampling=sampling, stop_strings=_STOP.value,
                         stop_tokens=[tokenizer.eos_id], seed=_SEED.value)
  for prompt, text in zip(_PROMPT.value, out.texts):
    print(prompt + text)


if __name__ == "__main__":
  app.run(main)
