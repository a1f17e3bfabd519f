"""Prepared tfds datasets (registered ones, digits, image folders) as exact input streams.

Every process reads only its own contiguous range of each split's records. Training
reads that range as chunks of at most CHUNK_SIZE consecutive records. Epoch e permutes
the chunks, groups consecutive ones until a group holds `shuffle_buffer` records (by
default all of them, up to AUTO_SHUFFLE_BYTES of encoded records), and shuffles each
group's records with a stateless shuffle; every seed derives from (seed, e,
process_index). Each example's augmentation is seeded by its position in the epoch. So
train batch k is a pure function of the dataset, the config and k, and resuming at batch
k reads one group (fewer than shuffle_buffer + CHUNK_SIZE records), wherever k falls in
the epoch. Images stay encoded until after that skip.

This module, preprocessing.py, digits.py and image_folder.py are the ones that need
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import os
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.data import digits, image_folder, preprocessing
from resnet_jax.data.dataset_info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo
from resnet_jax.data.pipeline import process_range

Batch = dict[str, np.ndarray]
CHUNK_SIZE = 1024  # records; the unit of the epoch's permutation
AUTO_SHUFFLE_BYTES = 1 << 30  # shuffle_buffer=0: shuffle groups of up to 1 GiB of records
EVAL_SPLITS = ("validation", "val", "test", image_folder.HOLDOUT_SPLIT)
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class _Known:
  """What we add to tfds' own metadata for a dataset we know by name."""
  tfds_name: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  preprocessing: str
  how_to_prepare: str  # "" for digits: prepared automatically on first use


_BUILD = "run `tfds build {tfds_name} --data_dir={data_dir}` (downloads it once)"
_KNOWN = {
    # Digits are not flip-invariant: augment by translation only. Mean/std of train pixels.
    "digits": _Known(digits.SklearnDigits.name, (0.3055,), (0.3759,), "translate", ""),
    "cifar10": _Known("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar",
                      _BUILD),
    "cifar100": _Known("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                       "cifar", _BUILD),
    "imagenet2012": _Known(
        "imagenet2012", IMAGENET_MEAN, IMAGENET_STD, "imagenet",
        "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
        "https://image-net.org (after registering) into {data_dir}/downloads/manual/, then run "
        "`tfds build imagenet2012 --data_dir={data_dir}`"),
}


def _hide_accelerators_from_tf() -> None:
  """JAX owns the accelerators; TF only runs the input pipeline, on CPU."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices; too late to change them.
    pass


_hide_accelerators_from_tf()


def _unknown_name_error(name: str) -> ValueError:
  candidates = sorted(set(_KNOWN) | set(tfds.list_builders(with_community_datasets=False)))
  close = difflib.get_close_matches(name, candidates)
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  return ValueError(
      f"Unknown dataset {name!r}.{hint} Use 'digits', 'fake', 'folder:PATH' (your own image "
      "folder) or the name of a tfds image-classification dataset (`tfds.list_builders()`).")


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The tfds builder of a registered dataset, prepared; never downloads anything."""
  known = _KNOWN.get(name)
  tfds_name = known.tfds_name if known else name
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):  # unknown or ill-formed
    raise _unknown_name_error(name) from None
  if builder.is_prepared():
    return builder
  if known and not known.how_to_prepare:
    builder.download_and_prepare()
    return builder
  root = builder.data_path.parents[2 if builder.builder_config else 1]  # name[/config]/version
  how = (known.how_to_prepare if known else _BUILD).format(tfds_name=tfds_name, data_dir=root)
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual and not known:
    how = (f"follow tfds' manual download instructions ({' '.join(manual.split())}), put the "
           f"files in {root}/downloads/manual/, then " + how)
  raise ValueError(
      f"Dataset {name!r} is not prepared: no tfds {tfds_name!r} found in data_dir {str(root)!r} "
      f"(looked in {str(builder.data_path)!r}). To prepare it, {how}, or point "
      "config.data_dir at a directory where it is prepared. Nothing is downloaded at "
      "training time.")


