r"""PPO against a reward model, with a KL penalty to the SFT policy and,
optionally, pretraining gradients mixed in (PPO-ptx).

  python -m launch.ppo --config=configs/ppo.py:tiny --workdir=DIR \
      --config.init_checkpoint=SFT_DIR --config.reward_model=RM_DIR \
      --config.data.prompts=COMPARISONS.jsonl \
      [--config.ppo.ptx_coef=1.0 --config.ptx_workdir=PRETRAIN_DIR]

Each iteration: sample one response per prompt with the compiled sampler
(temperature ppo.temperature, stop at the format's end-of-turn token),
score prompt + response + end-of-context with the reward model (a reply
that never ends loses ppo.missing_eos_penalty), recompute the policy's,
the reference's and the value head's per-token outputs with the training
forward pass, shape the rewards with -beta * KL, GAE, then ppo.epochs
passes of ppo.minibatches steps of the trainer's compiled step. Beta
follows the adaptive controller when ppo.kl_target > 0. Checkpointed every
ppo.checkpoint_every iterations (state, prompt order, ptx data position,
beta); a killed run resumes at the iteration it reached. Writes
DIR/summary.json (held-out reward, KL and, with a ptx_workdir, pretraining
loss, before and after) and DIR/model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError, check, from_config
from mllm_jax.data import chat
from mllm_jax.data.config import DataConfig
from mllm_jax.data.pipeline import make_eval_batches, make_pretrain_iterator
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.eval.chat_eval import end_of_turn
from mllm_jax.generate.sampler import Sampler
from mllm_jax.generate.sampling import SamplingParams
from mllm_jax.parallel.mesh import make_mesh
from mllm_jax.parallel.sharding import on_mesh_of, use_mesh
from mllm_jax.rl import ppo
from mllm_jax.rl import reward as reward_lib
from mllm_jax.rl.config import PPOConfig
from mllm_jax.rl.prompts import PromptOrder, read_prompts, split_held_out
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.compile import build_program, initial_state
from mllm_jax.train.finetune import heldout_loss, save_result, stage_configs
from mllm_jax.train.metrics import MetricWriter, console
from mllm_jax.train.trainer import global_batch

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "PPO config file and preset, e.g. configs/ppo.py:tiny; "
    "override fields with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


# ----------------------------------------------------------------------------
# Rollouts and scoring
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Rollouts:
  rows: dict[str, np.ndarray]  # ppo.rollout_rows
  scores: np.ndarray  # reward model score, penalty included
  raw_scores: np.ndarray
  stopped: np.ndarray
  lengths: np.ndarray
  sampler_logp: list[np.ndarray]


def rollout(policy, tokenizer, prompts, cfg: PPOConfig, stop_tokens,
            eoc_id: int, reward_model, prompt_width: int, seed: int,
            temperature: float) -> Rollouts:
  sampler = Sampler(policy, tokenizer=tokenizer,
                    pad_id=max(tokenizer.pad_id, 0), prompt_multiple=16)
  gen = sampler.generate(prompts, cfg.max_new_tokens,
                         SamplingParams(temperature=temperature),
                         stop_tokens=stop_tokens, seed=seed)
  responses = [list(t) for t in gen.tokens]
  stopped = np.array([r == "stop_token" for r in gen.stop_reasons])
  pad = max(tokenizer.pad_id, 0)
  rows = ppo.rollout_rows(prompts, responses, prompt_width,
                          cfg.max_new_tokens, pad)
  # The reward model reads prompt + response + end-of-context, right-padded.
  width = prompt_width + cfg.max_new_tokens + 1
  tokens = np.full((len(prompts), width), pad, np.int32)
  seg = np.zeros((len(prompts), width), np.int32)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    seq = p + r + [eoc_id]
    tokens[i, :len(seq)] = seq
    seg[i, :len(seq)] = 1
  raw = reward_lib.score_rows(reward_model, tokens, seg)
  scores = raw - cfg.missing_eos_penalty * (~stopped)
  return Rollouts(rows, scores.astype(np.float32), raw, stopped,
                  np.array([len(r) for r in responses]), list(gen.logprobs))


def held_out_reward(policy, tokenizer, prompts, cfg, stop_tokens, eoc_id,
                    reward_model, prompt_width, seed) -> dict[str, float]:
  """The held-out measure: mean reward (score minus the missing-end
  penalty), reward-model score, ended rate and reply length of
  ppo.eval_samples replies per prompt sampled as in training (what PPO
  optimises; a fixed seed), and the same of one greedy reply per prompt
  (`greedy_*`), which a tiny policy can lose while its samples gain."""
  def summary(out, prefix=""):
    return {prefix + "reward": float(out.scores.mean()),
            prefix + "raw_reward": float(out.raw_scores.mean()),
            prefix + "ended": float(out.stopped.mean()),
            prefix + "reply_tokens": float(out.lengths.mean())}
  sampled = rollout(policy, tokenizer, list(prompts) * cfg.eval_samples, cfg,
                    stop_tokens, eoc_id, reward_model, prompt_width, seed,
                    temperature=cfg.temperature)
  greedy = rollout(policy, tokenizer, prompts, cfg, stop_tokens, eoc_id,
                   reward_model, prompt_width, seed, temperature=0.0)
  return {**summary(sampled), **summary(greedy, "greedy_")}


def make_process(graphdef, cfg: PPOConfig):
  """The jitted rollout processing: the training forward pass on every
  rollout, KL-shaped rewards (beta an array), GAE and whitening."""
  @jax.jit
  def process(params, frozen, rows, scores, beta):
    model = nnx.merge(graphdef, params, frozen)
    out = ppo.forward(model, rows, reference=True)
    mask = rows["loss_weights"]
    rewards, kl = ppo.shaped_rewards(scores, out["logp"], out["ref_logp"],
                                     mask, beta)
    adv, returns = ppo.gae(rewards, out["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
      adv = ppo.whiten(adv, mask)
    stats = {"kl": jnp.sum(kl, axis=1), "entropy": jnp.sum(
        out["entropy"] * mask) / jnp.maximum(mask.sum(), 1.0)}
    return {**rows, "old_logp": out["logp"], "old_values": out["values"],
            "advantages": adv, "returns": returns}, stats
  return process


def learn_from(program, state, frozen, batch, cfg: PPOConfig, seed,
               ptx_iter=None):
  """ppo.epochs passes of ppo.minibatches trainer steps over one
  iteration's processed rollouts (minibatches drawn by `seed` + epoch; a
  ptx batch joins each step when ppo.ptx_coef > 0) -> (state, every
  step's metrics by name). The first step's approx_kl is 0: same weights
  as the rollout's forward pass."""
  fields = tuple(program.task.batch_fields)
  learn: dict[str, list[float]] = {}
  for epoch in range(cfg.epochs):
    perm = np.random.default_rng([*seed, epoch]).permutation(
        cfg.prompts_per_iteration)
    for mb in np.split(perm, cfg.minibatches):
      sub = {k: batch[k][mb] for k in ppo.ROLLOUT_FIELDS}
      if ptx_iter is not None and cfg.ptx_coef > 0:
        ptx = next(ptx_iter)
        sub.update({f"ptx_{k}": ptx[k] for k in
                    ("inputs", "targets", "loss_weights", "segment_ids",
                     "positions")})
      sub = {k: sub[k] for k in fields}
      state, metrics = program.step(state, frozen, global_batch(
          sub, program.batch_sharding, len(mb), fields))
      for k, v in jax.device_get(metrics).items():
        learn.setdefault(k, []).append(float(v))
  return state, learn


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  config, workdir = _CONFIG.value, _WORKDIR.value

  # ------------------------------------------------------------------ configs
  try:
    model_cfg, parallel, optimizer_cfg, train_cfg, peft_cfg, tokenizer = (
        stage_configs(config))
    cfg = from_config(PPOConfig, config.ppo, "ppo")
    cfg.validate()
    check(bool(config.reward_model), "reward_model",
          "give the reward model's directory (launch.reward's "
          "WORKDIR/reward_model)")
    reward_model, rm_info = reward_lib.load_reward_model(config.reward_model)
    ppo.check_same_tokenizer(tokenizer, load_tokenizer(config.reward_model),
                             config.init_checkpoint, config.reward_model)
    fmt_name = config.data.format or rm_info.get("format", "")
    check(bool(fmt_name), "data.format", "the reward model records no chat "
          "format; name one")
    try:
      fmt = chat.get_format(fmt_name, tokenizer)
    except (ValueError, FileNotFoundError) as e:
      raise ConfigError(f"data.format: {e}") from e
    eot = end_of_turn(fmt, tokenizer)
    eoc_id = int(rm_info["end_of_context_id"])
    check(bool(config.data.prompts), "data.prompts", "give a JSONL of "
          "prompts (comparison records or {\"prompt\": ...})")
    prompts, prompt_drops = read_prompts(config.data.prompts, tokenizer, fmt,
                                         config.data.max_prompt_tokens)
    train_prompts, eval_prompts = split_held_out(prompts,
                                                 config.data.eval_prompts)
    check(len(train_prompts) >= cfg.prompts_per_iteration, "data.prompts",
          f"{config.data.prompts} gives {len(train_prompts)} usable training "
          f"prompts (dropped {prompt_drops}); need at least "
          f"ppo.prompts_per_iteration={cfg.prompts_per_iteration}")
    check(config.data.max_prompt_tokens + cfg.max_new_tokens
          <= model_cfg.max_seq_len, "data.max_prompt_tokens",
          f"prompt {config.data.max_prompt_tokens} + ppo.max_new_tokens "
          f"{cfg.max_new_tokens} exceed the model's max_seq_len "
          f"{model_cfg.max_seq_len}")
    ptx_data = None
    if cfg.ptx_coef > 0 or config.ptx_workdir:
      check(bool(config.ptx_workdir), "ptx_workdir", "PPO-ptx needs the "
            "pretraining run's workdir (its data config is reused)")
      with open(os.path.join(config.ptx_workdir, "config.json")) as f:
        ptx_data = from_config(DataConfig, json.load(f)["data"], "ptx data")
    task = ppo.ppo_task(model_cfg, peft_cfg, cfg,
                        init_checkpoint=config.init_checkpoint,
                        reward_model=config.reward_model)
  except (ConfigError, FileNotFoundError, KeyError) as e:
    sys.exit(f"error: {e}")
  prompt_width = -(-config.data.max_prompt_tokens // 16) * 16
  os.makedirs(workdir, exist_ok=True)

  # ------------------------------------------------------------------ set-up
  mesh = make_mesh(parallel)
  train_cfg = dataclasses.replace(
      train_cfg, batch_size=cfg.prompts_per_iteration // cfg.minibatches,
      steps=cfg.iterations * cfg.epochs * cfg.minibatches)
  program = build_program(task, parallel, optimizer_cfg, train_cfg, mesh,
                          config.seed)
  state, frozen = initial_state(program, config.seed)
  process = make_process(program.graphdef, cfg)
  order = PromptOrder(train_prompts, config.data.seed)
  kl_control = ppo.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
  ptx_iter = ptx_eval = None
  if ptx_data is not None:
    ptx_iter = make_pretrain_iterator(dataclasses.replace(
        ptx_data, seq_len=min(ptx_data.seq_len, config.seq_len)),
        cfg.ptx_batch_size)
    ptx_eval = list(make_eval_batches(ptx_data, cfg.ptx_batch_size, 4)) if (
        ptx_data.eval_sources) else None

  checkpointer = Checkpointer(f"{workdir}/checkpoints",
                              every=cfg.checkpoint_every,
                              keep=train_cfg.keep_checkpoints,
                              async_save=train_cfg.async_checkpoint)
  start = checkpointer.latest_step() or 0
  if start:
    state, data_state = checkpointer.restore(start, program.state)
    order.set_state(data_state["prompts"])
    kl_control.beta = float(data_state["beta"])
    if ptx_iter is not None:
      ptx_iter.set_state(data_state["ptx"])
    console(f"restored iteration {start} from {workdir}/checkpoints")
  writer = MetricWriter(workdir, resume_step=start)

  def policy():
    return nnx.merge(program.graphdef, state["params"], frozen).policy

  def measure() -> dict[str, float]:
    out = held_out_reward(policy(), tokenizer, eval_prompts, cfg,
                          eot.stop_tokens, eoc_id, reward_model,
                          prompt_width, config.seed)
    if ptx_eval:
      out["pretrain_loss"] = heldout_loss(policy(), ptx_eval)
    return out

  before_file = os.path.join(workdir, "before.json")
  if not os.path.exists(before_file) and jax.process_index() == 0:
    with open(before_file, "w") as f:
      json.dump(measure(), f, indent=2)
  before = json.load(open(before_file))
  console(f"before PPO: held-out reward {before['reward']:.3f} over "
          f"{len(eval_prompts)} prompts")

  # ------------------------------------------------------------------ iterate
  for it in range(start, cfg.iterations):
    t0 = time.perf_counter()
    batch_prompts = order.take(cfg.prompts_per_iteration)
    rolled = rollout(policy(), tokenizer, batch_prompts, cfg,
                     eot.stop_tokens, eoc_id, reward_model, prompt_width,
                     seed=config.seed * 1_000_003 + it,
                     temperature=cfg.temperature)
    t1 = time.perf_counter()
    with on_mesh_of(state["params"], program.rules) as put:
      batch, stats = process(state["params"], frozen,
                             {k: put(v) for k, v in rolled.rows.items()},
                             put(rolled.scores), jnp.float32(kl_control.beta))
    batch, stats = jax.device_get((batch, stats))
    mean_kl = float(np.mean(stats["kl"]))
    # The sampler's log-probabilities against the training forward pass's.
    mask = batch["loss_weights"]
    sampler_logp = np.zeros_like(mask)
    for i, lp in enumerate(rolled.sampler_logp):
      sampler_logp[i, prompt_width - 1:prompt_width - 1 + len(lp)] = lp
    logp_gap = float(np.abs((sampler_logp - batch["old_logp"]) * mask).max())
    t2 = time.perf_counter()
    problem = ppo.kl_explodes(mean_kl, cfg)
    if problem:
      checkpointer.close()
      sys.exit(f"error: iteration {it + 1}: {problem}")

    with use_mesh(mesh, program.rules):
      state, learn = learn_from(program, state, frozen, batch, cfg,
                                [config.seed, it], ptx_iter)
    first_ratio_dev = learn["approx_kl"][0]
    t3 = time.perf_counter()
    beta = kl_control.beta
    kl_control.update(mean_kl, cfg.prompts_per_iteration)
    response_tokens = float(mask.sum())
    logged = {
        "reward": float(rolled.scores.mean()),
        "raw_reward": float(rolled.raw_scores.mean()),
        "kl": mean_kl, "beta": beta, "entropy": float(stats["entropy"]),
        "ended": float(rolled.stopped.mean()),
        "response_length": float(rolled.lengths.mean()),
        "sampler_logp_gap": logp_gap,
        "first_minibatch_approx_kl": first_ratio_dev,
        "rollout_tokens_per_sec": response_tokens / (t1 - t0),
        "learn_tokens_per_sec": (response_tokens * cfg.epochs) / (t3 - t2),
        "rollout_sec": t1 - t0, "score_sec": t2 - t1, "learn_sec": t3 - t2,
        **{k: float(np.mean(v)) for k, v in learn.items()
           if k not in ("weight", "total_loss", "skipped")}}
    writer.write(it + 1, logged)
    console(f"iteration {it + 1}: reward={logged['reward']:.3f} "
            f"kl={mean_kl:.3f} beta={beta:.4f} "
            f"policy_loss={logged.get('policy_loss', 0):.4f} "
            f"value_loss={logged.get('value_loss', 0):.4f} "
            f"clip={logged.get('clip_fraction', 0):.3f} "
            f"len={logged['response_length']:.1f} "
            f"(rollout {t1 - t0:.1f}s, score {t2 - t1:.1f}s, "
            f"learn {t3 - t2:.1f}s)")
    checkpointer.save(it + 1, state, {
        "prompts": order.get_state(), "beta": kl_control.beta,
        **({"ptx": ptx_iter.get_state()} if ptx_iter is not None else {})},
        force=it + 1 == cfg.iterations)
  checkpointer.close()
  writer.close()

  # ------------------------------------------------------------------ after
  after = measure()
  final = policy()
  save_result(workdir, final, config.init_checkpoint)
  if jax.process_index() == 0:
    summary = {"init_checkpoint": config.init_checkpoint,
               "reward_model": config.reward_model, "format": fmt.name,
               "prompts": {"train": len(train_prompts),
                           "held_out": len(eval_prompts),
                           "dropped": prompt_drops},
               "ppo": dataclasses.asdict(cfg), "final_beta": kl_control.beta,
               "before": before, "after": after,
               "note": "rewards come from a reward model trained on "
                       "comparisons built from real data, not human "
                       "preferences"}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
    console(f"held-out reward {before['reward']:.3f} -> {after['reward']:.3f}"
            + (f"; pretraining loss {before['pretrain_loss']:.3f} -> "
               f"{after['pretrain_loss']:.3f}" if "pretrain_loss" in after
               else ""))


if __name__ == "__main__":
  app.run(main)
