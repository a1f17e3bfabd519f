"""The CIFAR-10 table of He et al. (2015, Table 6): test error of ResNet-20, 32, 44, 56, 110.

  tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C /tmp/data
  python -m resnet_jax.bench.cifar_table --cifar_dir /tmp/data/cifar10 --workdir runs/table
  # what a CPU affords: fewer steps, fewer rows
  python -m resnet_jax.bench.cifar_table --cifar_dir /tmp/data/cifar10 --workdir runs/table \
      --models resnet20 --seeds 2 --steps 3000

Each row is one model trained with the paper's recipe (configs/cifar10_folder.py: SGD,
momentum 0.9, lr 0.1, weight decay 1e-4, batch 128, 64k steps with lr ÷10 at 50% and 75%,
pad-and-crop and flip); ResNet-110 warms up at lr 0.01 for its first 400 steps (scaled with
`--steps`), as the paper did. A row's `--seeds` runs train as one population
(`config.population_size`: seeds seed, seed + 1, ...; one input stream). Evaluation is on the
folder's test/ split when it has one, and otherwise on 10% of each class held out of train/
(the paper's 45k/5k validation split: then the figures are validation, not test, error).

Writes WORKDIR/table.md (ours: best and mean ± std error; the paper's beside it) and
WORKDIR/error_vs_depth.png. Rows resume: a finished row is read back from
WORKDIR/<model>/row.json; an unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence

import ml_collections

from resnet_jax import cli, data, malloc_tuning
from resnet_jax.bench import check_cifar_dir, degradation, write_json
from resnet_jax.training import loop, population

MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
# Table 6 of the paper: test error (%), best of 5 runs for ResNet-110 (mean ± std 6.61 ± 0.16).
PAPER_ERRORS = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                "resnet110": 6.43}
PAPER_110_MEAN_STD = (6.61, 0.16)
PAPER_STEPS = 64_000
WARMUP_STEPS = {"resnet110": 400}  # at lr 0.01, "until the training error is below 80%"
WARMUP_LEARNING_RATE = 0.01


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  depth: int
  steps: int
  seeds: int
  eval_split: str  # "test", "val" or "holdout" (held out of train)
  eval_examples: int
  errors: list[float]  # % per seed (member), in member order
  best: float
  mean: float
  std: float  # population standard deviation over the seeds (0 for one)
  training_minutes: float  # in train steps (evaluation excluded), from the logged speed


def row_config(model: str, cifar_dir: str, data_dir: str, steps: int, seeds: int, *,
               info: data.DatasetInfo, eval_every: int) -> ml_collections.ConfigDict:
  """The paper's recipe for `model`, `steps` long, as a population of `seeds`."""
  config = degradation.run_config(model, cifar_dir, data_dir, steps, eval_every=eval_every,
                                  log_every=min(100, eval_every))
  config.population_size = seeds
  warmup_steps = round(WARMUP_STEPS.get(model, 0) * steps / PAPER_STEPS)
  if warmup_steps:
    config.warmup_learning_rate = WARMUP_LEARNING_RATE
    config.warmup_epochs = warmup_steps / data.steps_per_epoch(info, config.batch_size)
  return config


def dataset_info(cifar_dir: str, data_dir: str) -> data.DatasetInfo:
  """The folder's dataset as the rows see it (prepared on first use)."""
  config = degradation.run_config(MODELS[0], cifar_dir, data_dir, 1, eval_every=1, log_every=1)
  return data.get_dataset_info(config.dataset, data_dir, holdout_fraction=config.holdout_fraction)


def prepared_row(model: str, cifar_dir: str, data_dir: str, steps: int, seeds: int,
                 eval_every: int) -> tuple[ml_collections.ConfigDict, data.DatasetInfo]:
  """`row_config` for the folder, and the folder's dataset info."""
  info = dataset_info(cifar_dir, data_dir)
  return row_config(model, cifar_dir, data_dir, steps, seeds, info=info,
                    eval_every=eval_every), info


def read_row(path: str) -> Row | None:
  try:
    with open(path) as f:
      return Row(**json.load(f))
  except FileNotFoundError:
    return None


def train_row(config: ml_collections.ConfigDict, row_dir: str, info: data.DatasetInfo) -> Row:
  """Trains (or resumes) one row's population and summarises its final evaluation."""
  metrics = loop.train_and_evaluate(config, row_dir)
  if not metrics:
    raise SystemExit(f"Stopped before {config.model} finished; run the same command to resume.")
  accuracies = (population.member_values(metrics, "eval/accuracy")
                or [metrics["eval/accuracy"]])
  errors = [100 * (1 - a) for a in accuracies]
  return Row(model=config.model, depth=int(config.model.removeprefix("resnet")
                                           .removeprefix("plain")),
             steps=config.num_train_steps, seeds=len(errors), eval_split=info.eval_split,
             eval_examples=info.num_eval_examples, errors=errors, best=min(errors),
             mean=statistics.fmean(errors), std=statistics.pstdev(errors),
             training_minutes=degradation.training_minutes(row_dir, config.batch_size))


