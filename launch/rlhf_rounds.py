r"""Online iterative RLHF: rounds of sample -> label -> retrain the reward
model -> PPO, each round starting from the best policy so far.

  python -m launch.rlhf_rounds --config=configs/rlhf_rounds.py:tiny \
      --workdir=DIR --config.policy=SFT_DIR --config.reward_model=RM_DIR \
      --config.prompts=PROMPTS.jsonl \
      [--config.comparisons.train_files=CMP/train.jsonl \
       --config.comparisons.eval_files=CMP/eval.jsonl] \
      [--config.rounds=2] [--config.labeller.name=reward_model|judge|human]

Round N writes DIR/round_NNN/:

  samples.jsonl       K = sampling.responses_per_prompt responses to each of
                      sampling.prompts_per_round prompts (a seeded draw per
                      round from config.prompts), sampled at
                      sampling.temperature from the best policy so far
  comparisons.jsonl   the samples ranked by the labeller (comparisons.py's
                      schema; _train / _eval: split by prompt, the held-out
                      share is sampling.eval_fraction); label_summary.json
                      counts what was kept and dropped
  reward/             launch.reward fine-tuning the reward model of record
                      (its head kept) on the old comparisons
                      (config.comparisons) plus every round's new ones so far
  reward_compared.json  pair accuracy of the reward model of record and of
                      the retrained one on the same held-out comparisons
                      (the old ones and every round's new ones), scored
                      the same way, overall and per source
  ppo/                launch.ppo from the best policy against that new
                      reward model (the KL reference is the round's start)
  summary.json        the round's numbers

and DIR/rounds.json holds every finished round's numbers, the best policy
and the reward model of record; the same table is printed.

The reward model of record is config.reward_model before round 1, then the
last round's reward/reward_model. The best policy is config.policy, then a
round's ppo/model when PPO raised the held-out reward (launch.ppo's
before/after, both under that round's reward model); otherwise the round's
starting policy stays the best.

Labellers (labeller.name):
  reward_model  ranks each prompt's K samples by the reward model of
                record's score (read as launch.reward reads it in training);
                responses within labeller.min_score_gap of a better one are
                ties: left out, counted. Retraining on these labels teaches
                the reward model nothing it did not already prefer; it moves
                its training data onto the policy's own samples.
  judge         the same with another reward model (labeller.judge_model),
                e.g. a larger one: the new labels carry its preferences.
  human         writes DIR/round_NNN/to_label.jsonl (data/comparisons.py's
                export_for_labelling) and stops with exit status 3; fill it
                (a letter in "preferred" or all letters best first in
                "ranking"), save it as DIR/round_NNN/labels.jsonl (or pass
                --config.labeller.labels_file=FILE) and rerun: the import
                validates every line, keeps the labelled ones and writes the
                rest (missing, bad or contradictory labels) to
                needs_attention.jsonl, counted.
Comparisons a model ranks are not human preferences; their records' origin,
label_summary.json, summary.json and rounds.json say so.

Resuming: rerun the same command. A finished round (its summary.json) is
read back; inside a round each step is skipped when its output exists
(samples.jsonl, comparisons.jsonl, reward/summary.json, ppo/summary.json),
and a stage that was cut off resumes from its own checkpoints, so a killed
run continues at the round and step it reached. The first run saves the
config in DIR/config.json; a rerun may raise config.rounds or change the
labeller (for the rounds not labelled yet: e.g. reward-model rounds, then
human ones), but any other change is refused (it would mix two runs). The stages
run as subprocesses (their output goes to the console and to
round_NNN/{reward,ppo}.log); on SIGTERM the running stage gets SIGTERM too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch.flags import quiet_library_logs
from mllm_jax.configlib import ConfigError, check, check_choice
from mllm_jax.convert import native
from mllm_jax.data import chat, readers
from mllm_jax.data import comparisons as cmp
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.eval.chat_eval import end_of_turn
from mllm_jax.generate.sampler import Sampler
from mllm_jax.generate.sampling import SamplingParams
from mllm_jax.rl import reward as reward_lib
from mllm_jax.rl.prompts import read_prompts, split_held_out

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Rounds config file and preset, e.g. "
    "configs/rlhf_rounds.py:tiny; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELLERS = ("reward_model", "judge", "human")
WAITING_FOR_LABELS = 3  # exit status of a run that waits for human labels
# Fields a rerun may change (each round records the labeller it used); the
# others define the rounds already done.
MAY_CHANGE = ("rounds", "labeller.name", "labeller.judge_model",
              "labeller.labels_file")


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated config, every path absolute."""
  rounds: int
  seed: int
  policy: str
  reward_model: str
  prompts: str
  format: str
  old_train: tuple[str, ...]
  old_eval: tuple[str, ...]
  prompts_per_round: int
  k: int
  max_new_tokens: int
  temperature: float
  max_prompt_tokens: int
  batch_size: int
  eval_fraction: float
  labeller: str
  judge_model: str
  min_score_gap: float
  labels_file: str
  reward_config: str
  reward_max_responses: int
  reward_args: tuple[str, ...]
  ppo_config: str
  ppo_args: tuple[str, ...]
  # launch.ppo's data.max_prompt_tokens and data.eval_prompts: the rounds
  # never sample the prompts PPO holds out to measure itself.
  ppo_max_prompt_tokens: int
  ppo_eval_prompts: int


