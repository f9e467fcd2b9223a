"""Streams web pages out of WARC, WET and ARC files.

Every record read is counted in the ``read`` stage: HTML responses come out as
documents, other record types are skipped with a ``skip:*`` reason, and broken
input (truncated gzip members, malformed headers, undecodable bodies) is dropped
with its own reason. Nothing here raises on bad data, and one bad record costs
one record: each record of a ``.warc.gz`` is its own gzip member, so after a
member that fails to inflate (zlib checks its CRC, so flipped bits fail) the
reader resynchronises at the next member that inflates; in an uncompressed
file, after a bad header or a Content-Length that does not land on the next
record, at the next ``WARC/1.`` line. Each skipped span is one drop with its
reason (``corrupt_gzip``, ``truncated_gzip``, ``not_gzip``,
``malformed_warc_header``, ``bad_content_length``, ``truncated_record``) and is
listed with its byte offset in ``Funnel.lost_spans``.

The framing is ours (zlib + a header split): FastWARC and warcio both stop at
the first bad member or header, and resynchronising needs the offsets. The HTTP
layer is parsed here too, so that truncation and decoding failures are seen per
record. ARC files, rare today, go through warcio, per gzip member.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from typing import Iterator

from data_pipeline.document import Document, Funnel

STAGE = "read"
HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(
    rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.I)
# A body with more than this fraction of U+FFFD after decoding is dropped.
MAX_REPLACEMENT_FRACTION = 0.01


class RecordError(Exception):
  """A record that cannot become a document; ``reason`` goes in the funnel."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _parse_http(block: bytes) -> tuple[int, dict[str, str], bytes]:
  """Splits an HTTP response block into (status, lower-cased headers, body)."""
  end = block.find(b"\r\n\r\n")
  sep = 4
  if end < 0:
    end, sep = block.find(b"\n\n"), 2
  if end < 0:
    raise RecordError("malformed_http")
  lines = block[:end].decode("latin-1").splitlines()
  parts = lines[0].split(None, 2) if lines else []
  if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
    raise RecordError("malformed_http")
  headers = {}
  for line in lines[1:]:
    key, colon, value = line.partition(":")
    if not colon:
      continue  # Tolerated: real servers send junk header lines.
    headers[key.strip().lower()] = value.strip()
  return int(parts[1]), headers, block[end + sep:]


def _dechunk(body: bytes) -> bytes:
  out, pos = [], 0
  while True:
    eol = body.find(b"\r\n", pos)
    if eol < 0:
      raise ValueError("chunk header")
    size = int(body[pos:eol].split(b";")[0].strip() or b"x", 16)
    if size == 0:
      return b"".join(out)
    out.append(body[eol + 2:eol + 2 + size])
    if len(out[-1]) != size:
      raise ValueError("short chunk")
    pos = eol + 2 + size + 2


def _decode_transfer(headers: dict[str, str], body: bytes) -> bytes:
  if "chunked" in headers.get("transfer-encoding", "").lower():
    try:
      body = _dechunk(body)
    except ValueError:
      pass  # Crawlers often store the de-chunked body but keep the header.
  encoding = headers.get("content-encoding", "identity").lower().strip()
  if encoding in ("", "identity", "none"):
    return body
  try:
    if encoding in ("gzip", "x-gzip"):
      return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
      try:
        return zlib.decompress(body)
      except zlib.error:
        return zlib.decompress(body, -zlib.MAX_WBITS)
    if encoding == "br":
      import brotli  # Optional; absent means we cannot read it.
      return brotli.decompress(body)
  except ImportError:
    raise RecordError("unsupported_content_encoding") from None
  except Exception:
    raise RecordError("bad_content_encoding") from None
  raise RecordError("unsupported_content_encoding")


def _content_type(headers: dict[str, str]) -> tuple[str, str | None]:
  value = headers.get("content-type", "")
  mime, _, params = value.partition(";")
  charset = None
  match = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", params, re.I)
  if match:
    charset = match.group(1)
  return mime.strip().lower(), charset


def _looks_like_html(body: bytes) -> bool:
  head = body[:1024].lower()
  return b"<html" in head or b"<!doctype html" in head


