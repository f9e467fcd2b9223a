"""The vision tower and the projectors: parity with transformers' CLIP
vision model, BLIP-2 Q-Former and LLaVA projector (random-initialised, a few
small shapes, CPU torch float32), HF round trips, shapes, gradients,
refusals, and the 8-device mesh against one device.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs.vision import projector_config, vision_config  # noqa: E402
from mllm_jax.configlib import ConfigError, from_config  # noqa: E402
from mllm_jax.convert import vision as convert  # noqa: E402
from mllm_jax.modeling.projectors import build_projector  # noqa: E402
from mllm_jax.modeling.vision import (VisionEncoder,  # noqa: E402
                                      bicubic_matrix, sincos2d_positions)
from mllm_jax.modeling.vision_config import (ProjectorConfig,  # noqa: E402
                                             VisionConfig)
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import make_mesh  # noqa: E402
from mllm_jax.parallel.sharding import (create_sharded,  # noqa: E402
                                        param_shardings, use_mesh)
from tests.helpers import randomise_torch, rel_err  # noqa: E402

TOLERANCE = 1e-4
CLIP_SHAPES = {
    # hidden, heads, layers, mlp, image, patch, activation
    "quick_gelu": dict(hidden_size=32, num_attention_heads=4,
                       num_hidden_layers=3, intermediate_size=64,
                       image_size=28, patch_size=7, hidden_act="quick_gelu"),
    "gelu_wide_heads": dict(hidden_size=48, num_attention_heads=3,
                            num_hidden_layers=2, intermediate_size=80,
                            image_size=32, patch_size=8, hidden_act="gelu"),
    "one_channel": dict(hidden_size=24, num_attention_heads=2,
                        num_hidden_layers=2, intermediate_size=40,
                        image_size=20, patch_size=4, num_channels=1,
                        layer_norm_eps=1e-6),
}
QFORMER_SHAPES = {
    # width, heads, layers, cross every f, vision width, queries, LLM width
    "blip2": dict(config=dict(hidden_size=32, num_attention_heads=4,
                              num_hidden_layers=3, intermediate_size=64,
                              cross_attention_frequency=2,
                              encoder_hidden_size=24),
                  queries=8, llm=40),
    "every_layer": dict(config=dict(hidden_size=48, num_attention_heads=6,
                                    num_hidden_layers=2, intermediate_size=40,
                                    cross_attention_frequency=1,
                                    encoder_hidden_size=48),
                        queries=5, llm=16),
}


def torch_images(cfg: VisionConfig, batch: int, size: int | None = None,
                 width: int | None = None, seed: int = 0):
  size = size or cfg.image_size
  x = np.random.RandomState(seed).randn(batch, cfg.num_channels, size,
                                        width or size).astype(np.float32)
  return torch.tensor(x), jnp.asarray(x.transpose(0, 2, 3, 1))  # NCHW, NHWC


# ----------------------------------------------------------------------------
# CLIP vision tower
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_pairs():
  """shape name -> (transformers CLIPVisionModel, our converted encoder)."""
  cache = {}

  def get(name):
    if name not in cache:
      hf_cfg = transformers.CLIPVisionConfig(**CLIP_SHAPES[name],
                                             attn_implementation="eager")
      model = randomise_torch(transformers.CLIPVisionModel(hf_cfg),
                              len(cache))
      cfg = convert.clip_config_from_hf(hf_cfg.to_dict(), name,
                                        dtype="float32")
      ours = convert.clip_from_hf(cfg, convert.reader_for(model.state_dict()))
      cache[name] = model, ours
    return cache[name]

  return get


@pytest.mark.parametrize("name", sorted(CLIP_SHAPES))
def test_clip_hidden_states_match_transformers(name, clip_pairs):
  model, ours = clip_pairs(name)
  cfg = ours.cfg
  images_t, images = torch_images(cfg, 2)
  with torch.no_grad():
    out = model(images_t, output_hidden_states=True)
  hidden = [h.numpy() for h in out.hidden_states]
  assert len(hidden) == cfg.num_layers + 1

  @jax.jit
  def run(images):
    return ([ours.hidden_state(images, k) for k in range(cfg.num_layers + 1)],
            ours.pooled(images), ours(images))

  states, pooled, features = run(images)
  diffs = [float(np.abs(np.asarray(s) - h).max())
           for s, h in zip(states, hidden)]
  print(f"{name}: max |ours - transformers| per hidden state {diffs}")
  assert max(diffs) <= TOLERANCE
  assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() <= (
      TOLERANCE)
  # LLaVA's features: the penultimate layer without the class token.
  assert cfg.feature_layer == -2 and cfg.feature_select == "patch"
  assert features.shape == (2, cfg.num_patches, cfg.embed_dim)
  assert np.abs(np.asarray(features) - hidden[-2][:, 1:]).max() <= TOLERANCE


def test_clip_feature_choices_and_interpolated_positions(clip_pairs):
  model, ours = clip_pairs("quick_gelu")
  cfg = ours.cfg
  # Another image size: positions resampled as interpolate_pos_encoding.
  for height, width in ((42, 42), (21, 35)):
    images_t, images = torch_images(cfg, 1, height, width, seed=1)
    with torch.no_grad():
      out = model(images_t, interpolate_pos_encoding=True,
                  output_hidden_states=True)
    got = jax.jit(lambda x: ours.hidden_state(x, cfg.num_layers))(images)
    assert got.shape[1] == 1 + (height // 7) * (width // 7)
    assert np.abs(np.asarray(got) - out.last_hidden_state.numpy()).max() <= (
        TOLERANCE)
  # The same size resamples nothing; the matrix is the identity.
  np.testing.assert_array_equal(bicubic_matrix(5, 5), np.eye(5))
  # feature_layer / feature_select pick transformers' hidden_states[k].
  images_t, images = torch_images(cfg, 2, seed=2)
  with torch.no_grad():
    hidden = model(images_t, output_hidden_states=True).hidden_states
  for layer, select in ((0, "cls_patch"), (1, "patch"), (-1, "cls_patch")):
    other = dataclasses.replace(cfg, feature_layer=layer,
                                feature_select=select)
    encoder = convert.module_from_params(
        lambda c=other: VisionEncoder(c, nnx.Rngs(0)), nnx.state(ours))
    got = np.asarray(encoder(images))
    want = hidden[layer].numpy()
    want = want if select == "cls_patch" else want[:, 1:]
    assert got.shape == (2, other.num_features, cfg.embed_dim)
    assert encoder.num_features(28, 28) == other.num_features
    assert np.abs(got - want).max() <= TOLERANCE


def test_clip_round_trip_through_transformers(clip_pairs, tmp_path):
  model, ours = clip_pairs("gelu_wide_heads")
  original = model.state_dict()
  exported = convert.clip_to_hf(ours)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  # As a directory CLIPVisionModel loads, and back through load_clip under
  # a CLIPModel-style prefix.
  convert.save_clip(str(tmp_path / "hf"), ours)
  back = transformers.CLIPVisionModel.from_pretrained(
      tmp_path / "hf", attn_implementation="eager").eval()
  images_t, _ = torch_images(ours.cfg, 1)
  with torch.no_grad():
    np.testing.assert_array_equal(back(images_t).last_hidden_state.numpy(),
                                  model(images_t).last_hidden_state.numpy())
  cfg, again = convert.load_clip(str(tmp_path / "hf"), feature_layer=-1)
  assert cfg.feature_layer == -1 and cfg.embed_dim == 48
  prefixed = {f"vision_model.{k}": v for k, v in exported.items()}
  assert convert.clip_prefix(prefixed) == "vision_model."
  for a, b in zip(jax.tree.leaves(nnx.state(again)),
                  jax.tree.leaves(nnx.state(ours))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------
# Projectors with a transformers reference
# ----------------------------------------------------------------------------


def hf_qformer(shape, seed=0):
  """Blip2QFormerModel + query_tokens + language_projection, as BLIP-2's
  get_image_features wires them, with the state dict under BLIP-2's names."""
  spec = QFORMER_SHAPES[shape]
  config = transformers.Blip2QFormerConfig(**spec["config"],
                                           attn_implementation="eager")
  qformer = randomise_torch(transformers.Blip2QFormerModel(config), seed)
  torch.manual_seed(seed + 100)
  queries = torch.randn(1, spec["queries"], config.hidden_size)
  projection = randomise_torch(
      torch.nn.Linear(config.hidden_size, spec["llm"]), seed + 200)

  def forward(features):
    with torch.no_grad():
      out = qformer(query_embeds=queries.expand(features.shape[0], -1, -1),
                    encoder_hidden_states=features,
                    encoder_attention_mask=torch.ones(features.shape[:2],
                                                      dtype=torch.long))
      return projection(out.last_hidden_state).numpy()

  tensors = {"query_tokens": queries,
             **{f"qformer.{k}": v for k, v in qformer.state_dict().items()},
             **{f"language_projection.{k}": v
                for k, v in projection.state_dict().items()}}
  return config, forward, tensors


