"""Specification of the input pipelines, on the bundled digits dataset and fake data."""

import collections
import io
import itertools
import re

import chex
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import data
from resnet_jax.data import device_ops, digits, preprocessing
from batch_hashes import example_hashes


@pytest.fixture
def data_dir(digits_data_dir: str) -> str:
  return digits_data_dir


def take(iterator, start: int, stop: int) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(iterator, start, stop))


def whole_train_split(data_dir: str) -> collections.Counter:
  total = digits.NUM_TRAIN_EXAMPLES
  batch = next(data.train_batches("digits", global_batch_size=total, image_size=0, seed=0,
                                  augment=False, data_dir=data_dir))
  return example_hashes([batch])


def test_digits_builder_prepares_fixed_split_of_8x8_grey_images(data_dir):
  builder = tfds.builder("sklearn_digits", data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  assert builder.info.features["label"].num_classes == 10
  example = next(iter(builder.as_dataset(split="test").take(1)))
  chex.assert_shape(example["image"].numpy(), (8, 8, 1))
  chex.assert_type(example["image"].numpy(), np.uint8)


def test_dataset_info_of_digits(data_dir):
  info = data.get_dataset_info("digits", data_dir)
  assert (info.name, info.num_classes, info.image_shape, info.num_train_examples,
          info.num_eval_examples) == ("digits", 10, (8, 8, 1), 1437, 360)
  assert info.class_names == tuple("0123456789")
  assert info.preprocessing == "translate"  # digits are not flip-invariant


def test_steps_per_epoch_drops_the_remainder(data_dir):
  assert data.steps_per_epoch(data.get_dataset_info("digits", data_dir), 128) == 11


def test_train_batches_have_local_batch_shapes_and_dtypes(data_dir):
  batch = next(data.train_batches("digits", global_batch_size=32, image_size=0, seed=0,
                                  data_dir=data_dir, process_index=1, process_count=2))
  chex.assert_shape(batch["image"], (16, 8, 8, 1))
  chex.assert_shape(batch["label"], (16,))
  chex.assert_type([batch["image"], batch["label"]], [np.uint8, np.int32])


def test_image_size_resizes_digits(data_dir):
  batch = next(data.train_batches("digits", global_batch_size=4, image_size=16, seed=0,
                                  data_dir=data_dir))
  chex.assert_shape(batch["image"], (4, 16, 16, 1))


def test_dataset_mean_and_std_normalise_train_images_on_device(data_dir):
  info = data.get_dataset_info("digits", data_dir)
  batch = next(data.train_batches(info, global_batch_size=1437, image_size=0, seed=0,
                                  augment=False))
  images = device_ops.normalize(batch["image"], info.mean, info.std)
  np.testing.assert_allclose(images.mean(), 0.0, atol=1e-3)
  np.testing.assert_allclose(images.std(), 1.0, atol=1e-3)


def test_resume_at_start_batch_equals_uninterrupted_stream_across_epochs(data_dir):
  kwargs = dict(global_batch_size=128, image_size=0, seed=3, data_dir=data_dir)
  uninterrupted = take(data.train_batches("digits", **kwargs), 9, 15)
  resumed = take(data.train_batches("digits", start_batch=9, **kwargs), 0, 6)
  chex.assert_trees_all_equal(resumed, uninterrupted)


def test_different_seeds_give_different_orders(data_dir):
  labels = [
      next(data.train_batches("digits", global_batch_size=64, image_size=0, seed=seed,
                              augment=False, data_dir=data_dir))["label"]
      for seed in (0, 1)
  ]
  assert not np.array_equal(*labels)


def test_every_epoch_is_reshuffled(data_dir):
  stream = data.train_batches("digits", global_batch_size=128, image_size=0, seed=0,
                              augment=False, data_dir=data_dir)
  batches = take(stream, 0, 12)
  assert not np.array_equal(batches[0]["label"], batches[11]["label"])


def test_augmentation_changes_images_but_not_the_order(data_dir):
  kwargs = dict(global_batch_size=64, image_size=0, seed=0, data_dir=data_dir)
  plain = next(data.train_batches("digits", augment=False, **kwargs))
  augmented = next(data.train_batches("digits", augment=True, **kwargs))
  np.testing.assert_array_equal(plain["label"], augmented["label"])
  assert not np.array_equal(plain["image"], augmented["image"])


def test_train_shards_of_two_processes_are_disjoint_parts_of_the_split(data_dir):
  epoch = data.steps_per_epoch(data.get_dataset_info("digits", data_dir), 128)
  shards = [
      example_hashes(take(data.train_batches(
          "digits", global_batch_size=128, image_size=0, seed=0, augment=False,
          data_dir=data_dir, process_index=index, process_count=2), 0, epoch))
      for index in (0, 1)
  ]
  assert not shards[0] & shards[1]
  assert not (shards[0] + shards[1]) - whole_train_split(data_dir)


def test_eval_pads_the_ragged_last_batch_with_masked_rows(data_dir):
  batches = list(data.eval_batches("digits", global_batch_size=64, image_size=0,
                                   data_dir=data_dir))
  assert len(batches) == 6 == data.num_eval_batches("digits", global_batch_size=64,
                                                    data_dir=data_dir)
  for batch in batches:
    chex.assert_shape([batch["image"], batch["label"], batch["mask"]],
                      [(64, 8, 8, 1), (64,), (64,)])
    chex.assert_type(batch["mask"], np.float32)
  np.testing.assert_array_equal(batches[-1]["mask"], [1.0] * 40 + [0.0] * 24)
  assert sum(batch["mask"].sum() for batch in batches) == 360


def test_eval_shards_of_two_processes_count_each_example_once(data_dir):
  single = list(data.eval_batches("digits", global_batch_size=64, image_size=0,
                                  data_dir=data_dir))
  shards = [
      list(data.eval_batches("digits", global_batch_size=64, image_size=0, data_dir=data_dir,
                             process_index=index, process_count=2))
      for index in (0, 1)
  ]
  assert len(shards[0]) == len(shards[1])
  assert example_hashes(shards[0]) + example_hashes(shards[1]) == example_hashes(single)


def test_eval_yields_the_same_number_of_batches_on_processes_with_uneven_shards(data_dir):
  # 360 examples over 7 processes: shards of 52 and 51, local batch 51.
  shards = [
      list(data.eval_batches("digits", global_batch_size=357, image_size=0, data_dir=data_dir,
                             process_index=index, process_count=7))
      for index in range(7)
  ]
  assert {len(batches) for batches in shards} == {2}
  assert sum(batch["mask"].sum() for batches in shards for batch in batches) == 360
  assert any(batches[-1]["mask"].sum() == 0 for batches in shards)


def test_unknown_dataset_name_suggests_close_match():
  with pytest.raises(ValueError, match="Did you mean 'digits'"):
    data.get_dataset_info("digit")
  with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
    data.get_dataset_info("cifar-10")


def test_unprepared_cifar10_raises_with_build_command_and_no_download(tmp_path, monkeypatch):

  def fail_download(*args, **kwargs):
    raise AssertionError("the pipeline must never download")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail_download)
  with pytest.raises(ValueError, match=re.escape(f"tfds build cifar10 --data_dir={tmp_path}")):
    data.train_batches("cifar10", global_batch_size=8, image_size=0, seed=0,
                       data_dir=str(tmp_path))


