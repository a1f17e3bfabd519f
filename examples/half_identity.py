"""The toy of residual learning: fit H(x) = 0.5·x with and without a skip connection.

  python examples/half_identity.py --out half_identity.png

A two-layer ReLU network F(x) = W₂·relu(W₁x + b₁) + b₂ learns H directly (plain), or
learns the residual F = H − x through the skip connection H(x) = x + F(x), which for
H(x) = 0.5·x means F(x) = −0.5·x. Both fit the same data (x ~ N(0, I)) with the same SGD
and the same initial weights. Prints the mean squared error over training and the step at
which each first reaches `--target_mse`, averaged over `--seeds`; plots the loss curves.
Besides s = 0.5 the default `--scales 0,0.5,0.9,1` tries other targets H(x) = s·x, to show
what the skip connection buys: a head start exactly as large as H is close to the identity.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TwoLayer(nn.Module):
  """relu(x W₁ + b₁) W₂ + b₂, plus x itself when `skip`."""

  hidden: int
  skip: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.hidden)(x)))
    return x + y if self.skip else y


def mse_curve(skip: bool, scale: float, seed: int, *, dim: int, hidden: int, steps: int,
              batch_size: int, learning_rate: float) -> np.ndarray:
  """Mean squared error of every SGD step's batch, fitting H(x) = scale·x."""
  model = TwoLayer(hidden, skip)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  params = model.init(init_key, jnp.zeros((1, dim)))  # the same for both: same key, same shapes
  tx = optax.sgd(learning_rate)

  def step(carry, key):
    params, opt_state = carry
    x = jax.random.normal(key, (batch_size, dim))
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((model.apply(p, x) - scale * x) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  keys = jax.random.split(data_key, steps)
  _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys))(params)
  return np.asarray(losses)


def steps_to_reach(curve: np.ndarray, target: float) -> int | None:
  """First step (1-based) whose loss is at most `target`; None if none is."""
  hits = np.nonzero(curve <= target)[0]
  return int(hits[0]) + 1 if len(hits) else None


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float | None]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scales", default="0,0.5,0.9,1", help="comma-separated s of H(x) = s·x")
  parser.add_argument("--dim", type=int, default=16)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5000)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=0.05)
  parser.add_argument("--target_mse", type=float, default=0.01)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", default="", help="PNG of the loss curves (optional)")
  args = parser.parse_args(argv)
  scales = [float(s) for s in args.scales.split(",")]
  settings = dict(dim=args.dim, hidden=args.hidden, steps=args.steps,
                  batch_size=args.batch_size, learning_rate=args.learning_rate)

  curves, results = {}, {}
  marks = sorted({1, *(args.steps // 10 ** k for k in range(3))} - {0})
  print(f"H(x) = s·x, x in R^{args.dim}, {args.hidden} hidden units, SGD lr "
        f"{args.learning_rate}, batch {args.batch_size}; MSE averaged over {args.seeds} seeds")
  print("| s | network | " + " | ".join(f"MSE at step {m}" for m in marks) +
        f" | steps to MSE ≤ {args.target_mse:g} |")
  print("|---" * (len(marks) + 3) + "|")
  for scale in scales:
    for skip in (False, True):
      label = f"s={scale:g}, {'residual: x + F(x)' if skip else 'plain: F(x)'}"
      runs = np.stack([mse_curve(skip, scale, seed, **settings) for seed in range(args.seeds)])
      curves[label] = runs.mean(axis=0)
      reached = [steps_to_reach(run, args.target_mse) for run in runs]
      mean_steps = (None if any(r is None for r in reached) else float(np.mean(reached)))
      results[label] = {"final_mse": float(curves[label][-1]), "steps_to_target": mean_steps}
      print(f"| {scale:g} | {'residual' if skip else 'plain'} | " +
            " | ".join(f"{curves[label][m - 1]:.2e}" for m in marks) + " | " +
            (f"{mean_steps:.0f}" if mean_steps is not None else
             f"not in {args.steps} (some seeds)") + " |")

  if args.out:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    colors = dict(zip(scales, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                               "tab:brown", "tab:pink", "tab:grey")))
    for label, curve in curves.items():
      scale = float(label.split(",")[0][len("s="):])
      ax.plot(np.arange(1, len(curve) + 1), curve, label=label, color=colors.get(scale),
              linestyle="-" if "residual" in label else "--", linewidth=1)
    ax.axhline(args.target_mse, color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="SGD step", ylabel="mean squared error",
           title="Fitting H(x) = s·x with a two-layer ReLU network")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
