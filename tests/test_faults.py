"""Faults a run must survive: every row of `python -m resnet_jax.faults`, plus unit checks."""

import json
import os
import re
import signal
import threading
import time

import chex
import pytest

from resnet_jax import faults, pretrained
from resnet_jax.training import loop
from short_run import short_digits_config


@pytest.fixture
def config(digits_data_dir):
  return short_digits_config(digits_data_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data_dir):
  """The fault runs of this module, sharing one uninterrupted reference run."""
  return faults.Runs(str(tmp_path_factory.mktemp("faults")), digits_data_dir)


# Rows that start several train.py processes (~15 s each here) run with `pytest -m slow` and
# in `python -m resnet_jax.faults`; the fast suite has in-process checks of the same paths.
SLOW_FAULTS = ("SIGTERM mid-run", "kill -9 three times at random moments",
               "latest checkpoint truncated", "lr 1e6 with nan_policy=stop",
               "lr 1e6 with nan_policy=skip", "image folder with random bytes and a truncated PNG")


@pytest.mark.parametrize("fault", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_FAULTS else name
    for name in faults.FAULTS])
def test_fault(fault, runs):
  outcome = faults.run_fault(fault, runs)
  assert outcome.passed, f"{fault}: expected {outcome.expected}; {outcome.happened}"


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


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_clear_error(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    loop.prepare_workdir(str(a_file))
  with pytest.raises(ValueError, match="cannot create --workdir=.*: Not a directory"):
    loop.prepare_workdir(str(a_file / "run"))


def test_sigterm_stops_after_the_current_step_with_a_checkpoint_and_resumes_bitwise(
    config, tmp_path, capsys):
  config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 40, 2, 1000
  metrics = tmp_path / "interrupted" / "metrics.jsonl"

  def send_sigterm_once_training():
    while not (metrics.exists() and metrics.read_text()):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=send_sigterm_once_training, daemon=True).start()
  assert loop.train_and_evaluate(config, str(tmp_path / "interrupted")) == {}
  stopped = re.search(r"Stopped by SIGTERM after step (\d+) of 40", capsys.readouterr().out)
  assert stopped
  assert os.listdir(tmp_path / "interrupted" / "checkpoints") == [stopped.group(1)]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again

  loop.train_and_evaluate(config, str(tmp_path / "interrupted"))
  loop.train_and_evaluate(config, str(tmp_path / "reference"))
  chex.assert_trees_all_equal(pretrained.load(str(tmp_path / "interrupted")).variables,
                              pretrained.load(str(tmp_path / "reference")).variables)