@pytest.mark.parametrize("shape", sorted(QFORMER_SHAPES))
def test_qformer_matches_blip2_and_round_trips(shape):
  config, forward, tensors = hf_qformer(shape)
  blip2 = transformers.Blip2Config(
      vision_config=dict(hidden_size=config.encoder_hidden_size),
      qformer_config=config.to_dict(),
      num_query_tokens=QFORMER_SHAPES[shape]["queries"]).to_dict()
  cfg, vision_dim = convert.qformer_config_from_hf(blip2, 0, shape)
  assert vision_dim == config.encoder_hidden_size
  ours = convert.qformer_from_hf(cfg, vision_dim,
                                 convert.reader_for(tensors))
  features = np.random.RandomState(3).randn(
      2, 13, vision_dim).astype(np.float32)
  want = forward(torch.tensor(features))
  got = np.asarray(jax.jit(lambda f: ours(f))(jnp.asarray(features)))
  diff = float(np.abs(got - want).max())
  print(f"{shape}: max |ours - transformers| = {diff:.3g}")
  assert got.shape == (2, cfg.tokens_per_image(13), want.shape[-1])
  assert diff <= TOLERANCE
  exported = convert.qformer_to_hf(ours)
  assert sorted(exported) == sorted(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
  fields = convert.qformer_config_to_hf(cfg, vision_dim)
  assert {k: fields[k] for k in QFORMER_SHAPES[shape]["config"]} == (
      QFORMER_SHAPES[shape]["config"])


def test_mlp_projector_matches_llava():
  llava = transformers.LlavaConfig(
      vision_config=transformers.CLIPVisionConfig(hidden_size=24).to_dict(),
      text_config=transformers.LlamaConfig(hidden_size=40,
                                          num_attention_heads=4).to_dict())
  module = randomise_torch(
      transformers.models.llava.modeling_llava.LlavaMultiModalProjector(
          llava), 5)
  tensors = {f"multi_modal_projector.{k}": v
             for k, v in module.state_dict().items()}
  cfg = from_config(ProjectorConfig, projector_config("mlp2x_gelu"),
                    "projector")
  ours = convert.llava_projector_from_hf(cfg, convert.reader_for(tensors))
  features = np.random.RandomState(4).randn(2, 9, 24).astype(np.float32)
  with torch.no_grad():
    want = module(torch.tensor(features)).numpy()
  assert np.abs(np.asarray(ours(jnp.asarray(features))) - want).max() <= (
      TOLERANCE)
  exported = convert.llava_projector_to_hf(ours)
  for key, value in tensors.items():
    np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


# ----------------------------------------------------------------------------
# Every projector: shapes, token counts, gradients
# ----------------------------------------------------------------------------

PROJECTORS = ("linear", "mlp2x_gelu", "tiny_qformer", "tiny_abstractor")


@pytest.fixture(scope="module")
def projectors():
  """preset name -> (ProjectorConfig, projector from width 32 to 48)."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg = from_config(ProjectorConfig, projector_config(name), "projector")
      cache[name] = cfg, build_projector(cfg, 32, 48, nnx.Rngs(0))
    return cache[name]

  return get


@pytest.mark.parametrize("name", PROJECTORS)
def test_projector_shapes_and_gradients(name, projectors):
  cfg, projector = projectors(name)
  features = jnp.asarray(np.random.RandomState(0).randn(3, 10, 32),
                         jnp.float32)
  graphdef, state = nnx.split(projector)
  forward = jax.jit(lambda state, f: nnx.merge(graphdef, state)(f))
  out = forward(state, features)
  assert out.shape == (3, cfg.tokens_per_image(10), 48)
  assert out.dtype == jnp.float32
  expected_tokens = {"linear": 10, "mlp2x_gelu": 10, "tiny_qformer": 8,
                     "tiny_abstractor": 8}
  assert cfg.tokens_per_image(10) == expected_tokens[name]
  # Each image's tokens depend on that image only.
  changed = features.at[1].add(jnp.asarray(
      np.random.RandomState(1).randn(10, 32), jnp.float32))
  out2 = forward(state, changed)
  np.testing.assert_allclose(out2[0], out[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out2[1], out[1])
  # The query projectors give num_queries tokens whatever the feature count.
  assert forward(state, jnp.ones((2, 50, 32))).shape == (
      2, cfg.tokens_per_image(50), 48)

  def loss(state, features):
    return jnp.mean(nnx.merge(graphdef, state)(features) ** 2)

  grads, feature_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      state, features)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.abs(g).max() > 0, f"no gradient for {jax.tree_util.keystr(path)}"
  assert np.abs(np.asarray(feature_grads)).max() > 0


# ----------------------------------------------------------------------------
# Meshes, backends, remat
# ----------------------------------------------------------------------------

MESH = ParallelConfig(data=2, fsdp=2, tensor=2)


def _loss_and_grads(graphdef, state, x):
  def loss(state):
    out = nnx.merge(graphdef, state)(x)
    return jnp.mean(out.astype(jnp.float32) ** 2), out
  (value, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return value, out, grads


def close(got, want, tolerance=1e-4) -> bool:
  """Equal up to `tolerance` of the larger of |want| and 1e-3: gradients
  that are zero in exact arithmetic (the key bias: softmax ignores a shift
  shared by all keys) are rounding noise on both sides, and sums over many
  cancelling terms (the patch embedding's gradient) differ by float32
  rounding (~1e-5 of their largest entry) when reduced in another order."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.abs(got - want).max() <= tolerance * max(np.abs(want).max(), 1e-3)


def one_device(module, x):
  """(graphdef, state, (loss, output, gradients) on one device)."""
  graphdef, state = nnx.split(module)
  return graphdef, state, jax.jit(_loss_and_grads, static_argnums=0)(
      graphdef, state, x)


def check_on_mesh(module, x, want=None):
  """The module on one device and sharded by the rules over 2x2x2 devices:
  the same forward and gradients, gradients sharded like their parameters.
  Returns the sharded state."""
  graphdef, state, one = one_device(module, x) if want is None else (
      *nnx.split(module), want)
  mesh = make_mesh(MESH)
  sharded = jax.device_put(state, param_shardings(state, mesh, MESH.rules))
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  step = jax.jit(_loss_and_grads, static_argnums=0,
                 out_shardings=(None, None, param_shardings(
                     sharded, mesh, MESH.rules)))
  with use_mesh(mesh, MESH.rules):
    got = step(graphdef, sharded, x)
  assert rel_err(got[0], one[0]) < 1e-5
  assert rel_err(got[1], one[1]) < 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[2]),
                          jax.tree.leaves(one[2])):
    assert close(g, w), jax.tree_util.keystr(path)
  for g, p in zip(jax.tree.leaves(got[2]), jax.tree.leaves(sharded)):
    assert g.sharding.is_equivalent_to(p.sharding, g.ndim)
  return sharded


