r"""Tunix's side of bench/ppo.py: one process in Tunix's own venv (google-tunix,
its jax/flax; no mllm_jax), started by bench/ppo.py through sft_step's
`Child` and stepped in lock-step with ours (`--peer=tunix`).

It runs `tunix.rl.ppo.ppo_learner.PPOLearner.train` itself over an
`RLCluster` (rollout engine "vanilla", i.e. Tunix's own KV-cache `Sampler`)
on the same weights, prompts and settings as ours; only the glue that Tunix
leaves to the user is written here:

  - the policy and the reference: Tunix's `llama3` model loaded from the
    transformers export of our SFT model (`convert.hf.native_to_hf`; the
    split-half RoPE of that export is what Tunix's llama3 applies);
  - the critic and the reward model: Tunix wants modules that return
    per-token scores [B, T, 1] and reads the reward at the last completion
    token. `Scorer` is the reward model's trunk (the same export, its LM
    head dropped) with our scalar head AND bias; the reward model is
    `RewardWithEndOfContext`, which builds the rows our reward model reads
    (prompt + reply + end-of-turn + end-of-context: Tunix's sampler cuts the
    end-of-turn token off the completion, so it is put back for a reply that
    ended) and subtracts the missing-end penalty (1.0) from replies that ran
    to the token limit, as launch.ppo's rollout does (Tunix has no such
    penalty);
  - rope_theta: Tunix 0.1.7's llama3 attention never passes the config's
    rope_theta to `apply_rope`, so its llama3 always rotates with 1e6; ours
    uses 10000 (the log-prob check fails without this). `load` rebinds the
    module's `apply_rope` with the config's theta: the same work, the right
    frequencies;
  - prompts: Tunix's sampler takes strings and encodes them with the
    tokenizer it is given. Ours are token ids already (the vicuna_v1 chat
    format), so each prompt travels as a key ("#17") and `IdTokenizer`
    encodes a key to exactly our ids; nothing else is ever encoded, and
    decoding (Tunix only uses the text for reward functions, which this run
    has none of) just joins ids;
  - lock-step and the time split: `LockStepLearner` waits for "go" before
    each global step (one PPO iteration: 16 prompts), blocks on the actor's
    and critic's parameters at its end, and reports the step split into
    generate (`RLCluster.generate`), reward (`RLCluster.get_rewards`, the
    reward model's forward), forwards+gae (the rest of
    `_generate_and_compute_advantage`: reference, old-policy and critic
    forwards, KL-shaped rewards, GAE, whitening) and learn (the rest: actor
    and critic optimizer steps and Tunix's bookkeeping between them). Each
    timed stage is blocked on before its clock stops, so work JAX dispatched
    asynchronously is charged to the stage that launched it.

No overlap: every role sits on the same one-device CPU mesh, so Tunix's
learner does not prepare the next rollout on its worker thread while the
trainer runs (`can_enable_async_rollout` is False, checked and reported);
with synchronous loading the trainer waits until the whole mini-batch has
been generated and scored.

Where Tunix's PPO differs from ours and TRL's (the nearest equivalent is
used; bench/ppo.py and docs/benchmarks_ppo.md say so):
  - rollout granularity: Tunix's learner samples and scores each
    mini-batch (8 prompts) just before training on it, `num_iterations`
    (2) times, then the next mini-batch; ours samples all 16 prompts first,
    then runs 2 epochs x 2 minibatches. Both make 16 replies and 4 optimizer
    steps of 8 rows per iteration, for actor and critic alike; Tunix's
    sampler runs twice on 8 rows instead of once on 16;
  - the end-of-turn token is not part of Tunix's completion, so the policy
    is not trained on emitting it (it is still sampled, and scored through
    `RewardWithEndOfContext`);
  - separate AdamW optimizers for actor and critic (ours: one step over a
    combined loss with value coefficient 0.5; Tunix's value loss carries
    its own 0.5); KL "kl" = log pi - log pi_ref, as ours (k1);
  - the sampler's seed is the rollout config's, the same every call.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.sft_step import Reporter, peak_rss_mb  # noqa: E402  pylint: disable=wrong-import-position


class IdTokenizer:
  """A tokenizer for Tunix's `TokenizerAdapter` that maps each prompt key
  to our token ids (so Tunix's sampler sees exactly the prompts ours does);
  no BOS is added (ours are already in the ids)."""

  def __init__(self, prompts: list[list[int]], pad_id: int, eos_id: int):
    self.ids = {self.key(i): list(p) for i, p in enumerate(prompts)}
    self._pad, self._eos = pad_id, eos_id

  @staticmethod
  def key(i: int) -> str:
    return f"#{i}"

  def encode(self, text: str, **unused) -> list[int]:
    return list(self.ids[text])

  def decode(self, ids, **unused) -> str:
    return " ".join(map(str, ids))

  def bos_id(self):
    return None

  def eos_id(self) -> int:
    return self._eos

  def pad_id(self) -> int:
    return self._pad


def build_modules(nnx, jnp):
  """The critic and reward modules (defined here because they subclass
  flax's nnx.Module, imported only inside Tunix's venv)."""

  class Scorer(nnx.Module):
    """A llama3 trunk (its LM head dropped) + our scalar head and bias:
    per-token scores [B, T, 1], Tunix's critic/reward contract."""

    def __init__(self, trunk, head, bias):
      del trunk.lm_head
      self.trunk = trunk
      self.head = nnx.Param(jnp.asarray(head, jnp.float32)[:, None])
      self.bias = nnx.Param(jnp.asarray([bias], jnp.float32))

    def __call__(self, input_tokens, positions, cache=None,
                 attention_mask=None, **unused):
      x = self.trunk.embedder.encode(input_tokens)
      for layer in self.trunk.layers:
        _, x = layer(x, positions, None, attention_mask)
      x = self.trunk.final_norm(x)
      return x @ self.head.value + self.bias.value, None

  class RewardWithEndOfContext(nnx.Module):
    """Our reward model behind Tunix's reward call: from Tunix's rows
    (left-padded prompt + right-padded completion of `width` columns, the
    end-of-turn token cut off) it scores prompt + reply [+ end-of-turn if
    the reply ended] + end-of-context at the end-of-context token, minus
    `penalty` for a reply that never ended, and returns that score at every
    position (Tunix reads it at the last completion token)."""

    def __init__(self, scorer, pad_id, stop_id, eoc_id, width, penalty):
      self.scorer = scorer
      self.pad_id, self.stop_id, self.eoc_id = pad_id, stop_id, eoc_id
      self.width, self.penalty = width, penalty

    def __call__(self, input_tokens, positions=None, cache=None,
                 attention_mask=None, **unused):
      tokens = jnp.asarray(input_tokens)
      b, t = tokens.shape
      valid = tokens != self.pad_id
      n = valid[:, t - self.width:].sum(-1)
      ended = n < self.width  # Tunix keeps replies that ended shorter
      last = t - self.width + n - 1  # the last reply (or prompt) token
      rows = jnp.concatenate(
          [tokens, jnp.full((b, 2), self.pad_id, tokens.dtype)], axis=1)
      keep = jnp.concatenate([valid, jnp.zeros((b, 2), bool)], axis=1)
      at = jnp.arange(b)
      eoc_at = last + 1 + ended
      rows = rows.at[at, last + 1].set(
          jnp.where(ended, self.stop_id, self.eoc_id))
      rows = rows.at[at, eoc_at].set(self.eoc_id)
      keep = keep.at[at, last + 1].set(True).at[at, eoc_at].set(True)
      pos = jnp.cumsum(keep, axis=-1) - 1
      mask = keep[:, None, :] & jnp.tril(jnp.ones((t + 2, t + 2), bool))
      scores, _ = self.scorer(rows, pos, None, mask)
      score = scores[at, eoc_at, 0] - self.penalty * (~ended)
      return jnp.broadcast_to(score[:, None, None], (b, t, 1)), None

  return Scorer, RewardWithEndOfContext


def tunix_child(spec: dict, reporter: Reporter) -> None:
  # pylint: disable=import-outside-toplevel
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import tunix
  from flax import nnx
  from tunix.models.llama3 import model as llama3
  from tunix.models.llama3 import params as llama3_params
  from tunix.rl import common
  from tunix.rl import rl_cluster as rlc
  from tunix.rl import utils as rl_utils
  from tunix.rl.ppo import ppo_learner
  from tunix.rl.rollout import base_rollout
  # pylint: enable=import-outside-toplevel
  Scorer, RewardWithEndOfContext = build_modules(nnx, jnp)
  rope = llama3.apply_rope

  def model_config(shape):
    """Tunix's llama3 config of a transformers Llama config.json."""
    return llama3.ModelConfig(
        num_layers=shape["num_hidden_layers"],
        vocab_size=shape["vocab_size"], embed_dim=shape["hidden_size"],
        hidden_dim=shape["intermediate_size"],
        num_heads=shape["num_attention_heads"], head_dim=shape["head_dim"],
        num_kv_heads=shape["num_key_value_heads"],
        rope_theta=shape["rope_theta"], norm_eps=shape["rms_norm_eps"],
        weight_tying=bool(shape.get("tie_word_embeddings", False)))

  # One CPU device for every role (as Tunix's own mesh helper makes it:
  # Auto axes), so no role's work can run beside another's.
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def load(path):
    with open(os.path.join(path, "config.json")) as f:
      config = model_config(json.load(f))
    # Tunix 0.1.7's llama3 attention calls `apply_rope` without the
    # config's rope_theta, so every llama3 model gets its default, 1e6,
    # whatever the config says; ours uses 10000. Pass the config's (only
    # the rotation frequencies change: the same work).
    llama3.apply_rope = functools.partial(rope, rope_theta=config.rope_theta)
    return llama3_params.create_model_from_safe_tensors(
        path, config, mesh, dtype=jnp.float32)

  pad, stop, width = spec["pad_id"], spec["stop_id"], spec["max_new_tokens"]
  policy, reference = load(spec["hf_sft"]), load(spec["hf_sft"])
  head, bias = np.asarray(spec["rm_head"], np.float32), spec["rm_bias"]
  critic = Scorer(load(spec["hf_rm"]), head, bias)
  reward = RewardWithEndOfContext(
      Scorer(load(spec["hf_rm"]), head, bias), pad, stop, spec["eoc_id"],
      width, spec["missing_eos_penalty"])

  # The same-weights checks, through Tunix's own log-prob and score paths.
  with mesh:
    prompt = jnp.asarray([spec["check_prompt"]])
    logps = common.compute_per_token_logps(
        *nnx.split(policy), prompt_tokens=prompt,
        completion_tokens=jnp.asarray([spec["check_reply"]]), pad_id=pad,
        eos_id=stop)
    check_logp = float(logps.sum())
    check_scores = []
    for p, reply in zip(spec["check_row_prompts"], spec["check_row_replies"]):
      # Tunix's row: the reply without its end-of-turn token, right-padded.
      completion = [t for t in reply if t != stop][:width]
      completion += [pad] * (width - len(completion))
      scores = common.compute_score(reward, jnp.asarray([p]),
                                    jnp.asarray([completion]), pad, stop)
      check_scores.append(float(scores[0, -1]))

  n = spec["prompts_per_iteration"]
  total = spec["warmup"] + spec["steps"]
  optimizer = lambda: optax.adamw(  # noqa: E731
      spec["learning_rate"], b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
      weight_decay=0.0)
  roles = {r: mesh for r in (rlc.Role.ACTOR, rlc.Role.CRITIC,
                             rlc.Role.REFERENCE, rlc.Role.REWARD,
                             rlc.Role.ROLLOUT)}
  cluster_config = rlc.ClusterConfig(
      role_to_mesh=roles, rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rlc.RLTrainingConfig(
          actor_optimizer=optimizer(), critic_optimizer=optimizer(),
          eval_every_n_steps=10 ** 9,
          max_steps=total * spec["epochs"] * spec["minibatches"],
          mini_batch_size=n // spec["minibatches"],
          checkpoint_root_directory=None, pbar_description=None),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=width, max_prompt_length=spec["prompt_width"],
          kv_cache_size=spec["prompt_width"] + width,
          temperature=spec["temperature"], top_p=1.0, top_k=None,
          eos_tokens=[stop]))
  tokenizer = IdTokenizer(spec["prompts"], pad, stop)
  cluster = rlc.RLCluster(actor=policy, critic=critic, reference=reference,
                          reward=reward, tokenizer=tokenizer,
                          cluster_config=cluster_config)
  algo = ppo_learner.PPOConfig(
      num_iterations=spec["epochs"], gamma=spec["gamma"],
      gae_lambda=spec["lam"], beta=spec["kl_coef"], kl_method="kl",
      epsilon=spec["clip"], clip_range_value=spec["value_clip"],
      entropy_coef=None)

  marks: dict[str, float] = {}
  stopped: list[bool] = []
  history: list[dict] = []
  logged: dict[str, list[float]] = {}

  def timed(fn, name):
    """`fn`, blocked on and its seconds added to marks[name]."""
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      marks[name] = marks.get(name, 0.0) + time.perf_counter() - start
      return out
    return wrapper

  generate = timed(cluster.generate, "generate")

  def generate_and_count(*args, **kwargs):
    out = generate(*args, **kwargs)
    marks["new_tokens"] = max(marks.get("new_tokens", 0),
                              max(len(t) for t in out.tokens))
    return out

  cluster.generate = generate_and_count

  def blocked_update(update, name):
    """Tunix's actor/critic update, timed to when its parameters are
    ready (reported apart: the part of `learn` that is optimizer steps)."""
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      update(*args, **kwargs)
      jax.block_until_ready(nnx.state(getattr(cluster, name).model))
      marks["steps"] = marks.get("steps", 0.0) + time.perf_counter() - start
    return wrapper

  cluster.update_actor = blocked_update(cluster.update_actor, "actor_trainer")
  cluster.update_critic = blocked_update(cluster.update_critic,
                                         "critic_trainer")
  cluster.get_rewards = timed(cluster.get_rewards, "reward")
  buffer_metrics = cluster.buffer_metrics

  def keep_metrics(metrics, *args, **kwargs):
    for k in ("rewards/score/mean", "rewards/reward_kl_penalty"):
      if k in metrics:
        logged.setdefault(k, []).append(float(metrics[k][0]))
    return buffer_metrics(metrics, *args, **kwargs)

  cluster.buffer_metrics = keep_metrics

  sync_weights, synced = cluster.sync_weights, []

  def sync_once():
    if synced:
      synced.pop()
    else:
      sync_weights()

  cluster.sync_weights = sync_once

  class LockStepLearner(ppo_learner.PPOLearner):
    """PPOLearner that waits for "go" before each global step (one
    iteration), and reports its time from "go" to its end, split."""

    def _generate_and_compute_advantage(self, *args, **kwargs):
      return timed(super()._generate_and_compute_advantage, "scoring")(
          *args, **kwargs)

    def _run_global_step(self, *args, **kwargs):
      if not reporter.wait():
        stopped.append(True)
        raise StopIteration  # ends Tunix's train loop
      marks.clear()
      logged.clear()
      start = time.perf_counter()
      super()._run_global_step(*args, **kwargs)
      if self.should_sync_weights:
        # Tunix copies the actor's weights to the rollout model after this
        # method returns: do it here, inside the timed iteration, and let
        # its own call pass (`sync_once`).
        synced.append(True)
        sync_weights()
      jax.block_until_ready((nnx.state(cluster.actor_trainer.model),
                             nnx.state(cluster.critic_trainer.model)))
      end = time.perf_counter()
      gen, rew = marks.get("generate", 0.0), marks.get("reward", 0.0)
      rest = marks.get("scoring", 0.0) - gen - rew
      parts = {"generate": gen, "reward": rew, "forwards+gae": rest,
               "learn": end - start - gen - rew - rest}
      history.append({k: float(np.mean(v)) for k, v in logged.items()})
      reporter.send("step", time=end - start, parts=parts,
                    new_tokens=int(marks.get("new_tokens", 0)),
                    steps_s=marks.get("steps", 0.0))

  learner = LockStepLearner(rl_cluster=cluster, ppo_config=algo)
  if learner.can_enable_async_rollout:
    raise RuntimeError("rollout would overlap training: roles on "
                       "different meshes")
  keys = [IdTokenizer.key(i) for i in range(len(spec["prompts"]))]
  data = [{"prompts": np.array(keys[i * n:(i + 1) * n])}
          for i in range(total)]
  reporter.send(
      "ready", check_logp=check_logp, check_scores=check_scores,
      params=sum(x.size for x in jax.tree.leaves(nnx.state(policy,
                                                           nnx.Param))),
      async_rollout=bool(learner.can_enable_async_rollout),
      weight_sync=bool(learner.should_sync_weights),
      versions={"tunix": getattr(tunix, "__version__", "?"),
                "jax": jax.__version__, "flax": flax.__version__,
                "optax": optax.__version__})
  learner.train(data)
  if not stopped:  # Tunix ended at max_steps: take the parent's "stop"
    reporter.wait()
  # Did the sampler follow the training? (Tunix copies no weights when the
  # actor and rollout share a mesh: they must still be the same arrays.)
  same = rl_utils.is_sharing_weights(cluster.actor_trainer.model,
                                     cluster.rollout.model())
  reporter.send("done", logs=history, peak_rss_mb=peak_rss_mb(),
                sampler_follows_actor=bool(same))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--_child")
  parser.add_argument("--_spec")
  parser.add_argument("--_report_fd", type=int)
  args = parser.parse_args()
  with open(args._spec) as f:  # pylint: disable=protected-access
    spec = json.load(f)
  tunix_child(spec, Reporter(args._report_fd))  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
