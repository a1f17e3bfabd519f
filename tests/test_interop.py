"""Specification of torchvision interop: logits equal torchvision's, round trips are exact,
bad state dicts are explained key by key, and `python -m resnet_jax.convert` works end to end.

Parity runs without torch against tests/fixtures/torchvision_logits.npz, and also against
the live torchvision models wherever torch and torchvision are installed.
"""

try:  # torch, where installed, must be imported before TensorFlow (imported by resnet_jax).
  import torch
except ImportError:
  torch = None

import functools
import os
import re
import subprocess
import sys

import chex
import numpy as np
import pytest
import safetensors.numpy

from resnet_jax import convert, pretrained
from resnet_jax.interop import (TORCHVISION_MODELS, StateDictMismatch, from_state_dict,
                                to_state_dict)
from resnet_jax.models import create_model
from torchvision_weights import (
    fingerprint, random_images, random_state_dict, torchvision_logits)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision_logits.npz")
RELATIVE_TOLERANCE = 1e-5  # of the largest |logit|
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


@functools.cache
def our_logits(name: str) -> tuple[np.ndarray, str]:
  """Our eval-mode float32 logits for `name`'s random weights, and the weights' fingerprint.

  Cached: the fixture and the live test compare the same logits. Run op by op, not jitted:
  compiling whole deep nets would take most of this file's time on two cores.
  """
  state_dict, images = random_state_dict(name), random_images()
  variables = from_state_dict(name, state_dict)
  logits = create_model(name, num_classes=state_dict["fc.bias"].size).apply(variables, images)
  return np.asarray(logits), fingerprint(state_dict, images)


def max_relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_logits_equal_torchvision_fixture(name, record_property):
  fixture = np.load(FIXTURE)
  logits, weights_fingerprint = our_logits(name)
  if weights_fingerprint != str(fixture[f"{name}/fingerprint"]):
    pytest.fail(f"Fixture drift, not a parity failure: the random weights or images of {name} "
                f"differ from those the fixture was made with ({fixture['versions']}); "
                "regenerate it with python tests/fixtures/make_torchvision_logits.py")
  error = max_relative_error(logits, fixture[f"{name}/logits"])
  record_property("max_relative_error", error)
  assert error <= RELATIVE_TOLERANCE


@needs_torch
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_logits_equal_live_torchvision(name, record_property):
  pytest.importorskip("torchvision")
  reference = torchvision_logits(name, random_state_dict(name), random_images())
  error = max_relative_error(our_logits(name)[0], reference)
  record_property("max_relative_error", error)
  assert error <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_state_dict_round_trip_is_exact(name):
  state_dict = random_state_dict(name)
  chex.assert_trees_all_equal(to_state_dict(name, from_state_dict(name, state_dict)),
                              state_dict, strict=True)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_variables_round_trip_is_exact(name):
  variables = from_state_dict(name, random_state_dict(name))
  chex.assert_trees_all_equal(from_state_dict(name, to_state_dict(name, variables)),
                              variables, strict=True)


def test_variables_have_the_models_structure_and_class_count():
  variables = from_state_dict("resnet18", random_state_dict("resnet18", num_classes=7))
  expected = pretrained.variable_shapes(create_model("resnet18", num_classes=7))
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, expected)


def test_num_batches_tracked_is_ignored_and_written_as_zero():
  state_dict = random_state_dict("resnet18")
  counted = {k: np.int64(7) if k.endswith("num_batches_tracked") else v
             for k, v in state_dict.items()}
  without = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  variables = from_state_dict("resnet18", counted)
  chex.assert_trees_all_equal(from_state_dict("resnet18", without), variables)
  assert to_state_dict("resnet18", variables)["layer1.0.bn1.num_batches_tracked"] == 0


def test_ddp_module_prefix_is_stripped():
  state_dict = random_state_dict("resnet18")
  chex.assert_trees_all_equal(
      from_state_dict("resnet18", {f"module.{k}": v for k, v in state_dict.items()}),
      from_state_dict("resnet18", state_dict))


