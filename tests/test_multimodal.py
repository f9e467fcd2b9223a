"""The multimodal model (vision tower + projector + decoder): LLaVA parity
with transformers and round trips through launch.convert_checkpoint, mixed
text-only and image batches training with the tower frozen, placeholder and
truncation handling on the host, bidirectional image attention on every
backend that takes a mask, and the 8-device mesh against one device.

HF models are random-initialised (no LLaVA weights install offline) with
O(1) weights, so every mapping error shows in the logits.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.vision import projector_config, vision_config
from mllm_jax.configlib import ConfigError, from_config
from mllm_jax.convert import multimodal as mm_io
from mllm_jax.data import mm_batch
from mllm_jax.data.chat import ChatStats
from mllm_jax.modeling.multimodal import (MultimodalConfig, MultimodalModel,
                                          multimodal_loss)
from mllm_jax.modeling.vision_config import ProjectorConfig, VisionConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import param_shardings, use_mesh
from mllm_jax.train.compile import build_program, initial_state
from mllm_jax.train.config import OptimizerConfig, TrainConfig
from mllm_jax.train.multimodal_task import STAGE_TRAINABLE, multimodal_task
from mllm_jax.train.optimizer import path_name
from tests.helpers import randomise_torch, rel_err, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_ID = 7
SEQ_LEN = 48

# ----------------------------------------------------------------------------
# A tiny model and batches
# ----------------------------------------------------------------------------


def tiny_mm_config(**overrides) -> MultimodalConfig:
  """Our tiny decoder, the tiny ViT (32 px, patch 8: 16 tokens per image)
  and the LLaVA-1.5 projector, all float32."""
  model = tiny_config("tiny", **overrides.pop("model", {}))
  vision = from_config(VisionConfig, vision_config("tiny"), "vision")
  projector = from_config(ProjectorConfig, projector_config(
      "mlp2x_gelu", dtype="float32"), "projector")
  return MultimodalConfig(model, vision, projector, IMAGE_ID, **overrides)


def example(name, rng, num_images, text=(3, 5, 6), weights_on_answer=True):
  """{"id", "ids", "weights", "images"}: prompt text, one <image> token per
  image between text pieces, then an answer that carries the loss."""
  ids, weights = [], []
  for i in range(num_images):
    piece = list(rng.randint(10, 500, text[0]))
    ids += piece + [IMAGE_ID]
    weights += [0.0] * (len(piece) + 1)
  prompt = list(rng.randint(10, 500, text[1]))
  answer = list(rng.randint(10, 500, text[2]))
  ids += prompt + answer
  weights += [0.0] * len(prompt) + [float(weights_on_answer)] * len(answer)
  return {"id": name, "ids": np.asarray(ids, np.int32),
          "weights": np.asarray(weights, np.float32),
          "images": rng.randn(num_images, 32, 32, 3).astype(np.float32)}


def batch_of(examples, tokens=16, **kw):
  return mm_batch.make_batch(
      examples, seq_len=SEQ_LEN, max_images=2, image_shape=(32, 32, 3),
      image_token_id=IMAGE_ID, tokens_per_image=tokens, **kw)


def mixed_batch(seed=0, rows=4):
  """Two images, one image, text only, one image."""
  rng = np.random.RandomState(seed)
  counts = (2, 1, 0, 1, 2, 0, 1, 1)[:rows]
  return batch_of([example(f"ex{i}", rng, k) for i, k in enumerate(counts)])


def build(cfg, seed=0):
  """MultimodalModel(cfg) initialised under jit (eager init is slow)."""
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: MultimodalModel(cfg, nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.state(MultimodalModel(cfg, nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_mm_config()
  return cfg, build(cfg)


@nnx.jit
def logits_of(model, batch):
  return model(batch["inputs"], batch["images"], batch["image_slots"],
               batch["positions"], batch["segment_ids"])


# ----------------------------------------------------------------------------
# LLaVA parity and round trips
# ----------------------------------------------------------------------------

VISION = dict(model_type="clip_vision_model", hidden_size=32,
              intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=32, patch_size=8)
TEXT = dict(model_type="llama", vocab_size=100, hidden_size=48,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5)
HF_IMAGE = 99


def cli(*args):
  subprocess.run([sys.executable, "-m", "launch.convert_checkpoint", *args],
                 cwd=REPO, check=True, capture_output=True, text=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  """(transformers model, HF dir, native dir): a random tiny LLaVA converted
  by the CLI."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("llava")
  config = transformers.LlavaConfig(
      vision_config=VISION, text_config=TEXT, image_token_index=HF_IMAGE,
      image_seq_length=16)
  torch.manual_seed(0)
  model = randomise_torch(
      transformers.LlavaForConditionalGeneration(config), 0)
  model.save_pretrained(root / "hf")
  cli("--from=llava", f"--input={root / 'hf'}", f"--output={root / 'native'}",
      "--dtype=float32")
  return model, root / "hf", root / "native"


