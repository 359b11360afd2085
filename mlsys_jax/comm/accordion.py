"""ACCORDION: adaptive gradient compression driven by critical-regime detection, as optax transforms.

Agarwal, Wang, Lee, Venkataraman and Papailiopoulos, "Adaptive Gradient Communication via Critical
Learning Regime Identification", MLSys 2021 (Algorithm 1; official code uw-mad-dash/Accordion,
``auto_scale.py`` and ``main.py``). Training has short critical regimes (the start, and after a
learning-rate decay) in which gradient errors hurt the final accuracy; elsewhere heavy compression is
harmless. Per layer, ACCORDION accumulates the gradient over a window, and every ``interval`` steps
compares the norm of that accumulation with the previous window's:

    critical  <=>  |norm_prev - norm_now| / norm_prev >= eta        (eta = 0.5 in the paper's code)

(also critical when norm_prev == 0 and at the first decision, which has no previous window). A
critical layer uses the *low-compression* level of the underlying compressor until the next decision,
the others the *high-compression* level. Second rule: when the learning rate decays (``lr_schedule``
drops), every layer switches to low compression until the next decision. Training starts in the
critical regime (low compression).

The reference's levels: PowerSGD rank 2 vs rank 1 (ResNet-18) and rank 4 vs rank 1 (VGG-19bn, SENet);
Top-k keeping 99% vs 10% of each layer; detection every 10 epochs (5 for the LSTM) on the gradient
accumulated over the epoch that ends there. Here ``interval`` (steps between decisions) and
``accumulate`` (the last steps of each interval that are accumulated; default the whole interval)
express this: e.g. ``interval=10 * steps_per_epoch, accumulate=steps_per_epoch`` is the reference.

Static shapes: each compressed layer holds the state of the low-compression level (PowerSGD's warm
start Q with the larger rank; Top-k's residual), and ``lax.cond`` on the layer's flag runs one of two
compiled branches, each with its own collective sizes (P/Q of rank r, or a Top-k payload of k
slots), so ``bytes_sent`` counts what the chosen level sends. The detector's norms are averaged over
devices (one ``pmean`` of L floats, only at decision steps, counted in ``bytes_sent``) so that every
device takes the same decision; the reference decides on rank 0's local norms and broadcasts them.
On a GPU each of those ``lax.cond``s hands its flag to the host every step: in an f32 batch-64 ResNet-50
training step on an H100, ``accordion('powersgd', 4, 1)`` cost +5.2-5.5 ms over Adam alone, 1.7-2.1 ms of it
device idle, against +1.83 ms for ``powersgd(4)`` (session 24, ``benchmarks/results/
sidco_model_step_h100_s24_est2.json`` and ``_cmdbuf.json``; XLA's conditional command buffers did not remove the
idle). Computing both levels every step would send both levels' messages, so the conditionals stay by
default; ``regime=`` compiles static levels instead (one compiled step per regime, see :func:`accordion_regime`).

Uncompressed leaves (rank <= 1 or fewer than ``min_size`` entries) are all-reduced dense as in
PowerSGD; their flag is still reported.

Non-finite gradients: as :func:`mlsys_jax.comm.powersgd`: when any device sees NaN/inf, or the mean message
is non-finite (16-bit overflow), the step sends nothing, returns zeros, leaves residuals/Q/detector
accumulation unchanged and increments ``state.nonfinite_steps``. The detector accumulates in float32 at least
(``state.accum``), whatever the gradients' dtype; 16-bit Top-k payloads are all-gathered in their dtype and
summed in float32.

Batch-size variant (the paper's Sec. 5): :func:`accordion_batch_size` is a pure state machine from
the whole-model accumulated gradient norm to a batch size (small in critical regimes, large
otherwise), for a training loop outside jit.

Example:
  >>> lr = optax.piecewise_constant_schedule(0.1, {3000: 0.1})
  >>> tx = optax.chain(accordion('powersgd', low=4, high=1, interval=200, lr_schedule=lr),
  ...                  optax.sgd(lr, momentum=0.9))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_choice, check_floating, check_int, check_range
from mlsys_jax.comm import sparse as _sp
from mlsys_jax.comm.lowrank import (_global_finite, _initial_q, _keep_warm, _no_q, _pmean, matrix_shape,
                                    powersgd_layout, powersgd_step)
from mlsys_jax.comm.sparse import _apply_precondition, _check_precondition, _keep_on_skip

__all__ = [
    "AccordionState",
    "BatchSizeSchedule",
    "BatchSizeState",
    "COMPRESSORS",
    "accordion",
    "accordion_batch_size",
    "accordion_regime",
    "accordion_report",
    "critical_regime",
]

COMPRESSORS = ("powersgd", "topk")
_DEFAULT_LEVELS = {"powersgd": (2, 1), "topk": (0.99, 0.1)}   # the reference code's pairs


def critical_regime(prev_norm: Any, norm: Any, eta: float, has_prev: Any = True) -> jax.Array:
  """ACCORDION's detector rule, elementwise: ``|prev - now| / prev >= eta``.

  Also True where ``prev_norm == 0`` (the reference gives it a ratio of 9), where there is no
  previous window (``has_prev`` False), and where either norm is NaN/inf (no signal: the layer keeps the
  low-compression level rather than being compressed harder). Works on scalars or arrays of per-layer norms.
  ``eta`` (a Python number) must lie in (0, 1).

  >>> critical_regime(jnp.array([10., 10.]), jnp.array([4., 8.]), 0.5)
  Array([ True, False], dtype=bool)
  """
  if isinstance(eta, (int, float)):
    check_range("eta", eta, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  prev = jnp.asarray(prev_norm, jnp.float32)
  now = jnp.asarray(norm, jnp.float32)
  ratio = jnp.abs(prev - now) / jnp.where(prev == 0, 1.0, prev)
  bad = ~jnp.isfinite(prev) | ~jnp.isfinite(now)
  return (ratio >= eta) | (prev == 0) | bad | jnp.logical_not(jnp.asarray(has_prev))


class AccordionState(NamedTuple):
  """State of :func:`accordion`.

  Attributes:
    residual: error-feedback memory per leaf.
    q: PowerSGD warm starts per leaf, (m, low-compression rank), or None (dense leaves, Top-k; a (0, 0) array in
      states before session 45, still accepted).
    accum: gradient accumulated in the current detection window, per leaf (float32 for 16-bit leaves).
    prev_norm: (L,) float32 norms of the previous window's accumulation, per leaf (flatten order).
    has_prev: bool, whether ``prev_norm`` holds a window yet.
    critical: (L,) bool, True where the leaf uses the low-compression level now.
    step: steps taken (int32), skipped ones included.
    bytes_sent: bytes this device passed to collectives in the last step (float32).
    total_bytes: cumulative ``bytes_sent``.
    nonfinite_steps: steps skipped because some device saw NaN/inf.
    decisions: detector decisions taken so far (int32).
    off_regime_steps: steps run by an ``accordion(..., regime=...)`` transform whose static levels differ from
      ``critical`` at that step on a leaf whose two levels differ (0 when the caller dispatches by
      :func:`accordion_regime`; a count above 0 says a compiled step was used after the detector changed a
      layer's level).
    levels_differ: (L,) bool, True where the leaf's two levels send something different (False for dense
      leaves and where both levels clamp to the same rank or count): only these flags select a compiled step.
    precondition: state of the local ``precondition`` transform, or ``()`` without one.
  """
  residual: Any
  q: tuple
  accum: Any
  prev_norm: jax.Array
  has_prev: jax.Array
  critical: jax.Array
  step: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  nonfinite_steps: jax.Array
  decisions: jax.Array
  off_regime_steps: jax.Array
  levels_differ: jax.Array
  precondition: Any = ()


def _topk_k(density: float, n: int) -> int:
  return min(n, max(1, int(round(density * n))))


def accordion(compressor: str = "powersgd", low: float | None = None, high: float | None = None, *,
              eta: float = 0.5, interval: int = 100, accumulate: int | None = None,
              lr_schedule: Callable[[Any], Any] | None = None, min_size: int = 0,
              clamp_rank: bool = False, seed: int = 0, axis_name: str | None = None,
              regime: Sequence[bool] | None = None,
              precondition: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """ACCORDION per-layer switching between two compression levels (Agarwal et al., MLSys 2021).

  Args:
    compressor: ``'powersgd'`` (levels are ranks) or ``'topk'`` (levels are per-layer densities,
      the fraction of entries kept).
    low: the low-compression level used in critical regimes (PowerSGD rank, e.g. 2 or 4; Top-k
      density, e.g. 0.99). Default: the reference code's (2 for PowerSGD, 0.99 for Top-k).
    high: the high-compression level used otherwise (rank 1; density 0.1 by default). Must compress
      more than ``low`` (smaller rank / density).
    eta: detector threshold in (0, 1) on the relative change of the accumulated-gradient norm.
    interval: steps between detector decisions (>= 1); the reference decides every 10 epochs.
    accumulate: steps at the end of each interval whose gradients are accumulated for the norm
      (1..interval, default interval); the reference accumulates the last epoch.
    lr_schedule: optional optax-style schedule (step -> learning rate). When it drops between step t
      and t+1, all layers switch to low compression from step t+1 until the next decision. Meant for step
      decays (``optax.piecewise_constant_schedule``, the paper's): a smooth schedule (cosine, exponential)
      drops on every step, which keeps every layer at low compression all the time; leave it None there (the
      detector still sees the change in the gradients).
    min_size: leaves with fewer entries (and all of rank <= 1) are sent dense.
    clamp_rank: PowerSGD only: use min(n, m, rank) for small matrices instead of raising.
    seed: seed of PowerSGD's initial Q (identical on every device).
    axis_name: mapped axis of the data-parallel workers (pmap/shard_map); None for one device.
    regime: None (default): each layer's level follows ``state.critical`` through a ``lax.cond``. A sequence
      of one bool per leaf (flatten order; True = low compression): the levels are static, no conditional
      is compiled (on a GPU each ``lax.cond`` returns its flag to the host every step), the detector still
      runs (its norms every step, kept at decision steps: its ``pmean`` of L floats is then sent and counted
      every step), and ``off_regime_steps`` counts the steps where ``state.critical`` differs from
      ``regime``. Compile one step per regime and pick it with :func:`accordion_regime` (the flags change
      only at decision steps and learning-rate drops). The same updates and state as ``regime=None``
      while they agree (``bytes_sent`` aside): bitwise at the test suite's XLA optimisation level; at the
      default level PowerSGD leaves differ by float rounding (fusions differ once the conditional is gone;
      ~1e-6 relative after a few steps, ~1e-4 after 11 in the review's check), Top-k leaves stay bitwise.
    precondition: a local optax transform applied to this worker's gradient before error feedback (e.g.
      ``optax.scale_by_adam()`` with ``optax.sgd(lr)`` after, or :func:`~mlsys_jax.comm.rms_selection`
      before ``optax.adam``): what is compressed and sent is its output; the detector still accumulates the
      raw gradient, the signal the paper's detector reads. Its state is kept per worker in
      ``state.precondition`` and left unchanged on skipped (non-finite) steps (a NaN in the raw gradient or in
      the transform's output skips the step).

  Returns:
    ``optax.GradientTransformation`` with an :class:`AccordionState`.

  Example:
    >>> tx = optax.chain(accordion('topk', low=0.1, high=0.01, interval=50), optax.sgd(0.1))
  """
  check_choice("compressor", compressor, COMPRESSORS)
  lo_c, hi_c = _DEFAULT_LEVELS[compressor]
  lo_c = lo_c if low is None else low
  hi_c = hi_c if high is None else high
  if compressor == "powersgd":
    check_int("low (PowerSGD rank in critical regimes)", lo_c, 1)
    check_int("high (PowerSGD rank outside critical regimes)", hi_c, 1)
    if hi_c >= lo_c:
      raise ValueError(f"accordion: high compression must use a smaller rank than low compression, "
                       f"got low={lo_c}, high={hi_c} (e.g. low=4, high=1).")
  else:
    check_range("low (Top-k density in critical regimes)", lo_c, 0.0, 1.0, low_inclusive=False)
    check_range("high (Top-k density outside critical regimes)", hi_c, 0.0, 1.0, low_inclusive=False)
    if hi_c >= lo_c:
      raise ValueError(f"accordion: high compression must keep a smaller density than low "
                       f"compression, got low={lo_c}, high={hi_c} (e.g. low=0.1, high=0.01).")
  check_range("eta", eta, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_int("interval", interval, 1)
  accumulate = interval if accumulate is None else accumulate
  check_int("accumulate", accumulate, 1, interval)
  check_int("min_size", min_size, 0)
  _check_precondition("accordion", precondition)
  if lr_schedule is not None and not callable(lr_schedule):
    raise TypeError(f"lr_schedule must be a callable step -> learning rate (an optax schedule), "
                    f"got {type(lr_schedule).__name__}.")

  if regime is not None:
    if isinstance(regime, (str, bytes)) or not hasattr(regime, "__len__"):
      raise TypeError(f"accordion: regime must be None or a sequence of one bool per leaf (e.g. "
                      f"accordion_regime(state)), got {type(regime).__name__}.")
    regime = tuple(regime)
    for i, r in enumerate(regime):
      if not isinstance(r, (bool, np.bool_)):
        raise TypeError(f"accordion: regime[{i}] is {r!r} ({type(r).__name__}); use True (low compression) or "
                        f"False (high compression) per leaf, e.g. accordion_regime(state).")
    regime = tuple(bool(r) for r in regime)

  def _check_regime(n_leaves):
    if regime is not None and len(regime) != n_leaves:
      raise ValueError(f"accordion: regime has {len(regime)} flags but the gradient tree has {n_leaves} leaves; "
                       f"give one per leaf in flatten order (accordion_regime(state) returns them).")

  def _layout(params):
    """Per leaf: (kind, low-level parameter, high-level parameter); kind 'dense' or compressor."""
    leaves = jax.tree_util.tree_leaves(params)
    if compressor == "powersgd":
      lo_r = powersgd_layout(params, lo_c, min_size=min_size, clamp_rank=clamp_rank)
      hi_r = powersgd_layout(params, hi_c, min_size=min_size, clamp_rank=True)
      return [("dense", 0, 0) if a == 0 else ("powersgd", a, min(b, a)) for a, b in zip(lo_r, hi_r)]
    out = []
    for leaf in leaves:
      size = int(np.prod(np.shape(leaf)))
      if np.ndim(leaf) < 2 or size < max(min_size, 1):   # (a size-0 leaf has no entry to select)
        out.append(("dense", 0, 0))
      else:
        out.append(("topk", _topk_k(lo_c, size), _topk_k(hi_c, size)))
    return out

  def init_fn(params):
    check_floating("accordion.init", params)
    leaves = jax.tree_util.tree_leaves(params)
    layout = _layout(params)
    qs = _initial_q(leaves, [lo if kind == "powersgd" else 0 for kind, lo, _ in layout], seed)
    n_leaves = len(leaves)
    _check_regime(n_leaves)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    # the detector's window sum in float32 at least (in bfloat16 a sum of 1.0s stops at 256)
    accum = jax.tree_util.tree_map(
        lambda x: jnp.zeros(np.shape(x), jnp.promote_types(jnp.result_type(x), jnp.float32)), params)
    zi, zf = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    differ = jnp.asarray([kind != "dense" and lo != hi for kind, lo, hi in layout], bool)
    return AccordionState(zeros, qs, accum, jnp.zeros((n_leaves,), jnp.float32),
                          jnp.asarray(False), jnp.ones((n_leaves,), bool), zi, zf, zf, zi, zi, zi, differ,
                          precondition.init(params) if precondition is not None else ())

  def _at_level(critical, at_low, at_high, operand):
    """``at_low(operand)`` where ``critical`` else ``at_high(operand)``: a Python choice for a static regime,
    else ``lax.cond``."""
    if isinstance(critical, bool):
      return (at_low if critical else at_high)(operand)
    return jax.lax.cond(critical, at_low, at_high, operand)

  def _compress_leaf(kind, lo, hi, acc, q, critical):
    """(out, new_residual, new_q, bytes) of one leaf at the level chosen by ``critical`` (a traced flag, or a
    Python bool with a static regime)."""
    item = jnp.dtype(acc.dtype).itemsize
    if kind == "dense":
      out = _pmean(acc, axis_name) if axis_name is not None else acc
      return out, jnp.zeros_like(acc), q, jnp.float32(acc.size * item)
    if kind == "powersgd":
      mat = acc.reshape(matrix_shape(acc.shape))
      n, m = mat.shape

      def branch(r):
        def f(operands):
          mat, q = operands
          whole = r == q.shape[1]   # (the whole warm start: no update of a full-width slice, a scatter with an
          # empty index array on which jax 0.11.2's Shardy partitioner crashes the compiler, session 45)
          q_r = q if whole else q[:, :r]
          approx, _, qn = powersgd_step(mat, q_r, axis_name)
          warm = _keep_warm(qn, q_r)
          q_full = warm if whole else q.at[:, :r].set(warm)
          return approx, q_full, jnp.float32((n + m) * r * item)
        return f

      approx, q_new, nb = _at_level(critical, branch(lo), branch(hi), (mat, q))
      out = approx.reshape(acc.shape)
      return out, acc - out, q_new, nb
    vec = acc.reshape(-1)
    size = vec.shape[0]

    def branch_k(k):
      def f(vec):
        payload = _sp.topk_payload(vec, k)
        sent = _sp.decompress(payload, size, vec.dtype)
        # (16-bit payloads: allgather_mean sums them in float32)
        out = _sp.allgather_mean(payload, size, axis_name) if axis_name is not None else sent
        return out, vec - sent, jnp.float32(_sp.payload_bytes(payload))
      return f

    out, res, nb = _at_level(critical, branch_k(lo), branch_k(hi), vec)
    return out.reshape(acc.shape), res.reshape(acc.shape), q, nb

  def update_fn(updates, state, params=None):
    check_floating("accordion.update", updates)
    _sp._check_like("accordion.update", updates, state.residual)
    _sp._check_axis(axis_name)
    raw = jax.tree_util.tree_leaves(updates)   # (the detector's signal, and the outputs' dtypes)
    updates, pre_state = _apply_precondition(precondition, updates, state.precondition, params)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    _check_regime(len(leaves))
    layout = _layout(updates)
    res_leaves = treedef.flatten_up_to(state.residual)
    acc_leaves = treedef.flatten_up_to(state.accum)
    finite = _global_finite(leaves if precondition is None else leaves + raw, axis_name)
    t = state.step
    outs, new_res, new_q, new_accum, nbytes = [], [], [], [], jnp.float32(0.0)
    in_window = (t % interval) >= (interval - accumulate)
    for i, (g, res, q, (kind, lo, hi)) in enumerate(zip(leaves, res_leaves, state.q, layout)):
      acc = jnp.where(finite, g.astype(res.dtype) + res, 0)
      out, r_new, q_new, nb = _compress_leaf(kind, lo, hi, acc, q,
                                             state.critical[i] if regime is None else regime[i])
      outs.append(out)
      new_res.append(r_new)
      new_q.append(q_new)
      nbytes = nbytes + nb
    # a non-finite mean message with finite gradients (16-bit overflow) is the same on every replica: the step
    # is skipped as for a NaN gradient, so no residual turns NaN
    finite = finite & _global_finite(outs, None)   # (the means: the same on every replica)
    outs = [jnp.where(finite, o, 0).astype(g_raw.dtype) for o, g_raw in zip(outs, raw)]
    new_res = [jnp.where(finite, r, res) for r, res in zip(new_res, res_leaves)]
    new_q = [qn if _no_q(q) else jnp.where(finite, qn, q) for qn, q in zip(new_q, state.q)]
    new_accum = [jnp.where(finite & in_window, acc_w + g_raw.astype(acc_w.dtype), acc_w)
                 for acc_w, g_raw in zip(acc_leaves, raw)]
    nbytes = jnp.where(finite, nbytes, 0.0)

    # Detector: decide at the end of every interval.
    decide = (t + 1) % interval == 0
    n_leaves = len(leaves)

    def do_decide(accs):
      norms = jnp.stack([jnp.linalg.norm(a.astype(jnp.float32)) for a in accs])
      if axis_name is not None:
        norms = jax.lax.pmean(norms, axis_name)
      return norms

    if regime is None:
      norms = jax.lax.cond(decide, do_decide, lambda accs: state.prev_norm, new_accum)  # old if no decision
    else:   # no conditional: the norms every step, kept at decision steps
      norms = jnp.where(decide, do_decide(new_accum), state.prev_norm)
    critical = jnp.where(decide, critical_regime(state.prev_norm, norms, eta, state.has_prev),
                         state.critical)
    has_prev = state.has_prev | decide
    new_accum = [jnp.where(decide, jnp.zeros_like(a), a) for a in new_accum]
    if axis_name is not None:   # (with a static regime the norms' pmean runs, and is sent, every step)
      nbytes = nbytes + (jnp.where(decide, jnp.float32(4 * n_leaves), 0.0) if regime is None
                         else jnp.float32(4 * n_leaves))
    off_regime = 0   # this step ran static levels that differ from the detector's on a leaf where they matter
    if regime is not None:
      off_regime = jnp.any(state.levels_differ & (state.critical != jnp.asarray(regime, bool))).astype(jnp.int32)
    if lr_schedule is not None:
      decayed = jnp.asarray(lr_schedule(t + 1)) < jnp.asarray(lr_schedule(t))
      critical = critical | decayed
    new_state = AccordionState(
        jax.tree_util.tree_unflatten(treedef, new_res), tuple(new_q),
        jax.tree_util.tree_unflatten(treedef, new_accum), norms, has_prev, critical, t + 1,
        nbytes, state.total_bytes + nbytes, state.nonfinite_steps + (~finite).astype(jnp.int32),
        state.decisions + decide.astype(jnp.int32), state.off_regime_steps + off_regime, state.levels_differ,
        _keep_on_skip(finite, pre_state, state.precondition))
    return jax.tree_util.tree_unflatten(treedef, outs), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def accordion_regime(state: AccordionState) -> tuple[bool, ...]:
  """The per-layer levels ``state.critical`` as a hashable tuple of Python bools (True = low compression), the
  static ``regime=`` of the :func:`accordion` step to run next. Leaves whose two levels send the same thing
  (dense leaves, clamped ranks) read True whatever their flag, so they never split regimes. Reads the device
  value (a host sync; once per step is enough, or once after each decision step). Accepts a state with a
  leading worker axis (worker 0; every worker holds the same flags).

  Example:
    >>> params = {'w': jnp.zeros((8, 4))}
    >>> make = lambda reg: accordion('powersgd', low=2, high=1, interval=2, regime=reg)
    >>> state = make(None).init(params)
    >>> steps = {}
    >>> for t in range(4):
    ...   reg = accordion_regime(state)
    ...   if reg not in steps:
    ...     steps[reg] = jax.jit(make(reg).update)
    ...   _, state = steps[reg]({'w': jnp.ones((8, 4))}, state)   # equal windows: the level drops
    >>> int(state.off_regime_steps), accordion_regime(state)
    (0, (False,))
  """
  crit = np.asarray(state.critical)
  crit = crit.reshape(-1, crit.shape[-1])[0]
  differ = np.asarray(state.levels_differ).reshape(-1, crit.shape[-1])[0]
  return tuple(bool(c) or not bool(d) for c, d in zip(crit, differ))


def accordion_report(state: AccordionState, params: Any | None = None) -> dict:
  """A plain-Python summary of a run: steps, total bytes, decisions, skipped steps and the current
  per-layer regime (with the leaf paths when ``params`` is given). Accepts a state with a leading
  worker axis (it reads worker 0)."""
  def first(x):   # worker 0's value of a scalar field
    return np.asarray(x).reshape(-1)[0]

  crit = np.asarray(state.critical)
  crit = crit.reshape(-1, crit.shape[-1])[0]
  names = ([jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
           if params is not None else [str(i) for i in range(len(crit))])
  steps, tot = int(first(state.step)), float(first(state.total_bytes))
  return {"steps": steps, "total_bytes": tot, "bytes_per_step": tot / max(steps, 1),
          "decisions": int(first(state.decisions)), "nonfinite_steps": int(first(state.nonfinite_steps)),
          "off_regime_steps": int(first(state.off_regime_steps)),
          "critical": {n: bool(c) for n, c in zip(names, crit)}}


# ----------------------------------------------------------------------------------------------------
# Batch-size variant.


class BatchSizeState(NamedTuple):
  """State of :func:`accordion_batch_size`: previous window norm, whether one exists, the regime and
  the batch size to use for the next window."""
  prev_norm: float
  has_prev: bool
  critical: bool
  batch_size: int


class BatchSizeSchedule(NamedTuple):
  """``init() -> BatchSizeState`` and ``update(state, norm, lr_decayed=False) -> BatchSizeState``."""
  init: Callable[[], BatchSizeState]
  update: Callable[..., BatchSizeState]


def accordion_batch_size(small: int, large: int, *, eta: float = 0.5) -> BatchSizeSchedule:
  """ACCORDION's batch-size switching (Agarwal et al., MLSys 2021, Sec. 5) as a pure state machine.

  Call ``update`` once per detection window with the norm of the whole-model gradient accumulated
  over that window (a float, or a pytree of accumulated gradients whose global norm is taken). A
  critical window (the detector rule of :func:`critical_regime`; also the first one, and any window
  in which the learning rate decayed) selects ``small``; otherwise ``large``. Training starts
  critical (``small``). Scaling the learning rate with the batch size is left to the caller.

  Example:
    >>> sched = accordion_batch_size(64, 512)
    >>> st = sched.init()
    >>> st = sched.update(st, 10.0); st = sched.update(st, 9.0)   # |10 - 9| / 10 < 0.5
    >>> st.batch_size
    512
  """
  check_int("small", small, 1)
  check_int("large", large, 1)
  if large <= small:
    raise ValueError(f"accordion_batch_size needs large > small, got small={small}, large={large}.")
  check_range("eta", eta, 0.0, 1.0, low_inclusive=False, high_inclusive=False)

  def init() -> BatchSizeState:
    return BatchSizeState(0.0, False, True, small)

  def update(state: BatchSizeState, norm: Any, lr_decayed: bool = False) -> BatchSizeState:
    if not isinstance(norm, (int, float, np.floating, np.integer)) and not (
        hasattr(norm, "shape") and np.ndim(norm) == 0):
      norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                               for x in jax.tree_util.tree_leaves(norm))))
    norm = float(norm)
    if not math.isfinite(norm) or norm < 0:
      raise ValueError(f"accordion_batch_size: the accumulated gradient norm must be finite and "
                       f">= 0, got {norm}; skip windows with NaN/inf gradients.")
    crit = bool(critical_regime(state.prev_norm, norm, eta, state.has_prev)) or bool(lr_decayed)
    return BatchSizeState(norm, True, crit, small if crit else large)

  return BatchSizeSchedule(init, update)