def test_mismatched_state_dict_lists_every_bad_key_in_torchvision_names():
  state_dict = random_state_dict("resnet18")
  del state_dict["layer1.0.conv1.weight"]
  state_dict["layer5.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
  state_dict["layer2.0.downsample.1.weight"] = np.zeros(3, np.float32)
  expected = "3 keys missing, unexpected or mis-shaped; its keys and shapes match no torchvision"
  with pytest.raises(StateDictMismatch, match=expected) as error:
    from_state_dict("resnet18", state_dict)
  message = "\n".join(error.value.problems)
  assert "missing layer1.0.conv1.weight (64, 64, 3, 3)" in message
  assert "unexpected layer5.0.conv1.weight (3, 3, 3, 3)" in message
  assert "mis-shaped layer2.0.downsample.1.weight: expected (128,), got (3,)" in message


def test_unknown_model_name_gets_close_matches():
  with pytest.raises(ValueError, match="Did you mean.*resnet50"):
    from_state_dict("resnet05", {})


def test_to_state_dict_lists_variables_that_do_not_fit():
  variables = from_state_dict("resnet18", random_state_dict("resnet18"))
  with pytest.raises(ValueError, match="missing params/layer1_2/conv1/kernel"):
    to_state_dict("resnet34", variables)


@needs_torch
def test_torch_tensors_are_read_and_half_precision_upcast():
  state_dict = random_state_dict("resnet18")
  tensors = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32
             else torch.from_numpy(v) for k, v in state_dict.items()}
  rounded = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
             for k, v in tensors.items()}
  chex.assert_trees_all_equal(from_state_dict("resnet18", tensors),
                              from_state_dict("resnet18", rounded), strict=True)


def run_convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "resnet_jax.convert", *args],
                        capture_output=True, text=True, timeout=300)


