r"""DPO step speed on CPU: our DPO step against TRL's `DPOTrainer`, same
model, same weights, same comparison pairs in the same order, same machine,
same run.

  python bench/dpo.py --model=SFT_MODEL [--format=vicuna_v1] [--steps=10]
      [--warmup=3] [--batch=8] [--reference=cached,on_the_fly]
      [--sources=arc_easy,gsm8k,bfcl_simple] [--threads=N]
  python bench/dpo.py --model=smollm2 ...   # SmolLM2-135M-Instruct, ChatML

SFT_MODEL is a native checkpoint with its tokenizer (launch.sft's
WORKDIR/model, e.g. the demo's workdir/demo/sft/model: the tiny model);
`smollm2` imports SmolLM2-135M-Instruct from the fetched GGUF (as
bench/sft_step.py does). The model is exported to the HF layout
(`convert.hf.native_to_hf`) for TRL, so both sides start from the same
weights; each side's log-probability of the first pair's chosen response
is printed as the check.

Data: comparisons built here from real data (`comparison_sources`; NOT
human preferences), each reduced to one pair (K = 3 rankings keep their
best and worst response), encoded once by our chat format
(`comparisons.encode_all`, loss weights on the final assistant turn and its
end of turn) and cut after the last weighted token. TRL gets the very same
token ids as `prompt_ids` / `chosen_ids` / `rejected_ids` (its tokenising
`_prepare_dataset` is skipped: tokenising is set-up, not a step, and this
way no tokenizer difference can creep in) and reads them in order
(sequential sampler); ours reads them in order too
(`ComparisonIterator`, unshuffled), so step i of both sides sees the same
`--batch` pairs. Ours pads every row to one length (the longest example,
rounded up to 8, so one compiled step); TRL pads each batch to its longest
row.

Both sides: full fine-tuning, float32, the sigmoid loss with beta 0.1,
AdamW(0.9, 0.95, eps 1e-8) without weight decay, clipping at 1.0, a constant
learning rate (bench/sft_step.py's settings), no gradient checkpointing,
no dropout. Two reference modes (`--reference`):

  cached      ours: `dpo.reference=cached` (the reference's log-probs
              computed once before training, attached to each batch); TRL:
              `precompute_ref_log_probs=True` (the same, in its __init__).
              Each side's one-off precompute time is printed.
  on_the_fly  ours: a frozen copy of the SFT weights inside the step; TRL:
              `ref_model` left None, so it loads a second copy and runs its
              forward pass every step.

Ours is the trainer's step as `launch.dpo` builds it (configs/dpo.py's
preset through `stage_configs` -> `dpo_task` -> `build_program` ->
`initial_state`, one device, state donated), with bench/train_step.py's
tuned XLA flags. TRL's is `DPOTrainer.train()` itself (its collator, its
fused LM head, `adamw_torch_fused`, sdpa attention) with `bf16=False`,
`use_cpu=True`, in bench/sft_step.py's venv (`.cache/bench-venvs/trl`), one
subprocess per mode, stepping in lock-step with ours (bench/sft_step.py's
protocol: a step is timed from "go" to its end, data loading included).
The first `--warmup` steps of each side are not timed.

Printed: the host first; per side the median step time, steps/s, real
(non-padding) tokens/s; last, for each mode, the ratio ours / TRL of
steps/s (and the load average).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=wrong-import-position
from bench.host import host_line, load_line  # noqa: E402
from bench.sft_step import (CLIP, LEARNING_RATE, Child, Reporter,  # noqa: E402
                            lockstep, optimizer_config, peak_rss_mb,
                            peer_python, smollm2_dir, trl_training_args)
# pylint: enable=wrong-import-position

WORK = os.path.join(REPO, ".cache", "bench-dpo")
BETA = 0.1
MODES = ("cached", "on_the_fly")


# ----------------------------------------------------------------------------
# The pairs, as token ids both sides share
# ----------------------------------------------------------------------------


def as_pair(c):
  """A comparison as one (best, worst) pair."""
  from mllm_jax.data import comparisons as cmp  # pylint: disable=import-outside-toplevel
  if c.k == 2:
    return c
  best, worst = c.ranking[0], c.ranking[-1]
  return cmp.Comparison(c.id, c.prompt, (c.responses[best],
                                         c.responses[worst]), (0, 1),
                        c.source, c.origin)


def trim(example: dict) -> dict:
  """The example cut after its last weighted token (later tokens change
  no log-probability of the response)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  end = int(np.flatnonzero(example["weights"] > 0)[-1]) + 1
  return {"ids": example["ids"][:end], "weights": example["weights"][:end]}


