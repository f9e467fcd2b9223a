"""Pipeline parallelism over the `stage` mesh axis (GPipe and circular).

The decoder's stacked layers [L, ...] are cut into `stages` x `repeats`
groups of L / (stages x repeats) consecutive layers; group g runs on stage
g mod stages, so with repeats = 1 (GPipe) stage s holds layers
[s L/S, (s+1) L/S), and with repeats R (circular) it holds R groups and a
micro-batch goes round the ring R times. The batch is cut into M
micro-batches. Each iteration of one `lax.scan`, every stage runs its current
group on the micro-batch in front of it, all stages at once: a `vmap` over a
leading stage dimension that is sharded over the `stage` mesh axis, so each
device runs only its own stage (GSPMD, the approach of praxis and MaxText).
Then the outputs move one stage along the ring (a collective permute);
outputs leaving the last stage wait in a buffer of M slots until the first
stage takes them for the next repeat, or until the end.

Stage s at iteration t works on v = t - s: micro-batch v mod M in repeat
v div M, when 0 <= v < M R; otherwise it idles (it computes on stale data
whose result is never used, so no gradient flows through it). The loop
takes M R + S - 1 iterations of which each stage idles S - 1: the bubble is
(S - 1) / (M R + S - 1). Circular divides the bubble's time by R because an
iteration runs 1/R of a stage's layers; it needs M >= S so that a
micro-batch leaving the last stage finds the first one done with repeat r.

Parameters keep their [L, ...] layout (checkpoints do not depend on the
schedule; they restore with or without a pipeline). GPipe's stage groups are
exactly the `layers` -> `stage` sharding, so nothing moves; circular
re-lays each step's weights to [stage, repeat, ...], an all-to-all over
`stage` (and its transpose for the gradients). Each stage scans its layers
with the model's own remat policy, and data, fsdp and tensor shardings apply
inside the stages unchanged.

The schedule is a property of the compiled step: `traced_with` makes the
decoder trace its layers through `run`; code traced outside it (sampling,
other programs) scans the layers as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax.configlib import check
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.sharding import constrain, current_mesh, current_spec

STAGE_AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which micro-batch each stage works on at each iteration."""
  stages: int
  microbatches: int
  repeats: int = 1  # 1: GPipe; more: circular

  @property
  def name(self) -> str:
    return "gpipe" if self.repeats == 1 else "circular"

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble(self) -> float:
    """The schedule's formula: the share of stage-iterations spent idle."""
    return (self.stages - 1) / self.iterations

  def work(self, t, stage):
    """(micro-batch, repeat, busy) of `stage` at iteration `t` (NumPy or
    traced integers): the one definition `run` and `table` both use."""
    v = t - stage
    busy = (v >= 0) & (v < self.microbatches * self.repeats)
    return v % self.microbatches, v // self.microbatches, busy

  def table(self) -> np.ndarray:
    """[iterations, stages] of 'micro-batch.repeat' strings, '' when idle
    (for reading the schedule and counting its bubble)."""
    t, s = np.meshgrid(np.arange(self.iterations), np.arange(self.stages),
                       indexing="ij")
    micro, repeat, busy = self.work(t, s)
    cells = np.char.add(np.char.add(micro.astype(str), "."),
                        repeat.astype(str))
    return np.where(busy, cells, "")

  def describe(self) -> str:
    return (f"{self.name}, {self.stages} stages x {self.microbatches} "
            f"micro-batches" + (f" x {self.repeats} repeats"
                                if self.repeats > 1 else "")
            + f", bubble {self.bubble:.1%}")


def schedule_of(parallel: ParallelConfig) -> Schedule | None:
  """The config's schedule, or None when `parallel.stage` is 1."""
  if parallel.stage <= 1:
    return None
  return Schedule(parallel.stage, parallel.pipeline_microbatches,
                  parallel.pipeline_repeats)


def check_pipeline(parallel: ParallelConfig, num_layers: int,
                   micro_batch: int, batch_shards: int) -> None:
  """Fails before compiling when the layers or the micro-batch do not cut
  evenly into the schedule's stages and pieces."""
  schedule = schedule_of(parallel)
  if schedule is None:
    return
  groups = schedule.stages * schedule.repeats
  check(num_layers % groups == 0, "parallel.pipeline_repeats"
        if schedule.repeats > 1 else "parallel.stage",
        f"model.num_layers={num_layers} does not split into stage x "
        f"pipeline_repeats = {groups} equal groups of layers")
  m = schedule.microbatches
  check(micro_batch % m == 0 and (micro_batch // m) % batch_shards == 0,
        "parallel.pipeline_microbatches",
        f"{m} pipeline micro-batches of a {micro_batch}-sequence batch must "
        f"each hold a multiple of the data-parallel size {batch_shards}")


# ----------------------------------------------------------------------------
# Which schedule the code being traced runs under
# ----------------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Schedule | None] = contextvars.ContextVar(
    "mllm_jax_pipeline", default=None)


@contextlib.contextmanager
def use_pipeline(schedule: Schedule | None) -> Iterator[None]:
  token = _CURRENT.set(schedule)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current_pipeline() -> Schedule | None:
  return _CURRENT.get()


