"""Exports a checkpoint's forward pass: `python -m resnet_jax.export --checkpoint DIR --out FILE`.

The exported function (`jax.export`, StableHLO with the weights inside) maps uint8 images
[batch, image_size, image_size, in_channels] to float32 logits [batch, num_classes]; the
checkpoint's normalisation runs inside it. The batch dimension is symbolic, so one file
serves every batch size. The images must already be decoded, resized and cropped by the
checkpoint's eval preset (`ModelInfo.preprocessing` at `image_size`; `predict.prepare` does
it), as in evaluation. FILE.json beside FILE holds the ModelInfo (class names, image size,
preset, mean and std) and the input and output signatures. `--saved_model DIR` also writes
a TensorFlow SavedModel of the same function (through jax2tf; signature `serving_default`:
uint8 `images` → float32 `logits`), with the same polymorphic batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from resnet_jax import cli
from resnet_jax import pretrained
from resnet_jax.models import layers
from resnet_jax.predict import apply_fn
from resnet_jax.storage import paths

PLATFORMS = ("cpu", "cuda", "tpu")  # lowered for each by default: the file runs on any of them
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
BATCH = "batch"  # the symbolic dimension's name


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """A deserialised forward pass: call it on prepared uint8 images to get float32 logits."""
  exported: jax.export.Exported
  info: pretrained.ModelInfo | None  # from FILE.json, when it is there

  def __call__(self, images: jax.Array | np.ndarray) -> jax.Array:
    return self.exported.call(images)


def input_shape(info: pretrained.ModelInfo) -> tuple[str, int, int, int]:
  """The input's shape with the batch dimension named, as FILE.json records it."""
  return (BATCH, info.image_size, info.image_size, info.in_channels)


def check_platforms(platforms: Sequence[str]) -> None:
  """Raises ValueError naming any platform that JAX cannot lower for (it would not say)."""
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"platforms={list(platforms)}: each must be one of {list(KNOWN_PLATFORMS)}")


def export_forward(weights: pretrained.Pretrained, platforms: Sequence[str] = PLATFORMS
                   ) -> jax.export.Exported:
  """The eval-mode forward pass of `weights` (normalisation included) with a symbolic batch."""
  check_platforms(platforms)
  batch, = jax.export.symbolic_shape(BATCH)
  images = jax.ShapeDtypeStruct((batch, *input_shape(weights.info)[1:]), jnp.uint8)
  forward = jax.jit(functools.partial(apply_fn(weights.info, layers.xla_layer_impl()),
                                      weights.variables))
  return jax.export.export(forward, platforms=platforms)(images)


def write(exported: jax.export.Exported, weights: pretrained.Pretrained,
          file: str | os.PathLike) -> None:
  """Writes the serialised `exported` to `file` and its description to `file`.json."""
  info = weights.info
  description = {
      "model": info.to_json(),
      "input": {"shape": input_shape(info), "dtype": "uint8",
                "prepared_by": f"resnet_jax.data.preprocessing.PRESETS[{info.preprocessing!r}]"
                               f".eval at image_size {info.image_size}"},
      "output": {"shape": [BATCH, info.num_classes], "dtype": "float32", "meaning": "logits"},
      "platforms": list(exported.platforms),
      "checkpoint": os.fspath(weights.path),
  }
  file = paths.resolve(file)
  file.parent.mkdir(parents=True, exist_ok=True)
  file.write_bytes(exported.serialize())
  _description_file(file).write_text(json.dumps(description, indent=1))


def _description_file(file: epath.Path) -> epath.Path:
  return file.with_name(file.name + ".json")


def load_exported(file: str | os.PathLike) -> ExportedModel:
  """Reads what `write` wrote; raises ValueError naming `file` if it is missing or not one."""
  file = paths.resolve(file)
  if not file.is_file():
    raise ValueError(f"{file}: no such file (expected the output of resnet_jax.export)")
  blob = bytearray(file.read_bytes())
  try:
    exported = jax.export.deserialize(blob)
  except Exception as e:  # the flatbuffer reader raises many types; all mean "not a program"
    raise ValueError(f"{file} is not a serialised jax.export program ({type(e).__name__}: "
                     f"{e}); write it with resnet_jax.export") from None
  info = None
  if _description_file(file).is_file():
    info = pretrained.ModelInfo.from_json(json.loads(_description_file(file).read_text())["model"])
  return ExportedModel(exported, info)


def save_tf_saved_model(weights: pretrained.Pretrained, directory: str,
                        platforms: Sequence[str] = PLATFORMS) -> None:
  """Writes the forward pass as a TensorFlow SavedModel (weights as tf.Variables)."""
  import tensorflow as tf  # only this option needs TensorFlow's graph machinery
  from jax.experimental import jax2tf

  check_platforms(platforms)
  shape = input_shape(weights.info)
  converted = jax2tf.convert(
      apply_fn(weights.info, layers.xla_layer_impl()), with_gradient=False,
      native_serialization_platforms=platforms,
      polymorphic_shapes=[None, "(" + ", ".join(map(str, shape)) + ")"])
  variables = tf.nest.map_structure(tf.Variable, weights.variables)
  module = tf.Module()
  module.model_variables = tf.nest.flatten(variables)  # tracked, so they are saved
  module.serve = tf.function(
      lambda images: {"logits": converted(variables, images)}, autograph=False,
      input_signature=[tf.TensorSpec([None, *shape[1:]], tf.uint8, name="images")])
  tf.saved_model.save(module, directory, signatures={"serving_default": module.serve})


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.export", __doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="a train.py workdir, one of its checkpoints, or converted weights")
  parser.add_argument("--out", required=True, help="the serialised program; FILE.json beside it")
  parser.add_argument("--saved_model", default=None,
                      help="also write a TensorFlow SavedModel in this (new) directory")
  parser.add_argument("--platforms", default=",".join(PLATFORMS),
                      help="comma-separated platforms to lower for")
  args = parser.parse_args(argv)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  try:
    if args.saved_model and paths.resolve(args.saved_model).exists():
      raise ValueError(f"--saved_model={args.saved_model} already exists; choose a new directory")
    weights = pretrained.load(args.checkpoint)
    write(export_forward(weights, platforms), weights, args.out)
    if args.saved_model:
      # TensorFlow writes it, through its own client for a bucket.
      save_tf_saved_model(weights, os.fspath(paths.resolve(args.saved_model)), platforms)
  except (ValueError, OSError) as e:  # OSError: --out or --saved_model cannot be written
    parser.exit(2, f"error: {e}\n")
  print(f"Wrote {args.out} and {args.out}.json ({weights.info.model}, input uint8 "
        f"{list(input_shape(weights.info))}, {', '.join(platforms)})"
        + (f" and the SavedModel {args.saved_model}/" if args.saved_model else ""))


if __name__ == "__main__":
  main()
