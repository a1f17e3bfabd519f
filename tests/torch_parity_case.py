"""The case that pins our training step to PyTorch's without torch installed.

Three float64 SGD steps of ResNet-8 (the paper's recipe: momentum 0.9, lr 0.1, weight decay
1e-4 on every parameter, as PyTorch's SGD applies it) on fixed random CIFAR-shaped batches.
`tests/fixtures/make_torch_parity_losses.py` records PyTorch's losses and BatchNorm running
means for it (torch needed);
`test_bench.py` checks ours against them in every run (torch not needed).
"""

import hashlib

import numpy as np

from resnet_jax.data.dataset_info import IMAGENET_MEAN, IMAGENET_STD
from resnet_jax.training.config import base_config

MODEL = "resnet8"
SEED = 0
LEARNING_RATES = [0.1, 0.1, 0.1]


def config():
  c = base_config()
  c.weight_decay_on_norm_and_bias = True
  return c


def batches(count: int = len(LEARNING_RATES), batch_size: int = 16) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(SEED)
  return [{"image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, (batch_size,)).astype(np.int32)} for _ in range(count)]


def fingerprint(variables, torch_batches) -> str:
  """Of the float64 initial weights and normalised batches both sides start from."""
  import jax
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(variables) + [x for batch in torch_batches for x in batch]:
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def our_steps():
  from resnet_jax.bench import torch_parity
  return torch_parity.float64_steps(MODEL, config(), batches(), LEARNING_RATES, IMAGENET_MEAN,
                                    IMAGENET_STD, SEED)
