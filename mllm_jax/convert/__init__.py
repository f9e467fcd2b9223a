"""Checkpoint conversion: HuggingFace LLaMA <-> native (Orbax) checkpoints,
and LLaMA-architecture GGUF files (llama.cpp) -> native."""

from mllm_jax.convert.gguf import gguf_to_native, load_gguf
from mllm_jax.convert.hf import (config_from_hf, config_to_hf, hf_to_native,
                                 load_hf, load_hf_model, native_to_hf,
                                 save_hf)
from mllm_jax.convert.meta import half_to_interleaved, interleaved_to_half
from mllm_jax.convert.native import load_model, load_params, save_model

__all__ = [
    "config_from_hf", "config_to_hf", "gguf_to_native", "half_to_interleaved",
    "hf_to_native", "interleaved_to_half", "load_gguf", "load_hf",
    "load_hf_model", "load_model", "load_params", "native_to_hf", "save_hf",
    "save_model",
]