@functools.lru_cache(maxsize=16)
def _reader(builder_dir: str) -> tfds.core.DatasetBuilder:
  return tfds.builder_from_directory(builder_dir)


def _check_readable(name: str, builder: tfds.core.DatasetBuilder) -> None:
  features = builder.info.features
  found = sorted(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
  if not ("image" in found and "label" in found
          and isinstance(features["label"], tfds.features.ClassLabel)):
    raise ValueError(f"Dataset {name!r} is not image classification as resnet_jax reads it: "
                     f"it needs an 'image' feature and a 'label' ClassLabel; it has {found}.")
  file_format = builder.info.file_format
  if file_format is not None and str(getattr(file_format, "value", file_format)) != "tfrecord":
    raise ValueError(f"Dataset {name!r} is prepared as {file_format.value}, which this "
                     f"pipeline does not read; prepare it again with "
                     f"`tfds build {builder.name} --file_format=tfrecord`.")


def dataset_info(name: str, data_dir: str | None, holdout_fraction: float) -> DatasetInfo:
  """Resolves a tfds name or `folder:PATH`, preparing digits and folders as needed."""
  if name.startswith(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX):]
    if not path:
      raise ValueError(f"Dataset {name!r} names no folder: use folder:PATH, e.g. "
                       f"--config.dataset=folder:~/my_photos. {image_folder.LAYOUT}")
    builder_dir, _, facts = image_folder.prepared_builder_dir(path, data_dir, holdout_fraction)
    builder = _reader(builder_dir)
    native_size = facts["native_image_size"]
    if native_size > preprocessing.SMALL_IMAGE_MAX_SIZE:
      native_size = 224
    known = None
    eval_split = facts["eval_split"]
  else:
    builder = _prepared_builder(name, data_dir)
    builder_dir = str(builder.data_path)
    known = _KNOWN.get(name)
    _check_readable(name, builder)
    height, width = builder.info.features["image"].shape[:2]
    native_size = min(height, width) if height and width else 224
    eval_split = next((s for s in EVAL_SPLITS if s in builder.info.splits), None)
    if eval_split is None or "train" not in builder.info.splits:
      raise ValueError(f"Dataset {name!r} needs a 'train' split and one of {EVAL_SPLITS}; it "
                       f"has {sorted(builder.info.splits.keys())}.")
  channels = builder.info.features["image"].shape[2] or 3
  splits = builder.info.splits
  return DatasetInfo(
      name=name, num_classes=builder.info.features["label"].num_classes,
      image_shape=(native_size, native_size, channels),
      num_train_examples=splits["train"].num_examples,
      num_eval_examples=splits[eval_split].num_examples,
      class_names=tuple(builder.info.features["label"].names),
      mean=known.mean if known else IMAGENET_MEAN,
      std=known.std if known else IMAGENET_STD,
      preprocessing=known.preprocessing if known else preprocessing.default_preset(native_size),
      builder_dir=builder_dir, train_split="train", eval_split=eval_split)


def metadata_info(name: str, data_dir: str | None) -> DatasetInfo:
  """Classes and image shape from tfds' registered metadata, for a dataset not prepared.

  Enough to plan a run (a dry run) without the data; the split sizes are unknown (0).
  """
  known = _KNOWN.get(name)
  try:
    builder = tfds.builder(known.tfds_name if known else name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):
    raise _unknown_name_error(name) from None
  _check_readable(name, builder)
  height, width, channels = builder.info.features["image"].shape
  native_size = min(height, width) if height and width else 224
  return DatasetInfo(
      name=name, num_classes=builder.info.features["label"].num_classes,
      image_shape=(native_size, native_size, channels or 3), num_train_examples=0,
      num_eval_examples=0, class_names=tuple(builder.info.features["label"].names),
      mean=known.mean if known else IMAGENET_MEAN, std=known.std if known else IMAGENET_STD,
      preprocessing=known.preprocessing if known else preprocessing.default_preset(native_size))


