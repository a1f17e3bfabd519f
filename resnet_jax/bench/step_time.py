"""A simple model of a data-parallel step's time: compute plus ring collectives.

  compute       = FLOPs per device / (peak FLOP/s × utilisation)
  communication = Σ bytes each device sends / interconnect bandwidth, on a ring of n
                  devices: all-reduce of B bytes 2(n−1)/n·B; all-gather and all-to-all
                  (n−1)/n·B (B: the whole result); reduce-scatter (n−1)·B (B: one
                  device's share); collective-permute B.

An estimate, not a measurement: no latency per collective, no contention, no bound from
memory bandwidth, and a ring rather than the torus or tree a real fabric would use. The
step time is given both without overlap (compute + communication) and with perfect
overlap (the larger of the two).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from resnet_jax.bench.collectives import CollectiveStats


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One device of a pod, as the model sees it."""
  name: str
  peak_tflops: float  # dense bfloat16 per device
  interconnect_gbytes_per_s: float  # per device and direction, for one collective
  note: str = ""


ACCELERATORS = {
    # Cloud TPU v4 (cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16 per chip; all-reduce
    # bandwidth 1.1 PB/s per 4096-chip pod, i.e. 269 GB/s per chip.
    "tpu_v4": Accelerator("TPU v4", 275.0, 1.1e15 / 4096 / 1e9),
    # Cloud TPU v5e (cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16 per chip; inter-chip
    # interconnect 1600 Gbps = 200 GB/s per chip (51.2 TB/s all-reduce per 256-chip pod).
    "tpu_v5e": Accelerator("TPU v5e", 197.0, 200.0),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense bf16 (1979 with 2:4 sparsity); NVLink 4
    # 900 GB/s both directions together, 450 GB/s each way, within one 8-GPU node.
    "h100_sxm": Accelerator(
        "H100 SXM", 989.0, 450.0,
        "450 GB/s is NVLink inside one 8-GPU node; between nodes each GPU has a 400 Gb/s "
        "InfiniBand link (50 GB/s): --interconnect_gbytes_per_s=50 for a multi-node ring"),
}


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  accelerator: str
  peak_tflops: float
  interconnect_gbytes_per_s: float
  utilization: float
  compute_s: float
  communication_s: float
  step_s_no_overlap: float  # compute + communication
  step_s_full_overlap: float  # max(compute, communication)
  images_per_s_no_overlap: float
  images_per_s_full_overlap: float


def accelerator(name: str, peak_tflops: float = 0.0,
                interconnect_gbytes_per_s: float = 0.0) -> Accelerator:
  """The preset `name`, with either figure replaced where it is given (> 0)."""
  if name not in ACCELERATORS:
    raise ValueError(f"accelerator={name!r}: must be one of {', '.join(ACCELERATORS)}")
  if peak_tflops < 0 or interconnect_gbytes_per_s < 0:
    raise ValueError(f"peak_tflops={peak_tflops} and interconnect_gbytes_per_s="
                     f"{interconnect_gbytes_per_s} must be >= 0 (0: the {name} preset's)")
  preset = ACCELERATORS[name]
  if not (peak_tflops or interconnect_gbytes_per_s):
    return preset
  return Accelerator(f"{preset.name} (overridden)", peak_tflops or preset.peak_tflops,
                     interconnect_gbytes_per_s or preset.interconnect_gbytes_per_s)


def bytes_sent(stats: CollectiveStats, num_devices: int) -> float:
  """Bytes each device sends for these collectives on a ring of `num_devices`."""
  n = num_devices
  share = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
           "reduce-scatter": n - 1, "collective-permute": 1.0}[stats.kind]
  return share * stats.bytes if n > 1 else 0.0


def estimate(flops: float, collectives: Mapping[str, CollectiveStats], *, num_devices: int,
             global_batch_size: int, device: Accelerator, utilization: float) -> StepEstimate:
  """Compute, communication and step time of one step; images/s of the whole pod."""
  if not 0 < utilization <= 1:
    raise ValueError(f"--utilization={utilization} must be in (0, 1]: the fraction of peak "
                     "FLOP/s the step achieves")
  compute_s = flops / (device.peak_tflops * 1e12 * utilization)
  communication_s = sum(bytes_sent(s, num_devices) for s in collectives.values()) / (
      device.interconnect_gbytes_per_s * 1e9)
  no_overlap, full_overlap = compute_s + communication_s, max(compute_s, communication_s)
  return StepEstimate(
      device.name, device.peak_tflops, device.interconnect_gbytes_per_s, utilization,
      compute_s, communication_s, no_overlap, full_overlap,
      global_batch_size / no_overlap, global_batch_size / full_overlap)