def _model_dir(path: str, field: str, reward: bool) -> str:
  check(bool(path), field, "give a directory" + (
      " (launch.reward's WORKDIR/reward_model)" if reward else
      " (a native checkpoint, e.g. launch.sft's WORKDIR/model)"))
  path = os.path.abspath(path)
  check(os.path.isdir(path), field, f"{path} is not a directory")
  need = "reward.json" if reward else "model_config.json"
  check(os.path.exists(os.path.join(path, need)), field,
        f"{path} has no {need} (not a "
        f"{'reward model' if reward else 'native checkpoint'})")
  return path


def _files(patterns: str, field: str) -> tuple[str, ...]:
  try:
    return tuple(os.path.abspath(p) for p in readers.expand(patterns)) if (
        patterns) else ()
  except FileNotFoundError as e:
    raise ConfigError(f"{field}: {e}") from e


def load_preset(spec: str, field: str):
  """The stage config `FILE.py:PRESET` names (FILE relative to the current
  directory or the repository), as the stage binary will build it."""
  file, _, preset = spec.partition(":")
  check(bool(file) and bool(preset), field,
        f"{spec!r}: write it as configs/FILE.py:PRESET")
  path = file if os.path.exists(file) else os.path.join(REPO, file)
  check(os.path.exists(path), field, f"{file} does not exist")
  module_spec = importlib.util.spec_from_file_location("stage_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return f"{os.path.abspath(path)}:{preset}", module.get_config(preset)
  except ValueError as e:
    raise ConfigError(f"{field}: {e}") from e


def ppo_held_out_setting(preset, args: Sequence[str]) -> tuple[int, int]:
  """(data.max_prompt_tokens, data.eval_prompts) of the PPO runs: the
  preset's, or the last of ppo.args that sets them (as the binary reads
  its flags)."""
  values = {"max_prompt_tokens": preset.data.max_prompt_tokens,
            "eval_prompts": preset.data.eval_prompts}
  for arg in args:
    for name in values:
      prefix = f"--config.data.{name}="
      if arg.startswith(prefix):
        value = arg[len(prefix):]
        check(value.isdigit(), "ppo.args", f"{arg!r}: a whole number")
        values[name] = int(value)
  return values["max_prompt_tokens"], values["eval_prompts"]


def settings(config) -> Settings:
  """Validates the config before anything loads; errors name the field."""
  check(isinstance(config.rounds, int) and config.rounds >= 1, "rounds",
        f"must be a whole number >= 1, got {config.rounds!r}")
  lab = config.labeller
  check_choice(lab.name, LABELLERS, "labeller.name")
  s = config.sampling
  check(s.responses_per_prompt >= 2, "sampling.responses_per_prompt",
        f"a comparison needs >= 2 responses, got {s.responses_per_prompt}")
  check(s.prompts_per_round >= 1, "sampling.prompts_per_round",
        f"must be >= 1, got {s.prompts_per_round}")
  check(s.max_new_tokens >= 1, "sampling.max_new_tokens",
        f"must be >= 1, got {s.max_new_tokens}")
  check(s.temperature > 0, "sampling.temperature", f"must be > 0 (greedy "
        f"samples of one prompt are all the same), got {s.temperature}")
  check(s.batch_size >= 1, "sampling.batch_size", "must be >= 1")
  check(0.0 <= s.eval_fraction < 1.0, "sampling.eval_fraction",
        f"must be in [0, 1), got {s.eval_fraction}")
  check(lab.min_score_gap >= 0, "labeller.min_score_gap", "must be >= 0")
  judge = ""
  if lab.name == "judge":
    judge = _model_dir(lab.judge_model, "labeller.judge_model", reward=True)
  else:
    check(not lab.judge_model, "labeller.judge_model",
          f"is only read by labeller.name='judge', not {lab.name!r}")
  check(bool(config.prompts), "prompts", "give a JSONL of prompts "
        "(comparison records or {\"prompt\": ...})")
  prompts = os.path.abspath(config.prompts)
  check(os.path.isfile(prompts), "prompts", f"{prompts} does not exist")
  check(not config.comparisons.eval_files or config.comparisons.train_files,
        "comparisons.eval_files", "given without comparisons.train_files")
  reward_config, reward_preset = load_preset(config.reward.config,
                                             "reward.config")
  ppo_config, ppo_preset = load_preset(config.ppo.config, "ppo.config")
  for field in ("reward.args", "ppo.args"):
    args = config.reward.args if field == "reward.args" else config.ppo.args
    check(isinstance(args, (tuple, list)) and all(
        isinstance(a, str) and a.startswith("--") for a in args), field,
          f"must be a tuple of flags like ('--config.train.steps=50',), "
          f"got {args!r}")
  return Settings(
      rounds=config.rounds, seed=config.seed,
      policy=_model_dir(config.policy, "policy", reward=False),
      reward_model=_model_dir(config.reward_model, "reward_model",
                              reward=True),
      prompts=prompts, format=config.format,
      old_train=_files(config.comparisons.train_files,
                       "comparisons.train_files"),
      old_eval=_files(config.comparisons.eval_files,
                      "comparisons.eval_files"),
      prompts_per_round=s.prompts_per_round, k=s.responses_per_prompt,
      max_new_tokens=s.max_new_tokens, temperature=s.temperature,
      max_prompt_tokens=s.max_prompt_tokens, batch_size=s.batch_size,
      eval_fraction=s.eval_fraction, labeller=lab.name, judge_model=judge,
      min_score_gap=lab.min_score_gap,
      labels_file=os.path.abspath(lab.labels_file) if lab.labels_file
      else "",
      reward_config=reward_config,
      reward_max_responses=max(s.responses_per_prompt,
                               reward_preset.data.max_responses),
      reward_args=tuple(config.reward.args), ppo_config=ppo_config,
      ppo_args=tuple(config.ppo.args),
      **dict(zip(("ppo_max_prompt_tokens", "ppo_eval_prompts"),
                 ppo_held_out_setting(ppo_preset, config.ppo.args))))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else (
          value)
  return out


def check_same_run(workdir: str, config) -> None:
  """Saves the config on the first run; refuses a rerun that changes what
  the finished rounds were made with."""
  path = os.path.join(workdir, "config.json")
  now = _flat(config.to_dict())
  if os.path.exists(path):
    with open(path) as f:
      saved = _flat(json.load(f))
    changed = sorted(k for k in set(now) | set(saved)
                     if k not in MAY_CHANGE and now.get(k) != saved.get(k))
    if changed:
      field = changed[0]
      raise ConfigError(
          f"{field}: {now.get(field)!r} differs from {saved.get(field)!r} "
          f"of the run in {workdir} (changed: {changed}); a rerun may "
          f"change only {list(MAY_CHANGE)}: use a new --workdir for "
          f"another run")
  else:
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, config.to_dict())


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=float)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# Sampling from the best policy so far
# ----------------------------------------------------------------------------


