"""WARC reading on pywb's real crawl files, broken ones and planted faults."""

import collections
import glob
import gzip
import os

import pytest
from warcio.archiveiterator import ArchiveIterator as WarcioIterator

from data_pipeline.document import Funnel
from data_pipeline.warc import read_warc
from data_pipeline.warc_write import http_response, warc_record, write_records
from dp_corpora import libreoffice_pages


def _read(path):
  funnel = Funnel()
  docs = list(read_warc(path, funnel))
  funnel.check()
  return docs, funnel.stages["read"]


def test_every_pywb_file_reads_without_crashing_and_balances(pywb_dir):
  files = sorted(glob.glob(os.path.join(pywb_dir, "*")))
  assert len(files) >= 15
  kept = 0
  for path in files:
    docs, stats = _read(path)
    assert stats.docs_in >= 1, path
    assert stats.docs_out == len(docs)
    kept += len(docs)
    for doc in docs:
      assert doc.url.startswith("http") and doc.id and "<" in doc.html
  assert kept >= 20


def test_iana_record_types_match_an_independent_reader(pywb_dir):
  path = os.path.join(pywb_dir, "iana.warc.gz")
  docs, stats = _read(path)
  truth = collections.Counter()
  html_200 = 0
  with open(path, "rb") as f:
    for rec in WarcioIterator(f):
      truth[rec.rec_type] += 1
      if rec.rec_type == "response":
        ctype = rec.http_headers.get_header("Content-Type") or ""
        if rec.http_headers.get_statuscode() == "200" and "html" in ctype:
          html_200 += 1
  assert stats.docs_in == sum(truth.values())
  assert stats.dropped["skip:request"] == truth["request"] > 100
  assert stats.dropped["skip:revisit"] == truth["revisit"] > 100
  assert stats.dropped["skip:warcinfo"] == truth["warcinfo"]
  assert len(docs) == html_200 > 10
  non_html = stats.dropped["skip:non_html"] + sum(
      v for k, v in stats.dropped.items() if k.startswith("skip:status_"))
  assert len(docs) + non_html == truth["response"]
  home = next(d for d in docs if d.url == "http://www.iana.org/")
  assert "Internet Assigned Numbers Authority" in home.html


def test_broken_pywb_files_are_counted_not_raised(pywb_dir):
  _, bad = _read(os.path.join(pywb_dir, "bad.arc"))
  assert bad.docs_out == 0 and bad.dropped["malformed_http"] >= 1
  docs, example = _read(os.path.join(pywb_dir, "example.warc"))
  # A request record's Content-Length runs 12 bytes into the next record:
  # that record alone is lost, the 302 after it is still read.
  assert example.dropped["bad_content_length"] == 1
  assert example.dropped["skip:status_3xx"] == 1
  assert len(docs) == 1
  _, missing = _read(os.path.join(pywb_dir, "missing-status-text.warc"))
  assert missing.dropped["malformed_http"] == 1  # Lines end in \r\r\n.
  arc_docs, _ = _read(os.path.join(pywb_dir, "example.arc.gz"))
  warc_docs, _ = _read(os.path.join(pywb_dir, "example.warc.gz"))
  assert [d.html for d in arc_docs] == [d.html for d in warc_docs[:1]]


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 0.81, 0.99])
def test_truncated_gzip_is_a_prefix_plus_a_counted_drop(pywb_dir, tmp_path,
                                                       fraction):
  full_path = os.path.join(pywb_dir, "iana.warc.gz")
  full, _ = _read(full_path)
  data = open(full_path, "rb").read()
  cut = tmp_path / "cut.warc.gz"
  cut.write_bytes(data[:int(len(data) * fraction)])
  docs, stats = _read(str(cut))
  assert [d.html for d in docs] == [d.html for d in full[:len(docs)]]
  assert stats.dropped["truncated_gzip"] == 1
  assert stats.docs_in == sum(stats.dropped.values()) + len(docs)


def test_planted_faults_and_charsets(tmp_path):
  page = open(libreoffice_pages("de")[10], encoding="utf-8").read()
  ja = open(libreoffice_pages("ja")[10], encoding="utf-8").read()
  latin1 = page.replace("charset=utf-8", "charset=iso-8859-1").encode(
      "latin-1", "ignore").decode("latin-1")
  sjis = ja.replace("charset=utf-8", "charset=shift_jis").encode(
      "shift_jis", "ignore").decode("shift_jis")
  assert any(c in latin1 for c in "äöüß") and len(sjis) > 0.9 * len(ja)
  records = [
      ("http://a/ok", http_response(page.encode())),
      ("http://a/latin1", http_response(latin1.encode("latin-1"),
                                        "text/html; charset=iso-8859-1")),
      ("http://a/meta-sjis", http_response(sjis.encode("shift_jis"),
                                           "text/html")),
      ("http://a/gzip", http_response(gzip.compress(page.encode()),
                                      extra_headers="Content-Encoding: gzip\r\n")),
      ("http://a/badgzip", http_response(b"\x1f\x8bnot gzip at all" * 10,
                                         extra_headers="Content-Encoding: gzip\r\n")),
      ("http://a/binary", http_response(os.urandom(2000) + b"\x00" * 10)),
      ("http://a/badstatus", b"HTTP/1.1 OK-ish\r\nContent-Type: text/html\r\n\r\n"
       + page.encode()),
      ("http://a/noheaders", page.encode()[:300]),
      ("http://a/pdf", http_response(b"%PDF-1.4 ...", "application/pdf")),
  ]
  path = tmp_path / "planted.warc.gz"
  with open(path, "wb") as out:
    write_records(out, [warc_record(u, b) for u, b in records])
    write_records(out, [warc_record("http://a/req", b"GET / HTTP/1.1\r\n\r\n",
                                    warc_type="request")])
  docs, stats = _read(str(path))
  by_url = {d.url: d for d in docs}
  assert set(by_url) == {"http://a/ok", "http://a/latin1", "http://a/meta-sjis",
                         "http://a/gzip"}
  assert by_url["http://a/latin1"].html == latin1
  assert by_url["http://a/meta-sjis"].html == sjis
  assert by_url["http://a/gzip"].html == page
  assert by_url["http://a/meta-sjis"].metadata["charset"] == "shift_jis"
  assert stats.dropped == {"bad_content_encoding": 1, "undecodable_body": 1,
                           "malformed_http": 2, "skip:non_html": 1,
                           "skip:request": 1}


def test_wet_conversion_records_become_text_documents(tmp_path):
  texts = [open(p, encoding="utf-8").read()[:2000]
           for p in libreoffice_pages("fr")[:5]]
  path = tmp_path / "x.warc.wet.gz"
  with open(path, "wb") as out:
    write_records(out, [warc_record(f"http://fr/{i}", t.encode(), "conversion")
                        for i, t in enumerate(texts)])
  docs, stats = _read(str(path))
  assert [d.text for d in docs] == texts and stats.docs_out == 5
