"""Run paths in a bucket: train.py, predict, export, init_from and image folders against a local
GCS bucket (the storage emulator), and one clear error for each way a bucket can be unusable."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import export, faults, linear_probe, pretrained
from resnet_jax.storage import paths
from resnet_jax.training import loop, reporting
from short_run import digit_folder, short_digits_config

REPO = pathlib.Path(__file__).resolve().parent.parent
RUN = ("--config.model=resnet8", "--config.batch_size=32", "--config.schedule=constant",
       "--config.log_every_steps=3", "--config.checkpoint_every_steps=3",
       "--config.eval_every_steps=6", "--config.progress_bar=False")


def train(workdir: str, data_dir: str, steps: int, cwd: pathlib.Path, env=None):
  return subprocess.run(
      [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}",
       f"--config.data_dir={data_dir}", f"--config.num_train_steps={steps}", *RUN],
      cwd=cwd, env=env or faults.cpu_env(1), capture_output=True, text=True, timeout=600)


def test_a_bucket_workdir_trains_resumes_and_holds_every_file_with_nothing_local(
    local_bucket, digits_data_dir, tmp_path):
  workdir = f"{local_bucket.url}/train_and_resume"
  first = train(workdir, digits_data_dir, 6, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = train(workdir, digits_data_dir, 9, cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from the checkpoint at step 6" in resumed.stdout
  assert list(tmp_path.iterdir()) == []  # no local folder named gs: (or anything else)

  root = paths.resolve(workdir)
  names = {e.path[len(workdir) + 1:] for e in paths.list_tree(root) if not e.is_dir}
  assert {"metrics.jsonl", "curves.png"} <= names
  assert any(re.fullmatch(r"tensorboard/events\.out\.tfevents\..*", n) for n in names)
  assert sorted(int(c.name) for c in (root / "checkpoints").iterdir()) == [3, 6, 9]
  records = reporting.read_metrics(root / "metrics.jsonl")
  assert [r["step"] for r in records if "train/loss" in r] == [3, 6, 9]  # none twice
  assert (root / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_export_linear_probe_and_init_from_read_a_checkpoint_in_a_bucket(
    local_bucket, digits_data_dir, tmp_path, capsys):
  config = short_digits_config(digits_data_dir)
  workdir = f"{local_bucket.url}/to_predict"
  loop.train_and_evaluate(config, workdir)
  weights = pretrained.load(workdir)
  assert weights.info.model == "resnet8" and os.fspath(weights.path).endswith("checkpoints/4")

  out = f"{local_bucket.url}/exported/resnet8.jax"
  export.main(["--checkpoint", workdir, "--out", out, "--platforms", "cpu"])
  exported = export.load_exported(out)
  assert exported.info.model == "resnet8"
  images = np.zeros((2, *export.input_shape(weights.info)[1:]), np.uint8)
  assert exported.exported.call(images).shape == (2, weights.info.num_classes)

  capsys.readouterr()
  linear_probe.main(["--checkpoint", workdir, "--dataset", "digits", "--data_dir",
                     digits_data_dir, "--shots", "1", "--num_seeds", "1"])
  probed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(probed) == {"probe/1shot_accuracy"} and 0 <= probed["probe/1shot_accuracy"] <= 1

  config.init_from = workdir
  assert loop.load_init_weights(config).info == weights.info


def test_a_folder_in_a_bucket_is_scanned_through_the_bucket_and_prepared_locally(
    local_bucket, tmp_path):
  from resnet_jax.data import image_folder
  local = pathlib.Path(digit_folder(str(tmp_path / "source"), range(3), per_class=6))
  folder = f"{local_bucket.url}/photos"
  for file in local.rglob("*.png"):
    (paths.resolve(folder) / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())
  data_dir = tmp_path / "tfds"
  builder_dir, listing, facts = image_folder.prepared_builder_dir(folder, str(data_dir), 0.2)
  assert listing.class_names == ("digit_0", "digit_1", "digit_2")
  assert listing.splits["train"][0][0] == f"{folder}/train/digit_0/000.png"
  assert facts["skipped_files"] == [] and facts["eval_split"] == "holdout"
  assert pathlib.Path(builder_dir).is_relative_to(data_dir)
  assert not (tmp_path / "gs:").exists()


def test_a_bucket_that_does_not_exist_is_one_error_naming_it(local_bucket):
  with pytest.raises(paths.StorageError, match=r"the bucket gs://no-such-bucket does not exist"):
    loop.prepare_workdir("gs://no-such-bucket/run")


def test_s3_without_s3fs_names_the_extra_to_install():
  try:
    import s3fs  # noqa: F401
    pytest.skip("s3fs is installed here")
  except ImportError:
    pass
  with pytest.raises(paths.StorageError, match=r"needs the s3fs package .*resnet-jax\[s3\]"):
    loop.prepare_workdir("s3://some-bucket/run")


def test_a_bucket_without_credentials_is_one_error_line_saying_how_to_get_them(tmp_path):
  env = {k: v for k, v in faults.cpu_env(1).items()
         if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
  # No gcloud configuration, and no probe of a cloud VM's metadata server.
  env.update(HOME=str(tmp_path / "home"), CLOUDSDK_CONFIG=str(tmp_path / "home" / "gcloud"),
             NO_GCE_CHECK="true")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  result = train("gs://some-bucket/run", str(tmp_path / "tfds"), 3, cwd=cwd, env=env)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert re.match(r"error: no Google Cloud credentials for --workdir=gs://some-bucket/run: "
                  r"run `gcloud auth application-default login`", last), last
  assert list(cwd.iterdir()) == []


RUN_PATH_MODULES = ["train.py", "resnet_jax/pretrained.py", "resnet_jax/export.py",
                    "resnet_jax/convert.py", "resnet_jax/linear_probe.py",
                    "resnet_jax/data/image_folder.py", "resnet_jax/data/tfds_pipeline.py",
                    *sorted(str(p.relative_to(REPO)) for p in
                            (REPO / "resnet_jax/training").glob("*.py"))]


@pytest.mark.parametrize("module", RUN_PATH_MODULES)
def test_no_run_path_goes_through_os_path_open_or_makedirs(module):
  """Run paths go through storage.paths (epath), so that a bucket works wherever a folder does.
  (Reading /proc is no run path.)"""
  source = (REPO / module).read_text()
  found = [f"{module}:{number}: {line.strip()}"
           for number, line in enumerate(source.splitlines(), start=1)
           if re.search(r"\bos\.path\.|(?<![.\w])(?<!def )open\(|os\.makedirs|os\.replace|shutil\.",
                        line)
           and "/proc/" not in line]
  assert not found, "\n".join(found)


def test_the_checkpoint_benchmark_restores_what_it_saved_and_times_async_saves(local_bucket,
                                                                               tmp_path):
  from resnet_jax.bench import benchmark_config, checkpoint
  exp = loop.setup(benchmark_config("resnet8", batch_size=8, image_size=16, dtype="float32"))
  state = exp.data_parallel.put_state(exp.initial_state)
  bucket_dir = f"{local_bucket.url}/checkpoint_bench"
  result = checkpoint.save_and_restore(exp, state, bucket_dir, repeats=2, target="bucket")
  assert result.state_mb == pytest.approx(checkpoint.state_megabytes(state))
  assert len(result.save_s) == len(result.restore_s) == 2
  assert pretrained.finished_steps(paths.resolve(bucket_dir) / "checkpoints") == [1, 2]
  overhead = checkpoint.save_overhead(exp, steps=4, checkpoint_every=2,
                                      workdir=str(tmp_path), target="local disk")
  assert pretrained.finished_steps(paths.resolve(tmp_path) / "checkpoints") == [2, 4]
  assert overhead.steps == 4 and overhead.checkpoint_step_s > 0 and overhead.baseline_step_s > 0


def test_a_tilde_in_a_run_path_is_the_home_directory(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("~/weights")) == str(tmp_path / "home" / "weights")
  workdir = loop.prepare_workdir("~/runs/x")
  assert os.fspath(workdir) == str(tmp_path / "home" / "runs" / "x") and workdir.is_dir()
  assert not (tmp_path / "~").exists()  # no folder literally named ~