def trl_record(encoded, ranking) -> dict | None:
  """TRL's pre-tokenised record of a pair: the shared prompt ids and each
  response's weighted ids; None when the two rows do not share the prompt
  (a left-truncated prompt cut differently)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rows = [encoded[i] for i in ranking]
  starts = [int(np.flatnonzero(e["weights"] > 0)[0]) for e in rows]
  if starts[0] != starts[1] or not np.array_equal(
      rows[0]["ids"][:starts[0]], rows[1]["ids"][:starts[1]]):
    return None
  for e, s in zip(rows, starts):
    if not (e["weights"][s:] > 0).all():
      return None  # a gap inside the response: TRL has one span
  return {"prompt_ids": rows[0]["ids"][:starts[0]].tolist(),
          "chosen_ids": rows[0]["ids"][starts[0]:].tolist(),
          "rejected_ids": rows[1]["ids"][starts[1]:].tolist()}


def build_pairs(tokenizer, fmt: str, sources: list[str], needed: int,
                max_len: int, seed: int):
  """(comparisons, encodings, TRL records, drop counts): `needed` pairs."""
  # pylint: disable=import-outside-toplevel
  from mllm_jax.data import chat
  from mllm_jax.data import comparison_sources as sources_lib
  from mllm_jax.data import comparisons as cmp
  from mllm_jax.data import readers
  # pylint: enable=import-outside-toplevel
  per_source = -(-needed // len(sources)) * 2
  built, _ = sources_lib.build(sources, per_source, seed)
  stats = chat.ChatStats()
  kept, encoded = cmp.encode_all([as_pair(c) for c in built], tokenizer,
                                 fmt, max_len, stats=stats)
  out = ([], [], [])
  # Interleave the sources, so that every batch mixes them.
  by_source: dict[str, list[int]] = {}
  for i, c in enumerate(kept):
    by_source.setdefault(c.source.split(":")[0], []).append(i)
  order = [i for group in itertools.zip_longest(*by_source.values())
           for i in group if i is not None]
  for i in order:
    enc = [trim(e) for e in encoded[i]]
    record = trl_record(enc, kept[i].ranking)
    if record is None:
      stats.add(readers.Drop("prompts_differ", kept[i].id))
      continue
    for part, value in zip(out, (kept[i], enc, record)):
      part.append(value)
    if len(out[0]) == needed:
      break
  if len(out[0]) < needed:
    raise SystemExit(f"only {len(out[0])} usable pairs of {needed} needed "
                     f"(dropped {stats.summary()['dropped']}); raise the "
                     f"sources or lower --steps/--batch")
  return (*out, stats.summary()["dropped"])


# ----------------------------------------------------------------------------
# TRL's side (runs in the peers' venv: no jax, no mllm_jax)
# ----------------------------------------------------------------------------


def hf_tokenizer(spec: dict):
  """The model's tokenizer for TRL: tokenizer.json where there is one; for
  a SentencePiece model, its vocabulary as a word-level table (TRL only
  reads the pad and end ids: the data is already token ids)."""
  # pylint: disable=import-outside-toplevel
  import tokenizers
  import transformers
  # pylint: enable=import-outside-toplevel
  path = os.path.join(spec["hf_dir"], "tokenizer.json")
  if os.path.exists(path):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  vocab = {piece: i for i, piece in enumerate(spec["pieces"])}
  table = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token=spec["pieces"][spec["unk_id"]]))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=table, eos_token=spec["pieces"][spec["eos_id"]],
      pad_token=spec["pieces"][spec["pad_id"]])


def trl_child(spec: dict, reporter: Reporter) -> None:
  # pylint: disable=import-outside-toplevel
  import datasets
  import torch
  import transformers
  import trl
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(spec["threads"])
  with open(spec["pool"]) as f:
    pool = [json.loads(line) for line in f]
  data = datasets.Dataset.from_list(pool)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
  first = pool[0]
  with torch.no_grad():  # the same-weights check
    ids = torch.tensor([first["prompt_ids"] + first["chosen_ids"]])
    logps = torch.log_softmax(model(input_ids=ids, use_cache=False).logits,
                              -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    start_logp = float(logps[len(first["prompt_ids"]) - 1:].sum())
  config = trl.DPOConfig(
      **trl_training_args(spec), beta=BETA, loss_type=["sigmoid"],
      max_length=None, precompute_ref_log_probs=spec["variant"] == "cached",
      precompute_ref_batch_size=spec["batch"])
  losses, timings = [], {}

  class PreTokenised(trl.DPOTrainer):
    """DPOTrainer on pairs that are already token ids, read in order."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
      return dataset

    def _get_train_sampler(self, *args, **kwargs):
      return torch.utils.data.SequentialSampler(self.train_dataset)

    def _precompute_ref_logps(self, *args, **kwargs):
      start = time.perf_counter()
      out = super()._precompute_ref_logps(*args, **kwargs)
      timings["precompute_s"] = time.perf_counter() - start
      return out

  class LockStep(transformers.TrainerCallback):
    """Blocks at the start and at every step end until the parent says go;
    reports each step's time from "go" to its end."""

    def __init__(self):
      self.start = 0.0

    def _wait(self, control):
      if not reporter.wait():
        control.should_training_stop = True
      self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
      reporter.send("ready", start_logp=start_logp, **timings,
                    params=sum(p.numel() for p in model.parameters()),
                    versions={m.__name__: m.__version__ for m in (
                        torch, transformers, trl, datasets)})
      self._wait(control)

    def on_step_end(self, args, state, control, **kwargs):
      now = time.perf_counter()
      shape = shapes[state.global_step - 1]
      reporter.send("step", time=now - self.start, **shape)
      self._wait(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "loss" in logs:
        losses.append(logs["loss"])

  trainer = PreTokenised(model=model, args=config, train_dataset=data,
                         processing_class=hf_tokenizer(spec),
                         callbacks=[LockStep()])
  collate, shapes = trainer.data_collator, []

  def recording_collator(examples):  # (the precompute used the original)
    out = collate(examples)
    shapes.append({"shape": list(out["input_ids"].shape),
                   "real": int(out["attention_mask"].sum()),
                   "slots": out["input_ids"].numel()})
    return out

  trainer.data_collator = recording_collator
  trainer.train()
  reporter.send("done", losses=losses, peak_rss_mb=peak_rss_mb())


# ----------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------


class Ours:
  """Our DPO step as `launch.dpo` builds it, compiled ahead of the timing;
  `step()` assembles the next batch, copies it in and runs the step."""

  def __init__(self, config, mode: str, kept, encoded, batch: int, seq: int,
               total_steps: int):
    # pylint: disable=import-outside-toplevel
    import jax
    from launch.dpo import batches
    from mllm_jax.convert import native
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import use_mesh
    from mllm_jax.rl import dpo
    from mllm_jax.train.compile import build_program, initial_state
    from mllm_jax.train.config import TrainConfig
    from mllm_jax.train.finetune import stage_configs
    # pylint: enable=import-outside-toplevel
    self.jax, self.use_mesh = jax, use_mesh
    model_cfg, _, _, _, peft_cfg, _ = stage_configs(config)
    parallel = ParallelConfig()
    self.mesh = make_mesh(parallel)
    dpo_cfg = dpo.DPOConfig(beta=BETA, reference=mode)
    task = dpo.dpo_task(model_cfg, peft_cfg, dpo_cfg,
                        init_checkpoint=config.init_checkpoint)
    self.program = build_program(task, parallel, optimizer_config(),
                                 TrainConfig(steps=total_steps), self.mesh)
    self.state, self.frozen = initial_state(self.program, seed=0)
    counts = [c.k for c in kept]
    ref = None
    self.precompute_s = 0.0
    if mode == "cached":
      start = time.perf_counter()
      reference = native.load_model(config.init_checkpoint)[1]
      ref = dpo.comparison_logps(reference, batches(kept, encoded, batch, 2,
                                                    seq), counts)
      self.precompute_s = time.perf_counter() - start
      del reference
    self.batches = batches(kept, encoded, batch, 2, seq, repeat=True,
                           ref_logps=ref)
    first = self._put(next(batches(kept, encoded, batch, 2, seq,
                                   ref_logps=ref)))
    start = time.perf_counter()
    with use_mesh(self.mesh, self.program.rules):
      self.compiled = self.program.step.lower(self.state, self.frozen,
                                              first).compile()
    self.compile_s = time.perf_counter() - start
    self.losses = []

  def _put(self, batch):
    from mllm_jax.rl.dpo import DPO_BATCH  # pylint: disable=import-outside-toplevel
    fields = {k: v for k, v in batch.items()
              if k in DPO_BATCH or k == "ref_logps"}
    return self.jax.device_put(fields, self.program.batch_sharding)

  def step(self) -> dict:
    start = time.perf_counter()
    batch = next(self.batches)
    real = int((batch["segment_ids"] > 0).sum())
    slots = int(batch["segment_ids"].size)
    shape = list(batch["inputs"].shape)
    batch = self._put(batch)
    self.state, out = self.compiled(self.state, self.frozen, batch)
    loss = float(out["loss"])  # waits for the whole step
    self.losses.append(loss)
    return {"time": time.perf_counter() - start, "real": real,
            "slots": slots, "shape": shape}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def summarise(reports: list[dict], warmup: int) -> dict:
  timed = reports[warmup:]
  times = [r["time"] for r in timed]
  return {"median_s": statistics.median(times), "min_s": min(times),
          "steps_per_s": 1 / statistics.median(times),
          "real_per_s": statistics.median(r["real"] / r["time"]
                                          for r in timed),
          "real_fraction": sum(r["real"] for r in timed) / sum(
              r["slots"] for r in timed),
          "others_cpu": sum(r["others_cpu"] for r in timed)}


def describe(name: str, s: dict, losses: list[float]) -> str:
  return (f"{name}: median {s['median_s']:.3f} s/step (min {s['min_s']:.3f})"
          f", {s['steps_per_s']:.2f} steps/s, {s['real_per_s']:.0f} real "
          f"tokens/s, real fraction {s['real_fraction']:.3f}, loss "
          f"{losses[0]:.4f} -> {losses[-1]:.4f}; the waiting sides used "
          f"{s['others_cpu']:.2f} CPU s during its timed steps")


def dpo_config(model: str, fmt: str, batch: int, seq: int, steps: int):
  """configs/dpo.py's preset for this model, as launch.dpo would read it."""
  from configs import dpo as dpo_configs  # pylint: disable=import-outside-toplevel
  config = dpo_configs.get_config("smollm2" if model == "smollm2" else "tiny")
  with config.unlocked():
    config.init_checkpoint = smollm2_dir() if model == "smollm2" else model
    config.peft.method = "none"  # TRL's venv has no peft: both full
    config.data.format = fmt
    config.train.batch_size, config.train.steps = batch, steps
    config.seq_len = seq
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="native SFT checkpoint directory, or "
                      "'smollm2'")
  parser.add_argument("--format", default=None,
                      help="chat format (default: vicuna_v1, the tiny SFT "
                      "model's; hf_template for smollm2)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps per side first")
  parser.add_argument("--batch", type=int, default=8, help="pairs per step")
  parser.add_argument("--max_len", type=int, default=256,
                      help="longest example in tokens (longer pairs are "
                      "dropped, counted)")
  parser.add_argument("--reference", default=",".join(MODES),
                      help=f"reference modes to compare: {MODES}")
  parser.add_argument("--sources", default="arc_easy,gsm8k,bfcl_simple")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--xla_flags", default=None,
                      help="extra XLA_FLAGS for our side (default: "
                      "bench/train_step.py's TUNED_XLA_FLAGS)")
  parser.add_argument("--peer_omp_passive", action="store_true",
                      help="run TRL with OMP_WAIT_POLICY=PASSIVE (torch's "
                      "OpenMP threads sleep instead of spinning; on a busy "
                      "host spinning made its step 5-50x slower)")
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_spec", help=argparse.SUPPRESS)
  parser.add_argument("--_report_fd", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._child:  # pylint: disable=protected-access
    with open(args._spec) as f:  # pylint: disable=protected-access
      spec = json.load(f)
    trl_child(spec, Reporter(args._report_fd))  # pylint: disable=protected-access
    return

  if not args.model:
    raise SystemExit("--model: give a native SFT checkpoint (launch.sft's "
                     "WORKDIR/model) or 'smollm2'")
  modes = [m for m in args.reference.split(",") if m]
  for m in modes:
    if m not in MODES:
      raise SystemExit(f"--reference: unknown mode {m!r}; choose from "
                       f"{MODES}")
  print(host_line(), flush=True)
  # pylint: disable=import-outside-toplevel
  from bench.train_step import TUNED_XLA_FLAGS, configure_xla
  configure_xla(args.threads, TUNED_XLA_FLAGS if args.xla_flags is None
                else args.xla_flags)
  from mllm_jax.runtime import keep_freed_memory
  keep_freed_memory()
  python = peer_python()
  import jax
  from launch.dpo import batches
  from mllm_jax.convert import hf, native
  from mllm_jax.data import chat
  from mllm_jax.data.tokenizer import load_tokenizer
  from mllm_jax.modeling import count_params
  from mllm_jax.rl import dpo
  # pylint: enable=import-outside-toplevel
  fmt = args.format or ("hf_template" if args.model == "smollm2"
                        else "vicuna_v1")
  total = args.warmup + args.steps
  config = dpo_config(args.model, fmt, args.batch, args.max_len, total)
  model_dir = config.init_checkpoint
  if not os.path.exists(os.path.join(model_dir, "model_config.json")):
    raise SystemExit(f"--model: {model_dir} is not a native checkpoint "
                     f"(no model_config.json)")
  tokenizer = load_tokenizer(model_dir)
  run_dir = os.path.join(WORK, f"run-{os.getpid()}")
  os.makedirs(run_dir, exist_ok=True)
  try:
    kept, encoded, records, dropped = build_pairs(
        tokenizer, chat.get_format(fmt, tokenizer).name,
        args.sources.split(","), total * args.batch, args.max_len + 1, 0)
    longest = max(len(e["ids"]) for pair in encoded for e in pair)
    seq = -(-(longest - 1) // 8) * 8
    with config.unlocked():
      config.seq_len = seq
    pool = os.path.join(run_dir, "pool.jsonl")
    with open(pool, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    hf_dir = os.path.join(run_dir, "hf")
    hf.native_to_hf(model_dir, hf_dir, overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
      if os.path.exists(os.path.join(model_dir, name)):
        shutil.copy(os.path.join(model_dir, name), hf_dir)
    spec = dict(run_dir=run_dir, pool=pool, hf_dir=hf_dir, batch=args.batch,
                warmup=args.warmup, steps=args.steps, threads=args.threads,
                pieces=[tokenizer.id_to_piece(i)
                        for i in range(tokenizer.vocab_size)],
                unk_id=1 if tokenizer.vocab_size > 1 else 0,
                eos_id=tokenizer.eos_id, pad_id=max(tokenizer.pad_id, 0),
                kind="trl")
    peer_env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.peer_omp_passive else {}
    peers = {f"trl_{m}": Child(f"trl_{m}", python, {**spec, "variant": m},
                               peer_env, script=__file__) for m in modes}
    ours = {f"mllm_jax_{m}": Ours(config, m, kept, encoded, args.batch, seq,
                                  total) for m in modes}
    ready = {name: peer.ready() for name, peer in peers.items()}

    lengths = [len(e["ids"]) for pair in encoded for e in pair]
    start_logp = dpo.comparison_logps(
        native.load_model(model_dir)[1],
        batches(kept[:1], encoded[:1], 1, 2, seq), [2])[0][kept[0].ranking[0]]
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.threads} threads; model {model_dir} "
          f"({count_params(native.read_config(model_dir)) / 1e6:.2f}M "
          f"params), float32, full fine-tuning; DPO sigmoid beta {BETA}, "
          f"AdamW lr {LEARNING_RATE} constant, no decay, clip {CLIP}; "
          f"{args.batch} pairs a step, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, alternating; TRL: OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset') if not peer_env else 'PASSIVE'}"
          f"; ours: rows of {seq} "
          f"tokens, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, compile " +
          ", ".join(f"{n} {o.compile_s:.0f} s" for n, o in ours.items()))
    print(f"data: {len(records)} pairs from {args.sources} (real data, NOT "
          f"human preferences) in the {fmt} format, {sum(lengths):,} tokens "
          f"(mean {statistics.mean(lengths):.0f}, longest {longest}); "
          f"dropped {dropped or 'none'}")
    print("same weights: log-prob of the first pair's chosen response, " +
          ", ".join([f"mllm_jax {start_logp:.4f}"] +
                    [f"{n} {r['start_logp']:.4f}" for n, r in ready.items()]))
    print("reference precompute (cached mode, once over the "
          f"{len(records)} pairs): " + ", ".join(
              [f"{n} {o.precompute_s:.2f} s" for n, o in ours.items()
               if o.precompute_s] +
              [f"{n} {r['precompute_s']:.2f} s" for n, r in ready.items()
               if "precompute_s" in r]))
    for name, r in ready.items():
      print(f"{name}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}"
            f", {r['params'] / 1e6:.2f}M params", flush=True)

    sides = {**{n: (o.step, os.getpid()) for n, o in ours.items()},
             **{n: (p.step, p.proc.pid) for n, p in peers.items()}}
    reports = lockstep(sides, total)
    done = {name: peer.finish() for name, peer in peers.items()}
    results = {name: summarise(r, args.warmup) for name, r in reports.items()}
    for name, o in ours.items():
      print(describe(name, results[name], o.losses), flush=True)
    for name in peers:
      print(describe(name, results[name], done[name]["losses"]) +
            f", peak RSS {done[name]['peak_rss_mb']:.0f} MB", flush=True)
    print(f"mllm_jax peak RSS {peak_rss_mb():.0f} MB (this process, both "
          f"modes, data and jax included)")
    for m in modes:
      ratio = (results[f"mllm_jax_{m}"]["steps_per_s"] /
               results[f"trl_{m}"]["steps_per_s"])
      print(f"ratio (mllm_jax / TRL DPOTrainer), reference {m}, steps/s: "
            f"{ratio:.2f}x")
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
  if "--_child" not in sys.argv:
    print(f"end: {load_line()}")
