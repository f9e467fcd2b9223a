"""DPO presets: `--config=configs/dpo.py:NAME`.

  tiny     the tiny SFT model (launch.sft's WORKDIR/model) on comparisons
           built from ARC-Easy, GSM8K and BFCL (not human preferences), in
           the Vicuna format, 256-token rows, CPU in minutes.
  smollm2  SmolLM2-135M-Instruct imported from GGUF, its own ChatML
           template (`hf_template`), 512-token rows, LoRA.

Sections: `data` is mllm_jax.data.config.ComparisonDataConfig, `dpo` is
mllm_jax.rl.config.DPOConfig (beta, loss: sigmoid / cdpo / ipo, reference:
cached / on_the_fly); the rest (base checkpoint, run choices, PEFT,
optimizer, train, eval) is configs/stages.py's. `train.batch_size` counts
comparisons (each takes data.max_responses rows). Set
`--config.init_checkpoint=DIR` (the SFT model: the policy's start and the
frozen reference).
"""

import dataclasses

import ml_collections

from configs.stages import finetune_config
from mllm_jax.data.config import ComparisonDataConfig
from mllm_jax.rl.config import DPOConfig

# preset -> (data, dpo, steps, comparisons per batch, seq_len, peak lr)
PRESETS = {
    "tiny": (ComparisonDataConfig(format="vicuna_v1", limit_per_source=600,
                                  max_responses=3),
             DPOConfig(beta=0.1), 150, 8, 256, 1e-4),
    "smollm2": (ComparisonDataConfig(format="hf_template",
                                     limit_per_source=1000, max_responses=3),
                DPOConfig(beta=0.1), 300, 8, 512, 5e-5),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown DPO preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  data, dpo, steps, batch, seq_len, lr = PRESETS[name]
  config = finetune_config(tiny=name == "tiny", steps=steps,
                           batch_size=batch, seq_len=seq_len,
                           learning_rate=lr)
  config.data = ml_collections.ConfigDict(dataclasses.asdict(data))
  config.dpo = ml_collections.ConfigDict(dataclasses.asdict(dpo))
  if name == "smollm2":
    config.peft.method = "lora"
  config.lock()
  return config
