"""Fine-tuning and linear probes: weights from any checkpoint, new heads, frozen parts, probes."""

import functools
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import create_model, linear_probe, pretrained
from resnet_jax.training import loop, optimizers
from resnet_jax.training.config import base_config, validate_config
from short_run import digit_folder, short_digits_config, short_folder_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_head(variables):
  return {kind: {name: v for name, v in tree.items() if name != "fc"}
          for kind, tree in variables.items()}


def test_a_checkpoint_records_its_model_and_loads_from_workdir_or_step(trained_folder_run):
  workdir, _, _ = trained_folder_run
  weights = pretrained.load(workdir)
  assert os.fspath(weights.path) == os.path.join(workdir, "checkpoints", "4")
  assert weights.info.model == "resnet8" and weights.info.num_classes == 5
  assert weights.info.class_names == tuple(f"digit_{d}" for d in range(5))
  assert weights.info.in_channels == 3 and weights.info.image_size == 8  # folders are RGB
  same = pretrained.load(weights.path)
  chex.assert_trees_all_equal(weights.variables, same.variables)


def test_saved_weights_round_trip_and_training_starts_from_them(tmp_path, trained_folder_run):
  workdir, data_dir, root = trained_folder_run
  weights = pretrained.load(workdir)
  out = str(tmp_path / "weights")  # the layout resnet_jax.convert writes
  pretrained.save(out, weights.variables, weights.info)
  loaded = pretrained.load(out)
  chex.assert_trees_all_equal(loaded.variables, weights.variables)
  assert loaded.info == weights.info
  with pytest.raises(ValueError, match="already exists"):
    pretrained.save(out, weights.variables, weights.info)
  config = short_folder_config(os.path.join(root, "source"), data_dir)
  config.init_from = out
  start = jax.device_get(loop.setup(config).initial_state.variables)
  chex.assert_trees_all_equal(start, weights.variables)


def test_weights_that_do_not_fit_their_model_are_not_saved(tmp_path, trained_folder_run):
  weights = pretrained.load(trained_folder_run[0])
  wrong = pretrained.ModelInfo(model="resnet32", num_classes=5)
  with pytest.raises(ValueError, match=r"do not fit resnet32(.|\n)*missing params/layer1_3"):
    pretrained.save(str(tmp_path / "w"), weights.variables, wrong)


def test_load_names_what_is_missing(tmp_path):
  with pytest.raises(ValueError, match="no such directory"):
    pretrained.load(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="holds no checkpoint"):
    pretrained.load(str(tmp_path))


