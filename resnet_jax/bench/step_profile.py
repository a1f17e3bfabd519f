"""Where a train (or eval) step's time goes on XLA:CPU: jax.profiler's thunk times, by kind.

  python -m resnet_jax.bench.step_profile --model resnet20 --batch_size 128 --image_size 32
  python -m resnet_jax.bench.step_profile --model resnet56 --batch_size 128 --image_size 32 \
      --step eval

Compiles the step that train.py runs (`setup(config)`, "fake" data), runs it `--steps`
times under `jax.profiler.trace`, and maps every executed thunk (XLA:CPU runs one per HLO
instruction of the entry computation: a convolution, a YNNPACK fusion, a loop fusion, a
copy) to its instruction in the compiled HLO. Each instruction gets a kind from what it
computes and its source (the `op_name` metadata: the Flax module and whether it is the
forward pass or autodiff's transpose): convolutions forward, input gradient and weight
gradient per stage and kernel library (XLA's Eigen `convolution` or a `ynn_fusion`),
matmuls, BatchNorm statistics, the elementwise passes of BatchNorm, ReLU and the residual
adds, the option-A shortcut, copies and transposes, loss and metrics, and the optimizer
update (everything outside the model). Prints milliseconds per step for each kind and the
slowest instructions, with the step's wall time and the part of it no thunk covered
(dispatch, host work, waiting). XLA:CPU runs independent thunks side by side, and a thunk
waiting for a busy thread counts its wait: the sums are thread time (about twice the wall
time on two cores), not what each kind would cost alone.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time
from collections.abc import Sequence

import jax
import numpy as np

from resnet_jax import cli, malloc_tuning
from resnet_jax.bench import benchmark_config, write_json
from resnet_jax.bench.collectives import split_computations
from resnet_jax.models import onednn
from resnet_jax.models.layers import LAYER_IMPLS, resolve_layer_impl
from resnet_jax.training.config import DTYPES
from resnet_jax.training.loop import Experiment, setup, train_batches

STEPS = ("train", "eval")
END_PREFIX = "end: "  # XLA:CPU's event at the completion of a thunk
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.-]+) = (?P<shape>.+?) (?P<opcode>[a-z][\w-]*)\((?P<rest>.*)$")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
ONEDNN_DIRECTIONS = {"forward": "forward", "input_grad": "input gradient",
                     "weight_grad": "weight gradient"}
_STAGE = re.compile(r"/(layer\d+)_\d+/|/ResNet\.apply_(stem)/")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction of the compiled entry computation: what a thunk runs."""

  name: str
  opcode: str  # "fusion", "convolution", "copy", ...
  shape: str
  op_name: str  # the source, as JAX's name stack wrote it
  ops: frozenset[str]  # opcodes inside it (itself for an unfused instruction)
  target: str = ""  # a custom call's target


def parse_hlo(text: str) -> dict[str, Instruction]:
  """The entry computation's instructions of a compiled module's text, by name."""
  computations, entry = split_computations(text)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")

  def opcodes(lines: list[str]) -> set[str]:
    ops = set()
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        ops.add(match["opcode"])
        for called in _CALLS.findall(match["rest"]):
          ops |= opcodes(computations.get(called, []))
    return ops

  instructions = {}
  for line in computations[entry]:
    match = _INSTRUCTION.match(line)
    if not match or match["opcode"] == "parameter":
      continue
    op_name = _OP_NAME.search(match["rest"])
    target = _TARGET.search(match["rest"])
    instructions[match["name"]] = Instruction(
        match["name"], match["opcode"], match["shape"], op_name[1] if op_name else "",
        frozenset(opcodes([line])), target[1] if target else "")
  return instructions


def _dims(shape: str) -> tuple[int, ...]:
  match = re.match(r"\w+\[([\d,]*)\]", shape)
  return tuple(int(d) for d in match[1].split(",") if d) if match else ()


