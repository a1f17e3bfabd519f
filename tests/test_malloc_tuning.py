"""resnet_jax.malloc_tuning: when a program restarts itself with glibc malloc's tunables."""

import os
import subprocess
import sys

import pytest

from resnet_jax import malloc_tuning

PAD = "glibc.malloc.top_pad=67108864:glibc.malloc.mmap_threshold=33554432"


@pytest.mark.parametrize("tunables, mode, expected", [
    (None, "madvise", f"glibc.malloc.hugetlb=1:{PAD}"),
    ("", "madvise", f"glibc.malloc.hugetlb=1:{PAD}"),
    ("glibc.malloc.arena_max=2", "madvise",
     f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:{PAD}"),
    ("glibc.malloc.hugetlb=0", "madvise", None),  # the user's choice stands
    ("glibc.malloc.top_pad=0", "madvise", None),
    ("glibc.malloc.mmap_threshold=131072", "never", None),
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", "madvise", None),
    ("glibc.malloc.hugetlbx=1", "madvise", f"glibc.malloc.hugetlbx=1:glibc.malloc.hugetlb=1:{PAD}"),
    (None, "always", PAD),  # the kernel gives huge pages anyway
    (None, "never", PAD),  # asking would change nothing
    (None, None, PAD),  # no transparent huge pages here
])
def test_tunables_to_request(tunables, mode, expected):
  assert malloc_tuning.tunables_to_request(tunables, mode) == expected


@pytest.mark.parametrize("text, expected", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbage\n", None),
])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, expected):
  setting = tmp_path / "enabled"
  setting.write_text(text)
  assert malloc_tuning.thp_mode(str(setting)) == expected
  assert malloc_tuning.thp_mode(str(tmp_path / "missing")) is None


# Prints one line per start of the program: its PID, arguments and GLIBC_TUNABLES.
PROGRAM = """
import os, sys
print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
from resnet_jax.malloc_tuning import reexec_with_malloc_tuning
reexec_with_malloc_tuning()
print("ran on", flush=True)
"""


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.hugetlb=0"])
def test_reexec_keeps_pid_and_arguments_and_adds_the_tunables_unless_the_user_set_them(tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  result = subprocess.run([sys.executable, "-c", PROGRAM, "--flag", "a b"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
  *starts, last = result.stdout.splitlines()
  assert last == "ran on"
  expected = malloc_tuning.tunables_to_request(tunables, malloc_tuning.thp_mode())
  if expected is None or not malloc_tuning.on_glibc_linux():
    assert starts == [f"{starts[0].split()[0]} ['--flag', 'a b'] {tunables}"]  # ran once
  else:
    first_pid = starts[0].split()[0]
    assert starts == [f"{first_pid} ['--flag', 'a b'] {tunables}",
                      f"{first_pid} ['--flag', 'a b'] {expected}"]  # same process, again


def test_settings_read_this_process_tunables(monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.hugetlb=1:{PAD}")
  assert malloc_tuning.settings() == {"huge_pages": 1.0, "top_pad_mib": 64.0}
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert malloc_tuning.settings() == {"huge_pages": 0.0, "top_pad_mib": 0.0}
  assert "top_pad=unset" in malloc_tuning.describe()


def test_importing_malloc_tuning_does_not_import_jax():
  code = ("import sys, resnet_jax.malloc_tuning; "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
  assert result.stdout.strip() == "[]"
