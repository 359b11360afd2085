"""SIDCo's transform on a gradient tree with fewer passes over memory (issue 18: speed as a training step
uses it).

Abdelmoniem, Elzanaty, Alouini and Canini, "An Efficient Statistical-based Gradient Compression Technique for
Distributed Training Systems", MLSys 2021 (Sec. 3-4: the threshold from a fitted sparsity-inducing
distribution, multi-stage fitting). The selection is :func:`mlsys_jax.comm.sparse.sidco`'s (the same
statistics, fits, packing, correction stage and fallbacks, from :func:`~mlsys_jax.comm.sparse._sidco_segments`),
so the payload, the outputs and the state are bitwise those of ``sparse.sidco``; what differs is the work
done on a GPU for the default ``exact=True``:

- the correction stage to exactly ``k`` per segment (:func:`_trim_radix`) orders the payload's slots by
  stable key-value sorts on int32 keys (the magnitudes' float bits; radix sorts on a GPU) instead of one
  three-key comparison sort, and finds the segments' slot ranges by comparisons with the segment starts
  instead of a sort and a scatter;
- the exact-count fallback (a step where the fit selected fewer than ``k`` or more than the payload holds)
  finds the thresholds by a 32-way multisection over the float bits (:func:`_seg_exact_multi`: 7 passes over
  the buffer) instead of a 31-pass bisection; the thresholds are the same bit for bit;
- each leaf's outputs (residual, sent entries, momentum mask) come from the leaf's own ``gradient +
  residual`` (the non-finite guard reads the old residual anyway) rather than a slice of the working buffer;
- ``FLATTEN`` picks how the working buffer is written: ``'concat'`` (the package's one concatenation),
  ``'chunks'`` (concatenations of at most ``CHUNK`` leaves, each able to fuse its leaves' ``g + r``, then
  one of those) or ``'dus'`` (one in-place update per leaf).

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

FLATTEN = "concat"     # "concat" (the package's concatenation) or "dus" (one in-place update per leaf)
TRIM = "radix"         # "radix" (the correction stage by key-value sorts) or "package" (sparse._seg_trim)
SECTIONS = 32          # candidate thresholds per pass of the exact-count search (1: the package's bisection)


def _search_passes(sections: int) -> int:
  """Passes of :func:`_seg_exact_multi` that narrow a range of 2^31 float bit patterns to one."""
  w, p = 1 << 31, 0
  while w > 1:
    w, p = -(-w // (sections + 1)), p + 1
  return p


def _seg_exact_multi(a_tiles, bmax, lay, k, sections: int = SECTIONS):
  """:func:`mlsys_jax.comm.sparse._seg_exact` (the same thresholds bitwise: per segment the largest float
  bit pattern ``t`` in ``[0, max)`` whose count ``#(|x| > t)`` reaches ``k``, 0 if none) by a multisection:
  each pass counts, per segment, the entries above ``sections`` candidate thresholds spread evenly over the
  remaining bit range (one read of the buffer, ``sections`` comparisons per entry), so 7 passes (32
  sections) replace the bisection's 31."""
  nt = lay.num_tiles
  top = jax.lax.bitcast_convert_type(
      lay.seg_reduce(jnp.max(bmax.reshape(nt, _sp._THR_BLOCKS), axis=1), "max"), jnp.int32)
  lo, hi = jnp.zeros_like(top), top
  j = jnp.arange(1, sections + 1, dtype=jnp.int32)[None, :]
  m1 = sections + 1
  for _ in range(_search_passes(sections)):
    w = hi - lo
    c = lo[:, None] + (w // m1)[:, None] * j + ((w % m1)[:, None] * j) // m1      # (segments, sections)
    cf = jax.lax.bitcast_convert_type(c, jnp.float32)
    ct = cf[jnp.asarray(lay.tile_seg)] if lay.num_segments > 1 else jnp.broadcast_to(cf, (nt, sections))
    cnt = lay.seg_reduce(jnp.sum(a_tiles[:, :, None] > ct[:, None, :], axis=1, dtype=jnp.int32), "sum")
    ok = cnt >= k[:, None]
    lo = jnp.maximum(lo, jnp.max(jnp.where(ok, c, lo[:, None]), axis=1))
    hi = jnp.minimum(hi, jnp.min(jnp.where(ok, hi[:, None], c), axis=1))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _slot_segments(payload, lay):
  """Segment of every payload slot (``num_segments`` past ``count``) and the valid slots per segment, from the
  payload's ascending indices (segments are index ranges): searches over the segment starts, no sort."""
  cap = payload.indices.shape[0]
  valid = jnp.arange(cap) < payload.count
  if lay.num_segments == 1:
    return jnp.where(valid, 0, 1).astype(jnp.int32), payload.count.reshape(1).astype(jnp.int32)
  starts = jnp.asarray(lay.seg_start, jnp.int32)
  seg = (jnp.searchsorted(starts, payload.indices, side="right", method="compare_all") - 1).astype(jnp.int32)
  seg = jnp.where(valid, seg, lay.num_segments)
  key = jnp.where(valid, payload.indices, jnp.iinfo(jnp.int32).max)     # ascending
  first = jnp.searchsorted(key, starts, side="left", method="compare_all").astype(jnp.int32)
  counts = jnp.diff(jnp.concatenate([first, payload.count.reshape(1).astype(jnp.int32)]))
  return seg, counts


def _trim_radix(payload, t, lay, k, capacity: int):
  """:func:`mlsys_jax.comm.sparse._seg_trim` (the same result bitwise) with the order (segment, magnitude
  descending, slot) from stable key-value sorts on int32 keys (radix sorts on GPU) instead of one
  three-key comparison sort, segment counts from searches instead of a sort and a scatter, and the repack
  by a prefix sum and a unique-index scatter."""
  seg, counts = _slot_segments(payload, lay)
  cap = payload.indices.shape[0]
  a = jnp.abs(payload.values).astype(jnp.float32)
  slot = jnp.arange(cap, dtype=jnp.int32)
  # |v| >= 0, so its float32 bits order as the magnitudes do; descending = ascending in -bits (a NaN
  # orders first here and last in the package: only on non-finite steps, whose payload is not sent)
  neg = -jax.lax.bitcast_convert_type(a, jnp.int32)
  _, perm = jax.lax.sort((neg, slot), num_keys=1, is_stable=True)
  if lay.num_segments > 1:
    _, perm = jax.lax.sort((seg[perm], perm), num_keys=1, is_stable=True)
  first = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)[:-1].astype(jnp.int32)])
  kth = perm[jnp.clip(first + k - 1, 0, cap - 1)]          # slot of the k-th largest of the segment
  trim = counts > k
  t = jnp.where(trim, a[kth], t)
  tie_last = jnp.where(trim, payload.indices[kth], -1)
  t_slot = jnp.concatenate([t, jnp.full((1,), jnp.inf, jnp.float32)])[seg]
  tie_slot = jnp.concatenate([tie_last, jnp.full((1,), -1, jnp.int32)])[seg]
  keep = (a > t_slot) | ((a == t_slot) & (payload.indices <= tie_slot))
  dst = jnp.cumsum(keep, dtype=jnp.int32) - 1
  n_keep = jnp.sum(keep, dtype=jnp.int32)
  dst = jnp.where(keep & (dst < capacity), dst, capacity)
  idx = jnp.zeros((capacity,), jnp.int32).at[dst].set(payload.indices, mode="drop", unique_indices=True)
  vals = jnp.zeros((capacity,), payload.values.dtype).at[dst].set(payload.values, mode="drop",
                                                                   unique_indices=True)
  return (_sp.SparsePayload(idx, vals, jnp.minimum(n_keep, capacity).astype(jnp.int32), payload.overflow),
          t, tie_last)


