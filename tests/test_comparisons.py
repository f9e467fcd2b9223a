"""Comparison data: the schema and its bad records, builders from real data,
the split by prompt, the human-labelling round trip, encoding (loss on the
last response only, left truncation, pad == eos) and batches."""

import json

import numpy as np
import pytest

from mllm_jax import paths
from mllm_jax.data import chat
from mllm_jax.data import comparison_sources as sources
from mllm_jax.data import comparisons as cmp
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.rl.comparison_data import provenance

SP_MODEL = ("sentencepiece", "sentencepiece-0.2.3", "test",
            "botchan_en_bpe_1000.model")


def record(**changes):
  good = {"id": "r1", "prompt": "What is two plus two?",
          "responses": ["Four.", "Five."], "ranking": [0, 1],
          "source": "test:hand", "origin": "synthetic: by hand "
          "(not a human preference)"}
  return {**good, **changes}


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(paths.data_path(*SP_MODEL))


def test_bad_records_are_dropped_with_reasons_and_good_ones_kept(tmp_path):
  bad = {
      "equal_responses": record(id="b1", responses=["Four.", " Four. "]),
      "empty_response": record(id="b2", responses=["Four.", "  "]),
      "bad_ranking": record(id="b3", ranking=[0, 0]),
      "too_few_responses": record(id="b4", responses=["Four."], ranking=[0]),
      "missing_field": {k: v for k, v in record(id="b5").items()
                        if k != "ranking"},
      "bad_origin": record(id="b6", origin="scraped"),
      "bad_prompt": record(id="b7", prompt=[{"role": "assistant",
                                             "content": "Hi"}]),
  }
  path = tmp_path / "c.jsonl"
  with open(path, "w") as f:
    for i in range(3):
      f.write(json.dumps(record(id=f"g{i}")) + "\n")
    for r in bad.values():
      f.write(json.dumps(r) + "\n")
    f.write(json.dumps(record(id="g0")) + "\n")  # a repeated id
    f.write('{"id": "cut", "prompt": "Wh')  # cut mid-record
  stats = chat.ChatStats()
  got = cmp.read_comparisons(str(path), stats)
  assert [c.id for c in got] == ["g0", "g1", "g2"]
  dropped = stats.summary()["dropped"]
  assert dropped == {**{reason: 1 for reason in bad}, "duplicate_id": 1,
                     "truncated_json": 1}
  # K-wise: three ranked responses give all three pairs, best first.
  c = cmp.parse_comparison(record(responses=["a", "b", "c"],
                                  ranking=[2, 0, 1]))
  assert c.pairs() == [(2, 0), (2, 1), (0, 1)] and c.ranks() == [1, 2, 0]


def test_builders_from_real_data_say_they_are_not_human():
  for name in ("arc_easy", "sciq", "csqa", "gsm8k", "bfcl_simple",
               "bfcl_multiple"):
    made = sources.SOURCES[name](12, 0)
    assert len(made) >= 10, name
    for c in made:
      assert cmp.NOT_HUMAN in c.origin and c.source.startswith(
          name.split("_")[0])
      assert sorted(c.ranking) == list(range(c.k))
  arc = sources.SOURCES["arc_easy"](5, 0)
  from mllm_jax.eval import tasks  # pylint: disable=import-outside-toplevel
  doc = tasks.TASKS["arc_easy"].load()[0]
  gold = doc["choices"]["text"][tasks._arc_gold(doc)]  # pylint: disable=protected-access
  assert arc[0].responses[arc[0].ranking[0]] == gold[:1].upper() + gold[1:]
  # GSM8K: gold > a changed intermediate result > a wrong final number.
  gsm = sources.SOURCES["gsm8k"](12, 0)
  three = [c for c in gsm if c.k == 3]
  assert len(three) >= 8
  for c in three:
    gold, step, final = c.responses
    assert c.ranking == (0, 1, 2)
    assert step.endswith(gold[gold.rindex("So the answer"):])
    assert final[:final.rindex("So the answer")] == gold[:gold.rindex(
        "So the answer")]
  # BFCL: the accepted call is the preferred one.
  bfcl = sources.SOURCES["bfcl_simple"](3, 0)
  assert bfcl[0].responses[bfcl[0].ranking[0]] == (
      "calculate_triangle_area(base=10, height=5, unit='units')")
  assert bfcl[0].prompt[0][0] == "system" and "calculate_triangle_area" in (
      bfcl[0].prompt[0][1])


