"""Preemption: SIGTERM or SIGINT asks the loop to stop after the current step.

The loop then writes a checkpoint at that step (with its data position), waits until it is
committed and returns, so the process exits 0 and a restart resumes exactly. A second
signal is not caught: it ends the process at once. With several processes, all must stop
at the same step (saving is collective), so they agree on it with one small all-gather
every `check_every` steps; a single process checks its own flag after every step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Catches the first SIGTERM/SIGINT while installed (a context manager)."""

  def __init__(self, check_every: int = 1):
    self.received: int | None = None  # the signal number, once one arrived
    self.check_every = check_every
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignal:
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    self.received = signum
    for s in SIGNALS:  # the next one takes the default action: the process ends at once
      signal.signal(s, signal.SIG_DFL)

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name if self.received else ""

  def should_stop(self, step: int) -> bool:
    """Whether every process stops after `step` (a collective every check_every steps)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.check_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.received is not None))
    return bool(np.any(flags))
