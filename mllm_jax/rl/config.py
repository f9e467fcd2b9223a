"""Alignment-stage settings, importable without JAX (configs/ use them)."""

from __future__ import annotations

import dataclasses

from mllm_jax.configlib import check

VALUE_MODES = ("shared", "separate")
LOSSES = ("sigmoid", "cdpo", "ipo")  # DPO losses
REFERENCES = ("cached", "on_the_fly")  # where DPO's reference log-probs come from


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The algorithm's settings (configs/ppo.py's `ppo` section)."""
  iterations: int = 20
  prompts_per_iteration: int = 16  # rollouts per iteration
  max_new_tokens: int = 48
  temperature: float = 1.0
  epochs: int = 2  # passes over each iteration's rollouts
  minibatches: int = 2  # per epoch
  clip: float = 0.2  # policy ratio clip
  value_clip: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  kl_coef: float = 0.05  # beta; the start value when adaptive
  kl_target: float = 0.0  # > 0: adaptive controller toward this KL
  kl_horizon: int = 10000  # the controller's horizon, in rollouts
  max_kl: float = 20.0  # mean KL (nats per response) that stops the run
  missing_eos_penalty: float = 1.0  # subtracted from a never-ending reply
  ptx_coef: float = 0.0  # gamma_ptx: weight of the pretraining LM loss
  ptx_batch_size: int = 8
  value: str = "shared"  # "shared" trunk + head, or a "separate" critic
  checkpoint_every: int = 5  # iterations
  eval_samples: int = 4  # sampled replies per held-out prompt (and 1 greedy)

  def validate(self, prefix: str = "ppo") -> None:
    for name in ("iterations", "prompts_per_iteration", "max_new_tokens",
                 "epochs", "minibatches", "kl_horizon", "checkpoint_every",
                 "eval_samples"):
      check(getattr(self, name) >= 1, f"{prefix}.{name}",
            f"must be >= 1, got {getattr(self, name)}")
    check(self.prompts_per_iteration % self.minibatches == 0,
          f"{prefix}.minibatches", f"{self.minibatches} must divide "
          f"prompts_per_iteration={self.prompts_per_iteration}")
    check(self.temperature > 0, f"{prefix}.temperature", "must be > 0 "
          "(PPO needs samples from the policy itself)")
    check(0 < self.clip < 1, f"{prefix}.clip", f"got {self.clip}")
    check(self.value_clip > 0, f"{prefix}.value_clip", "must be > 0")
    check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"{prefix}.gamma",
          f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
    check(self.kl_coef >= 0 and self.kl_target >= 0, f"{prefix}.kl_coef",
          "kl_coef and kl_target must be >= 0")
    check(self.max_kl > 0, f"{prefix}.max_kl", "must be > 0")
    check(self.ptx_coef >= 0, f"{prefix}.ptx_coef", "must be >= 0")
    check(self.ptx_batch_size >= 1, f"{prefix}.ptx_batch_size", "must be >= 1")
    check(self.value in VALUE_MODES, f"{prefix}.value",
          f"got {self.value!r}; choose one of {VALUE_MODES}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """configs/dpo.py's `dpo` section."""
  beta: float = 0.1
  loss: str = "sigmoid"
  label_smoothing: float = 0.0  # cdpo's eps
  reference: str = "cached"

  def validate(self, prefix: str = "dpo") -> None:
    check(self.beta > 0, f"{prefix}.beta", f"must be > 0, got {self.beta}")
    check(self.loss in LOSSES, f"{prefix}.loss",
          f"{self.loss!r}; choose one of {LOSSES}")
    check(self.reference in REFERENCES, f"{prefix}.reference",
          f"{self.reference!r}; choose one of {REFERENCES}")
    if self.loss == "cdpo":
      check(0 < self.label_smoothing < 0.5, f"{prefix}.label_smoothing",
            f"conservative DPO needs 0 < eps < 0.5, got "
            f"{self.label_smoothing}")
    else:
      check(self.label_smoothing == 0, f"{prefix}.label_smoothing",
            f"only loss='cdpo' smooths labels (got {self.label_smoothing} "
            f"with loss={self.loss!r})")
