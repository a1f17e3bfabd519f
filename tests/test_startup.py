"""The persistent compilation cache and the startup clock."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.training import startup


@pytest.fixture
def restore_jax_cache_config():
  saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  yield
  startup.use_compilation_cache(saved[1] if saved[0] else "")


def compile_fresh_copy() -> None:
  """Compiles a new function object (no in-memory cache applies) and runs it."""
  jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) @ x.T)(np.ones((8, 8), np.float32)))


def test_a_second_compilation_reads_the_program_from_the_cache_dir(tmp_path,
                                                                   restore_jax_cache_config):
  startup.use_compilation_cache(str(tmp_path / "cache"))
  with startup.StartupClock() as first:
    compile_fresh_copy()
  with startup.StartupClock() as second:
    compile_fresh_copy()
  assert (first.cache_hits, first.cache_misses) == (0, 1)
  assert (second.cache_hits, second.cache_misses) == (1, 0)
  assert first.compile_seconds > 0 and first.trace_seconds > 0
  assert len(list((tmp_path / "cache").iterdir())) >= 1


def test_an_empty_cache_dir_turns_the_cache_off(restore_jax_cache_config):
  startup.use_compilation_cache("")
  with startup.StartupClock() as clock:
    compile_fresh_copy()
  assert not jax.config.jax_enable_compilation_cache
  assert clock.cache_hits == clock.cache_misses == 0 and clock.compile_seconds > 0


def test_a_cache_dir_that_is_a_file_is_one_clear_error(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  with pytest.raises(ValueError, match="compilation_cache_dir=.* is a file"):
    startup.use_compilation_cache(str(a_file))


def test_the_startup_summary_names_the_time_to_the_first_step_and_the_compile_part():
  with startup.StartupClock() as clock:
    summary = clock.summary_after(jnp.ones(3))
  assert 0 < summary["startup/seconds_to_first_step"] < 24 * 3600  # since this process began
  assert "First step after" in startup.describe(summary)


def test_the_startup_bench_table_compares_the_second_start_with_the_first():
  from resnet_jax.bench.startup import KEYS, PROGRAM_KEYS, format_table
  first = dict(zip(KEYS + PROGRAM_KEYS, (15.0, 6.0, 1.0, 0.0, 19.0, 1.3, 2.0, 0.4, 2.3)))
  second = dict(zip(KEYS + PROGRAM_KEYS, (7.5, 0.6, 1.0, 19.0, 0.0, 0.25, 0.16, 0.03, 0.16)))
  table = format_table([first, second])
  assert "19 of 19" in table and "0 of 19" in table
  assert "compiling 10.0%, to first step 50.0%" in table
  by_program = table.splitlines()[table.splitlines().index("compiling by program (s):") + 1:]
  assert by_program[0].split() == ["start", "init", "train_step", "eval_step", "other"]
  assert by_program[2].split() == ["2", "0.250", "0.160", "0.030", "0.160"]


def test_the_startup_clock_splits_compile_time_by_program():
  with startup.StartupClock() as clock:
    compile_fresh_copy()  # a lambda: "other"

    def train_step(x):
      return x * 2

    jax.block_until_ready(jax.jit(train_step)(np.ones(3, np.float32)))
  by_program = clock.compile_seconds_by_program
  assert set(by_program) == {"init", "train_step", "eval_step", "other"}
  assert by_program["train_step"] > 0 and by_program["other"] > 0
  assert by_program["init"] == by_program["eval_step"] == 0
  assert sum(by_program.values()) == pytest.approx(clock.compile_seconds)
  summary = clock.summary_after(jnp.ones(3))
  assert summary["startup/compile_seconds/train_step"] == by_program["train_step"]
  assert startup.program_name("pmap(eval_step)") == "eval_step"
  assert startup.program_name("jit(init)") == "init"
  assert startup.program_name("jit(broadcast_in_dim)") == "other"


@pytest.mark.slow
def test_the_startup_bench_runs_train_py_twice_and_the_second_reads_the_cache(capsys,
                                                                             digits_data_dir):
  from resnet_jax.bench import startup as startup_bench
  startup_bench.main([f"--override=--config.data_dir={digits_data_dir}"])
  rows = capsys.readouterr().out.splitlines()
  assert rows[1].split()[0] == "1" and rows[2].split()[0] == "2"
  assert rows[2].split()[-3] == rows[2].split()[-1]  # "N of N" programs from the cache
