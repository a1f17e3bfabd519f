"""torchvision state dicts ↔ resnet_jax variables, both ways, bit for bit.

The mapping is derived from the model's own variable tree, so it holds for every registry
model built from torchvision's layers (post-activation, BatchNorm):
- names: `layer2_0/downsample/conv/kernel` ↔ `layer2.0.downsample.0.weight`
  (torchvision's downsample is `Sequential(conv, bn)`), BatchNorm `scale` ↔ `weight`,
  `mean`/`var` (in batch_stats) ↔ `running_mean`/`running_var`;
- axes: conv kernels (kh, kw, in/groups, out) ↔ (out, in/groups, kh, kw), Dense kernels
  (in, out) ↔ (out, in).
torchvision's `num_batches_tracked` counters have no counterpart: they are ignored when
reading and written as 0, so they are the one thing a round trip does not keep.
torch is never imported here; tensors are read through their own methods.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from resnet_jax.models import create_model
from resnet_jax.pretrained import variable_mismatches, variable_shapes

PyTree = Any

# The registry names that torchvision also has, with the same architecture.
TORCHVISION_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
)

_LEAF_NAMES = {
    ("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var",
}
_SHORTCUT_NAMES = {"conv": "0", "bn": "1"}
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}  # of kernels, by rank
_COUNTER = "num_batches_tracked"
_DDP_PREFIX = "module."


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One variable: its path in our tree, its torchvision key, and how the axes map."""

  path: tuple[str, ...]  # ("params", "layer1_0", "conv1", "kernel")
  key: str  # "layer1.0.conv1.weight"
  to_torch_axes: tuple[int, ...]  # np.transpose axes from our layout to torchvision's
  dtype: np.dtype  # ours


@dataclasses.dataclass(frozen=True)
class _Layout:
  """A model's variables as ShapeDtypeStructs, and their torchvision keys and shapes."""

  variables: dict[str, PyTree]
  entries: tuple[_Entry, ...]
  torch_shapes: dict[str, jax.ShapeDtypeStruct]  # without the num_batches_tracked counters
  counters: tuple[str, ...]  # "bn1.num_batches_tracked", ...


