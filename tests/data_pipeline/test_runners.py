"""Local and Beam runners and the clean_corpus CLI on WARCs of real pages.

The input is LibreOffice help pages (en, de, fr) in several WARC shards, plus
planted copies: a later re-crawl of some URLs (URL dedup), lightly edited
copies under new URLs (MinHash), and pywb's iana.org crawl.
"""

import filecmp
import glob
import io
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


def test_beam_runner_in_worker_processes_matches_local_runner(
    warc_glob, clean_run, tmp_path):
  """Two SDK worker processes, as on a cluster: DoFns are pickled, and the
  steps meet only through the workdir's files."""
  workdir = str(tmp_path / "beam_mp")
  options = ("--runner=FnApiRunner --direct_num_workers=2 "
             "--direct_running_mode=multi_processing")
  runners.run(_config(warc_glob, runner="beam", beam_options=options), workdir)
  _assert_same_outputs(clean_run[0], workdir)
  assert not os.listdir(os.path.join(workdir, "_work", "beam_shards"))


@pytest.mark.parametrize("override, field", [
    ("--config.langid.threshold=1.5", "langid.threshold"),
    ("--config.qualty.enabled=False", "qualty"),
    ("--config.quality.filters=('gopher','c5')", "quality.filters"),
    ("--config.input=/nonexistent/*.warc.gz", "input"),
    ("--config.input=gs://bucket/cc/*.warc.gz", "remote inputs need"),
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


@pytest.fixture(scope="module")
def mem_fs():
  """The MemFileSystem class, defined once (defining it registers it)."""
  pytest.importorskip("apache_beam")
  from apache_beam.io.filesystem import (CompressionTypes, FileMetadata,
                                         FileSystem)

  class MemFileSystem(FileSystem):
    """An in-memory ``mem://`` Beam FileSystem: object-store semantics (no
    directories, prefix listing) to run the remote-path code without a cloud.
    Beam finds it as a FileSystem subclass; FnApiRunner runs in this process."""

    files: dict[str, bytes] = {}

    class _Writer(io.BytesIO):
      def __init__(self, path):
        super().__init__()
        self.path = path

      def close(self):
        MemFileSystem.files[self.path] = self.getvalue()
        super().close()

    @classmethod
    def scheme(cls):
      return "mem"

    def join(self, base, *paths):
      return "/".join([base.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
      return tuple(path.rsplit("/", 1))

    def mkdirs(self, path):
      pass

    def has_dirs(self):
      return False

    def _list(self, prefix):
      for path, data in sorted(self.files.items()):
        if path.startswith(prefix):
          yield FileMetadata(path, len(data), 0.0)

    def create(self, path, mime_type=None, compression_type=None):
      assert compression_type == CompressionTypes.UNCOMPRESSED
      return self._Writer(path)

    def open(self, path, mime_type=None, compression_type=None):
      assert compression_type == CompressionTypes.UNCOMPRESSED
      return io.BytesIO(self.files[path])

    def copy(self, sources, destinations):
      raise NotImplementedError

    rename = copy

    def exists(self, path):
      return path in self.files

    def size(self, path):
      return len(self.files[path])

    def last_updated(self, path):
      return 0.0

    def checksum(self, path):
      return str(len(self.files[path]))

    def metadata(self, path):
      return FileMetadata(path, self.size(path), 0.0)

    def delete(self, paths):
      for path in paths:
        del self.files[path]

  return MemFileSystem


def test_fs_helpers_on_local_paths(warc_glob, mem_fs, tmp_path):
  from data_pipeline.runners import fs
  assert fs.match(warc_glob) == _config(warc_glob).input_files()
  first = fs.match(warc_glob)[0]
  with fs.open_local(first) as local:
    assert local == first  # Local paths are read in place, not copied.
  src, out = tmp_path / "raw.gz", str(tmp_path / "a" / "b.bin")
  src.write_bytes(b"\x1f\x8b raw")
  fs.upload(str(src), out)  # Copied as stored despite Beam's AUTO.
  assert open(out, "rb").read() == b"\x1f\x8b raw"
  assert not fs.is_remote(out) and not fs.is_remote("file:///x")
  assert fs.is_remote("gs://b/x") and fs.is_remote("mem://x")


def test_beam_runner_on_remote_urls_matches_local_runner(warc_glob, clean_run,
                                                         mem_fs, tmp_path):
  """Inputs and workdir as mem:// URLs; the downloaded outputs equal the
  local runner's byte for byte, and .warc.gz inputs are read as stored."""
  mem_fs.files.clear()
  for path in sorted(glob.glob(warc_glob)):
    with open(path, "rb") as f:
      mem_fs.files["mem://cc/in/" + os.path.basename(path)] = f.read()
  mem_fs.files["mem://out/corpus/xx/stale.jsonl"] = b"from a prior run"
  cfg = _config("mem://cc/in/*.warc.gz", runner="beam")
  funnel = runners.run(cfg, "mem://out")
  assert funnel.to_json() == clean_run[1].to_json()
  local = tmp_path / "downloaded"
  for url, data in mem_fs.files.items():
    if url.startswith("mem://out/"):
      target = local / url[len("mem://out/"):]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(data)
  assert not any(u.startswith("mem://out/_work") for u in mem_fs.files)
  _assert_same_outputs(clean_run[0], str(local))
  with pytest.raises(config_lib.ConfigError, match="input"):
    runners.run(_config("mem://cc/none/*.warc.gz", runner="beam"), "mem://o2")
