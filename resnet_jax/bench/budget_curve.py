"""What a training budget buys: ResNet-20's CIFAR-10 validation accuracy against steps.

  tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C /tmp/data
  python -m resnet_jax.bench.budget_curve --cifar_dir /tmp/data/cifar10 --workdir runs/budget \
      --budgets 1000,2000,4000 --schedules step,cosine

One run per (budget, schedule), each the paper's recipe (configs/cifar10_folder.py: SGD,
momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, 45k/5k split) compressed to the budget:
"step" divides the learning rate by 10 at 50% and 75% of the steps, as the paper's 32k and
48k of 64k; "cosine" decays it to 0 over the steps. Reports the final validation accuracy
with the wall time of each run (compile, training and evaluations; a resumed run counts
only its last session) and the time spent in train steps, and beside it the accuracy with
flip test-time augmentation (softmax averaged over each image and its mirror; filled in for
earlier runs whose checkpoints are there); writes WORKDIR/budget.md,
WORKDIR/budget.json and WORKDIR/budget.png, with every finished run in WORKDIR (earlier
invocations' too). Runs resume; finished ones are not trained again.

--weight_decay, --label_smoothing and --cutout_size change the recipe (the paper's: 1e-4, 0
and no cutout); a run with another recipe gets its own folder, its own rows and its own line
in the plot:
  python -m resnet_jax.bench.budget_curve ... --budgets 40000 --schedules cosine \
      --weight_decay 5e-4 --label_smoothing 0.1 --cutout_size 16
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath

from resnet_jax import cli, data, malloc_tuning, predict, pretrained
from resnet_jax.bench import check_cifar_dir, degradation, write_json
from resnet_jax.training import loop, reporting

SCHEDULES = ("step", "cosine")
RESULT_FILE = "budget_run.json"
PAPER_WEIGHT_DECAY, PAPER_LABEL_SMOOTHING, PAPER_CUTOUT_SIZE = 1e-4, 0.0, 0


@dataclasses.dataclass(frozen=True)
class BudgetRun:
  model: str
  schedule: str
  steps: int
  epochs: float
  val_accuracy: float
  wall_minutes: float  # of the session that finished the run: compile, train, evaluate
  training_minutes: float  # in train steps only, from the logged speed
  weight_decay: float = PAPER_WEIGHT_DECAY
  label_smoothing: float = PAPER_LABEL_SMOOTHING
  cutout_size: int = PAPER_CUTOUT_SIZE
  val_accuracy_flip: float | None = None  # with flip test-time augmentation

  @property
  def recipe(self) -> str:
    """'paper', or what differs from it: 'wd 0.0005, ls 0.1, cutout 16'."""
    changes = []
    if self.weight_decay != PAPER_WEIGHT_DECAY:
      changes.append(f"wd {self.weight_decay:g}")
    if self.label_smoothing != PAPER_LABEL_SMOOTHING:
      changes.append(f"ls {self.label_smoothing:g}")
    if self.cutout_size != PAPER_CUTOUT_SIZE:
      changes.append(f"cutout {self.cutout_size}")
    return ", ".join(changes) or "paper"


def run_config(model: str, cifar_dir: str, data_dir: str, steps: int, schedule: str,
               weight_decay: float = PAPER_WEIGHT_DECAY,
               label_smoothing: float = PAPER_LABEL_SMOOTHING,
               cutout_size: int = PAPER_CUTOUT_SIZE):
  """The paper's recipe for `steps`, its learning rate decayed by `schedule`."""
  config = degradation.run_config(model, cifar_dir, data_dir, steps,
                                  eval_every=max(steps // 4, 1), log_every=min(100, steps))
  config.weight_decay, config.label_smoothing = weight_decay, label_smoothing
  config.cutout_size = cutout_size
  if schedule == "cosine":
    config.schedule, config.step_decay_boundaries = "cosine", ()
  elif schedule != "step":
    raise ValueError(f"schedule {schedule!r}: must be one of {', '.join(SCHEDULES)}")
  return config


def train_run(config, run_dir: str, schedule: str) -> BudgetRun:
  start = time.perf_counter()
  metrics = loop.train_and_evaluate(config, run_dir)
  if not metrics:
    raise SystemExit(f"Stopped before {run_dir} finished; run the same command to resume.")
  records = reporting.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
  epochs = max((r["train/epoch"] for r in records if "train/epoch" in r), default=0.0)
  return BudgetRun(config.model, schedule, config.num_train_steps, epochs,
                   metrics["eval/accuracy"], (time.perf_counter() - start) / 60,
                   degradation.training_minutes(run_dir, config.batch_size),
                   config.weight_decay, config.label_smoothing, config.cutout_size)


def validation_accuracies(run_dir: str, batch_size: int = 500) -> tuple[float, float]:
  """The validation accuracy of the run's last checkpoint: as evaluated in training, and
  with flip test-time augmentation (softmax averaged over each image and its mirror)."""
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  weights = pretrained.load(run_dir)
  info = data.get_dataset_info(config["dataset"], config["data_dir"] or None,
                               holdout_fraction=config["holdout_fraction"])
  apply = predict.apply_fn(weights.info)

  @jax.jit
  def correct(variables, images, labels, mask):
    plain = jax.nn.softmax(apply(variables, images))
    both = plain + jax.nn.softmax(apply(variables, images[:, :, ::-1]))
    return [((p.argmax(-1) == labels) * mask).sum() for p in (plain, both)]

  counts, total = np.zeros(2), 0.0
  for batch in data.eval_batches(info, global_batch_size=batch_size,
                                 image_size=weights.info.image_size):
    counts += np.asarray(correct(weights.variables, batch["image"], batch["label"],
                                 batch["mask"]))
    total += float(batch["mask"].sum())
  plain, flip = counts / total
  return float(plain), float(flip)


def with_flip_accuracy(run: BudgetRun, run_dir: str) -> BudgetRun:
  """`run` with val_accuracy_flip measured, where its last checkpoint is still there."""
  checkpoints = epath.Path(run_dir) / "checkpoints"
  if (run.val_accuracy_flip is not None or not checkpoints.is_dir()
      or pretrained.finished_steps(checkpoints)[-1:] != [run.steps]):
    return run
  return dataclasses.replace(run, val_accuracy_flip=validation_accuracies(run_dir)[1])


def run_name(model: str, schedule: str, steps: int, weight_decay: float,
             label_smoothing: float, cutout_size: int = PAPER_CUTOUT_SIZE) -> str:
  """The run's folder: resnet20_cosine_4000, with _wd…/_ls…/_cutout… where the recipe
  differs."""
  name = f"{model}_{schedule}_{steps}"
  if weight_decay != PAPER_WEIGHT_DECAY:
    name += f"_wd{weight_decay:g}"
  if label_smoothing != PAPER_LABEL_SMOOTHING:
    name += f"_ls{label_smoothing:g}"
  if cutout_size != PAPER_CUTOUT_SIZE:
    name += f"_cutout{cutout_size}"
  return name


def finished_runs(workdir: str, model: str) -> list[BudgetRun]:
  """Every finished run of `model` in `workdir`, this invocation's and earlier ones', with
  the flip accuracy measured (and saved) where it is missing and the checkpoint is there."""
  runs = []
  for name in sorted(os.listdir(workdir)):
    result_file = os.path.join(workdir, name, RESULT_FILE)
    if name.startswith(f"{model}_") and os.path.exists(result_file):
      with open(result_file) as f:
        run = BudgetRun(**json.load(f))
      measured = with_flip_accuracy(run, os.path.join(workdir, name))
      if measured != run:
        write_json(result_file, dataclasses.asdict(measured))
      runs.append(measured)
  return runs


def format_table(runs: list[BudgetRun]) -> str:
  lines = ["| recipe | schedule | steps | epochs | val accuracy | with flip TTA | wall time "
           "| in train steps |", "|---|---|---|---|---|---|---|---|"]
  for r in sorted(runs, key=lambda r: (r.recipe != "paper", r.recipe, r.schedule, r.steps)):
    lines.append(f"| {r.recipe} | {r.schedule} | {r.steps} | {r.epochs:.1f} | "
                 f"{r.val_accuracy:.2%} | "
                 f"{'—' if r.val_accuracy_flip is None else f'{r.val_accuracy_flip:.2%}'} | "
                 f"{r.wall_minutes:.1f} min | {r.training_minutes:.1f} min |")
  return "\n".join(lines)


def plot(runs: list[BudgetRun], path: str) -> None:
  """Validation accuracy against wall time, one line per recipe and schedule, budgets marked;
  hollow markers of the same colour: the same runs with flip test-time augmentation."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 5))
  ax = fig.subplots()
  recipes = sorted({r.recipe for r in runs}, key=lambda recipe: (recipe != "paper", recipe))
  flip_labelled = False
  for index, recipe in enumerate(recipes):
    for schedule, marker, label_offset in zip(SCHEDULES, "os", ((4, -10), (4, 6))):
      line = sorted((r for r in runs if (r.recipe, r.schedule) == (recipe, schedule)),
                    key=lambda r: r.steps)
      if not line:
        continue
      label = f"{schedule} schedule" + ("" if recipe == "paper" else f" ({recipe})")
      (drawn,) = ax.plot([r.wall_minutes for r in line], [100 * r.val_accuracy for r in line],
                         marker=marker, label=label)
      flips = [r for r in line if r.val_accuracy_flip is not None]
      ax.plot([r.wall_minutes for r in flips], [100 * r.val_accuracy_flip for r in flips],
              linestyle="none", marker=marker, markerfacecolor="none", color=drawn.get_color(),
              label=None if flip_labelled or not flips else "with flip TTA (hollow)")
      flip_labelled = flip_labelled or bool(flips)
      # step labels below their points, cosine labels above; of the recipes after the first
      # two, every second puts them left and below, its last point's right and above, so runs
      # of the same length at nearby times stay readable
      offsets = [label_offset] * len(line)
      if index >= 2 and not index % 2:
        offsets = [(label_offset[0] - 60, -12)] * (len(line) - 1) + [(6, 8)]
      for r, offset in zip(line, offsets):
        ax.annotate(f"{r.steps} steps", (r.wall_minutes, 100 * r.val_accuracy), fontsize=8,
                    textcoords="offset points", xytext=offset)
  ax.axhline(90, color="gray", linestyle=":", label="90%")
  low, high = ax.get_ylim()
  ax.set_ylim(low, max(high, 91))  # the 90% line inside the frame
  ax.set_xlim(0, max(r.wall_minutes for r in runs) * 1.15)  # room for the last labels
  ax.set(xlabel="wall time per run (minutes)", ylabel="validation accuracy (%)",
         title=f"{runs[0].model}, CIFAR-10 45k/5k: accuracy against budget")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.budget_curve", __doc__)
  parser.add_argument("--cifar_dir", required=True, help="the folder holding train/<class>/")
  parser.add_argument("--workdir", default="runs/budget_curve")
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--budgets", default="1000,2000,4000", help="comma-separated step counts")
  parser.add_argument("--schedules", default="step,cosine")
  parser.add_argument("--weight_decay", type=float, default=PAPER_WEIGHT_DECAY,
                      help="the recipe's weight decay (the paper's: %(default)g)")
  parser.add_argument("--label_smoothing", type=float, default=PAPER_LABEL_SMOOTHING,
                      help="the recipe's label smoothing (the paper's: %(default)g)")
  parser.add_argument("--cutout_size", type=int, default=PAPER_CUTOUT_SIZE,
                      help="the side of the square cut out of each training image (0, the "
                           "paper's: none)")
  args = parser.parse_args(argv)
  check_cifar_dir(parser, args.cifar_dir)
  try:
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
  except ValueError:
    parser.error(f"--budgets={args.budgets}: expected comma-separated step counts")
  schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
  if args.cutout_size < 0:
    parser.error(f"--cutout_size={args.cutout_size}: must be >= 0 (0: no cutout)")
  if not budgets or min(budgets) < 1 or not set(schedules) <= set(SCHEDULES):
    parser.error(f"--budgets must be positive step counts and --schedules among "
                 f"{', '.join(SCHEDULES)}")
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "tensorflow_datasets")
  for schedule in schedules:
    for steps in budgets:
      run_dir = os.path.join(workdir, run_name(args.model, schedule, steps, args.weight_decay,
                                               args.label_smoothing, args.cutout_size))
      result_file = os.path.join(run_dir, RESULT_FILE)
      if os.path.exists(result_file):
        continue
      config = run_config(args.model, args.cifar_dir, data_dir, steps, schedule,
                          args.weight_decay, args.label_smoothing, args.cutout_size)
      run = train_run(config, run_dir, schedule)
      write_json(result_file, dataclasses.asdict(run))
      print(f"{run.recipe}, {schedule}, {steps} steps: {run.val_accuracy:.2%} "
            f"in {run.wall_minutes:.1f} min")
  runs = finished_runs(workdir, args.model)  # with those of earlier invocations
  table = format_table(runs)
  print(table)
  with open(os.path.join(workdir, "budget.md"), "w") as f:
    f.write(table + "\n")
  write_json(os.path.join(workdir, "budget.json"), [dataclasses.asdict(r) for r in runs])
  plot(runs, os.path.join(workdir, "budget.png"))


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # faster CPU steps, as in train.py
  main()
