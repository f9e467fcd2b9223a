"""Train-state checkpoints with Orbax: the state and the data iterator together.

The train state is saved as a flat {path: array} dict so that the format does
not depend on optax or Flax class layouts; restoring takes an abstract state
(shapes, dtypes and target shardings) and reshards as needed, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mllm_jax.train.optimizer import path_name


def flatten(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {path_name(path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("train state has colliding parameter paths")
  return flat


def unflatten(like: Any, flat: dict[str, Any]) -> Any:
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(
      treedef, [flat[path_name(path)] for path, _ in paths])


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps the last `keep`."""

  def __init__(self, directory: str, *, every: int, keep: int,
               async_save: bool = True):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None,
           force: bool = False) -> bool:
    """Starts an (asynchronous) save; returns whether one was started."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flatten(state)),
        data=ocp.args.JsonSave(data_state or {})), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the structure and shardings of `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(flatten(abstract_state)),
        data=ocp.args.JsonRestore()))
    return unflatten(abstract_state, restored["state"]), dict(restored["data"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
