"""Writes WARC files (one gzip member per record), for tests, demos and benches.

Turning real HTML folders (LibreOffice help, Python docs) into WARCs gives the
pipeline realistic input without any crawl; ``raw`` lets tests plant broken
records byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import uuid
from typing import BinaryIO, Iterable


def http_response(body: bytes, content_type: str = "text/html; charset=utf-8",
                  status: str = "200 OK", extra_headers: str = "") -> bytes:
  head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
          f"Content-Length: {len(body)}\r\n{extra_headers}\r\n")
  return head.encode("latin-1") + body


def warc_record(uri: str, block: bytes, warc_type: str = "response",
                date: str = "2024-01-01T00:00:00Z",
                content_length: int | None = None) -> bytes:
  """One WARC record; the id is derived from (uri, date, block) so reruns match."""
  rid = uuid.UUID(bytes=hashlib.md5(
      uri.encode() + date.encode() + block).digest())
  ctype = ("application/http; msgtype=response" if warc_type == "response"
           else "application/http; msgtype=request" if warc_type == "request"
           else "text/plain")
  length = len(block) if content_length is None else content_length
  head = (f"WARC/1.0\r\nWARC-Type: {warc_type}\r\n"
          f"WARC-Record-ID: <urn:uuid:{rid}>\r\nWARC-Date: {date}\r\n"
          f"WARC-Target-URI: {uri}\r\nContent-Type: {ctype}\r\n"
          f"Content-Length: {length}\r\n\r\n")
  return head.encode("utf-8") + block + b"\r\n\r\n"


def write_records(out: BinaryIO, records: Iterable[bytes]) -> None:
  for record in records:
    out.write(gzip.compress(record, compresslevel=6, mtime=0))


def write_pages(path: str, pages: Iterable[tuple[str, bytes]],
                date: str = "2024-01-01T00:00:00Z") -> int:
  """Writes (url, html bytes) pages as HTTP 200 responses; returns the count."""
  n = 0
  with open(path, "wb") as out:
    for url, body in pages:
      write_records(out, [warc_record(url, http_response(body), date=date)])
      n += 1
  return n
