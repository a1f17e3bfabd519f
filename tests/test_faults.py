"""Faults a run must survive: every row of `python -m resnet_jax.faults`, plus unit checks."""

import os
import re
import signal

import chex
import numpy as np
import pytest

from resnet_jax import faults, pretrained
from resnet_jax.training import loop, preemption, reporting
from short_run import shared_dir, short_digits_config


@pytest.fixture
def config(digits_data_dir):
  return short_digits_config(digits_data_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data_dir, local_bucket):
  """The fault runs, sharing their uninterrupted reference runs (across pytest workers too:
  the first to need one trains it); the bucket rows use this worker's local bucket."""
  return faults.Runs(shared_dir(tmp_path_factory, "faults"), digits_data_dir, local_bucket)


# Every row of the table runs here, in two classes that pytest-xdist (--dist loadscope) gives
# to different workers first thing (they are the longest scopes): the multi-process rows,
# which share the 2-process reference run, and the rest.
MULTIPROCESS_FAULTS = [name for name in faults.FAULTS if "process" in name]


def check_fault(fault, runs):
  outcome = faults.run_fault(fault, runs)
  assert outcome.passed, f"{fault}: expected {outcome.expected}; {outcome.happened}"


@pytest.mark.run_first
class TestMultiProcessFaults:
  @pytest.mark.parametrize("fault", MULTIPROCESS_FAULTS)
  def test_fault(self, fault, runs):
    check_fault(fault, runs)


@pytest.mark.run_first
class TestOneProcessFaults:
  @pytest.mark.parametrize("fault", [n for n in faults.FAULTS if n not in MULTIPROCESS_FAULTS])
  def test_fault(self, fault, runs):
    check_fault(fault, runs)


def _params_at(workdir, step):
  return pretrained.load(os.path.join(workdir, "checkpoints", str(step))).variables["params"]


def test_nan_policy_skip_leaves_the_state_unchanged_counts_skips_and_stops_after_k(runs):
  # The fault row's run (lr 1e6, skip: the same compiled step), checkpointing and logging
  # every step, stopping after 3 consecutive skips.
  workdir = runs.path("skip_until_stop")
  result = runs.train(workdir, "--config.learning_rate=1e6", "--config.nan_policy=skip",
                      "--config.max_consecutive_skips=3", "--config.checkpoint_every_steps=1",
                      "--config.log_every_steps=1")
  stop = re.search(r"3 consecutive steps up to step (\d+)", faults.last_line(result.stderr))
  assert result.returncode == 1 and stop, result.stderr[-2000:]
  last = int(stop.group(1))
  # Steps last-2 .. last were skipped: the checkpoint at last-1 holds step last-3's weights.
  chex.assert_trees_all_equal(_params_at(workdir, last - 1), _params_at(workdir, last - 3))
  assert faults.checkpoint_steps(workdir)[-1] == last - 1
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  skipped = {r["step"]: r["train/skipped_steps"] for r in records if "train/loss" in r}
  assert skipped == {step: float(step >= last - 2) for step in range(1, last)}


def test_nan_policy_stop_raises_at_the_first_non_finite_step(config):
  history = [{"loss": np.float32(2.3), "non_finite": np.float32(0)},
             {"loss": np.float32(np.nan), "non_finite": np.float32(1)},
             {"loss": np.float32(np.nan), "non_finite": np.float32(1)}]
  with pytest.raises(loop.NonFiniteError, match="non-finite values at step 8: loss = nan"):
    loop.check_finite(history, 7, config, consecutive_skips=0)


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_clear_error(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    loop.prepare_workdir(str(a_file))
  with pytest.raises(ValueError, match="cannot create --workdir=.*: Not a directory"):
    loop.prepare_workdir(str(a_file / "run"))


@pytest.mark.parametrize("signum", preemption.SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_the_first_sigterm_or_sigint_is_caught_and_the_second_would_end_the_process(signum):
  previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  with preemption.StopSignal() as stop_signal:
    assert not stop_signal.should_stop(1)
    os.kill(os.getpid(), signum)
    assert stop_signal.should_stop(2) and stop_signal.name == signal.Signals(signum).name
    assert all(signal.getsignal(s) is signal.SIG_DFL for s in preemption.SIGNALS)
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == previous
