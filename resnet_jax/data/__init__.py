"""Input data: tfds pipelines, augmentation and the bundled digits dataset."""

from resnet_jax.data.pipeline import (
    SUPPORTED_DATASETS,
    DatasetInfo,
    eval_batches,
    get_dataset_info,
    num_eval_batches,
    steps_per_epoch,
    train_batches,
)

__all__ = [
    "SUPPORTED_DATASETS",
    "DatasetInfo",
    "eval_batches",
    "get_dataset_info",
    "num_eval_batches",
    "steps_per_epoch",
    "train_batches",
]
