"""HF <-> native conversion: logits parity with transformers, round trips,
the CLI, refusals, sharded loading, and Meta's RoPE permutation.

HF models are random-initialised from LlamaConfig (never downloaded), with
weights redrawn at O(1) scale so every mapping error shows in the logits.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax.configlib import ConfigError  # noqa: E402
from mllm_jax.convert import hf, meta, native  # noqa: E402
from mllm_jax.modeling.config import ModelConfig  # noqa: E402
from mllm_jax.modeling.layers import apply_rope, rope_frequencies  # noqa: E402
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import make_mesh  # noqa: E402
from mllm_jax.parallel.sharding import param_shardings  # noqa: E402
from tests.helpers import random_hf_llama  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=64,
              rope_theta=500000.0)
SHAPES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "odd": dict(vocab_size=131, hidden_size=48, num_attention_heads=3,
                num_key_value_heads=3, head_dim=16, intermediate_size=100),
    # head_dim set apart from hidden_size / num_heads.
    "wide_heads": dict(vocab_size=97, hidden_size=40, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=12,
                       intermediate_size=72),
    "llama3_rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3),
    "linear_rope": dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", factor=4.0, rope_theta=10000.0)),
}
# Offsets beyond the RoPE scaling's original length exercise every band.
POSITIONS = np.arange(24)[None] + np.array([[0], [300]])


def hf_model(seed=0, **overrides):
  return random_hf_llama(seed, **{**BASE, **overrides})


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens),
                 position_ids=torch.tensor(POSITIONS)).logits.numpy()


def our_logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(
      POSITIONS)))


def tokens_for(vocab_size):
  return np.random.RandomState(0).randint(0, vocab_size, POSITIONS.shape)


def from_pretrained(path):
  return transformers.LlamaForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """shape name -> (HF model, HF dir, native dir), built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      model = hf_model(**SHAPES[name])
      model.save_pretrained(root / "hf")
      hf.hf_to_native(str(root / "hf"), str(root / "native"), dtype="float32")
      cache[name] = model, root / "hf", root / "native"
    return cache[name]

  return get


# ----------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_transformers_and_round_trip(name, converted, tmp_path):
  model, _, native_dir = converted(name)
  cfg, ours = native.load_model(str(native_dir))
  assert (cfg.dtype, cfg.param_dtype) == ("float32", "float32")
  tokens = tokens_for(cfg.vocab_size)
  reference = hf_logits(model, tokens)
  diff = np.abs(our_logits(ours, tokens) - reference).max()
  print(f"{name}: max |ours - transformers| = {diff:.3g}")
  assert diff <= TOLERANCE

  hf.native_to_hf(str(native_dir), str(tmp_path / "back"))
  back = from_pretrained(tmp_path / "back")
  original, exported = model.state_dict(), back.state_dict()
  assert sorted(original) == sorted(exported)
  for key in original:
    np.testing.assert_array_equal(exported[key].numpy(),
                                  original[key].numpy(), err_msg=key)
  np.testing.assert_array_equal(hf_logits(back, tokens), reference)
  again = hf.config_from_hf(hf.read_hf_config(str(tmp_path / "back")),
                            dtype="float32")
  assert again == cfg


def test_sharded_safetensors_and_torch_pickle(converted, tmp_path):
  model, hf_dir, native_dir = converted("gqa")
  cfg, params = hf.load_hf(str(hf_dir), dtype="float32")
  hf.native_to_hf(str(native_dir), str(tmp_path / "sharded"),
                  max_shard_bytes=64 * 1024)
  files = sorted(os.listdir(tmp_path / "sharded"))
  assert hf.SAFETENSORS_INDEX in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  tokens = tokens_for(cfg.vocab_size)
  np.testing.assert_array_equal(
      hf_logits(from_pretrained(tmp_path / "sharded"), tokens),
      hf_logits(model, tokens))
  _, resharded = hf.load_hf(str(tmp_path / "sharded"), dtype="float32")
  jax.tree.map(np.testing.assert_array_equal, resharded, params)

  os.makedirs(tmp_path / "bin")
  (tmp_path / "bin" / "config.json").write_text(
      (hf_dir / "config.json").read_text())
  torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
             tmp_path / "bin" / hf.TORCH_FILE)
  _, from_bin = hf.load_hf(str(tmp_path / "bin"), dtype="float32")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, b.astype(jnp.bfloat16).astype(np.float32)), from_bin, params)


