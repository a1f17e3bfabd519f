"""Any image folder: `python train.py --config=configs/folder.py --config.dataset=folder:DIR`.

DIR/train/<class>/*.jpg (and optionally DIR/val/ or DIR/test/); without a val/ or test/
folder, `holdout_fraction` of each class is held out for evaluation. The folder is checked
and prepared once into `data_dir` (tfds' default when empty), again only when it changes.
Preprocessing is chosen by image size: CIFAR-style for small images (≤ 64 px), Inception
crops at 224 px for larger ones. ResNet-18 from scratch with SGD, cosine decay and label
smoothing.
"""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.dataset = "folder:"  # set with --config.dataset=folder:DIR
  config.model = "resnet18"
  config.holdout_fraction = 0.1
  config.preprocessing = "auto"
  config.batch_size = 64
  config.num_epochs = 30
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.scale_learning_rate_by_batch = True  # 0.1 × batch / 256
  config.weight_decay = 1e-4
  config.warmup_epochs = 1
  config.schedule = "cosine"
  config.label_smoothing = 0.1
  config.log_every_steps = 20
  return config
