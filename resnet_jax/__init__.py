"""resnet_jax: the ResNet family in Flax linen, with a pure-functional JAX training program.

`ResNet`, `create_model` and `list_models` load on first use, so that importing a light
module such as `resnet_jax.malloc_tuning` does not import JAX and Flax.

Bucket paths (gs://, s3://) go through fsspec, the backend the tests run against a local
emulator, unless the user set EPATH_USE_TF (see `resnet_jax.storage.paths`). etils reads the
variable once, at its first path operation, so it is set here, before anything uses a path.
"""

import os

os.environ.setdefault("EPATH_USE_TF", "false")

__all__ = ["ResNet", "create_model", "list_models"]


def __getattr__(name: str):
  if name in __all__:
    from resnet_jax import models
    return getattr(models, name)
  raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