def _segments_exact(flat, lay, ratio, capacity, distribution, stages, first_ratio, k, send_capacity, packing):
  """:func:`mlsys_jax.comm.sparse._sidco_segments` with ``exact=(k, send_capacity)`` (same result), its
  correction stage by :func:`_trim_radix`."""
  use_pallas, interpret = _sp._pallas_mode(packing)
  nt = lay.num_tiles
  if use_pallas and _sp._PALLAS_STATS == "pallas":
    s1t, s2t, bmax = _sp._pallas_pack.tile_stats(flat, interpret=interpret, tile_blocks=_sp._THR_BLOCKS)
  else:
    bsum, bsq, bmax = _sp._block_stats(jnp.abs(flat))
    s1t, s2t = bsum.reshape(nt, _sp._THR_BLOCKS).sum(1), bsq.reshape(nt, _sp._THR_BLOCKS).sum(1)
  finite = jnp.isfinite(jnp.sum(s1t))
  a_tiles = jnp.abs(flat).astype(jnp.float32).reshape(nt, _sp._TILE)
  t = _sp._seg_threshold(a_tiles, lay, lay.seg_reduce(s1t, "sum"), lay.seg_reduce(s2t, "sum"), ratio,
                         distribution, stages, first_ratio, True)
  t = jnp.maximum(t, 0.0)

  def pack(t):
    if use_pallas:
      return _sp._pack_pallas(flat, lay.per_tile(t), capacity, bmax, interpret)
    return _sp._pack_xla(flat, lay.per_tile(t), capacity, bmax)

  payload, n_above = pack(t)
  _, counts = _slot_segments(payload, lay)

  def bisect(_):
    t2 = _sp._seg_exact(a_tiles, bmax, lay, k) if SECTIONS <= 1 else _seg_exact_multi(a_tiles, bmax, lay, k)
    p2, _ = pack(t2)
    return p2, t2

  missed = (payload.overflow | jnp.any(counts < k)) & finite
  payload, t = jax.lax.cond(missed, bisect, lambda _: (payload, t), None)
  payload, t, tie_last = _trim_radix(payload, t, lay, k, send_capacity)
  return payload, n_above, t, finite, tie_last


