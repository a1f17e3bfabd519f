"""Training parity with PyTorch: the paper's CIFAR ResNet trained by both, from the same start.

  tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C /tmp/data
  python -m resnet_jax.bench.torch_parity --cifar_dir /tmp/data/cifar10 --model resnet20 \
      --steps 300 --seeds 3

For each seed, our run (configs/cifar10_folder.py: SGD, momentum 0.9, lr 0.1 ÷10 at 50% and
75% of `--steps`, weight decay 1e-4 on every parameter, as PyTorch's SGD applies it:
`weight_decay_on_norm_and_bias`) and the same net in PyTorch (`interop.torch_cifar`, option
A shortcuts, BatchNorm momentum 0.1 and epsilon 1e-5), initialised from our initial weights
and fed our batches (the same augmented pixels, normalised the same way), with
`torch.optim.SGD` at the same learning rate at every step. The seeds train as one population
on our side. It checks that the first 3 steps' losses agree within 1e-4 (relative) and that
over all steps the mean loss curves (in windows of `--window` steps) agree within their
spread across seeds, then times one train step of each (ours; PyTorch NCHW and
channels-last), one of each in turn. Writes OUT/parity.md, OUT/parity.json and
OUT/loss_curves.png. Needs torch (not a dependency of resnet_jax).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
from collections.abc import Sequence

import numpy as np

from resnet_jax import cli, malloc_tuning
from resnet_jax.bench import check_cifar_dir, write_json
from resnet_jax.interop import to_state_dict

FIRST_STEPS = 3
FIRST_STEPS_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Window:
  first_step: int
  last_step: int
  ours_mean: float  # of the seeds' mean losses over the window
  ours_std: float  # across seeds
  torch_mean: float
  torch_std: float
  agrees: bool  # |ours − torch| ≤ the larger of the two spreads across seeds


@dataclasses.dataclass(frozen=True)
class Speed:
  ours_images_per_s: float
  torch_nchw_images_per_s: float
  torch_channels_last_images_per_s: float
  rounds: int


@dataclasses.dataclass(frozen=True)
class Parity:
  model: str
  steps: int
  seeds: int
  batch_size: int
  torch_version: str
  ours_losses: list[list[float]]  # [seed][step]
  torch_losses: list[list[float]]
  first_steps_max_rel_diff: float  # float32, the run above
  float64_ours: list[float]  # the first steps again, in float64 (seed 0's start)
  float64_torch: list[float]
  float64_max_rel_diff: float
  float64_running_means_max_rel_diff: float  # of every BatchNorm's, after those steps
  first_steps_agree: bool  # in float64, losses and running means within FIRST_STEPS_RTOL
  windows: list[Window]
  curves_agree: bool  # every window agrees
  speed: Speed | None


def normalizer(exp):
  """Our train step's normalisation of uint8 batches (no mixing is configured), compiled."""
  import jax
  from resnet_jax.data.device_ops import InputTransform
  return jax.jit(InputTransform(mean=exp.dataset.mean, std=exp.dataset.std).eval_images)


@dataclasses.dataclass(frozen=True)
class Float64Steps:
  """Our first steps in float64, and what PyTorch needs to take the same ones."""

  losses: list[float]
  initial_variables: dict  # {"params", "batch_stats"}: host float64 arrays
  torch_batches: list[tuple[np.ndarray, np.ndarray]]  # normalised NCHW float64, labels
  running_means: dict[str, np.ndarray]  # after the steps, by PyTorch's name ("bn1.running_mean")


