"""Local and Beam runners and the clean_corpus CLI on WARCs of real pages.

The input is LibreOffice help pages (en, de, fr) in several WARC shards, plus
planted copies: a later re-crawl of some URLs (URL dedup), lightly edited
copies under new URLs (MinHash), and pywb's iana.org crawl.
"""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs.data import refinedweb
from data_pipeline import config as config_lib
from data_pipeline import corpus, runners
from data_pipeline.export import read_shard
from data_pipeline.pipeline import build_stages
from data_pipeline.warc_write import write_pages
from dp_corpora import libreoffice_pages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_SHARDS = 6
# Fast settings shared by every run here (FineWeb's 112 hashes, not 9,000).
OVERRIDES = {"minhash.preset": "fineweb", "langid.keep": ("en", "de", "fr"),
             "export.docs_per_shard": 40, "mix.sources": "en=0.6,de=0.4",
             "progress": False}


def _pages(lang, step, min_size=0):
  return [p for p in libreoffice_pages(lang) if os.path.getsize(p) > min_size][::step]


def _edit(html: bytes) -> bytes:
  """A near-copy: a few words changed, as a re-hosted or templated page."""
  return html.replace(b" the ", b" this ", 3).replace(b"<p", b"<p data-x=1", 1)


@pytest.fixture(scope="module")
def warc_glob(tmp_path_factory, pywb_dir):
  root = tmp_path_factory.mktemp("warcs")
  pages = []
  for lang, step in (("en", 12), ("de", 40), ("fr", 40)):
    pages += [(f"https://help.libreoffice.org/{lang}/{p.split('/text/')[1]}",
               open(p, "rb").read()) for p in _pages(lang, step, 6000)]
  for k in range(N_SHARDS):
    write_pages(str(root / f"lo-{k}.warc.gz"), pages[k::N_SHARDS])
  # Plant copies of pages that survive the per-document chain.
  probe = str(root / "probe.warc")
  write_pages(probe, [pg for pg in pages if "/en/" in pg[0]][:40])
  kept, _ = corpus.run_shard(probe, build_stages(_config("")))
  os.remove(probe)
  kept = {d.url for d in kept}
  long_en = [pg for pg in pages if pg[0] in kept][:10]
  assert len(long_en) == 10
  write_pages(str(root / "recrawl.warc.gz"), long_en[:5],
              date="2025-06-01T00:00:00Z")
  write_pages(str(root / "mirror.warc.gz"),
              [(u.replace("help.libreoffice.org", "mirror.example.net"),
                _edit(h)) for u, h in long_en[5:]])
  os.symlink(os.path.join(pywb_dir, "iana.warc.gz"), root / "iana.warc.gz")
  return str(root / "*.warc.gz")


def _config(warc_glob, **extra):
  cfg = refinedweb.get_config()
  cfg.input = warc_glob
  for key, value in {**OVERRIDES, **extra}.items():
    section, _, field = key.rpartition(".")
    setattr(cfg[section] if section else cfg, field, value)
  return config_lib.load(cfg)


def _cli_args(warc_glob, workdir, **extra):
  args = [sys.executable, "-m", "launch.clean_corpus",
          "--config=configs/data/refinedweb.py", f"--config.input={warc_glob}",
          f"--workdir={workdir}"]
  for key, value in {**OVERRIDES, **extra}.items():
    args.append(f"--config.{key}={value}")
  return args


def _outputs(workdir):
  """Relative paths of every output file (not the resume state)."""
  out = []
  for base, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d != "_work"]
    out += [os.path.relpath(os.path.join(base, f), workdir) for f in files]
  return sorted(out)


def _assert_same_outputs(a, b):
  files = _outputs(a)
  assert files == _outputs(b)
  assert "stats.json" in files and "report.md" in files
  _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
  assert not mismatch and not errors, mismatch + errors


@pytest.fixture(scope="module")
def clean_run(warc_glob, tmp_path_factory):
  """An uninterrupted local run, in process, one worker."""
  workdir = str(tmp_path_factory.mktemp("clean"))
  funnel = runners.run(_config(warc_glob, workers=1), workdir)
  return workdir, funnel


