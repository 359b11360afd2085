"""SIDCo's transform on a gradient tree with fewer passes over memory (issue 18: speed as a training step
uses it).

Abdelmoniem, Elzanaty, Alouini and Canini, "An Efficient Statistical-based Gradient Compression Technique for
Distributed Training Systems", MLSys 2021 (Sec. 3-4: the threshold from a fitted sparsity-inducing
distribution, multi-stage fitting). The selection is :func:`mlsys_jax.comm.sparse.sidco`'s (the same
statistics, fits, packing, correction stage and fallbacks, from :func:`~mlsys_jax.comm.sparse._sidco_segments`),
so the payload, the outputs and the state are bitwise those of ``sparse.sidco``; what differs is how the
tree's bytes move:

- the working buffer is written by one in-place update per leaf (``FLATTEN = 'dus'``: ``g + r`` goes
  straight from the leaves into its slice; XLA keeps each update in place) instead of one concatenation of
  161 leaves plus padding pieces (``'concat'``, the package's);
- the outputs of each leaf (residual, sent entries, momentum mask) are computed from the leaf's own
  ``gradient + residual`` (one read of the gradient and the residual, which the non-finite guard needs
  anyway) instead of from a slice of the working buffer plus a second read of the old residual.

Private: the lead integrates it into ``sparse.sidco`` (same signature; tests/test_sidco_tree.py checks the
two bitwise, flat and per tensor, with momentum, under shard_map/pmap).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_floating
from mlsys_jax.comm import sparse as _sp

FLATTEN = "dus"        # "dus" (one in-place update per leaf) or "concat" (the package's concatenation)


def _flatten(lay, leaves, dtype, how: str):
  if how == "concat" or len(leaves) == 1:
    return lay.flatten(leaves, dtype)
  flat = jnp.zeros((lay.n_pad,), dtype)
  for i, leaf in enumerate(leaves):
    flat = jax.lax.dynamic_update_slice(flat, leaf.reshape(-1).astype(dtype), (lay.offsets[i],))
  return flat


def sidco(ratio: float, **kw) -> optax.GradientTransformation:
  """:func:`mlsys_jax.comm.sparse.sidco` (same arguments, same results bitwise) with the tree's bytes moved
  in fewer passes (see the module docstring).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = sidco(0.1)
    >>> g = {"w": jnp.arange(40.0) - 20.0}
    >>> out, st = tx.update(g, tx.init(g))
    >>> int(jnp.sum(out["w"] != 0))
    4
  """
  ref = _sp.sidco(ratio, **kw)    # argument checks, and the select function (its closure)
  return _tree_sparsifier(ref.init, _closure(ref.update))


def _closure(fn) -> dict:
  """The names a transform's ``update_fn`` (and the functions it calls from the same closure) captured."""
  cells, todo = {}, [fn]
  while todo:
    f = todo.pop()
    for name, cell in zip(f.__code__.co_freevars, f.__closure__ or ()):
      if name not in cells:
        cells[name] = cell.cell_contents
        if callable(cells[name]) and hasattr(cells[name], "__code__") and name.startswith("_"):
          todo.append(cells[name])
  return cells


