"""Fine-tune pretrained weights on an image folder (DIR/train/<class>/*.jpg, optional val/).

  python -m resnet_jax.convert --from_torchvision resnet50 --weights resnet50.pth \
      --out weights/resnet50
  python train.py --config=configs/finetune_folder.py --config.dataset=folder:DIR \
      --config.init_from=weights/resnet50 --workdir=runs/finetune

`init_from` takes converted weights, a train.py workdir or one of its checkpoints, of the
same `model`. The head is replaced by one for the folder's classes; the backbone learns at a
tenth of the head's rate. For a linear classifier on frozen features set
`--config.freeze_backbone=True --config.backbone_learning_rate_scale=1.0`; with small
batches, `--config.freeze_batch_stats=True` keeps the pretrained BatchNorm statistics.
"""

from resnet_jax.training.config import base_config


def get_config():
  config = base_config()
  config.model = "resnet50"
  config.dataset = "folder:"  # set with --config.dataset=folder:DIR
  config.holdout_fraction = 0.1
  config.preprocessing = "auto"
  config.init_from = ""  # set with --config.init_from=DIR
  config.replace_head = True
  config.backbone_learning_rate_scale = 0.1
  config.batch_size = 64
  config.num_epochs = 10
  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.01
  config.weight_decay = 1e-4
  config.warmup_epochs = 0.5
  config.schedule = "cosine"
  config.label_smoothing = 0.1
  config.log_every_steps = 20
  return config