def test_convert_safetensors_then_load_gives_same_variables_and_info(tmp_path):
  state_dict = random_state_dict("resnet18")
  weights, out = str(tmp_path / "resnet18.safetensors"), str(tmp_path / "converted")
  safetensors.numpy.save_file(state_dict, weights)
  names = [f"digit {i}" for i in range(10)]
  (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
  result = run_convert("--from_torchvision", "resnet18", "--weights", weights, "--out", out,
                       "--class_names", str(tmp_path / "classes.txt"))
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Converted resnet18 (10 classes, 10 class names)")
  loaded = pretrained.load(out)
  chex.assert_trees_all_equal(loaded.variables, from_state_dict("resnet18", state_dict),
                              strict=True)
  assert loaded.info == pretrained.ModelInfo(
      model="resnet18", num_classes=10, image_size=224, preprocessing="imagenet",
      class_names=tuple(names), source=weights)


def test_convert_bad_input_prints_one_error_line_and_exits_2(tmp_path):
  (tmp_path / "corrupt.safetensors").write_bytes(b"not safetensors")
  result = run_convert("--from_torchvision", "resnet18", "--weights",
                       str(tmp_path / "corrupt.safetensors"), "--out", str(tmp_path / "out"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: could not read") and "Traceback" not in result.stderr
  assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.fixture(scope="module")
def resnet18_safetensors(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
  safetensors.numpy.save_file(random_state_dict("resnet18"), path)
  return path


@pytest.mark.parametrize("case,expected", [
    ("missing_file", "no such file"),
    ("unknown_extension", "unknown extension '.bin'"),
    ("corrupt_file", "could not read"),
    ("wrong_model", "does not fit torchvision's resnet34 with 10 classes: "),
    ("unknown_model", "Did you mean resnet18"),
    ("existing_out", "already exists"),
    ("class_name_count", "names 2 classes but the weights have 10"),
])
def test_convert_bad_input_is_an_error_line_with_exit_code_2(
    case, expected, resnet18_safetensors, tmp_path, capsys):
  (tmp_path / "weights.bin").write_bytes(b"")
  (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
  (tmp_path / "existing").mkdir()
  (tmp_path / "classes.txt").write_text("cat\ndog\n")
  args = {"--from_torchvision": "resnet18", "--weights": resnet18_safetensors,
          "--out": str(tmp_path / "out")}
  args.update({
      "missing_file": {"--weights": str(tmp_path / "absent.safetensors")},
      "unknown_extension": {"--weights": str(tmp_path / "weights.bin")},
      "corrupt_file": {"--weights": str(tmp_path / "corrupt.safetensors")},
      "wrong_model": {"--from_torchvision": "resnet34"},
      "unknown_model": {"--from_torchvision": "resnet1B"},
      "existing_out": {"--out": str(tmp_path / "existing")},
      "class_name_count": {"--class_names": str(tmp_path / "classes.txt")},
  }[case])
  with pytest.raises(SystemExit) as exit_info:
    convert.main([item for pair in args.items() for item in pair])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.startswith("error: ") and expected in error, error
  assert len(error.strip().splitlines()) == 1, error


def test_a_state_dict_of_another_model_names_it_and_lists_details_with_verbose(
    resnet18_safetensors, tmp_path, capsys):
  args = ["--from_torchvision", "resnet50", "--weights", resnet18_safetensors,
          "--out", str(tmp_path / "out")]
  for verbose in (False, True):
    with pytest.raises(SystemExit):
      convert.main(args + ["--verbose"] * verbose)
    error = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"error: The state dict does not fit torchvision's resnet50 with 10 "
                    r"classes: \d+ keys missing, unexpected or mis-shaped; its keys and shapes "
                    r"are those of resnet18 \(--verbose lists them\)$" if not verbose else
                    r"error: .* are those of resnet18$", error[0]), error[0]
    assert (len(error) > 10) == verbose
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(torch is not None, reason="torch is installed")
def test_convert_pth_without_torch_says_to_install_it_or_use_safetensors(tmp_path, capsys):
  (tmp_path / "resnet18.pth").write_bytes(b"")
  with pytest.raises(SystemExit):
    convert.main(["--from_torchvision", "resnet18", "--weights", str(tmp_path / "resnet18.pth"),
                  "--out", str(tmp_path / "out")])
  error = capsys.readouterr().err
  assert "pip install torch" in error and ".safetensors" in error


@needs_torch
def test_convert_pth_checkpoint_names_imagenet_classes(tmp_path):
  pytest.importorskip("torchvision")
  state_dict = random_state_dict("resnet18", num_classes=1000)
  weights, out = str(tmp_path / "checkpoint.pth"), str(tmp_path / "converted")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state_dict.items()},
              "epoch": 90}, weights)
  convert.main(["--from_torchvision", "resnet18", "--weights", weights, "--out", out])
  loaded = pretrained.load(out)
  chex.assert_trees_all_equal(loaded.variables, from_state_dict("resnet18", state_dict))
  assert len(loaded.info.class_names) == 1000 and loaded.info.class_names[0] == "tench"


@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_cifar_nets_round_trip_through_state_dicts(name):
  import jax
  model = create_model(name)
  variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
  state_dict = to_state_dict(name, variables)
  assert "layer2.0.conv1.weight" in state_dict and not any("downsample" in k for k in state_dict)
  chex.assert_trees_all_equal(from_state_dict(name, state_dict), variables)


@needs_torch
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
@pytest.mark.parametrize("train", [False, True])
def test_cifar_nets_compute_what_the_papers_pytorch_nets_compute_from_our_weights(name, train):
  import jax
  from resnet_jax.interop import torch_cifar
  model = create_model(name)
  images = np.random.RandomState(0).randn(8, 32, 32, 3).astype(np.float32)
  variables = model.init(jax.random.key(1), images[:1])
  if train:  # batch statistics; the running ones updated with momentum 0.9 (torch: 0.1)
    ours, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
  else:
    ours = model.apply(variables, images)
  net = torch_cifar.from_variables(name, jax.device_get(variables)).train(train)
  theirs = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).detach().numpy()
  assert max_relative_error(np.asarray(ours), theirs) <= RELATIVE_TOLERANCE
  if train:
    np.testing.assert_allclose(net.layer3[0].bn1.running_mean.numpy(),
                               updated["batch_stats"]["layer3_0"]["bn1"]["mean"], atol=1e-6)


@needs_torch
def test_torch_cifar_names_a_model_that_is_not_a_cifar_net():
  from resnet_jax.interop import torch_cifar
  with pytest.raises(ValueError, match="resnet50 is not one of the paper's CIFAR nets"):
    torch_cifar.cifar_resnet("resnet50")
