"""Specification of populations: N members of one config in one compiled program.

Member i must be exactly the single run with seed + i (its own learning rate and weight
decay, the population's input stream), up to float reduction order, as pmap is to jit.
"""

import json
import os

import chex
import flax
import jax
import numpy as np
import pytest

from resnet_jax import pretrained, take_member
from resnet_jax.storage import paths
from resnet_jax.training import checkpointing, loop, population, reporting, run_record
from resnet_jax.training.config import validate_config
from short_run import run_steps, short_digits_config

LEARNING_RATES = (0.05, 0.02)
WEIGHT_DECAYS = (1e-3, 0.0)


def digits_config(data_dir, **overrides):
  config = short_digits_config(data_dir)
  config.schedule, config.warmup_epochs = "cosine", 0.05  # a schedule of the peak lr
  config.num_train_steps = 20
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def single_runs(digits_data_dir):
  """Runs with seed 3 + i, member i's hyperparameters and the input stream of seed 3."""
  return [run_steps(digits_config(digits_data_dir, seed=3 + i, data_seed=3, learning_rate=lr,
                                  weight_decay=wd), 3)
          for i, (lr, wd) in enumerate(zip(LEARNING_RATES, WEIGHT_DECAYS))]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_member_i_is_the_single_run_with_seed_plus_i_and_its_hyperparameters(
    digits_data_dir, single_runs, mode):
  config = digits_config(digits_data_dir, seed=3, population_size=2, population_mode=mode,
                         population_learning_rates=LEARNING_RATES,
                         population_weight_decays=WEIGHT_DECAYS)
  states, history = run_steps(config, 3)
  for i, (single, single_history) in enumerate(single_runs):
    member = population.member(states, i)
    np.testing.assert_allclose([m["loss"][i] for m in history],
                               [m["loss"] for m in single_history], rtol=1e-5)
    np.testing.assert_allclose([m["learning_rate"][i] for m in history],
                               [m["learning_rate"] for m in single_history], rtol=1e-6)
    for field in ("params", "batch_stats", "opt_state"):
      chex.assert_trees_all_close(getattr(member, field), getattr(single, field), rtol=1e-4,
                                  atol=1e-5)
    assert int(member.step) == int(single.step) == 3


