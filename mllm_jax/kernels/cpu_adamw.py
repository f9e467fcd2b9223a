"""The fused AdamW update for CPU (`cpu_adamw.cc`, optimizer.backend=
'cpu_fused'): optax's clip + AdamW + apply_updates as one C++ pass per
parameter, in place, on optax's own state. `train/optimizer.py` wraps it in
the same `Optimizer` interface as optax's chain.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from mllm_jax.kernels import build
from mllm_jax.parallel.sharding import current_mesh, current_spec, logical_axes

_KERNEL = pathlib.Path(__file__).with_name("cpu_adamw.cc")
_TARGET = "mllm_jax_cpu_adamw"
# No FMA contraction, so each of optax's operations is rounded on its own;
# errno-free sqrt, so the loop vectorises.
_KERNEL_FLAGS = ("-ffp-contract=off", "-fno-math-errno")


def fused_apply(cfg, schedule, mask) -> Callable:
  """optax's clip + AdamW + apply_updates as one kernel call per parameter.

  The per-step scalars (clip factor, bias corrections, learning rate) are
  computed here exactly as optax computes them; the state is optax's chain
  state, updated in place (the kernel's outputs alias its inputs). Under a
  mesh each call runs per device under shard_map: the update is elementwise.
  """
  def apply(grads, state, params, grad_norm=None):
    build.load(_KERNEL, ((_TARGET, "MllmAdamW"),), _KERNEL_FLAGS,
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
