"""glibc malloc settings for the host buffers that XLA:CPU allocates on every step.

XLA:CPU allocates a program's temporary buffer with malloc each time the program runs: for
ResNet-50's train step at 224², batch 8, one buffer of 726 MiB (1,065 MiB when the figures
in BENCHMARKS.md were measured). glibc serves an allocation that large with a fresh mmap and
frees it with munmap, so every step touches that much new memory in 4 KiB pages: ~288,000
page faults and 0.5-0.65 s of kernel time per step on 2 cores. Smaller buffers (XLA's
convolution packing, for one) are returned to the kernel as soon as the top of malloc's
heap is free, and faulted in again at the next step: the default digits run took 4.4-5.4
million page faults and 11-13 s of kernel time for 440 steps.

glibc tunables (glibc 2.35 and later) fix both:
- `glibc.malloc.hugetlb=1`: malloc asks for transparent huge pages, where the kernel
  gives them only on request (`/sys/kernel/mm/transparent_hugepage/enabled` set to
  `madvise`). ResNet-50's step: ~1,000 faults, 17-27% faster.
- `glibc.malloc.top_pad=64 MiB`: each heap keeps 64 MiB free at its top instead of
  handing it back. The digits run: ~75,000 faults, ~2 s of kernel time.
- `glibc.malloc.mmap_threshold=32 MiB`: setting the pad turns off glibc's sliding mmap
  threshold, which would otherwise rise to this maximum; left at its 128 KiB start, every
  mid-sized allocation becomes an mmap (torchvision's step in the same process ran at half
  speed).

glibc reads its tunables only when a program starts, so `reexec_with_malloc_tuning` starts
the program again with them. Opt out by setting one of these tunables yourself, e.g.
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`: a GLIBC_TUNABLES that already names one of them
is left as it is.
"""

from __future__ import annotations

import os
import re
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"
TOP_PAD = "glibc.malloc.top_pad"
TOP_PAD_BYTES = 64 * 2**20
MMAP_THRESHOLD = "glibc.malloc.mmap_threshold"
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest, where its sliding threshold stops
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


def tunables_to_request(tunables: str | None, mode: str | None) -> str | None:
  """The GLIBC_TUNABLES value to run with, or None to run as is.

  Adds `top_pad` and `mmap_threshold`, and `hugetlb=1` where huge pages come on request
  (`mode` "madvise": with "always" the kernel uses them anyway, with "never" not at all);
  keeps other tunables; changes nothing when `tunables` already sets one of ours (the
  user's choice).
  """
  entries = _entries(tunables)
  if any(_name(entry) in (HUGE_PAGES, TOP_PAD, MMAP_THRESHOLD) for entry in entries):
    return None
  ours = [f"{HUGE_PAGES}=1"] if mode == "madvise" else []
  return ":".join([*entries, *ours, f"{TOP_PAD}={TOP_PAD_BYTES}",
                   f"{MMAP_THRESHOLD}={MMAP_THRESHOLD_BYTES}"])


def reexec_with_malloc_tuning() -> None:
  """Runs this program again, in this process, with the tunables of `tunables_to_request`;
  returns at once where there is nothing to add, off glibc, or when the exec fails.

  Call it first in a program's `if __name__ == "__main__":` path, before importing JAX:
  everything done before it is done twice. The process keeps its PID, arguments, open
  files and the rest of its environment.
  """
  if not sys.executable or not on_glibc_linux():
    return
  tunables = tunables_to_request(os.environ.get("GLIBC_TUNABLES"), thp_mode())
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  previous = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  try:
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  except OSError:  # run on without the tunables rather than not at all
    if previous is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = previous


def tunable_value(name: str) -> str | None:
  """This process's value of the glibc tunable `name`; None if unset."""
  values = [entry.split("=", 1)[-1] for entry in _entries(os.environ.get("GLIBC_TUNABLES"))
            if _name(entry) == name]
  return values[-1] if values else None


def settings() -> dict[str, float]:
  """This process's settings as numbers for metrics: huge_pages (1 or 0), top_pad_mib."""
  top_pad = tunable_value(TOP_PAD)
  return {"huge_pages": float(tunable_value(HUGE_PAGES) not in (None, "0")),
          "top_pad_mib": int(top_pad) / 2**20 if top_pad and top_pad.isdigit() else 0.0}


def describe() -> str:
  """This process's malloc settings, for benchmark reports."""
  mode = thp_mode()
  huge_pages = ("transparent huge pages unavailable" if mode is None
                else f"transparent huge pages: {mode}" if mode != "madvise"
                else f"transparent huge pages on request; {HUGE_PAGES}="
                     f"{tunable_value(HUGE_PAGES) or 'unset'}")
  return f"{huge_pages}; {TOP_PAD}={tunable_value(TOP_PAD) or 'unset'}"


def _entries(tunables: str | None) -> list[str]:
  """The "name=value" entries of a GLIBC_TUNABLES string, in order."""
  return [entry for entry in (tunables or "").split(":") if entry]


def _name(entry: str) -> str:
  return entry.split("=", 1)[0]


def on_glibc_linux() -> bool:
  """Whether this is Linux with glibc, whose malloc reads GLIBC_TUNABLES."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    return bool(os.confstr("CS_GNU_LIBC_VERSION"))
  except (ValueError, OSError):  # musl and other C libraries do not name this setting
    return False
