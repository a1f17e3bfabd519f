"""resnet_jax: the ResNet family in Flax linen."""