def test_cli_round_trip(converted, tmp_path):
  model, hf_dir, _ = converted("mqa")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.convert_checkpoint", *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)

  out = cli("--from=hf", f"--input={hf_dir}", f"--output={tmp_path / 'n'}",
            "--dtype=float32", "--weight_dtype=bfloat16")
  assert out.returncode == 0, out.stderr
  cfg = json.loads((tmp_path / "n" / native.CONFIG_FILE).read_text())
  assert (cfg["dtype"], cfg["param_dtype"]) == ("float32", "bfloat16")
  out = cli("--from=native", f"--input={tmp_path / 'n'}",
            f"--output={tmp_path / 'hf'}", "--weight_dtype=float32")
  assert out.returncode == 0, out.stderr
  exported = from_pretrained(tmp_path / "hf").state_dict()
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(  # Only the bfloat16 rounding is lost.
        exported[key].numpy(), value.to(torch.bfloat16).float().numpy())

  missing = cli("--from=hf", f"--input={tmp_path / 'nope'}",
                f"--output={tmp_path / 'x'}")
  assert missing.returncode != 0
  assert "nope does not exist" in missing.stderr
  assert "Traceback" not in missing.stderr


# ----------------------------------------------------------------------------
# Refusals and validation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("config, field", [
    (transformers.MistralConfig(sliding_window=16), "model_type"),
    (transformers.LlamaConfig(attention_bias=True), "attention_bias"),
    (transformers.LlamaConfig(mlp_bias=True), "mlp_bias"),
    (transformers.LlamaConfig(hidden_act="gelu"), "hidden_act"),
    (transformers.LlamaConfig(rope_parameters=dict(
        rope_type="yarn", factor=2.0, rope_theta=1e4)), "rope_type"),
], ids=["mistral", "attention_bias", "mlp_bias", "gelu", "yarn"])
def test_refuses_unsupported_config(config, field, tmp_path):
  config.save_pretrained(tmp_path)
  with pytest.raises(ConfigError, match=field):
    hf.load_hf(str(tmp_path))


def test_refuses_unsupported_architecture_name():
  config = transformers.LlamaConfig().to_dict()
  config["architectures"] = ["LlamaForSequenceClassification"]
  with pytest.raises(ConfigError, match="architectures"):
    hf.config_from_hf(config)


def test_legacy_rope_scaling_spelling():
  """transformers 4 configs: top-level rope_theta, rope_scaling with 'type'."""
  config = {**BASE, "model_type": "llama", "rope_theta": 5e5,
            "rope_scaling": {"type": "linear", "factor": 2.0}}
  cfg = hf.config_from_hf(config)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (
      5e5, "linear", 2.0)


def test_refuses_stray_and_misshapen_tensors(converted, tmp_path):
  _, hf_dir, _ = converted("gqa")
  model = hf_model(**SHAPES["gqa"])
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config = (hf_dir / "config.json").read_text()
  from safetensors.numpy import save_file
  for name, tensors, message in [
      ("bias", {**state, "model.layers.0.self_attn.q_proj.bias":
                np.zeros(64, np.float32)}, "q_proj.bias"),
      ("shape", {**state, "model.layers.1.mlp.up_proj.weight":
                 np.zeros((95, 64), np.float32)}, "mlp.up_proj.weight"),
      ("missing", {k: v for k, v in state.items() if "norm" not in k},
       "layernorm.weight")]:
    os.makedirs(tmp_path / name)
    (tmp_path / name / "config.json").write_text(config)
    save_file(tensors, str(tmp_path / name / hf.SAFETENSORS_FILE))
    with pytest.raises(ConfigError, match=message):
      hf.load_hf(str(tmp_path / name))
  with pytest.raises(FileNotFoundError, match="has no weights"):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(config)
    hf.load_hf(str(tmp_path / "empty"))


