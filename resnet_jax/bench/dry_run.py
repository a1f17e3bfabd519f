"""Pod-scale dry run: the real sharded train step, compiled for N simulated devices.

  python train.py --config=configs/imagenet_resnet50_lars.py --dry_run --simulate_devices=256
  python -m resnet_jax.bench.dry_run --config=configs/imagenet_resnet50_lars.py \
      --devices=8,64,256

`loop.setup` builds the experiment as for training, from the dataset's metadata and with
an abstract state; its jit-mode train step (batch sharded over a 1-D mesh, state
replicated) is lowered for abstract inputs and compiled by XLA:CPU for N CPU devices.
Nothing runs and no batch is allocated. It reports, per device, XLA's memory and cost
analyses of the SPMD program, the collectives in the optimised HLO, and a step time
estimated by `step_time`. The device count is fixed per process, so the sweep runs one
train.py per pod size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_jax import cli
from resnet_jax import data
from resnet_jax.bench import write_json
from resnet_jax.bench.collectives import CollectiveStats, collectives
from resnet_jax.bench.step_time import ACCELERATORS, Accelerator, StepEstimate, estimate
from resnet_jax.summary import count
from resnet_jax.training import parallel, startup
from resnet_jax.training.loop import Experiment, setup

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "train.py")
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


@dataclasses.dataclass(frozen=True)
class DryRun:
  """What one compile for `num_devices` says about a step; per device unless named global."""
  model: str
  dataset: str
  dataset_source: str  # where the classes and image shape came from
  image_shape: tuple[int, int, int]
  num_classes: int
  dtype: str
  num_devices: int
  platform: str  # what XLA compiled for: "cpu" when the devices are simulated
  global_batch_size: int
  per_device_batch_size: int
  num_params: int
  lower_s: float  # tracing and lowering to StableHLO
  compile_s: float  # without the persistent cache
  memory: dict[str, int]  # bytes: MEMORY_FIELDS, and total = argument + output - alias + ...
  flops: float
  bytes_accessed: float
  has_loops: bool  # XLA's cost analysis counts a while loop's body once (scan_blocks)
  collectives: dict[str, CollectiveStats]
  estimate: StepEstimate
  accelerator_note: str


def simulate_devices(num_devices: int) -> None:
  """Makes JAX see `num_devices` CPU devices; works only before JAX starts its backends."""
  if num_devices < 1:
    raise ValueError(f"--simulate_devices={num_devices} must be >= 1")
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  except RuntimeError:
    raise ValueError(f"--simulate_devices={num_devices} came too late: JAX has already started "
                     "its backends in this process; simulate devices first thing") from None


def plan_config(config: ml_collections.ConfigDict,
                per_device_batch: int = 0) -> ml_collections.ConfigDict:
  """`config` for the dry run: global batch `per_device_batch` × devices (0: as configured).

  Drops what only the real run reads: `init_from` (weights change no shape) and the
  eval-time linear probes. A population is planned as one program (`population_mode`
  "vmap", what accelerators run), which is what a pod's memory must hold.
  """
  if config.parallelism != "jit":
    raise ValueError(f"--dry_run compiles the jit-mode step, and config.parallelism="
                     f"{config.parallelism!r}; add --config.parallelism=jit (both modes "
                     "compute the same step)")
  if per_device_batch < 0:
    raise ValueError(f"--per_device_batch={per_device_batch} must be >= 0 (0: "
                     "config.batch_size, divided among the devices)")
  planned = config.copy_and_resolve_references()
  if per_device_batch:
    planned.batch_size = per_device_batch * jax.device_count()
  planned.init_from, planned.replace_head, planned.linear_probe_dataset = "", False, ""
  if planned.population_size > 1:
    planned.population_mode = "vmap"
  return planned


def planning_dataset(config: ml_collections.ConfigDict) -> tuple[data.DatasetInfo, str]:
  """The dataset's info without its data, and where its classes and image shape came from.

  Prepared here (or synthetic): its own info. Otherwise tfds' metadata, else config.num_classes and
  config.image_size (3 channels). Unknown split sizes count one global batch per epoch:
  that shapes the learning-rate schedule, not the step's cost.
  """
  try:
    return data.get_dataset_info(config.dataset, config.data_dir or None,
                                 holdout_fraction=config.holdout_fraction), "its own info"
  except ValueError as e:
    not_prepared = e
  from resnet_jax.data import tfds_pipeline  # imports TensorFlow
  try:
    info = tfds_pipeline.metadata_info(config.dataset, config.data_dir or None)
    source = "tfds metadata; not prepared here"
  except ValueError:
    if not (config.num_classes and config.image_size):
      raise ValueError(
          f"--dry_run needs the classes and image size of config.dataset={config.dataset!r}, "
          f"which is neither prepared here nor known to tfds ({not_prepared}); set "
          "config.num_classes and config.image_size") from None
    info = data.DatasetInfo(config.dataset, config.num_classes,
                            (config.image_size, config.image_size, 3), 0, 0)
    source = "config.num_classes and config.image_size, 3 channels assumed"
  return dataclasses.replace(info, num_train_examples=config.batch_size), source


def abstract_inputs(exp: Experiment) -> tuple[Any, dict[str, jax.ShapeDtypeStruct]]:
  """The train step's arguments as shapes, dtypes and shardings: state replicated, batch split."""
  replicated = parallel.replicated_sharding()
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       exp.initial_state)
  split = NamedSharding(replicated.mesh, P(parallel.MESH_AXIS))
  size, channels = exp.image_size, exp.model.in_channels
  batch_size = exp.config.batch_size
  batch = {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), np.uint8,
                                         sharding=split),
           "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=split)}
  return state, batch


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device bytes from XLA's memory analysis; total counts donated buffers once."""
  analysis = compiled.memory_analysis()
  stats = {f: int(getattr(analysis, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
  stats["total"] = (stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
                    + stats["generated_code"])
  return stats


def dry_run(config: ml_collections.ConfigDict, *, per_device_batch: int = 0,
            device: Accelerator = ACCELERATORS["tpu_v4"], utilization: float = 0.5) -> DryRun:
  """Compiles `config`'s train step for this process's devices and analyses it.

  Turns the persistent compilation cache off, so that `compile_s` is a real compile.
  """
  startup.use_compilation_cache("")
  config = plan_config(config, per_device_batch)
  dataset, source = planning_dataset(config)
  exp = setup(config, dataset=dataset, abstract_state=True)
  state, batch = abstract_inputs(exp)
  start = time.perf_counter()
  lowered = exp.data_parallel.train_step.trace(state, batch).lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  cost = compiled.cost_analysis()
  hlo_text = compiled.as_text()
  found = collectives(hlo_text)
  num_devices = jax.device_count()
  return DryRun(
      model=config.model, dataset=config.dataset, dataset_source=source,
      image_shape=(exp.image_size, exp.image_size, exp.model.in_channels),
      num_classes=exp.model.num_classes, dtype=config.dtype, num_devices=num_devices,
      platform=jax.devices()[0].platform,
      global_batch_size=config.batch_size,
      per_device_batch_size=config.batch_size // num_devices,
      num_params=count(state.params), lower_s=lowered_at - start,
      compile_s=compiled_at - lowered_at, memory=memory_stats(compiled),
      flops=float(cost["flops"]), bytes_accessed=float(cost["bytes accessed"]),
      has_loops=" while(" in hlo_text, collectives=found,
      estimate=estimate(float(cost["flops"]), found, num_devices=num_devices,
                        global_batch_size=config.batch_size, device=device,
                        utilization=utilization),
      accelerator_note=device.note)


def _size(num_bytes: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes:.0f} B"


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} us"


def format_report(r: DryRun) -> str:
  """The dry run as readable text."""
  m, e = r.memory, r.estimate
  lines = [
      f"Dry run of {r.model} on {r.dataset}: {r.num_classes} classes, "
      f"{'x'.join(map(str, r.image_shape))} images ({r.dataset_source}), {r.dtype}",
      f"{r.num_devices} {r.platform} device{'s' * (r.num_devices > 1)}, jit over a 1-D mesh "
      f"(batch split, state replicated), compiled by XLA for {r.platform}",
      f"global batch {r.global_batch_size:,} = {r.per_device_batch_size:,} per device; "
      f"{r.num_params:,} parameters; lowered in {r.lower_s:.1f} s, compiled in "
      f"{r.compile_s:.1f} s",
      "",
      "Per device (XLA's analyses of the compiled SPMD program)",
      f"  memory   arguments {_size(m['argument'])}, outputs {_size(m['output'])} "
      f"({_size(m['alias'])} of them donated arguments), temporaries {_size(m['temp'])}, "
      f"generated code {_size(m['generated_code'])}: total {_size(m['total'])}",
      f"  cost     {r.flops / 1e9:,.1f} GFLOP, {_size(r.bytes_accessed)} accessed",
      *(["  (undercounted: XLA's cost analysis counts each while loop's body once, e.g. "
         "with scan_blocks; the estimate below inherits that)"] if r.has_loops else []),
      "",
      "Collectives per step (optimised HLO; a combined all-reduce counts once)",
  ]
  if not r.collectives:
    lines.append("  none")
  for s in r.collectives.values():
    unknown = "  (some in loops of unknown trip count, counted once)" * s.trip_count_unknown
    lines.append(f"  {s.kind:<18} {s.count:>5} ops, {s.arrays:>5} arrays, "
                 f"{_size(s.bytes):>11}{unknown}")
  lines += [
      "",
      f"Estimated step time on {e.accelerator} ({e.peak_tflops:g} TFLOP/s peak x "
      f"{e.utilization:g} utilisation, {e.interconnect_gbytes_per_s:,.0f} GB/s interconnect)",
      f"  compute        {_ms(e.compute_s):>12}   FLOPs / (peak x utilisation)",
      f"  communication  {_ms(e.communication_s):>12}   ring: 2(n-1)/n x all-reduce bytes / "
      "bandwidth",
      f"  step           {_ms(e.step_s_no_overlap):>12}   no overlap (sum); "
      f"{_ms(e.step_s_full_overlap)} with full overlap (max)",
      f"  images/s       {e.images_per_s_no_overlap:>12,.0f}   no overlap; "
      f"{e.images_per_s_full_overlap:,.0f} with full overlap",
      "  An estimate from a simple model, not a measurement: no per-collective latency or "
      "contention, no memory-bandwidth bound.",
  ]
  if r.platform == "cpu":
    lines.append("  Memory and bytes accessed are XLA:CPU's, which fuses and lays out differently "
                 "from the TPU and GPU compilers.")
  if r.accelerator_note:
    lines.append(f"  Note: {r.accelerator_note}.")
  return "\n".join(lines)


def format_sweep(records: Sequence[dict[str, Any]]) -> str:
  """One row per pod size, from the JSON records of dry runs (`dataclasses.asdict(DryRun)`)."""
  header = (f"{'devices':>7} {'batch/dev':>9} {'GFLOP/dev':>10} {'mem/dev':>10} "
            f"{'all-reduce/step':>20} {'compute':>10} {'comm':>9} {'step':>10} "
            f"{'step(ovl)':>10} {'images/s':>10} {'img/s(ovl)':>10} {'compile':>8}")
  lines = [header, "-" * len(header)]
  for r in records:
    e, all_reduce = r["estimate"], r["collectives"].get("all-reduce")
    reduced = (f"{_size(all_reduce['bytes'])} in {all_reduce['count']}" if all_reduce
               else "none")
    lines.append(
        f"{r['num_devices']:>7} {r['per_device_batch_size']:>9,} {r['flops'] / 1e9:>10,.1f} "
        f"{_size(r['memory']['total']):>10} {reduced:>20} {_ms(e['compute_s']):>10} "
        f"{_ms(e['communication_s']):>9} {_ms(e['step_s_no_overlap']):>10} "
        f"{_ms(e['step_s_full_overlap']):>10} {e['images_per_s_no_overlap']:>10,.0f} "
        f"{e['images_per_s_full_overlap']:>10,.0f} {r['compile_s']:>7.1f}s")
  if records:
    e, platform = records[0]["estimate"], records[0]["platform"]
    lines.append(f"Estimated for {e['accelerator']} ({e['peak_tflops']:g} TFLOP/s x "
                 f"{e['utilization']:g}, {e['interconnect_gbytes_per_s']:,.0f} GB/s ring "
                 "all-reduce): a simple model, not a measurement; (ovl) assumes full overlap "
                 f"of compute and communication. Compiled by XLA for {platform} on this "
                 "machine.")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for(
      "resnet_jax.bench.dry_run",
      "Dry runs for several pod sizes, one train.py process each, as one table.",
      epilog="Every other argument (--config, --config.KEY=VALUE, --per_device_batch, "
             "--accelerator, --peak_tflops, --interconnect_gbytes_per_s, --utilization) goes "
             "to `train.py --dry_run` as it is.")
  parser.add_argument("--devices", default="8,64,256", help="comma-separated device counts")
  parser.add_argument("--json", metavar="PATH", help="also write every dry run's record here")
  args, train_args = parser.parse_known_args(argv)
  try:
    device_counts = [int(n) for n in args.devices.split(",") if n]
  except ValueError:
    parser.error(f"--devices={args.devices}: expected comma-separated integers")
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    for n in device_counts:
      path = os.path.join(tmp, f"{n}.json")
      start = time.perf_counter()
      result = subprocess.run(
          [sys.executable, TRAIN_PY, *train_args, "--dry_run", f"--simulate_devices={n}",
           f"--dry_run_json={path}"], capture_output=True, text=True)
      if result.returncode:
        error = (result.stderr.strip() or result.stdout.strip()).splitlines()
        parser.exit(1, f"{error[-1] if error else 'failed'} (dry run for {n} devices)\n")
      print(f"{n} devices: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
      with open(path) as f:
        records.append(json.load(f))
  print(format_sweep(records))
  if args.json:
    write_json(args.json, records)


if __name__ == "__main__":
  main()
