"""Chinese, Japanese and Korean cleaned as well as English: word units,
CJK shingles, per-language thresholds, and the parallel-page check."""

import numpy as np
import pytest

from configs.data import refinedweb
from data_pipeline import config, corpus, multilingual, words
from data_pipeline.document import Document, Funnel
from data_pipeline.extract import clean_text, resiliparse_text
from data_pipeline.lines import line_drop_reason
from data_pipeline.pipeline import build_stages
from data_pipeline.quality import C4Quality, GopherQuality
from data_pipeline.shingles import normalise, shingle_hashes
from dp_corpora import libreoffice_pages


def _page_text(lang, index):
  html = open(libreoffice_pages(lang)[index], encoding="utf-8").read()
  return clean_text(resiliparse_text(html))


def _translated(lang, count, min_units=150, step=37, max_split=None):
  """Texts of help pages translated into ``lang`` (many are partly left in
  English): mostly CJK units and at least ``min_units`` of them."""
  out = []
  for i in range(0, len(libreoffice_pages(lang)), step):
    text = _page_text(lang, i)
    units = words.units(text)
    cjk = sum(words.has_cjk(u) for u in units)
    short = max_split is None or len(text.split()) < max_split
    if len(units) >= min_units and cjk > 0.7 * len(units) and short:
      out.append(text)
      if len(out) == count:
        return out
  raise AssertionError(f"fewer than {count} translated {lang} pages")


def test_units_split_cjk_characters_and_keep_spaced_words():
  assert words.units("LibreOfficeのヘルプ 表格，UNO API") == [
      "LibreOffice", "の", "ヘ", "ル", "プ", "表", "格", "，UNO", "API"]
  assert words.units("표 삽입 대화 상자") == ["표", "삽입", "대화", "상자"]
  assert words.units("plain ascii text") == ["plain", "ascii", "text"]
  assert words.count("数据 pipeline") == 3
  assert normalise("数据，Pipeline！") == "数 据 pipeline"


def test_cjk_shingles_are_character_ngrams():
  (text,) = _translated("zh", 1, min_units=300)
  units = normalise(text).split()
  assert len(units) > 200
  sh = shingle_hashes(text, 5)
  # Nearly one distinct 5-gram per position (a whole sentence used to be
  # one "word", so a page had a handful of shingles).
  assert len(sh) > 0.8 * (len(units) - 4)
  edited = text.replace(text[200], "改", 1)
  diff = len(np.setxor1d(sh, shingle_hashes(edited, 5)))
  assert 0 < diff <= 10


def test_real_cjk_pages_pass_gopher_and_c4_with_their_language_rules():
  cfg = config.load(refinedweb.get_config())
  stages = {s.name: s for s in build_stages(cfg)}
  gopher = stages["quality_gopher"].fn
  kept = {}
  for lang in ("zh", "ja"):
    kept[lang] = 0
    for i in range(0, 2000, 100):
      doc = Document(str(i), "u", _page_text(lang, i),
                     metadata={"language": lang})
      kept[lang] += isinstance(gopher(doc), Document)
  en = sum(isinstance(gopher(Document(str(i), "u", _page_text("en", i),
                                      metadata={"language": "en"})), Document)
           for i in range(0, 2000, 100))
  assert min(kept.values()) >= en - 3, (kept, en)
  # Counted in whitespace words, Chinese pages were "too few words".
  zh = Document("z", "u", _translated("zh", 1, max_split=50)[0],
                metadata={"language": "zh"})
  assert len(zh.text.split()) < 50 <= words.count(zh.text)
  assert isinstance(gopher(zh), Document)
  # English thresholds on character units would drop it for short words.
  assert GopherQuality()(zh).reason == "mean_word_length"
  sentences = "数据管线清理网页。每一页都按语言处理！结果写入文件。"
  assert isinstance(C4Quality(min_words_per_line=8)(
      Document("c", "u", sentences * 2)), Document)


def test_line_rules_read_cjk_lines():
  assert line_drop_reason("比起标准的UNO API，Access2Base 提供的 API 旨在尽可能的简单。") is None
  assert line_drop_reason("UNO API REFERENCE") == "uppercase"
  assert line_drop_reason("插入表格") is None  # Four units, not one word.
  assert line_drop_reason("表") == "single_word"


def test_japanese_page_losing_a_repeated_span_is_not_dropped():
  cfg = config.load(refinedweb.get_config())
  other, text = _translated("ja", 2, min_units=200, step=7, max_split=50)
  assert len(text.split()) < cfg.exact.min_words_after
  span = text[:60]  # 60 Japanese characters: ~180 UTF-8 bytes.
  first = Document("a", "u1", span + "\n" + other,
                   metadata={"language": "ja"})
  second = Document("b", "u2", text, metadata={"language": "ja"})
  funnel = Funnel()
  out = corpus.exact_dedup([first, second], cfg, funnel)
  assert [d.id for d in out] == ["a", "b"]
  assert out[1].metadata["exact_removed_bytes"] >= 100


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
  return multilingual.evaluate(multilingual.LANGS, every=10, preset="fineweb",
                               workdir=str(tmp_path_factory.mktemp("ml")))


def test_every_language_kept_within_15_percent_of_english(parallel_results):
  print("\n" + multilingual.table(parallel_results))
  en = next(r for r in parallel_results if r.lang == "en")
  assert en.pages >= 250 and en.kept >= 100
  for r in parallel_results:
    assert 0.85 <= r.kept_frac / en.kept_frac <= 1.15, r


def test_planted_duplicates_found_in_every_language(parallel_results):
  for r in parallel_results:
    assert r.planted_exact >= 15 and r.planted_near >= 15, r
    assert r.recall >= 0.9, r
    assert r.precision >= 0.98, r