def round_prompts(s: Settings, round_index: int, tokenizer, fmt):
  """sampling.prompts_per_round distinct prompts, a seeded draw per round:
  [(prompt pairs, ids)], and the drops (unreadable records, too long, held
  out by the PPO runs: a reward model trained on samples of those prompts
  would inflate PPO's held-out reward)."""
  ppo_prompts, _ = read_prompts(s.prompts, tokenizer, fmt,
                                s.ppo_max_prompt_tokens)
  ppo_held_out = {tuple(p) for p in split_held_out(ppo_prompts,
                                                    s.ppo_eval_prompts)[1]}
  drops: dict[str, int] = {}
  unique: dict[str, tuple] = {}
  for item in chat.iter_json_records(s.prompts):
    if isinstance(item, readers.Drop):
      drops[item.reason] = drops.get(item.reason, 0) + 1
      continue
    record, _ = item
    try:
      if not isinstance(record, dict) or "prompt" not in record:
        raise cmp.ComparisonError("missing_prompt")
      prompt = cmp.parse_prompt(record["prompt"])
    except cmp.ComparisonError as e:
      drops[e.reason] = drops.get(e.reason, 0) + 1
      continue
    unique.setdefault(json.dumps(prompt), prompt)
  prompts = list(unique.values())
  order = np.random.default_rng([s.seed, round_index]).permutation(
      len(prompts))
  chosen = []
  for i in order:
    conv = cmp.prompt_conversation(prompts[i], f"prompt:{i}")
    try:
      ids = chat.encode_prompt(conv, tokenizer, fmt).tolist()
    except (chat.ChatFormatError, ValueError):
      drops["bad_prompt"] = drops.get("bad_prompt", 0) + 1
      continue
    if len(ids) > s.max_prompt_tokens:
      drops["prompt_too_long"] = drops.get("prompt_too_long", 0) + 1
      continue
    if tuple(ids) in ppo_held_out:
      drops["ppo_held_out"] = drops.get("ppo_held_out", 0) + 1
      continue
    chosen.append((prompts[i], ids))
    if len(chosen) == s.prompts_per_round:
      break
  check(bool(chosen), "prompts", f"{s.prompts} gives no usable prompt "
        f"(dropped {drops})")
  return chosen, drops


