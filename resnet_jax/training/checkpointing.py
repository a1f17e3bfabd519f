"""Orbax checkpoints of the train state and the position in the data stream.

A checkpoint holds three items: `state` (the TrainState's arrays, one replicated copy, so
it restores under any parallelism mode or device count), `data` (JSON: what the input
pipeline needs to continue exactly where it stopped) and `model` (JSON: the
`pretrained.ModelInfo` that lets prediction, export and fine-tuning start from it). Writes are asynchronous and
collective: every process calls `save`, orbax coordinates who writes what.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import serialization

from resnet_jax.training.train_state import TrainState


def make_checkpoint_manager(workdir: str, keep: int, best_metric: str) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints plus the best one by `best_metric` (losses: lowest)."""
  lower_is_better = "loss" in best_metric
  preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(keep),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=lower_is_better, n=1,
          keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=preservation,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data", "model"))


def _arrays(state: TrainState) -> dict[str, Any]:
  """The state's arrays as a nested dict (static fields and disabled extras left out)."""
  return {k: v for k, v in serialization.to_state_dict(state).items() if v is not None}


def save(manager: ocp.CheckpointManager, state: TrainState, data_position: dict[str, Any],
         model_info: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` (replicated layout) at its step."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)),
                                             data=ocp.args.JsonSave(data_position),
                                             model=ocp.args.JsonSave(model_info)),
               metrics=metrics, force=True)


def restore_latest(manager: ocp.CheckpointManager,
                   template: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
  """Restores the newest checkpoint into `template`'s structure and shardings, if any.

  Raises RuntimeError naming the checkpoint when it cannot be read or does not fit.
  """
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(template))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types; all mean "this checkpoint is unusable".
    path = os.path.join(manager.directory, str(step))
    raise RuntimeError(
        f"Could not restore checkpoint {path}: {type(e).__name__}: {e}. If it was written by "
        "a different model or config, use a new --workdir; if it is damaged, delete it to "
        "resume from the previous one.") from e
  logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
  # Disabled extras (None) were not saved; the template supplies them.
  arrays = {**serialization.to_state_dict(template), **restored["state"]}
  state = serialization.from_state_dict(template, arrays)
  return state, restored["data"]
