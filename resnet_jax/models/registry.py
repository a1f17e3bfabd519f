"""Named models: `create_model("resnet50", num_classes=10)` and `list_models()`.

Names follow torchvision where it has the model; the CIFAR nets are those of He et al.
(2015, section 4.2): 6n+2 layers, widths 16/32/64, shortcut option A (plus resnet8, n = 1:
the smallest of the family, for smoke tests and the fault suite's short runs). The plain
nets of that paper (sections 4.1 and 4.2) are the same layers with no shortcut at all.
"""

from __future__ import annotations

import difflib
from typing import Any

from resnet_jax.models.blocks import (
    BasicBlock, BottleneckBlock, PreActBasicBlock, PreActBottleneckBlock)
from resnet_jax.models.resnet import ResNet

_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
           152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def _imagenet(depth: int, preact: bool = False, **kwargs: Any) -> dict[str, Any]:
  basic, bottleneck = (PreActBasicBlock, PreActBottleneckBlock) if preact else (BasicBlock,
                                                                                BottleneckBlock)
  return dict(stage_sizes=_DEPTHS[depth], block_cls=basic if depth < 50 else bottleneck, **kwargs)


def _cifar(n: int, shortcut: str = "zero_pad") -> dict[str, Any]:
  return dict(stage_sizes=(n, n, n), block_cls=BasicBlock, stem="cifar", width=16,
              shortcut=shortcut, num_classes=10)


_MODELS: dict[str, dict[str, Any]] = {
    **{f"resnet{d}": _imagenet(d) for d in (18, 34, 50, 101, 152, 200)},
    "wide_resnet50_2": _imagenet(50, width_per_group=128),
    "wide_resnet101_2": _imagenet(101, width_per_group=128),
    "resnext50_32x4d": _imagenet(50, groups=32, width_per_group=4),
    "resnext101_32x8d": _imagenet(101, groups=32, width_per_group=8),
    "resnext101_64x4d": _imagenet(101, groups=64, width_per_group=4),
    "resnet50d": _imagenet(50, stem="deep", shortcut="avgpool"),
    **{f"preact_resnet{d}": _imagenet(d, preact=True) for d in (18, 34, 50, 101, 152)},
    **{f"resnet{6 * n + 2}": _cifar(n) for n in (1, 3, 5, 7, 9, 18, 200)},
    **{f"plain{6 * n + 2}": _cifar(n, shortcut="none") for n in (3, 5, 7, 9, 18)},
    **{f"plain{d}": _imagenet(d, shortcut="none") for d in (18, 34)},
}


def list_models() -> list[str]:
  """Names accepted by `create_model`, sorted."""
  return sorted(_MODELS)


def create_model(name: str, **overrides: Any) -> ResNet:
  """Builds the named model; any `ResNet` field (num_classes, dtype, ...) can be overridden."""
  if name not in _MODELS:
    close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
  fields = set(ResNet.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown ResNet field(s) {unknown} for {name!r}; valid: {sorted(fields)}")
  return ResNet(**{**_MODELS[name], **overrides})