def classify(inst: Instruction, kernel_shapes: set[tuple[int, ...]], step: str = "train") -> str:
  """The kind of work an instruction does, from its ops, its source and its shapes."""
  backward = "transpose(jvp(" in inst.op_name
  in_model = "ResNet" in inst.op_name
  stage = _STAGE.search(inst.op_name)
  where = (stage[1] or stage[2]) if stage else "unnamed"
  if inst.target.startswith(onednn.TARGET_PREFIX):
    return f"conv {ONEDNN_DIRECTIONS[inst.target[len(onednn.TARGET_PREFIX):]]}, {where} (oneDNN)"
  if "convolution" in inst.ops:
    library = "Eigen" if inst.opcode == "convolution" else "YNNPACK"
    if tuple(sorted(_dims(inst.shape))) in kernel_shapes:  # a forward conv never is
      direction = "weight gradient"
    else:
      direction = "input gradient" if backward else "forward"
    return f"conv {direction}, {where} ({library})"
  if "dot" in inst.ops:
    return "matmul (fc, 1×1 convs)"
  if "/downsample/" in inst.op_name or ".make_shortcut" in inst.op_name:
    return "option-A shortcut (slice, pad)"
  if inst.opcode in ("copy", "transpose") or inst.name.startswith(("copy", "transpose",
                                                                  "wrapped_copy")):
    return "copies and transposes"
  if in_model and "/bn" in inst.op_name and "reduce" in inst.ops:
    return "BatchNorm statistics " + ("(backward)" if backward else "(forward)")
  if in_model:
    return "BatchNorm, ReLU, residual add: elementwise " + ("backward" if backward
                                                           else "forward")
  if (step == "eval" or "log_softmax" in inst.op_name or "one_hot" in inst.op_name
      or "iota" in inst.name):
    return "loss and metrics"
  return "optimizer update, finite checks, other"


@dataclasses.dataclass(frozen=True)
class Row:
  what: str
  ms_per_step: float
  count: int  # instructions (kinds) or executions per step (one instruction)


@dataclasses.dataclass(frozen=True)
class StepProfile:
  model: str
  step: str  # "train" or "eval"
  batch_size: int
  image_size: int
  dtype: str
  layer_impl: str
  device_count: int  # thunk times are summed over the devices
  steps: int
  wall_ms: float  # per step, timed around the profiled steps
  thunk_ms: float  # per step: every thunk's duration, summed (threads can overlap)
  covered_ms: float  # per step: wall time inside at least one thunk
  by_kind: list[Row]
  slowest: list[Row]  # instructions, with their source


def thunk_durations(trace_dir: str, names: set[str]) -> tuple[dict[str, float],
                                                               list[tuple[float, float]]]:
  """From a profiler trace: total µs per instruction name, and every thunk's interval.

  A thunk runs from its event's start to the end of its "end: NAME" event, which XLA:CPU
  records once the thunk completes: its own event covers only the launch of asynchronous
  ones (XLA's Eigen convolutions run on the intra-op thread pool and return at once).
  """
  paths = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
  # Starts by name alone: the "end:" event can come on another thread (the one that
  # completed the thunk).
  started: dict[str, list[float]] = collections.defaultdict(list)
  totals: dict[str, float] = collections.defaultdict(float)
  intervals = []
  for event in events:
    name = event.get("name", "")
    if name in names:
      started[name].append(event["ts"])
    elif name.startswith(END_PREFIX) and name[len(END_PREFIX):] in names:
      name = name[len(END_PREFIX):]
      pending = started.get(name)
      if pending:
        start, stop = pending.pop(0), event["ts"] + event["dur"]
        totals[name] += stop - start
        intervals.append((start, stop))
  return totals, intervals


