"""Takes one member out of a population's checkpoint as ordinary weights.

A population (`config.population_size` > 1) checkpoints all its members together, with a
leading member axis on every array. This writes member I's weights (the EMA of its params
when the run kept one, and its BatchNorm statistics) in the layout `resnet_jax.convert`
writes, which predict, export, linear_probe and `config.init_from` read like any other:

  python -m resnet_jax.take_member WORKDIR --member=2 --output=member2
  python -m resnet_jax.predict --checkpoint=member2 image.jpg
"""

from __future__ import annotations

from typing import Sequence

from resnet_jax import cli, pretrained


def take_member(checkpoint: str, member: int, output: str) -> pretrained.Pretrained:
  """Writes member `member` of the population checkpoint `checkpoint` to `output` (new)."""
  weights = pretrained.load(checkpoint, member=member)
  pretrained.save(output, weights.variables, weights.info)
  return weights


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.take_member", __doc__)
  parser.add_argument("checkpoint", help="a population's train.py workdir or one checkpoint")
  parser.add_argument("--member", type=int, required=True, help="which member, from 0")
  parser.add_argument("--output", required=True, help="a new directory for its weights")
  args = parser.parse_args(argv)
  try:
    weights = take_member(args.checkpoint, args.member, args.output)
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"Wrote member {args.member} of {weights.path} ({weights.info.model}, "
        f"{weights.info.num_classes} classes) to {args.output}")


if __name__ == "__main__":
  main()
