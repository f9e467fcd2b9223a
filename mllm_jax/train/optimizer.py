"""AdamW with warmup + cosine decay, clipping and a weight-decay mask."""

from __future__ import annotations

import dataclasses
import re

import jax
import optax
from flax import nnx

from mllm_jax.configlib import check, check_choice


MU_DTYPES = ("", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """LLaMA's recipe by default: AdamW(0.9, 0.95), decay 0.1, clip 1.0, cosine
  to 10% of the peak after a linear warmup.

  `no_decay` lists regular expressions matched against parameter paths
  (`blocks.attn_norm.scale`, `embed.table`, ...): norms and embeddings are not
  decayed.
  """
  learning_rate: float = 3e-4
  warmup_steps: int = 2000
  decay_steps: int = 0  # 0: the run's train.steps
  end_learning_rate_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: tuple[str, ...] = (r"norm", r"^embed\.")
  clip_norm: float = 1.0  # 0 disables clipping
  # dtype of AdamW's first moment: "" keeps the parameters' dtype; "bfloat16"
  # halves it (optax's `mu_dtype`, as MaxText offers). The second moment and
  # the master weights keep the parameters' dtype. 7B on 4 v4 chips needs it.
  mu_dtype: str = ""

  def validate(self, prefix: str = "optimizer") -> None:
    check(self.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0")
    check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
    check(self.decay_steps >= 0, f"{prefix}.decay_steps", "must be >= 0")
    check(0 <= self.end_learning_rate_ratio <= 1,
          f"{prefix}.end_learning_rate_ratio", "must be in [0, 1]")
    check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{prefix}.b1",
          "b1 and b2 must be in [0, 1)")
    check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
    check(self.clip_norm >= 0, f"{prefix}.clip_norm", "must be >= 0")
    check_choice(self.mu_dtype, MU_DTYPES, f"{prefix}.mu_dtype")
    for i, pattern in enumerate(self.no_decay):
      try:
        re.compile(pattern)
      except re.error as e:
        check(False, f"{prefix}.no_decay[{i}]", f"bad regular expression: {e}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int):
  decay = max(cfg.decay_steps or total_steps, cfg.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=cfg.warmup_steps, decay_steps=decay,
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


def make_optimizer(cfg: OptimizerConfig, params: nnx.State,
                   total_steps: int) -> optax.GradientTransformation:
  """The optimizer for `params` (clipping first, then AdamW)."""
  adamw = optax.adamw(
      learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
      eps=cfg.eps, mu_dtype=cfg.mu_dtype or None,
      weight_decay=cfg.weight_decay, mask=decay_mask(params, cfg.no_decay))
  if cfg.clip_norm:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
