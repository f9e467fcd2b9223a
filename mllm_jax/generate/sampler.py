"""A KV-cache sampler: batched prefill, then a decode loop compiled end to end.

Design
  * Prompts of different lengths are left-padded into one [B, T] batch: pad
    tokens get segment id 0 (invisible to attention) and real tokens count
    positions from 0, so a padded prompt computes exactly what it would alone.
  * Decoding is one `jax.lax.while_loop` (no Python per token). Each step
    samples from the logits carried in the state, records the token and its
    log-probability, feeds the token through the cache and keeps the new
    logits. Rows that have stopped feed segment-0 tokens, which leave their
    cache untouched in effect (empty slots are masked).
  * The loop runs in *chunks* of at most `chunk_size` steps. Between chunks
    the host (1) hands new tokens to the streaming callback and (2) checks
    stop *strings*, which need the tokenizer. Stop *token ids* and interrupt
    ids end rows inside the compiled loop. Trade-off: one chunk (the default
    without stop strings or callback) has no host round trip at all; smaller
    chunks stream with lower latency and stop sooner on a string, at one
    dispatch per chunk and up to chunk_size - 1 wasted steps after a stop
    string. (A per-token `io_callback` would stream each token but force a
    host sync every step, which costs more than the step itself on small
    models.)
  * A decode step streams the weights once and copies neither weights nor
    (at batch > 1) the cache (docs/benchmarks_decode.md has the profile;
    at batch 1 XLA still copies each layer's cache once): the blocks run
    one by one on per-layer weights split once per Sampler (a second copy of
    the block weights while it lives), and the cache is one array per layer
    laid out heads-major, as the attention's dots read it
    (`KVCache.create(per_layer=True)`), updated in place in the loop carry.
  * Interrupts (tool calls): a row that emits an interrupt id stops with the
    token fed into the cache. `Sampler.resume` appends caller tokens (e.g. a
    tool result) through the same cache and continues decoding; the prefix is
    never recomputed. The cache grows (one copy) when it runs out of room.

Log-probabilities are of the sampled token under the model's *unmodified*
softmax (temperature 1, no top-k/top-p), i.e. log pi(token | context): what
PPO's importance ratios and KL penalties need. With `processed_logprobs=True`
the log-probability under the distribution the token was drawn from
(temperature and filters applied) comes too, e.g. for importance weights of
the sampling policy itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mllm_jax.configlib import ConfigError
from mllm_jax.generate.sampling import SamplingParams, sample_and_score
from mllm_jax.modeling.attention import KVCache
from mllm_jax.modeling.decoder import Decoder
from mllm_jax.parallel.config import DEFAULT_RULES, Rules
from mllm_jax.parallel.sharding import (constrain, logical_to_spec, mesh_of,
                                        use_mesh)

# Why a row stopped (DecodeState.stop_reason).
RUNNING, STOP_TOKEN, INTERRUPT, STOP_STRING, LENGTH = range(5)
REASONS = {RUNNING: "running", STOP_TOKEN: "stop_token",
           INTERRUPT: "interrupt", STOP_STRING: "stop_string",
           LENGTH: "length"}
CACHE_MULTIPLE = 64


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries; returned so decoding can resume."""
  cache: KVCache
  logits: jax.Array  # [B, V] float32, for the next token
  positions: jax.Array  # [B] int32, position of the next token
  active: jax.Array  # [B] bool, rows still generating
  stop_reason: jax.Array  # [B] int32
  tokens: jax.Array  # [B, N] this call's tokens (pad after a row's end)
  logprobs: jax.Array  # [B, N] float32 (0 after a row's end)
  processed: jax.Array  # [B, N] float32, as logprobs, sampling distribution
  lengths: jax.Array  # [B] int32 tokens generated this call
  step: jax.Array  # int32 scalar, steps run this call
  rng: jax.Array


