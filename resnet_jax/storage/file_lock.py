"""An exclusive lock on a file, across processes: one process at a time past it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """Holds an exclusive lock on `path` (created, with its directory, if missing) while the
  block runs: processes on one host, or on a disk that supports flock, take turns."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
