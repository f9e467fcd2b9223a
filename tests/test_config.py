"""Configs fail before compilation with messages that name the field."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs.models import PRESETS, model_config
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.modeling import ModelConfig, count_params
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh, parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# Every configs/*.py module is imported and every preset's get_config called,
# in a fresh interpreter, then the heavy libraries must still be absent: a
# config file reads light dataclasses only (mllm_jax/*/config.py).
HEAVY = ("jax", "flax", "optax", "orbax", "grain")
IMPORT_EVERY_CONFIG = textwrap.dedent("""
    import inspect, json, pkgutil, sys
    import configs
    from mllm_jax.configlib import from_config
    from mllm_jax.data.config import DataConfig
    from mllm_jax.modeling.config import ModelConfig
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.train.config import OptimizerConfig, TrainConfig

    # Presets of modules whose get_config names one (default: PRESETS).
    NAMES = {"configs.mixtures": ("llama", "shakespeare"),
             "configs.vision": tuple(__import__(
                 "configs.vision", fromlist=["_"]).VISION_PRESETS)}
    SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig,
                "optimizer": OptimizerConfig, "train": TrainConfig}
    called = {}
    for info in pkgutil.walk_packages(configs.__path__, "configs."):
      module = __import__(info.name, fromlist=["_"])
      get_config = getattr(module, "get_config", None)
      if get_config is None:
        continue
      if inspect.signature(get_config).parameters:
        names = NAMES.get(info.name) or tuple(module.PRESETS)
        if info.name == "configs.pretrain":
          names += tuple(n + "-pod" for n in module.PRESETS)
      else:
        names = (None,)
      for name in names:
        config = get_config() if name is None else get_config(name)
        # The typed sections validate too (parallel: the mesh and pipeline).
        for section, cls in SECTIONS.items():
          if section in config:
            from_config(cls, config[section], section)
        if info.name == "configs.mixtures":
          from_config(DataConfig, config.data, "data")
      called[info.name] = names
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in %r)
    print(json.dumps({"called": called, "heavy": heavy}))
""" % (HEAVY,))


def test_configs_import_no_jax():
  out = subprocess.run([sys.executable, "-c", IMPORT_EVERY_CONFIG], cwd=ROOT,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["heavy"] == [], (
      f"importing configs/*.py pulled in {result['heavy']}")
  called = result["called"]
  assert {"configs.models", "configs.pretrain", "configs.mixtures",
          "configs.data.refinedweb"} <= set(called)
  assert "65b-pod" in called["configs.pretrain"]
  assert set(PRESETS) <= set(called["configs.models"])


def test_modeling_package_exports_load_lazily():
  import mllm_jax.modeling as modeling  # pylint: disable=import-outside-toplevel
  from mllm_jax.modeling import Decoder, KVCache  # pylint: disable=import-outside-toplevel
  from mllm_jax.modeling.attention import KVCache as kv_cache  # pylint: disable=import-outside-toplevel
  from mllm_jax.modeling.decoder import Decoder as decoder  # pylint: disable=import-outside-toplevel
  assert (Decoder, KVCache) == (decoder, kv_cache)
  assert {"Decoder", "KVCache", "ModelConfig", "count_params"} <= set(
      dir(modeling))
  with pytest.raises(AttributeError, match="no attribute 'Decodr'"):
    modeling.Decodr  # pylint: disable=pointless-statement


# ----------------------------------------------------------------------------
# The mesh: a stage axis above 1 is a pipeline and needs its schedule
# (tests/test_pipeline.py has the rest)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 4])
def test_stage_axis_above_one_needs_pipeline_microbatches(stage):
  message = r"parallel\.pipeline_microbatches: .*pipelines the layers"
  with pytest.raises(ConfigError, match=message):
    from_config(ParallelConfig, {"data": 1, "stage": stage}, "parallel")
  with pytest.raises(ConfigError, match=message):
    ParallelConfig(data=1, stage=stage).validate()
  # Nor can it reach a mesh another way: the --mesh flag or make_mesh.
  with pytest.raises(ConfigError, match=r"mesh\.pipeline_microbatches"):
    parse_mesh(f"data=1,stage={stage}")
  with pytest.raises(ConfigError, match="pipeline_microbatches"):
    make_mesh(ParallelConfig(data=-1, stage=stage))
  parallel = from_config(ParallelConfig, {"data": -1, "stage": stage,
                                          "pipeline_microbatches": 4},
                         "parallel")
  assert make_mesh(parallel).shape["stage"] == stage


def test_stage_axis_cannot_be_inferred():
  with pytest.raises(ConfigError, match=r"parallel\.stage: got -1.*fixed"):
    from_config(ParallelConfig, {"data": 1, "stage": -1}, "parallel")


def test_stage_axis_of_one_is_accepted():
  parallel = from_config(ParallelConfig, {"data": -1, "stage": 1, "fsdp": 2},
                         "parallel")
  assert dict(make_mesh(parallel).shape) == {
      "data": 4, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 1}
