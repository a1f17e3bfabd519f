"""Input data: datasets by name, tfds and image-folder pipelines, preprocessing presets."""

from resnet_jax.data.dataset_info import DatasetInfo
from resnet_jax.data.pipeline import (
    PRESETS,
    eval_batches,
    get_dataset_info,
    num_eval_batches,
    process_range,
    resolve_preprocessing,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "PRESETS",
    "DatasetInfo",
    "eval_batches",
    "get_dataset_info",
    "num_eval_batches",
    "process_range",
    "resolve_preprocessing",
    "steps_per_epoch",
    "train_batches",
]
