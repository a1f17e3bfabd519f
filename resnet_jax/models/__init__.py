"""The ResNet family as Flax linen modules."""

from resnet_jax.models.blocks import (
    BasicBlock, BottleneckBlock, PreActBasicBlock, PreActBottleneckBlock, ResidualBlock)
from resnet_jax.models.registry import create_model, list_models
from resnet_jax.models.resnet import ResNet

__all__ = [
    "BasicBlock", "BottleneckBlock", "PreActBasicBlock", "PreActBottleneckBlock",
    "ResidualBlock", "ResNet", "create_model", "list_models",
]