def decode_html(body: bytes, declared: str | None) -> tuple[str, str]:
  """Decodes bytes with the declared, then meta, then detected charset."""
  from resiliparse.parse.encoding import detect_encoding
  candidates = [declared]
  meta = _META_CHARSET.search(body[:4096])
  if meta:
    candidates.append(meta.group(1).decode("ascii", "ignore"))
  candidates.append(detect_encoding(body))
  for charset in candidates:
    if not charset:
      continue
    try:
      return body.decode(charset), charset.lower()
    except (LookupError, UnicodeDecodeError):
      continue
  text = body.decode("utf-8", "replace")
  if text.count("\ufffd") > MAX_REPLACEMENT_FRACTION * max(1, len(text)):
    raise RecordError("undecodable_body")
  return text, "utf-8-replace"


def _html_document(uri: str, record_id: str, date: str, block: bytes,
                   is_http: bool, source: str) -> Document:
  if is_http:
    status, headers, body = _parse_http(block)
    if status != 200:
      raise RecordError(f"skip:status_{status // 100}xx")
    mime, charset = _content_type(headers)
    body = _decode_transfer(headers, body)
  else:
    mime, charset, body = "", None, block
  if mime and mime not in HTML_TYPES:
    raise RecordError("skip:non_html")
  if not mime and not _looks_like_html(body):
    raise RecordError("skip:non_html")
  if not body.strip():
    raise RecordError("empty_body")
  if b"\x00" in body[:4096]:
    raise RecordError("undecodable_body")  # Binary served as text/html.
  html, used = decode_html(body, charset)
  return Document(id=record_id, url=uri, html=html,
                  metadata={"date": date, "charset": used, "source": source})


def _format(path: str) -> str:
  name = os.path.basename(path).lower()
  if ".wet" in name:
    return "wet"
  if name.endswith((".arc", ".arc.gz")):
    return "arc"
  return "warc"


# --- Framing: gzip members and WARC records, resynchronising past damage ----

GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_MAGIC = b"WARC/1."
_CHUNK = 1 << 20  # Compressed bytes fed to zlib at a time.
# A record whose decompressed size passes this is skipped (gzip bombs).
MAX_RECORD_BYTES = 1 << 30
_HEADER_END = re.compile(rb"\n\r*\n")


def _inflate(data, pos: int) -> tuple[bytes | None, int, str | None]:
  """(content, compressed length, error) of the gzip member at ``pos``;
  zlib checks the member's CRC-32 and size, so a flipped bit is an error."""
  d = zlib.decompressobj(16 + zlib.MAX_WBITS)
  view = memoryview(data)
  parts, size, fed = [], 0, pos
  try:
    while not d.eof and fed < len(data):
      chunk = view[fed:fed + _CHUNK]
      fed += len(chunk)
      out = d.decompress(chunk)
      size += len(out)
      if size <= MAX_RECORD_BYTES:
        parts.append(out)
  except zlib.error:
    return None, fed - pos, "corrupt_gzip"
  finally:
    view.release()
  if not d.eof:
    return None, fed - pos, "truncated_gzip"
  used = fed - pos - len(d.unused_data)
  if size > MAX_RECORD_BYTES:
    return None, used, "record_too_large"
  return b"".join(parts), used, None


def gzip_members(data) -> Iterator[tuple[int, int, bytes | None, str | None]]:
  """(offset, length, content, error) per gzip member of ``data``. A member
  that fails (corrupt, truncated, or bytes that are no member) is skipped up
  to the next member that decompresses: one lost span per run of failures."""
  pos, n = 0, len(data)
  lost_at, lost_reason = None, None
  while pos < n:
    if data[pos:pos + 3] == GZIP_MAGIC:
      content, used, error = _inflate(data, pos)
    else:
      content, used, error = None, 0, "not_gzip"
    if error is None:
      if lost_at is not None:
        yield lost_at, pos - lost_at, None, lost_reason
        lost_at = None
      yield pos, used, content, None
      pos += used
      continue
    if lost_at is None:
      lost_at, lost_reason = pos, error
    nxt = data.find(GZIP_MAGIC, pos + 1)
    pos = n if nxt < 0 else nxt
  if lost_at is not None:
    yield lost_at, n - lost_at, None, lost_reason


