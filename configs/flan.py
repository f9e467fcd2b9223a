"""FLAN instruction-tuning presets: `--config=configs/flan.py:NAME`.

The data side is under `config.flan` (mllm_jax.data.flan.FlanConfig; every
field overridable, e.g. `--config.flan.cap=1000`, `--config.flan.mixture.cot=
0.2`, `--config.flan.held_out_families='("nli",)'`); the rest (base
checkpoint, run choices, optimizer, train, eval) is configs/stages.py's.
Set `--config.init_checkpoint=DIR` (a native checkpoint with its tokenizer).

  tiny     CPU in minutes: small pools and caps, short inputs (fits a
           256-token sequence), NLI held out.
  smollm2  SmolLM2-135M sized: FLAN 2021's cap of 3,000, FLAN 2022-style
           sub-mixture weights, NLI and commonsense held out, 2,048 tokens.
"""

import ml_collections

from configs.stages import finetune_config
from mllm_jax.data.flan import FlanConfig

PRESETS = {
    "tiny": FlanConfig(
        held_out_families=("nli",),
        mixture={"flan": 0.5, "t0": 0.4, "cot": 0.1},
        few_shot=(1, 2), cap=200, max_examples_per_task=200,
        max_input_tokens=192, max_target_tokens=64, shuffle_window=1000),
    "smollm2": FlanConfig(
        held_out_families=("nli", "commonsense"),
        mixture={"flan": 0.45, "t0": 0.45, "cot": 0.1},
        few_shot=(1, 3), cap=3000, max_examples_per_task=30000,
        max_input_tokens=1536, max_target_tokens=512),
}


def flan_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """The `flan` part of a preset as a ConfigDict (mixture as a mapping)."""
  if name not in PRESETS:
    raise ValueError(f"unknown FLAN preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  return ml_collections.ConfigDict(PRESETS[name].to_dict())


# preset -> (steps, global batch, sequence length, peak learning rate)
TRAINING = {"tiny": (200, 16, 256, 1e-3), "smollm2": (2000, 32, 2048, 1e-4)}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  flan = flan_config(name)  # validates the name
  steps, batch, seq_len, lr = TRAINING[name]
  config = finetune_config(tiny=name == "tiny", steps=steps,
                           batch_size=batch, seq_len=seq_len,
                           learning_rate=lr)
  config.flan = flan
  config.lock()
  return config
