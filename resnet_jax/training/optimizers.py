"""Learning-rate schedules and optimizers, built from the config.

Schedules count optimizer updates: with gradient accumulation, `optax.MultiSteps` only
advances the inner optimizer (and so the schedule) once every `grad_accum_steps` calls.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from resnet_jax.training import config as config_lib

Hyperparameter = float | jax.Array  # a Python number, or a traced per-member value
REFERENCE_BATCH_SIZE = 256  # The linear scaling rule's reference batch (Goyal et al., 2017).


def base_learning_rate(config: ml_collections.ConfigDict,
                       learning_rate: Hyperparameter | None = None) -> Hyperparameter:
  """The peak learning rate (`learning_rate`, else config's), scaled by the batch per
  optimizer update when asked to."""
  learning_rate = config.learning_rate if learning_rate is None else learning_rate
  if not config.scale_learning_rate_by_batch:
    return learning_rate
  batch_per_update = config.batch_size * config.grad_accum_steps
  return learning_rate * batch_per_update / REFERENCE_BATCH_SIZE


def _decay_schedule(config: ml_collections.ConfigDict, peak: Hyperparameter, warmup_steps: int,
                    total_steps: int) -> optax.Schedule:
  """The schedule after warmup; its step counts from the end of warmup."""
  decay_steps = max(total_steps - warmup_steps, 1)
  if config.schedule == "constant":
    return optax.constant_schedule(peak)
  if config.schedule == "cosine":
    known_zero = isinstance(peak, (int, float)) and peak == 0  # (a traced peak is not known)
    alpha = config.end_learning_rate / peak if config.end_learning_rate and not known_zero else 0.0
    return optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
  if config.schedule == "step":
    scales = {boundary - warmup_steps: config.step_decay_factor
              for boundary in config.step_decay_boundaries}
    return optax.piecewise_constant_schedule(peak, scales)
  if config.schedule == "polynomial":
    return optax.polynomial_schedule(peak, config.end_learning_rate, config.polynomial_power,
                                     decay_steps)
  raise ValueError(f"config.schedule={config.schedule!r}: must be one of "
                   f"{', '.join(config_lib.SCHEDULES)}")


def create_learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                                  total_steps: int, learning_rate: Hyperparameter | None = None
                                  ) -> optax.Schedule:
  """Warm-up over `warmup_epochs` (linear from 0, or at `warmup_learning_rate`), then
  `config.schedule`.

  `steps_per_epoch`, `total_steps` and `step_decay_boundaries` are in optimizer updates.
  `learning_rate` replaces `config.learning_rate` (a population member's, maybe traced).
  """
  peak = base_learning_rate(config, learning_rate)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  warmup = (optax.linear_schedule(0.0, peak, warmup_steps) if config.warmup_learning_rate < 0
            else optax.constant_schedule(config.warmup_learning_rate))
  decay = _decay_schedule(config, peak, warmup_steps, total_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for conv and dense kernels; False for biases and norm scales/offsets.

  By name, not ndim: scanned blocks (`scan_blocks`) stack norm scales into 2-D arrays.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def _with_weight_decay(gradient_statistics: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, learning_rate: optax.Schedule,
                       weight_decay: Hyperparameter, decay_mask: Any
                       ) -> optax.GradientTransformation:
  """Adds weight decay before the statistics ("l2") or after them ("decoupled")."""
  decay = optax.add_decayed_weights(weight_decay, mask=decay_mask)
  scale = optax.scale_by_learning_rate(learning_rate)
  if config.weight_decay_mode == "l2":
    return optax.chain(decay, gradient_statistics, scale)
  if config.weight_decay_mode == "decoupled":
    return optax.chain(gradient_statistics, decay, scale)
  raise ValueError(f"config.weight_decay_mode={config.weight_decay_mode!r}: must be one of "
                   f"{', '.join(config_lib.WEIGHT_DECAY_MODES)}")


def _base_optimizer(config: ml_collections.ConfigDict, learning_rate: optax.Schedule,
                    weight_decay: Hyperparameter) -> optax.GradientTransformation:
  """The optimizer named by `config.optimizer`, with its weight decay."""
  decay_mask = True if config.weight_decay_on_norm_and_bias else weight_decay_mask
  if config.optimizer == "sgd":
    momentum = optax.trace(decay=config.momentum, nesterov=config.nesterov)
    return _with_weight_decay(momentum, config, learning_rate, weight_decay, decay_mask)
  if config.optimizer == "adamw":
    adam = optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    return _with_weight_decay(adam, config, learning_rate, weight_decay, decay_mask)
  if config.optimizer == "lars":
    # As in MLPerf, biases and norm parameters also skip the trust ratio.
    return optax.lars(learning_rate, weight_decay=weight_decay,
                      weight_decay_mask=decay_mask,
                      trust_coefficient=config.lars_trust_coefficient,
                      trust_ratio_mask=weight_decay_mask, momentum=config.momentum,
                      nesterov=config.nesterov)
  if config.optimizer == "lamb":
    return optax.lamb(learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=weight_decay, mask=decay_mask)
  raise ValueError(f"config.optimizer={config.optimizer!r}: must be one of "
                   f"{', '.join(config_lib.OPTIMIZERS)}")


def head_or_backbone(params: Any) -> Any:
  """Labels every parameter "head" (the classifier, fc) or "backbone" (everything else)."""
  return {name: jax.tree.map(lambda _, n=name: "head" if n == "fc" else "backbone", sub)
          for name, sub in params.items()}


def _fine_tuning_optimizer(config: ml_collections.ConfigDict, learning_rate: optax.Schedule,
                           weight_decay: Hyperparameter) -> optax.GradientTransformation:
  """The optimizer for the head; the backbone's is frozen or runs at a scaled learning rate."""
  head = _base_optimizer(config, learning_rate, weight_decay)
  if not config.freeze_backbone and config.backbone_learning_rate_scale == 1.0:
    return head
  if config.freeze_backbone:
    backbone = optax.set_to_zero()
  else:
    scale = config.backbone_learning_rate_scale
    backbone = _base_optimizer(config, lambda step: scale * learning_rate(step), weight_decay)
  return optax.multi_transform({"head": head, "backbone": backbone}, head_or_backbone)


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_schedule: optax.Schedule,
                     weight_decay: Hyperparameter | None = None) -> optax.GradientTransformation:
  """Clipping, then the optimizer, wrapped in gradient accumulation when asked to.

  `weight_decay_mode` applies to sgd and adamw; lars and lamb use their own weight decay
  (lars adds it before the trust ratio, lamb after the Adam statistics). With
  `freeze_backbone` or `backbone_learning_rate_scale`, the backbone's updates are zero or
  scaled (weight decay included) and its optimizer state is its own. `weight_decay`
  replaces `config.weight_decay` (a population member's, maybe traced); the optimizer state's
  structure does not depend on it.
  """
  weight_decay = config.weight_decay if weight_decay is None else weight_decay
  tx = _fine_tuning_optimizer(config, learning_rate_schedule, weight_decay)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps).gradient_transformation()
  return tx
