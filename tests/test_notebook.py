"""notebooks/quickstart.ipynb executes headless (nbclient) on the fast path
(a handful of pretraining steps) and shows what it promises: a crawl cleaned
with its funnel plot, a tokenizer and shards, a loss that fell, a loss-curve
plot and a sample. Offline: the data comes from scripts/fetch_data.py's
cache, and the install cell finds the project already installed. Outside a
checkout the install cell takes the repository from REPO_URL or
MLLM_JAX_REPO, or stops with a message that names them."""

from __future__ import annotations

import base64
import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
STEPS = 16


def _texts(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream")


def _pngs(cell) -> list[bytes]:
  return [base64.b64decode(o["data"]["image/png"])
          for o in cell.get("outputs", [])
          if "image/png" in o.get("data", {})]


def test_quickstart_notebook(tmp_path, monkeypatch):
  # What the kernel (and the binaries it starts) inherit: the fast path, a
  # fresh workdir, CPU JAX with one device as on a Colab CPU runtime.
  monkeypatch.setenv("MLLM_QUICKSTART_STEPS", str(STEPS))
  monkeypatch.setenv("MLLM_QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("MLLM_JAX_DISTRIBUTED", raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") for c in notebook.cells
             if c.cell_type == "code"), "commit the notebook without outputs"
  # Runs from its own folder, as Jupyter and Colab do; a failing cell raises.
  NotebookClient(notebook, timeout=180, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}
                 ).execute()
  code = [c for c in notebook.cells if c.cell_type == "code"]
  printed = "\n".join(_texts(c) for c in code)
  assert "git clone" not in printed and "pip install" not in printed

  # The crawl was cleaned, stage by stage, and its funnel plotted.
  clean = next(c for c in code if "clean_corpus" in c.source)
  assert "$ python -m launch.clean_corpus" in _texts(clean)
  assert "langid" in _texts(clean) and "minhash" in _texts(clean)
  assert _pngs(clean) and _pngs(clean)[0].startswith(b"\x89PNG")
  stats = json.load(open(tmp_path / "run" / "clean" / "stats.json"))
  assert stats["stages"][-1]["docs_out"] > 0

  # Tokens of all three shard sets.
  tokens = next(c for c in code if "tokenize_corpus" in c.source)
  for name in ("plays", "held_out", "web"):
    assert f"{name}:" in _texts(tokens)

  # The loss fell over the short run, and the curve was drawn.
  plot = next(c for c in code if "QUICKSTART_RESULT" in c.source)
  line = next(l for l in _texts(plot).splitlines()
              if l.startswith("QUICKSTART_RESULT"))
  result = json.loads(line.split(" ", 1)[1])
  assert result["steps"] == STEPS and result["backend"] == "cpu"
  assert result["last_loss"] < result["first_loss"] - 0.2, result
  assert result["eval_loss"] < 7.0  # below ln(1024) = 6.93 plus noise
  png = _pngs(plot)
  assert len(png) == 1 and png[0].startswith(b"\x89PNG") and len(png[0]) > 5000

  # The sampler ran on the trained checkpoint.
  sample = next(c for c in code if "launch.generate" in _texts(c))
  assert "ROMEO." in _texts(sample)


def _install_cells():
  """The settings cell and the install cell, as one script."""
  code = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells
          if c.cell_type == "code"]
  install = next(i for i, s in enumerate(code) if "find_repo" in s)
  assert install >= 1 and "REPO_URL" in code[install - 1]
  return code[install - 1] + "\n" + code[install]


def test_install_cell_outside_a_checkout(tmp_path, monkeypatch):
  """Outside a checkout (Colab) the install cell clones what REPO_URL or
  MLLM_JAX_REPO names; with neither it stops with a message naming both,
  never a made-up URL. A folder holding a checkout is used as it is; a bad
  URL or folder stops with a message that names it."""
  script = _install_cells()
  assert "YOUR_ORG" not in script and "github.com" not in script
  monkeypatch.chdir(tmp_path)  # no checkout here or above
  monkeypatch.delenv("MLLM_JAX_REPO", raising=False)
  with pytest.raises(RuntimeError, match="MLLM_JAX_REPO") as error:
    exec(script, {})  # pylint: disable=exec-used
  assert "REPO_URL" in str(error.value)
  assert not os.listdir(tmp_path)  # nothing cloned, nothing installed

  monkeypatch.setenv("MLLM_JAX_REPO", str(tmp_path))
  with pytest.raises(RuntimeError, match="not an mllm_jax checkout"):
    exec(script, {})  # pylint: disable=exec-used

  monkeypatch.setenv("MLLM_JAX_REPO", f"file://{tmp_path}/missing.git")
  with pytest.raises(RuntimeError, match="git clone .* failed"):
    exec(script, {})  # pylint: disable=exec-used

  monkeypatch.setattr(sys, "path", list(sys.path))  # the cell prepends REPO
  monkeypatch.setenv("MLLM_JAX_REPO", REPO)
  scope = {}
  exec(script, scope)  # pylint: disable=exec-used
  assert scope["REPO"] == REPO and sys.path[0] == REPO

  # A URL is cloned beside the notebook (this checkout's last commit here).
  monkeypatch.setenv("MLLM_JAX_REPO", f"file://{REPO}")
  scope = {}
  exec(script, scope)  # pylint: disable=exec-used
  assert scope["REPO"] == str(tmp_path / "mllm_jax")
  assert os.path.isfile(tmp_path / "mllm_jax" / "launch" / "pretrain.py")
