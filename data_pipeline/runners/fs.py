"""File access for the Beam runner through ``apache_beam.io.filesystems``, so
inputs and the workdir can be ``gs://``, ``s3://``, ``hdfs://`` (any scheme
Beam has a FileSystem for) as well as local paths.

The pipeline steps (``data_pipeline.corpus``) read and write local files (the
WARC reader wants a real file; shards are written file-then-rename), so a
remote path is staged: inputs are copied to a local temp file, outputs are
written to a local temp workdir and uploaded with ``FileSystems.create``.
Local paths are used directly, as before, so local output stays unchanged.
Streams are opened ``UNCOMPRESSED``: Beam would otherwise gunzip ``.warc.gz``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

RAW = CompressionTypes.UNCOMPRESSED


def is_remote(path: str) -> bool:
  """A URL with a scheme other than file:// (Beam's local FileSystem)."""
  scheme = FileSystems.get_scheme(path)
  return scheme is not None and scheme != "file"


def match(pattern: str) -> list[str]:
  """Sorted paths matching ``pattern`` (sorted: shard numbers follow)."""
  result, = FileSystems.match([pattern])
  return sorted(m.path for m in result.metadata_list)


@contextlib.contextmanager
def open_local(path: str) -> Iterator[str]:
  """A local path holding ``path``'s bytes: the path itself when local, else a
  temp copy with the same basename (the reader records it as the source)."""
  if not is_remote(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="dp-in-")
  try:
    local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
    _download(path, local)
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _download(url: str, local: str) -> None:
  with FileSystems.open(url, compression_type=RAW) as src, \
      open(local, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)


def upload(local: str, url: str) -> None:
  with open(local, "rb") as src, \
      FileSystems.create(url, compression_type=RAW) as dst:
    shutil.copyfileobj(src, dst, 1 << 20)


def delete_under(url: str) -> None:
  """Deletes every file under ``url`` (object stores have no directories)."""
  paths = match(FileSystems.join(url, "**"))
  if paths:
    FileSystems.delete(paths)


@contextlib.contextmanager
def staged_dir(url: str) -> Iterator[str]:
  """A local folder whose files end up in ``url``: the folder itself when
  local; else a temp dir uploaded file by file on success."""
  if not is_remote(url):
    os.makedirs(url, exist_ok=True)
    yield url
    return
  tmp = tempfile.mkdtemp(prefix="dp-out-")
  try:
    yield tmp
    for name in sorted(os.listdir(tmp)):
      upload(os.path.join(tmp, name), FileSystems.join(url, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def fetched(url: str, names: Sequence[str]) -> Iterator[list[str]]:
  """Local paths of the files ``names`` in folder ``url``: in place when
  local; else downloaded into a temp dir (local disk, not memory)."""
  if not is_remote(url):
    yield [os.path.join(url, name) for name in names]
    return
  tmp = tempfile.mkdtemp(prefix="dp-fetch-")
  try:
    paths = []
    for name in names:
      paths.append(os.path.join(tmp, name))
      _download(FileSystems.join(url, name), paths[-1])
    yield paths
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(workdir: str, fetch: Sequence[str] = ()) -> Iterator[str]:
  """A local workdir for the corpus steps: ``workdir`` itself when local;
  else a temp dir, first filled with the files under ``workdir/<fetch>``,
  whose new files (not ``_work/``) are uploaded to ``workdir`` on success."""
  if not is_remote(workdir):
    yield workdir
    return
  tmp = tempfile.mkdtemp(prefix="dp-work-")
  try:
    fetched = set()
    for sub in fetch:
      base = FileSystems.join(workdir, sub)
      for url in match(FileSystems.join(base, "**")):
        rel = os.path.join(sub, *url[len(base):].strip("/").split("/"))
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        with open_local(url) as src:
          shutil.copyfile(src, os.path.join(tmp, rel))
        fetched.add(rel)
    yield tmp
    for root, dirs, files in os.walk(tmp):
      dirs[:] = sorted(d for d in dirs if d != "_work")
      for name in sorted(files):
        rel = os.path.relpath(os.path.join(root, name), tmp)
        if rel in fetched:
          continue
        upload(os.path.join(tmp, rel),
                FileSystems.join(workdir, *rel.split(os.sep)))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
