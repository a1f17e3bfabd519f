"""Test set-up: 8 virtual CPU devices, so pmap, meshes and cross-replica BatchNorm run anywhere."""

import os
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs; XLA's persistent cache (inherited by the
# train.py subprocesses too) compiles each once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="resnet_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

try:  # torch, where installed (parity tests), must load before TensorFlow: the other order
  import torch  # noqa: F401,E402  can crash, and any test file may load TensorFlow first.
except ImportError:
  pass

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A temporary tfds data dir with the digits dataset prepared once per test session."""
  from resnet_jax import data

  path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  data.get_dataset_info("digits", path)
  return path


@pytest.fixture(scope="session")
def local_bucket(tmp_path_factory: pytest.TempPathFactory):
  """A GCS bucket on 127.0.0.1 (the storage emulator), one per test process; this process and
  the train.py processes it starts reach it as gs://resnet-jax-test. Its objects live on disk,
  so that a fault row can stop and restart it."""
  from resnet_jax.storage import emulator
  with emulator.LocalBucket(data_dir=str(tmp_path_factory.mktemp("bucket"))) as bucket:
    emulator.use(bucket)
    yield bucket


@pytest.fixture(scope="session")
def trained_folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
  """(workdir, tfds data dir, root): 4 steps of ResNet-8 on a folder of digits 0-4, once
  per session (the first worker that needs it trains it; the others wait and share it), with
  gradient norms logged; fine-tuning, probes, predict and the analysis tools start from its
  checkpoint."""
  from resnet_jax.storage.file_lock import file_lock
  from resnet_jax.training import loop
  from short_run import digit_folder, shared_dir, short_folder_config

  root = shared_dir(tmp_path_factory, "folder_run")
  data_dir, workdir = os.path.join(root, "tfds"), os.path.join(root, "pretrain")
  with file_lock(os.path.join(root, "lock")):
    if not os.path.exists(os.path.join(root, "trained")):
      folder = digit_folder(os.path.join(root, "source"), range(5), per_class=20)
      config = short_folder_config(folder, data_dir)
      config.log_grad_norms = True
      loop.train_and_evaluate(config, workdir)
      open(os.path.join(root, "trained"), "w").close()
  return workdir, data_dir, root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Tests marked `run_first` first, then the other scopes (modules, classes) largest first.

  pytest-xdist (--dist loadscope, with --no-loadscope-reorder) hands scopes out in this
  order, so the longest scopes start at once, on different workers, instead of last.
  """
  def scope(item: pytest.Item) -> str:
    return item.nodeid.rsplit("::", 1)[0]
  sizes: dict[str, int] = {}
  for item in items:
    sizes[scope(item)] = sizes.get(scope(item), 0) + 1
  items.sort(key=lambda item: (item.get_closest_marker("run_first") is None,
                               -sizes[scope(item)], scope(item)))
