"""PEFT (`peft.method`): LoRA parity with transformers + peft both ways,
merging, training through the one trainer with the base frozen bit for bit,
prompt / prefix / P-tuning / bottleneck adapters, shardings, adapters on
disk, and the base as a reference model.

HF models and adapters are random-initialised (never downloaded), LoRA's B
drawn nonzero so every mapping error shows in the logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.convert import hf, native
from mllm_jax.convert import peft as peft_io
from mllm_jax.modeling import Decoder, KVCache
from mllm_jax.modeling import peft as peft_lib
from mllm_jax.modeling.peft import AdapterParam, LoraParam, PeftConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import (create_sharded, logical_axes,
                                        logical_to_spec, param_shardings,
                                        use_mesh)
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.task import language_model_task, split_trainable
from mllm_jax.train.trainer import train
from tests.helpers import random_hf_llama, tiny_config

TOLERANCE = 1e-4
CFG = tiny_config("tiny")  # xla backend, float32, GQA 4/2 heads, 2 layers
PARALLEL = ParallelConfig(data=2, fsdp=2, tensor=2)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
HF_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj", "embed_tokens", "lm_head"]
# name -> (HF shape, target_modules, r, lora_alpha, use_rslora)
LORA_CASES = {
    "gqa_qv": (dict(num_key_value_heads=2), ["q_proj", "v_proj"], 4, 8, False),
    "mha_all_linear_rslora": (dict(num_key_value_heads=4), "all-linear", 8,
                              16, True),
    "tied_everything": (dict(num_key_value_heads=2, tie_word_embeddings=True),
                        ALL, 4, 8, False),
    "odd_o_down_head": (dict(vocab_size=131, hidden_size=48,
                             num_attention_heads=3, num_key_value_heads=3,
                             head_dim=16, intermediate_size=100),
                        ["o_proj", "down_proj", "lm_head"], 2, 5, False),
    "mqa_regex": (dict(num_key_value_heads=1),
                  r"model\.layers\.\d+\.(self_attn\.k_proj|mlp\.up_proj)", 3,
                  6, False),
}


def hf_peft_model(name, seed=0):
  """(random LlamaForCausalLM, the same wrapped by peft with random B)."""
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  shape, targets, r, alpha, rslora = LORA_CASES[name]
  base = random_hf_llama(seed, **{**HF_BASE, **shape})
  plain = random_hf_llama(seed, **{**HF_BASE, **shape})
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
  torch.manual_seed(seed + 1)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "lora_" in key:
        p.copy_(0.3 * torch.randn_like(p))
  return plain, model.eval()


def torch_logits(model, tokens):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def tokens_for(vocab, shape=(2, 12), seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def set_params(model, params):
  """Puts (some of) a pure dict of params into the model."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def lm_batch(cfg, batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (batch, length + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32),
          "loss_weights": np.ones((batch, length), np.float32),
          "segment_ids": np.ones((batch, length), np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1))}


class Batches:
  """The same batch again (`vary=False`), or a new one each step."""

  def __init__(self, cfg, vary=False):
    self.cfg, self.vary, self.position = cfg, vary, 0

  def __next__(self):
    self.position += 1
    return lm_batch(self.cfg, seed=self.position if self.vary else 0)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


# ----------------------------------------------------------------------------
# Config and the "none" switch
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("values, field", [
    (dict(method="qlora"), "peft.method"),
    (dict(method="lora", rank=0), "peft.rank"),
    (dict(method="lora", alpha=-1.0), "peft.alpha"),
    (dict(method="lora", dropout=1.0), "peft.dropout"),
    (dict(method="lora", targets=("q", "qkv")), "peft.targets"),
    (dict(method="lora", targets=()), "peft.targets"),
    (dict(method="prompt", num_virtual_tokens=0), "peft.num_virtual_tokens"),
    (dict(method="ptuning", encoder="gru"), "peft.encoder"),
    (dict(method="adapter", adapter_places=("ffn",)), "peft.adapter_places"),
    (dict(method="adapter", adapter_dim=0), "peft.adapter_dim"),
    (dict(rnak=4), "peft.rnak"),
])
def test_config_errors_name_the_field(values, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    from_config(PeftConfig, values, "peft")


def test_splash_cannot_see_prefixes():
  with pytest.raises(ConfigError, match="peft.method"):
    peft_lib.build_model(tiny_config("tiny", attention_backend="splash"),
                         PeftConfig("prefix"), nnx.Rngs(0))


def test_none_builds_the_plain_decoder():
  plain = Decoder(CFG, rngs=nnx.Rngs(3))
  built = peft_lib.build_model(CFG, PeftConfig(), nnx.Rngs(3))
  assert type(built) is Decoder and built.peft is None
  assert nnx.graphdef(built) == nnx.graphdef(plain)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(built),
               nnx.state(plain))
  task = peft_lib.peft_task(CFG, PeftConfig())
  reference = language_model_task(CFG, name="finetune")
  assert (task.name, task.batch_fields) == (reference.name,
                                            reference.batch_fields)
  for t in (task, reference):
    assert not jax.tree.leaves(split_trainable(plain, t.trainable)[2])


