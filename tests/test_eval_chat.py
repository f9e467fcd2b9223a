"""Chat evaluation (alpaca_eval, mt_bench) and the BBH chain-of-thought
leave-one-out check: metrics on scripted models, the loaders on the real
fetched files, and the launch.evaluate CLI."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax import paths
from mllm_jax.convert import native
from mllm_jax.data import chat
from mllm_jax.data.tokenizer import ByteTokenizer
from mllm_jax.eval import bbh, chat_eval, runner
from mllm_jax.eval.scoring import Scorer
from mllm_jax.generate.sampler import Sampler
from tests.helpers import tiny_config, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
V = TOK.vocab_size


class Scripted(nnx.Module):
  """A 'model' whose next-token logits depend only on the current token:
  logits[t] = table[tokens[t]]. Enough for Scorer and Sampler (the KV cache
  is passed through untouched)."""

  def __init__(self, table: np.ndarray):
    self.cfg = tiny_config(vocab_size=V, max_seq_len=1024)
    self.table = nnx.Variable(jnp.asarray(table, jnp.float32))

  def __call__(self, tokens, positions=None, segment_ids=None,
               prefix_mask=None, cache=None, embeddings=None):
    logits = self.table.get_value()[tokens]
    return logits if cache is None else (logits, cache)


def byte(ch: str) -> int:
  return TOK.encode(ch)[0]


def always(token: int) -> Scripted:
  table = np.zeros((V, V), np.float32)
  table[:, token] = 30.0
  return Scripted(table)


def chain(next_of: dict[str, str], default: str) -> Scripted:
  """Greedy next byte = next_of[current byte] (else `default`)."""
  table = np.zeros((V, V), np.float32)
  table[:, byte(default)] = 30.0
  for a, b in next_of.items():
    table[byte(a)] = 0.0
    table[byte(a), byte(b)] = 30.0
  return Scripted(table)


def run_items(model, items, fmt, max_new_tokens=8, batch_size=4):
  scorer = Scorer(model, batch_size=batch_size)
  sampler = Sampler(model, tokenizer=TOK, pad_id=0, prompt_multiple=64)
  return chat_eval.evaluate_items(items, scorer, sampler, TOK, fmt,
                                  max_new_tokens, batch_size)


# ---------------------------------------------------------------- metrics


def test_a_model_that_always_emits_eos_ends_every_turn():
  items = [chat_eval.ChatItem("a", ("Hi",), ("Yo",)),
           chat_eval.ChatItem("b", ("What?", "And then?"), ("X", None),
                              "cat")]
  out = run_items(always(TOK.eos_id), items, "vicuna_v1")
  assert out["end_of_turn_rate"] == 1.0 and out["stop_rate"] == 1.0
  assert out["mean_reply_tokens"] == 1.0 and out["mean_reply_chars"] == 0.0
  # The second turn was asked after the (empty) first answer.
  assert out["end_of_turn_rate_turn2"] == 1.0
  assert out["categories"]["cat"]["end_of_turn_rate"] == 1.0


def test_a_model_that_never_stops_ends_no_turn():
  items = [chat_eval.ChatItem("a", ("Hi",), ("Yo",))]
  out = run_items(always(byte("a")), items, "vicuna_v1", max_new_tokens=7)
  assert out["end_of_turn_rate"] == 0.0 and out["stop_rate"] == 0.0
  assert out["mean_reply_tokens"] == 7.0
  assert out["example_reply"] == "a" * 7


def test_an_end_of_turn_string_counts_and_is_cut():
  """human_assistant ends a turn with the text "\\n###" (several bytes): a
  model writing " x\\n###..." ends its turn with the reply "x"."""
  model = chain({":": " ", " ": "x", "x": "\n", "\n": "#"}, "#")
  items = [chat_eval.ChatItem("a", ("Hi",), ("Yo",))]
  out = run_items(model, items, "human_assistant", max_new_tokens=40)
  assert out["end_of_turn_rate"] == 1.0
  assert out["example_reply"] == "x"
  # EOS is a stop token but not this format's end of turn.
  eos = run_items(always(TOK.eos_id), items, "human_assistant")
  assert eos["stop_rate"] == 1.0 and eos["end_of_turn_rate"] == 0.0


def test_response_loss_equals_the_hand_computed_value():
  """Position-independent log-probs lp: the loss is the mean of -lp over
  the reference tokens and the end-of-turn EOS, which vicuna_v1 renders
  as ' ' + answer + </s> after 'ASSISTANT:'."""
  rng = np.random.default_rng(0)
  row = rng.normal(size=V).astype(np.float32)
  lp = row - np.log(np.exp(row.astype(np.float64)).sum())
  model = Scripted(np.tile(row, (V, 1)))

  def nll(answer):
    ids = TOK.encode(" " + answer) + [TOK.eos_id]
    return -sum(lp[i] for i in ids), len(ids)

  single = [chat_eval.ChatItem("a", ("Hi",), ("Yo",))]
  out = chat_eval.response_loss(Scorer(model), TOK,
                                chat.get_format("vicuna_v1"), single)
  total, n = nll("Yo")
  assert out["response_tokens"] == n == 4
  assert out["response_loss"] == pytest.approx(total / n, rel=1e-5)

  # Two turns: the second scored after the reference first answer; a turn
  # without a reference (and turns after it) is not scored.
  items = [chat_eval.ChatItem("b", ("Hi", "More"), ("Yo", "Ok then")),
           chat_eval.ChatItem("c", ("Q",), (None,))]
  out = chat_eval.response_loss(Scorer(model), TOK,
                                chat.get_format("vicuna_v1"), items)
  (t1, n1), (t2, n2) = nll("Yo"), nll("Ok then")
  assert out["loss_turns"] == 2
  assert out["response_loss"] == pytest.approx((t1 + t2) / (n1 + n2),
                                               rel=1e-5)
  assert out["response_loss_turn2"] == pytest.approx(t2 / n2, rel=1e-5)
  ids, weights, _ = chat_eval.loss_sequence(items[0], 1, TOK,
                                            chat.get_format("vicuna_v1"))
  assert TOK.decode(ids[weights > 0]) == " Ok then"
  assert "ASSISTANT: Yo" in TOK.decode(ids)


def test_response_loss_fits_long_sequences_into_the_window():
  model = Scripted(np.zeros((V, V), np.float32))  # uniform: log V per token
  scorer = Scorer(model, max_len=64)
  items = [chat_eval.ChatItem("a", ("Hi " * 40,), ("Yo " * 60,))]
  out = chat_eval.response_loss(scorer, TOK, chat.get_format("vicuna_v1"),
                                items)
  assert out["loss_truncated"] == 1
  assert out["response_tokens"] == 32  # half the window kept for the prompt
  assert out["response_loss"] == pytest.approx(math.log(V), rel=1e-5)


def test_round_robin_limit_and_end_of_turn_detection():
  items = [chat_eval.ChatItem(str(i), ("q",), (None,), c)
           for i, c in enumerate("aaabbc")]
  assert [i.id for i in chat_eval.round_robin(items, 4)] == ["0", "1", "3",
                                                            "5"]
  eot = chat_eval.end_of_turn(chat.get_format("vicuna_v1"), TOK)
  assert eot.tokens == (TOK.eos_id,) and not eot.strings
  eot = chat_eval.end_of_turn(chat.get_format("human_assistant"), TOK)
  assert eot.strings == ("\n###",) and eot.other == (TOK.eos_id,)


# ---------------------------------------------------------------- BBH


def test_bbh_parsing_and_answers():
  text = ("Do sums.\n\nQ: 1+1?\nA: Let's think step by step.\n1+1=2. So the "
          "answer is 2.\n\nQ: Pick (A) x (B) y\nA: Let's think step by step."
          "\nIt is y. So the answer is (B).\n\nQ: 2+2?\nA: Let's think step "
          "by step.\nSo the answer is 4.")
  ps = bbh.parse_prompt(text, "toy")
  assert ps.description == "Do sums."
  assert [e.answer for e in ps.exemplars] == ["2", "(B)", "4"]
  assert ps.exemplars[1].question == "Pick (A) x (B) y"
  (p0, g0), (_, g1), _ = bbh.leave_one_out(ps)
  assert g0 == "2" and g1 == "(B)"
  assert p0.startswith("Do sums.\n\nQ: Pick (A)")
  assert p0.endswith("\n\nQ: 1+1?\nA: Let's think step by step.")
  assert "1+1=2" not in p0  # the asked exemplar's own chain is left out
  assert bbh.exact_match(" So the answer is (B) y.", "(B)")
  assert bbh.exact_match("...so. So the answer is 2.", "2")
  assert not bbh.exact_match("The answer is 2.", "2")
  with pytest.raises(ValueError, match="num_fewshot"):
    bbh.leave_one_out(ps, 3)
  with pytest.raises(FileNotFoundError, match="bbh-prompts"):
    bbh.load_prompts("/nonexistent")


# ------------------------------------------------------ real fetched files


def _need(fn, source):
  try:
    return fn()
  except FileNotFoundError:
    pytest.skip(f"data source {source!r} not fetched: run `python "
                f"scripts/fetch_data.py --only {source}`")


def test_alpaca_eval_loader_reads_the_real_file():
  _need(paths.alpaca_eval_json, "alpaca-eval")
  items = chat_eval.load_alpaca_eval()
  assert len(items) == 805
  assert all(len(i.turns) == 1 and i.references[0] for i in items)
  assert items[0].category == "helpful_base"
  assert len(chat_eval.load_alpaca_eval(limit=3)) == 3


def test_mt_bench_loader_reads_the_real_files():
  _need(paths.mt_bench_questions, "mt-bench")
  items = chat_eval.load_mt_bench()
  assert len(items) == 80 and all(len(i.turns) == 2 for i in items)
  counts = {}
  for item in items:
    counts[item.category] = counts.get(item.category, 0) + 1
  assert len(counts) == 8 and set(counts.values()) == {10}
  referenced = [i for i in items if i.references[0] is not None]
  assert len(referenced) == 30
  assert {i.category for i in referenced} == {"reasoning", "math", "coding"}
  assert all(None not in i.references for i in referenced)
  eight = chat_eval.load_mt_bench(limit=8)
  assert len({i.category for i in eight}) == 8


def test_bbh_prompts_load_and_a_perfect_model_scores_one():
  root = _need(paths.bbh_prompt_dir, "bbh-prompts")
  sets = bbh.load_prompts(root)
  assert len(sets) == 23  # 27 files, two groups of three identical ones
  assert sum(1 + len(s.aliases) for s in sets.values()) == 27
  assert all(len(s.exemplars) == 3 for s in sets.values())
  assert sets["boolean_expressions"].exemplars[0].answer == "False"
  assert sets["date_understanding"].exemplars[0].answer == "(D)"
  truth = {}
  for s in sets.values():
    for ex, (prompt, _) in zip(s.exemplars, bbh.leave_one_out(s)):
      truth[prompt] = ex.chain[len(bbh.COT_START):]
  out = bbh.evaluate(lambda prompts: [truth[p] for p in prompts], root=root)
  assert out["em"] == 1.0 and out["num_examples"] == 69
  out = bbh.evaluate(lambda prompts: ["no idea"] * len(prompts), limit=2,
                     root=root)
  assert out["em"] == 0.0 and out["num_examples"] == 6


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg, model = tiny_model(vocab_size=V, max_seq_len=512)
  path = tmp_path_factory.mktemp("chat_cli") / "ckpt"
  native.save_model(str(path), cfg, model)
  return str(path)


def test_runner_knows_the_new_tasks_and_the_old_ones():
  for name in ("alpaca_eval", "mt_bench", "bbh_cot_loo", "mmlu", "gsm8k",
               "arc_easy"):
    assert name in runner.KNOWN


def test_cli_alpaca_eval(checkpoint, tmp_path):
  _need(paths.alpaca_eval_json, "alpaca-eval")
  output = tmp_path / "chat.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--checkpoint={checkpoint}",
       "--tokenizer=bytes", "--tasks=alpaca_eval", "--limit=3",
       "--max_new_tokens=8", f"--output={output}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode == 0, out.stderr
  saved = json.loads(output.read_text())
  assert saved["chat_format"] == "vicuna_v1"  # bytes have no template
  result = saved["results"]["alpaca_eval"]
  assert result["num_examples"] == 3 and result["loss_turns"] == 3
  assert 0.0 < result["response_loss"] < 2 * math.log(V)
  assert 0.0 <= result["end_of_turn_rate"] <= 1.0
  assert 1.0 <= result["mean_reply_tokens"] <= 8.0
  assert "| alpaca_eval | response_loss |" in (tmp_path / "chat.md").read_text()
  bad = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--checkpoint={checkpoint}",
       "--tokenizer=bytes", "--tasks=alpaca_eval", "--chat_format=nope",
       f"--output={output}"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "unknown chat format" in bad.stderr
  assert "Traceback" not in bad.stderr
