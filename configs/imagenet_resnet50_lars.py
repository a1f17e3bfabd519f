"""Large-batch ResNet-50 on ImageNet with LARS, after the MLPerf reference.

Batch 32k, LARS (trust coefficient 0.001, momentum 0.9), weight decay 5e-5 with norms and
biases excluded from both decay and the trust ratio, peak lr 29 reached after 18 warmup
epochs, polynomial (power 2) decay, label smoothing 0.1, 72 epochs, bfloat16.
"""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet50"
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.batch_size = 32_768
  config.num_epochs = 72
  config.optimizer = "lars"
  config.momentum = 0.9
  config.lars_trust_coefficient = 0.001
  config.learning_rate = 29.0
  config.weight_decay = 5e-5
  config.schedule = "polynomial"
  config.polynomial_power = 2.0
  config.end_learning_rate = 1e-4
  config.warmup_epochs = 18
  config.label_smoothing = 0.1
  config.zero_init_residual = True
  config.dtype = "bfloat16"
  config.parallelism = "jit"
  config.log_every_steps = 50
  return config
