"""The train-and-evaluate loop: config → data → model → state → step → checkpoint.

Plain Python around the compiled steps. Everything it needs is built by `setup` (and
validated there, before anything compiles), so tests and notebooks can drive the same
pieces step by step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from resnet_jax import data, linear_probe, pretrained
from resnet_jax.data.device_ops import InputTransform
from resnet_jax.models import ResNet, create_model
from resnet_jax.models.layers import resolve_layer_impl
from resnet_jax.storage import paths
from resnet_jax.training import (checkpointing, optimizers, parallel, population, preemption,
                                 reporting, run_record, startup, steps)
from resnet_jax.training.config import validate_config
from resnet_jax.training.train_state import TrainState, create_train_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a run is made of, derived once from the config."""

  config: ml_collections.ConfigDict
  dataset: data.DatasetInfo
  image_size: int
  preprocessing: str  # the preset, "auto" resolved
  model: ResNet
  steps_per_epoch: int  # train steps (batches), not optimizer updates
  total_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  train_step: Callable  # the pure step (what data_parallel compiles), for tools and tests
  data_parallel: parallel.DataParallel
  initial_state: TrainState  # replicated; shapes and dtypes only with `abstract_state`
  make_initial_state: Callable[[], TrainState]  # builds the concrete one (initialises)
  probe_dataset: data.DatasetInfo | None  # for few-shot linear probes at each evaluation
  start_note: str  # how a run without a checkpoint starts: "from scratch", or which weights


