"""Faults a run must survive: preemption signals and non-finite values."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from resnet_jax import pretrained
from resnet_jax.training import loop
from short_run import short_digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config(digits_data_dir):
  return short_digits_config(digits_data_dir)


def train_py(workdir, data_dir, *overrides):
  """The README's train command on the prepared digits, as a list for subprocess."""
  return [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", "--config.progress_bar=False", *overrides]


def _params_at(workdir, step):
  return pretrained.load(os.path.join(workdir, "checkpoints", str(step))).variables["params"]


def test_nan_policy_stop_exits_non_zero_at_the_first_bad_step_and_saves_nothing_after_it(
    tmp_path, digits_data_dir):
  # At lr 1e6 the first steps are finite but huge, then the loss is NaN.
  result = subprocess.run(
      train_py(tmp_path, digits_data_dir, "--config.learning_rate=1e6",
               "--config.num_train_steps=6", "--config.checkpoint_every_steps=1",
               "--config.log_every_steps=2", "--config.batch_size=32"),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  bad_step = re.match(r"error: non-finite values at step (\d+): loss = nan\. ", last_line)
  assert bad_step, last_line
  assert "Traceback" not in result.stderr
  last_saved = max(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert last_saved == int(bad_step.group(1)) - 1
  assert jax.tree.all(jax.tree.map(lambda p: bool(np.all(np.isfinite(p))),
                                   _params_at(tmp_path, last_saved)))


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


def test_sigterm_saves_the_current_step_exits_0_and_the_restart_is_bitwise_identical(
    tmp_path, digits_data_dir):
  steps = ["--config.num_train_steps=100", "--config.log_every_steps=5",
           "--config.batch_size=32", "--config.checkpoint_every_steps=1000"]
  interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
  process = subprocess.Popen(train_py(interrupted, digits_data_dir, *steps),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    time.sleep(0.05)  # training has started once the first metrics are logged
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  stopped = re.search(r"Stopped by SIGTERM after step (\d+) of 60", out)
  assert stopped, out
  step = int(stopped.group(1))
  assert 5 <= step < 100 and os.listdir(interrupted / "checkpoints") == [str(step)]

  resumed = subprocess.run(train_py(interrupted, digits_data_dir, *steps), capture_output=True,
                           text=True, timeout=300)
  assert f"Resuming from the checkpoint at step {step}" in resumed.stdout, resumed.stderr[-2000:]
  subprocess.run(train_py(reference, digits_data_dir, *steps), check=True, capture_output=True,
                 timeout=300)
  chex.assert_trees_all_equal(pretrained.load(str(interrupted)).variables,
                              pretrained.load(str(reference)).variables)


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_clear_error(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    loop.prepare_workdir(str(a_file))
  with pytest.raises(ValueError, match="cannot create --workdir=.*: Not a directory"):
    loop.prepare_workdir(str(a_file / "run"))


def test_train_py_with_a_missing_config_file_says_so_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}",
       "--config=configs/no_such_config.py"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: could not load --config: [Errno 2] No such file or directory: "
      "'configs/no_such_config.py'")
  assert "Traceback" not in result.stderr
