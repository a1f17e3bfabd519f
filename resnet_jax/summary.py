"""Per-layer model summary: `python -m resnet_jax.summary resnet50 --image_size 224`.

Prints each layer's output shape and parameter count, then totals: parameters, BatchNorm
statistics and the forward FLOPs of one image from XLA's cost analysis. Nothing is
allocated or run: shapes come from `jax.eval_shape`, FLOPs from the program lowered for
the CPU (the same count on every machine).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from resnet_jax import cli
from resnet_jax.models import create_model, list_models


@dataclasses.dataclass(frozen=True)
class LayerRow:
  path: str
  output_shape: tuple[int, ...]
  num_params: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  rows: list[LayerRow]
  num_params: int
  num_batch_stats: int
  forward_flops: float  # per image, from XLA's cost analysis


def count(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or shape structs."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def summarize(model: nn.Module, image_size: int, depth: int | None = None) -> ModelSummary:
  """Summarises `model` on one `image_size` square image; `depth` limits the nesting shown."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, model.in_channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)
  params = traverse_util.flatten_dict(variables["params"], sep="/")

  calls: list[tuple[str, Any]] = []  # (path, output) in call order, parents before children.

  def record_call(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or not context.module.path:
      return next_fun(*args, **kwargs)
    index = len(calls)
    calls.append(("/".join(context.module.path), None))
    output = next_fun(*args, **kwargs)
    calls[index] = (calls[index][0], None if output is args[0] else output)  # None: identity.
    return output

  with nn.intercept_methods(record_call):
    jax.eval_shape(model.apply, variables, image)

  rows = []
  for path, output in calls:
    if output is None or (depth is not None and path.count("/") >= depth):
      continue
    num_params = sum(math.prod(p.shape) for name, p in params.items()
                     if name.startswith(path + "/"))
    rows.append(LayerRow(path, tuple(output.shape), num_params))

  # Lowered for the CPU: accelerator backends give no cost analysis before compiling.
  with jax.default_device(jax.devices("cpu")[0]):
    lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, image)
  flops = float(lowered.cost_analysis()["flops"])
  return ModelSummary(rows, count(variables["params"]), count(variables.get("batch_stats", {})),
                      flops)


def format_summary(name: str, summary: ModelSummary) -> str:
  """The summary as a plain-text table."""
  width = max([len(r.path) for r in summary.rows] + [5])
  lines = [f"{'layer':<{width}}  {'output shape':<22}  {'params':>12}", "-" * (width + 38)]
  for r in summary.rows:
    shape = "(" + ", ".join(str(d) for d in r.output_shape) + ")"
    lines.append(f"{r.path:<{width}}  {shape:<22}  {r.num_params:>12,}")
  lines += [
      "-" * (width + 38),
      f"{name}: {summary.num_params:,} parameters, "
      f"{summary.num_batch_stats:,} batch_stats entries, "
      f"{summary.forward_flops / 1e9:.3f} GFLOPs forward per image (XLA cost analysis)",
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.summary", __doc__)
  parser.add_argument("model", help=f"one of: {', '.join(list_models())}")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--in_channels", type=int, default=3)
  parser.add_argument("--depth", type=int, default=None,
                      help="show layers nested at most this deep (1: blocks only)")
  args = parser.parse_args(argv)
  overrides = {"in_channels": args.in_channels}
  if args.num_classes is not None:
    overrides["num_classes"] = args.num_classes
  try:
    model = create_model(args.model, **overrides)
    summary = summarize(model, args.image_size, args.depth)
  except ValueError as e:
    parser.exit(2, f"error: {e}\n")
  print(format_summary(args.model, summary))


if __name__ == "__main__":
  main()
