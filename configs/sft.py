"""Supervised fine-tuning presets: `--config=configs/sft.py:NAME`.

  tiny     the tiny pretrained model (launch.pretrain's WORKDIR/model) on the
           first 3,000 ShareGPT conversations in the Vicuna format, 256-token
           rows, CPU in minutes.
  smollm2  SmolLM2-135M-Instruct imported from GGUF, its own ChatML template
           (`hf_template`), 1,024-token rows.

The data section is mllm_jax.data.config.ChatDataConfig; the rest (base
checkpoint, run choices, optimizer, train, eval) is configs/stages.py's. Set
`--config.init_checkpoint=DIR` (a native checkpoint with its tokenizer).
"""

import dataclasses

import ml_collections

from configs.stages import finetune_config
from mllm_jax.data.config import ChatDataConfig

# preset -> (data, steps, global batch, seq_len, peak learning rate)
PRESETS = {
    "tiny": (ChatDataConfig(format="vicuna_v1", max_conversations=3000,
                            eval_conversations=200), 200, 16, 256, 1e-3),
    "smollm2": (ChatDataConfig(format="hf_template", max_conversations=20000,
                               eval_conversations=200), 1000, 16, 1024, 5e-5),
}


def get_config(name: str = "tiny") -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"unknown SFT preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}")
  data, steps, batch, seq_len, lr = PRESETS[name]
  config = finetune_config(tiny=name == "tiny", steps=steps,
                           batch_size=batch, seq_len=seq_len,
                           learning_rate=lr)
  config.data = ml_collections.ConfigDict(dataclasses.asdict(data))
  # Zero-shot benchmarks before and after (they should not collapse).
  config.eval.benchmarks = ("piqa", "arc_easy")
  config.lock()
  return config
