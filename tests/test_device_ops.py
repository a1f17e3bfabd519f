"""Normalisation, cutout, mixup and CutMix: the batch ops that run inside the jitted step."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.data import device_ops


def batch(size: int = 8, height: int = 16):
  images = jax.random.randint(jax.random.key(0), (size, height, height, 3), 0, 256, jnp.int32)
  return images.astype(jnp.uint8), jnp.arange(size) % 5


def test_normalize_maps_uint8_to_standardised_values_in_the_compute_dtype():
  images = jnp.asarray([[[[0, 255, 128]]]], jnp.uint8)
  out = device_ops.normalize(images, mean=(0.0, 0.5, 0.5), std=(1.0, 0.5, 0.25),
                             dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32).ravel(),
                             [0.0, 1.0, (128 / 255 - 0.5) / 0.25], atol=1e-2)


@pytest.mark.parametrize("mixer", [device_ops.mixup, device_ops.cutmix])
def test_mixed_targets_sum_to_one_and_pair_each_example_with_the_reversed_batch(mixer):
  images, labels = batch()
  x = images.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, 5)
  mixed, mixed_targets = mixer(jax.random.key(3), x, targets, 1.0)
  chex.assert_shape([mixed, mixed_targets], [x.shape, targets.shape])
  np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
  # Each target is λ·own + (1 − λ)·partner's, the partner being the reversed batch's example.
  lam = mixed_targets[0, labels[0]]
  expected = lam * targets + (1 - lam) * targets[::-1]
  np.testing.assert_allclose(mixed_targets, expected, atol=1e-6)
  if mixer is device_ops.mixup:
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-3)
  else:  # every pixel comes from the example or its partner, in the targets' proportion
    from_self = np.all(np.asarray(mixed == x), -1)
    from_partner = np.all(np.asarray(mixed == x[::-1]), -1) & ~from_self
    assert np.all(from_self | from_partner)
    np.testing.assert_allclose(1 - from_partner[0].mean(), lam, atol=1 / 256)


def test_cutmix_box_varies_with_the_key():
  images, labels = batch()
  targets = jax.nn.one_hot(labels, 5)
  boxes = {float(device_ops.cutmix(jax.random.key(k), images.astype(jnp.float32), targets,
                                   1.0)[1][0, labels[0]]) for k in range(6)}
  assert len(boxes) > 3


def test_cutout_zeroes_one_clipped_square_per_image_and_keeps_the_rest():
  images = jnp.ones((64, 16, 16, 3), jnp.float32)
  out = np.asarray(device_ops.cutout(jax.random.key(0), images, 6))
  erased = out[..., 0] == 0
  assert np.array_equal(out == 0, np.repeat(erased[..., None], 3, -1))  # all channels alike
  assert np.all(out[~erased] == 1)
  areas = erased.sum((1, 2))
  assert areas.max() == 36 and 0 < areas.min() < 36  # whole squares, and some clipped at a border
  for square in erased:  # one axis-aligned rectangle each
    rows, cols = np.nonzero(square.any(1))[0], np.nonzero(square.any(0))[0]
    assert square.sum() == len(rows) * len(cols) == square[np.ix_(rows, cols)].sum()
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
  assert len({tuple(np.argwhere(s)[0]) for s in erased}) > 20  # placed per image
  again = device_ops.cutout(jax.random.key(0), images, 6)
  np.testing.assert_array_equal(out, again)


def test_input_transform_cuts_out_normalised_images_without_changing_the_mixing():
  images, labels = batch()
  plain = device_ops.InputTransform(mean=(0.5,) * 3, std=(0.25,) * 3, mixup_alpha=0.4)
  cut = dataclasses.replace(plain, cutout_size=4)
  key = jax.random.key(5)
  x, targets = plain.train_inputs(key, images, labels, 5)
  x_cut, targets_cut = cut.train_inputs(key, images, labels, 5)
  np.testing.assert_array_equal(targets, targets_cut)  # the same mixing
  erased = np.asarray(x_cut != x)
  assert 0 < erased.mean() < 0.25  # squares of 4×4 pixels in 16×16 images, fewer where mixed
  no_mix = dataclasses.replace(cut, mixup_alpha=0.0)
  x_only_cut, _ = no_mix.train_inputs(key, images, labels, 5)
  assert np.all(np.asarray(x_only_cut)[np.asarray(x_only_cut != plain.eval_images(images))] == 0)
  np.testing.assert_array_equal(cut.eval_images(images), plain.eval_images(images))


def test_input_transform_mixes_with_the_step_key_only():
  images, labels = batch()
  transform = device_ops.InputTransform(mean=(0.5,) * 3, std=(0.25,) * 3, mixup_alpha=0.4,
                                        cutmix_alpha=1.0)
  step = jax.jit(lambda key: transform.train_inputs(key, images, labels, 5))
  first, again, other = step(jax.random.key(1)), step(jax.random.key(1)), step(jax.random.key(2))
  chex.assert_trees_all_equal(first, again)
  assert not np.array_equal(first[1], other[1])
  np.testing.assert_allclose(first[1].sum(-1), 1.0, rtol=1e-6)


def test_input_transform_without_mixing_gives_normalised_images_and_one_hot_targets():
  images, labels = batch()
  for transform in (device_ops.InputTransform(mean=(0.5,) * 3, std=(0.25,) * 3),
                    device_ops.InputTransform(mean=(0.5,) * 3, std=(0.25,) * 3,
                                              mixup_alpha=1.0, mix_probability=0.0)):
    x, targets = transform.train_inputs(jax.random.key(0), images, labels, 5)
    np.testing.assert_allclose(x, device_ops.normalize(images, (0.5,) * 3, (0.25,) * 3))
    np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, 5))
  assert images.dtype == jnp.uint8
  x = device_ops.InputTransform().eval_images(images)  # no mean/std: pixels in [0, 1]
  np.testing.assert_allclose(x, images.astype(jnp.float32) / 255, rtol=1e-6)
  floats = images.astype(jnp.float32) / 7
  np.testing.assert_array_equal(device_ops.InputTransform().eval_images(floats), floats)
