"""Online iterative RLHF presets: `--config=configs/rlhf_rounds.py:NAME`.

  tiny  the tiny SFT model (launch.sft's WORKDIR/model) and a reward model
        trained from it (launch.reward's WORKDIR/reward_model), prompts from
        comparison records (launch.build_comparisons' train.jsonl); each
        round retrains with configs/reward.py:tiny_finetune and runs
        configs/ppo.py:tiny. CPU, tens of minutes a round.

Set `--config.policy=SFT_DIR --config.reward_model=RM_DIR
--config.prompts=FILE.jsonl` and, to retrain on old plus new comparisons,
`--config.comparisons.train_files=CMP/train.jsonl
--config.comparisons.eval_files=CMP/eval.jsonl` (the data the reward model
of record was trained on). The stages take their own presets plus extra
flags: `--config.reward.args="('--config.train.steps=50',)"` (the same for
ppo.args); those flags come after the ones the driver sets, so they win.

labeller.name: `reward_model` ranks each prompt's samples by the reward
model of record's score; `judge` by another reward model
(labeller.judge_model); `human` writes DIR/round_NNN/to_label.jsonl and
stops until it is filled (see launch/rlhf_rounds.py). Model labels are not
human preferences, and every record and report says so.
"""

import ml_collections

LABELLERS = ("reward_model", "judge", "human")

# preset -> (prompts per round, responses per prompt, new tokens,
#            reward preset, PPO preset)
PRESETS = {
    "tiny": (64, 3, 32, "configs/reward.py:tiny_finetune",
             "configs/ppo.py:tiny"),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown rlhf_rounds preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  prompts_per_round, k, new_tokens, reward_preset, ppo_preset = PRESETS[name]
  config = ml_collections.ConfigDict()
  config.rounds = 1
  config.seed = 0
  config.policy = ""  # round 1 samples from it (an SFT model directory)
  config.reward_model = ""  # the reward model of record before round 1
  config.prompts = ""  # JSONL: comparison records (their prompts) or {"prompt"}
  config.format = ""  # chat format; "" = the reward model's
  # What the reward model of record was trained on: the "old" comparisons
  # every round retrains on, besides the new ones of every round so far.
  config.comparisons = ml_collections.ConfigDict(dict(
      train_files="", eval_files=""))
  config.sampling = ml_collections.ConfigDict(dict(
      prompts_per_round=prompts_per_round,
      responses_per_prompt=k,  # K samples per prompt, ranked by the labeller
      max_new_tokens=new_tokens,
      temperature=1.0,
      max_prompt_tokens=128,  # longer prompts are skipped, counted
      batch_size=64,  # rows per sampler call (prompts x K)
      eval_fraction=0.2))  # new comparisons held out (by prompt) for the RM
  config.labeller = ml_collections.ConfigDict(dict(
      name="reward_model",  # one of LABELLERS
      judge_model="",  # labeller "judge": a reward model directory
      # Responses whose scores differ by no more than this are a tie: the
      # lower-scored one is left out of the ranking (counted).
      min_score_gap=0.0,
      # labeller "human": the filled labelling file of the round waiting
      # for labels; default DIR/round_NNN/labels.jsonl.
      labels_file=""))
  config.reward = ml_collections.ConfigDict(dict(
      config=reward_preset, args=()))
  config.ppo = ml_collections.ConfigDict(dict(config=ppo_preset, args=()))
  config.lock()
  return config
