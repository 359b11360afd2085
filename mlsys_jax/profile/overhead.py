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

import contextlib
import gc
import itertools
import os
import tempfile
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


@contextlib.contextmanager
def _collect_new_objects_only():
  """One full collection, then the surviving objects are frozen (``gc.freeze``) so that the ``gc.collect()``
  before each measured run only walks objects made since. In a process holding a large heap (a notebook, a
  test session, a training job) a full collection takes ~0.1-1 s per run, all of it outside the measured
  window but multiplied by every repeat; frozen, it takes microseconds. The heap is unfrozen on exit."""
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


@contextlib.contextmanager
def _scratch_traces():
  """A per-call directory for the ``level='trace'`` runs of the calibration loops, removed on exit: each run's
  counts and attribution are read from its trace inside the loop, so nothing kept needs the files (a loop of
  many traced runs otherwise leaves one temporary trace directory per run behind)."""
  with tempfile.TemporaryDirectory(prefix="mlsys_jax_profile_") as tmp:
    run = itertools.count()
    yield lambda lvl: Profiler(lvl, trace_dir=os.path.join(tmp, str(next(run))) if lvl == "trace" else None)


def run_levels(workload: Callable[[], Any], levels: Sequence[str], repeats: int,
               warmup: int = 1, clock: str = "process") -> tuple[dict, dict, dict]:
  """Run ``workload()`` inside ``Profiler(level)`` for every level, ``repeats`` times interleaved
  (level order rotated each repeat to spread drift). Returns (seconds on ``clock``, counts, last
  profiler) per level; ``clock`` is ``'process'`` (process CPU time) or ``'wall'``. The traces of
  ``level='trace'`` runs go to a temporary directory removed on return (the returned profilers'
  ``trace_path`` is ``None``; run ``Profiler('trace', trace_dir=...)`` yourself to keep one)."""
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
  with _collect_new_objects_only(), _scratch_traces() as profiler:
    for r in range(repeats):
      for lvl in order[r % len(order):] + order[:r % len(order)]:
        gc.collect()
        with profiler(lvl) as p:
          workload()
        wall[lvl].append(_seconds(p, clock))
        counts[lvl] = dict(p.counts)
        profs[lvl] = p
  for p in profs.values():
    p.trace_path = None  # removed with the scratch directory
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
  if (len(levels) < 2 or levels[0] != "off" or any(l not in LEVELS for l in levels)
      or any(LEVELS.index(a) >= LEVELS.index(b) for a, b in zip(levels[:-1], levels[1:]))):
    raise ValueError(f"levels must start with 'off', hold at least two levels, each once, in the order of "
                     f"{LEVELS}, got {levels}.")
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
  """Per-event cost of each instrumentation source from micro-benchmarks in which the book-keeping
  dominates, so a shared machine's noise is small against it (RL-Scope, Gleeson et al., MLSys 2021,
  Sec. 4.1: delta_k = (T_with_k - T_without_k) / n_k).

  Three loops, each run at the two levels that differ by one source (``repeats`` interleaved runs):
  ``n`` empty operation scopes (``off`` vs ``scopes`` -> ``scope``), ``n`` calls of a jitted identity
  on a scalar (``scopes`` vs ``intercept`` -> ``intercept``) and ``n`` scoped calls (``intercept`` vs
  ``trace`` -> ``trace``; every event the tracer records counts, the annotation and the runtime's own
  events of each call). Unlike :func:`calibrate` (paired median) the difference is that of the
  *minima* over repeats: interference only adds time, and these loops are short::

      raw_delta_ns[k] = (min T[k:hi] - min T[k:lo]) * 1e9 / counts[k:hi][k]

  minus the already-calibrated cost of any other source the higher level runs more often (none in
  these loops). Transfers to real workloads are checked by :func:`validate`.

  Args:
    n: iterations of each loop (>= 1).
    repeats: interleaved runs of each level (>= 1).
    clock: ``'process'`` (process CPU time, robust on a shared machine) or ``'wall'``.

  Returns:
    A :class:`Calibration`: ``delta_ns`` (clamped at 0) and ``raw_delta_ns`` for ``scope``,
    ``intercept``, ``trace``; ``wall_s['<source>:<level>']`` the ``repeats`` times of each loop;
    ``counts['<source>:<higher level>']`` its events per source in one run.

  Raises:
    ValueError/TypeError: bad ``n``, ``repeats`` or ``clock``. RuntimeError: a loop recorded no
    event of its source (e.g. the ``jax.profiler`` trace is unavailable here, so ``trace`` cannot be
    calibrated).

  Example (about a second; run in tests/test_public_api_core.py)::

      cal = calibrate_micro()
      cal.delta_ns          # {'scope': ns per scope, 'intercept': ns per call, 'trace': ns per event}
      corrected = correct(attribute(prof), cal)
  """
  import jax.numpy as jnp
  from mlsys_jax.profile.scopes import jit, operation
  check_int("n", n, 1)
  check_int("repeats", repeats, 1)
  check_choice("clock", clock, ("process", "wall"))
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
    if c[hi].get(src, 0) == 0:
      raise RuntimeError(f"calibrate_micro: the {src!r} loop recorded no {src!r} events at level {hi!r} "
                         f"(counts {c[hi]}); this source cannot be calibrated here (for 'trace': the "
                         "jax.profiler trace is unavailable, see the profiler's warning).")
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
  """Subtract the calibrated overhead from each operation of ``a`` where its events ran.

  ``cal``: a :class:`Calibration` (its clamped ``delta_ns``) or a dict of per-event costs in ns, each finite
  and ``>= 0`` (``ValueError`` otherwise: a correction only removes time; a negative cost, e.g. an
  unclamped ``raw_delta_ns``, would add it)."""
  delta = cal.delta_ns if isinstance(cal, Calibration) else dict(cal)
  for s, v in delta.items():
    if s not in SOURCES:
      raise ValueError(f"unknown instrumentation source {s!r}; expected {SOURCES}.")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not (
        np.isfinite(v) and v >= 0):
      raise ValueError(f"the per-event cost of {s!r} must be a finite number >= 0 ns, got {v!r}; pass the "
                       "calibration's delta_ns (clamped at 0), not raw_delta_ns.")
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
  delta = cal.delta_ns if isinstance(cal, Calibration) else dict(cal)
  pairs = run_pairs(workload, level=level, repeats=repeats, warmup=warmup)
  runs: dict = {k: pairs[k] for k in ("wall_off", "wall_inst", "cpu_off", "cpu_inst", "counts")}
  runs["wall_corr"] = [correct(a, delta).total_ns / 1e9 for a in pairs["attribution"]]
  runs["cpu_corr"] = [cpu - sum(c[s] * delta.get(s, 0.0) for s in SOURCES) / 1e9
                      for cpu, c in zip(pairs["cpu_inst"], pairs["counts"])]
  agg = np.min if stat == "min" else np.median
  m = {k: float(agg(v)) for k, v in runs.items() if k != "counts"}

  def ratio(a: str, b: str) -> float:
    if stat == "paired":
      return float(np.median(np.divide(runs[a], runs[b])))
    return m[a] / m[b]
  return Validation(m["wall_off"], m["wall_inst"], m["wall_corr"], ratio("wall_corr", "wall_off") - 1.0,
                    ratio("wall_inst", "wall_off"), m["cpu_off"], m["cpu_inst"], m["cpu_corr"],
                    ratio("cpu_corr", "cpu_off") - 1.0, ratio("cpu_inst", "cpu_off"), runs)


