"""The README's train command, end to end (slow: about a minute; run with `pytest -m slow`)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_reaches_97_percent_and_resumes(tmp_path, digits_data_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
  command = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path}",
             f"--config.data_dir={digits_data_dir}"]
  first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "eval/accuracy" in r]
  assert evals[-1]["eval/accuracy"] >= 0.97
  for name in ("checkpoints", "tensorboard", "curves.png"):
    assert os.path.exists(tmp_path / name)

  second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Training already finished" in second.stdout
