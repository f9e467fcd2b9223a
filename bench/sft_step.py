r"""SFT step speed on CPU: our trainer's step against TRL's `SFTTrainer`, same
model, same weights, same conversations, same machine, same run.

  python bench/sft_step.py [--steps=4] [--warmup=2] [--batch=2] [--seq=1024]
      [--threads=N] [--layers=6] [--dim=384] [--heads=6] [--mlp=1024]
      [--overflow=truncate] [--trl=padded,packed] [--lora_model=smollm2]
      [--lora_batch=1] [--lora_steps=2]

Data: ShareGPT conversations (`mllm_jax.paths.sharegpt_json()`) rendered in
ChatML and tokenised with SmolLM2's tokenizer (vocab 49,152; its own chat
format, so `<|im_start|>` and `<|im_end|>` are single tokens) by
`chat.encode(max_len=seq + 1)`, which also gives the loss mask: 1 on
assistant content and its `<|im_end|>`, 0 elsewhere. The same examples, in
the same pool, go to both sides: ours as `{"ids", "weights"}` into
`PackedExampleIterator` (rows of `--seq` slots, examples never attending to
each other, shuffled as `launch.sft` does); TRL's as a pre-tokenised dataset
of `input_ids` and `labels` (-100 where the weight is 0), which SFTTrainer
takes as is (`max_length=seq + 1`, so nothing is cut again).

Model: a small LLaMA (`--layers`, `--dim`, ...; float32) with our random
init exported to the HF layout (`convert.hf.save_hf`), so both start from the
same weights (checked: each side's loss of the first example before training
is printed). Both train every parameter with AdamW(0.9, 0.95, eps 1e-8), no
weight decay, clipping at global norm 1.0 and a constant learning rate 2e-5
(TRL's SFT default rate). Ours is the trainer's step exactly as `launch.sft`
builds it (`peft_task` -> `build_program` -> `initial_state`, 1-device mesh,
state donated), with bench/train_step.py's CPU settings (tuned XLA flags,
fused CPU attention and AdamW, hand-written backward passes, all layers in
one scan iteration, freed memory kept). TRL's is `SFTTrainer.train()` itself
(its collator; its loss through TRL's fused LM head, which projects only
the positions that have a label, in tiles, and also gives the entropy and
top-1 accuracy it logs; `adamw_torch_fused`; sdpa attention) with `bf16=False`,
`gradient_checkpointing=False` (SFTConfig's defaults are True; neither side
recomputes), `use_cpu=True`, in its own venv (`.cache/bench-venvs/trl`, made
here with pinned versions; never the project's dependencies), one subprocess
per TRL variant:

  padded  TRL's default: one example per row, the batch padded to its
          longest example (`DataCollatorForLanguageModeling`).
  packed  `packing=True` (strategy "bfd", best-fit decreasing over the whole
          dataset). TRL then turns on padding-free: the batch's rows become
          ONE sequence with position ids restarting at every example, and
          transformers builds a block-diagonal causal mask from them
          (`masking_utils.find_packed_sequence_indices`), so examples do not
          attend to each other; checked on every batch here.

Each TRL subprocess runs the real training loop and blocks in a callback at
every step end until told to go on, so the sides' steps alternate (ours,
padded, packed, ours, ...) and all see the same load; a step is timed from
"go" to the next step end, so it includes TRL's data loading and collation,
as ours includes packing the batch and copying it in. The first `--warmup`
steps of every side are not timed. For each side: median step time, tokens/s
over all slots and over real (non-padding) tokens (medians of per-step
rates), and the real fraction of the batches. TRL packed has no padding
slots at all (padding-free); its slots are the B x (seq + 1) row budget.
The CPU time the waiting processes use during each side's timed steps is
printed too (it should be ~0: they block on a pipe).

Then LoRA against full fine-tuning on our side (SmolLM2-135M-Instruct from
the fetched GGUF, `--lora_model=smollm2`, or the small model: `small`), each
in its own process (so its peak RSS is its own), alternating steps:
step time, real tokens/s, trainable parameters, the compiled step's memory
(XLA's memory analysis: arguments + temporaries) and the process's peak RSS.

The host line prints first; the ratio ours / TRL of real tokens/s (against
each TRL variant) prints last but for the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.host import host_line, load_line  # noqa: E402

CACHE = os.path.join(REPO, ".cache")
PEER_VENV = os.path.join(CACHE, "bench-venvs", "trl")
# Resolved together by pip on 2026-12-06 (torch's CPU wheel is on local disk;
# another torch version would pull a multi-GB CUDA build).
PEER_PINS = ("torch==2.13.0", "transformers==5.25.0", "trl==1.16.0",
             "datasets==5.2.0", "accelerate==1.16.0")
WORK = os.path.join(CACHE, "bench-sft")
SMOLLM2_DIR = os.path.join(WORK, "smollm2-135m-f32")
FORMAT = "chatml"
LEARNING_RATE = 2e-5
B1, B2, EPS, CLIP = 0.9, 0.95, 1e-8, 1.0
LORA_RANK, LORA_ALPHA = 16, 32.0


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
  """This process's peak RSS (VmHWM: its own address space; getrusage's
  ru_maxrss would carry over the parent's RSS at fork across exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------
