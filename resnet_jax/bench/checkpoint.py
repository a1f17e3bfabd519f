"""Checkpoint cost: saving and restoring a train state on local disk and in a bucket, and what
asynchronous saves cost the train steps around them.

  python -m resnet_jax.bench.checkpoint --model resnet50 --repeats 3
  python -m resnet_jax.bench.checkpoint --model resnet50 --overhead_steps 150 \
      --checkpoint_every 50 --batch_size 8 --image_size 64

Every checkpoint goes through `training.checkpointing` (train.py's saves and resumes): the
whole train state (parameters, BatchNorm statistics, SGD momentum), one replicated copy,
orbax's OCDBT format. Targets are a new local folder and, unless `--bucket` names a real
one, a bucket of the local storage emulator (`storage.emulator`, objects on local disk).

- **Save and restore**: `--repeats` blocking saves (the `save` call, then
  `wait_until_finished`), each at a new step, then as many restores of the newest one
  (`restore_latest`, what a resumed run calls, metadata checks included).
- **Overhead of asynchronous saves** (`--overhead_steps`): the real train step on "fake"
  data, timed one step at a time, without checkpoints and then with an asynchronous save
  every `--checkpoint_every` steps (as the loop makes them: `save` returns once the arrays
  are copied to the host; the writing goes on in orbax's threads while training goes on);
  the baseline runs again last, and the overhead is against the mean of both baselines.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from resnet_jax import cli
from resnet_jax.bench import benchmark_config, write_json
from resnet_jax.storage import emulator
from resnet_jax.training import checkpointing, loop
from resnet_jax.training.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class SaveRestoreResult:
  target: str  # "local disk" or "bucket"
  state_mb: float
  save_call_s: list[float]  # the blocking part of an asynchronous save: copy to the host
  save_s: list[float]  # the save call until committed
  restore_s: list[float]


@dataclasses.dataclass(frozen=True)
class OverheadResult:
  target: str
  checkpoint_every: int
  steps: int
  baseline_step_s: float  # mean step time without checkpoints (two runs)
  checkpointed_step_s: float  # mean step time with a save every `checkpoint_every` steps
  overhead: float  # checkpointed / baseline - 1
  checkpoint_step_s: float  # mean time of the steps that start a save (the save call included)
  ordinary_step_s: float  # median time of the other steps of that run


def state_megabytes(state: TrainState) -> float:
  """The state's arrays (what a checkpoint holds), in MiB."""
  return sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20


def save_and_restore(exp: loop.Experiment, state: TrainState, workdir: str, repeats: int,
                     target: str) -> SaveRestoreResult:
  """`repeats` blocking saves into `workdir`, then `repeats` restores of the newest."""
  manager = checkpointing.make_checkpoint_manager(workdir, keep=2,
                                                  best_metric=exp.config.best_checkpoint_metric)
  info = loop.model_info(exp).to_json()
  save_call_s, save_s, restore_s = [], [], []
  for step in range(1, repeats + 1):
    at_step = state.replace(step=jax.device_put(np.int32(step), state.step.sharding))
    start = time.perf_counter()
    checkpointing.save(manager, at_step, loop.data_position(exp, step), info)
    save_call_s.append(time.perf_counter() - start)
    manager.wait_until_finished()
    save_s.append(time.perf_counter() - start)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  for _ in range(repeats):
    start = time.perf_counter()
    restored, _ = checkpointing.restore_latest(manager, template)
    jax.block_until_ready(restored)
    restore_s.append(time.perf_counter() - start)
  manager.close()
  saved = state.replace(step=restored.step)
  if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved),
                                                  jax.tree.leaves(restored))):
    raise RuntimeError(f"the state restored from {workdir} differs from the one saved")
  return SaveRestoreResult(target, state_megabytes(state), save_call_s, save_s, restore_s)


def _step_times(exp: loop.Experiment, steps: int, workdir: str | None, checkpoint_every: int
                ) -> tuple[list[float], list[int]]:
  """Seconds of each of `steps` train steps (after one untimed), saving asynchronously
  every `checkpoint_every` steps into `workdir` (None: never); and the steps that saved."""
  dp = exp.data_parallel
  state = dp.put_state(exp.initial_state)
  batches = loop.train_batches(exp, 0)
  state, _ = dp.train_step(state, dp.put_batch(next(batches)))
  jax.block_until_ready(state)
  manager = None if workdir is None else checkpointing.make_checkpoint_manager(
      workdir, keep=2, best_metric=exp.config.best_checkpoint_metric)
  info = loop.model_info(exp).to_json()
  times, saved = [], []
  for step in range(2, steps + 2):
    start = time.perf_counter()
    state, metrics = dp.train_step(state, dp.put_batch(next(batches)))
    jax.block_until_ready(metrics)  # as the loop's host metrics do, at its log steps
    if manager is not None and step % checkpoint_every == 0:
      checkpointing.save(manager, dp.get_state(state), loop.data_position(exp, step), info)
      saved.append(step)
    times.append(time.perf_counter() - start)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return times, saved


