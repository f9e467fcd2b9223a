"""AdamW with warmup + cosine decay, clipping and a weight-decay mask.

Two backends compute the same update behind one `Optimizer` interface:
optax's chain (any platform, any dtype), and on CPU a fused C++ kernel
(`kernels/cpu_adamw.py`) that reads and writes each parameter, gradient and
moment once, where XLA's CPU fusions stream them several times
(docs/benchmarks.md). Both keep optax's state layout, so a checkpoint written
with one resumes with the other.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mllm_jax.configlib import ConfigError
from mllm_jax.kernels import cpu_adamw
from mllm_jax.train import offload
from mllm_jax.train.config import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
  """`warmup_steps`, or `warmup_ratio` of the run's steps where that is set."""
  if cfg.warmup_ratio > 0:
    return round(cfg.warmup_ratio * total_steps)
  return cfg.warmup_steps


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int):
  warmup = warmup_steps(cfg, total_steps)
  decay = max(cfg.decay_steps or total_steps, warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=warmup, decay_steps=decay,
      end_value=cfg.learning_rate * cfg.end_learning_rate_ratio)


def path_name(path) -> str:
  """`blocks.attn.q` for a key path into an nnx.State (drops `.value`)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if name != "value":
      parts.append(str(name))
  return ".".join(parts)


def decay_mask(params, patterns: tuple[str, ...]):
  """True for parameters that get weight decay."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(c.search(path_name(path)) for c in compiled),
      params)


class Optimizer(NamedTuple):
  """What the step needs from an optimizer, whatever computes it.

  init(params) -> state; apply(grads, state, params, grad_norm=None) ->
  (new params, new state). `grad_norm`, the gradients' global norm when the
  caller has it, spares a backend a second pass over them (optax's clip
  recomputes it; XLA shares the work). The state is optax's chain state for
  every backend.
  """
  init: Callable
  apply: Callable


def make_optimizer(cfg: OptimizerConfig, params: nnx.State, total_steps: int
                   ) -> Optimizer:
  """The optimizer for `params` (clipping first, then AdamW). Only the
  leaves of `params` get state: a stage passes its trainable part."""
  mask = decay_mask(params, cfg.no_decay)
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      mu_dtype=cfg.mu_dtype or None, weight_decay=cfg.weight_decay, mask=mask)
  if cfg.clip_norm:
    chain = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), chain)
  if cfg.offload_state:  # moments in host memory, streamed per layer
    return Optimizer(chain.init,
                     offload.streamed_apply(cfg, schedule, mask, params))
  if cfg.backend == "optax":
    def apply(grads, state, params, grad_norm=None):
      del grad_norm  # clip_by_global_norm computes it in the same program
      updates, state = chain.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return Optimizer(chain.init, apply)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if leaf.dtype != jnp.float32:
      raise ConfigError(
          f"optimizer.backend: 'cpu_fused' updates float32 parameters, but "
          f"{path_name(path)} is {leaf.dtype}; use 'optax'")
  return Optimizer(chain.init, cpu_adamw.fused_apply(cfg, schedule, mask))
