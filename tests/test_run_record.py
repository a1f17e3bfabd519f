"""The run record (config.json, runs.jsonl) and the guard against resuming with another config."""

import json

import jax
import pytest

from resnet_jax.storage import paths
from resnet_jax.training import loop, run_record
from short_run import short_digits_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data_dir):
  """A finished 4-step run: (workdir, its config)."""
  workdir = paths.resolve(tmp_path_factory.mktemp("recorded"))
  config = short_digits_config(digits_data_dir)
  loop.train_and_evaluate(config, workdir)
  return workdir, config


def starts(workdir):
  return [json.loads(line) for line in (workdir / "runs.jsonl").read_text().splitlines()]


def test_the_first_start_records_the_config_the_command_versions_devices_and_commit(trained):
  workdir, config = trained
  assert json.loads((workdir / "config.json").read_text()) == run_record.as_dict(config)
  (start,) = starts(workdir)
  assert start["start"] == "from scratch" and start["config_changes"] == {}
  assert start["versions"]["jax"] == jax.__version__ and "orbax-checkpoint" in start["versions"]
  assert start["devices"] == f"{jax.device_count()} × {jax.devices()[0].device_kind}"
  assert start["processes"] == 1 and isinstance(start["command"], list)
  assert start["git"] is None or len(start["git"]["commit"]) == 40


def test_resuming_with_another_learning_rate_or_model_names_each_key_and_compiles_nothing(
    trained):
  workdir, config = trained
  changed = config.copy_and_resolve_references()
  changed.learning_rate, changed.model = 0.2, "resnet20"
  with pytest.raises(run_record.ConfigChangedError,
                     match=r"learning_rate 0\.05 → 0\.2; model 'resnet8' → 'resnet20'.*"
                           r"--config\.allow_config_change=True"):
    loop.train_and_evaluate(changed, workdir)
  assert len(starts(workdir)) == 1  # nothing recorded, nothing trained


def test_operational_keys_and_a_longer_constant_schedule_resume_and_are_recorded(
    tmp_path, digits_data_dir):
  workdir = paths.resolve(tmp_path)
  config = short_digits_config(digits_data_dir)
  loop.train_and_evaluate(config, workdir)
  config.log_every_steps, config.num_train_steps, config.progress_bar = 1, 6, False
  loop.train_and_evaluate(config, workdir)
  second = starts(workdir)[1]
  assert second["start"] == "resumed at step 4"
  assert second["config_changes"] == {"log_every_steps": [2, 1], "num_train_steps": [4, 6]}
  assert run_record.recorded_config(workdir)["num_train_steps"] == 6


def test_allow_config_change_resumes_and_records_the_change(tmp_path, digits_data_dir):
  workdir = paths.resolve(tmp_path)
  config = short_digits_config(digits_data_dir)
  loop.train_and_evaluate(config, workdir)
  config.learning_rate, config.allow_config_change, config.num_train_steps = 0.02, True, 5
  loop.train_and_evaluate(config, workdir)
  assert starts(workdir)[1]["config_changes"] == {
      "allow_config_change": [False, True], "learning_rate": [0.05, 0.02],
      "num_train_steps": [4, 5]}


def test_only_length_changes_under_a_length_dependent_schedule_block():
  config = short_digits_config("")
  changes = {"num_train_steps": [4, 8], "eval_every_steps": [0, 2]}
  assert run_record.result_changing(changes, config) == {}  # constant schedule
  config.schedule = "cosine"
  assert run_record.result_changing(changes, config) == {"num_train_steps": [4, 8]}


def test_secret_looking_flag_values_are_not_recorded():
  assert run_record.command_line(["train.py", "--auth_token=abc", "--workdir=/x"]) == [
      "train.py", "--auth_token=<redacted>", "--workdir=/x"]


def test_a_run_that_fails_before_writing_anything_leaves_no_new_workdir(tmp_path,
                                                                        digits_data_dir):
  config = short_digits_config(digits_data_dir)
  config.batch_size = 4096  # more than the training split: fails in setup
  largest = 1437 // jax.device_count() * jax.device_count()  # digits: 1,437 to train on
  with pytest.raises(ValueError, match=f"larger than the 1437 training examples of digits: use "
                                       f"--config.batch_size={largest} or smaller"):
    loop.train_and_evaluate(config, tmp_path / "new" / "run")
  assert not (tmp_path / "new" / "run").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(ValueError, match="larger than the"):
    loop.train_and_evaluate(config, existing)
  assert existing.is_dir()  # the user's folder stays


def test_a_key_the_record_predates_does_not_block_a_resume(tmp_path, digits_data_dir):
  workdir = paths.resolve(tmp_path)
  config = short_digits_config(digits_data_dir)
  recorded = run_record.as_dict(config)
  del recorded["label_smoothing"]  # as written by a version without the key
  (workdir / "config.json").write_text(json.dumps(recorded))
  changes = run_record.check_config(workdir, config, resuming=True)
  assert changes == {"label_smoothing": [None, 0.0]}
