"""One flag style across the `python -m resnet_jax.*` tools: usage lines that say how to run
them, options documented with underscores, the hyphenated spelling read as the same option."""

import importlib
import re

import pytest

from resnet_jax import cli

TOOLS = ["convert", "export", "faults", "linear_probe", "predict", "summary", "analysis",
         "bench.checkpoint", "bench.compile_time", "bench.degradation", "bench.dry_run",
         "bench.input", "bench.photo_folder", "bench.startup", "bench.throughput",
         "bench.transfer"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_says_how_to_run_it_and_documents_underscored_options(tool, capsys):
  module = importlib.import_module(f"resnet_jax.{tool}" + (".__main__" if tool == "analysis"
                                                          else ""))
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