def _constrain_state(state: DecodeState) -> DecodeState:
  batch = ("act_batch",)
  cache = state.cache
  kv = lambda x: constrain(x, ("act_batch", "act_kv_heads", None, None)
                           if cache.per_layer else
                           (None, "act_batch", None, "act_kv_heads", None))
  cache = cache.replace(
      k=jax.tree.map(kv, cache.k), v=jax.tree.map(kv, cache.v),
      segment_ids=constrain(cache.segment_ids, ("act_batch", None)),
      positions=constrain(cache.positions, ("act_batch", None)),
      prefix=constrain(cache.prefix, ("act_batch", None)))
  return state.replace(
      cache=cache, logits=constrain(state.logits, ("act_batch", None)),
      positions=constrain(state.positions, batch),
      active=constrain(state.active, batch),
      stop_reason=constrain(state.stop_reason, batch),
      tokens=constrain(state.tokens, ("act_batch", None)),
      logprobs=constrain(state.logprobs, ("act_batch", None)),
      processed=constrain(state.processed, ("act_batch", None)),
      lengths=constrain(state.lengths, batch))


@functools.partial(jax.jit, static_argnames=("graphdef", "batch",
                                             "cache_len", "per_layer"))
def _empty_state(graphdef, params, rng, batch, cache_len, per_layer):
  """A fresh state with an empty cache of `cache_len` slots."""
  cfg = nnx.merge(graphdef, params).cfg
  b = batch
  return _constrain_state(DecodeState(
      cache=KVCache.create(cfg, b, cache_len, per_layer=per_layer),
      logits=jnp.zeros((b, cfg.vocab_size), jnp.float32),
      positions=jnp.zeros((b,), jnp.int32),
      active=jnp.zeros((b,), bool),
      stop_reason=jnp.zeros((b,), jnp.int32),
      tokens=jnp.zeros((b, 0), jnp.int32),
      logprobs=jnp.zeros((b, 0), jnp.float32),
      processed=jnp.zeros((b, 0), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32),
      step=jnp.zeros((), jnp.int32), rng=rng))


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len",
                                             "pad_id"),
                   donate_argnames=("state",))
def _extend(graphdef, params, layers, state, tokens, segments, resume,
            out_len, pad_id, embeddings=None, prefix=None):
  """Feeds left-padded tokens [B, T] through the cache and starts a call.

  Rows with `resume` become active; their next-token logits come from the
  last column (rows without new tokens keep the logits they had).
  embeddings: [B, T, D] fed instead of the tokens' own (a multimodal
  prompt: image features spliced in); prefix: [B, T] bool, bidirectional
  positions (image tokens), kept in the cache for later queries.
  """
  model = nnx.merge(graphdef, params)
  b = tokens.shape[0]
  positions = state.positions[:, None] + jnp.maximum(
      jnp.cumsum(segments, axis=1) - 1, 0)
  logits, cache = model(None if embeddings is not None else tokens,
                        positions, segments, prefix, cache=state.cache,
                        embeddings=embeddings, **_layers_arg(layers))
  fed = segments.sum(axis=1)
  return _constrain_state(state.replace(
      cache=cache,
      logits=jnp.where((fed > 0)[:, None], logits[:, -1], state.logits),
      positions=state.positions + fed,
      active=resume,
      stop_reason=jnp.where(resume, RUNNING, state.stop_reason),
      tokens=jnp.full((b, out_len), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, out_len), jnp.float32),
      processed=jnp.zeros((b, out_len), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32),
      step=jnp.zeros((), jnp.int32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling",
                                             "stop_ids", "interrupt_ids",
                                             "pad_id", "processed"),
                   donate_argnames=("state",))
