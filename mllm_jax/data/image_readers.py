"""Image-text records out of webdataset-style tar shards, Parquet files with
image bytes, TFDS datasets and a folder with a JSONL file, all as one record
type, `images.ImageExample` (a chat-schema conversation whose `<image>`
placeholders say where each image goes, plus the images' bytes or paths).

Every reader yields ImageExamples and counts what it drops in a
`chat.ChatStats` (reason and file:place), never raising on a bad record:
an unreadable or truncated shard, a sample without a conversation, invalid
JSON, placeholders that do not match the images, an image file that is not
there. Pixels are decoded later by the pipeline (images.prepare), which
counts bad images itself.

A record's conversation is any schema chat.read_conversations knows (our
`messages`, FastChat/LLaVA `conversations`, Alpaca `instruction`), or a
caption alone (`caption_field`), which becomes a plain captioning example
(image_templates.caption_example). Its `images` list names the images:
in a tar sample, the member extensions ("jpg", "0.png"; when absent, every
image member in sorted order); in a Parquet row, positions in the image
column; in a folder, paths relative to the image root.

Layouts:
  tar      samples are runs of members sharing a key (the path up to the
           first "." of the file name): key.json or key.txt (+ key.<ext>
           images), as webdataset writes them; the plain `tarfile` module
           reads them (streaming, so a shard cut short yields every sample
           before the cut).
  parquet  columns: `image` (binary, list of binary, or a {bytes, path}
           struct as HF datasets stores images), and `conversation` (a JSON
           string in any chat schema) or the schema's own columns or a
           caption column; optional `id`. Read in row batches (pyarrow).
  tfds     a TFDS dataset with features {id: text, conversation: text (JSON),
           images: a sequence of images}: `tfds.data_source`, which needs no
           TensorFlow (array_record files); images arrive decoded (uint8).
  folder   a JSONL of conversations (chat.read_conversations) whose `images`
           are paths relative to `image_root` (default: the JSONL's folder).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mllm_jax.data import chat, readers
from mllm_jax.data.image_templates import caption_conversation
from mllm_jax.data.images import ImageExample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff",
                    "ppm", "img")
TEXT_EXTENSIONS = ("json", "txt")
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def _stats(stats: chat.ChatStats | None) -> chat.ChatStats:
  return stats if stats is not None else chat.ChatStats()


def example_from_record(record: Any, images: dict[str, Any], default_id: str,
                        caption_field: str = "caption") -> ImageExample:
  """A record (dict) and its images by name -> ImageExample; raises
  chat.ConversationError with the drop reason. The record's `images`
  names are looked up in `images`."""
  if not isinstance(record, dict):
    raise chat.ConversationError("not_an_object")
  kind = chat._detect(record)  # pylint: disable=protected-access
  if kind is not None:
    conv = chat.SCHEMAS[kind](record, default_id)
  elif isinstance(record.get(caption_field), str):
    names = record.get("images") or sorted(images)
    if not isinstance(names, list) or len(names) != 1:
      raise chat.ConversationError("image_count_mismatch", f"a caption needs "
                                   f"one image, got {names!r}")
    conv = caption_conversation(str(record.get("id", default_id)),
                                record[caption_field], image=str(names[0]))
  else:
    raise chat.ConversationError("no_conversation", f"no messages, "
                                 f"conversations, instruction or "
                                 f"{caption_field!r}")
  data = []
  for name in conv.images:
    if name not in images:
      raise chat.ConversationError("missing_image", f"{name!r} (have "
                                   f"{sorted(images)})")
    data.append(images[name])
  return ImageExample(conv.id, conv, tuple(data))


def _add(stats: chat.ChatStats, make, where: str) -> ImageExample | None:
  try:
    example = make()
  except chat.ConversationError as e:
    stats.add(readers.Drop(e.reason, where))
    return None
  stats.note("read")
  return example


# ----------------------------------------------------------------------------
# webdataset-style tar shards
# ----------------------------------------------------------------------------


def _split_key(name: str) -> tuple[str, str]:
  directory, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return os.path.join(directory, stem), ext.lower() if dot else ""


def _tar_samples(path: str, stats: chat.ChatStats
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample, in shard order."""
  key, parts = None, {}
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _split_key(member.name)
        if k != key and key is not None:
          yield key, parts
          parts = {}
        key = k
        f = tar.extractfile(member)
        parts[ext] = f.read() if f is not None else b""
  except (tarfile.TarError, OSError, EOFError, ValueError) as e:
    reason = ("unreadable_file" if key is None and not parts else
              "truncated_shard")
    stats.add(readers.Drop(reason, f"{path} ({type(e).__name__}: {e})"))
    return  # the sample cut by the error is incomplete: not yielded
  if key is not None:
    yield key, parts


