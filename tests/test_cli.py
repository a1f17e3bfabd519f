"""One flag style across the `python -m resnet_jax.*` tools: usage lines that say how to run
them, options documented with underscores, the hyphenated spelling read as the same option."""

import argparse
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from resnet_jax import cli, faults
from resnet_jax.data import quiet_tensorflow

TOOLS = ["convert", "export", "faults", "linear_probe", "predict", "summary", "analysis",
         "bench.checkpoint", "bench.compile_time", "bench.degradation", "bench.dry_run",
         "bench.input", "bench.photo_folder", "bench.startup", "bench.throughput",
         "bench.transfer", "bench.population", "bench.cifar_table", "take_member"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_says_how_to_run_it_and_documents_underscored_options(tool, capsys,
                                                                         monkeypatch):
  module = importlib.import_module(f"resnet_jax.{tool}" + (".__main__" if tool == "analysis"
                                                          else ""))
  parse = argparse.ArgumentParser.parse_known_args

  def only_through_cli(self, *args, **kwargs):  # so that --top-k reads as --top_k everywhere
    assert isinstance(self, cli.ArgumentParser), f"{tool} parses without resnet_jax.cli"
    return parse(self, *args, **kwargs)
  monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", only_through_cli)
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  assert usage.startswith(f"usage: python -m resnet_jax.{tool} ")
  options = re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*", usage)
  assert options and not [o for o in options if "-" in o[2:]], options


def test_a_hyphenated_option_is_read_as_the_underscored_one():
  parser = cli.parser_for("resnet_jax.example", "An example.")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--image_size", type=int)
  parser.add_argument("images", nargs="*")
  for argv in (["--top-k", "3", "--image-size=32", "a-b.png"],
               ["--top_k=3", "--image_size", "32", "a-b.png"]):
    args = parser.parse_args(argv)
    assert (args.top_k, args.image_size, args.images) == (3, 32, ["a-b.png"])
  with pytest.raises(SystemExit):  # an unknown option stays unknown in either spelling
    parser.parse_args(["--top-kk", "3"])


def test_a_train_py_start_prints_no_tensorflow_loading_lines(tmp_path, digits_data_dir):
  result = subprocess.run(
      [sys.executable, "train.py", f"--workdir={tmp_path}", f"--config.data_dir={digits_data_dir}",
       "--config.model=resnet8", "--config.num_train_steps=1", "--config.batch_size=32",
       "--config.progress_bar=False"], cwd=pathlib.Path(__file__).resolve().parent.parent,
      env=faults.cpu_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("Starting resnet8 on digits from scratch")
  noise = [line for line in (result.stdout + result.stderr).splitlines()
           if quiet_tensorflow.NOISE.search(line)]
  assert noise == [] and len(result.stderr.strip().splitlines()) <= 1, result.stderr
