"""Compile time of the train step, and of the forward pass for reference, per model.

  python -m resnet_jax.bench.compile_time --models resnet18,resnet50,resnet101

For each model it builds the jit-mode experiment with `setup` (as train.py does) and
times, separately, tracing, lowering to StableHLO and XLA's compilation of the train step
and of the inference forward pass, both laid out over the devices as in training; nothing
runs. Run as a program, it turns JAX's persistent compilation cache off, so that every
compilation is a real one; callers of `measure_model` choose for themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import time
from typing import Any, Callable, Sequence

import jax
import tqdm

from resnet_jax.bench import benchmark_config, write_json
from resnet_jax.summary import count
from resnet_jax.training.config import DTYPES
from resnet_jax.training.loop import setup, train_batches

# A StableHLO operation in the lowered text: optional results, then the op's name.
STABLEHLO_OP = re.compile(r"^\s*(?:%\S+ = )?\"?stablehlo\.\w+", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class StageTimes:
  trace_s: float
  lower_s: float
  compile_s: float  # XLA's compilation of the lowered program
  stablehlo_ops: int  # operations in the lowered program's text


@dataclasses.dataclass(frozen=True)
class ModelCompileTimes:
  model: str
  num_params: int
  train_step: StageTimes
  forward: StageTimes
  train_to_forward_compile_ratio: float  # train_step.compile_s / forward.compile_s


def time_stages(jitted: Callable[..., Any], *args: Any) -> StageTimes:
  """Traces, lowers and compiles `jitted` for `args`, timing each stage; runs nothing."""
  start = time.perf_counter()
  traced = jitted.trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  lowered.compile()
  compiled_at = time.perf_counter()
  return StageTimes(traced_at - start, lowered_at - traced_at, compiled_at - lowered_at,
                    len(STABLEHLO_OP.findall(lowered.as_text())))


def measure_model(model: str, *, batch_size: int, image_size: int,
                  dtype: str) -> ModelCompileTimes:
  """Compile times of `model`'s jit-mode train step and forward pass on one global batch."""
  exp = setup(benchmark_config(model, batch_size=batch_size, image_size=image_size, dtype=dtype))
  state = exp.initial_state
  batch = exp.data_parallel.put_batch(next(train_batches(exp, 0)))  # sharded as in training
  train_step = time_stages(exp.data_parallel.train_step, state, batch)
  forward = time_stages(jax.jit(functools.partial(exp.model.apply, train=False)),
                        state.variables, batch["image"])
  return ModelCompileTimes(model, count(state.params), train_step, forward,
                           train_step.compile_s / forward.compile_s)


def format_table(results: Sequence[ModelCompileTimes]) -> str:
  """One row per model: params, then trace / lower / compile seconds and op counts."""
  header = (f"{'model':<18} {'params':>12}  {'train trace':>11} {'lower':>7} {'compile':>8} "
            f"{'ops':>6}  {'fwd trace':>9} {'lower':>7} {'compile':>8} {'ops':>6}  "
            f"{'train/fwd compile':>17}")
  lines = [header, "-" * len(header)]
  for r in results:
    t, f = r.train_step, r.forward
    lines.append(
        f"{r.model:<18} {r.num_params:>12,}  {t.trace_s:>11.2f} {t.lower_s:>7.2f} "
        f"{t.compile_s:>8.2f} {t.stablehlo_ops:>6}  {f.trace_s:>9.2f} {f.lower_s:>7.2f} "
        f"{f.compile_s:>8.2f} {f.stablehlo_ops:>6}  {r.train_to_forward_compile_ratio:>17.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet18,resnet50,resnet101",
                      help="comma-separated model names")
  parser.add_argument("--batch-size", type=int, default=8, help="global, over all devices")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  results = []
  try:
    for model in tqdm.tqdm(models, desc="compiling", unit="model"):
      results.append(measure_model(model, batch_size=args.batch_size,
                                   image_size=args.image_size, dtype=args.dtype))
  except ValueError as e:  # a bad model, batch or image size: one actionable line.
    parser.exit(2, f"error: {e}\n")
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, global batch "
        f"{args.batch_size}, {args.image_size}x{args.image_size}, {args.dtype}; seconds")
  print(format_table(results))
  if args.json:
    write_json(args.json, [dataclasses.asdict(r) for r in results])


if __name__ == "__main__":
  jax.config.update("jax_enable_compilation_cache", False)  # real compiles, not cache reads
  main()