# ----------------------------------------------------------------------------
# LoRA <-> HF PEFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_lora_matches_peft_both_ways_and_merges(name, tmp_path):
  peft = pytest.importorskip("peft")
  plain, reference_model = hf_peft_model(name)
  plain.save_pretrained(tmp_path / "hf")
  reference_model.save_pretrained(tmp_path / "adapter")
  cfg, model = peft_io.load_peft_model(str(tmp_path / "hf"),
                                       str(tmp_path / "adapter"),
                                       dtype="float32")
  tokens = tokens_for(cfg.vocab_size)
  reference = torch_logits(reference_model, tokens)
  ours = np.asarray(model(jnp.asarray(tokens)))
  diff = max_diff(ours, reference)
  print(f"{name}: max |ours - transformers+peft| = {diff:.3g} "
        f"(logits up to {np.abs(reference).max():.3g})")
  assert diff <= TOLERANCE
  _, targets, r, alpha, rslora = LORA_CASES[name]
  lora = peft_lib.peft_config(model)
  assert (lora.rank, lora.alpha, lora.rslora) == (r, alpha, rslora)
  assert lora.scale == alpha / (np.sqrt(r) if rslora else r)
  assert not np.array_equal(ours, np.asarray(
      peft_lib.base_model(model)(jnp.asarray(tokens))))  # the adapter acts

  # Export (through a native adapter) and load with peft on the same base.
  peft_io.save_adapter(str(tmp_path / "native"), model)
  peft_io.native_to_peft(str(tmp_path / "native"), str(tmp_path / "back"))
  back = peft.PeftModel.from_pretrained(
      random_hf_llama(0, **{**HF_BASE, **LORA_CASES[name][0]}),
      str(tmp_path / "back")).eval()
  diff = max_diff(torch_logits(back, tokens), ours)
  print(f"{name}: exported, max |peft - ours| = {diff:.3g}")
  assert diff <= TOLERANCE
  state = {k: v for k, v in reference_model.state_dict().items()
           if "lora_" in k}
  exported = back.state_dict()
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key].numpy(), value.numpy(),
                                  err_msg=key)

  # Merged into the base: the plain Decoder, same logits (tied embeddings
  # with an adapter on them come back untied).
  merged = peft_lib.merge_lora(model)
  assert type(merged) is Decoder and merged.peft is None
  diff = max_diff(merged(jnp.asarray(tokens)), ours)
  print(f"{name}: merged, max |merged - base + adapter| = {diff:.3g}")
  assert diff <= TOLERANCE
  assert merged.cfg.tie_embeddings == (cfg.tie_embeddings and not {
      "embed", "lm_head"} & set(lora.targets))
  # The host-side merge (numpy) gives the same weights.
  host = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  merged_cfg, merged_host = peft_lib.merge_lora_params(cfg, lora, host, np)
  assert merged_cfg == merged.cfg
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               merged_host, nnx.to_pure_dict(nnx.state(merged)))


def write_adapter_config(path, **changes):
  config = json.loads((path / peft_io.PEFT_CONFIG).read_text())
  (path / peft_io.PEFT_CONFIG).write_text(json.dumps({**config, **changes}))


