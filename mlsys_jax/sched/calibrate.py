"""Whole-program latency of IOS schedules from in-graph measurements (issue 20, item 2).

IOS (Ding et al., MLSys 2021, Sec. 4) minimises the sum of its stage costs,
``T(schedule) = sum_s cost(s)``. Stage costs measured in isolation (``StageProfiler``) over-predict a whole
CUDA-graph program (Inception-V3 f32: 1.39 ms of isolated stages for a 0.53 ms program), and the default
roofline (``AnalyticalCost``) under-predicts most programs by 25-60%. This module fits the roofline's
parameters to programs measured as they run, whole:

    T_hat(p; theta) = call_s + sum_{s in p} cost_theta(s),
    theta* = argmin_theta  mean_p log(T_hat(p; theta) / T_p)^2  +  ridge * |z(theta) - z(theta_0)|^2 / d

with ``cost_theta`` exactly :class:`~mlsys_jax.sched.cost.AnalyticalCost` (peak FLOP rate, bandwidth, launch
cost, saturation floor, merge launch, and the *serial fraction* of a concurrent stage's shorter groups, which
says how much of IOS's concurrency survives inside a graph that XLA already overlaps), ``call_s`` a per-call
constant, ``z`` the parameters in log space (logit for the serial fraction) and the ridge pulling them gently
toward the initial model so that a handful of programs still gives a well-posed fit. The fitted cost is an
``AnalyticalCost``: ``ios_schedule(..., profiler=calibration.cost)`` searches with it, on any machine.

Typical use: time a few schedules of one network (e.g. those found at a few batch sizes, or IOS-Merge and
IOS-Both) as whole programs on the target device, calibrate, then predict (or search) the others.

Example:
  >>> import jax.numpy as jnp
  >>> from jax import lax
  >>> from mlsys_jax import sched
  >>> from mlsys_jax.sched import calibrate
  >>> conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
  ...                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> ws = [jnp.full((k, k, 8, 8), 0.1) for k in (1, 3, 1)]
  >>> f = lambda x: sum(conv(x, w) for w in ws)
  >>> progs = [sched.ios_schedule(f, jnp.ones((b, 16, 16, 8)), check="off") for b in (1, 2, 4, 8)]
  >>> truth = sched.AnalyticalCost(peak_flops=100e12, launch_s=5e-6, serial_fraction=0.5)
  >>> measured = [calibrate.predict_latency(truth, p, call_s=20e-6) for p in progs]
  >>> cal = calibrate.calibrate_cost(progs, measured)
  >>> max(abs(cal.predict(p) / m - 1) for p, m in zip(progs, measured)) < 0.02
  True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from mlsys_jax.sched.cost import INF, AnalyticalCost, _roofline_arrays, _roofline_error, _valid, merge_flops_bytes
from mlsys_jax.sched.dp import Stage
from mlsys_jax.sched.graph import Graph

__all__ = ["Calibration", "calibrate_cost", "predict_latency"]

# The fitted parameters: AnalyticalCost's constructor arguments plus the per-call constant.
PARAMS = ("peak_flops", "bandwidth", "launch_s", "sat_flops", "merge_launch_s", "serial_fraction", "call_s")
_REFRESH = 6     # Nelder-Mead restarts from the best point per start (see calibrate_cost)
_FLOOR = 1e-12   # positive parameters are fitted in log space; values below this count as zero


def _program(p: Any) -> tuple[Graph, list]:
  """``(graph, stages)`` of a :class:`~mlsys_jax.sched.Schedule` or of a ``(graph, stages)`` pair."""
  if hasattr(p, "graph") and hasattr(p, "stages"):
    return p.graph, list(p.stages)
  if isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], Graph):
    return p[0], list(p[1])
  raise TypeError(f"a program must be a sched.Schedule or a (Graph, [Stage, ...]) pair, got {type(p).__name__}")


def predict_latency(cost: AnalyticalCost, program: Any, call_s: float = 0.0) -> float:
  """Whole-program latency under ``cost``: ``call_s + sum_s cost(graph, s)`` over the program's stages.

  Args:
    cost: a stage cost model, e.g. :class:`~mlsys_jax.sched.cost.AnalyticalCost` or a calibrated one.
    program: a :class:`~mlsys_jax.sched.Schedule` or a ``(Graph, [Stage, ...])`` pair.
    call_s: a per-call constant (seconds) added once.

  Example:
    >>> import jax.numpy as jnp
    >>> from mlsys_jax import sched
    >>> s = sched.ios_schedule(lambda x: jnp.tanh(x @ jnp.ones((4, 4))), jnp.ones((2, 4)), check="off")
    >>> predict_latency(sched.AnalyticalCost(), s) == s.predicted_latency
    True
  """
  g, stages = _program(program)
  return float(call_s) + sum(cost(g, st) for st in stages)


class _Terms:
  """The parameter-free terms of a set of programs, so that ``T_hat(p; theta)`` of every program is a few
  numpy reductions (the fit evaluates it thousands of times). Equal to :func:`predict_latency` with an
  ``AnalyticalCost`` to float rounding (tested)."""

  def __init__(self, programs: Sequence[Any]):
    merges, units = [], []   # (program, FLOPs, bytes, convs merged); (program, stage, group, FLOPs, bytes)
    stage_id = group_id = 0
    for pi, p in enumerate(programs):
      g, stages = _program(p)
      if not stages:
        raise ValueError(f"program {pi} has no stages")
      for st in stages:
        if not _valid(g, st):
          raise ValueError(f"program {pi} holds a stage the cost model rejects (an opaque unit inside a "
                           f"multi-unit stage: {st}); such a program has no finite predicted latency")
        if st.kind == "merge":
          merges.append((pi, *merge_flops_bytes(g, st)))
          continue
        for grp in st.groups:
          units += [(pi, stage_id, group_id, *g.unit_flops_bytes(u)) for u in grp]
          group_id += 1
        stage_id += 1
    self.n, self.n_groups, self.n_stages = len(programs), group_id, stage_id
    m = np.asarray(merges, np.float64).reshape(-1, 4)
    self.m_prog, self.m_f, self.m_b, self.m_n = m[:, 0].astype(np.int64), m[:, 1], m[:, 2], m[:, 3]
    u = np.asarray(units, np.float64).reshape(-1, 5)
    u_prog, u_stage, self.u_group = (u[:, j].astype(np.int64) for j in range(3))
    self.u_f, self.u_b = u[:, 3], u[:, 4]
    self.g_stage = np.zeros(group_id, np.int64)
    self.g_stage[self.u_group] = u_stage
    self.s_prog = np.zeros(stage_id, np.int64)
    self.s_prog[u_stage] = u_prog
    self.s_f = np.bincount(u_stage, self.u_f, minlength=stage_id)
    self.s_b = np.bincount(u_stage, self.u_b, minlength=stage_id)
    self.s_groups = np.bincount(self.g_stage, minlength=stage_id).astype(np.float64)
    for name, v in (("FLOPs", self.m_f), ("bytes", self.m_b), ("FLOPs", self.u_f), ("bytes", self.u_b)):
      if not np.all((v >= 0) & (v < INF)):   # checked once here; predict() runs the formula unchecked
        raise ValueError(f"the programs' kernel {name} must be finite and >= 0 (got {v[~((v >= 0) & (v < INF))][:3]}); "
                         "the cost model produced a negative or non-finite term")

  def predict(self, th: dict) -> np.ndarray:
    peak, bw, launch, sat = th["peak_flops"], th["bandwidth"], th["launch_s"], th["sat_flops"]
    if not (0 < peak < INF and 0 < bw < INF and 0 <= sat < INF):
      _roofline_error(0.0, 0.0, peak, bw, sat)   # roofline_time's error, naming the parameter out of range
    out = np.full(self.n, float(th["call_s"]))
    if self.m_f.size:
      t = th["merge_launch_s"] + _roofline_arrays(self.m_f, self.m_b, peak, bw, sat) + launch * 0.25 * (self.m_n - 1)
      out += np.bincount(self.m_prog, t, minlength=self.n)
    if self.u_f.size:
      ut = launch + _roofline_arrays(self.u_f, self.u_b, peak, bw, sat)
      gsum = np.bincount(self.u_group, ut, minlength=self.n_groups)
      gmax = np.zeros(self.n_stages)
      np.maximum.at(gmax, self.g_stage, gsum)
      gtot = np.bincount(self.g_stage, gsum, minlength=self.n_stages)
      t = launch * (self.s_groups - 1) + np.maximum(gmax, np.maximum(self.s_f / peak, self.s_b / bw))
      t = t + th["serial_fraction"] * (gtot - gmax)
      out += np.bincount(self.s_prog, t, minlength=self.n)
    return out


class Calibration(NamedTuple):
  """An :class:`AnalyticalCost` fitted to measured whole programs (:func:`calibrate_cost`).

  Attributes:
    cost: the fitted stage cost model (pass it to ``ios_schedule(..., profiler=cost)``).
    call_s: the fitted per-call constant (seconds), added once per program.
    log_rms: in-sample root mean square of ``log(predicted / measured)``.
    rel_err: in-sample ``predicted / measured - 1`` of each program, in input order.
    free: the names of the fitted parameters (the others kept their initial values).
  """
  cost: AnalyticalCost
  call_s: float
  log_rms: float
  rel_err: tuple
  free: tuple

  def predict(self, program: Any) -> float:
    """Predicted whole-program latency (seconds) of a schedule or ``(graph, stages)`` pair."""
    return predict_latency(self.cost, program, self.call_s)

  def params(self) -> dict:
    """Every parameter, fitted or kept: AnalyticalCost's keyword arguments and ``call_s``."""
    return {**self.cost.params(), "call_s": self.call_s}


