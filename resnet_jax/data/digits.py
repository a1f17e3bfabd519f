"""The bundled default dataset: scikit-learn's handwritten digits as a tfds builder.

Importing this module registers the builder as `sklearn_digits`. Preparing it needs no
download, since scikit-learn ships the 1,797 8x8 grey images (pixel values 0..16).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN_EXAMPLES = 1437
NUM_TEST_EXAMPLES = 360
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
  """The fixed split: a permutation by `default_rng(0)`; its first 1,437 indices are train."""
  permutation = np.random.default_rng(SPLIT_SEED).permutation(
      NUM_TRAIN_EXAMPLES + NUM_TEST_EXAMPLES)
  return {"train": permutation[:NUM_TRAIN_EXAMPLES], "test": permutation[NUM_TRAIN_EXAMPLES:]}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, pixels scaled from 0..16 to 0..255."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    # `as_dataset` reads tfrecord but not array_record, whatever tfds' default becomes.
    kwargs.setdefault("file_format", "tfrecord")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="scikit-learn's load_digits: 1,797 8x8 grey images of the digits 0-9. "
                    "Split by a permutation with np.random.default_rng(0): first 1,437 "
                    "indices train, last 360 test.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: scikit-learn ships the data.
    from sklearn import datasets as sklearn_datasets  # only to prepare: ~1 s to import
    digits = sklearn_datasets.load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    return {
        split: self._generate_examples(images, digits.target, indices)
        for split, indices in split_indices().items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for index in indices:
      yield int(index), {"image": images[index], "label": int(labels[index])}
