"""Config parts shared by the stages that start from another run (FLAN, SFT).

`finetune_config(...)` gives every field but the stage's data: the base
checkpoint, this run's compute choices (`run.*`: the architecture comes
from the checkpoint), mesh, optimizer and train settings, and evaluation
sizes. Stage config files add their data section.
"""

import dataclasses

import ml_collections

from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.parallel.config import ParallelConfig
from mllm_jax.train.config import OptimizerConfig, TrainConfig


def _dataclass_config(obj) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dataclasses.asdict(obj))


def finetune_config(*, tiny: bool, steps: int, batch_size: int, seq_len: int,
                    learning_rate: float) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A native checkpoint (with its tokenizer): launch.pretrain's WORKDIR/model
  # or launch.convert_checkpoint's output.
  config.init_checkpoint = ""
  # How this run computes (mllm_jax.modeling.config.RUN_FIELDS, and dtype:
  # "" keeps the checkpoint's compute dtype); the architecture is the base's.
  config.run = ml_collections.ConfigDict(dict(
      attention_backend="cpu_fused" if tiny else "xla",
      custom_vjp=tiny, remat="none", scan_unroll=1, loss_chunk_len=0,
      loss_positions=1.0, dtype=""))
  # Parameter-efficient fine-tuning: method "none" trains every parameter
  # (or those train.trainable selects); "lora", "prompt", "prefix",
  # "ptuning", "adapter" train only their own parameters.
  config.peft = _dataclass_config(PeftConfig())
  config.parallel = _dataclass_config(ParallelConfig(data=-1))
  config.seq_len = seq_len
  config.optimizer = _dataclass_config(OptimizerConfig(
      learning_rate=learning_rate, warmup_steps=0, warmup_ratio=0.1,
      weight_decay=0.0, end_learning_rate_ratio=0.0,
      backend="cpu_fused" if tiny else "optax"))
  config.train = _dataclass_config(TrainConfig(
      steps=steps, batch_size=batch_size, log_every=10,
      eval_every=max(steps // 2, 1), eval_batches=4,
      checkpoint_every=max(steps // 2, 1)))
  config.eval = ml_collections.ConfigDict(dict(
      limit=100 if tiny else 500,  # examples per task / prompts
      max_new_tokens=32))
  return config
