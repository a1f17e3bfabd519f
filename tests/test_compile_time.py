"""Specification of the compile-time bench's variants, XLA analyses, HLO dumps and sweep output.

One run of ResNet-20 (8×8 images, the unrolled and the scanned+remat variant) serves every
test; timings are never asserted on, only their presence and the arithmetic between them.
"""

import contextlib
import csv
import io
import json
import os

import pytest

from resnet_jax.bench import compile_time

TINY = ["--image_size", "8", "--batch_size", "16", "--dtype", "float32"]  # as test_bench's


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """(JSON records, printed text, --out dir, --dump_hlo dir) of a one-model sweep."""
  root = tmp_path_factory.mktemp("compile_sweep")
  out, hlo = str(root / "out"), str(root / "hlo")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    compile_time.main(["--sweep", "--sweep_models", "resnet20", "--variants",
                       "unrolled,scanned+remat", *TINY, "--out", out, "--dump_hlo", hlo,
                       "--json", str(root / "records.json")])
  records = json.loads((root / "records.json").read_text())
  return records, stdout.getvalue(), out, hlo


def test_a_row_per_variant_with_xla_cost_and_memory_of_the_train_step(sweep):
  records, _, _, _ = sweep
  assert [(r["model"], r["variant"], r["depth"]) for r in records] == [
      ("resnet20", "unrolled", 20), ("resnet20", "scanned+remat", 20)]
  for r in records:
    cost = r["train_step_cost"]
    assert cost["flops"] > 0 and cost["bytes_accessed"] > 0, cost
    assert cost["argument_bytes"] > 0 and cost["output_bytes"] > 0 and cost["temp_bytes"] > 0
    assert cost["generated_code_bytes"] >= 0 and cost["alias_bytes"] >= 0


def test_variants_are_compared_to_unrolled_in_the_same_run(sweep):
  _, printed, out, _ = sweep
  with open(os.path.join(out, "compile_time.csv")) as f:
    unrolled, scanned = csv.DictReader(f)
  assert float(unrolled["compile_vs_unrolled"]) == float(unrolled["temp_vs_unrolled"]) == 1.0
  assert float(scanned["compile_vs_unrolled"]) == pytest.approx(
      float(scanned["train_step.compile_s"]) / float(unrolled["train_step.compile_s"]))
  assert float(scanned["temp_vs_unrolled"]) == pytest.approx(
      int(scanned["train_step_cost.temp_bytes"]) / int(unrolled["train_step_cost.temp_bytes"]))
  for column in ("GFLOP", "temp MiB", "compile/unrolled", "temp/unrolled"):
    assert column in printed
  assert "resnet20 scanned+remat" in printed and "XLA counts a loop body once" in printed


def test_the_sweep_writes_markdown_csv_plot_and_json(sweep):
  _, _, out, _ = sweep
  assert sorted(os.listdir(out)) == [f"compile_time.{e}" for e in ("csv", "json", "md", "png")]
  markdown = open(os.path.join(out, "compile_time.md")).read().splitlines()
  assert markdown[0].startswith("| model | variant | depth |") and len(markdown) == 4
  with open(os.path.join(out, "compile_time.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dump_hlo_writes_both_programs_of_each_variant(sweep):
  _, _, _, hlo = sweep
  assert sorted(os.listdir(hlo)) == sorted(
      f"resnet20.{variant}.{program}{suffix}" for variant in ("unrolled", "scanned+remat")
      for program in ("train_step", "forward") for suffix in (".stablehlo.mlir", ".hlo.txt"))
  read = lambda name: open(os.path.join(hlo, name)).read()  # noqa: E731
  assert "HloModule" in read("resnet20.unrolled.train_step.hlo.txt")
  assert "stablehlo.while" in read("resnet20.scanned+remat.train_step.stablehlo.mlir")
  assert "stablehlo.while" not in read("resnet20.unrolled.train_step.stablehlo.mlir")


@pytest.mark.parametrize("flags,variants", [
    ([], ["unrolled"]), (["--scan_blocks"], ["scanned"]), (["--remat"], ["remat"]),
    (["--scan_blocks", "--remat"], ["scanned+remat"]), (["--sweep"], ["unrolled", "scanned"]),
    (["--variants", "remat,unrolled"], ["remat", "unrolled"])])
def test_flags_choose_the_variants(flags, variants):
  assert compile_time.chosen_variants(compile_time.make_parser().parse_args(flags)) == variants


def test_the_sweep_covers_imagenet_and_cifar_depths_and_picks_a_subset():
  parse = compile_time.make_parser().parse_args
  models = compile_time.chosen_models(parse(["--sweep", "--out", "x"]))
  assert [compile_time.model_depth(m) for m in models] == [
      18, 34, 50, 101, 152, 200, 20, 32, 44, 56, 110, 1202]
  assert compile_time.chosen_models(parse(["--sweep", "--out", "x", "--sweep_models",
                                           "resnet20,resnet56"])) == ["resnet20", "resnet56"]
  assert [compile_time.default_image_size(m) for m in ("resnet20", "resnet50")] == [32, 64]


@pytest.mark.parametrize("flags,message", [
    (["--variants", "unrolled", "--remat"], "drop --scan_blocks/--remat"),
    (["--variants", "folded"], "unknown ['folded']"),
    (["--sweep"], "give --out DIR"),
    (["--sweep_models", "resnet20"], "use --models otherwise")])
def test_conflicting_or_unknown_choices_are_one_error_line(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compile_time.main(flags)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