def tiny_vision(**overrides) -> VisionConfig:
  return from_config(VisionConfig, vision_config("tiny", **overrides),
                     "vision")


@pytest.fixture(scope="module")
def tower():
  """(tiny VisionEncoder, 8 images, its loss, output and gradients on one
  device), shared by the mesh, backend and dtype tests."""
  model = VisionEncoder(tiny_vision(), nnx.Rngs(0))
  images = jnp.asarray(np.random.RandomState(0).randn(8, 32, 32, 3),
                       jnp.float32)
  return model, images, one_device(model, images)[2]


def test_vision_tower_on_mesh_matches_one_device(tower):
  model, images, want = tower
  check_on_mesh(model, images, want)
  # Born sharded (initialised under jit on the mesh): the same weights.
  born = nnx.state(create_sharded(lambda: VisionEncoder(model.cfg,
                                                        nnx.Rngs(0)),
                                  make_mesh(MESH), MESH.rules))
  for a, b in zip(jax.tree.leaves(born), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = born["blocks"]["attn"]["q"]["kernel"].get_value()  # [L, D, H, Dh]
  assert q.sharding.spec == P("stage", "fsdp", "tensor", None)


@pytest.mark.parametrize("name", ("tiny_qformer", "tiny_abstractor"))
def test_query_projectors_on_mesh_match_one_device(name, projectors):
  features = jnp.asarray(np.random.RandomState(1).randn(8, 12, 32),
                         jnp.float32)
  check_on_mesh(projectors(name)[1], features)


def test_backends_and_remat_compute_the_same(tower):
  model, images, want = tower
  state = nnx.state(model)
  for overrides in (dict(attention_backend="dot_product"),
                    dict(attention_backend="cpu_fused"),
                    dict(remat="full", scan_unroll=2)):
    other = dataclasses.replace(model.cfg, **overrides)
    other_def = nnx.graphdef(nnx.eval_shape(
        lambda c=other: VisionEncoder(c, nnx.Rngs(0))))
    got = jax.jit(_loss_and_grads, static_argnums=0)(other_def, state,
                                                      images)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert close(g, w), overrides


def test_bfloat16_tower_tracks_float32(tower):
  model, images, want = tower
  half = dataclasses.replace(model.cfg, dtype="bfloat16")
  half_model = convert.module_from_params(
      lambda: VisionEncoder(half, nnx.Rngs(0)), nnx.state(model))
  out = jax.jit(lambda x: half_model(x))(images)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, want[1]) < 0.05


