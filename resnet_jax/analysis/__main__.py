"""Gradient flow and layer responses per residual block, as a CSV and a PNG.

  python -m resnet_jax.analysis gradient-flow --models plain56,resnet56 --out DIR
  python -m resnet_jax.analysis layer-responses --checkpoint RUN_A --checkpoint RUN_B --out DIR

Networks are registry models at initialisation (`--models`, seeded by `--seed`) and/or
trained ones (`--checkpoint`: a train.py workdir, a checkpoint or converted weights; may
be repeated). All are measured on the same batch of `--batch_size` training images of
`--dataset` (default: the checkpoint's own dataset, else digits), without augmentation.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from resnet_jax import cli
from resnet_jax import data, pretrained
from resnet_jax.analysis.blocks import block_gradients, branch_response_stds
from resnet_jax.data.device_ops import normalize
from resnet_jax.models import ResNet, create_model
from resnet_jax.training.train_state import init_variables

DEFAULT_DATASET = "digits"


@dataclasses.dataclass(frozen=True)
class Network:
  """A model to measure, its variables, and the input it expects."""

  label: str
  model: ResNet
  variables: dict[str, Any]
  trained: bool
  dataset: str
  image_size: int  # 0: the dataset's
  preprocessing: str
  mean: tuple[float, ...] | None  # None: the dataset's
  std: tuple[float, ...] | None


def networks(models: Sequence[str], checkpoints: Sequence[str], dataset: str | None,
             data_dir: str | None, seed: int) -> list[Network]:
  """Registry models at initialisation, then the trained weights in `checkpoints`."""
  found = []
  if models:
    info = data.get_dataset_info(dataset or DEFAULT_DATASET, data_dir)
    for name in models:
      model = create_model(name, num_classes=info.num_classes, in_channels=info.image_shape[2])
      variables = init_variables(model, jax.random.PRNGKey(seed), info.image_shape)
      found.append(Network(f"{name} (init)", model, jax.device_get(variables), False,
                           dataset or DEFAULT_DATASET, 0, "auto", None, None))
  for path in checkpoints:
    weights = pretrained.load(path)
    step = os.path.basename(weights.path)
    label = f"{weights.info.model} (trained{f', step {step}' if step.isdigit() else ''})"
    found.append(Network(label, weights.info.create_model(), weights.variables, True,
                         dataset or weights.info.source, weights.info.image_size,
                         weights.info.preprocessing, weights.info.mean, weights.info.std))
  labels = [n.label for n in found]
  if len(set(labels)) != len(labels):  # e.g. two runs of one model at the same step
    found = [dataclasses.replace(n, label=f"{n.label} #{i}") for i, n in enumerate(found)]
  return found


def one_batch(network: Network, data_dir: str | None, batch_size: int, seed: int
              ) -> tuple[jax.Array, jax.Array]:
  """The first un-augmented training batch of the network's dataset, normalised."""
  info = data.get_dataset_info(network.dataset, data_dir)
  if info.image_shape[2] != network.model.in_channels:
    raise ValueError(f"{network.dataset} has {info.image_shape[2]}-channel images but "
                     f"{network.label} takes {network.model.in_channels}")
  batch = next(iter(data.train_batches(
      info, global_batch_size=batch_size, image_size=network.image_size, seed=seed,
      augment=False, preprocessing=network.preprocessing)))
  return (normalize(batch["image"], network.mean or info.mean, network.std or info.std),
          batch["label"])


