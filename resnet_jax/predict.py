"""Top-k classes of image files: `python -m resnet_jax.predict --checkpoint DIR IMAGE_OR_FOLDER...`

Folders are searched recursively for image files (by extension, sorted); files named
explicitly are tried whatever their extension. Each image is decoded (any format and colour
mode TensorFlow reads) and prepared with the checkpoint's eval preset at its image size and
channel count, as in evaluation; batches are padded to one size so one compiled program
serves them all. Prints each path and its top-k class names with probabilities (`--json`:
one JSON object per line). An unreadable file gets `error: PATH: reason` on stderr, the rest
are still predicted, and the exit status is 1; a bad checkpoint or argument exits with 2.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data import quiet_tensorflow

quiet_tensorflow.import_tensorflow()
import tensorflow as tf  # noqa: E402

from resnet_jax import cli
from resnet_jax import pretrained
from resnet_jax.data.device_ops import InputTransform
from resnet_jax.data.image_folder import IMAGE_EXTENSIONS, check_image
from resnet_jax.data.preprocessing import PRESETS

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The top-k classes of one file, most probable first; or, if it is unreadable, why."""
  path: str
  labels: tuple[int, ...] = ()
  class_names: tuple[str, ...] = ()
  probabilities: tuple[float, ...] = ()
  error: str = ""  # non-empty: the file could not be decoded, and nothing was predicted

  def to_json(self) -> dict[str, Any]:
    return {"path": self.path, "top_k": [
        {"class": name, "label": label, "probability": probability}
        for label, name, probability in zip(self.labels, self.class_names, self.probabilities)]}


def apply_fn(info: pretrained.ModelInfo, layer_impl: str = "auto"
             ) -> Callable[[PyTree, jax.Array], jax.Array]:
  """(variables, uint8 images [batch, size, size, channels]) → float32 logits: the
  checkpoint's normalisation, then the model in eval mode, as the eval step runs them."""
  model = info.create_model(layer_impl=layer_impl)
  inputs = InputTransform(mean=info.mean, std=info.std)

  def apply(variables: PyTree, images: jax.Array) -> jax.Array:
    logits = model.apply(variables, inputs.eval_images(images), train=False)
    return logits.astype(jnp.float32)

  return apply


@functools.partial(jax.jit, static_argnames=("info", "top_k"))
def classify(variables: PyTree, images: jax.Array, *, info: pretrained.ModelInfo, top_k: int
             ) -> tuple[jax.Array, jax.Array]:
  """(probabilities, labels) of each image's top_k classes, most probable first."""
  return jax.lax.top_k(jax.nn.softmax(apply_fn(info)(variables, images)), top_k)


def prepare(encoded: tf.Tensor, info: pretrained.ModelInfo) -> tf.Tensor:
  """Encoded image bytes → uint8 [image_size, image_size, in_channels], by the checkpoint's
  eval preset: the input `apply_fn` (and an exported model) expects."""
  if info.preprocessing not in PRESETS:
    raise ValueError(f"Unknown preprocessing preset {info.preprocessing!r} in the model "
                     f"description; expected one of {sorted(PRESETS)}")
  return PRESETS[info.preprocessing].eval(encoded, info.image_size, channels=info.in_channels)


def _folder_images(folder: str) -> list[str]:
  """Image files under `folder` by extension, recursively, sorted; hidden ones skipped."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [os.path.join(root, name) for name in names
              if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
  return sorted(found)


def image_paths(inputs: Sequence[str]) -> list[str]:
  """Files and folders → files: each folder replaced by its image files; raises ValueError
  when there are none at all."""
  paths = []
  for item in inputs:
    paths += _folder_images(item) if os.path.isdir(item) else [item]
  if not paths:
    raise ValueError(f"No image files ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
  return paths


def prepared_images(paths: Sequence[str], info: pretrained.ModelInfo
                    ) -> Iterator[tuple[str, np.ndarray]]:
  """(path, prepared uint8 image) for each readable file, in order, decoded on tf.data's
  threads; unreadable files are left out."""
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string))
  ds = ds.map(lambda path: (path, prepare(tf.io.read_file(path), info)),
              num_parallel_calls=tf.data.AUTOTUNE)
  for path, image in ds.ignore_errors().prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
    yield path.decode(), image


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  iterator = iter(items)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def predict_files(weights: pretrained.Pretrained, paths: Sequence[str], batch_size: int = 32,
                  top_k: int = 5) -> list[Prediction]:
  """A Prediction for each of `paths`, in order: its top_k classes, or why it is unreadable."""
  for name, value in (("batch_size", batch_size), ("top_k", top_k)):
    if value < 1:
      raise ValueError(f"{name}={value}: must be at least 1")
  info = weights.info
  batch_size = min(batch_size, len(paths))  # the one batch shape compiled
  top_k = min(top_k, info.num_classes)
  variables = jax.device_put(weights.variables)
  found = {}
  for chunk in _chunks(prepared_images(paths, info), batch_size):
    images = np.zeros((batch_size, *chunk[0][1].shape), np.uint8)  # padded to batch_size
    images[:len(chunk)] = [image for _, image in chunk]
    probabilities, labels = jax.device_get(classify(variables, images, info=info, top_k=top_k))
    for (path, _), row, row_labels in zip(chunk, probabilities, labels):
      found[path] = Prediction(path, tuple(int(i) for i in row_labels),
                               tuple(info.class_name(int(i)) for i in row_labels),
                               tuple(float(p) for p in row))
  return [found.get(path) or Prediction(path, error=_why_unreadable(path, info))
          for path in paths]


def _why_unreadable(path: str, info: pretrained.ModelInfo) -> str:
  if not os.path.isfile(path):
    return "no such file"
  return (check_image(path).error  # decodes it again, eagerly, to say why
          or f"could not be prepared by the {info.preprocessing!r} preset")


def format_prediction(prediction: Prediction) -> str:
  """The path, then one aligned line per class: rank, class name, probability."""
  width = max(len(name) for name in prediction.class_names)
  rank_width = len(str(len(prediction.class_names)))
  lines = [prediction.path] + [
      f"  {rank:>{rank_width}}. {name:<{width}}  {probability:7.2%}" for rank, (name, probability)
      in enumerate(zip(prediction.class_names, prediction.probabilities), start=1)]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.predict", __doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="a train.py workdir, one of its checkpoints, or converted weights")
  parser.add_argument("--top_k", type=int, default=5, help="classes shown per image")
  parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
  parser.add_argument("--json", action="store_true", help="print one JSON object per image")
  parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
  args = parser.parse_args(argv)
  try:
    paths = image_paths(args.images)
    predictions = predict_files(pretrained.load(args.checkpoint), paths, args.batch_size,
                                args.top_k)
  except ValueError as e:
    parser.exit(2, f"error: {e}\n")
  for prediction in predictions:
    if prediction.error:
      print(f"error: {prediction.path}: {prediction.error}", file=sys.stderr)
    else:
      print(json.dumps(prediction.to_json()) if args.json else format_prediction(prediction))
  if any(prediction.error for prediction in predictions):
    sys.exit(1)


if __name__ == "__main__":
  main()
