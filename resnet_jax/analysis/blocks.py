"""Per-block measurements of a ResNet, taken from the outside with Flax method interceptors.

Nothing in the model changes: an interceptor sees every `ResidualBlock.__call__` (to add a
zero perturbation to the block's input, whose gradient is ∂L/∂input) and every
`finish_branch` (whose argument is the residual branch after its last norm, before the
addition). Blocks are named as in the variables (`layer2_0`, ...), in the order they run.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax.models import ResidualBlock, ResNet
from resnet_jax.training.steps import cross_entropy

PyTree = Any


def _block_method(context: nn.module.InterceptorContext, method: str) -> str | None:
  """The block's name if `context` is `method` of a residual block, else None."""
  if isinstance(context.module, ResidualBlock) and context.method_name == method:
    return context.module.name
  return None


def _apply(model: ResNet, variables: dict[str, PyTree], images: jax.Array, train: bool
           ) -> jax.Array:
  if train:  # batch statistics, as in a training step; the updated running stats are dropped
    return model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
  return model.apply(variables, images, train=False)


def block_input_shapes(model: ResNet, variables: dict[str, PyTree], images: jax.Array
                       ) -> dict[str, jax.ShapeDtypeStruct]:
  """The input shape of every residual block, in the order the blocks run."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    if name := _block_method(context, "__call__"):
      shapes[name] = jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: _apply(model, v, x, train=False), variables, images)
  return shapes


def block_gradients(model: ResNet, variables: dict[str, PyTree], images: jax.Array,
                    labels: jax.Array) -> tuple[dict[str, float], dict[str, float]]:
  """L2 norms of ∂L/∂(each block's input) and of ∂L/∂(each block's params), on one batch.

  L is the mean cross-entropy of a training-mode forward pass (BatchNorm on batch
  statistics), the loss a training step differentiates. `images` are normalised floats.
  """
  shapes = block_input_shapes(model, variables, images)
  names = list(shapes)
  zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

  @jax.jit
  def grads(variables, perturbations, images, labels):
    def loss_fn(params, perturbations):
      def perturb(next_fun, args, kwargs, context):
        if name := _block_method(context, "__call__"):
          args = (args[0] + perturbations[name], *args[1:])
        return next_fun(*args, **kwargs)

      with nn.intercept_methods(perturb):
        logits = _apply(model, {**variables, "params": params}, images, train=True)
      return jnp.mean(cross_entropy(logits, labels))

    param_grads, input_grads = jax.grad(loss_fn, argnums=(0, 1))(variables["params"],
                                                                 perturbations)
    return ({name: jnp.linalg.norm(input_grads[name].ravel()) for name in names},
            {name: optax.global_norm(param_grads[name]) for name in names})

  input_norms, param_norms = jax.device_get(grads(variables, zeros, images, labels))
  return ({n: float(input_norms[n]) for n in names}, {n: float(param_norms[n]) for n in names})


def branch_response_stds(model: ResNet, variables: dict[str, PyTree], images: jax.Array, *,
                         train: bool = False) -> dict[str, float]:
  """Standard deviation of each block's residual branch output (after its last norm).

  He et al. (2015), Fig. 7. `train=False` uses the running BatchNorm statistics, as for a
  trained network; `train=True` the batch's own (meaningful at initialisation, where the
  running statistics are still their initial values).
  """

  @jax.jit
  def stds(variables, images):
    responses = {}

    def record(next_fun, args, kwargs, context):
      if name := _block_method(context, "finish_branch"):
        responses[name] = jnp.std(args[0].astype(jnp.float32))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      _apply(model, variables, images, train=train)
    return responses

  result = jax.device_get(stds(variables, images))
  order = list(block_input_shapes(model, variables, images))
  return {name: float(result[name]) for name in order}
