"""Model presets: the LLaMA table, GQA variants, and tiny test sizes.

`model_config(name)` returns an ml_collections ConfigDict holding every
ModelConfig field, so `--config.model.<field>=...` overrides any of them and a
misspelt field is rejected. Sizes follow the LLaMA paper (Touvron et al. 2023,
Table 2); the SwiGLU width is 2/3 * 4d rounded up to a multiple of 256.
"""

import dataclasses

import ml_collections

from mllm_jax.modeling.config import ModelConfig

PRESETS = {
    # LLaMA-1 (vocab 32,000, untied embeddings, RoPE theta 1e4).
    "7b": dict(embed_dim=4096, num_heads=32, num_layers=32),
    "13b": dict(embed_dim=5120, num_heads=40, num_layers=40),
    "33b": dict(embed_dim=6656, num_heads=52, num_layers=60),
    "65b": dict(embed_dim=8192, num_heads=64, num_layers=80),
    # Grouped-query attention as in LLaMA-2 70B (8 K/V heads, wider MLP).
    "70b_gqa": dict(embed_dim=8192, num_heads=64, num_kv_heads=8,
                    num_layers=80, mlp_dim=28672, max_seq_len=4096),
    # Small sizes for pretraining experiments.
    "125m": dict(embed_dim=768, num_heads=12, num_layers=12,
                 max_seq_len=2048),
    "1b": dict(embed_dim=2048, num_heads=16, num_kv_heads=8, num_layers=22,
               max_seq_len=2048),
    # Tiny configs for tests and the CPU demo (float32 compute: exact tests).
    "tiny": dict(vocab_size=512, embed_dim=64, num_heads=4, num_kv_heads=2,
                 num_layers=2, mlp_dim=160, max_seq_len=256,
                 dtype="float32"),
    "tiny_mha": dict(vocab_size=512, embed_dim=64, num_heads=4, num_layers=2,
                     mlp_dim=160, max_seq_len=256, dtype="float32"),
    "tiny_mqa": dict(vocab_size=512, embed_dim=64, num_heads=4,
                     num_kv_heads=1, num_layers=2, mlp_dim=160,
                     max_seq_len=256, dtype="float32"),
}


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  model = ModelConfig(**{**PRESETS[name], **overrides})
  config = ml_collections.ConfigDict(dataclasses.asdict(model))
  config.lock()  # a misspelt field is an error, not a new field
  return config


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """`--config=configs/models.py:7b` prints or checks one preset."""
  return ml_collections.ConfigDict({"model": model_config(name)})
