"""ResNet-20 on the CIFAR-10 JPEG folder (`../shared/data/cifar10-train-jpeg.tar.gz`).

  tar -xzf cifar10-train-jpeg.tar.gz -C /data
  python train.py --config=configs/cifar10_folder.py --config.dataset=folder:/data/cifar10

The paper's recipe (He et al. 2015, section 4.2): SGD, momentum 0.9, lr 0.1, weight
decay 1e-4, batch 128, 64k iterations with lr ÷10 at 32k and 48k, 4-pixel pad + random
32×32 crop + flip. The folder has only the 50,000 training images, so 10% of each class
(5,000) is held out for validation, as the paper did (45k/5k split).

For a CPU, compress the schedule to the time you have (measured on 2 cores; `bench.budget_curve`,
BENCHMARKS.md): 2,000 steps reach 76% validation accuracy in 10 minutes, 4,000 steps 82% in
18 minutes (cosine to 0 the same, 82%; both with XLA's convolutions, at ~450 img/s):
  --config.num_train_steps=4000 --config.step_decay_boundaries='(2000, 3000)'
The recommended CPU recipe, the best measured in under 2 hours, with oneDNN's convolutions
(~960 img/s): 90.1% (one seed) from 46,000 cosine steps with weight decay 5e-4, label
smoothing 0.1 and cutout 16 (104 minutes; 90.6% with flip test-time augmentation,
`bench.budget_curve`'s second column):
  --config.num_train_steps=46000 --config.schedule=cosine --config.weight_decay=5e-4 \
      --config.label_smoothing=0.1 --config.cutout_size=16
40,000 steps of it 89.1% (91 minutes); without cutout 88.9% at 40,000 steps and 88.3% at
54,000 (the whole 2 hours). The paper's 64k steps take ~2.2 hours.
"""

from configs import cifar10_resnet20


def get_config():
  config = cifar10_resnet20.get_config()
  config.dataset = "folder:"  # set with --config.dataset=folder:DIR
  config.holdout_fraction = 0.1
  config.preprocessing = "cifar"
  config.cache = True  # 50k small JPEGs: ~50 MB of encoded records in memory
  return config