def test_peft_adapters_this_decoder_cannot_apply_are_refused(tmp_path):
  pytest.importorskip("peft")
  plain, model = hf_peft_model("gqa_qv")
  model.save_pretrained(tmp_path / "adapter")
  cfg = hf.config_from_hf(plain.config.to_dict(), dtype="float32")
  for changes, field in [
      (dict(use_dora=True), "use_dora"),
      (dict(peft_type="PROMPT_TUNING"), "peft_type"),
      (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
      (dict(target_modules=["layers.0.self_attn.q_proj"]), "target_modules"),
      (dict(target_modules=["q_proj", "c_attn"]), "target_modules"),
      (dict(r=8), "has shape")]:
    os.makedirs(tmp_path / field, exist_ok=True)
    for f in os.listdir(tmp_path / "adapter"):
      (tmp_path / field / f).write_bytes((tmp_path / "adapter" / f
                                          ).read_bytes())
    write_adapter_config(tmp_path / field, **changes)
    with pytest.raises(ConfigError, match=field):
      peft_io.load_peft(str(tmp_path / field), cfg)


# ----------------------------------------------------------------------------
# Training through the one trainer
# ----------------------------------------------------------------------------


def test_lora_trained_here_loads_in_peft(tmp_path):
  """Tied embeddings, every target, dropout on: trained through train() on
  an 8-device mesh, the base stays bit-identical and the exported adapter
  gives peft the same logits."""
  peft = pytest.importorskip("peft")
  shape = dict(num_key_value_heads=2, tie_word_embeddings=True)
  base = random_hf_llama(0, **{**HF_BASE, **shape})
  base.save_pretrained(tmp_path / "hf")
  cfg = hf.hf_to_native(str(tmp_path / "hf"), str(tmp_path / "base"),
                        dtype="float32")
  lora = PeftConfig("lora", rank=4, alpha=8.0, dropout=0.1,
                    targets=("q", "k", "v", "o", "gate", "up", "down",
                             "embed", "lm_head"))
  task = peft_lib.peft_task(cfg, lora, init_checkpoint=str(tmp_path / "base"))
  metrics, model = train(
      task, PARALLEL, OPT,
      TrainConfig(steps=4, batch_size=8, log_every=4, eval_every=0,
                  checkpoint_every=0), 0, str(tmp_path / "run"),
      Batches(cfg, vary=True))
  assert np.isfinite(metrics["loss"])

  _, base_params = native.load_params(str(tmp_path / "base"))
  after = nnx.to_pure_dict(nnx.state(model))
  for path, value in native.flatten(base_params).items():
    np.testing.assert_array_equal(
        np.asarray(native.flatten(after)[path]), value,
        err_msg=native.dotted(path))
  adapters = native.flatten(peft_lib.adapter_params(model))
  assert all(np.abs(np.asarray(x)).max() > 0 for x in adapters.values())
  assert len(adapters) == 2 * len(lora.targets)

  peft_io.save_adapter(str(tmp_path / "adapter"), model)
  peft_io.native_to_peft(str(tmp_path / "adapter"), str(tmp_path / "peft"),
                         base_model_name_or_path=str(tmp_path / "hf"))
  reference_model = peft.PeftModel.from_pretrained(
      random_hf_llama(0, **{**HF_BASE, **shape}),
      str(tmp_path / "peft")).eval()
  tokens = tokens_for(cfg.vocab_size)
  ours = np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
  diff = max_diff(torch_logits(reference_model, tokens), ours)
  print(f"trained adapter: max |peft - ours| = {diff:.3g}")
  assert diff <= TOLERANCE
  merged = peft_lib.merge_lora(model)
  assert max_diff(merged(jnp.asarray(tokens)), ours) <= TOLERANCE

  # The adapter alone loads into a freshly built model on another mesh.
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                       peft_lib.adapter_params(model))
  fresh = peft_io.model_from_params(
      cfg, lora, peft_lib.merge_trees(base_params, zeros),
      mesh=make_mesh(ParallelConfig(fsdp=4, tensor=2)))
  peft_io.load_adapter(str(tmp_path / "adapter"), fresh)
  assert max_diff(fresh(jnp.asarray(tokens)), ours) <= 1e-5


# A base with larger weights than a fresh init, so that what the adapters
# add to attention reaches the logits.
BASE_CFG = tiny_config("tiny", init_std=0.1)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("base") / "model"
  native.save_model(str(path), BASE_CFG, Decoder(BASE_CFG, rngs=nnx.Rngs(7)))
  return str(path)


