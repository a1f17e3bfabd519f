"""Metrics output for the training loop: a JSON-lines log, TensorBoard scalars, curves, progress.

Only one process writes (the loop passes `enabled=jax.process_index() == 0`); elsewhere every
method is a no-op, so callers need no `if` around them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import tensorboardX
import tqdm
from matplotlib.figure import Figure

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"
CURVE_PANELS = (  # (title, y-axis scale, metric keys) per panel, left to right.
    ("Loss", "log", ("train/loss", "eval/loss")),
    ("Accuracy", "linear", ("train/accuracy", "eval/accuracy", "eval/top5_accuracy")),
)


def read_metrics(path: str) -> list[dict[str, float]]:
  """Reads a metrics.jsonl file, skipping (with a warning) lines cut short by a kill."""
  records = []
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("Skipping unreadable line %d of %s: %r", line_number, path, line[:80])
  return records


def metric_curve(records: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` over the records that have it, in file order."""
  points = [(int(r["step"]), r[key]) for r in records if key in r]
  return [step for step, _ in points], [value for _, value in points]


def _write_records(path: str, records: list[dict[str, float]]) -> None:
  """Replaces `path` atomically with `records`, one JSON object per line."""
  temporary_path = path + ".tmp"
  with open(temporary_path, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)
  os.replace(temporary_path, path)


class MetricsWriter:
  """Appends metrics to {workdir}/metrics.jsonl and {workdir}/tensorboard/.

  With `resume_step`, records after that step are dropped first (and TensorBoard is told to
  purge them), so a kill and resume leaves no duplicated or future steps in the curves.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self.metrics_path = os.path.join(workdir, METRICS_FILENAME)
    self.curves_path = os.path.join(workdir, CURVES_FILENAME)
    self._summary_writer = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.metrics_path):
      # Rewriting also drops a line cut short by a kill, so new records start on a fresh line.
      records = read_metrics(self.metrics_path)
      _write_records(self.metrics_path, [
          r for r in records if resume_step is None or r["step"] <= resume_step])
    purge_step = None if resume_step is None else resume_step + 1
    # tensorboardX writes from a background thread: flush() reaches the disk only for events
    # that thread has taken; flush_secs bounds how long the rest wait.
    self._summary_writer = tensorboardX.SummaryWriter(
        os.path.join(workdir, "tensorboard"), purge_step=purge_step, flush_secs=10)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` (Python, NumPy or JAX scalars) at `step`."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in metrics.items()}
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for name, value in scalars.items():
      self._summary_writer.add_scalar(name, value, global_step=int(step))
    self._summary_writer.flush()

  def plot(self) -> str | None:
    """Saves loss and accuracy curves to {workdir}/curves.png; None if there is nothing."""
    if not self.enabled or not os.path.exists(self.metrics_path):
      return None
    records = read_metrics(self.metrics_path)
    fig = Figure(figsize=(12, 4.5))  # Not pyplot: no display and no global figure state.
    for ax, (title, yscale, keys) in zip(fig.subplots(1, len(CURVE_PANELS)), CURVE_PANELS):
      for key in keys:
        steps, values = metric_curve(records, key)
        if steps:
          # Markers keep sparse eval points (a single one, in a one-epoch run) visible.
          ax.plot(steps, values, label=key, marker="o" if key.startswith("eval/") else None,
                  markersize=3)
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.set_ylabel(title.lower())
      ax.set_yscale(yscale)
      ax.grid(True, alpha=0.3)
      if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(self.curves_path, dpi=100)
    return self.curves_path

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer; safe to call twice."""
    if self._summary_writer is not None:
      self._summary_writer.close()
      self._summary_writer = None


def progress_bar(total_steps: int, initial_step: int, enabled: bool) -> tqdm.tqdm:
  """A step counter with ETA; call `set_postfix(images_per_sec=...)` to show throughput."""
  return tqdm.tqdm(total=total_steps, initial=initial_step, disable=not enabled, unit="step",
                   dynamic_ncols=True)
