"""What the model, the loop and the readers need to know about a dataset, resolved once."""

from __future__ import annotations

import dataclasses

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per channel, of pixels scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A dataset by name: its classes, default image shape, split sizes and where it is stored."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # eval images at the default image_size
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] = ()
  mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation, applied on the device
  std: tuple[float, ...] = IMAGENET_STD
  preprocessing: str = "imagenet"  # the preset "auto" resolves to
  builder_dir: str = ""  # the prepared tfds files; "" for synthetic data
  train_split: str = "train"
  eval_split: str = "test"
