"""Input data by dataset name: per-process shards, resumable train batches, masked eval.

Every dataset yields NumPy batches: `image` uint8 [local_batch, H, W, C] and int32
`label`; eval batches add `mask` (1.0 real, 0.0 padding). Images are normalised on the
device (`data.device_ops`) with the dataset's `mean` and `std`. `local_batch` is the
global batch divided by the process count. "fake" is synthetic and needs no TensorFlow;
everything else ("digits", "folder:PATH", tfds names) is read by `tfds_pipeline`, imported
only when one is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from resnet_jax.data import fake
from resnet_jax.data.dataset_info import DatasetInfo

PRESETS = ("auto", "cifar", "translate", "imagenet")  # train/eval preprocessing by name

Batch = dict[str, np.ndarray]


def get_dataset_info(name: str, data_dir: str | None = None,
                     holdout_fraction: float = 0.1) -> DatasetInfo:
  """Resolves a dataset name: "fake", "digits", "folder:PATH" or a prepared tfds dataset.

  Prepares digits and image folders on first use (folders again whenever they change);
  a missing tfds dataset raises ValueError saying how to prepare it. Nothing is downloaded.
  """
  if name == "fake":
    return fake.INFO
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.dataset_info(name, data_dir, holdout_fraction)


def _resolve(dataset: str | DatasetInfo, data_dir: str | None) -> DatasetInfo:
  return dataset if isinstance(dataset, DatasetInfo) else get_dataset_info(dataset, data_dir)


def resolve_preprocessing(info: DatasetInfo, preprocessing: str) -> str:
  """The preset `preprocessing` names for this dataset ("auto": the dataset's own)."""
  if preprocessing not in PRESETS:
    raise ValueError(f"preprocessing={preprocessing!r}: must be one of {', '.join(PRESETS)}")
  return info.preprocessing if preprocessing == "auto" else preprocessing


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


def train_batches(dataset: str | DatasetInfo, *, global_batch_size: int, image_size: int,
                  seed: int, start_batch: int = 0, augment: bool = True,
                  data_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                  preprocessing: str = "auto", shuffle_buffer: int = 0, cache: bool = False,
                  num_threads: int = 0) -> Iterator[Batch]:
  """Endless batches of this process's shard: `image` [local_batch, H, W, C], `label`.

  `start_batch=k` yields exactly batches k, k+1, ... of the stream that starts at 0.
  `shuffle_buffer` bounds how many records are shuffled together (0: this process's
  whole epoch if its encoded records fit in 1 GiB, else as many as do);
  `cache` keeps this process's encoded records in memory; `num_threads` (0: tf.data's
  autotuning) sizes the decoding thread pool. None of the three changes the batches
  except `shuffle_buffer`.
  """
  if seed < 0 or start_batch < 0:
    raise ValueError(f"seed={seed} and start_batch={start_batch} must both be >= 0.")
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  info = _resolve(dataset, data_dir)
  batches_per_epoch = steps_per_epoch(info, global_batch_size)
  if batches_per_epoch == 0:
    raise ValueError(f"global_batch_size={global_batch_size} exceeds the "
                     f"{info.num_train_examples} training examples of {info.name!r}; "
                     "use a smaller batch size.")
  image_size = image_size or info.image_shape[0]
  if info.name == "fake":
    return fake.train_batches(local_batch=local_batch, image_size=image_size, seed=seed,
                              start_batch=start_batch, process_index=process_index)
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.train_batches(
      info, local_batch=local_batch, batches_per_epoch=batches_per_epoch,
      image_size=image_size, seed=seed, start_batch=start_batch, augment=augment,
      preprocessing_name=resolve_preprocessing(info, preprocessing), process_index=process_index,
      process_count=process_count, shuffle_buffer=shuffle_buffer, cache=cache,
      num_threads=num_threads)


def process_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The [begin, end) record range of a split that `process_index` reads: disjoint, covering."""
  return (process_index * num_records // process_count,
          (process_index + 1) * num_records // process_count)


def _eval_shard_sizes(info: DatasetInfo, process_count: int) -> list[int]:
  return [end - begin for begin, end in (process_range(info.num_eval_examples, i, process_count)
                                         for i in range(process_count))]


def num_eval_batches(dataset: str | DatasetInfo, *, global_batch_size: int,
                     data_dir: str | None = None, process_count: int = 1) -> int:
  """How many batches `eval_batches` yields, the same on every process."""
  info = _resolve(dataset, data_dir)
  local_batch = _local_batch_size(global_batch_size, 0, process_count)
  return -(-max(_eval_shard_sizes(info, process_count)) // local_batch)


def eval_batches(dataset: str | DatasetInfo, *, global_batch_size: int, image_size: int,
                 data_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                 preprocessing: str = "auto", cache: bool = False,
                 num_threads: int = 0) -> Iterator[Batch]:
  """One fixed-order pass over this process's eval shard, padded to full batches.

  Batches also carry `mask` (1.0 real, 0.0 padding). Every process yields
  `num_eval_batches(...)` batches, so collectives across processes stay in step.
  """
  info = _resolve(dataset, data_dir)
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  num_batches = num_eval_batches(info, global_batch_size=global_batch_size,
                                 process_count=process_count)
  image_size = image_size or info.image_shape[0]
  if info.name == "fake":
    return fake.eval_batches(local_batch=local_batch, image_size=image_size,
                             num_batches=num_batches,
                             num_examples=_eval_shard_sizes(info, process_count)[process_index])
  from resnet_jax.data import tfds_pipeline
  return tfds_pipeline.eval_batches(
      info, local_batch=local_batch, num_batches=num_batches, image_size=image_size,
      preprocessing_name=resolve_preprocessing(info, preprocessing), process_index=process_index,
      process_count=process_count, cache=cache, num_threads=num_threads)