def save_overhead(exp: loop.Experiment, steps: int, checkpoint_every: int, workdir: str,
                  target: str) -> OverheadResult:
  """Mean step time with asynchronous saves against without, baseline first and last."""
  before, _ = _step_times(exp, steps, None, checkpoint_every)
  with_saves, saved = _step_times(exp, steps, workdir, checkpoint_every)
  after, _ = _step_times(exp, steps, None, checkpoint_every)
  baseline = statistics.mean(before + after)
  first = 2  # the step number of times[0]
  at_saves = [with_saves[s - first] for s in saved]
  others = [t for i, t in enumerate(with_saves) if i + first not in saved]
  checkpointed = statistics.mean(with_saves)
  return OverheadResult(target, checkpoint_every, steps, baseline, checkpointed,
                        checkpointed / baseline - 1, statistics.mean(at_saves),
                        statistics.median(others))


def _spread(seconds: list[float]) -> str:
  """median [min–max]"""
  return f"{statistics.median(seconds):.2f} [{min(seconds):.2f}–{max(seconds):.2f}]"


def format_results(save_restore: Sequence[SaveRestoreResult],
                   overheads: Sequence[OverheadResult]) -> str:
  lines = []
  if save_restore:
    lines.append(f"{'target':<11} {'state MB':>8} {'save call s':>11} {'save s':>12} "
                 f"{'restore s':>12}   (median [min–max] of the repeats)")
    for r in save_restore:
      lines.append(f"{r.target:<11} {r.state_mb:>8.1f} {statistics.median(r.save_call_s):>11.2f} "
                   f"{_spread(r.save_s):>12} {_spread(r.restore_s):>12}")
  for o in overheads:
    lines.append(f"{o.target}: a save every {o.checkpoint_every} of {o.steps} steps: mean step "
                 f"{o.checkpointed_step_s * 1e3:.1f} ms against {o.baseline_step_s * 1e3:.1f} ms "
                 f"without ({o.overhead:+.1%}); steps that start a save {o.checkpoint_step_s:.2f} "
                 f"s, the others {o.ordinary_step_s * 1e3:.1f} ms (median)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.checkpoint", __doc__)
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--repeats", type=int, default=3, help="saves and restores per target")
  parser.add_argument("--overhead_steps", type=int, default=0,
                      help="train steps per overhead run (0: skip the overhead runs)")
  parser.add_argument("--checkpoint_every", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=8, help="of the overhead runs")
  parser.add_argument("--image_size", type=int, default=64, help="of the overhead runs")
  parser.add_argument("--bucket", default="",
                      help="gs://BUCKET/DIR to use (default: a local emulated bucket)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix="resnet_jax_checkpoint_bench_")
  local_bucket = None
  if not args.bucket:
    local_bucket = emulator.LocalBucket(data_dir=os.path.join(scratch, "bucket")).start()
    emulator.use(local_bucket)
  bucket = args.bucket or f"{local_bucket.url}/checkpoint_bench"
  targets = {"local disk": os.path.join(scratch, "local"), "bucket": bucket}
  try:
    config = benchmark_config(args.model, batch_size=args.batch_size,
                              image_size=args.image_size, dtype="float32")
    exp = loop.setup(config)
    state = exp.data_parallel.put_state(exp.initial_state)
    save_restore = [save_and_restore(exp, state, f"{workdir}/save_restore", args.repeats, target)
                    for target, workdir in targets.items()]
    print(format_results(save_restore, []), flush=True)
    overheads = [] if not args.overhead_steps else [
        save_overhead(exp, args.overhead_steps, args.checkpoint_every, f"{workdir}/overhead",
                      target) for target, workdir in targets.items()]
    if overheads:
      print(format_results([], overheads), flush=True)
  finally:
    if local_bucket is not None:
      local_bucket.stop()
  print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s); model {args.model}; "
        f"{'emulated bucket on local disk' if local_bucket else args.bucket}")
  if args.json:
    write_json(args.json, {"model": args.model, "device_kind": jax.devices()[0].device_kind,
                           "save_restore": [dataclasses.asdict(r) for r in save_restore],
                           "overhead": [dataclasses.asdict(o) for o in overheads]})


if __name__ == "__main__":
  main()
