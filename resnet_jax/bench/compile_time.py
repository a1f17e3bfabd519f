"""Compile time of the train step, and of the forward pass for reference, per model and variant.

  python -m resnet_jax.bench.compile_time --models resnet18,resnet50,resnet101
  python -m resnet_jax.bench.compile_time --models resnet50 --variants unrolled,scanned,remat
  python -m resnet_jax.bench.compile_time --sweep --out DIR --sweep_models resnet20,resnet56

For each model it builds the jit-mode experiment with `setup` (as train.py does, but with
an abstract state: nothing is initialised) and times, separately, tracing, lowering to
StableHLO and XLA's compilation of the train step and of the inference forward pass, both
laid out over the devices as in training; nothing runs. For the compiled train step it also
reports XLA's cost analysis (FLOPs, bytes accessed) and memory analysis (argument, output,
aliased, temp and generated-code bytes). A variant builds the model unrolled, with
`scan_blocks`, with `remat`, or both; when the unrolled model is in the same run, each
variant's compile time and temp bytes are also given as ratios to its. `--sweep` runs the
ImageNet and CIFAR depths, unrolled and scanned, and writes a markdown table, a CSV and a
plot of compile time against depth. Run as a program, it turns JAX's persistent compilation
cache off, so that every compilation is a real one; callers of `measure_model` choose for
themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import tqdm

from resnet_jax import cli
from resnet_jax.bench import benchmark_config, write_csv, write_json
from resnet_jax.bench.dry_run import MEMORY_FIELDS, abstract_inputs, memory_stats
from resnet_jax.models import create_model
from resnet_jax.models.scan import REMAT_POLICIES
from resnet_jax.summary import count
from resnet_jax.training.config import DTYPES
from resnet_jax.training.loop import setup

# A StableHLO operation in the lowered text: optional results, then the op's name.
STABLEHLO_OP = re.compile(r"^\s*(?:%\S+ = )?\"?stablehlo\.\w+", re.MULTILINE)
# How each variant builds the model (config keys).
VARIANTS = {"unrolled": {}, "scanned": {"scan_blocks": True}, "remat": {"remat": True},
            "scanned+remat": {"scan_blocks": True, "remat": True}}
SWEEP_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
                "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202")
CIFAR_IMAGE_SIZE, IMAGENET_IMAGE_SIZE = 32, 64  # defaults: small, and enough for every stage
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class StageTimes:
  trace_s: float
  lower_s: float
  compile_s: float  # XLA's compilation of the lowered program
  stablehlo_ops: int  # operations in the lowered program's text


@dataclasses.dataclass(frozen=True)
class CompiledCost:
  """XLA's analysis of one compiled program, per device.

  XLA counts a loop's body once, so a scanned model's FLOPs and bytes accessed are those of
  its unrolled part plus one block per stage, not of the whole step.
  """

  flops: float
  bytes_accessed: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments (the train state)
  temp_bytes: int  # intermediates live during the step: what remat shrinks
  generated_code_bytes: int


@dataclasses.dataclass(frozen=True)
class ModelCompileTimes:
  model: str
  variant: str  # a key of VARIANTS
  depth: int  # weighted layers (convs and fc), as in the model's name
  image_size: int
  num_params: int
  train_step: StageTimes
  forward: StageTimes
  train_step_cost: CompiledCost
  train_to_forward_compile_ratio: float  # train_step.compile_s / forward.compile_s


def time_stages(jitted: Callable[..., Any], *args: Any
                ) -> tuple[StageTimes, jax.stages.Lowered, jax.stages.Compiled]:
  """Traces, lowers and compiles `jitted` for `args`, timing each stage; runs nothing."""
  start = time.perf_counter()
  traced = jitted.trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  times = StageTimes(traced_at - start, lowered_at - traced_at, compiled_at - lowered_at,
                     len(STABLEHLO_OP.findall(lowered.as_text())))
  return times, lowered, compiled


def compiled_cost(compiled: jax.stages.Compiled) -> CompiledCost:
  """FLOPs and bytes from `cost_analysis()`, buffer sizes from `memory_analysis()`."""
  cost, memory = compiled.cost_analysis(), memory_stats(compiled)
  return CompiledCost(flops=float(cost["flops"]), bytes_accessed=float(cost["bytes accessed"]),
                      **{f"{field}_bytes": memory[field] for field in MEMORY_FIELDS})


def model_depth(name: str) -> int:
  """Weighted layers of the registry model `name`: 2 or 3 convs per block, the stem and fc."""
  model = create_model(name)
  return sum(model.stage_sizes) * (3 if model.block_cls.expansion == 4 else 2) + 2


def default_image_size(name: str) -> int:
  """32×32 for the CIFAR nets, 64×64 for ImageNet ones: small, and every stage still halves."""
  return CIFAR_IMAGE_SIZE if create_model(name).stem == "cifar" else IMAGENET_IMAGE_SIZE


def dump_hlo(directory: str, stem: str, lowered: jax.stages.Lowered,
             compiled: jax.stages.Compiled) -> None:
  """Writes STEM.stablehlo.mlir (the lowered program) and STEM.hlo.txt (XLA's optimised HLO)."""
  os.makedirs(directory, exist_ok=True)
  for suffix, text in ((".stablehlo.mlir", lowered.as_text()), (".hlo.txt", compiled.as_text())):
    with open(os.path.join(directory, stem + suffix), "w") as f:
      f.write(text)


def measure_model(model: str, *, batch_size: int, image_size: int, dtype: str,
                  variant: str = "unrolled", remat_policy: str = "nothing_saveable",
                  hlo_dir: str | None = None) -> ModelCompileTimes:
  """Compile times of `model`'s jit-mode train step and forward pass on one global batch,
  built as `variant` says; with `hlo_dir`, also writes both programs' text there."""
  config = benchmark_config(model, batch_size=batch_size, image_size=image_size, dtype=dtype)
  config.update(VARIANTS[variant])
  config.remat_policy = remat_policy
  exp = setup(config, abstract_state=True)  # shapes only: nothing is initialised
  state, batch = abstract_inputs(exp)  # laid out over the devices as in training
  train_step, train_lowered, train_compiled = time_stages(exp.data_parallel.train_step, state,
                                                          batch)
  forward, forward_lowered, forward_compiled = time_stages(
      jax.jit(functools.partial(exp.model.apply, train=False)), state.variables, batch["image"])
  if hlo_dir:
    dump_hlo(hlo_dir, f"{model}.{variant}.train_step", train_lowered, train_compiled)
    dump_hlo(hlo_dir, f"{model}.{variant}.forward", forward_lowered, forward_compiled)
  return ModelCompileTimes(model, variant, model_depth(model), image_size, count(state.params),
                           train_step, forward, compiled_cost(train_compiled),
                           train_step.compile_s / forward.compile_s)


def ratios_to_unrolled(r: ModelCompileTimes, results: Sequence[ModelCompileTimes]
                       ) -> tuple[float, float] | None:
  """(train-step XLA compile time, temp bytes) of `r` over its model's unrolled row in
  `results`; None without one."""
  for base in results:
    if base.model == r.model and base.variant == "unrolled":
      temp = r.train_step_cost.temp_bytes / max(base.train_step_cost.temp_bytes, 1)
      return r.train_step.compile_s / base.train_step.compile_s, temp
  return None


def format_table(results: Sequence[ModelCompileTimes]) -> str:
  """One row per model and variant: params, then trace / lower / compile seconds and op counts."""
  header = (f"{'model':<18} {'variant':<13} {'params':>12}  {'train trace':>11} {'lower':>7} "
            f"{'compile':>8} {'ops':>6}  {'fwd trace':>9} {'lower':>7} {'compile':>8} "
            f"{'ops':>6}  {'train/fwd compile':>17}")
  lines = [header, "-" * len(header)]
  for r in results:
    t, f = r.train_step, r.forward
    lines.append(
        f"{r.model:<18} {r.variant:<13} {r.num_params:>12,}  {t.trace_s:>11.2f} "
        f"{t.lower_s:>7.2f} {t.compile_s:>8.2f} {t.stablehlo_ops:>6}  {f.trace_s:>9.2f} "
        f"{f.lower_s:>7.2f} {f.compile_s:>8.2f} {f.stablehlo_ops:>6}  "
        f"{r.train_to_forward_compile_ratio:>17.2f}")
  return "\n".join(lines)


def format_cost_table(results: Sequence[ModelCompileTimes]) -> str:
  """XLA's view of each compiled train step, and its ratios to the unrolled variant's."""
  header = (f"{'train step':<32} {'GFLOP':>9} {'GB accessed':>11} {'args MiB':>9} "
            f"{'out MiB':>8} {'temp MiB':>9} {'code MiB':>9}  {'compile/unrolled':>16} "
            f"{'temp/unrolled':>13}")
  lines = [header, "-" * len(header)]
  for r in results:
    c, ratios = r.train_step_cost, ratios_to_unrolled(r, results)
    compile_ratio, temp_ratio = (f"{x:.2f}" for x in ratios) if ratios else ("-", "-")
    lines.append(
        f"{r.model + ' ' + r.variant:<32} {c.flops / 1e9:>9.3f} {c.bytes_accessed / 1e9:>11.3f} "
        f"{c.argument_bytes / MIB:>9.1f} {c.output_bytes / MIB:>8.1f} {c.temp_bytes / MIB:>9.1f} "
        f"{c.generated_code_bytes / MIB:>9.2f}  {compile_ratio:>16} {temp_ratio:>13}")
  return "\n".join(lines)


def flat_row(r: ModelCompileTimes, results: Sequence[ModelCompileTimes]) -> dict[str, Any]:
  """One CSV row: every number of `r`, nested fields prefixed, with its ratios to unrolled."""
  row = {}
  for key, value in dataclasses.asdict(r).items():
    if isinstance(value, dict):
      row.update({f"{key}.{k}": v for k, v in value.items()})
    else:
      row[key] = value
  ratios = ratios_to_unrolled(r, results)
  row["compile_vs_unrolled"], row["temp_vs_unrolled"] = ratios or ("", "")
  return row


def format_markdown(results: Sequence[ModelCompileTimes]) -> str:
  """The sweep as a markdown table: train-step seconds, program size and memory."""
  lines = ["| model | variant | depth | params | train trace + lower s | train compile s | "
           "StableHLO ops | temp MiB | compile / unrolled | temp / unrolled |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    t, ratios = r.train_step, ratios_to_unrolled(r, results)
    compile_ratio, temp_ratio = (f"{x:.2f}" for x in ratios) if ratios else ("", "")
    lines.append(f"| {r.model} | {r.variant} | {r.depth} | {r.num_params:,} | "
                 f"{t.trace_s + t.lower_s:.2f} | {t.compile_s:.2f} | {t.stablehlo_ops:,} | "
                 f"{r.train_step_cost.temp_bytes / MIB:.1f} | {compile_ratio} | {temp_ratio} |")
  return "\n".join(lines) + "\n"


def plot(path: str, results: Sequence[ModelCompileTimes]) -> None:
  """Train-step compile seconds and StableHLO ops against depth, one line per family and
  variant, both axes logarithmic."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  families = {r.model: "CIFAR" if create_model(r.model).stem == "cifar" else "ImageNet"
              for r in results}
  lines = sorted({(families[r.model], r.variant) for r in results})
  colors = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:orange", "tab:green")))
  for ax, value, ylabel in (
      (axes[0], lambda r: r.train_step.compile_s, "XLA compile of the train step (s)"),
      (axes[1], lambda r: r.train_step.stablehlo_ops, "StableHLO ops of the train step")):
    for family, variant in lines:
      mine = sorted((r for r in results if (families[r.model], r.variant) == (family, variant)),
                    key=lambda r: r.depth)
      ax.plot([r.depth for r in mine], [value(r) for r in mine], color=colors[variant],
              marker="o" if family == "ImageNet" else "s",
              linestyle="-" if family == "ImageNet" else "--", label=f"{family} {variant}")
    ax.set(xscale="log", yscale="log", xlabel="depth (weighted layers)", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_outputs(directory: str, results: Sequence[ModelCompileTimes]) -> list[str]:
  """compile_time.{md,csv,png,json} in `directory`; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, f"compile_time.{ext}") for ext in ("md", "csv", "png", "json")]
  with open(paths[0], "w") as f:
    f.write(format_markdown(results))
  write_csv(paths[1], [flat_row(r, results) for r in results])
  plot(paths[2], results)
  write_json(paths[3], [dataclasses.asdict(r) for r in results])
  return paths