def _decode(graphdef, params, layers, state, limit, sampling, stop_ids,
            interrupt_ids, pad_id, processed):
  """Runs decode steps until `limit` steps or no row is active.

  layers: `_layer_states` of the same parameters. The blocks run one by one
  on them: a scan over the stacked weights copies every layer's weights out
  on every step, and slicing them here would copy them all on every call.
  """
  model = nnx.merge(graphdef, params)

  def member(tok, ids):
    if not ids:
      return jnp.zeros(tok.shape, bool)
    return (tok[:, None] == jnp.asarray(ids, jnp.int32)[None]).any(axis=1)

  def cond(s):
    return (s.step < limit) & s.active.any()

  def body(s):
    rng, key = jax.random.split(s.rng)
    active = s.active
    tok, logp, drawn = sample_and_score(s.logits, key, sampling, processed)
    tok = jnp.where(active, tok, pad_id)
    at = (0, s.step)
    put = lambda out, x: jax.lax.dynamic_update_slice(out, x[:, None], at)
    tokens = put(s.tokens, tok)
    logprobs = put(s.logprobs, jnp.where(active, logp, 0.0))
    drawn = (s.processed if drawn is None
             else put(s.processed, jnp.where(active, drawn, 0.0)))
    seg = active.astype(jnp.int32)[:, None]
    logits, cache = model(tok[:, None], s.positions[:, None], seg,
                          cache=s.cache, **_layers_arg(layers))
    stopped = active & member(tok, stop_ids)
    interrupted = active & member(tok, interrupt_ids) & ~stopped
    reason = jnp.where(stopped, STOP_TOKEN,
                       jnp.where(interrupted, INTERRUPT, s.stop_reason))
    return _constrain_state(s.replace(
        cache=cache, logits=logits[:, -1],
        positions=s.positions + active, active=active & ~stopped & ~interrupted,
        stop_reason=reason, tokens=tokens, logprobs=logprobs,
        processed=drawn, lengths=s.lengths + active, step=s.step + 1, rng=rng))

  return jax.lax.while_loop(cond, body, _constrain_state(state))


def _layers_arg(layers) -> dict[str, Any]:
  """The model's `layers=` when there are per-layer weights (Decoder), else
  nothing, so that other models with the Decoder's call keep working."""
  return {} if layers is None else {"layers": layers}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_states(graphdef, params):
  return nnx.merge(graphdef, params).layer_states()


def _grow_cache(state: DecodeState, new_len: int) -> DecodeState:
  """Copies the cache into `new_len` slots (the new ones empty)."""
  cache = state.cache
  extra = new_len - cache.max_len
  pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0)
                                    for i in range(x.ndim)])
  return state.replace(cache=cache.replace(
      # Slots are axis 2 of [L, B, S, KV, D] and of per-layer [B, KV, S, D].
      k=jax.tree.map(lambda x: pad(x, 2), cache.k),
      v=jax.tree.map(lambda x: pad(x, 2), cache.v),
      segment_ids=pad(cache.segment_ids, 1),
      positions=pad(cache.positions, 1), prefix=pad(cache.prefix, 1)))


def _round_up(n: int, multiple: int) -> int:
  return multiple * max(1, math.ceil(n / multiple))


@dataclasses.dataclass
class Generation:
  """One generate/resume call's result, per real (unpadded) prompt row.

  tokens[i]: the new tokens of row i, ending with the stop or interrupt token
    when there was one (a stop string's row ends with the token completing it).
  logprobs[i]: log softmax(logits)[token] at temperature 1, unfiltered.
  processed_logprobs[i]: with `processed_logprobs=True`, the log-probability
    under the distribution sampled from (temperature, top-k, top-p; 0 when
    greedy), else None.
  stop_reasons[i]: 'stop_token', 'interrupt', 'stop_string' or 'length'.
  texts[i]: decoded tokens (cut before the stop string), with a tokenizer.
  state: the device state, for `Sampler.resume`.
  """
  tokens: list[list[int]]
  logprobs: list[np.ndarray]
  stop_reasons: list[str]
  texts: list[str] | None
  state: DecodeState
  num_rows: int
  processed_logprobs: list[np.ndarray] | None = None


