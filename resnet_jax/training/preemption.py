"""Preemption: SIGTERM or SIGINT asks the loop to stop after the current step.

The loop then writes a checkpoint at that step (with its data position), waits until it is
committed and returns, so the process exits 0 and a restart resumes exactly. A second
signal is not caught: it ends the process at once. With several processes, all must stop
at the same step (saving is collective):
- SIGTERM, the notice a Cloud TPU's maintenance event or a cluster scheduler sends, goes to
  JAX's preemption service when `jax.distributed` runs it (`jax_enable_preemption_service`,
  on by default): the coordination service tells every process, and
  `multihost_utils.reached_preemption_sync_point` picks the step all of them stop after.
- SIGINT (and SIGTERM where the service is off) is caught here; the processes agree on it
  with one small all-gather every `check_every` steps.
A single process checks its own flag after every step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def uses_jax_preemption_service() -> bool:
  """Whether SIGTERM reaches this run through JAX's preemption service (several processes)."""
  return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class StopSignal:
  """Catches the first SIGTERM/SIGINT while installed (a context manager)."""

  def __init__(self, check_every: int = 1):
    self.received: int | None = None  # the signal number, once one arrived
    self.check_every = check_every
    self.preempted = False  # JAX's preemption service reached its sync point
    self._jax_preemption = uses_jax_preemption_service()
    # JAX's service installs its own SIGTERM handler; a Python one would replace it.
    self._signals = (signal.SIGINT,) if self._jax_preemption else SIGNALS
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignal:
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      self._previous = {s: signal.signal(s, self._handle) for s in self._signals}
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    self.received = signum
    for s in self._signals:  # the next one takes the default action: the process ends at once
      signal.signal(s, signal.SIG_DFL)

  @property
  def name(self) -> str:
    """What stopped the run: the signal's name, or "" when it came from another process."""
    if self.received:
      return signal.Signals(self.received).name
    return "a preemption notice (SIGTERM)" if self.preempted else ""

  def should_stop(self, step: int) -> bool:
    """Whether every process stops after `step`; call it after every step.

    Several processes: JAX's preemption sync point at every step (where the service runs),
    and an all-gather of the caught signals every `check_every` steps.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if self._jax_preemption and multihost_utils.reached_preemption_sync_point(step):
      self.preempted = True
      return True
    if step % self.check_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.received is not None))
    return bool(np.any(flags))