# Reading records: chunks of this process's range, groups, stateless shuffles.

@dataclasses.dataclass(frozen=True)
class _Chunks:
  """This process's records of a split as chunks, in range order: file, offset in it, count."""
  files: np.ndarray  # str
  offsets: np.ndarray  # int64
  counts: np.ndarray  # int64
  record_bytes: float  # mean size of a record in the split's files

  @property
  def num_records(self) -> int:
    return int(self.counts.sum())

  @property
  def starts(self) -> np.ndarray:
    """Each chunk's first record's index within this process's range."""
    return np.cumsum(self.counts) - self.counts

  def auto_shuffle_buffer(self) -> int:
    """All records if they fit in AUTO_SHUFFLE_BYTES, else as many as do (≥ one chunk)."""
    return max(CHUNK_SIZE, min(self.num_records, int(AUTO_SHUFFLE_BYTES / self.record_bytes)))


def _chunks(info: DatasetInfo, split: str, process_index: int, process_count: int) -> _Chunks:
  split_info = _reader(info.builder_dir).info.splits[split]
  begin, end = process_range(split_info.num_examples, process_index, process_count)
  rows, file_begin = [], 0
  for path, length in zip(split_info.filepaths, split_info.shard_lengths):
    lo, hi = max(begin, file_begin), min(end, file_begin + length)
    for offset in range(lo, hi, CHUNK_SIZE):
      rows.append((os.fspath(path), offset - file_begin, min(CHUNK_SIZE, hi - offset)))
    file_begin += length
  files, offsets, counts = zip(*rows) if rows else ((), (), ())
  return _Chunks(np.asarray(files, dtype=object), np.asarray(offsets, np.int64),
                 np.asarray(counts, np.int64),
                 record_bytes=split_info.num_bytes / max(split_info.num_examples, 1))


def _traced(fn: Callable) -> Callable:
  """`fn` for tf.data's map, traced as written: these functions branch only on Python
  values (and use tf.cond otherwise), so AutoGraph's source rewrite (~1 s per start) is
  skipped."""
  return tf.autograph.experimental.do_not_convert(fn)


@_traced
def _read_file_span(file: tf.Tensor, offset: tf.Tensor, count: tf.Tensor) -> tf.data.Dataset:
  return tf.data.TFRecordDataset(file).skip(offset).take(count)