def float64_steps(model: str, config, batches: list[dict[str, np.ndarray]],
                  learning_rates: list[float], mean, std, seed: int, num_classes: int = 10
                  ) -> Float64Steps:
  """Our train step in float64 (plain layers) on `batches` from the initial weights of `seed`.

  In float32, SGD at lr 0.1 amplifies rounding (reduction order alone: our jit and pmap
  steps differ by 4e-4 at step 3), so float32 losses cannot show that two implementations
  compute the same thing beyond the first step; in float64 any difference left is one of
  meaning (optimizer, weight decay, BatchNorm, schedule), not of rounding.
  """
  import functools
  import jax
  import jax.numpy as jnp
  from resnet_jax.data.device_ops import InputTransform
  from resnet_jax.models import create_model
  from resnet_jax.training import optimizers, steps
  from resnet_jax.training.train_state import create_train_state
  with jax.enable_x64(True):
    net = create_model(model, num_classes=num_classes, dtype=jnp.float64,
                       param_dtype=jnp.float64, layer_impl="plain")
    schedule = lambda step: jnp.asarray(learning_rates)[step]  # noqa: E731
    tx = optimizers.create_optimizer(config, schedule)
    image_shape = batches[0]["image"].shape[1:]
    state = create_train_state(jax.random.PRNGKey(seed), net, tx, image_shape)
    inputs = InputTransform(mean=mean, std=std, dtype=jnp.float64)
    step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=schedule, inputs=inputs))
    normalize = jax.jit(inputs.eval_images)
    variables = jax.device_get(state.variables)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    torch_batches = [(np.asarray(normalize(b["image"])).transpose(0, 3, 1, 2).copy(), b["label"])
                     for b in batches]
    final = jax.device_get(state.variables)
  return Float64Steps(losses, variables, torch_batches,
                      running_means(to_state_dict(model, final)))


def running_means(state_dict: dict) -> dict[str, np.ndarray]:
  """The BatchNorm running means of a PyTorch-named state dict, as float64 arrays.

  (Running variances differ by design: PyTorch keeps the unbiased batch variance, Flax the
  biased one.)"""
  return {k: np.asarray(v, np.float64) for k, v in state_dict.items()
          if k.endswith("running_mean")}


def max_relative_difference(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
  """The largest |ours − theirs| over max |theirs|, array by array (the same keys)."""
  return max(float(np.max(np.abs(ours[k] - theirs[k])) / max(np.max(np.abs(theirs[k])), 1e-30))
             for k in theirs)


def float64_first_steps(model: str, config, batches: list[dict[str, np.ndarray]],
                        learning_rates: list[float], mean, std, seed: int
                        ) -> tuple[list[float], list[float], float]:
  """The losses of the first steps in float64 on both sides, from our float64 initial
  weights, and the largest relative difference of the BatchNorm running means after them."""
  ours = float64_steps(model, config, batches, learning_rates, mean, std, seed)
  theirs, their_means = torch_train(model, ours.initial_variables, ours.torch_batches,
                                    learning_rates, config.momentum, config.weight_decay)
  return ours.losses, theirs, max_relative_difference(ours.running_means, their_means)


def torch_train(model: str, variables: dict, batches: list[tuple[np.ndarray, np.ndarray]],
                learning_rates: list[float], momentum: float, weight_decay: float
                ) -> tuple[list[float], dict[str, np.ndarray]]:
  """Trains the PyTorch twin of `model` from `variables` on `batches` (NCHW floats);
  returns the loss of each step (before its update) and the BatchNorm running means."""
  import torch
  from resnet_jax.interop import torch_cifar
  net = torch_cifar.from_variables(model, variables).train()
  optimizer = torch.optim.SGD(net.parameters(), lr=learning_rates[0], momentum=momentum,
                              weight_decay=weight_decay)
  losses = []
  for (images, labels), learning_rate in zip(batches, learning_rates):
    for group in optimizer.param_groups:
      group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(images)),
                                             torch.from_numpy(labels.copy()).long())
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
  return losses, running_means({k: v.numpy() for k, v in net.state_dict().items()})


def windows_of(ours: np.ndarray, theirs: np.ndarray, window: int) -> list[Window]:
  """Window-by-window comparison of [seed, step] loss curves."""
  result = []
  for start in range(0, ours.shape[1], window):
    ours_w = ours[:, start:start + window].mean(axis=1)
    theirs_w = theirs[:, start:start + window].mean(axis=1)
    spread = max(float(np.std(ours_w)), float(np.std(theirs_w)))
    difference = abs(float(np.mean(ours_w)) - float(np.mean(theirs_w)))
    result.append(Window(start + 1, min(start + window, ours.shape[1]), float(np.mean(ours_w)),
                         float(np.std(ours_w)), float(np.mean(theirs_w)),
                         float(np.std(theirs_w)), difference <= spread))
  return result


