"""Pretraining presets: `--config=configs/pretrain.py:NAME`.

NAME is one of tiny, 125m, 1b, 7b, 13b, 33b, 65b, optionally with `-pod` for
the mesh used on a multi-host pod slice (e.g. `65b-pod`). Every field can be
overridden on the command line (`--config.train.steps=100`); a misspelt field
is an error.

`tiny` trains on real text on CPU in minutes: with data_recipe="shakespeare"
the binary builds a SentencePiece tokenizer and token shards from the fetched
Shakespeare plays under WORKDIR/data. The other presets read the LLaMA mixture
(configs/mixtures.py) from token shards you point them at:
`--config.data.sources='(("cc", "/data/cc/*.tokens.npy", 67.0, 1.1), ...)'`.
"""

import dataclasses

import ml_collections

from configs.models import model_config
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.train.config import OptimizerConfig, TrainConfig

# preset -> (model preset, model overrides, one host mesh, pod mesh, remat,
#            global batch in sequences, sequence length, peak learning rate)
# `tiny` runs on CPU, with the hand-written backward passes and the fused C++
# attention and AdamW kernels (docs/benchmarks.md); the others keep
# autodiff's and optax until measured on GPU and TPU.
PRESETS = {
    "tiny": ("tiny", dict(vocab_size=1024, embed_dim=128, num_layers=4,
                          num_heads=4, num_kv_heads=2, mlp_dim=384,
                          custom_vjp=True, attention_backend="cpu_fused"),
             dict(data=-1), dict(data=-1), "none", 16, 256, 3e-3),
    "125m": ("125m", {}, dict(data=1, fsdp=-1), dict(data=-1, fsdp=8), "none",
             256, 2048, 6e-4),
    "1b": ("1b", {}, dict(data=1, fsdp=-1), dict(data=-1, fsdp=16), "save_dots",
           512, 2048, 3e-4),
    # LLaMA: 4M-token batches (2048 x 2048), peak lr 3e-4 (1.5e-4 for 33b/65b).
    "7b": ("7b", {}, dict(data=1, fsdp=-1), dict(data=-1, fsdp=64), "save_dots",
           2048, 2048, 3e-4),
    "13b": ("13b", {}, dict(data=1, fsdp=-1), dict(data=-1, fsdp=128), "full",
            2048, 2048, 3e-4),
    "33b": ("33b", {}, dict(data=1, fsdp=-1), dict(data=1, fsdp=-1, tensor=4), "full",
            2048, 2048, 1.5e-4),
    "65b": ("65b", {}, dict(data=1, fsdp=-1), dict(data=1, fsdp=-1, tensor=4), "full",
            2048, 2048, 1.5e-4),
}


# Gradient accumulation that makes the 4M-token batch fit, from the
# ahead-of-time compiles in docs/scale.md (7b on v5p-8, 65b-pod on v5p-256):
# micro-batches of about 4 sequences per data shard. 7b on v4-8 (4 chips)
# also needs model.remat=full, grad_accum_steps=512 and
# optimizer.mu_dtype=bfloat16.
GRAD_ACCUM = {"7b": 128, "65b-pod": 16}


def _dataclass_config(obj) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(obj))


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  base, pod = name.removesuffix("-pod"), name.endswith("-pod")
  if base not in PRESETS:
    raise ValueError(f"unknown pretrain preset {name!r}; choose one of "
                     f"{sorted(PRESETS)} (optionally with -pod)")
  (model_name, model_overrides, host_mesh, pod_mesh, remat, batch, seq_len,
   lr) = PRESETS[base]
  tiny = base == "tiny"

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(model_name, remat=remat, max_seq_len=seq_len,
                              **model_overrides)
  config.parallel = _dataclass_config(
      ParallelConfig(**(pod_mesh if pod else host_mesh)))
  config.data_recipe = "shakespeare" if tiny else ""
  config.init_checkpoint = ""  # a native checkpoint to start from
  config.data = ml_collections.ConfigDict(dict(
      sources=(), tokenizer="", seq_len=seq_len, seed=0, weight_by="tokens",
      repeat=True, prefetch=2, eval_sources=()))
  config.optimizer = _dataclass_config(OptimizerConfig(
      learning_rate=lr, warmup_steps=30 if tiny else 2000,
      weight_decay=0.01 if tiny else 0.1,
      backend="cpu_fused" if tiny else "optax"))
  config.train = _dataclass_config(TrainConfig(
      steps=300 if tiny else 250_000, batch_size=batch, log_every=10,
      grad_accum_steps=GRAD_ACCUM.get(name, 1),
      eval_every=100 if tiny else 1000, eval_batches=8 if tiny else 50,
      checkpoint_every=100 if tiny else 1000))
  config.lock()
  return config