def setup(config: ml_collections.ConfigDict, dataset: data.DatasetInfo | None = None,
          abstract_state: bool = False) -> Experiment:
  """Validates the config against the dataset, model and devices; builds the steps.

  A dry run plans without data or memory: it passes the `dataset`'s info instead of
  reading it. `abstract_state` makes the initial state `jax.ShapeDtypeStruct`s (the dry run,
  and the loop, which builds it with `make_initial_state` only when there is no checkpoint).
  """
  validate_config(config)
  info = dataset or data.get_dataset_info(config.dataset, config.data_dir or None,
                                          holdout_fraction=config.holdout_fraction)
  parallel.check_batch_divisible(config.batch_size)
  parallel.check_batch_divisible(config.eval_batch_size or config.batch_size, "eval_batch_size")
  image_size = config.image_size or info.image_shape[0]
  init_weights = load_init_weights(config)
  model = create_model(
      config.model, num_classes=config.num_classes or info.num_classes,
      in_channels=info.image_shape[2], dtype=DTYPES[config.dtype],
      axis_name=parallel.model_axis_name(config.parallelism),
      zero_init_residual=config.zero_init_residual, drop_path_rate=config.drop_path_rate,
      freeze_batch_stats=config.freeze_batch_stats, layer_impl=config.layer_impl,
      scan_blocks=config.scan_blocks, remat=config.remat, remat_policy=config.remat_policy)
  if config.cutout_size > image_size:
    raise ValueError(f"config.cutout_size={config.cutout_size} is larger than the "
                     f"{image_size}-pixel images: it would erase them whole")
  if image_size < model.min_image_size:
    raise ValueError(f"config.image_size={image_size} is too small for {config.model}: it "
                     f"needs at least {model.min_image_size} pixels per side")

  probe_dataset = None
  if config.linear_probe_dataset:
    probe_dataset = data.get_dataset_info(config.linear_probe_dataset, config.data_dir or None)
    if probe_dataset.image_shape[2] != info.image_shape[2]:
      raise ValueError(f"config.linear_probe_dataset={config.linear_probe_dataset!r} has "
                       f"{probe_dataset.image_shape[2]}-channel images but {config.dataset} "
                       f"has {info.image_shape[2]}")

  steps_per_epoch = data.steps_per_epoch(info, config.batch_size)
  if steps_per_epoch == 0:
    devices = jax.device_count()
    largest = info.num_train_examples // devices * devices  # divisible among the devices
    way_on = (f"use --config.batch_size={largest} or smaller (a multiple of the {devices} "
              f"device(s))" if largest else f"fewer than the {devices} devices")
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{info.num_train_examples} training examples of {config.dataset}: "
                     f"{way_on}")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  accum = config.grad_accum_steps

  def make_optimizer(learning_rate=None, weight_decay=None):
    schedule = optimizers.create_learning_rate_schedule(
        config, steps_per_epoch=max(steps_per_epoch // accum, 1),
        total_steps=max(total_steps // accum, 1), learning_rate=learning_rate)
    return optimizers.create_optimizer(config, schedule, weight_decay), schedule

  tx, schedule = make_optimizer()
  make_member_state = functools.partial(
      create_train_state, model=model, tx=tx,
      image_shape=(image_size, image_size, info.image_shape[2]), use_ema=config.ema_decay > 0,
      loss_scale=config.loss_scale_init if config.dtype == "float16" else None)
  is_population = config.population_size > 1
  seeds = population.member_seeds(config)

  def make_state() -> TrainState:  # a population: one state per member, stacked
    if not is_population:
      return make_member_state(jax.random.PRNGKey(config.seed))
    return jax.vmap(make_member_state)(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))

  def make_initial_state() -> TrainState:
    state = make_state()
    if init_weights is not None:
      if is_population:
        state = population.stack([start_from(init_weights, population.member(state, i),
                                             config.replace_head) for i in range(len(seeds))])
      else:
        state = start_from(init_weights, state, config.replace_head)
    return parallel.replicate(state)

  state = jax.eval_shape(make_state) if abstract_state else make_initial_state()

  inputs = InputTransform(
      mean=info.mean, std=info.std, dtype=DTYPES[config.dtype], mixup_alpha=config.mixup_alpha,
      cutmix_alpha=config.cutmix_alpha, mix_probability=config.mix_probability,
      cutout_size=config.cutout_size)
  train_step = functools.partial(
      steps.train_step, inputs=inputs, learning_rate_fn=schedule,
      label_smoothing=config.label_smoothing, ema_decay=config.ema_decay, grad_accum_steps=accum,
      log_grad_norms=config.log_grad_norms, skip_non_finite=config.nan_policy == "skip")
  eval_step = functools.partial(steps.eval_step, inputs=inputs)
  if is_population:
    data_parallel, train_step = population.make_data_parallel(
        config.parallelism, population.make_member_step(train_step, make_optimizer), eval_step,
        population.hyperparameters(config), population.resolve_mode(config.population_mode))
  else:
    data_parallel = parallel.make_data_parallel(config.parallelism, train_step, eval_step)
  return Experiment(
      config=config, dataset=info, image_size=image_size,
      preprocessing=data.resolve_preprocessing(info, config.preprocessing),
      model=model,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      eval_every_steps=config.eval_every_steps or steps_per_epoch,
      checkpoint_every_steps=config.checkpoint_every_steps or steps_per_epoch,
      train_step=train_step,
      data_parallel=data_parallel,
      initial_state=state,
      make_initial_state=make_initial_state,
      probe_dataset=probe_dataset,
      start_note=describe_start(config, init_weights, model.num_classes))


def load_init_weights(config: ml_collections.ConfigDict) -> pretrained.Pretrained | None:
  """The weights `config.init_from` names (None without it), checked to be `config.model`'s."""
  if not config.init_from:
    return None
  weights = pretrained.load(config.init_from)
  if weights.info.model != config.model:
    raise ValueError(f"config.init_from={config.init_from!r} holds {weights.info.model} weights "
                     f"but config.model={config.model!r}; set config.model="
                     f"{weights.info.model!r} or start from {config.model} weights")
  return weights


def describe_start(config: ml_collections.ConfigDict, weights: pretrained.Pretrained | None,
                   num_classes: int) -> str:
  """How a run without a checkpoint starts: from scratch, or what it loads and changes."""
  if weights is None:
    return "from scratch"
  info = weights.info
  note = (f"from the {info.model} weights in {weights.path} ({info.num_classes} classes"
          f"{f' of {info.source}' if info.source else ''}; "
          f"{len(jax.tree.leaves(weights.variables))} arrays loaded)")
  if config.replace_head:
    note += f", fc replaced by a new {num_classes}-class head"
  if config.freeze_backbone:
    note += ", backbone frozen (only fc trains)"
  elif config.backbone_learning_rate_scale != 1:
    note += f", backbone at {config.backbone_learning_rate_scale:g}× the learning rate"
  if config.freeze_batch_stats:
    note += ", BatchNorm statistics frozen"
  return note


def start_from(weights: pretrained.Pretrained, state: TrainState,
               replace_head: bool) -> TrainState:
  """`state` with `weights` (and a fresh head with `replace_head`); raises if they don't fit."""
  variables = pretrained.merge(state.variables, weights.variables, replace_head=replace_head,
                               source=weights.path)
  params = variables["params"]
  return state.replace(
      params=params, batch_stats=variables["batch_stats"], opt_state=state.tx.init(params),
      ema_params=None if state.ema_params is None else jax.tree.map(np.copy, params))


def model_info(exp: Experiment) -> pretrained.ModelInfo:
  """What a checkpoint of this run holds: model, classes and the input it expects."""
  return pretrained.ModelInfo(
      model=exp.config.model, num_classes=exp.model.num_classes,
      in_channels=exp.model.in_channels, image_size=exp.image_size,
      preprocessing=exp.preprocessing, mean=tuple(exp.dataset.mean),
      std=tuple(exp.dataset.std), class_names=tuple(exp.dataset.class_names),
      source=exp.config.dataset, population_size=exp.config.population_size)


def train_batches(exp: Experiment, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's slices of the global train batches, from batch `start_batch` on."""
  c = exp.config
  return data.train_batches(
      exp.dataset, global_batch_size=c.batch_size, image_size=exp.image_size,
      seed=population.data_seed(c),
      start_batch=start_batch, augment=c.augment, process_index=jax.process_index(),
      process_count=jax.process_count(), preprocessing=exp.preprocessing,
      shuffle_buffer=c.shuffle_buffer, cache=c.cache, num_threads=c.data_threads)


def evaluate(exp: Experiment, state: TrainState) -> dict[str, float]:
  """Loss and accuracies over the whole eval split, each example counted once."""
  c = exp.config
  batches = data.eval_batches(
      exp.dataset, global_batch_size=c.eval_batch_size or c.batch_size,
      image_size=exp.image_size, process_index=jax.process_index(),
      process_count=jax.process_count(), preprocessing=exp.preprocessing, cache=c.cache,
      num_threads=c.data_threads)
  dp = exp.data_parallel
  sums = [dp.eval_step(state, batch)
          for batch in parallel.prefetch_to_devices(batches, dp.put_batch, c.prefetch_batches)]
  total = jax.tree.map(lambda *xs: np.sum(jax.device_get(xs), axis=0, dtype=np.float64), *sums)
  if c.population_size > 1:  # each member's, then their mean, spread and each on its own
    by_member = [steps.summarize_eval(population.member(total, i), exp.model.num_classes)
                 for i in range(c.population_size)]
    return population.summarize({k: [m[k] for m in by_member] for k in by_member[0]})
  metrics = steps.summarize_eval(total, exp.model.num_classes)
  if exp.probe_dataset is not None:  # every process probes the whole dataset, on its own
    variables = jax.tree.map(parallel.local_copy, dp.get_state(state).eval_variables)
    metrics.update(linear_probe.probe(
        exp.model, variables, exp.probe_dataset, image_size=exp.image_size,
        shots=c.linear_probe_shots, batch_size=c.eval_batch_size or c.batch_size))
  return metrics


def data_position(exp: Experiment, step: int) -> dict[str, Any]:
  """The checkpointed position in the data stream: enough to continue it exactly."""
  c = exp.config
  stored = exp.dataset.builder_dir.rstrip(os.sep).split(os.sep)
  return {"dataset": c.dataset, "dataset_version": "/".join(stored[-2:]),  # name/version
          "seed": population.data_seed(c), "global_batch_size": c.batch_size,
          "image_size": exp.image_size, "augment": c.augment,
          "preprocessing": exp.preprocessing, "shuffle_buffer": c.shuffle_buffer,
          "next_batch": step}


def resume_batch(exp: Experiment, saved: dict[str, Any], step: int) -> int:
  """Where to continue the data stream; warns when the stream itself has changed."""
  expected = data_position(exp, step)
  changed = sorted(k for k in expected if k != "next_batch" and saved.get(k) != expected[k])
  if changed:
    logging.warning("The data stream changed since the checkpoint (%s); continuing at the same "
                    "number of examples, but not with the exact same batches.",
                    ", ".join(f"{k}: {saved.get(k)!r} → {expected[k]!r}" for k in changed))
    return saved["next_batch"] * saved["global_batch_size"] // exp.config.batch_size
  return saved["next_batch"]


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite values, as `config.nan_policy` asks."""


class WriteError(RuntimeError):
  """A checkpoint or metrics write failed and `config.on_write_error` is "stop"."""


def guarded_write(what: str, write: Callable[[], Any], config: ml_collections.ConfigDict
                  ) -> None:
  """Runs `write`; a storage error (disk full, read-only, a bucket out of reach) stops the
  run or, per config, warns."""
  try:
    write()
  except paths.storage_errors() as e:
    message = f"could not write {what}: {paths.error_reason(e)}"
    if config.on_write_error == "stop":
      raise WriteError(f"{message}. The checkpoints written before it are intact; once the "
                       "storage takes writes again (free space, permissions, the bucket in "
                       "reach), run the same command to resume.") from e
    logging.warning("%s; training goes on (config.on_write_error=continue)", message)


def finish_writes(manager, writer: reporting.MetricsWriter, config: ml_collections.ConfigDict,
                  error: BaseException | None = None) -> None:
  """Waits for the pending checkpoint save and closes the metrics files.

  When the run ends on `error`, a failed save is only logged, so that `error` is what the
  user sees; after a WriteError the pending save is not waited for: the storage that just
  failed would likely fail it too, and a bucket out of reach holds it in orbax's retries
  for many minutes. The checkpoints committed before it stay intact either way.
  """
  try:
    if isinstance(error, WriteError):
      logging.warning("Not waiting for a checkpoint save in progress, if any, after the failed "
                      "write; the checkpoints committed before it are intact.")
    else:
      guarded_write("the last checkpoint", manager.wait_until_finished, config)
  except WriteError as e:
    if error is None:
      raise
    logging.error("%s", e)
  finally:
    writer.close()


def reduce_train_metrics(history: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """The train/ metrics of the steps in `history`: means, and the count of skipped steps.

  A population's (a leading member axis on each metric) are reduced per member, then
  summarized as their mean, `_std` and one value per member (`population.summarize`).
  """
  stacked = {k: np.stack([m[k] for m in history]) for k in history[0]}
  reduced = {f"train/{k}": np.mean(v, axis=0) for k, v in stacked.items() if k != "skipped_step"}
  if "skipped_step" in stacked:  # a count, not a fraction
    reduced["train/skipped_steps"] = np.sum(stacked["skipped_step"], axis=0)
  if np.ndim(stacked["loss"]) > 1:
    return population.summarize(reduced)
  return {k: float(v) for k, v in reduced.items()}


def check_finite(history: list[dict[str, np.ndarray]], first_step: int,
                 config: ml_collections.ConfigDict, consecutive_skips: np.ndarray | int
                 ) -> np.ndarray:
  """Applies `config.nan_policy` to the host metrics of steps first_step, first_step+1, ...

  Returns the number of consecutive skipped steps at the end (per member: a population's
  metrics have a leading member axis, and any member's non-finite step counts); raises
  NonFiniteError at the first non-finite step ("stop") or at `max_consecutive_skips` in a
  row ("skip").
  """
  for i, metrics in enumerate(history):
    step = first_step + i
    non_finite = np.atleast_1d(metrics["non_finite"]) > 0
    if config.nan_policy == "stop" and non_finite.any():
      index = int(np.argmax(non_finite))
      loss = float(np.atleast_1d(metrics["loss"])[index])
      where = f" in member {index}" if non_finite.size > 1 else ""
      what = (f"loss = {loss}" if not np.isfinite(loss)
              else f"loss = {loss:.4g} but the gradients are not finite")
      raise NonFiniteError(
          f"non-finite values at step {step}{where}: {what}. Stopped without writing a "
          "checkpoint after it; a restart resumes from the last one. Lower "
          "config.learning_rate, or set config.nan_policy=skip to skip such steps.")
    skipped = non_finite & ("skipped_step" in metrics)
    consecutive_skips = np.where(skipped, consecutive_skips + 1, 0)
    if consecutive_skips.max() >= config.max_consecutive_skips:
      raise NonFiniteError(
          f"{int(consecutive_skips.max())} consecutive steps up to step {step} had non-finite "
          f"values and were skipped (config.max_consecutive_skips="
          f"{config.max_consecutive_skips}); stopping. Lower config.learning_rate.")
  return consecutive_skips


def prepare_workdir(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as a path, created if local; ValueError (one line) when it cannot hold a run.

  A bucket workdir is checked instead: reachable with these credentials, and writable.
  """
  path = paths.resolve(workdir)
  if paths.is_bucket(path):
    paths.check_bucket(path, "--workdir", writable=True)
    return path
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir={path} is a file, not a directory; choose another path")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create --workdir={path}: {e.strerror}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir={path} is not writable; choose another path")
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                       ) -> dict[str, float]:
  """Trains (resuming from `workdir` if it has checkpoints); returns the final eval metrics.

  `workdir` may be local or in a bucket (gs://, s3://): every file the run writes goes there.

  SIGTERM or SIGINT stops it after the current step with a checkpoint of that step; it
  then returns {} (see `preemption`). Non-finite values are handled as `config.nan_policy`
  says (NonFiniteError when training must stop).
  """
  validate_config(config)
  workdir = paths.resolve(workdir)
  # A bucket has no empty folders to leave behind (and is not touched before its checks).
  is_new = not paths.is_bucket(workdir) and not workdir.exists()
  workdir = prepare_workdir(workdir)
  try:
    checkpoints = workdir / "checkpoints"
    resuming = checkpoints.is_dir() and bool(pretrained.finished_steps(checkpoints))
    config_changes = run_record.check_config(workdir, config, resuming)
    startup.use_compilation_cache(config.compilation_cache_dir)
    with startup.StartupClock() as startup_clock:
      return _train_and_evaluate(config, workdir, startup_clock, config_changes)
  except BaseException:
    if is_new and jax.process_index() == 0:
      remove_if_empty(workdir)
    raise


def remove_if_empty(workdir: epath.Path) -> None:
  """Removes `workdir` if it holds no file (a run that failed before writing anything)."""
  if workdir.is_dir() and not any(not e.is_dir for e in paths.list_tree(workdir)):
    workdir.rmtree()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        startup_clock: startup.StartupClock,
                        config_changes: dict[str, list[Any]]) -> dict[str, float]:
  # Shapes only: a resumed run restores its state without initialising one first.
  exp = setup(config, abstract_state=True)
  if (config.scan_blocks and jax.default_backend() == "cpu"
      and (resolve_layer_impl(config.layer_impl) == "plain" or exp.model.groups > 1)):
    logging.warning("scan_blocks on CPU with layer_impl=plain or grouped convolutions: XLA:CPU "
                    "leaves the gradient convolutions inside the scan loops in layouts it runs "
                    "slowly (ResNet-50: 6.7x the unrolled step time, until the tuned layers wrote "
                    "them out; BENCHMARKS.md); it compiles faster, but trains slower")
  is_main_process = jax.process_index() == 0
  manager = checkpointing.make_checkpoint_manager(workdir, config.keep_checkpoints,
                                                  config.best_checkpoint_metric)
  replicated = parallel.replicated_sharding()
  restored = checkpointing.restore_latest(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), exp.initial_state),
      expected=model_info(exp))
  if restored is None:
    state, start_step, start_batch = exp.make_initial_state(), 0, 0
    how = exp.start_note
    if is_main_process:
      print(f"Starting {config.model} on {config.dataset} {how}, in {workdir}", flush=True)
  else:
    state, saved_position = restored
    start_step = checkpointing.step_of(state)
    start_batch = resume_batch(exp, saved_position, start_step)
    message = (f"Resuming from the checkpoint at step {start_step} in {workdir}"
               if start_step < exp.total_steps else
               f"Training already finished: {workdir} has a checkpoint at step {start_step} "
               f"of {exp.total_steps}; evaluating it")
    logging.info(message)
    if is_main_process:
      print(message, flush=True)
    how = f"resumed at step {start_step}"
  if is_main_process:
    run_record.record_start(workdir, config, config_changes, how)

  info = model_info(exp).to_json()
  writer = reporting.MetricsWriter(workdir, enabled=is_main_process, resume_step=start_step)
  dp = exp.data_parallel
  state = dp.put_state(state)
  batches = parallel.prefetch_to_devices(train_batches(exp, start_batch), dp.put_batch,
                                        config.prefetch_batches)
  progress = reporting.progress_bar(exp.total_steps, start_step,
                                    enabled=is_main_process and config.progress_bar)
  eval_metrics = evaluate(exp, state) if start_step >= exp.total_steps else {}
  pending_metrics, checked, consecutive_skips = [], 0, 0
  interval_start, interval_steps, interval_eval_seconds = time.perf_counter(), 0, 0.0
  error: BaseException | None = None  # what ends the run, if not its last step
  try:
    with preemption.StopSignal(check_every=config.log_every_steps) as stop_signal:
      for step in range(start_step + 1, exp.total_steps + 1):
        state, metrics = dp.train_step(state, next(batches))
        if step == start_step + 1:  # one wait, to time this process's startup
          startup_metrics = startup_clock.summary_after(metrics)
          guarded_write("startup metrics", functools.partial(writer.write, step,
                                                             startup_metrics), config)
          if is_main_process:
            progress.write(startup.describe(startup_metrics))
        pending_metrics.append(metrics)
        interval_steps += 1
        progress.update(1)
        is_last = step == exp.total_steps
        stopping = not is_last and stop_signal.should_stop(step)
        logged = step % config.log_every_steps == 0 or is_last or stopping
        evaluated = step % exp.eval_every_steps == 0 or is_last
        checkpointed = step % exp.checkpoint_every_steps == 0 or is_last or stopping

        if logged or evaluated or checkpointed:  # nothing non-finite is evaluated or saved
          pending_metrics[checked:] = jax.device_get(pending_metrics[checked:])
          consecutive_skips = check_finite(pending_metrics[checked:],
                                           step + 1 - interval_steps + checked, config,
                                           consecutive_skips)
          checked = len(pending_metrics)

        if logged:
          train_metrics = reduce_train_metrics(pending_metrics)
          elapsed = time.perf_counter() - interval_start - interval_eval_seconds
          train_metrics["train/images_per_sec"] = interval_steps * config.batch_size / elapsed
          train_metrics["train/epoch"] = step / exp.steps_per_epoch
          guarded_write(f"metrics at step {step}",
                        functools.partial(writer.write, step, train_metrics), config)
          progress.set_postfix(loss=f"{train_metrics['train/loss']:.3f}",
                               img_per_s=f"{train_metrics['train/images_per_sec']:.0f}")
          pending_metrics.clear()
          checked = 0
          interval_start, interval_steps, interval_eval_seconds = time.perf_counter(), 0, 0.0

        if evaluated:
          eval_start = time.perf_counter()
          eval_metrics = evaluate(exp, state)
          guarded_write(f"eval metrics at step {step}",
                        lambda: (writer.write(step, eval_metrics), writer.plot()), config)
          if is_main_process:
            progress.write(
                f"step {step}/{exp.total_steps} (epoch {step / exp.steps_per_epoch:.1f}): "
                f"eval {reporting.eval_summary(eval_metrics)}")
          interval_eval_seconds += time.perf_counter() - eval_start  # not training throughput
        if checkpointed:  # (a failed asynchronous write surfaces at the next save)
          guarded_write(f"the checkpoint at step {step}", functools.partial(
              checkpointing.save, manager, dp.get_state(state), data_position(exp, step), info,
              metrics=eval_metrics if evaluated else None), config)
        if stopping:
          guarded_write(f"the checkpoint at step {step}", manager.wait_until_finished, config)
          if is_main_process:
            progress.write(
                f"Stopped by {stop_signal.name or 'another process'} after step {step} of "
                f"{exp.total_steps}: checkpoint saved in {workdir}; run the same command to "
                "resume.")
          eval_metrics = {}
          break
  except BaseException as e:
    error = e
    raise
  finally:  # also on errors: the last good checkpoint is committed before anything exits
    batches.close()  # stops the input pipeline now, not in the middle of interpreter exit
    progress.close()
    finish_writes(manager, writer, config, error)
  manager.close()
  return eval_metrics