def paper_column(model: str) -> str:
  if model not in PAPER_ERRORS:
    return "—"
  if model == "resnet110":
    return f"{PAPER_ERRORS[model]:.2f} ({PAPER_110_MEAN_STD[0]:.2f} ± {PAPER_110_MEAN_STD[1]:.2f})"
  return f"{PAPER_ERRORS[model]:.2f}"


def format_table(rows: list[Row]) -> str:
  """Markdown: ours (best, mean ± std over seeds) next to the paper's Table 6."""
  split = {"test": "test", "val": "val/ split", "holdout": "validation (45k/5k)"}
  lines = ["| model | steps | seeds | evaluated on | ours: best error (%) | ours: mean ± std "
           "(%) | paper (64k steps, %) | training time |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.model} | {r.steps} | {r.seeds} | {split.get(r.eval_split, r.eval_split)} "
                 f"({r.eval_examples}) | {r.best:.2f} | {r.mean:.2f} ± {r.std:.2f} | "
                 f"{paper_column(r.model)} | {r.training_minutes:.0f} min |")
  return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
  """Error against depth: each seed, our mean ± std, and the paper's."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4.5))
  ax = fig.subplots()
  for family, color in (("resnet", "tab:blue"), ("plain", "tab:gray")):
    of_family = sorted((r for r in rows if r.model.startswith(family)), key=lambda r: r.depth)
    if not of_family:
      continue
    depths = [r.depth for r in of_family]
    ax.errorbar(depths, [r.mean for r in of_family], yerr=[r.std for r in of_family],
                marker="o", color=color, capsize=3,
                label=f"ours, {family}: mean ± std ({of_family[0].steps} steps)")
    for r in of_family:
      ax.plot([r.depth] * len(r.errors), r.errors, ".", color=color, alpha=0.5)
  paper = sorted((int(m.removeprefix("resnet")), e) for m, e in PAPER_ERRORS.items())
  ax.plot(*zip(*paper), "s--", color="tab:red", label="paper (64k steps, best)")
  ax.set(xlabel="depth (layers)", ylabel="error (%)",
         title="CIFAR-10: error against depth")
  ax.set_xticks([d for d, _ in paper], [str(d) for d, _ in paper])
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.cifar_table", __doc__)
  parser.add_argument("--cifar_dir", required=True,
                      help="the folder holding train/<class>/ (and test/<class>/, if you have it)")
  parser.add_argument("--workdir", default="runs/cifar_table")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated rows: resnet20 ... resnet110, plain20 ... plain110")
  parser.add_argument("--seeds", type=int, default=5, help="runs per row, as one population")
  parser.add_argument("--steps", type=int, default=PAPER_STEPS, help="the paper's 64k by default")
  parser.add_argument("--eval_every", type=int, default=0, help="0: 10 evaluations per row")
  args = parser.parse_args(argv)
  check_cifar_dir(parser, args.cifar_dir)
  if args.seeds < 1 or args.steps < 1:
    parser.error("--seeds and --steps must be positive")
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "tensorflow_datasets")
  eval_every = args.eval_every or max(args.steps // 10, 1)
  rows = []
  for model in models:
    row_dir = os.path.join(workdir, model)
    row_file = os.path.join(row_dir, "row.json")
    row = read_row(row_file)
    if row is not None and (row.steps, row.seeds) == (args.steps, args.seeds):
      print(f"{model}: done before ({row.seeds} seeds, {row.steps} steps), read from {row_file}")
    else:
      start = time.perf_counter()
      config, info = prepared_row(model, args.cifar_dir, data_dir, args.steps, args.seeds,
                                  eval_every)
      try:
        row = train_row(config, row_dir, info)
      except ValueError as e:  # a row begun with other --steps or --seeds, a bad folder, ...
        parser.exit(2, f"error: {model}: {e}\n")
      write_json(row_file, dataclasses.asdict(row))
      print(f"{model}: error {row.mean:.2f} ± {row.std:.2f}% (best {row.best:.2f}%), "
            f"{(time.perf_counter() - start) / 60:.1f} min in this session")
    rows.append(row)
  table = format_table(rows)
  print(table)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(table + "\n")
  plot(rows, os.path.join(workdir, "error_vs_depth.png"))
  print(f"Wrote {os.path.join(workdir, 'table.md')} and "
        f"{os.path.join(workdir, 'error_vs_depth.png')}")


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # faster CPU steps, as in train.py
  main()
