"""The stage protocol keeps the books: in = out + dropped, errors counted."""

from data_pipeline.document import (Document, Drop, Funnel, Stage, StageStats,
                                    apply_chain)
from dp_corpora import libreoffice_pages


def _pages(n):
  docs = []
  for path in libreoffice_pages("en")[:n]:
    with open(path, encoding="utf-8") as f:
      docs.append(Document(id=path, url="file://" + path, text=f.read()))
  return docs


def test_counts_add_up_with_drops_and_errors():
  docs = _pages(200)
  short = Stage("short", lambda d: Drop("short") if len(d.text) < 5000 else d)

  def crashes_sometimes(doc):
    if "table" in doc.text[:3000]:
      raise ValueError("boom")
    return Document(doc.id, doc.url, doc.text.upper(), metadata=doc.metadata)

  upper = Stage("upper", crashes_sometimes)
  funnel = Funnel()
  out = list(apply_chain([short, upper], docs, funnel))
  funnel.check()
  s, u = funnel.stages["short"], funnel.stages["upper"]
  n_short = sum(len(d.text) < 5000 for d in docs)
  assert s.docs_in == len(docs) and s.dropped["short"] == n_short
  assert u.docs_in == s.docs_out == len(docs) - n_short
  assert u.dropped["error:ValueError"] == sum(
      "table" in d.text[:3000] for d in docs if len(d.text) >= 5000)
  assert len(out) == u.docs_out > 0
  assert s.bytes_in == sum(d.nbytes() for d in docs)
  assert s.bytes_in == s.bytes_out + sum(s.dropped_bytes.values())
  originals = {d.id: d.text for d in docs}
  assert all(d.text == originals[d.id].upper() for d in out)
  assert funnel.samples["short/short"][0]["id"] == next(
      d.id for d in docs if len(d.text) < 5000)


def test_funnel_merge_and_json_roundtrip():
  docs = _pages(60)
  stage = Stage("odd", lambda d: Drop("odd") if len(d.text) % 2 else d)
  a, b = Funnel(), Funnel()
  list(apply_chain([stage], docs[:30], a))
  list(apply_chain([stage], docs[30:], b))
  a.merge(b)
  whole = Funnel()
  list(apply_chain([stage], docs, whole))
  assert a.to_json()["stages"] == whole.to_json()["stages"]
  again = Funnel.from_json(whole.to_json())
  assert again.to_json() == whole.to_json()
  again.check()


def test_check_catches_unbalanced_books():
  stats = StageStats("x")
  stats.record_in(10)
  try:
    stats.check()
  except AssertionError as e:
    assert "in=1" in str(e)
  else:
    raise AssertionError("unbalanced stats passed check()")
