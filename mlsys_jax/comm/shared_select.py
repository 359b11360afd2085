"""Shared index selection for sparse gradient compression: ScaleCom's cyclic local Top-k (CLT-k).

Chen, Ni, Li, Wang, Zhang, Ho, Sun, Nandakumar, Venkataramani, Gopalakrishnan, Srinivasan, Agrawal,
"ScaleCom: Scalable Sparsified Gradient Compression for Communication-Efficient Distributed Training",
NeurIPS 2020, Sec. 3 (cyclic local top-k).

With error-feedback Top-k every worker sends its *own* top entries, so the workers' index sets differ and
the mean at a coordinate averages one worker's accumulated value with zeros from the others (and the
all-gather grows with the number of workers). In CLT-k one worker, the leader, chooses the indices for
everyone: at step ``t`` worker ``l_t = t mod n`` selects the top-k of its own error-compensated buffer,
broadcasts the ``k`` indices, and every worker contributes its own buffer's values at those indices to one
all-reduce of ``k`` numbers; the mean at each selected coordinate is then the exact mean over all workers,
and each worker's error feedback keeps everything it did not send.

Equations (``n`` workers, worker ``w``, local transform ``P``, e.g. the RMS selection of issue 18's recipe)::

    acc_w = P(g_w) + e_w                                   (error-compensated buffer)
    l_t   = t mod n                                        (cyclic leader)
    S_t   = the k indices of the largest |acc_{l_t}|      (lax.top_k on the leader; ties: lower index)
    out   = (1/n) sum_w acc_w * 1[S_t]                     (one all-reduce of k values; same on every worker)
    e_w  <- acc_w * (1 - 1[S_t])                           (exact: sent + residual == acc_w)

ScaleCom also low-pass filters the local memory (its ``beta``, Sec. 3): ``e_w <- (1 - beta) e_w + beta (acc_w -
sent_w)``; ``beta = 1`` (the default) is plain error feedback, ``beta < 1`` keeps part of the old memory on the
sent coordinates and takes only part of each new gradient (it smooths the memories, which makes the workers' buffers
more alike; no longer mass-exact). ``axis_name=None`` is one worker, the leader on every step: the update is
:func:`mlsys_jax.comm.topk`'s (same selection, values and residual).

:func:`union_topk` is the same exact-mean exchange on the union of every worker's own Top-k set (Top-k's
coverage, two rounds: the indices, then the values on the union), the diagnostic that separates the exact
mean from the leader's set (docs/comm.md, issue 18, session 18).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from mlsys_jax._checks import check_floating
from mlsys_jax.comm import sparse as _sp
from mlsys_jax.comm.lowrank import _pmean   # (a mean over the workers; 16-bit as sums of x / n)

__all__ = ["LeaderTopkState", "leader_topk", "union_topk"]


class LeaderTopkState(NamedTuple):
  """State of :func:`leader_topk`.

  Attributes:
    residual: this worker's error-feedback memory, same structure as the gradients.
    step: steps taken (int32; the leader of step ``t`` is ``t mod n``, skipped steps count).
    leader: the leader of the last step (int32; -1 before the first step, and always with :func:`union_topk`).
    density: released density of the last step (k, or ``|U|`` with :func:`union_topk`, over the entries;
      0 on a skipped step).
    bytes_sent: bytes this worker passed to the collectives in the last step: its ``k`` values for the
      all-reduce, plus the ``k`` int32 indices when it was the leader (the broadcast); with :func:`union_topk`
      its ``k`` indices plus its values on the union; 0 on a skipped step.
    total_bytes: cumulative ``bytes_sent``.
    nonfinite_steps: steps skipped because some worker's error-compensated gradient held NaN/inf, or because the
      mean would have (a value beyond the gradients' dtype, e.g. float16 gradients over a float32 residual).
    precondition: state of the local ``precondition`` transform, or ``()`` without one.
  """
  residual: Any
  step: jax.Array
  leader: jax.Array
  density: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  nonfinite_steps: jax.Array
  precondition: Any = ()


def leader_topk(ratio: float, *, axis_name: str | None = None,
                precondition: optax.GradientTransformation | None = None, beta: float = 1.0
                ) -> optax.GradientTransformation:
  """Cyclic local Top-k (ScaleCom, Chen et al., NeurIPS 2020, Sec. 3): the workers send their values at the
  indices one rotating leader selected, with error feedback.

  See the module docstring for the equations. ``k = max(1, round(ratio * n_entries))`` over all leaves
  raveled into one vector (as ``topk(per_tensor=False)``). Under ``pmap``/``shard_map`` (or a ``vmap`` with
  ``axis_name``, e.g. ``models.make_simulated_data_parallel_step``) the leader's indices reach every worker
  through one ``psum`` of the leader's index vector (the others contribute zeros), and the values through one
  ``psum`` of ``k`` numbers; every worker returns the same mean.

  Bytes (``bytes_sent``): ``k`` values (``k * itemsize``) per worker and step, plus ``4 k`` for the leader's
  indices on the leader (so ``(1 + 1/n)`` values' worth per worker on average, about 0.56 of Top-k's
  ``(index, value)`` payload with 8 workers). With ``axis_name=None`` the one worker is always the leader.

  Non-finite values: when the error-compensated gradient holds NaN/inf on any worker (one ``pmax`` over
  ``axis_name``), every replica skips the step: nothing is sent (output 0, ``bytes_sent`` 0), residuals and
  the ``precondition`` states stay as they were, ``nonfinite_steps`` grows; the step counter (and so the
  leader rotation) moves on, identically on every replica. A step whose mean of finite buffers is inf in the
  gradients' dtype (float16 gradients over a float32 residual) is skipped the same way. 16-bit means are sums of
  ``x / n`` (float16 workers' entries of 10^4 would overflow a sum; float32 means are bitwise as before).

  Measured (session 18, issue 18; ``experiments/compressed_adam.py --compressors=leader``, mnist1d, 8 workers x
  batch 32, 600 steps, before ``optax.adam(1e-3)``, seeds 0-4): far below Top-k's sparse mean. At 1% -20.68 pt
  vs Adam (Top-k -0.26); at Top-k's released count (5.8% per step, 3.3x its bytes) still -7.28 pt vs Top-k; with
  ``beta=0.1`` -6.08 pt vs Adam (the best of beta 1, 0.5, 0.1, 0.03, 0.01); in the 0.1% recipe -22.00 pt
  (``beta=0.5``: -16.16). Not a recipe for small per-worker batches, where the workers' buffers differ.

  Args:
    ratio: target density in (0, 1) (a Python number: the payload has ``k`` static slots).
    axis_name: the workers' mapped axis (``pmap``/``shard_map``/named ``vmap``); None for one worker.
    precondition: a local optax transform applied to this worker's gradient before error feedback (e.g.
      ``comm.rms_selection(...)``, issue 18's Adam-aware selection); the leader selects on, and every worker
      sends, the preconditioned buffer. Its state is per worker and unchanged on skipped steps.
    beta: ScaleCom's low-pass filter of the memory, in (0, 1]: ``e_w <- (1 - beta) e_w + beta (acc_w - sent_w)``
      (1: plain error feedback, exact ``sent + residual == acc``).

  Returns:
    An ``optax.GradientTransformation`` with :class:`LeaderTopkState`; chain it before the optimizer, e.g.
    ``optax.chain(leader_topk(0.01, axis_name='d'), optax.adam(1e-3))``; it composes with
    ``density_warmup`` (one state layout at every density).

  Raises:
    ValueError: ``ratio`` not a number in (0, 1), ``beta`` not in (0, 1]; at update, gradients shaped unlike the
      parameters.
    TypeError: ``precondition`` not a GradientTransformation, ``axis_name`` not a str, non-float gradients.
    NameError: ``axis_name`` set but not bound by pmap/shard_map/vmap at update.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = leader_topk(0.5)                      # one worker: Top-k with error feedback, 1 of 2 entries
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> out, s = tx.update({'w': jnp.array([3.0, 1.0])}, s)
    >>> out['w'].tolist(), s.residual['w'].tolist(), float(s.bytes_sent)
    ([3.0, 0.0], [0.0, 1.0], 8.0)
    >>> out, s = tx.update({'w': jnp.array([0.5, 1.0])}, s)      # acc = [0.5, 2.0]
    >>> out['w'].tolist(), s.residual['w'].tolist()
    ([0.0, 2.0], [0.5, 0.0])
  """
  return _shared_topk("leader_topk", ratio, axis_name, precondition, union=False, beta=beta)


def union_topk(ratio: float, *, axis_name: str | None = None,
               precondition: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
  """Exact means on the union of the workers' own Top-k sets, with error feedback (a diagnostic of
  :func:`leader_topk`: Top-k's coverage, the shared selection's exact mean).

  Error-feedback Top-k (Aji and Heafield, EMNLP 2017) averages each worker's sent entries with zeros where
  the other workers did not select the coordinate; ScaleCom's CLT-k (Chen et al., NeurIPS 2020, Sec. 3)
  makes the mean exact by sharing one worker's index set, but releases only that worker's ``k`` coordinates.
  Here every worker selects its own Top-k, the index sets are exchanged (an all-gather of ``k`` int32 per
  worker), and every worker then sends its buffer's values on the union ``U`` (an all-reduce of ``|U|``
  values)::

      acc_w = P(g_w) + e_w
      S_w   = the k indices of the largest |acc_w|      (lax.top_k; ties: lower index)
      U     = S_1 | ... | S_n
      out   = (1/n) sum_w acc_w * 1[U]                  (the same on every worker)
      e_w  <- acc_w * (1 - 1[U])                        (exact: sent + residual == acc_w)

  Bytes per worker and step: ``4 k`` (its indices) + ``|U| * itemsize`` (its values on the union; ``|U|``
  between ``k`` and ``n k``). In this static-shape implementation the union is a dense mask and the values'
  all-reduce is a dense ``psum`` of the masked buffer (the same mean as the sparse exchange; only the bytes of
  the sparse exchange are counted). ``axis_name=None``: ``topk``'s update and residual bitwise. Non-finite
  values, ``precondition`` and the state as in :func:`leader_topk` (``leader`` stays -1).

  Measured (session 18, as :func:`leader_topk`'s note): the exact mean at Top-k's coverage loses to Top-k's sparse
  mean, -4.82 pt at 1% (14.7 MB vs 4.5 MB per worker) and -12.10 pt in the 0.1% recipe, mnist1d seeds 0-4.

  Args:
    ratio: each worker's own density in (0, 1) (``k = max(1, round(ratio * n_entries))``).
    axis_name: the workers' mapped axis (``pmap``/``shard_map``/named ``vmap``); None for one worker.
    precondition: a local optax transform applied before error feedback (e.g. ``comm.rms_selection(...)``).

  Returns:
    An ``optax.GradientTransformation`` with :class:`LeaderTopkState`.

  Raises:
    ValueError, TypeError, NameError: as :func:`leader_topk`.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = union_topk(0.5)                       # one worker: Top-k with error feedback
    >>> s = tx.init({'w': jnp.zeros(2)})
    >>> out, s = tx.update({'w': jnp.array([1.0, 3.0])}, s)
    >>> out['w'].tolist(), float(s.bytes_sent)
    ([0.0, 3.0], 8.0)
  """
  return _shared_topk("union_topk", ratio, axis_name, precondition, union=True)


def _shared_topk(name: str, ratio, axis_name, precondition, union: bool, beta: float = 1.0
                 ) -> optax.GradientTransformation:
  """:func:`leader_topk` (``union=False``) and :func:`union_topk` (``union=True``): checks, state, update."""
  if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating)) or not 0.0 < beta <= 1.0:
    raise ValueError(f"beta must be a number in (0, 1] (ScaleCom's memory low-pass filter; 1 = plain error "
                     f"feedback), got {beta!r}.")
  beta = float(beta)
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio must be a number in (0, 1) (the target density, e.g. 0.01), got {ratio!r}.")
  ratio = float(ratio)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str or None, got {type(axis_name).__name__}.")
  _sp._check_precondition(name, precondition)

  def init_fn(params):
    check_floating(f"{name}.init", params)
    if sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params)) == 0:
      raise ValueError(f"{name}.init needs at least one parameter entry; every leaf of the tree is empty "
                       f"(it selects k >= 1 of the entries).")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    z, f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return LeaderTopkState(zeros, z, jnp.full((), -1, jnp.int32), f, f, f, z,
                           precondition.init(params) if precondition is not None else ())

  def update_fn(updates, state, params=None):
    check_floating(f"{name}.update", updates)
    _sp._check_like(f"{name}.update", updates, state.residual)
    _sp._check_axis(axis_name)
    grads = updates
    updates, pre_state = _sp._apply_precondition(precondition, updates, state.precondition, params)
    addend = jax.tree_util.tree_map(lambda g, r: g.astype(r.dtype), updates, state.residual)
    flat, unravel = _sp._ravel_sum(addend, state.residual)      # acc_w, topk's vector bitwise
    finite = _sp._global_finite([flat], axis_name)
    n = flat.shape[0]
    k = _sp._counts(n, ratio, None, 1.0)[0]
    vec = jnp.where(finite, flat, 0)                            # never select from (or send) NaN/inf
    _, own = jax.lax.top_k(jnp.abs(vec), k)                     # every worker's own top-k (static shapes)
    own = own.astype(jnp.int32)
    if union:
      leader = jnp.full((), -1, jnp.int32)
      if axis_name is None:
        residual, out_flat = flat.at[own].set(0), jnp.zeros((n,), flat.dtype).at[own].set(vec[own])
        n_union = jnp.int32(k)
      else:
        hit = jax.lax.psum(jnp.zeros((n,), jnp.int32).at[own].set(1), axis_name) > 0   # U, from the indices
        out_flat = _pmean(jnp.where(hit, vec, 0), axis_name).astype(flat.dtype)   # (16-bit: sums of x / n)
        residual = jnp.where(hit, 0, flat)
        n_union = jnp.sum(hit, dtype=jnp.int32)
      nb = jnp.float32(4 * k) + n_union.astype(jnp.float32) * flat.dtype.itemsize
    elif axis_name is None:
      leader = jnp.zeros((), jnp.int32)
      is_leader = jnp.asarray(True)
      idx, mean = own, vec[own]
    else:
      workers = jax.lax.psum(1, axis_name)
      leader = (state.step % workers).astype(jnp.int32)
      is_leader = jax.lax.axis_index(axis_name) == leader
      idx = jax.lax.psum(jnp.where(is_leader, own, 0), axis_name)   # the leader's indices, on every worker
      mean = _pmean(vec[idx], axis_name)                            # exact mean of the workers' values
    if not union:
      out_flat = jnp.zeros((n,), flat.dtype).at[idx].set(mean.astype(flat.dtype))
      residual = flat.at[idx].set(0)                                # exact: flat - (flat on S)
      nb = jnp.float32(k * flat.dtype.itemsize) + jnp.where(is_leader, jnp.float32(4 * k), 0.0)
    if beta != 1.0:   # ScaleCom's low-pass filter: (1 - beta) e + beta (acc - sent)
      old = ravel_pytree(state.residual)[0].astype(flat.dtype)
      residual = ((1.0 - beta) * old + beta * residual).astype(flat.dtype)
    out = jax.tree_util.tree_map(lambda o, g: o.astype(g.dtype), unravel(out_flat), grads)
    # a mean of finite buffers beyond the gradients' dtype (float16 gradients over a float32 residual) would be
    # sent as inf: such a step is skipped like a non-finite one (the mean is the collective's result, the same on
    # every replica, and so is this decision); one mask for both
    finite = finite & _sp._global_finite(jax.tree_util.tree_leaves(out), None)
    out = jax.tree_util.tree_map(lambda o: jnp.where(finite, o, jnp.zeros((), o.dtype)), out)
    new_res = _sp._keep_on_skip(finite, unravel(residual), state.residual)
    pre_state = _sp._keep_on_skip(finite, pre_state, state.precondition)
    nb = jnp.where(finite, nb, 0.0)
    released = n_union.astype(jnp.float32) if union else jnp.float32(k)
    density = jnp.where(finite, released / n, 0.0)
    return out, LeaderTopkState(new_res, state.step + 1, leader, density, nb, state.total_bytes + nb,
                                state.nonfinite_steps + (~finite).astype(jnp.int32), pre_state)

  return optax.GradientTransformation(init_fn, update_fn)
