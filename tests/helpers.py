"""Shared test helpers: tiny models, an independent NumPy reference, and
watching a training binary run in a subprocess (to kill and resume it)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from configs.models import model_config
from mllm_jax.configlib import from_config
from mllm_jax.modeling import Decoder, ModelConfig


# What a step gets as frozen parameters when everything trains.
NOTHING_FROZEN = nnx.State({})


def lm_train_step(graphdef, optimizer, schedule, accum: int = 1,
                  z_loss: float = 0.0):
  """The pretraining step (next-token loss) as make_train_step builds it:
  step(state, frozen, batch)."""
  from mllm_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  from mllm_jax.train.task import lm_loss  # pylint: disable=g-import-not-at-top
  return make_train_step(graphdef, optimizer, schedule, lm_loss(z_loss),
                         accum)


def tiny_config(preset: str = "tiny", **overrides) -> ModelConfig:
  return from_config(ModelConfig, model_config(preset, **overrides), "model")


def tiny_model(preset: str = "tiny", seed: int = 0, **overrides):
  cfg = tiny_config(preset, **overrides)
  return cfg, Decoder(cfg, rngs=nnx.Rngs(seed))


def with_config(model: Decoder, cfg: ModelConfig) -> Decoder:
  """The same weights under another config (e.g. another attention backend)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def numpy_forward(model: Decoder, tokens: np.ndarray) -> np.ndarray:
  """Plain multi-head causal LLaMA forward in float64 NumPy, head by head.

  Written independently of the JAX code (loops, explicit rotate-half RoPE),
  so agreement is evidence that both are right.
  """
  cfg: ModelConfig = model.cfg
  p = jax.tree.map(lambda x: np.asarray(x, np.float64),
                   nnx.to_pure_dict(nnx.state(model)))
  b, t = tokens.shape
  h, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_size

  def rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale

  inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(ang), np.sin(ang)

  def rope(x):  # [t, d]
    x1, x2 = x[:, :d // 2], x[:, d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  x = p["embed"]["table"][tokens]
  blk = p["blocks"]
  for layer in range(cfg.num_layers):
    w = jax.tree.map(lambda a: a[layer], blk)
    y = rms(x, w["attn_norm"]["scale"])
    out = np.zeros((b, t, h, d))
    for bi in range(b):
      for hi in range(h):
        kvi = hi // (h // kv)
        q = rope(y[bi] @ w["attn"]["q"][:, hi])
        k = rope(y[bi] @ w["attn"]["k"][:, kvi])
        v = y[bi] @ w["attn"]["v"][:, kvi]
        s = q @ k.T / np.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        out[bi, :, hi] = (s / s.sum(-1, keepdims=True)) @ v
    x = x + np.einsum("bthk,hkd->btd", out, w["attn"]["o"])
    y = rms(x, w["mlp_norm"]["scale"])
    gate, up = y @ w["mlp"]["gate"], y @ w["mlp"]["up"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp"]["down"]
  x = rms(x, p["final_norm"]["scale"])
  head = (p["embed"]["table"].T if cfg.tie_embeddings else p["lm_head"])
  return x @ head


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
  return dataclasses.replace(cfg, **changes)


def random_hf_llama(seed: int = 0, **config):
  """A random transformers.LlamaForCausalLM (eager attention, eval mode) with
  O(1) weights and non-unit norms, so parity tests see real signal."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **config, attn_implementation="eager")).eval()
  return randomise_torch(model)


def randomise_torch(module, seed: int | None = None):
  """Draws O(1) weights (rows of unit-variance outputs) and non-unit norm
  scales and biases into a torch module (from torch's generator, reseeded
  when `seed` is given) and sets eval mode, so that a parity test sees every
  mapping error."""
  import torch  # pylint: disable=import-outside-toplevel
  if seed is not None:
    torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      if p.ndim == 1:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return module.eval()


# ---------------------------------------------- a training binary as a process
# What the kill-and-resume tests share: a launch.* binary started with
# subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True) in a workdir,
# watched through its metrics.jsonl and checkpoints/.


def metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(train_losses(workdir), default=0) >= step:
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.2)
  raise TimeoutError(f"step {step} not reached")


def checkpoint_steps(workdir) -> list[int]:
  """The steps saved under WORKDIR/checkpoints, finished saves only (Orbax
  writes into a temporary folder and renames it to the step when done)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def wait_for_checkpoint(proc, workdir, step, timeout=240):
  """Polls (every 20 ms) until the checkpoint of `step` is written."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if step in checkpoint_steps(workdir):
      return
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  raise TimeoutError(f"checkpoint {step} not written")


def finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out + err
