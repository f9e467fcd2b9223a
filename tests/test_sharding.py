"""Sharding by logical names: every mesh computes the single-device result."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.generate.sampler import Sampler
from mllm_jax.modeling import Decoder
from mllm_jax.parallel.config import DEFAULT_RULES, ParallelConfig
from mllm_jax.parallel.mesh import check_divisible, make_mesh
from mllm_jax.parallel.sharding import (create_sharded, current_mesh,
                                        on_mesh_of, param_shardings,
                                        use_mesh)
from mllm_jax.train.losses import token_cross_entropy
from tests.helpers import rel_err, tiny_config

CFG = tiny_config("tiny", num_heads=8, num_kv_heads=4)
CFG_CUSTOM_VJP = replace(CFG, custom_vjp=True)
CFG_CPU_FUSED = replace(CFG, custom_vjp=True, attention_backend="cpu_fused")
TOKENS = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 16))
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def loss_and_grads(graphdef, state, tokens):
  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens)
    return token_cross_entropy(logits, jnp.roll(tokens, -1, 1)).mean(), logits
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return value, logits, grads


def single_device_result(cfg):
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return graphdef, state, jax.jit(loss_and_grads, static_argnums=0)(
      graphdef, state, TOKENS)


@pytest.fixture(scope="module")
def single_device():
  return single_device_result(CFG)


@pytest.fixture(scope="module")
def single_device_custom_vjp():
  return single_device_result(CFG_CUSTOM_VJP)


@pytest.fixture(scope="module")
def single_device_cpu_fused():
  return single_device_result(CFG_CPU_FUSED)


@pytest.mark.parametrize("shape", MESHES)
def test_mesh_matches_single_device(shape, single_device):
  check_mesh_matches(CFG, shape, single_device)


@pytest.mark.parametrize("shape", MESHES[3:])
def test_custom_vjp_mesh_matches_single_device(shape,
                                               single_device_custom_vjp):
  """The hand-written backward passes (heads-major attention core, SwiGLU,
  RMSNorm) shard like autodiff's."""
  check_mesh_matches(CFG_CUSTOM_VJP, shape, single_device_custom_vjp)


@pytest.mark.parametrize("shape", MESHES[3:])
def test_cpu_fused_mesh_matches_single_device(shape, single_device_cpu_fused):
  """The fused CPU kernel runs per device under shard_map: batch over the
  data axes, heads over the tensor axis."""
  check_mesh_matches(CFG_CPU_FUSED, shape, single_device_cpu_fused)


def check_mesh_matches(cfg, shape, single):
  graphdef, _, (want_loss, want_logits, want_grads) = single
  data, fsdp, tensor = shape
  parallel = ParallelConfig(data=data, fsdp=fsdp, tensor=tensor)
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = make_mesh(parallel, devices)
  model = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh,
                         parallel.rules)
  _, state = nnx.split(model)
  batch = jax.device_put(TOKENS, NamedSharding(mesh, P(("data", "fsdp"))))
  shardings = param_shardings(state, mesh, parallel.rules)
  step = jax.jit(loss_and_grads, static_argnums=0,
                 out_shardings=(None, None, shardings))
  with use_mesh(mesh, parallel.rules):
    loss, logits, grads = step(graphdef, state, batch)
  assert rel_err(loss, want_loss) < 1e-5
  assert rel_err(logits, want_logits) < 1e-5
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert rel_err(got, want) < 1e-5
  # Gradients come out sharded like their parameters, as asked.
  for got, param in zip(jax.tree.leaves(grads), jax.tree.leaves(state)):
    assert got.sharding.is_equivalent_to(param.sharding, got.ndim)


