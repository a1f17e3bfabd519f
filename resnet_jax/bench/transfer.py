"""Does transfer work? Pre-train on CIFAR-10 classes 0-4, fine-tune on 500 images of 5-9.

  tar -xzf ../shared/data/cifar10-train-jpeg.tar.gz -C /tmp/data
  python -m resnet_jax.bench.transfer --cifar_dir /tmp/data/cifar10 --workdir runs/transfer

1. Folders (symlinks into --cifar_dir/train): `pretrain/` has every image of classes 0-4
   (airplane … deer; 10% held out for its validation); `target/train/` the first 100 images
   (by file name) of each of classes 5-9 (dog … truck), `target/val/` their last 500.
2. Pre-train ResNet-20 on `pretrain/` (configs/cifar10_folder.py, shortened schedule:
   2,000 steps by default, lr ÷10 at 50% and 75%).
3. With the same step budget and recipe on `target/` (configs/finetune_folder.py at
   ResNet-20, lr 0.01): fine-tune from the pre-trained weights (`init_from`, `replace_head`;
   backbone at 0.1× and at 1× the head's lr), and train from scratch (no `init_from`, all
   layers at lr 0.01, and at 0.1).
4. Few-shot linear probes (1/5/10/25 shots) on `target/` of the pre-trained backbone and of
   the same network at initialisation.
Prints a markdown table, writes it with the numbers to WORKDIR/results.{md,json} and a plot
of validation accuracy over steps to WORKDIR/transfer.png. Every stage resumes from its
workdir, so a re-run only does what is missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import ml_collections

from configs import cifar10_folder, finetune_folder
from resnet_jax import cli
from resnet_jax import data, linear_probe, malloc_tuning, pretrained
from resnet_jax.bench import write_json
from resnet_jax.training import loop, reporting

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
SOURCE_CLASSES, TARGET_CLASSES = CIFAR_CLASSES[:5], CIFAR_CLASSES[5:]


def _link_files(files: Sequence[str], source_dir: str, target_dir: str) -> None:
  os.makedirs(target_dir, exist_ok=True)
  for name in files:
    link = os.path.join(target_dir, name)
    if not os.path.lexists(link):
      os.symlink(os.path.join(source_dir, name), link)


def make_folders(cifar_dir: str, out_dir: str, *, target_train_per_class: int = 100,
                 target_val_per_class: int = 500) -> tuple[str, str]:
  """Symlinked image folders (pretrain, target) from the CIFAR-10 JPEG folder."""
  train_dir = os.path.join(os.path.abspath(cifar_dir), "train")
  missing = [c for c in CIFAR_CLASSES if not os.path.isdir(os.path.join(train_dir, c))]
  if missing:
    raise ValueError(f"{train_dir} lacks the class folders {missing}; unpack "
                     "cifar10-train-jpeg.tar.gz and pass the directory holding train/")
  pretrain, target = os.path.join(out_dir, "pretrain"), os.path.join(out_dir, "target")
  for name in SOURCE_CLASSES:
    source = os.path.join(train_dir, name)
    _link_files(sorted(os.listdir(source)), source, os.path.join(pretrain, "train", name))
  for name in TARGET_CLASSES:
    source = os.path.join(train_dir, name)
    files = sorted(os.listdir(source))
    if len(files) < target_train_per_class + target_val_per_class:
      raise ValueError(f"{source} has {len(files)} images; need "
                       f"{target_train_per_class + target_val_per_class}")
    _link_files(files[:target_train_per_class], source, os.path.join(target, "train", name))
    _link_files(files[-target_val_per_class:], source, os.path.join(target, "val", name))
  return pretrain, target


def pretrain_config(folder: str, data_dir: str, steps: int) -> ml_collections.ConfigDict:
  """ResNet-20, the paper's recipe with its lr drops at 50% and 75% of `steps`."""
  c = cifar10_folder.get_config()
  c.dataset, c.data_dir, c.num_train_steps = f"folder:{folder}", data_dir, steps
  c.step_decay_boundaries = (steps // 2, steps * 3 // 4)
  c.eval_every_steps = c.checkpoint_every_steps = max(steps // 10, 1)
  c.progress_bar = False
  return c


def target_config(folder: str, data_dir: str, steps: int, *, init_from: str = "",
                  learning_rate: float | None = None,
                  backbone_learning_rate_scale: float | None = None
                  ) -> ml_collections.ConfigDict:
  """configs/finetune_folder.py at ResNet-20, batch 100 (5 batches per epoch of 500)."""
  c = finetune_folder.get_config()
  c.model, c.dataset, c.data_dir = "resnet20", f"folder:{folder}", data_dir
  c.preprocessing = "cifar"
  c.batch_size, c.num_train_steps, c.cache = 100, steps, True
  c.eval_every_steps = c.checkpoint_every_steps = max(steps // 10, 1)
  c.progress_bar = False
  if init_from:
    c.init_from = init_from
  else:  # from scratch: every layer learns at the full rate, there is no head to replace
    c.replace_head, c.backbone_learning_rate_scale = False, 1.0
  if learning_rate is not None:
    c.learning_rate = learning_rate
  if backbone_learning_rate_scale is not None:
    c.backbone_learning_rate_scale = backbone_learning_rate_scale
  return c


def _train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, float],
                                                                     float | None]:
  """Final eval metrics and wall seconds (None when the workdir had finished already)."""
  finished = os.path.isdir(os.path.join(workdir, "checkpoints", str(config.num_train_steps)))
  start = time.perf_counter()
  metrics = loop.train_and_evaluate(config, workdir)
  return metrics, None if finished else time.perf_counter() - start


def _minutes(seconds: float | None) -> str:
  return "earlier run" if seconds is None else f"{seconds / 60:.1f} min"


def _accuracy_curve(workdir: str) -> tuple[list[int], list[float]]:
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return reporting.metric_curve(records, "eval/accuracy")


def plot(runs: dict[str, str], path: str) -> None:
  """Validation accuracy over steps, one line per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, workdir in runs.items():
    ax.plot(*_accuracy_curve(workdir), marker="o", markersize=3, label=label)
  ax.set(xlabel="step", ylabel="validation accuracy (classes 5-9)",
         title="ResNet-20 on 500 CIFAR-10 images: transfer vs scratch")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.transfer", __doc__)
  parser.add_argument("--cifar_dir", required=True, help="the folder holding train/<class>/")
  parser.add_argument("--workdir", default="runs/transfer")
  parser.add_argument("--pretrain_steps", type=int, default=2000)
  parser.add_argument("--target_steps", type=int, default=200)
  parser.add_argument("--probe_seeds", type=int, default=5)
  args = parser.parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "tensorflow_datasets")
  pretrain_folder, target_folder = make_folders(args.cifar_dir, os.path.join(workdir, "data"))

  pretrain_dir = os.path.join(workdir, "pretrain")
  pre_metrics, pre_seconds = _train(
      pretrain_config(pretrain_folder, data_dir, args.pretrain_steps), pretrain_dir)
  lr = finetune_folder.get_config().learning_rate
  runs = {
      "fine-tuned, backbone at 0.1× the head's lr": target_config(
          target_folder, data_dir, args.target_steps, init_from=pretrain_dir),
      "fine-tuned, whole network at the head's lr": target_config(
          target_folder, data_dir, args.target_steps, init_from=pretrain_dir,
          backbone_learning_rate_scale=1.0),
      f"from scratch, lr {lr:g}": target_config(target_folder, data_dir, args.target_steps),
      f"from scratch, lr {10 * lr:g}": target_config(target_folder, data_dir, args.target_steps,
                                                    learning_rate=10 * lr),
  }
  run_dirs = {label: os.path.join(workdir, f"target_{i}") for i, label in enumerate(runs)}
  results = {label: _train(config, run_dirs[label]) for label, config in runs.items()}

  target_info = data.get_dataset_info(f"folder:{target_folder}", data_dir)
  weights = pretrained.load(pretrain_dir)
  fresh = loop.setup(runs[f"from scratch, lr {lr:g}"]).initial_state
  probes = {
      "pre-trained backbone": weights.variables,
      "backbone at initialisation": jax.device_get(fresh.variables),
  }
  probe_results = {
      label: linear_probe.probe(weights.info.create_model(), variables, target_info,
                                image_size=32, preprocessing="cifar", num_seeds=args.probe_seeds)
      for label, variables in probes.items()}

  lines = [f"Pre-training on classes 0-4 ({args.pretrain_steps} steps of 128): validation "
           f"accuracy {pre_metrics['eval/accuracy']:.2%} ({_minutes(pre_seconds)})", "",
           f"| ResNet-20 on classes 5-9, 500 images, {args.target_steps} steps of 100 | "
           "val accuracy | val loss | wall |", "|---|---|---|---|"]
  for label, (metrics, seconds) in results.items():
    lines.append(f"| {label} | {metrics['eval/accuracy']:.2%} | {metrics['eval/loss']:.3f} | "
                 f"{_minutes(seconds)} |")
  shots = linear_probe.DEFAULT_SHOTS
  lines += ["", "| few-shot linear probe on classes 5-9 | " +
            " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
  for label, accuracies in probe_results.items():
    lines.append(f"| {label} | " + " | ".join(
        f"{accuracies[f'probe/{k}shot_accuracy']:.2%}" for k in shots) + " |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  write_json(os.path.join(workdir, "results.json"), {
      "pretrain": pre_metrics, "target": {k: m for k, (m, _) in results.items()},
      "target_seconds": {k: s for k, (_, s) in results.items()}, "probe": probe_results,
      "pretrain_steps": args.pretrain_steps, "target_steps": args.target_steps})
  plot(run_dirs, os.path.join(workdir, "transfer.png"))


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # faster CPU steps, as in train.py
  main()
