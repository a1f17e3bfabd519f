"""Reaching the first step fast: JAX's persistent compilation cache, and a clock for startup.

`use_compilation_cache(directory)` makes every compiled program (init, train and eval
steps) a file that the next run with the same program, devices and JAX version reads
instead of compiling. `StartupClock` measures how long this process took to reach its
first step and how much of that XLA spent compiling, from JAX's own monitoring events.
`exit_now` ends a finished run without TensorFlow's slow C++ teardown.

The cache is trusted code: anyone who can write to its directory can run code in your
runs, so it lives in your home directory by default and is created private (mode 0700).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import time

import jax
from jax.experimental.compilation_cache import compilation_cache

from resnet_jax import malloc_tuning
from resnet_jax.storage import paths

_IMPORTED_AT = time.time()

# JAX's monitoring events (jax/_src/dispatch.py and compiler.py).
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # XLA, or reading the cache
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"


# A run's own programs, by their jitted functions' names (`train_state.init_variables`,
# `steps.train_step`, `steps.eval_step`; the eval step compiles at the first evaluation,
# after the first step, so its share of startup is 0 unless a run evaluates first).
PROGRAMS = ("init", "train_step", "eval_step")


def program_name(fun_name: str) -> str:
  """"jit(train_step)" → "train_step"; a name not in PROGRAMS → "other"."""
  name = fun_name.removeprefix("jit(").removeprefix("pmap(").removesuffix(")")
  return name if name in PROGRAMS else "other"


def use_compilation_cache(directory: str) -> None:
  """Reads and writes compiled programs in `directory` (local or a bucket); "" turns it off.

  Caches every program, however quick to compile (JAX's default skips those under a
  second, which is most of a small run's startup). Takes effect for compilations after
  the call, also when an earlier one in this process used another directory.
  """
  if directory and paths.is_bucket(directory):  # shared by every host of a pod
    paths.check_bucket(paths.resolve(directory), "config.compilation_cache_dir", writable=True)
  elif directory:
    path = paths.resolve(directory)
    directory = os.fspath(path)
    if path.exists() and not path.is_dir():
      raise ValueError(f"config.compilation_cache_dir={directory} is a file, not a directory; "
                       "choose another path or set it to '' to turn the cache off")
    try:
      path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create config.compilation_cache_dir={directory}: "
                       f"{e.strerror}; choose another path or set it to '' to turn the cache "
                       "off") from None
  current = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  wanted = (bool(directory), directory or None)
  if current == wanted:
    return
  jax.config.update("jax_enable_compilation_cache", bool(directory))
  jax.config.update("jax_compilation_cache_dir", directory or None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # JAX opens the cache once, at the first compilation


def process_start_time() -> float:
  """When this process started, in seconds since the epoch (Linux: from /proc; elsewhere,
  when this module was imported)."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22
  except (OSError, ValueError, IndexError):
    return _IMPORTED_AT


@dataclasses.dataclass
class StartupClock:
  """Counts JAX's compilation work while open; `summary_after` the first step.

  Use as a context manager around everything up to (and including) the first step.
  """

  trace_seconds: float = 0.0  # tracing to jaxprs and lowering to StableHLO
  compile_seconds: float = 0.0  # XLA compiling, or reading compiled programs from the cache
  cache_hits: int = 0
  cache_misses: int = 0
  # compile_seconds split by program: PROGRAMS' names, and "other" (small eager programs)
  compile_seconds_by_program: dict[str, float] = dataclasses.field(
      default_factory=lambda: dict.fromkeys((*PROGRAMS, "other"), 0.0))

  def _on_duration(self, event: str, duration: float, **kwargs: object) -> None:
    if event in _TRACE_EVENTS:
      self.trace_seconds += duration
    elif event == _COMPILE_EVENT:
      self.compile_seconds += duration
      self.compile_seconds_by_program[program_name(str(kwargs.get("fun_name", "")))] += duration

  def _on_event(self, event: str, **_: object) -> None:
    if event == _CACHE_HIT_EVENT:
      self.cache_hits += 1
    elif event == _CACHE_MISS_EVENT:
      self.cache_misses += 1

  def __enter__(self) -> StartupClock:
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc_info: object) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    jax.monitoring.unregister_event_listener(self._on_event)

  def summary_after(self, first_step_output: object) -> dict[str, float]:
    """Startup metrics, once `first_step_output` (the first step's result) is computed."""
    jax.block_until_ready(first_step_output)
    return {"startup/seconds_to_first_step": time.time() - process_start_time(),
            "startup/compile_seconds": self.compile_seconds,
            "startup/trace_seconds": self.trace_seconds,
            "startup/cache_hits": float(self.cache_hits),
            "startup/cache_misses": float(self.cache_misses),
            **{f"startup/compile_seconds/{name}": seconds
               for name, seconds in self.compile_seconds_by_program.items()},
            # glibc malloc's settings (train.py restarts itself with them; malloc_tuning.py)
            **{f"startup/malloc_{name}": value
               for name, value in malloc_tuning.settings().items()}}


def describe(summary: dict[str, float]) -> str:
  """One line for people: "First step after 7.3 s (1.1 s compiling; 3 of 3 programs cached)"."""
  hits, misses = int(summary["startup/cache_hits"]), int(summary["startup/cache_misses"])
  cached = (f"{hits} of {hits + misses} programs from the compilation cache" if hits + misses
            else "compilation cache off")
  return (f"First step after {summary['startup/seconds_to_first_step']:.1f} s "
          f"({summary['startup/compile_seconds']:.1f} s compiling, "
          f"{summary['startup/trace_seconds']:.1f} s tracing; {cached})")


def exit_now(code: int | str | None) -> None:
  """`sys.exit(code)` without the C++ teardown of TensorFlow and XLA (~2 s on 2 cores).

  For when the run is over (checkpoints committed, files closed): Python's exit handlers
  still run (JAX's distributed shutdown, logging), then the process ends at once.
  """
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)
    code = 1
  atexit._run_exitfuncs()  # noqa: SLF001 - what Python's own exit would run first
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)
