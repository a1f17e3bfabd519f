"""Gradient flow, layer responses, gradient-norm metrics and the H(x) = 0.5x toy."""

import csv
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import create_model
from resnet_jax.analysis import block_gradients, branch_response_stds
from resnet_jax.analysis.__main__ import main as analysis_main
from resnet_jax.training import reporting, steps
from resnet_jax.training.train_state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _tiny_state(**model_fields):
  model = create_model("resnet20", in_channels=1, num_classes=4, width=4, stage_sizes=(1, 1, 1),
                       **model_fields)
  return model, create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (8, 8, 1))


def test_block_gradient_of_a_plain_block_whose_branch_is_zero_vanishes_before_it():
  # A plain net with a zeroed branch output passes nothing on, so nothing upstream gets a
  # gradient; the ResNet's identity path still carries ∂L/∂y back to every block.
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1))
  labels = jnp.arange(8) % 4
  norms = {}
  for shortcut in ("none", "zero_pad"):
    model, state = _tiny_state(shortcut=shortcut, zero_init_residual=True)
    norms[shortcut], _ = block_gradients(model, state.variables, images, labels)
  assert list(norms["none"]) == ["layer1_0", "layer2_0", "layer3_0"]
  assert all(v == 0.0 for v in norms["none"].values())
  assert all(v > 0.0 for v in norms["zero_pad"].values())


def test_branch_responses_are_normalised_at_initialisation_in_training_mode():
  model, state = _tiny_state()
  images = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1))
  stds = branch_response_stds(model, state.variables, images, train=True)
  assert list(stds) == ["layer1_0", "layer2_0", "layer3_0"]
  # After BatchNorm on batch statistics (scale 1, bias 0) each branch has std ≈ 1.
  np.testing.assert_allclose(list(stds.values()), 1.0, atol=1e-2)


def test_gradient_flow_csv_and_a_deep_plain_net_spreads_far_more_than_its_resnet(
    tmp_path, digits_data_dir):
  analysis_main(["gradient-flow", "--models", "plain32,resnet32", "--data_dir", digits_data_dir,
                 "--batch_size", "16", "--out", str(tmp_path)])
  rows = _read_csv(tmp_path / "gradient_flow.csv")
  assert list(rows[0]) == ["model", "block", "depth_index", "input_grad_norm", "param_grad_norm"]
  assert [r["depth_index"] for r in rows if r["model"] == "plain32 (init)"] == [
      str(i) for i in range(15)]
  assert os.path.getsize(tmp_path / "gradient_flow.png") > 0

  def spread(model):
    norms = [float(r["input_grad_norm"]) for r in rows if r["model"] == model]
    return max(norms) / min(norms)

  # Measured on the 8×8 digits, batch 16, seeds 0-2: plain32 86-116×, resnet32 10.7-13.4×
  # (ratio 6.4-9×). With BatchNorm the plain net's gradient explodes towards the input.
  assert spread("plain32 (init)") > 3 * spread("resnet32 (init)")


def test_layer_responses_of_a_trained_checkpoint_and_a_model_at_init(tmp_path,
                                                                    trained_folder_run):
  workdir, data_dir, root = trained_folder_run
  analysis_main(["layer-responses", "--checkpoint", workdir, "--models", "plain20",
                 "--dataset", f"folder:{root}/source", "--data_dir", data_dir,
                 "--batch_size", "16", "--out", str(tmp_path)])
  rows = _read_csv(tmp_path / "layer_responses.csv")
  assert list(rows[0]) == ["model", "block", "depth_index", "response_std"]
  assert {r["model"] for r in rows} == {"plain20 (init)", "resnet8 (trained, step 4)"}
  assert len(rows) == 9 + 3 and all(float(r["response_std"]) > 0 for r in rows)
  assert os.path.getsize(tmp_path / "layer_responses.png") > 0


def test_a_missing_checkpoint_is_one_error_line(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    analysis_main(["layer-responses", "--checkpoint", str(tmp_path / "nothing"),
                   "--out", str(tmp_path)])
  assert str(exit_info.value).startswith("error: ")


def test_grad_norm_metrics_split_the_total_by_stage():
  _, state = _tiny_state()
  batch = {"image": jnp.ones((4, 8, 8, 1), jnp.uint8), "label": jnp.arange(4)}
  _, metrics = jax.jit(lambda s, b: steps.train_step(
      s, b, learning_rate_fn=lambda _: 0.1, log_grad_norms=True))(state, batch)
  groups = ("stem", "stage1", "stage2", "stage3", "head")
  assert sorted(k for k in metrics if k.startswith("grad_norm/")) == sorted(
      [f"grad_norm/{g}" for g in groups] + ["grad_norm/total"])
  squares = sum(float(metrics[f"grad_norm/{g}"]) ** 2 for g in groups)
  np.testing.assert_allclose(np.sqrt(squares), float(metrics["grad_norm/total"]), rtol=1e-5)


def test_grad_norm_metrics_cost_nothing_when_off():
  _, state = _tiny_state()
  batch = {"image": jnp.ones((4, 8, 8, 1), jnp.uint8), "label": jnp.arange(4)}

  def program(**flags):
    return jax.make_jaxpr(lambda s, b: steps.train_step(
        s, b, learning_rate_fn=lambda _: 0.1, **flags))(state, batch)

  off, on = program(log_grad_norms=False), program(log_grad_norms=True)
  assert str(off) == str(program())  # the same traced program as before the option existed
  assert len(on.eqns) > len(off.eqns)


def test_grad_norms_are_logged_to_metrics_jsonl_when_enabled(trained_folder_run):
  records = reporting.read_metrics(os.path.join(trained_folder_run[0], "metrics.jsonl"))
  train = [r for r in records if "train/loss" in r]
  for key in ("stem", "stage1", "stage2", "stage3", "head", "total"):
    assert all(np.isfinite(r[f"train/grad_norm/{key}"]) and r[f"train/grad_norm/{key}"] > 0
               for r in train), key


def test_half_identity_toy_learns_and_the_skip_wins_only_near_the_identity(capsys):
  toy = runpy.run_path(os.path.join(REPO, "examples", "half_identity.py"))
  results = toy["main"](["--scales", "0,1", "--steps", "300", "--seeds", "1"])
  print_out = capsys.readouterr().out
  assert "| 1 | residual |" in print_out
  # Measured (5 seeds, step 500): at s = 1 residual 3.1e-2 vs plain 9.8e-2, at s = 0 the reverse.
  assert results["s=1, residual: x + F(x)"]["final_mse"] < results["s=1, plain: F(x)"]["final_mse"]
  assert results["s=0, plain: F(x)"]["final_mse"] < results["s=0, residual: x + F(x)"]["final_mse"]
