r"""PPO iteration speed on CPU: one iteration of `launch.ppo` (rollout,
scoring, learning) against TRL's PPOTrainer and/or Tunix's PPOLearner, same
tiny model, same reward model, same prompts, same settings, same machine,
same run.

  python bench/ppo.py [--peer=trl|tunix|both] [--sft=/tmp/demo_full/sft/model]
      [--reward=/tmp/rm1/reward_model] [--prompts=/tmp/cmp_all/train.jsonl]
      [--iterations=6] [--warmup=2] [--prompts_per_iteration=16]
      [--max_new_tokens=32] [--epochs=2] [--minibatches=2]
      [--temperature=1.0] [--threads=N] [--peer_omp_passive]

--sft is a native SFT checkpoint with its tokenizer (launch.sft's
WORKDIR/model), --reward launch.reward's WORKDIR/reward_model (a decoder
trunk + scalar head + bias, reading its score at an end-of-context token
appended to the reply), --prompts a JSONL of comparison records whose
prompts are read by `mllm_jax.rl.prompts.read_prompts` (the training split of
`split_held_out`, as launch.ppo does).

TRL: PPO left `trl` for `trl.experimental.ppo` in 1.10 and was removed in
1.13 (huggingface/trl#7020); 1.16 (bench/sft_step.py's venv) has none.
So TRL's side runs trl 1.12.0, the last release with
`trl.experimental.ppo.PPOTrainer`, with bench/sft_step.py's other pins, in
its own venv (`.cache/bench-venvs/trl-ppo`, made by sft_step's
`peer_python`), one subprocess stepping in lock-step with ours (sft_step's
Child/lockstep protocol; an iteration is timed from "go" to its end).

Both sides, from the same weights (the SFT model exported to a transformers
LlamaForCausalLM by `convert.hf.native_to_hf`, checked by the log-prob of
a fixed reply; the reward model's trunk exported the same way and loaded as
`LlamaForSequenceClassification` whose `score` is replaced by a Linear with
our head AND bias, checked by scores of the same rows):
  - policy: the whole SFT model trains, float32; reference: a frozen copy;
  - critic: a separate one, the reward model's trunk and head (ours:
    `ppo.value="separate"`, TRL: `value_model` = a second copy of the reward
    model, as TRL's examples do);
  - each iteration --prompts_per_iteration prompts (the same ones in the
    same order on both sides: our `PromptOrder`'s sequence is handed to TRL
    and read unshuffled), one sampled reply each of at most
    --max_new_tokens tokens at --temperature (no top-k / top-p), stopping at
    the chat format's end-of-turn token; a reply that never ends loses 1.0
    (missing_eos_penalty); KL penalty beta 0.05 with the k1 estimator
    (log pi - log pi_ref) in every token's reward; GAE gamma 1, lambda 0.95;
    advantages whitened, rewards not; --epochs passes of --minibatches
    minibatches; clipped policy loss (0.2), clipped value loss (0.2) with
    coefficient 0.5, no entropy bonus;
  - AdamW(0.9, 0.95, eps 1e-8), no weight decay, constant learning rate
    1e-4 (configs/ppo.py:tiny's), NO gradient clipping (TRL's PPO loop
    never clips, so ours runs with optimizer.clip_norm=0 here).
The reward model reads prompt + reply + end-of-context on both sides: TRL's
`get_reward` reads the last non-pad token, so its reward-model call (not its
value-model call) is wrapped to append the end-of-context token first.

Ours is launch.ppo's loop: `rollout` (our compiled Sampler, then the reward
model's `score_rows`), `make_process` (the policy's, reference's and
critic's training forward passes, KL-shaped rewards, GAE, whitening), then
the trainer's compiled step on each minibatch, all built as launch.ppo builds
them (configs/ppo.py:tiny -> stage_configs -> ppo_task -> build_program ->
initial_state) with bench/train_step.py's tuned XLA flags. Every prompt
width the timed iterations will meet is compiled before the timing (the
compile time is printed). TRL's is PPOTrainer.train() itself (HF
`generate`, sdpa attention, `adamw_torch_fused`, float32, `use_cpu`).

Tunix (--peer=tunix, or both): google-tunix 0.1.7 in its own venv
(`.cache/bench-venvs/tunix`, made by sft_step's `peer_python`), its
`PPOLearner` over an `RLCluster` with the "vanilla" rollout (Tunix's
sampler), stepped in lock-step like TRL by bench/ppo_tunix.py, whose
docstring lists the glue (llama3 models from the same export, critic and
reward modules with our head and bias, the end-of-context row, the prompt
ids) and where Tunix's PPO differs (it samples and scores each 8-prompt
mini-batch just before its 2 epochs; no missing-end penalty of its own, so
the reward module applies ours; a rope_theta its llama3 ignores, patched).
Every role is on one CPU mesh, so Tunix does not overlap rollout and
training. Tunix inherits our XLA_FLAGS.

Printed: the host first; the same-weights checks; per side the median
iteration time, iterations/s and where it goes (medians): generate (the
sampler; TRL: `batch_generation`), reward (the reward model's forward),
forwards+GAE (the rest of the scoring: reference / policy / critic forward
passes, rewards, GAE), learn (epochs x minibatches of forward + backward +
AdamW); last the ratio ours / each peer of iterations/s and the load
average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=wrong-import-position
from bench.host import host_line, load_line  # noqa: E402
from bench.sft_step import (B1, B2, CACHE, EPS, PEER_PINS, Child,  # noqa: E402
                            Reporter, lockstep, peak_rss_mb,
                            peer_python, trl_training_args)
# pylint: enable=wrong-import-position

WORK = os.path.join(CACHE, "bench-ppo")
TRL_VENV = os.path.join(CACHE, "bench-venvs", "trl-ppo")
# trl 1.12.0 is the last release with trl.experimental.ppo; the rest as
# bench/sft_step.py pins them.
TRL_PINS = tuple("trl==1.12.0" if p.startswith("trl==") else p
                 for p in PEER_PINS)
# Tunix (the second peer, --peer=tunix): its own venv, as bench/sft_step's
# peer_python makes it; the child is bench/ppo_tunix.py.
TUNIX_VENV = os.path.join(CACHE, "bench-venvs", "tunix")
TUNIX_PINS = ("google-tunix==0.1.7",)
TUNIX_CHILD = os.path.join(REPO, "bench", "ppo_tunix.py")
PEER_NAMES = {"trl": "TRL PPOTrainer", "tunix": "Tunix PPOLearner"}
LEARNING_RATE = 1e-4  # configs/ppo.py:tiny's
PARTS = ("generate", "reward", "forwards+gae", "learn")


# ----------------------------------------------------------------------------
# TRL's side (runs in the peer's venv: no jax, no mllm_jax)
# ----------------------------------------------------------------------------


def trl_child(spec: dict, reporter: Reporter) -> None:
  # pylint: disable=import-outside-toplevel
  import datasets
  import torch
  import transformers
  import trl
  from torch.utils.data import DataLoader
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as impl

  from bench.dpo import hf_tokenizer
  # pylint: enable=import-outside-toplevel
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  tokenizer = hf_tokenizer(spec)
  tokenizer.padding_side = "left"
  policy = transformers.AutoModelForCausalLM.from_pretrained(
      spec["hf_sft"], dtype=torch.float32, attn_implementation="sdpa")
  head = torch.tensor(spec["rm_head"], dtype=torch.float32)

  def scorer():
    """The reward model as LlamaForSequenceClassification, with our head
    and bias as its `score`."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        spec["hf_rm"], num_labels=1, dtype=torch.float32,
        attn_implementation="sdpa")
    score = torch.nn.Linear(head.numel(), 1, bias=True)
    with torch.no_grad():
      score.weight.copy_(head[None])
      score.bias.fill_(spec["rm_bias"])
    model.score = score
    return model

  reward_model, value_model = scorer(), scorer()

  with torch.no_grad():  # the same-weights checks
    ids = torch.tensor([spec["check_prompt"] + spec["check_reply"]])
    logits = policy(input_ids=ids, use_cache=False).logits
    logps = torch.log_softmax(logits, -1)[0, :-1].gather(
        -1, ids[0, 1:, None])[:, 0]
    check_logp = float(logps[len(spec["check_prompt"]) - 1:].sum())
    check_scores = []
    for row in spec["check_rows"]:
      hidden = reward_model.model(input_ids=torch.tensor([row]),
                                  use_cache=False).last_hidden_state
      check_scores.append(float(reward_model.score(hidden)[0, -1, 0]))

  data = datasets.Dataset.from_list([{"input_ids": p}
                                     for p in spec["prompts"]])
  n = spec["prompts_per_iteration"]
  total = spec["warmup"] + spec["steps"]
  config = PPOConfig(
      **{**trl_training_args(spec), "learning_rate": LEARNING_RATE,
         "per_device_train_batch_size": n},
      total_episodes=total * n, num_mini_batches=spec["minibatches"],
      num_ppo_epochs=spec["epochs"], response_length=spec["max_new_tokens"],
      temperature=spec["temperature"], stop_token_id=spec["stop_id"],
      missing_eos_penalty=spec["missing_eos_penalty"],
      kl_coef=spec["kl_coef"], kl_estimator="k1", cliprange=spec["clip"],
      cliprange_value=spec["value_clip"], vf_coef=spec["value_coef"],
      gamma=spec["gamma"], lam=spec["lam"], whiten_rewards=False,
      num_sample_generations=0, local_rollout_forward_batch_size=n)

  marks: dict[str, float] = {}
  generate, get_reward, forward = (impl.batch_generation, impl.get_reward,
                                   impl.forward)

  def timed_generation(*args, **kwargs):
    out = generate(*args, **kwargs)
    marks["generated"] = time.perf_counter()
    marks["new_tokens"] = out[0].shape[1] - args[1].shape[1]
    return out

  def reward_with_end_of_context(model, query_responses, pad_token_id,
                                 context_length):
    if model is not reward_model:  # the critic: as TRL does it
      return get_reward(model, query_responses, pad_token_id, context_length)
    start = time.perf_counter()
    # Our reward model reads prompt + reply + end-of-context: put the token
    # after each reply's last real token (a new column for full replies).
    rows = torch.nn.functional.pad(query_responses, (0, 1),
                                   value=pad_token_id)
    reply = rows[:, context_length:]
    end = impl.first_true_indices(reply == pad_token_id)
    reply[torch.arange(len(rows)), end] = spec["eoc_id"]
    out = get_reward(model, rows, pad_token_id, context_length)
    marks["reward_s"] = marks.get("reward_s", 0.0) + (
        time.perf_counter() - start)
    return out

  def marked_forward(model, query_responses, pad_token_id):
    if isinstance(model, impl.PolicyAndValueWrapper):  # a training step's
      marks.setdefault("learning", time.perf_counter())
    return forward(model, query_responses, pad_token_id)

  impl.batch_generation = timed_generation
  impl.get_reward = reward_with_end_of_context
  impl.forward = marked_forward
  history = []

  class LockStep(transformers.TrainerCallback):
    """Blocks at the start and at every iteration's end until the parent
    says go; reports each iteration's time from "go" to its end, split."""

    def _wait(self, control):
      if not reporter.wait():
        control.should_training_stop = True
      marks.clear()
      marks["start"] = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
      reporter.send("ready", check_logp=check_logp, check_scores=check_scores,
                    params=sum(p.numel() for p in policy.parameters()),
                    versions={m.__name__: m.__version__ for m in (
                        torch, transformers, trl, datasets)})
      self._wait(control)

    def on_step_end(self, args, state, control, **kwargs):
      now = time.perf_counter()
      m = marks
      reward = m.get("reward_s", 0.0)
      parts = {"generate": m["generated"] - m["start"], "reward": reward,
               "forwards+gae": m["learning"] - m["generated"] - reward,
               "learn": now - m["learning"]}
      reporter.send("step", time=now - m["start"], parts=parts,
                    new_tokens=int(m["new_tokens"]))
      self._wait(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
      if logs and "objective/scores" in logs:
        keep = ("objective/scores", "objective/kl", "val/num_eos_tokens",
                "loss/policy_avg", "loss/value_avg")
        history.append({k: logs[k] for k in keep if k in logs})

  trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                       ref_model=None, reward_model=reward_model,
                       train_dataset=data, value_model=value_model,
                       eval_dataset=data.select(range(n)),
                       callbacks=[LockStep()])
  # Our prompt order, unshuffled (TRL's own loader shuffles).
  trainer.dataloader = DataLoader(data, batch_size=n, shuffle=False,
                                  collate_fn=trainer.data_collator,
                                  drop_last=True)
  trainer.train()
  reporter.send("done", logs=history, peak_rss_mb=peak_rss_mb())


