"""Overhead calibration and correction (RL-Scope, Gleeson et al., MLSys 2021, Sec. 4 "Overhead correction").

Every instrumentation source k (``scope``: operation/simulator enter+exit; ``intercept``: the wrapper
around a jitted call / transfer / wait plus compile listening; ``trace``: one event recorded by the ``jax.profiler`` tracer,
an annotation or a runtime TraceMe on any thread) costs about the same delta_k per event. Running the
same workload at successive levels (``off`` < ``scopes`` < ``intercept`` < ``trace``), each adding one
source, gives (paper, Sec. 4.1)

  delta_k = (T_level(k) - T_previous level) / n_k,

with the medians over interleaved repeats. :func:`correct` subtracts n_k(op) * delta_k from the operation
where the book-keeping ran (first from its ``python`` time, where the book-keeping executes, then from its
other host categories), so the corrected total is T - sum_k n_k delta_k. :func:`validate` compares that
total with uninstrumented (``off``) runs of the same workload (the paper's Fig. 11 "correction bias").

Not corrected (documented limits): the one-time cost of starting/stopping a trace (reported as
``Profiler.setup_ns``, outside the measured window), the tracer's inflation of device-kernel time, and
cache effects of the book-keeping on the user's code.

>>> import time
>>> from mlsys_jax import profile
>>> def work():
...   for _ in range(50):
...     with profile.operation("step"):
...       sum(range(100))
>>> cal = profile.calibrate(work, repeats=2, levels=("off", "scopes"))
>>> cal.delta_ns["scope"] >= 0.0
True
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from mlsys_jax._checks import check_choice, check_int
from mlsys_jax.profile.attribution import Attribution
from mlsys_jax.profile.scopes import HOST_CATEGORIES, LEVELS, SOURCES, Profiler

_ADDS = {"scopes": "scope", "intercept": "intercept", "trace": "trace"}


class Calibration(NamedTuple):
  """``delta_ns[source]``: calibrated ns per event (clamped at >= 0; ``raw_delta_ns`` unclamped);
  ``wall_s[level]``: the repeats' times on ``clock``; ``counts[level]``: events per source in one run."""
  delta_ns: dict
  raw_delta_ns: dict
  wall_s: dict
  counts: dict
  clock: str = "process"


def _seconds(p: Profiler, clock: str) -> float:
  return (p.wall_ns if clock == "wall" else p.process_ns) / 1e9


def run_levels(workload: Callable[[], Any], levels: Sequence[str], repeats: int,
               warmup: int = 1, clock: str = "process") -> tuple[dict, dict, dict]:
  """Run ``workload()`` inside ``Profiler(level)`` for every level, ``repeats`` times interleaved
  (level order rotated each repeat to spread drift). Returns (seconds on ``clock``, counts, last
  profiler) per level; ``clock`` is ``'process'`` (process CPU time) or ``'wall'``."""
  check_choice("clock", clock, ("process", "wall"))
  for lvl in levels:
    if lvl not in LEVELS:
      raise ValueError(f"unknown level {lvl!r}; choose from {LEVELS}.")
  check_int("repeats", repeats, 1)
  check_int("warmup", warmup, 0)
  for _ in range(warmup):  # compile and warm caches outside the measurement
    with Profiler("off"):
      workload()
  wall: dict = {lvl: [] for lvl in levels}
  counts: dict = {}
  profs: dict = {}
  order = list(levels)
  for r in range(repeats):
    for lvl in order[r % len(order):] + order[:r % len(order)]:
      gc.collect()
      with Profiler(lvl) as p:
        workload()
      wall[lvl].append(_seconds(p, clock))
      counts[lvl] = dict(p.counts)
      profs[lvl] = p
  return wall, counts, profs


