"""Orbax checkpoints of the train state and the position in the data stream.

A checkpoint holds three items: `state` (the TrainState's arrays, one replicated copy, so
it restores under any parallelism mode or device count), `data` (JSON: what the input
pipeline needs to continue exactly where it stopped) and `model` (JSON: the
`pretrained.ModelInfo` that lets prediction, export and fine-tuning start from it). Writes are asynchronous and
collective: every process calls `save`, orbax coordinates who writes what.

The workdir may be local or in a bucket. Orbax marks a finished checkpoint differently on
each: a local one is written under a temporary name and renamed, a bucket (which cannot
rename atomically) gets a `commit_success.txt` last. Orbax lists only finished ones, so a
save cut short is never restored or moved aside here; its next save of that step replaces it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from jax.experimental import multihost_utils

from resnet_jax import pretrained
from resnet_jax.models import scan
from resnet_jax.storage import paths
from resnet_jax.training.train_state import TrainState

STATE_ITEM = pretrained.STATE_ITEM


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be read."""


def make_checkpoint_manager(workdir: str | os.PathLike, keep: int, best_metric: str
                            ) -> ocp.CheckpointManager:
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
  return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints",
                               options=options, item_names=(STATE_ITEM, "data", pretrained.MODEL_ITEM))


def _arrays(state: TrainState) -> dict[str, Any]:
  """The state's arrays as a nested dict (static fields and disabled extras left out)."""
  return {k: v for k, v in serialization.to_state_dict(state).items() if v is not None}


def step_of(state: TrainState) -> int:
  """The state's step (a population's members all share it)."""
  return int(np.asarray(jax.device_get(state.step)).flat[0])


def save(manager: ocp.CheckpointManager, state: TrainState, data_position: dict[str, Any],
         model_info: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` (replicated layout) at its step."""
  step = step_of(state)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)),
                                             data=ocp.args.JsonSave(data_position),
                                             model=ocp.args.JsonSave(model_info)),
               metrics=metrics, force=True)


def _stored_state_mismatches(step_dir: epath.Path, target: dict[str, Any]) -> list[str] | None:
  """How the stored state's shapes differ from `target`'s; None if unreadable."""
  try:
    stored = ocp.PyTreeCheckpointHandler().metadata(step_dir / STATE_ITEM).tree
  except Exception:  # noqa: BLE001 - any failure to read it means damage
    return None
  mismatches = pretrained.variable_mismatches(target, stored)
  if mismatches and scan.is_scanned(stored) != scan.is_scanned(target):
    mismatches.insert(0, f"it was written with config.scan_blocks={scan.is_scanned(stored)}, "
                         "which this config must match")
  return mismatches


def move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves a damaged checkpoint to checkpoints_damaged/ (never deletes it); returns where.

  In a bucket the move copies every object, then deletes the originals (`paths.move_tree`).
  """
  source = manager.directory / str(step)
  aside_dir = manager.directory.parent / "checkpoints_damaged"
  target = aside_dir / str(step)
  suffix = 1
  while target.exists():  # damaged twice at the same step: keep both
    target, suffix = aside_dir / f"{step}.{suffix}", suffix + 1
  if jax.process_index() == 0:
    aside_dir.mkdir(parents=True, exist_ok=True)
    paths.move_tree(source, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  manager.reload()
  return target


def _model_in_brackets(info: pretrained.ModelInfo | None) -> str:
  """" (resnet8, 10 classes)", or "" without an info."""
  return f" ({info.model}, {info.num_classes} classes)" if info else ""


def _recorded_model(step_dir: epath.Path) -> pretrained.ModelInfo | None:
  """The model a checkpoint records, or None when it records none readable."""
  try:
    return pretrained.load_info(step_dir)
  except (ValueError, OSError):
    return None


def restore_latest(manager: ocp.CheckpointManager, template: TrainState,
                   expected: pretrained.ModelInfo | None = None
                   ) -> tuple[TrainState, dict[str, Any]] | None:
  """Restores the newest readable checkpoint into `template`'s structure and shardings.

  A damaged checkpoint (unreadable, truncated, half-written) is moved aside with a warning
  and the next older one is tried; RuntimeError only when none is readable. A readable
  checkpoint that does not fit the template (another model, class count or optimizer) is
  a ValueError naming both (the model and classes the checkpoint records and `expected`,
  what the config builds): never a silent fallback to an older one. CheckpointError
  when checkpoints exist but none is readable.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(template))
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    step_dir = manager.directory / str(step)
    mismatches = _stored_state_mismatches(step_dir, target)
    if mismatches:
      raise ValueError(
          f"The checkpoint {step_dir}{_model_in_brackets(_recorded_model(step_dir))} does not "
          f"fit this config{_model_in_brackets(expected)}: {len(mismatches)} differences, e.g. "
          f"{'; '.join(mismatches[:3])}. Use a new --workdir, or the config it was written "
          "with.")
    try:
      if mismatches is None:
        raise ValueError("its state metadata cannot be read")
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "damaged"
      aside = move_aside(manager, step)
      logging.warning("Checkpoint %s is damaged (%s: %s); moved it to %s and trying the one "
                      "before it.", step_dir, type(e).__name__, str(e)[:200], aside)
      damaged.append(f"{step_dir} → {aside}")
      continue
    logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
    # Disabled extras (None) were not saved; the template supplies them.
    arrays = {**serialization.to_state_dict(template), **restored["state"]}
    return serialization.from_state_dict(template, arrays), restored["data"]
  if damaged:
    raise CheckpointError(f"No readable checkpoint in {manager.directory}: every one was damaged "
                       f"and has been moved aside ({'; '.join(damaged)}). Start again with a "
                       "new --workdir, or restore the files.")
  return None
