"""The run's compiled program, built from configs and a mesh without data.

`build_program` turns a stage (`task.TrainTask`) plus the optimizer and
train configs into the jitted step and eval step, with the train state's
shardings in and out, frozen parameters as a separate (never donated,
never checkpointed) argument, the batch sharded over `act_batch`, and the
state donated. Nothing is allocated: the trainer then creates the state
(`initial_state`), and `launch.aot_compile` lowers and compiles the very same
step for a mesh of devices this machine does not have (a TPU topology) to
report memory and FLOPs before anyone books the pod.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mllm_jax.configlib import ConfigError, check
from mllm_jax.modeling import ModelConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import check_divisible
from mllm_jax.parallel.pipeline import (Schedule, check_pipeline, schedule_of,
                                        traced_with)
from mllm_jax.parallel.sharding import (create_sharded, logical_to_spec,
                                        param_shardings, use_mesh)
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.offload import host_shardings
from mllm_jax.train.optimizer import (Optimizer, learning_rate_schedule,
                                      make_optimizer)
from mllm_jax.train.step import (TrainState, init_train_state,
                                 make_eval_step, make_train_step)
from mllm_jax.train.task import TrainTask, split_trainable


def check_layout(model_cfg: ModelConfig, parallel: ParallelConfig,
                 batch_size: int, grad_accum_steps: int,
                 num_devices: int) -> None:
  """The trainer's pre-compile checks: heads, (micro-)batches and the
  pipeline's layer groups divide."""
  check_divisible(parallel, num_devices, num_heads=model_cfg.num_heads,
                  num_kv_heads=model_cfg.kv_heads, batch_size=batch_size)
  micro = batch_size // grad_accum_steps
  shards = parallel.batch_shards(num_devices)
  check(micro % shards == 0, "train.grad_accum_steps",
        f"micro-batches of {micro} sequences do not divide over the "
        f"data-parallel size {shards}")
  check_pipeline(parallel, model_cfg.num_layers, micro, shards)


