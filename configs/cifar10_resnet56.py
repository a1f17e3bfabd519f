"""ResNet-56 on CIFAR-10, the paper's recipe (see cifar10_resnet20.py). Paper: 6.97% error."""

from configs import cifar10_resnet20


def get_config():
  return cifar10_resnet20.get_config(model="resnet56")
