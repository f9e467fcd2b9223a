r"""Training-step speed on CPU: our jitted train step vs transformers + torch
AdamW, same model, same weights, same data, same run.

  JAX_PLATFORMS=cpu python bench/train_step.py [--steps=10] [--warmup=2]
      [--batch=8] [--seq=256] [--threads=N] [--attention=cpu_fused]
      [--optimizer=cpu_fused] [--attn=sdpa]

The model is LLaMA with 8 layers, d=512, 8 heads, SwiGLU 1408, vocab 8192
(~34M parameters). Both sides train in float32 with AdamW(0.9, 0.95, eps
1e-8, decay 0.1 off norms and embeddings), global-norm clipping at 1.0 and
the same learning-rate schedule, starting from the same weights (ours,
exported to the HF layout) on the same token batches. Ours is the trainer's
jitted step (1-device mesh, state donated); theirs is an eager
LlamaForCausalLM forward/backward plus `torch.optim.AdamW(fused=True)`.

Steps alternate ours/theirs so that both see the same machine load; the
first `--warmup` steps of each (compilation, allocator warm-up) are not
timed, and speed comes from the median step time. MFU counts model FLOPs
(`train_flops_per_token`) against the float32 2048x2048 matmul peak measured
with JAX in this run (torch's matmul peak is printed for reference). The
ratio ours/theirs prints last.

By default our side gets TUNED_XLA_FLAGS (`--xla_flags=` for XLA's defaults)
and the process keeps freed memory mapped (`--release_memory` for glibc's
default); docs/benchmarks.md has the measured effect of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, MLP = 8192, 512, 8, 8, 1408
# Set by default (docs/benchmarks.md): on 2 cores XLA's concurrency-optimised
# scheduler runs independent dots side by side, which only splits the cores
# between them, and YNNPACK fusing elementwise ops with the dots saves passes
# over memory. Together 3.92 -> 3.39 s/step on 2 quiet Xeon cores.
TUNED_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                   "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")


def configure_xla(threads: int, extra_flags: str) -> None:
  """One CPU device using `threads` cores; must run before importing jax.

  The test suite's 8 simulated devices would split the cores 8 ways, so that
  flag is dropped. XLA sizes its intra-op pool from the CPU affinity mask.
  """
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  flags += extra_flags.split()
  os.environ["XLA_FLAGS"] = " ".join(flags)
  if threads < len(os.sched_getaffinity(0)):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def torch_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s with torch (for reference only)."""
  import torch  # pylint: disable=import-outside-toplevel
  a = torch.randn(size, size)
  a @ a
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def model_config(seq: int, **overrides):
  """The benchmarked LLaMA, float32 parameters and compute."""
  # pylint: disable-next=import-outside-toplevel
  from mllm_jax.modeling import ModelConfig
  fields = dict(vocab_size=VOCAB, embed_dim=DIM, num_layers=LAYERS,
                num_heads=HEADS, mlp_dim=MLP, max_seq_len=max(seq, 256),
                dtype="float32", param_dtype="float32")
  return ModelConfig(**{**fields, **overrides})


def token_batches(count: int, batch: int, seq: int) -> list[np.ndarray]:
  """Random [batch, seq + 1] token rows: inputs [:, :-1], targets [:, 1:]."""
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, (batch, seq + 1), np.int32)
          for _ in range(count)]


def train_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """A [batch, seq + 1] token array as the trainer's batch (one document per
  row, every target weighted)."""
  b, t = tokens.shape[0], tokens.shape[1] - 1
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "loss_weights": np.ones((b, t), np.float32),
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
  }


