"""Model weights with what they are: written by training and `convert`, read by everything else.

A model's weights are its `variables` ({"params", "batch_stats"}) plus a `ModelInfo`: the
registry name, class names and the input it expects. Three layouts hold them; `load` reads
any of them:
- a train.py workdir: its latest checkpoint, `WORKDIR/checkpoints/<step>/`;
- one checkpoint of a workdir, `WORKDIR/checkpoints/<step>/` (items `state`, `data`, `model`);
- the output of `python -m resnet_jax.convert` or `save` (items `variables`, `model`).
From a training checkpoint only the eval variables are read (the EMA of params when the run
kept one), never the optimizer state. Weights are always written and returned in the unrolled
layout (one `layer{i}_{j}` per block, torchvision's); `merge` converts them for a model with
`scan_blocks=True` (see `models.scan`). Every path may be local or in a bucket (`storage.paths`);
a checkpoint counts only once orbax has finished it (a save cut short is never read).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax.data.dataset_info import IMAGENET_MEAN, IMAGENET_STD
from resnet_jax.models import ResNet, create_model, scan
from resnet_jax.storage import paths

PyTree = Any
MODEL_ITEM = "model"  # JSON ModelInfo, in training checkpoints and converted weights alike
VARIABLES_ITEM = "variables"  # converted weights: {"params", "batch_stats"}
STATE_ITEM = "state"  # training checkpoints: the TrainState's arrays


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """Enough to rebuild the model, prepare its input and name its outputs."""

  model: str  # registry name, e.g. "resnet50"
  num_classes: int
  in_channels: int = 3
  image_size: int = 224
  preprocessing: str = "imagenet"  # the eval preset of resnet_jax.data.preprocessing
  mean: tuple[float, ...] = IMAGENET_MEAN  # of pixels in [0, 1], per channel
  std: tuple[float, ...] = IMAGENET_STD
  class_names: tuple[str, ...] = ()  # empty: classes are numbered
  source: str = ""  # the dataset it was trained on, or the file it was converted from
  population_size: int = 1  # > 1: a population's checkpoint, arrays with a member axis first

  def create_model(self, **overrides: Any) -> ResNet:
    """The registry model these weights belong to (overrides: dtype, axis_name, ...)."""
    return create_model(self.model, num_classes=self.num_classes, in_channels=self.in_channels,
                        **overrides)

  def class_name(self, index: int) -> str:
    return self.class_names[index] if index < len(self.class_names) else f"class {index}"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, fields: dict[str, Any]) -> ModelInfo:
    known = {f.name for f in dataclasses.fields(cls)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Weights read by `load`: host NumPy arrays, and where they came from."""

  variables: dict[str, PyTree]
  info: ModelInfo
  path: epath.Path  # the checkpoint directory read


def save(directory: str | os.PathLike, variables: dict[str, PyTree], info: ModelInfo) -> None:
  """Writes `variables` and `info` as an orbax checkpoint in `directory` (must not exist).

  Checks first that the variables fit `info`'s model, so nothing unusable is written.
  Variables of a scanned model are written unrolled.
  """
  variables = scan.to_unrolled(variables)
  check_variables_fit(variables, info)
  directory = paths.resolve(directory)
  if directory.exists():
    raise ValueError(f"{directory} already exists; choose a new output directory")
  arrays = {k: jax.tree.map(np.asarray, variables.get(k, {})) for k in ("params", "batch_stats")}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, args=ocp.args.Composite(**{
        VARIABLES_ITEM: ocp.args.StandardSave(arrays),
        MODEL_ITEM: ocp.args.JsonSave(info.to_json())}))


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """The checkpoint directory `path` names: itself, or a workdir's latest finished checkpoint."""
  path = paths.resolve(path)
  if not path.is_dir():
    raise ValueError(f"{path}: no such directory (expected a train.py workdir, one of its "
                     "checkpoints, or the output of resnet_jax.convert)")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not _is_checkpoint(path):
    steps = finished_steps(path)
    if not steps:
      raise ValueError(f"{path} holds no checkpoint (expected a train.py workdir, one of its "
                       "checkpoints, or the output of resnet_jax.convert)")
    path = path / str(steps[-1])
  return path


def finished_steps(directory: epath.Path) -> list[int]:
  """The steps of the checkpoints in `directory` (a workdir's checkpoints/) that orbax
  finished writing, in order."""
  return sorted(int(child.name) for child in directory.iterdir()
                if child.name.isdigit() and _is_checkpoint(child)
                and ocp.path.step.is_path_finalized(child))


def _is_checkpoint(path: epath.Path) -> bool:
  return any((path / item).is_dir() for item in (STATE_ITEM, VARIABLES_ITEM))


