"""Why residual learning works, measured: gradient flow and layer responses per block.

`python -m resnet_jax.analysis gradient-flow ...` and `... layer-responses ...` write a CSV
and a PNG; `block_gradients` and `branch_response_stds` are the same measurements from Python.
"""

from resnet_jax.analysis.blocks import block_gradients, branch_response_stds

__all__ = ["block_gradients", "branch_response_stds"]
