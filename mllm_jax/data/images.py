"""Images for the multimodal stages: decode, convert, resize, normalise, with
every bad image dropped and counted, never raised.

    image = load_image(data_or_path, cfg, where, stats)  # PIL RGB, or a Drop
    pixels = preprocess(image, cfg)                      # float32[S, S, 3]
    ds = image_dataset(examples, cfg, tokenizer=..., fmt=..., stats=stats)

`load_image` checks the header before decoding anything: more than
`max_pixels` pixels ("too_large": a decompression bomb is a small file that
claims a huge canvas), a side under `min_side` ("too_small"), an aspect ratio
over `max_aspect` ("extreme_aspect", which a shortest-side resize would blow
up). Then it decodes ("undecodable" for bytes Pillow cannot identify or
parse, "truncated" for a file that ends early: Pillow's
LOAD_TRUNCATED_IMAGES stays off, so a cut file is never padded with grey),
applies the EXIF orientation and converts to RGB, noting each conversion in
`stats.notes`: grey-scale (1/L/I/I;16/F, 16-bit scaled to 8), CMYK,
palette (with its transparency), alpha (composited onto `fill`: dropping the
alpha channel would show whatever colours sit under transparent pixels,
often black), YCbCr/HSV, and the first frame of an animation.

`preprocess` resizes and normalises (CLIP statistics by default):
  "crop"    shortest side to `size` (bicubic), then the centre square: CLIP's
            and LLaVA-1's preprocessing (torchvision's Resize + CenterCrop
            arithmetic: the long side truncated, the crop offset rounded);
  "pad"     pad to a square with `fill` (the mean colour by default), image
            centred, then resize: LLaVA-1.5's "pad", which keeps the whole
            image (objects at the edges survive);
  "squash"  resize to size x size, ignoring the aspect ratio (BLIP-2).
Output is HWC float32 (the layout Flax convolutions take).

Pillow does the work (decoding of every common format, ICC-free CMYK
conversion, the bicubic filter CLIP's reference preprocessing used, so the
golden tensor matches to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_jax.configlib import check, check_choice
from mllm_jax.data import chat, readers
from mllm_jax.data.pipeline import derive_seed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "pad", "squash")
ImageData = Any  # bytes (encoded), str (a file path), PIL.Image, np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """How images become model input; validated by `validate`."""
  size: int = 224
  resize: str = "crop"
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD
  # RGB 0-255 under transparent pixels and around padded images; empty: the
  # mean colour (what LLaVA-1.5 pads with, so padding normalises to ~0).
  fill: tuple = ()
  max_pixels: int = 40_000_000  # ~6300 x 6300; Pillow's own bomb limit is 89M
  min_side: int = 8
  max_aspect: float = 20.0

  def validate(self, prefix: str = "image") -> None:
    check(isinstance(self.size, int) and self.size > 0, f"{prefix}.size",
          f"must be a positive integer, got {self.size!r}")
    check_choice(self.resize, RESIZE_MODES, f"{prefix}.resize")
    for name in ("mean", "std"):
      value = getattr(self, name)
      check(len(value) == 3 and all(isinstance(v, (int, float))
                                    for v in value), f"{prefix}.{name}",
            f"needs 3 numbers (R, G, B), got {value!r}")
    check(all(v > 0 for v in self.std), f"{prefix}.std",
          f"must be positive, got {self.std!r}")
    check(len(self.fill) in (0, 3) and all(
        isinstance(v, int) and 0 <= v <= 255 for v in self.fill),
          f"{prefix}.fill", f"needs () or 3 integers in 0..255, got "
          f"{self.fill!r}")
    check(self.max_pixels > 0, f"{prefix}.max_pixels", "must be positive")
    check(self.min_side >= 1, f"{prefix}.min_side", "must be at least 1")
    check(self.max_aspect >= 1, f"{prefix}.max_aspect", "must be at least 1")

  @property
  def fill_rgb(self) -> tuple[int, int, int]:
    if self.fill:
      return tuple(int(v) for v in self.fill)
    return tuple(int(v * 255) for v in self.mean)


# ----------------------------------------------------------------------------
# Decoding and conversion
# ----------------------------------------------------------------------------


def _note(stats: chat.ChatStats | None, what: str) -> None:
  if stats is not None:
    stats.note(what)


def _open(data: ImageData, where: str) -> Image.Image | readers.Drop:
  """Opens lazily (header only) with Pillow's bomb warning made an error."""
  if isinstance(data, Image.Image):
    return data
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3) or (
        data.ndim == 3 and data.shape[2] not in (1, 3, 4)):
      return readers.Drop("unsupported_array", f"{where} ({data.dtype}, "
                          f"shape {data.shape})")
    return Image.fromarray(data[..., 0] if data.ndim == 3 and
                           data.shape[2] == 1 else data)
  if isinstance(data, str):
    try:
      with open(data, "rb") as f:
        data = f.read()
    except OSError as e:
      return readers.Drop("unreadable_file", f"{where} ({e.strerror})")
  if not isinstance(data, (bytes, bytearray, memoryview)):
    return readers.Drop("not_an_image", f"{where} ({type(data).__name__})")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow's notes on damaged headers
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      return Image.open(io.BytesIO(bytes(data)))
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    return readers.Drop("too_large", f"{where} (Pillow's bomb limit)")
  except UnidentifiedImageError:
    return readers.Drop("undecodable", f"{where} (not an image format "
                        f"Pillow knows)")
  except Exception as e:  # pylint: disable=broad-except  # corrupt header
    return readers.Drop("undecodable", f"{where} ({type(e).__name__})")