def _file_spans(files: np.ndarray, offsets: np.ndarray, counts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Merges chunks that follow each other in a file into one span, to read it in one pass.

  TFRecord files cannot seek by record: a span starting at record k skips k headers
  first (for small records that reads through the bytes). Chunks of a whole-epoch group
  merge into one span per file; the scattered chunks of a smaller group stay apart, so
  nothing between them is held in memory. Returns the spans (files, offsets, counts), in
  the files' first-appearance order, and for each chunk where its first record lands in
  the concatenated spans.
  """
  file_rank = {file: rank for rank, file in reversed(list(enumerate(files)))}
  order = sorted(range(len(files)), key=lambda i: (file_rank[files[i]], offsets[i]))
  spans: list[list] = []
  lands_at, position = np.zeros(len(files), np.int64), 0
  for i in order:
    if spans and spans[-1][0] == files[i] and spans[-1][1] + spans[-1][2] == offsets[i]:
      spans[-1][2] += counts[i]
    else:
      spans.append([files[i], offsets[i], counts[i]])
    lands_at[i] = position
    position += counts[i]
  return (np.asarray([f for f, _, _ in spans], dtype=str).reshape(-1),
          np.asarray([o for _, o, _ in spans], np.int64),
          np.asarray([c for _, _, c in spans], np.int64), lands_at)


def _read_spans(files: tf.Tensor, offsets: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
  """The records of the spans, concatenated: a string tensor [sum(counts)]."""
  ds = tf.data.Dataset.from_tensor_slices((files, offsets, counts)).flat_map(_read_file_span)
  return ds.batch(tf.maximum(tf.reduce_sum(counts), 1)).get_single_element()


@functools.lru_cache(maxsize=2)  # a train and an eval split: read once per process
def _records_in_memory(info: DatasetInfo, split: str, process_index: int,
                       process_count: int) -> tf.Tensor:
  """Every record of this process's range of `split`, in order: a string tensor."""
  chunks = _chunks(info, split, process_index, process_count)
  files, offsets, counts, _ = _file_spans(chunks.files, chunks.offsets, chunks.counts)
  return _read_spans(files, offsets, counts)


def _record_indices(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
  return np.concatenate([np.arange(f, f + c) for f, c in zip(first, counts)])


def _group_plan(chunks: _Chunks, indices: np.ndarray, cache: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """What a group reads: file spans (none from memory), and the indices of its records, in
  chunk order, among the records read (or among the records in memory)."""
  if cache:
    return (np.zeros([0], str), np.zeros([0], np.int64), np.zeros([0], np.int64),
            _record_indices(chunks.starts[indices], chunks.counts[indices]))
  files, offsets, counts, lands_at = _file_spans(
      chunks.files[indices], chunks.offsets[indices], chunks.counts[indices])
  return files, offsets, counts, _record_indices(lands_at, chunks.counts[indices])


@dataclasses.dataclass(frozen=True)
class _Group:
  """Part of an epoch: shuffle these chunks' records, emit [begin, end) of the result."""
  chunk_indices: np.ndarray
  shuffle_seed: np.ndarray  # int64 [2]
  begin: int
  end: int
  first_position: int  # the position in the epoch of record `begin`
  augment_seed: int


def epoch_groups(counts: np.ndarray, *, epoch: int, seed: int, process_index: int,
                 shuffle_buffer: int, epoch_examples: int, start_position: int
                 ) -> Iterator[_Group]:
  """The groups of one epoch from `start_position` on; earlier groups are never read."""
  rng = np.random.default_rng([seed, epoch, process_index])
  order = rng.permutation(len(counts))
  augment_seed = int(rng.integers(2**62))
  groups, group, group_size = [], [], 0
  for index in order:
    group.append(index)
    group_size += counts[index]
    if group_size >= shuffle_buffer:
      groups.append(np.asarray(group))
      group, group_size = [], 0
  if group:
    groups.append(np.asarray(group))
  seeds = rng.integers(2**62, size=(len(groups), 2))
  position = 0
  for chunk_indices, shuffle_seed in zip(groups, seeds):
    size = min(int(counts[chunk_indices].sum()), epoch_examples - position)
    if size <= 0:
      return
    if position + size > start_position:
      begin = max(0, start_position - position)
      yield _Group(chunk_indices, shuffle_seed, begin, size, position + begin, augment_seed)
    position += size


def _example_parser(features: tfds.features.FeaturesDict
                    ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """serialized record → {"image": still encoded, "label": int32}."""
  def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    example = features.deserialize_example(
        serialized, decoders={"image": tfds.decode.SkipDecoding()})
    return {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
  return parse


def _options(num_threads: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
  return options


def train_batches(info: DatasetInfo, *, local_batch: int, batches_per_epoch: int,
                  image_size: int, seed: int, start_batch: int, augment: bool,
                  preprocessing_name: str, process_index: int, process_count: int,
                  shuffle_buffer: int, cache: bool, num_threads: int) -> Iterator[Batch]:
  """Endless uint8 batches of this process's shard, from batch `start_batch` on."""
  chunks = _chunks(info, info.train_split, process_index, process_count)
  epoch_examples = batches_per_epoch * local_batch
  if chunks.num_records < epoch_examples:
    raise ValueError(f"Process {process_index} has {chunks.num_records} training records, "
                     f"fewer than the {epoch_examples} of an epoch; use a smaller batch size.")
  first_epoch, first_batch = divmod(start_batch, batches_per_epoch)
  records_in_memory = (_records_in_memory(info, info.train_split, process_index, process_count)
                       if cache else None)
  parse = _example_parser(_reader(info.builder_dir).info.features)
  preset = preprocessing.PRESETS[preprocessing_name]
  channels = info.image_shape[2]

  def groups() -> Iterator[tuple]:
    for epoch in itertools.count(first_epoch):
      for g in epoch_groups(chunks.counts, epoch=epoch, seed=seed, process_index=process_index,
                            shuffle_buffer=shuffle_buffer or chunks.auto_shuffle_buffer(),
                            epoch_examples=epoch_examples,
                            start_position=first_batch * local_batch * (epoch == first_epoch)):
        yield (*_group_plan(chunks, g.chunk_indices, cache), g.shuffle_seed, g.begin, g.end,
               g.first_position, g.augment_seed)

  def load(files, offsets, counts, take, shuffle_seed, begin, end, first_position,
           augment_seed):
    read = records_in_memory if cache else _read_spans(files, offsets, counts)
    records = tf.random.experimental.stateless_shuffle(tf.gather(read, take), shuffle_seed)
    positions = tf.range(first_position, first_position + end - begin)
    return (records[begin:end], positions,
            tf.fill(tf.shape(positions), augment_seed))

  def preprocess(serialized, position, augment_seed) -> dict[str, tf.Tensor]:
    example = parse(serialized)
    if augment:
      image = preset.train(example["image"], image_size, tf.stack([augment_seed, position]),
                           channels=channels)
    else:
      image = preset.eval(example["image"], image_size, channels=channels)
    return {"image": tf.ensure_shape(image, [image_size, image_size, channels]),
            "label": example["label"]}

  scalar = tf.TensorSpec([], tf.int64)
  vector = tf.TensorSpec([None], tf.int64)
  ds = tf.data.Dataset.from_generator(groups, output_signature=(
      tf.TensorSpec([None], tf.string), vector, vector, vector, tf.TensorSpec([2], tf.int64),
      scalar, scalar, scalar, scalar))
  # The next group loads (read + shuffle) while this one is consumed: no stall between.
  ds = ds.map(_traced(load)).prefetch(1).unbatch()
  ds = ds.map(_traced(preprocess), num_parallel_calls=num_threads or tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(num_threads)).as_numpy_iterator()


def eval_batches(info: DatasetInfo, *, local_batch: int, num_batches: int, image_size: int,
                 preprocessing_name: str, process_index: int, process_count: int,
                 cache: bool, num_threads: int) -> Iterator[Batch]:
  """One fixed-order pass over this process's eval range, padded to `num_batches` batches."""
  chunks = _chunks(info, info.eval_split, process_index, process_count)
  parse = _example_parser(_reader(info.builder_dir).info.features)
  preset = preprocessing.PRESETS[preprocessing_name]
  channels = info.image_shape[2]
  if cache:
    ds = tf.data.Dataset.from_tensor_slices(
        _records_in_memory(info, info.eval_split, process_index, process_count))
  else:
    files, offsets, counts, _ = _file_spans(chunks.files, chunks.offsets, chunks.counts)
    ds = tf.data.Dataset.from_tensor_slices((files, offsets, counts)).flat_map(_read_file_span)

  def preprocess(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    example = parse(serialized)
    image = preset.eval(example["image"], image_size, channels=channels)
    return {"image": tf.ensure_shape(image, [image_size, image_size, channels]),
            "label": example["label"], "mask": tf.constant(1.0)}

  ds = ds.map(_traced(preprocess), num_parallel_calls=num_threads or tf.data.AUTOTUNE,
              deterministic=True)
  padding_example = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  num_padding = num_batches * local_batch - chunks.num_records
  padding = tf.data.Dataset.from_tensors(padding_example).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads)).as_numpy_iterator()
