"""The LLaMA-family decoder (Flax NNX) and its building blocks."""

from mllm_jax.modeling.attention import KVCache
from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.modeling.params import count_params

__all__ = ["Decoder", "KVCache", "ModelConfig", "count_params"]
