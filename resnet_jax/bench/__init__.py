"""Benchmarks of the real train step: `bench.throughput` and `bench.compile_time`.

Both build their experiment with `training.loop.setup`, the path train.py takes, on the
synthetic "fake" dataset, so they need no data on disk. What they share lives here.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import ml_collections

from resnet_jax.training.config import base_config


def benchmark_config(model: str, *, batch_size: int, image_size: int, dtype: str,
                     parallelism: str = "jit", num_train_steps: int = 1
                     ) -> ml_collections.ConfigDict:
  """`base_config()` for a run of `num_train_steps` on "fake" data at a constant learning rate."""
  config = base_config()
  config.model = model
  config.dataset = "fake"
  config.batch_size = batch_size
  config.image_size = image_size
  config.dtype = dtype
  config.parallelism = parallelism
  config.num_train_steps = num_train_steps
  config.schedule = "constant"
  config.progress_bar = False
  return config


def write_json(path: str, record: Any) -> None:
  """Writes `record` (dicts, lists, numbers, strings) to `path` as indented JSON."""
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  """Writes `rows` (dicts with the same keys, in order) to `path` as CSV with a header."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
