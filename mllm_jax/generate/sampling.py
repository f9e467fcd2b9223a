"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Pure functions of float32 logits [B, V], so the decode loop compiles them in
and tests can check the distributions directly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mllm_jax.configlib import check

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick tokens. Hashable: it is a static argument of the jit.

  temperature: 0 is greedy (argmax); otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0: all).
  top_p: keep the smallest set of most likely tokens whose probability
    reaches p (1.0: all). Applied after top-k, as in HF transformers.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self, prefix: str = "sampling") -> None:
    check(self.temperature >= 0, f"{prefix}.temperature", "must be >= 0")
    check(self.top_k >= 0, f"{prefix}.top_k", "must be >= 0 (0: no top-k)")
    check(0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with excluded tokens set to -inf."""
  logits = logits.astype(jnp.float32) / params.temperature
  vocab = logits.shape[-1]
  if 0 < params.top_k < vocab:
    kth = jax.lax.top_k(logits, params.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if params.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Probability mass strictly before each token: keep while < p, so the
    # token that crosses p is kept and the most likely one always is.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < params.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, NEG_INF)
  return logits


def sample(logits: jax.Array, rng: jax.Array,
           params: SamplingParams) -> jax.Array:
  """Next token ids [B] from logits [B, V]."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, params),
                                axis=-1).astype(jnp.int32)


def sample_and_score(logits: jax.Array, rng: jax.Array, params: SamplingParams,
                     processed: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`sample`, plus each token's log-probability under the model's softmax
  (`token_logprobs`) and, with `processed`, under the distribution it was
  actually drawn from (temperature, top-k, top-p applied; 0 when greedy,
  which puts all mass on the argmax), else None. The filtering runs once for
  both, and the draw is the one `sample` makes with the same key."""
  logits = logits.astype(jnp.float32)
  if params.greedy:
    tokens = sample(logits, rng, params)
    drawn = jnp.zeros(tokens.shape, jnp.float32) if processed else None
  else:
    filtered = filter_logits(logits, params)
    tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    drawn = token_logprobs(filtered, tokens) if processed else None
  return tokens, token_logprobs(logits, tokens), drawn


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token]: under the model's own distribution (no
  temperature, no filtering), which is what PPO's ratios need."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