def _torch_key(path: tuple[str, ...]) -> str:
  """torchvision's name of the variable at `path` (collection first)."""
  collection, *modules, leaf = path
  names = [_SHORTCUT_NAMES[m] if i and modules[i - 1] == "downsample"
           else re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", m) for i, m in enumerate(modules)]
  return ".".join(names + [_LEAF_NAMES[collection, leaf]])


@functools.cache
def _layout(name: str, num_classes: int | None) -> _Layout:
  """The layout of registry model `name` (its default head when num_classes is None)."""
  overrides = {} if num_classes is None else {"num_classes": num_classes}
  variables = variable_shapes(create_model(name, **overrides))
  entries, torch_shapes, counters = [], {}, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    names = tuple(p.key for p in path)
    axes = _TO_TORCH_AXES[leaf.ndim] if names[-1] == "kernel" else tuple(range(leaf.ndim))
    entry = _Entry(names, _torch_key(names), axes, leaf.dtype)
    entries.append(entry)
    torch_shapes[entry.key] = _to_torch_axes(leaf, axes)
    if names[0] == "batch_stats" and names[-1] == "mean":
      counters.append(entry.key.rsplit(".", 1)[0] + f".{_COUNTER}")
  return _Layout(variables, tuple(entries), torch_shapes, tuple(counters))


def _to_numpy(value: Any) -> np.ndarray:
  """An array or a torch tensor as a NumPy array; half and bfloat16 tensors become float32."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point() and value.element_size() < 4:
      value = value.float()  # NumPy has no bfloat16
    return value.numpy()
  return np.asarray(value)


def _to_torch_axes(value: Any, axes: tuple[int, ...]) -> np.ndarray | jax.ShapeDtypeStruct:
  """`value` transposed by `axes`: a contiguous array, or a ShapeDtypeStruct for one."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(value.shape[a] for a in axes), value.dtype)
  return np.ascontiguousarray(np.transpose(np.asarray(value), axes))


def _num_classes(head_kernel: Any, axis: int) -> int | None:
  """The class count of a 2-D fc kernel (on `axis`), or None when there is no such kernel."""
  shape = np.shape(head_kernel)
  return shape[axis] if len(shape) == 2 else None


class StateDictMismatch(ValueError):
  """A state dict that does not fit the model: one line, and every difference in `problems`."""

  def __init__(self, message: str, problems: list[str]):
    super().__init__(message)
    self.problems = problems


def matching_models(state_dict: Mapping[str, Any], num_classes: int | None) -> list[str]:
  """The torchvision ResNets whose keys and shapes `state_dict` fits exactly."""
  weights = {k: v for k, v in state_dict.items() if not k.endswith(f".{_COUNTER}")}
  return [name for name in TORCHVISION_MODELS
          if not variable_mismatches(_layout(name, num_classes).torch_shapes, weights)]


def from_state_dict(name: str, state_dict: Mapping[str, Any]) -> dict[str, PyTree]:
  """{"params", "batch_stats"} of registry model `name` from a torchvision state dict.

  Values may be NumPy arrays or torch tensors; they are cast to the model's param dtype.
  The class count comes from `fc.weight`. Keys may all carry DDP's "module." prefix;
  `num_batches_tracked` entries are ignored. Raises ValueError for an unknown model
  (with close matches), or StateDictMismatch: how many keys differ, which torchvision
  ResNet the shapes do fit, and every missing, unexpected and mis-shaped key in `problems`.
  """
  if state_dict and all(k.startswith(_DDP_PREFIX) for k in state_dict):
    state_dict = {k[len(_DDP_PREFIX):]: v for k, v in state_dict.items()}
  layout = _layout(name, _num_classes(state_dict.get("fc.weight"), axis=0))
  weights = {k: v for k, v in state_dict.items() if not k.endswith(f".{_COUNTER}")}
  problems = variable_mismatches(layout.torch_shapes, weights)
  if problems:
    classes = layout.variables["params"]["fc"]["kernel"].shape[-1]
    fits = matching_models(state_dict, _num_classes(state_dict.get("fc.weight"), axis=0))
    seems = (f"its keys and shapes are those of {' or '.join(fits)}" if fits else
             "its keys and shapes match no torchvision ResNet")
    raise StateDictMismatch(
        f"The state dict does not fit torchvision's {name} with {classes} classes: "
        f"{len(problems)} keys missing, unexpected or mis-shaped; {seems}", problems)
  flat = {}
  for entry in layout.entries:
    value = np.transpose(_to_numpy(weights[entry.key]), np.argsort(entry.to_torch_axes))
    flat[entry.path] = np.array(value, dtype=entry.dtype, order="C")
  return {"params": {}, "batch_stats": {}, **traverse_util.unflatten_dict(flat)}


def to_state_dict(name: str, variables: Mapping[str, PyTree]) -> dict[str, Any]:
  """The torchvision state dict of registry model `name`'s `variables`, as NumPy arrays.

  Every BatchNorm gets `num_batches_tracked` = 0, so a torchvision model accepts it with
  `load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`. Given ShapeDtypeStructs
  (`pretrained.variable_shapes`), it returns the torchvision shapes instead, computing
  nothing. Raises ValueError listing every variable that does not fit the model.
  """
  head = variables.get("params", {}).get("fc", {}).get("kernel")
  layout = _layout(name, _num_classes(head, axis=1))
  problems = variable_mismatches(layout.variables,
                                 {k: variables.get(k, {}) for k in layout.variables})
  if problems:
    raise ValueError(f"The variables do not fit {name}:\n  " + "\n  ".join(problems))
  state_dict = {}
  for entry in layout.entries:
    value = variables
    for part in entry.path:
      value = value[part]
    state_dict[entry.key] = _to_torch_axes(value, entry.to_torch_axes)
  state_dict.update({key: np.zeros((), np.int64) for key in layout.counters})
  return state_dict
