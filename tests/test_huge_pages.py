"""resnet_jax.huge_pages: when a program restarts itself with glibc asking for huge pages."""

import os
import subprocess
import sys

import pytest

from resnet_jax import huge_pages


@pytest.mark.parametrize("tunables, mode, expected", [
    (None, "madvise", "glibc.malloc.hugetlb=1"),
    ("", "madvise", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "madvise", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "madvise", None),  # the user's choice stands
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", "madvise", None),
    ("glibc.malloc.hugetlbx=1", "madvise", "glibc.malloc.hugetlbx=1:glibc.malloc.hugetlb=1"),
    (None, "always", None),  # the kernel gives huge pages anyway
    (None, "never", None),  # asking would change nothing
    (None, None, None),  # no transparent huge pages here
])
def test_tunables_with_huge_pages(tunables, mode, expected):
  assert huge_pages.tunables_with_huge_pages(tunables, mode) == expected


@pytest.mark.parametrize("text, expected", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbage\n", None),
])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, expected):
  setting = tmp_path / "enabled"
  setting.write_text(text)
  assert huge_pages.thp_mode(str(setting)) == expected
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


# Prints one line per start of the program: its PID, arguments and GLIBC_TUNABLES.
PROGRAM = """
import os, sys
print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
from resnet_jax.huge_pages import reexec_with_huge_pages
reexec_with_huge_pages()
print("ran on", flush=True)
"""


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.hugetlb=0"])
def test_reexec_keeps_pid_and_arguments_and_adds_the_tunable_only_where_it_helps(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  result = subprocess.run([sys.executable, "-c", PROGRAM, "--flag", "a b"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
  *starts, last = result.stdout.splitlines()
  assert last == "ran on"
  expected = huge_pages.tunables_with_huge_pages(tunables, huge_pages.thp_mode())
  if expected is None or not huge_pages.on_glibc_linux():
    assert starts == [f"{starts[0].split()[0]} ['--flag', 'a b'] {tunables}"]  # ran once
  else:
    first_pid = starts[0].split()[0]
    assert starts == [f"{first_pid} ['--flag', 'a b'] {tunables}",
                      f"{first_pid} ['--flag', 'a b'] {expected}"]  # same process, again


def test_importing_huge_pages_does_not_import_jax():
  code = ("import sys, resnet_jax.huge_pages; "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
  assert result.stdout.strip() == "[]"
