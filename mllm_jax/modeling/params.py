"""Parameter counts from shapes alone (nothing is allocated)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from mllm_jax.modeling.config import ModelConfig
from mllm_jax.modeling.decoder import Decoder


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count of the decoder, via `nnx.eval_shape`."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
