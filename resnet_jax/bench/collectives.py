"""The collectives in an optimised HLO module: what a compiled SPMD step sends between devices.

XLA prints each collective as one instruction whose result type gives the bytes it moves;
a combined all-reduce has a tuple result (`(f32[64]{0}, f32[3,3,16,16]{3,2,1,0})
all-reduce(...)`) and counts once, with several arrays. A collective in a `while` body
runs once per iteration: it counts the loop's known trip count times (once if XLA does
not know it, and the stats say so).
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_COLLECTIVE = re.compile(  # `%name = TYPE kind(` (TYPE may be a tuple, with spaces)
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s+(.+?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:to_apply|calls|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
  """One kind of collective in a step: how often it runs and how much it moves."""
  kind: str
  count: int  # executions per step (a combined all-reduce is one)
  arrays: int  # arrays moved per step (a combined all-reduce moves several)
  bytes: int  # result bytes per step: for reduce-scatter, each device's share
  trip_count_unknown: bool = False  # some ran in a loop XLA has no trip count for (counted once)


def array_bytes(hlo_type: str) -> int:
  """Bytes of the arrays in an HLO type (`bf16[8,3]{1,0}` or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
    elements = 1
    for d in filter(None, dims.split(",")):
      elements *= int(d)
    total += elements * bits // 8
  return total


def split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """Each computation's instruction lines, and the entry computation's name."""
  bodies, entry, current = {}, "", None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      bodies[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _executions(bodies: dict[str, list[str]], entry: str) -> tuple[dict[str, int], set[str]]:
  """How often each computation runs per call of `entry`; and those under unknown loops."""
  callers = collections.defaultdict(list)  # callee → [(caller, times per caller run, known)]
  for caller, lines in bodies.items():
    for line in lines:
      trip = _TRIP_COUNT.search(line)
      for callee in _CALLS.findall(line):
        is_body = f"body=%{callee}" in line or f"body={callee}" in line
        times = int(trip.group(1)) if is_body and trip else 1
        callers[callee].append((caller, times, not is_body or trip is not None))
      for group in _BRANCHES.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", group):
          callers[callee].append((caller, 1, True))
  runs: dict[str, int] = {entry: 1}
  unknown: set[str] = set()

  def visit(name: str) -> int:
    if name not in runs:
      total = 0  # HLO's call graph has no cycles
      for caller, times, known in callers.get(name, ()):
        total += visit(caller) * times
        if not known or caller in unknown:
          unknown.add(name)
      runs[name] = total
    return runs[name]

  for name in bodies:
    visit(name)
  return runs, unknown


def collectives(hlo_text: str) -> dict[str, CollectiveStats]:
  """The collectives of one run of the module's entry computation, by kind (absent: none)."""
  bodies, entry = split_computations(hlo_text)
  runs, unknown = _executions(bodies, entry)
  totals: dict[str, list] = {}
  for name, lines in bodies.items():
    for line in lines:
      found = _COLLECTIVE.search(line)
      if not found or not runs.get(name):
        continue
      hlo_type, kind = found.groups()
      count, arrays, size, uncertain = totals.get(kind, (0, 0, 0, False))
      times = runs[name]
      totals[kind] = (count + times, arrays + times * len(_ARRAY.findall(hlo_type)),
                      size + times * array_bytes(hlo_type), uncertain or name in unknown)
  return {kind: CollectiveStats(kind, *totals[kind]) for kind in KINDS if kind in totals}
