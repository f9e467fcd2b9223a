"""Damaged copies of pywb's real iana.org crawl: one bad record costs one
record, every intact record is read, and each skipped span is counted with
its reason and byte offset."""

import gzip
import os
import re

import pytest

from data_pipeline.document import Funnel
from data_pipeline.report import write_markdown
from data_pipeline.warc import gzip_members, read_warc


def _read(path):
  funnel = Funnel()
  docs = list(read_warc(str(path), funnel))
  funnel.check()
  return docs, funnel


@pytest.fixture(scope="module")
def iana(pywb_dir):
  """(file bytes, [(offset, length, content)] per member, intact read)."""
  path = os.path.join(pywb_dir, "iana.warc.gz")
  data = open(path, "rb").read()
  members = [(off, n, content) for off, n, content, err in gzip_members(data)]
  assert all(c is not None for _, _, c in members) and len(members) == 343
  docs, funnel = _read(path)
  return data, members, docs, funnel.stages["read"]


def _record_id(content):
  return re.search(rb"WARC-Record-ID: (\S+)", content).group(1).decode()


def _check_one_lost_each(iana, path, damaged, reasons):
  """Every record but those of ``damaged`` members is read, and each damaged
  member is one lost span at its offset with the given reason."""
  data, members, intact_docs, intact = iana
  docs, funnel = _read(path)
  stats = funnel.stages["read"]
  lost_ids = {_record_id(members[k][2]) for k in damaged}
  assert [d.id for d in docs] == [d.id for d in intact_docs
                                  if d.id not in lost_ids]
  lost = sum(stats.dropped[r] for r in set(reasons))
  assert stats.docs_in - lost == intact.docs_in - len(damaged)
  assert [(s["offset"], s["reason"]) for s in funnel.lost_spans] == [
      (members[k][0], r) for k, r in zip(damaged, reasons)]
  return docs, funnel


def _html_members(members, count):
  """Indices of members holding HTML 200 responses (what becomes a doc)."""
  out = [k for k, (_, _, c) in enumerate(members)
         if b"WARC-Type: response" in c and b"200 OK" in c[:2000]
         and b"text/html" in c[:3000]]
  return out[1:1 + count * 3:3]


def test_bit_flips_cost_only_their_records(iana, tmp_path):
  data, members, _, _ = iana
  damaged = _html_members(members, 3) + [40, 200]
  damaged.sort()
  buf = bytearray(data)
  for k in damaged:
    off, n, _ = members[k]
    buf[off + n // 2] ^= 0x10
    buf[off + n // 2 + 7] ^= 0x01
  path = tmp_path / "flipped.warc.gz"
  path.write_bytes(bytes(buf))
  docs, funnel = _check_one_lost_each(iana, path, damaged,
                                      ["corrupt_gzip"] * len(damaged))
  assert len(docs) <= len(iana[2]) - 3
  report = write_markdown(funnel, str(tmp_path))
  text = open(report).read()
  assert "## Records lost in reading" in text
  assert f"| corrupt_gzip | {len(damaged)} |" in text


def test_broken_header_and_truncated_member_mid_file(iana, tmp_path):
  data, members, _, _ = iana
  html = _html_members(members, 2)
  bad_header, cut = html[0], html[1]
  parts = []
  for k, (off, n, content) in enumerate(members):
    raw = data[off:off + n]
    if k == bad_header:
      raw = gzip.compress(content.replace(b"Content-Length: ",
                                          b"Content-Length: x", 1), mtime=0)
    elif k == cut:
      raw = raw[:n // 2]
    parts.append((k, raw))
  path = tmp_path / "damaged.warc.gz"
  path.write_bytes(b"".join(raw for _, raw in parts))
  offsets = {}
  pos = 0
  for k, raw in parts:
    offsets[k] = pos
    pos += len(raw)
  docs, funnel = _read(path)
  stats = funnel.stages["read"]
  lost_ids = {_record_id(members[k][2]) for k in (bad_header, cut)}
  _, _, intact_docs, intact = iana
  assert [d.id for d in docs] == [d.id for d in intact_docs
                                  if d.id not in lost_ids]
  assert [(s["offset"], s["reason"]) for s in funnel.lost_spans] == [
      (offsets[bad_header], "malformed_warc_header"),
      (offsets[cut], "corrupt_gzip")]
  assert stats.docs_in == intact.docs_in
  assert stats.dropped["malformed_warc_header"] == 1
  assert stats.dropped["corrupt_gzip"] == 1


def test_uncompressed_file_resyncs_at_the_next_header(iana, tmp_path):
  _, members, intact_docs, intact = iana
  contents = [c for _, _, c in members]
  html = _html_members(members, 2)
  broken, wrong_length = html[0], html[1]
  contents[broken] = contents[broken].replace(b"WARC/1.0", b"WARX/1.0", 1)
  m = re.search(rb"Content-Length: (\d+)", contents[wrong_length])
  contents[wrong_length] = (
      contents[wrong_length][:m.start(1)]
      + str(int(m.group(1)) + 40).encode() + contents[wrong_length][m.end(1):])
  path = tmp_path / "plain.warc"
  path.write_bytes(b"".join(contents))
  docs, funnel = _read(path)
  stats = funnel.stages["read"]
  lost_ids = {_record_id(members[k][2]) for k in (broken, wrong_length)}
  assert [d.id for d in docs] == [d.id for d in intact_docs
                                  if d.id not in lost_ids]
  starts = [sum(len(c) for c in contents[:k]) for k in (broken, wrong_length)]
  assert [(s["offset"], s["reason"]) for s in funnel.lost_spans] == [
      (starts[0], "malformed_warc_header"),
      (starts[1], "bad_content_length")]
  assert stats.docs_in == intact.docs_in


def test_garbage_between_members_and_a_cut_tail(iana, tmp_path):
  data, members, intact_docs, _ = iana
  k = 100
  junk = os.urandom(3000).replace(b"\x1f\x8b", b"xx")
  cut_at = members[-1][0] + members[-1][1] // 2
  damaged = data[:members[k][0]] + junk + data[members[k][0]:cut_at]
  path = tmp_path / "junk.warc.gz"
  path.write_bytes(damaged)
  docs, funnel = _read(path)
  assert [(s["offset"], s["reason"]) for s in funnel.lost_spans] == [
      (members[k][0], "not_gzip"),
      (members[-1][0] + len(junk), "truncated_gzip")]
  last_id = _record_id(members[-1][2])
  assert [d.id for d in docs] == [d.id for d in intact_docs
                                  if d.id != last_id]