# Set-up: the peers' venv, SmolLM2, the examples
# ----------------------------------------------------------------------------


def peer_python(venv: str = PEER_VENV, pins: tuple[str, ...] = PEER_PINS
                ) -> str:
  """The peers' venv's python (TRL's by default; another bench passes its
  own folder and pins), made (or re-made when the pins change) here."""
  python = os.path.join(venv, "bin", "python")
  stamp = os.path.join(venv, "bench-pins.txt")
  want = "\n".join(pins) + "\n"
  if os.path.exists(python) and os.path.exists(stamp):
    with open(stamp) as f:
      if f.read() == want:
        return python
  log(f"making {venv} with {' '.join(pins)} (about a minute)")
  subprocess.run([sys.executable, "-m", "venv", "--clear", venv],
                 check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", *pins],
                 check=True)
  with open(stamp, "w") as f:
    f.write(want)
  return python


def smollm2_dir() -> str:
  """SmolLM2-135M-Instruct as a float32 native checkpoint with its
  tokenizer, imported once from the fetched GGUF."""
  if not os.path.exists(os.path.join(SMOLLM2_DIR, "model_config.json")):
    from mllm_jax import paths  # pylint: disable=import-outside-toplevel
    log(f"importing {paths.smollm2_gguf()} -> {SMOLLM2_DIR}")
    subprocess.run([sys.executable, "-m", "launch.convert_checkpoint",
                    "--from=gguf", f"--input={paths.smollm2_gguf()}",
                    f"--output={SMOLLM2_DIR}", "--dtype=float32",
                    "--overwrite"], check=True, cwd=REPO)
  return SMOLLM2_DIR


def load_examples(tokenizer, seq: int, overflow: str, min_examples: int,
                  min_tokens: int):
  """ShareGPT conversations -> {"ids", "weights"} examples (ChatML), read in
  file order until there are enough of both. Returns (examples, stats)."""
  # pylint: disable=import-outside-toplevel
  from mllm_jax import paths
  from mllm_jax.data import chat, readers
  # pylint: enable=import-outside-toplevel
  fmt = chat.get_format(FORMAT, tokenizer)
  stats = chat.ChatStats()
  examples, tokens = [], 0
  for conv in chat.read_conversations(paths.sharegpt_json(), stats=stats):
    try:
      example = chat.encode(conv, tokenizer, fmt, seq + 1, overflow, stats)
    except chat.ChatFormatError as e:
      stats.add(readers.Drop("format_shift", str(e)[:200]))
      continue
    if example is None:
      continue
    examples.append({"ids": example["ids"].tolist(),
                     "weights": example["weights"].tolist()})
    tokens += len(example["ids"])
    if len(examples) >= min_examples and tokens >= min_tokens:
      break
  return examples, stats.summary()


# ----------------------------------------------------------------------------
# Sides in lock-step: each is a subprocess that reports on a pipe and waits
# for "go" on stdin before each step
# ----------------------------------------------------------------------------


