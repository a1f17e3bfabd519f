"""Converts torchvision weights into resnet_jax weights with their ModelInfo.

  python -m resnet_jax.convert --from_torchvision resnet50 --weights resnet50.pth \
      --out weights/resnet50 [--class_names classes.txt]

Reads a state dict from `.pth`/`.pt` (torch.load with weights_only=True: tensors only, never
arbitrary pickled objects) or `.safetensors` (no torch needed) and writes it with
`pretrained.save`, for `pretrained.load`, `config.init_from`, predict and export. Class
names: `--class_names FILE` (one per line), else torchvision's ImageNet categories for
1000-class weights when torchvision is installed. Every path may be local or in a bucket.
"""

from __future__ import annotations

import difflib
import io
import os
import pickle
from typing import Any, Mapping, Sequence

try:  # torch must be imported before TensorFlow (pulled in by resnet_jax.pretrained).
  import torch
except ImportError:
  torch = None

import safetensors.numpy

from resnet_jax import cli, pretrained
from resnet_jax.interop import TORCHVISION_MODELS, StateDictMismatch, from_state_dict
from resnet_jax.storage import paths

TORCH_EXTENSIONS = (".pth", ".pt")
SAFETENSORS_EXTENSION = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints often nest the weights so


def read_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
  """The state dict in a .pth/.pt or .safetensors file, unwrapped from {"state_dict": ...}
  or {"model": ...}. Raises ValueError saying what is wrong with the file."""
  path = paths.resolve(path)
  extension = path.suffix.lower()
  if extension not in TORCH_EXTENSIONS + (SAFETENSORS_EXTENSION,):
    raise ValueError(f"{path}: unknown extension {extension!r}; expected .pth, .pt or "
                     ".safetensors")
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  if extension in TORCH_EXTENSIONS and torch is None:
    raise ValueError(f"reading {path} needs torch: pip install torch, or convert the file "
                     "to .safetensors, which needs no torch")
  try:
    if extension == SAFETENSORS_EXTENSION:
      state_dict = safetensors.numpy.load(path.read_bytes())
    else:
      state_dict = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu",
                              weights_only=True)
  except pickle.UnpicklingError:  # torch's message suggests the unsafe weights_only=False
    raise ValueError(f"could not read {path} as tensors only: it is corrupt, or pickles other "
                     "objects (a whole model?); save model.state_dict() instead") from None
  except Exception as e:  # torch and safetensors raise many types; all mean "unreadable"
    reason = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"could not read {path}: {type(e).__name__}: {reason}") from None
  for key in WRAPPER_KEYS:
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get(key), Mapping):
      state_dict = state_dict[key]
      break
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
  return state_dict


def read_class_names(path: str | os.PathLike, num_classes: int) -> tuple[str, ...]:
  """The non-empty lines of `path`, which must be exactly `num_classes`."""
  try:
    lines = paths.resolve(path).read_text().splitlines()
    names = tuple(line.strip() for line in lines if line.strip())
  except OSError as e:
    raise ValueError(f"could not read the class names in {path}: {e.strerror}") from None
  if len(names) != num_classes:
    raise ValueError(f"{path} names {len(names)} classes but the weights have {num_classes}")
  return names


def imagenet_class_names() -> tuple[str, ...]:
  """torchvision's names of the 1000 ImageNet classes, or () without torchvision."""
  try:
    from torchvision.models import ResNet50_Weights
  except ImportError:
    return ()
  # Every torchvision ImageNet-1k weight enum carries the same category list.
  return tuple(ResNet50_Weights.DEFAULT.meta["categories"])


def convert(name: str, weights: str, out: str,
            class_names_file: str | None) -> pretrained.ModelInfo:
  """Reads torchvision weights from `weights` and saves them, with their ModelInfo, in `out`."""
  if name not in TORCHVISION_MODELS:
    close = difflib.get_close_matches(name, TORCHVISION_MODELS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"--from_torchvision {name!r} is not a torchvision ResNet.{hint} "
                     f"Choose one of: {', '.join(TORCHVISION_MODELS)}")
  if paths.resolve(out).exists():  # before reading what may be gigabytes of weights
    raise ValueError(f"--out {out} already exists; choose a new directory")
  variables = from_state_dict(name, read_state_dict(weights))
  num_classes = variables["params"]["fc"]["kernel"].shape[-1]
  if class_names_file:
    class_names = read_class_names(class_names_file, num_classes)
  else:
    class_names = imagenet_class_names() if num_classes == 1000 else ()
  info = pretrained.ModelInfo(model=name, num_classes=num_classes, image_size=224,
                              preprocessing="imagenet", class_names=class_names,
                              source=os.fspath(paths.resolve(weights)))
  pretrained.save(out, variables, info)
  return info


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.convert", __doc__)
  parser.add_argument("--from_torchvision", required=True, metavar="NAME",
                      help=f"one of: {', '.join(TORCHVISION_MODELS)}")
  parser.add_argument("--weights", required=True, metavar="FILE",
                      help="a torchvision state dict: .pth, .pt or .safetensors")
  parser.add_argument("--out", required=True, metavar="DIR", help="a new directory")
  parser.add_argument("--class_names", metavar="FILE", help="one class name per line")
  parser.add_argument("--verbose", action="store_true",
                      help="with a state dict that does not fit, list every difference")
  args = parser.parse_args(argv)
  try:
    info = convert(args.from_torchvision, args.weights, args.out, args.class_names)
  except StateDictMismatch as e:
    details = "".join(f"\n  {problem}" for problem in e.problems) if args.verbose else (
        " (--verbose lists them)")
    parser.exit(2, f"error: {e}{details}\n")
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  names = f"{len(info.class_names)} class names" if info.class_names else "numbered classes"
  print(f"Converted {info.model} ({info.num_classes} classes, {names}) from {args.weights} "
        f"to {args.out}")


if __name__ == "__main__":
  main()
