"""Metrics output for the training loop: a JSON-lines log, TensorBoard scalars, curves, progress.

Every file goes through `storage.paths`, so a workdir in a bucket gets the same files.

Only one process writes (the loop passes `enabled=jax.process_index() == 0`); elsewhere every
method is a no-op, so callers need no `if` around them.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping

import tensorboardX
import tqdm
from etils import epath
from matplotlib.figure import Figure

from resnet_jax.storage import paths
from resnet_jax.training import population

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"
CURVE_PANELS = (  # (title, y-axis scale, metric keys) per panel, left to right.
    ("Loss", "log", ("train/loss", "eval/loss")),
    ("Accuracy", "linear", ("train/accuracy", "eval/accuracy", "eval/top5_accuracy")),
)


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
  """Reads a metrics.jsonl file, skipping (with a warning) lines cut short by a kill."""
  records = []
  for line_number, line in enumerate(paths.resolve(path).read_text().splitlines(), start=1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning("Skipping unreadable line %d of %s: %r", line_number, path, line[:80])
  return records


def eval_summary(metrics: Mapping[str, float]) -> str:
  """"loss 0.1234, accuracy 95.00%[, top-5 99.00%]" (top-5 where it was measured).

  A population's: the members' mean ± standard deviation, and the best member's accuracy.
  """
  def value(name: str, spec: str) -> str:
    spread = f" ± {metrics[name + '_std']:{spec}}" if name + "_std" in metrics else ""
    return f"{metrics[name]:{spec}}{spread}"

  summary = f"loss {value('eval/loss', '.4f')}, accuracy {value('eval/accuracy', '.2%')}"
  if "eval/top5_accuracy" in metrics:
    summary += f", top-5 {value('eval/top5_accuracy', '.2%')}"
  accuracies = population.member_values(metrics, "eval/accuracy")
  if accuracies:
    best = max(range(len(accuracies)), key=accuracies.__getitem__)
    summary += (f" over {len(accuracies)} members; best: member {best}, accuracy "
                f"{accuracies[best]:.2%}")
  return summary


def metric_curve(records: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` over the records that have it, in file order."""
  points = [(int(r["step"]), r[key]) for r in records if key in r]
  return [step for step, _ in points], [value for _, value in points]


class _BucketEventsFile:
  """A TensorBoard events file in a bucket: objects cannot be appended to, so every flush
  uploads the whole file again (an events file of scalars stays small).

  A failed upload is a warning, and the first flush after new events uploads everything
  again: metrics.jsonl, whose failures the loop reports, holds the same scalars, and
  tensorboardX flushes from a thread of its own, where an exception would only end that
  thread. Flushes with nothing new do nothing (a bucket out of reach takes gcsfs ~30 s of
  retries per attempt, and tensorboardX flushes several times as it closes).
  """

  def __init__(self, path: str):
    self._path, self._buffer = paths.resolve(path), io.BytesIO()
    self._unflushed = False

  def write(self, data: bytes) -> None:
    self._buffer.write(data)
    self._unflushed = True

  def flush(self) -> None:
    if not self._unflushed:
      return
    self._unflushed = False
    try:
      self._path.write_bytes(self._buffer.getvalue())
    except paths.storage_errors() as e:
      logging.warning("Could not upload the TensorBoard events to %s (%s); the next flush "
                      "with new events tries again", self._path, paths.error_reason(e))

  def close(self) -> None:
    self.flush()


class _BucketEventsFiles:
  """tensorboardX's writer factory for gs:// and s3://, through the run's storage backend."""

  def open(self, path: str) -> _BucketEventsFile:
    return _BucketEventsFile(path)

  def directory_check(self, path: str) -> None:
    """Buckets have no directories to create."""


for _scheme in ("gs", "s3"):  # replaces tensorboardX's own (google-cloud-storage, boto3)
  tensorboardX.record_writer.register_writer_factory(_scheme, _BucketEventsFiles())


# Each series of a panel in its own line style and marker, so that equal series (accuracy
# and top-5 both at 100%) show as one drawn over the other rather than one hidden.
_SERIES_STYLES = (("-", "o"), ("--", "s"), (":", "^"))
FEW_POINTS = 20  # a series with at most this many points is drawn with markers


def curves_figure(records: list[dict[str, float]]) -> Figure:
  """Loss and accuracy against step, one panel each, from metrics records."""
  fig = Figure(figsize=(12, 4.5))  # Not pyplot: no display and no global figure state.
  for ax, (title, yscale, keys) in zip(fig.subplots(1, len(CURVE_PANELS)), CURVE_PANELS):
    for key, (linestyle, marker) in zip(keys, _SERIES_STYLES):
      steps, values = metric_curve(records, key)
      if steps:
        # Markers keep sparse series (a single eval point, a short run) visible.
        ax.plot(steps, values, label=key, linestyle=linestyle, markersize=4,
                marker=marker if len(steps) <= FEW_POINTS or key.startswith("eval/") else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(title.lower())
    ax.set_yscale(yscale)
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  return fig


class MetricsWriter:
  """Writes metrics to {workdir}/metrics.jsonl and {workdir}/tensorboard/, local or in a bucket.

  With `resume_step`, records after that step are dropped first (and TensorBoard is told to
  purge them), so a kill and resume leaves no duplicated or future steps in the curves.
  Bucket objects cannot be appended to, so metrics.jsonl is rewritten whole at each write,
  atomically (`paths.write_atomically`): a kill leaves the old file or the new one.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    workdir = paths.resolve(workdir)
    self.metrics_path = workdir / METRICS_FILENAME
    self.curves_path = workdir / CURVES_FILENAME
    self._records: list[dict[str, float]] = []
    self._summary_writer = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if self.metrics_path.exists():
      self._records = [r for r in read_metrics(self.metrics_path)
                       if resume_step is None or r["step"] <= resume_step]
      self._write_records()
    purge_step = None if resume_step is None else resume_step + 1
    # tensorboardX writes from a background thread: flush() reaches the disk only for events
    # that thread has taken; flush_secs bounds how long the rest wait.
    self._summary_writer = tensorboardX.SummaryWriter(
        os.fspath(workdir / "tensorboard"), purge_step=purge_step, flush_secs=10)

  def _write_records(self) -> None:
    paths.write_atomically(self.metrics_path,
                           "".join(json.dumps(record) + "\n" for record in self._records))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` (Python, NumPy or JAX scalars) at `step`."""
    if not self.enabled:
      return
    scalars = {name: float(value) for name, value in metrics.items()}
    self._records.append({"step": int(step), **scalars})
    try:
      self._write_records()
    except BaseException:
      self._records.pop()  # not written: a retry at the next write must not duplicate it
      raise
    for name, value in scalars.items():
      self._summary_writer.add_scalar(name, value, global_step=int(step))
    self._summary_writer.flush()

  def plot(self) -> epath.Path | None:
    """Saves loss and accuracy curves to {workdir}/curves.png; None if there is nothing."""
    if not self.enabled or not self._records:
      return None
    image = io.BytesIO()
    curves_figure(self._records).savefig(image, format="png", dpi=100)
    paths.write_atomically(self.curves_path, image.getvalue())
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
