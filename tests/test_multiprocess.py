"""Two processes × 4 CPU devices (jax.distributed + gloo): the multi-host code paths."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("parallelism", ["jit", "pmap"])
def test_two_processes_train_on_one_global_batch_and_agree(parallelism, tmp_path,
                                                           digits_data_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = free_port()
  workers = [subprocess.Popen(
      [sys.executable, WORKER, str(i), str(port), parallelism, str(tmp_path), digits_data_dir],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  results = [json.loads(line.removeprefix("RESULT "))
             for stdout, _ in outputs for line in stdout.splitlines()
             if line.startswith("RESULT ")]
  assert len(results) == 2 and results[0] == results[1]  # every process sees the global eval
  assert results[0]["devices"] == 8
  # Only process 0 writes metrics: each logged step appears once.
  with open(tmp_path / "metrics.jsonl") as f:
    train_steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert train_steps == [2, 4]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
