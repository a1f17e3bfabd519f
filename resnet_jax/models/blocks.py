"""Residual blocks: basic and bottleneck, post-activation (v1/v1.5) and pre-activation (v2).

Layer names follow torchvision (conv1, bn1, ..., downsample/conv, downsample/bn) so
weights map one to one.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import flax.linen as nn
import jax

from resnet_jax.models.layers import NormFactory, Shortcut, SqueezeExcite, conv_padding, drop_path

Array = jax.Array


def _zero_kernel(zero_init: bool) -> dict:
  return {"kernel_init": nn.initializers.zeros} if zero_init else {}


class ResidualBlock(nn.Module):
  """Fields shared by every block; subclasses define the residual branch.

  `planes` is the block's base width; it outputs `planes * expansion` channels.
  """

  planes: int
  conv: Callable[..., nn.Conv]
  norm: NormFactory
  relu: Callable[[Array], Array] = nn.relu  # layers.make_relu(layer_impl)
  strides: int = 1
  shortcut: str = "projection"
  stride_in_1x1: bool = False  # original v1 strides the first 1×1; v1.5 (default) the 3×3.
  groups: int = 1
  width_per_group: int = 64
  se_ratio: float = 0.0
  drop_path_rate: float = 0.0
  zero_init_residual: bool = False

  expansion: ClassVar[int] = 1
  preactivation: ClassVar[bool] = False

  @property
  def out_features(self) -> int:
    return self.planes * self.expansion

  @property
  def bottleneck_width(self) -> int:
    """Channels of a bottleneck's 3×3 conv: planes × width_per_group/64 × groups."""
    return int(self.planes * (self.width_per_group / 64.0)) * self.groups

  @property
  def bottleneck_strides(self) -> tuple[int, int]:
    """Strides of a bottleneck's (first 1×1, 3×3) convs."""
    return (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)

  def conv3x3(self, features: int, name: str, strides: int = 1, groups: int = 1,
              zero_init: bool = False) -> nn.Conv:
    return self.conv(features, (3, 3), strides=strides, padding=conv_padding(3),
                     feature_group_count=groups, name=name, **_zero_kernel(zero_init))

  def conv1x1(self, features: int, name: str, strides: int = 1, zero_init: bool = False) -> nn.Conv:
    return self.conv(features, (1, 1), strides=strides, name=name, **_zero_kernel(zero_init))

  def finish_branch(self, y: Array, train: bool) -> Array:
    """Squeeze-excite (optional) and stochastic depth at the end of the residual branch."""
    if self.se_ratio > 0:
      reduced = max(1, int(self.out_features * self.se_ratio))
      y = SqueezeExcite(reduced, dtype=y.dtype, param_dtype=self.conv.keywords["param_dtype"],
                        name="se")(y)
    return drop_path(self, y, self.drop_path_rate, train)

  def make_shortcut(self, x: Array, preactivation: bool = False) -> Array | float:
    """The skip path's output; 0 for a plain network (shortcut="none"): no skip at all."""
    if self.shortcut == "none":
      return 0.0
    # Pre-activation blocks project the already-normalised input, with no norm of their own.
    norm = None if preactivation else self.norm
    return Shortcut(self.shortcut, self.out_features, self.strides, self.conv, norm,
                    name="downsample")(x)


class BasicBlock(ResidualBlock):
  """Two 3×3 convs (ResNet-18/34 and the CIFAR nets)."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.groups != 1 or self.width_per_group != 64:
      raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 "
                       f"(got {self.groups}, {self.width_per_group}); use a bottleneck model")
    y = self.conv3x3(self.planes, "conv1", self.strides)(x)
    y = self.relu(self.norm(self.planes, "bn1")(y))
    y = self.conv3x3(self.planes, "conv2")(y)
    y = self.norm(self.planes, "bn2", zero_init=self.zero_init_residual)(y)
    y = self.finish_branch(y, train)
    return self.relu(self.make_shortcut(x) + y)


class BottleneckBlock(ResidualBlock):
  """1×1 reduce, 3×3 (grouped for ResNeXt), 1×1 expand ×4 (ResNet-50 and deeper)."""

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = self.bottleneck_width
    stride_1x1, stride_3x3 = self.bottleneck_strides
    y = self.conv1x1(width, "conv1", stride_1x1)(x)
    y = self.relu(self.norm(width, "bn1")(y))
    y = self.conv3x3(width, "conv2", stride_3x3, self.groups)(y)
    y = self.relu(self.norm(width, "bn2")(y))
    y = self.conv1x1(self.out_features, "conv3")(y)
    y = self.norm(self.out_features, "bn3", zero_init=self.zero_init_residual)(y)
    y = self.finish_branch(y, train)
    return self.relu(self.make_shortcut(x) + y)


class PreActBasicBlock(ResidualBlock):
  """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity path untouched.

  `zero_init_residual` zeroes the last conv (a zero norm scale before ReLU would never
  receive a gradient), so the block starts as the identity.
  """

  preactivation: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if self.groups != 1 or self.width_per_group != 64:
      raise ValueError("PreActBasicBlock supports only groups=1 and width_per_group=64 "
                       f"(got {self.groups}, {self.width_per_group})")
    preact = self.relu(self.norm(x.shape[-1], "bn1")(x))
    y = self.conv3x3(self.planes, "conv1", self.strides)(preact)
    y = self.relu(self.norm(self.planes, "bn2")(y))
    y = self.conv3x3(self.planes, "conv2", zero_init=self.zero_init_residual)(y)
    y = self.finish_branch(y, train)
    return self.make_shortcut(preact if self.has_projection(x) else x, True) + y

  def has_projection(self, x: Array) -> bool:
    return x.shape[-1] != self.out_features or self.strides != 1


class PreActBottleneckBlock(PreActBasicBlock):
  """Pre-activation bottleneck (He et al., 2016), stride on the 3×3 by default."""

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = self.bottleneck_width
    stride_1x1, stride_3x3 = self.bottleneck_strides
    preact = self.relu(self.norm(x.shape[-1], "bn1")(x))
    y = self.conv1x1(width, "conv1", stride_1x1)(preact)
    y = self.relu(self.norm(width, "bn2")(y))
    y = self.conv3x3(width, "conv2", stride_3x3, self.groups)(y)
    y = self.relu(self.norm(width, "bn3")(y))
    y = self.conv1x1(self.out_features, "conv3", zero_init=self.zero_init_residual)(y)
    y = self.finish_branch(y, train)
    return self.make_shortcut(preact if self.has_projection(x) else x, True) + y
