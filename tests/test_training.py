"""Specification of the training core: steps, parallelism, numerics, checkpoints, resume."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from resnet_jax import create_model, data, malloc_tuning
from resnet_jax.data import device_ops
from resnet_jax.training import checkpointing, loop, parallel, steps
from resnet_jax.training.config import base_config, validate_config
from resnet_jax.training.train_state import create_train_state
from short_run import run_steps, short_digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config(digits_data_dir):
  """A short digits run: ResNet-8 on 8×8 images, 4 examples per CPU device."""
  return short_digits_config(digits_data_dir)


def test_pmap_and_jit_give_the_same_losses_and_params(config):
  # Float32 SGD is chaotic: reduction order alone makes the two drift apart from step 3 on
  # this stream (1e-7 after steps 1 and 2, 4e-4 after step 3), so compare two steps.
  config.parallelism = "pmap"
  pmap_state, pmap_history = run_steps(config, 2)
  config.parallelism = "jit"
  jit_state, jit_history = run_steps(config, 2)
  np.testing.assert_allclose([m["loss"] for m in pmap_history],
                             [m["loss"] for m in jit_history], rtol=1e-5)
  chex.assert_trees_all_close(pmap_state.params, jit_state.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(pmap_state.batch_stats, jit_state.batch_stats, rtol=1e-4,
                              atol=1e-5)


def test_cross_replica_batchnorm_uses_statistics_of_the_global_batch():
  images = jax.random.normal(jax.random.key(0), (8, 2, 8, 8, 3)) * jnp.arange(1, 9).reshape(
      8, 1, 1, 1, 1)  # every replica sees data with a different scale
  synced = create_model("resnet20", axis_name="batch", width=4, stage_sizes=(1, 1, 1))
  variables = synced.init(jax.random.key(1), images[0])

  def replica_stats(x):
    return synced.apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]

  per_replica = jax.pmap(replica_stats, axis_name="batch")(images)
  global_batch = create_model("resnet20", width=4, stage_sizes=(1, 1, 1)).apply(
      variables, images.reshape(16, 8, 8, 3), train=True, mutable=["batch_stats"])[1]
  for replica in range(8):
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[replica], per_replica),
                                global_batch["batch_stats"], rtol=1e-4, atol=1e-5)


def restore_params(workdir, config):
  exp = loop.setup(config)
  manager = checkpointing.make_checkpoint_manager(workdir, 3, "eval/accuracy")
  state, position = checkpointing.restore_latest(manager, exp.initial_state)
  manager.close()
  return state, position


@pytest.mark.slow  # 26 s; the SIGTERM and kill -9 fault rows resume train.py bitwise
def test_resume_after_n_steps_then_m_more_is_bitwise_identical_to_n_plus_m(config, tmp_path):
  config.num_train_steps = 5  # the constant schedule does not depend on the run's length
  loop.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  config.num_train_steps = 3
  loop.train_and_evaluate(config, str(tmp_path / "interrupted"))
  config.num_train_steps = 5
  loop.train_and_evaluate(config, str(tmp_path / "interrupted"))

  whole, whole_position = restore_params(str(tmp_path / "uninterrupted"), config)
  resumed, resumed_position = restore_params(str(tmp_path / "interrupted"), config)
  assert resumed_position == whole_position and whole_position["next_batch"] == 5
  chex.assert_trees_all_equal(resumed.params, whole.params)
  chex.assert_trees_all_equal(resumed.batch_stats, whole.batch_stats)
  chex.assert_trees_all_equal(resumed.opt_state, whole.opt_state)
  chex.assert_trees_all_equal(resumed.rng, whole.rng)
  # The resumed run appended to metrics.jsonl: no step twice, none missing.
  with open(tmp_path / "interrupted" / "metrics.jsonl") as f:
    records = list(map(json.loads, f))
  assert [r["step"] for r in records if "train/loss" in r] == [2, 3, 4, 5]
  # Each start timed its way to its first step (1, then 4 after resuming at 3).
  assert [r["step"] for r in records if r.get("startup/seconds_to_first_step", 0) > 0] == [1, 4]


def test_checkpoint_from_8_device_pmap_restores_under_jit_and_resumes_on_one_device(
    config, tmp_path):
  config.parallelism = "pmap"
  config.num_train_steps = 2
  workdir = str(tmp_path)
  loop.train_and_evaluate(config, workdir)
  saved, _ = restore_params(workdir, config)
  config.parallelism = "jit"
  restored, _ = restore_params(workdir, config)
  chex.assert_trees_all_equal(restored.params, saved.params)
  assert int(restored.step) == 2

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  command = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}",
             f"--config.data_dir={config.data_dir}", "--config.parallelism=jit",
             f"--config.model={config.model}", "--config.batch_size=32",
             "--config.num_train_steps=4", "--config.schedule=constant",
             f"--config.learning_rate={config.learning_rate}",  # the run's, not digits.py's
             f"--config.warmup_epochs={config.warmup_epochs}",
             f"--config.weight_decay={config.weight_decay}",
             "--config.log_every_steps=2", "--config.progress_bar=False"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from the checkpoint at step 2" in result.stdout
  assert "Final eval" in result.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    startup_record = [r for r in map(json.loads, f) if "startup/malloc_top_pad_mib" in r][-1]
  # train.py restarted itself with glibc malloc's tunables (huge pages where they help).
  tunables = (malloc_tuning.tunables_to_request(env.get("GLIBC_TUNABLES"),
                                                malloc_tuning.thp_mode())
              if malloc_tuning.on_glibc_linux() else None)
  restarted = tunables is not None
  assert startup_record["startup/malloc_top_pad_mib"] == (64.0 if restarted else 0.0)
  assert startup_record["startup/malloc_huge_pages"] == float(
      restarted and "glibc.malloc.hugetlb=1" in tunables)
  for name in ("metrics.jsonl", "curves.png", "tensorboard", "checkpoints/4"):
    assert os.path.exists(os.path.join(workdir, name)), name


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_finds_one_bad_element_in_any_leaf_and_passes_huge_finite_ones(bad):
  tree = {"a": jnp.full((3, 4), 3e38, jnp.float32), "b": [jnp.ones(5, jnp.bfloat16),
                                                         -jnp.full((2,), 1e38)]}
  check = jax.jit(steps.all_finite)
  assert bool(check(tree))  # |x| near float32's max: a sum of squares would overflow
  leaves, treedef = jax.tree.flatten(tree)
  for i, leaf in enumerate(leaves):
    poisoned = [*leaves[:i], leaf.ravel().at[-1].set(bad).reshape(leaf.shape), *leaves[i + 1:]]
    assert not bool(check(jax.tree.unflatten(treedef, poisoned))), i
  assert bool(check({}))


def test_float16_loss_scaling_skips_a_step_with_non_finite_gradients():
  model = create_model("resnet20", dtype=jnp.float16, in_channels=1, width=4,
                       stage_sizes=(1, 1, 1))
  tx = optax.sgd(0.1)
  state = create_train_state(jax.random.PRNGKey(0), model, tx, (8, 8, 1), loss_scale=2.0**10)
  step = jax.jit(lambda s, b: steps.train_step(s, b, learning_rate_fn=lambda _: 0.1))
  batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.arange(4)}

  finite_state, finite_metrics = step(state, batch)
  assert float(finite_metrics["skipped_step"]) == 0.0
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, finite_state.params, state.params))

  poisoned = {"image": batch["image"].at[0, 0, 0, 0].set(jnp.inf), "label": batch["label"]}
  skipped_state, metrics = step(state, poisoned)
  assert float(metrics["skipped_step"]) == 1.0
  chex.assert_trees_all_equal(skipped_state.params, state.params)
  chex.assert_trees_all_equal(skipped_state.opt_state, state.opt_state)
  assert int(skipped_state.step) == 1
  assert float(skipped_state.loss_scale.scale) == 2.0**9


def test_gradient_accumulation_of_k_micro_batches_equals_one_k_times_larger_batch():
  # GroupNorm normalises each example alone, so the mean gradient does not depend on batching.
  model = create_model("resnet20", norm="group", num_classes=10, width=4,
                       stage_sizes=(1, 1, 1))
  images = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  labels = jnp.arange(16) % 10
  schedule = optax.constant_schedule(0.1)

  def train(tx, micro_batches):
    state = create_train_state(jax.random.PRNGKey(0), model, tx, (8, 8, 3))
    step = jax.jit(lambda s, b: steps.train_step(s, b, learning_rate_fn=schedule))
    for i in range(micro_batches):
      size = 16 // micro_batches
      state, _ = step(state, {"image": images[i * size:(i + 1) * size],
                              "label": labels[i * size:(i + 1) * size]})
    return state.params

  one_batch = train(optax.sgd(0.1, momentum=0.9), 1)
  accumulated = train(optax.MultiSteps(optax.sgd(0.1, momentum=0.9), 4).gradient_transformation(),
                      4)
  chex.assert_trees_all_close(accumulated, one_batch, rtol=1e-4, atol=1e-5)


def test_label_smoothing_spreads_mass_uniformly_over_classes():
  logits = jnp.array([[2.0, 0.5, -1.0, 0.0]])
  log_probs = jax.nn.log_softmax(logits)
  expected = -(0.9 + 0.1 / 4) * log_probs[0, 1] - (0.1 / 4) * (
      log_probs[0, 0] + log_probs[0, 2] + log_probs[0, 3])
  np.testing.assert_allclose(steps.cross_entropy(logits, jnp.array([1]), 0.1)[0], expected,
                             rtol=1e-6)
  np.testing.assert_allclose(steps.cross_entropy(logits, jnp.array([1]), 0.0)[0],
                             -log_probs[0, 1], rtol=1e-6)


def test_eval_with_a_ragged_last_batch_counts_every_example_once(config):
  config.eval_batch_size = 64  # 360 test images: 5 full batches and one of 40
  exp = loop.setup(config)
  state = exp.data_parallel.put_state(exp.initial_state)
  metrics = loop.evaluate(exp, state)

  batches = list(data.eval_batches("digits", global_batch_size=400, image_size=8,
                                   data_dir=config.data_dir))
  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  assert len(labels) == 360
  images = device_ops.normalize(images, exp.dataset.mean, exp.dataset.std)
  logits = exp.model.apply(exp.initial_state.variables, images)
  np.testing.assert_allclose(metrics["eval/accuracy"],
                             np.mean(np.argmax(logits, -1) == labels), rtol=1e-6)
  np.testing.assert_allclose(metrics["eval/loss"],
                             np.mean(steps.cross_entropy(logits, labels)), rtol=1e-4)


def test_eval_step_ignores_masked_padding():
  model = create_model("resnet20", in_channels=1)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (8, 8, 1))
  batch = {"image": jax.random.normal(jax.random.key(0), (4, 8, 8, 1)),
           "label": jnp.array([1, 2, 3, 4]), "mask": jnp.array([1.0, 1.0, 0.0, 0.0])}
  sums = steps.eval_step(state, batch)
  real = steps.eval_step(state, jax.tree.map(lambda x: x[:2], batch))
  chex.assert_trees_all_close(sums, real, rtol=1e-6)
  assert float(sums["count"]) == 2.0


def test_ema_params_follow_params_with_the_configured_decay():
  model = create_model("resnet20", in_channels=1, width=4, stage_sizes=(1, 1, 1))
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (8, 8, 1),
                             use_ema=True)
  batch = {"image": jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), "label": jnp.arange(4)}
  new_state, _ = jax.jit(lambda s, b: steps.train_step(
      s, b, learning_rate_fn=lambda _: 0.1, ema_decay=0.75))(state, batch)
  expected = jax.tree.map(lambda p0, p1: 0.75 * p0 + 0.25 * p1, state.params, new_state.params)
  chex.assert_trees_all_close(new_state.ema_params, expected, rtol=1e-5, atol=1e-7)
  assert new_state.eval_variables["params"] is new_state.ema_params


def test_checkpoints_keep_the_latest_k_plus_the_best(tmp_path):
  manager = checkpointing.make_checkpoint_manager(str(tmp_path), 2, "eval/accuracy")
  state = create_train_state(jax.random.PRNGKey(0), create_model("resnet20", in_channels=1),
                             optax.sgd(0.1), (8, 8, 1))
  for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.65)]:
    checkpointing.save(manager, state.replace(step=jnp.asarray(step)), {"next_batch": step}, {},
                       metrics={"eval/accuracy": accuracy})
    manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]
  manager.close()


def _tiny_checkpoints(tmp_path, steps, num_classes=10):
  manager = checkpointing.make_checkpoint_manager(str(tmp_path), 5, "eval/accuracy")
  model = create_model("resnet20", width=4, stage_sizes=(1, 1, 1), num_classes=num_classes)
  state = create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (8, 8, 3))
  for step in steps:
    checkpointing.save(manager, state.replace(step=jnp.asarray(step)), {"next_batch": step}, {})
  manager.wait_until_finished()
  return manager, state


def _damage(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path,
                                                                                   caplog):
  manager, state = _tiny_checkpoints(tmp_path, (2, 4))
  _damage(tmp_path / "checkpoints" / "4")
  restored, position = checkpointing.restore_latest(manager, state)
  assert int(restored.step) == 2 and position == {"next_batch": 2}
  assert "checkpoints/4 is damaged" in caplog.text
  assert os.listdir(tmp_path / "checkpoints_damaged") == ["4"]  # moved, not deleted
  assert manager.all_steps() == [2]
  _damage(tmp_path / "checkpoints" / "2")
  with pytest.raises(checkpointing.CheckpointError, match="No readable checkpoint"):
    checkpointing.restore_latest(manager, state)
  assert sorted(os.listdir(tmp_path / "checkpoints_damaged")) == ["2", "4"]
  manager.close()


def test_a_checkpoint_of_another_model_is_an_error_naming_both_not_a_fallback(tmp_path):
  manager, _ = _tiny_checkpoints(tmp_path, (2,), num_classes=10)
  _, five_classes = _tiny_checkpoints(tmp_path / "other", (), num_classes=5)
  with pytest.raises(ValueError, match=r"checkpoints/2 does not fit this config: .*fc/kernel"):
    checkpointing.restore_latest(manager, five_classes)
  assert manager.all_steps() == [2]
  manager.close()


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 12, "batch_size=12 is not divisible by the 8 devices"),
    ("image_size", 2, "image_size=2 is too small for resnet8"),
    ("cutout_size", 9, "cutout_size=9 is larger than the 8-pixel images"),
    ("cutout_size", -1, "cutout_size=-1: must be >= 0"),
    ("dataset", "digts", "Did you mean 'digits'"),
    ("optimizer", "adam", "optimizer='adam': must be one of"),
])
def test_bad_config_fails_in_setup_with_one_clear_line(config, key, value, message):
  config[key] = value
  with pytest.raises(ValueError, match=message):
    loop.setup(config)


def test_unknown_config_key_is_named():
  config = base_config()
  config.unlock()
  config.batchsize = 3
  with pytest.raises(ValueError, match="batchsize"):
    validate_config(config)


@pytest.mark.parametrize("config_file", [(), ("--config=configs/cifar10_folder.py",)],
                         ids=["default config", "explicit --config"])
def test_train_py_rejects_an_unknown_key_before_compiling(tmp_path, config_file):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}", *config_file,
       "--config.learning_rat=0.1"], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode != 0
  assert "error: unknown config key in the command line: 'learning_rat'" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_replicated_state_round_trips_through_pmap_layout(config):
  config.parallelism = "pmap"
  exp = loop.setup(config)
  dp = exp.data_parallel
  round_trip = dp.get_state(dp.put_state(exp.initial_state))
  chex.assert_trees_all_equal(round_trip.params, exp.initial_state.params)
  assert isinstance(ocp.utils.to_shape_dtype_struct(round_trip.step), jax.ShapeDtypeStruct)


def test_batch_not_divisible_by_devices_message_names_the_count():
  with pytest.raises(ValueError, match="choose a multiple of 8"):
    parallel.check_batch_divisible(20)


def test_resume_warns_and_keeps_the_example_count_when_the_data_stream_changed(config, caplog):
  exp = loop.setup(config)
  saved = loop.data_position(exp, 10)
  assert loop.resume_batch(exp, saved, 10) == 10
  assert saved["dataset_version"].startswith("sklearn_digits/")
  changed = {**saved, "dataset_version": "sklearn_digits/0.9.0", "global_batch_size": 16}
  assert loop.resume_batch(exp, changed, 10) == 5  # 160 examples at the new batch of 32
  assert "dataset_version: 'sklearn_digits/0.9.0'" in caplog.text

