"""ResNet-20 on CIFAR-10 with the recipe of He et al. (2015), section 4.2.

SGD with momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, 64k iterations, lr ÷10 at
32k and 48k; 4-pixel pad, random crop and flip. Needs CIFAR-10 prepared by tfds
(`tfds build cifar10 --data_dir=...`). The paper reports 8.75% test error.
"""

from resnet_jax.training.config import base_config


def get_config(model: str = "resnet20"):
  config = base_config()
  config.model = model
  config.dataset = "cifar10"
  config.batch_size = 128
  config.num_train_steps = 64_000
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.schedule = "step"
  config.step_decay_boundaries = (32_000, 48_000)
  config.step_decay_factor = 0.1
  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.checkpoint_every_steps = 2_000
  return config
