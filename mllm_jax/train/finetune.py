"""What every stage that starts from another run shares: the base model's
architecture with this run's compute choices, and the finished model written
as a native checkpoint with the tokenizer beside it.

The stage binaries (`launch/flan.py`, `launch/sft.py`) differ in their data
and their evaluation; the training itself is `trainer.train` with a
`TrainTask` (task.py).
"""

from __future__ import annotations

import glob
import os
import shutil
from typing import Any, Mapping, NamedTuple

import jax

from mllm_jax.configlib import ConfigError
from mllm_jax.convert import native
from mllm_jax.modeling.config import RUN_FIELDS, ModelConfig


def base_model_config(init_checkpoint: str, run: Mapping[str, Any],
                      field: str = "init_checkpoint") -> ModelConfig:
  """The architecture saved in `init_checkpoint` with the run choices of
  `run` (the stage config's `run` section: RUN_FIELDS and, when set, the
  compute `dtype`)."""
  if not init_checkpoint:
    raise ConfigError(f"{field}: is empty; name the native checkpoint this "
                      f"stage starts from (launch.pretrain's WORKDIR/model, or "
                      f"launch.convert_checkpoint's output)")
  unknown = sorted(set(run) - set(RUN_FIELDS) - {"dtype"})
  if unknown:
    raise ConfigError(f"run.{unknown[0]}: only run choices "
                      f"({', '.join(RUN_FIELDS)}, dtype) can be set here; the "
                      f"architecture comes from {init_checkpoint}")
  overrides = {k: v for k, v in run.items() if k != "dtype" or v}
  return native.read_config(init_checkpoint, **overrides)


class StageConfigs(NamedTuple):
  model: ModelConfig
  parallel: Any
  optimizer: Any
  train: Any
  peft: Any
  tokenizer: Any


def stage_configs(config) -> StageConfigs:
  """The typed, checked configs of a stage that starts from
  `config.init_checkpoint` (configs/stages.py's layout), and the base's
  tokenizer. Raises ConfigError / FileNotFoundError naming the field."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.configlib import check, from_config
  from mllm_jax.data.tokenizer import load_tokenizer
  from mllm_jax.modeling.peft_config import PeftConfig
  from mllm_jax.parallel.config import ParallelConfig
  from mllm_jax.train.compile import check_run
  from mllm_jax.train.config import OptimizerConfig, TrainConfig
  # pylint: enable=g-import-not-at-top
  model_cfg = base_model_config(config.init_checkpoint, config.run.to_dict())
  parallel = from_config(ParallelConfig, config.parallel, "parallel")
  optimizer_cfg = from_config(OptimizerConfig, config.optimizer, "optimizer")
  train_cfg = from_config(TrainConfig, config.train, "train")
  peft_cfg = from_config(PeftConfig, config.peft, "peft")
  peft_cfg.check_model(model_cfg)
  check_run(model_cfg, parallel, optimizer_cfg, train_cfg, config.seq_len,
            "seq_len")
  tokenizer = load_tokenizer(config.init_checkpoint)
  check(tokenizer.vocab_size <= model_cfg.vocab_size, "init_checkpoint",
        f"the tokenizer has {tokenizer.vocab_size} ids, the model "
        f"{model_cfg.vocab_size}")
  return StageConfigs(model_cfg, parallel, optimizer_cfg, train_cfg,
                      peft_cfg, tokenizer)


def save_with_tokenizer(model_dir: str, cfg: ModelConfig, model,
                        tokenizer_dir: str) -> None:
  """The model as a native checkpoint, with the tokenizer files of
  `tokenizer_dir` (tokenizer.model / tokenizer.json / tokenizer_config.json)
  copied beside it, so generate and evaluate need only this directory."""
  native.save_model(model_dir, cfg, model, overwrite=True)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(tokenizer_dir, "tokenizer*")):
      shutil.copy(path, model_dir)


def heldout_loss(model, batches, loss_fn=None) -> float:
  """Weighted next-token loss of `model` over packed batches (for SFT the
  response loss: only assistant tokens carry weight), the same loss the
  trainer optimises and reports as eval_loss. loss_fn: the task's loss
  (default the LM loss; the multimodal stages pass theirs). The rows are
  split over the model's mesh like the trainer's eval batches."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.parallel.sharding import on_mesh_of
  from mllm_jax.train.task import lm_loss
  # pylint: enable=g-import-not-at-top
  loss = jax.jit(loss_fn or lm_loss())
  total, weight = 0.0, 0.0
  with on_mesh_of(model) as put:
    for batch in batches:
      _, sums = loss(model, {k: put(v) for k, v in batch.items()})
      total += float(sums["loss"])
      weight += float(sums["weight"])
  return total / max(weight, 1.0)


def save_result(workdir: str, model, tokenizer_dir: str) -> None:
  """A stage's trained model, written so that generate / evaluate / the next
  stage can read it: full fine-tuning -> WORKDIR/model; a PEFT method ->
  the adapter alone in WORKDIR/adapter (native adapter checkpoint), plus,
  for LoRA, the merged weights as a plain WORKDIR/model."""
  # pylint: disable=g-import-not-at-top
  from mllm_jax.convert import peft as peft_io
  from mllm_jax.modeling import peft
  # pylint: enable=g-import-not-at-top
  method = peft.peft_config(model).method
  if method == "none":
    save_with_tokenizer(os.path.join(workdir, "model"), model.cfg, model,
                        tokenizer_dir)
    return
  peft_io.save_adapter(os.path.join(workdir, "adapter"), model,
                       overwrite=True)
  if method == "lora":
    merged = peft.merge_lora(model)
    save_with_tokenizer(os.path.join(workdir, "model"), merged.cfg, merged,
                        tokenizer_dir)


def load_result(workdir: str, base_checkpoint: str, **overrides):
  """(cfg, model) of what `save_result` wrote: the plain model when there is
  one, else the base with its adapter."""
  from mllm_jax.convert import peft as peft_io  # pylint: disable=g-import-not-at-top
  model_dir = os.path.join(workdir, "model")
  if os.path.exists(os.path.join(model_dir, native.CONFIG_FILE)):
    return native.load_model(model_dir, **overrides)
  return peft_io.load_peft_model(base_checkpoint,
                                 os.path.join(workdir, "adapter"),
                                 **overrides)