def sample_round(s: Settings, round_index: int, policy_dir: str, fmt_name: str,
                 out_path: str) -> dict[str, Any]:
  """K samples per prompt from `policy_dir` -> samples.jsonl."""
  tokenizer = load_tokenizer(policy_dir)
  fmt = chat.get_format(fmt_name, tokenizer)
  chosen, drops = round_prompts(s, round_index, tokenizer, fmt)
  eot = end_of_turn(fmt, tokenizer)
  _, model = native.load_model(policy_dir)
  sampler = Sampler(model, tokenizer=tokenizer,
                    pad_id=max(tokenizer.pad_id, 0), prompt_multiple=64)
  rows = [(p, k) for p in range(len(chosen)) for k in range(s.k)]
  texts = [[None] * s.k for _ in chosen]
  reasons = [[None] * s.k for _ in chosen]
  for start in range(0, len(rows), s.batch_size):
    part = rows[start:start + s.batch_size]
    gen = sampler.generate(
        [chosen[p][1] for p, _ in part], s.max_new_tokens,
        SamplingParams(temperature=s.temperature),
        stop_tokens=eot.stop_tokens, stop_strings=list(eot.strings),
        seed=s.seed * 1_000_003 + round_index * 1_000 + start)
    for row, (p, k) in enumerate(part):
      reason = gen.stop_reasons[row]
      tokens = gen.tokens[row]
      text = gen.texts[row] if reason == "stop_string" else tokenizer.decode(
          tokens[:-1] if reason == "stop_token" else tokens)
      for stop in eot.strings:
        text = text.split(stop)[0]
      texts[p][k], reasons[p][k] = text.strip(), reason
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for p, (prompt, _) in enumerate(chosen):
      f.write(json.dumps({
          "id": f"round_{round_index:03d}:{p}",
          "prompt": [{"role": r, "content": c} for r, c in prompt],
          "responses": texts[p], "stop_reasons": reasons[p],
          "policy": policy_dir}, ensure_ascii=False) + "\n")
  os.replace(tmp, out_path)
  ended = np.mean([r == "stop_token" or r == "stop_string"
                   for rs in reasons for r in rs])
  return {"prompts": len(chosen), "responses": len(chosen) * s.k,
          "ended": float(ended), "prompt_drops": drops}


def unranked(samples_path: str, round_index: int, labeller: str
             ) -> tuple[list[cmp.Comparison], dict[str, int]]:
  """Each sample record's distinct non-empty responses as a comparison in
  sample order (the labeller ranks it); records left with < 2 responses
  are dropped, counted."""
  out, drops = [], {"duplicate_responses": 0, "empty_responses": 0,
                    "fewer_than_two_distinct": 0}
  for line in open(samples_path, encoding="utf-8"):
    record = json.loads(line)
    responses = []
    for text in record["responses"]:
      if not text:
        drops["empty_responses"] += 1
      elif text in responses:
        drops["duplicate_responses"] += 1
      else:
        responses.append(text)
    if len(responses) < 2:
      drops["fewer_than_two_distinct"] += 1
      continue
    out.append(cmp.parse_comparison({
        "id": record["id"], "prompt": record["prompt"],
        "responses": responses, "ranking": list(range(len(responses))),
        "source": f"rlhf_round_{round_index:03d}:{labeller}",
        "origin": cmp.synthetic_origin("unranked policy samples")}))
  return out, drops


# ----------------------------------------------------------------------------
# Labellers
# ----------------------------------------------------------------------------


def rank_by_scores(scores: Sequence[float], min_gap: float
                   ) -> tuple[list[int], int]:
  """(kept response indices best first, ties left out): a response
  within `min_gap` of the last kept better one is a tie."""
  order = sorted(range(len(scores)), key=lambda i: -scores[i])
  kept = [order[0]]
  for i in order[1:]:
    if scores[kept[-1]] - scores[i] > min_gap:
      kept.append(i)
  return kept, len(scores) - len(kept)


