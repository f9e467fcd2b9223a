"""The training configs: how long and how to optimise. Light on purpose.

Config files (`configs/*.py`) import these dataclasses, so this module
imports no JAX: reading or checking a config never starts a backend.
"""

from __future__ import annotations

import dataclasses
import re

from mllm_jax.configlib import check, check_choice


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long to train and how often to log, evaluate and save."""
  steps: int = 1000
  batch_size: int = 8  # global, in sequences
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  log_every: int = 10
  eval_every: int = 100  # 0: only at the end
  eval_batches: int = 4
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  max_bad_steps: int = 5  # NaN/Inf steps in a row before stopping
  peak_flops: float = 0.0  # per device; 0: datasheet or measured
  # Regular expressions over parameter paths (`blocks.attn.q`,
  # `embed.table`, ...): only matching parameters train; the rest are frozen
  # (no gradient, no optimizer state, not checkpointed). Empty: all train.
  trainable: tuple[str, ...] = ()

  def validate(self, prefix: str = "train") -> None:
    for name in ("steps", "batch_size", "grad_accum_steps", "log_every",
                 "eval_batches", "keep_checkpoints", "max_bad_steps"):
      check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
    for name in ("eval_every", "checkpoint_every", "z_loss", "peak_flops"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
    check(self.batch_size % self.grad_accum_steps == 0,
          f"{prefix}.grad_accum_steps",
          f"batch_size={self.batch_size} is not divisible by "
          f"grad_accum_steps={self.grad_accum_steps}")
    for i, pattern in enumerate(self.trainable):
      try:
        re.compile(pattern)
      except re.error as e:
        check(False, f"{prefix}.trainable[{i}]",
              f"bad regular expression {pattern!r}: {e}")



MU_DTYPES = ("", "float32", "bfloat16")
BACKENDS = ("optax", "cpu_fused")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """LLaMA's recipe by default: AdamW(0.9, 0.95), decay 0.1, clip 1.0, cosine
  to 10% of the peak after a linear warmup.

  `no_decay` lists regular expressions matched against parameter paths
  (`blocks.attn_norm.scale`, `embed.table`, ...): norms and embeddings are not
  decayed, also where the decoder sits inside a larger model
  (`decoder.embed.table`, `policy.embed.table`).
  """
  learning_rate: float = 3e-4
  warmup_steps: int = 2000
  # > 0: the warmup is this fraction of the run's steps instead (HF's
  # `warmup_ratio`), so a run whose train.steps is overridden keeps its
  # shape; warmup_steps must then be 0.
  warmup_ratio: float = 0.0
  decay_steps: int = 0  # 0: the run's train.steps
  end_learning_rate_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  no_decay: tuple[str, ...] = (r"norm", r"(^|\.)embed\.")
  clip_norm: float = 1.0  # 0 disables clipping
  # dtype of AdamW's first moment: "" keeps the parameters' dtype; "bfloat16"
  # halves it (optax's `mu_dtype`, as MaxText offers). The second moment and
  # the master weights keep the parameters' dtype. 7B on 4 v4 chips needs it.
  mu_dtype: str = ""
  # "optax", or "cpu_fused": the same update as one C++ pass per parameter
  # (CPU only, float32 parameters and moments).
  backend: str = "optax"
  # Keep AdamW's moments in host memory (`pinned_host`) and stream them
  # through the device a layer at a time in the update
  # (mllm_jax/train/offload.py): device memory holds one layer's moments
  # instead of all of them. TPU and GPU only (and their AOT compiles).
  offload_state: bool = False

  def validate(self, prefix: str = "optimizer") -> None:
    check(self.learning_rate > 0, f"{prefix}.learning_rate", "must be > 0")
    check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
    check(0 <= self.warmup_ratio < 1, f"{prefix}.warmup_ratio",
          "must be in [0, 1)")
    check(self.warmup_ratio == 0 or self.warmup_steps == 0,
          f"{prefix}.warmup_steps", f"is {self.warmup_steps} and "
          f"warmup_ratio is {self.warmup_ratio}: set one of them to 0")
    check(self.decay_steps >= 0, f"{prefix}.decay_steps", "must be >= 0")
    check(0 <= self.end_learning_rate_ratio <= 1,
          f"{prefix}.end_learning_rate_ratio", "must be in [0, 1]")
    check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{prefix}.b1",
          "b1 and b2 must be in [0, 1)")
    check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
    check(self.clip_norm >= 0, f"{prefix}.clip_norm", "must be >= 0")
    check_choice(self.mu_dtype, MU_DTYPES, f"{prefix}.mu_dtype")
    check_choice(self.backend, BACKENDS, f"{prefix}.backend")
    check(self.backend != "cpu_fused" or self.mu_dtype != "bfloat16",
          f"{prefix}.mu_dtype", "'bfloat16' needs optimizer.backend='optax' "
          "(the cpu_fused kernel keeps float32 moments)")
    check(self.backend != "cpu_fused" or not self.offload_state,
          f"{prefix}.offload_state", "needs optimizer.backend='optax' (the "
          "cpu_fused kernel updates moments in place in device memory)")
    for i, pattern in enumerate(self.no_decay):
      try:
        re.compile(pattern)
      except re.error as e:
        check(False, f"{prefix}.no_decay[{i}]", f"bad regular expression: {e}")

  def check_platform(self, platform: str | None = None,
                     prefix: str = "optimizer") -> None:
    """Fails early when this platform cannot run the chosen backend."""
    import jax  # pylint: disable=g-import-not-at-top
    platform = platform or jax.default_backend()
    check(self.backend != "cpu_fused" or platform == "cpu",
          f"{prefix}.backend", f"'cpu_fused' is a CPU kernel but this "
          f"platform is {platform!r}; use 'optax'")
    check(not self.offload_state or platform in ("tpu", "gpu"),
          f"{prefix}.offload_state", f"moves the optimizer state to host "
          f"memory, but platform {platform!r} has no host memory apart from "
          f"its device memory; use it on TPU or GPU (or compile for one with "
          f"launch.aot_compile --topology=...)")
