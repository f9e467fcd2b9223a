"""Generative metrics (QA EM/F1, GSM8K, MATH, pass@k), perplexity, the
TFDS loaders (on mock data) and the bundled generative data."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.eval import generative as gen
from mllm_jax.eval import perplexity, runner, tasks, tfds_tasks
from mllm_jax.eval.scoring import Scorer
from mllm_jax.data.tokenizer import ByteTokenizer
from tests.helpers import tiny_model

TOK = ByteTokenizer()


def test_qa_exact_match_and_f1():
  golds = ["The Eiffel Tower", "Eiffel tower (Paris)"]
  assert gen.exact_match("eiffel tower!", golds) == 1.0
  assert gen.exact_match("the tower", golds) == 0.0
  # vs "eiffel tower paris": precision 3/4, recall 1.
  assert gen.f1("eiffel tower in paris", golds) == pytest.approx(6 / 7)
  assert gen.f1("nothing", golds) == 0.0
  assert gen.qa_prompt("who wrote hamlet") == "Q: who wrote hamlet?\nA:"
  nq = gen.load_qa("nq_open")
  assert len(nq) == 3610 and nq[0]["answers"]
  assert len(gen.load_qa("triviaqa")) == 7993


def test_gsm8k_number_extraction_and_prompt():
  assert gen.extract_number("so 3 + 4 = 7. The answer is 1,234.") == "1234"
  assert gen.extract_number("I think it is $18.00 total") == "18"
  assert gen.extract_number("-5 degrees then 2.5") == "2.5"
  assert gen.extract_number("no digits") is None
  assert gen.gsm8k_gold("blah <<1+1=2>>2\n#### 2,000") == "2000"
  docs, shots = gen.load_gsm8k()
  assert len(docs) == 1319 and docs[0]["answer"] == "18"
  assert len(shots) == 8
  prompt = gen.gsm8k_prompt(docs[0]["question"], shots)
  assert prompt.count("Question: ") == 9
  assert prompt.endswith(docs[0]["question"] + "\nAnswer:")
  assert shots[0][1].endswith("So the answer is 6.")


@pytest.mark.parametrize("pred, gold", [
    ("The answer is $\\boxed{\\dfrac{1}{2}}$.", "\\frac12"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})"),
    ("x = 5", "5"),
    ("10\\text{ cm}", "10"),
    ("90^\\circ", "90"),
    ("3/4", "\\frac{3}{4}"),
    (".5", "0.5"),
    ("\\tfrac{3}{4}", "\\frac34"),
    ("4.0", "4"),
])
def test_math_normalisation_equates(pred, gold):
  assert gen.math_equal(pred, gold), (gen.normalize_math(pred),
                                      gen.normalize_math(gold))


def test_math_normalisation_distinguishes():
  assert not gen.math_equal("\\frac{1}{3}", "\\frac{1}{2}")
  assert gen.last_boxed("a \\boxed{x^{2}} b \\boxed{\\{1\\}}") == "\\{1\\}"


def test_pass_at_k():
  assert gen.pass_at_k(10, 0, 1) == 0.0
  assert gen.pass_at_k(10, 10, 5) == 1.0
  assert gen.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  assert gen.pass_at_k(5, 1, 2) == pytest.approx(1 - math.comb(4, 2) / 10)
  with pytest.raises(ValueError, match="at least 3"):
    gen.pass_at_k(2, 1, 3)


def test_code_prompts_and_truncation():
  assert gen.truncate_code("    return 1\n\ndef other():\n  pass") == (
      "    return 1\n")
  problem = gen.load_mbpp()[0]
  assert gen.mbpp_prompt(problem).startswith('"""\nWrite a python function')
  assert len(gen.load_humaneval()) == 164


# ----------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_model():
  return tiny_model(vocab_size=TOK.vocab_size)[1]


