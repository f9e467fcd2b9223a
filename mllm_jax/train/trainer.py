"""The training loop, read top to bottom: set-up, restore, train, save.

Used by every supervised stage through `launch/*`. The loop resumes from the
latest checkpoint (train state and data iterator together), so a preempted
run started again with the same command continues exactly; SIGTERM saves and
exits cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from typing import Any, Iterator, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from mllm_jax.configlib import check
from mllm_jax.modeling import Decoder, ModelConfig, count_params
from mllm_jax.parallel.mesh import ParallelConfig, make_mesh
from mllm_jax.parallel.sharding import (create_sharded, param_shardings,
                                        use_mesh)
from mllm_jax.train.checkpoint import Checkpointer, abstract_like
from mllm_jax.train.compile import batch_sharding, check_layout, jit_train_step
from mllm_jax.train.metrics import (MetricWriter, console,
                                    peak_flops_per_device,
                                    train_flops_per_token)
from mllm_jax.train.optimizer import (OptimizerConfig, learning_rate_schedule,
                                      make_optimizer)
from mllm_jax.train.step import init_train_state, make_eval_step

BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


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
                 global_size: int) -> dict[str, jax.Array]:
  """This host's rows -> one global array per field, sharded over the batch."""
  def put(x):
    shape = (global_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return {key: put(np.asarray(batch[key])) for key in BATCH_KEYS}


def train(model_cfg: ModelConfig, parallel: ParallelConfig,
          optimizer_cfg: OptimizerConfig, train_cfg: TrainConfig, seed: int,
          workdir: str, train_iter: DataIterator,
          eval_batches: list[dict[str, np.ndarray]] | None = None,
          init_params: nnx.State | None = None
          ) -> tuple[dict[str, float], nnx.State]:
  """Trains until train_cfg.steps (or SIGTERM).

  Returns the last logged metrics and the final parameters (sharded).
  """
  # ------------------------------------------------------------------ set-up
  model_cfg.check_platform()
  optimizer_cfg.check_platform()
  check_layout(model_cfg, parallel, train_cfg.batch_size,
               train_cfg.grad_accum_steps, jax.device_count())
  mesh = make_mesh(parallel)
  rules = parallel.rules
  batch_shardings = batch_sharding(mesh, rules)

  model = create_sharded(lambda: Decoder(model_cfg, rngs=nnx.Rngs(seed)),
                         mesh, rules)
  graphdef, params = nnx.split(model)
  if init_params is not None:  # fine-tuning: start from given weights
    params = jax.device_put(init_params,
                            param_shardings(params, mesh, rules))
  schedule = learning_rate_schedule(optimizer_cfg, train_cfg.steps)
  optimizer = make_optimizer(optimizer_cfg, params, train_cfg.steps)
  abstract_state = jax.eval_shape(
      functools.partial(init_train_state, optimizer=optimizer), params)
  state_shardings = param_shardings(abstract_state, mesh, rules)
  with use_mesh(mesh, rules):
    state = jax.jit(functools.partial(init_train_state, optimizer=optimizer),
                    out_shardings=state_shardings)(params)
  del model, params

  train_step = jit_train_step(graphdef, optimizer, schedule, state_shardings,
                              batch_shardings, train_cfg.grad_accum_steps,
                              train_cfg.z_loss)
  eval_step = jax.jit(make_eval_step(graphdef),
                      in_shardings=(state_shardings["params"],
                                    batch_shardings))

  # ------------------------------------------------------------------ restore
  checkpointer = Checkpointer(f"{workdir}/checkpoints",
                              every=train_cfg.checkpoint_every,
                              keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpoint)
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(
        start, abstract_like(abstract_state, state_shardings))
    train_iter.set_state(data_state)
    console(f"restored step {start} from {workdir}/checkpoints")
  writer = MetricWriter(workdir, resume_step=start)

  seq_len = None
  peak, peak_source = peak_flops_per_device(train_cfg.peak_flops)
  console(f"{count_params(model_cfg):,} parameters; mesh {dict(mesh.shape)}; "
          f"peak {peak:.3g} FLOP/s per device ({peak_source})")

  def evaluate() -> dict[str, float]:
    totals = np.zeros(2)
    with use_mesh(mesh, rules):
      for batch in eval_batches:
        batch = global_batch(batch, batch_shardings,
                             len(batch["inputs"]) * jax.process_count())
        totals += np.asarray(jax.device_get(eval_step(state["params"],
                                                      batch)))
    loss = totals[0] / max(totals[1], 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

  # ------------------------------------------------------------------ train
  last: dict[str, float] = {}
  step = start
  window_start, window_tokens = time.perf_counter(), 0.0
  with _Preemption() as preemption, use_mesh(mesh, rules), tqdm(
      total=train_cfg.steps, initial=start, desc="train", unit="step",
      mininterval=10, disable=jax.process_index() != 0) as bar:
    while step < train_cfg.steps:
      host_batch = next(train_iter)
      seq_len = seq_len or host_batch["inputs"].shape[1]
      state, metrics = train_step(
          state, global_batch(host_batch, batch_shardings,
                              train_cfg.batch_size))
      step += 1
      bar.update(1)
      window_tokens += train_cfg.batch_size * seq_len

      if step % train_cfg.log_every == 0 or step == train_cfg.steps:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / elapsed
        flops = train_flops_per_token(model_cfg, seq_len) * tokens_per_sec
        last = {**{k: float(v) for k, v in metrics.items()},
                "tokens_per_sec": tokens_per_sec,
                "mfu": flops / (peak * jax.device_count()),
                "bad_steps": float(jax.device_get(state["bad_steps"]))}
        writer.write(step, last)
        console(f"step {step}: " + ", ".join(
            f"{k}={last[k]:.4g}" for k in ("loss", "grad_norm", "lr",
                                           "tokens_per_sec", "mfu")))
        window_start, window_tokens = time.perf_counter(), 0.0

      streak = int(jax.device_get(metrics["bad_streak"]))
      if streak >= train_cfg.max_bad_steps:
        checkpointer.close()
        raise FloatingPointError(
            f"{streak} steps in a row had a NaN/Inf loss or gradient (up to "
            f"step {step}); stopping (train.max_bad_steps="
            f"{train_cfg.max_bad_steps})")

      if eval_batches and train_cfg.eval_every and (
          step % train_cfg.eval_every == 0 or step == train_cfg.steps):
        evaluated = evaluate()
        writer.write(step, evaluated)
        last.update(evaluated)
        console(f"step {step}: eval_loss={evaluated['eval_loss']:.4f} "
                f"eval_perplexity={evaluated['eval_perplexity']:.2f}")

      if preemption.requested:
        console(f"SIGTERM: saving step {step} and exiting")
        checkpointer.save(step, state, train_iter.get_state(), force=True)
        break
      checkpointer.save(step, state, train_iter.get_state(),
                        force=step == train_cfg.steps)
  checkpointer.close()
  writer.close()
  return last, state["params"]
