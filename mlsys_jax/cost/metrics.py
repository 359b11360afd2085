"""Metrics of cost models and the analytical roofline baseline.

Kaufman et al. (MLSys 2021, Sec. 5) report mean absolute percentage error (MAPE) of runtime for the
fusion task and Kendall's tau within each kernel's configurations for the tile task; TpuGraphs
(Phothilimthana et al., 2023) adds top-k slowdown: how much slower the best of the model's top-k
choices is than the true best. The analytical baseline predicts runtime from XLA's cost analysis and
two rates, as a roofline: ``max(flops / R_f, bytes / R_b)`` or ``flops / R_f + bytes / R_b``; the two
rates are either measured peaks or fitted on training data.

Example:
  >>> float(kendall_tau([1, 2, 3], [10, 20, 30]))
  1.0
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from mlsys_jax._checks import check_choice


def mape(pred: Sequence[float], target: Sequence[float]) -> float:
  """Mean absolute percentage error ``mean(|pred - target| / target)`` (a fraction, not %)."""
  p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  if p.shape != t.shape or t.size == 0:
    raise ValueError(f"pred and target need the same non-empty shape, got {p.shape} and {t.shape}.")
  if np.any(t <= 0):
    raise ValueError("targets must be positive runtimes.")
  return float(np.mean(np.abs(p - t) / t))


def _pair(pred, target, what: str) -> tuple[np.ndarray, np.ndarray]:
  p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  if p.shape != t.shape or p.ndim != 1 or p.size == 0:
    raise ValueError(f"{what} needs two non-empty 1-D sequences of one length, got {p.shape}, {t.shape}.")
  return p, t


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
  """Kendall's tau-b between two sequences (ties handled as in tau-b; nan if either is constant)."""
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"kendall_tau needs two 1-D sequences of one length, got {x.shape}, {y.shape}.")
  dx = np.sign(x[:, None] - x[None, :])
  dy = np.sign(y[:, None] - y[None, :])
  iu = np.triu_indices(x.size, 1)
  dx, dy = dx[iu], dy[iu]
  s = float(np.sum(dx * dy))
  nx, ny = float(np.sum(dx != 0)), float(np.sum(dy != 0))
  if nx == 0 or ny == 0:
    return float("nan")
  return s / np.sqrt(nx * ny)


def ordered_pair_accuracy(pred: Sequence[float], target: Sequence[float]) -> float:
  """Fraction of pairs with distinct targets that ``pred`` orders the same way (TpuGraphs' OPA)."""
  p, t = _pair(pred, target, "ordered_pair_accuracy")
  iu = np.triu_indices(p.size, 1)
  dt = np.sign(t[:, None] - t[None, :])[iu]
  dp = np.sign(p[:, None] - p[None, :])[iu]
  m = dt != 0
  return float(np.mean(dp[m] == dt[m])) if m.any() else float("nan")


def topk_slowdown(pred: Sequence[float], target: Sequence[float], k: int = 1) -> float:
  """``min(target[top-k by pred]) / min(target) - 1``: the cost of trusting the model's k best picks."""
  p, t = _pair(pred, target, "topk_slowdown")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  top = np.argsort(p, kind="stable")[:k]
  return float(t[top].min() / t.min() - 1.0)


def mape_scale(pred: Sequence[float], target: Sequence[float]) -> float:
  """Scalar ``c`` minimising ``mape(c * pred, target)`` (fit on training data, then apply to test).

  A model trained on squared log error predicts the median; MAPE is minimised lower (a weighted
  median of ``target / pred`` with weights ``pred / target``), which this computes exactly.
  """
  p, t = _pair(pred, target, "mape_scale")
  if not np.all(np.isfinite(p) & (p > 0) & np.isfinite(t) & (t > 0)):
    raise ValueError("mape_scale needs positive, finite predictions and targets (runtimes).")
  r = t / p
  w = p / t
  order = np.argsort(r)
  cw = np.cumsum(w[order])
  return float(r[order][np.searchsorted(cw, 0.5 * cw[-1])])


class GroupMetrics(NamedTuple):
  """Per-group metrics (arrays over groups with >= 2 distinct targets): tau, pair accuracy, top-1
  slowdown."""
  groups: np.ndarray
  tau: np.ndarray
  opa: np.ndarray
  slowdown: np.ndarray


