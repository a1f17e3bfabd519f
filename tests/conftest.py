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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A temporary tfds data dir with the digits dataset prepared once per test session."""
  from resnet_jax import data

  path = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  data.get_dataset_info("digits", path)
  return path
