"""resnet_jax: the ResNet family in Flax linen, with a pure-functional JAX training program."""

from resnet_jax.models import ResNet, create_model, list_models

__all__ = ["ResNet", "create_model", "list_models"]
