"""MFU of the real training step on this machine's accelerator.

  python bench/mfu.py --preset=1b --batch=8 --seq=2048 \
      --attention=cudnn --remat=save_dots

Builds the preset's decoder in bfloat16 compute (float32 parameters and AdamW
moments), jits the trainer's own step (mllm_jax.train.compile, donated state,
explicit shardings over all local devices as FSDP), times `--steps` steps
after `--warmup`, and prints tokens/s and MFU against the datasheet bf16 peak
(DATASHEET_PEAK_FLOPS; on CPU a float32 matmul measured in the same run).
Before timing it checks that the chosen attention backend computes the same
logits as the XLA reference on a packed batch. Needs only jax, flax and optax.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.host import host_line, load_line  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mllm_jax.configlib import ConfigError  # noqa: E402
from mllm_jax.modeling import Decoder, ModelConfig, count_params  # noqa: E402
from mllm_jax.parallel.config import ParallelConfig  # noqa: E402
from mllm_jax.parallel.mesh import make_mesh  # noqa: E402
from mllm_jax.parallel.sharding import use_mesh  # noqa: E402
from mllm_jax.train.compile import build_program, initial_state  # noqa: E402
from mllm_jax.train.metrics import (peak_flops_per_device,  # noqa: E402
                                    train_flops_per_token)
from mllm_jax.train.config import OptimizerConfig, TrainConfig  # noqa: E402
from mllm_jax.train.task import language_model_task  # noqa: E402

# configs/models.py presets, repeated here without ml_collections so the
# script runs on a bare accelerator image.
PRESETS = {
    "125m": dict(embed_dim=768, num_heads=12, num_layers=12),
    "1b": dict(embed_dim=2048, num_heads=16, num_kv_heads=8, num_layers=22),
    "7b": dict(embed_dim=4096, num_heads=32, num_layers=32),
}


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0):
  """Two documents per row, so segment masking is exercised."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (batch, seq + 1)).astype(np.int32)
  split = seq // 3
  positions = np.where(np.arange(seq) < split, np.arange(seq),
                       np.arange(seq) - split)
  segments = np.where(np.arange(seq) < split, 1, 2)
  weights = np.ones(seq, np.float32)
  weights[split - 1] = 0
  tile = lambda x: np.tile(x, (batch, 1))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": tile(positions).astype(np.int32),
          "segment_ids": tile(segments).astype(np.int32),
          "loss_weights": tile(weights)}


def check_backend(cfg: ModelConfig, batch: dict) -> float:
  """Max |logits(backend) - logits(xla)| / max |logits(xla)| on 2 rows."""
  small = dataclasses.replace(cfg, num_layers=2)
  model = Decoder(small, rngs=nnx.Rngs(0))
  ref_model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Decoder(
      dataclasses.replace(small, attention_backend="xla"), nnx.Rngs(0)))),
                        nnx.state(model))
  args = (batch["inputs"][:2], batch["positions"][:2],
          batch["segment_ids"][:2])
  got = jax.jit(lambda m, *a: m(*a))(model, *args)
  want = jax.jit(lambda m, *a: m(*a))(ref_model, *args)
  return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def main():
  print(host_line(), flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--attention", default="cudnn",
                      choices=("xla", "dot_product", "cudnn", "splash"))
  parser.add_argument("--remat", default="none",
                      choices=("none", "full", "save_dots", "offload_dots"))
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--loss_chunk_len", type=int, default=0,
                      help="model.loss_chunk_len: positions per chunk of "
                      "the output projection + loss (0: the whole sequence)")
  parser.add_argument("--custom_vjp", action="store_true",
                      help="model.custom_vjp: hand-written backward passes "
                      "(the 'xla' attention backend, SwiGLU, RMSNorm)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  cfg = ModelConfig(**PRESETS[args.preset], max_seq_len=args.seq,
                    attention_backend=args.attention, remat=args.remat,
                    dtype=args.dtype, loss_chunk_len=args.loss_chunk_len,
                    custom_vjp=args.custom_vjp)
  try:
    cfg.validate()
    cfg.check_platform()
    cfg.check_seq_len(args.seq, "--seq")
  except ConfigError as e:
    sys.exit(f"error: {e}")
  batch = packed_batch(args.batch, args.seq, cfg.vocab_size)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{args.preset}: {count_params(cfg):,} parameters; batch "
        f"{args.batch} x {args.seq}; attention {args.attention}; remat "
        f"{args.remat}; compute {args.dtype}; loss_chunk_len "
        f"{args.loss_chunk_len}; custom_vjp {args.custom_vjp}", flush=True)
  if args.attention != "xla":
    print(f"{args.attention} vs xla logits, relative max difference: "
          f"{check_backend(cfg, batch):.2e}", flush=True)

  # The trainer's own program: the pretraining task, set up as train() does.
  parallel = ParallelConfig(data=1, fsdp=-1)
  mesh = make_mesh(parallel)
  program = build_program(language_model_task(cfg), parallel,
                          OptimizerConfig(warmup_steps=10),
                          TrainConfig(steps=1000, batch_size=args.batch), mesh)
  state, frozen = initial_state(program, seed=0)
  device_batch = jax.device_put(batch, program.batch_sharding)
  times = []
  with use_mesh(mesh, parallel.rules):
    for i in range(args.warmup + args.steps):
      start = time.perf_counter()
      state, metrics = program.step(state, frozen, device_batch)
      float(metrics["loss"])  # wait for the step
      if i >= args.warmup:
        times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  tokens = args.batch * args.seq
  flops = train_flops_per_token(cfg, args.seq) * tokens / seconds
  peak, source = peak_flops_per_device()
  print(f"step {seconds * 1e3:.1f} ms (median of {args.steps}); "
        f"{tokens / seconds:,.0f} tokens/s; loss {float(metrics['loss']):.3f}")
  print(f"model FLOP/s {flops:.3e}; peak {peak * jax.device_count():.3e} "
        f"({source})")
  print(f"MFU {flops / (peak * jax.device_count()):.1%}")


if __name__ == "__main__":
  main()
  print(f"end: {load_line()}")
