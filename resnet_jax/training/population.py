"""Populations: several members of one config trained together, in one run.

Member i is the run with seed `seed + i` (and its own learning rate and weight decay when
`population_learning_rates` / `population_weight_decays` give them), fed the population's
one input stream (`data_seed`). Their train states are stacked along a leading member axis,
so member i's slice of the stacked state is the state of that single run; checkpoints hold
the stacked state. How the members' steps run is `config.population_mode`:
- "vmap": one program, `jax.vmap` of the pure step over the member axis (the members
  batched into every operation: wider work for an accelerator);
- "loop": the single run's compiled step, called once per member on each batch (each
  member's state laid out as a single run's while it trains).
"auto" picks by backend, from the measurement in BENCHMARKS.md ("Populations"): on CPU the
loop (XLA:CPU runs the vmapped convolutions, grouped, several times slower).
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

from resnet_jax.training import parallel

PyTree = Any
# "auto": on CPU measured (bench.population: ResNet-20, 5 members, batch 128, 2 cores: the
# loop 6.4× faster than vmap, 0.94× of 5 single runs); elsewhere vmap, not yet measured.
AUTO_MODES = {"cpu": "loop"}
DEFAULT_MODE = "vmap"


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


@jax.jit  # compiled, so that it also takes global arrays that span processes
def stack(trees: list[PyTree]) -> PyTree:
  """Stacks equal-structured trees along a new leading member axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@jax.jit
def member(tree: PyTree, index: int | jax.Array) -> PyTree:
  """Member `index`'s slice of a stacked tree."""
  return jax.tree.map(lambda x: x[index], tree)


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


def make_data_parallel(parallelism: str, member_step: Callable[..., Any],
                       eval_step: Callable[..., Any], hyper: Mapping[str, np.ndarray],
                       mode: str) -> tuple[parallel.DataParallel, Callable[..., Any]]:
  """The population's `DataParallel` over stacked states, and the pure step it compiles.

  Its train and eval steps take the stacked state and one batch, which every member sees;
  their metrics come back with a leading member axis. `put_state` and `get_state` take and
  give the stacked state, as checkpoints hold it.
  """
  hyper = {k: jnp.asarray(v) for k, v in hyper.items()}
  if mode == "vmap":
    def train_step(states, batch, axis_name=None):
      step = lambda state, h: member_step(state, batch, h, axis_name=axis_name)  # noqa: E731
      return jax.vmap(step)(states, hyper)

    def population_eval_step(states, batch, axis_name=None):
      return jax.vmap(lambda state: eval_step(state, batch, axis_name=axis_name))(states)

    return parallel.make_data_parallel(parallelism, train_step, population_eval_step), train_step
  if mode != "loop":
    raise ValueError(f"config.population_mode={mode!r}: must be 'vmap' or 'loop'")

  # The loop: one member's step, compiled once, its hyperparameters carried beside its state.
  def member_train_step(member_and_hyper, batch, axis_name=None):
    state, member_hyper = member_and_hyper
    state, metrics = member_step(state, batch, member_hyper, axis_name=axis_name)
    return (state, member_hyper), metrics

  def member_eval_step(member_and_hyper, batch, axis_name=None):
    return eval_step(member_and_hyper[0], batch, axis_name=axis_name)

  one = parallel.make_data_parallel(parallelism, member_train_step, member_eval_step)
  size = len(hyper["learning_rate"])

  def put_state(states):
    return [one.put_state((member(states, i), member(hyper, i))) for i in range(size)]

  def get_state(members):
    return stack([one.get_state(m)[0] for m in members])

  def train_step(members, batch):
    results = [one.train_step(m, batch) for m in members]
    return [m for m, _ in results], stack([metrics for _, metrics in results])

  def population_eval_step(members, batch):
    return stack([one.eval_step(m, batch) for m in members])

  return parallel.DataParallel(one.mode, put_state, get_state, one.put_batch, train_step,
                               population_eval_step), member_train_step


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