OTHER_METHODS = {
    "prompt": PeftConfig("prompt", num_virtual_tokens=4),
    "ptuning_mlp": PeftConfig("ptuning", num_virtual_tokens=4,
                              encoder_hidden=32),
    "ptuning_lstm": PeftConfig("ptuning", num_virtual_tokens=4,
                               encoder="lstm", encoder_hidden=16),
    "prefix": PeftConfig("prefix", num_virtual_tokens=4),
    "prefix_mlp": PeftConfig("prefix", num_virtual_tokens=4,
                             encoder_hidden=32),
    "houlsby": PeftConfig("adapter", adapter_dim=16),
}


@pytest.mark.parametrize("name", ["houlsby", "prefix", "prompt",
                                  "ptuning_lstm"])
def test_each_method_trains_only_its_parameters(name, base_checkpoint,
                                                tmp_path):
  method = OTHER_METHODS[name]
  task = peft_lib.peft_task(BASE_CFG, method, init_checkpoint=base_checkpoint)
  steps = 10
  _, model = train(
      task, PARALLEL, OptimizerConfig(learning_rate=5e-2, warmup_steps=1),
      TrainConfig(steps=steps, batch_size=8, log_every=1, eval_every=0,
                  checkpoint_every=0), 0, str(tmp_path), Batches(BASE_CFG))
  # The same batch every step: step 1's loss is the starting model's.
  with open(tmp_path / "metrics.jsonl") as f:
    losses = {row["step"]: row["loss"] for row in map(json.loads, f)
              if "loss" in row}
  print(f"{name}: loss {losses[1]:.4f} -> {losses[steps]:.4f}")
  assert losses[steps] < losses[1] - 0.1

  _, base_params = native.load_params(base_checkpoint)
  after = native.flatten(nnx.to_pure_dict(nnx.state(model)))
  for path, value in native.flatten(base_params).items():
    np.testing.assert_array_equal(np.asarray(after[path]), value,
                                  err_msg=native.dotted(path))
  trained = native.flatten(peft_lib.adapter_params(model))
  initial = native.flatten(peft_lib.adapter_params(
      peft_lib.build_model(BASE_CFG, method, nnx.Rngs(0))))
  assert set(trained) == set(after) - set(native.flatten(base_params))
  assert all(not np.array_equal(np.asarray(trained[p]), initial[p])
             for p in trained), name


# ----------------------------------------------------------------------------
# Virtual tokens, prefixes and the KV cache
# ----------------------------------------------------------------------------


def test_prompt_tuning_is_prepending_virtual_tokens():
  """Keys and values from a prefill of the virtual tokens equal running them
  in front of the sequence (PEFT's way), for each packed segment alone."""
  method = OTHER_METHODS["prompt"]
  p = method.num_virtual_tokens
  for cfg in (CFG, tiny_config("tiny", position="alibi")):
    model = peft_lib.build_model(cfg, method, nnx.Rngs(1))
    base = peft_lib.base_model(model)
    tokens = jnp.asarray(tokens_for(cfg.vocab_size, (2, 10)))
    embeddings = jnp.concatenate([
        jnp.broadcast_to(model.peft.prompt_embeddings(), (2, p, cfg.embed_dim)),
        base.embed_tokens(tokens)], axis=1)
    prepended = base(None, positions=jnp.broadcast_to(jnp.arange(p + 10),
                                                      (2, p + 10)),
                     embeddings=embeddings)[:, p:]
    assert max_diff(model(tokens), prepended) <= 1e-5, cfg.position
  # Two packed segments (and padding) see the virtual tokens each.
  packed = jnp.concatenate([tokens[:1, :6], tokens[1:, :4]], axis=1)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
  segments = jnp.asarray([[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
  out = model(packed, positions=positions, segment_ids=segments)
  assert max_diff(out[:, :6], prepended[:1, :6]) <= 1e-5
  assert max_diff(out[:, 6:9], prepended[1:, :3]) <= 1e-5

  # PEFT's TEXT initialisation: the virtual tokens start as real ones.
  peft_lib.init_prompt_from_tokens(model, [5, 9, 11])
  table = np.asarray(model.embed.table[...])
  np.testing.assert_array_equal(model.peft.prompt[...], table[[5, 9, 11, 5]])


@pytest.mark.parametrize("name", ["ptuning_mlp", "prefix_mlp"])
def test_kv_cache_decoding_equals_the_full_pass(name):
  model = peft_lib.build_model(CFG, OTHER_METHODS[name], nnx.Rngs(2))
  tokens = jnp.asarray(tokens_for(CFG.vocab_size, (2, 9)))
  full = model(tokens)
  cache = KVCache.create(CFG, 2, 12)
  logits, cache = model(tokens[:, :6], cache=cache)
  steps = [logits]
  for t in range(6, 9):
    logits, cache = model(tokens[:, t:t + 1],
                          positions=jnp.full((2, 1), t, jnp.int32),
                          cache=cache)
    steps.append(logits)
  assert max_diff(jnp.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("backend", ["cpu_fused", "custom_vjp"])
def test_prefix_methods_on_every_backend(backend):
  method = OTHER_METHODS["prefix"]
  model = peft_lib.build_model(CFG, method, nnx.Rngs(4))
  other = (tiny_config("tiny", custom_vjp=True) if backend == "custom_vjp"
           else tiny_config("tiny", attention_backend=backend))
  moved = nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: peft_lib.build_model(other, method, nnx.Rngs(0)))),
                    nnx.state(model))
  tokens = jnp.asarray(tokens_for(CFG.vocab_size, (2, 8)))
  batch = {k: jnp.asarray(v) for k, v in lm_batch(CFG, 2, 8).items()}
  loss = peft_lib.peft_loss(method)

  def grads(m):
    return nnx.grad(lambda m: loss(m, batch)[0], argnums=nnx.DiffState(
        0, AdapterParam))(m)
  assert max_diff(moved(tokens), model(tokens)) <= 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               grads(moved), grads(model))


