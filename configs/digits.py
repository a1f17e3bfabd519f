"""The default: a CIFAR-style ResNet-20 on scikit-learn's 8×8 handwritten digits, on a CPU."""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet20"
  config.dataset = "digits"
  config.batch_size = 64
  config.num_epochs = 20
  config.learning_rate = 0.1
  config.warmup_epochs = 1
  config.schedule = "cosine"
  config.weight_decay = 5e-4
  config.log_every_steps = 10
  config.eval_every_steps = 44  # every 2 epochs (22 steps each)
  config.checkpoint_every_steps = 110  # every 5 epochs
  return config
