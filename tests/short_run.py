"""The short training runs that tests share."""

import os

import ml_collections
import numpy as np
import pytest

from resnet_jax.training.config import base_config


def short_digits_config(data_dir: str) -> ml_collections.ConfigDict:
  """4 steps of ResNet-8 on the 8×8 digits, 32 per global batch, constant learning rate."""
  c = base_config()
  c.dataset = "digits"
  c.data_dir = data_dir
  c.model = "resnet8"
  c.batch_size = 32
  c.num_train_steps = 4
  c.schedule = "constant"
  c.learning_rate = 0.05
  c.log_every_steps = 2
  c.progress_bar = False
  return c


def run_steps(config: ml_collections.ConfigDict, num_steps: int):
  """(final state, host metrics of each step) of `num_steps` train steps from a fresh state,
  the state back in its replicated (checkpoint) layout, on the host."""
  import jax
  from resnet_jax.training import loop
  exp = loop.setup(config)
  dp = exp.data_parallel
  state = dp.put_state(exp.initial_state)
  batches = loop.train_batches(exp, 0)
  history = []
  for _ in range(num_steps):
    state, metrics = dp.train_step(state, dp.put_batch(next(batches)))
    history.append(jax.device_get(metrics))
  return jax.device_get(dp.get_state(state)), history


def digit_folder(root: str, digits, per_class: int, val_per_class: int = 0) -> str:
  """An image folder of real 8×8 handwritten digits as grey PNGs (scikit-learn's set)."""
  from PIL import Image
  from sklearn.datasets import load_digits
  images, labels = load_digits(return_X_y=True)
  for digit in digits:
    of_digit = images[labels == digit].reshape(-1, 8, 8) * (255 / 16)
    for split, chosen in (("train", of_digit[:per_class]),
                          ("val", of_digit[per_class:per_class + val_per_class])):
      if not len(chosen):
        continue
      folder = os.path.join(root, split, f"digit_{digit}")
      os.makedirs(folder, exist_ok=True)
      for i, pixels in enumerate(chosen):
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
  return str(root)


def short_folder_config(folder: str, data_dir: str, steps: int = 4) -> ml_collections.ConfigDict:
  """`steps` steps of ResNet-8 on an image folder, 16 per global batch, constant lr."""
  c = base_config()
  c.model, c.dataset, c.data_dir = "resnet8", f"folder:{folder}", data_dir
  c.batch_size, c.num_train_steps, c.schedule = 16, steps, "constant"
  c.learning_rate, c.progress_bar, c.log_every_steps = 0.05, False, 2
  return c


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
  """A directory all pytest-xdist workers of this session share (without xdist: a new one)."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return str(tmp_path_factory.mktemp(name))
  path = tmp_path_factory.getbasetemp().parent / name  # the workers' basetemps sit side by side
  path.mkdir(exist_ok=True)
  return str(path)
