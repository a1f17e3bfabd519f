"""Specifications for learning-rate schedules and optimizers."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from resnet_jax.training import config as config_lib
from resnet_jax.training import optimizers

LR = 0.5
WD = 0.1
MOMENTUM = 0.9


def make_config(**overrides: Any) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.update(overrides)
  return config


def constant_lr_config(**overrides: Any) -> ml_collections.ConfigDict:
  defaults = dict(learning_rate=LR, weight_decay=WD, momentum=MOMENTUM, schedule="constant")
  return make_config(**{**defaults, **overrides})


def run_steps(config: ml_collections.ConfigDict, params: Any, grads: list[Any]) -> Any:
  """Applies one optimizer call per gradient tree and returns the final params."""
  tx = optimizers.create_optimizer(config, optimizers.create_learning_rate_schedule(
      config, steps_per_epoch=10, total_steps=100))
  state = tx.init(params)
  for grad in grads:
    updates, state = tx.update(grad, state, params)
    params = optax.apply_updates(params, updates)
  return params


def schedule_values(config: ml_collections.ConfigDict, steps: list[int], *,
                    steps_per_epoch: int = 10, total_steps: int = 100) -> np.ndarray:
  schedule = optimizers.create_learning_rate_schedule(config, steps_per_epoch, total_steps)
  return np.array([schedule(step) for step in steps])


def test_warmup_is_linear_and_reaches_base_learning_rate():
  config = make_config(learning_rate=0.1, schedule="constant", warmup_epochs=2.0)
  values = schedule_values(config, list(range(21)), steps_per_epoch=10)
  chex.assert_trees_all_close(values, np.linspace(0.0, 0.1, 21), atol=1e-7)


def test_a_constant_warmup_holds_its_learning_rate_then_steps_to_the_peak():
  # The paper's ResNet-110: 0.01 for ~400 steps, then 0.1 (÷10 at the boundaries).
  config = make_config(learning_rate=0.1, schedule="step", warmup_epochs=1.0,
                       warmup_learning_rate=0.01, step_decay_boundaries=(50,))
  values = schedule_values(config, [0, 9, 10, 49, 50], steps_per_epoch=10)
  chex.assert_trees_all_close(values, np.array([0.01, 0.01, 0.1, 0.1, 0.01]), atol=1e-8)


def test_cosine_ends_at_end_learning_rate():
  config = make_config(learning_rate=0.1, schedule="cosine", warmup_epochs=1.0,
                       end_learning_rate=0.001)
  peak, middle, end = schedule_values(config, [10, 55, 100], steps_per_epoch=10,
                                      total_steps=100)
  chex.assert_trees_all_close((peak, middle, end), (0.1, 0.0505, 0.001), atol=1e-6)


def test_step_decay_divides_by_factor_at_each_boundary():
  config = make_config(learning_rate=0.1, schedule="step",
                       step_decay_boundaries=(32000, 48000), step_decay_factor=0.1)
  values = schedule_values(config, [0, 31999, 32000, 47999, 48000, 63999],
                           steps_per_epoch=391, total_steps=64000)
  chex.assert_trees_all_close(values, np.array([0.1, 0.1, 0.01, 0.01, 0.001, 0.001]),
                              rtol=1e-5)


def test_polynomial_decays_with_power_to_end_learning_rate():
  config = make_config(learning_rate=0.1, schedule="polynomial", polynomial_power=2.0,
                       end_learning_rate=0.01)
  values = schedule_values(config, [0, 50, 100, 120], total_steps=100)
  chex.assert_trees_all_close(values, np.array([0.1, 0.09 * 0.25 + 0.01, 0.01, 0.01]),
                              rtol=1e-5)


def test_base_learning_rate_is_unscaled_by_default():
  assert optimizers.base_learning_rate(make_config(learning_rate=0.1, batch_size=1024)) == 0.1


def test_base_learning_rate_scales_linearly_with_batch_size():
  config = make_config(learning_rate=0.1, batch_size=1024, scale_learning_rate_by_batch=True)
  assert optimizers.base_learning_rate(config) == pytest.approx(0.4)


def test_base_learning_rate_scales_with_accumulated_batch():
  config = make_config(learning_rate=0.1, batch_size=256, grad_accum_steps=4,
                       scale_learning_rate_by_batch=True)
  assert optimizers.base_learning_rate(config) == pytest.approx(0.4)


class ConvBatchNormDense(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(2)(x.mean(axis=(1, 2)))


def test_weight_decay_mask_excludes_biases_and_batchnorm_params():
  variables = ConvBatchNormDense().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  mask = optimizers.weight_decay_mask(variables["params"])
  expected = {
      "Conv_0": {"kernel": True, "bias": False},
      "BatchNorm_0": {"scale": False, "bias": False},
      "Dense_0": {"kernel": True, "bias": False},
  }
  chex.assert_trees_all_equal(mask, expected)


def kernel_params() -> dict[str, jax.Array]:
  return {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]])}


def test_l2_and_decoupled_sgd_both_shrink_weights_by_lr_times_wd_on_first_zero_gradient():
  params = kernel_params()
  zero = jax.tree.map(jnp.zeros_like, params)
  for mode in ("l2", "decoupled"):
    new_params = run_steps(constant_lr_config(weight_decay_mode=mode), params, [zero])
    chex.assert_trees_all_close(new_params, {"kernel": params["kernel"] * (1 - LR * WD)})


def test_l2_sgd_feeds_weight_decay_through_momentum():
  w0 = kernel_params()["kernel"]
  g = jnp.array([[0.5, 0.5], [-1.0, 2.0]])
  m1 = g + WD * w0
  w1 = w0 - LR * m1
  m2 = g + WD * w1 + MOMENTUM * m1
  w2 = w1 - LR * m2
  params = run_steps(constant_lr_config(weight_decay_mode="l2"), {"kernel": w0},
                     [{"kernel": g}] * 2)
  chex.assert_trees_all_close(params, {"kernel": w2}, rtol=1e-6)


def test_decoupled_sgd_keeps_weight_decay_out_of_momentum():
  w0 = kernel_params()["kernel"]
  g = jnp.array([[0.5, 0.5], [-1.0, 2.0]])
  m1 = g
  w1 = w0 - LR * (m1 + WD * w0)
  m2 = g + MOMENTUM * m1
  w2 = w1 - LR * (m2 + WD * w1)
  params = run_steps(constant_lr_config(weight_decay_mode="decoupled"), {"kernel": w0},
                     [{"kernel": g}] * 2)
  chex.assert_trees_all_close(params, {"kernel": w2}, rtol=1e-6)


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_masked_params_are_not_decayed(optimizer: str):
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  new_params = run_steps(constant_lr_config(optimizer=optimizer), params, [zero])
  chex.assert_trees_all_equal(new_params["bias"], params["bias"])
  assert np.all(new_params["kernel"] < params["kernel"])


def test_weight_decay_on_norm_and_bias_decays_biases():
  params = {"bias": jnp.ones((2,))}
  new_params = run_steps(
      constant_lr_config(weight_decay_on_norm_and_bias=True, weight_decay_mode="decoupled"),
      params, [{"bias": jnp.zeros((2,))}])
  chex.assert_trees_all_close(new_params, {"bias": jnp.full((2,), 1 - LR * WD)})


def test_clipping_bounds_the_update_norm():
  params = {"kernel": jnp.zeros((2, 2))}
  config = constant_lr_config(learning_rate=1.0, weight_decay=0.0, grad_clip_norm=1.0)
  new_params = run_steps(config, params, [{"kernel": jnp.full((2, 2), 10.0)}])
  assert optax.global_norm(new_params) == pytest.approx(1.0, rel=1e-5)


def test_accumulating_micro_batches_equals_one_step_with_their_mean():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  micro_grads = [jax.tree.map(lambda p, i=i: (i + 1.0) * p - 0.5 * i, params) for i in range(3)]
  mean_grad = jax.tree.map(lambda *gs: sum(gs) / len(gs), *micro_grads)
  accumulated = run_steps(constant_lr_config(grad_accum_steps=3), params, micro_grads)
  single = run_steps(constant_lr_config(), params, [mean_grad])
  chex.assert_trees_all_close(accumulated, single, rtol=1e-6)


def test_accumulated_schedule_counts_optimizer_updates():
  # Warmup over 2 updates: the first update uses lr 0, the second lr/2.
  config = constant_lr_config(optimizer="sgd", momentum=0.0, weight_decay=0.0,
                              warmup_epochs=0.2, grad_accum_steps=2)
  params = {"kernel": jnp.zeros((2, 2))}
  grads = [{"kernel": jnp.ones((2, 2))}] * 4
  after_first = run_steps(config, params, grads[:2])
  after_second = run_steps(config, params, grads)
  chex.assert_trees_all_close(after_first, params)
  chex.assert_trees_all_close(after_second, {"kernel": jnp.full((2, 2), -LR / 2)})


def test_lars_gives_masked_params_the_plain_momentum_sgd_update():
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  grads = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.array([0.5, -1.0])}
  new_params = run_steps(constant_lr_config(optimizer="lars"), params, [grads])
  chex.assert_trees_all_close(new_params["bias"], params["bias"] - LR * grads["bias"])


def test_lars_scales_kernels_by_the_trust_ratio():
  params = {"kernel": jnp.ones((2, 2))}
  grads = {"kernel": jnp.full((2, 2), 0.5)}
  config = constant_lr_config(optimizer="lars", lars_trust_coefficient=0.01)
  decayed = grads["kernel"] + WD * params["kernel"]
  trust_ratio = 0.01 * jnp.linalg.norm(params["kernel"]) / jnp.linalg.norm(decayed)
  new_params = run_steps(config, params, [grads])
  chex.assert_trees_all_close(new_params["kernel"],
                              params["kernel"] - LR * trust_ratio * decayed, rtol=1e-6)


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
@pytest.mark.parametrize("mode", config_lib.WEIGHT_DECAY_MODES)
def test_each_optimizer_builds_and_runs_one_update(optimizer: str, mode: str):
  params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  new_params = run_steps(constant_lr_config(optimizer=optimizer, weight_decay_mode=mode),
                         params, [grads])
  chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
  chex.assert_tree_all_finite(new_params)
  assert not np.allclose(new_params["kernel"], params["kernel"])


@pytest.mark.parametrize("key", ["optimizer", "schedule", "weight_decay_mode"])
def test_unknown_name_raises_value_error_naming_the_key(key: str):
  config = constant_lr_config(**{key: "bogus"})
  with pytest.raises(ValueError, match=f"config.{key}='bogus'"):
    schedule = optimizers.create_learning_rate_schedule(config, 10, 100)
    optimizers.create_optimizer(config, schedule)