def read_tar_shards(paths: str | Sequence[str], caption_field: str = "caption",
                    stats: chat.ChatStats | None = None
                    ) -> Iterator[ImageExample]:
  """ImageExamples from webdataset-style tar shards (globs; module
  docstring). Samples without key.json / key.txt: "no_conversation"."""
  stats = _stats(stats)
  for path in readers.expand(paths):
    for key, parts in _tar_samples(path, stats):
      where = f"{path}:{key}"
      images = {ext: data for ext, data in parts.items()
                if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
      if "json" in parts:
        try:
          record = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
          stats.add(readers.Drop("invalid_json", where))
          continue
        if isinstance(record, dict) and "images" not in record and images:
          record = {**record, "images": sorted(images)}
      elif "txt" in parts:
        record = {caption_field: parts["txt"].decode("utf-8", "replace")}
      else:
        stats.add(readers.Drop("no_conversation", where))
        continue
      example = _add(stats, lambda: example_from_record(
          record, images, key, caption_field), where)
      if example is not None:
        yield example


def _image_extension(data: Any) -> str:
  if isinstance(data, str):
    ext = os.path.splitext(data)[1].lstrip(".").lower()
    return ext if ext in IMAGE_EXTENSIONS else "img"
  head = bytes(data[:12])
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "webp"
  for magic, ext in _MAGIC:
    if head.startswith(magic):
      return ext
  return "img"


def _image_bytes(data: Any) -> bytes:
  if isinstance(data, str):
    with open(data, "rb") as f:
      return f.read()
  return bytes(data)


def write_tar_shards(examples: Iterable[ImageExample], pattern: str,
                     per_shard: int = 1000) -> list[str]:
  """Writes examples as webdataset-style shards (`pattern` % shard number,
  e.g. "out/train-%05d.tar"): key.json (the native chat record, its
  `images` naming the members) and key.<i>.<ext> per image. Returns the
  shard paths."""
  if per_shard < 1:
    raise ValueError(f"per_shard must be positive, got {per_shard}")
  written, tar, count = [], None, 0

  def add(name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  try:
    for n, example in enumerate(examples):
      if count % per_shard == 0:
        if tar is not None:
          tar.close()
        written.append(pattern % len(written))
        os.makedirs(os.path.dirname(written[-1]) or ".", exist_ok=True)
        tar = tarfile.open(written[-1], "w")
      key = f"{n:08d}"
      names = [f"{i}.{_image_extension(d)}"
               for i, d in enumerate(example.images)]
      record = {**example.conversation.to_json(), "images": names}
      if not names:
        record.pop("images")
      add(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
      for name, data in zip(names, example.images):
        add(f"{key}.{name}", _image_bytes(data))
      count += 1
  finally:
    if tar is not None:
      tar.close()
  return written


# ----------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------


def _cell_images(cell: Any) -> list[Any]:
  """An image cell (bytes, {bytes, path}, or a list of them) -> data."""
  if cell is None:
    return []
  if not isinstance(cell, list):
    cell = [cell]
  out = []
  for item in cell:
    if isinstance(item, dict):
      item = item.get("bytes") or item.get("path")
    if not isinstance(item, (bytes, str, np.ndarray)):
      raise chat.ConversationError("bad_image_cell",
                                   f"{type(item).__name__}")
    out.append(item)
  return out


def read_parquet(paths: str | Sequence[str], image_column: str = "image",
                 conversation_column: str = "conversation",
                 caption_field: str = "caption", batch_rows: int = 64,
                 stats: chat.ChatStats | None = None
                 ) -> Iterator[ImageExample]:
  """ImageExamples from Parquet files (globs; module docstring). The
  record's `images` are indices into the row's image list ("0", "1", ...);
  without them, every image of the row in order."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  stats = _stats(stats)
  for path in readers.expand(paths):
    try:
      table = pq.ParquetFile(path)
      columns = table.schema_arrow.names
    except Exception as e:  # pylint: disable=broad-except  # corrupt file
      stats.add(readers.Drop("unreadable_file", f"{path} ({type(e).__name__})"))
      continue
    if image_column not in columns:
      stats.add(readers.Drop("missing_field", f"{path} (no column "
                             f"{image_column!r}; has {columns}; all "
                             f"{table.metadata.num_rows} rows)"))
      continue
    row = 0
    try:
      for batch in table.iter_batches(batch_size=batch_rows):
        for values in batch.to_pylist():
          where = f"{path}:row {row}"
          row += 1
          example = _add(stats, lambda: _row_example(
              values, image_column, conversation_column, caption_field,
              f"{os.path.basename(path)}:{row - 1}"), where)
          if example is not None:
            yield example
    except Exception as e:  # pylint: disable=broad-except  # corrupt pages
      stats.add(readers.Drop("unreadable_rows", f"{path} from row {row} "
                             f"({type(e).__name__})"))


def _row_example(values: dict[str, Any], image_column: str,
                 conversation_column: str, caption_field: str,
                 default_id: str) -> ImageExample:
  """A table row (Parquet, TFDS) -> ImageExample: its images from
  `image_column`, its conversation from a JSON `conversation_column`, or
  the row's own schema columns, or a caption."""
  data = _cell_images(values.pop(image_column))
  record = values
  if isinstance(values.get(conversation_column), str):
    try:
      record = json.loads(values[conversation_column])
    except json.JSONDecodeError as e:
      raise chat.ConversationError("invalid_json", conversation_column) from e
    if isinstance(record, dict) and values.get("id") is not None:
      record.setdefault("id", values["id"])
  if isinstance(record, dict) and record.get("images") is None:
    record = {**record, "images": [str(i) for i in range(len(data))]}
  images = {str(i): d for i, d in enumerate(data)}
  return example_from_record(record, images, default_id, caption_field)


def write_parquet(examples: Iterable[ImageExample], path: str) -> int:
  """Writes columns id, image (list of binary) and conversation (the
  native chat record as JSON, its `images` the indices); returns rows."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  ids, images, conversations = [], [], []
  for example in examples:
    ids.append(example.id)
    images.append([_image_bytes(d) for d in example.images])
    record = example.conversation.to_json()
    if example.images:
      record["images"] = [str(i) for i in range(len(example.images))]
    conversations.append(json.dumps(record, ensure_ascii=False))
  table = pa.table({"id": pa.array(ids, pa.string()),
                    "image": pa.array(images, pa.list_(pa.binary())),
                    "conversation": pa.array(conversations, pa.string())})
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  pq.write_table(table, path)
  return len(ids)


# ----------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)
# ----------------------------------------------------------------------------

TFDS_NAME = "image_conversations"


@functools.cache
def _tfds_builder_class():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ImageConversations(tfds.core.GeneratorBasedBuilder):
    """id, conversation (the native chat record as JSON) and the images'
    encoded bytes, undecoded, so the pipeline counts bad images itself."""
    VERSION = tfds.core.Version("1.0.0")
    examples: Sequence[ImageExample] = ()

    # No files sit beside this builder (no checksums, no metadata): saying
    # so spares tfds the lookup, which imports the importlib_resources
    # backport for a class defined inside a package.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(),
              "conversation": tfds.features.Text(),
              "images": tfds.features.Sequence(
                  tfds.features.Tensor(shape=(), dtype=np.object_))}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for n, example in enumerate(self.examples):
        record = example.conversation.to_json()
        if example.images:
          record["images"] = [str(i) for i in range(len(example.images))]
        yield n, {"id": example.id, "conversation": json.dumps(
            record, ensure_ascii=False), "images": [
                _image_bytes(d) for d in example.images]}

  return ImageConversations


def write_tfds(examples: Iterable[ImageExample], data_dir: str) -> str:
  """Builds a TFDS dataset (split "train", array_record files) of the
  examples under data_dir; returns its directory (read_tfds's input)."""
  cls = _tfds_builder_class()
  builder = cls(data_dir=data_dir, file_format="array_record")
  builder.examples = list(examples)
  builder.download_and_prepare()
  return str(builder.data_dir)


def read_tfds(builder_dir: str, split: str = "train",
              image_column: str = "images",
              conversation_column: str = "conversation",
              caption_field: str = "caption",
              stats: chat.ChatStats | None = None) -> Iterator[ImageExample]:
  """ImageExamples from a prepared TFDS dataset directory (the one holding
  dataset_info.json) through `tfds.data_source`'s random access, which
  needs no TensorFlow. Images may be bytes (write_tfds) or tfds Image
  features (decoded to uint8 arrays by tfds; a record tfds fails to decode
  is counted as "unreadable_record"). Text features arrive as bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  stats = _stats(stats)
  try:
    source = tfds.builder_from_directory(builder_dir).as_data_source(
        split=split)
  except Exception as e:  # pylint: disable=broad-except  # not a dataset
    raise FileNotFoundError(f"{builder_dir}: not a prepared TFDS dataset "
                            f"with a {split!r} split ({e})") from e
  for i in range(len(source)):
    where = f"{builder_dir}[{split}][{i}]"
    try:
      values = dict(source[i])
    except Exception as e:  # pylint: disable=broad-except  # corrupt record
      stats.add(readers.Drop("unreadable_record",
                             f"{where} ({type(e).__name__})"))
      continue
    values = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) and
              k != image_column else v for k, v in values.items()}
    if isinstance(values.get(image_column), np.ndarray) and (
        values[image_column].dtype == object):
      values[image_column] = list(values[image_column])
    example = _add(stats, lambda: _row_example(
        values, image_column, conversation_column, caption_field,
        f"{split}:{i}"), where)
    if example is not None:
      yield example


# ----------------------------------------------------------------------------
# Folder + JSONL
# ----------------------------------------------------------------------------


def read_folder(jsonl: str | Sequence[str], image_root: str | None = None,
                stats: chat.ChatStats | None = None
                ) -> Iterator[ImageExample]:
  """ImageExamples from conversation JSONL (any chat schema) whose images
  are paths relative to `image_root` (default: each file's folder).
  Counted: every chat drop, and "missing_image" for a path that is not a
  file."""
  stats = _stats(stats)
  for path in readers.expand(jsonl):
    root = image_root or os.path.dirname(os.path.abspath(path))
    for conv in chat.read_conversations(path, stats=stats):
      files = [name if os.path.isabs(name) else os.path.join(root, name)
               for name in conv.images]
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        stats.add(readers.Drop("missing_image", f"{path}: {conv.id} "
                               f"({missing[0]})"))
        continue
      yield ImageExample(conv.id, conv, tuple(files))
