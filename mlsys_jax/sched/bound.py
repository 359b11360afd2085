"""How fast can *any* inter-operator schedule of a graph be? Dependency-chain bounds for IOS.

IOS (Ding et al., MLSys 2021) changes two things about a CNN's execution: which independent operators
run at the same time (concurrent stages) and which same-input convolutions become one kernel (merge
stages). Neither shortens a chain of dependent operators: operators on one path must run one after
another, and a merge joins operators of *different* branches (same input), so a merged kernel replaces
one operator of a path by a kernel that does at least as much work. Assuming that such a merged kernel
is not faster than the operator it replaces, and that kernels run no faster when other kernels share the
GPU, every IOS schedule of a graph whose operators take ``t(u)`` satisfies

    latency(schedule) >= max over source-to-sink paths P of sum_{u in P} t(u)        (critical path)

and the speedup any such schedule can reach over a program ``B`` of the same operators is at most
``latency(B) / latency(P)``. ``longest_paths`` finds the longest paths (and near-longest ones through
other operators) for given unit latencies; ``path_program`` builds a function that runs only the units
of one path, with every value produced off the path passed in, so the chain can be compiled and timed
on the device with the same compiler options and constants as the scheduled program
(``benchmarks/ios.py chain``). Compiled alone, XLA may fuse a few operators differently or autotune
a different kernel for some of them, so the measured chain bounds the schedules made of the kernels it
ran; the unit latencies only choose *which* chains to time.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mlsys_jax.sched import build_graph
  >>> g = build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) @ jnp.ones((4, 2)) + x @ jnp.ones((4, 2)),
  ...                 jnp.ones((1, 4)))
  >>> [(round(t, 1), units) for t, units in longest_paths(g, [1.0, 2.0, 0.5, 0.1], k=2)]
  [(3.1, (0, 1, 3)), (0.6, (2, 3))]
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import jax

from mlsys_jax.sched import emit
from mlsys_jax.sched.graph import Graph


def _check_latency(g: Graph, unit_latency: Sequence[float]) -> list:
  lat = [float(t) for t in unit_latency]
  if len(lat) != len(g.units):
    raise ValueError(f"unit_latency has {len(lat)} entries but the graph has {len(g.units)} units; "
                     "give one latency per unit, in unit order")
  bad = [i for i, t in enumerate(lat) if not math.isfinite(t) or t < 0]
  if bad:
    raise ValueError(f"unit_latency must be finite and >= 0; units {bad[:8]} have "
                     f"{[lat[i] for i in bad[:8]]}")
  return lat


def longest_paths(g: Graph, unit_latency: Sequence[float], k: int = 1) -> list:
  """The longest source-to-sink path of the unit DAG and up to ``k - 1`` more, each the longest path
  through a unit no earlier path visits (taken in decreasing order of that length).

  Args:
    g: a unit graph (``build_graph``).
    unit_latency: one non-negative latency per unit (seconds or any unit), e.g. measured single-unit
      stages (``StageProfiler``) or ``AnalyticalCost().unit_time``.
    k: number of paths (>= 1).

  Returns:
    list of ``(length, units)``, ``units`` a tuple of unit indices in dependency order, longest first;
    the first entry is the critical path ``max_P sum_{u in P} t(u)``.

  Example:
    >>> from mlsys_jax.sched import build_graph
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))   # units: dot, dot, add
    >>> longest_paths(build_graph(f, jnp.ones((1, 4))), [1.0, 2.0, 0.5], k=2)   # then the path through 0
    [(2.5, (1, 2)), (1.5, (0, 2))]
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")
  lat = _check_latency(g, unit_latency)
  n = len(g.units)
  if n == 0:
    return []
  # unit indices are topological (``build_graph`` numbers units in equation order, as
  # ``sequential_schedule`` relies on), so one forward and one backward sweep suffice
  down = [0.0] * n  # longest path ending at u, u included
  best_pred = [-1] * n
  for u in range(n):
    preds = g.units[u].preds
    if preds:
      p = max(preds, key=lambda q: (down[q], -q))
      down[u], best_pred[u] = down[p] + lat[u], p
    else:
      down[u] = lat[u]
  up = [0.0] * n  # longest path starting after u
  best_succ = [-1] * n
  for u in reversed(range(n)):
    succs = g.units[u].succs
    if succs:
      s = max(succs, key=lambda q: (lat[q] + up[q], -q))
      up[u], best_succ[u] = lat[s] + up[s], s
  through = [down[u] + up[u] for u in range(n)]
  paths, seen = [], set()
  for u in sorted(range(n), key=lambda v: (-through[v], v)):
    if len(paths) == k:
      break
    if u in seen:
      continue
    head, v = [], u
    while v != -1:
      head.append(v)
      v = best_pred[v]
    tail, v = [], best_succ[u]
    while v != -1:
      tail.append(v)
      v = best_succ[v]
    path = tuple(reversed(head)) + tuple(tail)
    seen.update(path)
    paths.append((sum(lat[v] for v in path), path))
  return paths


