"""Per-example image ops on encoded images: decode, augment, resize, normalise.

Every random op is a stateless TF op driven by an explicit `seed` (an int64 tensor of
shape [2]), so an example's augmentation depends only on that seed, never on how many
examples were processed before it. This is what makes the input position resumable.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize to image_size / 0.875, then centre crop.


def decode(encoded: tf.Tensor, shape: Sequence[int | None]) -> tf.Tensor:
  """Decodes a PNG or JPEG string to a uint8 image of `shape` ([H, W, C]; None: any size)."""
  image = tf.io.decode_image(encoded, channels=shape[2], expand_animations=False)
  image.set_shape(shape)
  return image


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bilinear resize to image_size x image_size; a no-op at that size already."""
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  return tf.image.resize(image, [image_size, image_size], method="bilinear")


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Maps 0..255 pixels to float32 (x / 255 - mean) / std per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def small_image_eval(encoded: tf.Tensor, image_size: int, *,
                     shape: tuple[int, int, int]) -> tf.Tensor:
  """Eval view of a small fixed-`shape` (digits, CIFAR) image: decode and resize."""
  return resize(decode(encoded, shape), image_size)


def small_image_train(encoded: tf.Tensor, image_size: int, seed: tf.Tensor, *,
                      shape: tuple[int, int, int], padding: int, flip: bool) -> tf.Tensor:
  """Random translation by up to `padding` pixels (zero pad, random crop), optional flip."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.pad(decode(encoded, shape), [[padding, padding], [padding, padding], [0, 0]])
  image = tf.image.stateless_random_crop(image, shape, crop_seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return resize(image, image_size)


def inception_crop_train(encoded: tf.Tensor, image_size: int, seed: tf.Tensor) -> tf.Tensor:
  """ImageNet training view: random-resized crop (8%-100% area, 3/4-4/3 aspect), flip."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(encoded),
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=crop_seed,
      area_range=(0.08, 1.0),
      aspect_ratio_range=(3 / 4, 4 / 3),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear")
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def center_crop_eval(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  """ImageNet eval view: resize the short side to image_size / 0.875, centre crop."""
  image = decode(encoded, (None, None, 3))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (image_size / EVAL_CROP_FRACTION) / tf.reduce_min(shape)
  resized_shape = tf.cast(tf.math.round(shape * scale), tf.int32)
  image = tf.image.resize(image, resized_shape, method="bilinear")
  offset = (resized_shape - image_size) // 2
  return tf.image.crop_to_bounding_box(image, offset[0], offset[1], image_size, image_size)
