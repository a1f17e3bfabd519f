"""Fingerprints of the examples in batches, for tests of sharding, coverage and resume."""

import collections
import hashlib
from collections.abc import Iterable

import numpy as np


def example_hashes(batches: Iterable[dict[str, np.ndarray]]) -> collections.Counter:
  """A multiset of (image, label) fingerprints of the real (unmasked) rows."""
  hashes = collections.Counter()
  for batch in batches:
    mask = batch.get("mask", np.ones(len(batch["label"])))
    for image, label, real in zip(batch["image"], batch["label"], mask):
      if real:
        hashes[hashlib.sha1(image.tobytes() + label.tobytes()).hexdigest()] += 1
  return hashes
