"""Two processes × 4 CPU devices (jax.distributed + gloo): the multi-host code paths."""

import json
import os
import socket
import subprocess
import sys

from resnet_jax.training import loop
from short_run import short_digits_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(parallelism: str, workdir, data_dir: str) -> tuple[list[dict], str]:
  """4 steps of the short digits run (checkpoints every 2) by two worker processes: their
  results, and what process 0 printed."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = free_port()
  workers = [subprocess.Popen(
      [sys.executable, WORKER, str(i), str(port), parallelism, str(workdir), data_dir],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  results = [json.loads(line.removeprefix("RESULT "))
             for stdout, _ in outputs for line in stdout.splitlines()
             if line.startswith("RESULT ")]
  return results, outputs[0][0]


def logged_train_steps(workdir) -> list[int]:
  with open(workdir / "metrics.jsonl") as f:
    return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def short_config(data_dir: str, num_train_steps: int):
  config = short_digits_config(data_dir)
  config.checkpoint_every_steps, config.num_train_steps = 2, num_train_steps
  return config


def test_two_processes_agree_and_one_process_resumes_their_checkpoint(tmp_path, digits_data_dir,
                                                                      capsys):
  results, _ = run_two_processes("jit", tmp_path, digits_data_dir)
  assert len(results) == 2 and results[0] == results[1]  # every process sees the global eval
  assert results[0]["devices"] == 8
  assert logged_train_steps(tmp_path) == [2, 4]  # only process 0 writes metrics
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]

  loop.train_and_evaluate(short_config(digits_data_dir, 6), str(tmp_path))  # one process
  assert "Resuming from the checkpoint at step 4" in capsys.readouterr().out
  assert logged_train_steps(tmp_path) == [2, 4, 6]
  assert "6" in os.listdir(tmp_path / "checkpoints")


def test_two_processes_under_pmap_resume_a_checkpoint_of_one_process(tmp_path, digits_data_dir):
  loop.train_and_evaluate(short_config(digits_data_dir, 2), str(tmp_path))  # one process, 2 steps
  results, printed = run_two_processes("pmap", tmp_path, digits_data_dir)  # 2 more steps
  assert "Resuming from the checkpoint at step 2" in printed
  assert len(results) == 2 and results[0] == results[1]
  assert logged_train_steps(tmp_path) == [2, 4]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
