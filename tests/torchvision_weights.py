"""Random torchvision-layout weights and input images, the same with or without torch.

Everything comes from `np.random.default_rng` in a fixed order, so the logits torchvision
computed once (tests/fixtures/torchvision_logits.npz) can be checked in CI without torch;
`fingerprint` tells a change of NumPy's generator apart from a parity failure.
`torchvision_logits` (needs torch) computes the reference, for the fixture and live tests.
"""

import hashlib
import math

import numpy as np

from resnet_jax.interop import to_state_dict
from resnet_jax.models import create_model
from resnet_jax.pretrained import variable_shapes

SEED = 0
NUM_CLASSES = 10  # a small head keeps the fixture at a few KB; its size changes no mapping
IMAGE_SHAPE = (2, 64, 64, 3)  # NHWC; 64 px still leaves 2×2 features after the last stage


def random_state_dict(name: str, seed: int = SEED,
                      num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
  """A float32 torchvision state dict for registry model `name`, drawn in sorted key order.

  Conv and fc weights are N(0, 1/fan_in) (Kaiming's scale with gain 1, so activations stay
  moderate through 50 residual blocks); BatchNorm is far from the identity: weight
  U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1), running_var U(0.5, 1.5).
  """
  shapes = to_state_dict(name, variable_shapes(create_model(name, num_classes=num_classes)))
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key in sorted(shapes):
    shape, leaf = shapes[key].shape, key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
      state_dict[key] = shapes[key]
    elif len(shape) > 1:
      fan_in = math.prod(shape[1:])
      state_dict[key] = rng.standard_normal(shape, np.float32) * np.float32(fan_in**-0.5)
    elif leaf in ("weight", "running_var"):
      state_dict[key] = rng.random(shape, np.float32) + np.float32(0.5)
    else:  # bias, running_mean
      state_dict[key] = rng.standard_normal(shape, np.float32) * np.float32(0.1)
  return state_dict


def random_images(seed: int = SEED) -> np.ndarray:
  """A float32 NHWC batch of standard-normal pixels (as after normalisation)."""
  return np.random.default_rng(seed).standard_normal(IMAGE_SHAPE, np.float32)


def fingerprint(state_dict: dict[str, np.ndarray], images: np.ndarray) -> str:
  """A short hash of the weights (keys and bytes, in sorted key order) and the images."""
  digest = hashlib.sha256()
  for key in sorted(state_dict):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(state_dict[key]).tobytes())
  digest.update(images.tobytes())
  return digest.hexdigest()[:16]


def torchvision_logits(name: str, state_dict: dict[str, np.ndarray],
                       images: np.ndarray) -> np.ndarray:
  """Logits of torchvision's `name` with `state_dict` on NHWC `images`, eval mode, float32.

  Needs torch and torchvision, imported before TensorFlow (which otherwise crashes torch).
  """
  import torch
  import torchvision

  model = getattr(torchvision.models, name)(num_classes=len(state_dict["fc.bias"]))
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
