"""The training loop, read top to bottom: set-up, restore, train, save.

Every stage runs through `train()`: it hands over a `task.TrainTask` (its
model, loss, trainable set and starting weights) and a data iterator; the
loop never changes per stage. It resumes from the latest checkpoint (train
state and data iterator together), so a preempted run started again with the
same command continues exactly; frozen parameters are not checkpointed but
come back from the task's starting weights (or the seed). SIGTERM saves and
exits cleanly. Nothing is read back from the device except on logging,
evaluation and checkpoint steps, so dispatch never waits on a step.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import use_mesh
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.compile import build_program, initial_state
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.metrics import (MetricWriter, console,
                                    peak_flops_per_device)
from mllm_jax.train.task import TrainTask, perplexity


# Printed after the task's own metrics on each log line.
LAST_SHOWN = ("grad_norm", "lr", "tokens_per_sec", "mfu")


class DataIterator(Protocol):
  """What the loop needs from a data pipeline: batches and a resumable state."""

  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding,
                 global_size: int, fields) -> dict[str, jax.Array]:
  """This host's rows -> one global array per field, sharded over the batch."""
  def put(x):
    shape = (global_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  missing = [key for key in fields if key not in batch]
  if missing:
    raise KeyError(f"the data iterator's batch lacks {missing} (has "
                   f"{sorted(batch)})")
  return {key: put(np.asarray(batch[key])) for key in fields}


def train(task: TrainTask, parallel: ParallelConfig,
          optimizer_cfg: OptimizerConfig, train_cfg: TrainConfig, seed: int,
          workdir: str, train_iter: DataIterator,
          eval_batches: list[dict[str, np.ndarray]] | None = None
          ) -> tuple[dict[str, float], nnx.Module]:
  """Trains `task` until train_cfg.steps (or SIGTERM).

  Returns the last logged metrics and the trained model (sharded; frozen
  parameters included).
  """
  # ------------------------------------------------------------------ set-up
  mesh = make_mesh(parallel)
  program = build_program(task, parallel, optimizer_cfg, train_cfg, mesh,
                          seed)
  state, frozen = initial_state(program, seed)
  fields = tuple(task.batch_fields)

  # ------------------------------------------------------------------ restore
  checkpointer = Checkpointer(f"{workdir}/checkpoints",
                              every=train_cfg.checkpoint_every,
                              keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpoint)
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(start, program.state)
    train_iter.set_state(data_state)
    console(f"restored step {start} from {workdir}/checkpoints")
  writer = MetricWriter(workdir, resume_step=start)

  seq_len = None
  peak, peak_source = peak_flops_per_device(train_cfg.peak_flops)
  trained = sum(x.size for x in jax.tree.leaves(program.state["params"]))
  held = sum(x.size for x in jax.tree.leaves(program.frozen))
  console(f"{task.name}: {trained + held:,} parameters, {trained:,} "
          f"trained; starting weights from "
          f"{task.weights_source or f'the seed ({seed})'}; mesh "
          f"{dict(mesh.shape)}; peak {peak:.3g} FLOP/s per device "
          f"({peak_source})")
  if program.pipeline is not None:
    # The schedule's idle share, logged once: it is fixed by the config.
    console(f"pipeline: {program.pipeline.describe()}")
    writer.write(start, {"pipeline_bubble": program.pipeline.bubble})

  def evaluate() -> dict[str, float]:
    totals: dict[str, float] = {}
    with use_mesh(mesh, program.rules):
      for batch in eval_batches:
        batch = global_batch(batch, program.batch_sharding,
                             len(batch["inputs"]) * jax.process_count(),
                             fields)
        sums = jax.device_get(program.eval_step(state["params"], frozen,
                                                batch))
        for name, value in sums.items():
          totals[name] = totals.get(name, 0.0) + float(value)
    weight = max(totals.pop("weight"), 1.0)
    out = {f"eval_{name}": value / weight for name, value in totals.items()}
    if task.perplexity:
      out["eval_perplexity"] = perplexity(out["eval_loss"])
    return out

  # ------------------------------------------------------------------ train
  last: dict[str, float] = {}
  step = start
  window_start, window_tokens = time.perf_counter(), 0.0
  with _Preemption() as preemption, use_mesh(mesh, program.rules), tqdm(
      total=train_cfg.steps, initial=start, desc="train", unit="step",
      mininterval=10, disable=jax.process_index() != 0) as bar:
    while step < train_cfg.steps:
      host_batch = next(train_iter)
      seq_len = seq_len or host_batch["inputs"].shape[-1]
      state, metrics = program.step(state, frozen, global_batch(
          host_batch, program.batch_sharding, train_cfg.batch_size, fields))
      step += 1
      bar.update(1)
      # Every token slot of the global batch ([batch, length], or [batch,
      # responses, length] for comparison stages).
      window_tokens += host_batch["inputs"].size * jax.process_count()

      if step % train_cfg.log_every == 0 or step == train_cfg.steps:
        metrics, counters = jax.device_get((metrics, {
            k: state[k] for k in ("bad_steps", "worst_streak")}))
        elapsed = time.perf_counter() - window_start
        last = {k: float(v) for k, v in metrics.items()}
        last["tokens_per_sec"] = window_tokens / elapsed
        if task.flops_per_token:
          last["mfu"] = (task.flops_per_token(seq_len) * last["tokens_per_sec"]
                         / (peak * jax.device_count()))
        last["bad_steps"] = float(counters["bad_steps"])
        writer.write(step, last)
        shown = [k for k in last if k not in (
            "total_loss", "weight", "skipped", "bad_steps", *LAST_SHOWN)]
        console(f"step {step}: " + ", ".join(
            f"{k}={last[k]:.4g}" for k in sorted(shown) + [
                k for k in LAST_SHOWN if k in last]))
        window_start, window_tokens = time.perf_counter(), 0.0
        # A NaN/Inf step is skipped on the device; a long run of them stops
        # the run here, read with the metrics (never a read per step).
        if counters["worst_streak"] >= train_cfg.max_bad_steps:
          checkpointer.close()
          raise FloatingPointError(
              f"{int(counters['worst_streak'])} steps in a row had a NaN/Inf "
              f"loss or gradient (seen by step {step}); stopping "
              f"(train.max_bad_steps={train_cfg.max_bad_steps})")

      if eval_batches and train_cfg.eval_every and (
          step % train_cfg.eval_every == 0 or step == train_cfg.steps):
        evaluated = evaluate()
        writer.write(step, evaluated)
        last.update(evaluated)
        console(f"step {step}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in evaluated.items()))

      if preemption.requested:
        console(f"SIGTERM: saving step {step} and exiting")
        checkpointer.save(step, state, train_iter.get_state(), force=True)
        break
      checkpointer.save(step, state, train_iter.get_state(),
                        force=step == train_cfg.steps)
  checkpointer.close()
  writer.close()
  return last, nnx.merge(program.graphdef, state["params"], frozen)
