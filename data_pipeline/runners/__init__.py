"""Runners schedule the steps of data_pipeline.corpus; they hold no logic of
their own, so every runner gives the same output on the same input."""

from __future__ import annotations

from data_pipeline.config import CleanConfig
from data_pipeline.document import Funnel


def run(cfg: CleanConfig, workdir: str) -> Funnel:
  """Cleans ``cfg.input`` into ``workdir`` with the runner ``cfg.runner``."""
  if cfg.runner == "beam":
    from data_pipeline.runners import beam
    return beam.run(cfg, workdir)
  from data_pipeline.runners import local
  return local.run(cfg, workdir)
