"""The run record: how a workdir was made, and a guard against resuming it with another config.

`WORKDIR/config.json` holds the resolved config of the first start; `WORKDIR/runs.jsonl`
gets one line per start: the time, the command line, the config keys that differ from the
previous start (old, new), package versions, devices and processes, and the git commit when
the code runs from a checkout. Only process 0 writes them; every process checks.

Resuming from a checkpoint with a config that differs in a key that changes what the run
computes stops before anything compiles (`ConfigChangedError`, naming each key) unless
`config.allow_config_change` is set; the change is then recorded. Keys that only change how
a run is observed, stored or laid out (`OPERATIONAL_KEYS`) may change freely, and so may the
length of a run whose learning-rate schedule does not depend on it.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Any

import jax
import ml_collections
from etils import epath

from resnet_jax.storage import paths

CONFIG_FILENAME = "config.json"
RUNS_FILENAME = "runs.jsonl"
# What they change: how often a run logs, evaluates and checkpoints, how it shows progress,
# where it finds data and compiled programs, how it reads input, how it is laid out over
# devices, what it does on a failed write, and what it probes on the side.
OPERATIONAL_KEYS = frozenset({
    "log_every_steps", "log_grad_norms", "eval_every_steps", "eval_batch_size",
    "checkpoint_every_steps", "keep_checkpoints", "best_checkpoint_metric", "on_write_error",
    "progress_bar", "data_dir", "compilation_cache_dir", "cache", "data_threads",
    "prefetch_batches", "parallelism", "remat", "remat_policy", "linear_probe_dataset",
    "linear_probe_shots", "allow_config_change", "population_mode"})
LENGTH_KEYS = frozenset({"num_train_steps", "num_epochs"})
# Schedules whose learning rate at a step does not depend on the length of the run.
LENGTH_FREE_SCHEDULES = ("constant", "step")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets")
_SECRET_FLAG = re.compile(r"token|secret|password|credential", re.IGNORECASE)
_REPO = pathlib.Path(__file__).resolve().parents[2]  # the checkout, when run from one


class ConfigChangedError(ValueError):
  """A resumed run's config changes what the run computes."""


def as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON values (tuples become lists), keys sorted."""
  return json.loads(json.dumps(config.to_dict(), sort_keys=True))


def recorded_config(workdir: epath.Path) -> dict[str, Any] | None:
  """The config of the latest start recorded in `workdir` (config.json with each start's
  changes applied in order), or None when the workdir has no record."""
  config_file = workdir / CONFIG_FILENAME
  if not config_file.exists():
    return None
  config = json.loads(config_file.read_text())
  for start in _starts(workdir):
    config.update({key: new for key, (_, new) in start.get("config_changes", {}).items()})
  return config


def _starts(workdir: epath.Path) -> list[dict[str, Any]]:
  runs_file = workdir / RUNS_FILENAME
  if not runs_file.exists():
    return []
  return [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
  """{key: [old value, new value]} for every key whose value differs (None: absent)."""
  return {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
          if old.get(key) != new.get(key)}


def result_changing(changes: dict[str, list[Any]], config: ml_collections.ConfigDict
                    ) -> dict[str, list[Any]]:
  """The changes that change what the run computes."""
  length_free = config.schedule in LENGTH_FREE_SCHEDULES and "schedule" not in changes
  return {key: change for key, change in changes.items()
          if key not in OPERATIONAL_KEYS and not (key in LENGTH_KEYS and length_free)}


def check_config(workdir: epath.Path, config: ml_collections.ConfigDict, resuming: bool
                 ) -> dict[str, list[Any]]:
  """The config changes since the workdir's last recorded start.

  ConfigChangedError when `resuming` (the workdir has a checkpoint to continue) with changes
  that change the result and `config.allow_config_change` is not set.
  """
  previous = recorded_config(workdir)
  if previous is None:
    return {}
  current = as_dict(config)
  changes = differences(previous, current)
  # A key that only one side has came or went with the code, not with the user's command.
  blocking = {key: change for key, change in result_changing(changes, config).items()
              if key in previous and key in current}
  if resuming and blocking and not config.allow_config_change:
    listed = "; ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in blocking.items())
    extend = ""
    if blocking.keys() & LENGTH_KEYS:
      extend = (f" To train a finished run longer with the {config.schedule} schedule, "
                "whose learning rate depends on the length, add "
                "--config.allow_config_change=True: the schedule is recomputed for the new "
                "length from the step the run is at.")
    raise ConfigChangedError(
        f"{workdir} was trained with another config ({workdir / RUNS_FILENAME}): {listed}. "
        "Resume with the recorded config, start a new --workdir, or add "
        f"--config.allow_config_change=True to go on with these changes (they are recorded)."
        f"{extend}")
  return changes


def versions() -> dict[str, str]:
  """Python's and the core packages' versions ("not installed" where one is missing)."""
  found = {"python": platform.python_version()}
  for package in PACKAGES:
    try:
      found[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      found[package] = "not installed"
  return found


def git_commit() -> dict[str, Any] | None:
  """The checkout's commit and whether it has uncommitted changes; None outside a checkout."""
  if not (_REPO / ".git").is_dir():
    return None
  try:
    commit = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain",
                             "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "uncommitted_changes": bool(status.strip())}


def command_line(argv: list[str]) -> list[str]:
  """`argv` with the values of flags that look like secrets replaced."""
  def redacted(arg: str) -> str:
    name, sep, _ = arg.partition("=")
    return f"{name}=<redacted>" if sep and _SECRET_FLAG.search(name) else arg
  return [redacted(arg) for arg in argv]


def record_start(workdir: epath.Path, config: ml_collections.ConfigDict,
                 changes: dict[str, list[Any]], how: str) -> None:
  """Writes config.json (first start only) and appends this start to runs.jsonl.

  `how` says how the run starts: "fresh", "resumed at step N", "from weights X".
  """
  if (workdir / CONFIG_FILENAME).exists():
    recorded_changes = changes
  else:  # the first start (or a workdir from before run records): its config is the base
    paths.write_atomically(workdir / CONFIG_FILENAME,
                           json.dumps(as_dict(config), indent=2, sort_keys=True) + "\n")
    recorded_changes = {}
  start = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(sys.argv), "start": how, "config_changes": recorded_changes,
           "versions": versions(), "devices": f"{jax.device_count()} × "
           f"{jax.devices()[0].device_kind}", "processes": jax.process_count(),
           "git": git_commit()}
  lines = [json.dumps(s) for s in _starts(workdir)] + [json.dumps(start)]
  paths.write_atomically(workdir / RUNS_FILENAME, "\n".join(lines) + "\n")