class Child:
  """A side in its own process (`script --_child KIND`, this file unless
  given); `step()` lets it run one step and returns its report (it times
  itself, from "go" to the step's end)."""

  def __init__(self, name: str, python: str, spec: dict, env=None,
               script: str = __file__):
    self.name = name
    os.makedirs(spec["run_dir"], exist_ok=True)
    spec_file = os.path.join(spec["run_dir"], f"{name}.json")
    with open(spec_file, "w") as f:
      json.dump(spec, f)
    self.log_file = os.path.join(spec["run_dir"], f"{name}.log")
    read_fd, write_fd = os.pipe()
    with open(self.log_file, "w") as out:
      self.proc = subprocess.Popen(
          [python, os.path.abspath(script), "--_child", spec["kind"],
           "--_spec", spec_file, "--_report_fd", str(write_fd)],
          stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
          pass_fds=(write_fd,), cwd=REPO, text=True,
          env={**os.environ, **(env or {})})
    os.close(write_fd)
    self.reports = os.fdopen(read_fd)

  def _read(self, event: str) -> dict:
    line = self.reports.readline()
    if not line:
      self.proc.wait()
      with open(self.log_file) as f:
        tail = f.read()[-4000:]
      raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) "
                         f"waiting for {event}; end of {self.log_file}:\n"
                         f"{tail}")
    report = json.loads(line)
    if report.get("event") != event:
      raise RuntimeError(f"{self.name}: expected {event}, got {report}")
    return report

  def ready(self) -> dict:
    return self._read("ready")

  def _send(self, command: str) -> None:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()

  def step(self) -> dict:
    self._send("go")
    return self._read("step")

  def finish(self) -> dict:
    self._send("stop")
    done = self._read("done")
    self.proc.stdin.close()
    self.proc.wait(timeout=120)
    return done


class Reporter:
  """The child's side of the protocol."""

  def __init__(self, fd: int):
    self.out = os.fdopen(fd, "w", buffering=1)

  def send(self, event: str, **fields) -> None:
    self.out.write(json.dumps({"event": event, **fields}) + "\n")
    self.out.flush()

  @staticmethod
  def wait() -> bool:
    """True for "go", False for "stop" (or the parent gone)."""
    return sys.stdin.readline().strip() == "go"


# ----------------------------------------------------------------------------
# TRL's side (runs in the peers' venv: no jax, no mllm_jax)
# ----------------------------------------------------------------------------


def trl_training_args(spec: dict) -> dict:
  """The TrainingArguments every TRL side here shares: `spec`'s batch and
  warm-up + timed steps, our optimizer's settings (constant rate, AdamW,
  no decay, clipping), float32 on the CPU, no gradient checkpointing, and
  nothing saved or reported."""
  return dict(
      output_dir=os.path.join(spec["run_dir"], spec["variant"]),
      per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
      max_steps=spec["warmup"] + spec["steps"], learning_rate=LEARNING_RATE,
      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=B1, adam_beta2=B2, adam_epsilon=EPS, max_grad_norm=CLIP,
      optim="adamw_torch_fused", bf16=False, fp16=False,
      gradient_checkpointing=False, use_cpu=True, report_to="none",
      save_strategy="no", logging_steps=1, disable_tqdm=True,
      dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)


