"""Faults a run must survive: every row of `python -m resnet_jax.faults`, plus unit checks."""

import json
import os

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


@pytest.mark.parametrize("fault", list(faults.FAULTS))
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
