"""Self-instruct and Evol-Instruct data generation (mllm_jax.data.instructions
and launch.generate_instructions).

The OpenAI-compatible teacher talks to a scripted chat-completions server on
127.0.0.1 (http.server in a thread) whose replies are a pure function of the
request (messages and seed), so runs are deterministic; modes make it
answer HTTP 500, malformed JSON, or hang past the client's timeout. The
native teacher runs a tiny random byte-level model through the sampler.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mllm_jax.data import instructions as ins
from mllm_jax.data.chat import ChatStats, read_conversations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "ve", "zo", "pi", "su",
             "dra", "fen", "gol", "hum", "jex", "quo", "bri", "cal", "dov",
             "wex"]


def pseudo_words(key: str, n: int) -> list[str]:
  """n made-up words drawn by hashing `key`: novel text with near-zero
  ROUGE-L overlap between different keys."""
  out = []
  for i in range(n):
    h = hashlib.sha256(f"{key}/{i}".encode()).digest()
    out.append("".join(SYLLABLES[b % len(SYLLABLES)] for b in h[:3]))
  return out


def scripted_reply(messages: list[dict], seed: int) -> str:
  """What the scripted teacher answers, from the prompt's shape."""
  text = messages[-1]["content"]
  key = f"{text}|{seed}"
  proposal = re.search(r"Write (\d+) new tasks", text)
  if proposal:
    n = int(proposal.group(1))
    return "\n".join(f"{i}. Describe {' '.join(pseudo_words(f'{key}#{i}', 7))}"
                     for i in range(1, n + 1))
  if text.startswith("Task: "):
    return "Input: none\nOutput: " + " ".join(pseudo_words(key, 12))
  evolve = re.search(r"#Instruction#\n(.*)\n\n#(Rewritten|New) Instruction#",
                     text, re.S)
  if evolve:
    return evolve.group(1) + " Also " + " ".join(pseudo_words(key, 4)) + "."
  return "Here is a careful answer: " + " ".join(pseudo_words(key, 20))


class Server:
  """A chat-completions server: `reply(body) -> text` (default
  scripted_reply); `mode(body, attempt) -> None | "500" | "malformed" |
  "hang"` picks a failure; `delay` seconds before each answer."""

  def __init__(self):
    self.reply = lambda body: scripted_reply(body["messages"],
                                             body.get("seed", 0))
    self.mode = lambda body, attempt: None
    self.delay = 0.0
    self.attempts: dict[str, int] = {}
    self.headers: list[dict] = []
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = json.dumps(body, sort_keys=True)
        with server.lock:
          attempt = server.attempts.get(key, 0)
          server.attempts[key] = attempt + 1
          server.headers.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
          return self._send(404, b"{}")
        mode = server.mode(body, attempt)
        time.sleep(server.delay)
        if mode == "hang":
          time.sleep(2.0)
          return self._send(200, b"{}")
        if mode == "500":
          return self._send(500, b'{"error": "boom"}')
        if mode == "malformed":
          return self._send(200, b'{"choices": [{"message": ')
        payload = {"choices": [{"message": {
            "role": "assistant", "content": server.reply(body)}}]}
        self._send(200, json.dumps(payload).encode())

      def _send(self, code, data):
        try:
          self.send_response(code)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                     daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
              "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  s = Server()
  yield s
  s.close()


def teacher(server, **kw):
  kw = {"timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.01,
        "concurrency": 4, **kw}
  return ins.OpenAITeacher(server.url, "scripted", **kw)


def small(**kw) -> ins.GenerateConfig:
  return ins.GenerateConfig(**{"batch_size": 2, "new_per_prompt": 3,
                               "num_prompt_instructions": 4,
                               "max_new_tokens": 64, "outage_wait_s": 0.0,
                               **kw})


