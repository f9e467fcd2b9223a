"""The jitted training step, built from configs and a mesh without data.

The trainer jits `make_train_step` with the train state's shardings in and
out, the batch sharded over `act_batch`, and the state donated. This module
builds exactly that function from abstract shapes (`jax.ShapeDtypeStruct`s
carrying shardings), so `launch.aot_compile` can lower and compile the real
step for a mesh of devices this machine does not have (a TPU topology) and
report its memory and FLOPs before anyone books the pod.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mllm_jax.configlib import check
from mllm_jax.modeling import Decoder, ModelConfig
from mllm_jax.parallel.mesh import ParallelConfig, check_divisible
from mllm_jax.parallel.sharding import (logical_to_spec, param_shardings,
                                        use_mesh)
from mllm_jax.train.optimizer import (OptimizerConfig, learning_rate_schedule,
                                      make_optimizer)
from mllm_jax.train.step import init_train_state, make_train_step

# The batch schema every supervised stage feeds (see data.pipeline).
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32,
                "loss_weights": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32}


@dataclasses.dataclass(frozen=True)
class AbstractTrainStep:
  """The jitted step and abstract arguments to lower it with."""
  step: Any  # jax.jit(step_fn, ...) exactly as the trainer builds it
  mesh: Mesh
  rules: tuple
  state: Any  # train state of ShapeDtypeStructs with shardings
  batch: dict[str, jax.ShapeDtypeStruct]

  def lower(self) -> jax.stages.Lowered:
    """Traces under the mesh so activation constraints apply, as in train()."""
    with use_mesh(self.mesh, self.rules):
      return self.step.lower(self.state, self.batch)


def check_layout(model_cfg: ModelConfig, parallel: ParallelConfig,
                 batch_size: int, grad_accum_steps: int,
                 num_devices: int) -> None:
  """The trainer's pre-compile checks: heads and (micro-)batches divide."""
  check_divisible(parallel, num_devices, num_heads=model_cfg.num_heads,
                  num_kv_heads=model_cfg.kv_heads, batch_size=batch_size)
  micro = batch_size // grad_accum_steps
  shards = parallel.batch_shards(num_devices)
  check(micro % shards == 0, "train.grad_accum_steps",
        f"micro-batches of {micro} sequences do not divide over the "
        f"data-parallel size {shards}")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("act_batch",), rules, mesh))


def jit_train_step(graphdef: nnx.GraphDef, optimizer, schedule,
                   state_shardings: Any, batch_shardings: NamedSharding,
                   grad_accum_steps: int, z_loss: float):
  """jit(step) with the trainer's in/out shardings and donated state."""
  step_fn = make_train_step(graphdef, optimizer, schedule, grad_accum_steps,
                            z_loss)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def abstract_train_step(model_cfg: ModelConfig, parallel: ParallelConfig,
                        optimizer_cfg: OptimizerConfig, *, steps: int,
                        batch_size: int, seq_len: int, grad_accum_steps: int,
                        z_loss: float, mesh: Mesh,
                        seed: int = 0) -> AbstractTrainStep:
  """The trainer's step for `mesh`, with nothing allocated on any device."""
  rules = tuple(parallel.rules)
  abstract_model = nnx.eval_shape(
      lambda: Decoder(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, params = nnx.split(abstract_model)
  optimizer = make_optimizer(optimizer_cfg, params, steps)
  schedule = learning_rate_schedule(optimizer_cfg, steps)
  state = jax.eval_shape(
      functools.partial(init_train_state, optimizer=optimizer), params)
  state_shardings = param_shardings(state, mesh, rules)
  batch_shardings = batch_sharding(mesh, rules)

  step = jit_train_step(graphdef, optimizer, schedule, state_shardings,
                        batch_shardings, grad_accum_steps, z_loss)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, state_shardings)
  abstract_batch = {
      key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype,
                                sharding=batch_shardings)
      for key, dtype in BATCH_DTYPES.items()}
  return AbstractTrainStep(step, mesh, rules, abstract_state, abstract_batch)


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