def model_scores(rm_dir: str, comparisons: Sequence[cmp.Comparison],
                 k: int) -> tuple[list[list[float] | None], dict]:
  """The reward model's score of every response, read as launch.reward
  reads it in training (its tokenizer, chat format and end-of-context,
  the same rows); None for a comparison that does not encode."""
  model, info = reward_lib.load_reward_model(rm_dir)
  tokenizer = load_tokenizer(rm_dir)
  fmt = chat.get_format(info["format"], tokenizer)
  seq_len = model.cfg.max_seq_len
  stats = chat.ChatStats()
  encoded = [cmp.encode_comparison(c, tokenizer, fmt, seq_len + 1,
                                   int(info["end_of_context_id"]), stats)
             for c in comparisons]
  usable = [i for i, e in enumerate(encoded) if e is not None]
  scores: list[list[float] | None] = [None] * len(comparisons)
  if usable:
    batches = cmp.ComparisonIterator(
        [encoded[i] for i in usable],
        [comparisons[i].ranking for i in usable], comparisons_per_batch=16,
        max_responses=k, seq_len=seq_len)
    position = 0
    for batch in batches:
      rewards = reward_lib.score_rows(
          model, batch["inputs"], batch["segment_ids"],
          batch["positions"]).reshape(batch["ranks"].shape)
      for row in range(rewards.shape[0]):
        if position < len(usable):
          i = usable[position]
          scores[i] = [float(x) for x in rewards[row, :comparisons[i].k]]
        position += 1
  return scores, stats.summary()["dropped"]


def label_by_model(comparisons, rm_dir: str, s: Settings, what: str
                   ) -> tuple[list[cmp.Comparison], dict[str, Any]]:
  """Ranks each comparison's responses by `rm_dir`'s scores."""
  scores, encode_drops = model_scores(rm_dir, comparisons, s.k)
  out, ties, too_few, best, gaps = [], 0, 0, [], []
  origin = cmp.synthetic_origin(f"policy samples ranked by the score of "
                                f"{what} {rm_dir}")
  for c, sc in zip(comparisons, scores):
    if sc is None:
      continue
    kept, tied = rank_by_scores(sc, s.min_score_gap)
    ties += tied
    if len(kept) < 2:
      too_few += 1
      continue
    keep = sorted(kept)  # responses stay in sample order
    out.append(dataclasses.replace(
        c, responses=tuple(c.responses[i] for i in keep),
        ranking=tuple(keep.index(i) for i in kept), origin=origin))
    best.append(sc[kept[0]])
    gaps.append(sc[kept[0]] - sc[kept[-1]])
  return out, {
      "scored_by": rm_dir, "ties_left_out": ties,
      "fewer_than_two_after_ties": too_few,
      "not_encodable": encode_drops or {},
      "mean_best_score": float(np.mean(best)) if best else None,
      "mean_best_minus_worst": float(np.mean(gaps)) if gaps else None,
      "note": f"ranked by {what}: NOT human preferences"}


def label_by_human(comparisons, round_dir: str, s: Settings
                   ) -> tuple[list[cmp.Comparison] | None, dict[str, Any]]:
  """Exports the labelling file, or imports the filled one: (None, ...)
  while the labels are not there."""
  to_label = os.path.join(round_dir, "to_label.jsonl")
  labels = s.labels_file or os.path.join(round_dir, "labels.jsonl")
  if not os.path.exists(labels):
    if not os.path.exists(to_label):
      cmp.export_for_labelling(to_label, comparisons)
    return None, {"to_label": to_label, "labels_file": labels}
  labelled, attention, counts = cmp.import_labels(labels)
  with open(os.path.join(round_dir, "needs_attention.jsonl"), "w",
            encoding="utf-8") as f:
    for line in attention:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  check(bool(labelled), "labeller.labels_file",
        f"{labels} has no usable label ({counts['needs_attention']}); see "
        f"{round_dir}/needs_attention.jsonl")
  return labelled, {"labels_file": labels, **counts,
                    "note": "labelled by a person (origin human)"}


# ----------------------------------------------------------------------------
# The stages, as subprocesses
# ----------------------------------------------------------------------------

_running: list[subprocess.Popen] = []


def _forward_sigterm(signum, frame):
  del frame
  for proc in _running:
    proc.send_signal(signum)
    proc.wait()
  sys.exit(128 + signum)


