"""The pod-scale dry run: train.py --dry_run compiles the real sharded step for simulated
devices and reports memory, FLOPs, collectives and an estimated step time."""

import json
import os
import subprocess
import sys

import pytest

from resnet_jax.bench import collectives, step_time
from resnet_jax.bench.dry_run import TRAIN_PY, planning_dataset
from resnet_jax.training.config import base_config

# ResNet-20 at 32x32 on "fake" data (no TensorFlow, no files), global batch 16.
TINY = ("--config=configs/cifar10_resnet20.py", "--config.dataset=fake",
        "--config.num_classes=10", "--config.image_size=32", "--config.batch_size=16")


def run_train_py(*args: str) -> subprocess.CompletedProcess:
  # The session's 8 forced devices must lose to --simulate_devices; LLVM's optimisation of
  # the CPU code changes none of the analyses, only how long the compile takes.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                    "--xla_backend_optimization_level=0"}
  return subprocess.run([sys.executable, TRAIN_PY, *args], capture_output=True, text=True,
                        env=env, cwd=os.path.dirname(TRAIN_PY), timeout=600)


def dry_run_record(tmp_path, num_devices: int) -> dict:
  path = tmp_path / f"{num_devices}.json"
  result = run_train_py(*TINY, "--dry_run", f"--simulate_devices={num_devices}",
                        f"--dry_run_json={path}")
  assert result.returncode == 0, result.stderr
  assert "An estimate from a simple model" in result.stdout
  return json.loads(path.read_text())


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> dict:
  return dry_run_record(tmp_path_factory.mktemp("dry_run"), 4)


def test_dry_run_compiles_for_the_simulated_devices_with_memory_and_flops(four_devices):
  r = four_devices
  assert (r["num_devices"], r["global_batch_size"], r["per_device_batch_size"]) == (4, 16, 4)
  assert r["flops"] > 0 and r["bytes_accessed"] > 0
  assert r["memory"]["temp"] > 0 and r["memory"]["total"] > r["memory"]["argument"] > 0
  assert r["estimate"]["compute_s"] > 0 and r["estimate"]["communication_s"] > 0


def test_dry_run_all_reduces_about_the_parameter_gradients(four_devices):
  gradient_bytes = four_devices["num_params"] * 4  # float32 gradients of ~270k parameters
  all_reduce = four_devices["collectives"]["all-reduce"]
  assert 260_000 < four_devices["num_params"] < 280_000
  assert all_reduce["count"] >= 1
  assert gradient_bytes <= all_reduce["bytes"] < 1.5 * gradient_bytes  # + BatchNorm sums


@pytest.mark.slow  # a second compile: ~7 s on two shared cores
def test_per_device_flops_halve_when_the_devices_double(four_devices, tmp_path):
  two_devices = dry_run_record(tmp_path, 2)
  assert two_devices["flops"] / four_devices["flops"] == pytest.approx(2.0, rel=0.05)


def test_simulate_devices_without_dry_run_is_one_error_line():
  result = run_train_py(*TINY, "--simulate_devices=4")
  assert result.returncode == 1
  assert result.stderr.startswith("error: --simulate_devices=4 needs --dry_run")
  assert result.stderr.count("\n") == 1


def test_batch_not_divisible_by_the_simulated_devices_is_one_error_line():
  result = run_train_py(*TINY, "--dry_run", "--simulate_devices=3")
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: config.batch_size=16 is not divisible by the 3 devices (1 "
                    "process(es)); choose a multiple of 3"], result.stderr


def test_unprepared_dataset_takes_its_shapes_from_tfds_metadata(tmp_path):
  config = base_config()
  config.dataset, config.data_dir, config.batch_size = "cifar10", str(tmp_path), 16
  info, source = planning_dataset(config)
  assert (info.num_classes, info.image_shape, source) == (10, (32, 32, 3),
                                                         "tfds metadata; not prepared here")
  assert info.num_train_examples == 16  # unknown: one batch per epoch


def test_unknown_dataset_needs_classes_and_image_size_from_the_config(tmp_path):
  config = base_config()
  config.dataset = f"folder:{tmp_path / 'missing'}"
  with pytest.raises(ValueError, match="set config.num_classes and config.image_size"):
    planning_dataset(config)
  config.num_classes, config.image_size = 7, 48
  info, source = planning_dataset(config)
  assert (info.num_classes, info.image_shape) == (7, (48, 48, 3))
  assert source.startswith("config.num_classes")


HLO = """\
HloModule step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar.1 = f32[8]{0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar.1)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %ar.2 = (f32[8]{0}, bf16[2,3]{1,0}) all-reduce(%x, %y), replica_groups={{0,1,2,3}}, to_apply=%add
  %ag = f32[32]{0} all-gather(%x), dimensions={0}, replica_groups={{0,1,2,3}}
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_counts_combined_all_reduces_once_and_loop_bodies_per_iteration():
  found = collectives.collectives(HLO)
  assert found["all-reduce"] == collectives.CollectiveStats(
      "all-reduce", count=1 + 3, arrays=2 + 3, bytes=(32 + 12) + 3 * 32)
  assert found["all-gather"] == collectives.CollectiveStats("all-gather", 1, 1, 128)
  assert set(found) == {"all-reduce", "all-gather"}


def test_ring_all_reduce_sends_twice_the_bytes_times_n_minus_one_over_n():
  stats = {"all-reduce": collectives.CollectiveStats("all-reduce", 1, 1, 100_000_000)}
  device = step_time.Accelerator("test", peak_tflops=100.0, interconnect_gbytes_per_s=100.0)
  e = step_time.estimate(1e12, stats, num_devices=4, global_batch_size=64, device=device,
                         utilization=0.5)
  assert e.compute_s == pytest.approx(1e12 / (100e12 * 0.5))
  assert e.communication_s == pytest.approx(2 * 3 / 4 * 1e8 / 100e9)
  assert e.step_s_no_overlap == pytest.approx(e.compute_s + e.communication_s)
  assert e.step_s_full_overlap == pytest.approx(max(e.compute_s, e.communication_s))
  assert e.images_per_s_no_overlap == pytest.approx(64 / e.step_s_no_overlap)


def test_accelerator_overrides_replace_the_preset_figures():
  assert step_time.accelerator("tpu_v5e") is step_time.ACCELERATORS["tpu_v5e"]
  custom = step_time.accelerator("h100_sxm", interconnect_gbytes_per_s=50.0)
  assert (custom.peak_tflops, custom.interconnect_gbytes_per_s) == (989.0, 50.0)
  with pytest.raises(ValueError, match="tpu_v4, tpu_v5e, h100_sxm"):
    step_time.accelerator("tpu_v9")


def test_a_population_is_planned_as_one_vmapped_program():
  from resnet_jax.bench.dry_run import plan_config
  config = base_config()
  config.population_size, config.population_mode = 3, "loop"
  planned = plan_config(config)
  assert (planned.population_size, planned.population_mode) == (3, "vmap")
  assert config.population_mode == "loop"  # the caller's config is left as it was
