"""Fault injection: each fault against short real `train.py` runs, as a table.

  python -m resnet_jax.faults [--workdir DIR] [--only NAME,...]

Every fault runs the README's train command on the embedded digits, made tiny (ResNet-8,
20 steps of 32 on one CPU device), in a subprocess (for the write failures, a Python one
that patches the write), injects the fault (a signal, a damaged checkpoint, a huge learning
rate, a bad path or value, a folder of broken images, another number of processes) and
checks what a user would see: the exit code, the one error line, the checkpoints left
behind, and, where a run resumes, that its final weights equal an uninterrupted run's bit
for bit. Multi-process runs are 2 train.py processes × 4 CPU devices on this machine
(jax.distributed over localhost, gloo) that continue the 1-process run from its checkpoint
at step 10. The bucket rows put the workdir in a local GCS bucket (`storage.emulator`, on
disk, so that one row can stop and restart it). The runs share compiled programs through
XLA's persistent cache. `tests/test_faults.py` runs the same faults.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from resnet_jax import cli
from resnet_jax.storage import emulator, paths
from resnet_jax.storage.file_lock import file_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")
STEPS, HALF = 20, 10  # of the shared short run: checkpoints every 10, logs every 5
# A constant learning rate makes the compiled step independent of the number of steps.
SHORT_RUN = ("--config.model=resnet8", f"--config.num_train_steps={STEPS}",
             "--config.log_every_steps=5", f"--config.checkpoint_every_steps={HALF}",
             f"--config.eval_every_steps={STEPS}", "--config.batch_size=32",
             "--config.schedule=constant")
# Multi-process steps are slow on 2 cores (gloo), so multi-process runs continue the 1-process
# reference from its checkpoint at step 10 to step 20; they log and check for a stop signal
# every 2 steps. (A SIGTERM reaches JAX's preemption sync point a few steps after it lands:
# the ten steps leave it room on a fast machine.)
MULTIPROCESS_STEPS = 20
MULTIPROCESS_RUN = (f"--config.num_train_steps={MULTIPROCESS_STEPS}", "--config.log_every_steps=2",
                    "--config.checkpoint_every_steps=5")
MULTIPROCESS_CHECKPOINTS = [HALF, 15, MULTIPROCESS_STEPS]  # the 1-process one, then their own
# Train records: the 1-process run's, then process 0's.
MULTIPROCESS_LOGS = [5, HALF, *range(HALF + 2, MULTIPROCESS_STEPS + 1, 2)]
DEVICES_PER_PROCESS = 4  # CPU devices of each process of a multi-process run; 1 for one process


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One row of the table."""

  fault: str
  expected: str
  happened: str
  passed: bool
  seconds: float  # wall time of the row, its share of the shared reference runs included


