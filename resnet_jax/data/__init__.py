"""Input data: datasets by name, tfds and image-folder pipelines, preprocessing presets."""

from resnet_jax.data.quiet_tensorflow import import_tensorflow

import_tensorflow()  # first, before a module below imports it with its loading noise

from resnet_jax.data.dataset_info import DatasetInfo  # noqa: E402
from resnet_jax.data.pipeline import (  # noqa: E402
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