def calibrate(workload: Callable[[], Any], *, repeats: int = 5,
              levels: Sequence[str] = LEVELS, warmup: int = 1, stat: str = "paired",
              clock: str = "process") -> Calibration:
  """Per-event cost of each instrumentation source from runs of ``workload`` at successive ``levels``
  (must start with ``'off'`` and be in :data:`LEVELS` order).

  ``clock='process'`` (default) times the runs in process CPU time, which a shared, oversubscribed
  machine barely perturbs (wall time there varies by 2x between identical runs); the book-keeping is
  CPU work, so its CPU cost is its wall cost on an idle machine. ``clock='wall'`` for an idle machine.
  ``stat`` summarizes the repeats: 'paired' (default) takes the median over repeats of the difference
  between the two levels' runs of the same repeat (adjacent in time, so slow load drift cancels); 'min'
  the difference of minima (interference only adds); 'median' the difference of medians.
  """
  check_choice("stat", stat, ("paired", "min", "median"))
  levels = tuple(levels)
  if not levels or levels[0] != "off" or list(levels) != sorted(levels, key=LEVELS.index):
    raise ValueError(f"levels must start with 'off' and follow {LEVELS}, got {levels}.")
  wall, counts, _ = run_levels(workload, levels, repeats, warmup, clock)
  raw = {s: 0.0 for s in SOURCES}
  for prev, lvl in zip(levels[:-1], levels[1:]):
    src = _ADDS[lvl]
    # a level may add several sources when one is skipped; charge the difference to the new one
    n = counts[lvl][src]
    if n == 0:
      raise ValueError(f"the workload emitted no {src!r} events at level {lvl!r}; cannot calibrate it "
                       "(annotate operations / use profile.jit in the calibration workload).")
    if stat == "paired":
      dt = float(np.median(np.subtract(wall[lvl], wall[prev])))
    else:
      agg = np.min if stat == "min" else np.median
      dt = float(agg(wall[lvl]) - agg(wall[prev]))
    # events of sources already calibrated that the new level runs more of (none in practice)
    for s in SOURCES:
      if s != src:
        dt -= (counts[lvl][s] - counts[prev][s]) * raw[s] * 1e-9
    raw[src] = dt * 1e9 / n
  delta = {s: max(0.0, v) for s, v in raw.items()}
  return Calibration(delta, raw, wall, counts, clock)


def calibrate_micro(*, n: int = 4000, repeats: int = 7, clock: str = "process") -> Calibration:
  """Per-event costs from micro-benchmarks in which the book-keeping dominates (so a shared machine's
  noise is small against it): ``n`` empty operation scopes (``off`` vs ``scopes``), ``n`` calls of a
  jitted identity on a scalar (``scopes`` vs ``intercept``) and ``n`` scoped calls (``intercept`` vs
  ``trace``, 2 trace events each). Transfers to real workloads are checked by :func:`validate`."""
  import jax.numpy as jnp
  from mlsys_jax.profile.scopes import jit, operation
  check_int("n", n, 1)
  f = jit(lambda x: x)
  x = jnp.zeros(())

  def scopes_loop():
    for _ in range(n):
      with operation("calibration"):
        pass

  def calls_loop():
    y = x
    for _ in range(n):
      y = f(y)

  def traced_loop():
    y = x
    for _ in range(n):
      with operation("calibration"):
        y = f(y)

  raw: dict = {}
  wall: dict = {}
  counts: dict = {}
  for src, work, lo, hi in (("scope", scopes_loop, "off", "scopes"), ("intercept", calls_loop, "scopes", "intercept"),
                            ("trace", traced_loop, "intercept", "trace")):
    w, c, _ = run_levels(work, (lo, hi), repeats, 1, clock)
    dt = float(np.min(w[hi]) - np.min(w[lo]))
    for s in SOURCES:  # sources both levels run equally cancel; others are already calibrated
      if s != src:
        dt -= (c[hi][s] - c[lo][s]) * raw.get(s, 0.0) * 1e-9
    raw[src] = dt * 1e9 / c[hi][src]
    wall[f"{src}:{lo}"], wall[f"{src}:{hi}"] = w[lo], w[hi]
    counts[f"{src}:{hi}"] = c[hi]
  return Calibration({s: max(0.0, v) for s, v in raw.items()}, raw, wall, counts, clock)


class Corrected(NamedTuple):
  """``table[(phase, op)]``: host categories and resources after subtraction (ns); ``total_ns``: the
  corrected wall time; ``removed_ns``: what was subtracted; ``unabsorbed_ns``: overhead larger than the
  operation's host time (left in place, a sign of a mis-calibration)."""
  table: dict
  total_ns: float
  removed_ns: float
  unabsorbed_ns: float