def test_sincos2d_positions_say_where_each_patch_is():
  table = sincos2d_positions(4, 32)
  assert table.shape == (17, 32)
  np.testing.assert_array_equal(table[0], 0.0)  # the class token
  patches = table[1:]
  # sin^2 + cos^2 = 1 per frequency: every patch has the same norm.
  np.testing.assert_allclose(np.linalg.norm(patches, axis=1), 4.0, rtol=1e-6)
  # The first quarter depends on the row only, the third on the column.
  grid = patches.reshape(4, 4, 32)
  np.testing.assert_array_equal(grid[:, 0, :8], grid[:, 3, :8])
  np.testing.assert_array_equal(grid[0, :, 16:24], grid[3, :, 16:24])
  assert len({tuple(np.round(row, 6)) for row in patches}) == 16
  # A fresh tower starts from the table; the default starts at init_std.
  model = VisionEncoder(tiny_vision(position_init="sincos2d"), nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.positions[...]), table)
  plain = VisionEncoder(tiny_vision(), nnx.Rngs(0)).positions[...]
  assert float(jnp.std(plain)) < 2 * tiny_vision().init_std


# ----------------------------------------------------------------------------
# Presets and refusals
# ----------------------------------------------------------------------------


def test_presets():
  large = from_config(VisionConfig, vision_config("clip_vit_l14"), "vision")
  assert (large.num_patches, large.num_features, large.layers_run) == (
      256, 256, 23)
  hi = from_config(VisionConfig, vision_config("clip_vit_l14_336"), "vision")
  assert (hi.num_patches, hi.head_size) == (576, 64)
  qformer = from_config(ProjectorConfig, projector_config("qformer"),
                        "projector")
  assert (qformer.tokens_per_image(256), qformer.width(1024),
          qformer.heads(1024), qformer.hidden(1024), qformer.eps) == (
              32, 768, 12, 3072, 1e-12)
  abstractor = from_config(ProjectorConfig, projector_config("abstractor"),
                           "projector")
  assert (abstractor.width(1024), abstractor.heads(1024),
          abstractor.layers) == (1024, 16, 6)
  # The ViT-L/14 parameter count is CLIP's vision tower (CLIPVisionModel).
  abstract = nnx.eval_shape(lambda: VisionEncoder(large, nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(
      nnx.state(abstract)))
  assert count == 303_179_776


@pytest.mark.parametrize("fields, message", [
    (dict(feature_layer=-5), "vision.feature_layer: got -5"),
    (dict(feature_layer=4), "vision.feature_layer"),
    (dict(num_heads=5), "vision.num_heads: embed_dim=32 is not divisible"),
    (dict(patch_size=5), "vision.patch_size: image_size=32"),
    (dict(feature_select="all"), "vision.feature_select"),
    (dict(attention_backend="splash"), "vision.attention_backend"),
    (dict(activation="relu"), "vision.activation"),
    (dict(norm_eps=0.0), "vision.norm_eps"),
    (dict(position_init="rope"), "vision.position_init: got 'rope'"),
    (dict(position_init="sincos2d", embed_dim=30, num_heads=5),
     "vision.position_init: sincos2d needs embed_dim divisible by 4"),
])
def test_vision_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    from_config(VisionConfig, {**vision_config("tiny"), **fields}, "vision")


@pytest.mark.parametrize("fields, message", [
    (dict(projector="resampler"), "projector.projector: got 'resampler'"),
    (dict(projector="abstractor", hidden_dim=64), "projector.hidden_dim"),
    (dict(num_queries=0), "projector.num_queries"),
    (dict(cross_attention_frequency=0), "projector.cross_attention_frequency"),
    (dict(norm_eps=-1.0), "projector.norm_eps"),
    (dict(attention_backend="splash"), "projector.attention_backend"),
    (dict(batch=3), "projector.batch: unknown field"),
])
def test_projector_config_errors_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    from_config(ProjectorConfig, {**ProjectorConfig().__dict__, **fields},
                "projector")


def test_bad_inputs_and_checkpoints_are_refused(clip_pairs, projectors):
  model, ours = clip_pairs("quick_gelu")
  with pytest.raises(ValueError, match=r"images have shape \(1, 28, 28, 4\)"):
    ours(jnp.zeros((1, 28, 28, 4)))
  with pytest.raises(ValueError, match="multiples of vision.patch_size=7"):
    ours(jnp.zeros((1, 30, 28, 3)))
  _, projector = projectors("tiny_qformer")
  with pytest.raises(ValueError, match=r"features have shape \(1, 4, 16\)"):
    projector(jnp.zeros((1, 4, 16)))
  with pytest.raises(ConfigError, match=r"q:hidden_act: got 'relu'"):
    convert.clip_config_from_hf({"hidden_act": "relu"}, "q")
  with pytest.raises(ConfigError, match="q:model_type"):
    convert.clip_config_from_hf({"model_type": "siglip_vision_model"}, "q")
  with pytest.raises(ConfigError, match="q:use_qformer_text_input"):
    convert.qformer_config_from_hf({"use_qformer_text_input": True}, 32, "q")
  with pytest.raises(ConfigError, match="q: projector.num_heads"):
    convert.qformer_config_from_hf({"hidden_size": 30}, 32, "q")
  tensors = dict(model.state_dict())
  tensors["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
  with pytest.raises(ConfigError, match="1 tensor.* have no place"):
    convert.clip_from_hf(ours.cfg, convert.reader_for(tensors))
  del tensors["encoder.layers.0.self_attn.extra.weight"]
  tensors["pre_layrnorm.weight"] = torch.zeros(5)
  with pytest.raises(ConfigError, match=r"pre_layrnorm.weight has shape"):
    convert.clip_from_hf(ours.cfg, convert.reader_for(tensors))
  del tensors["pre_layrnorm.weight"]
  with pytest.raises(ConfigError, match="'pre_layrnorm.weight' is missing"):
    convert.clip_from_hf(ours.cfg, convert.reader_for(tensors))
  with pytest.raises(ConfigError, match=r"params: parameter \S+ is missing"):
    convert.module_from_params(lambda: VisionEncoder(ours.cfg, nnx.Rngs(0)),
                               {"blocks": {}})