# ----------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------


class Ours:
  """launch.ppo's iteration, built as launch.ppo builds it; `step()` runs
  one iteration (rollout, scoring, learning) and reports its time split."""

  def __init__(self, config, total: int):
    # pylint: disable=import-outside-toplevel
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from launch import ppo as launch_ppo
    from mllm_jax.configlib import from_config
    from mllm_jax.data import chat
    from mllm_jax.eval.chat_eval import end_of_turn
    from mllm_jax.generate.sampler import Sampler
    from mllm_jax.generate.sampling import SamplingParams
    from mllm_jax.parallel.mesh import make_mesh
    from mllm_jax.parallel.sharding import use_mesh
    from mllm_jax.rl import ppo
    from mllm_jax.rl import prompts as prompts_lib
    from mllm_jax.rl import reward as reward_lib
    from mllm_jax.rl.config import PPOConfig
    from mllm_jax.train.compile import build_program, initial_state
    from mllm_jax.train.finetune import stage_configs
    # pylint: enable=import-outside-toplevel
    self.jax, self.np, self.nnx = jax, np, nnx
    self.use_mesh = use_mesh
    self.launch_ppo, self.ppo, self.reward_lib = launch_ppo, ppo, reward_lib
    (model_cfg, parallel, optimizer_cfg, train_cfg, peft_cfg,
     self.tokenizer) = stage_configs(config)
    cfg = from_config(PPOConfig, config.ppo, "ppo")
    cfg.validate()
    self.cfg, self.seed = cfg, config.seed
    self.reward_model, info = reward_lib.load_reward_model(
        config.reward_model)
    self.fmt = chat.get_format(config.data.format or info["format"],
                               self.tokenizer)
    self.stop_tokens = end_of_turn(self.fmt, self.tokenizer).stop_tokens
    self.eoc_id = int(info["end_of_context_id"])
    prompts, self.drops = prompts_lib.read_prompts(
        config.data.prompts, self.tokenizer, self.fmt,
        config.data.max_prompt_tokens)
    self.train_prompts, _ = prompts_lib.split_held_out(
        prompts, config.data.eval_prompts)
    self.prompt_width = -(-config.data.max_prompt_tokens // 16) * 16
    task = ppo.ppo_task(model_cfg, peft_cfg, cfg,
                        init_checkpoint=config.init_checkpoint,
                        reward_model=config.reward_model)
    self.mesh = make_mesh(parallel)
    train_cfg = dataclasses.replace(
        train_cfg, batch_size=cfg.prompts_per_iteration // cfg.minibatches,
        steps=total * cfg.epochs * cfg.minibatches)
    self.program = build_program(task, parallel, optimizer_cfg, train_cfg,
                                 self.mesh, config.seed)
    self.state, self.frozen = initial_state(self.program, config.seed)
    self.process = launch_ppo.make_process(self.program.graphdef, cfg)
    self.order = prompts_lib.PromptOrder(self.train_prompts, config.data.seed)
    self.it = 0
    self.logs = []

    # The prompts of every iteration (the same order a fresh PromptOrder
    # gives: handed to TRL), and the compile of every prompt width they
    # need, before any timing.
    ahead = prompts_lib.PromptOrder(self.train_prompts, config.data.seed)
    self.schedule = [ahead.take(cfg.prompts_per_iteration)
                     for _ in range(total)]
    start = time.perf_counter()
    widths = sorted({-(-max(map(len, b)) // 16) * 16 for b in self.schedule})
    sampler = Sampler(self.policy(), tokenizer=self.tokenizer,
                      pad_id=max(self.tokenizer.pad_id, 0),
                      prompt_multiple=16)
    for w in widths:
      batch = [self.schedule[0][0][:1] * w] + self.schedule[0][1:]
      sampler.generate(batch, cfg.max_new_tokens,
                       SamplingParams(temperature=cfg.temperature),
                       stop_tokens=self.stop_tokens, seed=0)
    self.widths = widths
    self.compile_s = time.perf_counter() - start

  def policy(self):
    return self.nnx.merge(self.program.graphdef, self.state["params"],
                          self.frozen).policy

  def check_logp(self, prompt, reply) -> float:
    """The training forward pass's log-prob of `reply` after `prompt`."""
    rows = self.ppo.rollout_rows([prompt], [reply], self.prompt_width,
                                 self.cfg.max_new_tokens,
                                 max(self.tokenizer.pad_id, 0))
    model = self.nnx.merge(self.program.graphdef, self.state["params"],
                           self.frozen)
    out = self.ppo.forward(model, {k: self.jax.numpy.asarray(v)
                                   for k, v in rows.items()})
    return float((out["logp"] * rows["loss_weights"]).sum())

  def check_scores(self, rows) -> list[float]:
    np = self.np
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    seg = np.zeros_like(tokens)
    for i, r in enumerate(rows):
      tokens[i, :len(r)], seg[i, :len(r)] = r, 1
    return [float(x) for x in self.reward_lib.score_rows(self.reward_model,
                                                         tokens, seg)]

  def step(self) -> dict:
    jax, np, cfg, reward_lib = self.jax, self.np, self.cfg, self.reward_lib
    jnp = jax.numpy
    t0 = time.perf_counter()
    prompts = self.order.take(cfg.prompts_per_iteration)
    assert prompts == self.schedule[self.it]
    score_rows, reward_s = reward_lib.score_rows, []

    def timed_score_rows(*args, **kwargs):  # launch.ppo.rollout's scoring
      start = time.perf_counter()
      out = score_rows(*args, **kwargs)
      reward_s.append(time.perf_counter() - start)
      return out

    reward_lib.score_rows = timed_score_rows
    try:
      rolled = self.launch_ppo.rollout(
          self.policy(), self.tokenizer, prompts, cfg, self.stop_tokens,
          self.eoc_id, self.reward_model, self.prompt_width,
          seed=self.seed * 1_000_003 + self.it, temperature=cfg.temperature)
    finally:
      reward_lib.score_rows = score_rows
    t1 = time.perf_counter()
    with self.use_mesh(self.mesh, self.program.rules):
      batch, stats = self.process(
          self.state["params"], self.frozen,
          {k: jnp.asarray(v) for k, v in rolled.rows.items()},
          jnp.asarray(rolled.scores), jnp.float32(cfg.kl_coef))
    batch, stats = jax.device_get((batch, stats))
    t2 = time.perf_counter()
    with self.use_mesh(self.mesh, self.program.rules):
      self.state, learn = self.launch_ppo.learn_from(
          self.program, self.state, self.frozen, batch, cfg,
          [self.seed, self.it])
    t3 = time.perf_counter()
    self.it += 1
    self.logs.append({"scores": float(rolled.scores.mean()),
                      "kl": float(np.mean(stats["kl"])),
                      "ended": int(rolled.stopped.sum()),
                      "policy_loss": float(np.mean(learn["policy_loss"])),
                      "value_loss": float(np.mean(learn["value_loss"]))})
    return {"time": t3 - t0, "new_tokens": int(rolled.lengths.max()),
            "parts": {"generate": t1 - t0 - sum(reward_s),
                      "reward": sum(reward_s), "forwards+gae": t2 - t1,
                      "learn": t3 - t2}}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def ppo_config(args):
  """configs/ppo.py:tiny as launch.ppo reads it, with this run's settings."""
  from configs import ppo as ppo_configs  # pylint: disable=import-outside-toplevel
  config = ppo_configs.get_config("tiny")
  with config.unlocked():
    config.init_checkpoint = args.sft
    config.reward_model = args.reward
    config.data.prompts = args.prompts
    p = config.ppo
    p.iterations = args.warmup + args.iterations
    p.prompts_per_iteration = args.prompts_per_iteration
    p.max_new_tokens = args.max_new_tokens
    p.epochs, p.minibatches = args.epochs, args.minibatches
    p.temperature = args.temperature
    p.value = "separate"  # TRL's PPO has a separate critic
    o = config.optimizer
    o.learning_rate, o.b1, o.b2, o.eps = LEARNING_RATE, B1, B2, EPS
    o.weight_decay, o.warmup_steps, o.end_learning_rate_ratio = 0.0, 0, 1.0
    o.clip_norm = 0.0  # TRL's PPO loop does not clip
  return config


def summarise(reports: list[dict], warmup: int) -> dict:
  timed = reports[warmup:]
  times = [r["time"] for r in timed]
  return {"median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times),
          "per_s": 1 / statistics.median(times),
          "parts": {k: statistics.median(r["parts"][k] for r in timed)
                    for k in PARTS},
          "new_tokens": statistics.mean(r["new_tokens"] for r in timed),
          "others_cpu": sum(r["others_cpu"] for r in timed)}


def describe(name: str, s: dict) -> str:
  total = sum(s["parts"].values())
  split = ", ".join(f"{k} {v:.3f} s ({v / total:.0%})"
                    for k, v in s["parts"].items())
  return (f"{name}: median {s['median_s']:.3f} s/iteration (min "
          f"{s['min_s']:.3f}, max {s['max_s']:.3f}), {s['per_s']:.2f} "
          f"iterations/s; medians: {split}; decode steps per iteration "
          f"(longest reply) {s['new_tokens']:.1f}; the waiting side used "
          f"{s['others_cpu']:.2f} CPU s during its timed iterations")


def tunix_spec(spec: dict, ours: Ours, hf_sft: str, hf_rm: str) -> dict:
  """TRL's spec plus what bench/ppo_tunix.py also needs: the prompt width
  its sampler pads to (ours), the optimizer's settings, and the check rows
  as prompt and reply apart (Tunix's reward call takes them apart)."""
  return {**spec, "kind": "tunix", "hf_sft": hf_sft, "hf_rm": hf_rm,
          "prompt_width": ours.prompt_width, "learning_rate": LEARNING_RATE,
          "b1": B1, "b2": B2, "eps": EPS,
          "check_row_prompts": ours.schedule[0][:3],
          "check_row_replies": [spec["check_reply"]] * 3}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sft", default="/tmp/demo_full/sft/model")
  parser.add_argument("--reward", default="/tmp/rm1/reward_model")
  parser.add_argument("--prompts", default="/tmp/cmp_all/train.jsonl")
  parser.add_argument("--iterations", type=int, default=6,
                      help="timed iterations per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed iterations per side first")
  parser.add_argument("--prompts_per_iteration", type=int, default=16)
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--minibatches", type=int, default=2)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--xla_flags", default=None,
                      help="extra XLA_FLAGS for our side (default: "
                      "bench/train_step.py's TUNED_XLA_FLAGS)")
  parser.add_argument("--peer", choices=("trl", "tunix", "both"),
                      default="trl",
                      help="which peer(s) run against ours: TRL's "
                      "PPOTrainer, Tunix's PPOLearner, or both (all sides "
                      "alternate)")
  parser.add_argument("--peer_omp_passive", action="store_true",
                      help="run TRL with OMP_WAIT_POLICY=PASSIVE")
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_spec", help=argparse.SUPPRESS)
  parser.add_argument("--_report_fd", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._child:  # pylint: disable=protected-access
    with open(args._spec) as f:  # pylint: disable=protected-access
      spec = json.load(f)
    trl_child(spec, Reporter(args._report_fd))  # pylint: disable=protected-access
    return

  print(host_line(), flush=True)
  # pylint: disable=import-outside-toplevel
  from bench.train_step import TUNED_XLA_FLAGS, configure_xla
  configure_xla(args.threads, TUNED_XLA_FLAGS if args.xla_flags is None
                else args.xla_flags)
  from mllm_jax.runtime import keep_freed_memory
  keep_freed_memory()
  peers = ("trl", "tunix") if args.peer == "both" else (args.peer,)
  pythons = {"trl": lambda: peer_python(TRL_VENV, TRL_PINS),
             "tunix": lambda: peer_python(TUNIX_VENV, TUNIX_PINS)}
  pythons = {name: pythons[name]() for name in peers}
  import jax
  from mllm_jax.convert import hf
  from mllm_jax.modeling import count_params
  from mllm_jax.convert import native
  # pylint: enable=import-outside-toplevel
  for path in (args.sft, args.reward):
    if not os.path.exists(os.path.join(path, "model_config.json")):
      raise SystemExit(f"{path} is not a native checkpoint")
  total = args.warmup + args.iterations
  config = ppo_config(args)
  run_dir = os.path.join(WORK, f"run-{os.getpid()}")
  os.makedirs(run_dir, exist_ok=True)
  try:
    start = time.perf_counter()
    ours = Ours(config, total)
    setup_s = time.perf_counter() - start
    tok, cfg = ours.tokenizer, ours.cfg
    hf_sft, hf_rm = (os.path.join(run_dir, n) for n in ("hf_sft", "hf_rm"))
    hf.native_to_hf(args.sft, hf_sft, overwrite=True)
    hf.native_to_hf(args.reward, hf_rm, overwrite=True)
    head = ours.reward_lib.read_head(args.reward)
    check_prompt = ours.schedule[0][0]
    check_reply = tok.encode("The answer is 42.") + [ours.stop_tokens[0]]
    check_rows = [p + check_reply + [ours.eoc_id]
                  for p in ours.schedule[0][:3]]
    stop_id = ours.stop_tokens[0]
    spec = dict(
        run_dir=run_dir, hf_sft=hf_sft, hf_dir=hf_sft, hf_rm=hf_rm, kind="trl",
        variant="ppo", batch=cfg.prompts_per_iteration, warmup=args.warmup,
        steps=args.iterations, threads=args.threads,
        prompts=[p for b in ours.schedule for p in b],
        prompts_per_iteration=cfg.prompts_per_iteration,
        minibatches=cfg.minibatches, epochs=cfg.epochs,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        stop_id=stop_id, eoc_id=ours.eoc_id,
        missing_eos_penalty=cfg.missing_eos_penalty, kl_coef=cfg.kl_coef,
        clip=cfg.clip, value_clip=cfg.value_clip, value_coef=cfg.value_coef,
        gamma=cfg.gamma, lam=cfg.lam,
        rm_head=head["head"].tolist(), rm_bias=float(head["bias"]),
        check_prompt=check_prompt, check_reply=check_reply,
        check_rows=check_rows,
        pieces=[tok.id_to_piece(i) for i in range(tok.vocab_size)],
        unk_id=1 if tok.vocab_size > 1 else 0, eos_id=stop_id,
        pad_id=max(tok.pad_id, 0))
    peer_env = {"OMP_WAIT_POLICY": "PASSIVE"} if args.peer_omp_passive else {}
    peer_env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    children, ready = {}, {}
    for name in peers:  # started one after another: set-ups never overlap
      if name == "trl":
        children[name] = Child("trl", pythons[name], spec, peer_env,
                               script=__file__)
      else:
        children[name] = Child("tunix", pythons[name], tunix_spec(
            spec, ours, hf_sft, hf_rm), {}, script=TUNIX_CHILD)
      ready[name] = children[name].ready()

    print(f"{jax.devices()[0].platform} x{jax.device_count()}, "
          f"{args.threads} threads; policy {args.sft} "
          f"({count_params(native.read_config(args.sft)) / 1e6:.2f}M "
          f"params), reward model and critic {args.reward}; float32, full "
          f"fine-tuning, separate critic; {cfg.prompts_per_iteration} "
          f"prompts an iteration, <= {cfg.max_new_tokens} new tokens at "
          f"temperature {cfg.temperature:g}, {cfg.epochs} epochs x "
          f"{cfg.minibatches} minibatches, AdamW lr {LEARNING_RATE:g} "
          f"constant, no decay, no clipping; {args.warmup} warm-up + "
          f"{args.iterations} timed iterations each, alternating; peers "
          f"{', '.join(PEER_NAMES[n] for n in peers)}; TRL: "
          f"OMP_WAIT_POLICY="
          f"{peer_env.get('OMP_WAIT_POLICY', os.environ.get('OMP_WAIT_POLICY', 'unset'))}"
          f"; ours (and Tunix's, inherited): XLA_FLAGS="
          f"{os.environ['XLA_FLAGS']!r}, set-up "
          f"{setup_s:.0f} s of which the sampler's compile for prompt "
          f"widths {ours.widths} {ours.compile_s:.0f} s (the process and "
          f"step compile in the first warm-up iteration)")
    print(f"prompts: {len(ours.train_prompts)} training prompts from "
          f"{args.prompts} (mllm_jax.rl.prompts.read_prompts, format "
          f"{ours.fmt.name}; dropped {ours.drops or 'none'}), "
          f"{total * cfg.prompts_per_iteration} used in PromptOrder's "
          f"sequence on every side")
    label = {"trl": "TRL", "tunix": "Tunix"}
    print("same weights: log-prob of a fixed reply to the first prompt, "
          f"mllm_jax {ours.check_logp(check_prompt, check_reply):.4f}, "
          + ", ".join(f"{label[n]} {ready[n]['check_logp']:.4f}"
                      for n in peers)
          + "; reward of three rows, mllm_jax "
          + " ".join(f"{x:.4f}" for x in ours.check_scores(check_rows))
          + "".join(f", {label[n]} " + " ".join(
              f"{x:.4f}" for x in ready[n]["check_scores"]) for n in peers))
    for n in peers:
      extra = (f"; rollout overlaps training: "
               f"{'yes' if ready[n]['async_rollout'] else 'no'} (one CPU "
               f"mesh for every role); weights copied to the sampler: "
               f"{'yes (timed)' if ready[n]['weight_sync'] else 'no, shared'}"
               if n == "tunix" else "")
      print(f"{n}: "
            f"{', '.join(f'{k} {v}' for k, v in ready[n]['versions'].items())}"
            f", {ready[n]['params'] / 1e6:.2f}M policy params{extra}",
            flush=True)

    sides = {"mllm_jax": (ours.step, os.getpid())}
    sides.update({n: (children[n].step, children[n].proc.pid)
                  for n in peers})
    reports = lockstep(sides, total)
    done = {n: children[n].finish() for n in peers}
    results = {name: summarise(r, args.warmup) for name, r in reports.items()}
    print(describe("mllm_jax", results["mllm_jax"]) +
          f"; peak RSS {peak_rss_mb():.0f} MB", flush=True)
    for n in peers:
      steps = ""
      if n == "tunix":  # learn is the rest of the iteration, as for TRL
        timed = reports[n][args.warmup:]
        steps = (f"; of learn, the actor's and critic's update calls "
                 f"(median) "
                 f"{statistics.median(r['steps_s'] for r in timed):.3f} s; "
                 f"sampler on the trained weights at the end: "
                 f"{'yes' if done[n]['sampler_follows_actor'] else 'NO'}")
      print(describe(PEER_NAMES[n], results[n]) + steps +
            f"; peak RSS {done[n]['peak_rss_mb']:.0f} MB", flush=True)
    fmt = lambda xs, k: " ".join(f"{x.get(k, float('nan')):.2f}" for x in xs)
    keys = {"trl": ("objective/scores", "objective/kl"),
            "tunix": ("rewards/score/mean", "rewards/reward_kl_penalty")}
    print("per iteration (all, warm-up first): mean reward mllm_jax "
          f"{fmt(ours.logs, 'scores')}"
          + "".join(f", {label[n]} {fmt(done[n]['logs'], keys[n][0])}"
                    for n in peers)
          + f"; KL mllm_jax {fmt(ours.logs, 'kl')}"
          + "".join(f", {label[n]} {fmt(done[n]['logs'], keys[n][1])}"
                    for n in peers)
          + (" (Tunix's KL is its per-token mean, the others' a per-reply "
             "sum)" if "tunix" in peers else ""))
    for n in peers:
      ratio = results["mllm_jax"]["per_s"] / results[n]["per_s"]
      print(f"ratio (mllm_jax / {PEER_NAMES[n]}), iterations/s: "
            f"{ratio:.2f}x")
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
  if "--_child" not in sys.argv:
    print(f"end: {load_line()}")