def lines(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


def test_heuristic_filters():
  problem = ins.instruction_problem
  assert problem("Explain why leaves change colour in autumn.") is None
  assert problem("Say hi now") == "too_short"
  assert problem(" ".join(["word"] * 151)) == "too_long"
  assert problem("Describe the image of a cat on the sofa.") == (
      "unsuitable_keyword")
  assert problem("Plot the sales figures for the last year.") == (
      "unsuitable_keyword")
  assert problem("Write a program that prints the primes.") == (
      "starts_with_write_a_program")
  assert problem("- Tell me a joke about penguins please.") == (
      "starts_with_punctuation")
  assert problem("Écris un poème sur la mer et le vent.") == "non_ascii"
  assert problem("日本の首都はどこですか 教えて ください ね") == "non_ascii"
  assert ins.parse_proposals("Sure!\n1. First task here\n2) **Second one**"
                             "\nTask 3: \"Third\"\nnot numbered") == [
                                 "First task here", "Second one", "Third"]
  assert ins.parse_instance("Input: none\nOutput: 42") == ("", "42")
  assert ins.parse_instance("**Input:** a b\n**Output:** c\nd") == (
      "a b", "c\nd")
  assert ins.parse_instance("just an answer") is None
  assert ins.parse_instance("Input: <the input, or none>\nOutput: <the "
                            "response>") == ("", "")
  assert ins.parse_instance("Input: none\nOutput: x\nOutput: x") is None
  assert ins.parse_proposals("(1) Name a bird that cannot fly.\n"
                             "2. (2) Name a fish.\n3. 3. Add 1.5 and 2.") == [
                                 "Name a bird that cannot fly.", "Name a fish.",
                                 "Add 1.5 and 2."]


def test_rouge_novelty_drops_near_duplicate_keeps_novel():
  from rouge_score import rouge_scorer
  index = ins.NoveltyIndex(0.7)
  for task in ins.default_seed_tasks():
    index.add(task.instruction)
  near = "Give three practical tips for falling asleep quickly."
  score, other = index.most_similar(near)
  assert other == "Give three practical tips for falling asleep faster."
  assert score == pytest.approx(7 / 8)
  novel = "Compose a limerick about a forgetful lighthouse keeper."
  assert index.most_similar(novel)[0] < 0.7
  # The overlap bound never hides a pair that reaches the threshold.
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  for text in (near, novel, "Summarize the paragraph in two sentences."):
    exact = max(scorer.score(t, text)["rougeL"].fmeasure
                for t in index.texts)
    got = index.most_similar(text)[0]
    assert got == pytest.approx(exact) if exact >= 0.7 else got < 0.7


def test_self_instruct_filters_count_each_reason(server, tmp_path):
  proposals = [
      "Give three practical tips for falling asleep quickly.",  # ~ seed
      "Compose a limerick about a forgetful lighthouse keeper.",  # novel
      "Compose a limerick about a forgetful lighthouse keeper today.",  # ~ 2
      "Summarize the paragraph in one sentence.",  # exact seed
      "Draw a picture of a cat sitting on a mat.",
      "?What would happen if the moon vanished tonight",
      "Hi there friend",
      "Écris un poème sur la mer et le vent.",
      "Write a program that sorts a list of names.",
  ]

  def reply(body):
    text = body["messages"][-1]["content"]
    if "new tasks" in text:
      return "Here you go:\n" + "\n".join(
          f"{i}. {p}" for i, p in enumerate(proposals, 1))
    return "Input: none\nOutput: There once was a keeper of light..."

  server.reply = reply
  out = tmp_path / "si.jsonl"
  stats = ins.generate("self_instruct", teacher(server), str(out),
                       small(batch_size=1, num_instructions=1))
  records = lines(out)
  assert [r["messages"][0]["content"] for r in records] == [proposals[1]]
  assert records[0]["messages"][1]["content"].startswith("There once")
  assert stats["dropped"] == {
      "rouge_similar": 2, "duplicate": 1, "unsuitable_keyword": 1,
      "starts_with_punctuation": 1, "too_short": 1, "non_ascii": 1,
      "starts_with_write_a_program": 1}
  assert stats["notes"]["proposed_instructions"] == len(proposals)
  assert json.loads((tmp_path / "si.stats.json").read_text()) == stats


# --------------------------------------------------------------------------
# Teacher failures
# --------------------------------------------------------------------------


def test_http_errors_malformed_json_and_hangs_are_counted(server, tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv("TEACHER_KEY", "sk-secret-123")

  hangs, lock = set(), threading.Lock()

  def mode(body, attempt):
    text = body["messages"][-1]["content"]
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 6
    with lock:
      if text.startswith("Task: ") and (not hangs or text in hangs):
        hangs.add(text)
        return "hang"  # the first instance request, every attempt
    if text.startswith("Task: ") and h == 1:
      return "malformed"  # every attempt: a counted failure
    if h == 2 and attempt == 0:
      return "500"  # once: the retry succeeds
    return None

  server.mode = mode
  out = tmp_path / "fail.jsonl"
  progress = []
  t = teacher(server, timeout_s=0.4, api_key_env="TEACHER_KEY")
  stats = ins.generate("self_instruct", t, str(out), small(
      num_instructions=8), progress=progress.append)
  requests = stats["teacher_requests"]
  assert requests["failed_timeout"] == 1 and requests["retried_timeout"] == 1
  assert requests["failed_malformed_response"] >= 1
  assert requests["retried_http_500"] >= 1
  assert requests["requests"] == requests["completed"] + sum(
      v for k, v in requests.items() if k.startswith("failed_"))
  dropped = stats["dropped"]
  assert dropped["instance_failed"] == (
      requests["failed_timeout"] + requests["failed_malformed_response"])
  # Nothing lost: every kept record is a valid conversation, ids in order.
  records = lines(out)
  assert len(records) == stats["records"] == 8 and stats["complete"]
  read_stats = ChatStats()
  assert len(list(read_conversations(str(out), "native", read_stats))) == 8
  assert not read_stats.counts
  assert [r["id"] for r in records] == [
      f"self_instruct-0-{i:06d}" for i in range(8)]
  # The key went to the server and nowhere else.
  assert all(h.get("Authorization") == "Bearer sk-secret-123"
             for h in server.headers)
  written = out.read_text() + (tmp_path / "fail.stats.json").read_text()
  assert "sk-secret" not in written + "".join(progress) + repr(t)


def test_dead_teacher_stops_cleanly_and_resumes(server, tmp_path):
  out = tmp_path / "dead.jsonl"
  cfg = small(num_instructions=10, max_outage_rounds=2)
  ins.generate("self_instruct", teacher(server), str(out), cfg, max_rounds=1)
  kept = out.read_text()
  assert kept
  server.mode = lambda body, attempt: "500"
  with pytest.raises(ins.TeacherUnavailable, match="rerun"):
    ins.generate("self_instruct", teacher(server), str(out), cfg)
  assert out.read_text() == kept  # nothing lost, nothing half-written
  stats = json.loads((tmp_path / "dead.stats.json").read_text())
  assert stats["rounds_done"] == 1 and stats["teacher_requests"][
      "failed_http_500"] == 2 * cfg.batch_size
  server.mode = lambda body, attempt: None
  ins.generate("self_instruct", teacher(server), str(out), cfg)
  reference = tmp_path / "ref.jsonl"
  ins.generate("self_instruct", teacher(server), str(reference), cfg)
  assert out.read_text() == reference.read_text()


# --------------------------------------------------------------------------
# Evol-Instruct
# --------------------------------------------------------------------------


class FakeTeacher(ins.Teacher):
  """complete() -> fn(conversations, call index)."""

  def __init__(self, fn):
    super().__init__()
    self.fn, self.calls = fn, 0

  def complete(self, conversations, max_new_tokens, temperature, seed):
    out = self.fn(conversations, self.calls)
    self.calls += 1
    self.count("requests", len(conversations))
    return out

  def describe(self):
    return "fake"


def test_evol_instruct_eliminates_failed_evolutions(tmp_path):
  seeds = [ins.SeedTask(f"Explain topic {name} to a curious student.")
           for name in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")]

  def parent_of(conv):
    return re.search(r"#Instruction#\n(.*)\n\n#", conv[-1]["content"],
                     re.S).group(1)

  def fn(conversations, call):
    generation, respond = divmod(call, 2)
    if not respond:
      out = []
      for conv in conversations:
        parent = parent_of(conv)
        if generation == 0 and "alpha" in parent:
          out.append("#Rewritten Instruction# " + parent + " In depth.")
        elif generation == 0 and "beta" in parent:
          out.append(parent)  # nothing new
        elif generation == 0 and "zeta" in parent:
          out.append(None)  # the request failed
        else:
          out.append(parent + f" Compare it with kernel{generation} and "
                     f"lattice{generation} theory.")
      return out
    answers = []
    for conv in conversations:
      text = conv[-1]["content"]
      if generation == 0 and "gamma" in text:
        answers.append("Sorry, I cannot help with that.")
      elif generation == 0 and "delta" in text:
        answers.append("It is, and it was, for them.")
      else:
        answers.append("A long and careful answer about " + text)
    return answers

  out = tmp_path / "evol.jsonl"
  stats = ins.generate("evol_instruct", FakeTeacher(fn), str(out),
                       small(batch_size=6, generations=2,
                             num_instructions=100, max_idle_rounds=1),
                       seed_tasks=seeds, max_rounds=1)
  assert stats["dropped"] == {
      "copied_prompt_words": 1, "no_information_gain": 1,
      "evolve_failed": 1, "response_sorry": 1, "response_empty": 1}
  assert stats["notes"]["evolutions_attempted"] == 12
  records = lines(out)
  assert len(records) == stats["records"] == 7  # epsilon twice, all at gen 2
  by_gen = [(r["meta"]["generation"], r["meta"]["parent"]) for r in records]
  assert sum(g == 1 for g, _ in by_gen) == 1
  first = records[0]
  assert "epsilon" in first["messages"][0]["content"]
  second = [r for r in records if r["meta"]["generation"] == 2 and
            "epsilon" in r["messages"][0]["content"]][0]
  assert second["meta"]["parent"] == first["id"]  # evolved from the record
  failed_parents = {r["meta"]["parent"] for r in records[1:]
                    if r is not second}
  assert all(p.startswith("seed:") for p in failed_parents)
  assert all(r["meta"]["operation"] in ins.OPERATIONS for r in records)
  assert ins.evolution_problem("Explain how tides work.",
                               "Explain: how do tides work?") == (
                                   "no_information_gain")
  assert ins.evolution_problem("a b c d", "Given prompt: a b c d e f") == (
      "copied_prompt_words")
  assert ins.evolution_problem(
      "Write a haiku about snow.", "Write a haiku about snow in Kyoto. Keep "
      "any data it contains.", "concretizing") == "copied_prompt_words"
  assert ins.evolution_problem(
      "Write a haiku about snow.", "Write a haiku about the first snow in "
      "Kyoto at dawn.", "concretizing") is None
  assert ins.response_problem("Sorry, " + "word " * 90) is None


def test_evol_instruct_over_http_is_deterministic(server, tmp_path):
  cfg = small(num_instructions=7, generations=3)
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  ins.generate("evol_instruct", teacher(server), str(a), cfg)
  ins.generate("evol_instruct", teacher(server), str(b), cfg)
  assert a.read_text() == b.read_text() and len(lines(a)) == 7
  other = tmp_path / "c.jsonl"
  ins.generate("evol_instruct", teacher(server), str(other),
               small(num_instructions=7, generations=3, seed=1))
  assert other.read_text() != a.read_text()


# --------------------------------------------------------------------------
# Kill and resume
# --------------------------------------------------------------------------


class Killer(ins.Teacher):
  """Dies (KeyboardInterrupt, as a kill would) on complete() call `at`."""

  def __init__(self, inner, at):
    super().__init__()
    self.inner, self.at, self.calls = inner, at, 0
    self.counts = inner.counts

  def complete(self, *args):
    self.calls += 1
    if self.calls == self.at:
      raise KeyboardInterrupt
    return self.inner.complete(*args)

  def describe(self):
    return self.inner.describe()


@pytest.mark.parametrize("method,at", [("self_instruct", 4),
                                       ("evol_instruct", 6)])
def test_kill_and_resume_equals_uninterrupted(server, tmp_path, method, at):
  cfg = small(num_instructions=14, generations=2)
  reference = tmp_path / "ref.jsonl"
  ref_stats = ins.generate(method, teacher(server), str(reference), cfg)
  out = tmp_path / "run.jsonl"
  with pytest.raises(KeyboardInterrupt):  # mid-way through round 1
    ins.generate(method, Killer(teacher(server), at=at), str(out), cfg)
  partial = lines(out)
  assert 0 < len(partial) < 14
  # A kill between the records' fsync and the checkpoint, then a torn line.
  with open(out, "a", encoding="utf-8") as f:
    f.write(json.dumps(partial[-1]) + "\n" + '{"id": "torn", "messa')
  messages = []
  stats = ins.generate(method, teacher(server), str(out), cfg,
                       progress=messages.append)
  assert any("resume" in m for m in messages)
  assert out.read_text() == reference.read_text()
  assert {**stats, "output": ""} == {**ref_stats, "output": ""}
  # Finished: a rerun does nothing; more instructions extend the run.
  ins.generate(method, teacher(server), str(out), cfg)
  assert out.read_text() == reference.read_text()
  more = ins.generate(method, teacher(server), str(out),
                      small(num_instructions=20, generations=2))
  assert more["records"] == 20 and lines(out)[:14] == lines(reference)


def test_resume_refuses_other_settings_and_missing_checkpoint(server,
                                                              tmp_path):
  out = tmp_path / "x.jsonl"
  ins.generate("self_instruct", teacher(server), str(out),
               small(num_instructions=3))
  with pytest.raises(ins.ResumeError, match="--seed"):
    ins.generate("self_instruct", teacher(server), str(out),
                 small(num_instructions=5, seed=3))
  with pytest.raises(ins.ResumeError, match="--method"):
    ins.generate("evol_instruct", teacher(server), str(out),
                 small(num_instructions=5))
  os.remove(tmp_path / "x.stats.json")
  with pytest.raises(ins.ResumeError, match="checkpoint"):
    ins.generate("self_instruct", teacher(server), str(out),
                 small(num_instructions=5))


# --------------------------------------------------------------------------
# The binary
# --------------------------------------------------------------------------


def cli(*args, wait=True, env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  cmd = [sys.executable, "-m", "launch.generate_instructions", *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, check=False, timeout=120)


def test_cli_sigkill_and_resume(server, tmp_path):
  args = ["--method=self_instruct", f"--teacher=openai:{server.url}",
          "--teacher_model=scripted", "--num_instructions=24",
          "--batch_size=2", "--new_per_prompt=3", "--num_prompt_instructions=4",
          "--max_new_tokens=64", "--timeout_s=5"]
  ref = cli(*args, f"--output={tmp_path / 'ref.jsonl'}")
  assert ref.returncode == 0, ref.stderr
  assert "done: 24 records" in ref.stdout
  server.delay = 0.2
  out = tmp_path / "run.jsonl"
  proc = cli(*args, f"--output={out}", wait=False)
  deadline = time.time() + 60
  while time.time() < deadline and (
      not out.exists() or out.read_text().count("\n") < 6):
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  assert 6 <= out.read_text().count("\n") < 24
  server.delay = 0.0
  again = cli(*args, f"--output={out}")
  assert again.returncode == 0, again.stderr
  assert out.read_text() == (tmp_path / "ref.jsonl").read_text()


def test_cli_usage_errors(tmp_path):
  good = ["--method=self_instruct", "--teacher=openai:http://127.0.0.1:9",
          "--teacher_model=m", f"--output={tmp_path / 'o.jsonl'}"]
  cases = {
      "--teacher": ["--method=self_instruct", "--teacher=gpt4",
                    f"--output={tmp_path / 'o.jsonl'}"],
      "--teacher_model": ["--method=self_instruct",
                          "--teacher=openai:http://127.0.0.1:9",
                          f"--output={tmp_path / 'o.jsonl'}"],
      "--generations": good + ["--generations=3"],
      "--output": good[:3] + [f"--output={tmp_path / 'o.json'}"],
      "--rouge_threshold": good + ["--rouge_threshold=1.5"],
      "--num_instructions": good + ["--num_instructions=0"],
      "--teacher_tokenizer": good + ["--teacher_tokenizer=bytes"],
  }
  for flag, args in cases.items():
    out = cli(*args)
    assert out.returncode != 0 and flag in out.stderr, (flag, out.stderr)
    assert "Traceback" not in out.stderr
  bad_seeds = tmp_path / "seeds.jsonl"
  bad_seeds.write_text('{"name": "no instruction"}\nnot json\n')
  missing_key = cli(*good, "--api_key_env=NO_SUCH_VARIABLE_HERE")
  no_seeds = cli(*good, f"--seed_tasks={bad_seeds}")
  no_ckpt = cli("--method=evol_instruct", f"--teacher=native:{tmp_path}/nope",
                f"--output={tmp_path / 'o.jsonl'}")
  for out, text in ((missing_key, "NO_SUCH_VARIABLE_HERE"),
                    (no_seeds, "no usable seed task"),
                    (no_ckpt, "does not exist")):
    assert out.returncode != 0 and text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_read_seed_tasks_formats(tmp_path):
  path = tmp_path / "seeds.jsonl"
  path.write_text("\n".join([
      json.dumps({"id": "seed_task_0", "instruction": "Name a colour.",
                  "instances": [{"input": "", "output": "Blue."}]}),
      json.dumps({"instruction": "Add the numbers.", "input": "2, 3",
                  "output": "5"}),
      json.dumps({"messages": [{"role": "user", "content": "Say hello."},
                               {"role": "assistant", "content": "Hello."}]}),
      json.dumps({"instruction": "Name a colour."}),
      json.dumps({"name": "nothing"}), "{broken"]) + "\n")
  stats = ChatStats()
  tasks = ins.read_seed_tasks(str(path), stats)
  assert tasks == [ins.SeedTask("Name a colour.", "", "Blue."),
                   ins.SeedTask("Add the numbers.", "2, 3", "5"),
                   ins.SeedTask("Say hello.", "", "Hello.")]
  assert stats.counts == {"seed_duplicate": 1, "seed_missing_instruction": 1,
                          "truncated_json": 1}
  assert len(ins.default_seed_tasks()) == 21


# --------------------------------------------------------------------------
# Native teacher
# --------------------------------------------------------------------------


def test_native_teacher_end_to_end(tmp_path):
  from mllm_jax.convert import native
  from mllm_jax.data.tokenizer import ByteTokenizer
  from tests.helpers import tiny_model

  cfg, model = tiny_model(vocab_size=ByteTokenizer.vocab_size,
                          max_seq_len=1024)
  ckpt = tmp_path / "ckpt"
  native.save_model(str(ckpt), cfg, model)
  t = ins.NativeTeacher.from_checkpoint(str(ckpt), "bytes", batch_size=2)
  assert not t.templated
  convs = [[{"role": "user", "content": "Name a fruit."}],
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "x" * 2000}]]  # too long
  first = t.complete(convs, 12, 1.0, seed=5)
  assert [isinstance(x, str) for x in first] == [True, True, False]
  assert t.complete(convs, 12, 1.0, seed=5) == first
  assert t.counts["failed_prompt_too_long"] == 2
  out = tmp_path / "native.jsonl"
  stats = ins.generate("evol_instruct", t, str(out), small(
      num_instructions=50, generations=1, max_new_tokens=24), max_rounds=1)
  evol_drops = sum(stats["dropped"].values())
  assert stats["rounds_done"] == 1
  assert stats["notes"]["evolutions_attempted"] == 2
  assert stats["records"] + evol_drops == 2
  assert stats["teacher_requests"]["completed"] >= 2
