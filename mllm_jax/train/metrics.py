"""Throughput accounting (model FLOPs, MFU) and metric sinks.

MFU = model FLOPs per second / peak FLOPs per second. Model FLOPs count the
matmuls of a forward and backward pass (6 per parameter per token, embedding
lookups excluded) plus attention scores and values with the causal triangle
counted once (6 * layers * length * heads * head_dim per token). The peak is
the datasheet bf16 figure on GPU/TPU, or on CPU a float32 matmul measured in
the same run; the writer says which.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.modeling.config import ModelConfig

# Dense bf16 matmul peaks per chip, from the vendors' datasheets.
DATASHEET_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls (not the embedding lookup)."""
  d, h, kv, hd, f = (cfg.embed_dim, cfg.num_heads, cfg.kv_heads,
                     cfg.head_size, cfg.hidden_dim)
  per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size  # + LM head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
  return 6 * matmul_params(cfg) + attention


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of this machine, measured with JAX."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)),
                  jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
  """(FLOP/s of one device, where the figure comes from)."""
  if override:
    return override, "configured"
  device = jax.devices()[0]
  if device.platform == "cpu":
    # Simulated CPU devices share the real cores: the peak is per process.
    return (measure_cpu_peak_flops() / jax.local_device_count(),
            "measured float32 matmul on this CPU")
  for name, flops in DATASHEET_PEAK_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return flops, f"{device.device_kind} datasheet bf16"
  raise ValueError(
      f"train.peak_flops: no datasheet figure for {device.device_kind!r}; set "
      "train.peak_flops explicitly")


def console(message: str) -> None:
  """A progress line for the person watching (process 0 only).

  Library logs (Orbax's are chatty) stay behind absl's --verbosity; these
  lines are the run's own story and always print.
  """
  if jax.process_index() == 0:
    from tqdm import tqdm
    tqdm.write(message)


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX
  imports torch whenever it is installed (it is, for the parity tests),
  only to accept torch tensors, which nothing here passes; that import cost
  every binary about 4 s of start-up on a CPU host."""
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricWriter:
  """Writes each logged step to the console, TensorBoard and metrics.jsonl.

  Only process 0 writes. On resume, lines past the restored step are dropped
  so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate(resume_step)
    self.tensorboard = _summary_writer(os.path.join(workdir, "tensorboard"))

  def _truncate(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f
              if line.strip() and json.loads(line)["step"] <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in row.items():
      if key != "step":
        self.tensorboard.add_scalar(key, value, step)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
