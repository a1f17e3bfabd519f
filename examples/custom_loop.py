"""A training loop of your own around resnet_jax's pure step: ResNet-8 learns one batch.

  python examples/custom_loop.py [--steps 30]

The model, the train state and the jitted step come from the library; the loop, the data
and the optimiser are yours. A loop that works drives the loss on a fixed batch down.
"""

import argparse
import functools

import jax
import numpy as np
import optax

from resnet_jax import create_model
from resnet_jax.training import InputTransform, create_train_state, eval_step, train_step


def main(steps: int = 30, batch_size: int = 32) -> tuple[float, float]:
  """Trains on one random batch of 32×32 RGB images; returns the first and last loss."""
  model = create_model("resnet8", num_classes=10)
  learning_rate = optax.constant_schedule(0.05)
  tx = optax.sgd(learning_rate, momentum=0.9)
  state = create_train_state(jax.random.PRNGKey(0), model, tx, image_shape=(32, 32, 3))
  inputs = InputTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # pixels in [0, 1] units
  step = jax.jit(functools.partial(train_step, learning_rate_fn=learning_rate, inputs=inputs))
  evaluate = jax.jit(functools.partial(eval_step, inputs=inputs))

  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, batch_size)}
  losses = []
  for i in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    if i % 10 == 0 or i == steps - 1:
      print(f"step {i + 1}: loss {losses[-1]:.3f}")
  sums = evaluate(state, {**batch, "mask": np.ones(batch_size, np.float32)})
  print(f"eval: accuracy {float(sums['correct'] / sums['count']):.0%} on the batch it learned")
  return losses[0], losses[-1]


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=30)
  main(parser.parse_args().steps)
