"""Specification of the benchmarks: both tools run end to end and report consistent numbers.

Timings themselves are never asserted on, only their presence, sign and the arithmetic
that ties the reported numbers together. (Under the session's persistent compilation cache,
the compile times here may be cache reads.)
"""

import contextlib
import dataclasses
import io
import json
import os
import time

import jax
import numpy as np
import pytest

from resnet_jax.bench import compile_time, input as input_bench, throughput
from resnet_jax.data import fake
from resnet_jax.models import create_model
from resnet_jax.summary import summarize

TINY_RUN = ["--image_size", "8", "--batch_size", "16", "--dtype", "float32"]
THROUGHPUT_POSITIVE_FIELDS = ("first_step_s", "step_time_ms", "host_input_ms", "images_per_sec",
                    "train_step_gflop", "train_step_gflop_per_s", "matmul_gflop_per_s",
                    "ratio_to_matmul")


def run_main(main, argv, json_path):
  """Runs a tool's `main(argv + --json)`; returns (the JSON record, what it printed)."""
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    main([*argv, "--json", str(json_path)])
  return json.loads(json_path.read_text()), stdout.getvalue()


# pmap: -m slow (a second model compile; the training tests run pmap steps)
@pytest.fixture(scope="module", params=["jit", pytest.param("pmap", marks=pytest.mark.slow)])
def throughput_comparison(request, tmp_path_factory):
  argv = ["--model", "resnet20", *TINY_RUN, "--parallelism", request.param, "--steps", "2",
          "--warmup_steps", "1", "--matmul_size", "64", "--matmul_reps", "2"]
  return run_main(throughput.main, argv, tmp_path_factory.mktemp("bench") / "throughput.json")


@pytest.fixture(scope="module")
def throughput_run(throughput_comparison):
  record, printed = throughput_comparison
  return record["ours"], printed


@pytest.fixture(scope="module")
def compile_time_run(tmp_path_factory):
  argv = ["--models", "resnet20", *TINY_RUN]
  return run_main(compile_time.main, argv, tmp_path_factory.mktemp("bench") / "compile.json")


def test_throughput_reports_every_field_of_the_run(throughput_run):
  record, _ = throughput_run
  assert set(record) == {f.name for f in dataclasses.fields(throughput.ThroughputResult)}
  assert record["device_count"] == jax.device_count()
  assert (record["model"], record["batch_size"], record["image_size"], record["dtype"],
          record["steps"], record["warmup_steps"]) == ("resnet20", 16, 8, "float32", 2, 1)


def test_throughput_times_and_flops_are_positive(throughput_run):
  record, _ = throughput_run
  assert all(record[key] > 0 for key in THROUGHPUT_POSITIVE_FIELDS), record


def test_throughput_numbers_follow_from_step_time(throughput_run):
  record, _ = throughput_run
  step_s = record["step_time_ms"] / 1e3
  assert record["images_per_sec"] == pytest.approx(record["batch_size"] / step_s)
  assert record["train_step_gflop_per_s"] == pytest.approx(record["train_step_gflop"] / step_s)
  assert record["ratio_to_matmul"] == pytest.approx(
      record["train_step_gflop_per_s"] / record["matmul_gflop_per_s"])


def test_throughput_counts_about_three_forward_passes_per_train_step(throughput_run):
  record, _ = throughput_run
  model = create_model("resnet20", num_classes=fake.NUM_CLASSES)
  forward_gflop = summarize(model, image_size=8).forward_flops * record["batch_size"] / 1e9
  assert 2.5 < record["train_step_gflop"] / forward_gflop < 3.5  # forward + 2x for backward


def test_throughput_prints_the_summary(throughput_run):
  record, printed = throughput_run
  for label in ("compile + first step", "step time", "images/sec", "matmul ceiling", "ratio"):
    assert label in printed
  assert f"{record['images_per_sec']:.1f}" in printed


def test_throughput_times_the_plain_conv_path_in_the_same_run(throughput_comparison):
  record, printed = throughput_comparison
  ours, plain = record["ours"], record["plain"]
  assert (ours["layer_impl"], plain["layer_impl"]) == ("tuned", "plain")  # "auto" on CPU
  assert record["speedups"]["plain"] == pytest.approx(
      ours["images_per_sec"] / plain["images_per_sec"])
  assert record["torch"] == [] and "ours / plain:" in printed
  # then one step of each in turn, --steps rounds: the ratio a drifting machine cannot skew
  interleaved = record["plain_interleaved"]
  assert len(interleaved) == record["ours"]["steps"] and min(interleaved) > 0
  assert record["speedups"]["plain_interleaved"] == pytest.approx(np.median(interleaved))
  assert f"one step of each in turn ({len(interleaved)} rounds): median" in printed


