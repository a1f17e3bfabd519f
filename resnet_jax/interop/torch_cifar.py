"""The CIFAR ResNets of He et al. (2015, section 4.2) in PyTorch, for parity and speed checks.

The paper's nets as PyTorch users write them (the common reference implementation): a 3×3
stem of 16 channels, 3 stages of n BasicBlocks (16, 32, 64 channels), option A shortcuts
(a strided identity with zero-padded channels, no parameters), global average pool, fc.
Module names follow torchvision's (`conv1`, `bn1`, `layer2.0.conv1`, `fc`), so our
variables load into it through `interop.to_state_dict` with `strict=True`: the same
initial weights on both sides. Needs torch (not a dependency of resnet_jax).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from resnet_jax.interop.torchvision import to_state_dict
from resnet_jax.models import create_model


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU; option A or no shortcut (plain)."""

  def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.stride, self.pad, self.shortcut = stride, planes - in_planes, shortcut

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut == "zero_pad":
      skip = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
      if self.pad:
        skip = F.pad(skip, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
      y = y + skip
    return F.relu(y)


class CifarResNet(nn.Module):
  def __init__(self, stage_sizes: tuple[int, ...], width: int, num_classes: int,
               shortcut: str, in_channels: int = 3):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    in_planes = width
    for stage, blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      layer = [BasicBlock(in_planes if i == 0 else planes, planes,
                          2 if stage and i == 0 else 1, shortcut) for i in range(blocks)]
      self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
      in_planes = planes
    self.fc = nn.Linear(in_planes, num_classes)
    self.num_stages = len(stage_sizes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(name: str, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
  """The PyTorch twin of registry model `name` (resnet20 ... resnet110, plain20 ...)."""
  ours = create_model(name, num_classes=num_classes, in_channels=in_channels)
  if ours.stem != "cifar" or ours.shortcut not in ("zero_pad", "none"):
    raise ValueError(f"{name} is not one of the paper's CIFAR nets (resnet20 ... resnet110, "
                     "plain20 ... plain110)")
  return CifarResNet(tuple(ours.stage_sizes), ours.width, num_classes, ours.shortcut,
                     in_channels)


def from_variables(name: str, variables: Mapping[str, Any]) -> CifarResNet:
  """The PyTorch twin of `name` holding `variables` (ours), loaded with strict=True, in
  the variables' float dtype (float64 variables make a float64 net)."""
  state_dict = to_state_dict(name, variables)
  fc = np.shape(state_dict["fc.weight"])
  conv1 = np.shape(state_dict["conv1.weight"])
  net = cifar_resnet(name, num_classes=fc[0], in_channels=conv1[1])
  net = net.to(torch.from_numpy(np.asarray(state_dict["fc.weight"])).dtype)
  net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                      strict=True)
  return net