def _encode(name: str, v: float) -> float:
  if name == "serial_fraction":
    v = min(max(v, 1e-6), 1 - 1e-6)
    return math.log(v / (1 - v))
  return math.log(max(v, _FLOOR))


def _decode(name: str, z: float) -> float:
  z = min(max(z, -700.0), 700.0)
  if name == "serial_fraction":
    return 1.0 / (1.0 + math.exp(-z))
  v = math.exp(z)
  return 0.0 if v <= _FLOOR * 1.000001 and name in ("launch_s", "sat_flops", "merge_launch_s", "call_s") else v


def calibrate_cost(programs: Sequence[Any], measured_s: Sequence[float], *,
                   init: Optional[AnalyticalCost] = None, init_call_s: float = 10e-6,
                   free: Sequence[str] = PARAMS, ridge: float = 1e-5, restarts: int = 6,
                   max_evals: int = 4000) -> Calibration:
  """Fit :class:`AnalyticalCost`'s parameters (and a per-call constant) to whole programs measured on a device.

  Minimises ``mean_p log(T_hat(p) / T_p)^2 + ridge * |z - z_0|^2 / d`` over the ``d`` free parameters ``z``
  (log space; logit for ``serial_fraction``), ``T_hat(p) = call_s + sum_s cost(s)`` (module docstring), by
  Nelder-Mead (restarted from its own result until it stops improving) from ``restarts`` starting points:
  the initial model with the serial fraction at 0.05, 0.5 and 0.95, then the same with a tenth of its launch
  cost (the objective is a sum of maxima: several local minima); the best is kept. Deterministic.

  Args:
    programs: the measured programs: :class:`~mlsys_jax.sched.Schedule` objects (the schedules as emitted and
      timed) or ``(Graph, [Stage, ...])`` pairs; several networks, batch sizes and strategies may be mixed.
      A schedule timed as XLA's program (``s.program == 'xla'``) must be passed as its stages all the same:
      what is fitted is the latency of the emitted stages.
    measured_s: each program's measured latency in seconds (> 0, finite), e.g. the median of interleaved
      rounds of back-to-back calls of the compiled program.
    init: the starting model (default ``AnalyticalCost()``); kept parameters keep its values.
    init_call_s: the starting per-call constant.
    free: which of :data:`PARAMS` to fit.
    ridge: weight of the pull toward the starting point (in log space); 0 for none.
    restarts: starting points tried (1-6; see above).
    max_evals: function evaluations per start.

  Returns:
    a :class:`Calibration`.

  Raises:
    ValueError: mismatched lengths, fewer than 2 programs, a non-positive or non-finite measurement, an
      unknown parameter name, a program without a finite prediction.
  """
  from scipy.optimize import minimize   # (scipy is a dependency of jax)
  programs = list(programs)
  meas = np.asarray(measured_s, np.float64)
  if meas.ndim != 1 or meas.size != len(programs):
    raise ValueError(f"calibrate_cost: {len(programs)} programs but measured_s has shape {meas.shape}: pass "
                     "one measured latency (seconds) per program, in the same order")
  if len(programs) < 2:
    raise ValueError(f"calibrate_cost needs at least 2 measured programs, got {len(programs)}")
  if not np.all(np.isfinite(meas)) or np.any(meas <= 0):
    bad = [i for i, m in enumerate(meas) if not (np.isfinite(m) and m > 0)]
    raise ValueError(f"calibrate_cost: measured_s must be finite and > 0 (seconds); entries {bad} are "
                     f"{[float(meas[i]) for i in bad]}")
  free = tuple(free)
  unknown = [n for n in free if n not in PARAMS]
  if unknown or not free or len(set(free)) != len(free):
    raise ValueError(f"calibrate_cost: free must be distinct names from {PARAMS}, got {free}")
  if not isinstance(restarts, int) or not 1 <= restarts <= 6:
    raise ValueError(f"calibrate_cost: restarts must be an int in [1, 6], got {restarts!r}")
  if not (ridge >= 0 and math.isfinite(ridge)):
    raise ValueError(f"calibrate_cost: ridge must be a finite number >= 0, got {ridge!r}")
  init = init or AnalyticalCost()
  base = {**init.params(), "call_s": float(init_call_s)}
  terms = _Terms(programs)
  pred0 = terms.predict(base)
  if not np.all(np.isfinite(pred0)) or np.any(pred0 <= 0):
    raise ValueError("calibrate_cost: a program has no finite positive predicted latency under the initial model")
  z0 = np.array([_encode(n, base[n]) for n in free])
  log_meas = np.log(meas)

  def theta(z) -> dict:
    th = dict(base)
    th.update({n: _decode(n, float(v)) for n, v in zip(free, z)})
    return th

  def loss(z) -> float:
    pred = terms.predict(theta(z))
    if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
      return INF
    r = np.log(pred) - log_meas
    return float(np.mean(r * r) + ridge * np.sum((z - z0) ** 2) / len(z))

  starts = []   # the initial model with the serial fraction at 0.05 / 0.5 / 0.95, then with 1/10 the launch cost
  for lm in (1.0, 0.1):
    for sf in (0.05, 0.5, 0.95) if "serial_fraction" in free else (None,):
      z = z0.copy()
      if sf is not None:
        z[free.index("serial_fraction")] = _encode("serial_fraction", sf)
      if lm != 1.0:
        if "launch_s" not in free:
          continue
        z[free.index("launch_s")] = _encode("launch_s", base["launch_s"] * lm)
      starts.append(z)
  best = None
  for z in starts[:restarts]:
    # Nelder-Mead restarted from its own result (a fresh simplex) until a restart gains < 1e-9: a single
    # run in 7 dimensions often stalls on a ridge of this piecewise-linear (max) objective
    r = minimize(loss, z, method="Nelder-Mead",
                 options=dict(maxfev=int(max_evals), maxiter=int(max_evals), xatol=1e-6, fatol=1e-13))
    for _ in range(_REFRESH):
      r2 = minimize(loss, r.x, method="Nelder-Mead",
                    options=dict(maxfev=int(max_evals), maxiter=int(max_evals), xatol=1e-6, fatol=1e-13))
      done = r2.fun > r.fun - 1e-9
      r = r2 if r2.fun < r.fun else r
      if done:
        break
    if best is None or r.fun < best.fun:
      best = r
  th = theta(best.x)
  cost = AnalyticalCost(**{k: th[k] for k in PARAMS if k != "call_s"})
  pred = terms.predict(th)
  rel = pred / meas - 1
  log_rms = float(np.sqrt(np.mean(np.log(pred / meas) ** 2)))
  return Calibration(cost, float(th["call_s"]), log_rms, tuple(float(v) for v in rel), free)
