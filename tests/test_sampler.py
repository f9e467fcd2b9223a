"""The KV-cache sampler: parity with transformers' greedy generate, left
padding, sampling distributions, stops, streaming, interrupt/resume and
sharded decoding.

The reference model is a random-initialised LlamaForCausalLM (never
downloaded) with O(1) weights, so near-ties in argmax are unlikely.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.convert import hf, native  # noqa: E402
from mllm_jax.eval.scoring import Scorer  # noqa: E402
from mllm_jax.generate.sampler import Sampler  # noqa: E402
from mllm_jax.generate.sampling import (  # noqa: E402
    SamplingParams, filter_logits, sample)
from mllm_jax.modeling import Decoder, KVCache, ModelConfig  # noqa: E402
from mllm_jax.modeling import peft as peft_lib  # noqa: E402
from mllm_jax.modeling.peft import PeftConfig  # noqa: E402
from mllm_jax.parallel.config import DEFAULT_RULES, ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import make_mesh  # noqa: E402
from tests.helpers import random_hf_llama, tiny_config  # noqa: E402

VOCAB = 259  # ByteTokenizer's size, so eval tests can share the model.
PROMPTS = [[1, 72, 105, 33, 200, 7], [1, 40], [1, 9, 9, 14, 15, 16, 17, 18,
                                               19, 250, 251, 3, 4, 5, 6, 8, 9]]


def hf_llama(seed: int = 0, **overrides):
  """The shared random reference model, set up for greedy `generate`."""
  model = random_hf_llama(seed, **{
      **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5), **overrides})
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def convert(model, root):
  """HF model -> native checkpoint dir (float32 compute)."""
  model.save_pretrained(root / "hf")
  hf.hf_to_native(str(root / "hf"), str(root / "native"), dtype="float32")
  return str(root / "native")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(HF model, our Decoder, native dir) on the same weights."""
  reference = hf_llama()
  path = convert(reference, tmp_path_factory.mktemp("sampler"))
  _, model = native.load_model(path)
  return reference, model, path


@pytest.fixture(scope="module")
def greedy(pair):
  """Greedy 12-token continuations of PROMPTS, batched."""
  return Sampler(pair[1]).generate(PROMPTS, 12)


def hf_greedy(model, prompt, n):
  out = model.generate(torch.tensor([prompt]), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False,
                       output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[0, len(prompt):].tolist()
  logp = torch.log_softmax(torch.stack(out.logits, 1)[0].float(), -1)
  return tokens, logp[torch.arange(n), torch.tensor(tokens)].numpy()


def test_greedy_matches_transformers(pair, greedy):
  reference, _, _ = pair
  worst = 0.0
  for i, prompt in enumerate(PROMPTS):
    tokens, logprobs = hf_greedy(reference, prompt, 12)
    assert greedy.tokens[i] == tokens
    worst = max(worst, np.abs(greedy.logprobs[i] - logprobs).max())
  print(f"max |logprob ours - transformers| = {worst:.3g}")
  assert worst <= 1e-4
  assert greedy.stop_reasons == ["length"] * 3


def test_padded_prompt_equals_prompt_alone(pair, greedy):
  sampler = Sampler(pair[1])
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.generate([prompt], 12)
    assert alone.tokens[0] == greedy.tokens[i]
    np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[i],
                               atol=1e-5)
  # Next-token logits, padded to 17 (batched) and alone (2 tokens).
  sampler.prompt_multiple = 1
  batched = sampler.generate(PROMPTS, 1)
  alone = sampler.generate(PROMPTS[1:2], 1)
  np.testing.assert_allclose(np.asarray(batched.state.logits[1]),
                             np.asarray(alone.state.logits[0]), atol=1e-5)


# ----------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------


def chi_square_p(counts, probs):
  n = counts.sum()
  expected = probs * n
  keep = expected > 0
  assert counts[~keep].sum() == 0
  stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
  dof = keep.sum() - 1  # survival function of chi-square(dof) at stat
  return float(jax.scipy.special.gammaincc(dof / 2, stat / 2))


def test_temperature_follows_softmax_through_the_sampler():
  """First sampled token of many identical prompts ~ softmax(logits / T)."""
  cfg = ModelConfig(vocab_size=8, embed_dim=16, num_layers=1, num_heads=2,
                    mlp_dim=32, dtype="float32", init_std=0.5)
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  prompt = [1, 2, 3]
  logits = np.asarray(model(jnp.asarray([prompt])))[0, -1].astype(np.float64)
  n, temperature = 4000, 0.7
  out = Sampler(model).generate([prompt] * n, 1, seed=1, sampling=(
      SamplingParams(temperature=temperature)))
  counts = np.bincount([t[0] for t in out.tokens], minlength=8)
  probs = np.exp(logits / temperature - (logits / temperature).max())
  p_value = chi_square_p(counts, probs / probs.sum())
  print(f"chi-square p = {p_value:.3f}; counts {counts.tolist()}")
  assert p_value > 1e-3
  # Log-probs are under the unmodified (T=1) softmax.
  logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  np.testing.assert_allclose(out.logprobs[0][0], logp[out.tokens[0][0]],
                             atol=1e-5)