def time_steps(model: str, config, rounds: int) -> Speed:
  """One train step of ours and of PyTorch's (NCHW, channels-last) in turn, `rounds` times."""
  import torch
  from resnet_jax.bench import torch_reference
  from resnet_jax.bench.throughput import step_timer
  from resnet_jax.training import loop
  exp = loop.setup(config)
  batch = next(loop.train_batches(exp, 0))
  images = torch.from_numpy(np.asarray(normalizer(exp)(batch["image"])).transpose(0, 3, 1, 2)
                            .copy())
  labels = torch.from_numpy(batch["label"].copy()).long()
  theirs = [torch_reference.step_timer(model, images, labels, channels_last=channels_last,
                                       num_classes=exp.model.num_classes).time_one_step
            for channels_last in (False, True)]
  for time_one_step in theirs:
    time_one_step()  # warm-up
  timers = [step_timer(exp), *theirs]
  times = [[] for _ in timers]
  for _ in range(rounds):
    for timer, seconds in zip(timers, times):
      seconds.append(timer())
  per_s = [config.batch_size / statistics.median(t) for t in times]
  return Speed(*per_s, rounds=rounds)


def run(cifar_dir: str, workdir: str, model: str, steps: int, seeds: int, batch_size: int,
        window: int, speed_rounds: int) -> Parity:
  import jax
  import torch
  from resnet_jax.bench import degradation
  from resnet_jax.training import loop, population

  config = degradation.run_config(model, cifar_dir, os.path.join(workdir, "tensorflow_datasets"),
                                  steps, eval_every=steps, log_every=steps)
  config.batch_size = batch_size
  config.weight_decay_on_norm_and_bias = True  # PyTorch's SGD decays every parameter
  config.population_size = seeds
  exp = loop.setup(config)
  initial = jax.device_get(exp.initial_state)
  dp = exp.data_parallel
  state = dp.put_state(exp.initial_state)
  ours, batches, learning_rates = [], [], []  # PyTorch takes our learning rate of each step
  normalize = normalizer(exp)
  first_batches = []
  for batch in itertools.islice(loop.train_batches(exp, 0), steps):
    if len(first_batches) < FIRST_STEPS:
      first_batches.append(batch)
    state, metrics = dp.train_step(state, dp.put_batch(batch))
    metrics = jax.device_get(metrics)
    ours.append(np.atleast_1d(metrics["loss"]))
    learning_rates.append(float(np.atleast_1d(metrics["learning_rate"])[0]))
    batches.append((np.asarray(normalize(batch["image"])).transpose(0, 3, 1, 2).copy(),
                    batch["label"]))
  ours = np.stack(ours, axis=1)  # [seed, step]
  theirs = np.asarray([
      torch_train(model, jax.tree.map(np.asarray, {
          "params": population.member(initial.params, i) if seeds > 1 else initial.params,
          "batch_stats": (population.member(initial.batch_stats, i) if seeds > 1
                          else initial.batch_stats)}),
                  batches, learning_rates, config.momentum, config.weight_decay)[0]
      for i in range(seeds)])
  first = np.abs(ours[:, :FIRST_STEPS] - theirs[:, :FIRST_STEPS]) / np.abs(theirs[:, :FIRST_STEPS])
  ours64, theirs64, means64 = float64_first_steps(model, config, first_batches,
                                                  learning_rates[:FIRST_STEPS], exp.dataset.mean,
                                                  exp.dataset.std, config.seed)
  first64 = float(np.max(np.abs(np.subtract(ours64, theirs64)) / np.abs(theirs64)))
  windows = windows_of(ours, theirs, window)
  single = config.copy_and_resolve_references()
  single.population_size = 1
  speed = time_steps(model, single, speed_rounds) if speed_rounds else None
  return Parity(model, steps, seeds, batch_size, torch.__version__, ours.tolist(),
                theirs.tolist(), float(first.max()), ours64, theirs64, first64, means64,
                max(first64, means64) <= FIRST_STEPS_RTOL, windows,
                all(w.agrees for w in windows), speed)


