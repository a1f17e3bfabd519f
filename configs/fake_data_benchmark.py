"""Throughput run: ResNet-50 on synthetic ImageNet-shaped data (no dataset needed).

  python train.py --config=configs/fake_data_benchmark.py --workdir=runs/fake \
      --config.batch_size=256 --config.num_train_steps=100
"""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet50"
  config.dataset = "fake"
  config.image_size = 224
  config.batch_size = 256
  config.num_train_steps = 200
  config.learning_rate = 0.1
  config.scale_learning_rate_by_batch = True
  config.warmup_epochs = 0
  config.schedule = "constant"
  config.dtype = "bfloat16"
  config.parallelism = "jit"
  config.log_every_steps = 20
  config.eval_every_steps = 1_000_000  # only at the end
  config.checkpoint_every_steps = 1_000_000  # only at the end
  return config
