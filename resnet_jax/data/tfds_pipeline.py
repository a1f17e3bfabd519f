"""tfds datasets (digits, CIFAR, ImageNet) as exactly resumable train and padded eval streams.

Train batch k is a pure function of (dataset, seed, global_batch_size, image_size, augment,
process_index, process_count). Epoch e reads the shard with a file order and shuffle
seeded by (seed, e, process_index), and each example's augmentation is seeded by its
position in that epoch, so `start_batch=k` starts at epoch k // steps_per_epoch directly
and skips only the first k % steps_per_epoch batches of it, still encoded.

This is the only module (with preprocessing.py and digits.py) that needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.data import digits, preprocessing

Batch = dict[str, np.ndarray]

@dataclasses.dataclass(frozen=True)
class _TfdsSource:
  """How one of our dataset names is read from tfds and turned into model inputs."""
  tfds_name: str
  train_split: str
  eval_split: str
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1].
  std: tuple[float, ...]
  shuffle_buffer: int
  train_image: Callable[[tf.Tensor, int, tf.Tensor], tf.Tensor]  # (encoded, size, seed).
  eval_image: Callable[[tf.Tensor, int], tf.Tensor]  # (encoded, size).
  how_to_prepare: str | None  # None: prepared automatically on first use.


def _cifar(name: str, mean: tuple[float, ...], std: tuple[float, ...]) -> _TfdsSource:
  shape = (32, 32, 3)
  return _TfdsSource(
      name, "train", "test", shape, mean, std, shuffle_buffer=50_000,
      train_image=functools.partial(preprocessing.small_image_train, shape=shape, padding=4,
                                    flip=True),
      eval_image=functools.partial(preprocessing.small_image_eval, shape=shape),
      how_to_prepare=f"run `tfds build {name} --data_dir={{data_dir}}` (downloads it once)")


_DIGITS_SHAPE = (8, 8, 1)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TFDS_SOURCES = {
    # Digits are not flip-invariant: augment by translation only. Mean/std of train pixels.
    "digits": _TfdsSource(
        digits.SklearnDigits.name, "train", "test", _DIGITS_SHAPE, (0.3055,), (0.3759,),
        shuffle_buffer=digits.NUM_TRAIN_EXAMPLES,
        train_image=functools.partial(preprocessing.small_image_train, shape=_DIGITS_SHAPE,
                                      padding=1, flip=False),
        eval_image=functools.partial(preprocessing.small_image_eval, shape=_DIGITS_SHAPE),
        how_to_prepare=None),
    "cifar10": _cifar("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _cifar("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": _TfdsSource(
        "imagenet2012", "train", "validation", (224, 224, 3), _IMAGENET_MEAN, _IMAGENET_STD,
        shuffle_buffer=16_384,
        train_image=preprocessing.inception_crop_train,
        eval_image=preprocessing.center_crop_eval,
        how_to_prepare="download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                       "https://image-net.org into {data_dir}/downloads/manual, then run "
                       "`tfds build imagenet2012 --data_dir={data_dir}`"),
}


def _hide_accelerators_from_tf() -> None:
  """JAX owns the accelerators; TF only runs the input pipeline, on CPU."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; too late to change them.
    pass


_hide_accelerators_from_tf()


def prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The tfds builder of `name`, prepared; never downloads anything."""
  source = _TFDS_SOURCES[name]
  builder = tfds.builder(source.tfds_name, data_dir=data_dir or None)
  if not builder.is_prepared():
    if source.how_to_prepare is not None:
      root = builder.data_path.parent.parent
      raise ValueError(
          f"Dataset {name!r} is not prepared: no tfds {source.tfds_name!r} found in data_dir "
          f"{str(root)!r} (looked in {str(builder.data_path)!r}). To prepare it, "
          f"{source.how_to_prepare.format(data_dir=root)}, or point data_dir at a directory "
          f"where it is prepared.")
    builder.download_and_prepare()
  return builder


def dataset_facts(name: str, data_dir: str | None) -> tuple[int, tuple[int, int, int], int, int]:
  """(num_classes, image_shape, num_train_examples, num_eval_examples) of a tfds dataset."""
  source = _TFDS_SOURCES[name]
  info = prepared_builder(name, data_dir).info
  return (info.features["label"].num_classes, source.image_shape,
          info.splits[source.train_split].num_examples,
          info.splits[source.eval_split].num_examples)


def _data_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _model_inputs(source: _TfdsSource, image: tf.Tensor, image_size: int,
                  label: tf.Tensor) -> dict[str, tf.Tensor]:
  image = preprocessing.normalize(image, source.mean, source.std)
  image = tf.ensure_shape(image, [image_size, image_size, source.image_shape[2]])
  return {"image": image, "label": tf.cast(label, tf.int32)}


def train_batches(name: str, *, local_batch: int, batches_per_epoch: int, image_size: int,
                  seed: int, start_batch: int, augment: bool, data_dir: str | None,
                  process_index: int, process_count: int) -> Iterator[Batch]:
  """Endless batches of this process's shard, from batch `start_batch` on."""
  source = _TFDS_SOURCES[name]
  shard = tfds.even_splits(source.train_split, n=process_count)[process_index]
  epoch = functools.partial(
      _train_epoch, prepared_builder(name, data_dir), source, shard,
      local_batch=local_batch, batches_per_epoch=batches_per_epoch,
      image_size=image_size or source.image_shape[0], augment=augment, seed=seed,
      process_index=process_index)
  first_epoch, first_batch = divmod(start_batch, batches_per_epoch)
  for index in itertools.count(first_epoch):
    skip_batches = first_batch if index == first_epoch else 0
    yield from epoch(index, skip_batches=skip_batches).as_numpy_iterator()


def _train_epoch(builder: tfds.core.DatasetBuilder, source: _TfdsSource, shard: str, epoch: int,
                 *, skip_batches: int, local_batch: int, batches_per_epoch: int,
                 image_size: int, augment: bool, seed: int,
                 process_index: int) -> tf.data.Dataset:
  """Batches `skip_batches`, ... of one epoch; its randomness is seeded by (seed, epoch)."""
  shuffle_seed, augment_seed = (
      int(s) for s in np.random.SeedSequence([seed, epoch, process_index]).generate_state(2))
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                options=_data_options())
  # Images stay encoded until after the skip, so skipped examples are never decoded.
  ds = builder.as_dataset(split=shard, shuffle_files=True, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.shuffle(source.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  ds = ds.take(batches_per_epoch * local_batch).enumerate().skip(skip_batches * local_batch)

  def preprocess(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    if augment:
      example_seed = tf.stack([tf.constant(augment_seed, tf.int64), position])
      image = source.train_image(example["image"], image_size, example_seed)
    else:
      image = source.eval_image(example["image"], image_size)
    return _model_inputs(source, image, image_size, example["label"])

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_data_options())


def eval_shard_sizes(name: str, data_dir: str | None, process_count: int) -> list[int]:
  """Examples in each process's eval shard."""
  splits = prepared_builder(name, data_dir).info.splits
  shards = tfds.even_splits(_TFDS_SOURCES[name].eval_split, n=process_count)
  return [splits[shard].num_examples for shard in shards]


def eval_batches(name: str, *, local_batch: int, num_batches: int, shard_size: int,
                 image_size: int, data_dir: str | None, process_index: int,
                 process_count: int) -> Iterator[Batch]:
  """One fixed-order pass over this process's eval shard, padded to `num_batches` batches."""
  source = _TFDS_SOURCES[name]
  image_size = image_size or source.image_shape[0]
  shard = tfds.even_splits(source.eval_split, n=process_count)[process_index]
  ds = prepared_builder(name, data_dir).as_dataset(
      split=shard, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(try_autocache=False, options=_data_options()))

  def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = source.eval_image(example["image"], image_size)
    return {**_model_inputs(source, image, image_size, example["label"]), "mask": tf.constant(1.0)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding_example = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  num_padding = num_batches * local_batch - shard_size
  padding = tf.data.Dataset.from_tensors(padding_example).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_data_options()).as_numpy_iterator()
