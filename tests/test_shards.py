"""Token shards: layout, round trip, bad records and the tokenize_corpus binary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mllm_jax import paths
from mllm_jax.data import readers, shards, tokenizer
from mllm_jax.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTCHAN = ("sentencepiece", "sentencepiece-0.2.3", "test", "botchan.txt")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "botchan"
  return load_tokenizer(tokenizer.train_sentencepiece(
      [paths.data_path(*BOTCHAN)], str(prefix), 800))


def botchan_docs():
  return list(readers.read_documents([paths.data_path(*BOTCHAN)],
                                     text_split="line"))


def test_shards_round_trip_documents(tok, tmp_path):
  docs = botchan_docs()
  summary = shards.write_shards(iter(docs), tok, str(tmp_path), "train",
                                shard_tokens=20_000)
  assert summary["documents"] == len(docs) > 4000
  assert len(summary["shards"]) > 2  # small shards: several files
  source = shards.open_shards(str(tmp_path / "train-*"))
  assert len(source) == len(docs)
  assert source.num_tokens == summary["tokens"]
  assert source.vocab_size == tok.vocab_size
  assert np.load(source.files[0], mmap_mode="r").dtype == np.uint16
  for i in (0, 1, len(docs) // 2, len(docs) - 1):
    ids = source[i]
    assert ids[-1] == tok.eos_id and (ids[:-1] != tok.eos_id).all()
    assert tok.decode(ids[:-1]) == docs[i]
    np.testing.assert_array_equal(source.read(i, 5, 9), ids[5:9])
  assert source.lengths.sum() == source.num_tokens


def test_bos_when_asked(tok, tmp_path):
  shards.write_shards(["one doc", "two"], tok, str(tmp_path), "b",
                      add_bos=True)
  source = shards.open_shards(str(tmp_path))
  for i in range(2):
    assert source[i][0] == tok.bos_id and source[i][-1] == tok.eos_id
  assert source.meta["bos_id"] == tok.bos_id


def test_bad_records_are_counted_not_fatal(tok, tmp_path):
  good = {"text": "A good record."}
  lines = [json.dumps(good), "{not json", json.dumps({"body": "x"}),
           json.dumps({"text": 12}), json.dumps({"text": None}),
           json.dumps(["a", "list"]), json.dumps({"text": "   "}),
           json.dumps(good), "", b"\xff\xfe".decode("latin-1")]
  (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "b.txt").write_bytes(b"caf\xe9 not utf-8")
  (tmp_path / "c.txt").write_text("Plain text document.")
  (tmp_path / "d.parquet").write_bytes(b"PAR1 corrupted")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["from parquet", None]}),
                 tmp_path / "e.parquet")
  pq.write_table(pa.table({"body": ["wrong column"]}), tmp_path / "f.parquet")
  files = readers.expand(str(tmp_path / "*"))
  summary = shards.write_shards(readers.read_documents(files), tok,
                                str(tmp_path / "out"), "mixed", inputs=files)
  assert summary["documents"] == 4  # 2 jsonl + c.txt + 1 parquet row
  assert summary["dropped"] == {
      "empty": 1, "invalid_json": 2, "invalid_utf8": 1, "missing_field": 4,
      "not_an_object": 1, "not_text": 1, "unreadable_file": 1}
  assert summary["dropped_examples"]["invalid_json"][0].endswith("a.jsonl:2")
  on_disk = json.loads((tmp_path / "out" / "mixed.summary.json").read_text())
  assert on_disk["dropped"] == summary["dropped"]
  assert on_disk["tokens"] == shards.open_shards(
      str(tmp_path / "out")).num_tokens


def test_broken_shards_fail_clearly(tok, tmp_path):
  shards.write_shards(["x y z", "w"], tok, str(tmp_path), "s")
  with pytest.raises(FileNotFoundError, match="no token shard matches"):
    shards.open_shards(str(tmp_path / "nope-*"))
  np.save(tmp_path / "s-00000.offsets.npy", np.array([0, 2, 99]))
  with pytest.raises(ValueError, match="offsets index does not match"):
    shards.open_shards(str(tmp_path))
  os.remove(tmp_path / "s-00000.offsets.npy")
  with pytest.raises(FileNotFoundError, match="offsets.npy is missing"):
    shards.open_shards(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no input file matches"):
    readers.expand(str(tmp_path / "*.jsonl"))


def test_tokenize_corpus_binary(tok, tmp_path):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text('{"text": "Hello there."}\n{oops\n{"text": "Bye."}\n')
  cmd = [sys.executable, "-m", "launch.tokenize_corpus",
         f"--input={corpus}", f"--tokenizer={tok.path}",
         f"--output_dir={tmp_path / 'out'}", "--name=web", "--add_bos"]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["documents"] == 2 and result["dropped"] == {"invalid_json": 1}
  source = shards.open_shards(str(tmp_path / "out" / "web-*"))
  assert tok.decode(source[0][1:-1]) == "Hello there."
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         check=False)
  assert again.returncode != 0 and "--overwrite" in again.stderr
  missing = subprocess.run(cmd[:4] + ["--tokenizer=/no/such.model"] + cmd[5:] +
                           ["--overwrite"],
                           cwd=REPO, capture_output=True, text=True,
                           check=False)
  assert missing.returncode != 0 and "/no/such.model" in missing.stderr