def spin_ns(ns: int, clock: str = "thread") -> None:
  """Busy-wait ``ns`` nanoseconds: a known, CPU-bound cost for synthetic workloads and tests.

  ``clock='thread'`` (default) spins until the calling thread has *used* ``ns`` of CPU time, so the cost
  is exact in process CPU time (what :func:`calibrate` measures by default) even when the thread is
  descheduled on a busy machine, where a wall-clock spin of ``ns`` buys less CPU. ``clock='wall'`` spins
  ``ns`` of wall time (what an idle machine would give either way).
  """
  check_choice("clock", clock, ("thread", "wall"))
  check_int("ns", ns, 0)
  now = time.thread_time_ns if clock == "thread" else time.perf_counter_ns
  end = now() + int(ns)
  while now() < end:
    pass


# ---------------------------------------------------------------------------------------------------------
# In-situ calibration on the workload's own uninstrumented/instrumented pairs, with held-out validation.


class InSitu(NamedTuple):
  """In-situ calibration of one workload (:func:`calibrate_insitu`).

  ``cpu`` / ``wall``: :class:`Calibration` fitted on all pairs, on process CPU time and on wall time (the
  attribution's clock); ``fitted``: the sources fitted here (the others come from ``fixed``);
  ``runs``: per pair ``cpu_off, cpu_inst, wall_off, wall_inst`` (s), ``counts`` and the fold index;
  ``heldout``: cross-validated results: every pair corrected with deltas fitted on the *other* folds only
  (``cpu_bias`` / ``wall_bias`` = median over pairs of corrected / uninstrumented - 1, per-fold deltas,
  per-pair ratios), and the same pairs corrected with ``fixed`` alone (``fixed_cpu_bias`` /
  ``fixed_wall_bias``, the fallback); ``cpu_overhead`` / ``wall_overhead``: median uncorrected
  instrumented / uninstrumented ratio."""
  cpu: Calibration
  wall: Calibration
  fitted: tuple
  runs: dict
  heldout: dict


