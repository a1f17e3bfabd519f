"""The examples run as a user runs them, and do what their docstrings say."""

import pathlib
import subprocess
import sys

import resnet_jax.training
from resnet_jax import faults

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_custom_loop_example_drives_the_loss_on_its_batch_down():
  result = subprocess.run([sys.executable, "examples/custom_loop.py", "--steps", "20"],
                          cwd=REPO, env=faults.cpu_env(1), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  losses = [float(line.split("loss ")[1]) for line in result.stdout.splitlines()
            if line.startswith("step ")]
  assert len(losses) == 3 and losses[-1] < losses[0] / 2, result.stdout


def test_the_library_api_names_load_and_unknown_ones_fail():
  assert all(getattr(resnet_jax.training, name) for name in resnet_jax.training.__all__)
  try:
    resnet_jax.training.no_such_name  # noqa: B018
  except AttributeError as e:
    assert "no_such_name" in str(e)
  else:
    raise AssertionError("an unknown name was found")