def test_throughput_flags_a_batch_that_does_not_split_over_devices(capsys):
  with pytest.raises(SystemExit) as exit_info:
    throughput.main(["--model", "resnet20", "--image_size", "8",
                     "--batch_size", str(jax.device_count() + 1)])
  assert exit_info.value.code == 2
  assert "config.batch_size" in capsys.readouterr().err


def test_compile_time_reports_each_stage_of_train_step_and_forward(compile_time_run):
  records, _ = compile_time_run
  record, = records
  assert record["model"] == "resnet20" and record["num_params"] > 0
  for program in ("train_step", "forward"):
    assert all(value > 0 for value in record[program].values()), record[program]
  assert record["train_step"]["stablehlo_ops"] > record["forward"]["stablehlo_ops"]
  assert record["train_to_forward_compile_ratio"] == pytest.approx(
      record["train_step"]["compile_s"] / record["forward"]["compile_s"])


def test_compile_time_prints_a_row_per_model_in_each_table(compile_time_run):
  _, printed = compile_time_run
  rows = [line for line in printed.splitlines() if line.startswith("resnet20 ")]
  assert len(rows) == 2  # the stage timings and XLA's analysis of the train step


def test_input_bench_times_the_pipeline_and_the_train_step_it_feeds(digits_data_dir, tmp_path):
  record, printed = run_main(input_bench.main, [
      "--dataset", "digits", "--data_dir", digits_data_dir, "--batch_size", "16",
      "--batches", "3", "--warmup_batches", "1", "--train_step_model", "resnet20",
      "--no_torchvision"], tmp_path / "input.json")
  assert (record["dataset"], record["preset"], record["image_size"]) == ("digits", "translate", 8)
  ours = record["ours"]
  assert ours["images_per_sec"] > 0 and ours["first_batch_s"] > 0
  assert ours["images_per_sec_per_core"] == pytest.approx(ours["images_per_sec"] /
                                                          record["cores"])
  assert record["ratio_to_train_step"] == pytest.approx(
      ours["images_per_sec"] / record["train_step_images_per_sec"])
  assert record["torchvision"] is None and "not run: --no_torchvision" in printed
  assert "pipeline / train step consumption" in printed


def test_input_bench_times_resumes_on_a_tiny_record_dataset(tmp_path):
  record, printed = run_main(input_bench.main, [
      "--dataset", "tiny:300", "--data_dir", str(tmp_path), "--batch_size", "8", "--batches",
      "0", "--resume_at", "0,0.5,0.99", "--shuffle_buffer", "64"], tmp_path / "input.json")
  assert record["train_examples"] == 300 and record["ours"] is None
  assert set(record["resume_first_batch_s"]) == {"0", "0.5", "0.99"}
  assert all(seconds > 0 for seconds in record["resume_first_batch_s"].values())
  assert "resume at 0.99 epoch" in printed and "shuffle_buffer=64" in printed