def test_native_checkpoint_validation(converted, tmp_path):
  _, _, native_dir = converted("gqa")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    native.load_model(str(tmp_path / "nope"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=native.CONFIG_FILE):
    native.load_model(str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match="blocks.mlp.down has shape"):
    native.load_model(str(native_dir), mlp_dim=128)
  config_file = native_dir / native.CONFIG_FILE
  values = json.loads(config_file.read_text())
  (tmp_path / "empty" / native.CONFIG_FILE).write_text(
      json.dumps({**values, "num_layer": 3}))
  with pytest.raises(ConfigError, match="model.num_layer"):
    native.load_model(str(tmp_path / "empty"))

  cfg, params = native.load_params(str(native_dir))
  with pytest.raises(FileExistsError, match="overwrite"):
    native.save_model(str(native_dir), cfg, params)
  bad = {**params, "embed": {"table": np.zeros((3, 64), np.float32)}}
  with pytest.raises(ConfigError, match="embed.table"):
    native.save_model(str(tmp_path / "bad"), cfg, bad)


# ----------------------------------------------------------------------------
# Sharded loading
# ----------------------------------------------------------------------------


def test_load_onto_mesh_matches_unsharded(converted, tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  _, hf_dir, native_dir = converted("gqa")
  mesh = make_mesh(ParallelConfig(data=2, fsdp=2, tensor=2))
  _, plain = native.load_model(str(native_dir))
  cfg, sharded = native.load_model(str(native_dir), mesh=mesh)
  _, from_hf = hf.load_hf_model(str(hf_dir), mesh=mesh, dtype="float32")
  plain_state = native.flatten(native.to_pure(plain))
  expected = native.flatten(native.to_pure(param_shardings(
      native.abstract_model(cfg)[1], mesh, ParallelConfig().rules)))
  for model in (sharded, from_hf):
    for path, array in native.flatten(native.to_pure(model)).items():
      assert array.sharding == expected[path], path
      np.testing.assert_array_equal(np.asarray(array),
                                    np.asarray(plain_state[path]))
  assert any(len(a.sharding.device_set) == 8
             for a in native.flatten(native.to_pure(sharded)).values())

  # Device-resident (sharded) models save and export without a host copy.
  native.save_model(str(tmp_path / "resaved"), cfg, sharded)
  _, resaved = native.load_params(str(tmp_path / "resaved"))
  hf.save_hf(str(tmp_path / "hf"), cfg, sharded)
  _, exported = hf.load_hf(str(tmp_path / "hf"), dtype="float32")
  for params in (resaved, exported):
    for path, array in native.flatten(params).items():
      np.testing.assert_array_equal(array, np.asarray(plain_state[path]))
  cfg16, half = native.load_model(str(native_dir), mesh=mesh,
                                  param_dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert {a.dtype for a in jax.tree.leaves(native.to_pure(half))} == {
      jnp.dtype("bfloat16")}


# ----------------------------------------------------------------------------
# Meta's interleaved RoPE layout
# ----------------------------------------------------------------------------


def interleaved_rope(x, positions, inv_freq):
  """Meta's reference RoPE, in numpy: rotates adjacent pairs (2i, 2i+1)."""
  angles = positions[:, :, None, None] * inv_freq  # [B, T, 1, Dh/2]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
  out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
  return out


def test_interleaved_to_half_permutation():
  rng = np.random.RandomState(0)
  cfg = ModelConfig(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=16)
  inv_freq = rope_frequencies(cfg)
  x = rng.randn(2, 7, 32).astype(np.float32)
  positions = np.stack([np.arange(7), np.arange(7) + 50]).astype(np.float32)
  wq_meta = rng.randn(4 * 16, 32).astype(np.float32)  # torch Linear [out, in]
  wk_meta = rng.randn(2 * 16, 32).astype(np.float32)

  def meta_side(w, heads):
    return interleaved_rope(np.einsum("btd,dhk->bthk", x, w.T.reshape(
        32, heads, 16)), positions, inv_freq)

  def our_side(w, heads):
    return np.asarray(apply_rope(
        jnp.einsum("btd,dhk->bthk", x, meta.meta_qk_to_native(w, heads)),
        jnp.asarray(positions), inv_freq))

  q_ref, k_ref = meta_side(wq_meta, 4), meta_side(wk_meta, 2)
  q, k = our_side(wq_meta, 4), our_side(wk_meta, 2)
  np.testing.assert_allclose(q, meta.interleaved_to_half(q_ref), atol=1e-5)
  np.testing.assert_allclose(meta.half_to_interleaved(k), k_ref, atol=1e-5)
  # Attention scores (GQA: query head h reads K/V head h // 2) are unchanged.
  scores_ref = np.einsum("bthd,bshd->bhts", q_ref, np.repeat(k_ref, 2, 2))
  scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, 2, 2))
  np.testing.assert_allclose(scores, scores_ref, rtol=1e-5, atol=1e-4)
  w = rng.randn(3, 5, 4, 16)
  np.testing.assert_array_equal(
      meta.half_to_interleaved(meta.interleaved_to_half(w)), w)
