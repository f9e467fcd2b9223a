"""The multimodal model as a `TrainTask`: stage 1 (projector only) and stage 2
(projector + LLM) are this task with another `trainable` filter; the vision
tower is frozen in both, so it gets no gradient, no optimizer state and
stays bit-identical (the trainer's frozen-parameter path)."""

from __future__ import annotations

from flax import nnx

from mllm_jax.configlib import check
from mllm_jax.modeling.multimodal import (IMAGE_FIELDS, MultimodalConfig,
                                          MultimodalModel, multimodal_loss)
from mllm_jax.modeling.peft import AdapterParam
from mllm_jax.modeling.peft_config import PeftConfig
from mllm_jax.train.metrics import train_flops_per_token
from mllm_jax.train.task import LM_BATCH, TrainTask, path_filter

# What trains in each stage (regular expressions over parameter paths).
STAGE_TRAINABLE = {
    "align": (r"^projector\.",),
    "instruct": (r"^projector\.", r"^decoder\."),
}


def multimodal_task(cfg: MultimodalConfig, *, trainable: tuple[str, ...],
                    init_checkpoint: str = "", z_loss: float = 0.0,
                    peft: PeftConfig | None = None, seed: int = 0,
                    name: str = "multimodal") -> TrainTask:
  """`trainable`: path patterns (STAGE_TRAINABLE or your own);
  `init_checkpoint`: a native multimodal checkpoint of this architecture
  (convert.multimodal), restored straight into the mesh's shardings
  (adapters keep their initialisation). With LoRA (`peft`) the decoder's
  own weights are frozen whatever `trainable` says of `decoder.`: its
  adapters train instead."""
  lora = peft is not None and peft.method == "lora"
  select = path_filter(trainable)
  if lora:
    others = tuple(p for p in trainable if not p.startswith("^decoder"))
    check(len(others) < len(trainable), "peft.method",
          "LoRA adapts the LLM, which this stage keeps frozen (stage 1 "
          "trains the projector only)")
    select = nnx.Any(AdapterParam, path_filter(others)) if others else (
        AdapterParam)
  load = None
  if init_checkpoint:
    # pylint: disable=g-import-not-at-top
    from mllm_jax.convert import multimodal as convert
    from mllm_jax.modeling.peft import without_adapters
    # pylint: enable=g-import-not-at-top
    convert.check_architecture(init_checkpoint, cfg, "init_checkpoint")
    load = lambda targets: convert.restore_params(
        init_checkpoint, without_adapters(targets))
  return TrainTask(
      name=name,
      build_model=lambda rngs: MultimodalModel(cfg, rngs, peft),
      loss=multimodal_loss(z_loss, peft, seed),
      trainable=select,
      load_weights=load,
      weights_source=init_checkpoint,
      batch_fields={**LM_BATCH, **IMAGE_FIELDS},
      # The decoder's FLOPs per token (the tower's are not counted in MFU).
      flops_per_token=lambda seq_len: train_flops_per_token(cfg.model,
                                                            seq_len),
      perplexity=False)
