"""The LLaMA-family decoder (Flax NNX) and its building blocks.

The re-exports below load on first use (PEP 562), so importing a light
submodule such as `mllm_jax.modeling.config` does not import JAX or Flax.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "Decoder": "mllm_jax.modeling.decoder",
    "KVCache": "mllm_jax.modeling.attention",
    "ModelConfig": "mllm_jax.modeling.config",
    "count_params": "mllm_jax.modeling.params",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from mllm_jax.modeling.attention import KVCache
  from mllm_jax.modeling.config import ModelConfig
  from mllm_jax.modeling.decoder import Decoder
  from mllm_jax.modeling.params import count_params


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