# ----------------------------------------------------------------------------
# Shardings, adapters on disk, the base as a reference
# ----------------------------------------------------------------------------


def test_adapter_params_shard_like_the_base():
  mesh = make_mesh(PARALLEL)
  rules = PARALLEL.rules
  lora = PeftConfig("lora", targets=("q", "k", "v", "o", "gate", "up", "down",
                                     "embed", "lm_head"))
  for method in (lora, *OTHER_METHODS.values()):
    abstract = nnx.eval_shape(lambda method=method: peft_lib.build_model(
        CFG, method, nnx.Rngs(0)))
    state = peft_lib.adapter_state(abstract)
    shardings = param_shardings(state, mesh, rules)
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(state),
                                          nnx.to_flat_state(shardings)):
      assert sharding.get_value().spec == logical_to_spec(
          logical_axes(var), rules, mesh), path
  # Born sharded, and the same logits as unsharded (LoRA; prompt tuning,
  # whose virtual tokens are prefilled under the mesh).
  tokens = jnp.asarray(tokens_for(CFG.vocab_size, (8, 8)))
  models = {}
  for method in (lora, OTHER_METHODS["prompt"]):
    model = create_sharded(lambda method=method: peft_lib.build_model(
        CFG, method, nnx.Rngs(0)), mesh, rules)
    with use_mesh(mesh, rules):
      sharded = jax.jit(lambda m, t: m(t))(model, tokens)
    plain = peft_lib.build_model(CFG, method, nnx.Rngs(0))
    assert max_diff(sharded, plain(tokens)) <= 1e-5, method.method
    models[method.method] = model
  spec = lambda x: tuple(x.get_value().sharding.spec)
  q, o = models["lora"].blocks.attn.peft.q, models["lora"].blocks.attn.peft.o
  # [layers, embed, rank] / [layers, rank, heads, head_dim]: like q's
  # embed (fsdp) and heads (tensor); o's A has its heads, B its embed.
  assert spec(q.lora_a) == ("stage", "fsdp", None)
  assert spec(q.lora_b) == ("stage", None, "tensor", None)
  assert spec(o.lora_a) == ("stage", "tensor", None, None)
  assert spec(o.lora_b) == ("stage", None, "fsdp")
  assert isinstance(q.lora_a, LoraParam) and isinstance(q.lora_a,
                                                         nnx.LoRAParam)