def traced_with(fn: Callable, schedule: Schedule | None) -> Callable:
  """`fn` that traces under `schedule` (itself when there is none)."""
  if schedule is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use_pipeline(schedule):
      return fn(*args, **kwargs)
  return wrapped


# ----------------------------------------------------------------------------
# Running the layers
# ----------------------------------------------------------------------------


def split_rows(x: jax.Array, count: int, names=None) -> jax.Array:
  """[B, ...] -> [count, B / count, ...], piece i = rows i, i + count, ...

  Interleaving keeps every piece spread over all data-parallel devices (each
  holds a contiguous block of rows), so splitting moves no data. `names`:
  the logical names of x's dimensions (default: batch, then replicated).
  """
  names = tuple(names or ("act_batch",) + (None,) * (x.ndim - 1))
  x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
  return constrain(x, (None,) + names)


def merge_rows(x: jax.Array) -> jax.Array:
  """Inverse of `split_rows`."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _on_stages(x: jax.Array, names=()) -> jax.Array:
  """Constrains dimension 0 to the `stage` axis; the next dimensions to
  `names`, the rest left to the compiler. A no-op outside `use_mesh`."""
  mesh = current_mesh()
  if mesh is None:
    return x
  rest = tuple(current_spec(names)) if names else ()
  rest += (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1 - len(rest))
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, PartitionSpec(STAGE_AXIS, *rest)))


def run(schedule: Schedule, stack: Callable, weights: Any, x: jax.Array,
        rows: Any, names=("act_batch", "act_length", "act_embed"),
        return_busy: bool = False):
  """x [B, ...] through every layer of `weights`, pipelined.

  stack(weights, x, rows) runs the layers whose parameters are `weights`
  (leaves [n, ...]) in order on x [b, ...] with `rows` (a pytree of [b, ...]
  arrays that go with x's rows: positions, masks) and returns the new x.
  weights: leaves [L, ...], layer-major. names: x's logical dimensions.
  return_busy: also return the [iterations, stages] bool array of which
  stage did useful work when, as the traced loop computed it.
  """
  s, m, r = schedule.stages, schedule.microbatches, schedule.repeats
  num_layers = jax.tree.leaves(weights)[0].shape[0]
  check(num_layers % (s * r) == 0, "parallel.pipeline_repeats",
        f"{num_layers} layers do not split into stage x pipeline_repeats = "
        f"{s * r} equal groups")
  check(x.shape[0] % m == 0, "parallel.pipeline_microbatches",
        f"a batch of {x.shape[0]} rows does not split into {m} micro-batches")
  mesh = current_mesh()
  if mesh is not None:
    check(mesh.shape.get(STAGE_AXIS, 1) == s, "parallel.stage",
          f"the mesh's stage axis has {mesh.shape.get(STAGE_AXIS, 1)} "
          f"devices but the schedule has {s} stages")
  per_group = num_layers // (s * r)
  # [L, ...] -> [stage, repeat, layer, ...]: group g = repeat * S + stage.
  weights = jax.tree.map(
      lambda a: _on_stages(a.reshape(r, s, per_group, *a.shape[1:])
                           .swapaxes(0, 1)), weights)
  pieces = split_rows(x, m, names)
  rows = jax.tree.map(lambda a: split_rows(a, m), rows)
  stage_ids = jnp.arange(s)
  to_stages = lambda a: a.reshape((s,) + (1,) * (pieces.ndim - 1))

  def one_stage(stage_weights, repeat, x, micro):
    # GPipe's one group is a static slice; circular picks this repeat's
    # group (a gather; its gradient is a scatter into all R groups).
    group = jax.tree.map(lambda a: a[0] if r == 1 else a[repeat],
                         stage_weights)
    return stack(group, x, jax.tree.map(lambda a: a[micro], rows))

  all_stages = jax.vmap(one_stage, spmd_axis_name=(
      STAGE_AXIS if mesh is not None else None))

  def iteration(carry, t):
    outputs, buffer = carry
    micro, repeat, busy = schedule.work(t, stage_ids)
    # Stage 0 takes its micro-batch from the buffer; stage s > 0 takes what
    # stage s - 1 produced (the ring's shift: a collective permute).
    shifted = jnp.concatenate([outputs[-1:], outputs[:-1]])
    first = jax.lax.dynamic_index_in_dim(buffer, t % m, keepdims=True)
    inputs = _on_stages(jnp.where(to_stages(stage_ids == 0), first, shifted),
                        names)
    outputs = _on_stages(
        all_stages(weights, jnp.clip(repeat, 0, r - 1), inputs, micro), names)
    # The last stage's finished micro-batch goes back to its buffer slot.
    slot = micro[-1]
    kept = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
    buffer = jax.lax.dynamic_update_index_in_dim(
        buffer, jnp.where(busy[-1], outputs[-1], kept), slot, 0)
    return (outputs, buffer), busy

  outputs = _on_stages(jnp.zeros((s,) + pieces.shape[1:], pieces.dtype),
                       names)
  (_, buffer), busy = jax.lax.scan(iteration, (outputs, pieces),
                                   jnp.arange(schedule.iterations))
  out = constrain(merge_rows(buffer), names)
  return (out, busy) if return_busy else out
