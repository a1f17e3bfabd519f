"""Train-step throughput against a matmul ceiling, the plain conv path and PyTorch.

  python -m resnet_jax.bench.throughput --model resnet50 --batch_size 256 --dtype bfloat16
  python -m resnet_jax.bench.throughput --model resnet50 --batch_size 8 --dtype float32 \
      --compare_torch
  python -m resnet_jax.bench.throughput --model resnet20 --batch_size 128 --image_size 32 \
      --dtype float32 --compare_torch

Runs the real train step (`setup(config)` and its `DataParallel`, as train.py does) on
"fake" data fed by the real `train_batches` iterator and put on the devices every step.
It reports images/sec, the step's achieved FLOP/s (FLOPs from XLA's cost analysis), the
FLOP/s of a large square matmul of the same dtype on the same devices, and their ratio,
and the process's page faults and kernel time per step (see `resnet_jax/malloc_tuning.py`).
In the same run it times the plain path (`layer_impl="plain"`: XLA's own convolution
and reduce-window) when ours differs from it, then one step of ours and one of plain in
turn for `--steps` rounds (a ratio that holds where the machine's speed drifts), and with
`--compare_torch` the model in PyTorch (torchvision's, or for the paper's CIFAR nets
`interop.torch_cifar`; NCHW and channels-last), and prints ours / theirs.
Run as a program, it turns JAX's persistent compilation cache off, so that the first step
includes a real compilation.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_jax import cli
from resnet_jax import malloc_tuning
from resnet_jax.bench import benchmark_config, torch_reference, write_json
from resnet_jax.models.layers import LAYER_IMPLS, resolve_layer_impl
from resnet_jax.training.config import DTYPES, PARALLELISM_MODES
from resnet_jax.training.loop import DTYPES as JNP_DTYPES, Experiment, setup, train_batches

INPUT_FEED = "real train_batches iterator, put_batch every step (as train.py)"
FLOPS_SOURCE = "XLA cost analysis of the jit-mode step for the global batch, lowered for 1 CPU"
CPU_MATMUL_SIZE = 1024
ACCELERATOR_MATMUL_SIZE = 8192


@dataclasses.dataclass(frozen=True)
class StepTimes:
  first_step_s: float  # compile and run the first step
  step_s: float  # mean over the timed steps
  host_input_s: float  # per timed step: host time to produce and put the batch
  page_faults: float  # per timed step: this process's minor page faults (new memory touched)
  kernel_s: float  # per timed step: this process's CPU time in the kernel, all threads


@dataclasses.dataclass(frozen=True)
class ThroughputResult:
  device_kind: str
  device_count: int
  model: str
  batch_size: int  # global, over all devices
  image_size: int
  dtype: str
  parallelism: str
  layer_impl: str  # "tuned" (1×1 convs as matmuls, ...) or "plain" (XLA's own ops)
  input_feed: str
  steps: int
  warmup_steps: int
  first_step_s: float
  step_time_ms: float
  host_input_ms: float
  page_faults_per_step: float  # minor faults: XLA:CPU's per-step buffers touched anew
  kernel_ms_per_step: float  # CPU time in the kernel (page faults), summed over threads
  images_per_sec: float
  train_step_gflop: float  # per step, for the global batch
  flops_source: str
  train_step_gflop_per_s: float
  matmul_size: int
  matmul_gflop_per_s: float  # summed over devices
  ratio_to_matmul: float  # train_step_gflop_per_s / matmul_gflop_per_s


def time_train_steps(exp: Experiment, steps: int, warmup_steps: int) -> StepTimes:
  """Times the first step alone, then `steps` steps after `warmup_steps` untimed ones."""
  dp = exp.data_parallel
  batches = train_batches(exp, 0)
  state = dp.put_state(exp.initial_state)

  start = time.perf_counter()
  state, _ = dp.train_step(state, dp.put_batch(next(batches)))
  jax.block_until_ready(state)
  first_step_s = time.perf_counter() - start

  for _ in range(warmup_steps):
    state, _ = dp.train_step(state, dp.put_batch(next(batches)))
  jax.block_until_ready(state)

  host_input_s = 0.0
  usage_before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  for _ in range(steps):
    input_start = time.perf_counter()
    batch = dp.put_batch(next(batches))
    host_input_s += time.perf_counter() - input_start
    state, _ = dp.train_step(state, batch)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - start) / steps
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return StepTimes(first_step_s, step_s, host_input_s / steps,
                   page_faults=(usage.ru_minflt - usage_before.ru_minflt) / steps,
                   kernel_s=(usage.ru_stime - usage_before.ru_stime) / steps)


def step_timer(exp: Experiment) -> Callable[[], float]:
  """A function that runs one more train step of `exp` (compiled already) and returns its
  seconds; it trains its own copy of the initial state on one batch."""
  dp = exp.data_parallel
  state = dp.put_state(exp.initial_state)
  batch = dp.put_batch(next(train_batches(exp, 0)))
  state, _ = dp.train_step(state, batch)
  jax.block_until_ready(state)

  def time_one_step() -> float:
    nonlocal state
    start = time.perf_counter()
    state, _ = dp.train_step(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start

  return time_one_step


def interleaved_ratios(ours: Experiment, other: Experiment, rounds: int) -> list[float]:
  """`other`'s step time over ours, round by round, one step of each in turn.

  Both see the same machine in each round, so the ratio holds where the absolute speed
  drifts (a shared VM's does by ±15% within minutes).
  """
  timers = (step_timer(ours), step_timer(other))
  ratios = []
  for _ in range(rounds):
    ours_s, other_s = (time_one_step() for time_one_step in timers)
    ratios.append(other_s / ours_s)
  return ratios


def train_step_flops(exp: Experiment) -> float:
  """FLOPs of one train step on the global batch: XLA's cost analysis, lowered for the CPU.

  The pure jit-mode step is lowered (not compiled) for one CPU device, the same on every
  machine. GPUs give no cost analysis before compiling, and after it leave out the FLOPs
  of the convolutions they hand to cuDNN. Under pmap the step is rebuilt in jit mode: the
  pmap model's BatchNorm needs a replica axis that a plain jit does not bind.
  """
  if exp.config.parallelism != "jit":
    config = exp.config.copy_and_resolve_references()
    config.parallelism = "jit"
    exp = setup(config)
  pure_train_step = exp.data_parallel.train_step.__wrapped__  # what jax.jit wrapped
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.initial_state)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((exp.config.batch_size, *x.shape[1:]),
                                                      x.dtype), next(train_batches(exp, 0)))
  with jax.default_device(jax.devices("cpu")[0]):
    lowered = jax.jit(pure_train_step).trace(state, batch).lower()
  return float(lowered.cost_analysis()["flops"])


def matmul_flops_per_s(dtype: str, size: int, reps: int) -> float:
  """FLOP/s of `size`² matmuls in `dtype`, one per device at once, summed over devices."""
  devices = jax.devices()
  sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))
  shape = (len(devices), size, size)
  random_matrices = jax.jit(lambda key: jax.random.normal(key, shape, JNP_DTYPES[dtype]),
                            out_shardings=sharding)
  a, b = random_matrices(jax.random.key(0)), random_matrices(jax.random.key(1))
  matmul = jax.jit(jnp.matmul, out_shardings=sharding)
  jax.block_until_ready(matmul(a, b))  # compile
  start = time.perf_counter()
  products = [matmul(a, b) for _ in range(reps)]
  jax.block_until_ready(products)
  return 2 * len(devices) * size**3 * reps / (time.perf_counter() - start)


def default_matmul_size() -> int:
  """A matmul that takes tens of milliseconds: smaller on CPU than on accelerators."""
  return CPU_MATMUL_SIZE if jax.devices()[0].platform == "cpu" else ACCELERATOR_MATMUL_SIZE


def benchmark(config: ml_collections.ConfigDict, *, steps: int, warmup_steps: int,
              matmul_size: int, matmul_reps: int) -> tuple[ThroughputResult, Experiment]:
  """Measures the train step of `config` and the matmul ceiling on the same devices;
  returns the result and the experiment (its step compiled)."""
  exp = setup(config)
  times = time_train_steps(exp, steps, warmup_steps)
  flops = train_step_flops(exp)
  achieved = flops / times.step_s
  ceiling = matmul_flops_per_s(config.dtype, matmul_size, matmul_reps)
  return ThroughputResult(
      device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
      model=config.model, batch_size=config.batch_size, image_size=exp.image_size,
      dtype=config.dtype, parallelism=config.parallelism,
      layer_impl=resolve_layer_impl(config.layer_impl), input_feed=INPUT_FEED, steps=steps,
      warmup_steps=warmup_steps, first_step_s=times.first_step_s,
      step_time_ms=times.step_s * 1e3, host_input_ms=times.host_input_s * 1e3,
      page_faults_per_step=times.page_faults, kernel_ms_per_step=times.kernel_s * 1e3,
      images_per_sec=config.batch_size / times.step_s, train_step_gflop=flops / 1e9,
      flops_source=FLOPS_SOURCE, train_step_gflop_per_s=achieved / 1e9,
      matmul_size=matmul_size, matmul_gflop_per_s=ceiling / 1e9,
      ratio_to_matmul=achieved / ceiling), exp


def format_result(r: ThroughputResult) -> str:
  """The result as a short aligned report."""
  rows = [
      ("devices", f"{r.device_count} x {r.device_kind}"),
      ("model", f"{r.model}, global batch {r.batch_size}, {r.image_size}x{r.image_size}, "
                f"{r.dtype}, {r.parallelism}, layer_impl {r.layer_impl}"),
      ("input", f"{r.input_feed}; host input {r.host_input_ms:.2f} ms per step"),
      ("compile + first step", f"{r.first_step_s:.2f} s"),
      ("step time", f"{r.step_time_ms:.2f} ms (mean of {r.steps} steps after "
                    f"{r.warmup_steps} warmup)"),
      ("host memory", f"{r.page_faults_per_step:,.0f} page faults and "
                      f"{r.kernel_ms_per_step:.0f} ms of kernel time per step "
                      f"({malloc_tuning.describe()})"),
      ("images/sec", f"{r.images_per_sec:.1f}"),
      ("train step", f"{r.train_step_gflop:.2f} GFLOP ({r.flops_source})"),
      ("achieved", f"{r.train_step_gflop_per_s:.1f} GFLOP/s"),
      ("matmul ceiling", f"{r.matmul_gflop_per_s:.1f} GFLOP/s ({r.matmul_size}x{r.matmul_size} "
                         f"{r.dtype} matmul on each device, same run)"),
      ("ratio", f"{r.ratio_to_matmul:.3f} (achieved / matmul ceiling)"),
  ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Ours, and what it was compared with in the same run."""

  ours: ThroughputResult
  plain: ThroughputResult | None  # layer_impl="plain"; None when ours is that already
  torch: list[torch_reference.TorchResult]
  # plain's step time / ours, per round of one step each in turn (empty without plain)
  plain_interleaved: list[float] = dataclasses.field(default_factory=list)

  def speedups(self) -> dict[str, float]:
    """Our images/sec over each reference's; "plain_interleaved": the median round's."""
    ratios = {} if self.plain is None else {
        "plain": self.ours.images_per_sec / self.plain.images_per_sec}
    if self.plain_interleaved:
      ratios["plain_interleaved"] = statistics.median(self.plain_interleaved)
    for t in self.torch:
      ratios[f"{t.source}_{t.memory_format}"] = self.ours.images_per_sec / t.images_per_sec
    return ratios


def compare(config: ml_collections.ConfigDict, *, steps: int, warmup_steps: int,
            matmul_size: int, matmul_reps: int, compare_plain: bool = True,
            compare_torch: bool = False) -> Comparison:
  """Benchmarks `config`, then the plain conv path and PyTorch, one after the other;
  then ours and plain again, one step of each in turn for `steps` rounds."""
  measure = dict(steps=steps, warmup_steps=warmup_steps, matmul_size=matmul_size,
                 matmul_reps=matmul_reps)
  ours, ours_exp = benchmark(config, **measure)
  plain, interleaved = None, []
  if compare_plain and ours.layer_impl != "plain":
    plain_config = config.copy_and_resolve_references()
    plain_config.layer_impl = "plain"
    plain, plain_exp = benchmark(plain_config, **measure)
    interleaved = interleaved_ratios(ours_exp, plain_exp, steps)
  torch_results = [
      torch_reference.time_torch(
          config.model, batch_size=config.batch_size, image_size=ours.image_size,
          dtype=config.dtype, steps=steps, warmup_steps=warmup_steps, channels_last=layout,
          num_classes=ours_exp.model.num_classes)
      for layout in ((False, True) if compare_torch else ())]
  return Comparison(ours, plain, torch_results, interleaved)


def format_comparison(c: Comparison) -> str:
  """Our report, the plain path's, then one line per reference with ours / theirs."""
  parts = [format_result(c.ours)]
  if c.plain is not None:
    parts.append("plain path (XLA's own convolution and reduce-window):\n"
                 + format_result(c.plain))
  lines = [f"{'ours':<26} {c.ours.images_per_sec:>10.2f} img/s"]
  if c.plain is not None:
    lines.append(f"{'plain (layer_impl=plain)':<26} {c.plain.images_per_sec:>10.2f} img/s")
  for t in c.torch:
    name = f"{t.source} {t.memory_format}" + (f" {t.autocast_dtype} AMP" if t.autocast_dtype
                                               else "")
    lines.append(f"{name:<26} {t.images_per_sec:>10.2f} img/s")
  lines += [f"ours / {name}: {ratio:.2f}x" for name, ratio in c.speedups().items()
            if name != "plain_interleaved"]
  parts.append("same run, one after the other:\n" + "\n".join(lines))
  if c.plain_interleaved:
    r = c.plain_interleaved
    parts.append(f"ours / plain, one step of each in turn ({len(r)} rounds): median "
                 f"{statistics.median(r):.2f}x (range {min(r):.2f}-{max(r):.2f}x)")
  return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.throughput", __doc__)
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--batch_size", type=int, default=256, help="global, over all devices")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
  parser.add_argument("--parallelism", choices=PARALLELISM_MODES, default="jit")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup_steps", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=None,
                      help=f"side of the ceiling's square matmul (default: {CPU_MATMUL_SIZE} on "
                           f"CPU, {ACCELERATOR_MATMUL_SIZE} on accelerators)")
  parser.add_argument("--matmul_reps", type=int, default=20)
  parser.add_argument("--layer_impl", choices=LAYER_IMPLS, default="auto",
                      help="our layers: tuned (1x1 convs as matmuls, ...), plain, auto "
                           "(tuned on CPU)")
  parser.add_argument("--no_compare_plain", dest="compare_plain", action="store_false",
                      help="skip timing the plain path (layer_impl=plain)")
  parser.add_argument("--compare_torch", action="store_true",
                      help="also time the model in PyTorch: torchvision's, or the paper's CIFAR "
                           "net (needs torch, and torchvision for its models)")
  parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
  args = parser.parse_args(argv)
  if min(args.steps, args.matmul_reps, args.matmul_size or 1) < 1 or args.warmup_steps < 0:
    parser.error("--steps, --matmul_reps and --matmul_size must be >= 1, --warmup_steps >= 0")
  if args.compare_torch and not torch_reference.torch_available(args.model):
    parser.error("--compare_torch needs torch (and torchvision for its models): pip install "
                 "torch torchvision")
  config = benchmark_config(args.model, batch_size=args.batch_size, image_size=args.image_size,
                            dtype=args.dtype, parallelism=args.parallelism,
                            num_train_steps=1 + args.warmup_steps + args.steps)
  config.layer_impl = args.layer_impl
  try:
    comparison = compare(config, steps=args.steps, warmup_steps=args.warmup_steps,
                         matmul_size=args.matmul_size or default_matmul_size(),
                         matmul_reps=args.matmul_reps, compare_plain=args.compare_plain,
                         compare_torch=args.compare_torch)
  except ValueError as e:  # a bad model, batch or image size: one actionable line.
    parser.exit(2, f"error: {e}\n")
  print(format_comparison(comparison))
  if args.json:
    write_json(args.json, {**dataclasses.asdict(comparison), "speedups": comparison.speedups()})


if __name__ == "__main__":
  malloc_tuning.reexec_with_malloc_tuning()  # steps timed as train.py runs them
  jax.config.update("jax_enable_compilation_cache", False)  # real compiles, not cache reads
  main()
