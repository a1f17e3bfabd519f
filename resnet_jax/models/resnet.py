"""One `ResNet` module for every depth and variant: stem → stages of blocks → pool → fc.

Variables: `params` (weights) and `batch_stats` (BatchNorm running mean/var). Call with
`train=True` to use batch statistics (pass `mutable=["batch_stats"]`) and, with
`drop_path_rate > 0`, a `rngs={"drop_path": key}` stream.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import scan
from resnet_jax.models.blocks import ResidualBlock
from resnet_jax.models.layers import (conv_padding, make_conv, make_norm, make_relu,
                                      max_pool_3x3_s2)

Array = jax.Array

STEMS = ("imagenet", "deep", "cifar")


class ResNet(nn.Module):
  """A residual network on NHWC images.

  Stage i has `stage_sizes[i]` blocks of base width `width * 2**i`; the first block of
  every stage but the first halves the resolution.
  """

  stage_sizes: Sequence[int]
  block_cls: type[ResidualBlock]
  num_classes: int = 1000
  width: int = 64
  # "imagenet": 7×7/2 conv + max-pool; "deep": three 3×3 convs (ResNet-C/D); "cifar": one 3×3.
  stem: str = "imagenet"
  # or "avgpool" (ResNet-D), "zero_pad" (option A), "none" (a plain network: no skip).
  shortcut: str = "projection"
  stride_in_1x1: bool = False
  groups: int = 1
  width_per_group: int = 64
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0  # of the last block; grows linearly from 0 over depth.
  norm: str = "batch"  # or "group"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_residual: bool = False
  freeze_batch_stats: bool = False  # BatchNorm uses its running statistics even in training.
  axis_name: str | None = None  # pmap axis to sync BatchNorm statistics over.
  in_channels: int = 3
  dtype: Any = jnp.float32  # compute dtype.
  param_dtype: Any = jnp.float32  # storage dtype of params and BatchNorm statistics.
  # "tuned": 1×1 convs as matmuls and the stem's max-pool as a max of slices (faster on
  # XLA:CPU); "plain": XLA's convolution and reduce-window; "auto": tuned on CPU only.
  # The parameters are the same, so weights and checkpoints work with every choice.
  layer_impl: str = "auto"
  # A stage's blocks after the first run as one nn.scan (stages of 3+ blocks): variables stacked
  # in layer{i}_scan (models/scan.py: the layout, its converters); compile time stops growing.
  scan_blocks: bool = False
  remat: bool = False  # recompute each block's activations in the backward pass (less memory).
  remat_policy: str = "nothing_saveable"  # what remat keeps: one of scan.REMAT_POLICIES.

  def drop_path_rates(self) -> list[float]:
    """Stochastic-depth rate of each block in order: 0 for the first, drop_path_rate last."""
    num_blocks = sum(self.stage_sizes)
    return [self.drop_path_rate * k / max(num_blocks - 1, 1) for k in range(num_blocks)]

  @property
  def min_image_size(self) -> int:
    """Smallest input side that every downsampling stage still halves."""
    stem_stride = 1 if self.stem == "cifar" else 4
    return stem_stride * 2 ** (len(self.stage_sizes) - 1)

  def check_input(self, x: Array) -> None:
    expected = f"(batch, height, width, {self.in_channels})"
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"ResNet expects NHWC images of shape {expected}; got shape {x.shape}")
    if min(x.shape[1:3]) < self.min_image_size:
      raise ValueError(f"Image size {x.shape[1:3]} is too small for this model: each side must "
                       f"be at least {self.min_image_size} (its total downsampling)")

  @nn.compact
  def __call__(self, x: Array, train: bool = False, return_features: bool = False) -> Array:
    """Returns logits [batch, num_classes], or pooled features if `return_features`."""
    self.check_input(x)
    if self.stem not in STEMS:
      raise ValueError(f"stem={self.stem!r}: must be one of {STEMS}")
    conv = make_conv(self.dtype, self.param_dtype, self.layer_impl)
    norm = make_norm(self.norm, train=train and not self.freeze_batch_stats, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                     axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                     layer_impl=self.layer_impl)
    preactivation = self.block_cls.preactivation

    x = jnp.asarray(x, self.dtype)
    relu = make_relu(self.layer_impl)
    x = self.apply_stem(x, conv, norm, relu, preactivation)

    block_cls = scan.rematted(self.block_cls, self.remat_policy) if self.remat else self.block_cls
    rates = iter(self.drop_path_rates())
    for i, stage_size in enumerate(self.stage_sizes):
      stage_rates = [next(rates) for _ in range(stage_size)]
      fields = dict(
          planes=self.width * 2**i, conv=conv, norm=norm, relu=relu, shortcut=self.shortcut,
          stride_in_1x1=self.stride_in_1x1, groups=self.groups,
          width_per_group=self.width_per_group, se_ratio=self.se_ratio,
          zero_init_residual=self.zero_init_residual)
      x = block_cls(**fields, strides=2 if i > 0 else 1, drop_path_rate=stage_rates[0],
                    name=f"layer{i + 1}_0")(x, train)
      if self.scan_blocks and scan.is_looped(stage_size):  # blocks 1..n-1: one shape, one trace
        x = scan.scanned_blocks(
            functools.partial(self.block_cls, **fields), x, stage_rates[1:], train=train,
            remat_policy=self.remat_policy if self.remat else None, name=f"layer{i + 1}_scan")
      else:
        for j in range(1, stage_size):
          x = block_cls(**fields, drop_path_rate=stage_rates[j], name=f"layer{i + 1}_{j}")(x, train)

    if preactivation:  # v2 ends with the norm + ReLU that the last block did not apply.
      x = relu(norm(x.shape[-1], "bn_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    if return_features:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc")(x)

  def apply_stem(self, x: Array, conv, norm, relu, preactivation: bool) -> Array:
    """conv1 (+ bn1, ReLU unless pre-activation) (+ max-pool for ImageNet stems)."""
    if self.stem == "cifar":
      x = conv(self.width, (3, 3), padding=conv_padding(3), name="conv1")(x)
    elif self.stem == "imagenet":
      x = conv(self.width, (7, 7), strides=2, padding=conv_padding(7), name="conv1")(x)
    else:  # deep: 3×3/2 (width/2), 3×3 (width/2), 3×3 (width), as in timm's resnet*d.
      half = self.width // 2
      x = conv(half, (3, 3), strides=2, padding=conv_padding(3), name="conv1_0")(x)
      x = relu(norm(half, "bn1_0")(x))
      x = conv(half, (3, 3), padding=conv_padding(3), name="conv1_1")(x)
      x = relu(norm(half, "bn1_1")(x))
      x = conv(self.width, (3, 3), padding=conv_padding(3), name="conv1_2")(x)
    if not preactivation:
      x = relu(norm(self.width, "bn1")(x))
    if self.stem != "cifar":
      x = max_pool_3x3_s2(x, self.layer_impl)
    return x