def test_split_by_prompt_never_shares_a_prompt():
  built, _ = sources.build(["arc_easy", "gsm8k"], 100, 0)
  # The same prompt from two records must land on one side.
  twin = cmp.parse_comparison({**built[0].to_json(), "id": "twin",
                               "responses": ["x", "y"]})
  train, held = cmp.split_by_prompt(built + [twin], 0.3, seed=1)
  assert {c.prompt_key() for c in train}.isdisjoint(
      {c.prompt_key() for c in held})
  assert 0.15 < len(held) / (len(train) + len(held)) < 0.45
  assert cmp.split_by_prompt(built, 0.3, seed=1)[1] == [
      c for c in held if c.id != "twin"]


def test_labelling_round_trip_counts_missing_and_contradictory(tmp_path):
  comps = [cmp.parse_comparison(record(id=f"q{i}", prompt=f"Question {i}?",
                                       responses=[f"a{i}", f"b{i}"]))
           for i in range(7)]
  comps.append(cmp.parse_comparison(record(
      id="k3", prompt="Rank these.", responses=["x", "y", "z"],
      ranking=[0, 1, 2])))
  out = tmp_path / "to_label.jsonl"
  assert cmp.export_for_labelling(str(out), comps) == 8
  lines = [json.loads(x) for x in open(out)]
  assert all(x["preferred"] == "" and x["ranking"] == [] for x in lines)
  assert lines[0]["responses"] == {"A": "a0", "B": "b0"}
  fills = {"q0": {"preferred": "B"}, "q1": {"ranking": ["A", "B"]},
           "q2": {},  # left empty
           "q3": {"ranking": ["A", "A"]},  # not a permutation
           "q4": {"preferred": "A", "ranking": ["B", "A"]},  # disagree
           "q5": {"preferred": "A"}, "q6": {"preferred": "Q"},
           "k3": {"ranking": ["C", "A", "B"]}}
  filled = []
  for line in lines:
    filled.append({**line, **fills[line["id"]]})
  filled.append({**lines[5], "preferred": "A"})  # agreeing duplicate
  filled.append({**lines[0], "preferred": "A"})  # q0 again, other label
  with open(tmp_path / "filled.jsonl", "w") as f:
    for line in filled:
      f.write(json.dumps(line) + "\n")
  labelled, attention, counts = cmp.import_labels(str(tmp_path /
                                                       "filled.jsonl"))
  assert {c.id: c.ranking for c in labelled} == {
      "q1": (0, 1), "q5": (0, 1), "k3": (2, 0, 1)}
  assert all(c.origin == cmp.HUMAN for c in labelled)
  # The reward model's and DPO's note says what the data is, by origin.
  assert provenance(labelled) == "all 3 comparisons labelled by people"
  assert provenance(labelled + comps) == (
      "3 of 11 comparisons labelled by people; the other 8 are synthetic, "
      "NOT human preferences")
  assert "NOT human" in provenance(comps)
  assert counts["needs_attention"] == {
      "bad_label": 1, "bad_ranking": 1, "contradictory_duplicates": 2,
      "contradictory_label": 1, "missing_label": 1}
  assert counts["lines"] == 10 and counts["agreeing_duplicates"] == 1
  assert {a["line"]["id"] for a in attention} == {"q0", "q2", "q3", "q4",
                                                   "q6"}


def test_encoding_trains_only_the_last_response(sp):
  c = cmp.parse_comparison(record(
      prompt=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hello there."},
              {"role": "assistant", "content": "Hello, what do you need?"},
              {"role": "user", "content": "What is two plus two?"}],
      responses=["It is four.", "It is five, I think."]))
  fmt = chat.get_format("vicuna_v1")
  full = cmp.encode_comparison(c, sp, fmt, None)
  for example, text in zip(full, c.responses):
    spans = [ids for trained, ids in chat.weighted_spans(
        example["ids"], example["weights"]) if trained]
    assert len(spans) == 1  # not the earlier assistant turn of the prompt
    assert sp.decode(spans[0][:-1]) == text and spans[0][-1] == sp.eos_id
    assert example["ids"][-1] == sp.eos_id  # the response ends the example
  # Left truncation keeps BOS and the whole response; too long: dropped.
  n = len(full[1]["ids"])
  short = cmp.encode_comparison(c, sp, fmt, n - 5)
  assert len(short[1]["ids"]) == n - 5 and short[1]["ids"][0] == sp.bos_id
  assert np.array_equal(short[1]["ids"][-12:], full[1]["ids"][-12:])
  assert short[1]["weights"].sum() == full[1]["weights"].sum()
  stats = chat.ChatStats()
  assert cmp.encode_comparison(c, sp, fmt, 6, stats=stats) is None
  assert stats.summary()["dropped"] == {"response_too_long": 1}
  # Texts that differ only in characters this vocabulary lacks (both become
  # <unk>) are the same tokens: nothing to learn, dropped and counted.
  twins = cmp.parse_comparison(record(responses=["Snow \u2603", "Snow \u2602"]))
  assert twins.k == 2
  assert cmp.encode_comparison(twins, sp, fmt, None, stats=stats) is None
  assert stats.summary()["dropped"]["equal_after_encoding"] == 1
  # The reward model's end-of-context token: appended, never trained.
  eoc = cmp.encode_comparison(c, sp, fmt, None, end_of_context_id=7)
  # It is followed by a filler so that after the shift into inputs and
  # targets it is the last real input, where the score is read.
  assert list(eoc[0]["ids"][-2:]) == [7, 7]
  assert not eoc[0]["weights"][-2:].any()
  assert np.array_equal(eoc[0]["ids"][:-2], full[0]["ids"])
  rows = cmp.ComparisonIterator([eoc], [c.ranking], comparisons_per_batch=1,
                                max_responses=c.k, seq_len=128)
  batch = next(rows)
  last = batch["segment_ids"][0].nonzero()[0][-1]
  assert batch["inputs"][0, last] == 7
  assert np.array_equal(batch["inputs"][0, :last], full[0]["ids"])