def test_converted_llava_gives_transformers_logits(llava):
  """Two images in one row, one in another, a text-only row: the same
  image features spliced at the same placeholders."""
  import torch  # pylint: disable=import-outside-toplevel
  model, _, native_dir = llava
  cfg, ours = mm_io.load_model(str(native_dir))
  assert (cfg.tokens_per_image, cfg.vision.feature_layer,
          cfg.image_token_id) == (16, -2, HF_IMAGE)
  rng = np.random.RandomState(0)
  text = lambda n: list(rng.randint(0, HF_IMAGE, n))
  img = [HF_IMAGE] * 16
  ids = np.asarray([text(3) + img + text(4) + img + text(5),
                    img + text(28),
                    text(44)])
  pixels = rng.randn(3, 3, 32, 32).astype(np.float32)  # [images, C, H, W]
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids),
                 pixel_values=torch.tensor(pixels)).logits.numpy()
  images = np.zeros((3, 2, 32, 32, 3), np.float32)
  images[0, :2] = pixels[:2].transpose(0, 2, 3, 1)
  images[1, 0] = pixels[2].transpose(1, 2, 0)
  slots = np.where(ids == HF_IMAGE, np.cumsum(ids == HF_IMAGE, 1) - 1, -1)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(images),
                        jnp.asarray(slots)))
  assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_llava_round_trip_is_exact(llava, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model, _, native_dir = llava
  cli("--from=native", f"--input={native_dir}", f"--output={tmp_path}")
  back = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path, dtype=torch.float32)
  want, got = model.state_dict(), back.state_dict()
  assert sorted(want) == sorted(got)
  for name in want:
    assert torch.equal(want[name], got[name]), name


def test_llava_config_refusals(llava):
  _, hf_dir, _ = llava
  import json  # pylint: disable=import-outside-toplevel
  config = json.loads((hf_dir / "config.json").read_text())
  for key, value, field in (
      ("projector_hidden_act", "relu", "projector_hidden_act"),
      ("vision_feature_layer", [-2, -1], "vision_feature_layer"),
      ("multimodal_projector_bias", False, "multimodal_projector_bias"),
      ("image_seq_length", 17, "image_seq_length"),
      ("image_token_index", 100, "image_token_id")):
    with pytest.raises(ConfigError, match=field):
      mm_io.config_from_llava({**config, key: value}, dtype="float32")