def correct(a: Attribution, cal: Calibration | dict) -> Corrected:
  """Subtract the calibrated overhead from each operation of ``a`` where its events ran."""
  delta = cal.delta_ns if isinstance(cal, Calibration) else dict(cal)
  for s in delta:
    if s not in SOURCES:
      raise ValueError(f"unknown instrumentation source {s!r}; expected {SOURCES}.")
  table = {}
  removed = unabsorbed = 0.0
  for key, row in a.table.items():
    row = {c: float(v) for c, v in row.items()}
    cnt = a.counts.get(key, {})
    over = sum(cnt.get(s, 0) * delta.get(s, 0.0) for s in SOURCES)
    left = over
    for c in ("python", *[c for c in HOST_CATEGORIES if c != "python"]):
      take = min(left, row[c])
      row[c] -= take
      left -= take
    left2 = over - left
    for c in ("cpu_only", "overlap", "device_only", "idle_wait"):
      take = min(left2, row[c])
      row[c] -= take
      left2 -= take
    row["total"] -= over - left
    removed += over - left
    unabsorbed += left
    table[key] = row
  total = sum(r["total"] for r in table.values())
  return Corrected(table, total, removed, unabsorbed)


class Validation(NamedTuple):
  """Corrected vs uninstrumented totals of one workload (min or median over interleaved repeats, s) on
  two clocks: wall time (the attribution's own clock; on a shared machine it is noisy) and process CPU
  time. ``bias = corrected / uninstrumented - 1`` (the paper's Fig. 11 reports -16.8% .. +10.9%);
  ``overhead = instrumented / uninstrumented`` (uncorrected)."""
  wall_uninstrumented_s: float
  wall_instrumented_s: float
  wall_corrected_s: float
  wall_bias: float
  wall_overhead: float
  cpu_uninstrumented_s: float
  cpu_instrumented_s: float
  cpu_corrected_s: float
  cpu_bias: float
  cpu_overhead: float
  runs: dict


def validate(workload: Callable[[], Any], cal: Calibration | dict, *, level: str = "trace",
             repeats: int = 5, warmup: int = 1, stat: str = "paired") -> Validation:
  """Run ``workload`` uninstrumented and at ``level`` (interleaved), correct each instrumented run
  with ``cal`` (per-operation :func:`correct` for wall time; the same n_k * delta_k for CPU time) and
  compare totals summarized by ``stat`` over the repeats: 'paired' (default; ratios use the median over
  repeats of instrumented/uninstrumented of the same, adjacent pair; the seconds are medians), 'min' or
  'median'."""
  check_choice("stat", stat, ("paired", "min", "median"))
  from mlsys_jax.profile.attribution import attribute
  check_choice("level", level, LEVELS[1:])
  check_int("repeats", repeats, 1)
  delta = cal.delta_ns if isinstance(cal, Calibration) else dict(cal)
  for _ in range(warmup):
    with Profiler("off"):
      workload()
  runs: dict = {k: [] for k in ("wall_off", "wall_inst", "wall_corr", "cpu_off", "cpu_inst", "cpu_corr",
                                "counts")}
  for r in range(repeats):
    for lvl in (("off", level) if r % 2 == 0 else (level, "off")):
      gc.collect()
      with Profiler(lvl) as p:
        workload()
      if lvl == "off":
        runs["wall_off"].append(p.wall_ns / 1e9)
        runs["cpu_off"].append(p.process_ns / 1e9)
      else:
        over = sum(p.counts[s] * delta.get(s, 0.0) for s in SOURCES)
        runs["wall_inst"].append(p.wall_ns / 1e9)
        runs["wall_corr"].append(correct(attribute(p), delta).total_ns / 1e9)
        runs["cpu_inst"].append(p.process_ns / 1e9)
        runs["cpu_corr"].append((p.process_ns - over) / 1e9)
        runs["counts"].append(dict(p.counts))
  agg = np.min if stat == "min" else np.median
  m = {k: float(agg(v)) for k, v in runs.items() if k != "counts"}

  def ratio(a: str, b: str) -> float:
    if stat == "paired":
      return float(np.median(np.divide(runs[a], runs[b])))
    return m[a] / m[b]
  return Validation(m["wall_off"], m["wall_inst"], m["wall_corr"], ratio("wall_corr", "wall_off") - 1.0,
                    ratio("wall_inst", "wall_off"), m["cpu_off"], m["cpu_inst"], m["cpu_corr"],
                    ratio("cpu_corr", "cpu_off") - 1.0, ratio("cpu_inst", "cpu_off"), runs)


def spin_ns(ns: int) -> None:
  """Busy-wait ``ns`` nanoseconds (a known, CPU-bound cost for synthetic workloads and tests)."""
  end = time.perf_counter_ns() + int(ns)
  while time.perf_counter_ns() < end:
    pass