def test_pad_equal_to_eos_keeps_the_end_of_turn_real(tmp_path):
  """SmolLM2's tokenizer (pad == eos == <|im_end|>): every response's
  end-of-turn is a real, trained token; padding is told apart by
  segment_ids, not by the pad id."""
  from mllm_jax.convert import gguf  # pylint: disable=import-outside-toplevel
  gguf.save_tokenizer(str(tmp_path), gguf.build_tokenizer(
      gguf.GGUFFile(paths.smollm2_gguf())))
  tok = load_tokenizer(str(tmp_path))
  assert tok.pad_id == tok.eos_id
  c = cmp.parse_comparison(record(responses=["Four.", "Five, surely."]))
  encoded = cmp.encode_comparison(c, tok, "hf_template", None)
  it = cmp.ComparisonIterator([encoded], [c.ranking], comparisons_per_batch=1,
                              max_responses=3, seq_len=64)
  batch = next(it)
  for row, text in enumerate(c.responses):
    real = batch["segment_ids"][row] > 0
    targets = batch["targets"][row]
    trained = targets[batch["loss_weights"][row] > 0]
    assert tok.decode(trained) == text + "<|im_end|>"
    assert trained[-1] == tok.pad_id  # trained although it is the pad id
    assert (targets[~real] == 0).all() and real.sum() == len(
        encoded[row]["ids"]) - 1
  assert not (batch["segment_ids"][2] > 0).any()  # the absent third row
  assert batch["ranks"].tolist() == [[0, 1, -1]]


def test_iterator_batches_resume_and_shard(sp):
  built, _ = sources.build(["arc_easy", "gsm8k"], 12, 0)
  kept, encoded = cmp.encode_all(built, sp, "vicuna_v1", 129)
  rankings = [c.ranking for c in kept]
  make = lambda **kw: cmp.ComparisonIterator(
      encoded, rankings, comparisons_per_batch=4, max_responses=3,
      seq_len=128, shuffle=True, seed=3, repeat=True, **kw)
  it = make()
  first = [next(it) for _ in range(3)]
  b = first[0]
  assert b["inputs"].shape == (12, 128) and b["ranks"].shape == (4, 3)
  assert set(b) == set(cmp.COMPARISON_FIELDS) | {"ranks"}
  state = it.get_state()
  later = [next(it) for _ in range(4)]  # crosses into the second pass
  again = make()
  again.set_state(json.loads(json.dumps(state)))
  for x, y in zip(later, [next(again) for _ in range(4)]):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  # Two hosts' halves are one host's batch.
  halves = [make(process_index=i, process_count=2) for i in range(2)]
  parts = [next(h) for h in halves]
  for key in b:
    assert np.array_equal(np.concatenate([p[key] for p in parts]), b[key])
  # Rows follow the ranking; absent rows have rank -1 and no real token.
  for g, ranks in enumerate(b["ranks"]):
    for k, rank in enumerate(ranks):
      assert (rank < 0) == (b["segment_ids"][g * 3 + k].sum() == 0)
  # One pass: the last batch is padded with absent comparisons; cached
  # reference log-probabilities ride along.
  ref = [np.arange(c.k, dtype=np.float32) + i for i, c in enumerate(kept)]
  one = list(cmp.ComparisonIterator(encoded, rankings,
                                    comparisons_per_batch=5, max_responses=3,
                                    seq_len=128, ref_logps=ref))
  assert len(one) == -(-len(kept) // 5)
  assert (one[-1]["ranks"] >= 0).any(axis=1).sum() == (len(kept) % 5 or 5)
  assert one[0]["ref_logps"][:3].tolist() == ref[0].tolist() + [0.0] * (
      3 - kept[0].k)
  with pytest.raises(ValueError, match="cannot resume"):
    make().set_state({**state, "seed": 4})