def test_run_fields_are_the_runs_own_and_stage2_refuses_the_rest(
    tiny, tmp_path):
  """The tower's and projector's run fields (attention backend, remat,
  scan unrolling) are not recorded in a checkpoint, as the decoder's are
  not: stage 2 applies its own, and refuses by name an override of any
  architecture field it would otherwise ignore."""
  import json  # pylint: disable=import-outside-toplevel
  from configs.mm import get_config  # pylint: disable=import-outside-toplevel
  from mllm_jax.train import mm_stage  # pylint: disable=import-outside-toplevel
  cfg, model = tiny
  ran = dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, attention_backend=
                                      "cpu_fused", remat="full"),
      projector=dataclasses.replace(cfg.projector,
                                    attention_backend="dot_product"))
  path = str(tmp_path / "stage1")
  mm_io.save_model(path, ran, model)
  saved = json.loads((tmp_path / "stage1" / mm_io.CONFIG_FILE).read_text())
  for part, cls in (("vision", VisionConfig), ("projector", ProjectorConfig)):
    assert not set(cls.run_fields) & set(saved[part]), part
  assert mm_io.read_config(path) == cfg  # run fields: the defaults
  mm_io.check_architecture(path, ran, "init_checkpoint")  # the same model
  with pytest.raises(ConfigError, match="vision.embed_dim"):
    mm_io.check_architecture(path, dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, embed_dim=64)), "x")
  # A checkpoint written before run fields were left out: they are dropped.
  saved["vision"]["attention_backend"] = "cpu_fused"
  (tmp_path / "stage1" / mm_io.CONFIG_FILE).write_text(json.dumps(saved))
  assert mm_io.read_config(path).vision.attention_backend == "xla"

  config = get_config("instruct_tiny")
  config.init_checkpoint = path
  config.vision.embed_dim = 8  # not a run field: the checkpoint's is used
  config.vision.remat = "full"
  config.vision.scan_unroll = 2
  config.projector.attention_backend = "dot_product"
  got = mm_stage.model_config(config, tokenizer=None)
  assert got.vision == dataclasses.replace(cfg.vision, remat="full",
                                           scan_unroll=2)
  assert got.projector == dataclasses.replace(
      cfg.projector, attention_backend="dot_product")
  assert got.model.architecture() == cfg.model.architecture()

  mm_stage.check_overrides("instruct", {"vision.remat": "full",
                                        "projector.attention_backend": "xla",
                                        "run.remat": "full", "seq_len": 64})
  mm_stage.check_overrides("align", {"vision.embed_dim": 64})
  for field, part in (("vision.embed_dim", "vision tower"),
                      ("projector.projector", "projector")):
    with pytest.raises(ConfigError, match=rf"{field}: stage 2 takes the "
                       rf"{part} from init_checkpoint.*mm_align"):
      mm_stage.check_overrides("instruct", {field: 1, "vision.remat": "full"})


# ----------------------------------------------------------------------------
# Host batches: placeholders and truncation
# ----------------------------------------------------------------------------


def test_placeholder_mismatch_fails_naming_the_example():
  rng = np.random.RandomState(0)
  good = example("fine", rng, 1)
  bad = example("cat_photo_17", rng, 2)
  bad["images"] = bad["images"][:1]  # two <image> tokens, one image
  with pytest.raises(mm_batch.PlaceholderError, match="'cat_photo_17'"):
    batch_of([good, bad])
  # Already expanded, but one token short of a whole image.
  cut = example("short_run", rng, 1)
  cut["ids"] = np.repeat(cut["ids"], np.where(cut["ids"] == IMAGE_ID, 15, 1))
  cut["weights"] = np.zeros(len(cut["ids"]), np.float32)
  cut["weights"][-3:] = 1
  with pytest.raises(mm_batch.PlaceholderError, match="'short_run'"):
    batch_of([cut])


def test_batch_schema_slots_and_weights():
  batch = mixed_batch()
  assert batch["images"].shape == (4, 2, 32, 32, 3)
  slots = batch["image_slots"]
  assert [int((s >= 0).sum()) for s in slots] == [32, 16, 0, 16]
  # Slots count up in order; image positions hold the placeholder.
  np.testing.assert_array_equal(slots[0][slots[0] >= 0], np.arange(32))
  assert (batch["inputs"][slots >= 0] == IMAGE_ID).all()
  assert (batch["inputs"][slots < 0] != IMAGE_ID).all()
  assert not batch["loss_weights"][batch["targets"] == IMAGE_ID].any()
  assert not batch["images"][2].any()  # text-only row: no pixels


