"""Configs fail before compilation with messages that name the field."""

import pytest

from configs.models import PRESETS, model_config
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.modeling import ModelConfig, count_params


@pytest.mark.parametrize("name,expected", [
    ("7b", 6_738_415_616), ("13b", 13_015_864_320),
    ("33b", 32_528_943_616), ("65b", 65_285_660_672)])
def test_llama_parameter_counts_from_shapes_only(name, expected):
  cfg = from_config(ModelConfig, model_config(name), "model")
  assert count_params(cfg) == expected


def test_llama_table_sizes():
  hidden = {n: from_config(ModelConfig, model_config(n), "model").hidden_dim
            for n in ("7b", "13b", "33b", "65b")}
  assert hidden == {"7b": 11008, "13b": 13824, "33b": 17920, "65b": 22016}
  gqa = from_config(ModelConfig, model_config("70b_gqa"), "model")
  assert (gqa.num_heads, gqa.kv_heads) == (64, 8)


def test_every_preset_validates():
  for name in PRESETS:
    from_config(ModelConfig, model_config(name), "model")


def test_unknown_field_is_named():
  config = model_config("tiny").to_dict()
  config["num_head"] = 4
  with pytest.raises(ConfigError, match="model.num_head: unknown field"):
    from_config(ModelConfig, config, "model")
  # The ConfigDict itself also refuses a misspelt override.
  with pytest.raises(AttributeError):
    model_config("tiny").num_head = 4


@pytest.mark.parametrize("overrides,field", [
    ({"num_heads": 4, "num_kv_heads": 3}, "model.num_kv_heads"),
    ({"embed_dim": 66, "num_heads": 4}, "model.num_heads"),
    ({"attention_backend": "flash"}, "model.attention_backend"),
    ({"remat": "sometimes"}, "model.remat"),
    ({"dtype": "float8"}, "model.dtype"),
    ({"num_layers": 0}, "model.num_layers"),
    ({"position": "learned"}, "model.position"),
])
def test_bad_values_are_named(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    from_config(ModelConfig, model_config("tiny", **overrides), "model")


def test_backend_the_platform_cannot_run_names_alternatives():
  cfg = from_config(ModelConfig, model_config("tiny"), "model")
  for backend, need in (("cudnn", "NVIDIA GPU"), ("splash", "TPU")):
    bad = from_config(ModelConfig, model_config(
        "tiny", attention_backend=backend), "model")
    with pytest.raises(ConfigError, match=f"model.attention_backend.*{need}"
                       r".*'xla', 'dot_product'"):
      bad.check_platform("cpu")
  offload = from_config(ModelConfig, model_config(
      "tiny", remat="offload_dots"), "model")
  with pytest.raises(ConfigError, match="model.remat"):
    offload.check_platform("cpu")
  offload.check_platform("tpu")
  cfg.check_platform("cpu")


def test_sequence_the_model_cannot_train_names_the_field():
  cfg = ModelConfig(max_seq_len=64, loss_chunk_len=24)
  with pytest.raises(ConfigError, match="data.seq_len.*loss_chunk_len=24"):
    cfg.check_seq_len(64)
  with pytest.raises(ConfigError, match="data.seq_len.*max_seq_len=64"):
    cfg.check_seq_len(96)
  ModelConfig(max_seq_len=64, loss_chunk_len=16).check_seq_len(64)
