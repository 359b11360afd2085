"""Choosing buckets for dynamic lengths: power-of-two buckets and a dynamic program over a length
distribution that minimises the expected cost of a request stream (padded work plus compilation).

Nimble (Shen et al., "Nimble: Efficiently Compiling Dynamic Neural Networks for Model Inference",
MLSys 2021) dispatches a dynamic dimension to one of a few statically compiled kernels; TVM's
``FlexibleShapeDispatch`` pads a size ``n`` to bucket ``b_i`` when ``b_{i-1} < n <= b_i`` and leaves the
choice of buckets to the user. Here the choice is an optimisation: with ``p(n)`` the length
distribution, ``t(b)`` the run time of one call at bucket ``b`` and ``C(b)`` the compile time of that
bucket, a stream of ``S`` requests costs

    J(b_1 < ... < b_k) = S * sum_n p(n) t(bucket(n)) + sum_i C(b_i),

which is additive over contiguous groups of sorted lengths, so an ``O(k m^2)`` dynamic program over the
``m`` distinct lengths finds the optimum for every ``k`` at once.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mlsys_jax._checks import check_int, check_range

__all__ = ["BucketPlan", "pow2_buckets", "bucket_for", "length_distribution", "expected_cost",
           "choose_buckets"]


class BucketPlan(NamedTuple):
  """Result of :func:`choose_buckets`.

  Attributes:
    buckets: the chosen bucket sizes, increasing; the last one covers the longest length.
    total_cost: expected cost of the stream, ``stream_length * run_cost + compile_cost`` (units of
      ``run_cost``/``compile_cost``, e.g. seconds).
    run_cost: expected run cost of ONE request, ``sum_n p(n) t(bucket(n))``.
    compile_cost: summed compile cost of the buckets.
    padding_overhead: ``E[bucket(n)] / E[n] - 1``, the fraction of padded positions.
    costs_by_k: ``total_cost`` of the best plan with exactly ``k`` buckets, ``k = 1..len``.
  """
  buckets: tuple[int, ...]
  total_cost: float
  run_cost: float
  compile_cost: float
  padding_overhead: float
  costs_by_k: tuple[float, ...]


def pow2_buckets(max_length: int, min_bucket: int = 1) -> tuple[int, ...]:
  """Powers of two from ``min_bucket`` (rounded up to a power of two) up to the first ``>= max_length``.

  >>> pow2_buckets(100, min_bucket=8)
  (8, 16, 32, 64, 128)
  """
  check_int("max_length", max_length, 1)
  check_int("min_bucket", min_bucket, 1)
  b = 1 << (int(min_bucket) - 1).bit_length()
  out = [b]
  while out[-1] < max_length:
    out.append(out[-1] * 2)
  return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
  """Smallest bucket ``>= n``, or ``None`` when ``n`` exceeds the largest bucket.

  TVM's ``FlexibleShapeDispatch`` rule used by Nimble (Shen et al., MLSys 2021): ``n`` is padded to
  ``b_i`` when ``b_{i-1} < n <= b_i``. ``buckets`` may come in any order and with repeats (like
  :func:`bucketed_jit`, which sorts its buckets); the answer is the smallest bucket ``>= n`` either way.

  Args:
    n: the length (an integer).
    buckets: a non-empty sequence of integer bucket sizes ``>= 1``.

  Raises:
    ValueError: ``buckets`` is empty or holds a size ``< 1``.
    TypeError: ``n`` or a bucket is not an integer.

  >>> bucket_for(17, (16, 32, 64)), bucket_for(65, (16, 32, 64))
  (32, None)
  >>> bucket_for(17, (64, 32, 16))                      # any order
  32
  """
  if type(n) is not int:
    check_int("n", n)
  bs = buckets if type(buckets) is tuple else tuple(buckets)
  prev = 0
  for b in bs:  # fast path (called per request): strictly increasing Python ints >= 1
    if type(b) is not int or b <= prev:
      break
    prev = b
  else:
    if not bs:
      raise ValueError("buckets is empty; give at least one size, e.g. pow2_buckets(max_length).")
    i = bisect.bisect_left(bs, n)
    return None if i == len(bs) else bs[i]
  for b in bs:
    check_int("each of buckets", b, 1)
  bs = tuple(sorted({int(b) for b in bs}))  # unsorted or repeated: bisect needs increasing order
  i = bisect.bisect_left(bs, n)
  return None if i == len(bs) else int(bs[i])


def length_distribution(lengths, weights=None) -> tuple[np.ndarray, np.ndarray]:
  """``(distinct lengths, probabilities)`` from samples (``weights=None``) or from lengths with weights
  (counts or probabilities; normalised here).

  The ``p(n)`` of the bucket-choice objective ``J`` (module docstring; Nimble, Shen et al., MLSys 2021,
  dispatches each length to a bucket): ``p(n) = sum_{i: lengths_i = n} w_i / sum_i w_i`` with
  ``w_i = 1`` for samples. Repeated lengths are pooled.

  Args:
    lengths: non-empty 1-D sequence of integer lengths >= 1 (integral floats are accepted).
    weights: ``None`` or a sequence of the same shape, finite, >= 0 and not all zero.

  Returns:
    ``(uniq, p)``: the distinct lengths increasing (int64) and their probabilities (float64, sum 1).

  Raises:
    ValueError: ``lengths`` is empty, not 1-D or holds a value < 1; ``weights`` has another shape, a
      negative or non-finite entry, or sums to 0.
    TypeError: ``lengths`` holds non-integral values.

  >>> uniq, p = length_distribution([3, 1, 3, 3])
  >>> uniq.tolist(), p.tolist()
  ([1, 3], [0.25, 0.75])
  """
  lengths = np.asarray(lengths)
  if lengths.ndim != 1 or lengths.size == 0:
    raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {lengths.shape}.")
  if not np.issubdtype(lengths.dtype, np.integer):
    if not np.all(np.equal(np.mod(lengths, 1), 0)):
      raise TypeError("lengths must be integers (sizes of a dimension); round them first.")
    lengths = lengths.astype(np.int64)
  if np.any(lengths < 1):
    raise ValueError(f"lengths must be >= 1, got minimum {int(lengths.min())}.")
  if weights is None:
    w = np.ones(lengths.shape, np.float64)
  else:
    w = np.asarray(weights, np.float64)
    if w.shape != lengths.shape:
      raise ValueError(f"weights must match lengths: shapes {w.shape} vs {lengths.shape}.")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError("weights must be finite, >= 0 and not all zero.")
  uniq, inv = np.unique(lengths, return_inverse=True)
  p = np.bincount(inv.ravel(), weights=w.ravel(), minlength=uniq.size)
  return uniq.astype(np.int64), p / p.sum()


def _cost_fn(cost, name: str) -> Callable[[np.ndarray], np.ndarray]:
  if cost is None:
    return lambda b: np.asarray(b, np.float64)
  if callable(cost):
    return lambda b: np.asarray([float(cost(int(x))) for x in np.asarray(b)], np.float64)
  check_range(name, cost, 0.0)
  return lambda b: np.full(np.shape(b), float(cost), np.float64)


def expected_cost(buckets: Sequence[int], lengths, weights=None, *, run_cost=None, compile_cost=0.0,
                  stream_length: int = 1) -> float:
  """``stream_length * E[run_cost(bucket(n))] + sum_i compile_cost(b_i)`` for given buckets.

  ``run_cost`` and ``compile_cost`` are numbers or callables of the bucket size; ``run_cost=None`` means
  the padded length itself (expected padded work).

  >>> expected_cost((4, 8), [1, 4, 5, 8])
  6.0
  """
  uniq, p = length_distribution(lengths, weights)
  bs = np.asarray(sorted(int(b) for b in buckets))
  if bs.size == 0 or bs[-1] < uniq[-1]:
    raise ValueError(f"the largest bucket must cover the longest length {int(uniq[-1])}; got buckets "
                     f"{tuple(bs.tolist())}.")
  assigned = bs[np.searchsorted(bs, uniq, side="left")]
  run = _cost_fn(run_cost, "run_cost")
  comp = _cost_fn(compile_cost, "compile_cost")
  return float(stream_length * np.dot(p, run(assigned)) + comp(bs).sum())


def choose_buckets(lengths, num_buckets: int, *, weights=None, run_cost=None, compile_cost=0.0,
                   stream_length: int = 1, candidates: Sequence[int] | None = None,
                   exact_k: bool = False) -> BucketPlan:
  """Buckets minimising the expected cost of a request stream, by a dynamic program.

  Nimble (Shen et al., MLSys 2021) compiles a dynamic dimension into a few kernels and dispatches each
  size to one; this picks those sizes. With ``m`` distinct lengths ``n_1 < ... < n_m`` (probabilities
  ``p_j``) and buckets restricted to ``candidates`` (default: the lengths themselves, which is optimal
  for any non-decreasing ``run_cost``), ``F[k][j] = min_i F[k-1][i] + S t(c_j) P(i, j] + C(c_j)`` is the
  best cost of covering the first ``j`` candidates with ``k`` buckets, the last at ``c_j``.

  Args:
    lengths: observed lengths (samples), or distinct lengths with ``weights``.
    num_buckets: the most compiled programs allowed.
    weights: optional counts/probabilities per entry of ``lengths``.
    run_cost: time of one call at bucket ``b``: number or callable ``b -> float`` (non-decreasing);
      ``None`` = ``b`` (padded work).
    compile_cost: compile time of one bucket: number or callable ``b -> float``.
    stream_length: number of requests ``S`` the compiled programs serve (weighs run against compile).
    candidates: allowed bucket sizes (e.g. multiples of 8); the largest must cover the longest length.
    exact_k: use exactly ``num_buckets`` buckets (or the number of candidates that hold lengths, if
      fewer) instead of the best ``k <= num_buckets``.

  Returns:
    A :class:`BucketPlan`.

  >>> choose_buckets([3, 3, 3, 4, 10, 10], num_buckets=2).buckets
  (4, 10)
  >>> plan = choose_buckets([3, 3, 3, 4, 10, 10], num_buckets=3, compile_cost=5.0, stream_length=1)
  >>> plan.buckets  # compiling is dear next to one request: one bucket
  (10,)
  """
  check_int("num_buckets", num_buckets, 1)
  check_int("stream_length", stream_length, 1)
  uniq, p = length_distribution(lengths, weights)
  if candidates is None:
    cand = uniq
  else:
    cand = np.unique(np.asarray(candidates, np.int64))
    if cand.size == 0 or cand[-1] < uniq[-1]:
      raise ValueError(f"candidates must include a size >= the longest length {int(uniq[-1])}.")
    if cand[0] < 1:
      raise ValueError("candidates must be >= 1.")
  # Probability mass that lands on each candidate; only candidates holding mass can be optimal buckets.
  idx = np.searchsorted(cand, uniq, side="left")
  mass = np.bincount(idx, weights=p, minlength=cand.size)
  keep = mass > 0
  cand, mass = cand[keep], mass[keep]
  m = cand.size
  run = _cost_fn(run_cost, "run_cost")(cand)
  comp = _cost_fn(compile_cost, "compile_cost")(cand)
  if np.any(~np.isfinite(run)) or np.any(~np.isfinite(comp)) or np.any(run < 0) or np.any(comp < 0):
    raise ValueError("run_cost and compile_cost must be finite and >= 0 at every candidate bucket.")
  if np.any(np.diff(run) < -1e-12 * np.abs(run[1:]).max(initial=1.0)):
    raise ValueError("run_cost must be non-decreasing in the bucket size (a longer padded input never "
                     "runs faster); check the cost model.")
  cum = np.concatenate([[0.0], np.cumsum(mass)])
  kmax = min(num_buckets, m)
  inf = math.inf
  f = np.full((kmax + 1, m + 1), inf)
  arg = np.zeros((kmax + 1, m + 1), np.int64)
  f[0, 0] = 0.0
  for k in range(1, kmax + 1):
    for j in range(k, m + 1):  # last bucket at cand[j-1] covers candidates i+1..j
      i = np.arange(k - 1, j)
      tot = f[k - 1, i] + stream_length * run[j - 1] * (cum[j] - cum[i]) + comp[j - 1]
      best = int(np.argmin(tot))
      f[k, j], arg[k, j] = tot[best], i[best]
  costs = tuple(float(f[k, m]) for k in range(1, kmax + 1))
  k = kmax if exact_k else 1 + int(np.argmin(costs))
  bs, j = [], m
  for kk in range(k, 0, -1):
    bs.append(int(cand[j - 1]))
    j = int(arg[kk, j])
  bs = tuple(reversed(bs))
  assigned = np.asarray(bs)[np.searchsorted(np.asarray(bs), uniq, side="left")]
  run_e = float(np.dot(p, _cost_fn(run_cost, "run_cost")(assigned)))
  comp_t = float(_cost_fn(compile_cost, "compile_cost")(np.asarray(bs)).sum())
  overhead = float(np.dot(p, assigned) / np.dot(p, uniq) - 1.0)
  return BucketPlan(bs, float(f[k, m]), run_e, comp_t, overhead, costs)
