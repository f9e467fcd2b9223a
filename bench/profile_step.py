r"""Where the CPU training step's time goes: op time per part of the model.

  JAX_PLATFORMS=cpu python bench/profile_step.py [--steps=3] [--no-custom_vjp]
      [--attention=cpu_fused]

Traces the forward and backward pass of bench/train_step.py's model (same
config, batch, XLA flags and allocator settings) with `jax.profiler`, then
sums each compiled op's time by the part of the model it belongs to, read from
the op's HLO metadata (its einsum) or, for elementwise ops, its output shape.
The thunk executor overlaps independent ops on the cores, so the op times add
up to more than the wall time: each part's share of the op time is printed,
and that share of the wall time. docs/benchmarks.md uses it to find the
slow part.

Op time double-counts ops that overlap, so an ablation follows: the
forward and backward compiled again with one part replaced by a cheap
stand-in that keeps its inputs alive (the SwiGLU block by a scaling of its
input, the attention core by a sum of q, k and v), all variants run in turn
in the same process, and the median per-round difference is that part's cost
in the step (--ablation_rounds=0 skips it).

It then times the model's SwiGLU block alone (`layers.swiglu`, forward and
backward on the same activations, best of --block_repeats) against the
float32 matmul peak measured alternately with it. The block holds most of
the model's FLOPs in its largest GEMMs, so its rate is what the whole step
could reach here if nothing but those GEMMs took time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as bench  # noqa: E402  pylint: disable=wrong-import-position

# Part of the model -> einsums (our layers' specs and their transposes).
PARTS = {
    "attention core": ("bhts", "bkgts", "ffi_call", "bthd,bthd"),
    "SwiGLU MLP": ("dh->bth", "hd->btd", "bth->dh", "btd->hd", "bth,"),
    "q/k/v/o projections": ("dhk->bthk", "hkd->btd", "bthk,", "btd,bthk"),
    "output projection + loss": ("dv->btv", "dv->btd", "btv->dv", "btd,btv"),
}


def part_of(op_name: str, shape: str, cfg) -> str:
  for part, specs in PARTS.items():
    if any(spec in op_name for spec in specs):
      return part
  # Elementwise ops and layout copies: by output shape, e.g. f32[8,8,256,64].
  inside = shape.split("[")[-1].split("]")[0]
  dims = tuple(int(d) for d in re.findall(r"\d+", inside))
  if len(dims) == 4 and dims[1] == cfg.num_heads:  # [B, H, T|D, S|D]
    return "attention core"
  if cfg.hidden_dim in dims:
    return "SwiGLU MLP"
  if cfg.vocab_size in dims:
    return "output projection + loss"
  if {cfg.embed_dim, cfg.num_heads, cfg.head_size} <= set(dims):
    return "q/k/v/o projections"  # their weights and weight gradients
  return "norms, residuals, RoPE, other"


def compiled_ops(hlo: str) -> dict[str, tuple[str, str]]:
  """Top-level op name -> (output shape, metadata op_name)."""
  ops = {}
  for line in hlo.split("ENTRY", 1)[-1].splitlines():
    match = re.match(r"\s+%(\S+) = (\S+) ", line)
    if match:
      op_name = re.search(r'op_name="([^"]+)"', line)
      ops[match.group(1)] = (match.group(2),
                             op_name.group(1) if op_name else "")
  return ops


def main() -> None:
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--attention", default="cpu_fused",
                      choices=("cpu_fused", "xla"),
                      help="model.attention_backend")
  parser.add_argument("--custom_vjp", default=True,
                      action=argparse.BooleanOptionalAction)
  parser.add_argument("--xla_flags", default=bench.TUNED_XLA_FLAGS)
  parser.add_argument("--ablation_rounds", type=int, default=10,
                      help="interleaved rounds of the ablation")
  parser.add_argument("--block_repeats", type=int, default=20,
                      help="timed runs of the SwiGLU block alone")
  args = parser.parse_args()
  bench.configure_xla(os.cpu_count(),
                      args.xla_flags + " --xla_cpu_enable_xprof_traceme")
  # pylint: disable=import-outside-toplevel
  from mllm_jax.runtime import keep_freed_memory
  keep_freed_memory()
  import jax
  from flax import nnx
  from mllm_jax.modeling import Decoder
  from mllm_jax.train.metrics import train_flops_per_token
  # pylint: enable=import-outside-toplevel

  cfg = bench.model_config(args.seq, scan_unroll=bench.LAYERS,
                           custom_vjp=args.custom_vjp,
                           attention_backend=args.attention)
  graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  b, t = args.batch, args.seq
  batch = jax.device_put(bench.train_batch(bench.token_batches(1, b, t)[0]))
  grad = compile_grad(graphdef, params, batch)
  for _ in range(2):  # warm the allocator
    jax.block_until_ready(grad(params, batch))
  ops = compiled_ops(grad.as_text())

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(args.steps):
      jax.block_until_ready(grad(params, batch))
    wall = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    trace_file, = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(trace_file) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events

  per_part = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in ops:
      shape, op_name = ops[event["name"]]
      per_part[part_of(op_name, shape, cfg)] += event["dur"] / 1e6
  op_time = sum(per_part.values()) / args.steps
  flops = train_flops_per_token(cfg, t) * b * t
  print(f"forward + backward, batch {b} x seq {t}, custom_vjp "
        f"{cfg.custom_vjp}, attention {cfg.attention_backend}: wall {wall * 1e3:.0f} ms per step, op time "
        f"{op_time * 1e3:.0f} ms ({op_time / wall:.2f}x overlap), model "
        f"{flops / wall / 1e9:.0f} GFLOP/s")
  for part, seconds in per_part.most_common():
    share = seconds / args.steps / op_time
    print(f"  {part:28s} {share:6.1%} of op time, ~{share * wall * 1e3:5.0f}"
          f" ms of the step")
  if args.ablation_rounds:
    ablation(cfg, graphdef, params, batch, args.ablation_rounds)
  swiglu_ceiling(cfg, b, t, args.block_repeats)


def compile_grad(graphdef, params, batch):
  """The model's forward + backward (the train step's loss), compiled once."""
  # pylint: disable=import-outside-toplevel
  import jax
  from mllm_jax.train import step as train_step
  # pylint: enable=import-outside-toplevel
  loss = lambda p, x: train_step.weighted_loss_sums(graphdef, p, x)[0]
  return jax.jit(jax.grad(loss)).lower(params, batch).compile()


def ablation(cfg, graphdef, params, batch, rounds: int) -> None:
  """Prints each part's cost in the forward + backward step: the median
  per-round time saved by replacing it with a stand-in."""
  # pylint: disable=import-outside-toplevel
  import jax
  from mllm_jax.modeling import attention, layers
  # pylint: enable=import-outside-toplevel
  if not cfg.custom_vjp or cfg.kv_heads != cfg.num_heads:
    print("ablation skipped: it replaces the custom-VJP SwiGLU and the "
          "multi-head attention core")
    return
  core = ("cpu_fused_attention" if cfg.attention_backend == "cpu_fused"
          else "custom_vjp_attention")
  stand_ins = {
      "SwiGLU MLP": (layers, "swiglu",
                     lambda x, w_gate, w_up, w_down: x * 1.001),
      "attention core": (attention, core,
                         lambda q, k, v, mask, bias=None: q + k / 2 + v / 4),
  }

  variants = {"whole step": compile_grad(graphdef, params, batch)}
  for part, (module, name, stand_in) in stand_ins.items():
    original = getattr(module, name)
    setattr(module, name, stand_in)
    try:
      variants[f"without {part}"] = compile_grad(graphdef, params, batch)
    finally:
      setattr(module, name, original)
  times = {name: [] for name in variants}
  order = list(variants)
  for i in range(rounds + 1):  # the first round warms up
    for name in order if i % 2 else order[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(variants[name](params, batch))
      if i:
        times[name].append(time.perf_counter() - start)
  whole = times["whole step"]
  print(f"ablation ({rounds} interleaved rounds): whole step median "
        f"{statistics.median(whole) * 1e3:.0f} ms")
  for part in stand_ins:
    saved = statistics.median(
        [a - b for a, b in zip(whole, times[f"without {part}"])])
    print(f"  {part:28s} costs {saved * 1e3:5.0f} ms of the step "
          f"({saved / statistics.median(whole):.0%})")


def swiglu_ceiling(cfg, batch: int, seq: int, repeats: int) -> None:
  """Prints the SwiGLU block's forward + backward FLOP/s alone, as a share of
  the matmul peak measured alternately with it (best of each)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from mllm_jax.modeling.layers import swiglu
  from mllm_jax.train.metrics import measure_cpu_peak_flops
  # pylint: enable=import-outside-toplevel
  d, h = cfg.embed_dim, cfg.hidden_dim
  keys = jax.random.split(jax.random.key(0), 5)
  x, d_out = (jax.random.normal(k, (batch, seq, d)) for k in keys[:2])
  weights = [jax.random.normal(k, shape) / shape[0] ** 0.5
             for k, shape in zip(keys[2:], [(d, h), (d, h), (h, d)])]

  @jax.jit
  def fwd_bwd(x, *weights):
    _, pull = jax.vjp(swiglu, x, *weights)
    return pull(d_out)

  jax.block_until_ready(fwd_bwd(x, *weights))
  best, peak = float("inf"), 0.0
  for _ in range(repeats):  # alternate, so both bests see the same host
    start = time.perf_counter()
    jax.block_until_ready(fwd_bwd(x, *weights))
    best = min(best, time.perf_counter() - start)
    peak = max(peak, measure_cpu_peak_flops(repeats=1))
  flops = 9 * 2 * batch * seq * d * h  # 3 GEMMs forward, 6 backward
  print(f"SwiGLU block alone, forward + backward (9 GEMMs of {batch * seq}"
        f"x{d}x{h}): {best * 1e3:.1f} ms, {flops / best / 1e9:.0f} GFLOP/s ="
        f" {flops / best / peak:.1%} of the {peak / 1e9:.0f} GFLOP/s matmul"
        f" peak")


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
