"""The short training run that tests share (in-process and in worker subprocesses)."""

import ml_collections

from resnet_jax.training.config import base_config


def short_digits_config(data_dir: str) -> ml_collections.ConfigDict:
  """4 steps of ResNet-20 on the 8×8 digits, 32 per global batch, constant learning rate."""
  c = base_config()
  c.dataset = "digits"
  c.data_dir = data_dir
  c.model = "resnet20"
  c.batch_size = 32
  c.num_train_steps = 4
  c.schedule = "constant"
  c.learning_rate = 0.05
  c.log_every_steps = 2
  c.progress_bar = False
  return c
