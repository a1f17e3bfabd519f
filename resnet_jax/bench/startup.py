"""First start vs second start of train.py: what the persistent compilation cache saves.

  python -m resnet_jax.bench.startup [--config configs/digits.py] [--starts 2]

Starts `train.py` (the README's default run unless `--config` says otherwise) `--starts`
times, each in a new workdir but all with one new, empty compilation cache, and stops each
after its first step. Each start records `startup/*` metrics: seconds from the process's
start to the end of its first step, and the parts of it spent compiling (XLA, or reading
the cache; also split by program: init, train step, eval step, the small rest) and
tracing. The first start compiles everything; later ones read the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Sequence

from resnet_jax import cli
from resnet_jax.bench import write_json
from resnet_jax.training import reporting, startup

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ("startup/seconds_to_first_step", "startup/compile_seconds", "startup/trace_seconds",
        "startup/cache_hits", "startup/cache_misses")
PROGRAM_NAMES = (*startup.PROGRAMS, "other")
PROGRAM_KEYS = tuple(f"startup/compile_seconds/{name}" for name in PROGRAM_NAMES)


def start_once(config: str, workdir: str, cache_dir: str, overrides: Sequence[str]
               ) -> dict[str, float]:
  """Runs train.py for one step; returns its startup metrics."""
  command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={config}",
             f"--workdir={workdir}", f"--config.compilation_cache_dir={cache_dir}",
             "--config.num_train_steps=1", "--config.progress_bar=False", *overrides]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  first_step = next(r for r in records if KEYS[0] in r)
  return {key: first_step[key] for key in (*KEYS, *PROGRAM_KEYS)}


def format_table(starts: Sequence[dict[str, float]]) -> str:
  """One row per start, its compile time by program, and the second start's compile time
  as a fraction of the first's."""
  lines = [f"{'start':>5} {'to first step (s)':>18} {'compiling (s)':>14} {'tracing (s)':>12} "
           f"{'programs cached':>16}"]
  for i, s in enumerate(starts, 1):
    programs = int(s["startup/cache_hits"] + s["startup/cache_misses"])
    lines.append(f"{i:>5} {s['startup/seconds_to_first_step']:>18.2f} "
                 f"{s['startup/compile_seconds']:>14.2f} {s['startup/trace_seconds']:>12.2f} "
                 f"{int(s['startup/cache_hits']):>9} of {programs:<4}")
  lines += ["compiling by program (s):",
            f"{'start':>5} " + " ".join(f"{name:>10}" for name in PROGRAM_NAMES)]
  for i, s in enumerate(starts, 1):
    lines.append(f"{i:>5} " + " ".join(f"{s[key]:>10.3f}" for key in PROGRAM_KEYS))
  if len(starts) > 1:
    def second_over_first(key: str) -> float:
      return starts[1][key] / starts[0][key]
    lines.append(f"second / first: compiling {second_over_first(KEYS[1]):.1%}, "
                 f"to first step {second_over_first(KEYS[0]):.1%}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.startup", __doc__)
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "digits.py"))
  parser.add_argument("--starts", type=int, default=2)
  parser.add_argument("--override", action="append", default=[], metavar="--config.KEY=VALUE",
                      help="passed on to train.py (repeatable)")
  parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
  args = parser.parse_args(argv)
  if args.starts < 1:
    parser.error("--starts must be >= 1")
  with tempfile.TemporaryDirectory(prefix="resnet_jax_startup_") as scratch:
    cache_dir = os.path.join(scratch, "cache")
    starts = [start_once(args.config, os.path.join(scratch, f"run{i}"), cache_dir, args.override)
              for i in range(args.starts)]
  print(format_table(starts))
  if args.json:
    write_json(args.json, starts)


if __name__ == "__main__":
  main()
