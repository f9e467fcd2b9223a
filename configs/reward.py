"""Reward-model presets: `--config=configs/reward.py:NAME`.

  tiny           preference-model pretraining: the tiny SFT model
                 (launch.sft's WORKDIR/model) on comparisons of every
                 source mixed (built from data.sources, or
                 launch.build_comparisons' train.jsonl as data.train_files).
  tiny_finetune  the second step of the same binary: init_checkpoint is the
                 reward model the first step wrote (its head is kept), data
                 one target source's comparisons, a lower learning rate.
  smollm2        SmolLM2-135M-Instruct with LoRA on every projection.

Set `--config.init_checkpoint=DIR` and either `--config.data.sources=(...)`
or `--config.data.train_files=TRAIN.jsonl --config.data.eval_files=EVAL.jsonl`
(data is mllm_jax.data.config.ComparisonDataConfig, as DPO's). The
comparisons are synthetic pairs built from real data, not human preferences. The rest (run, peft,
parallel, optimizer, train, eval) is configs/stages.py's; train.batch_size
counts comparisons (each holds data.max_responses rows).
"""

import dataclasses

import ml_collections

from configs.stages import finetune_config
from mllm_jax.data.config import ComparisonDataConfig

# preset -> (steps, comparisons per batch, seq_len, learning rate, peft)
PRESETS = {
    "tiny": (300, 16, 256, 3e-4, "none"),
    "tiny_finetune": (100, 16, 256, 1e-4, "none"),
    "smollm2": (600, 16, 512, 2e-4, "lora"),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown reward preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  steps, batch, seq_len, lr, peft = PRESETS[name]
  config = finetune_config(tiny=name.startswith("tiny"), steps=steps,
                           batch_size=batch, seq_len=seq_len,
                           learning_rate=lr)
  config.peft.method = peft
  if peft == "lora":
    config.peft.targets = ("q", "k", "v", "o", "gate", "up", "down")
    config.peft.rank = 16
    config.peft.alpha = 32.0
  config.data = ml_collections.ConfigDict(dataclasses.asdict(
      ComparisonDataConfig(
          format="vicuna_v1" if name.startswith("tiny") else "hf_template",
          limit_per_source=600 if name.startswith("tiny") else 1000,
          max_responses=3)))
  config.reward = ml_collections.ConfigDict(dict(
      # Appended after every response before scoring: "eos", or a token.
      end_of_context="eos",
      margin=0.0,  # -log sigmoid(r_better - r_worse - margin)
      normalise=True,  # shift so best-ranked train responses average 0
      normalise_comparisons=256))
  config.lock()
  return config
