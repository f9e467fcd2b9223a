"""launch.generate and launch.evaluate end to end on a tiny byte-level
checkpoint (subprocesses, so flags and error paths are the real ones)."""

import json
import os
import subprocess
import sys

import pytest

from mllm_jax.convert import native
from mllm_jax.data.tokenizer import ByteTokenizer
from tests.helpers import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg, model = tiny_model(vocab_size=ByteTokenizer.vocab_size)
  path = tmp_path_factory.mktemp("cli") / "ckpt"
  native.save_model(str(path), cfg, model)
  return str(path)


def run(module, *args, stdin=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=env, input=stdin, capture_output=True, text=True,
                        check=False, timeout=300)


def test_generate_prompt_and_chat(checkpoint):
  out = run("launch.generate", f"--checkpoint={checkpoint}",
            "--tokenizer=bytes", "--prompt=Hello", "--max_new_tokens=8")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("Hello")
  chat = run("launch.generate", f"--checkpoint={checkpoint}",
             "--tokenizer=bytes", "--chat", "--max_new_tokens=6",
             stdin="hi\nand again\n\n")
  assert chat.returncode == 0, chat.stderr
  assert chat.stdout.count("\n") == 2
  bad = run("launch.generate", f"--checkpoint={checkpoint}",
            "--tokenizer=bytes", "--prompt=x", "--top_p=0")
  assert bad.returncode != 0 and "top_p" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_evaluate_writes_json_and_markdown(checkpoint, tmp_path):
  output = tmp_path / "res.json"
  out = run("launch.evaluate", f"--checkpoint={checkpoint}",
            "--tokenizer=bytes", "--tasks=arc_easy,winogrande,nq_open",
            "--num_fewshot=1", "--limit=2", f"--output={output}")
  assert out.returncode == 0, out.stderr
  results = json.loads(output.read_text())["results"]
  assert set(results) == {"arc_easy", "winogrande", "nq_open"}
  assert results["arc_easy"]["num_examples"] == 2
  assert "| arc_easy | acc |" in (tmp_path / "res.md").read_text()
  bad = run("launch.evaluate", f"--checkpoint={checkpoint}",
            "--tokenizer=bytes", "--tasks=nope", f"--output={output}")
  assert bad.returncode != 0 and "unknown task" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_mesh_flag_shards_the_model_and_changes_no_result(checkpoint, tmp_path):
  """--mesh over the 8 simulated CPU devices: same scores, same greedy text;
  a malformed mesh is a one-line error naming the flag."""
  tasks = ["--tasks=arc_easy,hellaswag", "--num_fewshot=0", "--limit=4"]
  results = []
  for mesh in ("", "data=2,fsdp=4"):
    output = tmp_path / f"res{len(results)}.json"
    out = run("launch.evaluate", f"--checkpoint={checkpoint}",
              "--tokenizer=bytes", *tasks, f"--output={output}",
              f"--mesh={mesh}")
    assert out.returncode == 0, out.stderr
    results.append(json.loads(output.read_text())["results"])
  for task, metrics in results[0].items():
    for name, value in metrics.items():
      assert results[1][task][name] == pytest.approx(value, abs=1e-6), name
  texts = [run("launch.generate", f"--checkpoint={checkpoint}",
               "--tokenizer=bytes", "--prompt=Hello", "--prompt=Hi there",
               "--max_new_tokens=8", f"--mesh={mesh}")
           for mesh in ("", "fsdp=8")]
  assert texts[0].returncode == 0 and texts[1].returncode == 0, texts[1].stderr
  assert texts[0].stdout == texts[1].stdout
  # tensor=2 cannot split the byte vocabulary (259 rows): named, not crashed.
  for bad in ("fsdp=3", "pipeline=2", "data=x", "tensor=2"):
    out = run("launch.evaluate", f"--checkpoint={checkpoint}",
              "--tokenizer=bytes", "--tasks=arc_easy", "--limit=1",
              f"--output={tmp_path / 'bad.json'}", f"--mesh={bad}")
    assert out.returncode != 0 and "mesh" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module, shared", [
    ("launch.evaluate", ["mesh"]), ("launch.generate", ["mesh"]),
    ("launch.train_tokenizer", ["text_field", "text_split", "chunk_chars"]),
    ("launch.tokenize_corpus", ["text_field", "text_split", "chunk_chars"]),
])
def test_help_lists_the_shared_flags(module, shared):
  """Flags defined in mllm_jax.runtime are shown by --help, not only by
  --helpfull."""
  out = run(module, "--help")
  for name in shared:
    assert f"--{name}:" in out.stdout, (module, name)