def covered_time(intervals: list[tuple[float, float]]) -> float:
  """The length of the union of `intervals`."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def compiled_step(exp: Experiment, step: str):
  """The step's compiled text, and a call that runs it once (the train step on its own
  state, the eval step on a train batch with every example counted)."""
  dp = exp.data_parallel
  state = dp.put_state(exp.initial_state)
  batch = next(train_batches(exp, 0))
  if step == "train":
    batch = dp.put_batch(batch)
    text = dp.train_step.lower(state, batch).compile().as_text()

    def run_once():
      nonlocal state
      state, metrics = dp.train_step(state, batch)
      return state, metrics
  else:
    batch = dp.put_batch({**batch, "mask": np.ones(batch["label"].shape, np.float32)})
    text = dp.eval_step.lower(state, batch).compile().as_text()

    def run_once():
      return dp.eval_step(state, batch)
  return text, run_once


def profile(exp: Experiment, step: str, steps: int, top: int) -> StepProfile:
  """Profiles `steps` runs of the compiled train or eval step of `exp`."""
  if exp.config.parallelism != "jit":
    raise ValueError("step_profile reads the jit-mode program: run with --parallelism=jit")
  text, run_once = compiled_step(exp, step)
  instructions = parse_hlo(text)
  kernel_shapes = {tuple(sorted(leaf.shape))
                   for leaf in jax.tree.leaves(exp.initial_state.params) if leaf.ndim == 4}
  for _ in range(2):  # warm-up: the first runs touch new memory
    jax.block_until_ready(run_once())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(run_once())
      wall_s = time.perf_counter() - start
    totals, intervals = thunk_durations(trace_dir, set(instructions))
  by_kind: dict[str, float] = collections.defaultdict(float)
  kind_count: collections.Counter = collections.Counter()
  for name, us in totals.items():
    kind = classify(instructions[name], kernel_shapes, step)
    by_kind[kind] += us
    kind_count[kind] += 1
  per_step = 1e-3 / steps  # µs over all steps -> ms per step
  slowest = sorted(totals.items(), key=lambda item: -item[1])[:top]
  return StepProfile(
      model=exp.config.model, step=step, batch_size=exp.config.batch_size,
      image_size=exp.image_size, dtype=exp.config.dtype, layer_impl=resolve_layer_impl(exp.model.layer_impl), device_count=jax.device_count(),
      steps=steps, wall_ms=wall_s * 1e3 / steps, thunk_ms=sum(totals.values()) * per_step,
      covered_ms=covered_time(intervals) * per_step,
      by_kind=[Row(kind, us * per_step, kind_count[kind])
               for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])],
      slowest=[Row(f"{name} ({_source(instructions[name])}) {instructions[name].shape}",
                   us * per_step, 1) for name, us in slowest])


def _source(inst: Instruction) -> str:
  """The instruction's source, short: its module path and op, marked bwd for gradients."""
  path = inst.op_name.removeprefix("jit(train_step)/").removeprefix("jit(eval_step)/")
  backward = path.startswith("transpose(")
  path = re.sub(r"^(transpose\()?jvp\(ResNet\)\)?/", "", path)
  return ("bwd " if backward else "") + path


def format_profile(p: StepProfile) -> str:
  lines = [f"{p.model} {p.step} step, batch {p.batch_size}, {p.image_size}x{p.image_size}, "
           f"{p.dtype}, layer_impl {p.layer_impl}: {p.steps} steps profiled"
           + (f", thunk times summed over {p.device_count} devices" if p.device_count > 1
              else ""),
           f"wall {p.wall_ms:.1f} ms per step; thunks {p.thunk_ms:.1f} ms summed, covering "
           f"{p.covered_ms:.1f} ms of the wall time ({p.wall_ms - p.covered_ms:.1f} ms in no "
           "thunk: dispatch, host work, waiting)", "",
           "| kind | ms per step | share of thunk time | instructions |", "|---|---|---|---|"]
  for row in p.by_kind:
    lines.append(f"| {row.what} | {row.ms_per_step:.2f} | {row.ms_per_step / p.thunk_ms:.1%} "
                 f"| {row.count} |")
  lines += ["", "| slowest instructions (source, output) | ms per step |", "|---|---|"]
  lines += [f"| {row.what} | {row.ms_per_step:.2f} |" for row in p.slowest]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.step_profile", __doc__)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--layer_impl", choices=LAYER_IMPLS, default="auto")
  parser.add_argument("--step", choices=STEPS, default="train")
  parser.add_argument("--steps", type=int, default=5, help="profiled steps")
  parser.add_argument("--top", type=int, default=15, help="slowest instructions to list")
  parser.add_argument("--json", metavar="PATH", help="also write the profile to PATH")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.top < 0:
    parser.error("--steps must be >= 1 and --top >= 0")
  config = benchmark_config(args.model, batch_size=args.batch_size, image_size=args.image_size,
                            dtype=args.dtype, num_train_steps=3 + args.steps)
  config.layer_impl = args.layer_impl
  try:
    result = profile(setup(config), args.step, args.steps, args.top)
  except ValueError as e:
    parser.exit(2, f"error: {e}\n")
  print(format_profile(result))
  if args.json:
    write_json(args.json, dataclasses.asdict(result))


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # steps as train.py runs them
  main()
