r"""Multimodal stage 1: align the projector on image-caption pairs (the LLM
frozen; the tower frozen too unless `config.trainable` says otherwise, as
the tiny preset does for its random tower).

  python -m launch.mm_align --config=configs/mm.py:align_tiny --workdir=DIR \
      --config.init_checkpoint=TEXT_CHECKPOINT

TEXT_CHECKPOINT is a native decoder checkpoint whose tokenizer has the
`<image>` token; the tower (configs/vision.py presets, `--config.vision.*`)
is built from the seed and the projector is fresh. Writes DIR/model (a native
multimodal checkpoint with the tokenizer) and DIR/summary.json; a run found
in DIR is resumed. The stage itself is mllm_jax/train/mm_stage.py.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError
from mllm_jax.train.mm_stage import run_stage

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/mm.py:PRESET; override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; an existing run there is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start_process()
  try:
    run_stage(_CONFIG.value, _WORKDIR.value, "align")
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