@pytest.mark.parametrize("params", [
    SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20)], ids=["greedy", "T_top_p",
                                                      "T_top_k"])
def test_logprobs_equal_the_training_forward_pass(pair, params):
  """Rollout log-probs (left-padded prompts of different lengths, sampled)
  equal a float32 forward pass over prompt + response without a cache, and
  the processed ones equal the filtered, tempered softmax there."""
  model = pair[1]
  out = Sampler(model).generate(PROMPTS, 10, sampling=params, seed=3,
                                processed_logprobs=True)
  sequences = [p + t for p, t in zip(PROMPTS, out.tokens)]
  scored = Scorer(model).sequence_logprobs(sequences)
  for i, prompt in enumerate(PROMPTS):
    n = len(out.tokens[i])
    assert n == 10 and out.logprobs[i].shape == (n,)
    np.testing.assert_allclose(out.logprobs[i], scored[i][0][-n:], atol=1e-5)
    logits = model(jnp.asarray([sequences[i]]))[0, len(prompt) - 1:-1]
    drawn = jax.nn.log_softmax(filter_logits(logits, params), axis=-1) if (
        not params.greedy) else jnp.zeros_like(logits)
    expect = np.asarray(drawn)[np.arange(n), out.tokens[i]]
    np.testing.assert_allclose(out.processed_logprobs[i], expect, atol=1e-5)
    assert np.isfinite(out.processed_logprobs[i]).all()
  assert Sampler(model).generate(PROMPTS, 2).processed_logprobs is None


LOGITS = np.log(np.array([0.30, 0.22, 0.15, 0.12, 0.09, 0.06, 0.04, 0.02]))


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=2.0), 8),
    (SamplingParams(temperature=1.0, top_k=3), 3),
    (SamplingParams(temperature=1.0, top_p=0.6), 3),  # .30+.22 < .6 <= +.15
    (SamplingParams(temperature=0.5, top_k=5, top_p=0.5), 2),
], ids=["T2", "top_k3", "top_p0.6", "k5_p0.5_T0.5"])
def test_filters_follow_renormalised_softmax(params, allowed):
  n = 20000
  logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, 8))
  tokens = np.asarray(sample(logits, jax.random.key(0), params))
  counts = np.bincount(tokens, minlength=8)
  assert counts[allowed:].sum() == 0, counts  # never an excluded token
  assert (counts[:allowed] > 0).all()
  scaled = np.exp(LOGITS / params.temperature)
  scaled[allowed:] = 0
  assert chi_square_p(counts, scaled / scaled.sum()) > 1e-3
  kept = np.isfinite(np.asarray(filter_logits(logits[:1], params)))[0]
  assert kept.sum() == allowed


def test_greedy_ignores_filters():
  logits = jnp.asarray([LOGITS[::-1]], jnp.float32)
  assert int(sample(logits, jax.random.key(0), SamplingParams())[0]) == 7


# ----------------------------------------------------------------------------
# Stops, streaming, interrupts
# ----------------------------------------------------------------------------


class TagTokenizer:
  """Decodes id i as '<i>', so stop strings are easy to place."""
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, VOCAB

  def encode(self, text, add_bos=False, add_eos=False):
    ids = [int(x) for x in text.replace(">", " ").replace("<", " ").split()]
    return [1] * add_bos + ids + [2] * add_eos

  def decode(self, ids):
    return "".join(f"<{int(i)}>" for i in ids)


def test_stop_token_ends_only_its_row(pair, greedy):
  stop = greedy.tokens[0][4]
  out = Sampler(pair[1]).generate(PROMPTS, 12, stop_tokens=[stop])
  first = greedy.tokens[0].index(stop)
  assert out.tokens[0] == greedy.tokens[0][:first + 1]
  assert out.stop_reasons[0] == "stop_token"
  for i in (1, 2):
    expect = greedy.tokens[i]
    if stop in expect:
      expect = expect[:expect.index(stop) + 1]
    assert out.tokens[i] == expect
  assert len(out.logprobs[0]) == first + 1