class Runs:
  """Where the fault runs live, the digits they train on, and the uninterrupted references."""

  def __init__(self, workdir: str, data_dir: str, bucket: emulator.LocalBucket | None = None):
    self.workdir, self.data_dir = workdir, data_dir
    self.bucket = bucket  # for the bucket rows: started, with this process pointed at it
    self._references: dict[int, list[subprocess.CompletedProcess]] = {}  # by processes

  def command(self, workdir: str, *overrides: str, short_run: bool = True) -> list[str]:
    return [sys.executable, TRAIN_PY, f"--workdir={workdir}", f"--config.data_dir={self.data_dir}",
            "--config.progress_bar=False", *(SHORT_RUN if short_run else ()), *overrides]

  def train(self, workdir: str, *overrides: str, short_run: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(self.command(workdir, *overrides, short_run=short_run),
                          env=cpu_env(1), capture_output=True, text=True, timeout=timeout)

  def start(self, workdir: str, *overrides: str, processes: int = 1,
            hosts_dir: str = "") -> list[subprocess.Popen]:
    """The short run (1 CPU device), or with several processes the multi-process run.

    With `hosts_dir`, each process has its own HOME, TMPDIR and (empty) compilation cache
    in hosts_dir/<process>, as on hosts of a pod that share nothing but the bucket.
    """
    if processes == 1:
      return [subprocess.Popen(self.command(workdir, *overrides), env=cpu_env(1),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    cluster = (f"--coordinator_address=127.0.0.1:{emulator.free_port()}",
               f"--num_processes={processes}")
    return [subprocess.Popen(
        self.command(workdir, *MULTIPROCESS_RUN, *cluster, f"--process_id={i}", *overrides),
        env={**cpu_env(DEVICES_PER_PROCESS),
             **(own_local_state(os.path.join(hosts_dir, str(i))) if hosts_dir else {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def bucket_path(self, name: str) -> str:
    """gs://BUCKET/faults/<this harness's folder>/NAME: runs of several harnesses never meet."""
    if self.bucket is None:
      raise RuntimeError("this row needs a bucket: Runs(..., bucket=emulator.LocalBucket(...))")
    return f"{self.bucket.url}/faults/{os.path.basename(self.workdir)}/{name}"

  def reference(self, processes: int = 1) -> tuple[str, list[subprocess.CompletedProcess]]:
    """The uninterrupted short run, or the multi-process run from its checkpoint at step 10:
    the workdir and what each process returned. Trained once per `workdir`, on first use,
    even when several processes (pytest workers) share it; a rerun reuses it."""
    workdir = self.path(f"reference_{processes}")
    if processes not in self._references:
      with file_lock(f"{workdir}.lock"):
        self._references[processes] = self._load_or_train_reference(workdir, processes)
    return workdir, self._references[processes]

  def _load_or_train_reference(self, workdir: str, processes: int
                               ) -> list[subprocess.CompletedProcess]:
    record = f"{workdir}.json"  # written only once the run succeeded
    if os.path.exists(record):
      with open(record) as f:
        return [subprocess.CompletedProcess(**r) for r in json.load(f)]
    shutil.rmtree(workdir, ignore_errors=True)  # what an interrupted attempt left
    start = workdir if processes == 1 else self.reference_until(workdir, HALF)
    results = finish(self.start(start, processes=processes))
    if any(r.returncode != 0 for r in results):
      raise RuntimeError(f"the uninterrupted {processes}-process reference run failed: "
                         f"{_failure(results)}")
    with open(record, "w") as f:
      json.dump([dict(args=r.args, returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)
                 for r in results], f)
    return results

  def equals_reference(self, workdir: str, processes: int = 1) -> bool:
    return trees_equal(final_variables(workdir), final_variables(self.reference(processes)[0]))

  def reference_until(self, workdir: str, step: int, processes: int = 1) -> str:
    """A copy of the reference run (local or into a bucket) as if it had stopped after
    `step` (a checkpoint step)."""
    from resnet_jax.training import reporting
    copy_tree(self.reference(processes)[0], workdir)
    for later in (s for s in checkpoint_steps(workdir) if s > step):
      (paths.resolve(workdir) / "checkpoints" / str(later)).rmtree()
    metrics = paths.resolve(workdir) / "metrics.jsonl"
    records = [r for r in reporting.read_metrics(metrics) if r["step"] <= step]
    paths.write_atomically(metrics, "".join(json.dumps(r) + "\n" for r in records))
    return workdir


def copy_tree(source: str, target: str) -> None:
  """Copies the local folder `source` to `target` (a new local folder, or a bucket path)."""
  if not paths.is_bucket(target):
    shutil.copytree(source, target)
    return
  import fsspec
  fs, root = fsspec.core.url_to_fs(target)
  fs.put(source.rstrip("/") + "/", root, recursive=True)


def own_local_state(root: str) -> dict[str, str]:
  """Environment variables that give a process its own HOME, TMPDIR and compilation cache."""
  state = {"HOME": "home", "TMPDIR": "tmp", "JAX_COMPILATION_CACHE_DIR": "xla_cache"}
  for folder in state.values():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  return {name: os.path.join(root, folder) for name, folder in state.items()}


def cpu_env(devices: int) -> dict[str, str]:
  """This process's environment for a train.py on `devices` CPU devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_USE_LEGACY_KERAS": "1",  # as train.py
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def finish(processes: Sequence[subprocess.Popen], timeout: float = 600
           ) -> list[subprocess.CompletedProcess]:
  """Waits for every process; their exit codes and outputs. Kills those left on a timeout."""
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  return [subprocess.CompletedProcess(p.args, p.returncode, *output)
          for p, output in zip(processes, outputs)]


def final_variables(workdir: str) -> dict:
  from resnet_jax import pretrained
  return pretrained.load(workdir).variables


def trees_equal(a, b) -> bool:
  same_structure = jax.tree.structure(a) == jax.tree.structure(b)
  return same_structure and all(np.array_equal(x, y) for x, y in
                                zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir` (local or in a bucket)."""
  from resnet_jax import pretrained
  directory = paths.resolve(workdir) / "checkpoints"
  return pretrained.finished_steps(directory) if directory.is_dir() else []


def logged_train_steps(workdir: str) -> list[int]:
  from resnet_jax.training import reporting
  return [int(r["step"]) for r in reporting.read_metrics(paths.resolve(workdir) / "metrics.jsonl")
          if "train/loss" in r]


def shortened(text: str, limit: int) -> str:
  """`text`, cut to `limit` characters and an ellipsis when longer."""
  return text if len(text) <= limit else f"{text[:limit]}…"


def last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def final_evals(results: Sequence[subprocess.CompletedProcess]) -> list[str]:
  """The `Final eval: ...` line of each process ('' where it printed none)."""
  return [next((line for line in r.stdout.splitlines() if line.startswith("Final eval")), "")
          for r in results]


def _failure(results: Sequence[subprocess.CompletedProcess]) -> str:
  return "; ".join(f"exit {r.returncode}: {last_line(r.stderr) or last_line(r.stdout)}"
                   for r in results)


def _wait_for_step(workdir: str, after: int, process: subprocess.Popen,
                   timeout: float = 300) -> None:
  """Blocks until metrics.jsonl logs a step past `after` (or the process ended)."""
  from resnet_jax.training import reporting
  metrics, deadline = paths.resolve(workdir) / "metrics.jsonl", time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and any(
        r.get("step", 0) > after for r in reporting.read_metrics(metrics)):
      return
    time.sleep(0.02)


def _stopped_at(result: subprocess.CompletedProcess) -> int | None:
  """The step a run reported stopping after on a signal, or None."""
  found = re.search(r"Stopped by (SIGTERM|another process|a preemption notice \(SIGTERM\)) "
                    r"after step (\d+)", result.stdout)
  return int(found.group(2)) if found else None


def _stop_by_sigterm(runs: Runs, workdir: str, first_step: int, processes: int,
                     hosts_dir: str = "") -> tuple[list[subprocess.CompletedProcess], int | None]:
  """Starts the run, sends SIGTERM to its last process once it trains past `first_step`, and
  waits for every process: what they returned, and the step they stopped after (None unless
  all exited 0 and process 0 reported the stop)."""
  started = runs.start(workdir, processes=processes, hosts_dir=hosts_dir)
  _wait_for_step(workdir, first_step, started[0])
  started[-1].send_signal(signal.SIGTERM)
  stopped = finish(started)
  step = _stopped_at(stopped[0])
  return stopped, None if any(r.returncode != 0 for r in stopped) else step


def sigterm(runs: Runs, processes: int = 1) -> tuple[str, bool]:
  """SIGTERM to the last process once it trains, then the same command again."""
  workdir, first_step = runs.path(f"sigterm_{processes}"), 0
  if processes > 1:  # the multi-process run continues the reference from step 10
    first_step = HALF
    runs.reference_until(workdir, first_step)
  stopped, step = _stop_by_sigterm(runs, workdir, first_step, processes)
  if step is None:
    return _failure(stopped), False
  saved = checkpoint_steps(workdir)
  resumed = finish(runs.start(workdir, processes=processes))
  agree = len(set(final_evals(resumed))) == 1 and all(final_evals(resumed))
  equal = all(r.returncode == 0 for r in resumed) and runs.equals_reference(workdir, processes)
  return (f"exit 0{f' ×{processes}' if processes > 1 else ''} at step {step}, checkpoints "
          f"{saved}; restart {'bitwise equal' if equal else 'DIFFERS'}"), (
              max(saved) == step and agree and equal)


def sigterm_to_hosts_sharing_a_bucket(runs: Runs) -> tuple[str, bool]:
  """2 processes with disjoint local state continue the reference from step 10 in the bucket;
  SIGTERM to the last. The restart is 1 process on 1 device; float32 sums differ between
  layouts, so the uninterrupted run it must equal has the same layouts: 2 processes that
  end at the stop step as planned (locally), then 1 process."""
  workdir = runs.reference_until(runs.bucket_path("sigterm_hosts"), HALF)
  stopped, step = _stop_by_sigterm(runs, workdir, HALF, processes=2,
                                   hosts_dir=runs.path("sigterm_hosts"))
  if step is None:
    return _failure(stopped), False
  saved = checkpoint_steps(workdir)
  uninterrupted = runs.reference_until(runs.path("sigterm_hosts_uninterrupted"), HALF)
  planned = finish(runs.start(uninterrupted, f"--config.num_train_steps={step}", processes=2))
  if any(r.returncode != 0 for r in planned):
    return f"the uninterrupted 2-process run failed: {_failure(planned)}", False
  restarted, continued = (runs.train(w, *MULTIPROCESS_RUN) for w in (workdir, uninterrupted))
  resumed = f"Resuming from the checkpoint at step {step} in {workdir}" in restarted.stdout
  equal = (restarted.returncode == 0 and continued.returncode == 0 and resumed and trees_equal(
      final_variables(workdir), final_variables(uninterrupted)))
  return (f"exit 0 ×2 at step {step}, checkpoints in the bucket {saved}; restart as 1 process "
          f"from step {step}: {'bitwise equal' if equal else 'DIFFERS'}"), (
              max(saved) == step and equal)


def kill_9_three_times(runs: Runs, in_bucket: bool = False) -> tuple[str, bool]:
  workdir = runs.bucket_path("kill9") if in_bucket else runs.path("kill9")
  rng, kills = random.Random(0), []
  more_checkpoints = "--config.checkpoint_every_steps=5"  # more moments to be killed mid-save
  for _ in range(3):
    process = subprocess.Popen(runs.command(workdir, more_checkpoints), env=cpu_env(1),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = checkpoint_steps(workdir)
    _wait_for_step(workdir, before[-1] if before else 0, process)  # training (again)
    time.sleep(rng.uniform(0.0, 1.0))  # somewhere in training, maybe mid-checkpoint
    process.kill()
    process.wait()
    kills.append(f"{before[-1] if before else 0}→{checkpoint_steps(workdir)}")
  finished = runs.train(workdir, more_checkpoints)
  equal = finished.returncode == 0 and runs.equals_reference(workdir)
  return (f"killed 3× (last checkpoint before → checkpoints after: {'; '.join(kills)}); "
          f"final run {'bitwise equal' if equal else 'DIFFERS'}"), equal


def damaged_checkpoint(runs: Runs, in_bucket: bool = False) -> tuple[str, bool]:
  """The short run's workdir with each file of its last checkpoint cut to half, restarted."""
  workdir = runs.bucket_path("damaged") if in_bucket else runs.path("damaged")
  copy_tree(runs.reference()[0], workdir)
  latest = checkpoint_steps(workdir)[-1]
  for entry in paths.list_tree(paths.resolve(workdir) / "checkpoints" / str(latest)):
    if not entry.is_dir:
      file = paths.resolve(entry.path)
      file.write_bytes(file.read_bytes()[:max(entry.size // 2, 1)])
  result = runs.train(workdir)
  aside_dir = paths.resolve(workdir) / "checkpoints_damaged"
  aside = sorted(c.name for c in aside_dir.iterdir()) if aside_dir.is_dir() else []
  warned = f"checkpoints/{latest} is damaged" in result.stderr
  resumed = re.search(r"Resuming from the checkpoint at step (\d+)", result.stdout)
  equal = result.returncode == 0 and runs.equals_reference(workdir)
  return (f"warned: {warned}, moved aside: {aside}, resumed from "
          f"{resumed.group(1) if resumed else 'nothing'}, final "
          f"{'bitwise equal' if equal else 'DIFFERS'}"), (
              warned and aside == [str(latest)] and bool(resumed) and equal)


def bucket_goes_away(runs: Runs) -> tuple[str, bool]:
  """A run in the bucket that logs every step, at batch 128 (slow enough for the outage to
  land between its checkpoints); the storage server is stopped once the checkpoint at step 10
  is committed, so the next metrics write fails, and started again (its objects kept on disk)
  once the run has ended. Then the same command again, against the same run uninterrupted."""
  workdir = runs.bucket_path("goes_away")
  overrides = ("--config.num_train_steps=30", "--config.batch_size=128",
               "--config.log_every_steps=1")
  process = runs.start(workdir, *overrides)[0]
  deadline = time.time() + 300
  while HALF not in checkpoint_steps(workdir) and process.poll() is None and (
      time.time() < deadline):
    time.sleep(0.2)  # the emulator answers one request at a time: leave it to the run
  runs.bucket.stop()
  try:
    failed = finish([process])[0]
  finally:
    runs.bucket.start()
  committed = checkpoint_steps(workdir)
  restarted = runs.train(workdir, *overrides)
  resumed = re.search(r"Resuming from the checkpoint at step (\d+)", restarted.stdout)
  uninterrupted = runs.train(runs.path("goes_away_uninterrupted"), *overrides)
  equal = restarted.returncode == 0 and uninterrupted.returncode == 0 and trees_equal(
      final_variables(workdir), final_variables(runs.path("goes_away_uninterrupted")))
  # gcsfs and orbax log the failures they retried or passed on (tracebacks included) before
  # the run reports the error; what must not appear is an exception that escaped train.py.
  shown, one_line = _one_error_line(failed, r"^error: could not write ", library_logs=True)
  return (f"{shortened(shown, 110)}; committed {committed}; back: resumed from "
          f"{resumed.group(1) if resumed else 'nothing'}, final "
          f"{'bitwise equal' if equal else 'DIFFERS'}"), (
              one_line and bool(committed) and bool(resumed)
              and int(resumed.group(1)) == committed[-1] and equal)


def nan_stop(runs: Runs) -> tuple[str, bool]:
  workdir = runs.path("nan_stop")
  result = runs.train(workdir, "--config.learning_rate=1e6",
                      "--config.checkpoint_every_steps=1")
  bad = re.match(r"error: non-finite values at step (\d+)", last_line(result.stderr))
  saved = checkpoint_steps(workdir)
  finite = bool(saved) and all(np.all(np.isfinite(x)) for x in
                               jax.tree.leaves(final_variables(workdir)))
  return (f"exit {result.returncode}: {shortened(last_line(result.stderr), 90)}; "
          f"checkpoints {saved}, "
          f"finite: {finite}"), (
              result.returncode == 1 and bool(bad) and finite
              and max(saved) == int(bad.group(1)) - 1)


def nan_skip(runs: Runs) -> tuple[str, bool]:
  workdir = runs.path("nan_skip")
  result = runs.train(workdir, "--config.learning_rate=1e6", "--config.nan_policy=skip",
                      f"--config.max_consecutive_skips={STEPS}")
  from resnet_jax.training import reporting
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  skipped = int(sum(r.get("train/skipped_steps", 0) for r in records))
  finite = all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_variables(workdir)))
  return (f"exit {result.returncode}, {skipped} of {STEPS} steps skipped, checkpoints "
          f"{checkpoint_steps(workdir)}, all finite: {finite}"), (
              result.returncode == 0 and skipped > 0 and finite
              and checkpoint_steps(workdir)[-1] == STEPS)


def _one_error_line(result: subprocess.CompletedProcess, pattern: str,
                    library_logs: bool = False) -> tuple[str, bool]:
  """Whether the run failed with one error line matching `pattern` as its last line, and no
  traceback (with `library_logs`: none through train.py, libraries may log their own)."""
  line = last_line(result.stderr)
  escaped = f'File "{TRAIN_PY}"' in result.stderr if library_logs else (
      "Traceback" in result.stderr)
  ok = result.returncode != 0 and not escaped and re.search(pattern, line) is not None
  return f"exit {result.returncode}: {line}", ok


def config_changed_on_resume(runs: Runs) -> tuple[str, bool]:
  """The short run's finished workdir restarted with another learning rate."""
  workdir = runs.reference_until(runs.path("config_changed"), STEPS)
  record = paths.resolve(workdir) / "runs.jsonl"
  before = record.read_text(), checkpoint_steps(workdir)
  shown, ok = _one_error_line(runs.train(workdir, "--config.learning_rate=0.5"),
                              r"^error: .* was trained with another config .*: "
                              r"learning_rate \S+ → 0\.5\. .*allow_config_change=True")
  untouched = (record.read_text(), checkpoint_steps(workdir)) == before
  return f"{shortened(shown, 150)}; record and checkpoints untouched: {untouched}", (
      ok and untouched)


def workdir_is_a_file(runs: Runs) -> tuple[str, bool]:
  a_file = runs.path("a_file")
  with open(a_file, "w") as f:
    f.write("not a directory")
  return _one_error_line(runs.train(a_file), r"^error: --workdir=.* is a file")


def checkpoint_of_another_model(runs: Runs) -> tuple[str, bool]:
  """The short run's finished workdir (ResNet-8) restarted as ResNet-20."""
  workdir = runs.reference_until(runs.path("another_model"), STEPS)
  before = checkpoint_steps(workdir)
  shown, ok = _one_error_line(  # past the run record's guard, to the checkpoint's own check
      runs.train(workdir, "--config.model=resnet20", "--config.num_train_steps=30",
                 "--config.allow_config_change=True"),
      r"^error: The checkpoint .*/20 \(resnet8, 10 classes\) does not fit this config "
      r"\(resnet20, 10 classes\)")
  kept = checkpoint_steps(workdir) == before and not os.path.exists(
      os.path.join(workdir, "checkpoints_damaged"))
  return f"{shortened(shown, 150)}; checkpoints kept: {kept}", ok and kept


def unwritable_workdir(runs: Runs) -> tuple[str, bool]:
  """A workdir in a read-only directory; root may write anywhere, so for root a path under
  /sys, where not even root may create a directory."""
  if os.geteuid() == 0:
    workdir = "/sys/resnet_jax_faults_run"
  else:
    read_only = runs.path("read_only")
    os.makedirs(read_only, exist_ok=True)
    os.chmod(read_only, 0o555)
    workdir = os.path.join(read_only, "run")
  return _one_error_line(runs.train(workdir), r"^error: cannot create --workdir=")


def missing_config_file(runs: Runs) -> tuple[str, bool]:
  result = subprocess.run([sys.executable, TRAIN_PY, f"--workdir={runs.path('x')}",
                           "--config=configs/no_such.py", "--config.num_train_steps=3"],
                          capture_output=True, text=True, timeout=300)
  return _one_error_line(result, r"^error: could not load --config: .*No such file")


def out_of_range_value(runs: Runs) -> tuple[str, bool]:
  return _one_error_line(runs.train(runs.path("x"), "--config.learning_rate=-1"),
                         r"^error: config.learning_rate=-1.0: must be >= 0")


def wrong_typed_value(runs: Runs) -> tuple[str, bool]:
  return _one_error_line(runs.train(runs.path("x"), "--config.batch_size=abc"),
                         r"^error: flag --config.batch_size=abc: invalid literal")


def broken_images(runs: Runs) -> tuple[str, bool]:
  """A folder of digits plus a file of random bytes and a truncated PNG in it."""
  from PIL import Image
  from sklearn.datasets import load_digits
  folder = runs.path("broken_folder")
  images, labels = load_digits(return_X_y=True)
  for digit in (0, 1):
    class_dir = os.path.join(folder, "train", f"digit_{digit}")
    os.makedirs(class_dir, exist_ok=True)
    for i, pixels in enumerate(images[labels == digit][:16].reshape(-1, 8, 8)):
      Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(
          os.path.join(class_dir, f"{i:02d}.png"))
  with open(os.path.join(folder, "train", "digit_0", "random.jpg"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(3000))
  truncated = os.path.join(folder, "train", "digit_1", "00.png")
  with open(truncated, "r+b") as f:
    f.truncate(40)
  result = runs.train(runs.path("broken_run"), f"--config.dataset=folder:{folder}",
                      "--config.model=resnet8", "--config.num_train_steps=2",
                      "--config.batch_size=8", short_run=False)
  named = "random.jpg" in result.stderr and "00.png" in result.stderr
  counted = re.search(r"Skipped 2 of \d+ image files", result.stderr) is not None
  return (f"exit {result.returncode}; warnings name both files: {named}; count of 2: "
          f"{counted}"), result.returncode == 0 and named and counted


def _short_config(data_dir: str, **overrides):
  """The short run's config (what train.py builds from SHORT_RUN), with `overrides`."""
  from configs import digits
  config = digits.get_config()
  for flag in SHORT_RUN:
    key, value = flag[len("--config."):].split("=")
    config[key] = type(config[key])(value)
  config.data_dir, config.progress_bar = data_dir, False
  config.update(overrides)
  return config


def _failing_at(step: int, error: OSError, original: Callable, step_of: Callable) -> Callable:
  """`original`, except that it raises `error` when called for `step`."""
  def write(*args, **kwargs):
    if step_of(*args, **kwargs) == step:
      raise error
    return original(*args, **kwargs)
  return write


def train_with_a_failing_write(what: str, step: int, error_number: int, workdir: str,
                               data_dir: str, overrides: dict) -> None:
  """The short run in this process, with its `what` ("checkpoint" or "metrics") write of
  `step` failing with OSError(error_number); prints "finished" or the WriteError."""
  from unittest import mock
  from resnet_jax.training import checkpointing, loop, reporting
  if what == "checkpoint":
    owner, name = checkpointing, "save"
    step_of = lambda manager, state, *a, **k: int(jax.device_get(state.step))  # noqa: E731
  else:
    owner, name = reporting.MetricsWriter, "write"
    step_of = lambda writer, step, metrics: step  # noqa: E731
  error = OSError(error_number, os.strerror(error_number))
  failing = _failing_at(step, error, getattr(owner, name), step_of)
  with mock.patch.object(owner, name, failing):
    try:
      loop.train_and_evaluate(_short_config(data_dir, **overrides), workdir)
      print("finished")
    except loop.WriteError as e:
      print(f"WriteError: {e}")


def _failing_write_run(runs: Runs, name: str, what: str, step: int, error_number: int,
                       **overrides) -> str:
  """`train_with_a_failing_write` in a new 1-CPU-device process: the short run's compiled
  programs, from the cache. Returns its last line."""
  workdir = runs.path(name)
  code = ("import json, sys; from resnet_jax import faults; "
          "from resnet_jax.training import startup; "
          "faults.train_with_a_failing_write(*json.loads(sys.argv[1])); "
          "startup.exit_now(0)")  # as train.py ends
  arguments = json.dumps([what, step, error_number, workdir, runs.data_dir, overrides])
  result = subprocess.run([sys.executable, "-c", code, arguments], cwd=REPO, env=cpu_env(1),
                          capture_output=True, text=True, timeout=600)
  outcome = last_line(result.stdout) if result.returncode == 0 else _failure([result])
  return f"{shortened(outcome, 80)} checkpoints {checkpoint_steps(workdir)}"


def checkpoint_write_fails(runs: Runs) -> tuple[str, bool]:
  """Disk full at the checkpoint of step 10 (of 5, 10, 15, 20): "stop" ends the run,
  "continue" goes on."""
  results = {policy: _failing_write_run(runs, f"write_fails_{policy}", "checkpoint", HALF,
                                        errno.ENOSPC, on_write_error=policy,
                                        checkpoint_every_steps=5)
             for policy in ("stop", "continue")}
  intact = trees_equal(*(final_variables(os.path.join(runs.path(f"write_fails_{policy}"),
                                                     "checkpoints", "5"))
                         for policy in ("stop", "continue")))
  return (f"stop: {results['stop']}; continue: {results['continue']}; step-5 checkpoint "
          f"readable: {intact}"), (
              results["stop"].startswith(f"WriteError: could not write the checkpoint at step "
                                         f"{HALF}: No space left")
              and results["stop"].endswith("checkpoints [5]")
              and results["continue"] == "finished checkpoints [5, 15, 20]" and intact)


def metrics_write_fails(runs: Runs) -> tuple[str, bool]:
  """A read-only metrics file at step 15: with "continue" the run finishes all the same."""
  result = _failing_write_run(runs, "metrics_fails", "metrics", 15, errno.EROFS,
                              on_write_error="continue")
  steps = logged_train_steps(runs.path("metrics_fails"))
  return f"{result}, train records at {steps}", (
      result.startswith("finished") and checkpoint_steps(runs.path("metrics_fails"))[-1] == STEPS
      and 15 not in steps and STEPS in steps)


def two_processes_to_one(runs: Runs) -> tuple[str, bool]:
  """The last but one checkpoint of the 2-process (jit) reference, resumed by 1 process."""
  step = MULTIPROCESS_CHECKPOINTS[-2]
  workdir = runs.reference_until(runs.path("two_to_one"), step, processes=2)
  result = runs.train(workdir, *MULTIPROCESS_RUN)
  resumed = f"Resuming from the checkpoint at step {step}" in result.stdout
  logged = logged_train_steps(workdir)
  return (f"exit {result.returncode}, resumed at step {step}: {resumed}, checkpoints "
          f"{checkpoint_steps(workdir)}, train records at {logged}"), (
              result.returncode == 0 and resumed
              and checkpoint_steps(workdir) == MULTIPROCESS_CHECKPOINTS
              and logged == MULTIPROCESS_LOGS)


def one_process_to_two(runs: Runs, parallelism: str) -> tuple[str, bool]:
  """The 1-process reference's checkpoint at step 10, resumed by 2 processes (under jit, the
  2-process reference run is that)."""
  if parallelism == "jit":
    workdir, results = runs.reference(processes=2)
  else:
    workdir = runs.reference_until(runs.path(f"one_to_two_{parallelism}"), HALF)
    results = finish(runs.start(workdir, f"--config.parallelism={parallelism}", processes=2))
  if any(r.returncode != 0 for r in results):
    return _failure(results), False
  resumed = f"Resuming from the checkpoint at step {HALF}" in results[0].stdout
  agree = len(set(final_evals(results))) == 1 and all(final_evals(results))
  logged = logged_train_steps(workdir)
  return (f"exit 0 ×2, resumed at step {HALF}: {resumed}, same final eval in both: {agree}, "
          f"checkpoints {checkpoint_steps(workdir)}, train records at {logged}"), (
              resumed and agree and checkpoint_steps(workdir) == MULTIPROCESS_CHECKPOINTS
              and logged == MULTIPROCESS_LOGS)


def predict_and_export_from_a_bucket(runs: Runs) -> tuple[str, bool]:
  """predict and export (to the bucket) from the checkpoint of a short run in the bucket."""
  from PIL import Image
  workdir, image = runs.bucket_path("to_predict"), runs.path("digit.png")
  trained = runs.train(workdir, "--config.num_train_steps=10")
  if trained.returncode != 0:
    return _failure([trained]), False
  Image.fromarray(np.full((8, 8), 128, np.uint8)).save(image)
  tool = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO,  # noqa: E731
                                      env=cpu_env(1), capture_output=True, text=True, timeout=600)
  predicted = tool("resnet_jax.predict", "--checkpoint", workdir, "--top_k", "3", image)
  out = f"{workdir}/exported/model.jax"
  exported = tool("resnet_jax.export", "--checkpoint", workdir, "--out", out,
                  "--platforms", "cpu")
  ranked = re.findall(r"^\s+\d\. ", predicted.stdout, flags=re.MULTILINE)
  written = paths.resolve(out).is_file() and paths.resolve(out + ".json").is_file()
  return (f"predict: exit {predicted.returncode}, {len(ranked)} classes ranked; export: exit "
          f"{exported.returncode}, program and description in the bucket: {written}"), (
              predicted.returncode == 0 and len(ranked) == 3 and exported.returncode == 0
              and written)


FAULTS: dict[str, tuple[str, Callable[[Runs], tuple[str, bool]]]] = {
    "SIGTERM mid-run": ("exit 0, checkpoint at the stop step, restart bitwise equal", sigterm),
    "SIGTERM to one of 2 processes": (
        "both stop at the same step, exit 0, one checkpoint there; restart bitwise equal to "
        "an uninterrupted 2-process run", functools.partial(sigterm, processes=2)),
    "kill -9 three times at random moments": ("restart bitwise equal", kill_9_three_times),
    "latest checkpoint truncated": (
        "warning naming it, moved aside, resumes from the previous one, bitwise equal",
        damaged_checkpoint),
    "lr 1e6 with nan_policy=stop": ("exit 1 at the first bad step, no checkpoint after it",
                                nan_stop),
    "lr 1e6 with nan_policy=skip": ("finishes, skips counted, finite checkpoints", nan_skip),
    "checkpoint write fails (disk full)": (
        "stop: one error, earlier checkpoints intact; continue: finishes", checkpoint_write_fails),
    "metrics write fails (read-only)": ("continue: a warning, training finishes",
                                        metrics_write_fails),
    "checkpoint of another model": (
        "one error line naming both models, exit 1, no checkpoint moved or deleted",
        checkpoint_of_another_model),
    "resumed with another learning rate": (
        "one error line naming the key and the way on, exit 1, nothing written",
        config_changed_on_resume),
    "--workdir is a file": ("one error line, exit 1", workdir_is_a_file),
    "--workdir not writable": ("one error line, exit 1", unwritable_workdir),
    "missing --config file": ("one error line, exit 1", missing_config_file),
    "out-of-range value": ("one error line naming the key", out_of_range_value),
    "wrong-typed value": ("one error line naming the flag", wrong_typed_value),
    "image folder with random bytes and a truncated PNG": (
        "trains; a warning per file and a count", broken_images),
    "checkpoint of 1 process resumed by 2 (jit)": (
        "resumes at its step, both finish with the same eval, only process 0 logs",
        functools.partial(one_process_to_two, parallelism="jit")),
    "checkpoint of 1 process resumed by 2 (pmap)": (
        "resumes at its step, both finish with the same eval, only process 0 logs",
        functools.partial(one_process_to_two, parallelism="pmap")),
    "checkpoint of 2 processes (jit) resumed by 1": (
        "resumes at its step, finishes, no duplicated logs", two_processes_to_one),
    "bucket: SIGTERM to one of 2 processes that share only the bucket": (
        "both stop at the same step, exit 0, one checkpoint there; restart as 1 process "
        "bitwise equal to an uninterrupted run (2 processes to that step, then 1)",
        sigterm_to_hosts_sharing_a_bucket),
    "bucket: storage server stopped mid-run": (
        "one error line, committed checkpoints intact; with it back, resumes from the last "
        "one, bitwise equal", bucket_goes_away),
    "bucket: latest checkpoint truncated": (
        "warning naming it, moved aside in the bucket, resumes from the previous one, bitwise "
        "equal", functools.partial(damaged_checkpoint, in_bucket=True)),
    "bucket: kill -9 three times at random moments": (
        "restart bitwise equal", functools.partial(kill_9_three_times, in_bucket=True)),
    "bucket: predict and export from its checkpoint": (
        "predict ranks the classes, export writes into the bucket",
        predict_and_export_from_a_bucket),
}


def run_fault(name: str, runs: Runs) -> Outcome:
  expected, inject = FAULTS[name]
  start = time.perf_counter()
  try:
    happened, passed = inject(runs)
  except Exception as e:  # noqa: BLE001 - a crash of the harness is a failed row, not a stop
    happened, passed = f"{type(e).__name__}: {e}", False
  return Outcome(name, expected, happened, passed, time.perf_counter() - start)


def table(outcomes: Sequence[Outcome]) -> str:
  rows = ["| fault | expected | what happened | | s |", "|---|---|---|---|---:|"]
  rows += [f"| {o.fault} | {o.expected} | {o.happened.replace('|', '/')} | "
           f"{'pass' if o.passed else 'FAIL'} | {o.seconds:.0f} |" for o in outcomes]
  return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.faults", __doc__)
  parser.add_argument("--workdir", default="", help="default: a new temporary directory")
  parser.add_argument("--only", default="", help="comma-separated fault names (default: all)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FAULTS)
  unknown = [n for n in names if n not in FAULTS]
  if unknown:
    parser.error(f"unknown faults {unknown}; known: {list(FAULTS)}")
  workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="resnet_jax_faults_"))
  os.makedirs(workdir, exist_ok=True)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  from resnet_jax import data
  data_dir = os.path.join(workdir, "tensorflow_datasets")
  data.get_dataset_info("digits", data_dir)
  # The bucket rows' gs://, for this process and its runs; on disk, as one row restarts it.
  with emulator.LocalBucket(data_dir=os.path.join(workdir, "bucket")) as bucket:
    emulator.use(bucket)
    runs = Runs(workdir, data_dir, bucket)
    start, outcomes = time.perf_counter(), []
    for name in names:
      outcomes.append(run_fault(name, runs))
      print(f"{'pass' if outcomes[-1].passed else 'FAIL'} ({outcomes[-1].seconds:.0f} s): "
            f"{name}: {outcomes[-1].happened}", flush=True)
  print(f"\n{table(outcomes)}\n\n{sum(o.passed for o in outcomes)} of {len(outcomes)} passed "
        f"in {time.perf_counter() - start:.0f} s (runs in {workdir})")
  sys.exit(0 if all(o.passed for o in outcomes) else 1)


if __name__ == "__main__":
  main()