def run_stage(binary: str, args: Sequence[str], log_path: str,
              round_index: int) -> None:
  """`python -m launch.BINARY ARGS` from the repository root; its output
  goes to the console and to `log_path`. Exits naming the stage when it
  fails."""
  command = [sys.executable, "-m", f"launch.{binary}", *args]
  print(f"round {round_index}: {shlex.join(command[1:])}", flush=True)
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"$ {shlex.join(command)}\n")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _running.append(proc)
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if line.strip() and "%|" not in line:  # no progress bars
        print(f"  [{binary}] {line}", end="", flush=True)
    code = proc.wait()
    _running.remove(proc)
  if code:
    sys.exit(f"error: round {round_index}: launch.{binary} failed (exit "
             f"status {code}); its output is in {log_path}; rerun this "
             f"command to resume")


def comparison_files(s: Settings, round_dirs: Sequence[str], part: str
                     ) -> list[str]:
  """Every round's new comparisons so far (newest first), then the old
  ones: part "train" or "eval"."""
  new = [os.path.join(d, f"comparisons_{part}.jsonl")
         for d in reversed(round_dirs)]
  return [f for f in new if os.path.getsize(f)] + list(
      s.old_train if part == "train" else s.old_eval)


def reward_args(s: Settings, round_dir: str, rm_of_record: str,
                fmt_name: str, round_dirs: Sequence[str]) -> list[str]:
  """Fine-tune the reward model of record on old plus every round's new
  comparisons, held out: all of the old and new held-out ones."""
  evals = comparison_files(s, round_dirs, "eval")
  args = [f"--config={s.reward_config}",
          f"--workdir={os.path.join(round_dir, 'reward')}",
          f"--config.init_checkpoint={rm_of_record}",
          "--config.data.train_files="
          + ",".join(comparison_files(s, round_dirs, "train")),
          f"--config.data.format={fmt_name}",
          f"--config.data.max_responses={s.reward_max_responses}",
          "--config.data.eval_comparisons=0"]
  if evals:
    args.append(f"--config.data.eval_files={','.join(evals)}")
  return args + list(s.reward_args)


def ppo_args(s: Settings, round_dir: str, policy: str, fmt_name: str
             ) -> list[str]:
  new_rm = os.path.join(round_dir, "reward", "reward_model")
  return [f"--config={s.ppo_config}",
          f"--workdir={os.path.join(round_dir, 'ppo')}",
          f"--config.init_checkpoint={policy}",
          f"--config.reward_model={new_rm}",
          f"--config.data.prompts={s.prompts}",
          f"--config.data.format={fmt_name}", *s.ppo_args]


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------


def compare_reward_models(before: str, after: str, files: Sequence[str]
                          ) -> dict[str, Any] | None:
  """Pair accuracy of the reward model of record (`before`) and of the
  retrained one (`after`) on the same held-out comparisons, scored the
  same way (a tie counts as wrong), overall and per source."""
  if not files:
    return None
  held_out = cmp.read_comparisons(list(files))
  k = max(c.k for c in held_out)
  old, new = (model_scores(rm_dir, held_out, k)[0] for rm_dir in (before,
                                                                 after))
  counts: dict[str, np.ndarray] = {}  # group -> [pairs, right before, after]
  for c, o, n in zip(held_out, old, new):
    if o is None or n is None:
      continue
    pair_counts = np.array([len(c.pairs()),
                            sum(o[b] > o[w] for b, w in c.pairs()),
                            sum(n[b] > n[w] for b, w in c.pairs())])
    for group in ("all", c.source):
      counts[group] = counts.get(group, 0) + pair_counts
  if not counts:
    return None
  per = {g: {"pairs": int(x[0]), "before": x[1] / x[0], "after": x[2] / x[0]}
         for g, x in counts.items()}
  return {**per.pop("all"), "before_model": before, "after_model": after,
          "per_source": per}