def _next_header(data, pos: int) -> int:
  """Offset of the next ``WARC/1.`` at a line start after ``pos``, or -1."""
  nxt = data.find(b"\n" + WARC_MAGIC, pos)
  return -1 if nxt < 0 else nxt + 1


def _warc_records(data, base: int, member: bool
                  ) -> Iterator[tuple[int, int, dict | None, bytes | str]]:
  """(offset, length, headers, block) per WARC record in ``data`` (one gzip
  member's content, or a whole uncompressed file), or (offset, length, None,
  reason) for a span that could not be read. A bad header or a
  Content-Length that does not land on the next record resynchronises at the
  next ``WARC/1.`` line. Offsets are file offsets: ``base`` plus the
  position, or the member's own offset inside a gzip member."""
  pos, n = 0, len(data)
  where = (lambda p: base) if member else (lambda p: base + p)
  while pos < n:
    while pos < n and data[pos:pos + 1] in (b"\r", b"\n"):
      pos += 1  # Record separators (and stray blank lines).
    if pos >= n:
      return
    reason, head_end = None, None
    if data[pos:pos + len(WARC_MAGIC)] != WARC_MAGIC:
      reason = "malformed_warc_header"
    elif (head_end := _HEADER_END.search(data, pos)) is None:
      reason = "truncated_record"
    else:
      headers = _warc_headers(bytes(data[pos:head_end.start()]))
      length = headers.get("content-length", "")
      if not length.strip().isdigit():
        reason = "malformed_warc_header"
    if reason is None:
      length = int(length)
      start = head_end.end()
      block = bytes(data[start:start + length])
      after = start + length
      if len(block) < length:
        yield where(pos), n - pos, headers, block  # Counted as truncated.
        return
      rest = after
      while rest < n and data[rest:rest + 1] in (b"\r", b"\n"):
        rest += 1
      # The block must end at the record terminator (CRLF CRLF) or right
      # before the next record: else Content-Length is wrong.
      if (rest - after >= 2 or rest >= n
          or data[rest:rest + len(WARC_MAGIC)] == WARC_MAGIC):
        yield where(pos), after - pos, headers, block
        pos = rest
        continue
      reason = "bad_content_length"
    nxt = _next_header(data, pos + 1)
    end = n if nxt < 0 else nxt
    yield where(pos), end - pos, None, reason
    pos = end


def _warc_headers(head: bytes) -> dict[str, str]:
  headers = {}
  for line in head.decode("utf-8", "replace").split("\n")[1:]:
    key, colon, value = line.partition(":")
    if colon:
      headers[key.strip().lower()] = value.strip()
  return headers


def _open(path: str):
  """The file's bytes, memory-mapped (an empty file gives b"")."""
  import mmap
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      return b""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _is_gzip(path: str, data) -> bool:
  """By content; a ``.gz`` name counts when a member follows damaged bytes."""
  if data[:3] == GZIP_MAGIC:
    return True
  return path.lower().endswith(".gz") and data.find(GZIP_MAGIC) >= 0


def read_warc(path: str, funnel: Funnel) -> Iterator[Document]:
  """Yields the HTML (or WET text) documents of one file, counting all
  records; damaged spans are skipped (counted once each, with their offset
  in ``funnel.lost_spans``) and reading goes on at the next record."""
  fmt = _format(path)
  stats = funnel.stage(STAGE)
  source = os.path.basename(path)
  try:
    data = _open(path)
  except OSError as e:
    _count_bad_file(stats, funnel, source, e)
    return
  try:
    if fmt == "arc":
      yield from _read_arc(path, data, funnel)
    else:
      yield from _read_records(data, path, fmt, source, stats, funnel)
  finally:
    if not isinstance(data, bytes):
      data.close()


def _read_records(data, path: str, fmt: str, source: str, stats,
                  funnel: Funnel) -> Iterator[Document]:
  if _is_gzip(path, data):
    pieces = gzip_members(data)
  else:
    pieces = iter([(0, len(data), data, None)])
  for offset, length, content, error in pieces:
    if error is not None:
      _count_lost(stats, funnel, source, offset, length, error)
      continue
    member = content is not data
    for rec_off, rec_len, headers, block in _warc_records(content, offset,
                                                          member):
      if headers is None:
        _count_lost(stats, funnel, source, rec_off, rec_len, block)
        continue
      doc = _record_document(headers, block, fmt, source, rec_off, stats,
                             funnel)
      if doc is not None:
        yield doc