def _tree_sparsifier(init_fn, c) -> optax.GradientTransformation:
  select, ratio, max_ratio = c["segmented"], c["ratio"], c["max_ratio"]
  capacity_factor, per_tensor, axis_name = c["capacity_factor"], c["per_tensor"], c["axis_name"]
  momentum, precondition, adapt = c["momentum"], c["precondition"], c["adapt"]

  def update_fn(updates, state, params=None):
    check_floating("sparsifier.update", updates)
    _sp._check_like("sparsifier.update", updates, state.residual)
    _sp._check_axis(axis_name)
    grads = updates
    pre_state = state.precondition
    if precondition is not None:
      updates, pre_state = precondition.update(updates, state.precondition, params)
    if momentum > 0:
      vel = jax.tree_util.tree_map(lambda g, u: momentum * u + g.astype(u.dtype), updates, state.velocity)
      acc = jax.tree_util.tree_map(jnp.add, vel, state.residual)
    else:
      acc = jax.tree_util.tree_map(lambda g, r: g.astype(r.dtype) + r, updates, state.residual)
    key, _ = jax.random.split(state.key)
    leaves, treedef = jax.tree_util.tree_flatten(acc)
    old_res = treedef.flatten_up_to(state.residual)
    sizes = [int(np.prod(l.shape)) for l in leaves]
    r_cap = ratio if max_ratio is None else max_ratio
    lay = _sp._Layout(sizes, _sp._segments(sizes, per_tensor, r_cap, select.min_group_count))
    dtype = jnp.result_type(*leaves)
    flat = _flatten(lay, leaves, dtype, FLATTEN)
    counts = [_sp._counts(int(n), ratio, max_ratio, capacity_factor) for n in lay.seg_n]
    cap = int(sum(cc[2] for cc in counts))
    if isinstance(counts[0][0], int):
      k = jnp.asarray([cc[0] for cc in counts], jnp.int32)
    else:
      k = jnp.stack([cc[0] for cc in counts])
    k_max = np.asarray([cc[1] for cc in counts])
    payload, n_above, t, finite, tie_last = select(flat, lay, k, k_max, cap, state.stages, ratio)
    if axis_name is not None:   # one decision on every replica
      finite = jax.lax.pmax(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
    count = jnp.where(finite, payload.count, 0)
    payload = payload._replace(count=count)
    last = jnp.where(count > 0, payload.indices[jnp.maximum(count - 1, 0)], -1)
    dense = None
    if axis_name is not None:
      dense = _sp.allgather_mean(payload, lay.n_pad, axis_name, dtype)
    g_leaves = treedef.flatten_up_to(grads)
    outs, residuals, hits = [], [], []
    for i, leaf in enumerate(leaves):
      off, n = lay.offsets[i], sizes[i]
      v = leaf.reshape(-1).astype(dtype)
      pos = off + jnp.arange(n, dtype=jnp.int32)
      av, ts = jnp.abs(v.astype(jnp.float32)), t[lay.seg_of_leaf[i]]
      above_t = av > ts
      if tie_last is not None:   # exact counts: magnitudes tied at the cut up to the segment's last kept one
        above_t = above_t | ((av == ts) & (pos <= tie_last[lay.seg_of_leaf[i]]))
      sel = above_t & (pos <= last)
      res = jnp.where(sel, 0, v).astype(leaf.dtype).reshape(leaf.shape)
      residuals.append(jnp.where(finite, res, old_res[i]))
      if dense is None:
        o = jnp.where(sel, v, 0).astype(leaf.dtype).reshape(leaf.shape)
      else:
        o = jax.lax.slice(dense, (off,), (off + n,)).reshape(leaf.shape)
      outs.append(jnp.where(finite, o, 0).astype(g_leaves[i].dtype))
      hits.append(sel.reshape(leaf.shape))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    new_res, out = unflat(residuals), unflat(outs)
    velocity = state.velocity
    if momentum > 0:
      velocity = jax.tree_util.tree_map(lambda u, h, old: jnp.where(finite, jnp.where(h, 0, u), old),
                                        vel, unflat(hits), state.velocity)
    if precondition is not None:
      pre_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), pre_state,
                                         state.precondition)
    total = lay.n_real
    stages, ratio_sum = state.stages, state.ratio_sum
    if adapt is not None:
      hi, every, tol = adapt
      rsum = ratio_sum + jnp.asarray(n_above, jnp.float32) / (total * ratio)
      due = (state.step + 1) % every == 0
      est = rsum / every
      moved = jnp.clip(stages - (est > 1 + tol).astype(jnp.int32) + (est < 1 - tol).astype(jnp.int32), 1, hi)
      stages = jnp.where(finite & due, moved, stages)
      ratio_sum = jnp.where(finite, jnp.where(due, 0.0, rsum), ratio_sum)
    nb = jnp.where(finite, jnp.float32(_sp.payload_bytes(payload)), 0.0)
    overflow = payload.overflow
    new_state = _sp.SparsifierState(
        new_res, key, stages, ratio_sum, state.step + 1, count.astype(jnp.float32) / total, nb,
        state.total_bytes + nb, state.overflow_steps + (overflow & finite).astype(jnp.int32),
        state.nonfinite_steps + (~finite).astype(jnp.int32), velocity, pre_state)
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


del math
