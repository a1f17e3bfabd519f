"""A population's train step, in each `population_mode`, against its members' single runs.

  python -m resnet_jax.bench.population --model resnet20 --members 5 --batch_size 128

Times the train step of a population of `--members` (`config.population_size`) in each
`population_mode` ("vmap": one program, the members batched into every operation; "loop":
the single run's compiled step once per member) against the single run's step taken once
per member, which is what N separate runs cost. Steps alternate, one of each per round, so
that all see the same machine.
Prints step times, member-steps per second and the speed-up of each mode over N single runs,
the figures `population.AUTO_MODES` is chosen by; `--json` keeps them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Sequence

import jax

from resnet_jax import cli
from resnet_jax.bench import benchmark_config, write_json
from resnet_jax.bench.throughput import step_timer
from resnet_jax.training import population
from resnet_jax.training.loop import setup


@dataclasses.dataclass(frozen=True)
class PopulationSpeed:
  mode: str  # "single" (one member, the step taken `members` times), "vmap" or "loop"
  first_step_s: float  # compile and the first step
  step_s: float  # median over the rounds, for all members
  member_steps_per_s: float
  speedup_over_single_runs: float  # members × single step time / this step time


@dataclasses.dataclass(frozen=True)
class PopulationBenchmark:
  device_kind: str
  backend: str
  model: str
  members: int
  batch_size: int
  image_size: int
  dtype: str
  rounds: int
  auto_mode: str  # what population_mode="auto" picks on this backend
  results: list[PopulationSpeed]


def benchmark(model: str, *, members: int, batch_size: int, image_size: int, dtype: str,
              num_classes: int, rounds: int, modes: Sequence[str]) -> PopulationBenchmark:
  """Compiles the single step and each mode's population step, then times them in turn."""
  timers, first_steps = {}, {}
  for mode in ("single", *modes):
    config = benchmark_config(model, batch_size=batch_size, image_size=image_size, dtype=dtype)
    config.num_classes = num_classes
    if mode != "single":
      config.population_size, config.population_mode = members, mode
    start = time.perf_counter()
    timers[mode] = step_timer(setup(config))  # (initialises, compiles and runs one step)
    first_steps[mode] = time.perf_counter() - start
  times = {mode: [] for mode in timers}
  for _ in range(rounds):
    for mode, time_one_step in timers.items():
      times[mode].append(time_one_step())
  single_s = statistics.median(times["single"])
  results = []
  for mode, mode_times in times.items():
    step_s = statistics.median(mode_times) * (members if mode == "single" else 1)
    results.append(PopulationSpeed(mode, first_steps[mode], step_s, members / step_s,
                                   members * single_s / step_s))
  return PopulationBenchmark(jax.devices()[0].device_kind, jax.default_backend(), model, members,
                             batch_size, image_size, dtype, rounds,
                             population.resolve_mode("auto"), results)


def format_result(b: PopulationBenchmark) -> str:
  lines = [f"{b.model}, {b.members} members, batch {b.batch_size}, {b.image_size}², {b.dtype}, "
           f"{b.device_kind} ({b.backend}), median of {b.rounds} rounds; population_mode=auto "
           f"picks {b.auto_mode!r} here",
           "| how | first step (s) | step, all members (ms) | member-steps/s | "
           "vs N single runs |",
           "|---|---|---|---|---|"]
  for r in b.results:
    how = {"single": f"{b.members} single runs, one after another",
           "vmap": "population, vmap (one program)",
           "loop": "population, loop (the single run's step per member)"}[r.mode]
    lines.append(f"| {how} | {r.first_step_s:.1f} | {r.step_s * 1e3:.0f} | "
                 f"{r.member_steps_per_s:.2f} | {r.speedup_over_single_runs:.2f}× |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.population", __doc__)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--members", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--rounds", type=int, default=5, help="timed steps of each, in turn")
  parser.add_argument("--modes", default="vmap,loop", help="comma-separated population modes")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in ("vmap", "loop")]
  if bad or args.members < 2:
    parser.error(f"--modes takes vmap and loop (got {bad})" if bad
                 else f"--members={args.members}: a population has at least 2")
  result = benchmark(args.model, members=args.members, batch_size=args.batch_size,
                     image_size=args.image_size, dtype=args.dtype, num_classes=args.num_classes,
                     rounds=args.rounds, modes=modes)
  print(format_result(result))
  if args.json:
    write_json(args.json, dataclasses.asdict(result))


if __name__ == "__main__":
  main()