def test_input_bench_names_a_missing_dataset(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    input_bench.main(["--dataset", f"folder:{tmp_path}/none", "--data_dir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert "does not exist" in capsys.readouterr().err


def test_degradation_curves_table_numbers_and_plot_come_from_each_runs_metrics(tmp_path):
  from resnet_jax.bench import degradation
  run_dirs = {}
  for model, (train_acc, val_acc) in {"plain20": (0.5, 0.45), "plain56": (0.2, 0.15),
                                      "resnet20": (0.6, 0.55), "resnet56": (0.7, 0.65)}.items():
    run_dirs[model] = str(tmp_path / model)
    os.makedirs(run_dirs[model])
    with open(os.path.join(run_dirs[model], "metrics.jsonl"), "w") as f:
      for step in (10, 20):  # 10 steps of 128 at 64 img/s: 20 s per interval
        f.write(json.dumps({"step": step, "train/accuracy": train_acc * step / 20,
                            "train/images_per_sec": 64.0}) + "\n")
      f.write(json.dumps({"step": 20, "eval/accuracy": val_acc}) + "\n")
  curves = degradation.error_curves(run_dirs["plain56"])
  assert curves["train"] == ([10, 20], [0.9, 0.8]) and curves["val"] == ([20], [0.85])
  assert degradation.final_train_error(run_dirs["plain56"], last=2) == pytest.approx(0.85)
  assert degradation.training_minutes(run_dirs["plain56"], 128) == pytest.approx(40 / 60)
  degradation.plot(run_dirs, str(tmp_path / "degradation.png"), steps=20)
  assert os.path.getsize(tmp_path / "degradation.png") > 0


def test_population_bench_times_each_mode_against_single_runs_in_one_run(tmp_path):
  from resnet_jax.bench import population as population_bench
  population_bench.main(["--model=resnet8", "--members=2", "--batch_size=8", "--image_size=8",
                         "--rounds=2", "--modes=loop", f"--json={tmp_path / 'p.json'}"])
  result = json.loads((tmp_path / "p.json").read_text())
  by_mode = {r["mode"]: r for r in result["results"]}  # (vmap: the same code, a slower compile)
  assert set(by_mode) == {"single", "loop"} and result["auto_mode"] == "loop"
  assert by_mode["single"]["speedup_over_single_runs"] == 1.0
  for r in by_mode.values():
    assert r["step_s"] > 0
    assert r["member_steps_per_s"] == pytest.approx(2 / r["step_s"])


def test_cifar_table_trains_each_row_as_a_population_and_resumes_row_by_row(tmp_path, capsys):
  from resnet_jax.bench import cifar_table
  from short_run import digit_folder
  folder = digit_folder(str(tmp_path / "digits"), range(10), per_class=20)
  argv = [f"--cifar_dir={folder}", f"--workdir={tmp_path / 'table'}", "--models=resnet8",
          "--seeds=2", "--steps=2"]
  cifar_table.main(argv)
  row = json.loads((tmp_path / "table" / "resnet8" / "row.json").read_text())
  assert row["seeds"] == 2 and len(row["errors"]) == 2 and row["eval_split"] == "holdout"
  assert row["best"] == min(row["errors"]) and row["eval_examples"] == 20  # 10% of 20 × 10
  metrics = [json.loads(line) for line in
             (tmp_path / "table" / "resnet8" / "metrics.jsonl").read_text().splitlines()]
  final = [m for m in metrics if "eval/member1/accuracy" in m][-1]
  assert row["errors"][1] == pytest.approx(100 * (1 - final["eval/member1/accuracy"]))
  table = (tmp_path / "table" / "table.md").read_text()
  assert "| resnet8 | 2 | 2 | validation (45k/5k) (20) |" in table
  assert os.path.getsize(tmp_path / "table" / "error_vs_depth.png") > 0
  capsys.readouterr()
  cifar_table.main(argv)  # done rows are read back, not trained again
  assert "resnet8: done before (2 seeds, 2 steps)" in capsys.readouterr().out
  with pytest.raises(SystemExit):  # a row begun with other seeds is not silently mixed
    cifar_table.main(argv[:-2] + ["--seeds=3", "--steps=2"])
  assert "population_size" in capsys.readouterr().err


def test_cifar_table_warms_up_resnet110_at_the_papers_learning_rate():
  from resnet_jax.bench import cifar_table
  from resnet_jax.data import DatasetInfo
  info = DatasetInfo(name="folder", num_classes=10, image_shape=(32, 32, 3),
                     num_train_examples=45_000, num_eval_examples=5_000)  # 351 steps of 128
  config = cifar_table.row_config("resnet110", "/data", "/tfds", 64_000, 5, info=info,
                                  eval_every=2000)
  assert (config.warmup_learning_rate, config.warmup_epochs * 351) == (0.01, pytest.approx(400))
  assert config.step_decay_boundaries == (32_000, 48_000) and config.population_size == 5
  assert cifar_table.row_config("resnet20", "/data", "/tfds", 3000, 1, info=info,
                                eval_every=300).warmup_learning_rate == -1


def test_torch_parity_trains_both_from_the_same_start_on_the_same_batches(tmp_path):
  pytest.importorskip("torch")
  from resnet_jax.bench import torch_parity
  from short_run import digit_folder
  folder = digit_folder(str(tmp_path / "digits"), range(10), per_class=10)
  parity = torch_parity.run(folder, str(tmp_path / "out"), "resnet8", steps=4, seeds=2,
                            batch_size=32, window=2, speed_rounds=1)
  assert np.shape(parity.ours_losses) == np.shape(parity.torch_losses) == (2, 4)
  assert parity.first_steps_agree and parity.float64_max_rel_diff < 1e-12  # the same sums
  assert parity.float64_running_means_max_rel_diff < 1e-12
  assert parity.ours_losses[0] != parity.ours_losses[1]  # two seeds, two starts
  assert [(w.first_step, w.last_step) for w in parity.windows] == [(1, 2), (3, 4)]
  assert parity.speed.torch_channels_last_images_per_s > 0
  report = torch_parity.format_report(parity)
  assert "| 1–2 |" in report and "PyTorch channels-last" in report


def test_budget_curve_trains_each_budget_and_schedule_once(tmp_path, capsys):
  from resnet_jax.bench import budget_curve
  from short_run import digit_folder
  folder = digit_folder(str(tmp_path / "digits"), range(10), per_class=15)
  argv = [f"--cifar_dir={folder}", f"--workdir={tmp_path / 'budget'}", "--model=resnet8"]
  budget_curve.main(argv + ["--budgets=1,2", "--schedules=step"])
  budget_curve.main(argv + ["--budgets=2", "--schedules=cosine"])
  budget_curve.main(argv + ["--budgets=2", "--schedules=cosine", "--weight_decay=5e-4",
                            "--label_smoothing=0.1", "--cutout_size=3"])  # rows of its own
  runs = json.loads((tmp_path / "budget" / "budget.json").read_text())
  assert sorted((r["schedule"], r["steps"], r["weight_decay"]) for r in runs) == [
      ("cosine", 2, 1e-4), ("cosine", 2, 5e-4), ("step", 1, 1e-4), ("step", 2, 1e-4)]
  assert all(0 <= r["val_accuracy"] <= 1 and r["wall_minutes"] > 0 for r in runs)
  # Re-evaluating the last checkpoint gives the accuracy training logged; flip TTA beside it.
  plain, flip = budget_curve.validation_accuracies(str(tmp_path / "budget" / "resnet8_cosine_2"))
  cosine_run = next(r for r in runs if r["schedule"] == "cosine" and r["weight_decay"] == 1e-4)
  assert plain == pytest.approx(cosine_run["val_accuracy"], abs=1e-6)
  assert cosine_run["val_accuracy_flip"] == pytest.approx(flip, abs=1e-6) and 0 <= flip <= 1
  cosine = json.loads((tmp_path / "budget" / "resnet8_cosine_2" / "config.json").read_text())
  assert cosine["schedule"] == "cosine" and cosine["num_train_steps"] == 2
  assert (cosine["weight_decay"], cosine["label_smoothing"]) == (1e-4, 0.0)
  tuned = json.loads(
      (tmp_path / "budget" / "resnet8_cosine_2_wd0.0005_ls0.1_cutout3" / "config.json"
       ).read_text())
  assert (tuned["weight_decay"], tuned["label_smoothing"], tuned["cutout_size"]) == (5e-4, 0.1, 3)
  assert cosine["cutout_size"] == 0
  table = (tmp_path / "budget" / "budget.md").read_text()
  assert "| paper | step | 2 |" in table and "| wd 0.0005, ls 0.1, cutout 3 | cosine | 2 |" in table
  assert os.path.getsize(tmp_path / "budget" / "budget.png") > 0
  capsys.readouterr()
  result_file = tmp_path / "budget" / "resnet8_step_1" / budget_curve.RESULT_FILE
  result = json.loads(result_file.read_text())
  del result["val_accuracy_flip"]  # as written before the column existed
  result_file.write_text(json.dumps(result))
  budget_curve.main(argv + ["--budgets=1", "--schedules=step"])  # not trained again
  assert "steps:" not in capsys.readouterr().out
  assert 0 <= json.loads(result_file.read_text())["val_accuracy_flip"] <= 1  # filled in


@pytest.mark.slow  # 15-25 s: three benchmarks' compiles; each part has a fast test of its own
def test_gpu_report_stops_the_table_row_at_its_deadline_with_a_checkpoint(tmp_path):
  from resnet_jax.bench import gpu_report
  from short_run import digit_folder
  folder = digit_folder(str(tmp_path / "digits"), range(10), per_class=15)
  # A deadline that passes while the row compiles: the row stops after its first step.
  gpu_report.main([f"--cifar_dir={folder}", f"--out={tmp_path / 'report'}", "--minutes=0.01",
                   "--throughput_model=resnet8", "--throughput_batch=8",
                   "--throughput_image_size=8", "--population_batch=8", "--population_rounds=1",
                   "--row_model=resnet8", "--seeds=2", "--row_steps=1000"])
  report = (tmp_path / "report" / "report.md").read_text()
  assert "## Throughput" in report and "population, loop" in report
  assert "step 1 of 1000" in report and "no evaluation yet" in report
  assert os.listdir(tmp_path / "report" / "table" / "resnet8" / "checkpoints") == ["1"]


def test_the_cifar_nets_are_timed_against_the_papers_net_in_pytorch():
  pytest.importorskip("torch")
  from resnet_jax.bench import torch_reference
  result = torch_reference.time_torch("resnet8", batch_size=8, image_size=8, dtype="float32",
                                      steps=1, warmup_steps=1, channels_last=True,
                                      num_classes=10)
  assert (result.source, result.memory_format) == ("torch_cifar", "channels_last")
  assert result.images_per_sec > 0 and torch_reference.torch_available("resnet20")


def test_our_training_steps_equal_pytorchs_in_float64_recorded_fixture():
  # PyTorch's losses were recorded by tests/fixtures/make_torch_parity_losses.py; no torch here.
  import torch_parity_case as case
  fixture = np.load(os.path.join(os.path.dirname(__file__), "fixtures",
                                 "torch_parity_losses.npz"))
  ours = case.our_steps()
  if case.fingerprint(ours.initial_variables, ours.torch_batches) != str(fixture["fingerprint"]):
    pytest.fail("Fixture drift, not a parity failure: the initial weights or batches differ "
                f"from those the fixture was made with ({fixture['versions']}); regenerate it "
                "with python tests/fixtures/make_torch_parity_losses.py")
  np.testing.assert_allclose(ours.losses, fixture["losses"], rtol=1e-12)
  theirs = {k.removeprefix("running_mean/"): fixture[k] for k in fixture.files
            if k.startswith("running_mean/")}
  assert set(theirs) == set(ours.running_means) and len(theirs) == 7  # stem + 3 blocks × 2
  from resnet_jax.bench import torch_parity
  assert torch_parity.max_relative_difference(ours.running_means, theirs) < 1e-12


def test_train_until_stops_a_training_loop_at_its_deadline_and_not_before_it_listens():
  from resnet_jax.bench import gpu_report
  from resnet_jax.training import preemption
  stopped_after = []

  def training():  # as the loop does: the stop handler installed, checked after each step
    time.sleep(0.3)  # "compiling": a SIGTERM now would end the process, so none may come
    with preemption.StopSignal() as stop:
      for step in range(1, 1000):
        time.sleep(0.01)
        if stop.should_stop(step):
          stopped_after.append(step)
          return

  gpu_report.train_until(time.monotonic() + 0.1, training)
  assert stopped_after and stopped_after[0] < 100


@pytest.fixture(scope="module", params=[("train", "tuned"), ("eval", "tuned"),
                                        ("train", "onednn")])
def step_profile_run(request, tmp_path_factory):
  from resnet_jax.bench import step_profile
  step, layer_impl = request.param
  argv = ["--model", "resnet8", "--image_size", "8", "--batch_size", "8", "--steps", "1",
          "--top", "3", "--step", step, "--layer_impl", layer_impl]
  return run_main(step_profile.main, argv, tmp_path_factory.mktemp("bench") / "profile.json")


def test_step_profile_puts_every_thunk_of_the_step_in_a_kind(step_profile_run):
  record, printed = step_profile_run
  kinds = [row["what"] for row in record["by_kind"]]
  assert any(kind.startswith("conv forward, layer1") for kind in kinds), kinds
  if record["layer_impl"] == "onednn":  # its three directions, by the custom calls' targets
    assert {"conv forward, layer1 (oneDNN)", "conv input gradient, layer2 (oneDNN)",
            "conv weight gradient, layer3 (oneDNN)"} <= set(kinds), kinds
  assert sum(row["ms_per_step"] for row in record["by_kind"]) == pytest.approx(record["thunk_ms"])
  assert 0 < record["covered_ms"] <= record["thunk_ms"] + 1e-6
  assert record["covered_ms"] <= record["wall_ms"]
  assert len(record["slowest"]) == 3 and "| kind | ms per step |" in printed


def test_step_profile_tells_the_gradients_and_the_update_from_the_forward_pass(step_profile_run):
  record, _ = step_profile_run
  kinds = " / ".join(row["what"] for row in record["by_kind"])
  is_train = record["step"] == "train"
  for kind in ("conv input gradient", "conv weight gradient", "elementwise backward",
               "optimizer update"):
    assert (kind in kinds) == is_train, (kind, kinds)
