"""Faults a run must survive: every row of `python -m resnet_jax.faults`, plus unit checks."""

import json
import os
import signal

import chex
import numpy as np
import pytest

from resnet_jax import faults, pretrained
from resnet_jax.training import loop, preemption
from short_run import short_digits_config


@pytest.fixture
def config(digits_data_dir):
  return short_digits_config(digits_data_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data_dir):
  """The fault runs of this module, sharing their uninterrupted reference runs."""
  return faults.Runs(str(tmp_path_factory.mktemp("faults")), digits_data_dir)


# Every row of the table runs here, in two classes that pytest-xdist (--dist loadscope) can
# give to different workers: the multi-process rows, which share the 2-process reference run,
# and the rest. Each class builds the 1-process reference once. Six rows run only with
# `-m slow` (and in `python -m resnet_jax.faults`): with them the fast suite took 11 min on
# 2 cores, over its 10-minute budget. Fast tests run their paths otherwise: the 2-process
# jit rows start, checkpoint and resume 2 processes; the 1-process SIGTERM row stops and
# resumes bitwise; the nan_policy tests below; test_image_folder's skipped-file tests;
# test_training's damaged-checkpoint and pmap-checkpoint tests.
SLOW_FAULTS = ()
MULTIPROCESS_FAULTS = [name for name in faults.FAULTS if "process" in name]


def fault_params(names):
  return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAULTS else n for n in names]


def check_fault(fault, runs):
  outcome = faults.run_fault(fault, runs)
  assert outcome.passed, f"{fault}: expected {outcome.expected}; {outcome.happened}"


class TestMultiProcessFaults:
  @pytest.mark.parametrize("fault", fault_params(MULTIPROCESS_FAULTS))
  def test_fault(self, fault, runs):
    check_fault(fault, runs)


class TestOneProcessFaults:
  @pytest.mark.parametrize(
      "fault", fault_params([n for n in faults.FAULTS if n not in MULTIPROCESS_FAULTS]))
  def test_fault(self, fault, runs):
    check_fault(fault, runs)


def _params_at(workdir, step):
  return pretrained.load(os.path.join(workdir, "checkpoints", str(step))).variables["params"]


def test_nan_policy_skip_leaves_the_state_unchanged_counts_skips_and_stops_after_k(
    config, tmp_path):
  config.learning_rate, config.num_train_steps = 1e6, 8
  config.checkpoint_every_steps, config.nan_policy, config.max_consecutive_skips = 1, "skip", 3
  with pytest.raises(loop.NonFiniteError, match="3 consecutive steps up to step 5"):
    loop.train_and_evaluate(config, str(tmp_path))
  # Steps 3 and 4 were skipped: the checkpoint at 4 holds step 2's weights, step counter 4.
  chex.assert_trees_all_equal(_params_at(tmp_path, 4), _params_at(tmp_path, 2))
  assert "5" not in os.listdir(tmp_path / "checkpoints")
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["train/skipped_steps"] for r in records if "train/loss" in r] == [0.0, 2.0]


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


def test_the_first_sigterm_is_caught_and_the_second_would_end_the_process():
  previous = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignal() as stop_signal:
    assert not stop_signal.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop_signal.should_stop(2) and stop_signal.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  assert signal.getsignal(signal.SIGTERM) is previous
