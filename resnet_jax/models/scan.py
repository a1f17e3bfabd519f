"""Repeated blocks under `nn.scan` and `nn.remat`, and the two layouts of their variables.

A stage's blocks after the first have one shape, so `ResNet(scan_blocks=True)` traces one
of them and loops it (`nn.scan`): the program, and its compile time, stop growing with
depth. Its variables then differ in layout from the unrolled model's:
- unrolled (canonical: torchvision names, what weights files hold): `layer{i}_{j}` per block;
- scanned: `layer{i}_0` unchanged, blocks 1..n-1 stacked on a leading axis in `layer{i}_scan`
  (stages of one or two blocks stay unrolled: a loop over one block would save nothing).
`to_scanned` and `to_unrolled` convert "params" and "batch_stats" either way; the layout
is read from the names, so `in_layout_of` converts any variables to fit a model's.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models.blocks import ResidualBlock
from resnet_jax.models.layers import CONV_OUTPUT

Array = jax.Array
PyTree = Any

# What a rematerialised block keeps for the backward pass. "conv_outputs_saveable" keeps
# every conv's result (named layers.CONV_OUTPUT) and recomputes only norms and ReLUs; the
# rest are jax.checkpoint_policies. "dots_saveable" keeps XLA's convolutions too, but not
# the tuned layers' (custom-VJP functions, not conv primitives), and convs are not dots
# without batch dimensions; "everything_saveable" saves all, as without remat.
REMAT_POLICIES = ("nothing_saveable", "conv_outputs_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
UNROLLED_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")
SCANNED_BLOCKS = re.compile(r"^layer(\d+)_scan$")


def is_looped(stage_size: int) -> bool:
  """Whether `scan_blocks` loops a stage of `stage_size` blocks: two or more after its first."""
  return stage_size > 2


def checkpoint_policy(name: str) -> Callable[..., bool]:
  """The jax.checkpoint policy named `name` (one of REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}: must be one of {', '.join(REMAT_POLICIES)}")
  if name == "conv_outputs_saveable":
    return jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT)
  return getattr(jax.checkpoint_policies, name)


def rematted(block_cls: type[ResidualBlock], policy: str) -> type[ResidualBlock]:
  """`block_cls` recomputing its activations in the backward pass; `train` stays static."""
  return nn.remat(block_cls, policy=checkpoint_policy(policy), static_argnums=(2,))


class ScanStep(nn.Module):
  """One step of a scanned stage: (x, drop-path rate or None) → (block(x), None).

  The block shares this module's scope, so its variables keep their own names (conv1,
  bn1, ...) directly under the stage's `layer{i}_scan`.
  """

  block: Callable[..., ResidualBlock]  # the block class with every field but drop_path_rate
  train: bool

  @nn.compact
  def __call__(self, x: Array, drop_path_rate: Array | None) -> tuple[Array, None]:
    rate = 0.0 if drop_path_rate is None else drop_path_rate
    block = self.block(drop_path_rate=rate, name="block")
    nn.share_scope(self, block)
    return block(x, self.train), None


def scanned_blocks(block: Callable[..., ResidualBlock], x: Array, drop_path_rates: Sequence[float],
                   *, train: bool, remat_policy: str | None, name: str) -> Array:
  """Applies `len(drop_path_rates)` blocks of one shape as one scanned block named `name`.

  Call inside a module's compact method. Each block's rate is a scanned input, so
  stochastic depth still grows block by block; `remat_policy` (or None) rematerialises each.
  """
  step = ScanStep
  if remat_policy is not None:  # prevent_cse is not needed inside scan and costs speed
    step = nn.remat(ScanStep, policy=checkpoint_policy(remat_policy), prevent_cse=False)
  stack = nn.scan(step, variable_axes={"params": 0, "batch_stats": 0},
                  split_rngs={"params": True, "drop_path": True}, length=len(drop_path_rates))
  rates = jnp.asarray(drop_path_rates, jnp.float32) if any(drop_path_rates) else None
  x, _ = stack(block, train, name=name)(x, rates)
  return x


def is_scanned(variables: dict[str, PyTree]) -> bool:
  """Whether `variables` ({"params", "batch_stats", ...}) hold any stacked stage."""
  return any(SCANNED_BLOCKS.match(name) for collection in variables.values()
             if isinstance(collection, dict) for name in collection)


