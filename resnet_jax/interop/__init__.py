"""Weight conversion between resnet_jax variables and other libraries' layouts."""

from resnet_jax.interop.torchvision import TORCHVISION_MODELS, from_state_dict, to_state_dict

__all__ = ["TORCHVISION_MODELS", "from_state_dict", "to_state_dict"]
