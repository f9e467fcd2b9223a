"""Files out of a Qt resource bundle (`.rcc`, the "qres" binary format).

GCompris ships its activities' photos and the QML that describes them inside
such bundles (mllm_jax.data.image_sources). There is no Python reader for the
format outside PyQt, and the format is small:

    header   "qres", version (1-3), then offsets of the tree, the data and the
             names (big-endian uint32), and in version 3 a flags word
    tree     fixed-size entries (14 bytes; 22 from version 2, which adds a
             modification time): name offset, flags (1 zlib, 2 directory,
             4 zstd), then a directory's (child count, first child index) or
             a file's (territory, language, data offset)
    names    uint16 length (in UTF-16 units), uint32 hash, UTF-16BE text
    data     uint32 size, then the bytes; zlib-compressed files start with
             their uncompressed size (Qt's qCompress layout)

Errors name the file and what is wrong (a bad magic, an offset past the end,
zstd, which needs a library we do not ship).
"""

from __future__ import annotations

import struct
import zlib

_FLAG_ZLIB, _FLAG_DIR, _FLAG_ZSTD = 1, 2, 4


class QresError(ValueError):
  """The bytes are not a readable Qt resource bundle."""


def read_qres(path: str) -> dict[str, bytes]:
  """Every file of the bundle at `path`: {"/dir/name.ext": bytes}."""
  with open(path, "rb") as f:
    return parse_qres(f.read(), path)


def parse_qres(blob: bytes, where: str = "<bytes>") -> dict[str, bytes]:
  """As read_qres, from the bundle's bytes; `where` names it in errors."""

  def unpack(fmt: str, at: int) -> tuple[int, ...]:
    end = at + struct.calcsize(fmt)
    if at < 0 or end > len(blob):
      raise QresError(f"{where}: offset {at} is past the end "
                      f"({len(blob)} bytes): truncated or not a bundle")
    return struct.unpack(fmt, blob[at:end])

  if blob[:4] != b"qres":
    raise QresError(f"{where}: not a Qt resource bundle (magic "
                    f"{blob[:4]!r}, expected b'qres')")
  version, tree, data, names = unpack(">IIII", 4)
  if version not in (1, 2, 3):
    raise QresError(f"{where}: unsupported qres version {version}")
  entry_size = 14 if version == 1 else 22

  def name(offset: int) -> str:
    (length,) = unpack(">H", names + offset)
    start = names + offset + 6
    if start + 2 * length > len(blob):
      raise QresError(f"{where}: a name runs past the end of the file")
    return blob[start:start + 2 * length].decode("utf-16-be")

  files: dict[str, bytes] = {}
  seen: set[int] = set()

  def walk(index: int, prefix: str) -> None:
    if index in seen:  # a malformed tree must not loop forever
      raise QresError(f"{where}: tree entry {index} is reached twice")
    seen.add(index)
    at = tree + index * entry_size
    name_offset, flags = unpack(">IH", at)
    path = prefix + (name(name_offset) if index else "")
    if flags & _FLAG_DIR:
      count, first = unpack(">II", at + 6)
      for child in range(first, first + count):
        walk(child, path + "/")
      return
    _, _, offset = unpack(">HHI", at + 6)
    (size,) = unpack(">I", data + offset)
    raw = blob[data + offset + 4:data + offset + 4 + size]
    if len(raw) != size:
      raise QresError(f"{where}: {path} runs past the end of the file")
    if flags & _FLAG_ZSTD:
      raise QresError(f"{where}: {path} is zstd-compressed, which this reader "
                      f"does not support")
    if flags & _FLAG_ZLIB:
      try:
        raw = zlib.decompress(raw[4:])
      except zlib.error as e:
        raise QresError(f"{where}: {path}: bad zlib data ({e})") from e
    files[path] = raw

  walk(0, "")
  return files