def load_info(path: str | os.PathLike) -> ModelInfo:
  """The ModelInfo of the checkpoint `path` names (see `checkpoint_dir`), without its arrays."""
  path = checkpoint_dir(path)
  info_file = path / MODEL_ITEM / "metadata"
  if not info_file.is_file():
    raise ValueError(f"{path} has no '{MODEL_ITEM}' item: it was written before checkpoints "
                     "recorded their model; train again, or convert the weights")
  try:
    return ModelInfo.from_json(json.loads(info_file.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{info_file} is not a valid model description: {e}") from None


def load(path: str | os.PathLike, member: int | None = None) -> Pretrained:
  """Reads weights and ModelInfo from a workdir, a checkpoint or converted weights.

  From a population's checkpoint (`config.population_size` > 1) it reads the weights of
  `member`, as those of a single run. Raises ValueError naming the path when there is no
  checkpoint or it cannot be read, or a population's member is not chosen.
  """
  path = checkpoint_dir(path)
  info = load_info(path)
  if info.population_size > 1 and member is None:
    raise ValueError(
        f"{path} holds a population of {info.population_size} members; take one out first: "
        f"python -m resnet_jax.take_member {path} --member=0 --output=DIR")
  if member is not None and not 0 <= member < info.population_size:
    raise ValueError(f"--member={member}: {path} holds "
                     + (f"members 0 to {info.population_size - 1}" if info.population_size > 1
                        else "a single run, not a population"))
  is_training_checkpoint = (path / STATE_ITEM).is_dir()
  item_dir = path / (STATE_ITEM if is_training_checkpoint else VARIABLES_ITEM)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    try:
      stored = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
      keys = ["params", "batch_stats"] + (["ema_params"] if "ema_params" in stored else [])
      target = {k: jax.tree.map(lambda m: np.empty(m.shape, m.dtype), stored[k])
                for k in keys if k in stored}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      arrays = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # orbax raises many types; all mean "unreadable"
      raise ValueError(f"Could not read the weights in {item_dir}: {type(e).__name__}: "
                       f"{e}") from None
  params = arrays.get("ema_params") or arrays.get("params")
  if params is None:
    raise ValueError(f"{item_dir} holds no params")
  variables = {"params": params, "batch_stats": arrays.get("batch_stats", {})}
  if info.population_size > 1:
    variables = jax.tree.map(lambda x: x[member], variables)
    info = dataclasses.replace(info, population_size=1)
  variables = scan.to_unrolled(variables)
  check_variables_fit(variables, info)
  logging.info("Loaded %s weights from %s", info.model, path)
  return Pretrained(variables=variables, info=info, path=path)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))  # arrays, metadata
          for path, leaf in leaves}


def _mismatches(want: dict[str, tuple], have: dict[str, tuple]) -> list[str]:
  lines = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
  lines += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
  lines += [f"mis-shaped {k}: expected {want[k]}, got {have[k]}"
            for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  return lines


def variable_mismatches(expected: PyTree, actual: PyTree) -> list[str]:
  """Lines naming each missing, unexpected or mis-shaped variable ("params/fc/kernel: ...")."""
  return _mismatches(_flat_shapes(expected), _flat_shapes(actual))


def variable_shapes(model: ResNet, image_size: int | None = None) -> dict[str, PyTree]:
  """The model's variables as ShapeDtypeStructs, without computing any of them."""
  size = max(image_size or 0, model.min_image_size)
  x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), model.dtype)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def check_variables_fit(variables: dict[str, PyTree], info: ModelInfo) -> None:
  """Raises ValueError listing every variable that does not fit `info`'s model."""
  expected = variable_shapes(info.create_model())
  problems = variable_mismatches(expected, {k: variables.get(k, {}) for k in expected})
  if problems:
    raise ValueError(f"The weights do not fit {info.model} with {info.num_classes} classes "
                     f"and {info.in_channels} input channels:\n  " + "\n  ".join(problems))


def is_head(path: tuple[str, ...]) -> bool:
  """Whether a variable path (top-level names first) belongs to the classifier head."""
  return bool(path) and path[0] == "fc"


def _without_head(shapes: dict[str, tuple]) -> dict[str, tuple]:
  return {k: v for k, v in shapes.items() if not is_head(tuple(k.split("/")[1:]))}


def merge(template: dict[str, PyTree], loaded: dict[str, PyTree], *, replace_head: bool,
          source: str) -> dict[str, PyTree]:
  """`loaded` variables in `template`'s structure, layout (scanned or not) and dtypes; with
  `replace_head`, the template's (fresh) classifier head is kept instead of the loaded one.

  Raises ValueError when the head's class count differs and `replace_head` is off (saying to
  set it), or when any other variable is missing or mis-shaped (listing them).
  """
  loaded = scan.in_layout_of(loaded, template)
  want = _flat_shapes(template)
  have = _flat_shapes({k: loaded.get(k, {}) for k in template})
  head = "params/fc/kernel"
  if not replace_head and head in have and want[head] != have[head]:
    raise ValueError(f"The head of {source} has {have[head][-1]} classes but this run has "
                     f"{want[head][-1]}; set config.replace_head=True to train a new head")
  if replace_head:
    want, have = _without_head(want), _without_head(have)
  problems = _mismatches(want, have)
  if problems:
    raise ValueError(f"The weights in {source} do not fit this run's model:\n  "
                     + "\n  ".join(problems))

  def take(path, fresh):
    names = tuple(p.key for p in path)
    if replace_head and is_head(names[1:]):
      return fresh
    stored = loaded
    for name in names:
      stored = stored[name]
    return np.asarray(stored, dtype=fresh.dtype)

  return jax.tree_util.tree_map_with_path(take, template)