def trl_child(spec: dict, reporter: Reporter) -> None:
  # pylint: disable=import-outside-toplevel
  import datasets
  import torch
  import transformers
  import trl
  from transformers.masking_utils import find_packed_sequence_indices
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(spec["threads"])
  with open(spec["pool"]) as f:
    pool = [json.loads(line) for line in f]
  data = datasets.Dataset.from_dict({
      "input_ids": [e["ids"] for e in pool],
      "labels": [[t if w > 0 else -100 for t, w in zip(e["ids"], e["weights"])]
                 for e in pool]})
  model = transformers.AutoModelForCausalLM.from_pretrained(
      spec["hf_dir"], dtype=torch.float32, attn_implementation="sdpa")
  tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
  with torch.no_grad():  # the same-weights check: the first example's loss
    first = data[0]
    start_loss = float(model(
        input_ids=torch.tensor([first["input_ids"]]),
        labels=torch.tensor([first["labels"]]), use_cache=False).loss)
  packed = spec["variant"] == "packed"
  config = trl.SFTConfig(**trl_training_args(spec),
                         max_length=spec["seq"] + 1, packing=packed,
                         packing_strategy="bfd")
  batches = []
  losses = []

  class LockStep(transformers.TrainerCallback):
    """Blocks at the start and at every step end until the parent says go;
    reports each step's time from "go" to its end."""

    def __init__(self):
      self.start = 0.0
      self.marks = {}

    def _wait(self, control):
      if not reporter.wait():
        control.should_training_stop = True
      self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
      rows = trainer.train_dataset
      lengths = [len(x) for x in rows["input_ids"]]
      reporter.send("ready", rows=len(lengths), tokens=sum(lengths),
                    row_budget=len(lengths) * (spec["seq"] + 1),
                    padding_free=bool(trainer.padding_free),
                    start_loss=start_loss,
                    params=sum(p.numel() for p in model.parameters()),
                    versions={m.__name__: m.__version__ for m in (
                        torch, transformers, trl, datasets)})
      self._wait(control)

    def on_step_begin(self, args, state, control, **kwargs):
      self.marks["begin"] = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
      self.marks["clipped"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
      self.marks["updated"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      now = time.perf_counter()
      m = self.marks
      # The previous step's logging runs after its on_step_end, so it is
      # counted with this step's batch loading.
      parts = {"log+data": m["begin"] - self.start,
               "fwd+bwd+clip": m["clipped"] - m["begin"],
               "adamw": m["updated"] - m["clipped"],
               "rest": now - m["updated"]}
      batch = batches[state.global_step - 1]
      reporter.send("step", time=now - self.start, parts=parts, **batch)
      self._wait(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "loss" in logs:
        losses.append(logs["loss"])

  trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data,
                           processing_class=tokenizer,
                           callbacks=[LockStep()])
  collate = trainer.data_collator

  def recording_collator(examples):
    out = collate(examples)
    ids = out["input_ids"]
    if "attention_mask" in out:  # padded: real = attended tokens
      real, slots = int(out["attention_mask"].sum()), ids.numel()
    else:  # padding-free: one sequence of exactly the real tokens
      real, slots = ids.numel(), len(examples) * (spec["seq"] + 1)
      pieces = sum(len(e["seq_lengths"]) for e in examples)
      found = find_packed_sequence_indices(out["position_ids"])
      segments = 1 if found is None else int(found[0, -1]) + 1
      if segments != pieces:
        raise AssertionError(f"packed batch of {pieces} examples gives "
                             f"{segments} attention segments")
    batches.append({"shape": list(ids.shape), "real": real, "slots": slots,
                    "examples": sum(len(e.get("seq_lengths", [0]))
                                    for e in examples)})
    return out

  trainer.data_collator = recording_collator
  trainer.train()
  reporter.send("done", losses=losses, peak_rss_mb=peak_rss_mb())


# ----------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------


def optimizer_config():
  from mllm_jax.train.config import OptimizerConfig  # pylint: disable=import-outside-toplevel
  return OptimizerConfig(learning_rate=LEARNING_RATE, warmup_steps=0,
                         end_learning_rate_ratio=1.0, b1=B1, b2=B2, eps=EPS,
                         weight_decay=0.0, clip_norm=CLIP, backend="cpu_fused")


class Ours:
  """Our SFT step as `launch.sft` builds it, compiled ahead of the timing.
  `step()` packs the next batch, copies it in and runs the step."""

  def __init__(self, model_cfg, peft_cfg, examples, batch: int, seq: int,
               total_steps: int, init_checkpoint: str = ""):
    # pylint: disable=import-outside-toplevel
    import jax
    from mllm_jax.data.packing import PackedExampleIterator
    from mllm_jax.modeling.peft import peft_task
    from mllm_jax.parallel.config import ParallelConfig
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import use_mesh
    from mllm_jax.train.compile import build_program, initial_state
    from mllm_jax.train.config import TrainConfig
    # pylint: enable=import-outside-toplevel
    self.jax = jax
    parallel = ParallelConfig()
    self.mesh = make_mesh(parallel)
    task = peft_task(model_cfg, peft_cfg, init_checkpoint=init_checkpoint,
                     name="sft")
    self.program = build_program(task, parallel, optimizer_config(),
                                 TrainConfig(steps=total_steps), self.mesh)
    self.state, self.frozen = initial_state(self.program, seed=0)
    start = time.perf_counter()
    with use_mesh(self.mesh, self.program.rules):
      compiled = self.program.step.lower(
          self.state, self.frozen,
          self.program.abstract_batch(batch, seq)).compile()
    self.compile_s = time.perf_counter() - start
    self.compiled = compiled
    self.memory = compiled.memory_analysis()
    self.trainable = sum(x.size for x in jax.tree.leaves(self.state["params"]))
    self.frozen_count = sum(x.size for x in jax.tree.leaves(self.frozen))
    # As launch.sft: shuffled, repeating, the default look-ahead window.
    self.batches = PackedExampleIterator(
        examples, seq_len=seq, global_batch_size=batch, shuffle=True,
        repeat=True, seed=0, window=64)
    self.slots, self.rows = batch * seq, batch
    self.losses = []

  def example_loss(self, example) -> float:
    """Loss of one example with the current weights (no update)."""
    from mllm_jax.data.packing import PackedExampleIterator  # pylint: disable=import-outside-toplevel
    batch = next(PackedExampleIterator([example], seq_len=self.slots //
                                       self.rows, global_batch_size=1))
    from mllm_jax.parallel.sharding import use_mesh  # pylint: disable=import-outside-toplevel
    with use_mesh(self.mesh, self.program.rules):
      sums = self.program.eval_step(self.state["params"], self.frozen, batch)
    return float(sums["loss"] / sums["weight"])

  def memory_mb(self) -> dict:
    m = self.memory
    if m is None:
      return {}
    return {"arguments_mb": m.argument_size_in_bytes / 2**20,
            "temporaries_mb": m.temp_size_in_bytes / 2**20,
            "outputs_mb": m.output_size_in_bytes / 2**20,
            "aliased_mb": m.alias_size_in_bytes / 2**20}

  def step(self) -> dict:
    start = time.perf_counter()
    batch = next(self.batches)
    real = int((batch["segment_ids"] > 0).sum())
    batch = self.jax.device_put(batch, self.program.batch_sharding)
    loaded = time.perf_counter()
    self.state, out = self.compiled(self.state, self.frozen, batch)
    loss = float(out["loss"])  # waits for the whole step
    end = time.perf_counter()
    self.losses.append(loss)
    return {"time": end - start, "real": real, "slots": self.slots,
            "shape": list(batch["inputs"].shape),
            "parts": {"pack+copy": loaded - start, "step": end - loaded}}


def small_model_config(args, vocab: int):
  from mllm_jax.modeling import ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig(
      vocab_size=vocab, embed_dim=args.dim, num_layers=args.layers,
      num_heads=args.heads, mlp_dim=args.mlp, max_seq_len=args.seq,
      dtype="float32", param_dtype="float32", scan_unroll=args.layers,
      custom_vjp=True, attention_backend="cpu_fused")


def ours_child(spec: dict, reporter: Reporter) -> None:
  """LoRA or full fine-tuning of `spec["model_dir"]` (a native checkpoint)
  or of the small random model, in lock-step like TRL's children."""
  from bench.train_step import configure_xla  # pylint: disable=import-outside-toplevel
  configure_xla(spec["threads"], "")  # XLA_FLAGS come from the parent
  from mllm_jax.runtime import keep_freed_memory  # pylint: disable=import-outside-toplevel
  if spec["keep_memory"]:
    keep_freed_memory()
  # pylint: disable=import-outside-toplevel
  from mllm_jax.convert import native
  from mllm_jax.modeling import ModelConfig
  from mllm_jax.modeling.peft_config import ALL_LINEAR, PeftConfig
  # pylint: enable=import-outside-toplevel
  with open(spec["pool"]) as f:
    pool = [json.loads(line) for line in f]
  run = dict(attention_backend="cpu_fused", custom_vjp=True,
             scan_unroll=spec["scan_unroll"])
  if spec["model_dir"]:
    cfg = native.read_config(spec["model_dir"], **run)
  else:
    cfg = ModelConfig(**{**spec["model_cfg"], **run})
  peft = (PeftConfig(method="lora", rank=LORA_RANK, alpha=LORA_ALPHA,
                     targets=ALL_LINEAR)
          if spec["variant"] == "lora" else PeftConfig())
  ours = Ours(cfg, peft, pool, spec["batch"], spec["seq"],
              spec["warmup"] + spec["steps"], spec["model_dir"])
  reporter.send("ready", compile_s=ours.compile_s, trainable=ours.trainable,
                frozen=ours.frozen_count, memory=ours.memory_mb())
  while reporter.wait():
    reporter.send("step", **ours.step())
  reporter.send("done", losses=ours.losses, peak_rss_mb=peak_rss_mb())


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def summarise(reports: list[dict], warmup: int) -> dict:
  timed = reports[warmup:]
  times = [r["time"] for r in timed]
  return {
      "median_s": statistics.median(times), "min_s": min(times),
      "slots_per_s": statistics.median(r["slots"] / r["time"] for r in timed),
      "real_per_s": statistics.median(r["real"] / r["time"] for r in timed),
      "real_fraction": sum(r["real"] for r in timed) / sum(
          r["slots"] for r in timed),
      "real_per_step": statistics.mean(r["real"] for r in timed),
      "shapes": sorted({tuple(r["shape"]) for r in timed}),
      "others_cpu": sum(r["others_cpu"] for r in timed),
      "parts": {k: statistics.median(r["parts"][k] for r in timed)
                for k in timed[0].get("parts", {})},
  }


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process, all its threads."""
  if pid == os.getpid():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lockstep(sides: dict, rounds: int) -> dict:
  """Runs `rounds` steps of every side (name -> (step, pid)), alternating;
  returns the reports. Each report also has `others_cpu`: the CPU seconds
  the waiting sides' processes used during the step (they should be idle)."""
  reports = {name: [] for name in sides}
  for i in range(rounds):
    for name, (step, _) in sides.items():
      others = [pid for n, (_, pid) in sides.items()
                if n != name and pid != sides[name][1]]
      before = sum(cpu_seconds(pid) for pid in others)
      report = step()
      report["others_cpu"] = sum(cpu_seconds(pid) for pid in others) - before
      reports[name].append(report)
    log(f"round {i + 1}/{rounds}: " + ", ".join(
        f"{n} {r[-1]['time']:.2f} s" for n, r in reports.items()))
  return reports


def describe(name: str, s: dict, losses: list[float]) -> str:
  shapes = ", ".join("x".join(map(str, shape)) for shape in s["shapes"][:4])
  more = f" (+{len(s['shapes']) - 4} more)" if len(s["shapes"]) > 4 else ""
  loss = (f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "")
  if s["parts"]:
    loss += " (medians: " + ", ".join(
        f"{k} {v:.2f} s" for k, v in s["parts"].items()) + ")"
  return (f"{name}: median {s['median_s']:.3f} s/step (min {s['min_s']:.3f})"
          f", {s['slots_per_s']:.0f} slot tokens/s, {s['real_per_s']:.0f} "
          f"real tokens/s, real fraction {s['real_fraction']:.3f} "
          f"({s['real_per_step']:.0f} real tokens/step; batch {shapes}{more})"
          f"{loss}; the waiting sides used {s['others_cpu']:.2f} CPU s "
          f"during its timed steps")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4,
                      help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per side first")
  parser.add_argument("--batch", type=int, default=2,
                      help="rows per step (ours: packed rows; TRL padded: "
                      "examples; TRL packed: packed rows)")
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--mlp", type=int, default=1024)
  parser.add_argument("--overflow", default="truncate",
                      choices=("truncate", "rounds", "drop"),
                      help="chat.encode's treatment of a conversation longer "
                      "than seq + 1 tokens ('truncate' is also what TRL "
                      "does by default)")
  parser.add_argument("--trl", default="padded,packed",
                      help="TRL variants to run: padded, packed (comma-"
                      "separated; empty for none)")
  parser.add_argument("--lora_model", default="smollm2",
                      choices=("smollm2", "small", "none"),
                      help="model of the LoRA vs full comparison")
  parser.add_argument("--lora_batch", type=int, default=1)
  parser.add_argument("--lora_steps", type=int, default=2)
  parser.add_argument("--lora_warmup", type=int, default=1)
  parser.add_argument("--xla_flags", default=None,
                      help="extra XLA_FLAGS for our side (default: "
                      "bench/train_step.py's TUNED_XLA_FLAGS)")
  parser.add_argument("--release_memory", action="store_true",
                      help="keep glibc's default of unmapping freed memory "
                      "on our side")
  parser.add_argument("--peer_malloc", action="store_true",
                      help="give TRL's processes the same keep-freed-memory "
                      "malloc settings as ours (environment variables)")
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_spec", help=argparse.SUPPRESS)
  parser.add_argument("--_report_fd", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._child:  # pylint: disable=protected-access
    with open(args._spec) as f:  # pylint: disable=protected-access
      spec = json.load(f)
    reporter = Reporter(args._report_fd)  # pylint: disable=protected-access
    {"trl": trl_child, "ours": ours_child}[args._child](spec, reporter)  # pylint: disable=protected-access
    return

  print(host_line(), flush=True)
  # pylint: disable=import-outside-toplevel
  from bench.train_step import TUNED_XLA_FLAGS, configure_xla
  xla_flags = TUNED_XLA_FLAGS if args.xla_flags is None else args.xla_flags
  configure_xla(args.threads, xla_flags)
  if not args.release_memory:
    from mllm_jax.runtime import keep_freed_memory
    keep_freed_memory()
  python = peer_python()
  model_dir = smollm2_dir()
  import jax
  from mllm_jax.convert import hf
  from mllm_jax.data.packing import packing_efficiency
  from mllm_jax.data.tokenizer import load_tokenizer
  from mllm_jax.modeling import count_params
  from mllm_jax.modeling.peft_config import PeftConfig
  # pylint: enable=import-outside-toplevel

  run_dir = os.path.join(WORK, f"run-{os.getpid()}")
  os.makedirs(run_dir, exist_ok=True)
  try:
    tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer.json"))
    total = args.warmup + args.steps
    lora_total = args.lora_warmup + args.lora_steps
    # Enough for every side without starting the data over (TRL padded
    # takes `batch` examples a step, the packed sides about batch x seq
    # tokens) three times, and at least 200 conversations, so the pool's
    # length mix is representative.
    start = time.perf_counter()
    examples, data_stats = load_examples(
        tokenizer, args.seq, args.overflow, max(200, 3 * total * args.batch),
        3 * args.seq * max(total * args.batch, lora_total * args.lora_batch))
    pool = os.path.join(run_dir, "pool.jsonl")
    with open(pool, "w") as f:
      for e in examples:
        f.write(json.dumps(e) + "\n")
    lengths = [len(e["ids"]) for e in examples]
    log(f"{len(examples)} examples in {time.perf_counter() - start:.1f} s")

    # The small model, our init, exported for TRL with the tokenizer.
    cfg = small_model_config(args, tokenizer.vocab_size)
    hf_dir = os.path.join(run_dir, "hf")
    spec = dict(run_dir=run_dir, pool=pool, hf_dir=hf_dir, batch=args.batch,
                seq=args.seq, warmup=args.warmup, steps=args.steps,
                threads=args.threads)
    variants = [v for v in args.trl.split(",") if v]
    for v in variants:
      if v not in ("padded", "packed"):
        raise SystemExit(f"--trl: unknown variant {v!r}")
    ours = Ours(cfg, PeftConfig(), examples, args.batch, args.seq, total)
    start_loss = ours.example_loss(examples[0])
    hf.save_hf(hf_dir, cfg, ours.state["params"], overwrite=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(os.path.join(model_dir, name), hf_dir)
    peer_env = ({"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                 "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
                if args.peer_malloc else {})
    peers = {f"trl_{v}": Child(f"trl_{v}", python,
                               {**spec, "kind": "trl", "variant": v},
                               peer_env) for v in variants}
    ready = {name: peer.ready() for name, peer in peers.items()}

    summary = data_stats
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.threads} threads, LLaMA {args.layers} layers d={args.dim} "
          f"{args.heads} heads SwiGLU {args.mlp} vocab {cfg.vocab_size} "
          f"({count_params(cfg) / 1e6:.1f}M params), float32, batch "
          f"{args.batch} x seq {args.seq}, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, AdamW lr {LEARNING_RATE} "
          f"constant, no decay, clip {CLIP}; ours: compile "
          f"{ours.compile_s:.0f} s, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, "
          f"freed memory {'released' if args.release_memory else 'kept'}")
    print(f"data: {len(examples)} ShareGPT conversations as {FORMAT} with "
          f"SmolLM2's tokenizer, overflow={args.overflow}, "
          f"{sum(lengths):,} tokens (mean {statistics.mean(lengths):.0f}, "
          f"{sum(n == args.seq + 1 for n in lengths) / len(lengths):.0%} "
          f"cut at seq + 1), loss on assistant tokens "
          f"({sum(sum(e['weights']) for e in examples) / sum(lengths):.0%} "
          f"of tokens); dropped {summary['dropped'] or 'none'}; "
          f"whole-pool packing efficiency (ours, in order) "
          f"{packing_efficiency(lengths, args.seq, args.batch):.3f}")
    print(f"same weights: loss of the first example before training, "
          f"mllm_jax {start_loss:.5f}, " + ", ".join(
              f"{n} {r['start_loss']:.5f}" for n, r in ready.items()))
    for name, r in ready.items():
      rows = (f"{r['rows']} rows packed by TRL (BFD) from the "
              f"{len(examples)} examples, filled to "
              f"{r['tokens'] / r['row_budget']:.3f} of seq + 1"
              if r["padding_free"] else f"{r['rows']} examples, one a row")
      print(f"{name}: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}"
            f", {r['params'] / 1e6:.1f}M params, {rows}, padding-free "
            f"{r['padding_free']}", flush=True)

    sides = {"mllm_jax": (ours.step, os.getpid()),
             **{n: (p.step, p.proc.pid) for n, p in peers.items()}}
    reports = lockstep(sides, total)
    done = {name: peer.finish() for name, peer in peers.items()}
    results = {name: summarise(r, args.warmup) for name, r in reports.items()}
    print(describe("mllm_jax", results["mllm_jax"], ours.losses) +
          f", peak RSS {peak_rss_mb():.0f} MB (this process: data, "
          f"tokenizer and jax included)", flush=True)
    for name in peers:
      print(describe(name, results[name], done[name]["losses"]) +
            f", peak RSS {done[name]['peak_rss_mb']:.0f} MB", flush=True)
    del ours

    # LoRA against full fine-tuning, ours, each in its own process.
    if args.lora_model != "none":
      lora_spec = dict(
          run_dir=run_dir, pool=pool, batch=args.lora_batch, seq=args.seq,
          warmup=args.lora_warmup, steps=args.lora_steps,
          threads=args.threads, keep_memory=not args.release_memory,
          model_dir=model_dir if args.lora_model == "smollm2" else "",
          model_cfg={k: getattr(cfg, k) for k in (
              "vocab_size", "embed_dim", "num_layers", "num_heads",
              "mlp_dim", "max_seq_len", "dtype", "param_dtype")},
          scan_unroll=1 if args.lora_model == "smollm2" else args.layers,
          kind="ours")
      kids = {v: Child(f"ours_{v}", sys.executable,
                       {**lora_spec, "variant": v}) for v in ("full", "lora")}
      kid_ready = {v: k.ready() for v, k in kids.items()}
      kid_reports = lockstep({v: (k.step, k.proc.pid)
                              for v, k in kids.items()}, lora_total)
      kid_done = {v: k.finish() for v, k in kids.items()}
      model_name = ("SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to "
                    "float32)" if args.lora_model == "smollm2"
                    else "the small model above")
      print(f"LoRA vs full fine-tuning, ours: {model_name}, batch "
            f"{args.lora_batch} x seq {args.seq} packed, LoRA rank "
            f"{LORA_RANK} alpha {LORA_ALPHA:g} on q, k, v, o, gate, up, down;"
            f" {args.lora_warmup} warm-up + {args.lora_steps} timed steps "
            f"each, alternating")
      for v in ("full", "lora"):
        s = summarise(kid_reports[v], args.lora_warmup)
        r, d = kid_ready[v], kid_done[v]
        memory = ", ".join(f"{k[:-3]} {x:.0f} MB"
                           for k, x in r["memory"].items())
        print(f"  {v}: median {s['median_s']:.2f} s/step (min "
              f"{s['min_s']:.2f}), {s['real_per_s']:.0f} real tokens/s "
              f"(real fraction {s['real_fraction']:.3f}), trainable "
              f"{r['trainable'] / 1e6:.2f}M of "
              f"{(r['trainable'] + r['frozen']) / 1e6:.1f}M, compile "
              f"{r['compile_s']:.0f} s, compiled step memory: {memory}; "
              f"peak RSS {d['peak_rss_mb']:.0f} MB; loss "
              f"{d['losses'][0]:.4f} -> {d['losses'][-1]:.4f}; the waiting "
              f"side used {s['others_cpu']:.2f} CPU s", flush=True)

    for name in peers:
      ratio = results["mllm_jax"]["real_per_s"] / results[name]["real_per_s"]
      print(f"ratio (mllm_jax / {name.replace('_', ' ')}), real tokens/s: "
            f"{ratio:.2f}x")
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
  if "--_child" not in sys.argv:
    print(f"end: {load_line()}")
