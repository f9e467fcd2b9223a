"""Synthetic instruction data: self-instruct and Evol-Instruct, with a
pluggable teacher.

Teachers (`Teacher.complete(conversations, max_new_tokens, temperature,
seed) -> [text or None]`):
  * `NativeTeacher`: a native checkpoint through the compiled sampler
    (`mllm_jax.generate.sampler`), each message list rendered with the
    tokenizer's chat template (a plain "User: ...\\nAssistant:" format when
    the tokenizer has none, e.g. the byte tokenizer), prompts batched.
  * `OpenAITeacher`: any OpenAI-compatible chat-completions endpoint
    (POST {url}/v1/chat/completions), standard library only: concurrent
    requests, a per-request deadline, retries with exponential backoff on
    timeouts, connection errors, HTTP 408/429/5xx and malformed JSON. A
    request that still fails is None and counted by reason, never raised.
    The API key is read from an environment variable and never logged.

Methods (one *round* at a time, each deterministic given the seed and what
the output file already holds):
  * self-instruct (Wang et al. 2022): k instructions sampled from the pool
    (seed tasks, plus up to k/4 generated ones) prompt the teacher for new
    ones; each new instruction must pass the heuristic filters
    (`instruction_problem`), not repeat one in the pool, and have ROUGE-L F
    < `rouge_threshold` (0.7) against every instruction in the pool
    (`NoveltyIndex`); then the teacher writes an input (optional) and an
    output for it. Kept instructions join the pool.
  * Evol-Instruct (Xu et al. 2023): lineages start from seed instructions
    and evolve `generations` times, each step a random in-depth operation
    (add constraints, deepen, concretize, increase reasoning, complicate the
    input) or the in-breadth mutation; the teacher then answers the evolved
    instruction. Failed evolutions (`evolution_problem`,
    `response_problem`) are eliminated and counted; the lineage keeps its
    parent and tries again at the next generation.

Output: the native conversation JSONL schema (`chat.Conversation.to_json`,
one user turn with the optional input and one assistant turn, plus a
`meta` object with the provenance that readers ignore). Each round's
records are appended and fsync'd, then the stats file (`stats_path`:
FILE.stats.json) is replaced atomically; it records the rounds done, the
record count and every counter. A killed run restarts from there: records
past the last checkpoint (a round cut short, a torn line) are cut off and
the round is redone, so the final file equals an uninterrupted run's with
the same seed whenever the teacher is deterministic (the native teacher;
an endpoint given the same seeds).
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import socket
import string
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Sequence

from mllm_jax.configlib import check, check_choice
from mllm_jax.data import readers
from mllm_jax.data.chat import (ASSISTANT, USER, ChatStats, Conversation,
                                ConversationError, Turn, iter_json_records,
                                native_conversation)

Message = dict[str, str]
METHODS = ("self_instruct", "evol_instruct")


class TeacherError(ValueError):
  """A teacher cannot be set up (bad URL, missing API key, ...)."""


class TeacherUnavailable(RuntimeError):
  """Every request of several attempts at a round failed."""


class ResumeError(ValueError):
  """The output file and its stats file do not describe a resumable run."""


class Stalled(RuntimeError):
  """Many rounds in a row added no record."""


# ----------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------


class Teacher(abc.ABC):
  """Completes chat conversations. `counts`: requests, completed, retries,
  failed_<reason>."""

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def count(self, key: str, n: int = 1) -> None:
    with self._lock:
      self.counts[key] += n

  @abc.abstractmethod
  def complete(self, conversations: Sequence[Sequence[Message]],
               max_new_tokens: int, temperature: float,
               seed: int) -> list[str | None]:
    """One reply per conversation ([{"role", "content"}, ...], ending with a
    user turn), in order; None where the request failed (counted)."""

  @abc.abstractmethod
  def describe(self) -> str:
    """What the teacher is, for logs and the stats file (no secrets)."""


class _Failure(Exception):
  def __init__(self, reason: str, retryable: bool,
               retry_after: float | None = None):
    super().__init__(reason)
    self.reason, self.retryable, self.retry_after = (reason, retryable,
                                                     retry_after)


class OpenAITeacher(Teacher):
  """An OpenAI-compatible chat-completions endpoint.

  url: the server root (".../v1" is accepted too); requests go to
    {url}/v1/chat/completions with model, messages, temperature, max_tokens
    (and seed, unless send_seed=False).
  api_key_env: the environment variable holding the key (sent as a Bearer
    token); None: no Authorization header.
  timeout_s: the deadline of one attempt (connecting, waiting, reading).
  max_retries: attempts after the first for retryable failures, waiting
    backoff_s * 2**attempt in between (at least a 429's Retry-After; at
    most max_backoff_s).
  concurrency: requests in flight at once.
  """

  def __init__(self, url: str, model: str, api_key_env: str | None = None,
               timeout_s: float = 120.0, max_retries: int = 3,
               backoff_s: float = 1.0, max_backoff_s: float = 30.0,
               concurrency: int = 8, send_seed: bool = True):
    super().__init__()
    if not re.match(r"^https?://[^/\s]+", url or ""):
      raise TeacherError(f"teacher URL {url!r} must start with http:// or "
                         f"https:// and name a host")
    if not model:
      raise TeacherError("an OpenAI-compatible teacher needs a model name")
    if timeout_s <= 0 or max_retries < 0 or concurrency < 1:
      raise TeacherError("timeout_s must be > 0, max_retries >= 0 and "
                         "concurrency >= 1")
    root = url.rstrip("/")
    if root.endswith("/v1"):
      root = root[:-3]
    self.url = root
    self.endpoint = root + "/v1/chat/completions"
    self.model = model
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)
    self.concurrency = int(concurrency)
    self.send_seed = send_seed
    self._headers = {"Content-Type": "application/json",
                     "Accept": "application/json"}
    if api_key_env:
      key = os.environ.get(api_key_env)
      if not key:
        raise TeacherError(f"environment variable {api_key_env} (the API "
                           f"key) is not set or empty")
      self._headers["Authorization"] = "Bearer " + key

  def __repr__(self) -> str:  # never the headers (the key)
    return f"OpenAITeacher({self.describe()})"

  def describe(self) -> str:
    return f"openai:{self.url} model={self.model}"

  def _attempt(self, body: bytes) -> str:
    deadline = time.monotonic() + self.timeout_s
    request = urllib.request.Request(self.endpoint, data=body,
                                     headers=self._headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
        chunks = []
        while True:
          if time.monotonic() > deadline:
            raise _Failure("timeout", True)
          chunk = resp.read(1 << 16)
          if not chunk:
            break
          chunks.append(chunk)
    except urllib.error.HTTPError as e:
      code = e.code
      retry_after = None
      if code == 429:
        try:
          retry_after = float(e.headers.get("Retry-After", ""))
        except (TypeError, ValueError):
          retry_after = None
      e.close()
      raise _Failure(f"http_{code}", code in (408, 409, 425, 429)
                     or code >= 500, retry_after) from None
    except _Failure:
      raise
    except (TimeoutError, socket.timeout) as e:
      raise _Failure("timeout", True) from e
    except urllib.error.URLError as e:
      if isinstance(e.reason, (TimeoutError, socket.timeout)):
        raise _Failure("timeout", True) from e
      raise _Failure("connection_error", True) from e
    except (OSError, http.client.HTTPException) as e:
      raise _Failure("connection_error", True) from e
    try:
      data = json.loads(b"".join(chunks).decode("utf-8"))
      content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise _Failure("malformed_response", True) from e
    if not isinstance(content, str):
      raise _Failure("malformed_response", True)
    return content

  def _request(self, messages: Sequence[Message], max_new_tokens: int,
               temperature: float, seed: int) -> str | None:
    body = {"model": self.model, "messages": list(messages),
            "temperature": temperature, "max_tokens": max_new_tokens}
    if self.send_seed:
      body["seed"] = seed
    data = json.dumps(body).encode("utf-8")
    self.count("requests")
    for attempt in range(self.max_retries + 1):
      try:
        text = self._attempt(data)
      except _Failure as f:
        if not f.retryable or attempt == self.max_retries:
          self.count(f"failed_{f.reason}")
          return None
        self.count("retries")
        self.count(f"retried_{f.reason}")
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        if f.retry_after is not None:  # a 429 asking for a longer wait
          wait = min(self.max_backoff_s, max(wait, f.retry_after))
        time.sleep(wait)
        continue
      self.count("completed")
      return text
    return None  # unreachable

  def complete(self, conversations, max_new_tokens, temperature, seed):
    if not conversations:
      return []
    workers = min(self.concurrency, len(conversations))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      futures = [pool.submit(self._request, messages, max_new_tokens,
                             temperature, (seed + i) % (1 << 31))
                 for i, messages in enumerate(conversations)]
      return [f.result() for f in futures]


PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant:"


class NativeTeacher(Teacher):
  """A native checkpoint's Decoder through the compiled sampler.

  Each conversation is rendered with the tokenizer's chat template (with the
  assistant's generation prompt) and encoded without an extra BOS; replies
  stop at EOS / the format's end-of-turn token. A tokenizer without a
  template (the byte tokenizer) gets "User: ...\\nAssistant:" turns after
  BOS and stops at "\\nUser:". Prompts go `batch_size` at a time (the last
  batch padded with copies, so shapes repeat and compiles are reused);
  batch b samples with seed + b. A prompt that does not fit the model's
  max_seq_len with max_new_tokens is None (failed_prompt_too_long).
  """

  def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8,
               mesh: Any = None, name: str = "native"):
    super().__init__()
    from mllm_jax.generate.sampler import Sampler  # pylint: disable=g-import-not-at-top
    if batch_size < 1:
      raise TeacherError("batch_size must be >= 1")
    if tokenizer.vocab_size > model.cfg.vocab_size:
      raise TeacherError(f"the tokenizer has {tokenizer.vocab_size} ids but "
                         f"the model's vocabulary is {model.cfg.vocab_size}")
    pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i >= 0), 0)
    self.tokenizer = tokenizer
    self.sampler = Sampler(model, tokenizer=tokenizer, pad_id=pad, mesh=mesh,
                           prompt_multiple=64)
    self.batch_size = batch_size
    self.max_seq_len = model.cfg.max_seq_len
    self.stops = tokenizer.end_of_turn_ids()
    self.templated = bool(tokenizer.chat_template)
    self.name = name

  @classmethod
  def from_checkpoint(cls, path: str, tokenizer: str | None = None,
                      batch_size: int = 8, mesh: Any = None
                      ) -> "NativeTeacher":
    from mllm_jax.convert import native  # pylint: disable=g-import-not-at-top
    from mllm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    tok = load_tokenizer(tokenizer or path)
    _, model = native.load_model(path, mesh=mesh)
    return cls(model, tok, batch_size, mesh, name=f"native:{path}")

  def describe(self) -> str:
    return self.name

  def render(self, messages: Sequence[Message]) -> list[int]:
    if self.templated:
      return self.tokenizer.encode(
          self.tokenizer.apply_chat_template(list(messages)))
    text = ""
    for m in messages:
      if m["role"] == "system":
        text += m["content"] + "\n\n"
      elif m["role"] == "user":
        text += f"{PLAIN_USER}{m['content']}\n{PLAIN_ASSISTANT}"
      else:
        text += f" {m['content']}\n"
    return self.tokenizer.encode(text, add_bos=True)

  def complete(self, conversations, max_new_tokens, temperature, seed):
    from mllm_jax.generate.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
    results: list[str | None] = [None] * len(conversations)
    rows = []
    for i, messages in enumerate(conversations):
      self.count("requests")
      try:
        ids = self.render(messages)
      except ValueError:  # a chat template that raised
        self.count("failed_template_error")
        continue
      if len(ids) + max_new_tokens > self.max_seq_len:
        self.count("failed_prompt_too_long")
        continue
      rows.append((i, ids))
    sampling = SamplingParams(temperature=float(temperature))
    stop_strings = () if self.templated else ("\n" + PLAIN_USER.strip(),)
    for b, start in enumerate(range(0, len(rows), self.batch_size)):
      chunk = rows[start:start + self.batch_size]
      prompts = [ids for _, ids in chunk]
      prompts += [prompts[0]] * (self.batch_size - len(prompts))
      out = self.sampler.generate(
          prompts, max_new_tokens, sampling=sampling, stop_tokens=self.stops,
          stop_strings=stop_strings, seed=(seed + b) % (1 << 31))
      for j, (i, _) in enumerate(chunk):
        tokens = out.tokens[j]
        if out.stop_reasons[j] == "stop_string":
          text = out.texts[j]
        else:
          if tokens and tokens[-1] in self.stops:
            tokens = tokens[:-1]
          text = self.tokenizer.decode(tokens)
        if out.stop_reasons[j] == "length":
          self.count("hit_max_new_tokens")
        self.count("completed")
        results[i] = text.strip()
    return results


# ----------------------------------------------------------------------------
# Seed tasks
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedTask:
  instruction: str
  input: str = ""
  output: str = ""

  @property
  def text(self) -> str:
    return f"{self.instruction}\n\n{self.input}" if self.input else (
        self.instruction)


# Written for this project, in the self-instruct seed format (one JSON object
# per line: id, name, instruction, instances [{input, output}],
# is_classification).
SEED_TASKS_JSONL = r"""
{"id": "seed_task_0", "name": "tips_sleep", "instruction": "Give three practical tips for falling asleep faster.", "instances": [{"input": "", "output": "1. Keep the same bedtime every day, weekends included.\n2. Stop using screens half an hour before bed.\n3. Keep the bedroom cool, dark and quiet."}], "is_classification": false}
{"id": "seed_task_1", "name": "sentiment", "instruction": "Classify the sentiment of the review as positive, negative or mixed.", "instances": [{"input": "The battery lasts forever, but the screen scratches if you look at it.", "output": "mixed"}], "is_classification": true}
{"id": "seed_task_2", "name": "email_reschedule", "instruction": "Write a short, polite email asking to move a meeting to another day.", "instances": [{"input": "Meeting: project review on Tuesday at 10:00. Proposed new time: Thursday at 14:00.", "output": "Hi all,\n\nWould it be possible to move Tuesday's 10:00 project review to Thursday at 14:00? Something urgent came up on Tuesday morning. Thank you for understanding.\n\nBest regards"}], "is_classification": false}
{"id": "seed_task_3", "name": "unit_conversion", "instruction": "Convert the temperature from Fahrenheit to Celsius and show the formula you used.", "instances": [{"input": "98.6 F", "output": "C = (F - 32) * 5/9 = (98.6 - 32) * 5/9 = 37 C"}], "is_classification": false}
{"id": "seed_task_4", "name": "python_dedupe", "instruction": "Write a Python function that removes duplicates from a list while keeping the original order.", "instances": [{"input": "", "output": "def dedupe(items):\n    seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n            out.append(item)\n    return out"}], "is_classification": false}
{"id": "seed_task_5", "name": "explain_child", "instruction": "Explain to a ten-year-old why the sky is blue.", "instances": [{"input": "", "output": "Sunlight is made of all colours. When it passes through the air, the tiny bits of air bounce blue light around much more than red or yellow light, so blue light reaches your eyes from every part of the sky."}], "is_classification": false}
{"id": "seed_task_6", "name": "summarize", "instruction": "Summarize the paragraph in one sentence.", "instances": [{"input": "The town council met on Monday to discuss the new bike lanes. Several shop owners worried about losing parking, while cyclists said the lanes would make the centre safer. The council agreed to test the lanes on one street for six months before deciding.", "output": "The council will trial new bike lanes on one street for six months after shop owners and cyclists disagreed about them."}], "is_classification": false}
{"id": "seed_task_7", "name": "word_problem", "instruction": "Solve the word problem and explain each step.", "instances": [{"input": "A train leaves at 9:40 and arrives at 12:15. How long is the journey?", "output": "From 9:40 to 12:40 is 3 hours; 12:15 is 25 minutes earlier, so the journey takes 2 hours and 35 minutes."}], "is_classification": false}
{"id": "seed_task_8", "name": "antonyms", "instruction": "List an antonym for each of the given words.", "instances": [{"input": "generous, ancient, fragile", "output": "generous - stingy\nancient - modern\nfragile - sturdy"}], "is_classification": false}
{"id": "seed_task_9", "name": "fact_or_opinion", "instruction": "Is the following statement a fact or an opinion?", "instances": [{"input": "Paris is the most beautiful city in Europe.", "output": "Opinion"}], "is_classification": true}
{"id": "seed_task_10", "name": "recipe_idea", "instruction": "Suggest a simple dinner I can cook with the ingredients I have.", "instances": [{"input": "eggs, spinach, an onion, some cheese, bread", "output": "Make a spinach and onion omelette: soften the chopped onion in a pan, add the spinach until it wilts, pour in beaten eggs, top with cheese and fold. Serve with toasted bread."}], "is_classification": false}
{"id": "seed_task_11", "name": "grammar_fix", "instruction": "Correct the grammar and spelling mistakes in the sentence.", "instances": [{"input": "Their going too the libary tomorow to return there books.", "output": "They're going to the library tomorrow to return their books."}], "is_classification": false}
{"id": "seed_task_12", "name": "pros_cons", "instruction": "What are the main advantages and disadvantages of working from home?", "instances": [{"input": "", "output": "Advantages: no commute, flexible hours, fewer interruptions. Disadvantages: isolation, blurred line between work and rest, harder informal communication with colleagues."}], "is_classification": false}
{"id": "seed_task_13", "name": "sql_query", "instruction": "Write an SQL query that answers the question for the given table.", "instances": [{"input": "Table orders(id, customer, amount, created_at). Question: total amount per customer in 2023, largest first.", "output": "SELECT customer, SUM(amount) AS total\nFROM orders\nWHERE created_at >= '2023-01-01' AND created_at < '2024-01-01'\nGROUP BY customer\nORDER BY total DESC;"}], "is_classification": false}
{"id": "seed_task_14", "name": "haiku", "instruction": "Write a haiku about the first snow of winter.", "instances": [{"input": "", "output": "Quiet morning light\nthe garden forgets its paths\nunder the first snow"}], "is_classification": false}
{"id": "seed_task_15", "name": "extract_dates", "instruction": "Extract all the dates mentioned in the text and write them in YYYY-MM-DD format.", "instances": [{"input": "The contract was signed on March 3, 2021 and renewed on 15 January 2023.", "output": "2021-03-03\n2023-01-15"}], "is_classification": false}
{"id": "seed_task_16", "name": "interview_questions", "instruction": "Come up with four interview questions for a junior data analyst position.", "instances": [{"input": "", "output": "1. How would you check a new data set for errors before analysing it?\n2. Explain the difference between a mean and a median and when each is misleading.\n3. Describe a chart you made and what decision it supported.\n4. How do you explain a finding to someone without a technical background?"}], "is_classification": false}
{"id": "seed_task_17", "name": "odd_one_out", "instruction": "Which word does not belong with the others, and why?", "instances": [{"input": "violin, cello, trumpet, viola", "output": "Trumpet: the others are string instruments, the trumpet is a brass instrument."}], "is_classification": true}
{"id": "seed_task_18", "name": "rewrite_formal", "instruction": "Rewrite the message in a formal tone.", "instances": [{"input": "hey, can't make it today, something came up. let's do next week?", "output": "Unfortunately I am unable to attend today due to an unforeseen matter. Would it be possible to reschedule for next week?"}], "is_classification": false}
{"id": "seed_task_19", "name": "history_question", "instruction": "Why did the Roman Empire split into an eastern and a western half?", "instances": [{"input": "", "output": "The empire had become too large to defend and govern from one centre. Emperors shared power to respond to threats on several frontiers at once, and after Theodosius I died in 395 his sons ruled the east and the west separately, a division that then became permanent."}], "is_classification": false}
{"id": "seed_task_20", "name": "analogy", "instruction": "Complete the analogy and explain the relationship.", "instances": [{"input": "Bird is to nest as bee is to ...", "output": "Hive: both are the homes the animals live in and raise their young in."}], "is_classification": false}
"""


def default_seed_tasks() -> list[SeedTask]:
  """The 21 seed tasks bundled above."""
  return [_seed_task(json.loads(line), "bundled")
          for line in SEED_TASKS_JSONL.strip().splitlines()]


def _seed_task(record: Any, where: str) -> SeedTask:
  """A self-instruct seed record ({"instruction", "instances": [{"input",
  "output"}]}), an Alpaca one, or a native conversation (its first round)."""
  if isinstance(record, dict) and "messages" in record:
    conv = native_conversation(record, where)
    user, answer = conv.pairs()[0]
    return SeedTask(user.content, user.input, answer.content if answer else "")
  if not isinstance(record, dict):
    raise ConversationError("not_an_object")
  instruction = record.get("instruction")
  if not isinstance(instruction, str) or not instruction.strip():
    raise ConversationError("missing_instruction")
  instances = record.get("instances")
  first = instances[0] if isinstance(instances, list) and instances else record
  if not isinstance(first, dict):
    raise ConversationError("bad_instances")
  extra, output = first.get("input") or "", first.get("output") or ""
  if not isinstance(extra, str) or not isinstance(output, str):
    raise ConversationError("bad_instances")
  return SeedTask(instruction.strip(), extra.strip(), output.strip())


def read_seed_tasks(path: str, stats: ChatStats | None = None
                    ) -> list[SeedTask]:
  """Seed tasks from a JSON/JSONL file: self-instruct's seed_tasks.jsonl
  format, Alpaca records or native conversations. Bad records are counted
  in `stats`; a file with no usable task is an error."""
  stats = stats if stats is not None else ChatStats()
  if not os.path.isfile(path):
    raise FileNotFoundError(f"seed task file {path} does not exist")
  tasks, seen = [], set()
  for item in iter_json_records(path):
    if isinstance(item, readers.Drop):
      stats.add(item)
      continue
    record, where = item
    try:
      task = _seed_task(record, where)
    except ConversationError as e:
      stats.add(readers.Drop(f"seed_{e.reason}", where))
      continue
    if _normalize(task.instruction) in seen:
      stats.add(readers.Drop("seed_duplicate", where))
      continue
    seen.add(_normalize(task.instruction))
    tasks.append(task)
  if not tasks:
    raise ValueError(f"{path}: no usable seed task (each record needs an "
                     f"'instruction', as in self-instruct's "
                     f"seed_tasks.jsonl; dropped: {dict(stats.counts)})")
  return tasks


# ----------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------


def _normalize(text: str) -> str:
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _words(text: str) -> list[str]:
  return re.findall(r"[A-Za-z0-9']+", text)


# Self-instruct's heuristics: tasks a text-only LM cannot do, and a phrase the
# generator tends to prepend to existing tasks (making them ambiguous).
UNSUITABLE_KEYWORDS = ("image", "images", "graph", "graphs", "picture",
                       "pictures", "file", "files", "map", "maps", "draw",
                       "plot", "go to", "video", "audio", "music",
                       "flowchart", "diagram")
_KEYWORD_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in
                                          UNSUITABLE_KEYWORDS) + r")\b",
                         re.IGNORECASE)
MIN_INSTRUCTION_WORDS, MAX_INSTRUCTION_WORDS = 4, 150


def instruction_problem(text: str) -> str | None:
  """Why a generated instruction is unusable (a drop reason), or None.

  too_short (3 words or fewer) / too_long (over 150); non_ascii (starts
  with a non-ASCII character or has no ASCII letter); starts_with_punctuation;
  unsuitable_keyword (images, graphs, files, maps, drawing, audio, video,
  music, diagrams, "go to": a text-only model cannot do these);
  starts_with_write_a_program.
  """
  text = text.strip()
  if not text:
    return "empty"
  if not text[0].isascii() or not re.search(r"[A-Za-z]", text):
    return "non_ascii"
  if text[0] in string.punctuation:
    return "starts_with_punctuation"
  words = text.split()
  if len(words) < MIN_INSTRUCTION_WORDS:
    return "too_short"
  if len(words) > MAX_INSTRUCTION_WORDS:
    return "too_long"
  if _KEYWORD_RE.search(text):
    return "unsuitable_keyword"
  if text.lower().startswith("write a program"):
    return "starts_with_write_a_program"
  return None


class NoveltyIndex:
  """Instructions seen so far, for self-instruct's novelty filter: ROUGE-L F
  (rouge-score's tokenizer: lower-cased alphanumeric words, no stemming)
  against each of them.

  Exact, with a shortcut: LCS <= the multiset overlap of the two token
  lists, so a pair whose bound 2 * overlap / (len_a + len_b) is below the
  threshold cannot reach it and is never scored. Tokens are cached.
  """

  def __init__(self, threshold: float = 0.7):
    from rouge_score import rouge_scorer, tokenizers  # pylint: disable=g-import-not-at-top

    base = tokenizers.DefaultTokenizer(use_stemmer=False)
    cache: dict[str, list[str]] = {}

    class _Cached(tokenizers.Tokenizer):
      def tokenize(self, text):
        if text not in cache:
          cache[text] = base.tokenize(text)
        return cache[text]

    self._tokenize = _Cached().tokenize
    self._scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Cached())
    self.threshold = threshold
    self.texts: list[str] = []
    self._bags: list[collections.Counter[str]] = []
    self._lengths: list[int] = []
    self._keys: set[str] = set()

  def __len__(self) -> int:
    return len(self.texts)

  def add(self, text: str) -> None:
    tokens = self._tokenize(text)
    self.texts.append(text)
    self._bags.append(collections.Counter(tokens))
    self._lengths.append(len(tokens))
    self._keys.add(_normalize(text))

  def is_duplicate(self, text: str) -> bool:
    return _normalize(text) in self._keys

  def rouge_l(self, a: str, b: str) -> float:
    return self._scorer.score(a, b)["rougeL"].fmeasure

  def most_similar(self, text: str) -> tuple[float, str | None]:
    """(max ROUGE-L F, that instruction) over the pairs that can reach the
    threshold; (0.0, None) when none can."""
    tokens = self._tokenize(text)
    bag, n = collections.Counter(tokens), len(tokens)
    best, best_text = 0.0, None
    for other, other_bag, m in zip(self.texts, self._bags, self._lengths):
      if not n or not m:
        continue
      overlap = sum((bag & other_bag).values())
      if 2 * overlap / (n + m) < self.threshold:
        continue
      score = self.rouge_l(other, text)
      if score > best:
        best, best_text = score, other
    return best, best_text


# Words that carry no content (WizardLM drops responses made only of these).
STOP_WORDS = frozenset("""a an the and or but if then else of to in on at by
for with from as is are was were be been being it its this that these those i
you he she we they me him her us them my your our their what which who whom
whose when where why how not no yes do does did done have has had can could
will would shall should may might must so than too very just also there here
all any some such only own same other""".split())

# Phrases of the evolution prompts below (and of WizardLM's) that an evolved
# instruction must not copy.
PROMPT_WORDS = ("#instruction#", "#rewritten instruction#",
                "#new instruction#", "rewritten instruction",
                "new instruction", "original instruction",
                "given instruction", "instruction rewriter",
                "instruction creator", "#given prompt#",
                "#rewritten prompt#", "#created prompt#", "given prompt",
                "rewritten prompt", "created prompt")
MIN_NEW_WORDS = 2
SORRY_MAX_WORDS = 80


_MARKER_RE = re.compile(r"#[A-Za-z][A-Za-z ]{1,40}#")
COPIED_NGRAM = 4


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
  words = _normalize(text).split()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def evolution_problem(parent: str, child: str,
                      operation: str | None = None) -> str | None:
  """Why an evolved instruction fails, or None: empty / too_short (fewer
  than 4 words) / too_long; copied_prompt_words (it repeats the evolution
  prompt's scaffolding: a "#...#" marker such as "#Rewritten Instruction#",
  a phrase such as "given prompt", or, given the operation, any 4 words in a
  row of that operation's prompt that are not in the parent);
  no_information_gain (the same words as the parent, or fewer than 2 new
  content words)."""
  text = child.strip()
  if not text:
    return "empty"
  words = text.split()
  if len(words) < MIN_INSTRUCTION_WORDS:
    return "too_short"
  if len(words) > 4 * MAX_INSTRUCTION_WORDS:
    return "too_long"
  lower = text.lower()
  if any(p in lower for p in PROMPT_WORDS) or _MARKER_RE.search(text):
    return "copied_prompt_words"
  if operation is not None:
    scaffold = _ngrams(evolve_prompt(operation, "")[0]["content"],
                       COPIED_NGRAM) - _ngrams(parent, COPIED_NGRAM)
    if _ngrams(text, COPIED_NGRAM) & scaffold:
      return "copied_prompt_words"
  if _normalize(text) == _normalize(parent):
    return "no_information_gain"
  old = {w.lower() for w in _words(parent)}
  new = {w.lower() for w in _words(text)} - old - STOP_WORDS
  if len(new) < MIN_NEW_WORDS:
    return "no_information_gain"
  return None


def response_problem(response: str) -> str | None:
  """Why a teacher's answer to an evolved instruction shows the evolution
  failed, or None: response_sorry ("sorry" in fewer than 80 words: the
  teacher could not do it), response_empty (only punctuation and stop
  words)."""
  words = [w.lower() for w in _words(response)]
  if not [w for w in words if w not in STOP_WORDS]:
    return "response_empty"
  if "sorry" in response.lower() and len(words) < SORRY_MAX_WORDS:
    return "response_sorry"
  return None


# ----------------------------------------------------------------------------
# Prompts (our own wording)
# ----------------------------------------------------------------------------


def propose_prompt(examples: Sequence[str], n: int) -> list[Message]:
  listed = "\n".join(f"{i}. {' '.join(t.split())}"
                     for i, t in enumerate(examples, 1))
  return [{"role": "user", "content": (
      "We are collecting a varied set of tasks to teach an AI assistant. "
      f"Here are some example tasks:\n\n{listed}\n\n"
      f"Write {n} new tasks that differ from the examples and from each "
      "other. Vary the topic and the kind of task (open questions, writing, "
      "classification, editing, maths, coding, advice, extraction, ...) and "
      "the phrasing: some questions, some commands. Every task must be "
      "doable by a text-only assistant. Give one task per line, numbered "
      f"1 to {n}, and nothing else.")}]


def instance_prompt(instruction: str) -> list[Message]:
  return [{"role": "user", "content": (
      f"Task: {instruction}\n\n"
      "Write one example of this task done well. If the task needs "
      "something to work on (a text to summarise, a list to sort, a "
      "sentence to classify), first invent a short, realistic input; if it "
      "does not, the input is none. Then write the ideal response.\n"
      "Answer in exactly this format:\n"
      "Input: <the input, or none>\n"
      "Output: <the response>")}]


_NUMBERED = re.compile(
    r"^\s*(?:task\s*)?\(?(\d{1,3})\s*[.):]\s*(.+?)\s*$", re.IGNORECASE)


def parse_proposals(text: str) -> list[str]:
  """Numbered lines ("3. ...", "3) ...", "(3) ...", "Task 3: ...") of a
  proposal reply,
  without markdown emphasis or surrounding quotes."""
  out = []
  for line in text.splitlines():
    match = _NUMBERED.match(line)
    if match:
      item = match.group(2).strip().strip("*_").strip()
      # Numbered twice ("1. (1) ...", "1. 2. ..."): keep the text.
      item = re.sub(r"^(?:\(\d{1,3}\)\s*|\d{1,3}[.)]\s+)", "", item)
      if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        item = item[1:-1].strip()
      if item:
        out.append(item)
  return out


_LABEL = r"^[ \t*#_]*{}[ \t*_]*:[ \t*_]*"
_INPUT_RE = re.compile(_LABEL.format("input"), re.IGNORECASE | re.MULTILINE)
_OUTPUT_RE = re.compile(_LABEL.format("output"), re.IGNORECASE | re.MULTILINE)
_PLACEHOLDER = re.compile(r"^<[^<>\n]*>$")
_NO_INPUT = {"", "none", "<none>", "n/a", "na", "<noinput>", "no input",
             "(none)", "nothing", "-", "null"}


def parse_instance(text: str) -> tuple[str, str] | None:
  """(input, output) from "Input: ...\\nOutput: ..." (input "" for none
  or for a copied "<...>" placeholder, output "" for a placeholder); None
  without an Output label, or when the output has another Input: or Output:
  label line (a teacher looping over the format)."""
  out_match = _OUTPUT_RE.search(text)
  if out_match is None:
    return None
  output = text[out_match.end():].strip()
  if _OUTPUT_RE.search(output) or _INPUT_RE.search(output):
    return None
  in_match = _INPUT_RE.search(text, 0, out_match.start())
  extra = text[in_match.end():out_match.start()].strip() if in_match else ""
  # The prompt's placeholders copied verbatim ("<the input, or none>").
  if (extra.strip(" .<>()[]\"'").lower() in _NO_INPUT
      or extra.lower() in _NO_INPUT or _PLACEHOLDER.match(extra)):
    extra = ""
  if _PLACEHOLDER.match(output):
    output = ""
  return extra, output


IN_DEPTH = {
    "add_constraints": (
        "Add one more constraint or requirement to it, such as a length "
        "limit, an output format, an audience, or something the answer "
        "must or must not contain."),
    "deepening": (
        "Make it ask for more depth and breadth on its subject: more "
        "aspects, trade-offs, causes or consequences."),
    "concretizing": (
        "Replace its general concepts with more specific ones: name "
        "particular cases, quantities, places, settings or examples."),
    "increase_reasoning": (
        "If it can be answered in one or two simple steps, make it "
        "explicitly require several steps of reasoning."),
    "complicate_input": (
        "Give it harder material to work on: include concrete data in the "
        "instruction itself (a small table, a code snippet, a list of "
        "numbers, a short passage or a formula) that the answer must use."),
}
IN_BREADTH = "breadth"
OPERATIONS = tuple(IN_DEPTH) + (IN_BREADTH,)


def evolve_prompt(operation: str, instruction: str) -> list[Message]:
  if operation == IN_BREADTH:
    content = (
        "You write instructions for training an AI assistant. Taking the "
        "instruction below only as inspiration, write a brand-new "
        "instruction in the same domain but on a less common topic, about "
        "as long and as hard as the original and answerable in text. Reply "
        "with the new instruction only: no heading, no explanation.\n\n"
        f"#Instruction#\n{instruction}\n\n#New Instruction#")
  else:
    content = (
        "You rewrite instructions for training an AI assistant into harder "
        "versions that a capable assistant can still answer. Rewrite the "
        f"instruction below as follows. {IN_DEPTH[operation]} Keep it "
        "understandable on its own, keep any data it contains, and add no "
        "more than 10 to 20 words. Reply with the rewritten instruction "
        "only: no heading, no explanation.\n\n"
        f"#Instruction#\n{instruction}\n\n#Rewritten Instruction#")
  return [{"role": "user", "content": content}]


def _strip_quotes(text: str) -> str:
  text = text.strip()
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
    text = text[1:-1].strip()
  return text


# ----------------------------------------------------------------------------
# The run: rounds, checkpoints, resume
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """What a run does; the fields are the binary's flags. All but
  num_instructions (and the outage/idle guards) must match to resume.

  batch_size: proposal prompts per round (self-instruct) or lineages per
    round (Evol-Instruct).
  num_prompt_instructions: in-context instructions per proposal prompt
    (up to a quarter of them generated ones once the pool has some).
  new_per_prompt: instructions asked for per proposal prompt.
  generations: evolution steps per lineage (Evol-Instruct).
  max_idle_rounds: stop (Stalled) after this many rounds in a row without
    a new record. max_outage_rounds: give up (TeacherUnavailable) after
    this many attempts in a row at which every first-stage request failed;
    such an attempt is not a round: the same round is tried again after
    outage_wait_s * 2**attempt seconds.
  """
  method: str = "self_instruct"
  num_instructions: int = 100
  seed: int = 0
  max_new_tokens: int = 512
  temperature: float = 0.7
  batch_size: int = 8
  num_prompt_instructions: int = 8
  new_per_prompt: int = 8
  rouge_threshold: float = 0.7
  generations: int = 4
  max_idle_rounds: int = 50
  max_outage_rounds: int = 5
  outage_wait_s: float = 10.0

  def validate(self) -> None:
    check_choice(self.method, METHODS, "--method")
    check(self.num_instructions >= 1, "--num_instructions", "must be >= 1")
    check(self.max_new_tokens >= 1, "--max_new_tokens", "must be >= 1")
    check(self.temperature >= 0, "--temperature", "must be >= 0")
    check(self.batch_size >= 1, "--batch_size", "must be >= 1")
    check(self.num_prompt_instructions >= 1, "--num_prompt_instructions",
          "must be >= 1")
    check(self.new_per_prompt >= 1, "--new_per_prompt", "must be >= 1")
    check(0 < self.rouge_threshold <= 1, "--rouge_threshold",
          "must be in (0, 1]")
    check(self.generations >= 1, "--generations", "must be >= 1")
    check(self.max_idle_rounds >= 1, "--max_idle_rounds", "must be >= 1")
    check(self.max_outage_rounds >= 1, "--max_outage_rounds", "must be >= 1")
    check(self.outage_wait_s >= 0, "--outage_wait_s", "must be >= 0")

  def resume_key(self) -> dict[str, Any]:
    keys = ["method", "seed", "max_new_tokens", "temperature", "batch_size"]
    if self.method == "self_instruct":
      keys += ["num_prompt_instructions", "new_per_prompt", "rouge_threshold"]
    else:
      keys += ["generations"]
    return {k: getattr(self, k) for k in keys}


def stats_path_for(output: str) -> str:
  """FILE.jsonl -> FILE.stats.json."""
  root, ext = os.path.splitext(output)
  return (root if ext else output) + ".stats.json"


def _derive(seed: int, *parts: Any) -> int:
  digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _rng(seed: int, *parts: Any) -> random.Random:
  return random.Random(_derive(seed, *parts))


def _snippet(text: str, n: int = 80) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 3] + "..."


def _conversation_problem(instruction: str, extra: str, output: str
                          ) -> str | None:
  """'invalid_conversation' when the texts cannot form a Conversation (e.g.
  an <image> placeholder without an image)."""
  try:
    Conversation("check", (Turn(USER, instruction, extra),
                           Turn(ASSISTANT, output)))
  except ConversationError:
    return "invalid_conversation"
  return None


@dataclasses.dataclass
class _Record:
  instruction: str
  input: str
  output: str
  meta: dict[str, Any]


@dataclasses.dataclass
class Round:
  """What one round gives `run_rounds`: its accepted records (any type:
  `run_rounds` hands them to its `to_rows`), its drops and notes, and
  whether every first-stage teacher request failed (an outage: the round
  is tried again, not counted)."""
  records: list[Any]
  stats: ChatStats
  outage: bool = False


_Round = Round


class Checkpoint:
  """The output JSONL and its stats file: resume, append rounds, commit.

  key: what must match to resume (stored as `resume_key`; a difference
    raises ResumeError naming the flag: `flag_names[name]`, default
    --name). header: fields written first in the stats file (what the run
    is). Records must be conversations of the native schema (checked when
    read back). Shared by the text generators here and
    `data.visual_instructions`.
  """

  def __init__(self, output: str, stats_path: str, key: dict[str, Any],
               teacher: Teacher, progress,
               header: dict[str, Any] | None = None,
               flag_names: dict[str, str] | None = None):
    self.output, self.stats_path = output, stats_path
    self.key, self.teacher, self.progress = dict(key), teacher, progress
    self.header = dict(header or {})
    self.flag_names = dict(flag_names or {})
    self.stats = ChatStats()
    self.teacher_base: collections.Counter[str] = collections.Counter()
    self.rounds_done = 0
    self.records: list[dict[str, Any]] = []

  def _key(self) -> dict[str, Any]:
    return self.key

  def load(self) -> None:
    has_out = os.path.exists(self.output)
    if not os.path.exists(self.stats_path):
      if has_out and os.path.getsize(self.output) > 0:
        raise ResumeError(
            f"{self.output} exists but {self.stats_path} (its checkpoint) "
            f"does not, so where it stopped is unknown; delete the file or "
            f"choose another --output")
      return
    try:
      with open(self.stats_path, encoding="utf-8") as f:
        saved = json.load(f)
      key, done, count = (saved["resume_key"], int(saved["rounds_done"]),
                          int(saved["records"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ResumeError(f"{self.stats_path}: unreadable checkpoint ({e}); "
                        f"delete it and {self.output} to start over") from e
    mine = self._key()
    for name in list(mine) + [k for k in key if k not in mine]:
      if key.get(name) != mine.get(name):
        what = self.flag_names.get(name, f"--{name}")
        raise ResumeError(
            f"{what} is {mine.get(name)!r} but the run in {self.output} "
            f"used {key.get(name)!r}; use the same settings to resume, or "
            f"another --output")
    kept, offset = self._read_records(count)
    size = os.path.getsize(self.output) if has_out else 0
    if offset < size:
      with open(self.output, "r+b") as f:
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
      self.progress(f"resume: cut {size - offset} bytes written after the "
                    f"last checkpoint (a round in progress); redoing it")
    self.records = kept
    self.rounds_done = done
    self.stats.counts.update(saved.get("dropped", {}))
    for reason, where in saved.get("dropped_examples", {}).items():
      self.stats.examples[reason] = list(where)
    self.stats.notes.update(saved.get("notes", {}))
    self.teacher_base.update(saved.get("teacher_requests", {}))
    if done:
      self.progress(f"resume: {count} records from {done} rounds in "
                    f"{self.output}")

  def _read_records(self, count: int) -> tuple[list[dict[str, Any]], int]:
    """The first `count` records and the byte offset after them."""
    if count == 0:
      return [], 0
    if not os.path.exists(self.output):
      raise ResumeError(f"{self.stats_path} records {count} records but "
                        f"{self.output} is missing")
    records, offset = [], 0
    with open(self.output, "rb") as f:
      for line in f:
        if len(records) == count:
          break
        if not line.endswith(b"\n"):
          break
        try:
          record = json.loads(line.decode("utf-8"))
          native_conversation(record, "?")
        except (ValueError, ConversationError) as e:
          raise ResumeError(f"{self.output}: record {len(records) + 1} is "
                            f"not a conversation ({e}); the file was "
                            f"changed after it was written") from e
        records.append(record)
        offset += len(line)
    if len(records) < count:
      raise ResumeError(f"{self.output} holds {len(records)} complete "
                        f"records but its checkpoint {self.stats_path} "
                        f"says {count}; the file was changed or truncated")
    return records, offset

  def commit(self, round_records: list[dict[str, Any]], stats: ChatStats,
             complete: bool) -> None:
    """Appends the round's records (fsync), then replaces the stats file."""
    if round_records:
      with open(self.output, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n"
                        for r in round_records))
        f.flush()
        os.fsync(f.fileno())
    elif not os.path.exists(self.output):
      open(self.output, "a", encoding="utf-8").close()
    self.records.extend(round_records)
    self.rounds_done += 1
    for reason, n in stats.counts.items():
      self.stats.counts[reason] += n
      room = 5 - len(self.stats.examples[reason])
      self.stats.examples[reason].extend(stats.examples[reason][:max(room, 0)])
    self.stats.notes.update(stats.notes)
    self.write_stats(complete)

  def summary(self, complete: bool) -> dict[str, Any]:
    teacher = self.teacher_base + self.teacher.counts
    return {
        **self.header,
        "output": self.output,
        "teacher": self.teacher.describe(),
        "resume_key": self._key(),
        "rounds_done": self.rounds_done,
        "records": len(self.records),
        "complete": complete,
        **self.stats.summary(),
        "teacher_requests": dict(sorted(teacher.items())),
    }

  def write_stats(self, complete: bool) -> dict[str, Any]:
    summary = self.summary(complete)
    tmp = self.stats_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, sort_keys=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.stats_path)
    try:
      fd = os.open(os.path.dirname(os.path.abspath(self.stats_path)),
                   os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    except OSError:
      pass
    return summary


class _SelfInstruct:
  def __init__(self, config: GenerateConfig, teacher: Teacher,
               seeds: Sequence[SeedTask], records: Sequence[dict[str, Any]]):
    self.config, self.teacher = config, teacher
    self.seeds = [t.instruction for t in seeds]
    self.generated = [r["messages"][0]["content"] for r in records]
    self.index = NoveltyIndex(config.rouge_threshold)
    for text in self.seeds + self.generated:
      self.index.add(text)

  def round(self, r: int) -> _Round:
    cfg, stats = self.config, ChatStats()
    rng = _rng(cfg.seed, "self_instruct", r)
    prompts = []
    for _ in range(cfg.batch_size):
      machine = min(len(self.generated), cfg.num_prompt_instructions // 4)
      human = min(cfg.num_prompt_instructions - machine, len(self.seeds))
      examples = (rng.sample(self.seeds, human) +
                  rng.sample(self.generated, machine))
      rng.shuffle(examples)
      prompts.append(propose_prompt(examples, cfg.new_per_prompt))
    replies = self.teacher.complete(prompts, cfg.max_new_tokens,
                                    cfg.temperature,
                                    _derive(cfg.seed, "propose", r))
    if all(reply is None for reply in replies):
      return _Round([], stats, outage=True)
    # Candidates are checked against the pool and the round's earlier ones.
    round_index = NoveltyIndex(cfg.rouge_threshold)
    candidates = []
    for p, reply in enumerate(replies):
      where = f"round {r} prompt {p}"
      if reply is None:
        stats.add(readers.Drop("propose_failed", where))
        continue
      proposed = parse_proposals(reply)
      if not proposed:
        stats.add(readers.Drop("unparsable_proposal",
                               f"{where}: {_snippet(reply)!r}"))
        continue
      for text in proposed:
        stats.note("proposed_instructions")
        reason = instruction_problem(text)
        if reason is None and (self.index.is_duplicate(text) or
                               round_index.is_duplicate(text)):
          reason = "duplicate"
        detail = ""
        if reason is None:
          score, other = max(self.index.most_similar(text),
                             round_index.most_similar(text),
                             key=lambda x: x[0])
          if score >= cfg.rouge_threshold:
            reason = "rouge_similar"
            detail = f" ~ {_snippet(other or '', 50)!r} ({score:.2f})"
        if reason is not None:
          stats.add(readers.Drop(reason, f"round {r}: {_snippet(text)!r}"
                                 f"{detail}"))
          continue
        round_index.add(text)
        candidates.append(text)
    replies = self.teacher.complete(
        [instance_prompt(t) for t in candidates], cfg.max_new_tokens,
        cfg.temperature, _derive(cfg.seed, "instances", r))
    records = []
    for text, reply in zip(candidates, replies):
      where = f"round {r}: {_snippet(text)!r}"
      if reply is None:
        stats.add(readers.Drop("instance_failed", where))
        continue
      parsed = parse_instance(reply)
      if parsed is None:
        stats.add(readers.Drop("unparsable_instance", where))
        continue
      extra, output = parsed
      reason = ("empty_output" if not output else
                _conversation_problem(text, extra, output))
      if reason is not None:
        stats.add(readers.Drop(reason, where))
        continue
      records.append(_Record(text, extra, output, {"round": r}))
    return _Round(records, stats)

  def accept(self, record: _Record) -> None:
    self.generated.append(record.instruction)
    self.index.add(record.instruction)


class _EvolInstruct:
  def __init__(self, config: GenerateConfig, teacher: Teacher,
               seeds: Sequence[SeedTask], records: Sequence[dict[str, Any]]):
    self.config, self.teacher = config, teacher
    self.seeds = [t.text for t in seeds]
    self.seen = {_normalize(t) for t in self.seeds}
    self.seen.update(_normalize(r["messages"][0]["content"]) for r in records)

  def _start(self, lineage: int) -> tuple[str, str]:
    n = len(self.seeds)
    order = list(range(n))
    _rng(self.config.seed, "evol_order", lineage // n).shuffle(order)
    i = order[lineage % n]
    return self.seeds[i], f"seed:{i}"

  def round(self, r: int) -> _Round:
    cfg, stats = self.config, ChatStats()
    lineages = [r * cfg.batch_size + j for j in range(cfg.batch_size)]
    current: dict[int, tuple[str, str | int]] = {
        lin: self._start(lin) for lin in lineages}
    records = []
    for g in range(1, cfg.generations + 1):
      ops = {lin: _rng(cfg.seed, "evol_op", lin, g).choice(OPERATIONS)
             for lin in lineages}
      evolved = self.teacher.complete(
          [evolve_prompt(ops[lin], current[lin][0]) for lin in lineages],
          cfg.max_new_tokens, cfg.temperature,
          _derive(cfg.seed, "evolve", r, g))
      if g == 1 and all(e is None for e in evolved):
        return _Round([], stats, outage=True)
      good = []
      for lin, text in zip(lineages, evolved):
        stats.note("evolutions_attempted")
        stats.note(f"operation_{ops[lin]}")
        where = f"round {r} lineage {lin} generation {g} ({ops[lin]})"
        if text is None:
          stats.add(readers.Drop("evolve_failed", where))
          continue
        text = _strip_quotes(text)
        reason = evolution_problem(current[lin][0], text, ops[lin])
        if reason is None and _normalize(text) in self.seen:
          reason = "duplicate"
        if reason is not None:
          stats.add(readers.Drop(reason, f"{where}: {_snippet(text)!r}"))
          continue
        good.append((lin, text))
      replies = self.teacher.complete(
          [[{"role": USER, "content": text}] for _, text in good],
          cfg.max_new_tokens, cfg.temperature,
          _derive(cfg.seed, "respond", r, g))
      for (lin, text), reply in zip(good, replies):
        where = f"round {r} lineage {lin} generation {g}: {_snippet(text)!r}"
        if reply is None:
          stats.add(readers.Drop("response_failed", where))
          continue
        reason = (response_problem(reply) or
                  _conversation_problem(text, "", reply.strip()))
        if reason is not None:
          stats.add(readers.Drop(reason, where))
          continue
        self.seen.add(_normalize(text))
        # parent: a seed ("seed:N") or the index of a record of this round,
        # made its id when written.
        records.append(_Record(text, "", reply.strip(), {
            "round": r, "lineage": lin, "generation": g,
            "operation": ops[lin], "parent": current[lin][1]}))
        current[lin] = (text, len(records) - 1)
    return _Round(records, stats)

  def accept(self, record: _Record) -> None:
    self.seen.add(_normalize(record.instruction))


def generate(method: str, teacher: Teacher, output: str,
             config: GenerateConfig | None = None,
             seed_tasks: Sequence[SeedTask] | None = None,
             stats_path: str | None = None, max_rounds: int | None = None,
             progress: Callable[[str], None] | None = None
             ) -> dict[str, Any]:
  """Generates (or resumes) `config.num_instructions` conversations into
  `output` (JSONL); returns the stats written to `stats_path`
  (default FILE.stats.json).

  max_rounds: stop after this many rounds in this call (resume later).
  Raises ResumeError (output and checkpoint disagree, or other settings),
  TeacherUnavailable, Stalled; the output up to the last round is kept.
  """
  config = dataclasses.replace(config or GenerateConfig(), method=method)
  config.validate()
  progress = progress or (lambda message: None)
  seeds = list(seed_tasks) if seed_tasks is not None else default_seed_tasks()
  if not seeds:
    raise ValueError("no seed tasks")
  digest = hashlib.sha256("\n\0".join(t.text for t in seeds).encode()
                          ).hexdigest()[:16]
  stats_path = stats_path or stats_path_for(output)
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  ckpt = Checkpoint(
      output, stats_path, {**config.resume_key(), "seed_tasks": digest},
      teacher, progress, header={"method": config.method,
                                 "num_instructions": config.num_instructions},
      flag_names={"seed_tasks": "--seed_tasks (the seed task set)"})
  ckpt.load()
  if not os.path.exists(stats_path):
    # The first checkpoint (no rounds, no records) before any record is
    # written, so a kill during round 1 resumes like any other.
    ckpt.write_stats(False)
  target = config.num_instructions
  if len(ckpt.records) >= target:
    progress(f"{output} already holds {len(ckpt.records)} records "
             f"(--num_instructions={target}); nothing to do")
    return ckpt.write_stats(True)
  kind = _SelfInstruct if method == "self_instruct" else _EvolInstruct
  gen = kind(config, teacher, seeds, ckpt.records)

  def to_rows(records: list[_Record], base: int) -> list[dict[str, Any]]:
    ids = lambda k: f"{method}-{config.seed}-{base + k:06d}"
    rows = []
    for k, rec in enumerate(records[:target - base]):
      if isinstance(rec.meta.get("parent"), int):
        rec.meta["parent"] = ids(rec.meta["parent"])
      conv = Conversation(ids(k), (Turn(USER, rec.instruction, rec.input),
                                   Turn(ASSISTANT, rec.output)))
      rows.append({**conv.to_json(),
                   "meta": {"method": method, **rec.meta}})
      gen.accept(rec)
    return rows

  return run_rounds(ckpt, teacher, config, gen.round, to_rows,
                    lambda records, rounds: records >= target,
                    max_rounds=max_rounds, target=target, progress=progress)


def run_rounds(ckpt: Checkpoint, teacher: Teacher, guards: Any,
               next_round: Callable[[int], Round],
               to_rows: Callable[[list[Any], int], list[dict[str, Any]]],
               finished: Callable[[int, int], bool],
               max_rounds: int | None = None, target: int | None = None,
               progress: Callable[[str], None] | None = None
               ) -> dict[str, Any]:
  """The resumable round loop shared by the generators: round
  `ckpt.rounds_done` is `next_round(r)`; its records become JSON rows
  (`to_rows(records, records_so_far)`), appended and checkpointed (an
  interruption loses at most the round in progress). Stops when
  `finished(records, rounds_done)`, after `max_rounds` rounds in this call,
  or raises: TeacherUnavailable after `guards.max_outage_rounds` outages in
  a row (waiting `guards.outage_wait_s` * 2**k between), Stalled after
  `guards.max_idle_rounds` rounds in a row without a record. Returns the
  stats written."""
  progress = progress or (lambda message: None)
  idle = outages = rounds = 0
  while not finished(len(ckpt.records), ckpt.rounds_done):
    if max_rounds is not None and rounds >= max_rounds:
      break
    r = ckpt.rounds_done
    result = next_round(r)
    if result.outage:
      outages += 1
      failures = {k: v for k, v in teacher.counts.items()
                  if k.startswith("failed_")}
      if outages >= guards.max_outage_rounds:
        ckpt.write_stats(False)
        raise TeacherUnavailable(
            f"every request to the teacher ({teacher.describe()}) failed in "
            f"{outages} attempts in a row at round {r} (failures so far: "
            f"{failures}); {len(ckpt.records)} records are kept in "
            f"{ckpt.output}: rerun the same command to resume")
      wait = guards.outage_wait_s * 2 ** (outages - 1)
      progress(f"round {r}: every teacher request failed ({failures}); "
               f"retrying in {wait:.0f}s")
      time.sleep(wait)
      continue
    outages = 0
    rounds += 1
    base = len(ckpt.records)
    rows = to_rows(result.records, base)
    result.stats.note("records", len(rows))
    complete = finished(base + len(rows), r + 1)
    ckpt.commit(rows, result.stats, complete)
    dropped = sum(result.stats.counts.values())
    of = f"/{target}" if target is not None else " in all"
    progress(f"round {r}: +{len(rows)} records ({base + len(rows)}{of}),"
             f" {dropped} dropped")
    idle = 0 if rows else idle + 1
    if idle >= guards.max_idle_rounds and not complete:
      raise Stalled(
          f"no new record in {idle} rounds in a row (drops so far: "
          f"{dict(ckpt.stats.counts)}); {len(ckpt.records)} records are in "
          f"{ckpt.output}")
  return ckpt.write_stats(finished(len(ckpt.records), ckpt.rounds_done))


__all__ = [
    "Checkpoint", "GenerateConfig", "IN_BREADTH", "IN_DEPTH", "METHODS", "NativeTeacher",
    "NoveltyIndex", "OPERATIONS", "OpenAITeacher", "ResumeError", "SeedTask",
    "Stalled", "Teacher", "TeacherError", "TeacherUnavailable",
    "default_seed_tasks", "evolution_problem", "evolve_prompt", "generate",
    "instance_prompt", "instruction_problem", "parse_instance",
    "parse_proposals", "propose_prompt", "read_seed_tasks",
    "response_problem", "Round", "run_rounds", "stats_path_for",
]
