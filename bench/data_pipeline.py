"""data_pipeline against its peers, same input, same run; ratios printed last.

  python bench/data_pipeline.py [--en-step 4] [--sa-mb 100]
      [--only chain|minhash|exact] [--chain-langs en,zh,ja]

1. Per-document chain on one WARC of real pages (LibreOffice help en + Python
   docs; then one WARC each of the zh and ja help pages, every en-step-th),
   one process: read -> URL filter -> extract -> repetition -> quality
   (ours: + RefinedWeb line corrections) vs datatrove's LocalPipelineExecutor(
   [WarcReader, URLFilter(), Trafilatura(favour_precision=True, timeout=1),
   GopherRepetitionFilter(), GopherQualityFilter()], tasks=1, workers=1).
   Language ID is left out of both sides (datatrove's would download its
   model); ours with lid.176 is printed for reference. Docs/s/core is
   documents over CPU seconds of the process and its children (datatrove
   runs its extractor in a child process; the machine is shared, so wall time
   is noisier; it is printed too). On zh/ja our ratio row uses the chain
   with lid.176, since the per-language thresholds follow its tag (more
   work on our side); datatrove's filters count English words there. Each
   run first prints the CPU the per-page bounds (size and depth checks) take
   against resiliparse's extraction of the same pages.
2. MinHash signatures + LSH (FineWeb 112 = 14 x 8, word 5-grams) on Python
   docs sources plus an edited copy of each, vs datasketch and rensa.
3. Exact substring dedup (suffix array + LCP + spans) MB/s on >= 100 MB of
   real text; the deduplicate-text-datasets README gives ~2 h single-threaded
   for the suffix array of LM1B train (~4 GB of text, our estimate of its
   size), i.e. ~0.6 MB/s.

Peers live in their own venv (bench/.venv-peers, made on first use), never in
the project's dependencies; their side runs there in a subprocess.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.host import host_line, load_line  # noqa: E402

from data_pipeline import corpus, extract  # noqa: E402
from data_pipeline.exact_dedup import duplicate_spans  # noqa: E402
from data_pipeline.minhash import MinHashParams, minhash_duplicates  # noqa: E402
from data_pipeline.pipeline import build_stages  # noqa: E402
from data_pipeline.samples import libreoffice_pages  # noqa: E402
from data_pipeline.warc_write import write_pages  # noqa: E402
from mllm_jax.paths import data_path  # noqa: E402

VENV = os.path.join(REPO, "bench", ".venv-peers")
PEERS = ["datatrove[processing]==0.10.1", "warcio", "faust-cchardet",
         "python-magic", "lxml_html_clean", "spacy", "datasketch==2.0.0",
         "rensa==0.5.0"]
MINHASH = MinHashParams(bands=14, rows=8, ngram=5)

# Runs in the peers' venv: argv[1] is the task, the answer is one JSON line.
PEER_CODE = r'''
import json, os, re, sys, time
task, arg = sys.argv[1], sys.argv[2]
if task == "chain":
  import shutil, tempfile
  from datatrove.executor import LocalPipelineExecutor
  from datatrove.pipeline.readers import WarcReader
  from datatrove.pipeline.extractors import Trafilatura
  from datatrove.pipeline.filters import (GopherQualityFilter,
      GopherRepetitionFilter, URLFilter)
  logs = tempfile.mkdtemp()
  kept = []
  def count(data, rank=0, world_size=1):
    for doc in data:
      kept.append(doc.id)
      yield doc
  ex = LocalPipelineExecutor(pipeline=[
      WarcReader(arg, glob_pattern="*.warc.gz"), URLFilter(),
      Trafilatura(favour_precision=True, timeout=1), GopherRepetitionFilter(),
      GopherQualityFilter(), count], tasks=1, workers=1, logging_dir=logs)
  cpu = lambda: sum(os.times()[:4])  # Its extractor runs in a child process.
  c0, w0 = cpu(), time.perf_counter()
  ex.run()
  print(json.dumps({"cpu": cpu() - c0,
                    "wall": time.perf_counter() - w0, "kept": len(kept)}))
  shutil.rmtree(logs)
elif task == "minhash":
  texts = [json.loads(l) for l in open(arg, encoding="utf-8")]
  def shingles(text):
    words = " ".join(re.sub(r"[\W_]+", " ", text.lower()).split()).split()
    return {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
  out = {}
  from datasketch import MinHash, MinHashLSH
  c0 = time.process_time()
  lsh, sigs = MinHashLSH(num_perm=112, params=(14, 8)), []
  for i, t in enumerate(texts):
    m = MinHash(num_perm=112, seed=1)
    m.update_batch([s.encode("utf-8") for s in shingles(t)])
    lsh.insert(i, m)
    sigs.append(m)
  dup = sum(any(j < i for j in lsh.query(m)) for i, m in enumerate(sigs))
  out["datasketch"] = {"cpu": time.process_time() - c0, "dups": dup}
  from rensa import RMinHash, RMinHashLSH
  c0 = time.process_time()
  lsh, sigs = RMinHashLSH(threshold=0.5, num_perm=112, num_bands=14), []
  for i, t in enumerate(texts):
    m = RMinHash(num_perm=112, seed=1)
    m.update(list(shingles(t)))
    lsh.insert(i, m)
    sigs.append(m)
  dup = sum(any(j < i for j in lsh.query(m)) for i, m in enumerate(sigs))
  out["rensa"] = {"cpu": time.process_time() - c0, "dups": dup}
  print(json.dumps(out))
'''


def cpu_seconds() -> float:
  """This process's and its finished children's CPU time (user + system)."""
  return sum(os.times()[:4])


def peer_python() -> str:
  py = os.path.join(VENV, "bin", "python")
  if not os.path.exists(py):
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *PEERS], check=True)
  return py


def run_peer(task: str, arg: str) -> dict:
  out = subprocess.run([peer_python(), "-c", PEER_CODE, task, arg], check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def py_docs() -> str:
  return data_path("python3.11-doc", "usr", "share", "doc", "python3.11", "html")


def chain_pages(en_step: int, lang: str = "en") -> list[tuple[str, bytes]]:
  """(url, html) of every en_step-th help page of ``lang`` (plus the Python
  docs for en)."""
  pages = [(f"https://help.libreoffice.org/{lang}/{p.split('/text/')[1]}",
            open(p, "rb").read()) for p in libreoffice_pages(lang)[::en_step]]
  root = py_docs()
  if lang == "en":
    pages += [(f"https://docs.python.org/3.11/{os.path.relpath(p, root)}",
               open(p, "rb").read())
              for p in sorted(glob.glob(os.path.join(root, "**", "*.html"),
                                        recursive=True))]
  return pages


def build_warc(folder: str, pages: list[tuple[str, bytes]]
               ) -> tuple[str, int]:
  path = os.path.join(folder, "pages.warc.gz")
  return path, write_pages(path, pages)


def bench_bounds(pages: list[tuple[str, bytes]]) -> dict:
  """CPU of the per-page bounds (size and depth checks) against resiliparse's
  extraction of the same pages: what the bounds add to the extract stage on
  normal pages (none of them trips a bound)."""
  htmls = [html.decode("utf-8", "replace") for _, html in pages]
  limit = extract.Extractor().max_html_bytes
  c0 = time.process_time()
  for _ in range(5):
    tripped = sum(extract.utf8_size_over(h, limit) or extract.too_deep(h, 512)
                  for h in htmls)
  checks = (time.process_time() - c0) / 5
  c0 = time.process_time()
  for h in htmls:
    extract.resiliparse_text(h)
  return {"checks": checks, "extract": time.process_time() - c0,
          "tripped": tripped}


def bench_chain(path: str, n: int, backend: str, langid: bool) -> dict:
  from configs.data import refinedweb
  from data_pipeline import config
  cfg = refinedweb.get_config()
  cfg.langid.enabled = langid
  cfg.langid.keep = ()
  cfg.extract.backend = backend
  stages = build_stages(config.load(cfg))
  c0, w0 = cpu_seconds(), time.perf_counter()
  docs, _ = corpus.run_shard(path, stages)
  cpu, wall = cpu_seconds() - c0, time.perf_counter() - w0
  return {"cpu": cpu, "wall": wall, "kept": len(docs), "dps": n / cpu}


def minhash_texts() -> list[str]:
  srcs = sorted(glob.glob(os.path.join(py_docs(), "_sources", "**", "*.rst.txt"),
                          recursive=True))
  texts = [open(p, encoding="utf-8").read() for p in srcs]
  edited = [t.replace(" the ", " a ", 5) + "\nEdited copy." for t in texts]
  return texts + edited


def bench_minhash(texts: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    c0 = time.process_time()
    roots = minhash_duplicates(texts, MINHASH, tmp)
    cpu = time.process_time() - c0
  return {"cpu": cpu, "dups": int((roots != range(len(roots))).sum())}


def sa_texts(min_mb: int) -> list[str]:
  files = []
  for lang in ("en", "de", "fr", "ja", "es"):
    files += libreoffice_pages(lang)
  files += sorted(glob.glob(os.path.join(py_docs(), "**", "*.html"),
                            recursive=True))
  texts, size = [], 0
  for f in files:
    if size >= min_mb * 1e6:
      break
    texts.append(open(f, encoding="utf-8", errors="replace").read())
    size += len(texts[-1].encode("utf-8"))
  return texts


def main() -> None:
  print(host_line(), flush=True)
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--en-step", type=int, default=4,
                  help="Every k-th LibreOffice en page goes in the WARC.")
  ap.add_argument("--sa-mb", type=int, default=100,
                  help="Megabytes of text for the suffix-array bench.")
  ap.add_argument("--only", choices=("chain", "minhash", "exact"),
                  help="Run one part (all three by default).")
  ap.add_argument("--chain-langs", default="en,zh,ja",
                  help="Help-page languages of the chain runs (en adds the "
                  "Python docs).")
  args = ap.parse_args()
  peer_python()
  ratios = []
  if args.only in (None, "chain"):
    for lang in args.chain_langs.split(","):
      ratios += run_chain(args.en_step, lang)
  if args.only in (None, "minhash"):
    ratios += run_minhash()
  if args.only in (None, "exact"):
    ratios += run_exact(args.sa_mb)
  print("\nratios (> 1: ours faster)")
  for name, r in ratios:
    print(f"  {name}: {r:.2f}x")


def run_chain(en_step: int, lang: str = "en") -> list:
  ratios = []
  with tempfile.TemporaryDirectory() as tmp:
    pages = chain_pages(en_step, lang)
    path, n = build_warc(tmp, pages)
    mb = os.path.getsize(path) / 1e6
    print(f"[chain {lang}] {n} real pages in one WARC ({mb:.1f} MB gz), "
          "1 process")
    b = bench_bounds(pages)
    print(f"  bounds checks {1e3 * b['checks']:.1f} ms cpu = "
          f"{100 * b['checks'] / b['extract']:.2f}% of resiliparse extraction "
          f"({b['extract']:.2f} s); pages past a bound: {b['tripped']}")
    rows = [("ours resiliparse", bench_chain(path, n, "resiliparse", False))]
    if lang == "en":
      rows.append(("ours trafilatura",
                   bench_chain(path, n, "trafilatura", False)))
    rows.append(("ours resiliparse + lid.176",
                 bench_chain(path, n, "resiliparse", True)))
    peer = run_peer("chain", tmp)
    peer["dps"] = n / peer["cpu"]
    rows.append(("datatrove trafilatura", peer))
    for name, r in rows:
      print(f"  {name:28s} {r['dps']:8.1f} docs/s/core  (cpu {r['cpu']:.1f} s, "
            f"wall {r['wall']:.1f} s, kept {r['kept']})")
    ours = dict(rows)
    if lang == "en":
      ratios += [("chain docs/s/core, ours (resiliparse) / datatrove",
                  ours["ours resiliparse"]["dps"] / peer["dps"]),
                 ("chain docs/s/core, ours (trafilatura) / datatrove",
                  ours["ours trafilatura"]["dps"] / peer["dps"])]
    else:
      ratios.append((f"chain {lang} docs/s/core, ours (resiliparse + "
                     "lid.176) / datatrove",
                     ours["ours resiliparse + lid.176"]["dps"] / peer["dps"]))
  return ratios


def run_minhash() -> list:
  texts = minhash_texts()
  with tempfile.TemporaryDirectory() as tmp:
    text_file = os.path.join(tmp, "texts.jsonl")
    with open(text_file, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(t) + "\n" for t in texts)
    ours = bench_minhash(texts)
    peers = run_peer("minhash", text_file)
  mb = sum(len(t.encode()) for t in texts) / 1e6
  print(f"[minhash] {len(texts)} docs ({mb:.1f} MB), 112 hashes = 14 x 8, "
        "word 5-grams, signatures + LSH + duplicates")
  for name, r in (("ours", ours), ("datasketch", peers["datasketch"]),
                  ("rensa", peers["rensa"])):
    print(f"  {name:12s} {len(texts) / r['cpu']:8.1f} docs/s/core  "
          f"(cpu {r['cpu']:.2f} s, {r['dups']} duplicates found)")
  return [("minhash speed, ours / datasketch (goal >= 10)",
           peers["datasketch"]["cpu"] / ours["cpu"]),
          ("minhash speed, ours / rensa (goal >= 1)",
           peers["rensa"]["cpu"] / ours["cpu"])]


def run_exact(sa_mb: int) -> list:
  texts = sa_texts(sa_mb)
  mb = sum(len(t.encode()) for t in texts) / 1e6
  c0, w0 = time.process_time(), time.perf_counter()
  spans = duplicate_spans(texts, 100)
  cpu, wall = time.process_time() - c0, time.perf_counter() - w0
  removed = sum(h - l for s in spans for l, h in s) / 1e6
  print(f"[exact] {len(texts)} real pages, {mb:.1f} MB: {mb / cpu:.2f} MB/s/core "
        f"(cpu {cpu:.1f} s, wall {wall:.1f} s), {removed:.1f} MB in repeated "
        "spans >= 100 bytes")
  lm1b = 4000 / 7200  # MB/s: ~4 GB in ~2 h, suffix array only.
  return [("suffix-array dedup MB/s, ours / deduplicate-text-datasets "
           "README (LM1B)", mb / cpu / lm1b)]


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