def _record_document(headers: dict[str, str], block: bytes, fmt: str,
                     source: str, offset: int, stats, funnel: Funnel
                     ) -> Document | None:
  """One WARC record as a document, or None (counted skip or drop)."""
  length = int(headers["content-length"])
  stats.record_in(length)
  rtype = headers.get("warc-type", "").lower()
  uri = headers.get("warc-target-uri", "").strip("<>")
  record_id = headers.get("warc-record-id") or f"{source}:{offset}"
  date = headers.get("warc-date", "")
  try:
    if len(block) < length:
      raise RecordError("truncated_record")
    if fmt == "wet" and rtype == "conversion":
      text, _ = decode_html(block, "utf-8")
      doc = Document(id=record_id, url=uri, text=text,
                     metadata={"date": date, "source": source})
    elif rtype in ("response", "resource"):
      is_http = rtype == "response" and uri.startswith("http")
      doc = _html_document(uri, record_id, date, block, is_http, source)
    else:
      raise RecordError(f"skip:{rtype or 'unknown'}")
  except Exception as e:
    _count_bad_record(stats, funnel, f"{source}@{offset} {uri}", length, e)
    return None
  stats.record_out(doc.nbytes())
  return doc


def _count_lost(stats, funnel: Funnel, source: str, offset: int, length: int,
                reason: str) -> None:
  """A span of the file that held no readable record: one record lost."""
  stats.record_in(length)
  stats.record_drop(reason, length)
  funnel.lost_span(source, offset, length, reason)
  funnel.sample_drop(STAGE, reason, None,
                     f"{source}: {length} bytes at offset {offset}")


def _count_bad_record(stats, funnel: Funnel, where: str, length: int,
                      error: Exception) -> None:
  """A record that cannot become a document: dropped with its reason."""
  reason = (error.reason if isinstance(error, RecordError)
            else "malformed_record")
  stats.record_drop(reason, length)
  funnel.sample_drop(STAGE, reason, None, f"{where}: {error}")


def _count_bad_file(stats, funnel: Funnel, source: str,
                    error: Exception) -> None:
  """Framing broke: the rest of the file counts as one malformed record."""
  stats.record_in(0)
  stats.record_drop("malformed_warc", 0)
  funnel.sample_drop(STAGE, "malformed_warc", None, f"{source}: {error}")


def _read_arc(path: str, data, funnel: Funnel) -> Iterator[Document]:
  """ARC through warcio: per gzip member when compressed (a damaged member
  costs its record), else the whole file (a break ends it)."""
  stats = funnel.stage(STAGE)
  source = os.path.basename(path)
  if not _is_gzip(path, data):
    yield from _arc_records(io.BytesIO(data), source, 0, stats, funnel)
    return
  for offset, length, content, error in gzip_members(data):
    if error is not None:
      _count_lost(stats, funnel, source, offset, length, error)
    else:
      yield from _arc_records(io.BytesIO(content), source, offset, stats,
                              funnel)


def _arc_records(stream, source: str, offset: int, stats, funnel: Funnel
                 ) -> Iterator[Document]:
  from warcio.archiveiterator import ArchiveIterator
  try:
    for record in ArchiveIterator(stream, arc2warc=True):
      length = record.length or 0
      stats.record_in(length)
      uri = record.rec_headers.get_header("WARC-Target-URI") or ""
      try:
        if record.rec_type != "response":
          raise RecordError(f"skip:{record.rec_type}")
        status = record.http_headers.get_statuscode() if record.http_headers else ""
        if not str(status).isdigit():
          raise RecordError("malformed_http")
        block = (record.http_headers.to_bytes() if record.http_headers else b"")
        block += record.raw_stream.read()
        doc = _html_document(uri, f"{source}:{uri}",
                             record.rec_headers.get_header("WARC-Date") or "",
                             block, True, source)
      except Exception as e:
        _count_bad_record(stats, funnel, f"{source}@{offset} {uri}", length, e)
        continue
      stats.record_out(doc.nbytes())
      yield doc
  except Exception as e:
    _count_bad_file(stats, funnel, source, e)