def round_summary(round_index: int, round_dir: str, policy: str,
                  rm_of_record: str, sampled: dict, labelled: dict
                  ) -> dict[str, Any]:
  reward = _read_json(os.path.join(round_dir, "reward", "summary.json"))
  ppo = _read_json(os.path.join(round_dir, "ppo", "summary.json"))
  kls = [r["kl"] for r in map(json.loads, open(os.path.join(
      round_dir, "ppo", "metrics.jsonl"))) if "kl" in r]
  before, after = ppo["before"]["reward"], ppo["after"]["reward"]
  improved = after > before
  return {
      "round": round_index, "sampled_from": policy,
      "labeller": labelled["labeller"],
      "reward_model_of_record": rm_of_record,
      "samples": sampled, "labels": labelled,
      "new_comparisons": {"train": labelled["train"],
                          "eval": labelled["eval"]},
      "reward_model": {
          "dir": os.path.join(round_dir, "reward", "reward_model"),
          "train_comparisons": reward["train_data"]["notes"].get("encoded"),
          "held_out": _read_json(os.path.join(round_dir,
                                              "reward_compared.json"))},
      "ppo": {"reward_before": before, "reward_after": after,
              "ended_before": ppo["before"]["ended"],
              "ended_after": ppo["after"]["ended"],
              "kl_last_iteration": kls[-1] if kls else None,
              "kl_mean": float(np.mean(kls)) if kls else None,
              "iterations": len(kls), "final_beta": ppo["final_beta"],
              "held_out_prompts": ppo["prompts"]["held_out"],
              "kl_reference": policy},
      "policy_improved": improved,
      "best_policy_after": (os.path.join(round_dir, "ppo", "model")
                            if improved else policy),
      "note": labelled["note"] + "; PPO rewards are the round's reward "
              "model's scores of replies to held-out prompts (sampled as in "
              "training; greedy_* of greedy replies), KL per reply against "
              "the round's starting policy"}


def _accuracy(held_out: dict | None) -> str:
  if held_out is None:
    return "no held-out comparisons"
  return (f"{held_out['before']:.3f} -> {held_out['after']:.3f} "
          f"({held_out['pairs']} pairs)")


def print_table(rounds: Sequence[dict]) -> None:
  print("round  labeller      new cmp (train/eval)  RM held-out acc "
        "before -> after  PPO reward before -> after  KL(last)  best policy",
        flush=True)
  for r in rounds:
    rm, ppo, new = r["reward_model"], r["ppo"], r["new_comparisons"]
    print(f"{r['round']:>5}  {r['labeller']:<12}  "
          f"{new['train']:>8} / {new['eval']:<8}  "
          f"{_accuracy(rm['held_out']):>24}  "
          f"{ppo['reward_before']:>12.3f} -> {ppo['reward_after']:<8.3f}  "
          f"{ppo['kl_last_iteration'] or 0:>8.4f}  "
          f"{'PPO model' if r['policy_improved'] else 'kept start'}",
          flush=True)


# ----------------------------------------------------------------------------
# The rounds
# ----------------------------------------------------------------------------


def sample_step(s: Settings, r: int, round_dir: str, policy: str,
                fmt_name: str) -> dict[str, Any]:
  samples = os.path.join(round_dir, "samples.jsonl")
  summary = os.path.join(round_dir, "samples_summary.json")
  if os.path.exists(samples):
    print(f"round {r}: samples.jsonl there, not sampled again", flush=True)
  else:
    print(f"round {r}: sampling {s.k} responses to each of "
          f"{s.prompts_per_round} prompts from {policy}", flush=True)
    _write_json(summary, sample_round(s, r, policy, fmt_name, samples))
  return _read_json(summary)


def label_step(s: Settings, r: int, round_dir: str, rm_of_record: str
               ) -> dict[str, Any]:
  """The round's comparisons (written last: comparisons.jsonl marks the
  step done) and label_summary.json; exits while human labels are due."""
  done = os.path.join(round_dir, "comparisons.jsonl")
  summary = os.path.join(round_dir, "label_summary.json")
  if os.path.exists(done):
    print(f"round {r}: comparisons.jsonl there, not labelled again",
          flush=True)
    return _read_json(summary)
  candidates, drops = unranked(os.path.join(round_dir, "samples.jsonl"), r,
                               s.labeller)
  if s.labeller == "human":
    new, counts = label_by_human(candidates, round_dir, s)
    if new is None:
      print(f"round {r}: {len(candidates)} comparisons to label are in "
            f"{counts['to_label']}. {cmp.LABEL_HELP} Save the filled file "
            f"as {counts['labels_file']} (or pass "
            f"--config.labeller.labels_file=FILE) and rerun this command.",
            flush=True)
      sys.exit(WAITING_FOR_LABELS)
  elif s.labeller == "judge":
    new, counts = label_by_model(candidates, s.judge_model, s,
                                 "the judge reward model")
  else:
    new, counts = label_by_model(candidates, rm_of_record, s,
                                 "the reward model of record")
  if not new:
    sys.exit(f"error: round {r}: the labeller kept no comparison ({counts}, "
             f"samples: {drops}); raise sampling.temperature or "
             f"sampling.prompts_per_round")
  train, held_out = cmp.split_by_prompt(new, s.eval_fraction, s.seed + r)
  if not train:
    train, held_out = held_out, []
  cmp.write_comparisons(os.path.join(round_dir, "comparisons_train.jsonl"),
                        train)
  cmp.write_comparisons(os.path.join(round_dir, "comparisons_eval.jsonl"),
                        held_out)
  _write_json(summary, {"labeller": s.labeller, "candidates": len(candidates),
                        "sample_drops": drops, **counts,
                        "comparisons": len(new), "train": len(train),
                        "eval": len(held_out)})
  cmp.write_comparisons(done, new)
  return _read_json(summary)