def test_counts_add_up_and_corpus_is_split_by_language(clean_run):
  workdir, _ = clean_run
  stats = json.load(open(os.path.join(workdir, "stats.json")))["stages"]
  names = [s["name"] for s in stats]
  assert names == ["read", "url_filter", "extract", "langid", "repetition",
                   "quality_gopher", "lines", "url_dedup", "minhash", "exact"]
  for s in stats:
    assert s["docs_in"] == s["docs_out"] + sum(s["dropped"].values()), s
  for prev, cur in zip(stats, stats[1:]):
    assert prev["docs_out"] == cur["docs_in"]
  by_name = {s["name"]: s for s in stats}
  assert by_name["url_dedup"]["dropped"] == {"duplicate_url": 5}
  assert by_name["minhash"]["dropped"]["near_duplicate"] >= 4
  assert by_name["exact"]["bytes_out"] < by_name["exact"]["bytes_in"]
  corpus = os.path.join(workdir, "corpus")
  assert sorted(os.listdir(corpus)) == ["de", "en", "fr"]
  kept = 0
  for lang in os.listdir(corpus):
    for shard in sorted(os.listdir(os.path.join(corpus, lang))):
      docs = read_shard(os.path.join(corpus, lang, shard))
      assert {d.metadata["language"] for d in docs} == {lang}
      kept += len(docs)
  assert kept == by_name["exact"]["docs_out"] > 30
  # The re-crawl (2025) won over the 2024 copies of the same URLs.
  en = [d for p in sorted(os.listdir(os.path.join(corpus, "en")))
        for d in read_shard(os.path.join(corpus, "en", p))]
  assert sum(d.metadata["source"] == "recrawl.warc.gz" for d in en) == 5
  assert not any("mirror.example.net" in d.url for d in en)
  mixture = json.load(open(os.path.join(workdir, "mixed", "mixture.json")))
  assert set(mixture) == {"en", "de"}


def test_sigkill_then_resume_is_byte_identical(warc_glob, clean_run, tmp_path):
  workdir = str(tmp_path / "killed")
  shards = os.path.join(workdir, "_work", "shards")
  proc = subprocess.Popen(_cli_args(warc_glob, workdir, workers=2), cwd=REPO,
                          start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  done = []
  while proc.poll() is None and len(done) < 2:
    time.sleep(0.02)
    done = [f for f in os.listdir(shards)] if os.path.isdir(shards) else []
    done = [f for f in done if f.endswith(".done")]
  os.killpg(proc.pid, signal.SIGKILL)  # The job and its workers, mid-run.
  proc.wait()
  done = sorted(f for f in os.listdir(shards) if f.endswith(".done"))
  total = N_SHARDS + 3
  assert 2 <= len(done) < total, "the run finished before it could be killed"
  assert not os.path.exists(os.path.join(workdir, "stats.json"))
  stamps = {f: os.stat(os.path.join(shards, f)).st_mtime_ns for f in done}
  subprocess.run(_cli_args(warc_glob, workdir, workers=2), cwd=REPO,
                 check=True, capture_output=True)
  # Finished shards were skipped, not redone.
  assert all(os.stat(os.path.join(shards, f)).st_mtime_ns == t
             for f, t in stamps.items())
  _assert_same_outputs(clean_run[0], workdir)


def test_beam_runner_matches_local_runner(warc_glob, clean_run, tmp_path):
  workdir = str(tmp_path / "beam")
  runners.run(_config(warc_glob, runner="beam"), workdir)
  _assert_same_outputs(clean_run[0], workdir)


@pytest.mark.parametrize("override, field", [
    ("--config.langid.threshold=1.5", "langid.threshold"),
    ("--config.qualty.enabled=False", "qualty"),
    ("--config.quality.filters=('gopher','c5')", "quality.filters"),
    ("--config.input=/nonexistent/*.warc.gz", "input"),
])
def test_cli_config_errors_name_the_field(override, field, tmp_path):
  args = [sys.executable, "-m", "launch.clean_corpus",
          "--config.input=tests/*.py", f"--workdir={tmp_path}", override]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2
  assert field in proc.stderr and "Traceback" not in proc.stderr
  assert not os.listdir(tmp_path)


def test_cli_help_lists_every_section():
  proc = subprocess.run([sys.executable, "-m", "launch.clean_corpus", "--help"],
                        cwd=REPO, capture_output=True, text=True)
  assert "Traceback" not in proc.stderr  # absl exits 1 after --help.
  for section in refinedweb.get_config():
    assert section in proc.stdout, section
