"""The training configuration: every key with its default, and validation up front.

Config files in `configs/` start from `base_config()` and change what they need, so the
set of keys (and their types) is defined in exactly one place. `validate_config` runs
before anything is traced or compiled and names the offending key in its error.
"""

from __future__ import annotations

import os

import ml_collections

from resnet_jax.data.pipeline import PRESETS
from resnet_jax.models.layers import LAYER_IMPLS
from resnet_jax.models.scan import REMAT_POLICIES

PARALLELISM_MODES = ("jit", "pmap")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "lars", "adamw", "lamb")
SCHEDULES = ("constant", "cosine", "step", "polynomial")
WEIGHT_DECAY_MODES = ("l2", "decoupled")
NAN_POLICIES = ("stop", "skip")
WRITE_ERROR_POLICIES = ("stop", "continue")
POPULATION_MODES = ("auto", "vmap", "loop")


def base_config() -> ml_collections.ConfigDict:
  """Returns the full set of training keys with their defaults."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "resnet20"
  c.num_classes = 0  # 0: take it from the dataset.
  c.zero_init_residual = False
  c.drop_path_rate = 0.0
  c.dtype = "float32"  # compute dtype; params and BatchNorm statistics stay float32.
  c.layer_impl = "auto"  # "onednn", "tuned" (faster on CPU: see models/layers.py), "plain".
  c.scan_blocks = False  # each stage's repeated blocks as one nn.scan: compiles faster.
  c.remat = False  # recompute each block's activations in the backward pass: less memory.
  c.remat_policy = "nothing_saveable"  # what remat keeps: one of models.scan.REMAT_POLICIES.

  # Fine-tuning (from a workdir, a checkpoint, or the output of resnet_jax.convert).
  c.init_from = ""  # start from these weights (a checkpoint in the workdir still wins).
  c.replace_head = False  # a new fc for this dataset's classes instead of the loaded one.
  c.freeze_backbone = False  # train only fc.
  c.backbone_learning_rate_scale = 1.0  # everything but fc learns at this × learning_rate.
  c.freeze_batch_stats = False  # BatchNorm in eval mode while training (small batches).

  # Data.
  c.dataset = "digits"  # "digits", "fake", "folder:PATH", or a tfds name ("cifar10", ...)
  c.data_dir = ""  # "": tfds' default data dir (folders are prepared into it too).
  c.holdout_fraction = 0.1  # folder:PATH without val/ or test/: held out of each class.
  c.image_size = 0  # 0: the dataset's native size (224 for large images).
  c.batch_size = 128  # global, across all devices and processes.
  c.eval_batch_size = 0  # 0: same as batch_size.
  c.augment = True
  c.preprocessing = "auto"  # "cifar", "translate", "imagenet"; "auto": by dataset/image size.
  c.mixup_alpha = 0.0  # > 0: mixup with Beta(alpha, alpha), on the device.
  c.cutmix_alpha = 0.0  # > 0: CutMix with Beta(alpha, alpha), on the device.
  c.mix_probability = 1.0  # of mixing a batch (with both on, mixup or CutMix at random).
  c.cutout_size = 0  # > 0: cutout, a square of this side zeroed in each train image.
  c.shuffle_buffer = 0  # records shuffled together; 0: the epoch, up to 1 GiB of records.
  c.cache = False  # keep this process's encoded records in memory (small datasets).
  c.data_threads = 0  # tf.data decoding threads; 0: autotuned.
  c.prefetch_batches = 2  # batches put on the devices ahead of the step.

  # Length of training.
  c.num_epochs = 1.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.

  # Optimiser.
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.scale_learning_rate_by_batch = False  # lr * batch_size / 256.
  c.momentum = 0.9
  c.nesterov = False
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.lars_trust_coefficient = 0.001
  c.weight_decay = 1e-4
  c.weight_decay_mode = "l2"
  c.weight_decay_on_norm_and_bias = False
  c.grad_clip_norm = 0.0  # 0: no clipping.
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.ema_decay = 0.0  # 0: no EMA; otherwise eval uses the EMA of params.

  # Learning-rate schedule.
  c.schedule = "cosine"
  c.warmup_epochs = 0.0
  # -1: warm up linearly from 0 to learning_rate; >= 0: at this constant learning rate, as
  # He et al. (2015) warmed up ResNet-110 on CIFAR-10 (0.01 for ~400 steps).
  c.warmup_learning_rate = -1.0
  c.step_decay_boundaries = ()  # optimizer steps where lr is multiplied by step_decay_factor.
  c.step_decay_factor = 0.1
  c.polynomial_power = 2.0
  c.end_learning_rate = 0.0

  # Parallelism and numerics.
  c.parallelism = "jit"
  c.loss_scale_init = 2.0**15  # float16 only.
  # A step whose loss or gradients are not finite: "stop" (exit non-zero, no checkpoint of
  # it) or "skip" (leave the state as it was; stop after max_consecutive_skips in a row).
  c.nan_policy = "stop"
  c.max_consecutive_skips = 10
  c.seed = 0
  c.data_seed = -1  # the input stream's order and augmentation; -1: the same as seed.

  # Populations: population_size members, member i being the run with seed + i (and its own
  # learning rate and weight decay when these lists give one per member), trained together
  # on the one input stream that data_seed makes (training/population.py).
  c.population_size = 1
  c.population_learning_rates = ()  # (): every member at learning_rate
  c.population_weight_decays = ()  # (): every member at weight_decay
  c.population_mode = "auto"  # "vmap", "loop" (members one after another); auto: by backend
  # Compiled programs are kept here and reused by the next run ("": no cache); JAX's own
  # JAX_COMPILATION_CACHE_DIR, when set, is the default. Whoever can write to it can run
  # code in your runs: keep it private.
  c.compilation_cache_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                             or "~/.cache/resnet_jax/xla")

  # Logging, evaluation and checkpoints.
  c.log_every_steps = 50
  c.log_grad_norms = False  # per-stage gradient norms as train/grad_norm/* metrics.
  c.eval_every_steps = 0  # 0: once per epoch.
  c.checkpoint_every_steps = 0  # 0: once per epoch.
  c.keep_checkpoints = 3
  c.on_write_error = "stop"  # a failed checkpoint or metrics write: "stop" (exit 1) or "continue".
  c.best_checkpoint_metric = "eval/accuracy"
  c.progress_bar = True
  c.linear_probe_dataset = ""  # a dataset name: few-shot linear probes at every evaluation.
  c.linear_probe_shots = (1, 5, 10, 25)  # training examples per class for those probes.
  # Resume even though keys that change the result differ from the workdir's record
  # (runs.jsonl; see training/run_record.py); the change is recorded.
  c.allow_config_change = False
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first key whose value cannot work."""

  def check(ok: bool, key: str, message: str) -> None:
    if not ok:
      raise ValueError(f"config.{key}={config[key]!r}: {message}")

  def one_of(key: str, choices: tuple[str, ...]) -> None:
    check(config[key] in choices, key, f"must be one of {', '.join(choices)}")

  known = set(base_config().keys())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"Unknown config key(s) {unknown}; known keys: {sorted(known)}")
  one_of("parallelism", PARALLELISM_MODES)
  one_of("dtype", DTYPES)
  one_of("optimizer", OPTIMIZERS)
  one_of("schedule", SCHEDULES)
  one_of("weight_decay_mode", WEIGHT_DECAY_MODES)
  one_of("nan_policy", NAN_POLICIES)
  one_of("on_write_error", WRITE_ERROR_POLICIES)
  one_of("preprocessing", PRESETS)
  one_of("layer_impl", LAYER_IMPLS)
  check(0 <= config.holdout_fraction < 1, "holdout_fraction", "must be in [0, 1)")
  check(config.mixup_alpha >= 0, "mixup_alpha", "must be >= 0 (0 disables mixup)")
  check(config.cutmix_alpha >= 0, "cutmix_alpha", "must be >= 0 (0 disables CutMix)")
  check(0 <= config.mix_probability <= 1, "mix_probability", "must be in [0, 1]")
  check(config.cutout_size >= 0, "cutout_size", "must be >= 0 (0 disables cutout)")
  check(config.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0 (0: the epoch, up to 1 GiB)")
  check(config.data_threads >= 0, "data_threads", "must be >= 0 (0: autotuned)")
  check(config.prefetch_batches >= 0, "prefetch_batches", "must be >= 0")
  check(config.batch_size > 0, "batch_size", "must be positive")
  check(config.eval_batch_size >= 0, "eval_batch_size", "must be >= 0")
  check(config.num_classes >= 0, "num_classes", "must be >= 0 (0 takes it from the dataset)")
  check(config.image_size >= 0, "image_size", "must be >= 0 (0 is the dataset's size)")
  check(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs",
        "must be positive unless num_train_steps > 0")
  check(config.learning_rate >= 0, "learning_rate", "must be >= 0")
  check(config.weight_decay >= 0, "weight_decay", "must be >= 0")
  check(0 <= config.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
  check(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1)")
  check(0 <= config.drop_path_rate < 1, "drop_path_rate", "must be in [0, 1)")
  one_of("remat_policy", REMAT_POLICIES)
  check(not (config.scan_blocks and config.optimizer in ("lars", "lamb")), "optimizer",
        "computes trust ratios per variable, so with config.scan_blocks=True one ratio would "
        "cover a stage's stacked blocks; use sgd or adamw, or scan_blocks=False")
  check(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
  check(config.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 disables clipping)")
  check(config.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
  check(config.warmup_learning_rate >= 0 or config.warmup_learning_rate == -1,
        "warmup_learning_rate", "must be >= 0, or -1 (linear warm-up from 0)")
  check(config.log_every_steps > 0, "log_every_steps", "must be positive")
  check(config.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  check(config.loss_scale_init > 0, "loss_scale_init", "must be positive")
  check(config.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
  check(not config.replace_head or config.init_from, "replace_head",
        "needs config.init_from (the weights whose head it replaces)")
  check(all(k >= 1 for k in config.linear_probe_shots), "linear_probe_shots",
        "every shot count must be >= 1")
  check(config.data_seed >= -1, "data_seed", "must be >= 0, or -1 (the same as seed)")
  check(config.population_size >= 1, "population_size", "must be >= 1")
  one_of("population_mode", POPULATION_MODES)
  for key in ("population_learning_rates", "population_weight_decays"):
    values = tuple(config[key])
    if values:
      check(config.population_size > 1 and len(values) == config.population_size, key,
            f"needs one value per member: {config.population_size} "
            f"(config.population_size); for a single run set {key[len('population_'):-1]}")
      check(all(v >= 0 for v in values), key, "every value must be >= 0")
  check(config.population_size == 1 or not config.linear_probe_dataset, "linear_probe_dataset",
        "linear probes are not run for populations (config.population_size > 1); probe a member "
        "after training with python -m resnet_jax.linear_probe")
  check(config.backbone_learning_rate_scale >= 0, "backbone_learning_rate_scale",
        "must be >= 0")
  check(not (config.freeze_backbone and config.backbone_learning_rate_scale != 1.0),
        "backbone_learning_rate_scale", "conflicts with config.freeze_backbone=True; set one")
