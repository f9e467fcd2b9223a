"""Streams web pages out of WARC, WET and ARC files.

Every record read is counted in the ``read`` stage: HTML responses come out as
documents, other record types are skipped with a ``skip:*`` reason, and broken
input (truncated gzip members, malformed headers, undecodable bodies) is dropped
with its own reason. Nothing here raises on bad data: a file whose framing breaks
mid-way is counted once as ``malformed_warc`` and reading moves to the next file.

FastWARC does the WARC framing (fast, handles per-record gzip); the HTTP layer is
parsed here so that truncation and decoding failures are seen per record. ARC
files, rare today, go through warcio.
"""

from __future__ import annotations

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


def read_warc(path: str, funnel: Funnel) -> Iterator[Document]:
  """Yields the HTML (or WET text) documents of one file, counting all records."""
  fmt = _format(path)
  if fmt == "arc":
    yield from _read_arc(path, funnel)
    return
  from fastwarc.warc import ArchiveIterator, WarcRecordType
  stats = funnel.stage(STAGE)
  source = os.path.basename(path)
  try:
    with open(path, "rb") as f:
      for record in ArchiveIterator(f, parse_http=False):
        length = record.content_length
        stats.record_in(length)
        rtype = record.record_type
        uri = record.headers.get("WARC-Target-URI", "") or ""
        record_id = record.record_id or f"{source}:{record.stream_pos}"
        date = record.headers.get("WARC-Date", "") or ""
        try:
          block = record.reader.read()
          if len(block) < length:
            raise RecordError("truncated_record")
          if fmt == "wet" and rtype == WarcRecordType.conversion:
            text, _ = decode_html(block, "utf-8")
            doc = Document(id=record_id, url=uri, text=text,
                           metadata={"date": date, "source": source})
          elif rtype in (WarcRecordType.response, WarcRecordType.resource):
            is_http = rtype == WarcRecordType.response and uri.startswith("http")
            doc = _html_document(uri, record_id, date, block, is_http, source)
          else:
            raise RecordError(f"skip:{rtype}")
        except Exception as e:
          _count_bad_record(stats, funnel, f"{source} {uri}", length, e)
          continue
        stats.record_out(doc.nbytes())
        yield doc
  except Exception as e:  # Framing broke: the rest of this file is unreadable.
    _count_bad_file(stats, funnel, source, e)


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


def _read_arc(path: str, funnel: Funnel) -> Iterator[Document]:
  from warcio.archiveiterator import ArchiveIterator
  stats = funnel.stage(STAGE)
  source = os.path.basename(path)
  try:
    with open(path, "rb") as f:
      for record in ArchiveIterator(f, arc2warc=True):
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
          _count_bad_record(stats, funnel, f"{source} {uri}", length, e)
          continue
        stats.record_out(doc.nbytes())
        yield doc
  except Exception as e:
    _count_bad_file(stats, funnel, source, e)