def test_global_batch_not_divisible_by_process_count_raises(data_dir):
  with pytest.raises(ValueError, match="global_batch_size=100"):
    data.train_batches("digits", global_batch_size=100, image_size=0, seed=0,
                       data_dir=data_dir, process_count=3)


def test_fake_batches_have_requested_shapes():
  train = next(data.train_batches("fake", global_batch_size=4, image_size=16, seed=0))
  chex.assert_shape([train["image"], train["label"]], [(4, 16, 16, 3), (4,)])
  chex.assert_type([train["image"], train["label"]], [np.uint8, np.int32])
  assert data.get_dataset_info("fake").num_classes == 1000


def test_fake_eval_masks_count_each_example_once():
  batches = list(data.eval_batches("fake", global_batch_size=4096, image_size=8,
                                   process_index=1, process_count=2))
  assert len(batches) == 3
  assert sum(batch["mask"].sum() for batch in batches) == 5000


def random_jpeg(height: int, width: int) -> tf.Tensor:
  pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels)


def test_imagenet_train_and_eval_views_have_image_size():
  encoded = random_jpeg(300, 400)
  seed = tf.constant([0, 1], tf.int64)
  for image in (preprocessing.inception_crop_train(encoded, 64, seed),
                preprocessing.center_crop_eval(encoded, 64)):
    chex.assert_shape(image.numpy(), (64, 64, 3))
    chex.assert_type(image.numpy(), np.uint8)


def test_augmentation_depends_only_on_the_example_seed():
  encoded = tf.io.encode_png(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))

  def cifar_view(seed: list[int]) -> np.ndarray:
    return preprocessing.small_image_train(encoded, 32, tf.constant(seed, tf.int64),
                                           channels=3, flip=True).numpy()

  np.testing.assert_array_equal(cifar_view([7, 3]), cifar_view([7, 3]))
  assert not np.array_equal(cifar_view([7, 3]), cifar_view([7, 4]))