def build_ours(cfg, opt_cfg, total_steps: int):
  """Our train step exactly as `mllm_jax.train.trainer.train` runs it: the
  pretraining task through `build_program` and `initial_state` (mesh over
  the one device, sharded state, shardings in and out, state donated).
  Returns (step(tokens) -> loss, initial weights in the HF layout)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from mllm_jax.convert import hf
  from mllm_jax.parallel.config import ParallelConfig
  from mllm_jax.parallel.mesh import make_mesh
  from mllm_jax.parallel.sharding import use_mesh
  from mllm_jax.train.compile import build_program, initial_state
  from mllm_jax.train.config import TrainConfig
  from mllm_jax.train.task import language_model_task
  # pylint: enable=import-outside-toplevel
  parallel = ParallelConfig()
  mesh = make_mesh(parallel)
  program = build_program(language_model_task(cfg), parallel, opt_cfg,
                          TrainConfig(steps=total_steps), mesh)
  state, frozen = initial_state(program, seed=0)
  hf_weights = dict(hf.params_to_hf(cfg, state["params"]))

  def step(tokens: np.ndarray) -> float:
    nonlocal state
    batch = jax.device_put(train_batch(tokens), program.batch_sharding)
    with use_mesh(mesh, program.rules):
      state, out = program.step(state, frozen, batch)
    return float(out["loss"])  # waits for the whole step

  return step, hf_weights


def build_theirs(cfg, opt_cfg, total_steps: int, hf_weights, attn: str):
  """LlamaForCausalLM + torch AdamW with our hyper-parameters and weights.
  Returns step(tokens) -> loss."""
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers
  from mllm_jax.train import optimizer as optim
  # pylint: enable=import-outside-toplevel
  hf_config = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=False,
      attn_implementation=attn)
  model = transformers.LlamaForCausalLM(hf_config).float()
  model.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in hf_weights.items()}, strict=True)
  model.train()
  # OptimizerConfig.no_decay (`norm`, `^embed\.`) in HF names.
  no_decay = lambda name: "norm" in name or "embed_tokens" in name
  named = list(model.named_parameters())
  adamw = torch.optim.AdamW(
      [{"params": [p for n, p in named if not no_decay(n)],
        "weight_decay": opt_cfg.weight_decay},
       {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}],
      lr=opt_cfg.learning_rate, betas=(opt_cfg.b1, opt_cfg.b2),
      eps=opt_cfg.eps, fused=True)  # torch's fastest CPU AdamW, like ours
  schedule = optim.learning_rate_schedule(opt_cfg, total_steps)
  learning_rates = [float(schedule(i)) for i in range(total_steps)]
  count = 0

  def step(tokens: np.ndarray) -> float:
    nonlocal count
    tokens = torch.from_numpy(tokens.astype(np.int64))
    for group in adamw.param_groups:
      group["lr"] = learning_rates[count]
    count += 1
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    adamw.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
    adamw.step()
    return loss.item()

  return step


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per side first")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--scan_unroll", type=int, default=LAYERS,
                      help="model.scan_unroll: layers per scan iteration "
                      "(all 8 by default; same numbers, longer compile)")
  parser.add_argument("--custom_vjp", default=True,
                      action=argparse.BooleanOptionalAction,
                      help="model.custom_vjp: hand-written backward passes "
                      "(same gradients up to float rounding)")
  parser.add_argument("--attention", default="cpu_fused",
                      choices=("cpu_fused", "xla"),
                      help="model.attention_backend: the fused C++ CPU "
                      "kernel, or XLA's einsums")
  parser.add_argument("--optimizer", default="cpu_fused",
                      choices=("cpu_fused", "optax"),
                      help="optimizer.backend: the fused C++ CPU AdamW, or "
                      "optax's chain (same update)")
  parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                      help="transformers attention implementation")
  parser.add_argument("--xla_flags", default=TUNED_XLA_FLAGS,
                      help="extra XLA_FLAGS for our side ('' for XLA's "
                      "defaults)")
  parser.add_argument("--release_memory", action="store_true",
                      help="keep glibc's default of unmapping freed memory")
  parser.add_argument("--only", choices=("ours", "theirs"),
                      help="time one side only (profiling)")
  args = parser.parse_args()
  configure_xla(args.threads, args.xla_flags)
  if not args.release_memory:
    from mllm_jax.runtime import keep_freed_memory  # pylint: disable=g-import-not-at-top
    keep_freed_memory()

  # pylint: disable=import-outside-toplevel
  import jax
  import torch
  from mllm_jax.modeling import count_params
  from mllm_jax.train import metrics, optimizer as optim
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  cfg = model_config(args.seq, scan_unroll=args.scan_unroll,
                     custom_vjp=args.custom_vjp,
                     attention_backend=args.attention)
  total_steps = args.warmup + args.steps
  opt_cfg = optim.OptimizerConfig(warmup_steps=max(total_steps // 2, 1),
                                  backend=args.optimizer)
  ours, hf_weights = build_ours(cfg, opt_cfg, total_steps)
  theirs = build_theirs(cfg, opt_cfg, total_steps, hf_weights, args.attn)
  batches = token_batches(total_steps, args.batch, args.seq)

  jax_peak = metrics.measure_cpu_peak_flops()
  torch_peak = torch_matmul_peak()
  sides = {"mllm_jax": ours, "transformers": theirs}
  if args.only:
    sides = {k: v for k, v in sides.items()
             if (k == "mllm_jax") == (args.only == "ours")}
  times = {name: [] for name in sides}
  losses = {name: [] for name in sides}
  for i in range(total_steps):
    for name, step in sides.items():
      start = time.perf_counter()
      losses[name].append(step(batches[i]))
      if i >= args.warmup:
        times[name].append(time.perf_counter() - start)
  # A second look at the peaks: the machine is shared, keep the better one.
  jax_peak = max(jax_peak, metrics.measure_cpu_peak_flops())
  torch_peak = max(torch_peak, torch_matmul_peak())

  tokens = args.batch * args.seq
  flops_per_token = metrics.train_flops_per_token(cfg, args.seq)
  print(f"{jax.devices()[0].platform} x{jax.device_count()}, {args.threads} "
        f"threads, {count_params(cfg) / 1e6:.1f}M params, batch {args.batch}"
        f" x seq {args.seq}, float32, transformers attention {args.attn}, "
        f"{args.warmup} warm-up + {args.steps} timed steps each, "
        f"freed memory {'released' if args.release_memory else 'kept'}, "
        f"scan_unroll {cfg.scan_unroll}, custom_vjp {cfg.custom_vjp}, "
        f"attention {cfg.attention_backend}, optimizer {opt_cfg.backend}, "
        f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, "
        f"{flops_per_token * tokens / 1e9:.0f} GFLOP/step")
  print(f"matmul peak (2048^2 fp32): jax {jax_peak / 1e9:.1f} GFLOP/s, "
        f"torch {torch_peak / 1e9:.1f} GFLOP/s")
  speed = {}
  for name in sides:
    median = statistics.median(times[name])
    speed[name] = tokens / median
    mfu = flops_per_token * speed[name] / jax_peak
    print(f"{name}: median {median:.3f} s/step (min {min(times[name]):.3f}),"
          f" {speed[name]:.0f} tokens/s, MFU {mfu:.1%} of the jax peak, "
          f"loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}")
  if len(speed) == 2:
    print(f"ratio (mllm_jax / transformers): "
          f"{speed['mllm_jax'] / speed['transformers']:.2f}x")


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