def test_fine_tuning_starts_from_the_weights_with_a_new_head(trained_folder_run, capsys):
  """The miniature transfer experiment: digits 0-4 → a new head for digits 5-9."""
  workdir, data_dir, root = trained_folder_run
  target = digit_folder(os.path.join(root, "target"), range(5, 10), per_class=16,
                        val_per_class=8)
  config = short_folder_config(target, data_dir)
  config.init_from, config.replace_head = workdir, True
  config.backbone_learning_rate_scale = 0.1
  config.linear_probe_dataset, config.linear_probe_shots = f"folder:{target}", (1, 3)
  exp = loop.setup(config)
  source = pretrained.load(workdir).variables
  start = jax.device_get(exp.initial_state.variables)
  chex.assert_trees_all_equal(without_head(start), without_head(source))
  assert not np.array_equal(start["params"]["fc"]["kernel"], source["params"]["fc"]["kernel"])

  metrics = loop.train_and_evaluate(config, os.path.join(root, "finetune"))
  assert np.isfinite(metrics["eval/loss"])
  said = re.search(r"^Starting resnet8 on folder:\S+ from the resnet8 weights in \S+ \(5 classes "
                   r"of folder:\S+; (\d+) arrays loaded\), fc replaced by a new 5-class head, "
                   r"backbone at 0\.1× the learning rate, in ", capsys.readouterr().out, re.M)
  assert said and int(said.group(1)) == len(jax.tree.leaves(source))
  with open(os.path.join(root, "finetune", "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "eval/loss" in r][-1]
  assert {"probe/1shot_accuracy", "probe/3shot_accuracy"} <= set(logged)
  assert "eval/top5_accuracy" not in logged  # 5 classes: top-5 would always be 100%
  tuned = pretrained.load(os.path.join(root, "finetune"))
  assert tuned.info.class_names == tuple(f"digit_{d}" for d in range(5, 10))
  probe = linear_probe.probe(tuned.info.create_model(), tuned.variables,
                             exp.dataset, image_size=8, shots=(1, 5), num_seeds=2)
  assert set(probe) == {"probe/1shot_accuracy", "probe/5shot_accuracy"}
  assert all(0 <= v <= 1 for v in probe.values())


def test_init_from_another_architecture_names_both(trained_folder_run, digits_data_dir):
  config = short_digits_config(digits_data_dir)
  workdir = trained_folder_run[0]
  config.model, config.init_from = "resnet32", workdir
  with pytest.raises(ValueError, match="holds resnet8 weights but config.model='resnet32'"):
    loop.setup(config)


def test_a_head_of_another_class_count_needs_replace_head(trained_folder_run, digits_data_dir):
  config = short_digits_config(digits_data_dir)  # 10 classes; the checkpoint has 5
  workdir = trained_folder_run[0]
  config.init_from = workdir
  with pytest.raises(ValueError, match="has 5 classes but this run has 10; set "
                                       "config.replace_head=True"):
    loop.setup(config)


def test_replace_head_without_init_from_is_a_config_error():
  config = base_config()
  config.replace_head = True
  with pytest.raises(ValueError, match="config.replace_head=True: needs config.init_from"):
    validate_config(config)


def test_merge_lists_every_variable_that_does_not_fit():
  template = pretrained.variable_shapes(create_model("resnet20", num_classes=10))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  loaded = jax.tree.map(np.copy, template)
  del loaded["params"]["layer1_0"]["conv1"]
  loaded["params"]["conv1"]["kernel"] = np.zeros((3, 3, 1, 16), np.float32)
  loaded["params"]["extra"] = {"kernel": np.zeros(2, np.float32)}
  with pytest.raises(ValueError) as error:
    pretrained.merge(template, loaded, replace_head=False, source="ckpt")
  message = str(error.value)
  for part in ("missing params/layer1_0/conv1/kernel", "unexpected params/extra/kernel",
               "mis-shaped params/conv1/kernel: expected (3, 3, 3, 16), got (3, 3, 1, 16)"):
    assert part in message


def sgd_step_updates(**overrides):
  """One plain-SGD update of a small ResNet's params, with the fine-tuning options given."""
  c = base_config()
  c.momentum, c.weight_decay = 0.0, 0.0
  c.update(overrides)
  model = create_model("resnet20", stage_sizes=(1, 1, 1), width=4, num_classes=3)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  tx = optimizers.create_optimizer(c, optax.constant_schedule(0.1))

  @jax.jit
  def update(params):
    grads = jax.tree.map(jnp.ones_like, params)
    return tx.update(grads, tx.init(params), params)[0]

  return update(params)


def test_freeze_backbone_updates_only_the_head():
  updates = sgd_step_updates(freeze_backbone=True)
  head, backbone = updates.pop("fc"), updates
  chex.assert_trees_all_close(head, jax.tree.map(lambda u: jnp.full_like(u, -0.1), head))
  assert all(not np.any(u) for u in jax.tree.leaves(backbone))


def test_backbone_learning_rate_scale_scales_only_the_backbone():
  full = sgd_step_updates()
  scaled = sgd_step_updates(backbone_learning_rate_scale=0.25)
  chex.assert_trees_all_close(scaled.pop("fc"), full.pop("fc"))
  chex.assert_trees_all_close(scaled, jax.tree.map(lambda u: 0.25 * u, full))


def test_freeze_batch_stats_trains_with_the_running_statistics():
  model = create_model("resnet20", stage_sizes=(1, 1, 1), width=4, freeze_batch_stats=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  variables["batch_stats"] = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
  train_out, updated = jax.jit(functools.partial(model.apply, train=True,
                                                 mutable=["batch_stats"]))(variables, x)
  chex.assert_trees_all_equal(updated["batch_stats"], variables["batch_stats"])
  chex.assert_trees_all_close(train_out, jax.jit(model.apply)(variables, x), atol=1e-6)


def test_ridge_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 5
  labels = np.repeat(np.arange(4), 30)
  features = centres[labels] + rng.normal(size=(120, 16))
  train = linear_probe.Features(features[::2], labels[::2])
  test = linear_probe.Features(features[1::2], labels[1::2])
  accuracies = linear_probe.few_shot_accuracies(train, test, 4, shots=(1, 5, 15))
  assert accuracies[15] == 1.0 and accuracies[5] >= 0.95
  with pytest.raises(ValueError, match=r"smallest class's 15 training examples \(cats\)"):
    linear_probe.few_shot_accuracies(train, test, 4, shots=(16,),
                                     class_names=("cats", "dogs", "owls", "yaks"))


def test_probes_with_more_shots_than_the_smallest_class_are_left_out_with_a_note(caplog):
  rng = np.random.default_rng(0)
  labels = np.array([0] * 3 + [1] * 10)
  train = linear_probe.Features(rng.normal(size=(13, 4)), labels)
  with caplog.at_level("WARNING"):
    accuracies = linear_probe.few_shot_accuracies(train, train, 2, shots=(1, 3, 5, 10),
                                                  class_names=("rare", "common"))
  assert set(accuracies) == {1, 3}
  assert "Leaving out the 5,10-shot probes: the smallest class, rare, has 3" in caplog.text


def test_linear_probe_command_prints_the_few_shot_accuracies(trained_folder_run):
  workdir, data_dir, root = trained_folder_run
  target = digit_folder(os.path.join(root, "probe"), range(5, 10), per_class=6,
                        val_per_class=4)
  result = subprocess.run(
      [sys.executable, "-m", "resnet_jax.linear_probe", "--checkpoint", workdir,
       "--dataset", f"folder:{target}", "--data_dir", data_dir, "--shots", "1,5",
       "--num_seeds", "2"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  accuracies = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(accuracies) == {"probe/1shot_accuracy", "probe/5shot_accuracy"}
  with pytest.raises(SystemExit, match=r"error: shots=\(7,\)"):
    linear_probe.main(["--checkpoint", workdir, "--dataset", f"folder:{target}",
                       "--data_dir", data_dir, "--shots", "7"])
