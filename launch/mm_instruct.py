r"""Multimodal stage 2: visual instruction tuning (projector and LLM train,
vision tower frozen), the loss on the answers only.

  python -m launch.mm_instruct --config=configs/mm.py:instruct_tiny \
      --workdir=DIR --config.init_checkpoint=STAGE1_DIR/model \
      [--config.data.format=minigpt4]

The tower and projector are init_checkpoint's: of `--config.vision.*` and
`--config.projector.*` only the run fields (attention backend, remat, scan
unrolling) apply, and any other is refused by name.

Questions come from easy-vqa through the VQA templates, in LLaVA's
conversation format (`llava_v1`) or MiniGPT-4's (`minigpt4`). Writes
DIR/model and DIR/summary.json; a run found in DIR is resumed. The stage
itself is mllm_jax/train/mm_stage.py.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from launch.flags import start_process
from mllm_jax.configlib import ConfigError
from mllm_jax.train.mm_stage import check_overrides, run_stage

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
    check_overrides("instruct", config_flags.get_override_values(
        flags.FLAGS["config"]))
    run_stage(_CONFIG.value, _WORKDIR.value, "instruct")
  except (ConfigError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
