"""Per-example image ops on encoded images: decode, augment, resize, as named presets.

Every random op is a stateless TF op driven by an explicit `seed` (an int64 tensor of
shape [2]), so an example's augmentation depends only on that seed, never on how many
examples were processed before it. This is what makes the input position resumable.

Images leave as uint8 [image_size, image_size, channels]; they are normalised on the
device, in the compute dtype (`data.device_ops`), so a quarter of float32's bytes travel.
Any colour mode the decoders read (grey, palette, CMYK, RGBA, 16-bit) becomes `channels`
channels; images smaller than the crop are upscaled.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize to image_size / 0.875, then centre crop.
SMALL_IMAGE_MAX_SIZE = 64  # "auto": images up to this side get the CIFAR-style preset.


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """Decodes JPEG, PNG, GIF (first frame), BMP or WebP bytes to uint8 [H, W, channels]."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and saturates a resized (float) image back to uint8."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bilinear resize to image_size x image_size (uint8 in, uint8 out); a no-op at that size."""
  if image.shape[0] == image_size and image.shape[1] == image_size:
    return image
  return to_uint8(tf.image.resize(image, [image_size, image_size], method="bilinear"))


def _split_seed(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return crop_seed, flip_seed


def small_image_eval(encoded: tf.Tensor, image_size: int, *, channels: int) -> tf.Tensor:
  """Eval view of a small image (digits, CIFAR): decode, resize to image_size."""
  return resize(decode(encoded, channels), image_size)


def small_image_train(encoded: tf.Tensor, image_size: int, seed: tf.Tensor, *, channels: int,
                      flip: bool) -> tf.Tensor:
  """Resize to image_size, random translation by up to image_size/8 pixels, optional flip.

  The translation is a zero pad and a random crop: 4 pixels at 32 (CIFAR), 1 at 8 (digits).
  """
  crop_seed, flip_seed = _split_seed(seed)
  padding = max(1, image_size // 8)
  image = resize(decode(encoded, channels), image_size)
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  image = tf.image.stateless_random_crop(image, [image_size, image_size, channels], crop_seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image


def inception_crop_train(encoded: tf.Tensor, image_size: int, seed: tf.Tensor, *,
                         channels: int = 3) -> tf.Tensor:
  """ImageNet training view: random-resized crop (8%-100% area, 3/4-4/3 aspect), flip.

  JPEG bytes decode only the crop window (`decode_and_crop_jpeg`); other formats decode
  whole, then crop. Either way the crop is resized (up or down) to image_size.
  """
  crop_seed, flip_seed = _split_seed(seed)

  def crop_window(image_shape: tf.Tensor) -> tf.Tensor:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=crop_seed,
        area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  def jpeg_crop() -> tf.Tensor:
    window = crop_window(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

  def other_crop() -> tf.Tensor:
    image = decode(encoded, channels)
    window = crop_window(tf.shape(image))
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], channels])

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg_crop, other_crop)
  image = to_uint8(tf.image.resize(image, [image_size, image_size], method="bilinear"))
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def center_crop_eval(encoded: tf.Tensor, image_size: int, *, channels: int = 3) -> tf.Tensor:
  """ImageNet eval view: resize the short side to image_size / 0.875, centre crop."""
  image = decode(encoded, channels)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (image_size / EVAL_CROP_FRACTION) / tf.reduce_min(shape)
  resized_shape = tf.maximum(tf.cast(tf.math.round(shape * scale), tf.int32), image_size)
  image = tf.image.resize(image, resized_shape, method="bilinear")
  offset = (resized_shape - image_size) // 2
  return to_uint8(tf.image.crop_to_bounding_box(image, offset[0], offset[1], image_size,
                                                image_size))


@dataclasses.dataclass(frozen=True)
class Preset:
  """A train view (encoded, image_size, seed, *, channels) and an eval view (encoded,
  image_size, *, channels)."""
  train: Callable[..., tf.Tensor]
  eval: Callable[..., tf.Tensor]


PRESETS = {
    # resize, pad image_size/8, random crop, flip
    "cifar": Preset(functools.partial(small_image_train, flip=True), small_image_eval),
    # the same without the flip (digits, text)
    "translate": Preset(functools.partial(small_image_train, flip=False), small_image_eval),
    # inception crop, flip / resize to image_size / 0.875, centre crop
    "imagenet": Preset(inception_crop_train, center_crop_eval),
}


def default_preset(native_image_size: int) -> str:
  """The preset "auto" picks for images of this (typical) side: CIFAR-style if small."""
  return "cifar" if native_image_size <= SMALL_IMAGE_MAX_SIZE else "imagenet"