def test_truncation_never_cuts_an_image_span():
  rng = np.random.RandomState(1)
  stats = ChatStats()
  # Text, an image, the answer, more text, a second image whose span
  # would cross the row's end (expanded: 3 + 16 + 6 + 20 + 16 + 3 ids).
  ids = np.concatenate([rng.randint(10, 500, 3), [IMAGE_ID],
                        rng.randint(10, 500, 26), [IMAGE_ID],
                        rng.randint(10, 500, 3)]).astype(np.int32)
  weights = np.zeros(len(ids), np.float32)
  weights[4:10] = 1
  two = {"id": "two_images", "ids": ids, "weights": weights,
         "images": rng.randn(2, 32, 32, 3).astype(np.float32)}
  long_answer = example("long_answer", rng, 1, text=(3, 5, 40))
  no_answer = example("answer_past_the_end", rng, 1, text=(3, 40, 6))
  batch = batch_of([two, long_answer, no_answer], stats=stats)
  slots = batch["image_slots"]
  # Row 0: cut before the second image, which is removed.
  assert int((slots[0] >= 0).sum()) == 16 and not batch["images"][0, 1].any()
  assert batch["images"][0, 0].any()
  assert batch["segment_ids"][0].sum() == 3 + 16 + 26 - 1
  # Row 1: text shortened after a whole image.
  assert int((slots[1] >= 0).sum()) == 16 and batch["segment_ids"][1].all()
  assert batch["loss_weights"][1].sum() > 0
  # Row 2: the answer is past the end: dropped, counted, row empty.
  assert not batch["segment_ids"][2].any()
  summary = stats.summary()
  assert summary["notes"]["truncated"] == 2
  assert summary["notes"]["images_cut_with_text"] == 1
  assert "no_answer_after_truncation" in str(summary)


# ----------------------------------------------------------------------------
# The model: splicing, loss, attention
# ----------------------------------------------------------------------------


def _loss(model, batch):
  loss_sum, sums = multimodal_loss()(model, batch)
  return loss_sum / sums["weight"], sums


def test_image_targets_carry_no_loss_and_images_matter(tiny):
  _, model = tiny
  batch = {k: jnp.asarray(v) for k, v in mixed_batch().items()}
  everywhere = dict(batch, loss_weights=jnp.ones_like(batch["loss_weights"]))
  _, sums = _loss(model, everywhere)
  assert float(sums["weight"]) == float((batch["targets"] != IMAGE_ID).sum())
  # Changing row 0's second image changes row 0 after it, nothing else.
  a = logits_of(model, batch)
  b = logits_of(model, dict(batch, images=batch["images"].at[0, 1].multiply(
      -1.0)))
  first = int(np.flatnonzero(np.asarray(batch["image_slots"][0]) == 16)[0])
  assert np.allclose(a[0, :first], b[0, :first])
  assert not np.allclose(a[0, first:], b[0, first:])
  assert np.array_equal(a[1:], b[1:])


def _with(model, cfg):
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: MultimodalModel(cfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def _loss_and_grads(model, batch):
  graphdef, state = nnx.split(model)

  def loss(state):
    return _loss(nnx.merge(graphdef, state), batch)[0]
  return jax.jit(jax.value_and_grad(loss))(state)


def test_bidirectional_images_on_every_masked_backend(tiny):
  cfg, model = tiny
  batch = {k: jnp.asarray(v) for k, v in mixed_batch(rows=2).items()}
  causal = _loss_and_grads(model, batch)
  bidi_cfg = dataclasses.replace(cfg, bidirectional_images=True)
  want = _loss_and_grads(_with(model, bidi_cfg), batch)
  assert abs(float(want[0]) - float(causal[0])) > 1e-6  # it does something
  # Text before the first image sees no image token either way.
  a = logits_of(model, batch)
  b = logits_of(_with(model, bidi_cfg), batch)
  np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
  for backend, custom in (("xla", True), ("dot_product", False),
                          ("cpu_fused", False)):
    other = dataclasses.replace(bidi_cfg, model=dataclasses.replace(
        cfg.model, attention_backend=backend, custom_vjp=custom))
    got = _loss_and_grads(_with(model, other), batch)
    assert rel_err(got[0], want[0]) < 1e-5, backend
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-4 * max(
          np.abs(np.asarray(w)).max(), 1e-3), backend


def test_image_token_id_outside_the_vocabulary_is_refused():
  with pytest.raises(ConfigError, match="multimodal.image_token_id"):
    dataclasses.replace(tiny_mm_config(), image_token_id=512).validate()


# ----------------------------------------------------------------------------
# Mesh and training
# ----------------------------------------------------------------------------

MESH = ParallelConfig(data=2, fsdp=2, tensor=2)


def test_mesh_forward_and_gradients_equal_one_device(tiny):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  _, model = tiny
  batch = {k: jnp.asarray(v) for k, v in mixed_batch().items()}
  graphdef, state = nnx.split(model)

  def loss_and_logits(state, batch):
    m = nnx.merge(graphdef, state)
    logits = m(batch["inputs"], batch["images"], batch["image_slots"],
               batch["positions"], batch["segment_ids"])
    return _loss(m, batch)[0], logits

  fn = jax.value_and_grad(loss_and_logits, has_aux=True)
  (loss1, logits1), grads1 = jax.jit(fn)(state, batch)
  mesh = make_mesh(MESH)
  shardings = param_shardings(state, mesh, MESH.rules)
  sharded = jax.device_put(state, shardings)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  on_mesh = jax.device_put(batch, rows)
  with use_mesh(mesh, MESH.rules):
    (loss8, logits8), grads8 = jax.jit(fn, out_shardings=(
        (None, None), shardings))(sharded, on_mesh)
  assert rel_err(loss8, loss1) < 1e-5
  assert rel_err(logits8, logits1) < 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads8),
                          jax.tree.leaves(grads1)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.abs(g - w).max() <= 1e-4 * max(np.abs(w).max(), 1e-3), (
        jax.tree_util.keystr(path))