def test_perplexity_per_token_and_per_byte(byte_model, tmp_path):
  texts = ["To be, or not to be.", "héllo wörld " * 8]
  scorer = Scorer(byte_model, max_len=64, bucket=16)
  out = perplexity.text_perplexity(scorer, TOK, texts)
  # Reference: one full-length forward per text (no windows needed when the
  # window is long enough), log-probs summed in numpy.
  nll = 0.0
  ids = [TOK.encode(t, add_bos=True, add_eos=True) for t in texts]
  for doc in ids:
    for s in range(0, len(doc) - 1, 63):
      window = doc[s:s + 64]
      logits = np.asarray(byte_model(jnp.asarray([window])))[0, :-1]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True))
                             .sum(-1, keepdims=True)) - logits.max(
                                 -1, keepdims=True)
      nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
  tokens = sum(len(d) - 1 for d in ids)
  assert out["tokens"] == tokens
  assert out["nll"] == pytest.approx(nll, rel=1e-5)
  num_bytes = sum(len(t.encode()) for t in texts)
  assert out["bits_per_byte"] == pytest.approx(nll / num_bytes / math.log(2),
                                               rel=1e-5)
  assert out["token_perplexity"] == pytest.approx(math.exp(nll / tokens),
                                                  rel=1e-5)
  # The same ids from a file give the same per-token numbers.
  np.save(tmp_path / "ids.npy", np.asarray(ids[0]))
  (tmp_path / "ids.txt").write_text(" ".join(map(str, ids[0])) + "\n")
  a = perplexity.file_perplexity(scorer, str(tmp_path / "ids.npy"))
  b = perplexity.file_perplexity(scorer, str(tmp_path / "ids.txt"))
  assert a["nll"] == pytest.approx(b["nll"]) and a["tokens"] == len(ids[0]) - 1
  (tmp_path / "bad.txt").write_text("1 2 x\n")
  with pytest.raises(ValueError, match="bad.txt:1"):
    perplexity.file_perplexity(scorer, str(tmp_path / "bad.txt"))
  with pytest.raises(ValueError, match="outside"):
    perplexity.file_perplexity(scorer, str(tmp_path / "ids.txt"),
                               vocab_size=10)


# ----------------------------------------------------------------------------
# TFDS loaders (mock data: no download, no TensorFlow)
# ----------------------------------------------------------------------------


# Records in each builder's own feature layout where random mock values
# cannot form a valid example (a blank to fill, a label among the endings).
TFDS_RECORDS = {
    "hellaswag": {"context": b"A man is sitting on a roof. he",
                  "endings": [b"is using wrap.", b"starts pulling up roofing.",
                              b"is ripping level tiles.", b"holds a rope."],
                  "activity_label": b"Roof shingle removal", "label": 3},
    "winogrande": {"sentence": b"Sarah was a much better surgeon than Maria "
                               b"so _ always got the harder cases.",
                   "option1": b"Sarah", "option2": b"Maria", "label": 0},
}


@pytest.mark.parametrize("task", sorted(tfds_tasks.TFDS_TASKS))
def test_tfds_loader_feeds_the_same_prompts(task):
  tfds = pytest.importorskip("tensorflow_datasets")
  mock = {}
  if task in TFDS_RECORDS:
    mock["as_data_source_fn"] = lambda *a, **k: [TFDS_RECORDS[task]] * 3
  with tfds.testing.mock_data(num_examples=3, **mock):
    docs = tfds_tasks.load_tfds_docs(task, limit=2)
  assert len(docs) == 2
  examples = tasks.TASKS[task].examples(docs, k=1, seed=0)
  for ex in examples:
    assert len(ex.contexts) == len(ex.continuations) >= 2
    assert 0 <= ex.gold < len(ex.continuations)
  if task == "winogrande":  # the blank filled by each option
    assert [c[-8:] for c in examples[0].contexts] == ["so Sarah", "so Maria"]
    assert examples[0].gold == 0
  if task == "hellaswag":
    assert examples[0].continuations[3] == " holds a rope."
  with pytest.raises(ValueError, match="no TFDS loader"):
    tfds_tasks.load_tfds_docs("mmlu")


def test_code_tasks_report_unbiased_pass_at_k(monkeypatch):
  """Three sampled programs for HumanEval/0, two correct: pass@1 = 2/3."""
  correct = ("    for i, a in enumerate(numbers):\n"
             "        for b in numbers[i + 1:]:\n"
             "            if abs(a - b) < threshold:\n"
             "                return True\n"
             "    return False\n")
  wrong = "    return False\n"
  calls = []

  def fake_generate(sampler, tokenizer, prompts, max_new, stops, sampling,
                    seed):
    calls.append((len(prompts), sampling.temperature))
    return [correct, wrong, correct][:len(prompts)]

  monkeypatch.setattr(runner, "_generate", fake_generate)
  result = runner._generative(None, None, "humaneval", None, 1,
                              code_samples=3)
  assert calls == [(3, 0.8)]
  assert result["pass@1"] == pytest.approx(2 / 3)
  assert "pass@10" not in result and result["samples_per_problem"] == 3