@pytest.mark.parametrize("mode", [pytest.param("vmap", marks=pytest.mark.slow), "loop"])
def test_a_population_under_pmap_equals_it_under_jit(digits_data_dir, mode):
  # Two steps: float32 drift through reduction order shows from step 3 (see test_training).
  config = digits_config(digits_data_dir, population_size=2, population_mode=mode,
                         population_learning_rates=LEARNING_RATES)
  jit_states, jit_history = run_steps(config, 2)
  config.parallelism = "pmap"
  pmap_states, pmap_history = run_steps(config, 2)
  np.testing.assert_allclose([m["loss"] for m in pmap_history],
                             [m["loss"] for m in jit_history], rtol=1e-5)
  chex.assert_trees_all_close(pmap_states.params, jit_states.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(pmap_states.batch_stats, jit_states.batch_stats, rtol=1e-4,
                              atol=1e-5)


def test_a_member_with_learning_rate_zero_keeps_its_initial_weights(digits_data_dir):
  config = digits_config(digits_data_dir, population_size=2,
                         population_learning_rates=(0.0, 0.05))
  initial = jax.device_get(loop.setup(config).initial_state)
  states, _ = run_steps(config, 2)
  chex.assert_trees_all_equal(population.member(states.params, 0),
                              population.member(initial.params, 0))
  assert not np.array_equal(states.params["fc"]["kernel"][1], initial.params["fc"]["kernel"][1])


def test_data_seed_changes_the_batches_and_not_the_initial_weights(digits_data_dir):
  same_seed = loop.setup(digits_config(digits_data_dir, seed=0))
  other_stream = loop.setup(digits_config(digits_data_dir, seed=0, data_seed=7))
  chex.assert_trees_all_equal(same_seed.initial_state.params, other_stream.initial_state.params)
  first = next(loop.train_batches(same_seed, 0))
  assert not np.array_equal(first["label"], next(loop.train_batches(other_stream, 0))["label"])
  np.testing.assert_array_equal(  # -1 is the same stream as the seed's own
      first["label"], next(loop.train_batches(
          loop.setup(digits_config(digits_data_dir, seed=0, data_seed=0)), 0))["label"])


@pytest.fixture(scope="module")
def population_run(digits_data_dir, tmp_path_factory):
  """(workdir, config): 4 steps of a 3-member population, checkpointed at 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("population"))
  config = digits_config(digits_data_dir, schedule="constant", population_size=3,
                         num_train_steps=4, checkpoint_every_steps=2, eval_every_steps=4)
  loop.train_and_evaluate(config, workdir)
  return workdir, config


def restored_state(workdir, config):
  exp = loop.setup(config, abstract_state=True)
  manager = checkpointing.make_checkpoint_manager(workdir, 3, "eval/accuracy")
  state, _ = checkpointing.restore_latest(manager, exp.initial_state)
  manager.close()
  return jax.device_get(flax.serialization.to_state_dict(state))  # arrays; no static fields


def test_a_resumed_population_is_bitwise_equal_to_an_uninterrupted_one(population_run,
                                                                      tmp_path):
  workdir, config = population_run
  config.num_train_steps = 2
  loop.train_and_evaluate(config, str(tmp_path))
  config.num_train_steps = 4
  loop.train_and_evaluate(config, str(tmp_path))  # resumes at step 2
  chex.assert_trees_all_equal(restored_state(str(tmp_path), config),
                              restored_state(workdir, config))


def test_metrics_hold_the_mean_the_spread_and_every_member(population_run):
  workdir, _ = population_run
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evaluation = next(r for r in records if "eval/accuracy" in r)
  members = [evaluation[f"eval/member{i}/accuracy"] for i in range(3)]
  assert evaluation["eval/accuracy"] == pytest.approx(np.mean(members))
  assert evaluation["eval/accuracy_std"] == pytest.approx(np.std(members))
  train = next(r for r in records if "train/loss" in r)
  assert train["train/loss"] == pytest.approx(np.mean(
      [train[f"train/member{i}/loss"] for i in range(3)]))
  assert "train/member2/learning_rate" in train and "train/images_per_sec" in train


def test_the_final_line_gives_mean_and_spread_and_the_best_member():
  metrics = population.summarize({"eval/loss": [0.5, 0.3], "eval/accuracy": [0.8, 0.9]})
  assert reporting.eval_summary(metrics) == (
      "loss 0.4000 ± 0.1000, accuracy 85.00% ± 5.00% over 2 members; best: member 1, "
      "accuracy 90.00%")


def test_a_member_taken_out_is_an_ordinary_checkpoint_for_predict_and_init_from(
    population_run, tmp_path):
  workdir, config = population_run
  with pytest.raises(ValueError, match="population of 3 members; take one out"):
    pretrained.load(workdir)
  take_member.take_member(workdir, 2, str(tmp_path / "member2"))
  weights = pretrained.load(str(tmp_path / "member2"))
  state = restored_state(workdir, config)
  chex.assert_trees_all_equal(weights.variables["params"],
                              population.member(state["params"], 2))
  assert weights.info.population_size == 1 and weights.info.model == config.model
  single = digits_config(config.data_dir, init_from=str(tmp_path / "member2"), num_train_steps=1)
  exp = loop.setup(single)
  chex.assert_trees_all_equal(jax.device_get(exp.initial_state.params),
                              weights.variables["params"])


def test_take_member_names_the_members_there_are(population_run, tmp_path, capsys):
  with pytest.raises(SystemExit):
    take_member.main([population_run[0], "--member=3", f"--output={tmp_path / 'm'}"])
  assert "--member=3: " in capsys.readouterr().err
  assert not (tmp_path / "m").exists()


def test_a_non_finite_member_stops_the_population_naming_it():
  config = digits_config("")
  history = [{"loss": np.array([0.5, np.nan]), "non_finite": np.array([0.0, 1.0])}]
  with pytest.raises(loop.NonFiniteError, match="at step 7 in member 1: loss = nan"):
    loop.check_finite(history, 7, config, 0)


@pytest.mark.parametrize("key, value, message", [
    ("population_learning_rates", (0.1, 0.2), "needs one value per member: 3"),
    ("population_weight_decays", (0.1, -1.0, 0.0), "every value must be >= 0"),
    ("population_mode", "scan", "must be one of auto, vmap, loop"),
    ("data_seed", -2, "must be >= 0, or -1"),
])
def test_bad_population_keys_are_named(key, value, message):
  config = digits_config("", population_size=3)
  config[key] = value
  with pytest.raises(ValueError, match=f"config.{key}=.*{message}"):
    validate_config(config)


def test_population_mode_may_change_on_resume_and_the_size_may_not(population_run):
  workdir, config = population_run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["population_size"] == 3
  changed = config.copy_and_resolve_references()
  changed.population_mode = "vmap" if config.population_mode != "vmap" else "loop"
  run_record.check_config(paths.resolve(workdir), changed, resuming=True)
  changed.population_size = 2
  with pytest.raises(run_record.ConfigChangedError, match="population_size"):
    run_record.check_config(paths.resolve(workdir), changed, resuming=True)