def test_parameters_are_born_on_their_shards(single_device):
  _, want_state, _ = single_device
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(parallel)
  state = nnx.state(create_sharded(lambda: Decoder(CFG, rngs=nnx.Rngs(0)),
                                   mesh, parallel.rules))
  q = state["blocks"]["attn"]["q"].get_value()  # [layers, embed, heads, hd]
  assert q.sharding.spec == P("stage", "fsdp", "tensor", None)
  layers, embed, heads, hd = q.shape
  assert {s.data.shape for s in q.addressable_shards} == {
      (layers, embed // 2, heads // 2, hd)}
  table = state["embed"]["table"].get_value()  # [vocab, embed]
  assert table.sharding.spec == P("tensor", "fsdp")
  # Same random values as the unsharded initialisation.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_on_mesh_of_splits_rows_over_the_models_data_axes(
    single_device_cpu_fused):
  """Evaluation outside the trainer (held-out loss, reward scores, DPO
  log-probs) runs under on_mesh_of: the model's mesh is active (so the
  cpu_fused kernel runs per device) and rows split over its data axes,
  with the one-device result."""
  _, _, (_, want_logits, _) = single_device_cpu_fused
  parallel = ParallelConfig(data=4, fsdp=2)
  mesh = make_mesh(parallel)
  model = create_sharded(lambda: Decoder(CFG_CPU_FUSED, rngs=nnx.Rngs(0)),
                         mesh, parallel.rules)
  with on_mesh_of(model) as put:
    assert current_mesh() is mesh
    rows = put(TOKENS)
    assert rows.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in rows.addressable_shards} == {(1, 16)}
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(
        model, rows)), np.asarray(want_logits), atol=1e-5)
    # Rows the batch axes do not divide stay whole.
    assert put(TOKENS[:3]).sharding.spec == P()
  with on_mesh_of(Decoder(CFG, rngs=nnx.Rngs(0))) as put:  # one device
    assert current_mesh() is None
    assert not isinstance(put(TOKENS).sharding, NamedSharding)
  # A Sampler given no mesh generates on the sharded model's own mesh,
  # with the one-device model's tokens.
  sampler = Sampler(model)
  assert sampler.mesh is mesh
  prompts = [list(map(int, row[:5])) for row in TOKENS[:3]]
  want = Sampler(Decoder(CFG_CPU_FUSED, rngs=nnx.Rngs(0))).generate(prompts, 6)
  np.testing.assert_array_equal(sampler.generate(prompts, 6).tokens,
                                want.tokens)


def test_mesh_errors_name_the_field():
  with pytest.raises(ConfigError, match="parallel: mesh .* has 6 devices"):
    make_mesh(ParallelConfig(data=3, fsdp=2, tensor=1))
  with pytest.raises(ConfigError, match="at most one mesh axis"):
    from_config(ParallelConfig, {"data": -1, "fsdp": -1}, "parallel")
  with pytest.raises(ConfigError, match="parallel.tensr: unknown field"):
    from_config(ParallelConfig, {"tensr": 2}, "parallel")
  with pytest.raises(ConfigError, match=r"parallel.rules\[0\].*unknown mesh"):
    from_config(ParallelConfig, {"rules": [("embed", "model")]}, "parallel")
  with pytest.raises(ConfigError, match="model.num_heads"):
    check_divisible(ParallelConfig(tensor=8), 8, num_heads=12,
                    num_kv_heads=12)
  with pytest.raises(ConfigError, match="model.num_kv_heads"):
    check_divisible(ParallelConfig(tensor=4), 8, num_heads=8, num_kv_heads=2)
  with pytest.raises(ConfigError, match="train.batch_size"):
    check_divisible(ParallelConfig(data=4, fsdp=2), 8, num_heads=8,
                    num_kv_heads=8, batch_size=12)


def test_indivisible_parameter_names_param_and_rule():
  cfg = tiny_config("tiny", num_heads=8, num_kv_heads=1)  # MQA on tensor=4
  mesh = make_mesh(ParallelConfig(data=2, tensor=4))
  abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
  with pytest.raises(ConfigError, match=r"\['blocks'\]\['attn'\]\['k'\].*"
                     r"'kv_heads'"):
    param_shardings(abstract, mesh, DEFAULT_RULES)
  # The fix the message suggests: replicate the single K/V head.
  rules = tuple((n, None if n == "kv_heads" else a) for n, a in DEFAULT_RULES)
  shardings = param_shardings(abstract, mesh, rules)
  assert shardings["blocks"]["attn"]["k"].get_value().spec == P(
      "stage", "fsdp", None, None)