def to_scanned(variables: dict[str, PyTree]) -> dict[str, PyTree]:
  """Unrolled variables → scanned: each stage's blocks 1..n-1 stacked into `layer{i}_scan`.

  Raises ValueError when they are scanned already or blocks that must stack differ in shape.
  """
  if is_scanned(variables):
    raise ValueError("The variables are in the scanned layout already (they have layer*_scan)")
  return _map_collections(_scan_collection, variables)


def to_unrolled(variables: dict[str, PyTree]) -> dict[str, PyTree]:
  """Scanned variables → unrolled (`layer{i}_{j}` per block); unrolled ones are returned as is.

  Raises ValueError when a stacked stage's variables disagree on the number of blocks.
  """
  return _map_collections(_unscan_collection, variables)


def in_layout_of(variables: dict[str, PyTree], template: dict[str, PyTree]) -> dict[str, PyTree]:
  """`variables` converted, if needed, to the layout (scanned or not) of `template`'s."""
  if is_scanned(variables) == is_scanned(template):
    return variables
  return to_scanned(variables) if is_scanned(template) else to_unrolled(variables)


def _map_collections(convert: Callable[[dict], dict], variables: dict[str, PyTree]
                     ) -> dict[str, PyTree]:
  return {k: convert(v) if isinstance(v, dict) else v for k, v in variables.items()}


def _scan_collection(tree: dict[str, PyTree]) -> dict[str, PyTree]:
  out = {k: v for k, v in tree.items() if not UNROLLED_BLOCK.match(k)}
  stages: dict[int, dict[int, PyTree]] = {}
  for name, block in tree.items():
    if match := UNROLLED_BLOCK.match(name):
      stages.setdefault(int(match[1]), {})[int(match[2])] = block
  for stage, blocks in sorted(stages.items()):
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"Stage {stage} has blocks {sorted(blocks)}: they must be numbered "
                       f"layer{stage}_0, layer{stage}_1, ... without gaps")
    if is_looped(len(blocks)):
      out[f"layer{stage}_0"] = blocks[0]
      out[f"layer{stage}_scan"] = _stack(stage, [blocks[j] for j in range(1, len(blocks))])
    else:
      out.update({f"layer{stage}_{j}": block for j, block in blocks.items()})
  return out


def _stack(stage: int, blocks: list[PyTree]) -> PyTree:
  """Blocks 1..n-1 of `stage` stacked leaf by leaf; ValueError naming a leaf that differs."""
  first = jax.tree_util.tree_leaves_with_path(blocks[0])
  for j, block in enumerate(blocks[1:], start=2):
    leaves = jax.tree_util.tree_leaves_with_path(block)
    have = {jax.tree_util.keystr(p): np.shape(leaf) for p, leaf in leaves}
    for path, leaf in first:
      key = jax.tree_util.keystr(path)
      if have.get(key) != np.shape(leaf):
        raise ValueError(f"Cannot stack the blocks of stage {stage}: layer{stage}_{j}{key} has "
                         f"shape {have.get(key)} but layer{stage}_1{key} has {np.shape(leaf)}")
    if len(have) != len(first):
      raise ValueError(f"Cannot stack the blocks of stage {stage}: layer{stage}_{j} has other "
                       f"variables than layer{stage}_1")
  return jax.tree.map(lambda *leaves: _stack_leaves(leaves), *blocks)


def _stack_leaves(leaves: Sequence[Any]) -> Any:
  """np.stack for host arrays (weights read from disk), jnp.stack for device arrays."""
  return np.stack(leaves) if isinstance(leaves[0], np.ndarray) else jnp.stack(leaves)


def _unscan_collection(tree: dict[str, PyTree]) -> dict[str, PyTree]:
  out = {k: v for k, v in tree.items() if not SCANNED_BLOCKS.match(k)}
  for name, stacked in tree.items():
    if not (match := SCANNED_BLOCKS.match(name)):
      continue
    lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
    if len(lengths) != 1 or None in lengths:
      raise ValueError(f"{name} does not hold stacked blocks: the leading axes of its "
                       f"variables are {sorted(lengths, key=str)}, not one number of blocks")
    for j in range(1, lengths.pop() + 1):
      block_name = f"layer{match[1]}_{j}"
      if block_name in tree:
        raise ValueError(f"The variables hold both {name} and {block_name}: mixed layouts")
      out[block_name] = jax.tree.map(lambda leaf, j=j: leaf[j - 1], stacked)
  return out
