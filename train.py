"""Trains and evaluates a ResNet from an ml_collections config file.

  python train.py                                   # digits, the embedded default
  python train.py --config=configs/cifar10_resnet20.py --workdir=runs/c10 \
      --config.batch_size=256 --config.parallelism=pmap
  python train.py --config=configs/imagenet_resnet50_lars.py --dry_run --simulate_devices=256

Re-running with the same --workdir resumes from its latest checkpoint. --dry_run trains
nothing: it compiles the train step for abstract inputs and reports per-device memory,
FLOPs, collectives and an estimated step time (resnet_jax/bench/dry_run.py).
"""

import dataclasses
import os
import pathlib
import sys

if __name__ == "__main__":  # first, before JAX: this may start the program again
  from resnet_jax.malloc_tuning import reexec_with_malloc_tuning
  reexec_with_malloc_tuning()

if "--verbose" in sys.argv:  # before TensorFlow and XLA load: their loading messages too
  os.environ["RESNET_JAX_VERBOSE"] = "1"
else:  # tf.data is only the input pipeline here (resnet_jax sets it too, after jax loads)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tf.data needs no Keras, yet `import tensorflow` imports Keras 3 (and scikit-learn through
# it), ~1.5 s of every start. With this set TensorFlow looks for the legacy tf_keras package
# instead, which is not installed, and imports no Keras at all.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from resnet_jax.bench import dry_run, step_time, write_json  # noqa: E402
from resnet_jax.training import reporting, startup  # noqa: E402
from resnet_jax.training.checkpointing import CheckpointError  # noqa: E402
from resnet_jax.training.loop import NonFiniteError, WriteError, train_and_evaluate  # noqa: E402

def unknown_key_error(e: AttributeError | KeyError) -> str:
  """One line for an override naming a key the config does not have."""
  detail = e
  while isinstance(detail, BaseException) and detail.args:  # ml_collections nests the KeyError
    detail = detail.args[0]
  detail = " ".join(str(detail).split())
  return f"error: unknown config key in the command line: {detail}"


try:  # config_flags applies --config.KEY overrides to the default config here, at definition.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(pathlib.Path(__file__).resolve().parent / "configs" / "digits.py"),
      "Training config file; override any key with --config.KEY=VALUE.", lock_config=True)
except (AttributeError, KeyError) as e:
  raise SystemExit(unknown_key_error(e)) from None
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show INFO logs and TensorFlow's loading messages (hidden by default).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits",
                               "Directory for checkpoints, metrics.jsonl, TensorBoard and plots.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (it finds the "
    "coordinator on TPU pods, SLURM and similar clusters); run the same command on every host.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process where nothing finds the coordinator: host:port "
    "where process 0 serves it, e.g. 127.0.0.1:1234 for processes on one machine (implies "
    "--distributed, as do --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes train together.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to "
                                   "num_processes - 1.", lower_bound=0)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Train nothing: compile the train step for abstract inputs (no data "
    "needed) and report per-device memory, FLOPs, collectives and an estimated step time.")
_SIMULATE_DEVICES = flags.DEFINE_integer(
    "simulate_devices", 0, "With --dry_run: plan for this many devices, simulated as CPU "
    "devices (0: this machine's devices).", lower_bound=0)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", 0, "With --dry_run: a global batch of this many images per device "
    "(0: config.batch_size, which must divide evenly among the devices).", lower_bound=0)
_ACCELERATOR = flags.DEFINE_enum(
    "accelerator", "tpu_v4", list(step_time.ACCELERATORS),
    "With --dry_run: the device the step time is estimated for (peak FLOP/s, interconnect).")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "With --dry_run: peak TFLOP/s per device (0: the preset's).",
    lower_bound=0.0)
_INTERCONNECT = flags.DEFINE_float(
    "interconnect_gbytes_per_s", 0.0, "With --dry_run: interconnect GB/s (bytes) per device "
    "and direction (0: the preset's).", lower_bound=0.0)
_UTILIZATION = flags.DEFINE_float(
    "utilization", 0.5, "With --dry_run: the fraction of peak FLOP/s the step is assumed to "
    "achieve.", lower_bound=0.0, upper_bound=1.0)
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", "", "With --dry_run: also write the "
                                    "report to this JSON file.")


def config_file_error(e: OSError) -> str:
  """One line for a missing or unloadable config file (ml_collections' message ends with it)."""
  return f"error: could not load --config: {str(e).strip().splitlines()[-1].strip()}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one `error:` line and exit code 1."""
  try:
    return flags.FLAGS(argv)
  except OSError as e:  # an override applied to a config file that could not be loaded
    raise SystemExit(config_file_error(e)) from None
  except (AttributeError, KeyError) as e:  # an override of an explicit --config file's keys
    raise SystemExit(unknown_key_error(e)) from None
  except flags.Error as e:  # a wrong-typed value, an unknown flag
    raise SystemExit(f"error: {e}") from None


def plan(config: ml_collections.ConfigDict) -> None:
  """--dry_run: compiles and analyses the train step, prints the report; trains nothing."""
  if _SIMULATE_DEVICES.value:
    dry_run.simulate_devices(_SIMULATE_DEVICES.value)  # before anything starts JAX's backends
  device = step_time.accelerator(_ACCELERATOR.value, _PEAK_TFLOPS.value, _INTERCONNECT.value)
  report = dry_run.dry_run(config, per_device_batch=_PER_DEVICE_BATCH.value, device=device,
                           utilization=_UTILIZATION.value)
  print(dry_run.format_report(report))
  if _DRY_RUN_JSON.value:
    write_json(_DRY_RUN_JSON.value, dataclasses.asdict(report))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO if _VERBOSE.value else logging.WARNING)
  if _SIMULATE_DEVICES.value and not _DRY_RUN.value:
    raise SystemExit(f"error: --simulate_devices={_SIMULATE_DEVICES.value} needs --dry_run: "
                     "simulated devices can compile the step but not train it")
  cluster = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or cluster != (None, None, None):  # before JAX's backends start
    jax.distributed.initialize(*cluster)
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use, not before
  except OSError as e:
    raise SystemExit(config_file_error(e)) from None
  if _DRY_RUN.value:
    try:
      return plan(config)
    except (ValueError, OSError) as e:
      raise SystemExit(f"error: {e}") from None
  try:
    metrics = train_and_evaluate(config, _WORKDIR.value)
  except (ValueError, NonFiniteError, CheckpointError, WriteError) as e:  # bad input, NaNs, a
    raise SystemExit(f"error: {e}") from None  # failed write: one line, exit code 1.
  if metrics:
    print(f"Final eval: {reporting.eval_summary(metrics)}. Outputs in {_WORKDIR.value}/")


if __name__ == "__main__":
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit as e:  # app.run ends every run this way, successful or not
    startup.exit_now(e.code)
