"""Optimizer-state offload: AdamW's moments live in host memory and the update
streams them through the device one layer at a time.

Why: for 7B on four v4 chips, f32 mu and nu are 12.6 of the 18.9 GiB of
arguments per chip, yet the step only touches them in the update. Moving the
whole state to the device for the update (tried before, docs/scale.md) just
moves the peak there: gradients, the moments' device copies and their new
values are live at once. Streaming bounds that to one layer's moments.

How (`optimizer.offload_state=True`):

- `host_shardings` puts every non-scalar leaf of the optimizer state in the
  `pinned_host` memory kind, so the jitted step takes and returns the moments
  in host memory (and `init_train_state` creates them there).
- `streamed_apply` is the `Optimizer.apply` for that state. The decoder's
  parameters are stacked `[layers, ...]`; for each group of stacked leaves a
  `fori_loop` slices layer i of the moments, copies the slice to the device,
  runs optax's AdamW on that layer's parameters, gradients and moments, and
  writes the new moments back into the host buffers (XLA's host offloader
  turns these into per-layer transfers). Unstacked leaves (embedding, final
  norm, output head) go one leaf at a time.

The arithmetic is optax's own AdamW, called on one layer's slices: it is
elementwise, so only global-norm clipping, which needs every gradient, is
done here with the step's global norm, as `optax.clip_by_global_norm` does
it. Copies happen only for arrays whose memory space is host, so the same
function runs on plain device memory too (tests/test_offload.py compares it
with the plain update on CPU, with and without memory kinds). The state
keeps optax's layout, so checkpoints move between offloaded and plain runs.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mllm_jax.parallel.sharding import logical_axes

HOST = "pinned_host"


def host_shardings(opt_shardings, opt_state):
  """`opt_shardings` with every non-scalar leaf of `opt_state` (abstract or
  concrete, same structure) moved to host memory; step counters stay on the
  device (the update reads them every step, and they are 4 bytes)."""
  return jax.tree.map(
      lambda s, x: s.with_memory_kind(HOST) if x.ndim else s,
      opt_shardings, opt_state)


def _on_host(x) -> bool:
  return jax.typeof(x).memory_space == jax.memory.Space.Host


def _to_device(x):
  return jax.device_put(x, jax.memory.Space.Device) if _on_host(x) else x


def _back_to(new, old):
  """`new` placed in the memory space `old` came from."""
  return jax.device_put(new, jax.memory.Space.Host) if _on_host(old) else new


def stacked_leaves(params: nnx.State) -> list[bool]:
  """Per leaf of `params` (flatten order): whether its moments stream a
  layer at a time, i.e. its first axis is the decoder's (or a vision
  tower's) stacked `layers` axis and each layer is a matrix or more.

  A stack of per-layer vectors ([layers, D], a norm's scales) moves whole:
  TPUs tile the two minor dimensions, so one layer's row of it is a strided
  copy, which libtpu's host DMA refuses ("Strided host DMA ... is not
  supported"); it is a few layers' worth of a vector anyway.
  """
  variables = jax.tree.leaves(params,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [v.get_value().ndim >= 3 and logical_axes(v)[0] == "layers"
          for v in variables]


def streamed_apply(cfg, schedule: Callable, mask, params: nnx.State
                   ) -> Callable:
  """`Optimizer.apply` for optax's clip + AdamW chain state (the one
  `make_optimizer` builds from `cfg`), updating a layer at a time.

  `params` (abstract is enough) tells which leaves are stacked; `mask` is
  the weight-decay mask over the same tree.
  """
  stacked = stacked_leaves(params)
  decay = jax.tree.leaves(mask)

  def adamw(unit_mask):
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       mu_dtype=cfg.mu_dtype or None,
                       weight_decay=cfg.weight_decay, mask=unit_mask)

  def apply(grads, state, params, grad_norm=None):
    clip_state, (adam, masked, sched) = (
        state if cfg.clip_norm else ((), state))
    if cfg.clip_norm:
      norm = optax.tree.norm(grads) if grad_norm is None else grad_norm
      keep = jnp.squeeze(norm < cfg.clip_norm)

    def update(indices, p, g, m, v):
      """AdamW on one unit (tuples of same-index slices of the leaves)."""
      if cfg.clip_norm:  # optax.clip_by_global_norm, with the global norm
        g = tuple(jax.lax.select(keep, t, (t / norm.astype(t.dtype))
                                 * cfg.clip_norm) for t in g)
      m, v = tuple(map(_to_device, m)), tuple(map(_to_device, v))
      unit_state = (adam._replace(mu=m, nu=v), masked, sched)
      updates, (new_adam, _, _) = adamw(tuple(decay[i] for i in indices)
                                        ).update(g, unit_state, p)
      return optax.apply_updates(p, updates), new_adam.mu, new_adam.nu

    leaves, treedef = jax.tree.flatten(params)
    flat_g, flat_m, flat_v = (treedef.flatten_up_to(t)
                              for t in (grads, adam.mu, adam.nu))
    new_p, new_m, new_v = list(leaves), list(flat_m), list(flat_v)

    # Stacked leaves: one loop over layers per leading size (the decoder's,
    # a vision tower's), each iteration one layer's moments on the device.
    groups = collections.defaultdict(list)
    for i, leaf in enumerate(leaves):
      if stacked[i]:
        groups[leaf.shape[0]].append(i)
      else:  # one leaf at a time
        (new_p[i],), (m,), (v,) = update(
            (i,), (leaves[i],), (flat_g[i],), (flat_m[i],), (flat_v[i],))
        new_m[i], new_v[i] = _back_to(m, flat_m[i]), _back_to(v, flat_v[i])
    for num_layers, indices in groups.items():
      pick = lambda flat, indices=indices: tuple(flat[i] for i in indices)
      g_all = pick(flat_g)

      def layer(j, carry, indices=indices, g_all=g_all):
        p_all, m_all, v_all = carry
        take = lambda xs: tuple(jax.lax.dynamic_index_in_dim(x, j, 0, False)
                                for x in xs)
        p, m, v = update(indices, take(p_all), take(g_all), take(m_all),
                         take(v_all))
        put = lambda xs, ys: tuple(
            jax.lax.dynamic_update_index_in_dim(x, _back_to(y, x), j, 0)
            for x, y in zip(xs, ys))
        return put(p_all, p), put(m_all, m), put(v_all, v)

      p_all, m_all, v_all = jax.lax.fori_loop(
          0, num_layers, layer, (pick(leaves), pick(flat_m), pick(flat_v)))
      for k, i in enumerate(indices):
        new_p[i], new_m[i], new_v[i] = p_all[k], m_all[k], v_all[k]

    # The counters: the same chain's update on no leaves advances them.
    counters = (adam._replace(mu=(), nu=()), masked, sched)
    _, (new_adam, masked, sched) = adamw(()).update((), counters, ())
    new_adam = new_adam._replace(mu=treedef.unflatten(new_m),
                                 nu=treedef.unflatten(new_v))
    new_state = (new_adam, masked, sched)
    return treedef.unflatten(new_p), ((clip_state, new_state)
                                      if cfg.clip_norm else new_state)

  return apply


# ---------------------------------------------------------------- checking
# XLA's memory space for host memory in compiled HLO layouts (`S(5)`).
_HOST_SPACE = "S(5)"
_TYPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\](\{[^}]*\})?")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s8": 1, "u8": 1, "pred": 1}
# Asynchronous copies; the result types before the op name say what moves:
# copy-start (dest, src, ...), dynamic-slice-start ((src, indices...), dest,
# ...), dynamic-update-slice-start ((dest buffer, update, indices...), ...).
_ASYNC = re.compile(r"=\s*(.*)\s(copy-start|dynamic-slice-start|"
                    r"dynamic-update-slice-start)\(")


def _on_host_type(match) -> bool:
  return _HOST_SPACE in (match.group(3) or "")


def _bytes(match) -> int:
  dims = [int(d) for d in match.group(2).split(",") if d]
  return _BYTES.get(match.group(1), 4) * math.prod(dims)


def host_transfers(hlo_text: str) -> dict[str, dict[str, int]]:
  """Copies between host and device memory in a compiled program's HLO
  (TPU and GPU lower them to the asynchronous ops above).

  For 'to_device' and 'to_host': how many copy instructions there are, the
  largest one's bytes (per device), and of those how many are slices of a
  larger host buffer (`layer_slices`: the streamed loop's per-layer copies)
  and the largest slice. With the moments streamed, every stacked moment
  moves as [1, ...] slices inside the update's loop; only unstacked leaves
  (embedding, head, norms) move whole. `launch.aot_compile` prints this.
  """
  sizes = {"to_device": [], "to_host": []}
  slices = {"to_device": [], "to_host": []}
  for line in hlo_text.splitlines():
    match = _ASYNC.search(line)
    if match is None:
      continue
    types = list(_TYPE.finditer(match.group(1)))
    op = match.group(2)
    if op == "copy-start" and len(types) >= 2:
      dest, src = types[0], types[1]
      if _on_host_type(src) and not _on_host_type(dest):
        sizes["to_device"].append(_bytes(dest))
      elif _on_host_type(dest) and not _on_host_type(src):
        sizes["to_host"].append(_bytes(src))
    elif op == "dynamic-slice-start" and len(types) >= 3:
      if _on_host_type(types[0]):
        sizes["to_device"].append(_bytes(types[-2]))
        slices["to_device"].append(_bytes(types[-2]))
    elif op == "dynamic-update-slice-start" and len(types) >= 2:
      if _on_host_type(types[0]):
        sizes["to_host"].append(_bytes(types[1]))
        slices["to_host"].append(_bytes(types[1]))
  return {kind: {"count": len(found), "largest_bytes": max(found, default=0),
                 "layer_slices": len(slices[kind]),
                 "largest_slice_bytes": max(slices[kind], default=0)}
          for kind, found in sizes.items()}