def test_cifar_view_is_a_pad_4_crop_of_the_image_or_of_its_mirror():
  pixels = np.random.default_rng(1).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(pixels)
  padded = np.pad(pixels, [(4, 4), (4, 4), (0, 0)])
  windows = {(dy, dx, flipped): (padded[dy:dy + 32, dx:dx + 32, :][:, ::-1] if flipped
                                 else padded[dy:dy + 32, dx:dx + 32, :])
             for dy in range(9) for dx in range(9) for flipped in (False, True)}
  found = set()
  for i in range(24):
    view = preprocessing.small_image_train(encoded, 32, tf.constant([i, 0], tf.int64),
                                           channels=3, flip=True).numpy()
    chex.assert_shape(view, (32, 32, 3))
    matches = [key for key, window in windows.items() if np.array_equal(view, window)]
    assert len(matches) == 1, i
    found.add(matches[0])
  assert {flipped for _, _, flipped in found} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in found}) > 10


def test_translate_preset_never_flips():
  pixels = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))  # ramp in x
  encoded = tf.io.encode_png(pixels)
  for i in range(16):
    view = preprocessing.PRESETS["translate"].train(encoded, 32, tf.constant([i, 1], tf.int64),
                                                     channels=3).numpy()
    row = view[16].astype(int)[:, 0]
    inside = row[(row > 0)]
    assert np.all(np.diff(inside) > 0), i  # still increasing left to right


def test_inception_crop_covers_8_to_100_percent_and_upscales_small_images():
  # Pixel values encode their own column and row, so a view reveals the crop window.
  y, x = np.mgrid[0:200, 0:200]
  pixels = np.stack([x * 255 // 199, y * 255 // 199, np.zeros_like(x)], -1).astype(np.uint8)
  encoded = tf.io.encode_png(pixels)
  areas, flips = [], set()
  for i in range(40):
    view = preprocessing.inception_crop_train(encoded, 32, tf.constant([i, 2], tf.int64)
                                              ).numpy().astype(int)
    chex.assert_shape(view, (32, 32, 3))
    flips.add(view[16, 0, 0] > view[16, -1, 0])
    width = abs(view[16, -1, 0] - view[16, 0, 0]) * 200 / 255
    height = abs(view[-1, 16, 1] - view[0, 16, 1]) * 200 / 255
    areas.append(width * height / 200**2)
  assert flips == {False, True}
  assert 0.05 < min(areas) and max(areas) < 1.02 and max(areas) - min(areas) > 0.3
  small = preprocessing.inception_crop_train(tf.io.encode_jpeg(pixels[:20, :20]), 64,
                                             tf.constant([0, 0], tf.int64))
  chex.assert_shape(small.numpy(), (64, 64, 3))


def test_center_crop_eval_keeps_the_central_87_5_percent_of_the_short_side():
  y, x = np.mgrid[0:100, 0:200]
  pixels = np.stack([x * 255 // 199, y * 255 // 99, np.zeros_like(x)], -1).astype(np.uint8)
  view = preprocessing.center_crop_eval(tf.io.encode_png(pixels), 56).numpy().astype(int)
  chex.assert_shape(view, (56, 56, 3))
  # The window is 87.5 px square around the centre (100, 50): columns 56..144, rows 6..94.
  np.testing.assert_allclose(view[28, [0, -1], 0] * 199 / 255, [57, 143], atol=3)
  np.testing.assert_allclose(view[[0, -1], 28, 1] * 99 / 255, [7, 93], atol=3)
  tiny = preprocessing.center_crop_eval(tf.io.encode_png(pixels[:10, :10]), 56)
  chex.assert_shape(tiny.numpy(), (56, 56, 3))  # upscaled


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_colour_mode_decodes_to_rgb(mode):
  rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  image = Image.fromarray(rgb).convert(mode if mode != "I;16" else "L")
  if mode == "I;16":
    image = Image.fromarray(np.asarray(image, np.uint16) * 257)
  buffer = io.BytesIO()
  image.save(buffer, "JPEG" if mode == "CMYK" else "PNG")
  decoded = preprocessing.decode(tf.constant(buffer.getvalue()), 3).numpy()
  chex.assert_shape(decoded, (12, 10, 3))
  chex.assert_type(decoded, np.uint8)
  expected = np.asarray(image.convert("RGB")) if mode != "I;16" else np.repeat(
      np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, -1)
  tolerance = 8 if mode == "CMYK" else 1
  assert np.abs(decoded.astype(int) - expected).mean() < tolerance


def test_unprepared_imagenet_says_which_tar_files_to_put_where(tmp_path):
  with pytest.raises(ValueError) as error:
    data.get_dataset_info("imagenet2012", str(tmp_path))
  message = str(error.value)
  for needed in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                 f"{tmp_path}/downloads/manual/", f"tfds build imagenet2012 --data_dir={tmp_path}"):
    assert needed in message


def test_unprepared_unknown_tfds_dataset_says_how_to_build_it(tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"tfds build imagenette --data_dir={tmp_path}")):
    data.get_dataset_info("imagenette", str(tmp_path))
