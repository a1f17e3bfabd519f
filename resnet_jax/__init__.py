"""resnet_jax: the ResNet family in Flax linen, with a pure-functional JAX training program.

`ResNet`, `create_model` and `list_models` load on first use, so that importing a light
module such as `resnet_jax.malloc_tuning` does not import JAX and Flax.

Bucket paths (gs://, s3://) go through fsspec, the backend the tests run against a local
emulator, unless the user set EPATH_USE_TF (see `resnet_jax.storage.paths`). etils reads the
variable once, at its first path operation, so it is set here, before anything uses a path.

fsspec's bucket filesystems cache directory listings, one cache per thread (and per host), so
a listing could still show a checkpoint that another thread or host has since moved or
written: orbax, which saves from worker threads, then fails to delete a folder that is gone.
The cache is switched off for gs:// and s3:// (a value the user configured wins).

TensorFlow (only the input pipeline here) and XLA log INFO and WARNING lines from C++, such
as "Local rendezvous is aborting" for an image the tools then report themselves; their
threshold, TF_CPP_MIN_LOG_LEVEL, is read once, when the first of jaxlib and TensorFlow
loads, so it is set here (to 2, errors only; unless set, or RESNET_JAX_VERBOSE=1).
"""

import os

import fsspec.config

os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("RESNET_JAX_VERBOSE") != "1":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _protocol in ("gcs", "s3"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

__all__ = ["ResNet", "create_model", "list_models"]


def __getattr__(name: str):
  if name in __all__:
    from resnet_jax import models
    return getattr(models, name)
  raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
