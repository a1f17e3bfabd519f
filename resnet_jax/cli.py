"""Command lines of the `python -m resnet_jax.*` tools: one flag style, both spellings.

Options are documented with underscores, as train.py's absl flags and the config keys are
(`--top_k`, `--image_size`); the hyphenated spelling of a known option (`--top-k`) is read
as that option, so either works everywhere. Usage lines name the command that runs the tool.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, reading `--top-k` as `--top_k` where that is one of its options."""

  def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    return super().parse_known_args([self._underscored(arg) for arg in args], namespace)

  def _underscored(self, arg: str) -> str:
    if not arg.startswith("--") or arg == "--":
      return arg
    name, equals, value = arg.partition("=")
    spelled = "--" + name[2:].replace("-", "_")
    return spelled + equals + value if spelled in self._option_string_actions else arg


def parser_for(module: str, doc: str | None, **kwargs) -> ArgumentParser:
  """The parser of `python -m MODULE`, described by the first paragraph of its docstring."""
  description = (doc or "").strip().split("\n\n")[0]
  return ArgumentParser(prog=f"python -m {module}", description=description, **kwargs)