def test_head_on_loss_positions_on_a_mesh_equals_the_full_head(tiny):
  """model.loss_positions=0.25 gathers each row's answer positions before
  the LM head (losses.head_plan): on a mesh with the batch and the sequence
  sharded (the gather crosses devices), the loss and every gradient equal
  the full head's on one device."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  cfg, model = tiny
  gathered = build(dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, loss_positions=0.25)))
  batch = {k: jnp.asarray(v) for k, v in mixed_batch().items()}
  weighted = np.asarray((batch["loss_weights"] != 0).sum(axis=1))
  assert 0 < weighted.max() <= SEQ_LEN // 4  # the smallest branch runs
  want = _loss_and_grads(model, batch)
  mesh_cfg = ParallelConfig(data=2, sequence=2, tensor=2)
  mesh = make_mesh(mesh_cfg)
  graphdef, state = nnx.split(gathered)
  shardings = param_shardings(state, mesh, mesh_cfg.rules)
  on_mesh = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
  with use_mesh(mesh, mesh_cfg.rules):
    got = jax.jit(jax.value_and_grad(
        lambda s: _loss(nnx.merge(graphdef, s), on_mesh)[0]),
        out_shardings=(None, shardings))(jax.device_put(state, shardings))
  assert rel_err(got[0], want[0]) < 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]),
                          jax.tree.leaves(want[1])):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.abs(g - w).max() <= 1e-4 * max(np.abs(w).max(), 1e-3), (
        jax.tree_util.keystr(path))


def test_splash_bidirectional_images_on_a_mesh_equal_xla():
  """The splash kernel (interpret mode on CPU) with bidirectional images,
  per device on the 8-device mesh: the loss and every gradient equal the
  XLA path's on one device. Rows with two images have text between them;
  every row ends in padding."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  bidi = tiny_mm_config(bidirectional_images=True)
  model = build(bidi)
  rng = np.random.RandomState(3)
  examples = [example(f"ex{i}", rng, k) for i, k in
              enumerate((2, 1, 0, 2))]
  batch = {k: jnp.asarray(v) for k, v in mm_batch.make_batch(
      examples, seq_len=128, max_images=4, image_shape=(32, 32, 3),
      image_token_id=IMAGE_ID, tokens_per_image=16).items()}
  assert bool((batch["segment_ids"][:, -1] == 0).all())  # padded
  want = _loss_and_grads(model, batch)
  splash_cfg = dataclasses.replace(bidi, model=dataclasses.replace(
      bidi.model, attention_backend="splash", custom_vjp=False))
  graphdef, state = nnx.split(_with(model, splash_cfg))
  mesh = make_mesh(MESH)
  shardings = param_shardings(state, mesh, MESH.rules)
  on_mesh = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))

  def loss(state, batch):
    return _loss(nnx.merge(graphdef, state), batch)[0]
  with use_mesh(mesh, MESH.rules):
    got = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))(
        jax.device_put(state, shardings), on_mesh)
  assert rel_err(got[0], want[0]) < 1e-5
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]),
                          jax.tree.leaves(want[1])):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.isfinite(g).all(), jax.tree_util.keystr(path)
    assert np.abs(g - w).max() <= 1e-4 * max(np.abs(w).max(), 1e-3), (
        jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_mixed_batch_trains_and_frozen_parts_stay_bit_identical(stage):
  """The trainer's program (build_program / initial_state / step) on one
  device: the loss falls on a fixed text-only + image batch; the vision
  tower (and in stage 1 the decoder) holds no optimizer state and is
  bit-identical afterwards; what trains moved."""
  cfg = tiny_mm_config()
  task = multimodal_task(cfg, trainable=STAGE_TRAINABLE[stage])
  mesh = make_mesh(ParallelConfig(data=1), jax.devices()[:1])
  program = build_program(
      task, ParallelConfig(data=1),
      OptimizerConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0),
      TrainConfig(steps=6, batch_size=4), mesh, seed=0)
  state, frozen = initial_state(program, seed=0)
  frozen_parts = {path_name(p).split(".")[0] for p, _ in
                  jax.tree_util.tree_leaves_with_path(frozen)}
  assert "vision" in frozen_parts and "vision" not in str(
      jax.tree_util.tree_structure(state["opt_state"]))
  if stage == "align":
    assert "decoder" in frozen_parts
    assert set(nnx.to_pure_dict(state["params"])) == {"projector"}
  else:
    assert set(nnx.to_pure_dict(state["params"])) == {"projector", "decoder"}
  before_frozen = jax.tree.map(np.asarray, frozen)
  before = jax.tree.map(np.asarray, state["params"])
  batch = jax.device_put({k: jnp.asarray(v) for k, v in
                          mixed_batch().items()}, program.batch_sharding)
  losses = []
  with use_mesh(mesh, program.rules):
    for _ in range(6):
      state, metrics = program.step(state, frozen, batch)
      losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all(), losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  for a, b in zip(jax.tree.leaves(before_frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree.leaves(before), jax.tree.leaves(state["params"]))]
  assert all(moved)


