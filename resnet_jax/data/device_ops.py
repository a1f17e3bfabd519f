"""Batch ops that run on the accelerator inside the jitted step: normalisation, cutout,
mixup, cutmix.

Pure JAX functions of explicit PRNG keys. The train step derives the key from its own
step counter, so a resumed run mixes exactly the same pairs, and no host time is spent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...],
              dtype: Any = jnp.float32) -> jax.Array:
  """uint8 pixels → (x / 255 − mean) / std per channel, in `dtype`."""
  scale = jnp.asarray([1.0 / (255.0 * s) for s in std], dtype)
  shift = jnp.asarray([m / s for m, s in zip(mean, std)], dtype)
  return images.astype(dtype) * scale - shift


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018): blend each example with the batch reversed, λ ~ Beta(α, α)."""
  lam = jax.random.beta(key, alpha, alpha).astype(images.dtype)
  mixed = lam * images + (1 - lam) * images[::-1]
  return mixed, lam * targets + (1 - lam) * targets[::-1]


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float
           ) -> tuple[jax.Array, jax.Array]:
  """CutMix (Yun et al. 2019): paste a box of the reversed batch; labels by the box's area."""
  lam_key, y_key, x_key = jax.random.split(key, 3)
  height, width = images.shape[1:3]
  lam = jax.random.beta(lam_key, alpha, alpha)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.round(cut * height), jnp.round(cut * width)
  centre_y = jax.random.randint(y_key, (), 0, height)
  centre_x = jax.random.randint(x_key, (), 0, width)
  y0, y1 = jnp.clip(centre_y - cut_h // 2, 0, height), jnp.clip(centre_y + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(centre_x - cut_w // 2, 0, width), jnp.clip(centre_x + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  mixed = jnp.where(box[None, :, :, None], images[::-1], images)
  kept = 1.0 - box.sum() / (height * width)  # λ of the box actually pasted, after clipping
  return mixed, kept * targets + (1.0 - kept) * targets[::-1]


def cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """Cutout (DeVries & Taylor 2017): zero a size×size square of each normalised image.

  Each square's centre is uniform over the image, so squares at the border are clipped and
  cover less; zero is the dataset's mean pixel after normalisation.
  """
  batch, height, width = images.shape[:3]
  y_key, x_key = jax.random.split(key)
  centre_y = jax.random.randint(y_key, (batch, 1, 1), 0, height)
  centre_x = jax.random.randint(x_key, (batch, 1, 1), 0, width)
  rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  top, left = centre_y - size // 2, centre_x - size // 2
  inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
  return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


CUTOUT_STREAM = 1  # fold_in(step key, this): cutout's key, apart from the mixing keys


@dataclasses.dataclass(frozen=True)
class InputTransform:
  """How the step turns a batch of images into model inputs and soft targets.

  Images are uint8 pixels, 0–255, [batch, H, W, C]. With `mean` and `std` (per channel, in
  the units of pixels scaled to [0, 1], e.g. ImageNet's (0.485, 0.456, 0.406) and (0.229,
  0.224, 0.225)) the model sees (x / 255 − mean) / std. Without them it sees x / 255, in
  [0, 1]; float images are taken as model inputs already and only cast to `dtype`.
  """
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  dtype: Any = jnp.float32
  mixup_alpha: float = 0.0  # 0: off
  cutmix_alpha: float = 0.0  # 0: off
  mix_probability: float = 1.0  # of mixing a batch at all; with both on, each half the time
  cutout_size: int = 0  # 0: off; else the side of the square cut out of each train image

  def eval_images(self, images: jax.Array) -> jax.Array:
    if self.mean is None:
      if images.dtype == jnp.uint8:
        return images.astype(self.dtype) / jnp.asarray(255, self.dtype)
      return images.astype(self.dtype)
    return normalize(images, self.mean, self.std, self.dtype)

  def train_inputs(self, key: jax.Array, images: jax.Array, labels: jax.Array,
                   num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Normalised (maybe cut out, maybe mixed) images, and targets [batch, num_classes]
    summing to 1. Cutout's key is folded from `key`, so the mixing keys do not depend on it."""
    images = self.eval_images(images)
    if self.cutout_size:
      images = cutout(jax.random.fold_in(key, CUTOUT_STREAM), images, self.cutout_size)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    mixers = [(fn, alpha) for fn, alpha in ((mixup, self.mixup_alpha),
                                            (cutmix, self.cutmix_alpha)) if alpha > 0]
    if not mixers:
      return images, targets
    apply_key, choice_key, mix_key = jax.random.split(key, 3)
    branches = [lambda k, x, t, fn=fn, a=alpha: _as(fn(k, x, t, a), x, t)
                for fn, alpha in mixers]
    mixed = jax.lax.switch(jax.random.randint(choice_key, (), 0, len(branches)), branches,
                           mix_key, images, targets)
    apply = jax.random.uniform(apply_key) < self.mix_probability
    return jax.tree.map(lambda m, x: jnp.where(apply, m, x), mixed, (images, targets))


def _as(result: tuple[jax.Array, jax.Array], images: jax.Array, targets: jax.Array
        ) -> tuple[jax.Array, jax.Array]:
  """Both branches of the switch must return identical dtypes."""
  return result[0].astype(images.dtype), result[1].astype(targets.dtype)