def test_stop_string_and_streaming(pair, greedy):
  sampler = Sampler(pair[1], tokenizer=TagTokenizer())
  target = greedy.tokens[2][5]
  stop = f"<{target}>"
  chunks = []
  out = sampler.generate(PROMPTS, 12, stop_strings=[stop], chunk_size=3,
                         on_chunk=chunks.append)
  cut = greedy.tokens[2].index(target)
  assert out.tokens[2] == greedy.tokens[2][:cut + 1]
  assert out.texts[2] == TagTokenizer().decode(greedy.tokens[2][:cut])
  assert out.stop_reasons[2] == "stop_string"
  assert len(chunks) >= 2
  for i in range(3):
    streamed = [t for chunk in chunks for t in chunk[i]]
    assert streamed == out.tokens[i]


def test_interrupt_then_resume_equals_generating_from_scratch(pair, greedy):
  sampler = Sampler(pair[1])
  marker = greedy.tokens[0][3]
  first = sampler.generate(PROMPTS[:2], 12, interrupt_tokens=[marker])
  cut = greedy.tokens[0].index(marker)
  assert first.tokens[0] == greedy.tokens[0][:cut + 1]
  assert first.stop_reasons[0] == "interrupt"
  index = int(first.state.cache.index)
  tool_result = [77, 78, 79, 80, 81]
  cache_len = first.state.cache.max_len
  resumed = sampler.resume(first, [tool_result, []], 30, rows=[0])
  # Only the appended tokens and the new steps went through the model, and
  # the cache grew to make room for them.
  assert int(resumed.state.cache.index) == index + 16 + 30
  assert resumed.state.cache.max_len > cache_len
  assert resumed.tokens[1] == []  # row 1 was not resumed
  scratch = sampler.generate([PROMPTS[0] + first.tokens[0] + tool_result], 30)
  assert resumed.tokens[0] == scratch.tokens[0]
  np.testing.assert_allclose(resumed.logprobs[0], scratch.logprobs[0],
                             atol=1e-4)


# ----------------------------------------------------------------------------
# Sharded decoding and input errors
# ----------------------------------------------------------------------------


def test_sharded_decoding_matches(pair, greedy):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = make_mesh(ParallelConfig(data=2, fsdp=2, tensor=2))
  # The byte vocabulary (259) does not split over tensor=2: replicate it.
  rules = (("vocab", None), ("act_vocab", None)) + DEFAULT_RULES
  _, model = native.load_model(pair[2], mesh=mesh, rules=rules)
  out = Sampler(model, mesh=mesh, rules=rules).generate(PROMPTS, 12)
  assert out.tokens == greedy.tokens
  for a, b in zip(out.logprobs, greedy.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-4)
  k = out.state.cache.k[0]  # layer 0's keys, [B, KV, S, D]
  assert k.shape[0] == 4  # 3 prompts padded to the 4 batch shards
  assert len(k.sharding.device_set) == 8
  assert k.sharding.shard_shape(k.shape)[0] == 1


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[1], []], {}, "prompt 1 is empty"),
    ([[1, VOCAB]], {}, "outside the vocabulary"),
    (["hi"], {}, "need Sampler\\(tokenizer"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"stop_strings": ["x"]}, "stop_strings need"),
    ([[1]], {"sampling": SamplingParams(top_p=0)}, "top_p"),
])
def test_bad_input_is_refused(pair, prompts, kwargs, message):
  kwargs = {"max_new_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    Sampler(pair[1]).generate(prompts, **kwargs)


@pytest.mark.parametrize("position, method", [
    ("alibi", None), ("rope", "prefix"), ("rope", "lora")])
def test_per_layer_cache_equals_the_stacked_one(position, method):
  """The sampler's cache layout (per layer, heads-major, blocks run one by
  one on `layer_states`) computes what the stacked cache and scan do, for
  GQA: a left-padded prefill, then decode steps."""
  cfg = tiny_config("tiny", position=position)
  peft = None if method is None else PeftConfig(method, num_virtual_tokens=4)
  model = (Decoder(cfg, nnx.Rngs(1)) if peft is None else
           peft_lib.build_model(cfg, peft, nnx.Rngs(1)))
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 200, (2, 9)))
  segments = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6])
  runs = []
  for per_layer in (False, True):
    layers = model.layer_states() if per_layer else None
    cache = KVCache.create(cfg, 2, 16, per_layer=per_layer)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    out, cache = model(tokens[:, :6], positions, segments, cache=cache,
                       layers=layers)
    outs = [out]
    for t in range(6, 9):
      pos = positions[:, -1:] + t - 5
      out, cache = model(tokens[:, t:t + 1], pos, jnp.ones((2, 1), jnp.int32),
                         cache=cache, layers=layers)
      outs.append(out)
    runs.append(jnp.concatenate(outs, axis=1))
  np.testing.assert_allclose(runs[1], runs[0], atol=1e-5)
  with pytest.raises(ValueError, match="per-layer KVCache needs layers"):
    model(tokens[:, :1], cache=KVCache.create(cfg, 2, 4, per_layer=True))
