"""Populations: several members of one config trained by one compiled program.

Member i is the run with seed `seed + i` (and its own learning rate and weight decay when
`population_learning_rates` / `population_weight_decays` give them), fed the population's
one input stream (`data_seed`). Their train states are stacked along a leading member axis
and the pure train step is mapped over it, so member i's slice of the stacked state is the
state of that single run:
- "vmap": `jax.vmap`, the members batched into every operation;
- "loop": `jax.lax.map`, the members one after another inside the one program.
"auto" picks by backend, from the measurement in BENCHMARKS.md ("Populations").
The step function knows nothing of members: a member's learning rate and weight decay reach
its optimizer as traced values (`make_member_step`), and the optimizer state's structure is
the single run's.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PyTree = Any
# "auto": measured on CPU (2 cores, ResNet-20, batch 128, 5 members; BENCHMARKS.md).
AUTO_MODES = {"cpu": "loop"}
DEFAULT_MODE = "vmap"  # accelerators: one program of N× wider operations


def member_seeds(config: ml_collections.ConfigDict) -> list[int]:
  """The seed of each member: seed, seed + 1, ..."""
  return [config.seed + i for i in range(config.population_size)]


def data_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the input stream's order and augmentation (shared by all members)."""
  return config.seed if config.data_seed < 0 else config.data_seed


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Each member's learning rate and weight decay, float32 arrays of [population_size]."""
  size = config.population_size
  learning_rates = tuple(config.population_learning_rates) or (config.learning_rate,) * size
  weight_decays = tuple(config.population_weight_decays) or (config.weight_decay,) * size
  return {"learning_rate": np.asarray(learning_rates, np.float32),
          "weight_decay": np.asarray(weight_decays, np.float32)}


def resolve_mode(mode: str, backend: str | None = None) -> str:
  """`mode`, with "auto" resolved for `backend` (default: JAX's)."""
  if mode != "auto":
    return mode
  return AUTO_MODES.get(backend or jax.default_backend(), DEFAULT_MODE)


def stack(trees: list[PyTree]) -> PyTree:
  """Stacks equal-structured trees along a new leading member axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: PyTree, index: int) -> PyTree:
  """Member `index`'s slice of a stacked tree."""
  return jax.tree.map(lambda x: x[index], tree)


def map_members(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
  """`fn(*member_args)` over stacked arguments (each with the leading member axis).

  "vmap" batches the members into each operation; "loop" runs them one after another
  (`lax.map`, a loop inside the program), each with `fn`'s own, unbatched operations.
  """
  if mode == "vmap":
    return jax.vmap(fn)
  if mode == "loop":
    return lambda *args: jax.lax.map(lambda a: fn(*a), args)
  raise ValueError(f"config.population_mode={mode!r}: must be 'vmap' or 'loop'")


def make_member_step(train_step: Callable[..., Any], make_optimizer: Callable[[jax.Array,
                     jax.Array], tuple[Any, Any]]) -> Callable[..., Any]:
  """A train step for one member, its learning rate and weight decay as (traced) arrays.

  `make_optimizer(learning_rate, weight_decay)` returns (optimizer, schedule); the member's
  state goes through `train_step` with that optimizer, which has the same state structure
  as the one the state was built with, and comes back with its own.
  """
  def member_step(state, batch, hyper: Mapping[str, jax.Array], axis_name=None):
    tx, schedule = make_optimizer(hyper["learning_rate"], hyper["weight_decay"])
    new_state, metrics = train_step(state.replace(tx=tx), batch, learning_rate_fn=schedule,
                                    axis_name=axis_name)
    return new_state.replace(tx=state.tx), metrics
  return member_step


def make_population_steps(member_step: Callable[..., Any], eval_step: Callable[..., Any],
                          hyper: Mapping[str, np.ndarray], mode: str
                          ) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The population's train and eval steps over stacked states: `(states, batch) -> ...`.

  Every member sees the same batch; metrics come back with a leading member axis.
  """
  hyper = {k: jnp.asarray(v) for k, v in hyper.items()}

  def train_step(states, batch, axis_name=None):
    step = lambda state, h: member_step(state, batch, h, axis_name=axis_name)  # noqa: E731
    return map_members(step, mode)(states, hyper)

  def population_eval_step(states, batch, axis_name=None):
    return map_members(lambda state: eval_step(state, batch, axis_name=axis_name), mode)(states)

  return train_step, population_eval_step


def summarize(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Per-member metrics ([members] each) as the mean under each name, `<name>_std`, and
  `<prefix>/member{i}/<rest>` per member (`eval/accuracy` → `eval/member0/accuracy`)."""
  summary = {}
  for name, values in metrics.items():
    values = np.asarray(values, np.float64)
    summary[name] = float(np.mean(values))
    summary[f"{name}_std"] = float(np.std(values))
    for i, value in enumerate(values):
      summary[member_key(name, i)] = float(value)
  return summary


def member_key(name: str, index: int) -> str:
  """The name of member `index`'s value of `name`: eval/accuracy → eval/member0/accuracy."""
  prefix, _, rest = name.partition("/")
  return f"{prefix}/member{index}/{rest}" if rest else f"member{index}/{name}"


def member_values(metrics: Mapping[str, float], name: str) -> list[float]:
  """The per-member values of `name` ("eval/accuracy") in summarized metrics, by member."""
  values = []
  while member_key(name, len(values)) in metrics:
    values.append(metrics[member_key(name, len(values))])
  return values