def test_lora_stage2_trains_projector_and_adapters_only():
  """Stage 2 with LoRA on the LLM: the optimizer holds the projector and
  the adapters; the decoder's own weights and the tower stay frozen and
  bit-identical; merged, the LLM differs from the base."""
  from mllm_jax.modeling import peft as peft_lib  # pylint: disable=import-outside-toplevel
  from mllm_jax.modeling.peft_config import PeftConfig  # pylint: disable=import-outside-toplevel
  cfg = tiny_mm_config()
  lora = PeftConfig(method="lora", rank=4, targets=("q", "v"))
  task = multimodal_task(cfg, trainable=STAGE_TRAINABLE["instruct"],
                         peft=lora)
  mesh = make_mesh(ParallelConfig(data=1), jax.devices()[:1])
  program = build_program(
      task, ParallelConfig(data=1),
      OptimizerConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0),
      TrainConfig(steps=3, batch_size=4), mesh, seed=0)
  state, frozen = initial_state(program, seed=0)
  trained = {path_name(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(state["params"])}
  assert trained and all(p.startswith("projector.") or ".peft." in p
                         for p in trained), sorted(trained)
  before = jax.tree.map(np.asarray, frozen)
  batch = jax.device_put({k: jnp.asarray(v) for k, v in
                          mixed_batch().items()}, program.batch_sharding)
  with use_mesh(mesh, program.rules):
    for _ in range(3):
      state, _ = program.step(state, frozen, batch)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  model = nnx.merge(program.graphdef, state["params"], frozen)
  merged = nnx.to_pure_dict(nnx.state(peft_lib.merge_lora(model.decoder)))
  base = peft_lib.without_adapters(nnx.to_pure_dict(nnx.state(
      model.decoder)))
  assert not np.array_equal(merged["blocks"]["attn"]["q"],
                            base["blocks"]["attn"]["q"])
  np.testing.assert_array_equal(merged["blocks"]["attn"]["k"],
                                base["blocks"]["attn"]["k"])
  with pytest.raises(ConfigError, match="peft.method"):
    multimodal_task(cfg, trainable=STAGE_TRAINABLE["align"], peft=lora)
