"""The decoder's hyper-parameters, with the derived sizes LLaMA uses.

Imports no JAX at module level: config files import this.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mllm_jax.configlib import check, check_choice

ATTENTION_BACKENDS = ("xla", "dot_product", "cudnn", "splash", "cpu_fused")
# Backends that run on one platform only: backend -> (platform, what it is).
PLATFORM_BACKENDS = {
    "cudnn": ("gpu", "'cudnn' (flash attention) needs an NVIDIA GPU"),
    "splash": ("tpu", "'splash' (Pallas flash attention) needs a TPU"),
    "cpu_fused": ("cpu", "'cpu_fused' is a C++ kernel for CPU"),
}
REMAT_POLICIES = ("none", "full", "save_dots", "offload_dots")
POSITION_ENCODINGS = ("rope", "alibi")
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# How a run computes, not what the model is: kernels, recomputation, custom
# backward passes, scan unrolling and loss chunking give the same function.
# A checkpoint does not record them; each run takes them from its own config
# (so weights trained with the CPU kernels load on a GPU or TPU as they are).
RUN_FIELDS = ("attention_backend", "remat", "scan_unroll", "custom_vjp",
              "loss_chunk_len", "loss_positions")


class Dtypes:
  """`dtype` / `param_dtype` fields as numpy dtypes (JAX imported lazily, so
  config files import this without JAX); shared by the model configs."""
  dtype: str
  param_dtype: str

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    return jnp.dtype(self.param_dtype)


class Architecture:
  """`architecture()`: the fields a checkpoint records, every field but the
  class's `run_fields` (how a run computes, which each run takes from its
  own config)."""
  run_fields: ClassVar[tuple[str, ...]] = ()

  def architecture(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in self.run_fields}


@dataclasses.dataclass(frozen=True)
class ModelConfig(Dtypes, Architecture):
  """A LLaMA-family decoder. Zero for a derived size means "use the default".

  num_kv_heads: 0 -> num_heads (multi-head); 1 is multi-query; else grouped.
  head_dim: 0 -> embed_dim // num_heads.
  mlp_dim: 0 -> 2/3 * 4 * embed_dim rounded up to a multiple of mlp_multiple_of.
  """
  vocab_size: int = 32000
  embed_dim: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 0
  mlp_multiple_of: int = 256
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  max_seq_len: int = 2048
  position: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  # xla | dot_product | cudnn (GPU) | splash (TPU) | cpu_fused (a C++ kernel
  # for CPU, compiled on first use; docs/modeling.md).
  attention_backend: str = "xla"
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  remat: str = "none"
  # Layers per scan iteration: >1 lets XLA fuse across layers (faster steps,
  # same numbers) at a compile time that grows with it.
  scan_unroll: int = 1
  # Hand-written backward passes for the attention core ("xla" backend), the
  # SwiGLU MLP and RMSNorm: the same gradients up to float rounding, with
  # fewer passes over memory (the CPU step's bottleneck, docs/benchmarks.md).
  custom_vjp: bool = False
  # Positions per chunk when the training loss applies the output projection
  # (0: the whole sequence at once): bounds the float32 logits held at once
  # and keeps each chunk's in cache (losses.head_cross_entropy).
  loss_chunk_len: int = 0
  # Share of each row's positions the training loss's output projection
  # runs on (1: all): below 1 only on the positions that carry loss,
  # gathered into that share of the row, or 2x, 4x ... when a batch needs
  # more (losses.head_plan). The same loss and gradients, fewer FLOPs.
  loss_positions: float = 1.0
  run_fields: ClassVar[tuple[str, ...]] = RUN_FIELDS

  # Derived sizes: read these, never the raw zero-means-default fields.
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def hidden_dim(self) -> int:
    if self.mlp_dim:
      return self.mlp_dim
    hidden = int(2 * 4 * self.embed_dim / 3)
    multiple = self.mlp_multiple_of
    return multiple * ((hidden + multiple - 1) // multiple)

  def validate(self, prefix: str = "model") -> None:
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                 "max_seq_len", "mlp_multiple_of", "scan_unroll"):
      check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
    for name in ("num_kv_heads", "head_dim", "mlp_dim", "loss_chunk_len"):
      check(getattr(self, name) >= 0, f"{prefix}.{name}",
            "must be >= 0 (0 means derived)")
    check(self.num_heads % self.kv_heads == 0, f"{prefix}.num_kv_heads",
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
          f"{self.kv_heads}")
    check(self.head_dim or self.embed_dim % self.num_heads == 0,
          f"{prefix}.num_heads",
          f"embed_dim={self.embed_dim} is not divisible by num_heads="
          f"{self.num_heads}; set model.head_dim explicitly")
    check(self.position != "rope" or self.head_size % 2 == 0,
          f"{prefix}.head_dim", "RoPE needs an even head size")
    check_choice(self.position, POSITION_ENCODINGS, f"{prefix}.position")
    check_choice(self.rope_scaling, ROPE_SCALINGS, f"{prefix}.rope_scaling")
    check_choice(self.attention_backend, ATTENTION_BACKENDS,
                 f"{prefix}.attention_backend")
    check_choice(self.remat, REMAT_POLICIES, f"{prefix}.remat")
    check_choice(self.param_dtype, DTYPES, f"{prefix}.param_dtype")
    check_choice(self.dtype, DTYPES, f"{prefix}.dtype")
    check(self.rope_scaling == "none" or self.rope_scaling_factor >= 1.0,
          f"{prefix}.rope_scaling_factor", "must be >= 1 when scaling RoPE")
    check(self.norm_eps > 0, f"{prefix}.norm_eps", "must be positive")
    check(0 < self.loss_positions <= 1, f"{prefix}.loss_positions",
          f"{self.loss_positions} must be in (0, 1]")

  def check_seq_len(self, seq_len: int, field: str = "data.seq_len") -> None:
    """Fails early when training sequences of `seq_len` cannot run."""
    check(0 < seq_len <= self.max_seq_len, field,
          f"{seq_len} must be in [1, model.max_seq_len={self.max_seq_len}]")
    check(not self.loss_chunk_len or seq_len % self.loss_chunk_len == 0,
          field, f"{seq_len} is not a multiple of model.loss_chunk_len="
          f"{self.loss_chunk_len}")

  def check_platform(self, platform: str | None = None,
                     prefix: str = "model") -> None:
    """Fails early when this platform cannot run the chosen kernels."""
    if platform is None:
      import jax  # pylint: disable=g-import-not-at-top
      platform = jax.default_backend()
    if self.attention_backend in PLATFORM_BACKENDS:
      needed, what = PLATFORM_BACKENDS[self.attention_backend]
      others = [b for b in ATTENTION_BACKENDS if b not in PLATFORM_BACKENDS]
      check(platform == needed, f"{prefix}.attention_backend",
            f"{what} but this platform is {platform!r}; use one of {others}")
    if self.remat == "offload_dots":
      check(platform in ("gpu", "tpu"), f"{prefix}.remat",
            f"'offload_dots' moves activations to pinned host memory, which "
            f"platform {platform!r} lacks; use 'save_dots' or 'full'")