def fit_deltas(dy_s: Sequence[float], counts: Sequence[dict], fixed: dict, fit: Sequence[str],
               on_s: Sequence[float] | None = None, off_s: Sequence[float] | None = None,
               stat: str = "paired") -> dict:
  """Per-event costs (ns) of the sources in ``fit`` from pairs: ``dy_s[i]`` is instrumented minus
  uninstrumented time of pair i (s), ``counts[i]`` its events per source. The known cost of the other
  sources (``fixed`` ns per event) is subtracted first. One fitted source: the median of residual / n over
  the pairs that recorded events of it (robust to a disturbed pair); several: least squares on the counts
  (needs counts that vary across pairs, e.g. workloads of different lengths; otherwise the split between
  them is not identified).
  ``stat='min'`` (one fitted source; needs ``on_s``/``off_s``, the instrumented and uninstrumented times)
  uses min(on) - min(off) instead of the per-pair differences: interference from other processes only
  adds time, so the minima are the least disturbed runs on a shared host."""
  check_choice("stat", stat, ("paired", "min"))
  fit = tuple(fit)
  for s in fit:
    if s not in SOURCES:
      raise ValueError(f"unknown instrumentation source {s!r} in fit; expected {SOURCES}.")
  if not fit:
    raise ValueError("fit must name at least one source to fit in situ.")
  if len(dy_s) != len(counts) or not len(dy_s):
    raise ValueError(f"need one count dict per pair and at least one pair, got {len(dy_s)} and {len(counts)}.")
  res = np.array([dy * 1e9 - sum(c.get(s, 0) * fixed.get(s, 0.0) for s in SOURCES if s not in fit)
                  for dy, c in zip(dy_s, counts)], dtype=np.float64)
  x = np.array([[c.get(s, 0) for s in fit] for c in counts], dtype=np.float64)
  if np.any(x.sum(axis=0) == 0):
    raise ValueError(f"no events of {[s for s, n in zip(fit, x.sum(axis=0)) if n == 0]} were recorded in the "
                     "pairs; instrument at a level that emits them or leave them out of fit.")
  if stat == "min":
    if len(fit) != 1 or on_s is None or off_s is None:
      raise ValueError("stat='min' fits exactly one source and needs on_s and off_s; use stat='paired'.")
    known = float(np.mean([sum(c.get(s, 0) * fixed.get(s, 0.0) for s in SOURCES if s not in fit) for c in counts]))
    return {fit[0]: ((min(on_s) - min(off_s)) * 1e9 - known) / max(float(np.mean(x[:, 0])), 1.0)}
  if len(fit) == 1:   # (a pair that recorded no event of the source says nothing about its cost: left out)
    seen = x[:, 0] > 0
    return {fit[0]: float(np.median(res[seen] / x[seen, 0]))}
  sol = np.linalg.lstsq(x, res, rcond=None)[0]
  return {s: float(v) for s, v in zip(fit, sol)}