def _decode(im: Image.Image, where: str) -> readers.Drop | None:
  try:
    im.load()
  except OSError as e:
    if "truncated" in str(e):
      return readers.Drop("truncated", f"{where} ({e})")
    return readers.Drop("undecodable", f"{where} ({e})")
  except Exception as e:  # pylint: disable=broad-except  # corrupt data
    return readers.Drop("undecodable", f"{where} ({type(e).__name__}: {e})")
  return None


def _composite(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  background = Image.new("RGBA", im.size, fill + (255,))
  return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")


def to_rgb(im: Image.Image, fill: tuple[int, int, int],
           stats: chat.ChatStats | None = None) -> Image.Image:
  """Any Pillow mode -> RGB (see the module docstring); raises ValueError
  for a mode Pillow cannot convert."""
  mode = im.mode
  if mode == "RGB":
    return im
  if mode in ("1", "L"):
    _note(stats, "converted_grey")
    return im.convert("RGB")
  if mode.startswith("I") or mode == "F":
    _note(stats, "converted_grey_high_bit_depth")
    arr = np.asarray(im, np.float64)
    if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
      arr = arr / 257.0  # 16-bit range onto 8 bits
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
  if mode == "CMYK":
    _note(stats, "converted_cmyk")
    return im.convert("RGB")
  if mode in ("P", "PA"):
    _note(stats, "converted_palette")
    if mode == "PA" or "transparency" in im.info:
      return _composite(im.convert("RGBA"), fill)
    return im.convert("RGB")
  if mode in ("RGBA", "LA", "RGBa", "La"):
    _note(stats, "composited_alpha")
    return _composite(im, fill)
  _note(stats, f"converted_{mode}")
  return im.convert("RGB")


def load_image(data: ImageData, cfg: ImageConfig, where: str = "?",
               stats: chat.ChatStats | None = None
               ) -> Image.Image | readers.Drop:
  """Bytes, a path, a PIL image or a uint8 array -> an RGB PIL image, or a
  Drop whose reason says why (module docstring). Conversions are noted in
  `stats`; the Drop is the caller's to count."""
  im = _open(data, where)
  if isinstance(im, readers.Drop):
    return im
  w, h = im.size
  if w * h > cfg.max_pixels:
    return readers.Drop("too_large", f"{where} ({w}x{h} > {cfg.max_pixels} "
                        f"pixels)")
  if min(w, h) < cfg.min_side:
    return readers.Drop("too_small", f"{where} ({w}x{h}, a side under "
                        f"{cfg.min_side})")
  if max(w, h) > cfg.max_aspect * min(w, h):
    return readers.Drop("extreme_aspect", f"{where} ({w}x{h})")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata
    drop = _decode(im, where)
    if drop is not None:
      return drop
    try:
      frames = getattr(im, "n_frames", 1)  # reads every frame's header
    except Exception as e:  # pylint: disable=broad-except  # a damaged frame
      return readers.Drop("undecodable", f"{where} (frames: "
                          f"{type(e).__name__}: {e})")
    if frames > 1:
      _note(stats, "first_frame_of_animation")
    try:
      if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation
        _note(stats, "exif_rotated")
        im = ImageOps.exif_transpose(im)
      return to_rgb(im, cfg.fill_rgb, stats)
    except Exception as e:  # pylint: disable=broad-except  # odd modes, EXIF
      return readers.Drop("unsupported_mode", f"{where} ({im.mode}: "
                          f"{type(e).__name__})")


# ----------------------------------------------------------------------------
# Resizing and normalisation
# ----------------------------------------------------------------------------


def resize_shortest_crop(im: Image.Image, size: int) -> Image.Image:
  """Shortest side to `size` (bicubic), then the centre size x size."""
  w, h = im.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
  return im.crop((left, top, left + size, top + size))


def pad_to_square(im: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  """The image centred on a square canvas of `fill` (LLaVA-1.5's "pad")."""
  w, h = im.size
  if w == h:
    return im
  side = max(w, h)
  canvas = Image.new("RGB", (side, side), fill)
  canvas.paste(im, ((side - w) // 2, (side - h) // 2))
  return canvas


def normalize(im: Image.Image, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 RGB -> float32 (x / 255 - mean) / std, HWC."""
  arr = np.asarray(im, np.float32) / 255.0
  return ((arr - np.asarray(mean, np.float32)) /
          np.asarray(std, np.float32)).astype(np.float32)


def preprocess(im: Image.Image, cfg: ImageConfig) -> np.ndarray:
  """An RGB image -> float32[size, size, 3] (module docstring)."""
  if cfg.resize == "crop":
    im = resize_shortest_crop(im, cfg.size)
  else:
    if cfg.resize == "pad":
      im = pad_to_square(im, cfg.fill_rgb)
    im = im.resize((cfg.size, cfg.size), Image.Resampling.BICUBIC)
  return normalize(im, cfg.mean, cfg.std)


def pixels_of(data: ImageData, cfg: ImageConfig, where: str = "?",
              stats: chat.ChatStats | None = None
              ) -> np.ndarray | readers.Drop:
  """load_image then preprocess."""
  im = load_image(data, cfg, where, stats)
  return im if isinstance(im, readers.Drop) else preprocess(im, cfg)


# ----------------------------------------------------------------------------
# Examples and the Grain pipeline
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageExample:
  """What every reader yields: a conversation of the chat schema (its
  `<image>` placeholders say where each image goes) and the images' data in
  placeholder order (encoded bytes or file paths, decoded later so that bad
  images are counted by the pipeline). Raises chat.ConversationError
  ("image_count_mismatch") when the counts differ."""
  id: str
  conversation: chat.Conversation
  images: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "images", tuple(self.images))
    if len(self.images) != self.conversation.num_images:
      raise chat.ConversationError(
          "image_count_mismatch", f"{self.id}: {len(self.images)} image(s) "
          f"for {self.conversation.num_images} {chat.IMAGE} placeholder(s)")


def prepare(example: ImageExample, cfg: ImageConfig,
            stats: chat.ChatStats | None = None, tokenizer=None,
            fmt: str | chat.ChatFormat | None = None,
            max_len: int | None = None, overflow: str = "drop"
            ) -> dict[str, Any] | None:
  """An example -> {"id", "images": float32[k, S, S, 3], "conversation"}
  plus, with a tokenizer and a chat format, "ids" and "weights"
  (chat.encode). None when an image or the encoding drops it (counted in
  `stats` under the image's reason, located as "ID image I")."""
  pixels = []
  for i, data in enumerate(example.images):
    out = pixels_of(data, cfg, f"{example.id} image {i}", stats)
    if isinstance(out, readers.Drop):
      if stats is not None:
        stats.add(out)
      return None
    pixels.append(out)
  images = (np.stack(pixels) if pixels else
            np.zeros((0, cfg.size, cfg.size, 3), np.float32))
  record = {"id": example.id, "images": images,
            "conversation": example.conversation}
  if tokenizer is not None:
    encoded = chat.encode(example.conversation, tokenizer, fmt, max_len,
                          overflow, stats)
    if encoded is None:
      return None
    record.update(encoded)
  if stats is not None:
    stats.note("prepared")
  return record


def image_dataset(examples: Sequence[ImageExample], cfg: ImageConfig, *,
                  stats: chat.ChatStats | None = None, tokenizer=None,
                  fmt: str | chat.ChatFormat | None = None,
                  max_len: int | None = None, overflow: str = "drop",
                  shuffle: bool = False, seed: int = 0):
  """A Grain MapDataset of `prepare`d examples (None where dropped, which
  the packer skips and counts). Lazy and random-access: an element is
  decoded when read, and counted in `stats` each time it is read."""
  ds = grain.MapDataset.source(list(examples))
  if shuffle:
    ds = ds.shuffle(seed=derive_seed(seed, "images"))
  return ds.map(functools.partial(
      prepare, cfg=cfg, stats=stats, tokenizer=tokenizer, fmt=fmt,
      max_len=max_len, overflow=overflow))
