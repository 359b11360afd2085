"""Spread error-feedback releases over time before an adaptive optimizer (issue 18, density 0.1%).

A sparsifier with error feedback (``sidco``, ``topk``, ``dgc``, ...) sends a coordinate about once per
``1 / density`` steps, and then sends everything it held back since the last time: one value ``B`` after
``T`` silent steps. SGD after it does not care when the value arrives (it is linear), but Adam does: one
burst moves a coordinate by at most ``~31.8 * sqrt(1 - b2^t) * lr`` whatever ``B`` is (docs/comm.md,
"Density 0.1% before Adam"), where dense Adam moves a coordinate with a consistent gradient ``~lr`` per
step, ``~T * lr`` over the ``T`` steps the burst stands for.

:func:`spread_releases` wraps the compressor and turns each released aggregate back into a rate: when a
coordinate's aggregated value ``B`` arrives ``T`` steps after its previous release, it delivers ``B / T``
on each of the next ``T`` steps (``mode='linear'``, the sum delivered is exactly ``B``), or ``pending / T``
of what is still pending on every step (``mode='leaky'``, an exponential spread). Adam after it then sees
a per-step estimate of the gradient (the mean gradient over the interval the release stands for) instead
of one spike and zeros. Everything is computed from the *aggregated* sparse output of the compressor,
identical on every replica: the wrapper sends nothing, and replicas stay identical.

    B_t   = compressor(g_t)                  (aggregated over the workers, sparse)
    on release (B_t[i] != 0):  T[i] = min(t - last[i], max_interval),  last[i] = t,
                               pending[i] += B_t[i],  rate[i] = pending[i] / T[i],  left[i] = T[i]
    out_t[i] = rate[i] if left[i] > 1,  pending[i] if left[i] == 1,  0 if left[i] == 0
    pending[i] -= out_t[i],  left[i] -= 1

Measured (``experiments/compressed_adam.py --spread``, mnist1d, 8 workers, Top-k at 0.1%, 600 steps, seeds
0 / 1; docs/comm.md): the plain chain goes from 72.1 / 76.0% to 82.4 / 83.3% with ``mode='leaky',
max_interval=50`` (Adam 89.9 / 90.2%), but the spread does not add to DGC's density warm-up nor to the
Adam-aware selection (``precondition=optax.scale_by_rms()``), which is the recommended recipe at 0.1%; so
this wrapper is the tool for a chain *without* a warm-up, and the record of what the diagnosis predicts.
At density 1% (session 11; mnist1d, where the plain chain lags Adam by ~300 steps of training loss at 600
steps and passes it at 1,200) a short cap is the one that helps: ``spread_releases(sidco(0.01,
axis_name=...), mode='leaky', max_interval=16)`` before ``optax.adam`` (15 paired seeds; docs/comm.md,
"Issue 18 at 1% on mnist1d"; it buys speed: at 1,200 steps the plain chain ends higher); the default
``max_interval=100`` stays the 0.1% screens' choice.
``mode='rate'`` (session 17, rate holding: a release's rate ``B / T`` emitted from the release on, mass-exact
through a correction that may borrow up to one release ahead of the next) keeps the large layer moving between its
releases; chosen on seeds 0-4 it measured -1.19 pt vs Adam on the fresh seeds 30-44 (mnist1d 1%, Top-k, 8 workers,
600 steps), where the leaky spread with cap 16 gave -0.80 (rate vs leaky -0.39 [-0.98, +0.30]): no better than
``'leaky'``, kept as the tested record (docs/comm.md, "Issue 18 at 1% on mnist1d", session 17).
``noise=`` (a per-coordinate alternation while a release is delivered, so that Adam moves a delivered rate
``r`` by ``~r / sqrt(r^2 + noise^2)`` rather than ``sign(r)``) did not rescue the spread with the Adam-aware
selection either: ``'linear'``, ``max_interval=100``, ``noise=0.35`` after ``topk(0.001,
precondition=optax.scale_by_rms())``: 65.5% vs 84.8% without the wrapper (mnist1d, seed 0, no warm-up).

``until=`` spreads only the releases of the first steps. At 1% it is the best option measured (session 17):
``spread_releases(topk(0.01, axis_name=...), mode='leaky', max_interval=16, until=450)`` over 600 steps (the
last quarter delivered at once) gave +0.52 pt [-0.03, +1.01] vs ``optax.adam`` on 15 fresh mnist1d seeds (45-59,
chosen on seeds 0-4 before them), +0.78 over the same spread without ``until`` (docs/comm.md, "Issue 18 at 1% on
mnist1d"); ``until`` is a step count, so for another budget it is a fraction of the steps to choose. For the 0.1%
recipe's raw-selection stage it measured no better than the recipe without it (session 13, mnist1d seeds 0-4:
-1.38 vs -0.84 pt vs Adam); spreading every stage's releases of that recipe (``max_interval=16``) gave 65.2% vs
88.7% (seed 0).

:func:`gradient_units` keeps what reaches Adam in the gradient's units (one factor per leaf) when a
compressor's selection switches from the raw gradient to the gradient over each worker's RMS (the 0.1%
recipe's switch); it removes the accuracy drop after that switch (mnist1d, paired on seeds 0-4: +5 to +15
pt at steps 250-350) but not the final gap at 600 steps on mnist1d (-0.79 pt on the recipe, 15 seeds),
while on digits it brings the recipe within 0.2 pt of Adam (+0.73; session 13; docs/comm.md, "Issue 18
at 0.1% on mnist1d").

:func:`scale_by_leaf_rms` is a per-tensor RMS scaling for the sparsifiers' ``precondition=`` option, the
per-tensor counterpart of ``optax.scale_by_rms`` (which, per coordinate, is the recommended 0.1% recipe;
one scale per tensor measured no better than the plain chain; docs/comm.md).

:func:`staleness_topk` (session 16) selects on ``|acc| * (1 + age / tau)`` instead of spreading the releases:
it bounds how long the large layer waits but takes release slots from the small leaves, and measured worse
than the plain chain at 1% on mnist1d (docs/comm.md).

Related: DGC (Lin et al., ICLR 2018) accumulates locally and releases at once; 1-bit Adam (Tang et al.,
ICML 2021) and 0/1 Adam (Lu et al., ICLR 2023) keep Adam's variance fixed or local. This wrapper keeps
``optax.chain(<compressor>, optax.adam(lr))`` as users write it and changes only *when* the released
gradient mass reaches Adam, never how much in total.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_choice, check_floating, check_int
from mlsys_jax.comm import sparse as _sp
from mlsys_jax.comm.lowrank import _init_counted, _state_field
from mlsys_jax.comm.warmup import _compressor_axes

__all__ = ["FrozenRMSState", "GradientUnitsState", "LeafRMSState", "SpreadState", "StalenessTopkState",
           "decay_residual", "gradient_units", "rms_selection", "scale_by_frozen_rms", "scale_by_leaf_rms",
           "spread_releases", "staleness_scores", "staleness_topk"]


class SpreadState(NamedTuple):
  """State of :func:`spread_releases`.

  Attributes:
    step: steps taken (int32).
    inner_state: the wrapped compressor's state.
    last: per parameter, the step of its previous release (int32; -1 before the first).
    pending: per parameter, released gradient mass not yet delivered to the optimizer.
    rate: per parameter, the mass delivered per step (``pending / T`` at the last release; ``'matched'``:
      ``pending / S``).
    left: per parameter, steps of delivery left (int32; 0 = nothing pending in ``'linear'`` and
      ``'matched'`` modes); in ``'rate'`` mode the interval ``T`` of the latest release (0 before the first).
    releases: releases seen so far, summed over the parameters (float32, for diagnostics).
    bytes_sent: bytes this device passed to the collectives in the last step (the compressor's: the
      wrapper itself sends nothing).
    total_bytes: cumulative ``bytes_sent``.
  """
  step: jax.Array
  inner_state: Any
  last: Any
  pending: Any
  rate: Any
  left: Any
  releases: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array


def spread_releases(compressor: optax.GradientTransformation, *, mode: str = "leaky",
                    max_interval: int | None = 100, floor: float = 0.0,
                    noise: float = 0.0, until: int | None = None,
                    hold: int | None = None, start: int | None = None,
                    scale: float | None = None, consistent: bool = False) -> optax.GradientTransformation:
  """Deliver each error-feedback release as a rate over the interval it stands for.

  A step the compressor skips (some worker's gradient held NaN/inf: its ``nonfinite_steps`` grew, on every
  replica) is skipped here too: the output is 0 and ``last``, ``pending``, ``rate`` and ``left`` stay as they
  were (what is pending is delivered on the next steps; only ``step`` advances), since session 42.

  Args:
    compressor: a sparsifying compression transform of :mod:`mlsys_jax.comm` (``sidco``, ``topk``,
      ``dgc``, ``randomk``, or one of them inside ``density_warmup``/``dense_warmup``), built with the
      ``axis_name`` of the workers. Its output must be the same on every replica (the aggregated update),
      as it is for every transform here. A coordinate counts as released on a step when the compressor's
      output there is non-zero.
    mode: ``'leaky'`` (default): each step delivers ``pending / T`` (an exponential spread with time
      constant ``T``; what is not yet delivered stays in ``pending``). ``'linear'``: a release ``B`` after
      ``T`` steps delivers ``B / T`` on each of the next ``T`` steps (exactly ``B`` in total; a release
      during a delivery adds to what is pending and restarts the delivery over the new interval).
      ``'hold'``: the release's rate ``B / T`` on every step until the next release (or ``max_interval``
      steps), not mass-conserving (measured worse; kept for the comparison).
      ``'rate'`` (session 17, rate holding): a release ``B`` after ``T`` steps sets the coordinate's rate
      ``r = B / T``, which is emitted on every step from the release on (for ``max(T, hold)`` steps, or
      until the next release when ``hold`` is None), *plus* a correction that keeps the mass exact:
      ``out = r + (pending - r * max(T - s, 0)) / T``, ``s`` the steps since the release, ``pending`` the
      released mass not yet delivered (it may go negative: the coordinate moved on at its rate before its
      next release arrived). The correction decays the difference between ``pending`` and what the rate
      still owes with time constant ``T``, so after ``T`` steps the rate fades (``out -> 0``,
      ``pending -> -r T``: the borrowed mass is at most one release) and the next release repays it
      (``pending += B'``). Everything released is delivered (``pending`` bounded by one release); only the
      timing changes: the coordinate keeps moving between its releases instead of stopping. Measured no
      better than ``'leaky'`` at 1% on mnist1d (session 17; docs/comm.md).
      ``'matched'`` (session 20, magnitude-matched spread; for releases in units of each worker's gradient
      RMS, i.e. after the compressor's ``precondition=rms_selection(...)`` / ``optax.scale_by_rms()``): a
      release ``B`` arriving ``T`` steps after the coordinate's previous one (``T`` not capped) is delivered
      linearly (as ``'linear'``: ``pending / S`` per step, the rest on the last step) over ::

          S = clip(round(scale * B^2 / T), 1, min(T, max_interval))          (steps; t >= start)
          S = 1                                                              (t < start, or t >= until)

      The model (Adam's ``b2`` memory much longer than ``T``; ``v`` in steady state): Adam fed one burst
      ``B`` every ``T`` steps moves the coordinate by ``~sqrt(T) * lr`` whatever ``B`` (``v ~ B^2 / T``,
      ``sum_t m_t = B``); fed ``B / S`` on ``S`` steps of every ``T``, ``v ~ B^2 / (S T)`` and it moves
      ``~sqrt(S T) * lr``. Dense Adam over the ``T`` steps the release stands for moves ``~|B| / rho * lr``,
      ``rho`` the RMS of the aggregated per-step value in the same units (``<= 1`` in RMS units;
      ``1 / sqrt(workers)`` for a noise-dominated coordinate). Equating: ``S T = B^2 / rho^2``, so ``scale``
      plays ``1 / rho^2``. A noise-dominated release (``B^2 ~ rho^2 T``) gets ``S ~ 1``, delivered at once as
      without the wrapper; a signal-dominated one (``B ~ T mu``) gets ``S ~ T``, moving ``~T * mu / rho * lr``
      as dense Adam would. A release during a delivery adds to what is pending and the whole pending mass
      is delivered over the new release's ``S``; everything released is delivered (``pending`` is 0 when
      ``left`` is 0, as long as the releases are finite). A non-finite release is delivered at once (``S = 1``), so NaN/inf reaches the
      optimizer. Before ``start`` (the raw-selection stage of the 0.1% recipe, whose values are not in RMS
      units) every release is delivered at once. Measured (session 20; docs/comm.md, "Issue 18 at 0.1% on
      mnist1d"; the 0.1% recipe inside it with ``start=150``, Top-k, mnist1d seeds 0-4, paired): no better
      than the recipe: ``scale=1, max_interval=64`` -0.30 [-1.10, +0.68] pt, ``scale=8`` -3.72 (cap 16:
      -4.38), ``scale=8`` with ``consistent=True`` -1.48 [-2.52, -0.50] (+2.24 over ``scale=8`` without
      the gate), ``scale=2`` with it -0.46 [-0.94, +0.20]; kept as the tested record. Top-k releases a
      noise-dominated coordinate only when its residual is in the tail, so ``B^2 / T`` overstates how much
      signal a release carries and the larger scales spread noise too (a likely reading, not traced).
    max_interval: the longest interval a release is spread over (steps, >= 1; default 100, the best of
      50 / 100 / 200 / none in the mnist1d screens); None: no limit (the first release of a coordinate
      then spreads over all steps since the start). ``mode='matched'``: the cap on ``S`` (the interval
      ``T`` in ``B^2 / T`` itself is never capped).
    floor: >= 0; adds ``floor * rms * (-1)^t`` to every output, ``rms`` the root mean square of the leaf's
      delivered rate on this step: a zero-mean alternation that gives Adam's second moment a per-leaf
      floor (``v ~ o^2 + (floor * rms)^2``), so that Adam moves a coordinate by ``~o / sqrt(o^2 + A^2)``
      instead of the sign of its stale estimate ``o`` (a smoothed stream has lost the gradient noise
      that dense Adam's ``v`` sees). 0 (default): no alternation.
    noise: >= 0; ``mode='linear'``, ``'hold'`` or ``'matched'`` only: adds ``noise * (-1)^t`` to each coordinate *while
      one of its releases is being delivered* (a per-coordinate floor on Adam's second moment, in the units
      of the released values, not part of the released mass). A delivered rate ``r`` then moves Adam by
      about ``r / sqrt(r^2 + noise^2)`` per step instead of ``sign(r)``: with the compressor's
      ``precondition=optax.scale_by_rms()`` the values are in units of each worker's gradient RMS, ``r``
      estimates the coordinate's mean over RMS, and ``noise = 1 / sqrt(workers)`` is the noise of the
      workers' mean gradient that dense Adam's ``v`` would see. 0 (default): none.
    until: spread only the releases of steps ``t < until`` (>= 1; the wrapper's own step count from 0);
      from step ``until`` on every release is delivered at once, together with whatever of that
      coordinate is still pending from an earlier spread (so no mass is lost: a coordinate not released
      again keeps draining at its old rate). For a compressor whose selection changes during training,
      e.g. ``density_warmup`` with raw selection in its first stage and the Adam-aware
      ``rms_selection`` after it: spreading helps the raw releases and hurts the normalised ones
      (docs/comm.md). At 1% on mnist1d ``until=450`` of 600 steps (spread early for speed, deliver at
      once late) measured best (session 17). None (default): every release is spread. Not with ``mode='rate'``.
    hold: ``mode='rate'`` only: the rate of a release is emitted for ``max(T, hold)`` steps after it (>= 1;
      after that only the correction flows, which repays any mass delivered ahead by moving the coordinate
      back). None (default): the rate is emitted until the next release (its own correction fades it).
    start: ``mode='matched'`` only: the first step (the wrapper's own count from 0) whose releases are
      spread (>= 0; default 0); earlier releases are delivered at once. For the 0.1% recipe (``density_warmup``
      with ``rms_selection(stage >= 1)``): the end of its raw stage, ``stage_boundaries(steps, stages)[0]``.
    scale: ``mode='matched'`` only: ``1 / rho^2`` in the spread length ``S`` (a finite number > 0; default
      1). With ``W`` workers and noise-dominated coordinates ``rho^2 ~ 1 / W``, so ``scale = W`` is the
      matched value there; 1 spreads fewer releases (only those with ``B^2 > T``).
    consistent: ``mode='matched'`` only: True spreads a release (``S`` as above) only when it has the sign
      of the coordinate's latest delivery rate (``rate``: the per-step value of its previous release's
      delivery; 0 before the first release, so a first release goes at once); a release that reverses the
      coordinate's direction is delivered at once. A gate against spreading noise: Top-k releases a
      noise-dominated coordinate only when its residual is in the tail, so ``B^2 / T`` alone does not tell
      it from a signal, but its consecutive releases agree in sign only half of the time. False (default):
      no gate.

  Returns:
    An ``optax.GradientTransformation``; chain it where the compressor goes, e.g.
    ``optax.chain(spread_releases(topk(0.001, axis_name='d')), optax.adam(1e-3))``.

  Example:
    >>> import jax.numpy as jnp
    >>> from mlsys_jax.comm import topk
    >>> tx = spread_releases(topk(0.5))       # one device; 1 of 2 entries sent per step
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> for t in range(4):
    ...   out, s = tx.update({'w': jnp.array([2.0, 1.5])}, s)
    ...   print(out['w'].tolist())
    [2.0, 0.0]
    [0.0, 1.5]
    [2.0, 0.75]
    [1.0, 1.875]

    Step 1 releases 3.0 for the second entry after 2 steps: 1.5 is delivered, 1.5 stays pending and
    flows out at 1/2 per step (0.75, then 0.375 + 1.5 from the next release's 3.0 over 2 steps).

    >>> tx = spread_releases(topk(0.5), mode='rate', max_interval=16)
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> for t in range(4):
    ...   out, s = tx.update({'w': jnp.array([2.0, 1.5])}, s)
    ...   print(out['w'].tolist(), s.pending['w'].tolist())
    [2.0, 0.0] [0.0, 0.0]
    [2.0, 1.5] [-2.0, 1.5]
    [1.0, 1.5] [1.0, 0.0]
    [1.5, 1.5] [-0.5, 1.5]

    With ``'rate'`` the second entry gets its gradient 1.5 on every step from its first release on; the
    first keeps moving at 2.0 before its next release (``pending`` -2.0: borrowed), and that release (4.0)
    repays it, the correction converging to 2.0 per step.

    >>> tx = spread_releases(topk(0.5), mode='matched', max_interval=16, scale=0.25)
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> for t in range(4):
    ...   out, s = tx.update({'w': jnp.array([2.0, 1.5])}, s)
    ...   print(out['w'].tolist())
    [2.0, 0.0]
    [0.0, 3.0]
    [2.0, 0.0]
    [2.0, 3.0]

    With ``'matched'`` the second entry's releases of 3.0 every ``T = 2`` steps get ``S = round(0.25 * 9 /
    2) = 1`` (at once); the first entry's 4.0 after 2 steps gets ``S = round(0.25 * 16 / 2) = 2``: 2.0 on
    each of two steps.
  """
  if not isinstance(compressor, optax.GradientTransformation):
    raise TypeError(f"compressor must be an optax.GradientTransformation (e.g. topk(0.001, axis_name='d')), "
                    f"got {type(compressor).__name__}.")
  check_choice("mode", mode, ("linear", "leaky", "hold", "rate", "matched"))
  if max_interval is not None:
    check_int("max_interval", max_interval, 1)
  cap = None if max_interval is None else int(max_interval)
  if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor >= 0:
    raise ValueError(f"floor must be a number >= 0 (0 = no alternation), got {floor!r}.")
  floor = float(floor)
  if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
    raise ValueError(f"noise must be a number >= 0 (0 = none), got {noise!r}.")
  noise = float(noise)
  if until is not None:
    check_int("until", until, 1)
    until = int(until)
    if mode == "hold":
      raise ValueError("until= needs mode='linear' or 'leaky' (where a release delivered at once also takes "
                       "what is still pending); mode='hold' keeps paying out earlier holds.")
  if hold is not None:
    check_int("hold", hold, 1)
    hold = int(hold)
    if mode != "rate":
      raise ValueError(f"hold= is for mode='rate' (how long a release's rate is emitted), got mode={mode!r}.")
  if mode == "rate" and until is not None:
    raise ValueError("until= needs mode='linear' or 'leaky'; mode='rate' keeps emitting a release's rate "
                     "after it, so 'delivered at once' does not apply.")
  if not isinstance(consistent, (bool, np.bool_)):
    raise TypeError(f"consistent must be a bool, got {type(consistent).__name__}.")
  if mode != "matched" and (start is not None or scale is not None or consistent):
    raise ValueError(f"start=, scale= and consistent= are for mode='matched' (the magnitude-matched spread), got "
                     f"mode={mode!r}.")
  if mode == "matched":
    start = 0 if start is None else start
    check_int("start", start, 0)
    start = int(start)
    scale = 1.0 if scale is None else scale
    if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
        or not np.isfinite(scale) or not scale > 0):
      raise ValueError(f"scale must be a finite number > 0 (1 / rho^2 in S = scale * B^2 / T; e.g. the number of "
                       f"workers), got {scale!r}.")
    scale = float(scale)
    if until is not None and until <= start:
      raise ValueError(f"until={until} <= start={start}: mode='matched' would spread no release; pass until > "
                       f"start or until=None.")
  if noise and mode in ("leaky", "rate"):
    raise ValueError(f"noise needs mode='linear', 'hold' or 'matched' (a delivery with an end); mode={mode!r} "
                     "never finishes delivering.")

  def init_fn(params):
    check_floating("spread_releases.init", params)
    inner = _init_counted("spread_releases", compressor, params, "wrap a compressor of mlsys_jax.comm (sidco, "
                          "topk, dgc, randomk, or density_warmup/dense_warmup of one)")
    ints = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
    last = jax.tree_util.tree_map(lambda p: jnp.full(jnp.shape(p), -1, jnp.int32), params)
    f = jnp.zeros((), jnp.float32)
    return SpreadState(jnp.zeros((), jnp.int32), inner, last, zeros, zeros, ints, f, f, f)

  def update_fn(updates, state, params=None):
    check_floating("spread_releases.update", updates)
    b, inner = compressor.update(updates, state.inner_state, params)
    t = state.step

    def leaf(bv, last, pending, rate, left):
      bv = bv.astype(pending.dtype)
      rel = bv != 0
      gap = jnp.maximum(t - last, 1)   # T, uncapped ('matched')
      interval = gap if cap is None else jnp.minimum(gap, cap)   # (cap >= 1)
      if until is not None:   # from step `until` on: a release (and what is pending) delivered at once
        interval = jnp.where(t < until, interval, 1)
      pending = pending + bv
      last = jnp.where(rel, t, last)
      if mode == "matched":   # S = clip(round(scale * B^2 / T), 1, min(T, cap)) from `start` on, else 1
        b32 = bv.astype(jnp.float32)
        want = jnp.round(scale * jnp.square(b32) / gap.astype(jnp.float32))
        spread = jnp.clip(want, 1.0, interval.astype(jnp.float32))   # min(T, cap); a B^2 overflow: the cap
        spread = jnp.where(jnp.isfinite(b32), spread, 1.0).astype(jnp.int32)   # NaN/inf released: at once
        on = t >= start   # (from `until` on, interval is 1 and so is the spread)
        if consistent:   # only a release in the direction of the coordinate's latest delivery
          on = on & (jnp.sign(b32) == jnp.sign(rate.astype(jnp.float32))) & (rate != 0)
        interval = jnp.where(on, spread, 1)   # (then delivered as 'linear' over that many steps)
      if mode in ("linear", "matched"):
        rate = jnp.where(rel, pending / interval.astype(pending.dtype), rate)
        left = jnp.where(rel, interval, left)
        out = jnp.where(left > 1, rate, jnp.where(left == 1, pending, 0))
        live = left > 0
        left = jnp.maximum(left - 1, 0)
      elif mode == "leaky":
        rate = jnp.where(rel, 1.0 / interval.astype(pending.dtype), rate)
        left = jnp.where(rel, interval, left)
        out = pending * rate
      elif mode == "rate":   # rate holding: r = B / T from the release on, plus a mass-exact correction
        rate = jnp.where(rel, bv / interval.astype(pending.dtype), rate)
        left = jnp.where(rel, interval, left)   # here: T of the latest release (0 before the first)
        since = t - last                         # 0 on the release step
        tt = jnp.maximum(left, 1).astype(pending.dtype)
        owed = rate * jnp.maximum(left - since, 0).astype(pending.dtype)
        emit = rate if hold is None else jnp.where(since < jnp.maximum(left, hold), rate, 0)
        out = emit + (pending - owed) / tt
      else:   # hold: the release's per-step rate until the next release (or max_interval steps)
        rate = jnp.where(rel, bv / interval.astype(pending.dtype), rate)
        left = jnp.where(rel, cap if cap is not None else jnp.iinfo(jnp.int32).max, left)
        out = jnp.where(left > 0, rate, 0)
        live = left > 0
        left = jnp.maximum(left - 1, 0)
      pending = pending - out
      if noise:   # the coordinates whose delivery ran on this step
        out = out + jnp.where(live, jnp.where(t % 2 == 0, noise, -noise), 0).astype(out.dtype)
      if floor:
        amp = floor * jnp.sqrt(jnp.mean(jnp.square(out)))
        out = out + jnp.where(t % 2 == 0, amp, -amp).astype(out.dtype)   # (not part of the released mass)
      return out, last, pending, rate, left, jnp.sum(rel).astype(jnp.float32)

    treedef = jax.tree_util.tree_structure(updates)
    parts = [leaf(*xs) for xs in zip(treedef.flatten_up_to(b), treedef.flatten_up_to(state.last),
                                     treedef.flatten_up_to(state.pending), treedef.flatten_up_to(state.rate),
                                     treedef.flatten_up_to(state.left))]
    unf = lambda j: jax.tree_util.tree_unflatten(treedef, [p[j] for p in parts])
    # a step the compressor skipped (some worker's gradient held NaN/inf: its nonfinite_steps grew, the same
    # flag on every replica) is skipped here too: output 0, the pending deliveries kept for the next steps
    skipped = _nonfinite_total(inner) > _nonfinite_total(state.inner_state)
    out = jax.tree_util.tree_map(lambda o, g: jnp.where(skipped, 0, o).astype(g.dtype), unf(0), updates)
    keep = lambda new, old: _sp._keep_on_skip(~skipped, new, old)   # noqa: E731
    sent = jnp.asarray(_state_field(inner, "bytes_sent"), jnp.float32)
    rel = sum((p[5] for p in parts), jnp.zeros((), jnp.float32))
    return out, SpreadState(t + 1, inner, keep(unf(1), state.last), keep(unf(2), state.pending),
                            keep(unf(3), state.rate), keep(unf(4), state.left), state.releases + rel, sent,
                            state.total_bytes + sent)

  return optax.GradientTransformation(init_fn, update_fn)


class LeafRMSState(NamedTuple):
  """State of :func:`scale_by_leaf_rms`: steps taken and the EMA of each leaf's mean squared entry."""
  count: jax.Array
  nu: Any


def scale_by_leaf_rms(decay: float = 0.9, eps: float = 1e-8) -> optax.GradientTransformation:
  """Divide each leaf by the root of an EMA of its mean squared entry (one scale per tensor, local).

  A per-tensor counterpart of ``optax.scale_by_rms`` for the sparsifiers' ``precondition=`` option: the
  selection then compares entries relative to their own tensor's scale (every layer on one footing)
  without rescaling coordinates within a tensor. The EMA is bias-corrected (``nu / (1 - decay^t)``).

  Args:
    decay: EMA decay in [0, 1).
    eps: added inside the square root (> 0).

  Example:
    >>> import jax.numpy as jnp
    >>> g = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.1])}
    >>> tx = scale_by_leaf_rms()
    >>> out, _ = tx.update(g, tx.init(g))
    >>> [round(float(x), 4) for x in out['a']], round(float(out['b'][0]), 4)
    ([0.8485, 1.1314], 1.0)
  """
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"eps must be a number > 0, got {eps!r}.")

  def init_fn(params):
    check_floating("scale_by_leaf_rms.init", params)
    return LeafRMSState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(lambda _: jnp.zeros((), jnp.float32),
                                                                         params))

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    nu = jax.tree_util.tree_map(lambda n, g: decay * n + (1 - decay) * jnp.mean(jnp.square(g.astype(jnp.float32))),
                                state.nu, updates)
    corr = 1.0 - jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32)
    out = jax.tree_util.tree_map(lambda g, n: (g / jnp.sqrt(n / corr + eps)).astype(g.dtype), updates, nu)
    return out, LeafRMSState(count, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _residual_tree(state: Any):
  """The first ``residual`` field found in ``state`` (itself, or in ``inner_state``)."""
  if hasattr(state, "_fields") and "residual" in state._fields:
    return state.residual
  if hasattr(state, "_fields") and "inner_state" in state._fields:
    return _residual_tree(state.inner_state)
  raise TypeError("decay_residual: the compressor's state has no residual (error feedback) field; wrap a "
                  "sparsifier of mlsys_jax.comm (sidco, topk, dgc, randomk) or density_warmup/dense_warmup "
                  "of one.")


def _with_residual(state: Any, residual: Any):
  """``state`` with its first ``residual`` field (see :func:`_residual_tree`) replaced."""
  if hasattr(state, "_fields") and "residual" in state._fields:
    return state._replace(residual=residual)
  return state._replace(inner_state=_with_residual(state.inner_state, residual))


def _scale_residual(state: Any, decay: float):
  """``state`` with its first ``residual`` field (see :func:`_residual_tree`) times ``decay``."""
  return _with_residual(state, jax.tree_util.tree_map(lambda r: (r * decay).astype(r.dtype),
                                                      _residual_tree(state)))


def _nonfinite_total(state: Any):
  """Sum of every ``nonfinite_steps`` field along ``state``'s ``inner_state`` chain (0 without any)."""
  total = jnp.zeros((), jnp.int32)
  while hasattr(state, "_fields"):
    if "nonfinite_steps" in state._fields:
      total = total + jnp.asarray(state.nonfinite_steps, jnp.int32)
    state = state.inner_state if "inner_state" in state._fields else None
  return total


def decay_residual(compressor: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """Error feedback that forgets: the compressor's residual is multiplied by ``decay`` before every step.

  ``residual_t = decay * residual_{t-1} + g_t - sent_t``: a coordinate whose gradient is pure noise holds
  at most ``~sigma / sqrt(1 - decay^2)`` in its residual, one with a consistent mean ``mu`` up to
  ``mu / (1 - decay)``; so the selection prefers consistent coordinates over stale noise (with plain error
  feedback both grow without bound, noise as ``sqrt(t)``). The forgotten mass is not sent: ``sent +
  residual == g + decay * previous residual`` (tested). ``decay=1`` is the compressor itself. A step the
  compressor skips (some worker's gradient held NaN/inf: its ``nonfinite_steps`` count grows) keeps the
  residual as it was, undecayed, as the compressor alone does.

  Measured (issue 18, mnist1d, 8 workers, ``topk(0.001, precondition=optax.scale_by_rms())`` after the
  gentle warm-up of docs/comm.md, 600 steps): it *hurts*: ``decay=0.99`` 83.3 / 83.7% vs 88.2 / 88.7%
  without it (seeds 0 / 1; seed 2: 86.3 vs 85.2%), ``0.95`` 79.0 vs 85.2% (seed 2). What the plain
  residual holds back is needed later; kept as the tested record of that screen.

  Args:
    compressor: a sparsifier of :mod:`mlsys_jax.comm` (``sidco``, ``topk``, ``dgc``, ``randomk``), or
      ``density_warmup``/``dense_warmup`` of one.
    decay: in (0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from mlsys_jax.comm import topk
    >>> tx = decay_residual(topk(0.5), 0.5)
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> out, s = tx.update({'w': jnp.array([2.0, 1.0])}, s)
    >>> out['w'].tolist(), s.residual['w'].tolist()
    ([2.0, 0.0], [0.0, 1.0])
    >>> out, s = tx.update({'w': jnp.array([0.0, 1.0])}, s)     # 0.5 * 1.0 + 1.0 is sent
    >>> out['w'].tolist()
    [0.0, 1.5]
  """
  if not isinstance(compressor, optax.GradientTransformation):
    raise TypeError(f"compressor must be an optax.GradientTransformation (e.g. topk(0.001, axis_name='d')), "
                    f"got {type(compressor).__name__}.")
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
    raise ValueError(f"decay must be a number in (0, 1] (1 = plain error feedback), got {decay!r}.")
  decay = float(decay)

  def init_fn(params):
    state = compressor.init(params)
    _residual_tree(state)   # fails early when there is no residual
    return state

  def update_fn(updates, state, params=None):
    if decay == 1.0:
      return compressor.update(updates, state, params)
    out, new = compressor.update(updates, _scale_residual(state, decay), params)
    skipped = _nonfinite_total(new) > _nonfinite_total(state)   # the same on every replica (agreed flag)
    kept = jax.tree_util.tree_map(lambda old, r: jnp.where(skipped, old, r), _residual_tree(state),
                                  _residual_tree(new))
    return out, _with_residual(new, kept)

  return optax.GradientTransformation(init_fn, update_fn)


class FrozenRMSState(NamedTuple):
  """State of :func:`scale_by_frozen_rms`: steps taken and the EMA of the squared gradient."""
  count: jax.Array
  nu: Any


def scale_by_frozen_rms(freeze_after: int, decay: float = 0.9, eps: float = 1e-8
                        ) -> optax.GradientTransformation:
  """``optax.scale_by_rms`` whose second moment stops updating after ``freeze_after`` steps.

  For the sparsifiers' ``precondition=`` option (each worker selects on its own gradient over its own
  RMS): the first ``freeze_after`` steps are exactly ``optax.scale_by_rms(decay, eps)`` (``g /
  sqrt(nu + eps)``, ``nu`` the EMA of ``g^2`` from 0); afterwards ``nu`` is kept, so each coordinate is
  divided by a constant: the selection stays per-coordinate normalised while what is sent keeps the raw
  gradient's course over time (a gradient that shrinks sends smaller values). 1-bit Adam (Tang et al.,
  ICML 2021) freezes Adam's variance after a warm-up for the same reason.

  Measured (issue 18, mnist1d, 8 workers, ``topk(0.001, precondition=...)`` after the gentle warm-up of
  docs/comm.md, 600 steps): it *hurts*: frozen after 300 steps 81.7 / 79.7%, after 150 steps 78.6 / 80.8%,
  vs 88.2 / 88.7% with ``optax.scale_by_rms()`` (seeds 0 / 1). The short-memory RMS (decay 0.9) that keeps
  re-normalising every step is what the 0.1% selection needs; kept as the tested record of that screen.

  Args:
    freeze_after: steps after which ``nu`` is frozen (>= 1).
    decay: EMA decay in [0, 1).
    eps: added inside the square root (> 0).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_frozen_rms(1, decay=0.5)
    >>> s = tx.init({'w': jnp.zeros(1)})
    >>> out, s = tx.update({'w': jnp.array([2.0])}, s)   # nu = 0.5 * 4 = 2, then frozen
    >>> out, s = tx.update({'w': jnp.array([4.0])}, s)
    >>> round(float(out['w'][0]), 4), float(s.nu['w'][0])
    (2.8284, 2.0)
  """
  check_int("freeze_after", freeze_after, 1)
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"eps must be a number > 0, got {eps!r}.")

  def init_fn(params):
    check_floating("scale_by_frozen_rms.init", params)
    return FrozenRMSState(jnp.zeros((), jnp.int32),
                          jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params))

  def update_fn(updates, state, params=None):
    del params
    live = state.count < freeze_after
    nu = jax.tree_util.tree_map(
        lambda n, g: jnp.where(live, decay * n + (1 - decay) * jnp.square(g.astype(n.dtype)), n), state.nu, updates)
    out = jax.tree_util.tree_map(lambda g, n: (g * jax.lax.rsqrt(n + eps)).astype(g.dtype), updates, nu)
    return out, FrozenRMSState(state.count + 1, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def rms_selection(active: bool = True, *, decay: float = 0.9, eps: float = 1e-8) -> optax.GradientTransformation:
  """``optax.scale_by_rms(decay, eps)`` when ``active``, else the same state kept up to date with the gradient
  passed through unscaled: the sparsifiers' ``precondition=`` for some stages of ``density_warmup`` only.

  Issue 18's recipe at density 0.1% before Adam (docs/comm.md, "Issue 18's accuracy target: status"):
  the first warm-up stage (1%) selects on the raw gradient, the later stages (0.25%, then 0.1%) on each
  worker's gradient over the RMS of its own recent gradients (Adam-aware selection). Every stage of
  ``density_warmup`` must have one state layout; this keeps ``scale_by_rms``'s state in the plain stage
  too, so the RMS is warm at the switch. (The residual of the plain stage, in raw-gradient units, carries
  over unchanged; converting it to the RMS units at the switch measured worse.)

  Measured (``experiments/compressed_adam.py --modes=rmsfrom@1``, 8 workers, 600 steps, Top-k = SIDCo at
  0.1% after 150 steps at 1% and 150 at 0.25%, vs ``optax.adam(1e-3)``; 2026-12-03 code, 15 seeds): mnist1d
  -1.07 [-1.67, -0.47] pt, digits -0.91 [-1.54, -0.40]; in session 7's runs ``optax.scale_by_rms()`` in every
  stage was 1.67 [+0.95, +2.36] pt worse on mnist1d (10 seeds). The RMS selection is slow at 1%
  and is what makes the chain move at 0.25% and below (docs/comm.md).

  Args:
    active: True: exactly ``optax.scale_by_rms(decay=decay, eps=eps)``; False: its state updated, the
      gradient returned unchanged.
    decay: EMA decay of the squared gradient, in [0, 1) (``scale_by_rms``'s default 0.9).
    eps: ``scale_by_rms``'s eps (> 0).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from mlsys_jax.comm import density_warmup, topk
    >>> c = density_warmup(lambda r: topk(r, precondition=rms_selection(r < 0.5)), 0.25, steps=1,
    ...                    ratios=[0.5])
    >>> g = {'w': jnp.array([4.0, -3.0, 0.5, 0.25])}
    >>> s = c.init(g)
    >>> out, s = c.update(g, s)           # 50%, raw gradient: the two largest
    >>> out['w'].tolist()
    [4.0, -3.0, 0.0, 0.0]
    >>> out, s = c.update(g, s)           # 25%: g / sqrt(0.19 g^2) = +-2.294, plus the raw residual
    >>> [round(x, 3) for x in out['w'].tolist()]
    [0.0, 0.0, 2.794, 0.0]
  """
  if not isinstance(active, (bool, np.bool_)):
    raise TypeError(f"active must be a bool (e.g. r < 0.01 inside density_warmup's make_compressor), got "
                    f"{type(active).__name__}.")
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be a number in [0, 1), got {decay!r}.")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ValueError(f"eps must be a number > 0, got {eps!r}.")
  rms = optax.scale_by_rms(decay=decay, eps=eps)
  if active:
    return rms

  def update_fn(updates, state, params=None):
    return updates, rms.update(updates, state, params)[1]

  return optax.GradientTransformation(rms.init, update_fn)



class GradientUnitsState(NamedTuple):
  """State of :func:`gradient_units`.

  Attributes:
    step: steps taken (int32).
    inner_state: the wrapped compressor's state.
    scale: per leaf, the factor applied on the last step (float32 scalar; 1 before ``start``).
    bytes_sent: bytes this device passed to the collectives in the last step (the compressor's plus one
      float32 per leaf for the scale's mean over the workers, on every step: the mean also runs before
      ``start``).
    total_bytes: cumulative ``bytes_sent``.
  """
  step: jax.Array
  inner_state: Any
  scale: Any
  bytes_sent: jax.Array
  total_bytes: jax.Array


def _check_units_axis(compressor, axis_name, updates, inner_state, params) -> None:
  """ValueError when ``compressor.update`` communicates over axes and ``axis_name`` is not one of them: each
  replica would scale the shared aggregate by its own (or another axis' mean) factor, and the replicas drift
  apart. Traced abstractly at trace time (nothing runs)."""
  axes = _compressor_axes(compressor, updates, inner_state, params)
  if axes and axis_name not in axes:
    raise ValueError(f"gradient_units(axis_name={axis_name!r}) wraps a compressor that communicates over "
                     f"{sorted(axes)}: the per-leaf factor must be averaged over the same axis or the replicas "
                     f"drift apart; pass axis_name={sorted(axes)[0]!r} to gradient_units.")


def gradient_units(compressor: optax.GradientTransformation, start: int, *,
                   axis_name: str | None, freeze: bool = False) -> optax.GradientTransformation:
  """Deliver an RMS-selected compressor's releases in the gradient's units, one factor per leaf.

  Issue 18's 0.1% recipe (docs/comm.md) selects on the raw gradient in its first warm-up stage and on each
  worker's gradient over its own RMS (``rms_selection``) from step ``start`` on. What reaches Adam then
  jumps at ``start`` from gradient units to RMS units (values ``~ g / rms``, typically orders of magnitude
  larger), while Adam's second moment ``v`` (``b2 = 0.999``, a ~1000-step memory) still holds the
  gradient-unit history: for the next steps ``m / sqrt(v)`` is set by the new values alone, so every
  released coordinate, the noise-dominated ones too, moves by about ``lr`` per step in the sign of its
  last release instead of by ``~lr * mean / rms`` as under dense Adam. The accuracy of the compressed
  chains drops at that step (mnist1d curves, docs/comm.md).

  This wrapper multiplies each leaf ``l`` of the compressor's aggregated output, from step ``start`` on,
  by ``s_l = mean_w sqrt(mean_i nu_w[i])``: the root mean square, over the leaf, of each worker's EMA of
  its squared gradient (the ``nu`` of the compressor's ``precondition`` state, ``rms_selection`` or
  ``optax.scale_by_rms``), averaged over the workers with ``lax.pmean`` (one float32 per leaf and step,
  counted in ``bytes_sent``), so every replica applies the same factor. Within a leaf the selection and
  the error feedback are unchanged (they stay in RMS units); only the scale of the stream Adam sees
  stays that of the gradients, leaf by leaf::

      out_t[l] = compressor(g_t)[l] * (s_l(t) if t >= start else 1)

  Measured (session 13, ``experiments/compressed_adam.py --gradient_units=on``, mnist1d, 8 workers, Top-k
  at 0.1% after a 300-step warm-up, 600 steps; docs/comm.md, "Issue 18 at 0.1% on mnist1d"): the accuracy
  drop after the switch is gone (paired on seeds 0-4: +5 to +15 pt at steps 250-350) but the final
  accuracy is not higher (+0.30 [-0.84, +1.52] pt with DGC's warm-up from 25%, -0.58 with a warm-up from
  4%, -0.32 on the session-8 recipe); DGC's warm-up with it, chosen on seeds 0-4 (-0.60 pt vs Adam), gave
  -1.59 on seeds 5-14 (15 seeds -1.26 [-2.09, -0.58]; digits -0.15 [-0.28, -0.00], 15 seeds). On the
  session-8 recipe itself (``start=150``, 15 seeds, same bytes): digits -0.18 [-0.30, -0.06] pt vs Adam,
  +0.73 [+0.25, +1.32] over the recipe (its two failing seeds train), but mnist1d -0.79 [-1.55, -0.02]
  under the recipe: data-set dependent, an option, not part of the recipe.

  Args:
    compressor: a sparsifier of :mod:`mlsys_jax.comm` built with ``precondition=`` an RMS scaling whose
      state has ``nu`` (``rms_selection`` or ``optax.scale_by_rms``), or ``density_warmup`` of such
      sparsifiers (every stage must have that state, as ``density_warmup`` requires one layout).
    start: the first step (this wrapper's count from 0) whose releases are in RMS units; the recipe's:
      the end of its raw-selection stage (``stage_boundaries(steps, len(ratios))[0]``). 0: every step.
    axis_name: the workers' axis, the compressor's (required: a replica that skipped the mean would scale
      the shared update by its own factor and drift from the others); None only for one device. Checked
      when the update is traced: ``ValueError`` if the compressor communicates over axes other than it.
    freeze: False (default): ``s_l(t)`` of every step. True: ``s_l(start)`` on every step from ``start``
      on, a constant unit conversion at the switch (Adam then sees the RMS-selected stream with its own
      course over time, only rescaled once). Measured worse than False on the session-8 recipe (mnist1d,
      seeds 0-4: -0.90 [-2.28, -0.04] pt).

  Returns:
    An ``optax.GradientTransformation``; chain it where the compressor goes.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from mlsys_jax.comm import topk
    >>> tx = gradient_units(topk(0.5, precondition=optax.scale_by_rms(decay=0.0, eps=0.0)), 0, axis_name=None)
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> out, s = tx.update({'w': jnp.array([4.0, -2.0])}, s)   # g / |g| = [1, -1]: the first sent, x rms
    >>> [round(x, 4) for x in out['w'].tolist()], round(float(s.scale['w']), 4)
    ([3.1623, 0.0], 3.1623)
  """
  if not isinstance(compressor, optax.GradientTransformation):
    raise TypeError(f"compressor must be an optax.GradientTransformation (e.g. topk(0.001, axis_name='d', "
                    f"precondition=optax.scale_by_rms())), got {type(compressor).__name__}.")
  check_int("start", start, 0)
  start = int(start)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str or None, got {type(axis_name).__name__}.")
  if not isinstance(freeze, (bool, np.bool_)):
    raise TypeError(f"freeze must be a bool, got {type(freeze).__name__}.")

  def _nu(inner):
    pre = _state_field(inner, "precondition")
    nu = None if pre is None else _state_field(pre, "nu")
    if nu is None:
      raise TypeError("gradient_units: the compressor has no RMS precondition state (nu); build it with "
                      "precondition=rms_selection(...) or optax.scale_by_rms() (or density_warmup of such).")
    return nu

  def init_fn(params):
    check_floating("gradient_units.init", params)
    inner = _init_counted("gradient_units", compressor, params,
                          "wrap a sparsifier of mlsys_jax.comm (or density_warmup of one)")
    nu = _nu(inner)
    if jax.tree_util.tree_structure(nu) != jax.tree_util.tree_structure(params):
      raise TypeError("gradient_units: the precondition's nu does not have the parameters' tree structure.")
    f = jnp.zeros((), jnp.float32)
    ones = jax.tree_util.tree_map(lambda _: jnp.ones((), jnp.float32), params)
    return GradientUnitsState(jnp.zeros((), jnp.int32), inner, ones, f, f)

  def update_fn(updates, state, params=None):
    check_floating("gradient_units.update", updates)
    _check_units_axis(compressor, axis_name, updates, state.inner_state, params)
    b, inner = compressor.update(updates, state.inner_state, params)
    t = state.step
    rms = jax.tree_util.tree_map(lambda n: jnp.sqrt(jnp.mean(n.astype(jnp.float32))), _nu(inner))
    if axis_name is not None:
      rms = jax.lax.pmean(rms, axis_name)
    on = t >= start
    if freeze:   # the factor of step `start`, kept
      scale = jax.tree_util.tree_map(lambda r, old: jnp.where(t < start, 1.0, jnp.where(t == start, r, old)),
                                     rms, state.scale)
    else:
      scale = jax.tree_util.tree_map(lambda r: jnp.where(on, r, 1.0), rms)
    out = jax.tree_util.tree_map(lambda o, c: (o * c).astype(o.dtype), b, scale)
    n_leaves = len(jax.tree_util.tree_leaves(rms))
    # the mean over the workers runs on every step (before ``start`` too): its bytes count on every step
    extra = jnp.full((), 4.0 * n_leaves if axis_name is not None else 0.0, jnp.float32)
    sent = jnp.asarray(_state_field(inner, "bytes_sent"), jnp.float32) + extra
    return out, GradientUnitsState(t + 1, inner, scale, sent, state.total_bytes + sent)

  return optax.GradientTransformation(init_fn, update_fn)


class StalenessTopkState(NamedTuple):
  """State of :func:`staleness_topk`.

  Attributes:
    residual: error-feedback memory of this worker, same structure as the gradients.
    age: per parameter, steps since this worker last sent it (int32; 0 after a send, +1 per step
      otherwise, unchanged on a skipped non-finite step).
    step: steps taken (int32).
    density: achieved density of the last step (sent / total entries; 0 on a skipped step).
    bytes_sent: bytes this device passed to the collective in the last step (Top-k's payload).
    total_bytes: cumulative ``bytes_sent``.
    nonfinite_steps: steps skipped because some device's error-compensated gradient held NaN/inf.
  """
  residual: Any
  age: Any
  step: jax.Array
  density: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  nonfinite_steps: jax.Array


def staleness_scores(acc: jax.Array, age: jax.Array, tau: float) -> jax.Array:
  """Selection scores of :func:`staleness_topk`: ``|acc| * (1 + age / tau)`` (float32; ``|acc|`` itself
  when ``tau`` is infinite).

  Args:
    acc: error-compensated gradient entries (any shape, floating).
    age: steps since each entry was last sent (same shape, int or float).
    tau: the age (steps) at which an entry's score is doubled; > 0, ``math.inf`` for plain Top-k.

  Example:
    >>> import jax.numpy as jnp
    >>> staleness_scores(jnp.array([1.0, -0.5]), jnp.array([0, 4]), 2.0).tolist()
    [1.0, 1.5]
  """
  mag = jnp.abs(acc)
  if np.isinf(tau):
    return mag
  w = 1.0 + jnp.asarray(age).astype(jnp.float32) / jnp.float32(tau)
  return mag * w.astype(mag.dtype)


def staleness_topk(ratio: float, *, tau: float = 16.0, axis_name: str | None = None
                   ) -> optax.GradientTransformation:
  """Top-k with error feedback whose selection favours the entries that waited longest.

  Error-feedback Top-k (Aji and Heafield, EMNLP 2017; Stich et al., NeurIPS 2018, Alg. 1) sends each
  worker's ``k`` largest entries of ``acc = g + e``. Before Adam on mnist1d at 1% the 640x128 ``Dense_0``
  kernel (87% of the parameters) is then released only every ~28 steps, 13% of it never in 600 steps
  (docs/comm.md, "Issue 18 at 1% on mnist1d"). Here each worker keeps the age ``a_i`` of every entry (steps
  since *it* last sent entry ``i``) and selects on a score that grows with the age, while the value it
  sends is ``acc_i`` itself, so error feedback is unchanged (nothing is lost, the bytes are Top-k's)::

      acc   = g_t + e_t
      S     = the k indices of the largest  s_i = |acc_i| * (1 + a_i / tau)     (lax.top_k; ties: lower index)
      sent  = acc on S, 0 elsewhere;   e_{t+1} = acc - sent
      a_i  <- 0 for i in S,  a_i + 1 otherwise
      out   = mean over the workers of sent    (all-gather of the (index, value) payloads, identical everywhere)

  An entry of magnitude ``m`` waiting ``a`` steps competes as ``m (1 + a / tau)``: after ``tau`` steps its
  score is doubled. ``tau = math.inf`` is :func:`mlsys_jax.comm.topk` bitwise (same selection, payload
  order, residual and aggregate). ``k = max(1, round(ratio * n))`` over all leaves raveled into one vector
  (``topk``'s ``per_tensor=False``).

  Measured (session 16; docs/comm.md, "Issue 18 at 1% on mnist1d"; ``experiments/compressed_adam.py
  --compressors=stale@TAU``, 8 workers, 1%, 600 steps, before ``optax.adam(1e-3)``): it does what it is built
  for (seed 3: the ``Dense_0`` kernel released every 16.8 steps instead of 27.5, 1.8% never instead of 11.1%)
  but does not train better: tau 8 / 16 / 32 on seeds 0-4 -0.20 / -1.60 / -1.20 pt vs the plain chain, tau 8
  on the unseen seeds 5-14 -1.59 [-3.86, +0.33] pt, and -3.54 [-4.29, -2.82] pt when wrapped in
  ``spread_releases(mode='leaky', max_interval=16)`` against that option alone (the small leaves lose the
  frequent releases they need). Kept as the tested record of that screen, not a recipe.

  Non-finite values: when the error-compensated gradient holds NaN/inf on any device (one ``pmax`` over
  ``axis_name``), every replica skips the step: nothing is sent (output 0), residual and ages unchanged,
  ``nonfinite_steps`` incremented, as in ``topk``.

  Args:
    ratio: target density in (0, 1) (a Python number: the payload has ``k`` slots).
    tau: the age, in steps, that doubles an entry's score (> 0; ``math.inf``: plain Top-k).
    axis_name: the workers' axis of ``pmap``/``shard_map`` (or a named ``vmap``); None for one device.

  Returns:
    An ``optax.GradientTransformation`` with :class:`StalenessTopkState`; chain it before the optimizer,
    e.g. ``optax.chain(staleness_topk(0.01, tau=16, axis_name='d'), optax.adam(1e-3))``; it can be
    wrapped by :func:`spread_releases`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = staleness_topk(0.5, tau=1.0)          # one device; 1 of 2 entries per step
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> out, s = tx.update({'w': jnp.array([3.0, 1.0])}, s)      # scores 3, 1: the first is sent
    >>> out['w'].tolist(), s.age['w'].tolist()
    ([3.0, 0.0], [0, 1])
    >>> out, s = tx.update({'w': jnp.array([3.0, 1.0])}, s)      # scores 3, 2 * 2 = 4: the second (2.0)
    >>> out['w'].tolist(), s.residual['w'].tolist()
    ([0.0, 2.0], [3.0, 0.0])
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio must be a number in (0, 1) (the target density, e.g. 0.01), got {ratio!r}.")
  ratio = float(ratio)
  if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)) or not tau > 0:
    raise ValueError(f"tau must be a number > 0 (steps of waiting that double an entry's score; math.inf: "
                     f"plain Top-k), got {tau!r}.")
  tau = float(tau)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str or None, got {type(axis_name).__name__}.")

  def init_fn(params):
    check_floating("staleness_topk.init", params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    ages = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params)
    z, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return StalenessTopkState(zeros, ages, z, f, f, f, z)

  def update_fn(updates, state, params=None):
    del params
    check_floating("staleness_topk.update", updates)
    _sp._check_like("staleness_topk.update", updates, state.residual)
    _sp._check_axis(axis_name)
    addend = jax.tree_util.tree_map(lambda g, r: g.astype(r.dtype), updates, state.residual)
    flat, unravel = _sp._ravel_sum(addend, state.residual)      # topk's error-compensated vector, bitwise
    age_flat, unravel_age = jax.flatten_util.ravel_pytree(state.age)
    finite = _sp._global_finite([flat], axis_name)
    n = flat.shape[0]
    k = _sp._counts(n, ratio, None, 1.0)[0]
    vec = jnp.where(finite, flat, 0)                            # never select from (or send) NaN/inf
    _, idx = jax.lax.top_k(staleness_scores(vec, age_flat, tau), k)
    idx = idx.astype(jnp.int32)
    payload = _sp.SparsePayload(idx, vec[idx], jnp.where(finite, k, 0).astype(jnp.int32), jnp.asarray(False))
    sent = _sp.decompress(payload, n, flat.dtype)
    residual = flat - sent                                      # exact: sent entries equal flat there
    hit = jnp.zeros((n,), jnp.bool_).at[idx].set(True)
    new_age = jnp.where(hit, 0, age_flat + 1).astype(age_flat.dtype)
    out = _sp.allgather_mean(payload, n, axis_name, flat.dtype) if axis_name is not None else sent
    new_res = _sp._keep_on_skip(finite, unravel(residual), state.residual)
    age = _sp._keep_on_skip(finite, unravel_age(new_age), state.age)
    out = jax.tree_util.tree_map(lambda o, g: jnp.where(finite, o, 0).astype(g.dtype), unravel(out), updates)
    nb = jnp.where(finite, jnp.float32(_sp.payload_bytes(payload)), 0.0)
    return out, StalenessTopkState(new_res, age, state.step + 1, payload.count.astype(jnp.float32) / n, nb,
                                   state.total_bytes + nb, state.nonfinite_steps + (~finite).astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)
