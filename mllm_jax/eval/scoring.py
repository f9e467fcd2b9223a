"""Log-likelihood of continuations given contexts: the core of multiple
choice and perplexity.

Requests are packed into right-padded [B, T] batches (padding has segment 0)
whose length is rounded up to a bucket, so a whole benchmark compiles only a
few shapes. Each token's log-probability comes from a float32 log-softmax of
the logits at the previous position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mllm_jax.modeling.decoder import Decoder
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import logical_to_spec, use_mesh


@dataclasses.dataclass(frozen=True)
class Score:
  """Sum of log p(continuation | context), its token count, and whether
  every continuation token was the argmax (lm-eval's `is_greedy`)."""
  logprob: float
  num_tokens: int
  is_greedy: bool


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, params, tokens, segments):
  """[B, T] -> log p(tokens[:, t] | tokens[:, :t]) at t >= 1, and argmax hit."""
  model = nnx.merge(graphdef, params)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  logits = model(tokens, positions, segments)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = tokens[:, 1:]
  picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == target
  return picked, greedy


class Scorer:
  """Scores token sequences with a Decoder (optionally batch-sharded)."""

  def __init__(self, model: Decoder, batch_size: int = 16,
               bucket: int = 32, max_len: int | None = None,
               mesh: Mesh | None = None, rules: Rules | None = None):
    self.graphdef, self.params = nnx.split(model)
    self.max_len = max_len or model.cfg.max_seq_len
    self.batch_size = batch_size
    self.bucket = bucket
    self.mesh = mesh
    self.rules = tuple(rules if rules is not None else DEFAULT_RULES)

  def _run(self, tokens: np.ndarray, segments: np.ndarray):
    if self.mesh is None:
      return _token_logprobs(self.graphdef, self.params, jnp.asarray(tokens),
                             jnp.asarray(segments))
    sharding = NamedSharding(self.mesh, logical_to_spec(
        ("act_batch", None), self.rules, self.mesh))
    with use_mesh(self.mesh, self.rules):
      return _token_logprobs(self.graphdef, self.params,
                             jax.device_put(tokens, sharding),
                             jax.device_put(segments, sharding))

  def sequence_logprobs(self, sequences: Sequence[Sequence[int]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence: (log p of tokens 1.., argmax hits), each [len - 1]."""
    results: list = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    shards = 1
    if self.mesh is not None:
      spec = logical_to_spec(("act_batch",), self.rules, self.mesh)[0]
      axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
      shards = math.prod(self.mesh.shape[a] for a in axes)
    batch = self.batch_size * shards
    for start in range(0, len(order), batch):
      ids = order[start:start + batch]
      longest = max(len(sequences[i]) for i in ids)
      if longest > self.max_len:
        raise ValueError(f"a request has {longest} tokens, more than "
                         f"max_len={self.max_len}; truncate the context")
      width = min(self.bucket * math.ceil(longest / self.bucket),
                  max(self.max_len, longest))
      tokens = np.zeros((batch, width), np.int32)
      segments = np.zeros((batch, width), np.int32)
      for row, i in enumerate(ids):
        tokens[row, :len(sequences[i])] = sequences[i]
        segments[row, :len(sequences[i])] = 1
      logp, greedy = map(np.asarray, self._run(tokens, segments))
      for row, i in enumerate(ids):
        n = len(sequences[i]) - 1
        results[i] = (logp[row, :n], greedy[row, :n])
    return results

  def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
            ) -> list[Score]:
    """(context ids, continuation ids) pairs -> Score of the continuation.

    The context is cut from the left when the pair exceeds max_len (the
    continuation is always scored in full).
    """
    sequences, counts = [], []
    for context, continuation in requests:
      if not continuation:
        raise ValueError("an empty continuation has no likelihood to score")
      if not context:
        raise ValueError("the context must hold at least one token (BOS)")
      full = list(context) + list(continuation)
      sequences.append(full[-(self.max_len):] if len(full) > self.max_len
                       else full)
      counts.append(len(continuation))
    out = []
    for (logp, greedy), n in zip(self.sequence_logprobs(sequences), counts):
      out.append(Score(float(logp[-n:].sum()), n, bool(greedy[-n:].all())))
    return out