def stage_step(s: Settings, r: int, round_dir: str, stage: str,
               args: list[str]) -> None:
  if os.path.exists(os.path.join(round_dir, stage, "summary.json")):
    print(f"round {r}: {stage} finished earlier ({stage}/summary.json), not "
          f"run again", flush=True)
  else:
    run_stage(stage, args, os.path.join(round_dir, f"{stage}.log"), r)


def run_round(s: Settings, r: int, round_dir: str, policy: str,
              rm_of_record: str, round_dirs: Sequence[str], fmt_name: str
              ) -> dict[str, Any]:
  """Round r from where it stopped: sample, label, retrain, PPO."""
  os.makedirs(round_dir, exist_ok=True)
  sampled = sample_step(s, r, round_dir, policy, fmt_name)
  labelled = label_step(s, r, round_dir, rm_of_record)
  details = {k: v for k, v in labelled.items() if k in (
      "ties_left_out", "fewer_than_two_after_ties", "lines", "labelled",
      "needs_attention", "sample_drops")}
  print(f"round {r}: {labelled['comparisons']} new comparisons "
        f"({labelled['train']} train / {labelled['eval']} held out) by "
        f"{labelled['labeller']} {details}; {labelled['note']}", flush=True)
  stage_step(s, r, round_dir, "reward",
             reward_args(s, round_dir, rm_of_record, fmt_name, round_dirs))
  compared = os.path.join(round_dir, "reward_compared.json")
  if not os.path.exists(compared):
    print(f"round {r}: scoring the held-out comparisons with the reward "
          f"model of record and the retrained one", flush=True)
    _write_json(compared, compare_reward_models(
        rm_of_record, os.path.join(round_dir, "reward", "reward_model"),
        comparison_files(s, round_dirs, "eval")))
  stage_step(s, r, round_dir, "ppo", ppo_args(s, round_dir, policy, fmt_name))
  return round_summary(r, round_dir, policy, rm_of_record, sampled, labelled)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()  # one process: the stages start their own
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  try:
    s = settings(config)
    check_same_run(workdir, config)
    fmt_name = s.format or reward_lib.read_info(s.reward_model).get(
        "format", "")
    check(bool(fmt_name), "format", "the reward model records no chat "
          "format; name one")
  except ConfigError as e:
    sys.exit(f"error: {e}")
  signal.signal(signal.SIGTERM, _forward_sigterm)

  policy, rm_of_record = s.policy, s.reward_model
  finished, round_dirs = [], []
  for r in range(1, s.rounds + 1):
    round_dir = os.path.join(workdir, f"round_{r:03d}")
    round_dirs.append(round_dir)
    summary_file = os.path.join(round_dir, "summary.json")
    if os.path.exists(summary_file):
      print(f"round {r}: finished earlier (summary.json), read back",
            flush=True)
      summary = _read_json(summary_file)
    else:
      try:
        summary = run_round(s, r, round_dir, policy, rm_of_record,
                            round_dirs, fmt_name)
      except ConfigError as e:
        sys.exit(f"error: round {r}: {e}")
      _write_json(summary_file, summary)
    finished.append(summary)
    policy = summary["best_policy_after"]
    rm_of_record = summary["reward_model"]["dir"]
    _write_json(os.path.join(workdir, "rounds.json"), {
        "rounds": finished, "best_policy": policy,
        "reward_model_of_record": rm_of_record,
        "note": "comparisons ranked by a model are NOT human preferences; "
                "see each round's labels.note"})
    rm, ppo = summary["reward_model"], summary["ppo"]
    print(f"round {r}: reward model held-out pair accuracy "
          f"{_accuracy(rm['held_out'])} (the reward model of record -> "
          f"retrained); "
          f"PPO held-out reward {ppo['reward_before']:.3f} -> "
          f"{ppo['reward_after']:.3f}, KL {ppo['kl_last_iteration']:.4f} "
          f"(last iteration); best policy now {policy}. "
          f"{summary['labels']['note']}", flush=True)
  print_table(finished)
  print(f"rounds.json: {os.path.join(workdir, 'rounds.json')}", flush=True)


if __name__ == "__main__":
  app.run(main)
