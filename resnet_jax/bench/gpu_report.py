"""One prepared command for a lent accelerator: the figures a GPU session should record.

  python -m resnet_jax.bench.gpu_report --cifar_tar ../shared/data/cifar10-train-jpeg.tar.gz \
      --minutes 9 --out runs/gpu_report

Within `--minutes` of wall time, on whatever JAX's default backend is:
1. ResNet-50 bfloat16 train throughput, jit (`bench.throughput`; batch `--throughput_batch`);
2. a ResNet-20 population of `--seeds` at batch 128 (32², float32) against the single
   run's step taken once per member (`bench.population`: step time and member-steps/s in
   each mode);
3. as much of the paper's ResNet-20 row (`bench.cifar_table`: `--seeds` seeds as one
   population, the full 64k-step schedule) as the time left allows: at the deadline the run
   stops after its current step with a checkpoint (as on SIGTERM), and the report gives the
   step it reached and its last evaluation (45k/5k validation split). Run again with the
   same --out to continue it.
Prints the report as markdown and writes OUT/report.md.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tarfile
import threading
import time
from collections.abc import Callable, Sequence

from resnet_jax import cli
from resnet_jax.bench import benchmark_config, cifar_table
from resnet_jax.bench import population as population_bench
from resnet_jax.bench import throughput
from resnet_jax.training import loop, preemption, reporting


@dataclasses.dataclass(frozen=True)
class RowProgress:
  model: str
  seeds: int
  steps_done: int
  steps: int
  last_eval_step: int  # 0: no evaluation yet
  accuracy_mean: float
  accuracy_std: float
  minutes: float


def unpack(cifar_tar: str, out: str) -> str:
  """The CIFAR-10 folder inside `out`, unpacked from `cifar_tar` on first use."""
  target = os.path.join(out, "data")
  folder = os.path.join(target, "cifar10")
  if not os.path.isdir(os.path.join(folder, "train")):
    with tarfile.open(cifar_tar) as tar:
      tar.extractall(target, filter="data")  # no links or paths out of `target`
  return folder


def _stop_at(deadline: float, done: threading.Event) -> None:
  """At `deadline`, once the training loop's stop handler is installed (it is from the first
  step on), sends this process SIGTERM; the loop answers by stopping after its current
  step with a checkpoint. Before that, SIGTERM would end the process."""
  done.wait(max(deadline - time.monotonic(), 0.0))
  while not done.is_set():
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(getattr(handler, "__self__", None), preemption.StopSignal):
      os.kill(os.getpid(), signal.SIGTERM)
      return
    done.wait(0.2)


def train_until(deadline: float, run: Callable[[], object]) -> None:
  """Runs `run()` (a training run) and stops it at `deadline` (time.monotonic)."""
  done = threading.Event()
  stopper = threading.Thread(target=_stop_at, args=(deadline, done), daemon=True)
  stopper.start()
  try:
    run()
  finally:
    done.set()
    stopper.join()


def row_progress(row_dir: str, model: str, seeds: int, steps: int, minutes: float
                 ) -> RowProgress:
  """How far a cifar_table row got, from its metrics.jsonl."""
  records = reporting.read_metrics(os.path.join(row_dir, "metrics.jsonl"))
  steps_done = max((int(r["step"]) for r in records), default=0)
  evaluations = [r for r in records if "eval/accuracy" in r]
  last = evaluations[-1] if evaluations else {}
  return RowProgress(model, seeds, steps_done, steps, int(last.get("step", 0)),
                     last.get("eval/accuracy", float("nan")),
                     last.get("eval/accuracy_std", 0.0), minutes)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.gpu_report", __doc__)
  parser.add_argument("--cifar_tar", default="",
                      help="cifar10-train-jpeg.tar.gz (or --cifar_dir, already unpacked)")
  parser.add_argument("--cifar_dir", default="")
  parser.add_argument("--minutes", type=float, default=9.0, help="wall time for all of it")
  parser.add_argument("--out", default="runs/gpu_report")
  parser.add_argument("--throughput_model", default="resnet50")
  parser.add_argument("--throughput_batch", type=int, default=256)
  parser.add_argument("--throughput_image_size", type=int, default=224)
  parser.add_argument("--population_batch", type=int, default=128)
  parser.add_argument("--population_rounds", type=int, default=10)
  parser.add_argument("--row_model", default="resnet20")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--row_steps", type=int, default=cifar_table.PAPER_STEPS)
  args = parser.parse_args(argv)
  if not (args.cifar_tar or args.cifar_dir):
    parser.error("give --cifar_tar (cifar10-train-jpeg.tar.gz) or --cifar_dir")
  start = time.monotonic()
  deadline = start + args.minutes * 60
  os.makedirs(args.out, exist_ok=True)
  cifar_dir = args.cifar_dir or unpack(args.cifar_tar, args.out)
  sections = [f"# GPU report ({time.strftime('%Y-%m-%d')})"]

  config = benchmark_config(args.throughput_model, batch_size=args.throughput_batch,
                            image_size=args.throughput_image_size, dtype="bfloat16")
  result, _ = throughput.benchmark(config, steps=20, warmup_steps=3,
                                   matmul_size=throughput.default_matmul_size(), matmul_reps=10)
  sections += ["## Throughput", "```", throughput.format_result(result), "```"]
  print("\n\n".join(sections), flush=True)

  speed = population_bench.benchmark(args.row_model, members=args.seeds,
                                     batch_size=args.population_batch, image_size=32,
                                     dtype="float32", num_classes=10,
                                     rounds=args.population_rounds, modes=("vmap", "loop"))
  sections += ["## Population", population_bench.format_result(speed)]
  print(sections[-1], flush=True)

  row_dir = os.path.join(os.path.abspath(args.out), "table", args.row_model)
  data_dir = os.path.join(os.path.abspath(args.out), "table", "tensorflow_datasets")
  row_start = time.monotonic()
  # The row starts even when the deadline has passed: it then trains one step and stops.
  row, _ = cifar_table.prepared_row(args.row_model, cifar_dir, data_dir, args.row_steps,
                                    args.seeds, eval_every=min(2000, max(args.row_steps // 10, 1)))
  train_until(deadline, lambda: loop.train_and_evaluate(row, row_dir))
  progress = row_progress(row_dir, args.row_model, args.seeds, args.row_steps,
                          (time.monotonic() - row_start) / 60)
  accuracy = (f"{progress.accuracy_mean:.2%} ± {progress.accuracy_std:.2%} at step "
              f"{progress.last_eval_step}" if progress.last_eval_step else "no evaluation yet")
  sections += ["## The paper's ResNet-20 row, as far as the time allowed",
               f"{progress.model}, {progress.seeds} seeds as one population: step "
               f"{progress.steps_done} of {progress.steps} in {progress.minutes:.1f} min; "
               f"validation accuracy {accuracy}. Run the same command to continue it."]
  print(sections[-1], flush=True)
  report = "\n\n".join(sections)
  with open(os.path.join(args.out, "report.md"), "w") as f:
    f.write(report + "\n")
  print(f"\nWrote {os.path.join(args.out, 'report.md')} "
        f"({(time.monotonic() - start) / 60:.1f} min in all)")


if __name__ == "__main__":
  main()