def chosen_variants(args: argparse.Namespace) -> list[str]:
  """--variants, else unrolled and scanned for --sweep, else the one --scan_blocks/--remat build."""
  if args.variants:
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
      raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.scan_blocks or args.remat:
      raise ValueError("--variants names every variant to build; drop --scan_blocks/--remat")
    return variants
  if args.sweep and not (args.scan_blocks or args.remat):
    return ["unrolled", "scanned"]
  return [{(False, False): "unrolled", (True, False): "scanned", (False, True): "remat",
           (True, True): "scanned+remat"}[(args.scan_blocks, args.remat)]]


def chosen_models(args: argparse.Namespace) -> list[str]:
  """The sweep's models (--sweep_models picks some), else --models."""
  if args.sweep_models and not args.sweep:
    raise ValueError("--sweep_models picks the models of --sweep; use --models otherwise")
  if args.sweep and not args.out:
    raise ValueError("--sweep writes a table, a CSV and a plot: give --out DIR")
  names = (args.sweep_models or ",".join(SWEEP_MODELS)) if args.sweep else args.models
  return [m for m in names.split(",") if m]


def make_parser() -> argparse.ArgumentParser:
  parser = cli.parser_for("resnet_jax.bench.compile_time", __doc__)
  parser.add_argument("--models", default="resnet18,resnet50,resnet101",
                      help="comma-separated model names")
  parser.add_argument("--batch_size", type=int, default=8, help="global, over all devices")
  parser.add_argument("--image_size", type=int, default=0,
                      help=f"0: {CIFAR_IMAGE_SIZE} for the CIFAR nets, {IMAGENET_IMAGE_SIZE} "
                      "for ImageNet ones")
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--scan_blocks", action="store_true",
                      help="build the models with scan_blocks (each stage's repeats as a loop)")
  parser.add_argument("--remat", action="store_true", help="build the models with remat")
  parser.add_argument("--remat_policy", choices=REMAT_POLICIES, default="nothing_saveable")
  parser.add_argument("--variants", default="",
                      help=f"comma-separated, one row each, from {', '.join(VARIANTS)}; ratios "
                      "to unrolled when it is among them")
  parser.add_argument("--sweep", action="store_true",
                      help=f"every depth ({', '.join(SWEEP_MODELS)}), unrolled and scanned")
  parser.add_argument("--sweep_models", default="", help="only these models of the sweep")
  parser.add_argument("--out", metavar="DIR",
                      help="write compile_time.md, .csv, .png (vs depth) and .json there")
  parser.add_argument("--dump_hlo", metavar="DIR",
                      help="write each program's StableHLO and optimised HLO text there")
  parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = make_parser()
  args = parser.parse_args(argv)
  try:
    models, variants = chosen_models(args), chosen_variants(args)
    runs = [(m, v) for m in models for v in variants]
    results = []
    progress = tqdm.tqdm(runs, desc="compiling", unit="model")
    for model, variant in progress:
      progress.set_postfix_str(f"{model} {variant}")
      results.append(measure_model(
          model, batch_size=args.batch_size, image_size=args.image_size or
          default_image_size(model), dtype=args.dtype, variant=variant,
          remat_policy=args.remat_policy, hlo_dir=args.dump_hlo))
  except ValueError as e:  # a bad model, variant, batch or image size: one actionable line.
    parser.exit(2, f"error: {e}\n")
  sizes = sorted({r.image_size for r in results})
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, global batch "
        f"{args.batch_size}, images {', '.join(f'{s}x{s}' for s in sizes)}, {args.dtype}; "
        "seconds")
  print(format_table(results))
  print()
  print(format_cost_table(results))
  if any(VARIANTS[r.variant].get("scan_blocks") for r in results):
    print("(XLA counts a loop body once: a scanned step's FLOPs and bytes accessed leave out "
          "all but one of each stage's repeated blocks)")
  if args.json:
    write_json(args.json, [dataclasses.asdict(r) for r in results])
  if args.out:
    print("wrote " + ", ".join(write_outputs(args.out, results)))


if __name__ == "__main__":
  jax.config.update("jax_enable_compilation_cache", False)  # real compiles, not cache reads
  main()