def _stop_string_cut(tokenizer, tokens: Sequence[int], start: int,
                     stop_strings: Sequence[str]) -> tuple[int, str] | None:
  """(tokens to keep, text before the stop string) if one appears in the
  decoded tokens at or after token `start`, else None."""
  text = tokenizer.decode(list(tokens))
  if not any(s in text for s in stop_strings):
    return None
  for keep in range(max(start, 1), len(tokens) + 1):
    text = tokenizer.decode(list(tokens[:keep]))
    hits = [text.find(s) for s in stop_strings if s in text]
    if hits:
      return keep, text[:min(hits)]
  return None


class Sampler:
  """Generates from a Decoder; optionally data-parallel over a mesh.

  With a mesh, the batch is split over the rules' `act_batch` axes (padded to
  a multiple of their size with inactive rows) and the model's own sharding
  constraints apply; parameters stay wherever they already live. Without
  one, a model sharded on a mesh generates on that mesh (otherwise every
  device would decode every row).
  """

  def __init__(self, model: Decoder, tokenizer: Any = None,
               mesh: Mesh | None = None, rules: Rules | None = None,
               pad_id: int = 0, prompt_multiple: int = 16):
    self.graphdef, self.params = nnx.split(model)
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.mesh = mesh if mesh is not None else mesh_of(model)
    self.rules = tuple(rules if rules is not None else DEFAULT_RULES)
    self.pad_id = pad_id
    self.prompt_multiple = prompt_multiple
    # Per-layer weights and cache (the fast decode path) for a Decoder; a
    # model without `layer_states` runs with its stacked cache.
    self.per_layer = hasattr(model, "layer_states")
    self._layers = None  # made on first use

  # -- helpers ---------------------------------------------------------------

  def _batch_shards(self) -> int:
    if self.mesh is None:
      return 1
    spec = logical_to_spec(("act_batch",), self.rules, self.mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(self.mesh.shape[a] for a in axes)

  def _put(self, x: np.ndarray, names) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    spec = logical_to_spec(names, self.rules, self.mesh)
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def _layer_params(self) -> list[nnx.State] | None:
    """The blocks' weights split per layer (a second copy of them, held for
    the sampler's lifetime so that no decode call pays for the slicing)."""
    if self._layers is None and self.per_layer:  # (in _run's mesh context)
      self._layers = _layer_states(self.graphdef, self.params)
    return self._layers

  def _context(self):
    return (use_mesh(self.mesh, self.rules) if self.mesh is not None
            else contextlib.nullcontext())

  def _left_pad(self, rows: Sequence[Sequence[int]], batch: int,
                allow_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    width = _round_up(max(len(r) for r in rows), self.prompt_multiple)
    tokens = np.full((batch, width), self.pad_id, np.int32)
    segments = np.zeros((batch, width), np.int32)
    for i, row in enumerate(rows):
      if not row and not allow_empty:
        raise ValueError(f"prompt {i} is empty; give at least one token "
                         f"(e.g. BOS)")
      if row:
        tokens[i, width - len(row):] = row
        segments[i, width - len(row):] = 1
    return tokens, segments

  def _encode(self, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
      raise ValueError("prompts must be a non-empty list (of strings or of "
                       "token-id lists)")
    rows = []
    for p in prompts:
      if isinstance(p, str):
        if self.tokenizer is None:
          raise ValueError("string prompts need Sampler(tokenizer=...)")
        rows.append(list(self.tokenizer.encode(p, add_bos=True)))
      else:
        rows.append([int(t) for t in p])
    for i, row in enumerate(rows):
      bad = [t for t in row if not 0 <= t < self.cfg.vocab_size]
      if bad:
        raise ValueError(f"prompt {i} has token ids outside the vocabulary "
                         f"[0, {self.cfg.vocab_size}): {bad[:5]}")
    return rows

  # -- public API ------------------------------------------------------------

  def generate(self, prompts, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(),
               stop_tokens: Sequence[int] = (),
               stop_strings: Sequence[str] = (),
               interrupt_tokens: Sequence[int] = (), seed: int = 0,
               chunk_size: int | None = None,
               on_chunk: Callable[[list[list[int]]], None] | None = None,
               cache_len: int | None = None,
               processed_logprobs: bool = False) -> Generation:
    """Samples up to `max_new_tokens` after each prompt.

    prompts: strings (encoded with BOS) or lists of token ids, any lengths.
    stop_tokens: ids that end a row (kept as its last token, e.g. EOS).
    stop_strings: texts that end a row, checked on the host between chunks.
    interrupt_tokens: ids that pause a row for `resume` (e.g. a tool call).
    chunk_size: decode steps per compiled call (see the module docstring);
      default: all of them, or 32 with stop strings or a callback.
    on_chunk: called after each chunk with each row's new tokens.
    cache_len: cache slots to allocate (default: prompt + max_new_tokens,
      rounded up); reserve more to resume without growing the cache.
    processed_logprobs: also return each token's log-probability under the
      sampling distribution (`Generation.processed_logprobs`).
    """
    rows = self._encode(prompts)
    sampling.validate()
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = _round_up(len(rows), self._batch_shards())
    rows_padded = rows + [[self.pad_id]] * (batch - len(rows))
    tokens, segments = self._left_pad(rows_padded, batch, allow_empty=False)
    needed = tokens.shape[1] + max_new_tokens
    cache_len = _round_up(max(cache_len or 0, needed), CACHE_MULTIPLE)
    with self._context():
      state = _empty_state(self.graphdef, self.params, jax.random.key(seed),
                           batch=batch, cache_len=cache_len,
                           per_layer=self.per_layer)
    resume = np.arange(batch) < len(rows)
    return self._run(state, tokens, segments, resume, len(rows),
                     max_new_tokens, sampling, stop_tokens, stop_strings,
                     interrupt_tokens, chunk_size, on_chunk,
                     processed_logprobs, self._prompt_inputs(tokens))

  def _prompt_inputs(self, tokens: np.ndarray) -> dict[str, Any]:
    """What the prompt's prefill feeds besides the left-padded tokens
    [B, T]: nothing for text (`MultimodalSampler` adds image embeddings)."""
    del tokens
    return {}

  def resume(self, previous: Generation, appended: Sequence[Sequence[int]],
             max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
             stop_tokens: Sequence[int] = (),
             stop_strings: Sequence[str] = (),
             interrupt_tokens: Sequence[int] = (),
             rows: Sequence[int] | None = None,
             chunk_size: int | None = None,
             on_chunk: Callable[[list[list[int]]], None] | None = None,
             processed_logprobs: bool = False) -> Generation:
    """Appends `appended[i]` (token ids, may be empty) to row i after its
    last generated token, and continues decoding from the cache.

    rows: which rows continue (default: those that stopped on an interrupt).
    The random stream continues from the previous call.
    """
    state = previous.state
    n = previous.num_rows
    if len(appended) != n:
      raise ValueError(f"appended has {len(appended)} rows, the generation "
                       f"has {n}")
    reasons = np.asarray(state.stop_reason)
    if rows is None:
      rows = [i for i in range(n) if reasons[i] == INTERRUPT]
    resume = np.zeros(state.active.shape, bool)
    resume[list(rows)] = True
    appended = [[int(t) for t in a] for a in appended]
    batch = state.active.shape[0]
    padded = appended + [[]] * (batch - n)
    tokens, segments = self._left_pad(padded, batch, allow_empty=True)
    needed = int(state.cache.index) + tokens.shape[1] + max_new_tokens
    if needed > state.cache.max_len:
      state = _grow_cache(state, _round_up(needed, CACHE_MULTIPLE))
    return self._run(state, tokens, segments, resume, n, max_new_tokens,
                     sampling, stop_tokens, stop_strings, interrupt_tokens,
                     chunk_size, on_chunk, processed_logprobs)

  def _run(self, state, tokens, segments, resume, num_rows, max_new_tokens,
           sampling, stop_tokens, stop_strings, interrupt_tokens, chunk_size,
           on_chunk, processed_logprobs, prompt_inputs=None) -> Generation:
    if stop_strings and self.tokenizer is None:
      raise ValueError("stop_strings need Sampler(tokenizer=...)")
    if chunk_size is None:
      chunk_size = 32 if (stop_strings or on_chunk) else max_new_tokens
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    static = dict(sampling=sampling, pad_id=self.pad_id,
                  processed=bool(processed_logprobs),
                  stop_ids=tuple(int(t) for t in stop_tokens),
                  interrupt_ids=tuple(int(t) for t in interrupt_tokens))
    with self._context():
      state = _extend(self.graphdef, self.params, self._layer_params(), state,
                      self._put(tokens, ("act_batch", None)),
                      self._put(segments, ("act_batch", None)),
                      self._put(resume, ("act_batch",)),
                      out_len=max_new_tokens, pad_id=self.pad_id,
                      **(prompt_inputs or {}))
      cut: dict[int, tuple[int, str]] = {}
      seen = np.zeros(num_rows, np.int64)
      step = 0
      while True:
        step = min(step + chunk_size, max_new_tokens)
        state = _decode(self.graphdef, self.params, self._layer_params(),
                        state, step, **static)
        if step >= max_new_tokens and not (stop_strings or on_chunk):
          break
        if not (stop_strings or on_chunk):
          if not np.asarray(state.active).any():
            break
          continue
        out = np.asarray(state.tokens)
        lengths = np.asarray(state.lengths)
        active = np.asarray(state.active).copy()
        if stop_strings:
          for i in range(num_rows):
            if i in cut or lengths[i] == seen[i]:
              continue
            hit = _stop_string_cut(self.tokenizer, out[i, :lengths[i]],
                                   int(seen[i]), stop_strings)
            if hit:
              cut[i] = hit
              active[i] = False
          if cut:
            state = state.replace(active=jax.device_put(
                active, state.active.sharding))
        if on_chunk:
          ends = [cut[i][0] if i in cut else lengths[i]
                  for i in range(num_rows)]
          on_chunk([out[i, seen[i]:max(ends[i], seen[i])].tolist()
                    for i in range(num_rows)])
          seen = np.maximum(seen, ends)
        else:
          seen = np.asarray(lengths[:num_rows], np.int64)
        if step >= max_new_tokens or not active.any():
          break
    return self._finish(state, num_rows, cut, processed_logprobs)

  def _finish(self, state, num_rows, cut, processed) -> Generation:
    out = np.asarray(state.tokens)
    logprobs = np.asarray(state.logprobs)
    drawn = np.asarray(state.processed) if processed else None
    lengths = np.array(state.lengths)
    reasons = np.array(state.stop_reason)
    active = np.asarray(state.active)
    reasons[active] = LENGTH
    # A row that ran out of budget reads as LENGTH (not resumable by default).
    reasons[(reasons == RUNNING)] = LENGTH
    for i, (keep, _) in cut.items():
      lengths[i] = keep
      reasons[i] = STOP_STRING
    state = state.replace(stop_reason=jax.device_put(
        reasons.astype(np.int32), state.stop_reason.sharding))
    tokens = [out[i, :lengths[i]].tolist() for i in range(num_rows)]
    texts = None
    if self.tokenizer is not None:
      texts = [cut[i][1] if i in cut else self.tokenizer.decode(tokens[i])
               for i in range(num_rows)]
    return Generation(
        tokens=tokens,
        logprobs=[logprobs[i, :lengths[i]] for i in range(num_rows)],
        stop_reasons=[REASONS[int(r)] for r in reasons[:num_rows]],
        texts=texts, state=state, num_rows=num_rows,
        processed_logprobs=None if drawn is None else [
            drawn[i, :lengths[i]] for i in range(num_rows)])


def check_sampling_flags(temperature: float, top_k: int, top_p: float
                         ) -> SamplingParams:
  """SamplingParams from CLI flags, with errors naming the flag."""
  params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  try:
    params.validate(prefix="-")
  except ConfigError as e:
    raise ConfigError(str(e).replace("-.", "--")) from e
  return params