def run_pairs(workload: Callable[[], Any], *, level: str = "trace", repeats: int = 8,
              warmup: int = 1) -> dict:
  """``repeats`` adjacent (uninstrumented, ``level``) pairs of runs of ``workload`` (order alternating).
  Returns lists of ``cpu_off, cpu_inst, wall_off, wall_inst`` (s), ``counts``, ``trace_kinds`` (the
  ``trace`` events split by kind, ``Profiler.trace_kinds``) and ``attribution`` (of each instrumented run,
  for per-operation wall correction). The trace files are read inside the loop and removed on return."""
  from mlsys_jax.profile.attribution import attribute
  check_choice("level", level, LEVELS[1:])
  check_int("repeats", repeats, 1)
  check_int("warmup", warmup, 0)
  for _ in range(warmup):
    with Profiler("off"):
      workload()
  runs: dict = {k: [] for k in ("cpu_off", "cpu_inst", "wall_off", "wall_inst", "counts", "trace_kinds",
                                "attribution")}
  with _collect_new_objects_only(), _scratch_traces() as profiler:
    for r in range(repeats):
      for lvl in (("off", level) if r % 2 == 0 else (level, "off")):
        gc.collect()
        with profiler(lvl) as p:
          workload()
        if lvl == "off":
          runs["cpu_off"].append(p.process_ns / 1e9)
          runs["wall_off"].append(p.wall_ns / 1e9)
        else:
          runs["cpu_inst"].append(p.process_ns / 1e9)
          runs["wall_inst"].append(p.wall_ns / 1e9)
          runs["counts"].append(dict(p.counts))
          runs["trace_kinds"].append(dict(p.trace_kinds))
          runs["attribution"].append(attribute(p))
  return runs


def _deltas(fixed: dict, fitted: dict) -> dict:
  return {s: max(0.0, fitted.get(s, fixed.get(s, 0.0))) for s in SOURCES}


def _corrected_ratios(runs: dict, idx: Sequence[int], d_cpu: dict, d_wall: dict) -> tuple[list, list]:
  cpu, wall = [], []
  for i in idx:
    over = sum(runs["counts"][i][s] * d_cpu.get(s, 0.0) for s in SOURCES) / 1e9
    cpu.append((runs["cpu_inst"][i] - over) / runs["cpu_off"][i])
    a = runs["attribution"][i]
    wc = correct(a, d_wall).total_ns / 1e9 if a is not None else (
      runs["wall_inst"][i] - sum(runs["counts"][i][s] * d_wall.get(s, 0.0) for s in SOURCES) / 1e9)
    wall.append(wc / runs["wall_off"][i])
  return cpu, wall


def crossvalidate(runs: dict, fixed: Calibration | dict | None = None, *, fit: Sequence[str] = ("trace",),
                  folds: int = 2, stat: str = "paired") -> dict:
  """Held-out check of the in-situ fit on pairs from :func:`run_pairs`: split the pairs into ``folds``
  contiguous blocks (in time), fit the deltas of ``fit`` on all other blocks (CPU and wall clock
  separately), correct the block's pairs with them. Returns the held-out biases (median of per-pair
  ratios - 1), per-fold deltas, and the biases of the same pairs corrected with ``fixed`` alone.
  ``stat='min'``: fit on minima (see :func:`fit_deltas`) and report each block's bias as
  min(corrected) / min(uninstrumented) - 1 (the median over blocks), on both clocks."""
  check_choice("stat", stat, ("paired", "min"))
  fixed_d = {} if fixed is None else (fixed.delta_ns if isinstance(fixed, Calibration) else dict(fixed))
  n = len(runs["counts"])
  check_int("folds", folds, 2)
  if folds > n:
    raise ValueError(f"folds={folds} exceeds the {n} pairs; use at most {n} folds (or more repeats).")
  block = np.array_split(np.arange(n), folds)
  cpu_r = [0.0] * n
  wall_r = [0.0] * n
  per_fold = []
  min_c, min_w, fmin_c, fmin_w = [], [], [], []

  def fit_on(idx, on, off):
    return fit_deltas([runs[on][i] - runs[off][i] for i in idx], [runs["counts"][i] for i in idx], fixed_d, fit,
                      [runs[on][i] for i in idx], [runs[off][i] for i in idx], stat)
  for b in block:
    bl = b.tolist()
    train = [i for i in range(n) if i not in set(bl)]
    dc, dw = fit_on(train, "cpu_inst", "cpu_off"), fit_on(train, "wall_inst", "wall_off")
    c, w = _corrected_ratios(runs, bl, _deltas(fixed_d, dc), _deltas(fixed_d, dw))
    for j, i in enumerate(bl):
      cpu_r[i], wall_r[i] = c[j], w[j]
    per_fold.append({"pairs": bl, "cpu_delta_ns": dc, "wall_delta_ns": dw})
    if stat == "min":  # corrected time of pair i = ratio * off_i
      min_c.append(min(c[j] * runs["cpu_off"][i] for j, i in enumerate(bl)) / min(runs["cpu_off"][i] for i in bl))
      min_w.append(min(w[j] * runs["wall_off"][i] for j, i in enumerate(bl)) / min(runs["wall_off"][i] for i in bl))
  fc, fw = _corrected_ratios(runs, range(n), _deltas(fixed_d, {}), _deltas(fixed_d, {}))
  if stat == "min":
    cb, wb = float(np.median(min_c)) - 1.0, float(np.median(min_w)) - 1.0
    fcb = min(f * o for f, o in zip(fc, runs["cpu_off"])) / min(runs["cpu_off"]) - 1.0
    fwb = min(f * o for f, o in zip(fw, runs["wall_off"])) / min(runs["wall_off"]) - 1.0
    ovc = min(runs["cpu_inst"]) / min(runs["cpu_off"])
    ovw = min(runs["wall_inst"]) / min(runs["wall_off"])
  else:
    cb, wb = float(np.median(cpu_r)) - 1.0, float(np.median(wall_r)) - 1.0
    fcb, fwb = float(np.median(fc)) - 1.0, float(np.median(fw)) - 1.0
    ovc = float(np.median(np.divide(runs["cpu_inst"], runs["cpu_off"])))
    ovw = float(np.median(np.divide(runs["wall_inst"], runs["wall_off"])))
  return {"stat": stat, "cpu_bias": cb, "wall_bias": wb, "cpu_overhead": ovc, "wall_overhead": ovw,
          "cpu_ratios": cpu_r, "wall_ratios": wall_r, "folds": per_fold,
          "fixed_cpu_bias": fcb, "fixed_wall_bias": fwb,
          "paired_cpu_overhead": float(np.median(np.divide(runs["cpu_inst"], runs["cpu_off"]))),
          "paired_wall_overhead": float(np.median(np.divide(runs["wall_inst"], runs["wall_off"])))}


