"""Transparent huge pages for the large host buffers that XLA:CPU allocates on every step.

XLA:CPU allocates a program's temporary buffer with malloc each time the program runs: for
ResNet-50's train step at 224², batch 8, one buffer of 726 MiB (1,065 MiB when the figures
below were measured). glibc serves an allocation that large with a fresh mmap and frees it
with munmap, so every step touches that much new memory in 4 KiB pages: ~288,000 page
faults and 0.5-0.65 s of kernel time per step on 2 cores. Where the kernel gives huge
pages only to memory that asks for them (`/sys/kernel/mm/transparent_hugepage/enabled`
set to `madvise`, as on the VM measured here), glibc's tunable `glibc.malloc.hugetlb=1`
(glibc 2.35 and later) makes malloc ask for them: ~1,000 faults per step, and the step
17-27% faster (BENCHMARKS.md). glibc reads its tunables only when a program starts, so
`reexec_with_huge_pages` starts the program again with it.

Opt out by setting the tunable yourself: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise" or "never"); None where
  it cannot be read (not Linux, no THP)."""
  try:
    with open(path) as f:
      chosen = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return chosen.group(1) if chosen else None


def tunables_with_huge_pages(tunables: str | None, mode: str | None) -> str | None:
  """The GLIBC_TUNABLES value to run with, or None to run as is.

  Only where huge pages come on request (`mode` "madvise": with "always" the kernel uses
  them anyway, with "never" not at all), and never over a value of the tunable that the
  user chose; other tunables are kept.
  """
  if mode != "madvise":
    return None
  entries = [entry for entry in (tunables or "").split(":") if entry]
  if any(entry.split("=", 1)[0] == TUNABLE for entry in entries):
    return None
  return ":".join([*entries, f"{TUNABLE}=1"])


def reexec_with_huge_pages() -> None:
  """Runs this program again, in this process, with glibc's malloc asking for huge pages;
  returns at once where that would change nothing (see `tunables_with_huge_pages`), off
  glibc, or when the exec fails.

  Call it first in a program's `if __name__ == "__main__":` path, before importing JAX:
  everything done before it is done twice. The process keeps its PID, arguments, open
  files and the rest of its environment.
  """
  if not sys.executable or not on_glibc_linux():
    return
  tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES"), thp_mode())
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  previous = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  try:
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  except OSError:  # run on without huge pages rather than not at all
    if previous is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = previous


def requested_value() -> str | None:
  """This process's value of the tunable ("1" after `reexec_with_huge_pages`); None if unset."""
  values = [entry.split("=", 1)[-1] for entry in os.environ.get("GLIBC_TUNABLES", "").split(":")
            if entry.split("=", 1)[0] == TUNABLE]
  return values[-1] if values else None


def describe() -> str:
  """How this process gets huge pages, for benchmark reports."""
  mode = thp_mode()
  if mode is None:
    return "transparent huge pages unavailable"
  if mode != "madvise":
    return f"transparent huge pages: {mode}"
  return f"transparent huge pages on request; {TUNABLE}={requested_value() or 'unset'}"


def on_glibc_linux() -> bool:
  """Whether this is Linux with glibc, whose malloc reads GLIBC_TUNABLES."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    return bool(os.confstr("CS_GNU_LIBC_VERSION"))
  except (ValueError, OSError):  # musl and other C libraries do not name this setting
    return False
