"""Variance-aware comparison of two methods (Bouthillier et al., "Accounting for Variance in Machine
Learning Benchmarks", MLSys 2021).

Instead of comparing two single numbers, run N paired trials of A and B in which every source of
variation (data split and order, initialisation, ...) is re-drawn per trial and shared by A and B, and
estimate the *probability of outperforming*

    P(A > B) = (1/N) sum_i 1[a_i > b_i]            (ties count 1/2),

with a percentile-bootstrap confidence interval. A is declared better when the improvement is

- *significant*: the lower bound of the interval is above 0.5, and
- *meaningful*: P(A > B) is above a threshold gamma (0.75 in the paper).

Noether's formula gives the number of trials needed to detect P(A > B) = gamma with error rates
alpha and beta: N = (z_{1-alpha} + z_{1-beta})^2 / (6 (gamma - 1/2)^2), i.e. 29 for gamma = 0.75 and
alpha = beta = 0.05.

:func:`time_interleaved` applies the same idea to benchmarks: A and B are timed alternately (ABAB...)
after warm-up so that drift (clocks, temperature, other tenants) hits both equally, every call is
synchronised with ``jax.block_until_ready``, and medians, their ratio and P(A faster than B) over the
pairs are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from mlsys_jax._checks import check_int, check_range

__all__ = [
    "Comparison",
    "Timing",
    "bootstrap_ci",
    "compare",
    "noether_sample_size",
    "prob_outperform",
    "time_interleaved",
]


def _as_trials(name: str, x: Sequence[float]) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D sequence of per-trial results, got shape {a.shape}.")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} holds NaN/inf; drop or fix the failed trials before comparing.")
  return a


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
  a, b = _as_trials("a", a), _as_trials("b", b)
  if a.shape != b.shape:
    raise ValueError(f"paired comparison needs as many trials of A as of B, got {a.size} and {b.size}; "
                     "pass paired=False for independent trials.")
  return a, b


def prob_outperform(a: Sequence[float], b: Sequence[float], paired: bool = True,
                    lower_is_better: bool = False) -> float:
  """Estimate P(A > B) from trial results (Bouthillier et al. 2021, Sec. 4).

  Args:
    a, b: per-trial results of methods A and B (e.g. test accuracies).
    paired: trials ``a[i]`` and ``b[i]`` share their sources of variation (same seed, split, ...);
      then P = mean(1[a_i > b_i]). Unpaired: the Mann-Whitney estimate mean over all pairs (i, j).
    lower_is_better: for errors or latencies, "A outperforms B" means a < b.

  Returns:
    The estimate in ``[0, 1]``; ties count 1/2.

  Example:
    >>> prob_outperform([0.91, 0.93, 0.90], [0.90, 0.92, 0.90])
    0.8333333333333334
  """
  if paired:
    a, b = _paired(a, b)
    d = (b - a) if lower_is_better else (a - b)
  else:
    a, b = _as_trials("a", a), _as_trials("b", b)
    d = (b[None, :] - a[:, None]) if lower_is_better else (a[:, None] - b[None, :])
  return float(np.mean((d > 0) + 0.5 * (d == 0)))


def bootstrap_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, paired: bool = True, lower_is_better: bool = False) -> tuple[float, float]:
  """Percentile-bootstrap confidence interval of :func:`prob_outperform` (Bouthillier et al., MLSys
  2021, Sec. 4; Efron & Tibshirani 1993, Ch. 13).

  ``n_boot`` resamples of the trials are drawn with replacement (``numpy.random.default_rng(seed)``);
  P(A > B) is recomputed on each (ties count 1/2) and the interval is the ``(1 - level)/2`` and
  ``(1 + level)/2`` quantiles of those values (``numpy.quantile``, linear interpolation). Paired trials
  are resampled as pairs; unpaired trials are resampled independently per method and scored by the
  Mann-Whitney estimate over all pairs.

  Args:
    a, b: per-trial results (finite, non-empty 1-D; equal lengths when ``paired``).
    n_boot: number of resamples (>= 100).
    level: confidence level in (0, 1).
    seed: seed of the resampling (integer >= 0); the same seed gives the same interval.
    paired: trials ``a[i]``, ``b[i]`` share their sources of variation.
    lower_is_better: "A outperforms B" means ``a < b`` (errors, latencies).

  Returns:
    ``(low, high)`` with ``0 <= low <= high <= 1``.

  Raises:
    ValueError/TypeError: bad ``n_boot``, ``level`` or ``seed``; empty, non-finite or (paired) unequal
    trials.

  Example:
    >>> bootstrap_ci([0.91, 0.93, 0.90, 0.92], [0.90, 0.92, 0.90, 0.90])
    (0.625, 1.0)
  """
  check_int("n_boot", n_boot, 100)
  check_range("level", level, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_int("seed", seed, 0)
  rng = np.random.default_rng(seed)
  sign = -1.0 if lower_is_better else 1.0
  if paired:
    a, b = _paired(a, b)
    d = sign * (a - b)
    win = (d > 0) + 0.5 * (d == 0)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    stats = win[idx].mean(axis=1)
  else:
    a, b = _as_trials("a", a), _as_trials("b", b)
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = rng.integers(0, b.size, size=(n_boot, b.size))
    d = sign * (a[ia][:, :, None] - b[ib][:, None, :])
    stats = ((d > 0) + 0.5 * (d == 0)).mean(axis=(1, 2))
  lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


class Comparison(NamedTuple):
  """Outcome of :func:`compare`.

  Attributes:
    p: estimate of P(A > B).
    ci_low, ci_high: percentile-bootstrap interval of ``p``, its ends held at or beyond the exact bounds
      that ``n`` wins (losses) of ``n`` trials allow (see :func:`compare`).
    significant: ``ci_low > 0.5``.
    meaningful: ``p > gamma``.
    n: number of trials.
    gamma: the meaningfulness threshold used.

  Example:
    >>> c = compare([0.91, 0.93, 0.90], [0.90, 0.92, 0.90])
    >>> c.n, round(c.p, 3), c.verdict
    (3, 0.833, 'no significant difference')
  """
  p: float
  ci_low: float
  ci_high: float
  significant: bool
  meaningful: bool
  n: int
  gamma: float

  @property
  def verdict(self) -> str:
    if self.significant and self.meaningful:
      return "A better (significant and meaningful)"
    if self.significant:
      return "A better (significant, not meaningful)"
    if self.ci_high < 0.5:
      return "B better (significant)"
    return "no significant difference"

  def __str__(self) -> str:
    return (f"P(A>B)={self.p:.3f} CI[{self.ci_low:.3f}, {self.ci_high:.3f}] n={self.n}: {self.verdict}")


def compare(a: Sequence[float], b: Sequence[float], *, gamma: float = 0.75, level: float = 0.95,
            n_boot: int = 2000, seed: int = 0, paired: bool = True,
            lower_is_better: bool = False) -> Comparison:
  """Decide whether A outperforms B (Bouthillier et al. 2021): significant and meaningful P(A > B).

  The interval is :func:`bootstrap_ci`'s with its ends held within what ``n`` trials can show: ``ci_low`` is at
  most ``((1 - level) / 2) ** (1 / n)``, the exact (Clopper-Pearson) lower bound of a win probability after
  ``n`` wins in ``n`` trials (0.025 for one trial, 0.48 for five, 0.88 for 29 at ``level`` 0.95), and
  ``ci_high`` at least one minus it. Without this, a run where A wins every trial resamples to all wins only,
  and the percentile interval is ``[1, 1]`` for any number of trials (one won trial read as significant),
  while four wins and a tie in five trials read as significant with five wins of five not; no result of five
  or fewer trials is significant at ``level`` 0.95 (Noether's 29 trials is the design size, see
  :func:`noether_sample_size`). With more trials the bound only binds near all wins (losses). Unpaired,
  ``n`` is the smaller group's size (a conservative count for complete separation).

  Args:
    a, b: per-trial results (paired by default: trial i of both used the same seeds).
    gamma: meaningfulness threshold in (0.5, 1); 0.75 in the paper.
    level: confidence level of the interval.
    n_boot, seed: bootstrap resamples and their seed.
    paired: see :func:`prob_outperform`.
    lower_is_better: set for errors and latencies.

  Example:
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(0.90, 0.01, 29)               # 29 paired trials (Noether's N for gamma=0.75)
    >>> c = compare(base + 0.02, base)                  # A is better on every trial
    >>> c.significant, c.meaningful, round(c.ci_low, 3)
    (True, True, 0.881)
    >>> compare([0.93, 0.95, 0.92], [0.90, 0.91, 0.90]).verdict   # three wins of three: too few trials
    'no significant difference'
  """
  check_range("gamma", gamma, 0.5, 1.0, low_inclusive=False, high_inclusive=False)
  p = prob_outperform(a, b, paired=paired, lower_is_better=lower_is_better)
  lo, hi = bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed, paired=paired,
                        lower_is_better=lower_is_better)
  n = len(np.atleast_1d(np.asarray(a)))
  n_exact = n if paired else min(n, len(np.atleast_1d(np.asarray(b))))
  bound = ((1.0 - level) / 2.0) ** (1.0 / n_exact)   # exact lower bound after n_exact wins of n_exact
  lo, hi = min(lo, bound), max(hi, 1.0 - bound)
  return Comparison(p, lo, hi, bool(lo > 0.5), bool(p > gamma), n, float(gamma))


def noether_sample_size(gamma: float = 0.75, alpha: float = 0.05, beta: float = 0.05) -> int:
  """Trials needed to detect P(A > B) = gamma (Noether, 1987; used by Bouthillier et al. 2021).

  N = ceil((z_{1-alpha} + z_{1-beta})^2 / (6 (gamma - 1/2)^2)).

  Example:
    >>> noether_sample_size(0.75)
    29
  """
  check_range("gamma", gamma, 0.5, 1.0, low_inclusive=False, high_inclusive=False)
  check_range("alpha", alpha, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
  check_range("beta", beta, 0.0, 0.5, low_inclusive=False, high_inclusive=False)
  z = statistics.NormalDist().inv_cdf
  n = (z(1 - alpha) + z(1 - beta)) ** 2 / (6 * (gamma - 0.5) ** 2)
  return int(np.ceil(n - 1e-9))


class Timing(NamedTuple):
  """Outcome of :func:`time_interleaved` (seconds per call).

  Attributes:
    times_a, times_b: per-repeat wall-clock times of A and B, in run order.
    median_a, median_b: their medians.
    ratio: ``median_b / median_a`` (> 1 means A is faster: the speed-up of A over B).
    p_a_faster: fraction of repeats in which A's call was faster than the B call beside it.

  Example:
    >>> t = Timing(np.array([1.0, 2.0]), np.array([3.0, 1.5]), 1.5, 2.25, 1.5, 0.5)
    >>> print(t)
    A 1500.000 ms, B 2250.000 ms, B/A = 1.50x, P(A faster) = 0.50 over 2 pairs
  """
  times_a: np.ndarray
  times_b: np.ndarray
  median_a: float
  median_b: float
  ratio: float
  p_a_faster: float

  def __str__(self) -> str:
    return (f"A {self.median_a * 1e3:.3f} ms, B {self.median_b * 1e3:.3f} ms, B/A = {self.ratio:.2f}x, "
            f"P(A faster) = {self.p_a_faster:.2f} over {len(self.times_a)} pairs")


def _timed(fn: Callable[[], Any], inner: int = 1) -> float:
  """Seconds per call of ``fn`` over ``inner`` calls, blocking on the last result."""
  t0 = time.perf_counter()
  for _ in range(inner - 1):
    fn()
  jax.block_until_ready(fn())
  return (time.perf_counter() - t0) / inner


def time_interleaved(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, repeats: int = 30,
                     warmup: int = 3, inner: int = 1) -> Timing:
  """Time two zero-argument callables alternately (ABAB...) after warm-up.

  Each measurement calls the function ``inner`` times and blocks on the last result, so device work
  is included and dispatch of many tiny calls can be amortised; the time per call is reported.
  Compile outside or in ``warmup``: the first ``warmup`` rounds are discarded.

  Args:
    fn_a, fn_b: callables returning jax arrays (or pytrees); e.g. ``lambda: f_jit(x)``.
    repeats: measured rounds (each times A once and B once); order within a round alternates.
    warmup: discarded rounds.
    inner: calls per measurement.

  Returns:
    A :class:`Timing`.

  Example:
    >>> t = time_interleaved(lambda: sum(range(10)), lambda: sum(range(100_000)), repeats=5, warmup=1)
    >>> len(t.times_a), t.ratio > 1.0
    (5, True)
  """
  check_int("repeats", repeats, 1)
  check_int("warmup", warmup, 0)
  check_int("inner", inner, 1)

  run = lambda fn: _timed(fn, inner)

  for _ in range(warmup):
    run(fn_a)
    run(fn_b)
  ta, tb = np.empty(repeats), np.empty(repeats)
  for i in range(repeats):
    if i % 2 == 0:
      ta[i] = run(fn_a)
      tb[i] = run(fn_b)
    else:
      tb[i] = run(fn_b)
      ta[i] = run(fn_a)
  ma, mb = float(np.median(ta)), float(np.median(tb))
  return Timing(ta, tb, ma, mb, mb / ma, prob_outperform(ta, tb, lower_is_better=True))
