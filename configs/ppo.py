"""PPO presets: `--config=configs/ppo.py:NAME`.

  tiny     the tiny SFT model (launch.sft's WORKDIR/model) against a reward
           model trained from it (launch.reward's WORKDIR/reward_model), on
           the prompts of the comparison data; CPU in minutes.
  smollm2  SmolLM2-135M-Instruct with LoRA on every projection (the
           reference is the same base with its adapters switched off).

Set `--config.init_checkpoint=SFT_DIR --config.reward_model=RM_DIR
--config.data.prompts=FILE.jsonl`; for PPO-ptx also `--config.ppo.ptx_coef`
and `--config.ptx_workdir=PRETRAIN_WORKDIR` (its data config is reused).
The rest (run, peft, parallel, optimizer, train) is configs/stages.py's;
`train.batch_size` is unused (minibatches come from ppo.*).
"""

import dataclasses

import ml_collections

from configs.stages import finetune_config
from mllm_jax.rl.config import PPOConfig

PRESETS = {
    "tiny": (PPOConfig(iterations=20, prompts_per_iteration=16,
                       max_new_tokens=32, epochs=2, minibatches=2,
                       kl_coef=0.05), 256, 1e-4, "none"),
    "smollm2": (PPOConfig(iterations=50, prompts_per_iteration=32,
                          max_new_tokens=128, epochs=2, minibatches=4,
                          kl_coef=0.05, kl_target=6.0), 512, 1e-4, "lora"),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown PPO preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  ppo, seq_len, lr, peft = PRESETS[name]
  config = finetune_config(tiny=name == "tiny", steps=ppo.iterations,
                           batch_size=ppo.prompts_per_iteration // ppo.minibatches,
                           seq_len=seq_len, learning_rate=lr)
  config.optimizer.warmup_ratio = 0.0
  config.optimizer.end_learning_rate_ratio = 1.0
  config.peft.method = peft
  if peft == "lora":
    config.peft.targets = ("q", "k", "v", "o", "gate", "up", "down")
    config.peft.rank = 16
    config.peft.alpha = 32.0
  config.reward_model = ""  # launch.reward's WORKDIR/reward_model
  config.ptx_workdir = ""  # a launch.pretrain workdir: its data, for ptx
  config.ppo = ml_collections.ConfigDict(dataclasses.asdict(ppo))
  config.data = ml_collections.ConfigDict(dict(
      prompts="",  # JSONL: comparison records (their prompts) or {"prompt"}
      format="",  # chat format; "" = the reward model's
      max_prompt_tokens=seq_len // 2,
      eval_prompts=32,  # held out from the prompt file, for before/after
      seed=0))
  config.lock()
  return config
