"""Benchmarks: what they share (a benchmark config, JSON and CSV writers).

Train step: `throughput` (ours vs the plain layers and torchvision, `torch_reference`),
`compile_time` (scan_blocks and remat variants, XLA cost and memory analyses, the depth
sweep), `dry_run` (pod-scale compile for simulated devices, with `collectives` and
`step_time`) and `startup` (first vs second start of train.py); they build their experiment
with `training.loop.setup`, the path train.py takes, on the synthetic "fake" dataset.
Input: `input` and `photo_folder`. Storage: `checkpoint` (save, restore and async-save cost,
local disk and bucket). Experiments: `transfer` and `degradation`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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


def check_cifar_dir(parser: argparse.ArgumentParser, cifar_dir: str) -> None:
  """Exits with a usage error unless `cifar_dir` holds the CIFAR-10 folder's train/."""
  if not os.path.isdir(os.path.join(cifar_dir, "train")):
    parser.error(f"--cifar_dir={cifar_dir}: no train/ folder in it; unpack "
                 "cifar10-train-jpeg.tar.gz and pass the directory holding train/")


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