def format_report(p: Parity) -> str:
  lines = [f"# Training parity: {p.model} in resnet_jax and PyTorch {p.torch_version}",
           "",
           f"{p.seeds} seeds, {p.steps} steps of {p.batch_size}, the same initial weights and "
           "batches on both sides.",
           "",
           f"- First {FIRST_STEPS} steps in float64: largest relative loss difference "
           f"{p.float64_max_rel_diff:.1e}, of the BatchNorm running means after them "
           f"{p.float64_running_means_max_rel_diff:.1e} "
           f"({'within' if p.first_steps_agree else 'OUTSIDE'} {FIRST_STEPS_RTOL:g}); "
           "in float32 (the run below) "
           f"{p.first_steps_max_rel_diff:.1e}: SGD at this learning rate amplifies rounding.",
           f"- Loss curves: {sum(w.agrees for w in p.windows)} of {len(p.windows)} windows agree "
           "within the spread across seeds.",
           "",
           "| steps | ours: mean ± std | PyTorch: mean ± std | difference | agree |",
           "|---|---|---|---|---|"]
  for w in p.windows:
    lines.append(f"| {w.first_step}–{w.last_step} | {w.ours_mean:.4f} ± {w.ours_std:.4f} | "
                 f"{w.torch_mean:.4f} ± {w.torch_std:.4f} | "
                 f"{abs(w.ours_mean - w.torch_mean):.4f} | {'yes' if w.agrees else 'NO'} |")
  if p.speed:
    s = p.speed
    lines += ["", f"Train step, batch {p.batch_size}, float32 (median of {s.rounds} rounds, "
              "one step of each in turn):", "",
              "| | images/s | ours / theirs |", "|---|---|---|",
              f"| resnet_jax | {s.ours_images_per_s:.0f} | |",
              f"| PyTorch NCHW | {s.torch_nchw_images_per_s:.0f} | "
              f"{s.ours_images_per_s / s.torch_nchw_images_per_s:.2f} |",
              f"| PyTorch channels-last | {s.torch_channels_last_images_per_s:.0f} | "
              f"{s.ours_images_per_s / s.torch_channels_last_images_per_s:.2f} |"]
  return "\n".join(lines)


def plot(p: Parity, path: str) -> None:
  """Each seed's loss curve on both sides, and the two means."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(8, 4.5))
  ax = fig.subplots()
  steps = np.arange(1, p.steps + 1)
  for losses, color, name in ((p.ours_losses, "tab:blue", "resnet_jax"),
                              (p.torch_losses, "tab:orange", "PyTorch")):
    for seed_losses in losses:
      ax.plot(steps, seed_losses, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, np.mean(losses, axis=0), color=color, linewidth=2,
            label=f"{name}: mean of {p.seeds} seeds")
  ax.set(xlabel="step", ylabel="train loss", yscale="log",
         title=f"{p.model}: resnet_jax and PyTorch from the same start, on the same batches")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.torch_parity", __doc__)
  parser.add_argument("--cifar_dir", required=True, help="the folder holding train/<class>/")
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--window", type=int, default=25, help="steps per compared window")
  parser.add_argument("--speed_rounds", type=int, default=10, help="0: no speed comparison")
  parser.add_argument("--out", default="runs/torch_parity")
  args = parser.parse_args(argv)
  try:
    import torch  # noqa: F401
  except ImportError:
    parser.error("needs torch: pip install torch (it is not a dependency of resnet_jax)")
  check_cifar_dir(parser, args.cifar_dir)
  os.makedirs(args.out, exist_ok=True)
  parity = run(args.cifar_dir, os.path.abspath(args.out), args.model, args.steps, args.seeds,
               args.batch_size, args.window, args.speed_rounds)
  report = format_report(parity)
  print(report)
  with open(os.path.join(args.out, "parity.md"), "w") as f:
    f.write(report + "\n")
  write_json(os.path.join(args.out, "parity.json"), dataclasses.asdict(parity))
  plot(parity, os.path.join(args.out, "loss_curves.png"))
  if not (parity.first_steps_agree and parity.curves_agree):
    raise SystemExit(1)


if __name__ == "__main__":
  import torch  # noqa: F401  (before TensorFlow, which the input pipeline loads: the other
  # order crashes in some builds)
  malloc_tuning.reexec_with_malloc_tuning()
  main()