def check_run(model_cfg: ModelConfig, parallel: ParallelConfig,
              optimizer_cfg: OptimizerConfig, train_cfg: TrainConfig,
              seq_len: int, seq_len_field: str = "data.seq_len") -> None:
  """Every check a training binary makes before compiling: sequence length,
  kernels available on this platform, heads and batches divide the mesh."""
  model_cfg.check_seq_len(seq_len, seq_len_field)
  model_cfg.check_platform()
  optimizer_cfg.check_platform()
  check_layout(model_cfg, parallel, train_cfg.batch_size,
               train_cfg.grad_accum_steps, jax.device_count())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("act_batch",), rules, mesh))


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (restore and lowering
  targets)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What a run compiles, with nothing allocated on any device."""
  task: TrainTask
  mesh: Mesh
  rules: tuple
  graphdef: nnx.GraphDef
  optimizer: Optimizer
  schedule: Callable
  state: TrainState  # ShapeDtypeStructs with the state's shardings
  frozen: nnx.State  # ShapeDtypeStructs with the frozen params' shardings
  batch_sharding: NamedSharding
  step: Any  # jit(step(state, frozen, batch) -> (state, metrics))
  eval_step: Any  # jit(eval(params, frozen, batch) -> sums)
  pipeline: Schedule | None = None  # the layers' schedule over `stage`

  @property
  def state_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.state)

  def abstract_batch(self, batch_size: int, seq_len: int):
    return {key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype,
                                      sharding=self.batch_sharding)
            for key, dtype in self.task.batch_fields.items()}

  def trace(self, batch_size: int, seq_len: int) -> jax.stages.Traced:
    """Traces the step under the mesh, so activation constraints apply."""
    with use_mesh(self.mesh, self.rules):
      return self.step.trace(self.state, self.frozen,
                             self.abstract_batch(batch_size, seq_len))


def build_program(task: TrainTask, parallel: ParallelConfig,
                  optimizer_cfg: OptimizerConfig, train_cfg: TrainConfig,
                  mesh: Mesh, seed: int = 0) -> TrainProgram:
  """The stage's step and eval step for `mesh`, jitted with the trainer's
  shardings and donation."""
  rules = tuple(parallel.rules)
  abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
  graphdef, params, frozen = split_trainable(abstract, task.trainable)
  if not jax.tree.leaves(params):
    raise ConfigError(f"train.trainable: {task.name}: the filter selects no "
                      f"parameter, so nothing would train")
  optimizer = make_optimizer(optimizer_cfg, params, train_cfg.steps)
  schedule = learning_rate_schedule(optimizer_cfg, train_cfg.steps)
  state = jax.eval_shape(
      functools.partial(init_train_state, optimizer=optimizer), params)
  state_shardings = param_shardings(state, mesh, rules)
  if optimizer_cfg.offload_state:
    # Moments in host memory; the update streams them (train/offload.py),
    # a layer at a time along `layers`, which the pipeline shards.
    if parallel.stage > 1:
      raise ConfigError(
          f"optimizer.offload_state: the layer-streamed update is not "
          f"combined with pipeline stages (parallel.stage={parallel.stage}) "
          f"yet; use parallel.stage=1")
    state_shardings["opt_state"] = host_shardings(state_shardings["opt_state"],
                                                  state["opt_state"])
  frozen_shardings = param_shardings(frozen, mesh, rules)
  batch_shardings = batch_sharding(mesh, rules)
  # With parallel.stage > 1 both steps trace the decoder's layers through
  # the pipeline schedule (mllm_jax/parallel/pipeline.py).
  pipeline = schedule_of(parallel)
  step = jax.jit(
      traced_with(make_train_step(graphdef, optimizer, schedule, task.loss,
                                  train_cfg.grad_accum_steps), pipeline),
      in_shardings=(state_shardings, frozen_shardings, batch_shardings),
      out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(
      traced_with(make_eval_step(graphdef, task.loss), pipeline),
      in_shardings=(state_shardings["params"], frozen_shardings,
                    batch_shardings))
  return TrainProgram(
      task=task, mesh=mesh, rules=rules, graphdef=graphdef,
      optimizer=optimizer, schedule=schedule,
      state=with_shardings(state, state_shardings),
      frozen=with_shardings(frozen, frozen_shardings),
      batch_sharding=batch_shardings, step=step, eval_step=eval_step,
      pipeline=pipeline)


def starting_model(task: TrainTask, mesh: Mesh, rules, seed: int
                   ) -> nnx.Module:
  """The task's model before training: born sharded from `seed`, then the
  task's starting weights restored straight into their shardings (what a
  stage evaluates as "before")."""
  model = create_sharded(lambda: task.build_model(nnx.Rngs(seed)), mesh,
                         rules)
  if task.load_weights is not None:
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    targets = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        pure)
    nnx.replace_by_pure_dict(state, task.load_weights(targets))
    nnx.update(model, state)
  return model


def initial_state(program: TrainProgram, seed: int
                  ) -> tuple[TrainState, nnx.State]:
  """(train state, frozen params) on the mesh: the model born sharded from
  `seed`, then the task's starting weights restored straight into their
  shardings, split into what trains and what stays frozen."""
  task, mesh, rules = program.task, program.mesh, program.rules
  model = starting_model(task, mesh, rules, seed)
  _, params, frozen = split_trainable(model, task.trainable)
  del model
  with use_mesh(mesh, rules):
    state = jax.jit(
        functools.partial(init_train_state, optimizer=program.optimizer),
        out_shardings=program.state_shardings)(params)
  return state, frozen


def traced_matmul_flops(jaxpr) -> float:
  """Matmul FLOPs of a traced program with every scan expanded.

  XLA's `cost_analysis()` counts a while-loop body once, so for a decoder whose
  layers run in a `lax.scan` it reports roughly one layer. This walks the jaxpr
  instead: `dot_general` FLOPs (2 x output size x contracted size) times the
  lengths of the enclosing scans, including what remat recomputes in the
  backward pass. A `cond` counts its costliest branch; other loops count once.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      contracted = math.prod(lhs_shape[d] for d in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
    inner = [traced_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params)]
    if eqn.primitive.name == "cond":
      total += max(inner, default=0.0)
    else:
      total += eqn.params.get("length", 1) * sum(inner)
  return total


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  found = []
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    found += [v for v in values if hasattr(v, "eqns") or hasattr(v, "jaxpr")
              and hasattr(v.jaxpr, "eqns")]
  return found
