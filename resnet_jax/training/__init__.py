"""The training core as a library: a train state, the pure train and eval steps, the input
transform (see `examples/custom_loop.py` for a loop of your own around them).

  from resnet_jax import create_model
  from resnet_jax.training import InputTransform, create_train_state, eval_step, train_step

- `create_train_state(rng, model, tx, image_shape)`: params, BatchNorm statistics, optax
  state and the step's PRNG key, for (H, W, C) images.
- `train_step(state, batch, *, learning_rate_fn, inputs)`: one update on `batch`
  ({"image": uint8 [N, H, W, C] pixels 0–255, "label": int [N]}); returns the new state and
  the batch's mean metrics. Pure: jit it (or pmap it with `axis_name`).
- `eval_step(state, batch, *, inputs)`: sums of loss, correct, top-5 correct and count over
  the examples with batch["mask"] == 1.
- `InputTransform(mean, std)`: uint8 pixels → (x / 255 − mean) / std (mean and std in [0, 1]
  units); without them x / 255.
Weights: `resnet_jax.pretrained.save` and `.load`. Names load on first use, so importing a
submodule (`resnet_jax.training.startup`) does not load TensorFlow through the input code.
"""

__all__ = ["InputTransform", "TrainState", "create_train_state", "eval_step", "train_step"]


def __getattr__(name: str):
  if name == "InputTransform":
    from resnet_jax.data.device_ops import InputTransform
    return InputTransform
  if name in ("TrainState", "create_train_state"):
    from resnet_jax.training import train_state
    return getattr(train_state, name)
  if name in ("eval_step", "train_step"):
    from resnet_jax.training import steps
    return getattr(steps, name)
  raise AttributeError(f"module 'resnet_jax.training' has no attribute {name!r}")
