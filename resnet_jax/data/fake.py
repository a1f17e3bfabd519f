"""Synthetic ImageNet-shaped batches for throughput benchmarks: no disk, no decoding.

A few batches are generated once (deterministically from the seed) and cycled, so memory
stays at a few batches whatever the nominal dataset size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from resnet_jax.data.dataset_info import DatasetInfo

NUM_CLASSES = 1000
IMAGE_SHAPE = (224, 224, 3)
NUM_TRAIN_EXAMPLES = 1_281_167  # ImageNet's, so steps per epoch match a real run.
NUM_EVAL_EXAMPLES = 10_000
NUM_DISTINCT_BATCHES = 2
EVAL_SEED = 0
INFO = DatasetInfo("fake", NUM_CLASSES, IMAGE_SHAPE, NUM_TRAIN_EXAMPLES, NUM_EVAL_EXAMPLES,
                   mean=(0.5, 0.5, 0.5), std=(0.29, 0.29, 0.29))  # uniform pixels


def _random_batches(rng: np.random.Generator, count: int, local_batch: int,
                    image_size: int) -> list[dict[str, np.ndarray]]:
  """`count` batches of uniform uint8 images and uniform labels."""
  image_shape = (local_batch, image_size, image_size, IMAGE_SHAPE[2])
  return [{
      "image": rng.integers(0, 256, image_shape, dtype=np.uint8),
      "label": rng.integers(0, NUM_CLASSES, local_batch, dtype=np.int32),
  } for _ in range(count)]


def train_batches(*, local_batch: int, image_size: int, seed: int, start_batch: int,
                  process_index: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches; batch k is the same whether or not the stream started at k."""
  rng = np.random.default_rng([seed, process_index])
  batches = _random_batches(rng, NUM_DISTINCT_BATCHES, local_batch, image_size)
  for step in itertools.count(start_batch):
    yield batches[step % NUM_DISTINCT_BATCHES]


def eval_batches(*, local_batch: int, image_size: int, num_batches: int,
                 num_examples: int) -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` batches whose masks mark exactly `num_examples` rows as real."""
  batch, = _random_batches(np.random.default_rng(EVAL_SEED), 1, local_batch, image_size)
  for index in range(num_batches):
    rows = index * local_batch + np.arange(local_batch)
    yield {**batch, "mask": (rows < num_examples).astype(np.float32)}
