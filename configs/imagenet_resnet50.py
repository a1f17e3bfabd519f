"""ResNet-50 (v1.5) on ImageNet: 90 epochs, SGD Nesterov, lr 0.1 × batch/256, cosine.

5 warmup epochs; label smoothing 0.1 (set --config.label_smoothing=0 for the plain
recipe); bfloat16 compute with float32 params. Needs imagenet2012 prepared by tfds.
"""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet50"
  config.dataset = "imagenet2012"
  config.image_size = 224
  config.batch_size = 1024
  config.num_epochs = 90
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.nesterov = True
  config.learning_rate = 0.1
  config.scale_learning_rate_by_batch = True
  config.weight_decay = 1e-4  # coupled L2; norms and biases excluded.
  config.schedule = "cosine"
  config.warmup_epochs = 5
  config.label_smoothing = 0.1
  config.zero_init_residual = True
  config.dtype = "bfloat16"
  config.parallelism = "jit"
  config.log_every_steps = 100
  config.eval_every_steps = 0  # every epoch
  config.checkpoint_every_steps = 0  # every epoch
  return config
