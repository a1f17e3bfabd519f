"""Specifications for metrics output: JSON lines, TensorBoard scalars, curves, progress."""

from __future__ import annotations

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from resnet_jax.training import reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def read_tensorboard_scalars(logdir: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) for every scalar in the TFRecord-framed event files under `logdir`."""
  scalars = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4  # length, its crc, the record, its crc.
      scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return scalars


def write_steps(workdir: str, steps: range, **kwargs) -> None:
  writer = reporting.MetricsWriter(workdir, **kwargs)
  for step in steps:
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()


def test_write_appends_one_json_object_per_call(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path))
  writer.write(1, {"train/loss": 2.5, "train/accuracy": 0.25})
  writer.write(2, {"eval/loss": 2.0})
  writer.close()
  assert read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "train/loss": 2.5, "train/accuracy": 0.25},
      {"step": 2, "eval/loss": 2.0},
  ]


def test_numpy_and_jax_scalars_serialise_as_floats(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path))
  writer.write(np.int64(3), {"a": np.float32(0.5), "b": jnp.asarray(1.5), "c": np.array(2)})
  writer.close()
  assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "a": 0.5, "b": 1.5, "c": 2.0}]


def test_tensorboard_event_file_holds_the_scalar(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path))
  writer.write(7, {"train/loss": 0.75})
  writer.close()
  assert read_tensorboard_scalars(tmp_path / "tensorboard") == [(7, "train/loss", 0.75)]


def test_plot_writes_a_png(tmp_path):
  writer = reporting.MetricsWriter(str(tmp_path))
  for step in range(1, 4):
    writer.write(step, {"train/loss": 1.0 / step, "train/accuracy": 0.3 * step})
  writer.write(3, {"eval/loss": 0.5, "eval/accuracy": 0.8, "eval/top5_accuracy": 0.95})
  path = writer.plot()
  writer.close()
  assert os.fspath(path) == str(tmp_path / "curves.png")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE


def test_resume_step_drops_later_records(tmp_path):
  write_steps(str(tmp_path), range(1, 6))
  write_steps(str(tmp_path), range(4, 6), resume_step=3)
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
  write_steps(str(tmp_path), range(1, 3))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "train/lo')
  with caplog.at_level("WARNING"):
    records = reporting.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2]
  assert "Skipping unreadable line 3" in caplog.text


def test_reopening_after_a_truncated_line_appends_on_a_fresh_line(tmp_path):
  write_steps(str(tmp_path), range(1, 3))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "train/lo')
  write_steps(str(tmp_path), range(3, 4))
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = reporting.MetricsWriter(str(workdir), enabled=False)
  writer.write(1, {"train/loss": 1.0})
  assert writer.plot() is None
  writer.close()
  assert not workdir.exists()


def test_progress_bar_starts_at_initial_step():
  with reporting.progress_bar(total_steps=10, initial_step=4, enabled=True) as bar:
    bar.set_postfix(images_per_sec=123.0)
    bar.update(1)
    assert (bar.n, bar.total) == (5, 10)


def test_disabled_progress_bar_is_silent(capsys):
  with reporting.progress_bar(total_steps=10, initial_step=4, enabled=False) as bar:
    bar.set_postfix(images_per_sec=123.0)
    bar.update(1)
  assert bar.disable
  assert capsys.readouterr().err == ""


def test_curves_show_a_one_point_series_and_equal_series_in_different_styles():
  records = [{"step": 1, "train/loss": 2.0, "train/accuracy": 0.5},
             {"step": 1, "eval/loss": 1.5, "eval/accuracy": 1.0, "eval/top5_accuracy": 1.0}]
  loss_panel, accuracy_panel = reporting.curves_figure(records).axes
  assert all(line.get_marker() not in (None, "None") for line in loss_panel.lines)
  styles = {(line.get_linestyle(), line.get_marker()) for line in accuracy_panel.lines}
  assert len(styles) == len(accuracy_panel.lines) == 3


def test_the_eval_summary_shows_top5_only_where_it_was_measured():
  assert reporting.eval_summary({"eval/loss": 0.5, "eval/accuracy": 0.9}) == (
      "loss 0.5000, accuracy 90.00%")
  assert reporting.eval_summary({"eval/loss": 0.5, "eval/accuracy": 0.9,
                                 "eval/top5_accuracy": 1.0}).endswith(", top-5 100.00%")