def test_adapter_save_load_and_the_base_as_reference(tmp_path):
  method = PeftConfig("lora", rank=2, targets=("q", "down", "lm_head"))
  model = peft_lib.build_model(CFG, method, nnx.Rngs(5))
  for _, var in nnx.to_flat_state(peft_lib.adapter_state(model)):
    var[...] = var[...] + 0.1  # B off zero
  tokens = jnp.asarray(tokens_for(CFG.vocab_size))
  logits = model(tokens)
  peft_io.save_adapter(str(tmp_path / "a"), model)
  saved = os.listdir(tmp_path / "a")
  assert sorted(saved) == [peft_io.ADAPTER_PARAMS, peft_io.ADAPTER_CONFIG]
  with pytest.raises(FileExistsError, match="overwrite"):
    peft_io.save_adapter(str(tmp_path / "a"), model)

  other = peft_lib.build_model(CFG, method, nnx.Rngs(6))
  peft_io.load_adapter(str(tmp_path / "a"), other)
  set_params(other, peft_lib.without_adapters(nnx.to_pure_dict(nnx.state(
      model))))
  np.testing.assert_array_equal(other(tokens), logits)
  for wrong, field in [(PeftConfig("lora", rank=4, targets=method.targets),
                        "peft.rank"),
                       (PeftConfig("lora", rank=2, targets=("q",)),
                        "peft.targets"),
                       (PeftConfig("prompt"), "prompt")]:
    with pytest.raises(ConfigError, match=field):
      peft_io.load_adapter(str(tmp_path / "a"),
                           peft_lib.build_model(CFG, wrong, nnx.Rngs(0)))

  # The base without adapters: a plain Decoder on the very same arrays, or
  # the model itself with its adapters switched off.
  base = peft_lib.base_model(model)
  assert type(base) is Decoder
  assert base.blocks.attn.q.get_value() is model.blocks.attn.q.get_value()
  reference = Decoder(CFG, rngs=nnx.Rngs(0))
  nnx.update(reference, nnx.state(base))
  np.testing.assert_array_equal(base(tokens), reference(tokens))
  with peft_lib.adapters_disabled(model):
    np.testing.assert_array_equal(model(tokens), reference(tokens))
  np.testing.assert_array_equal(model(tokens), logits)

  # Both at once in one jitted function, as a DPO loss would.
  def policy_and_reference(m, t):
    with peft_lib.adapters_disabled(m):
      ref = m(t)
    return m(t), ref
  pol, ref = jax.jit(policy_and_reference)(model, tokens)
  assert max_diff(pol, logits) <= 1e-5
  assert max_diff(ref, reference(tokens)) <= 1e-5


def test_lora_dropout_only_inside_the_training_loss(tmp_path):
  method = PeftConfig("lora", rank=2, dropout=0.5, targets=("q", "up"))
  model = peft_lib.build_model(CFG, method, nnx.Rngs(8))
  for _, var in nnx.to_flat_state(peft_lib.adapter_state(model)):
    var[...] = var[...] + 0.1
  batch = {k: jnp.asarray(v) for k, v in lm_batch(CFG, 2, 8).items()}
  plain_loss = language_model_task(CFG).loss
  deterministic = plain_loss(model, batch)[0]
  with peft_lib.lora_dropout(jax.random.key(0)):
    dropped = plain_loss(model, batch)[0]
  assert float(dropped) != float(deterministic)
  np.testing.assert_array_equal(plain_loss(model, batch)[0], deterministic)
  loss = peft_lib.peft_loss(method)
  once, again = loss(model, batch)[0], loss(model, batch)[0]
  assert float(once) == float(again) != float(deterministic)
  other = dict(batch, inputs=batch["inputs"][::-1])
  assert peft_lib.batch_key(other) != peft_lib.batch_key(batch)

  # A task starting from a base checkpoint and a native adapter restores
  # both into the model's targets.
  native.save_model(str(tmp_path / "base"), CFG, peft_lib.base_model(model))
  peft_io.save_adapter(str(tmp_path / "adapter"), model)
  task = peft_lib.peft_task(CFG, method, init_checkpoint=str(tmp_path / "base"),
                            init_adapter=str(tmp_path / "adapter"))
  fresh = task.build_model(nnx.Rngs(0))
  targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=x.sharding), nnx.to_pure_dict(nnx.state(
          fresh)))
  set_params(fresh, task.load_weights(targets))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(fresh),
               nnx.state(model))
  with pytest.raises(ConfigError, match="peft.alpha"):
    peft_lib.peft_task(CFG, PeftConfig("lora", rank=2, alpha=4.0,
                                       targets=("q", "up")),
                       init_adapter=str(tmp_path / "adapter"))