def group_metrics(pred: np.ndarray, target: np.ndarray, group: np.ndarray) -> GroupMetrics:
  """Kendall tau, ordered-pair accuracy and top-1 slowdown within each group of variants.

  The groups scored depend on the targets only (at least two variants with distinct runtimes), so
  every model is averaged over the same groups. A model that predicts one value for all variants of a
  group (tau-b undefined) gets tau 0 there: it carries no ranking information.
  """
  pred, target, group = np.asarray(pred), np.asarray(target), np.asarray(group)
  if not pred.shape == target.shape == group.shape or pred.ndim != 1:
    raise ValueError(f"pred, target and group need one 1-D shape, got {pred.shape}, {target.shape}, "
                     f"{group.shape}.")
  if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(target))):
    raise ValueError("group_metrics needs finite pred and target; drop rows a model could not predict "
                     "from every model's arrays first, so all models are scored on the same rows.")
  gs, taus, opas, slows = [], [], [], []
  for g in np.unique(group):
    m = group == g
    if m.sum() < 2 or np.unique(target[m]).size < 2:
      continue
    tau = kendall_tau(pred[m], target[m])
    gs.append(g)
    taus.append(0.0 if np.isnan(tau) else tau)
    opas.append(ordered_pair_accuracy(pred[m], target[m]))
    slows.append(topk_slowdown(pred[m], target[m], 1))
  return GroupMetrics(np.asarray(gs), np.asarray(taus), np.asarray(opas), np.asarray(slows))


def bootstrap_mean_ci(values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap interval of the mean of ``values`` (resampling items with replacement)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------
# Analytical roofline baseline.

class Roofline(NamedTuple):
  """Two rates (flop/s, byte/s), how they combine ('max' or 'sum') and a fixed overhead (s)."""
  flops_per_s: float
  bytes_per_s: float
  combine: str = "max"
  overhead_s: float = 0.0

  def predict(self, flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Runtime in seconds of programs with ``flops`` and ``nbytes`` (arrays of one shape)."""
    check_choice("combine", self.combine, ("max", "sum"))
    tf = np.asarray(flops, np.float64) / self.flops_per_s
    tb = np.asarray(nbytes, np.float64) / self.bytes_per_s
    t = np.maximum(tf, tb) if self.combine == "max" else tf + tb
    return t + self.overhead_s


def fit_roofline(flops: np.ndarray, nbytes: np.ndarray, runtime_s: np.ndarray, combine: str = "max",
                 fit_overhead: bool = False, grid: int = 121, objective: str = "log") -> Roofline:
  """Fit the two rates (and optionally an overhead) on training data, minimising squared log error
  (``objective='log'``) or the mean absolute percentage error (``objective='mape'``).

  A log-spaced grid search (rates 1e9..1e17 /s, overhead 0 or 1e-6..1e-3 s), then one refinement
  around the best point; robust and dependency-free.
  """
  check_choice("combine", combine, ("max", "sum"))
  check_choice("objective", objective, ("log", "mape"))
  f, b, y = (np.asarray(a, np.float64) for a in (flops, nbytes, runtime_s))
  if not f.shape == b.shape == y.shape or y.ndim != 1 or y.size == 0:
    raise ValueError(f"flops, nbytes and runtime_s need one non-empty 1-D shape, got {f.shape}, "
                     f"{b.shape}, {y.shape}.")
  if not np.all(np.isfinite(y) & (y > 0)):
    raise ValueError("runtime_s must be positive and finite (drop failed or unmeasured rows first).")
  for name, a in (("flops", f), ("nbytes", b)):
    bad = ~(np.isfinite(a) & (a >= 0))
    if bad.any():
      j = int(np.argmax(bad))
      raise ValueError(f"{name} must be finite and >= 0, got {a[j]!r} at index {j}; drop or fix those rows "
                       "(e.g. programs whose cost analysis failed) before fitting.")
  ly = np.log(y)
  overheads = [0.0] + (list(np.logspace(-6, -3, 13)) if fit_overhead else [])

  def search(lo_f, hi_f, lo_b, hi_b, n):
    best = (np.inf, None)
    rf = np.logspace(lo_f, hi_f, n)
    rb = np.logspace(lo_b, hi_b, n)
    tf = f[None, :] / rf[:, None]          # [n, P]
    tb = b[None, :] / rb[:, None]
    for o in overheads:
      for i in range(n):
        t = (np.maximum(tf[i][None, :], tb) if combine == "max" else tf[i][None, :] + tb) + o
        if objective == "log":
          err = np.mean((np.log(np.maximum(t, 1e-12)) - ly[None, :]) ** 2, axis=1)
        else:
          err = np.mean(np.abs(t - y[None, :]) / y[None, :], axis=1)
        j = int(np.argmin(err))
        if err[j] < best[0]:
          best = (err[j], (rf[i], rb[j], o))
    if best[1] is None:
      raise ValueError("fit_roofline found no rates with a finite error on this data; check that flops, "
                       "nbytes and runtime_s hold finite, realistic values (runtime_s > 0).")
    return best

  err, (rf, rb, o) = search(9, 17, 9, 17, grid)
  err2, (rf2, rb2, o2) = search(np.log10(rf) - 0.1, np.log10(rf) + 0.1, np.log10(rb) - 0.1,
                                np.log10(rb) + 0.1, 41)
  if err2 <= err:
    rf, rb, o = rf2, rb2, o2
  return Roofline(float(rf), float(rb), combine, float(o))