def stage_critical_path(g: Graph, stages: Sequence, stage_latency: Sequence[float]) -> float:
  """Latency of a schedule if every stage started as soon as the stages it reads from had finished:
  the longest path of the *stage* DAG (stage ``i`` depends on stage ``j`` when a unit of ``i`` reads a
  unit of ``j``), weighted by the stage latencies.

  A CUDA graph built with CONCURRENT scheduling (the default emission) takes its edges from data
  dependencies, so independent stages overlap and a schedule's sum of stage latencies (IOS's own
  objective, Ding et al., MLSys 2021, Sec. 4) over-predicts the whole program; this is the other end,
  the latency with unlimited overlap. Measured programs lie between the two (``benchmarks/ios.py batch``
  fits a correction on both).

  Example:
    >>> from mlsys_jax.sched import build_graph, sequential_schedule
    >>> f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4))   # units: dot, dot, add
    >>> g = build_graph(f, jnp.ones((1, 4)))
    >>> stage_critical_path(g, sequential_schedule(g), [1.0, 2.0, 0.5])        # the dots overlap
    2.5
  """
  lat = [float(t) for t in stage_latency]
  if len(lat) != len(stages):
    raise ValueError(f"stage_latency has {len(lat)} entries for {len(stages)} stages; give one per stage")
  bad = [i for i, t in enumerate(lat) if not math.isfinite(t) or t < 0]
  if bad:
    raise ValueError(f"stage_latency must be finite and >= 0; stages {bad[:8]} have {[lat[i] for i in bad[:8]]}")
  where = {}
  for i, st in enumerate(stages):
    for u in st.units:
      if u in where:
        raise ValueError(f"unit {u} is in stages {where[u]} and {i}; a schedule runs every unit once")
      where[u] = i
  missing = [u for u in range(len(g.units)) if u not in where]
  if missing:
    raise ValueError(f"units {missing[:8]} are in no stage; the stages must cover the graph")
  end = [0.0] * len(stages)
  for i, st in enumerate(stages):
    deps = {where[p] for u in st.units for p in g.units[u].preds if where[p] != i}
    if any(j > i for j in deps):
      raise ValueError(f"stage {i} reads a later stage; stages must be in dependency order")
    end[i] = max((end[j] for j in deps), default=0.0) + lat[i]
  return max(end, default=0.0)


def path_program(g: Graph, units: Sequence[int]) -> tuple[Callable, list]:
  """A function that runs only ``units`` (flat primitives, in the given order).

  Returns ``(fn, extra_ids)``: ``fn(consts, extras, *args)`` with ``consts`` as for ``make_program``
  (``{value id: array}``, e.g. ``g.consts``), ``extras`` a tuple with one array per value id of
  ``extra_ids`` (the values the units read that no unit of ``units`` produces and that are not
  arguments of the traced function), and ``args`` the traced function's arguments. It returns the
  outputs of the last unit. With ``extras`` equal to the values the full function computes, the
  outputs equal those of the full function's last unit of the path.

  Raises ValueError for unit indices out of range, repeats, or an order in which a unit comes before
  one of its predecessors that is also listed.

  Example:
    >>> from mlsys_jax.sched import build_graph
    >>> w1, w2 = jnp.ones((4, 4)), 2 * jnp.ones((4, 4))
    >>> f = lambda x: jnp.tanh(x @ w1) + x @ w2
    >>> x = jnp.ones((1, 4))
    >>> g = build_graph(f, x)
    >>> fn, extra_ids = path_program(g, (1, 2))          # the second dot and the add
    >>> out = fn(g.consts, (jnp.tanh(x @ w1),), x)        # the first dot's output comes in as an extra
    >>> len(extra_ids), bool(jnp.allclose(out[0], f(x)))
    (1, True)
  """
  units = [int(u) for u in units]
  if not units:
    raise ValueError("units is empty; pass a path from longest_paths")
  n = len(g.units)
  bad = [u for u in units if not 0 <= u < n]
  if bad:
    raise ValueError(f"unit indices {bad} out of range for a graph of {n} units")
  if len(set(units)) != len(units):
    raise ValueError(f"units has repeats: {units}")
  pos = {u: i for i, u in enumerate(units)}
  for u in units:
    late = [p for p in g.units[u].preds if p in pos and pos[p] > pos[u]]
    if late:
      raise ValueError(f"unit {u} is listed before its predecessors {late}; list units in "
                       "dependency order")
  ins, _ = emit._group_io(g, tuple(units))  # what the units read and do not compute themselves
  in_set = set(g.in_ids)
  extra_ids = [v for v in ins if v not in in_set]
  last = units[-1]
  if not g.units[last].outputs:
    raise ValueError(f"the last unit ({last}) has no outputs, so a compiled chain would drop every unit; "
                     "end the chain at a unit whose value is used (a sink of the graph or an output)")

  def fn(consts, extras, *args):
    if len(extras) != len(extra_ids):
      raise ValueError(f"path_program: expected {len(extra_ids)} extra values, got {len(extras)}")
    leaves = jax.tree_util.tree_leaves(args)
    if len(leaves) != len(g.in_ids):
      raise ValueError(f"path_program: the traced function takes {len(g.in_ids)} array leaves, got "
                       f"{len(leaves)}")
    env = dict(zip(g.in_ids, leaves))
    env.update(zip(extra_ids, extras))
    for u in units:
      emit.run_unit(g, u, env, consts)
    return tuple(env[o] for o in g.units[last].outputs)

  return fn, extra_ids
