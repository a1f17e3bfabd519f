"""Weight conversion between resnet_jax variables and other libraries' layouts."""

from resnet_jax.interop.torchvision import (TORCHVISION_MODELS, StateDictMismatch,
                                            from_state_dict, to_state_dict)

__all__ = ["TORCHVISION_MODELS", "StateDictMismatch", "from_state_dict", "to_state_dict"]
