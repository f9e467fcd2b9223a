"""AdamW with warmup + cosine decay, clipping and a weight-decay mask.

Two backends compute the same update: optax's chain (any platform, any
dtype), and on CPU a fused C++ kernel (`cpu_adamw.cc`) that reads and writes
each parameter, gradient and moment once, where XLA's CPU fusions stream
them several times (docs/benchmarks.md). Both keep optax's state layout, so
a checkpoint written with one resumes with the other.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from mllm_jax import native
from mllm_jax.configlib import ConfigError, check, check_choice
from mllm_jax.parallel.sharding import current_mesh, current_spec, logical_axes


MU_DTYPES = ("", "float32", "bfloat16")
BACKENDS = ("optax", "cpu_fused")


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
  # "optax", or "cpu_fused": the same update as one C++ pass per parameter
  # (CPU only, float32 parameters and moments).
  backend: str = "optax"

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
    check_choice(self.backend, BACKENDS, f"{prefix}.backend")
    check(self.backend != "cpu_fused" or self.mu_dtype != "bfloat16",
          f"{prefix}.mu_dtype", "'bfloat16' needs optimizer.backend='optax' "
          "(the cpu_fused kernel keeps float32 moments)")
    for i, pattern in enumerate(self.no_decay):
      try:
        re.compile(pattern)
      except re.error as e:
        check(False, f"{prefix}.no_decay[{i}]", f"bad regular expression: {e}")

  def check_platform(self, platform: str | None = None,
                     prefix: str = "optimizer") -> None:
    """Fails early when this platform cannot run the chosen backend."""
    platform = platform or jax.default_backend()
    check(self.backend != "cpu_fused" or platform == "cpu",
          f"{prefix}.backend", f"'cpu_fused' is a CPU kernel but this "
          f"platform is {platform!r}; use 'optax'")


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


class FusedAdamW(NamedTuple):
  """An optax transformation (`init`, `update`: the reference chain) plus
  `apply(grads, state, params, grad_norm=None) -> (params, state)`, the
  fused kernel's update of the same state. `apply_gradients` uses `apply`."""
  init: Callable
  update: Callable
  apply: Callable


def make_optimizer(cfg: OptimizerConfig, params: nnx.State, total_steps: int
                   ) -> optax.GradientTransformation | FusedAdamW:
  """The optimizer for `params` (clipping first, then AdamW)."""
  mask = decay_mask(params, cfg.no_decay)
  schedule = learning_rate_schedule(cfg, total_steps)
  adamw = optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      mu_dtype=cfg.mu_dtype or None, weight_decay=cfg.weight_decay, mask=mask)
  if cfg.clip_norm:
    adamw = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  if cfg.backend == "optax":
    return adamw
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if leaf.dtype != jnp.float32:
      raise ConfigError(
          f"optimizer.backend: 'cpu_fused' updates float32 parameters, but "
          f"{path_name(path)} is {leaf.dtype}; use 'optax'")
  return FusedAdamW(adamw.init, adamw.update,
                    _fused_apply(cfg, schedule, mask))


def apply_gradients(optimizer: optax.GradientTransformation | FusedAdamW,
                    grads, opt_state, params, grad_norm=None):
  """One optimizer step: (new params, new optimizer state). `grad_norm`, the
  gradients' global norm if already computed, spares the fused backend a
  second pass over them."""
  if isinstance(optimizer, FusedAdamW):
    return optimizer.apply(grads, opt_state, params, grad_norm)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


_KERNEL = pathlib.Path(__file__).with_name("cpu_adamw.cc")
_TARGET = "mllm_jax_cpu_adamw"
# No FMA contraction, so each of optax's operations is rounded on its own;
# errno-free sqrt, so the loop vectorises.
_KERNEL_FLAGS = ("-ffp-contract=off", "-fno-math-errno")


def _fused_apply(cfg: OptimizerConfig, schedule, mask) -> Callable:
  """optax's clip + AdamW + apply_updates as one kernel call per parameter.

  The per-step scalars (clip factor, bias corrections, learning rate) are
  computed here exactly as optax computes them; the state is optax's chain
  state, updated in place (the kernel's outputs alias its inputs). Under a
  mesh each call runs per device under shard_map: the update is elementwise.
  """
  def apply(grads, state, params, grad_norm=None):
    native.load(_KERNEL, ((_TARGET, "MllmAdamW"),), _KERNEL_FLAGS,
                "optimizer.backend='optax'")
    clip_state, (adam, masked, sched) = (
        state if cfg.clip_norm else ((), state))
    count = optax.safe_increment(adam.count)
    if not cfg.clip_norm:
      norm = jnp.float32(0)
    else:
      norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
    scalars = jnp.stack([
        (cfg.clip_norm and ~(norm < cfg.clip_norm)), norm, cfg.clip_norm,
        1 - cfg.b1**count, 1 - cfg.b2**count,
        -1 * schedule(sched.count)]).astype(jnp.float32)

    # Leaves in one order; the Variables (same order) carry each parameter's
    # logical axes, for its sharding.
    leaves, treedef = jax.tree.flatten(params)
    variables = jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    flat = [treedef.flatten_up_to(tree) for tree in (grads, adam.mu, adam.nu,
                                                     mask)]
    outputs = [_fused_leaf(cfg, variable, scalars, *arrays)
               for variable, *arrays in zip(variables, leaves, *flat)]
    new_params, mu, nu = (treedef.unflatten(o) for o in zip(*outputs))
    adam = adam._replace(count=count, mu=mu, nu=nu)
    sched = sched._replace(count=optax.safe_increment(sched.count))
    new_state = (adam, masked, sched)
    return new_params, ((clip_state, new_state) if cfg.clip_norm
                        else new_state)

  return apply


def _fused_leaf(cfg, variable, scalars, param, grad, mu, nu, decay):
  """(param, mu, nu) after one step, for one parameter."""
  attrs = dict(b1=np.float32(cfg.b1), one_minus_b1=np.float32(1 - cfg.b1),
               b2=np.float32(cfg.b2), one_minus_b2=np.float32(1 - cfg.b2),
               eps=np.float32(cfg.eps),
               weight_decay=np.float32(cfg.weight_decay if decay else 0.0))

  def kernel(p, g, m, v, s):
    like = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    call = jax.ffi.ffi_call(_TARGET, (like, like, like),
                            input_output_aliases={0: 0, 2: 1, 3: 2})
    return tuple(call(p, g, m, v, s, **attrs))

  mesh = current_mesh()
  if mesh is not None and mesh.size > 1:
    spec = current_spec(logical_axes(variable))
    kernel = jax.shard_map(
        kernel, mesh=mesh, in_specs=(spec,) * 4 + (PartitionSpec(),),
        out_specs=(spec,) * 3, check_vma=False)
  return kernel(param, grad, mu, nu, scalars)