def calibrate_insitu(workload: Callable[[], Any], fixed: Calibration | dict | None = None, *,
                     fit: Sequence[str] = ("trace",), level: str = "trace", repeats: int = 8, folds: int = 2,
                     warmup: int = 1, stat: str = "paired") -> InSitu:
  """Calibrate on the workload itself (RL-Scope Sec. 4: per-event costs from enabled/disabled runs of the
  workload being profiled) from ``repeats`` adjacent uninstrumented/``level`` pairs: the per-pair extra
  time minus the ``fixed`` sources' known cost (e.g. :func:`calibrate_micro`'s scope/intercept deltas) is
  charged to the events of the ``fit`` sources (default the tracer's events, whose cost depends on the
  workload: bigger programs and executor threads record costlier events than a micro loop). One
  difference level-to-level is a few percent of a run; off/trace pairs differ by the whole overhead, so
  the fit is far less noise-limited than :func:`calibrate`'s level ladder. :func:`crossvalidate` (run
  here with ``folds``) reports the bias on pairs held out of the fit, so the validation is not circular.
  ``stat``: 'paired' (median of per-pair differences/ratios) or 'min' (minima: a loaded shared host).

  >>> from mlsys_jax import profile
  >>> def work():
  ...   for _ in range(20):
  ...     with profile.operation("step"):
  ...       profile.spin_ns(20_000)
  >>> ins = profile.calibrate_insitu(work, fit=("scope",), level="scopes", repeats=4)
  >>> sorted(ins.heldout)[:2], ins.fitted
  (['cpu_bias', 'cpu_overhead'], ('scope',))
  """
  fixed_d = {} if fixed is None else (fixed.delta_ns if isinstance(fixed, Calibration) else dict(fixed))
  runs = run_pairs(workload, level=level, repeats=repeats, warmup=warmup)
  held = crossvalidate(runs, fixed_d, fit=fit, folds=folds, stat=stat)
  cals = []
  for clock in ("process", "wall"):
    on, off = ("cpu_inst", "cpu_off") if clock == "process" else ("wall_inst", "wall_off")
    raw_fit = fit_deltas(list(np.subtract(runs[on], runs[off])), runs["counts"], fixed_d, fit, runs[on], runs[off],
                         stat)
    raw = {s: raw_fit.get(s, fixed_d.get(s, 0.0)) for s in SOURCES}
    cals.append(Calibration({s: max(0.0, v) for s, v in raw.items()}, raw,
                            {"off": runs[off], level: runs[on]}, {level: runs["counts"][-1]}, clock))
  return InSitu(cals[0], cals[1], tuple(fit), runs, held)