def batches(nets: Sequence[Network], data_dir: str | None, batch_size: int, seed: int
            ) -> list[tuple[jax.Array, jax.Array]]:
  """`one_batch` for each network, read once for networks that take the same input."""
  keys = [(n.dataset, n.image_size, n.preprocessing, n.mean, n.std, n.model.in_channels)
          for n in nets]
  read = {}
  for key, net in zip(keys, nets):
    if key not in read:
      read[key] = one_batch(net, data_dir, batch_size, seed)
  return [read[key] for key in keys]


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot_per_block(path: str, rows: list[dict[str, Any]], panels: Sequence[tuple[str, str]],
                   title: str, log_scale: bool, sorted_panel: bool = False) -> None:
  """One line per model over block index, one panel per (column, y label)."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5 * (len(panels) + sorted_panel), 4))
  axes = fig.subplots(1, len(panels) + sorted_panel, squeeze=False)[0]
  labels = list(dict.fromkeys(r["model"] for r in rows))
  for ax, (column, ylabel) in zip(axes, panels):
    for label in labels:
      mine = [r for r in rows if r["model"] == label]
      ax.plot([r["depth_index"] for r in mine], [r[column] for r in mine], marker=".",
              label=label)
    ax.set(xlabel="block index (input side → output side)", ylabel=ylabel)
  if sorted_panel:  # the paper's Fig. 7 (bottom): the same values, largest first
    column, ylabel = panels[0]
    for label in labels:
      values = sorted((r[column] for r in rows if r["model"] == label), reverse=True)
      axes[-1].plot(range(len(values)), values, marker=".", label=label)
    axes[-1].set(xlabel="blocks sorted by magnitude", ylabel=ylabel)
  for ax in axes:
    if log_scale:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def gradient_flow_rows(nets: Sequence[Network], data_dir: str | None, batch_size: int,
                       seed: int) -> list[dict[str, Any]]:
  """One row per (network, block): its input- and parameter-gradient norms."""
  rows = []
  for net, (images, labels) in zip(nets, batches(nets, data_dir, batch_size, seed)):
    input_norms, param_norms = block_gradients(net.model, net.variables, images, labels)
    for i, block in enumerate(input_norms):
      rows.append({"model": net.label, "block": block, "depth_index": i,
                   "input_grad_norm": input_norms[block], "param_grad_norm": param_norms[block]})
  return rows


def layer_response_rows(nets: Sequence[Network], data_dir: str | None, batch_size: int,
                        seed: int) -> list[dict[str, Any]]:
  """One row per (network, block): the std of its residual branch's output."""
  rows = []
  for net, (images, _) in zip(nets, batches(nets, data_dir, batch_size, seed)):
    stds = branch_response_stds(net.model, net.variables, images, train=not net.trained)
    rows += [{"model": net.label, "block": block, "depth_index": i, "response_std": std}
             for i, (block, std) in enumerate(stds.items())]
  return rows


def spread(rows: list[dict[str, Any]], label: str, column: str) -> float:
  """Largest over smallest value of `column` across one network's blocks."""
  values = [r[column] for r in rows if r["model"] == label]
  return max(values) / min(values)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.analysis", __doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (("gradient-flow", "norms of ∂L/∂(block input) and ∂L/∂(block params)"),
                          ("layer-responses", "std of each residual branch's output")):
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--models", default="plain56,resnet56" if name == "gradient-flow" else "",
                     help="comma-separated registry models, measured at initialisation")
    sub.add_argument("--checkpoint", action="append", default=[],
                     help="trained weights (repeatable)")
    sub.add_argument("--dataset", default=None,
                     help=f"default: the checkpoint's dataset, else {DEFAULT_DATASET}")
    sub.add_argument("--data_dir", default=None)
    sub.add_argument("--batch_size", type=int, default=128)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=True, help="directory for the CSV and the PNG")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  if not models and not args.checkpoint:
    parser.error("nothing to measure: give --models and/or --checkpoint")
  try:
    nets = networks(models, args.checkpoint, args.dataset, args.data_dir, args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "gradient-flow":
      rows = gradient_flow_rows(nets, args.data_dir, args.batch_size, args.seed)
      stem, log_scale, title = "gradient_flow", True, "Gradient norms per block, one batch"
      panels = [("input_grad_norm", "‖∂L/∂ block input‖"),
                ("param_grad_norm", "‖∂L/∂ block params‖")]
      summary = {n.label: f"input-gradient norm spread (max/min over blocks) "
                          f"{spread(rows, n.label, 'input_grad_norm'):,.1f}×" for n in nets}
    else:
      rows = layer_response_rows(nets, args.data_dir, args.batch_size, args.seed)
      stem, log_scale, title = "layer_responses", False, "Std of each residual branch's output"
      panels = [("response_std", "std of the branch output")]
      summary = {n.label: "mean std {:.3f}".format(
          np.mean([r["response_std"] for r in rows if r["model"] == n.label])) for n in nets}
  except ValueError as e:
    sys.exit(f"error: {e}")
  write_csv(os.path.join(args.out, f"{stem}.csv"), rows)
  plot_per_block(os.path.join(args.out, f"{stem}.png"), rows, panels, title, log_scale,
                 sorted_panel=args.command == "layer-responses")
  for label, line in summary.items():
    print(f"{label}: {line}")
  print(f"wrote {os.path.join(args.out, stem)}.csv and .png")


if __name__ == "__main__":
  main()
