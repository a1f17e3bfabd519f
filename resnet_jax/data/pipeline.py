"""Input data by dataset name: per-process shards, resumable train batches, masked eval.

Every dataset yields NumPy batches: `image` float32 [local_batch, H, W, C], normalised,
and int32 `label`; eval batches add `mask` (1.0 real, 0.0 padding). `local_batch` is the
global batch divided by the process count. "fake" is synthetic and needs no TensorFlow;
the tfds datasets are read by `tfds_pipeline`, imported only when one is asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator

import numpy as np

from resnet_jax.data import fake

SUPPORTED_DATASETS = ("digits", "cifar10", "cifar100", "imagenet2012", "fake")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a dataset."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # preprocessed eval images at the default image_size.
  num_train_examples: int
  num_eval_examples: int


def _check_name(name: str) -> None:
  if name not in SUPPORTED_DATASETS:
    close = difflib.get_close_matches(name, SUPPORTED_DATASETS)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}.{hint} "
                     f"Supported datasets: {', '.join(SUPPORTED_DATASETS)}.")


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Class count, image shape and split sizes of `name` (prepares digits on first use)."""
  _check_name(name)
  if name == "fake":
    return DatasetInfo(name, fake.NUM_CLASSES, fake.IMAGE_SHAPE, fake.NUM_TRAIN_EXAMPLES,
                       fake.NUM_EVAL_EXAMPLES)
  from resnet_jax.data import tfds_pipeline
  return DatasetInfo(name, *tfds_pipeline.dataset_facts(name, data_dir))


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Full global batches per epoch; the remainder of each epoch is dropped."""
  return info.num_train_examples // global_batch_size


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}); pass jax.process_index() and jax.process_count().")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}, so every process gets an equal share; "
                     f"choose a batch size divisible by {process_count}.")
  return global_batch_size // process_count


def train_batches(name: str, *, global_batch_size: int, image_size: int, seed: int,
                  start_batch: int = 0, augment: bool = True, data_dir: str | None = None,
                  process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Endless batches of this process's shard: `image` [local_batch, H, W, C], `label`.

  `start_batch=k` yields exactly batches k, k+1, ... of the stream that starts at 0.
  """
  if seed < 0 or start_batch < 0:
    raise ValueError(f"seed={seed} and start_batch={start_batch} must both be >= 0.")
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  info = get_dataset_info(name, data_dir)
  batches_per_epoch = steps_per_epoch(info, global_batch_size)
  if batches_per_epoch == 0:
    raise ValueError(f"global_batch_size={global_batch_size} exceeds the "
                     f"{info.num_train_examples} training examples of {name!r}; "
                     "use a smaller batch size.")
  image_size = image_size or info.image_shape[0]
  if name == "fake":
    return fake.train_batches(local_batch=local_batch, image_size=image_size, seed=seed,
                              start_batch=start_batch, process_index=process_index)
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.train_batches(
      name, local_batch=local_batch, batches_per_epoch=batches_per_epoch,
      image_size=image_size, seed=seed, start_batch=start_batch, augment=augment,
      data_dir=data_dir, process_index=process_index, process_count=process_count)


def _eval_shard_sizes(name: str, data_dir: str | None, process_count: int) -> list[int]:
  if name == "fake":
    return [len(s) for s in np.array_split(np.arange(fake.NUM_EVAL_EXAMPLES), process_count)]
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.eval_shard_sizes(name, data_dir, process_count)


def num_eval_batches(name: str, *, global_batch_size: int, data_dir: str | None = None,
                     process_count: int = 1) -> int:
  """How many batches `eval_batches` yields, the same on every process."""
  _check_name(name)
  local_batch = _local_batch_size(global_batch_size, 0, process_count)
  return -(-max(_eval_shard_sizes(name, data_dir, process_count)) // local_batch)


def eval_batches(name: str, *, global_batch_size: int, image_size: int,
                 data_dir: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """One fixed-order pass over this process's eval shard, padded to full batches.

  Batches also carry `mask` (1.0 real, 0.0 padding). Every process yields
  `num_eval_batches(...)` batches, so collectives across processes stay in step.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  num_batches = num_eval_batches(name, global_batch_size=global_batch_size,
                                 data_dir=data_dir, process_count=process_count)
  shard_size = _eval_shard_sizes(name, data_dir, process_count)[process_index]
  if name == "fake":
    return fake.eval_batches(local_batch=local_batch,
                             image_size=image_size or fake.IMAGE_SHAPE[0],
                             num_batches=num_batches, num_examples=shard_size)
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.eval_batches(
      name, local_batch=local_batch, num_batches=num_batches, shard_size=shard_size,
      image_size=image_size, data_dir=data_dir, process_index=process_index,
      process_count=process_count)
