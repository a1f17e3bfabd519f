"""Few-shot linear probes: how good are a frozen backbone's features for a new dataset?

  python -m resnet_jax.linear_probe --checkpoint runs/pretrain --dataset folder:/data/pets

Pooled features (the input of `fc`) of the dataset's train and eval splits, in eval mode; for
each shot count k, k random training examples per class fit a closed-form ridge regression
onto ±1 one-hot targets (features whitened, a near-unregularised bias), and its accuracy on
the whole eval split is reported, averaged over `num_seeds` draws. This is big_vision's
few-shot evaluator (`fewshot_lsr`), here on NumPy in float64.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import cli
from resnet_jax import data, pretrained
from resnet_jax.data.device_ops import InputTransform
from resnet_jax.models import ResNet

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10  # big_vision's default for its few-shot evaluators
BIAS_FEATURE = 100.0  # a constant feature this large is almost unregularised


@dataclasses.dataclass(frozen=True)
class Features:
  """Pooled features [n, d] (float32) and their labels [n]."""

  features: np.ndarray
  labels: np.ndarray


def extract_features(model: ResNet, variables: dict[str, Any], info: data.DatasetInfo, *,
                     split: str, image_size: int, preprocessing: str = "auto",
                     batch_size: int = 256) -> Features:
  """Eval-mode pooled features of `split` ("train" or "eval") of the dataset, on one device.

  Images get the eval preset (no augmentation) and the dataset's normalisation.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: must be 'train' or 'eval'")
  if split == "train":  # read the train split the way eval reads: in order, each record once
    info = dataclasses.replace(info, eval_split=info.train_split,
                               num_eval_examples=info.num_train_examples)
  inputs = InputTransform(mean=info.mean, std=info.std, dtype=model.dtype)
  device_variables = jax.device_put(variables)  # once, not with every batch

  @jax.jit
  def features(variables, images):
    return model.apply(variables, inputs.eval_images(images), train=False,
                       return_features=True).astype(jnp.float32)

  chunks, labels = [], []
  for batch in data.eval_batches(info, global_batch_size=batch_size, image_size=image_size,
                                 preprocessing=preprocessing):
    real = batch["mask"] > 0
    chunks.append(np.asarray(features(device_variables, batch["image"]))[real])
    labels.append(batch["label"][real])
  return Features(np.concatenate(chunks), np.concatenate(labels).astype(np.int64))


def ridge_accuracy(train: Features, test: Features, num_classes: int,
                   l2_reg: float = DEFAULT_L2_REG) -> float:
  """Accuracy on `test` of ridge regression fit on `train` (±1 one-hot targets)."""
  x = train.features.astype(np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5

  def whiten(features: np.ndarray) -> np.ndarray:  # + the bias feature
    return np.pad((features - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

  x = whiten(x)
  y = 2.0 * np.eye(num_classes)[train.labels] - 1.0
  n, d = x.shape
  if n >= d:  # (xᵀx + λI)⁻¹ xᵀy
    w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  else:  # xᵀ (xxᵀ + λI)⁻¹ y: the same, solved in the smaller dimension
    w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  predictions = np.argmax(whiten(test.features.astype(np.float64)) @ w, axis=1)
  return float(np.mean(predictions == test.labels))


def few_shot_accuracies(train: Features, test: Features, num_classes: int, *,
                        shots: Sequence[int] = DEFAULT_SHOTS, num_seeds: int = 3,
                        l2_reg: float = DEFAULT_L2_REG,
                        class_names: Sequence[str] = ()) -> dict[int, float]:
  """{k: mean accuracy over `num_seeds` draws of k training examples per class}.

  A k larger than the smallest class's training examples is left out with a warning naming
  that class (`class_names`, else its index); ValueError when no k is left, or one is < 1.
  """
  counts = np.bincount(train.labels, minlength=num_classes)
  smallest = int(np.argmin(counts))
  name = class_names[smallest] if class_names else f"class {smallest}"
  fitting = [k for k in shots if k <= counts[smallest]]
  if min(shots) < 1 or not fitting:
    raise ValueError(f"shots={tuple(shots)}: each must be between 1 and the smallest class's "
                     f"{counts[smallest]} training examples ({name})")
  if len(fitting) < len(shots):
    logging.warning("Leaving out the %s-shot probes: the smallest class, %s, has %d training "
                    "examples", ",".join(str(k) for k in shots if k not in fitting), name,
                    counts[smallest])
  results = {k: [] for k in fitting}
  for seed in range(num_seeds):
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(train.labels == c)) for c in range(num_classes)]
    for k in fitting:
      chosen = np.concatenate([indices[:k] for indices in per_class])
      subset = Features(train.features[chosen], train.labels[chosen])
      results[k].append(ridge_accuracy(subset, test, num_classes, l2_reg))
  return {k: float(np.mean(v)) for k, v in results.items()}


def probe(model: ResNet, variables: dict[str, Any], info: data.DatasetInfo, *, image_size: int,
          preprocessing: str = "auto", shots: Sequence[int] = DEFAULT_SHOTS,
          num_seeds: int = 3, batch_size: int = 256) -> dict[str, float]:
  """{"probe/{k}shot_accuracy": ...} for a model's features on a dataset."""
  train, test = (extract_features(model, variables, info, split=split, image_size=image_size,
                                  preprocessing=preprocessing, batch_size=batch_size)
                 for split in ("train", "eval"))
  accuracies = few_shot_accuracies(train, test, info.num_classes, shots=shots,
                                   num_seeds=num_seeds, class_names=info.class_names)
  return {f"probe/{k}shot_accuracy": v for k, v in accuracies.items()}


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.linear_probe", __doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="a train.py workdir, one of its checkpoints, or converted weights")
  parser.add_argument("--dataset", required=True, help="folder:PATH or a prepared tfds name")
  parser.add_argument("--data_dir", default=None, help="tfds data dir (default: tfds')")
  parser.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)),
                      help="comma-separated examples per class (default: %(default)s)")
  parser.add_argument("--num_seeds", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=0,
                      help="0: the size the checkpoint was trained at")
  parser.add_argument("--batch_size", type=int, default=256)
  args = parser.parse_args(argv)
  try:
    shots = tuple(int(s) for s in args.shots.split(","))
    weights = pretrained.load(args.checkpoint)
    info = data.get_dataset_info(args.dataset, args.data_dir)
    if info.image_shape[2] != weights.info.in_channels:
      raise ValueError(f"{args.dataset} has {info.image_shape[2]}-channel images but "
                       f"{weights.path} was trained on {weights.info.in_channels} channels")
    results = probe(weights.info.create_model(), weights.variables, info,
                    image_size=args.image_size or weights.info.image_size, shots=shots,
                    num_seeds=args.num_seeds, batch_size=args.batch_size)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
