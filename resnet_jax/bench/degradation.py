"""The degradation experiment (He et al. 2015, Fig. 6): plain-20/56 against ResNet-20/56.

  tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C /tmp/data
  python -m resnet_jax.bench.degradation --cifar_dir /tmp/data/cifar10 --workdir runs/degradation

Trains the four networks with one recipe and budget (configs/cifar10_folder.py: SGD,
momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, lr ÷10 at 50% and 75% of `--steps`;
45k/5k split of the 50k training images) and draws the paper's figure: training error
(dashed; the running error on the augmented training batches, averaged over each
`--log_every` steps) and validation error (bold) over steps, plain nets on the left,
ResNets on the right. The paper trains 64k steps; `--steps` shortens the schedule to what
a machine can afford. Every run resumes from its workdir, so a re-run only does what is
missing; WORKDIR/results.{md,json} hold the final errors, WORKDIR/degradation.png the plot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

from configs import cifar10_folder
from resnet_jax import cli
from resnet_jax import malloc_tuning
from resnet_jax.bench import check_cifar_dir, write_json
from resnet_jax.training import loop, reporting

MODELS = ("plain20", "plain56", "resnet20", "resnet56")


def run_config(model: str, cifar_dir: str, data_dir: str, steps: int, *,
               eval_every: int, log_every: int) -> ml_collections.ConfigDict:
  """configs/cifar10_folder.py for `model`, its lr drops at 50% and 75% of `steps`."""
  c = cifar10_folder.get_config()
  c.model, c.dataset, c.data_dir = model, f"folder:{os.path.abspath(cifar_dir)}", data_dir
  c.num_train_steps = steps
  c.step_decay_boundaries = (steps // 2, steps * 3 // 4)
  c.eval_every_steps = c.checkpoint_every_steps = eval_every
  c.log_every_steps = log_every
  c.progress_bar = False
  return c


def error_curves(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """Training and validation error (1 − accuracy) over steps, from a run's metrics.jsonl."""
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  curves = {}
  for split, key in (("train", "train/accuracy"), ("val", "eval/accuracy")):
    steps, accuracies = reporting.metric_curve(records, key)
    curves[split] = (steps, [1.0 - a for a in accuracies])
  return curves


def final_train_error(workdir: str, last: int = 5) -> float:
  """Training error averaged over the last `last` logged intervals (less noisy than one)."""
  errors = error_curves(workdir)["train"][1][-last:]
  return sum(errors) / len(errors)


def training_minutes(workdir: str, batch_size: int) -> float:
  """Time spent in train steps (evaluation excluded), from the logged images/sec."""
  records = [r for r in reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if "train/images_per_sec" in r]
  seconds, previous_step = 0.0, 0
  for r in records:
    seconds += (r["step"] - previous_step) * batch_size / r["train/images_per_sec"]
    previous_step = r["step"]
  return seconds / 60


def plot(run_dirs: dict[str, str], path: str, steps: int) -> None:
  """The paper's Fig. 6 layout: plain nets left, ResNets right; dashed train, bold val."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  colors = {"20": "tab:orange", "56": "tab:red"}
  for ax, family, title in ((axes[0], "plain", "plain"), (axes[1], "resnet", "ResNet")):
    for model, workdir in run_dirs.items():
      if not model.startswith(family):
        continue
      depth = model[len(family):]
      curves = error_curves(workdir)
      ax.plot(*curves["train"], "--", color=colors[depth], linewidth=1)
      ax.plot(*curves["val"], "-", color=colors[depth], linewidth=2.2,
              label=f"{title}-{depth}")
    ax.set(xlabel="step", title=f"{title} networks, CIFAR-10, {steps} steps of 128")
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_ylabel("error (dashed: training, bold: validation)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.degradation", __doc__)
  parser.add_argument("--cifar_dir", required=True, help="the folder holding train/<class>/")
  parser.add_argument("--workdir", default="runs/degradation")
  parser.add_argument("--steps", type=int, default=64_000, help="the paper's 64k by default")
  parser.add_argument("--eval_every", type=int, default=0, help="0: 20 evaluations per run")
  parser.add_argument("--log_every", type=int, default=25)
  parser.add_argument("--models", default=",".join(MODELS))
  args = parser.parse_args(argv)
  check_cifar_dir(parser, args.cifar_dir)
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "tensorflow_datasets")
  eval_every = args.eval_every or max(args.steps // 20, 1)
  models = args.models.split(",")
  run_dirs = {model: os.path.join(workdir, model) for model in models}
  results = {model: loop.train_and_evaluate(
      run_config(model, args.cifar_dir, data_dir, args.steps, eval_every=eval_every,
                 log_every=args.log_every), run_dirs[model]) for model in models}

  last = 5
  lines = [f"| CIFAR-10, {args.steps} steps of 128 | training error (last {last * args.log_every} "
           "steps) | validation error | training time |", "|---|---|---|---|"]
  final_train = {m: final_train_error(run_dirs[m], last) for m in models}
  minutes = {m: training_minutes(run_dirs[m], cifar10_folder.get_config().batch_size)
             for m in models}
  for model in models:
    lines.append(f"| {model} | {final_train[model]:.2%} | "
                 f"{1 - results[model]['eval/accuracy']:.2%} | {minutes[model]:.1f} min |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  write_json(os.path.join(workdir, "results.json"), {
      "steps": args.steps, "final_train_error": final_train,
      "val_error": {m: 1 - r["eval/accuracy"] for m, r in results.items()},
      "eval": results, "training_minutes": minutes})
  plot(run_dirs, os.path.join(workdir, "degradation.png"), args.steps)


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # faster CPU steps, as in train.py
  main()