CHUNK = 40             # pieces per concatenation with FLATTEN = "chunks"


def _flatten(lay, leaves, dtype, how: str):
  if how == "concat" or len(leaves) == 1:
    return lay.flatten(leaves, dtype)
  if how == "chunks":   # concatenations of <= CHUNK pieces (each can fuse its leaves' g + r), then one of those
    pieces = []
    for g, group in enumerate(lay.groups):
      n_g = 0
      for i in group:
        pieces.append(leaves[i].reshape(-1).astype(dtype))
        n_g += lay.sizes[i]
      pad = int(lay.seg_tile_ok[g].sum()) * _sp._TILE - n_g
      if pad:
        pieces.append(jnp.zeros((pad,), dtype))
    parts = [jnp.concatenate(pieces[i:i + CHUNK]) for i in range(0, len(pieces), CHUNK)]
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]
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
  sel_cells = _closure(select)
  if sel_cells.get("exact") and TRIM == "radix":
    pkg_select = select
    overshoot, distribution, first_ratio = sel_cells["overshoot"], sel_cells["distribution"], sel_cells["first_ratio"]
    n_stages = sel_cells["stages"]

    def select(flat, lay, k, k_max, cap, _stages, r):   # the package's exact path, its trim by sorts on keys
      if _sp._is_static(r):
        r_fit = min(r * overshoot, 0.999)
      else:
        r_fit = jnp.minimum(jnp.asarray(r, jnp.float32) * overshoot, 0.999)
      return _segments_exact(flat, lay, r_fit, cap, distribution, n_stages, first_ratio,
                             jnp.asarray(k, jnp.int32), int(np.sum(k_max)), _sp._TRANSFORM_PACKING)
    select.min_group_count = pkg_select.min_group_count
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
