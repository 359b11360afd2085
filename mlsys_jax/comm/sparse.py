"""Gradient sparsification with error feedback: Top-k, DGC, Random-k and SIDCo, as optax transforms.

SIDCo: Abdelmoniem, Elzanaty, Alouini and Canini, "An Efficient Statistical-based Gradient Compression
Technique for Distributed Training Systems", MLSys 2021. Instead of sorting (Top-k) or sampling (DGC), SIDCo
models the magnitudes of the error-compensated gradient with a sparsity-inducing distribution and
computes the threshold that keeps a fraction delta of the elements in closed form (Sec. 3-4):

- exponential: eta = mean(|g|) * ln(1 / delta);
- generalized Pareto (method of moments on y = |g| - min): k = (mu^2 / s^2 - 1) / 2,
  a = mu (mu^2 / s^2 + 1) / 2, eta = min + a (1 - delta^k) / k;
- gamma (method of moments: shape mu^2 / s^2, scale s^2 / mu): eta = Q^{-1}(shape, delta) * scale, the
  inverse regularized upper incomplete gamma (solved here by bisection in log space).

Multi-stage fitting: the first stage keeps ``first_ratio`` of the elements, each later stage refits the
same family to the exceedances of the previous threshold (shifted by their minimum) and keeps
``(delta / first_ratio)^(1 / (stages - 1))`` of them. With ``stages='adaptive'`` the number of stages moves
by one every ``adapt_every`` steps when the achieved density strays from the target by more than
``tolerance`` (the paper's adaptation), between 1 and ceil(log2(1 / delta)).

Exact counts (``sidco(exact=True)``, the transform's default) send Top-k's set of every threshold
segment in ``k`` slots, and no estimator runs: each segment's ``k``-th largest magnitude is found by a
block select (sorts of the 64-entry block maxima from the statistics pass, of 8-entry sub-block maxima
and of the candidate entries; no counting pass over the gradient), the segment is packed above the
float just below it, and only magnitudes tied at the cut are trimmed back to ``k`` (prefix counts over
the payload's slots: no sort, no conditional). Running the fit first cannot change that payload and cost time (docs/comm.md,
"sidco(exact=True) finds Top-k's set without the fit"). SIDCo's estimator is ``exact=False``: the
closed-form thresholds above decide the count, with the floor and ceiling below:

Floor (``sidco(min_fraction=0.25)``): error-compensated vectors drift away from the fitted family, and
a fit can land above every entry (the exponential fit on a Gaussian-like vector sends nothing at all);
the transform lowers such a threshold to select at least ``min_fraction`` of the target count.

Static shapes: what is sent is a :class:`SparsePayload` of fixed ``capacity`` (target count times
``capacity_factor``): indices, values, a count and an overflow flag. Elements above the threshold that do
not fit, and everything below it, stay in the error-feedback residual, so no gradient mass is lost:
``dense(payload) + residual == gradient + previous residual`` exactly.

Passes (:func:`sidco_compress`): one variadic reduction over |g| gives per-block (64 entries) sums, sums of
squares and maxima; the sums give the first-stage fit, each later stage costs one pass over the
exceedances, and the block maxima tell :func:`compact_above` which blocks can hold a selected entry, so
packing gathers only those (at most ``capacity`` blocks) instead of a second pass over the gradient.
Compaction uses block counts, a prefix sum and a search per output slot (no sort, no scatter over all
elements). On GPU (``packing='auto'``) the statistics pass and the packing are Pallas Triton kernels
(:mod:`mlsys_jax.comm._pallas_pack`): list the candidate blocks, count the selected entries per group of
candidate blocks, write them at in-kernel offsets; same payload, deterministic. On an H100 this selects and
packs 25M float32 at ratio 0.001 in 0.086 ms (1.9x the copy-bandwidth floor, 12x faster than
``lax.top_k``; the XLA path: 0.156 ms). The gamma quantile is loop-free (closed-form start, Newton steps on a fixed-term incomplete
gamma), so no estimator runs device-side loops unless the stage count is traced (adaptive).

Collectives: with ``axis_name`` the transforms run inside ``pmap``/``shard_map``; every device all-gathers
the static payloads, scatter-adds them and averages, so the update that comes out is the decompressed
global gradient and the state counts the bytes each device sent.

Non-finite values: a step whose error-compensated gradient (gradient plus residual, i.e. also a float16
overflow of that sum) holds NaN/inf on ANY device sends nothing, leaves residual and velocity as they were,
and increments ``state.nonfinite_steps`` on every device: the decision is agreed through one ``pmax`` of a
flag over ``axis_name``, as PowerSGD/ACCORDION do, so the replicas never drift apart.

Trees (:func:`sidco`): all leaves go through one flat buffer (each threshold segment zero-padded to
whole 4096-entry tiles), one statistics pass, per-segment thresholds (a segment is the whole tree, or a
leaf with ``per_tensor=True``, small leaves pooled), one packing and one payload shared by the segments;
a floor (``min_fraction``) and, on steps where the fit overshoots the payload, a ceiling
(``max_fraction``) per segment keep the selected count in a band around the target.

Density schedules: ``ratio`` may be traced (``optax.inject_hyperparams``) when a static ``max_ratio`` sets
the payload capacity; every other hyperparameter is static (``None`` defaults keep them out of
``inject_hyperparams``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from mlsys_jax._checks import check_choice, check_floating, check_int, check_range, check_rank, is_concrete
from mlsys_jax.comm import _pallas_pack

__all__ = [
    "DISTRIBUTIONS",
    "ParamLayout",
    "SparsePayload",
    "SparsifierState",
    "allgather_mean",
    "compact",
    "compact_above",
    "decompress",
    "dgc",
    "dgc_sample_size",
    "dgc_threshold",
    "max_stages",
    "payload_bytes",
    "randomk",
    "sidco",
    "sidco_compress",
    "sidco_threshold",
    "topk",
    "topk_payload",
]

DISTRIBUTIONS = ("exponential", "gpareto", "gamma")


class SparsePayload(NamedTuple):
  """A static-shape sparse vector: ``indices[:count]`` and ``values[:count]`` are valid.

  Slots past ``count`` hold index 0 and value 0 (they add nothing when scattered). ``overflow`` says that
  more elements were selected than ``capacity``; the extra ones were not sent.
  """
  indices: jax.Array   # int32 (capacity,)
  values: jax.Array    # (capacity,)
  count: jax.Array     # int32 ()
  overflow: jax.Array  # bool ()


def payload_bytes(p: SparsePayload) -> int:
  """Bytes a collective moves for one payload (static: every slot travels) plus the count."""
  return int(p.indices.size * p.indices.dtype.itemsize + p.values.size * p.values.dtype.itemsize + 4)


_BLOCK = 64
_SEARCH_METHOD = "scan_unrolled"   # jnp.searchsorted method for the slot -> block search


def _check_nonempty(where: str, name: str, x) -> None:
  """Raise ``ValueError`` if the 1-D ``x`` has no entry (no threshold or payload exists for it)."""
  if np.shape(x)[0] == 0:
    raise ValueError(f"{where} needs at least one entry in {name}, got an empty vector; skip empty tensors.")


def compact(x: jax.Array, mask: jax.Array, capacity: int) -> SparsePayload:
  """Pack the elements of a 1-D ``x`` where ``mask`` is true into a :class:`SparsePayload`.

  The first ``capacity`` selected elements in index order are kept (``overflow`` if there were more).
  No sort and no scatter over all n elements: the mask is counted in blocks of 64, an inclusive prefix
  sum over the block counts is searched for every output slot ``j`` (the block holding the ``j``-th
  selected element), and only those blocks are read again to find the element's position inside its
  block. The work beyond one pass over the mask is O(n / 64 + capacity * 64).

  Raises ``ValueError`` unless ``x`` is 1-D with at least one entry, ``mask`` has the same shape and
  ``capacity >= 1``.
  """
  check_rank("x", x, 1)
  x = jnp.asarray(x)
  _check_nonempty("compact", "x", x)
  if np.shape(mask) != np.shape(x):
    raise ValueError(f"compact needs a mask of the same shape as x, got x {np.shape(x)} and mask "
                     f"{np.shape(mask)}; pass one boolean per entry of x.")
  if jnp.result_type(mask) != jnp.bool_:
    raise TypeError(f"compact needs a boolean mask, got dtype {jnp.result_type(mask)}; e.g. jnp.abs(x) > t.")
  check_int("capacity", capacity, 1)
  n = x.shape[0]
  nb = -(-n // _BLOCK)
  pad = nb * _BLOCK - n
  mb = jnp.pad(mask, (0, pad)).reshape(nb, _BLOCK)
  counts = jnp.sum(mb, axis=1, dtype=jnp.int32)
  incl = jnp.cumsum(counts)
  total = incl[-1]
  j = jnp.arange(capacity, dtype=jnp.int32)
  blk = jnp.minimum(jnp.searchsorted(incl, j, side="right", method=_SEARCH_METHOD), nb - 1).astype(jnp.int32)
  rank = j - (incl[blk] - counts[blk])                      # rank of slot j inside its block
  sel = mb[blk]                                             # (capacity, 64)
  within = jnp.cumsum(sel, axis=1, dtype=jnp.int32) - 1
  pos = jnp.argmax(sel & (within == rank[:, None]), axis=1).astype(jnp.int32)
  valid = j < total
  idx = jnp.where(valid, blk * _BLOCK + pos, 0)
  vals = jnp.where(valid, x[idx], 0).astype(x.dtype)
  return SparsePayload(idx, vals, jnp.minimum(total, capacity).astype(jnp.int32), total > capacity)


def _check_indices(payload: SparsePayload, size: int, where: str) -> jax.Array:
  """Check a payload against a dense ``size``: raise for concrete out-of-range valid indices; return the
  traced flag ``bad`` (some valid index outside ``[0, size)``) for callers under jit."""
  check_int("size", size, 1)
  if np.ndim(payload.indices) != 1 or np.shape(payload.values) != np.shape(payload.indices):
    raise ValueError(f"{where}: payload indices and values must be 1-D arrays of the same shape (one payload, "
                     f"capacity slots), got {np.shape(payload.indices)} and {np.shape(payload.values)}; "
                     f"decompress stacked payloads one at a time (or jax.vmap over them).")
  if np.ndim(payload.count) != 0:
    raise ValueError(f"{where}: payload count must be a scalar, got shape {np.shape(payload.count)}.")
  if not jnp.issubdtype(jnp.result_type(payload.indices), jnp.integer):
    raise TypeError(f"{where}: payload indices must be integers, got dtype {jnp.result_type(payload.indices)}; "
                    f"cast them with .astype(jnp.int32).")
  cap = payload.indices.shape[-1]
  valid = jnp.arange(cap) < jnp.asarray(payload.count)[..., None]
  bad = jnp.any(valid & ((payload.indices < 0) | (payload.indices >= size)))
  if not isinstance(bad, jax.core.Tracer) and bool(bad):
    hi = int(jnp.max(jnp.where(valid, payload.indices, -1)))
    raise ValueError(f"{where}: the payload holds index {hi} (or a negative one), outside a dense vector "
                     f"of size {size}; pass the size of the vector that was compressed.")
  return bad


def _check_out_dtype(where: str, dtype) -> None:
  """A requested output ``dtype`` must be floating: an out-of-range index is flagged with NaN under jit."""
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.inexact):
    raise TypeError(f"{where}: dtype must be a floating dtype (under jit a bad index turns the result into NaN), "
                    f"got {jnp.dtype(dtype)}; pass e.g. dtype=jnp.float32 and round the result if needed.")


def decompress(payload: SparsePayload, size: int, dtype=None) -> jax.Array:
  """Dense vector of length ``size`` from a payload (invalid slots add zero).

  A valid index outside ``[0, size)`` raises ``ValueError`` (concrete payloads); under ``jit`` the
  result is all NaN instead (never a silently truncated vector). ``dtype`` (default: the values' dtype)
  must be floating; integer or bool values with ``dtype=None`` give a float32 vector. A ``dtype``
  narrower than the values' (e.g. float32 values, ``dtype=jnp.bfloat16``) rounds each value to ``dtype``
  (round to nearest even; beyond its range: +-inf) before it is added, an explicit cast; entries that share
  an index then accumulate in ``dtype``.

  >>> decompress(SparsePayload(jnp.array([2, 0]), jnp.array([5., 7.]), jnp.array(1), jnp.array(False)), 4)
  Array([0., 0., 5., 0.], dtype=float32)
  """
  _check_out_dtype("decompress", dtype)
  bad = _check_indices(payload, size, "decompress")
  out_dtype = payload.values.dtype if dtype is None else dtype  # as given: jnp canonicalizes (float -> f32)
  valid = jnp.arange(payload.values.shape[0]) < payload.count
  vals = jnp.where(valid, payload.values, 0).astype(out_dtype)  # explicit: values rounded to out_dtype
  out = jnp.zeros((size,), out_dtype).at[payload.indices].add(vals)
  return jnp.where(bad, jnp.nan, out)


def allgather_mean(payload: SparsePayload, size: int, axis_name: str, dtype=None) -> jax.Array:
  """Mean over the devices of ``axis_name`` of their decompressed payloads (dense, length ``size``).

  The collective of every sparsifier here: all-gather the static-capacity payloads (what is actually
  communicated: ``payload_bytes`` per device), scatter-add them once, divide by the axis size. Call it
  inside ``pmap``/``shard_map`` over ``axis_name``. A valid index outside ``[0, size)`` on any device
  makes the result all NaN (under jit; concrete payloads raise). ``dtype`` as in :func:`decompress`.
  A 16-bit result is summed and divided in float32 and rounded once (summed in float16, 8 workers' entries
  of 10^4 overflowed to inf though their mean fits; in bfloat16 every add rounded).
  """
  _check_out_dtype("allgather_mean", dtype)
  bad = _check_indices(payload, size, "allgather_mean")
  bad = jax.lax.pmax(bad.astype(jnp.int32), axis_name) > 0
  g = jax.lax.all_gather(payload, axis_name)
  valid = jnp.arange(payload.values.shape[0])[None] < g.count[:, None]
  out_dtype = payload.values.dtype if dtype is None else dtype  # as in decompress: an explicit rounding cast
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  dense = jnp.zeros((size,), acc_dtype).at[g.indices.reshape(-1)].add(
      jnp.where(valid, g.values, 0).reshape(-1).astype(out_dtype).astype(acc_dtype))
  return jnp.where(bad, jnp.nan, dense / jax.lax.psum(1, axis_name)).astype(out_dtype)


def _block_stats(a: jax.Array):
  """Per-block sum, sum of squares and maximum of a 1-D non-negative ``a`` (blocks of 64, zero padded).

  One variadic reduction: the three statistics come out of a single read of ``a`` (float32 sums). The
  maximum ignores NaN (as the Pallas kernel's does): a NaN is never selected, and a NaN block maximum
  would hide the block's selected entries from :func:`compact_above`.
  """
  n = a.shape[0]
  nb = -(-n // _BLOCK)
  ab = jnp.pad(a.astype(jnp.float32), (0, nb * _BLOCK - n)).reshape(nb, _BLOCK)
  zero = jnp.float32(0.0)
  return jax.lax.reduce((ab, ab * ab, jnp.where(jnp.isnan(ab), zero, ab)), (zero, zero, zero),
                        lambda u, v: (u[0] + v[0], u[1] + v[1], jnp.maximum(u[2], v[2])), (1,))


# How compact_above packs the gathered candidate blocks: "search" (compact(): per-slot binary search over
# block counts) or "scatter" (unique-index scatters). On an H100 at 25M elements, ratio 0.001: search
# 0.154 ms, scatter 0.184 ms for the whole sidco_compress (benchmarks/sidco_compression.py).
_PACK_METHOD = "search"


def _payload_and_count(idx, vals, total, n_cand, cap_b, capacity):
  """``(payload, n_above)`` of a packing that placed the selected entries of its first ``cap_b`` of
  ``n_cand`` candidate blocks (``total`` of them) at ``idx``/``vals``: each candidate block left out holds
  at least one more selected entry, so it means overflow and adds one to the (lower-bound) count."""
  total = total.astype(jnp.int32)
  extra = jnp.maximum(n_cand - cap_b, 0).astype(jnp.int32)
  return (SparsePayload(idx, vals, jnp.minimum(total, capacity), (total > capacity) | (extra > 0)),
          total + extra)


def _pack_scatter(x, t_blk, capacity, flags, incl, n_cand, cap_b):
  """compact_above's packing by scatters to unique destinations: flagged block b goes to candidate slot
  ``incl[b] - 1``, selected entry e of candidate row r to payload slot ``row_offset[r] + rank(e)``;
  everything else is sent out of bounds and dropped. No search, no sort; deterministic. (The in-bounds
  destinations are unique; the repeated out-of-bounds ones are dropped before any write.)"""
  n = x.shape[0]
  nb = flags.shape[0]
  dst = jnp.where(flags, incl - 1, cap_b)
  cand = jnp.zeros((cap_b,), jnp.int32).at[dst].set(
      jnp.arange(nb, dtype=jnp.int32), mode="drop", unique_indices=True)
  j = jnp.arange(cap_b, dtype=jnp.int32)
  pos = cand[:, None] * _BLOCK + jnp.arange(_BLOCK, dtype=jnp.int32)[None]           # (cap_b, 64)
  rows = jnp.take(x, pos.reshape(-1), mode="fill", fill_value=0).reshape(cap_b, _BLOCK)
  mask = (jnp.abs(rows).astype(jnp.float32) > t_blk(cand)[:, None]) & (pos < n) & (j < n_cand)[:, None]
  rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32)
  row_cnt = rank[:, -1]
  row_end = jnp.cumsum(row_cnt)
  total = row_end[-1]
  slot = jnp.where(mask, (row_end - row_cnt)[:, None] + rank - 1, capacity)
  slot = jnp.where(slot < capacity, slot, capacity).reshape(-1)
  idx = jnp.zeros((capacity,), jnp.int32).at[slot].set(pos.reshape(-1), mode="drop", unique_indices=True)
  vals = jnp.zeros((capacity,), x.dtype).at[slot].set(rows.reshape(-1), mode="drop", unique_indices=True)
  return _payload_and_count(idx, vals, total, n_cand, cap_b, capacity)


PACKINGS = ("auto", "xla", "pallas")
# Statistics pass of the Pallas path: "pallas" (one Triton kernel: per-tile sums, per-block maxima) or
# "xla" (the variadic reduction of _block_stats). Module-level so the benchmark can compare them.
_PALLAS_STATS = "pallas"


def _varying(x) -> bool:
  """Whether ``x`` varies over a manual mesh axis (inside ``jax.shard_map`` with ``check_vma=True``), where
  a ``pallas_call`` would need the output's varying axes declared (``manual_axis_type`` / ``vma``, named
  differently across jax versions): the transforms then take the XLA path."""
  try:
    aval = jax.typeof(x)
  except Exception:  # pragma: no cover - jax without typeof
    return False
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return bool(vma)


def _pallas_mode(packing: str, x=None) -> tuple[bool, bool]:
  """``(use_pallas, interpret)`` for a ``packing`` argument (checked) and the array ``x`` it will read: an
  ``x`` varying over a ``shard_map`` axis takes the XLA path (see :func:`_varying`)."""
  check_choice("packing", packing, PACKINGS)
  on_gpu = jax.default_backend() == "gpu"
  if x is not None and _varying(x):
    return False, False
  if packing == "auto":
    return on_gpu and _pallas_pack.available(), False
  if packing == "pallas" and not _pallas_pack.available():
    raise ValueError("packing='pallas' needs jax.experimental.pallas.triton (load/store with masks); "
                     "use packing='xla'.")
  return packing == "pallas", not on_gpu


_THR_BLOCKS = _pallas_pack.THR_BLOCKS   # blocks per threshold tile (4096 entries)


def _block_thresholds(threshold, nb: int):
  """``t_blk(blocks) -> thresholds`` for a float32 ``threshold`` holding one value, or one value per
  ``_THR_BLOCKS`` blocks (the per-segment thresholds of the transforms' flat buffer)."""
  t = jnp.asarray(threshold, jnp.float32).reshape(-1)
  if t.shape[0] == 1:
    return lambda blk: jnp.broadcast_to(t[0], jnp.shape(blk))
  if t.shape[0] != -(-nb // _THR_BLOCKS):
    raise ValueError(f"threshold must be a scalar or hold one value per {_THR_BLOCKS * _BLOCK} entries "
                     f"({-(-nb // _THR_BLOCKS)} here), got shape {t.shape}.")
  return lambda blk: t[jnp.clip(blk // _THR_BLOCKS, 0, t.shape[0] - 1)]


def _pack_xla(x, threshold, capacity, block_max):
  n = x.shape[0]
  nb = -(-n // _BLOCK)
  cap_b = min(nb, capacity)
  t_blk = _block_thresholds(threshold, nb)
  if jnp.size(threshold) == 1:
    flags = block_max > jnp.reshape(threshold, ())
  elif nb % _THR_BLOCKS == 0:   # (the transforms' flat buffer: whole threshold tiles)
    flags = (block_max.reshape(-1, _THR_BLOCKS) > jnp.reshape(threshold, (-1, 1))).reshape(-1)
  else:
    flags = block_max > t_blk(jnp.arange(nb))
  incl = jnp.cumsum(flags, dtype=jnp.int32)
  n_cand = incl[-1]
  if _PACK_METHOD == "scatter":
    return _pack_scatter(x, t_blk, capacity, flags, incl, n_cand, cap_b)
  j = jnp.arange(cap_b, dtype=jnp.int32)
  cand = jnp.minimum(jnp.searchsorted(incl, j, side="right", method=_SEARCH_METHOD), nb - 1).astype(jnp.int32)
  pos = (cand[:, None] * _BLOCK + jnp.arange(_BLOCK, dtype=jnp.int32)[None]).reshape(-1)
  rows = jnp.take(x, pos, mode="fill", fill_value=0)
  row_ok = jnp.broadcast_to((j < n_cand)[:, None], (cap_b, _BLOCK)).reshape(-1)
  t_rows = jnp.broadcast_to(t_blk(cand)[:, None], (cap_b, _BLOCK)).reshape(-1)
  mask = (jnp.abs(rows).astype(jnp.float32) > t_rows) & (pos < n) & row_ok
  p = compact(rows, mask, capacity)
  idx = jnp.where(jnp.arange(capacity) < p.count, jnp.take(pos, p.indices), 0).astype(jnp.int32)
  return _payload_and_count(idx, p.values, jnp.sum(mask, dtype=jnp.int32), n_cand, cap_b, capacity)


def _pack_pallas(x, threshold, capacity, block_max, interpret):
  idx, vals, total, n_cand = _pallas_pack.pack_above(x, threshold, capacity, block_max, interpret=interpret)
  return _payload_and_count(idx, vals, total, n_cand, min(block_max.shape[0], capacity), capacity)


def compact_above(x: jax.Array, threshold: jax.Array, capacity: int,
                  block_max: jax.Array | None = None, packing: str = "auto"
                  ) -> tuple[SparsePayload, jax.Array]:
  """Pack the entries of a 1-D ``x`` with ``|x| > threshold`` into a :class:`SparsePayload`.

  Same result as ``compact(x, abs(x) > threshold, capacity)`` (the first ``capacity`` selected entries
  in index order, ``overflow`` when there were more), without a second full pass over ``x``:
  ``block_max`` (the maximum of ``|x|`` over each block of 64 entries, e.g. from the pass that computed
  the threshold's moments) says which blocks can hold a selected entry, and only those are read.

  Two implementations (``packing``):

  - ``'xla'``: a prefix sum over the n / 64 block flags, a binary search per slot for the first
    ``min(n / 64, capacity)`` candidate blocks (a block with a candidate holds at least one selected
    entry, so more candidates than that means overflow), a gather of those blocks and :func:`compact`
    on them. Runs on every backend.
  - ``'pallas'``: Triton kernels (:mod:`mlsys_jax.comm._pallas_pack`): list the candidate blocks in
    order, count the selected entries per group of candidate blocks (masked loads of those blocks only),
    then each group writes its entries at its in-kernel offset. Same truncation as ``'xla'``. Off GPU it
    runs in Pallas interpret mode (slow; for tests).
  - ``'auto'`` (default): ``'pallas'`` on GPU, ``'xla'`` elsewhere.

  Inside ``jax.shard_map`` (an ``x`` that varies over a manual axis) the XLA path is taken whatever
  ``packing`` says: ``pallas_call`` would need its outputs' varying axes declared.

  Both give the same payload; deterministic.

  Args:
    x: 1-D array.
    threshold: scalar; entries with ``|x| > threshold`` are selected.
    capacity: static payload size.
    block_max: optional ``(ceil(n / 64),)`` block maxima of ``|x|`` (computed here when omitted).
    packing: ``'auto'``, ``'xla'`` or ``'pallas'``. ``'auto'`` decides by ``jax.default_backend()``:
      on a GPU host, computations placed on the CPU (``jax.default_device(cpu)``) must pass ``'xla'``.

  Returns:
    ``(payload, n_above)``: ``n_above`` is the number of selected entries; exact unless the payload
    overflowed with more than ``capacity`` candidate blocks, where it is a lower bound (>= capacity + 1).

  Example:
    >>> p, n_above = compact_above(jnp.array([0.1, -3.0, 0.2, 5.0]), 1.0, 4)   # indices [1, 3, ...]
  """
  check_rank("x", x, 1)
  x = jnp.asarray(x)
  _check_nonempty("compact_above", "x", x)
  check_int("capacity", capacity, 1)
  use_pallas, interpret = _pallas_mode(packing, x)
  if block_max is None:
    block_max = _block_stats(jnp.abs(x))[2]
  elif np.shape(block_max) != (-(-x.shape[0] // _BLOCK),):
    raise ValueError(f"compact_above: block_max must hold one maximum of |x| per 64-entry block, shape "
                     f"({-(-x.shape[0] // _BLOCK)},) for {x.shape[0]} entries, got {np.shape(block_max)}; "
                     f"pass block_max=None to compute it.")
  threshold = jnp.asarray(threshold, jnp.float32)
  if use_pallas:
    return _pack_pallas(x, threshold, capacity, block_max, interpret)
  return _pack_xla(x, threshold, capacity, block_max)


def topk_payload(x: jax.Array, k: int) -> SparsePayload:
  """Exact Top-k by magnitude of a 1-D ``x`` (``lax.top_k``); ``k`` a static int in ``[0, x.size]``."""
  check_rank("x", x, 1)
  x = jnp.asarray(x)
  check_int("k", k, 0, x.shape[0])
  _, idx = jax.lax.top_k(jnp.abs(x), k)
  idx = idx.astype(jnp.int32)
  return SparsePayload(idx, x[idx], jnp.asarray(k, jnp.int32), jnp.asarray(False))


# ----------------------------------------------------------------------------------------------------
# Threshold estimators.


def max_stages(ratio: float) -> int:
  """Upper bound on SIDCo's number of stages: ceil(log(ratio) / log(1/2)), for ``ratio`` in (0, 1]."""
  check_range("ratio", ratio, 0.0, 1.0, low_inclusive=False)
  return max(1, math.ceil(math.log(ratio) / math.log(0.5)))


def _masked_moments(a, mask):
  """Minimum, mean and variance of ``a - min`` over ``mask`` in one fused pass (sums, not two passes),
  and the number of entries in ``mask`` (float32)."""
  n_in = jnp.sum(mask, dtype=jnp.float32)
  cnt = jnp.maximum(n_in, 1.0)
  mn = jnp.min(jnp.where(mask, a, jnp.inf))
  mn = jnp.where(jnp.isfinite(mn), mn, 0.0)
  m1 = jnp.sum(jnp.where(mask, a, 0.0)) / cnt
  m2 = jnp.sum(jnp.where(mask, a * a, 0.0)) / cnt
  return mn, m1 - mn, jnp.maximum(m2 - m1 * m1, 1e-30), n_in


def _log_gammaincc(a, x, terms: int = 40):
  """log Q(a, x), the regularized upper incomplete gamma, with a fixed number of terms (no loops).

  Series for P = 1 - Q where x < a + 1 and the continued fraction (modified Lentz) for Q elsewhere, each
  unrolled ``terms`` times, so that the whole evaluation is one fused elementwise kernel on GPU (XLA's
  ``gammaincc`` iterates in device-side while loops, about 2 ms on an H100). Used by
  :func:`_gamma_upper_quantile`, whose Newton steps reach a relative error below 1e-5 against
  ``scipy.special.gammainccinv`` for shapes 0.01 to 1000 and tail probabilities 0.5 to 1e-5.
  """
  x = jnp.maximum(x, 1e-30)
  log_front = a * jnp.log(x) - x
  # series: P = x^a e^-x / Gamma(a + 1) * sum_n x^n / ((a + 1) ... (a + n))
  term = jnp.ones_like(x)
  total = jnp.ones_like(x)
  for i in range(1, terms + 1):
    term = term * x / (a + i)
    total = total + term
  p = jnp.exp(log_front - jax.lax.lgamma(a + 1.0)) * total
  log_q_series = jnp.log1p(-jnp.minimum(p, 1.0 - 1e-7))
  # continued fraction for Q (Numerical Recipes' gcf, modified Lentz)
  tiny = 1e-30
  b = x + 1.0 - a
  c = jnp.full_like(x, 1.0 / tiny)
  d = 1.0 / jnp.where(jnp.abs(b) < tiny, tiny, b)
  h = d
  for i in range(1, terms + 1):
    an = -i * (i - a)
    b = b + 2.0
    d = an * d + b
    d = 1.0 / jnp.where(jnp.abs(d) < tiny, tiny, d)
    c = b + an / c
    c = jnp.where(jnp.abs(c) < tiny, tiny, c)
    h = h * d * c
  log_q_cf = log_front - jax.lax.lgamma(a) + jnp.log(jnp.maximum(h, tiny))
  return jnp.where(x < a + 1.0, log_q_series, log_q_cf)


def _gamma_upper_quantile(shape, delta, newton_steps: int = 6):
  """x with Q(shape, x) = delta (regularized upper incomplete gamma, decreasing in x).

  Closed-form starting points (the upper-tail asymptote Q ~ x^(a-1) e^-x / Gamma(a) for small delta, the
  small-x series P ~ x^a / Gamma(a + 1) for delta near 1, Wilson-Hilferty for large shapes), the better of
  them, then Newton steps on log Q in log x with the fixed-term :func:`_log_gammaincc`: relative error
  about 1e-5, and no device-side loops (SIDCo Sec. 4 uses the tail asymptote alone).
  """
  a = jnp.asarray(shape, jnp.float32)
  delta = jnp.asarray(delta, jnp.float32)
  log_d = jnp.log(delta)
  lg = jax.lax.lgamma(a)
  # tail asymptote: x = -log(delta) - lgamma(a) + (a - 1) log x, by fixed-point iterations
  xt = jnp.maximum(-log_d - lg, 1.0)
  for _ in range(4):
    xt = jnp.maximum(-log_d - lg + (a - 1.0) * jnp.log(xt), 1e-3)
  xs = jnp.exp((jnp.log1p(-delta) + jax.lax.lgamma(a + 1.0)) / a)       # small-x series
  z = jnp.sqrt(2.0) * jax.scipy.special.erfinv(1.0 - 2.0 * delta)       # upper normal quantile
  xw = a * jnp.maximum(1.0 - 1.0 / (9.0 * a) + z / (3.0 * jnp.sqrt(a)), 1e-3) ** 3   # Wilson-Hilferty
  guesses = jnp.stack([xt, xs, xw])
  err = jnp.abs(_log_gammaincc(a, guesses) - log_d)
  u = jnp.log(guesses[jnp.argmin(jnp.where(jnp.isfinite(err), err, jnp.inf))])
  for _ in range(newton_steps):
    x = jnp.exp(u)
    lq = _log_gammaincc(a, x)
    # d log Q / d log x = -x^a e^-x / (Gamma(a) Q)
    slope = -jnp.exp(a * u - x - lg - lq)
    step = jnp.clip((lq - log_d) / jnp.minimum(slope, -1e-30), -2.0, 2.0)
    u = u - step
  return jnp.exp(u)


def _stage_threshold(dist, mn, mean, var, delta, first: bool):
  delta = jnp.asarray(delta, jnp.float32)
  if dist == "exponential":
    return mn + mean * (-jnp.log(delta))
  if dist == "gpareto" or (dist == "gamma" and not first):  # gamma fits the bulk, GP the tails
    r = mean * mean / var
    k = 0.5 * (r - 1.0)
    a = 0.5 * mean * (r + 1.0)
    k_safe = jnp.where(jnp.abs(k) < 1e-6, 1e-6, k)
    return mn + a * (1.0 - jnp.exp(k_safe * jnp.log(delta))) / k_safe
  shape = jnp.clip(mean * mean / var, 1e-3, 1e3)
  scale = var / jnp.maximum(mean, 1e-30)
  return mn + _gamma_upper_quantile(shape, delta) * scale


def _is_static(x) -> bool:
  """True for a Python/numpy number (a static hyperparameter), False for a jax array (maybe traced)."""
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _threshold_from_sums(abs_x, s1, s2, ratio, distribution, stages, first_ratio):
  """SIDCo's threshold given the first-stage sums ``s1 = sum |g|`` and ``s2 = sum g^2``.

  Later stages (``stages > 1`` and ``ratio < first_ratio``) refit the exceedances of the previous threshold,
  one pass over ``abs_x`` each: unrolled when ``stages`` is a Python int, a ``while_loop`` when it is traced
  (SIDCo's adaptive stage count). ``ratio`` may be traced (a density schedule).

  A later stage whose input (the exceedances of the previous threshold) already holds at most the target
  count ``ratio * n`` keeps the previous threshold: refitting fewer entries than are wanted could only
  raise the threshold above entries that should be sent (with no exceedances the fit would even
  collapse to 0 and select everything in index order).
  """
  n = abs_x.shape[0]
  mean = s1 / n
  var = jnp.maximum(s2 / n - mean * mean, 1e-30)
  mn = jnp.zeros_like(mean)
  target = jnp.maximum(jnp.asarray(ratio, jnp.float32) * n, 1.0)

  def first(r):
    return _stage_threshold(distribution, mn, mean, var, r, True)

  def later(t, i_ratio):
    mn, mean, var, n_in = _masked_moments(abs_x, abs_x > t)
    return jnp.where(n_in > target, _stage_threshold(distribution, mn, mean, var, i_ratio, False), t)

  return _stage_schedule(first, later, ratio, stages, first_ratio)


def _stage_schedule(first, later, ratio, stages, first_ratio, bound: int | None = None):
  """SIDCo's multi-stage schedule, shared by the one-vector and the per-segment fits: ``first(r)`` fits
  the first stage at density ``r``; ``later(t, i_ratio)`` refits the exceedances of ``t``. Unrolled when
  ``stages`` is a Python int (and ``ratio`` may be traced), a ``while_loop`` when ``stages`` is traced;
  with a static ``bound`` on a traced ``stages`` (``stages <= bound``) and :func:`_branch_free`, the
  ``bound - 1`` later stages unrolled instead, each kept only where it is one of the ``stages - 1`` wanted
  (the same threshold bitwise; every stage's pass is paid, no loop predicate goes to the host). With a
  ``bound``, both paths run at most ``bound`` stages."""
  if isinstance(stages, (int, np.integer)):
    if _is_static(ratio):
      multi = stages > 1 and ratio < first_ratio
      t = first(first_ratio if multi else ratio)
      if multi:
        i_ratio = (ratio / first_ratio) ** (1.0 / (stages - 1))
        for _ in range(stages - 1):
          t = later(t, i_ratio)
      return t
    ratio = jnp.asarray(ratio, jnp.float32)
    multi = (ratio < first_ratio) & (stages > 1)
    t = first(jnp.where(multi, first_ratio, ratio))
    i_ratio = jnp.where(multi, (ratio / first_ratio) ** (1.0 / max(stages - 1, 1)), 1.0)
    for _ in range(stages - 1):
      t = jnp.where(multi, later(t, i_ratio), t)
    return t
  stages = jnp.asarray(stages, jnp.int32)
  if bound is not None:   # (a stage count above the bound, e.g. a state of another ratio: the bound's, both paths)
    stages = jnp.minimum(stages, int(bound))
  multi = (stages > 1) & (ratio < first_ratio)
  t0 = first(jnp.where(multi, first_ratio, ratio))
  loops = jnp.where(multi, stages - 1, 0)
  i_ratio = jnp.where(multi, (ratio / first_ratio) ** (1.0 / jnp.maximum(stages - 1, 1)), 1.0)
  if bound is not None and _branch_free():
    t = t0
    for i in range(int(bound) - 1):
      t = jnp.where(i < loops, later(t, i_ratio), t)
    return t
  _, t = jax.lax.while_loop(lambda c: c[0] < loops, lambda c: (c[0] + 1, later(c[1], i_ratio)),
                            (jnp.asarray(0, jnp.int32), t0))
  return t


def _check_ratio(name: str, ratio) -> None:
  """``ratio`` in (0, 1) when it is a number or a concrete array (a traced one is not checked)."""
  if _is_static(ratio) or (isinstance(ratio, (jax.Array, np.ndarray)) and np.ndim(ratio) == 0):
    check_range(name, ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  else:
    raise TypeError(f"{name} must be a number in (0, 1) or a scalar array, got {type(ratio).__name__} "
                    f"with shape {np.shape(ratio)}.")


def sidco_threshold(abs_x: jax.Array, ratio: float, distribution: str = "exponential",
                    stages: int | jax.Array = 1, first_ratio: float = 0.25) -> jax.Array:
  """SIDCo's threshold for keeping about ``ratio`` of the entries of ``abs_x`` (magnitudes).

  Args:
    abs_x: 1-D non-negative array (flatten a tensor first: ``jnp.abs(g).reshape(-1)``).
    ratio: target density delta in (0, 1) (a number, or a scalar array that may be traced).
    distribution: ``'exponential'``, ``'gpareto'`` or ``'gamma'`` (gamma first stage, then
      generalized Pareto on the tails, as in the paper's code).
    stages: number of fitting stages: a Python int (later stages unrolled) or a traced int32 (e.g.
      adapted during training; a ``while_loop``).
    first_ratio: density kept by the first stage when ``stages > 1``.

  Returns:
    The threshold (float32 scalar); NaN when the fit's sums are not finite in float32 (a NaN or inf entry, or
    magnitudes above ~1.8e19, whose squares overflow).

  Example:
    >>> a = jnp.abs(jax.random.laplace(jax.random.PRNGKey(0), (100_000,)))
    >>> t = sidco_threshold(a, 0.01, 'exponential')      # about 1% of a exceed t
    >>> bool(0.008 < jnp.mean(a > t) < 0.012)
    True
  """
  check_choice("distribution", distribution, DISTRIBUTIONS)
  check_rank("abs_x", abs_x, 1)
  _check_nonempty("sidco_threshold", "abs_x", abs_x)
  _check_ratio("ratio", ratio)
  check_range("first_ratio", first_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  if not isinstance(stages, (jax.Array, np.ndarray)):   # (an array may be traced: not checked)
    check_int("stages", stages, 1, 64)
  a = abs_x.astype(jnp.float32)
  # The first stage fits |g| itself (support from 0): mean and variance from one fused pass of sums.
  s1, s2 = jnp.sum(a), jnp.sum(a * a)
  t = _threshold_from_sums(a, s1, s2, ratio, distribution, stages, first_ratio)
  # moments that overflowed float32 (|x| above ~1.8e19 squares to inf) fit nothing: NaN, not a value (the fits
  # gave e.g. -4.4e18 for gpareto, inf for gamma on N(0, 1) x 1e20)
  return jnp.where(jnp.isfinite(s1) & jnp.isfinite(s2), t, jnp.nan)


def sidco_compress(x: jax.Array, ratio: float, capacity: int, distribution: str = "exponential",
                   stages: int | jax.Array = 1, first_ratio: float = 0.25, packing: str = "auto",
                   min_count: int | jax.Array = 0, max_min_count: int | None = None
                   ) -> tuple[SparsePayload, jax.Array]:
  """SIDCo selection and packing of a 1-D ``x`` in as few passes as the estimator allows.

  One variadic reduction over ``|x|`` gives, per block of 64 entries, the sum, the sum of squares and
  the maximum: the sums give the first-stage fit (Abdelmoniem et al., MLSys 2021, Sec. 4), the maxima let
  :func:`compact_above` pack the selected entries by gathering only blocks that can hold one, instead of
  a second pass over ``x``. Each later stage of a multi-stage fit costs one more pass (exceedance
  moments). The payload equals ``compact(x, abs(x) > sidco_threshold(...), capacity)``, except where the fit's
  sums overflow float32 (``|x|`` above ~1.8e19; :func:`sidco_threshold` is then NaN): every non-zero entry is
  selected, and ``n_above`` above ``capacity`` says the payload overflowed.

  Args:
    x: 1-D gradient (error-compensated).
    ratio: target density delta in (0, 1).
    capacity: static payload size (e.g. 2 * ratio * n).
    distribution, stages, first_ratio: as in :func:`sidco_threshold`.
    min_count: when > 0, the threshold is lowered (if needed) so that at least this many entries are
      selected, up to a quarter of the 64-entry blocks (one ``top_k`` over the n / 64 block maxima); 0:
      the fitted threshold alone. May be traced when ``max_min_count`` (static) bounds it.
    packing: ``'auto'`` (Pallas kernels on GPU, XLA elsewhere), ``'xla'`` or ``'pallas'``; see
      :func:`compact_above`. With ``'pallas'`` the statistics pass is a Pallas kernel too (per-tile float32
      sums, so the threshold can differ from the XLA path's in the last bits).

  Returns:
    ``(payload, n_above)`` as in :func:`compact_above`.

  Example:
    >>> g = jax.random.laplace(jax.random.PRNGKey(0), (100_000,))
    >>> payload, n_above = sidco_compress(g, 0.001, capacity=2 * g.size // 1000, distribution='gpareto')
    >>> payload.indices.shape, bool(0 < int(payload.count) <= 200)
    ((200,), True)
  """
  check_choice("distribution", distribution, DISTRIBUTIONS)
  check_rank("x", x, 1)
  _check_nonempty("sidco_compress", "x", x)
  check_int("capacity", capacity, 1)
  if max_min_count is None:
    check_int("min_count", min_count, 0)
  else:
    check_int("max_min_count", max_min_count, 0)
    if not isinstance(min_count, (jax.Array, np.ndarray)):   # (an array may be traced: not checked)
      check_int("min_count", min_count, 0, max_min_count)
  _check_ratio("ratio", ratio)
  check_range("first_ratio", first_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  if not isinstance(stages, (jax.Array, np.ndarray)):
    check_int("stages", stages, 1, 64)
  use_pallas, interpret = _pallas_mode(packing, x)
  a = jnp.abs(x).astype(jnp.float32)
  if use_pallas and _PALLAS_STATS == "pallas":
    s1, s2, bmax = _pallas_pack.block_stats(x, interpret=interpret)
  else:
    bsum, bsq, bmax = _block_stats(a)
    s1, s2 = jnp.sum(bsum), jnp.sum(bsq)
  t = _threshold_from_sums(a, s1, s2, ratio, distribution, stages, first_ratio)
  # a fit whose sums overflowed float32 though every entry is finite (|x| above ~1.8e19: a NaN or meaningless
  # threshold, and min(NaN, floor) is NaN) would select nothing and report 0 above: select every non-zero entry
  # instead, so that ``n_above`` shows the payload's overflow (as in the transforms, where the ceiling then cuts
  # to the largest). Non-finite entries keep the fit's threshold, whatever it is.
  overflowed = (jnp.all(jnp.isfinite(bmax)) & ~jnp.isnan(s1) & ~jnp.isnan(s2)
                & ~(jnp.isfinite(s1) & jnp.isfinite(s2)))   # finite entries, inf sums (s1, s2: scalars)
  t = jnp.where(overflowed, 0.0, t)
  bound = max_min_count if max_min_count is not None else min_count
  if bound > 0:
    # floor: the j-th largest block maximum is at most the j-th largest |x|, so a threshold just below
    # it selects at least j entries (a fit that lands above every entry, e.g. the exponential on
    # Gaussian-like vectors, would otherwise send nothing). At most a quarter of the blocks, so that a
    # short vector is not flooded (one entry per block).
    kk = max(1, min(int(bound), bmax.shape[0] // 4))
    j = jnp.clip(jnp.asarray(min_count, jnp.int32), 1, kk) - 1
    floor = jax.lax.top_k(bmax, kk)[0][j]
    t = jnp.where((floor > 0) & (jnp.asarray(min_count) > 0), jnp.minimum(t, jnp.nextafter(floor, jnp.float32(0))), t)
  if use_pallas:
    return _pack_pallas(x, t, capacity, bmax, interpret)
  return _pack_xla(x, t, capacity, bmax)


# ----------------------------------------------------------------------------------------------------
# Segmented selection: all leaves of a gradient tree in one flat buffer, one threshold per segment.

_TILE = _BLOCK * _THR_BLOCKS   # 4096 entries: segments are padded to whole tiles
# The padded flat buffer of several segments: "gather" (concatenate the leaves, gather into the padded layout),
# "concat" (one concatenation with zero pieces: 4x faster on CPU, where gathers are slow) or "auto" (gather
# on GPU). The same buffer. Read by _Layout.flatten only, i.e. by sidco's buffer with _SUM_FLATTEN = "two" (the
# default "dus" pads the segments with zero pieces in _chunked), not by the default path since session 9.
_FLATTEN = "auto"
# The error-compensated buffer ``addend + residual`` of the transforms: "two" (flatten both trees, one add:
# three kernels, but the leaves' producers cannot fuse into a concatenation of ~160 operands, so each
# leaf's producer is a kernel of its own), "groups" (concatenations of the leafwise sums
# ``a_i + r_i`` over chunks of ``_GROUP_LEAVES`` leaves, into which the producers can fuse, then one
# concatenation of the chunks) or "dus" (the chunks written into one buffer by dynamic-update-slices, in
# place). The same buffer bitwise (for materialized inputs; see docs/comm.md on a producer fused into the add).
# ``_SUM_FLATTEN``: sidco's segmented buffer, "dus" (H200, 161-leaf ResNet-50 tree, ratio 0.001, with the
# block select and no fit: 1.224 ms per update with "dus", 1.457 with "two", 1.871 with "groups";
# benchmarks/results/sidco_tree_s8a_h200.json). ``_RAVEL_SUM_FLATTEN``: the raveled buffer of topk, dgc
# and randomk (:func:`_ravel_sum`), "two" (``topk [groups]`` was 1.770 ms against 1.675 there; "dus" not timed
# for topk). Both are benchmark switches.
_SUM_FLATTEN = "dus"
_RAVEL_SUM_FLATTEN = "two"
_GROUP_LEAVES = 24
# The zero buffer that "dus" writes its chunks into: "fused" (XLA fuses it with the first chunk's write into
# one pad fusion over the whole buffer: 0.121 ms per update on an H200 at 25.6M entries, session 9, for a first
# chunk of 155k entries) or "fill" (a separate fill behind ``lax.optimization_barrier``, so the first chunk is
# written in place like the others; 0.031 ms). The same buffer bitwise. With "quota": 0.794 / 0.789 ms per
# update against 0.877 (sidco_tree_s10a_h200.json, s10b).
_DUS_BASE = "fill"
# Chunks by size as well (0: off): a piece of at least this many entries is a chunk of its own (one in-place
# write of that leaf alone, no concatenation), the smaller ones are grouped by ``_GROUP_LEAVES`` between them.
_GROUP_SIZE = 0
# sidco's working buffer with ``flat_state=True`` (``_flat_step``): "concat" (the gradient leaves concatenated
# in one fusion of ~160 operands, the flat residual added, then padded: for several segments one gather into
# the padded layout; on an H200, session 19, in the ResNet-50 f32 step the concatenation took 0.123 ms and the
# per-tensor gather 0.138 ms, where a copy of the gradient takes 0.042) or "dus" (each leaf's sum
# ``g_i + residual[o_i:o_i + n_i]`` written into the padded buffer by chunks, as ``_SUM_FLATTEN = "dus"``, and
# the new residual (and velocity) read back leaf by leaf into one vector the same way: no gather). The same
# buffers bitwise (tests/test_comm_flat_state.py). A benchmark switch (session 20). Session 22 (H100, f32 ResNet-50
# training step, benchmarks/results/sidco_model_step_h100_s22{a,b}.json): slower inside the step (kernel time over
# Adam 0.490 vs 0.417 ms flat, 0.555 vs 0.501 per tensor; wall with a flattened Adam +0.320 vs +0.149 ms), faster
# only per tensor in an update-alone loop (1.050 vs 1.298 ms, sidco_tree_h100_s22.json): the default stays "concat".
_FLAT_BUILD = "concat"


def _chunked(pieces, how: str, dtype) -> jax.Array:
  """One 1-D buffer from ``pieces`` (1-D, in order) by chunks of ``_GROUP_LEAVES``: ``how`` "groups" (a
  concatenation of the chunks' concatenations) or "dus" (each chunk written into a zero buffer)."""
  check_choice("_SUM_FLATTEN / _RAVEL_SUM_FLATTEN", how, ("groups", "dus"))
  if not _GROUP_SIZE:
    chunks = [pieces[i:i + _GROUP_LEAVES] for i in range(0, len(pieces), _GROUP_LEAVES)]
  else:   # a large piece alone; runs of small ones by _GROUP_LEAVES
    chunks, run = [], []
    for p in pieces:
      if p.shape[0] >= _GROUP_SIZE:
        chunks += [run] if run else []
        chunks.append([p])
        run = []
      else:
        run.append(p)
        if len(run) == _GROUP_LEAVES:
          chunks.append(run)
          run = []
    chunks += [run] if run else []
  chunks = [c[0] if len(c) == 1 else jnp.concatenate(c) for c in chunks]
  if how == "groups" or len(chunks) == 1:
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
  check_choice("_DUS_BASE", _DUS_BASE, ("fused", "fill"))
  buf = jnp.zeros((sum(c.shape[0] for c in chunks),), dtype)
  if _DUS_BASE == "fill":   # (the zeros stay a kernel of their own: no pad fusion over the whole buffer)
    buf = jax.lax.optimization_barrier(buf)
  off = 0
  for c in chunks:
    buf = jax.lax.dynamic_update_slice(buf, c, (off,))
    off += c.shape[0]
  return buf


_MAX_PADDED = 2**31 - _TILE   # the largest padded buffer whose positions and per-tile limits fit int32


def _check_int32_layout(sizes, n_pad: int) -> None:
  """Refuse (ValueError) a tree whose flat working buffer (``n_pad`` padded entries) holds more than
  :data:`_MAX_PADDED`: its positions, the per-tile tables and the payload indices are int32, and past that they
  wrap silently."""
  if n_pad > _MAX_PADDED:
    raise ValueError(
        f"the gradient tree has {sum(sizes)} entries in {len(sizes)} leaves, {n_pad} in the padded flat buffer; "
        f"its positions and payload indices are int32, so at most {_MAX_PADDED} padded entries fit (past that they "
        f"would wrap: wrong entries sent or kept, silently). Compress the tree in parts (e.g. two transforms over "
        f"disjoint subtrees with optax.masked / optax.multi_transform) or shard the parameters over more devices.")


class _Layout:
  """Static layout of a gradient tree's leaves in one flat working buffer, split into segments.

  A segment is a run of consecutive leaves that shares one threshold: all leaves (``per_tensor=False``),
  or one leaf each (``per_tensor=True``), small leaves pooled (:func:`_segments`). Inside a segment the
  leaves are concatenated; each segment is zero-padded to whole tiles of 4096 entries, so every tile
  (and every 64-entry block) lies in one segment and per-segment reductions are reshapes and one small
  gather (tile values -> ``(segments, tiles per segment)``), deterministic, with no scatter.
  """

  def __init__(self, sizes, groups):
    self.sizes = tuple(int(n) for n in sizes)
    offsets, seg_of_leaf, seg_n, seg_tile0, seg_ntiles = [], [], [], [], []
    pos = 0
    for g, leaves in enumerate(groups):
      start = pos
      for i in leaves:
        offsets.append(pos)
        seg_of_leaf.append(g)
        pos += self.sizes[i]
      n_g = pos - start
      nt_g = max(1, -(-n_g // _TILE))
      seg_n.append(n_g)
      seg_tile0.append(start // _TILE)
      seg_ntiles.append(nt_g)
      pos = start + nt_g * _TILE
    _check_int32_layout(self.sizes, pos)   # (before any int32 table is built)
    self.offsets, self.seg_of_leaf = tuple(offsets), tuple(seg_of_leaf)
    self.seg_start = np.asarray(seg_tile0, np.int64) * _TILE   # flat offset of each segment
    self.groups = tuple(tuple(g) for g in groups)
    self.n_pad = pos
    self.n_real = int(sum(self.sizes))
    self.num_segments = len(groups)
    self.num_tiles = pos // _TILE
    self.seg_n = np.asarray(seg_n, np.int64)
    self.seg_blocks = -(-self.seg_n // _BLOCK)
    self.tile_seg = np.repeat(np.arange(len(groups), dtype=np.int32), seg_ntiles)
    tmax = max(seg_ntiles)
    j = np.arange(tmax)[None, :]
    self.seg_tile_ok = j < np.asarray(seg_ntiles)[:, None]
    self.seg_tile_idx = np.where(self.seg_tile_ok, np.asarray(seg_tile0)[:, None] + j, 0).astype(np.int32)
    # per tile: padded position -> position among the leaves alone (p + shift), valid below the limit
    seg_src0 = np.concatenate([[0], np.cumsum(self.seg_n)[:-1]])
    self.tile_shift = (seg_src0 - self.seg_start)[self.tile_seg].astype(np.int32)
    self.tile_limit = (self.seg_start + self.seg_n)[self.tile_seg].astype(np.int32)

  def flatten(self, leaves, dtype) -> jax.Array:
    """The flat buffer (``n_pad``,) of ``leaves`` (in leaf order, zero padding after each segment).

    Several segments: one concatenation of the leaves alone, then one gather into the padded layout
    (``padded[p] = leaves[p + shift(tile)]`` or 0 past the segment's end; static per-tile tables). A single
    concatenation with the zero pieces between the segments was ~3x slower on an H200 (a loop fusion
    choosing among ~260 operands per entry: 0.12-0.13 ms at 25M entries against 0.04 ms)."""
    how = _FLATTEN if _FLATTEN != "auto" else ("gather" if jax.default_backend() == "gpu" else "concat")
    if self.num_segments > 1 and how == "gather":   # (segments are runs of consecutive leaves: leaf order)
      return self.pad(_concat_leaves(leaves, dtype))
    pieces = []
    for g, group in enumerate(self.groups):
      n_g = 0
      for i in group:
        pieces.append(leaves[i].reshape(-1).astype(dtype))
        n_g += self.sizes[i]
      pad = int(self.seg_tile_ok[g].sum()) * _TILE - n_g
      if pad:
        pieces.append(jnp.zeros((pad,), dtype))
    return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]

  def pad(self, u: jax.Array) -> jax.Array:
    """The padded buffer (``n_pad``,) of ``u``, the leaves already concatenated in leaf order (``n_real``,)
    (``flatten(leaves) == pad(concatenate(leaves))``): zeros appended for one segment, else one gather
    (``padded[p] = u[p + shift(tile)]`` or 0 past the segment's end; static per-tile tables)."""
    if self.num_segments == 1:
      return jnp.pad(u, (0, self.n_pad - self.n_real)) if self.n_pad > self.n_real else u
    p = jnp.arange(self.n_pad, dtype=jnp.int32).reshape(self.num_tiles, _TILE)
    valid = p < jnp.asarray(self.tile_limit)[:, None]
    src = jnp.where(valid, p + jnp.asarray(self.tile_shift)[:, None], 0)
    return jnp.where(valid, u.at[src].get(mode="promise_in_bounds"), jnp.zeros((), u.dtype)).reshape(-1)

  def unpadded_index(self, idx: jax.Array) -> jax.Array:
    """Positions ``idx`` of the padded buffer (real entries only) as positions among the leaves alone."""
    if self.num_segments == 1:
      return idx
    return idx + jnp.asarray(self.tile_shift)[idx // _TILE]

  def flatten_sum(self, addend_leaves, residual_leaves, dtype, how: str) -> jax.Array:
    """``flatten([a + r for a, r in leaves], dtype)`` (each sum in its leaf's dtype) by :func:`_chunked`."""
    pieces = []
    for g, group in enumerate(self.groups):
      n_g = 0
      for i in group:
        pieces.append((addend_leaves[i] + residual_leaves[i]).reshape(-1).astype(dtype))
        n_g += self.sizes[i]
      pad = int(self.seg_tile_ok[g].sum()) * _TILE - n_g
      if pad:
        pieces.append(jnp.zeros((pad,), dtype))
    return _chunked(pieces, how, dtype)

  def seg_reduce(self, v, op: str):
    """Per-segment ``op`` (``'sum'``, ``'min'``, ``'max'``) of per-tile values ``v`` (``num_tiles``, ...)."""
    fn, ident = {"sum": (jnp.sum, 0), "min": (jnp.min, jnp.inf), "max": (jnp.max, -jnp.inf)}[op]
    if self.num_segments == 1:
      return fn(v, axis=0)[None]
    m = v[self.seg_tile_idx]                                    # (segments, tiles per segment, ...)
    ok = self.seg_tile_ok.reshape(self.seg_tile_ok.shape + (1,) * (v.ndim - 1))
    return fn(jnp.where(ok, m, jnp.asarray(ident, v.dtype)), axis=1)

  def per_tile(self, seg_values):
    """Broadcast per-segment values (segments,) to the tiles (num_tiles,)."""
    if self.num_segments == 1:
      return jnp.broadcast_to(seg_values, (self.num_tiles,))
    return seg_values[self.tile_seg]


def _segments(sizes, per_tensor: bool, r_cap: float, min_count: float):
  """Leaf groups sharing a threshold: every leaf together (``per_tensor=False``), else one group per leaf
  whose target count ``size * r_cap`` reaches ``min_count``; runs of consecutive smaller leaves are
  pooled, and a pool still below ``min_count`` joins the next group (the previous one at the end)."""
  n = len(sizes)
  if not per_tensor or n == 1:
    return [list(range(n))]
  groups, pool = [], []
  for i, size in enumerate(sizes):
    if size * r_cap >= min_count:
      if pool and sum(sizes[j] for j in pool) * r_cap < min_count:
        groups.append(pool + [i])          # a small pool joins this leaf
      else:
        if pool:
          groups.append(pool)
        groups.append([i])
      pool = []
    else:
      pool.append(i)
  if pool:
    if sum(sizes[j] for j in pool) * r_cap >= min_count or not groups:
      groups.append(pool)
    else:
      groups[-1] = groups[-1] + pool
  return groups


def _seg_masked_moments(a_tiles, t_tiles, lay: _Layout):
  """Per segment: minimum, mean and variance of ``a - min`` over the entries above their segment's
  threshold, and their number (one pass over ``a`` as ``(tiles, 4096)``)."""
  mask = a_tiles > t_tiles[:, None]
  n_in = lay.seg_reduce(jnp.sum(mask, axis=1, dtype=jnp.float32), "sum")
  cnt = jnp.maximum(n_in, 1.0)
  mn = lay.seg_reduce(jnp.min(jnp.where(mask, a_tiles, jnp.inf), axis=1), "min")
  mn = jnp.where(jnp.isfinite(mn), mn, 0.0)
  m1 = lay.seg_reduce(jnp.sum(jnp.where(mask, a_tiles, 0.0), axis=1), "sum") / cnt
  m2 = lay.seg_reduce(jnp.sum(jnp.where(mask, a_tiles * a_tiles, 0.0), axis=1), "sum") / cnt
  return mn, m1 - mn, jnp.maximum(m2 - m1 * m1, 1e-30), n_in


def _seg_threshold(a_tiles, lay: _Layout, s1, s2, ratio, distribution, stages, first_ratio,
                   final_count: bool = False, bound: int | None = None):
  """:func:`_threshold_from_sums` for every segment at once: ``s1``, ``s2`` (segments,) are the first-stage
  sums; each later stage is one pass over the flat buffer (masked moments per segment).

  ``final_count``: a count-corrected final stage: the stages before it (``stages - 1``, at least 1) aim
  at 4x the target density, and the final stage keeps ``ratio * n / n_in`` of the ``n_in`` entries they
  left (counted in the same pass as its moments) instead of the schedule's fixed fraction, so the
  fitting errors of the earlier stages do not compound into the count (one more pass than ``stages``
  when ``stages`` is 1)."""
  n = jnp.asarray(lay.seg_n, jnp.float32)
  mean = s1 / n
  var = jnp.maximum(s2 / n - mean * mean, 1e-30)
  mn = jnp.zeros_like(mean)
  target = jnp.maximum(jnp.asarray(ratio, jnp.float32) * n, 1.0)

  def first(r):
    return _stage_threshold(distribution, mn, mean, var, r, True)

  def later(t, i_ratio):
    mn, mean, var, n_in = _seg_masked_moments(a_tiles, lay.per_tile(t), lay)
    return jnp.where(n_in > target, _stage_threshold(distribution, mn, mean, var, i_ratio, False), t)

  if not final_count:
    return _stage_schedule(first, later, ratio, stages, first_ratio, bound)

  def final(t):
    mn, mean, var, n_in = _seg_masked_moments(a_tiles, lay.per_tile(t), lay)
    r = jnp.clip(target / jnp.maximum(n_in, 1.0), 1e-6, 0.999)
    return jnp.where(n_in > target, _stage_threshold(distribution, mn, mean, var, r, False), t)

  # the stages before the final one aim at 4x the target (first_ratio at most), so that the final fit
  # sees several times the entries it keeps; stages - 1 of them (at least 1)
  if _is_static(ratio):
    pre_ratio = min(4.0 * ratio, first_ratio)
  else:
    pre_ratio = jnp.minimum(4.0 * jnp.asarray(ratio, jnp.float32), first_ratio)
  pre = max(stages - 1, 1) if isinstance(stages, (int, np.integer)) else jnp.maximum(stages - 1, 1)
  return final(_stage_schedule(first, later, pre_ratio, pre, first_ratio,
                               None if bound is None else max(int(bound) - 1, 1)))


def _seg_floor(t, bmax, lay: _Layout, j):
  """Lower each segment's threshold ``t`` (if needed) so that it selects at least ``j`` (segments,) entries:
  to just below the ``j``-th largest 64-entry block maximum of the segment (each block whose maximum
  exceeds a threshold holds at least one selected entry), as :func:`sidco_compress`'s ``min_count`` does
  for one vector.

  The usual case costs one pass over the n / 64 block maxima (count the blocks above ``t`` per segment);
  only when some segment has fewer than ``j`` such blocks is the ``j``-th largest found, exactly, by a
  search on the float bits (:func:`_search_bits`, under ``lax.cond``; every step when
  :func:`_branch_free`, the same thresholds)."""
  bm = bmax.reshape(lay.num_tiles, _THR_BLOCKS)

  def count_above(tv):
    return lay.seg_reduce(jnp.sum(bm > lay.per_tile(tv)[:, None], axis=1, dtype=jnp.int32), "sum")

  need = count_above(t) < j

  def lowered(t):
    top = _seg_top_bits(bmax, lay)
    floor = _search_bits(lambda tm: _seg_counts(bm, tm, lay, None) >= j[:, None], top, keep_low=True,
                         ways=_SEARCH_WAYS if _count_impl() == "xla" else 2)
    valid = count_above(floor) >= j        # else fewer than j blocks are non-zero: no floor
    return jnp.where(need & valid, jnp.minimum(t, floor), t)

  return _when(jnp.any(need), lowered, t)


def _bisect_bits(ok_fn, top_bits, keep_low: bool):
  """Bisection over the bits of non-negative float32 thresholds in ``[0, top]`` per segment (31 steps).
  ``keep_low``: the largest t with ``ok_fn(t)`` true (true at 0 is assumed, ``ok_fn(top)`` false), else the
  smallest t with ``ok_fn(t)`` true (true at ``top``)."""
  f32 = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)

  def body(_, st):
    lo, hi = st
    mid = lo + (hi - lo) // 2
    ok = ok_fn(f32(mid))
    if keep_low:
      return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  lo, hi = jax.lax.fori_loop(0, 31, body, (jnp.zeros_like(top_bits), top_bits))
  return f32(lo if keep_low else hi)


# How the transforms take their data-dependent steps: SIDCo's estimator (``sidco(exact=False)``: the adaptive
# number of stages, the floor's search when a segment selects fewer than its floor, the ceiling's search and a
# second pack on steps whose payload overflowed) and DGC's second round (Top-k's set on steps where more than
# the payload's capacity exceed the sampled threshold). "cond": a ``while_loop`` over the stages and
# ``lax.cond``s, which skip that work on the steps that do not need it; on a GPU each returns a predicate to the
# host, which waits for the device there and can no longer queue the rest of the step ahead of it. "where": no
# host round trip: the stages unrolled up to their static bound and masked, the floor, the ceiling and DGC's
# second round computed every step and selected elementwise: the same payloads and thresholds bitwise, more
# device work per step. "auto" (the default): "where" on GPU, "cond" elsewhere (no host round trips to save on
# the CPU). The conditionals of ACCORDION (rank or density per layer) and of ``density_warmup`` (the stage)
# stay ``lax.cond``s: their branches hold collectives of different sizes, and computing both would send both.
# f32 batch-64 ResNet-50 training step, cost over Adam alone:
# - session 23 (H200, 9 rounds, benchmarks/results/sidco_model_step_h200_s23_est.json): the estimator "cond"
#   +7.76 [6.79, 8.33] ms (10.0 ms of device idle per step in its trace), "where" +1.17 [1.09, 1.21] ms (no idle;
#   kernel time +1.45 against +0.37 ms); per tensor +7.61 -> +1.10 ms. Top-k +0.81 ms.
# - session 24 (H100, 7 rounds, benchmarks/results/sidco_model_step_h100_s24_est2.json): with two fixed stages
#   (no stage loop) the two ``lax.cond``s alone still cost +4.01 ms (3.08 ms idle) against +0.80 ms branch-free;
#   DGC with its ``lax.cond`` +4.23 ms (3.14 ms idle, 0.74 ms of kernels); Top-k +0.98 ms. Second call
#   (benchmarks/results/sidco_model_step_h100_s24_dgc.json): DGC "cond" +5.31 ms (3.55 ms idle) -> "where"
#   +0.53 ms (no idle), the same 0.73 ms of kernels (first version; with the tie fix, session 25,
#   benchmarks/results/sidco_model_step_h100_s25.json: "cond" +4.41 ms -> "where" +0.77 ms, Top-k +0.95 ms).
#   XLA's conditional command buffers do not remove the round
#   trip (sidco_model_step_h100_s24_cmdbuf.json: DGC "cond" +5.39 ms, 5.19 ms idle, with CONDITIONAL listed).
_BRANCHES = "auto"


def _branch_free() -> bool:
  """Whether SIDCo's estimator and DGC's second round run without data-dependent control flow (``_BRANCHES``)."""
  mode = _BRANCHES
  check_choice("_BRANCHES", mode, ("auto", "cond", "where"))
  if mode == "auto":
    return jax.default_backend() == "gpu"
  return mode == "where"


def _when(pred, fn, operand):
  """``fn(operand)`` where the scalar ``pred`` holds, else ``operand`` (a pytree): under ``lax.cond``, which skips
  ``fn`` on the steps that do not need it, or, with :func:`_branch_free`, ``fn`` every step and the result
  selected leaf by leaf (no predicate to the host; the same values)."""
  if _branch_free():
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), fn(operand), operand)
  return jax.lax.cond(pred, fn, lambda x: x, operand)


# How the estimator's ceiling (:func:`_seg_ceiling`) finds each segment's (hi + 1)-th largest magnitude: "search"
# (the bit search), "blocks" (the block select of sidco(exact=True): three small sorts, no pass over the
# buffer) or "auto": "blocks" on GPU, "search" elsewhere. The same thresholds bitwise
# (tests/test_comm_sidco_branch_free.py). CPU (session 23, 4.0M entries in 5 segments, hi = 0.1%, one jitted
# call, median of 7): "blocks" 39.6 ms against 31.3 for "search". H100 (session 24, f32 batch-64 ResNet-50
# training step, branch-free estimator, benchmarks/results/sidco_model_step_h100_s24_est2.json): "blocks" +1.27 ms
# over Adam alone against +1.56 ms for "search". The block select needs a static bound on ``hi`` (the transform
# passes one only when the ratio is not a traced schedule); without one the search runs.
_CEILING = "auto"


# Ways of the threshold searches over the buffer (_seg_exact, _seg_ceiling): 2 is the plain bisection (31
# passes); W > 2 (a power of two) tests W thresholds per pass, ceil(31 / log2 W) passes. The same result
# bitwise (the boundary of a monotone predicate over the float bits). Module-level for the benchmark.
_SEARCH_WAYS = 8
# How a W-way pass counts the entries above W thresholds per tile: "pallas" (one Triton kernel, each tile
# read once; the Pallas interpreter off GPU), "xla" (a fused broadcast-compare-sum: 1.6 ms per pass at 25M
# and 32 thresholds on an H200, far slower than 31 bisection passes), "bisect" (W = 2, one threshold per
# pass) or "auto": "pallas" on GPU, else "bisect".
_COUNT_IMPL = "auto"
# The Pallas count skips the 64-entry blocks whose maximum is below every threshold of the pass (off by
# default: not yet timed on its own).
_COUNT_SKIP = False


def _count_impl(x=None) -> str:
  impl = _COUNT_IMPL
  if impl == "auto":
    impl = "pallas" if (jax.default_backend() == "gpu" and _pallas_pack.available()) else "bisect"
  if impl == "pallas" and x is not None and _varying(x):   # (inside shard_map: see _varying)
    impl = "bisect"
  check_choice("_COUNT_IMPL", impl, ("pallas", "xla", "bisect"))
  return impl


def _search_ways(flat=None) -> int:
  """Ways of a search over the buffer ``flat``: 2 (bisection) unless its passes can count W thresholds at
  once (``_COUNT_IMPL``)."""
  return 2 if _count_impl(flat) == "bisect" else _SEARCH_WAYS


# How the counting search (_EXACT_SEARCH = "counts") runs its passes: "xla" (per pass a fused compare-and-count,
# its sum (per segment: a cumulative sum over the rows) and the two bounds: four or more kernels), "pallas"
# (_pallas_pack.search_pass, per tensor seg_search_pass: one kernel per pass; its programs replay the bounds from
# the earlier passes' totals and add their counts with integer atomics; the Pallas interpreter off GPU) or "auto"
# (the default since session 37: "pallas" compiled on a GPU, "xla" elsewhere). The same thresholds bitwise as
# "xla", in the interpreter (the CPU tests) and on an H100 (session 35: the search kernels compiled, sidco flat and
# per tensor, and the ResNet-50 update over a loop, 0 of 331 arrays differing; benchmarks/search_pass_check.py).
# Sessions 33-34's device rows added their counts with plgpu.atomic_add, which lowers an int32 vector to a float
# add: every count was zero there (_pallas_pack._add_counts). Timings: _EXACT_SEARCH below.
_COUNT_PASS = "auto"
# Ways of the counting search when its passes are Pallas kernels (_COUNT_PASS): ceil(31 / log2 W) passes per
# level. Session 37 (H100, ResNet-50 tree, the update alone with the Pallas writer,
# benchmarks/results/sidco_tree_h100_s37a.json): 16 ways 0.471 ms, 32 ways 0.478, 64 ways 0.502 (a wider pass
# costs more than the pass it saves). The XLA passes use _SEARCH_WAYS.
_PASS_WAYS = 16


def _count_pass_mode(flat) -> tuple[bool, bool]:
  """``(one kernel per counting pass, interpret)`` for :data:`_COUNT_PASS` (one segment:
  :func:`_pallas_pack.search_pass`; several: :func:`_pallas_pack.seg_search_pass`): never inside ``shard_map``
  (:func:`_varying`); ``"auto"`` only compiled on a GPU."""
  check_choice("_COUNT_PASS", _COUNT_PASS, ("auto", "xla", "pallas"))
  if _COUNT_PASS == "xla" or not _pallas_pack.available() or _varying(flat):
    return False, False
  gpu = jax.default_backend() == "gpu"
  if _COUNT_PASS == "auto" and not gpu:
    return False, False
  return True, not gpu


def _search_bits(ok_multi, top_bits, keep_low: bool, ways: int | None = None):
  """The boundary of a monotone predicate over the bits of non-negative float32 thresholds ``[0, top]``,
  per segment: ``ok_multi(t (segments, W)) -> bool (segments, W)``. ``keep_low``: the largest bits ``b`` in
  ``[0, top)`` with ``ok`` true (0 when there is none; ``ok(top)`` false is assumed), else the smallest
  ``b`` in ``[0, top]`` with ``ok`` true (``ok(top)`` true is assumed), returned as float32.

  ``ways == 2`` is :func:`_bisect_bits` (31 one-threshold passes); otherwise each pass tests ``W = ways``
  thresholds spread evenly over the open interval (lo, hi] and keeps the piece holding the boundary:
  ``ceil(31 / log2 W)`` passes, the same answer (the boundary is unique)."""
  if ways is None:
    ways = _search_ways()
  if ways == 2:
    return _bisect_bits(lambda t: ok_multi(t[:, None])[:, 0], top_bits, keep_low)
  bits = int(ways).bit_length() - 1
  if ways < 2 or (1 << bits) != ways:
    raise ValueError(f"_SEARCH_WAYS must be a power of two >= 2, got {ways}.")
  f32 = lambda b: jax.lax.bitcast_convert_type(b, jnp.float32)
  top = top_bits.astype(jnp.int32)
  # invariant: keep_low: lo <= answer < hi; else lo < answer <= hi (lo starts below 0); hi - lo < 2^31 (top is
  # a finite float's bits). The thresholds and the narrowing are the Pallas pass kernel's (_pallas_pack).
  lo0 = jnp.zeros_like(top) if keep_low else jnp.full_like(top, -1)

  def body(_, st):
    lo, hi = st
    mid = _pallas_pack._search_mids(lo, hi, ways)       # (segments, W): lo + floor((hi - lo) j / W); j = W: hi
    return _pallas_pack._search_narrow(lo, hi, mid, ok_multi(f32(mid)), keep_low)

  passes = -(-31 // bits)
  lo, hi = jax.lax.fori_loop(0, passes, body, (lo0, top), unroll=True)   # (no while loop: no host round trips)
  return f32(lo if keep_low else hi)


def _seg_counts(x_tiles, t_multi, lay: _Layout, flat, bmax=None):
  """Per segment and threshold: the number of entries of ``x_tiles`` (``(tiles, L)`` non-negative float32)
  above each of the segment's thresholds ``t_multi`` (segments, W): ``(segments, W)`` int32. ``flat``: the
  buffer ``x_tiles`` is ``|flat|`` of, for the Pallas count kernel (one read per tile); None for other
  arrays (block maxima)."""
  thr = lay.per_tile(t_multi) if lay.num_segments > 1 else jnp.broadcast_to(t_multi, (lay.num_tiles,) + t_multi.shape[1:])
  if _count_impl(flat) == "pallas" and flat is not None and x_tiles.shape[1] == _TILE and t_multi.shape[1] > 1:
    c = _pallas_pack.tile_counts_above(flat, thr, bmax if _COUNT_SKIP else None,
                                       interpret=jax.default_backend() != "gpu")
  else:
    c = jnp.sum(x_tiles[:, :, None] > thr[:, None, :], axis=1, dtype=jnp.int32)
  return lay.seg_reduce(c, "sum")


def _seg_top_bits(bmax, lay: _Layout):
  """Each segment's largest block maximum as int32 float bits (segments,): the top of the bit searches."""
  bm = bmax.astype(jnp.float32).reshape(lay.num_tiles, _THR_BLOCKS)
  return jax.lax.bitcast_convert_type(lay.seg_reduce(jnp.max(bm, axis=1), "max"), jnp.int32)


def _seg_ceiling(t, a_tiles, bmax, lay: _Layout, hi, flat=None, hi_max=None):
  """Raise each segment's threshold ``t`` to the smallest one that selects at most ``hi`` (segments,)
  entries (exact counts): that is the segment's ``(hi + 1)``-th largest magnitude (entries above it are
  among the ``hi`` largest; any lower threshold keeps all ``hi + 1``), found by the block select
  (:func:`_seg_kth_blocks`, three small sorts; ``_CEILING = "blocks"``, needs ``flat`` and the static bound
  ``hi_max``) or by a search on the float bits (:func:`_search_bits`, ``_CEILING = "search"``: 11 counting
  passes over the buffer with the Pallas count, 31 elsewhere). The same bits either way."""
  check_choice("_CEILING", _CEILING, ("auto", "blocks", "search"))
  how = _CEILING if _CEILING != "auto" else ("blocks" if jax.default_backend() == "gpu" else "search")
  if how == "blocks" and flat is not None and hi_max is not None:
    v = _seg_kth_blocks(flat, bmax, lay, jnp.asarray(hi, jnp.int32) + 1, np.asarray(hi_max, np.int64) + 1,
                        below=False)
    return jnp.maximum(t, v)
  top = _seg_top_bits(bmax, lay)
  few_enough = lambda tm: _seg_counts(a_tiles, tm, lay, flat, bmax) <= hi[:, None]
  return jnp.maximum(t, _search_bits(few_enough, top, keep_low=False, ways=_search_ways(flat)))


def _seg_exact(a_tiles, bmax, lay: _Layout, k, flat=None):
  """Per segment the largest threshold that still selects at least ``k`` (segments,) entries, i.e. just below
  the ``k``-th largest magnitude (all non-zero entries of a segment holding fewer): a search on the float
  bits (:func:`_search_bits`), the same bits as :func:`_seg_kth_blocks` with ``ceil(31 / log2 W)`` counting
  passes over the buffer (``_EXACT_SEARCH = "bits"``, the search before session 9; :func:`_seg_trim` then
  cuts magnitudes tied at the ``k``-th back to exactly ``k``)."""
  top = _seg_top_bits(bmax, lay)
  enough = lambda tm: _seg_counts(a_tiles, tm, lay, flat, bmax) >= k[:, None]
  return _search_bits(enough, top, keep_low=True, ways=_search_ways(flat))


# sidco(exact=True)'s selection (issue 18, decided in session 9 from the H200 runs of session 8,
# benchmarks/results/sidco_tree_s8a_h200.json and sidco_tree_cmdbuf_s8c_h200.json: 161-leaf ResNet-50 tree,
# 25.56M float32, ratio 0.001, device time per update): each segment's k-th largest magnitude by the block
# select, no SIDCo fit, the trim's sort skipped without ties, the "dus" buffer: 1.224 ms (0.972 with command
# buffers) against 1.409 ms (1.412) for the fit + bit search of before and 1.675 ms (1.688) for topk; the
# same payloads bitwise over the whole loop. The switches below keep the old path reachable for the
# benchmark's same-run comparison (``bits fit notrimskip two``); every combination sends the same payload
# for the same buffer.
#
# How each segment's k-th largest magnitude is found: "blocks" (:func:`_seg_kth_blocks`: three small sorts,
# of the 64-entry block maxima, of 8-entry sub-block maxima of the candidate blocks and of the candidate
# entries; no pass over the buffer beyond one gather of the candidate blocks), "counts" (:func:`_seg_kth_counts`:
# the same two-level argument with W-way count searches over the block maxima and over the k candidate
# blocks instead of sorts: no cub radix sort, so a jitted update stays one command buffer) or "bits"
# (:func:`_seg_exact`: a W-way search over the float bits, ceil(31 / log2 W) counting passes over the whole
# buffer), or "auto" (the default since session 37: "counts" for one segment where its passes run as compiled
# Pallas kernels (:func:`_count_pass_mode`: on a GPU, outside shard_map), "blocks" otherwise). The same
# thresholds bit for bit.
# Session 15 (H200, XLA passes, 8 ways; benchmarks/results/sidco_counts_s15d_h200.json, _s15e) kept "blocks":
# "counts" was 6% slower inside a device loop, cost more host time called back to back, and per tensor 37% more
# busy time. With one Pallas kernel per pass (_COUNT_PASS) and 16 ways it is faster for one segment in every
# reading of session 37's same-run comparison (H100, ResNet-50 tree, ratio 0.001, the XLA leaf writer;
# benchmarks/results/sidco_tree_h100_s37a.json, sidco_model_step_h100_s37a.json): the update alone 0.578 against
# 1.062 ms, over the shifting loop 1.019 against 1.318 ms per update, back to back from Python 2.97 against
# 3.95 ms, the batch-64 training step +0.219 against +0.260 ms of busy time over Adam; bitwise the same over the
# loop (0 of 331 arrays differing). Per tensor the counting search stays off: +0.478 against +0.294 ms in the
# training step. Session 38's repeat (H100, sidco_tree_h100_s38a.json, sidco_model_step_h100_s38{a,b}.json): the
# update alone 0.573 against 1.055 ms (flat_state=True, its first timing: 0.536 against 0.907); in the training step
# lower by the wall median and by the compressor's own kernels in every pair of two runs, the 0.1% recipe's raveled
# final stage included (run a's whole busy time ordered the tree pair the other way, 0.248 against 0.175 ms, within
# the step's spread between rows).
_EXACT_SEARCH = "auto"


def _exact_search(flat, num_segments: int) -> str:
  """:data:`_EXACT_SEARCH` resolved for a buffer of ``num_segments`` segments ("auto": "counts" for one segment
  whose counting passes run as compiled Pallas kernels, else "blocks")."""
  check_choice("_EXACT_SEARCH", _EXACT_SEARCH, ("auto", "blocks", "counts", "bits"))
  if _EXACT_SEARCH != "auto":
    return _EXACT_SEARCH
  fused, interp = _count_pass_mode(flat)
  return "counts" if num_segments == 1 and fused and not interp else "blocks"


# Whether SIDCo's fit runs first with exact counts (True, the path before session 9: the fit aims at
# ``overshoot * k``, and the search runs under ``lax.cond`` only on the steps where the fit missed the band
# [k, capacity]) or the search alone decides every step (False: the same payload, since the correction
# stage sends the k largest either way; no fit passes and no conditional, which on GPU syncs the host
# unless command buffers are on).
_EXACT_FIT = False
_SUB = 8   # entries per sub-block in _seg_kth_blocks's second level
# _seg_kth_blocks's third level with one segment: a sort of the keys alone (only the k-th value is read, not
# its slot: no payload to move) instead of the (key, slot) sort. The same threshold.
_KTH_KEYS_ONLY = False
# Skip the correction stage's sort (under lax.cond) on steps where no segment selected more than its k: the
# payload's first slots are then the answer (the same payload). With the search's thresholds only ties at
# the cut select more than k. Read only with _TRIM = "sort".
_TRIM_SKIP = True
# How the exact path cuts a segment that selected more than its k (magnitudes tied at the k-th largest) back
# to Top-k's set: "quota" (:func:`_seg_quota`: the entries above the k-th largest plus the first
# ``k - #above`` tied ones in index order, counted by prefix sums over the payload's slots; no sort, no
# ``lax.cond``) or "sort" (:func:`_seg_trim`: one sort of the payload's slots, under ``lax.cond`` with
# ``_TRIM_SKIP``; the path of sessions 8-9). The same payload bitwise. H200, ResNet-50 tree, ratio 0.001:
# 0.877 ms per update against 1.016 / 1.010 with "sort" (two runs, benchmarks/results/sidco_tree_s10a_h200.json,
# s10b: the conditional's idle gap, 0.23 ms, mostly gone).
_TRIM = "quota"


def _seg_first_k_slots(vals, seg_sizes, k, k_cap):
  """Per segment, the slots of its ``k_cap`` largest values (ties to the lower slot), concatenated.

  ``vals`` (m,) non-negative float32 laid out as consecutive runs of static lengths ``seg_sizes`` (one
  run per segment); ``k_cap`` (static, per segment) at most the run's length. Returns ``(slots (sum
  k_cap,), ok (sum k_cap,))``: ``ok`` is false for the positions at or past the segment's (maybe traced)
  ``k``. One stable sort (one segment) or two (several): :func:`_sort_seg_desc`, whose sorted runs start
  at the static offsets of the segments."""
  num = len(seg_sizes)
  m = vals.shape[0]
  slot = jnp.arange(m, dtype=jnp.int32)
  if num == 1:
    seg = jnp.zeros((m,), jnp.int32)
  else:
    seg = jnp.asarray(np.repeat(np.arange(num, dtype=np.int32), seg_sizes))
  _, slot_s = _sort_seg_desc(seg, vals, slot, num)
  starts = np.concatenate([[0], np.cumsum(seg_sizes)[:-1]])
  take = np.concatenate([s0 + np.arange(c) for s0, c in zip(starts, k_cap)]).astype(np.int32)
  rank = np.concatenate([np.arange(c) for c in k_cap]).astype(np.int32)
  owner = np.repeat(np.arange(num, dtype=np.int32), k_cap)
  ok = jnp.asarray(rank) < jnp.asarray(k, jnp.int32)[owner]
  return slot_s[take], ok


def _seg_kth_blocks(flat, bmax, lay: _Layout, k, k_max, below: bool = True):
  """Per segment the largest threshold that still selects at least ``k`` (segments,) entries of
  ``|flat|``: the float just below the segment's ``k``-th largest magnitude (0 when that is 0), the same
  bits as :func:`_seg_exact`'s search, found without a counting pass over the buffer (``below=False``: the
  ``k``-th largest magnitude itself).

  Every one of a segment's ``k`` largest entries lies in a 64-entry block whose maximum is among the
  segment's ``k`` largest block maxima (ties to the lower block: a block holding a top-``k`` entry has a
  maximum at least the ``k``-th largest magnitude, and at most ``k`` blocks do, or the tied ones of lower
  index hold enough of the tied entries), so the ``k``-th largest magnitude of those blocks is the
  segment's. Three levels of that argument: a sort of the n / 64 block maxima picks ``k`` blocks per
  segment; a sort of their 8-entry sub-block maxima picks ``k`` sub-blocks; a sort of those ``8 k``
  entries gives the ``k``-th. ``k_max`` (static, per segment) bounds a traced ``k``; the positions past
  ``k`` hold zeros, which cannot change a ``k``-th largest of non-negative values."""
  nb = bmax.shape[0]
  a = jnp.abs(flat).astype(jnp.float32).reshape(nb, _BLOCK)
  k_max = np.asarray(k_max, np.int64)
  nblk = lay.seg_tile_ok.sum(axis=1).astype(np.int64) * _THR_BLOCKS
  # level 1: k blocks per segment (a segment's blocks are one run of the buffer; padding blocks hold 0)
  c1 = np.minimum(k_max, nblk)
  blk, ok1 = _seg_first_k_slots(bmax.astype(jnp.float32), nblk, k, c1)
  rows = jnp.where(ok1[:, None], a[blk], 0.0)                               # (sum c1, 64)
  # level 2: k sub-blocks of 8 per segment among those blocks
  sub = rows.reshape(-1, _SUB)
  c2 = np.minimum(k_max, c1 * (_BLOCK // _SUB))
  sb, ok2 = _seg_first_k_slots(jnp.max(sub, axis=1), c1 * (_BLOCK // _SUB), k, c2)
  ent = jnp.where(ok2[:, None], sub[sb], 0.0).reshape(-1)                   # (sum c2 * 8,)
  # level 3: the k-th largest entry per segment
  c3 = c2 * _SUB
  if _KTH_KEYS_ONLY and len(c3) == 1:   # only the k-th value: sort the magnitudes' bits descending, no slots
    desc = jnp.uint32(0x7FFFFFFF) - jax.lax.bitcast_convert_type(ent, jnp.uint32)
    d_s = jax.lax.sort(desc)
    kd = d_s[jnp.clip(jnp.asarray(k, jnp.int32), 1, int(c3[0])) - 1]
    bits = jax.lax.bitcast_convert_type(jnp.uint32(0x7FFFFFFF) - kd, jnp.int32)
  else:
    seg3 = np.repeat(np.arange(len(c3), dtype=np.int32), c3)
    _, slot_s = _sort_seg_desc(jnp.asarray(seg3) if len(c3) > 1 else jnp.zeros((ent.shape[0],), jnp.int32),
                               ent, jnp.arange(ent.shape[0], dtype=jnp.int32), len(c3))
    start3 = np.concatenate([[0], np.cumsum(c3)[:-1]]).astype(np.int32)
    pos = jnp.asarray(start3) + jnp.clip(jnp.asarray(k, jnp.int32), 1, jnp.asarray(c3, jnp.int32)) - 1
    bits = jax.lax.bitcast_convert_type(ent[slot_s[pos]], jnp.int32)
  if not below:   # k above c3 only when c3 is the whole padded segment: fewer than k entries, the k-th is 0
    kth = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(jnp.asarray(k, jnp.int32) > jnp.asarray(c3, jnp.int32), 0.0, kth)
  return jax.lax.bitcast_convert_type(jnp.maximum(bits - 1, 0), jnp.float32)


# The handoff between _seg_kth_counts's two levels for one segment with the Pallas passes: "pallas" (the default
# since session 40: :func:`_pallas_pack.kth_blocks`, two kernels) or "xla" (two prefix sums over the block maxima
# and :func:`compact`, ~10 kernels). The same blocks in the same order (0 of 331 / 171 arrays differing over the
# benchmark's loop on an H100). Session 40 (H100, ResNet-50 tree, ratio 0.001; benchmarks/results/
# sidco_tree_h100_s40b.json, sidco_model_step_h100_s40{a,b}.json): the update alone 0.573 -> 0.535 ms (2.88x ->
# 3.09x topk), flat_state=True 0.534 -> 0.496 (3.09x -> 3.33x); in the f32 batch-64 training step, kernel time over
# Adam 0.149 -> 0.114 ms and 0.195 -> 0.136 (two runs), flat_state=True 0.176 -> 0.105. Only where the counting
# passes are Pallas kernels (_COUNT_PASS: on a GPU by default), one segment.
_KTH_LIST = "pallas"


def _seg_kth_counts(flat, bmax, lay: _Layout, k, k_max):
  """:func:`_seg_kth_blocks`'s thresholds (the float just below each segment's ``k``-th largest magnitude,
  0 when that is 0) by counting searches instead of sorts: no radix sort, so on GPU a jitted update stays
  one command buffer (cub's sort runs outside XLA's command buffers and splits them; the host then updates
  the second one while the device waits: 1.4-2.4 ms of idle device time in a jitted update of the ResNet-50
  tree, benchmarks/results/sidco_gap_s15a_h200.json, sidco_train_s15c_h200.json).

  Level 1: a W-way search over the float bits (:func:`_search_bits`) on the n / 64 block maxima finds
  ``t1``, just below the segment's ``k``-th largest block maximum ``T1``. Every entry above the segment's
  ``k``-th largest magnitude ``v_k >= T1`` lies in a block whose maximum is ``>= T1``. The blocks above
  ``T1`` (fewer than ``k``) and the lowest-index blocks equal to ``T1``, up to ``k`` blocks in all, are
  packed in block order (:func:`compact`: no sort, no scatter). Level 2: the same search over those blocks'
  entries. For every threshold ``t`` the count of candidates above ``t`` reaches ``k`` exactly when the
  buffer's does (for ``t >= T1`` both count the same entries, since an entry above ``t`` lies in a block
  whose maximum is above ``T1``; below, ``k`` candidate blocks each hold one entry ``>= T1 > t``; a segment
  with fewer than ``k`` non-zero blocks has every non-zero block as a candidate, so both count the same
  entries for every ``t >= 0``), so the boundary, the answer, is the same bits as :func:`_seg_exact`'s.
  ``k`` (maybe traced) must lie in ``[1, k_max]``: at most ``min(k_max, blocks)`` blocks per segment are
  packed. Per-segment sums are per-tile sums and :meth:`_Layout.seg_reduce`, or prefix-sum differences
  over the packed blocks (which run segment by segment; the slots past the packed count come last and are
  zero): deterministic, no scatter. Counts stay far below 2^31 (at most 64 entries per packed block).
  NaN entries are never counted (as in :func:`_seg_exact`; a non-finite buffer's payload is not sent)."""
  nb = bmax.shape[0]
  num = lay.num_segments
  nt = lay.num_tiles
  a = jnp.abs(flat).astype(jnp.float32).reshape(nb, _BLOCK)
  bm = bmax.astype(jnp.float32)
  bm_rows = bm.reshape(nt, _THR_BLOCKS)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (num,))
  k_max = np.asarray(k_max, np.int64)
  nblk = lay.seg_tile_ok.sum(axis=1).astype(np.int64) * _THR_BLOCKS                # blocks per segment
  seg_b = jnp.asarray(np.repeat(lay.tile_seg, _THR_BLOCKS))                         # (nb,) static
  per_block = (lambda v: jnp.broadcast_to(v[0], (nb,))) if num == 1 else (lambda v: v[seg_b])
  tile_sum = lambda m: lay.seg_reduce(jnp.sum(m.reshape(nt, _THR_BLOCKS), axis=1, dtype=jnp.int32), "sum")
  top = _seg_top_bits(bmax, lay)
  fused, interp = _count_pass_mode(flat)
  ways = _PASS_WAYS if fused else _SEARCH_WAYS

  def kernel_search(x_rows, row_seg, lo_bits=0):
    """The search over ``x_rows`` (rows of 64; row ``r`` in segment ``row_seg[r]``) one kernel per pass: one
    segment's rows as one 1-D array, several segments' counts added by atomics."""
    if num == 1:
      return _pallas_pack.search_bits(x_rows.reshape(-1), k[0], top[0], jnp.reshape(lo_bits, (-1,))[0], ways=ways,
                                      interpret=interp)[None]
    return _pallas_pack.seg_search_bits(x_rows, row_seg, k, top, lo_bits, ways=ways, interpret=interp)

  # level 1 (block maxima above each threshold: _seg_counts's fused compare-and-sum over the (tiles, 64) maxima)
  if fused:
    t1 = kernel_search(bm_rows, jnp.asarray(lay.tile_seg, jnp.int32))
  else:
    t1 = _search_bits(lambda tm: _seg_counts(bm_rows, tm, lay, None) >= k[:, None], top, keep_low=True,
                      ways=ways)
  # T1 (the smallest denormal when t1 = 0 has fewer than k blocks above it: then no block ties it)
  big1 = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(t1, jnp.int32) + 1, jnp.float32)
  m1 = int(np.minimum(k_max, nblk).sum())                                           # >= blocks selected
  check_choice("_KTH_LIST", _KTH_LIST, ("xla", "pallas"))
  if num == 1 and fused and _KTH_LIST == "pallas":   # (the same ids and count in two kernels)
    blk, n_rows = _pallas_pack.kth_blocks(bm, big1[0], k[0], m1, interpret=interp)
  else:
    gt = bm > per_block(big1)
    eq = bm == per_block(big1)
    n_gt = tile_sum(gt)
    c_eq = jnp.cumsum(eq.astype(jnp.int32))
    seg_b0 = np.concatenate([[0], np.cumsum(nblk)[:-1]]).astype(np.int32)           # a segment's first block
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), c_eq])[jnp.asarray(seg_b0)]
    sel = gt | (eq & (c_eq - per_block(before) <= per_block(k - n_gt)))
    packed = compact(bm, sel, m1)
    blk, n_rows = packed.indices, packed.count
  rows = jnp.where((jnp.arange(m1) < n_rows)[:, None], a[blk], 0.0)               # (m1, 64)
  if num == 1:
    count2 = lambda tm: jnp.sum(jnp.sum(rows[:, :, None] > tm[0][None, None, :], axis=1, dtype=jnp.int32),
                                axis=0)[None]
  else:
    n_sel = tile_sum(sel)
    ends = jnp.cumsum(n_sel)
    row_seg = jnp.asarray(lay.tile_seg)[blk // _THR_BLOCKS]

    def count2(tm):
      c = jnp.sum(rows[:, :, None] > tm[row_seg][:, None, :], axis=1, dtype=jnp.int32)   # (m1, W)
      cs = jnp.concatenate([jnp.zeros((1, c.shape[1]), jnp.int32), jnp.cumsum(c, axis=0)])
      return cs[ends] - cs[ends - n_sel]
  # level 2: the k-th largest entry of each segment's candidate blocks
  # (the kernels start from t1: at least k candidate entries lie above it, each candidate block holding one >= T1;
  # their passes stop reading once the bounds close, the same answer; the slots past the packed count are zero
  # rows, which never count)
  if fused:
    return kernel_search(rows, None if num == 1 else row_seg, jax.lax.bitcast_convert_type(t1, jnp.int32))
  return _search_bits(lambda tm: count2(tm) >= k[:, None], top, keep_low=True, ways=ways)


def _payload_segments(payload: SparsePayload, lay: _Layout):
  """Segment of every payload slot (``num_segments`` for the slots past ``count``) and the number of
  valid slots per segment."""
  cap = payload.indices.shape[0]
  valid = jnp.arange(cap) < payload.count
  if lay.num_segments == 1:
    seg = jnp.zeros((cap,), jnp.int32)
  else:   # every 4096-entry tile lies in one segment: a gather from the static tile -> segment table
    tile = jnp.clip(payload.indices // _TILE, 0, lay.num_tiles - 1)
    seg = jnp.asarray(lay.tile_seg, jnp.int32)[tile]
  seg = jnp.where(valid, seg, lay.num_segments)
  counts = jnp.zeros((lay.num_segments + 1,), jnp.int32).at[seg].add(1)[:-1]
  return seg, counts


# How _seg_trim orders the payload's slots by (segment, magnitude descending, slot): "radix" (stable
# one-key sorts of 32-bit keys with the slot as payload: radix sorts on GPU) or "lexsort" (one 3-key sort).
_TRIM_SORT = "radix"
# The key of the second stable sort of :func:`_sort_seg_desc` (several segments; the block select's three
# levels with ``per_tensor=True``, and the sort trim): "int32" or "narrow" (uint8 below 255 segments, else
# uint16 below 65535: a radix sort of 1 or 2 byte-digit passes instead of 4, if XLA's sort rewriter takes the
# narrow key to cub: it does, per tensor 36 sort kernels 0.243 ms -> 27, 0.174 ms). The same order.
# per_tensor=True with quota and fill: 0.828 / 0.820 ms against 0.931 / 0.917 (sidco_tree_s10a/b_h200.json).
_SEG_KEY = "narrow"


def _sort_seg_desc(seg, a, slot, num_segments: int):
  """``(seg, slot)`` sorted by segment, then magnitude ``a`` (non-negative float32) descending, then slot:
  the order of ``lax.sort((seg, -a, slot), num_keys=3)`` (for a's without NaN; a NaN step is never sent),
  from stable sorts of one 32-bit key each (the magnitude key is the bitwise complement of a's bits)."""
  if _TRIM_SORT == "lexsort":
    seg_s, _, slot_s = jax.lax.sort((seg, -a, slot), num_keys=3)
    return seg_s, slot_s
  desc = jnp.uint32(0x7FFFFFFF) - jax.lax.bitcast_convert_type(a, jnp.uint32)   # a >= 0: bits < 2^31
  if num_segments == 1:   # seg is 0 or 1 (past count): one key (seg, desc) in 32 bits
    key = (seg.astype(jnp.uint32) << 31) | (desc & jnp.uint32(0x7FFFFFFF))
    key_s, slot_s = jax.lax.sort((key, slot), num_keys=1, is_stable=True)
    return (key_s >> 31).astype(jnp.int32), slot_s
  _, slot_1 = jax.lax.sort((desc, slot), num_keys=1, is_stable=True)
  check_choice("_SEG_KEY", _SEG_KEY, ("int32", "narrow"))
  key = seg[slot_1]
  if _SEG_KEY == "narrow" and num_segments < 65535:   # (values 0..num_segments: past-count slots included)
    key = key.astype(jnp.uint8 if num_segments < 255 else jnp.uint16)
  seg_s, slot_s = jax.lax.sort((key, slot_1), num_keys=1, is_stable=True)
  return seg_s.astype(jnp.int32), slot_s


def _seg_trim(payload: SparsePayload, t, lay: _Layout, k, capacity: int):
  """SIDCo's correction stage to the exact target count: every segment holding more than ``k`` (segments,)
  selected entries keeps exactly its ``k`` largest, ordered as ``lax.top_k`` orders them (by magnitude,
  ties to the lower index), found by one sort of the payload's slots (not of the gradient); the survivors
  are repacked, in index order, into ``capacity`` slots.

  Returns ``(payload, t, tie_last)``: the new payload holds exactly the entries of the old one with
  ``|x| > t[s]``, or ``|x| == t[s]`` and index ``<= tie_last[s]`` (``s`` the entry's segment; ``tie_last``
  is -1 for the segments left as they were), so the transform can name what was sent entry by entry."""
  seg, counts = _payload_segments(payload, lay)
  cap = payload.indices.shape[0]
  a = jnp.abs(payload.values).astype(jnp.float32)
  slot = jnp.arange(cap, dtype=jnp.int32)          # slots are in index order: ties go to the lower index
  seg_s, slot_s = _sort_seg_desc(seg, a, slot, lay.num_segments)
  first = jnp.searchsorted(seg_s, jnp.arange(lay.num_segments, dtype=jnp.int32), side="left",
                           method="sort").astype(jnp.int32)
  kth = slot_s[jnp.clip(first + k - 1, 0, cap - 1)]          # slot of the k-th largest of the segment
  trim = counts > k
  t = jnp.where(trim, a[kth], t)
  tie_last = jnp.where(trim, payload.indices[kth], -1)
  t_slot = jnp.concatenate([t, jnp.full((1,), jnp.inf, jnp.float32)])[seg]
  tie_slot = jnp.concatenate([tie_last, jnp.full((1,), -1, jnp.int32)])[seg]
  keep = (a > t_slot) | ((a == t_slot) & (payload.indices <= tie_slot))
  p = compact(payload.values, keep, capacity)
  idx = jnp.where(jnp.arange(capacity) < p.count, payload.indices[p.indices], 0).astype(jnp.int32)
  return SparsePayload(idx, p.values, p.count, payload.overflow), t, tie_last


def _seg_quota(payload: SparsePayload, t, lay: _Layout, k, capacity: int):
  """SIDCo's correction stage to the exact target count without a sort: Top-k's set of every segment.

  ``t`` (segments,) is the float just below each segment's ``k``-th largest magnitude ``v`` (as
  :func:`_seg_kth_blocks` and :func:`_seg_exact` return it; 0 when ``v`` is 0), and ``payload`` holds, in
  index order, the entries with ``|x| > t`` (the first of them when it overflowed). Top-k (``lax.top_k``:
  magnitude descending, ties to the lower index) keeps every entry with ``|x| > v`` and the first
  ``k - #{|x| > v}`` entries with ``|x| == v`` in index order. A segment's slots are one run of the payload
  (its entries are one run of the flat buffer), so both counts are differences of two prefix sums over the
  slots at the segment's first slot (a search of the segment starts among the indices); the kept slots
  are scattered to ``capacity`` slots in order. No sort, no ``lax.cond``, deterministic. A segment that
  selected at most ``k`` keeps everything (its quota covers all its ties, whatever ``v`` is), so ``v``
  need not be the ``k``-th largest there (e.g. the next float above 0 when ``t`` is 0). After an
  overflow a segment's slots are a prefix (in index order) of its selection, and the rule keeps the
  ``k`` largest of those, as :func:`_seg_trim` does.

  Returns ``(payload, v, tie_last)`` with :func:`_seg_trim`'s meaning: the new payload holds exactly the
  entries of the old one with ``|x| > v[s]``, or ``|x| == v[s]`` and index ``<= tie_last[s]`` (``-1`` when
  the segment kept no tied entry)."""
  cap = payload.indices.shape[0]
  num = lay.num_segments
  slot = jnp.arange(cap, dtype=jnp.int32)
  valid = slot < payload.count
  v = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.int32) + 1,
                                   jnp.float32)
  a = jnp.abs(payload.values).astype(jnp.float32)
  if num == 1:
    seg = jnp.zeros((cap,), jnp.int32)
    first = jnp.asarray([0, cap], jnp.int32)
  else:   # the first slot of every segment (and the end): the payload's indices are increasing
    idx_v = jnp.where(valid, payload.indices, lay.n_pad)
    bounds = jnp.asarray(np.append(lay.seg_start, lay.n_pad).astype(np.int32))
    first = jnp.searchsorted(idx_v, bounds, side="left", method=_SEARCH_METHOD).astype(jnp.int32)
    seg = jnp.asarray(lay.tile_seg, jnp.int32)[jnp.clip(payload.indices // _TILE, 0, lay.num_tiles - 1)]
  v_slot = v[seg]
  above = valid & (a > v_slot)
  tie = valid & (a == v_slot)
  # one prefix sum of both flags, (cap + 1, 2) exclusive: above and tied entries before each slot
  c = jnp.concatenate([jnp.zeros((1, 2), jnp.int32),
                       jnp.cumsum(jnp.stack([above, tie], axis=1).astype(jnp.int32), axis=0)])
  c_above, c_tie = c[:, 0], c[:, 1]
  n_above = c_above[first[1:]] - c_above[first[:-1]]
  tie0 = c_tie[first[:-1]]
  n_tie = c_tie[first[1:]] - tie0
  quota = jnp.maximum(jnp.asarray(k, jnp.int32) - n_above, 0)
  kept_ties = jnp.minimum(quota, n_tie)
  tie_rank = c_tie[1:] - tie0[seg]                     # tied entries of the slot's segment up to it, inclusive
  keep = above | (tie & (tie_rank <= quota[seg]))
  # the last kept tied entry of every segment: the slot where the tie count reaches tie0 + kept ties
  last_slot = jnp.searchsorted(c_tie[1:], tie0 + kept_ties, side="left", method=_SEARCH_METHOD)
  tie_last = jnp.where(kept_ties > 0, payload.indices[jnp.clip(last_slot, 0, cap - 1)], -1).astype(jnp.int32)
  # the kept slots up to each one (inclusive), without a third prefix sum: the above ones, the kept ties of
  # the earlier segments and those of its own segment up to it
  ties_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(kept_ties)[:-1]])
  incl = c_above[1:] + ties_before[seg] + jnp.minimum(tie_rank, quota[seg])
  dst = jnp.where(keep, incl - 1, capacity)
  idx = jnp.zeros((capacity,), jnp.int32).at[dst].set(payload.indices.astype(jnp.int32), mode="drop",
                                                      unique_indices=True)
  vals = jnp.zeros((capacity,), payload.values.dtype).at[dst].set(payload.values, mode="drop",
                                                                  unique_indices=True)
  count = jnp.minimum(jnp.sum(n_above) + jnp.sum(kept_ties), capacity).astype(jnp.int32)
  return SparsePayload(idx, vals, count, payload.overflow), v, tie_last


# Packing of the transforms' flat buffer: "auto" (Pallas on GPU), "xla" or "pallas" (tests set it).
_TRANSFORM_PACKING = "auto"
# How the segmented transforms (sidco) write every leaf's residual and output from the flat buffer: "xla"
# (one elementwise fusion per leaf; the finiteness select in ``update_fn`` reads the old residual) or
# "pallas" (:func:`_pallas_pack.write_leaves`: a few kernels for all leaves, the old residual read only on a
# non-finite step); "auto": Pallas where the packing would use it (GPU, outside shard_map), when every leaf
# has the buffer's dtype and there is no momentum (whose mask tree stays elementwise). The same bits.
# "pallas_inplace" / "auto_inplace" (token pwritei): the writer's residuals aliased to the old residual leaves
# (no copy into a loop's carried state; outside a loop a donated state is written in place, an undonated one is
# copied first by XLA). "pallas_res" / "auto_res" (token pwriter): the writer writes the residuals in place and
# the outputs stay per-leaf XLA fusions (which a consumer such as Adam's update can absorb). All bitwise equal.
# The default stays "xla", measured on the step users run (benchmarks/results/sidco_chain_s14f_h200.json, H200):
# chain(sidco(0.001), adam) kernel time per step 1.012 ms with "auto_inplace" against 0.882 with "xla" and 0.880
# with the residual-only writer (the Pallas writer's outputs are materialized, XLA's per-leaf outputs fuse into
# Adam's update); the standalone update favours "auto_inplace" (loop 0.663-0.718 ms against 0.740-0.896, four
# runs, sidco_tree_s14{a,b,c,d}_h200.json).
_OUT_WRITE = "xla"
_OUT_WRITES = ("auto", "auto_inplace", "auto_res", "pallas", "pallas_inplace", "pallas_res", "xla")


# How sidco builds its padded error-compensated buffer and the statistics pass over it: "xla" (the leafwise sums
# written by XLA into one buffer, ``_SUM_FLATTEN`` / ``_FLAT_BUILD``, then the Pallas statistics kernel reads it
# again) or "pallas" (:func:`_pallas_pack.sum_leaves`: one kernel per group of leaves writes the buffer tile by
# tile and the tile's statistics from the values it holds: the gradient and the residual read once, the buffer
# written once, no second read). Either Pallas choice applies only where the statistics are Pallas kernels
# (``_TRANSFORM_PACKING``; outside shard_map), every leaf and the residual of one float32 dtype and no leaf
# empty; "auto" only compiled (GPU), "pallas" also in the interpreter (tests), and "auto" only where the addends are
# the gradients as handed in (no ``precondition``, no momentum: the configurations timed). The same buffer and
# statistics bitwise (tests/test_comm_sum_build.py).
# Default "auto" since session 31 (H100, f32 batch-64 ResNet-50 training step, wall over Adam alone, 7 rounds,
# benchmarks/results/sidco_model_step_h100_s31b.json): sidco +0.209 -> +0.075 ms, per tensor +0.321 -> +0.173,
# flat_state +0.174 -> -0.003, per tensor flat_state +0.272 -> +0.110, against topk's +0.952. In an update-alone
# loop whose gradient is computed inside it (sidco_tree.py) it is slower (0.808 -> 1.119 ms): the kernel reads
# materialized gradients, where XLA's build fuses the gradients' producers.
_SUM_BUILD = "auto"


# sidco(flat_state=True) with one segment (per_tensor=False), where the Pallas sum kernel builds the buffer
# (``_SUM_BUILD``): how the new flat residual is written. "xla": ``where(finite, where(sent, 0, acc), old)``, one
# fusion reading the buffer and the old residual; "pallas": :func:`_pallas_pack.kept_from_padded` into a fresh
# vector (the old residual read only on a non-finite step); "pallas_inplace": the same kernel over the old residual
# (aliased: a donated or loop-carried state is written where it lies, an undonated one copied first by XLA). (With
# per-tensor segments the kernel in place is the only form.) The same bits. "buffer": the residual is KEPT in the
# padded layout (``state.residual`` has the buffer's ``n_pad`` entries, the real ones first, zeros after; read at
# init, so set it before ``init``), and the new residual is the buffer itself with its sent entries zeroed, in its
# own memory (:func:`_pallas_pack.zero_sent`: only the blocks that can hold a sent entry are read and written),
# instead of a pass that reads the buffer and the old residual and writes every entry; the per-leaf outputs are
# then computed from the gradient and the old residual (bitwise the buffer's entries) so that nothing else reads
# the buffer after it is overwritten. One segment (per_tensor=False); the same bits in the real entries.
# H100 (session 41, sidco_tree_h100_s41a.json): the update alone 0.499 -> 0.620 ms with "buffer" (the 161 output
# fusions from gradient + residual cost more than zero_sent's 17 us saves against the 99-us fusion), 0.404 ms (4.11x
# topk) with "buffer" and _FLAT_OUT = "pallas"; slower over a loop and in the training step
# (sidco_model_step_h100_s41a.json: +0.213 ms of kernel time over Adam against +0.131), so not the default. Most of
# that (+67 us, the trace's copy kernels) is XLA copying the buffer into the donated residual, since the step's
# new residual must come back in the old one's memory; "pallas" pays the same copy, "pallas_inplace" does not.
_FLAT_KEPT = "xla"
# and how its per-leaf outputs are written: "xla" (one ``where(sent, v, 0)`` fusion per leaf, reading the buffer;
# a consumer such as Adam's update absorbs them) or "pallas" (:func:`_pallas_pack.write_sent`: every leaf in a few
# kernels that read only the blocks whose maximum reaches the threshold, a few percent of the buffer at ratio
# 0.001). Only without an axis (with one the outputs are the all-gathered mean) and without momentum. The same bits.
# Timed in sessions 40-41 (docs/comm.md): faster alone with _FLAT_KEPT = "buffer" (above), a loss in the training
# step (XLA fuses its own outputs into Adam's update); the defaults stay XLA's.
_FLAT_OUT = "xla"


def _sum_build_mode(addends, residual, dtype, computed: bool = False) -> tuple[bool, bool]:
  """``(use sum_leaves, interpret)`` for :data:`_SUM_BUILD` (``residual``: its leaves, or the flat vector).
  ``computed``: the addends are computed inside the transform (a ``precondition``'s output, DGC's velocity),
  which XLA's build fuses and the kernel would read materialized: "auto" keeps the XLA build then (not timed)."""
  check_choice("_SUM_BUILD", _SUM_BUILD, ("xla", "pallas", "auto"))
  rs = residual if isinstance(residual, (list, tuple)) else [residual]
  if (_SUM_BUILD == "xla" or (computed and _SUM_BUILD == "auto") or not _pallas_pack.available()
      or _PALLAS_STATS != "pallas"
      or jnp.dtype(dtype) != jnp.float32 or any(jnp.result_type(x) != dtype for x in list(addends) + list(rs))
      or any(x.size == 0 for x in addends)):
    return False, False
  use, interp = _pallas_mode(_TRANSFORM_PACKING, rs[0])   # (only where the statistics are the Pallas kernel's)
  if not use or (interp and _SUM_BUILD == "auto") or any(_varying(x) for x in addends):
    return False, False
  return True, interp


def _write_mode(flat, leaves, momentum: float) -> tuple[bool, bool]:
  """``(use the Pallas leaf writer, interpret)`` for :data:`_OUT_WRITE`."""
  check_choice("_OUT_WRITE", _OUT_WRITE, _OUT_WRITES)
  if (_OUT_WRITE == "xla" or momentum > 0 or not _pallas_pack.available()
      or any(jnp.result_type(l) != flat.dtype or l.size == 0 for l in leaves)):
    return False, False
  return _pallas_mode("auto" if _OUT_WRITE.startswith("auto") else "pallas", flat)


def _sidco_segments(flat, lay: _Layout, ratio, capacity, distribution, stages, first_ratio, min_count,
                    max_count=None, packing: str = "auto", exact=None, stage_bound: int | None = None,
                    max_count_bound=None, stats=None):
  """SIDCo on the flat buffer of a whole tree: one statistics pass (per-tile sums, per-block maxima),
  per-segment thresholds, the floor, and one packing of every segment into one shared payload.
  Returns ``(payload, n_above, thresholds (segments,), finite)``: ``finite`` says that every entry of
  ``flat`` is finite (from the statistics pass); when it is False the payload must not be sent.

  ``exact = (k (segments,), send_capacity, k_max (static, segments,))``: exact counts, Top-k's set of
  every segment (ties to the lower index) in a payload of ``send_capacity`` slots. Each segment's threshold
  is the float just below its ``k``-th largest magnitude (:func:`_seg_kth_blocks`, or :func:`_seg_exact`
  with ``_EXACT_SEARCH = "bits"``); no SIDCo fit (``ratio``, ``distribution``, ``stages``, ``first_ratio``
  and ``min_count`` are not read), the payload is packed once, and :func:`_seg_trim` cuts a segment that
  selected more than its ``k`` (magnitudes tied at the cut) back to its ``k`` largest, under ``lax.cond``
  (``_TRIM_SKIP``), or with ``_TRIM = "quota"`` :func:`_seg_quota` does (prefix counts over the payload's
  slots, no sort, no conditional; the same payload). The fifth value returned is then the per-segment
  ``tie_last`` of :func:`_seg_trim` (or of :func:`_seg_quota`, whose thresholds are then the ``k``-th
  largest magnitudes themselves; else None). With ``_EXACT_FIT = True`` (the path before session 9, kept for the benchmark) the fit
  runs first with ``ratio`` as its aim (above the target, so that it usually selects between ``k`` and the
  local ``capacity``) and the search only on the steps where it missed; the same payload.

  ``stats = (s1t, s2t, block_max)``: the statistics pass's values when the caller already has them (from
  :func:`_pallas_pack.sum_leaves`, which writes ``flat``): bitwise the statistics kernel's, not recomputed."""
  if exact is not None and (not isinstance(exact, tuple) or len(exact) != 3 or exact[2] is None):
    raise ValueError(f"exact must be None or (k, send_capacity, k_max) with k_max the static per-segment "
                     f"bound on k, got {type(exact).__name__} "
                     f"{'of length ' + str(len(exact)) if isinstance(exact, tuple) else ''}"
                     f"{' with k_max None' if isinstance(exact, tuple) and len(exact) == 3 else ''}.")
  use_pallas, interpret = _pallas_mode(packing, flat)
  nt = lay.num_tiles
  if stats is not None:
    s1t, s2t, bmax = stats
  elif use_pallas and _PALLAS_STATS == "pallas":
    s1t, s2t, bmax = _pallas_pack.tile_stats(flat, interpret=interpret, tile_blocks=_THR_BLOCKS)
  else:
    bsum, bsq, bmax = _block_stats(jnp.abs(flat))
    s1t, s2t = bsum.reshape(nt, _THR_BLOCKS).sum(1), bsq.reshape(nt, _THR_BLOCKS).sum(1)
  # every entry finite iff no block maximum is inf or NaN and no tile sum is NaN (a NaN entry makes its tile's sum
  # NaN whether or not a kernel's maximum skips it; an inf entry its block's maximum inf). Not "sum |x| is
  # finite": finite entries can overflow a float32 sum (to inf, never to NaN: the summands are non-negative), and
  # such a step (entries near 3.4e38) was skipped as non-finite, on every later step too, while topk sent it
  finite = jnp.all(jnp.isfinite(bmax)) & jnp.logical_not(jnp.any(jnp.isnan(s1t)))
  a_tiles = jnp.abs(flat).astype(jnp.float32).reshape(nt, _TILE)

  def pack(t):
    if use_pallas:
      return _pack_pallas(flat, lay.per_tile(t), capacity, bmax, interpret)
    return _pack_xla(flat, lay.per_tile(t), capacity, bmax)

  def exact_thresholds():
    k, _, k_max = exact
    search = _exact_search(flat, lay.num_segments)
    if search == "blocks":
      return _seg_kth_blocks(flat, bmax, lay, k, k_max)
    if search == "counts":
      return _seg_kth_counts(flat, bmax, lay, k, k_max)
    return _seg_exact(a_tiles, bmax, lay, k, flat)

  if exact is not None and not _EXACT_FIT:   # the default: the k-th largest of every segment, no fit
    t = exact_thresholds()
    payload, n_above = pack(t)
  else:
    t = _seg_threshold(a_tiles, lay, lay.seg_reduce(s1t, "sum"), lay.seg_reduce(s2t, "sum"), ratio,
                       distribution, stages, first_ratio, exact is not None, stage_bound)
    # a fit whose moments overflowed float32 (|x| above ~1.8e19 squares to inf: gpareto / gamma give NaN) selected
    # nothing, silently, and a NaN threshold passes the floor (min(NaN, floor) is NaN): select every non-zero entry
    # instead, which the ceiling cuts to the largest (or the payload overflows, counted)
    t = jnp.where(jnp.isnan(t), 0.0, t)
    if min_count is not None:
      t = _seg_floor(t, bmax, lay, min_count)
    t = jnp.maximum(t, 0.0)                    # (padding zeros are never selected)
    payload, n_above = pack(t)
  if exact is not None:
    k, send_capacity, _ = exact
    if _EXACT_FIT:   # (the old path: the search only where the fit missed [k, capacity])
      _, counts = _payload_segments(payload, lay)

      def bisect(_):
        t2 = exact_thresholds()
        p2, _ = pack(t2)
        return p2, t2

      missed = (payload.overflow | jnp.any(counts < k)) & finite
      payload, t = jax.lax.cond(missed, bisect, lambda _: (payload, t), None)
    check_choice("_TRIM", _TRIM, ("quota", "sort"))
    if _TRIM == "quota" and not _EXACT_FIT:   # ties at the cut cut back by prefix counts: no sort, no cond
      # (the quota needs t just below each segment's k-th largest; the fit-first path's t is only that on the
      # steps where the fit missed, so that path always cuts by the sort trim)
      payload, t, tie_last = _seg_quota(payload, t, lay, k, send_capacity)
    elif _TRIM_SKIP:   # no segment above its k (e.g. the block select's thresholds without ties): no sort
      _, counts = _payload_segments(payload, lay)

      def first_slots(_):
        valid = jnp.arange(send_capacity) < payload.count
        p = SparsePayload(jnp.where(valid, payload.indices[:send_capacity], 0),
                          jnp.where(valid, payload.values[:send_capacity], 0), payload.count, payload.overflow)
        # -1 per segment (no tie cut), derived from the payload so that under shard_map it is varying over
        # the mapped axes exactly as _seg_trim's output is (lax.cond needs equal types in both branches)
        none_cut = jnp.full((lay.num_segments,), -1, jnp.int32) + (payload.count * 0).astype(jnp.int32)
        return p, t, none_cut

      payload, t, tie_last = jax.lax.cond(jnp.any(counts > k), lambda _: _seg_trim(payload, t, lay, k, send_capacity),
                                          first_slots, None)
    else:
      payload, t, tie_last = _seg_trim(payload, t, lay, k, send_capacity)
    return payload, n_above, t, finite, tie_last
  if max_count is not None:
    # the fit selected more than the shared payload holds: raise the threshold of every segment above
    # its ceiling and pack again (only on such steps; the payload then holds everything selected)
    def again(pt):
      t2 = _seg_ceiling(pt[1], a_tiles, bmax, lay, max_count, flat, max_count_bound)
      p2, _ = pack(t2)
      return p2, t2

    payload, t = _when(payload.overflow & finite, again, (payload, t))
  return payload, n_above, t, finite, None


def _topk_set_payload(vec: jax.Array, k, k_max: int, capacity: int) -> SparsePayload:
  """Top-k's set of a 1-D ``vec`` (magnitude descending, ties to the lower index, as ``lax.top_k``), in a
  payload of ``capacity >= k_max`` slots holding at most ``k`` (traced, ``<= k_max``, static) entries, with no
  sort of ``vec``: ``v``, the ``k``-th largest magnitude, by the block select of ``sidco(exact=True)``
  (:func:`_seg_kth_blocks`, three small sorts); then every entry with ``|x| > v`` (fewer than ``k``, in index
  order) followed by the first ``k - #{|x| > v}`` entries with ``|x| == v`` in index order (two packings by
  :func:`compact`; never overflows). Where fewer than ``k`` entries are nonzero (``v == 0``) only the nonzero
  ones are sent (``lax.top_k`` would add zeros, which carry nothing)."""
  lay = _Layout([vec.shape[0]], [[0]])
  flat = lay.pad(vec)
  bmax = _block_stats(jnp.abs(flat))[2]
  k = jnp.asarray(k, jnp.int32)
  v = _seg_kth_blocks(flat, bmax, lay, jnp.reshape(k, (1,)), np.asarray([k_max]), below=False)[0]
  a = jnp.abs(vec).astype(jnp.float32)
  above = compact(vec, a > v, k_max)                       # at most k - 1 entries: never overflows
  ties = compact(vec, (a == v) & (v > 0), k_max)           # the first k_max tied entries in index order
  n_above = above.count
  count = n_above + jnp.clip(k - n_above, 0, ties.count)
  j = jnp.arange(capacity, dtype=jnp.int32)
  src = jnp.clip(jnp.where(j < n_above, j, k_max + j - n_above), 0, 2 * k_max - 1)   # above's slots, then ties'
  valid = j < count
  idx = jnp.where(valid, jnp.concatenate([above.indices, ties.indices])[src], 0).astype(jnp.int32)
  vals = jnp.where(valid, jnp.concatenate([above.values, ties.values])[src], 0).astype(vec.dtype)
  return SparsePayload(idx, vals, count.astype(jnp.int32), jnp.asarray(False))


# DGC's default sample: at least this many sampled entries above the threshold (see dgc_sample_size).
DGC_MIN_SAMPLE_COUNT = 16
# ... and at least this fraction of the entries (the paper's upper sample size, Lin et al. Sec. 3.1).
DGC_BASE_SAMPLE_FRACTION = 0.01


def dgc_sample_size(n: int, ratio: float, sample_fraction: float | None = None) -> int:
  """Number of entries DGC's sampled threshold draws from a vector of ``n`` entries at density ``ratio``.

  With ``sample_fraction`` given: ``round(n * sample_fraction)``, clipped to ``[1, n]`` (the old rule).

  Default (``sample_fraction=None``): ``s = min(n, max(ceil(0.01 n), ceil(16 / ratio)))``, i.e. the
  paper's 1% sample (Lin et al., ICLR 2018, Sec. 3.1 samples 0.1%-1% of the gradients), enlarged until
  it holds ``k = ratio * s >= 16`` entries above the threshold, capped at the whole vector. Why: the
  threshold is the sample's ``k``-th largest magnitude, and the fraction of the vector above it is
  ``Beta(k, s - k + 1)``-distributed for any distribution of the magnitudes (order statistics of a
  uniform sample), mean ``k / (s + 1)`` (the target) and relative standard deviation ~``1 / sqrt(k)``.
  A fixed 1% sample breaks down at low density on small vectors: at ``n = 93.8k`` (mnist1d's CNN) and
  density 0.1% it holds ``k = 1`` (the sample's maximum), so the count sent is exponentially
  distributed around the target (5-95% of steps: 0.05x-3.0x). ``k >= 16`` gives a 1/4 relative spread
  (5-95%: 0.63x-1.44x; above DGC's ``2k`` payload on ~0.07% of steps, where its second round keeps k);
  the paper's own setting (0.1% of a 25M-entry gradient at 99.9% sparsity) has ``k = 25``. Why not
  more: the cost is one ``top_k`` over ``s`` entries, and ``k >= 64`` (1/8 spread) made the sample 68%
  of mnist1d's gradient (on CPU as slow as the exact Top-k) and trained no better (docs/comm.md:
  600 steps, 0.1% recipe, 5 seeds: mnist1d -1.26 / digits -1.60 pt vs Adam with 64, -0.74 / -0.76 with
  16, -2.16 / -1.60 with the old fixed 1%).

  Args:
    n: number of entries (>= 1).
    ratio: target density, in (0, 1).
    sample_fraction: None (the rule above) or a fraction in (0, 1].

  Returns:
    The sample size, an int in ``[1, n]``; ``n`` means :func:`dgc_threshold` uses the whole vector
    (the exact ``k``-th largest, no sampling).
  """
  check_int("n", n, 1)
  check_range("ratio", ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  if sample_fraction is not None:
    check_range("sample_fraction", sample_fraction, 0.0, 1.0, low_inclusive=False)
    return max(1, min(n, int(round(n * sample_fraction))))
  s = max(math.ceil(DGC_BASE_SAMPLE_FRACTION * n), math.ceil(DGC_MIN_SAMPLE_COUNT / ratio))
  return min(n, s)


def dgc_threshold(key: jax.Array, abs_x: jax.Array, ratio: float, sample_fraction: float | None = None,
                  max_ratio: float | None = None) -> jax.Array:
  """DGC's sampled threshold (Lin et al., ICLR 2018, Sec. 3.1): the k-th largest magnitude of a random
  sample of the entries, k = ratio * sample size.

  The sample size is :func:`dgc_sample_size` (default: 1% of the entries, enlarged to hold k >= 16;
  or ``sample_fraction`` of them), drawn with replacement. When the default rule asks for the whole
  vector, the vector itself is used (the exact k-th largest, as Top-k's threshold).

  ``ratio`` may be traced when ``max_ratio`` (a number >= ratio) is given: the sample's top
  ``max_ratio * sample size`` are computed and the k-th of them is taken; the default sample is then
  sized for ``max_ratio`` (the only static bound), so a traced ratio far below it holds fewer than 16
  above the threshold (pass ``sample_fraction`` for such schedules).
  """
  check_rank("abs_x", abs_x, 1)
  n = abs_x.shape[0]
  _check_nonempty("dgc_threshold", "abs_x", abs_x)
  if max_ratio is None:
    if not is_concrete(ratio):
      raise ValueError("dgc_threshold: ratio is traced, so the sample's top-k size cannot follow it; pass a "
                       "static max_ratio (>= ratio).")
    _check_ratio("ratio", ratio)
    ratio = float(ratio)
  else:
    check_range("max_ratio", max_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    _check_ratio("ratio", ratio)   # (a traced ratio is not checked)
    if is_concrete(ratio) and np.float32(ratio) > np.float32(max_ratio):
      raise ValueError(f"dgc_threshold: ratio {float(ratio)} exceeds max_ratio {max_ratio}; the sample's top-k "
                       f"size is set by max_ratio, so raise it.")
  s = dgc_sample_size(n, ratio if max_ratio is None else max_ratio, sample_fraction)
  sample = abs_x if s == n and sample_fraction is None else abs_x[jax.random.randint(key, (s,), 0, n)]
  if max_ratio is None:
    k = max(1, int(round(s * ratio)))
    return jax.lax.top_k(sample, k)[0][-1]
  k_max = max(1, int(round(s * max_ratio)))
  k = jnp.clip(jnp.round(s * jnp.asarray(ratio, jnp.float32)), 1, k_max).astype(jnp.int32)
  return jax.lax.top_k(sample, k_max)[0][k - 1]


# ----------------------------------------------------------------------------------------------------
# The optax transforms.


@jax.tree_util.register_pytree_node_class
class ParamLayout:
  """The parameters' tree structure and leaf shapes that a flat residual (``flat_state=True``) was built for, held
  as static pytree data: no arrays, so ``jit``, ``vmap``, ``pmap`` and ``shard_map`` carry it unchanged and a
  state can be mapped with one spec (``P("d")``) as a whole.

  It replaces session 43's tree of zero-size arrays (shape ``(0, *leaf.shape)``), on which jax 0.11.2's Shardy
  partitioner crashes the compiler when the state enters a ``pmap`` / ``shard_map`` body; states holding that form
  are still accepted and checked.

  >>> lay = ParamLayout.of({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
  >>> lay.shapes, jax.tree_util.tree_leaves(lay)
  (((3,), (2, 3)), [])
  """

  __slots__ = ("treedef", "shapes")

  def __init__(self, treedef, shapes):
    if not isinstance(treedef, jax.tree_util.PyTreeDef):
      raise TypeError(f"ParamLayout: treedef must be a jax PyTreeDef, got {type(treedef).__name__}; build one with "
                      f"ParamLayout.of(params).")
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if len(shapes) != treedef.num_leaves or any(d < 0 for s in shapes for d in s):
      raise ValueError(f"ParamLayout: {len(shapes)} shapes {shapes} for a tree of {treedef.num_leaves} leaves "
                       f"({treedef}); give one non-negative shape per leaf, or use ParamLayout.of(params).")
    self.treedef = treedef
    self.shapes = shapes

  @classmethod
  def of(cls, params) -> "ParamLayout":
    """The layout of a parameter tree."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return cls(treedef, [np.shape(x) for x in leaves])

  def reference(self):
    """The tree of ``jax.ShapeDtypeStruct`` (float32) that updates are checked against (``_check_like``)."""
    return jax.tree_util.tree_unflatten(self.treedef, [jax.ShapeDtypeStruct(s, jnp.float32) for s in self.shapes])

  def tree_flatten(self):
    return (), (self.treedef, self.shapes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    del children
    return cls(*aux)

  def __eq__(self, other):
    return isinstance(other, ParamLayout) and (self.treedef, self.shapes) == (other.treedef, other.shapes)

  def __hash__(self):
    return hash((self.treedef, self.shapes))

  def __repr__(self):
    return f"ParamLayout({self.treedef}, shapes={self.shapes})"


def _register_layout_serialization() -> None:
  """flax.serialization: a ``ParamLayout`` saves as an empty dict and restores as the target's (its content is
  static: the target state, built by ``init`` on the same parameters, holds the same)."""
  try:
    from flax import serialization
  except ImportError:   # (flax is a dependency; without it there is nothing to register with)
    return
  serialization.register_serialization_state(ParamLayout, lambda x: {}, lambda target, state: target,
                                             override=True)


_register_layout_serialization()


class SparsifierState(NamedTuple):
  """State of the sparsifying transforms.

  Attributes:
    residual: error-feedback memory, same structure as the gradients.
    key: PRNG key (DGC sampling, Random-k).
    stages: SIDCo's current number of stages (int32).
    ratio_sum: running sum of achieved/target densities since the last adaptation.
    step: steps taken.
    density: achieved density of the last step (selected / total entries).
    bytes_sent: bytes this device passed to the collective in the last step (static payloads).
    total_bytes: cumulative ``bytes_sent``, a float32 running sum: exact while below 2**24 bytes, then each
      addition rounds to float32 (a static payload rounds the same way every step: 1.1 MB per step over 450k
      steps reads ~0.5% high); sum ``bytes_sent`` on the host for exact long-run totals.
    overflow_steps: steps in which the payload overflowed (the rest stayed in the residual).
    nonfinite_steps: steps skipped because some device's error-compensated gradient (gradient plus
      residual, after momentum when it is on) held NaN/inf, or because the update would have (a value sent
      beyond the gradients' dtype, e.g. float16 gradients over a float32 residual).
    velocity: momentum-correction velocity (same structure as the gradients) when the transform was
      built with ``momentum > 0``, else ``()``.
    precondition: state of the local ``precondition`` transform (e.g. Adam's moments of this worker's
      gradients), or ``()`` without one.
    layout: with ``flat_state=True``, a :class:`ParamLayout` (static: no arrays): the parameters' structure and
      shapes the flat residual was built for, so ``update`` refuses gradients laid out otherwise with the same
      entry count; ``()`` without ``flat_state`` (the residual tree checks it) and in states built before it
      existed (not checked). States of sessions 43-44 hold a tree of zero-size arrays here instead (still checked).
  """
  residual: Any
  key: jax.Array
  stages: jax.Array
  ratio_sum: jax.Array
  step: jax.Array
  density: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  overflow_steps: jax.Array
  nonfinite_steps: jax.Array
  velocity: Any = ()
  precondition: Any = ()
  layout: Any = ()


def _static(name: str, value, default, kind=float):
  """A hyperparameter that fixes shapes or Python control flow: ``default`` when None, a Python number
  from a concrete scalar array (``optax.inject_hyperparams`` turns numbers into arrays), and a clear
  error when it is traced."""
  if value is None:
    return default
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} is traced (e.g. a hyperparameter injected by optax.inject_hyperparams), but it "
                    f"fixes static shapes or control flow: pass static_args=({name!r},) to "
                    f"optax.inject_hyperparams, or leave it at its default. Only `ratio` may be traced.")
  if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
    value = value.item()
  if kind is int and isinstance(value, float) and value.is_integer():
    value = int(value)
  return value


def _resolve_ratio(ratio, max_ratio):
  """``(ratio, max_ratio)`` checked. ``max_ratio`` is None for a static ratio (a number); a ratio that is
  an array (a schedule through ``optax.inject_hyperparams``, maybe traced) needs a static ``max_ratio``
  that sets the payload capacity."""
  max_ratio = _static("max_ratio", max_ratio, None)
  if max_ratio is not None:
    check_range("max_ratio", max_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  if _is_static(ratio):
    check_range("ratio", ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    if max_ratio is not None:
      if ratio > max_ratio:
        raise ValueError(f"ratio {ratio} exceeds max_ratio {max_ratio}; the payload capacity is set by "
                         f"max_ratio, so raise it.")
    return ratio, max_ratio
  _check_ratio("ratio", ratio)
  if max_ratio is None:
    raise ValueError("ratio is an array (e.g. a schedule through optax.inject_hyperparams), so the payload "
                     "capacity cannot follow it: pass a static max_ratio (the largest density the schedule "
                     "reaches), e.g. optax.inject_hyperparams(sidco, static_args=('max_ratio',))"
                     "(ratio=schedule, max_ratio=0.05).")
  # compared in float32: a schedule's float32 value of max_ratio itself (float32(0.05) = 0.0500000007) is allowed
  if not isinstance(ratio, jax.core.Tracer) and np.float32(ratio) > np.float32(max_ratio):
    raise ValueError(f"ratio {float(ratio)} exceeds max_ratio {max_ratio}; raise max_ratio.")
  return ratio, max_ratio


def _check_common(ratio, capacity_factor):
  _check_ratio("ratio", ratio)
  check_range("capacity_factor", capacity_factor, 1.0)


def _check_precondition(who: str, precondition) -> None:
  """A compressor's ``precondition=`` must be None or an ``optax.GradientTransformation``."""
  if precondition is not None and not isinstance(precondition, optax.GradientTransformation):
    raise TypeError(f"{who}: precondition must be None or an optax.GradientTransformation (e.g. "
                    f"optax.scale_by_adam() or comm.rms_selection()), got {type(precondition).__name__}.")


def _apply_precondition(precondition, updates, state, params):
  """``(updates, new_state)`` of the local ``precondition`` (``(updates, state)`` unchanged when it is None)."""
  if precondition is None:
    return updates, state
  return precondition.update(updates, state, params)


def _keep_on_skip(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where the step is finite, else ``old`` (leaf by leaf; a skipped step leaves a state as it was)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)


def _check_axis(axis_name: str | None) -> None:
  """Raise ``NameError`` saying what to do when ``axis_name`` is set but not bound by pmap/shard_map."""
  if axis_name is None:
    return
  try:
    jax.lax.psum(1, axis_name)
  except NameError as e:
    raise NameError(f"axis_name {axis_name!r} is not bound: call the update inside pmap/shard_map over "
                    f"that axis, or pass axis_name=None for one device.") from e


def _global_finite(leaves, axis_name):
  """True when every leaf is finite on every device (one scalar ``pmax`` when ``axis_name`` is set), so
  that every replica takes the same decision."""
  bad = jnp.logical_not(jnp.all(jnp.asarray([jnp.all(jnp.isfinite(l)) for l in leaves])))
  if axis_name is not None:
    bad = jax.lax.pmax(bad.astype(jnp.int32), axis_name) > 0
  return jnp.logical_not(bad)


def _check_like(name: str, updates, reference) -> None:
  """Raise ``ValueError`` unless ``updates`` has the tree structure and leaf shapes of ``reference`` (the
  parameters the state was initialised with)."""
  t_u, t_r = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(reference)
  if t_u != t_r:
    raise ValueError(f"{name}: the gradients' tree structure {t_u} differs from the parameters' the state "
                     f"was initialised with ({t_r}); call init with the same tree.")
  for (path, u), r in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree_util.tree_leaves(reference)):
    if np.shape(u) != np.shape(r):
      raise ValueError(f"{name}: gradient{jax.tree_util.keystr(path)} has shape {np.shape(u)}, but the "
                       f"state was initialised with shape {np.shape(r)}; pass gradients shaped like the "
                       f"parameters.")


def _concat_leaves(leaves, dtype) -> jax.Array:
  """The leaves raveled and concatenated in order, in ``dtype`` (``ravel_pytree``'s vector)."""
  pieces = [l.reshape(-1).astype(dtype) for l in leaves]
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _flat_flag(flat_state) -> bool:
  """The static ``flat_state`` switch of the sparsifiers (None: False), else a clear error."""
  flat_state = _static("flat_state", flat_state, False)
  if not isinstance(flat_state, (bool, np.bool_)):
    raise TypeError(f"flat_state must be True or False, got {flat_state!r}.")
  return bool(flat_state)


def _flat_dtype(name: str, leaves):
  """The one dtype of ``leaves`` (``flat_state=True`` keeps the residual in one buffer), else a clear error."""
  dts = sorted({jnp.dtype(jnp.result_type(l)).name for l in leaves})
  if len(dts) != 1:
    raise ValueError(f"{name}: flat_state=True keeps the residual in one vector of one dtype, but the "
                     f"parameter leaves have dtypes {dts}; cast them to one dtype, or use flat_state=False.")
  return jnp.dtype(dts[0])


def _flat_size(name: str, leaves) -> int:
  """Entries of ``leaves`` together (> 0), else a clear error."""
  n = int(sum(int(np.prod(np.shape(l))) for l in leaves))
  if n == 0:
    raise ValueError(f"{name}: flat_state=True needs at least one parameter entry; the tree has none.")
  return n


def _padded_size(n: int) -> int:
  """The padded buffer's length for one segment of ``n`` entries (:class:`_Layout`'s: whole tiles, at least one)."""
  return _Layout((n,), ((0,),)).n_pad


def _check_flat_residual(name: str, updates, state, padded: bool = False) -> None:
  """Raise ``ValueError`` unless the flat residual of ``state`` has the gradients' entry count and dtype
  (``padded``: the one-segment padded layout of ``_FLAT_KEPT = "buffer"``, :func:`_padded_size` entries)."""
  leaves = jax.tree_util.tree_leaves(updates)
  r = state.residual
  if not hasattr(r, "shape") or np.ndim(r) != 1:
    raise ValueError(f"{name}: flat_state=True expects state.residual to be one vector (the state of an init "
                     f"with flat_state=True), got {jax.tree_util.tree_structure(r)}; build the state with the "
                     f"same transform's init.")
  n = _flat_size(name, leaves)
  want = _padded_size(n) if padded else n
  if r.shape[0] != want:
    if padded:
      raise ValueError(f"{name}: the gradients have {n} entries, so the padded flat residual of "
                       f"_FLAT_KEPT = 'buffer' needs {want}, but it has {r.shape[0]}; call init with parameters "
                       f"shaped like the gradients, with the same _FLAT_KEPT setting as the update.")
    raise ValueError(f"{name}: the gradients have {n} entries in all but the flat residual has "
                     f"{r.shape[0]}; call init with parameters shaped like the gradients (and the same "
                     f"_FLAT_KEPT setting as the update).")
  if not jnp.issubdtype(r.dtype, jnp.floating):
    raise ValueError(f"{name}: the flat residual has dtype {r.dtype}, not a floating dtype.")
  layout = getattr(state, "layout", ())
  if isinstance(layout, ParamLayout):   # the same count: the parameters' structure and shapes
    _check_like(name, updates, layout.reference())
  elif not (isinstance(layout, tuple) and layout == ()):   # (sessions 43-44: zero-size arrays (0, *shape))
    _check_like(name, updates, jax.tree_util.tree_map(lambda z: jax.ShapeDtypeStruct(np.shape(z)[1:], z.dtype),
                                                      layout))


def _counts(n: int, ratio, max_ratio, capacity_factor: float):
  """``(k, k_max, capacity)`` for a vector of ``n`` entries: the target count (a Python int, or a traced
  int32 when the ratio is dynamic), its static bound and the static payload capacity."""
  r_cap = ratio if max_ratio is None else max_ratio
  k_max = max(1, int(round(n * r_cap)))
  cap = min(n, max(k_max, int(math.ceil(k_max * capacity_factor))))
  if max_ratio is None:
    return k_max, k_max, cap
  k = jnp.clip(jnp.round(n * jnp.asarray(ratio, jnp.float32)), 1, k_max).astype(jnp.int32)
  return k, k_max, cap


def _first_k(payload: SparsePayload, k) -> SparsePayload:
  """The first ``k`` (maybe traced) slots of a payload; later slots become index 0, value 0."""
  if isinstance(k, int):
    return payload
  keep = jnp.arange(payload.indices.shape[0]) < k
  return SparsePayload(jnp.where(keep, payload.indices, 0), jnp.where(keep, payload.values, 0),
                       jnp.minimum(payload.count, k).astype(jnp.int32), payload.overflow)


def _flat_sum(flatten, addend_leaves, residual_leaves, dtype):
  """``flatten(addend + residual)`` of two trees' leaves, bitwise: when every leaf has the one ``dtype``
  the sum of the two flattened buffers (two concatenations and one add: a few kernels, not one add per
  leaf before the concatenation), else the leafwise sums flattened (each sum in its leaf's dtype)."""
  if all(jnp.result_type(x) == dtype for x in list(addend_leaves) + list(residual_leaves)):
    return flatten(addend_leaves, dtype) + flatten(residual_leaves, dtype)
  return flatten([a + r for a, r in zip(addend_leaves, residual_leaves)], dtype)


def _ravel_sum(addend, residual):
  """``ravel_pytree(addend + residual)`` (the flat vector and its ``unravel``), the sum taken on the
  raveled buffers when every leaf has one dtype (bitwise the same vector)."""
  _, unravel = ravel_pytree(residual)
  leaves = jax.tree_util.tree_leaves(residual)
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  if _RAVEL_SUM_FLATTEN != "two" and leaves:
    return _chunked([(a + r).reshape(-1).astype(dtype) for a, r in zip(jax.tree_util.tree_leaves(addend), leaves)],
                    _RAVEL_SUM_FLATTEN, dtype), unravel
  uniform = all(jnp.result_type(x) == dtype for x in leaves + jax.tree_util.tree_leaves(addend))
  if uniform:
    return ravel_pytree(addend)[0] + ravel_pytree(residual)[0], unravel
  return ravel_pytree(jax.tree_util.tree_map(jnp.add, addend, residual))[0], unravel


# Per tensor, dgc selects each leaf's payload (a sampled threshold, a packing and a second round per leaf); with
# _BATCH_LEAVES the leaves of one size and dtype are stacked and selected by one vmapped call (ResNet-50: 161 leaves
# in 22 sizes), the same payloads bitwise (with a precondition, to float rounding: XLA may fuse its arithmetic into
# the stacking and round 1 ulp differently, which can flip a near-tie; tests/test_comm_batch_leaves.py).
# "auto" (the default): batched on GPU, leaf by leaf elsewhere; True / False force it. H100 (session 26, f32
# batch-64 ResNet-50 training step, branch-free, benchmarks/results/sidco_model_step_h100_s26b.json): compiled in
# 51.3 against 115.4 s, +5.39 against +18.08 ms per step over Adam alone (topk +0.92 ms): 3.4x less. CPU (jitted
# update alone on the tree at div 8, each row in a fresh process, benchmarks/results/per_tensor_compile_cpu_s25.json):
# compiles in 30.8 against 42.6 s (33.7 against 48.9 branch-free) but runs in 42.7 against 36.6 ms (41.2 against
# 35.1), so the CPU stays leaf by leaf. Not for topk / randomk (the sparsifier's batch_leaves=False): batched
# lax.top_k made the per-tensor topk update slower on the CPU in a first, unrecorded check.
_BATCH_LEAVES = "auto"


def _batch_leaves() -> bool:
  """Whether dgc's per-tensor selection batches the leaves of one size (``_BATCH_LEAVES``; "auto": on GPU)."""
  mode = _BATCH_LEAVES
  check_choice("_BATCH_LEAVES", mode, ("auto", True, False))
  if mode == "auto":
    return jax.default_backend() == "gpu"
  return bool(mode)


def _sparsifier(select, ratio, *, capacity_factor: float, per_tensor: bool,
                axis_name: str | None, seed: int, initial_stages, max_ratio: float | None = None,
                adapt: tuple[int, int, float] | None = None, momentum: float = 0.0,
                precondition: optax.GradientTransformation | None = None, segmented=None,
                flat_state: bool = False, batch_leaves: bool = False) -> optax.GradientTransformation:
  """Shared machinery: error feedback, payloads, collectives, byte accounting, stage adaptation.

  ``batch_leaves`` (per tensor, with ``_BATCH_LEAVES``): leaves of one size and dtype selected by one ``vmap``ped
  ``select`` (the same payloads; used by dgc).

  ``select(vec, k, k_max, capacity, key, stages, ratio) -> (payload, n_above)`` where ``n_above`` counts the
  entries the threshold selected before the capacity cut (``k`` is traced when ``ratio`` is).
  ``adapt = (max_stages, every, tolerance)`` turns on SIDCo's stage adaptation from the achieved density
  of the whole update (all leaves together).

  ``momentum > 0`` turns on DGC's momentum correction with momentum-factor masking (Lin et al., ICLR 2018,
  Sec. 3.2): each worker keeps a velocity ``u = momentum * u + g`` and accumulates ``u`` (not ``g``) into the
  residual; entries that were sent are zeroed in both. The optimizer after it must then be plain SGD
  (the momentum is already applied). Exact: ``sent + residual == previous residual + u``.

  ``precondition``: a local optax transform applied to this worker's gradient before error feedback
  (e.g. ``optax.scale_by_adam()``: compress the local Adam direction, as 1-bit Adam compresses after the
  moment update); its state is kept per worker and left unchanged on skipped steps.

  Non-finite values: the check is on what would be compressed (gradient plus residual, i.e. also an
  overflow of that sum, e.g. in float16), and the flag is agreed through one ``pmax`` over
  ``axis_name``, so that every replica skips the same steps (nothing sent, residual and velocity
  unchanged, ``nonfinite_steps`` incremented everywhere) and the replicas never drift apart.

  ``flat_state``: the residual and the velocity are each ONE vector of the leaves concatenated in tree
  order (``jax.flatten_util.ravel_pytree`` order), not a tree: one buffer each instead of one per leaf.
  Every leaf must then have one dtype. Without ``segmented`` (topk, dgc, randomk) only with
  ``per_tensor=False``, whose working vector is that raveled vector already.
  """
  if flat_state and segmented is None and per_tensor:
    raise ValueError("flat_state=True with per_tensor=True needs sidco (one buffer with per-tensor segments); "
                     "topk, dgc and randomk keep a flat residual with per_tensor=False only.")
  _check_precondition("sparsifier", precondition)

  def _buffer_residual() -> bool:
    """Whether the flat residual is kept in the padded buffer's layout (``_FLAT_KEPT = "buffer"``, one segment)."""
    check_choice("_FLAT_KEPT", _FLAT_KEPT, ("xla", "pallas", "pallas_inplace", "buffer"))
    return flat_state and segmented is not None and not per_tensor and _FLAT_KEPT == "buffer"

  def init_fn(params):
    check_floating("sparsifier.init", params)
    sizes = [int(np.prod(np.shape(l))) for l in jax.tree_util.tree_leaves(params)]
    if sum(sizes) == 0:
      raise ValueError("sparsifier.init needs at least one parameter entry; every leaf of the tree is empty.")
    if per_tensor and segmented is None and 0 in sizes:
      raise ValueError("sparsifier.init: per_tensor=True gives every leaf its own payload, but a leaf has no "
                       "entries; drop empty leaves from the tree, or use per_tensor=False or "
                       "sidco(per_tensor=True).")
    z = jnp.zeros((), jnp.int32)
    f = jnp.zeros((), jnp.float32)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    if flat_state:
      n = _flat_size("sparsifier.init", jax.tree_util.tree_leaves(params))
      zeros = jnp.zeros((_padded_size(n) if _buffer_residual() else n,),
                        _flat_dtype("sparsifier.init", jax.tree_util.tree_leaves(params)))
      velocity = jnp.zeros((n,), zeros.dtype) if momentum > 0 else ()
      layout = ParamLayout.of(params)
    else:
      velocity = zeros if momentum > 0 else ()
      layout = ()
    return SparsifierState(zeros, jax.random.PRNGKey(seed), jnp.asarray(initial_stages, jnp.int32),
                           f, z, f, f, f, z, z, velocity,
                           precondition.init(params) if precondition is not None else (), layout)

  def _select_leaves(vecs, sub, state):
    """``select`` of every vector (leaf ``i`` with key ``fold_in(sub, i)``): one call per leaf, or with
    ``batch_leaves`` (and ``_BATCH_LEAVES``) one ``vmap``ped call per group of leaves of one size and dtype (the
    same payloads)."""
    out = [None] * len(vecs)
    groups = {}
    for i, v in enumerate(vecs):
      groups.setdefault((v.shape[0], jnp.dtype(v.dtype).name), []).append(i)
    for (n, _), idx in groups.items():
      k, k_max, cap = _counts(n, ratio, max_ratio, capacity_factor)
      keys = [jax.random.fold_in(sub, i) for i in idx]
      if len(idx) == 1 or not (batch_leaves and _batch_leaves()):
        for i, key in zip(idx, keys):
          out[i] = select(vecs[i], k, k_max, cap, key, state.stages, ratio)
        continue

      def one(v, key, k=k, k_max=k_max, cap=cap):
        payload, above = select(v, k, k_max, cap, key, state.stages, ratio)
        return payload, jnp.asarray(above, jnp.int32)

      payloads, aboves = jax.vmap(one)(jnp.stack([vecs[i] for i in idx]), jnp.stack(keys))
      for j, i in enumerate(idx):
        out[i] = (jax.tree_util.tree_map(lambda x, j=j: x[j], payloads), aboves[j])
    return out

  def _loop_step(acc, finite, sub, state):
    """One payload per leaf (per_tensor) or one for the raveled tree, selected by ``select``. ``acc`` is
    the error-compensated tree, or (per_tensor=False) ``(flat, unravel)`` from :func:`_ravel_sum`. With
    ``flat_state`` the residual and the momentum mask stay raveled."""
    if per_tensor:
      groups, treedef = jax.tree_util.tree_flatten(acc)
      vecs = [g.reshape(-1) for g in groups]
    else:
      flat, unravel = acc
      vecs = [flat]
    outs, residuals, hits, nsel, n_above, nbytes, overflow = [], [], [], 0, 0, 0, False
    vecs_in = [jnp.where(finite, vec, 0) for vec in vecs]   # never select from (or send) NaN/inf
    selected = _select_leaves(vecs_in, sub, state)
    for i, vec in enumerate(vecs):
      n = vec.shape[0]
      payload, above = selected[i]
      payload = payload._replace(count=jnp.where(finite, payload.count, 0))
      sent = decompress(payload, n, vec.dtype)
      residuals.append(vec - sent)                     # exact: sent entries equal vec there
      if momentum > 0:                                 # momentum-factor masking: entries that were sent
        hits.append(decompress(payload._replace(values=jnp.ones_like(payload.values)), n, vec.dtype) > 0)
      if axis_name is not None:
        outs.append(allgather_mean(payload, n, axis_name, vec.dtype))
      else:
        outs.append(sent)
      nsel = nsel + payload.count
      n_above = n_above + above
      nbytes = nbytes + payload_bytes(payload)
      overflow = overflow | payload.overflow
    total = sum(v.shape[0] for v in vecs)
    hit_tree = None
    if per_tensor:
      new_res = jax.tree_util.tree_unflatten(treedef, [r.reshape(g.shape) for r, g in zip(residuals, groups)])
      out = jax.tree_util.tree_unflatten(treedef, [o.reshape(g.shape) for o, g in zip(outs, groups)])
      if momentum > 0:
        hit_tree = jax.tree_util.tree_unflatten(treedef, [h.reshape(g.shape) for h, g in zip(hits, groups)])
    elif flat_state:
      new_res, out = residuals[0], unravel(outs[0])
      if momentum > 0:
        hit_tree = hits[0]
    else:
      new_res, out = unravel(residuals[0]), unravel(outs[0])
      if momentum > 0:
        hit_tree = jax.tree_util.tree_map(lambda h: h > 0, unravel(hits[0].astype(flat.dtype)))
    return out, new_res, hit_tree, nsel, n_above, nbytes, overflow, total

  def _layout_of(sizes):
    r_cap = ratio if max_ratio is None else max_ratio
    return _Layout(sizes, _segments(sizes, per_tensor, r_cap, segmented.min_group_count))

  def _select_segments(flat, lay, state, dtype, stats=None):
    """The segmented selection of the padded buffer ``flat``: ``(payload, n_above, thresholds, tie_last,
    finite, count, last, dense)``; ``finite`` agreed over ``axis_name``, ``count`` 0 on a non-finite step,
    ``last`` the last packed index (-1 when none), ``dense`` the all-gathered mean (None without an axis)."""
    counts = [_counts(int(n), ratio, max_ratio, capacity_factor) for n in lay.seg_n]
    cap = int(sum(c[2] for c in counts))
    if isinstance(counts[0][0], int):
      k = jnp.asarray([c[0] for c in counts], jnp.int32)
    else:
      k = jnp.stack([c[0] for c in counts])
    k_max = np.asarray([c[1] for c in counts])
    payload, above, t, local_finite, tie_last = segmented(flat, lay, k, k_max, cap, state.stages, ratio, stats)
    finite = local_finite
    if axis_name is not None:   # one decision on every replica
      finite = jax.lax.pmax(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
    count = jnp.where(finite, payload.count, 0)          # a non-finite step sends nothing
    payload = payload._replace(count=count)
    last = jnp.where(count > 0, payload.indices[jnp.maximum(count - 1, 0)], -1)
    dense = None
    if axis_name is not None:
      dense = allgather_mean(payload, lay.n_pad, axis_name, dtype)
    return payload, above, t, tie_last, finite, count, last, dense

  def _sent(v, pos, seg, t, tie_last, last):
    """Which entries ``v`` (at padded positions ``pos``, in segment ``seg``) were sent: above the segment's
    threshold (ties up to the segment's last kept one with exact counts) and at or before the last packed
    index."""
    av, ts = jnp.abs(v.astype(jnp.float32)), t[seg]
    above_t = av > ts
    if tie_last is not None:   # exact counts: magnitudes tied at the cut up to the segment's last kept one
      above_t = above_t | ((av == ts) & (pos <= tie_last[seg]))
    return above_t & (pos <= last)

  def _leaf_selection(flat, lay, t, tie_last, last, i):
    """Leaf ``i``'s slice of the padded buffer and which of its entries are sent (:func:`_sent`)."""
    off, n = lay.offsets[i], lay.sizes[i]
    v = jax.lax.slice(flat, (off,), (off + n,))
    return v, _sent(v, off + jnp.arange(n, dtype=jnp.int32), lay.seg_of_leaf[i], t, tie_last, last)

  def _segmented_step(addend, residual, state):
    """All leaves in one flat buffer: per-segment thresholds, ONE payload (capacity shared by the
    segments), one collective; the residual, the output and the momentum mask of every leaf are
    elementwise in the leaf (selected = above its segment's threshold and at or before the last packed
    index, which is exactly what the packing took: the first ``capacity`` selected entries in order).
    The buffer is ``addend + residual``: ``_SUM_FLATTEN = "dus"`` (the default) writes the leafwise sums
    into one buffer by chunks of ``_GROUP_LEAVES`` leaves (:meth:`_Layout.flatten_sum`), ``"two"`` is
    :func:`_flat_sum` (two concatenations and one add); the same buffer bitwise for materialized inputs.
    The residual, the output and the mask are read from that buffer, so they agree with the payload
    whatever its rounding."""
    leaves, treedef = jax.tree_util.tree_flatten(residual)   # (shapes and dtypes of the sum's leaves)
    sizes = [int(np.prod(l.shape)) for l in leaves]
    lay = _layout_of(sizes)
    dtype = jnp.result_type(*leaves)
    add_leaves = jax.tree_util.tree_leaves(addend)
    stats = None
    use_sb, interp_sb = _sum_build_mode(add_leaves, leaves, dtype, momentum > 0 or precondition is not None)
    if use_sb:   # the buffer and its statistics in one read of every leaf
      flat, *stats = _pallas_pack.sum_leaves(add_leaves, leaves, lay.tile_shift, lay.tile_limit,
                                             interpret=interp_sb)
    elif _SUM_FLATTEN == "two":
      flat = _flat_sum(lay.flatten, add_leaves, leaves, dtype)
    else:
      flat = lay.flatten_sum(add_leaves, leaves, dtype, _SUM_FLATTEN)
    if not use_sb and jnp.dtype(dtype).itemsize < 4:
      # a 16-bit sum materialized once (as in _flat_step): XLA may otherwise fuse a leaf's slice of the buffer back
      # into ``a + r`` computed in float32 without the rounding to ``dtype`` (excess precision), so the payload (the
      # rounded buffer) and the sent flags of the output and residual (the unrounded sum) disagreed: a sent entry
      # missing from the output and kept in the residual (counted twice with an axis)
      flat = jax.lax.optimization_barrier(flat)
    payload, above, t, tie_last, finite, count, last, dense = _select_segments(flat, lay, state, dtype, stats)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    leaf_sel = lambda i: _leaf_selection(flat, lay, t, tie_last, last, i)

    use_w, interp = _write_mode(flat, leaves, momentum)
    if use_w:   # every leaf's residual (and output) in a few kernels; finiteness applied there
      seg_of = np.asarray(lay.seg_of_leaf, np.int32)
      tie = jnp.full((len(leaves),), -1, jnp.int32) if tie_last is None else tie_last[seg_of]
      write_out = dense is None and not _OUT_WRITE.endswith("_res")
      outs_w, res_w = _pallas_pack.write_leaves(
          flat, sizes, lay.offsets, t[seg_of], tie, last, finite, leaves, write_out=write_out,
          in_place=_OUT_WRITE.endswith(("_inplace", "_res")), interpret=interp)
      residuals = [r.reshape(l.shape) for r, l in zip(res_w, leaves)]
      if write_out:
        outs = [o.reshape(l.shape) for o, l in zip(outs_w, leaves)]
      else:   # (without an axis: per-leaf XLA fusions, which a consumer such as Adam can absorb)
        outs = [_leaf_output(leaf, i, dense, lay, lambda i=i: leaf_sel(i)) for i, leaf in enumerate(leaves)]
      return finite, (unflat(outs), unflat(residuals), None, count, above, payload_bytes(payload),
                      payload.overflow, lay.n_real), (True, write_out)
    outs, residuals, hits = [], [], []
    for i, leaf in enumerate(leaves):
      v, sel = leaf_sel(i)
      residuals.append(jnp.where(sel, 0, v).astype(leaf.dtype).reshape(leaf.shape))
      outs.append(_leaf_output(leaf, i, dense, lay, lambda v=v, sel=sel: (v, sel)))
      hits.append(sel.reshape(leaf.shape))
    return finite, (unflat(outs), unflat(residuals), unflat(hits) if momentum > 0 else None, count, above,
                    payload_bytes(payload), payload.overflow, lay.n_real), (False, False)

  def _flat_step(addend, state):
    """:func:`_segmented_step` with ``flat_state``: ``state.residual`` (and the velocity) are the leaves
    concatenated in tree order. The buffer is ``pad(concat(addend) + residual)`` (bitwise the leafwise sums
    of the tree layout, every leaf having the one dtype); the new residual is ONE elementwise pass over
    that sum: zero where the entry was sent (one segment: the padded buffer's selection, whose real entries
    come first; several: the payload's indices mapped back, one scatter of ``count`` flags), finiteness
    applied. Returns ``(finite, out, new_residual, new_velocity, count, n_above, bytes, overflow, total,
    out_final)``: ``out_final`` (static) when ``out`` is already zero on a non-finite step (the Pallas output
    writer's: the caller's per-leaf ``where(finite, out, 0)`` would read and write every output once more, one
    kernel per leaf, since XLA cannot fuse it into the writer).

    A 16-bit sum is materialized once (``optimization_barrier``) before its readers: XLA may otherwise keep it in
    float32 inside some fusions and round it in others (excess precision), and the selection (which reads the
    padded buffer) and the new residual (which reads the sum) then disagree on entries tied at the threshold: an
    entry sent *and* kept, another neither (session 20; ``tests/test_comm_flat_state.py``)."""
    leaves, treedef = jax.tree_util.tree_flatten(addend)
    sizes = [int(np.prod(l.shape)) for l in leaves]
    lay = _layout_of(sizes)
    dtype = state.residual.dtype
    check_choice("_FLAT_BUILD", _FLAT_BUILD, ("concat", "dus"))
    padded = _buffer_residual()   # (the residual in the buffer's padded layout: one segment, length checked)
    res_real = state.residual[:lay.n_real] if padded else state.residual   # (XLA's readers: fused slices)
    if _FLAT_BUILD == "dus":
      step = _flat_step_dus(leaves, treedef, sizes, lay, dtype, state._replace(residual=res_real))
      return step[:2] + ((lay.pad(step[2]),) if padded else step[2:3]) + step[3:]
    velocity = state.velocity
    stats = None
    use_sb, interp_sb = ((False, False) if momentum > 0 else
                         _sum_build_mode(leaves, res_real, dtype, precondition is not None))
    if use_sb:   # the padded buffer and its statistics from the leaves and the flat residual, one kernel each group
      flat, *stats = _pallas_pack.sum_leaves(leaves, state.residual, lay.tile_shift, lay.tile_limit,
                                             interpret=interp_sb)
      acc = flat[:lay.n_real]   # (one segment: the real entries come first)
    else:
      u = _concat_leaves(leaves, dtype)
      if momentum > 0:
        u = momentum * state.velocity + u
      acc = u + res_real
      if jnp.dtype(dtype).itemsize < 4:   # (one rounding for every reader: see below)
        acc = jax.lax.optimization_barrier(acc)
      flat = lay.pad(acc)
    payload, above, t, tie_last, finite, count, last, dense = _select_segments(flat, lay, state, dtype, stats)
    check_choice("_FLAT_OUT", _FLAT_OUT, ("xla", "pallas"))
    tie = jnp.full((lay.num_segments,), -1, jnp.int32) if tie_last is None else tie_last
    in_buffer = padded and use_sb   # (the Pallas kernel over the buffer; the XLA form below otherwise)
    out_final = bool(use_sb and _FLAT_OUT == "pallas" and dense is None)
    if out_final:   # (use_sb: no momentum; float32 leaves; write_sent writes zeros on a non-finite step)
      seg_of = np.asarray(lay.seg_of_leaf, np.int32)
      outs = [o.reshape(leaf.shape) for o, leaf in zip(
          _pallas_pack.write_sent(flat, sizes, lay.offsets, t[seg_of], tie[seg_of], last, finite, stats[2],
                                  interpret=interp_sb), leaves)]
    elif in_buffer and dense is None:   # (not from the buffer, which zero_sent overwrites: leaf + old residual,
      # bitwise the buffer's entries (one float32 addition), in fusions a consumer such as Adam can absorb)
      def own(i, leaf):
        off, n = lay.offsets[i], lay.sizes[i]
        v = leaf.reshape(-1) + jax.lax.slice(state.residual, (off,), (off + n,))
        return v, _sent(v, off + jnp.arange(n, dtype=jnp.int32), 0, t, tie_last, last)
      outs = [_leaf_output(leaf, i, dense, lay, lambda i=i, leaf=leaf: own(i, leaf)) for i, leaf in enumerate(leaves)]
    else:
      outs = [_leaf_output(leaf, i, dense, lay, lambda i=i: _leaf_selection(flat, lay, t, tie_last, last, i))
              for i, leaf in enumerate(leaves)]
    new_res = None
    if in_buffer:   # the buffer becomes the residual: only its sent entries written, in place
      new_res = _pallas_pack.zero_sent(flat, t, tie, last, finite, stats[2], state.residual,
                                       after=(payload, above, outs if out_final else ()), interpret=interp_sb)
    elif padded:   # (the same values by XLA, over the padded buffer: its padding is zero, as the residual's)
      sent_p = _sent(flat, jnp.arange(lay.n_pad, dtype=jnp.int32), 0, t, tie_last, last)
      new_res = jnp.where(finite, jnp.where(sent_p, 0, flat), state.residual)
    elif use_sb and (lay.num_segments > 1 or _FLAT_KEPT != "xla"):   # the kept entries from the padded buffer
      new_res = _pallas_pack.kept_from_padded(flat, lay.seg_n, lay.seg_start, t, tie, last, finite, state.residual,
                                              in_place=lay.num_segments > 1 or _FLAT_KEPT == "pallas_inplace",
                                              interpret=interp_sb)
    if momentum > 0 or new_res is None:   # (the sent flags in the real layout)
      if lay.num_segments == 1:   # the real entries come first: the selection of the padded buffer
        sent = _sent(acc, jnp.arange(lay.n_real, dtype=jnp.int32), 0, t, tie_last, last)
      else:   # the payload's entries are exactly the ones sent
        slot = jnp.arange(payload.indices.shape[0], dtype=jnp.int32)
        dst = jnp.where(slot < count, lay.unpadded_index(payload.indices.astype(jnp.int32)), lay.n_real)
        sent = jnp.zeros((lay.n_real,), jnp.bool_).at[dst].set(True, mode="drop")   # (unsent slots: dropped)
      if new_res is None:
        new_res = jnp.where(finite, jnp.where(sent, 0, acc), state.residual)
    if momentum > 0:
      velocity = jnp.where(finite, jnp.where(sent, 0, u), state.velocity)
    out = jax.tree_util.tree_unflatten(treedef, outs)
    return (finite, out, new_res, velocity, count, above, payload_bytes(payload), payload.overflow, lay.n_real,
            out_final)

  def _leaf_output(leaf, i, dense, lay, selection):
    """Leaf ``i``'s output: the all-gathered mean's slice (with an axis), else its sent entries
    (``selection()`` gives the leaf's slice of the buffer and which entries were sent)."""
    if dense is not None:
      off = lay.offsets[i]
      return jax.lax.slice(dense, (off,), (off + lay.sizes[i],)).reshape(leaf.shape)
    v, sel = selection()
    return jnp.where(sel, v, 0).astype(leaf.dtype).reshape(leaf.shape)

  def _flat_step_dus(leaves, treedef, sizes, lay, dtype, state):
    """:func:`_flat_step` with ``_FLAT_BUILD = "dus"``: the padded buffer written leaf by leaf (each leaf's
    ``u_i + residual_i``, ``u_i = g_i`` or ``momentum * velocity_i + g_i``, by chunks of ``_GROUP_LEAVES``
    leaves into one buffer), and the new residual and velocity written back the same way from each leaf's
    slice of that buffer and its selection (:func:`_leaf_selection`), so that no gather maps between the
    padded and the raveled layouts. The same values bitwise as the "concat" build."""
    real_off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    piece = lambda vec, i: jax.lax.slice(vec, (int(real_off[i]),), (int(real_off[i]) + sizes[i],))
    us = [l.reshape(-1).astype(dtype) for l in leaves]
    res_in = [piece(state.residual, i) for i in range(len(leaves))]
    vel_in = [piece(state.velocity, i) for i in range(len(leaves))] if momentum > 0 else None
    if momentum > 0:
      us = [momentum * v + u for v, u in zip(vel_in, us)]
    flat = lay.flatten_sum(us, res_in, dtype, "dus")
    payload, above, t, tie_last, finite, count, last, dense = _select_segments(flat, lay, state, dtype)
    outs, res_pieces, vel_pieces = [], [], []
    for i, leaf in enumerate(leaves):
      v, sel = _leaf_selection(flat, lay, t, tie_last, last, i)
      res_pieces.append(jnp.where(finite, jnp.where(sel, 0, v), res_in[i]))
      if momentum > 0:
        vel_pieces.append(jnp.where(finite, jnp.where(sel, 0, us[i]), vel_in[i]))
      outs.append(_leaf_output(leaf, i, dense, lay, lambda v=v, sel=sel: (v, sel)))
    one = lambda ps: ps[0] if len(ps) == 1 else _chunked(ps, "dus", dtype)
    velocity = one(vel_pieces) if momentum > 0 else state.velocity
    out = jax.tree_util.tree_unflatten(treedef, outs)
    return (finite, out, one(res_pieces), velocity, count, above, payload_bytes(payload), payload.overflow,
            lay.n_real, False)

  def update_fn(updates, state, params=None):
    check_floating("sparsifier.update", updates)
    if flat_state:
      _check_flat_residual("sparsifier.update", updates, state, _buffer_residual())
    else:
      _check_like("sparsifier.update", updates, state.residual)
    _check_axis(axis_name)
    grads = updates
    updates, pre_state = _apply_precondition(precondition, updates, state.precondition, params)
    flat_seg = flat_state and segmented is not None   # (_flat_step does its own sum, velocity and finiteness)
    if flat_seg:
      addend = None
    elif flat_state:   # the raveled gradient (in the residual's dtype), through the velocity with momentum
      addend = _concat_leaves(jax.tree_util.tree_leaves(updates), state.residual.dtype)
      if momentum > 0:
        vel = momentum * state.velocity + addend
        addend = vel
    elif momentum > 0:
      vel = jax.tree_util.tree_map(lambda g, u: momentum * u + g.astype(u.dtype), updates, state.velocity)
      addend = vel
    else:
      addend = jax.tree_util.tree_map(lambda g, r: g.astype(r.dtype), updates, state.residual)
    # the error-compensated gradient acc = addend + residual (gradient + residual, not only the gradient:
    # the sum can overflow (float16) when neither does)
    key, sub = jax.random.split(state.key)
    final = (False, False)   # (residual, output) already hold the non-finite step's values
    if flat_seg:   # (residual and velocity written with finiteness applied)
      finite, out, new_res, velocity, nsel, n_above, nbytes, overflow, total, out_final = _flat_step(updates, state)
      final = (True, out_final)
    elif flat_state:   # the raveled vector is the state's own layout
      flat = addend + state.residual
      finite = _global_finite([flat], axis_name)
      out, new_res, hit_tree, nsel, n_above, nbytes, overflow, total = _loop_step(
          (flat, ravel_pytree(updates)[1]), finite, sub, state)
    elif segmented is not None:   # (the flag comes from the statistics pass: no per-leaf reductions)
      finite, (out, new_res, hit_tree, nsel, n_above, nbytes, overflow, total), final = _segmented_step(
          addend, state.residual, state)
    elif per_tensor:
      acc = jax.tree_util.tree_map(jnp.add, addend, state.residual)
      finite = _global_finite(jax.tree_util.tree_leaves(acc), axis_name)
      out, new_res, hit_tree, nsel, n_above, nbytes, overflow, total = _loop_step(acc, finite, sub, state)
    else:   # one raveled vector: its finiteness is one reduction over it (the same flag as per leaf)
      flat, unravel = _ravel_sum(addend, state.residual)
      finite = _global_finite([flat], axis_name)
      out, new_res, hit_tree, nsel, n_above, nbytes, overflow, total = _loop_step(
          (flat, unravel), finite, sub, state)
    if not flat_seg:
      velocity = state.velocity
    if momentum > 0 and not flat_seg:
      velocity = jax.tree_util.tree_map(lambda u, h, old: jnp.where(finite, jnp.where(h, 0, u), old),
                                        vel, hit_tree, state.velocity)
    if not final[0]:
      new_res = _keep_on_skip(finite, new_res, state.residual)
    # (static) a leaf computed in the residual's dtype of wider range than its gradient's (float16 gradients over
    # a float32 residual): a sent value above the gradient dtype's largest float is inf in the gradient's dtype
    g_leaves = jax.tree_util.tree_leaves(grads)
    r_dtypes = ([state.residual.dtype] * len(g_leaves) if flat_state else
                [jnp.result_type(r) for r in jax.tree_util.tree_leaves(state.residual)])
    narrow = any(jnp.finfo(r).max > jnp.finfo(jnp.result_type(g)).max for r, g in zip(r_dtypes, g_leaves))
    if not final[1]:
      out = jax.tree_util.tree_map(lambda o, g: jnp.where(finite, o, 0).astype(g.dtype), out, grads)
    else:   # (written in the residual's dtype, the gradients' when they differ)
      out = jax.tree_util.tree_map(lambda o, g: o.astype(g.dtype), out, grads)
    if narrow:   # such a step is a non-finite one: skipped on every replica (the output, the all-gathered mean
      # with an axis, is the same on all, so no collective is needed)
      fits = _global_finite(jax.tree_util.tree_leaves(out), None)
      out = jax.tree_util.tree_map(lambda o: jnp.where(fits, o, jnp.zeros((), o.dtype)), out)
      new_res = _keep_on_skip(fits, new_res, state.residual)
      velocity = _keep_on_skip(fits, velocity, state.velocity)
      nsel = jnp.where(fits, nsel, 0)
      finite = finite & fits
    pre_state = _keep_on_skip(finite, pre_state, state.precondition)
    stages, ratio_sum = state.stages, state.ratio_sum
    if adapt is not None:
      hi, every, tol = adapt
      rsum = ratio_sum + jnp.asarray(n_above, jnp.float32) / (total * ratio)
      # a window is `every` FINITE steps: a skipped step adds nothing to rsum, so counting it (the step counter)
      # would average fewer terms over `every` (or, skipped where the window ends, about twice as many)
      due = (state.step - state.nonfinite_steps + 1) % every == 0
      est = rsum / every
      moved = jnp.clip(stages - (est > 1 + tol).astype(jnp.int32) + (est < 1 - tol).astype(jnp.int32), 1, hi)
      stages = jnp.where(finite & due, moved, stages)
      ratio_sum = jnp.where(finite, jnp.where(due, 0.0, rsum), ratio_sum)
    nb = jnp.where(finite, jnp.float32(nbytes), 0.0)
    new_state = SparsifierState(
        new_res, key, stages, ratio_sum, state.step + 1, nsel.astype(jnp.float32) / total, nb,
        state.total_bytes + nb, state.overflow_steps + (overflow & finite).astype(jnp.int32),
        state.nonfinite_steps + (~finite).astype(jnp.int32), velocity, pre_state, state.layout)
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def topk(ratio: float, *, axis_name: str | None = None, per_tensor: bool = False, momentum: float | None = None,
         max_ratio: float | None = None, precondition: optax.GradientTransformation | None = None,
         flat_state: bool | None = None) -> optax.GradientTransformation:
  """Exact Top-k sparsification with error feedback (Aji and Heafield, 2017; ``lax.top_k``).

  ``momentum > 0``: DGC's momentum correction (see :func:`sidco`); chain with plain ``optax.sgd``.
  ``ratio`` may be a schedule through ``optax.inject_hyperparams`` with a static ``max_ratio`` (see
  :func:`sidco`).
  ``flat_state=True``: the residual (and velocity) as one vector in ``ravel_pytree`` order (see :func:`sidco`;
  with ``per_tensor=False`` only); bitwise the same updates and residual values.

  Example:
    >>> tx = optax.chain(topk(0.01), optax.sgd(0.1))
  """
  ratio, max_ratio = _resolve_ratio(ratio, max_ratio)
  momentum = _static("momentum", momentum, 0.0)
  check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)

  def select(vec, k, k_max, cap, key, stages, r):
    return _first_k(topk_payload(vec, k_max), k), k

  return _sparsifier(select, ratio, capacity_factor=1.0, per_tensor=per_tensor, axis_name=axis_name,
                     seed=0, initial_stages=1, momentum=momentum, max_ratio=max_ratio, precondition=precondition,
                     flat_state=_flat_flag(flat_state))


def randomk(ratio: float, *, seed: int | None = None, axis_name: str | None = None, per_tensor: bool = False,
            max_ratio: float | None = None, precondition: optax.GradientTransformation | None = None,
            flat_state: bool | None = None) -> optax.GradientTransformation:
  """Random-k sparsification with error feedback: ``k`` uniformly random distinct entries per step.

  The workers share ``seed`` (the same entries everywhere, as in the literature's shared-seed Random-k).
  ``flat_state=True``: the residual (and velocity) as one vector in ``ravel_pytree`` order (see :func:`sidco`;
  with ``per_tensor=False`` only); bitwise the same updates and residual values.
  """
  ratio, max_ratio = _resolve_ratio(ratio, max_ratio)
  seed = _static("seed", seed, 0, int)
  check_int("seed", seed)

  def select(vec, k, k_max, cap, key, stages, r):
    idx = jax.random.choice(key, vec.shape[0], (k_max,), replace=False).astype(jnp.int32)
    return _first_k(SparsePayload(idx, vec[idx], jnp.asarray(k_max, jnp.int32), jnp.asarray(False)), k), k

  return _sparsifier(select, ratio, capacity_factor=1.0, per_tensor=per_tensor, axis_name=axis_name,
                     seed=seed, initial_stages=1, max_ratio=max_ratio, precondition=precondition,
                     flat_state=_flat_flag(flat_state))


def dgc(ratio: float, *, sample_fraction: float | None = None, capacity_factor: float | None = None,
        seed: int | None = None, axis_name: str | None = None, per_tensor: bool = False,
        max_ratio: float | None = None, precondition: optax.GradientTransformation | None = None,
        exact: bool | None = None, flat_state: bool | None = None) -> optax.GradientTransformation:
  """DGC's sampled-threshold sparsification with error feedback (Lin et al., ICLR 2018).

  The threshold is the top-k magnitude of a random sample (:func:`dgc_threshold`); if more than the
  capacity (``capacity_factor`` times k, default 2) exceed it, a second round keeps exactly Top-k's k
  entries, as DGC's does (ties to the lower index, as ``lax.top_k``; the k-th magnitude found by the block
  select of ``sidco(exact=True)``, no sort of the gradient; where fewer than k entries are nonzero only
  those are sent, so ``density`` counts them and not ``lax.top_k``'s zeros). Otherwise everything above the
  sampled threshold is sent: between 0 and ``capacity_factor * k`` entries. On a GPU the second round runs every step and is kept only
  on overflow steps (no ``lax.cond``, whose predicate would go to the host: per f32 ResNet-50 step on an H100
  +0.77 ms branch-free against +4.41 ms with the conditional and +0.95 ms for ``topk``, session 25); elsewhere
  under ``lax.cond``; bitwise the same (``sparse._BRANCHES``). With ``per_tensor=True`` each leaf has its own
  sampled threshold and second round: selected leaf by leaf, a 161-leaf ResNet-50 step compiled for 100-118 s on an
  H100 (7 s flat).
  On a GPU the leaves of one size and dtype are selected by one ``vmap``ped call (the same payloads; to float
  rounding with a ``precondition``; ``sparse._BATCH_LEAVES``): that step compiled in 51 s instead of 115 s and cost
  +5.39 ms instead of +18.08 ms over Adam (H100, session 26), still 5.8x ``topk``'s +0.92 ms: per tensor, prefer
  ``sidco(per_tensor=True)``, whose leaves share one flat buffer (+0.25-0.29 ms there). The CPU selects leaf by
  leaf (batched: ~30% less compile time, ~17% more run time, ``benchmarks/per_tensor_compile.py``).

  Sample size (:func:`dgc_sample_size`): by default (``sample_fraction=None``) 1% of the entries (the
  paper's 0.1%-1%), enlarged so that the sample holds ``k = ratio * size >= 16`` entries above the
  threshold, capped at the whole vector (then the threshold is the exact k-th largest). The count sent
  then varies by ~``1 / sqrt(k)`` <= 1/4 around k on every step. A fixed 1% (the default before
  session 8) holds k = 1 at density 0.1% on a 94k-entry model: the count sent was exponentially
  distributed around k, and training 1.4 pt worse on mnist1d (docs/comm.md, "DGC's default sample").
  An explicit ``sample_fraction`` in (0, 1] keeps the fixed-fraction rule (``round(n * sample_fraction)``
  entries).

  ``exact=True`` (default False) trims every step to at most ``k``: when the sampled threshold selected
  more than ``k``, the ``k`` largest of them are kept (ties to the lower index, as ``lax.top_k``; one sort
  of the payload's ``capacity_factor * k`` slots, not of the gradient), so DGC never sends more than
  Top-k does (a step where the sample's threshold selects fewer sends those), in a payload of ``k``
  slots (Top-k's bytes). The rest stays in the residual.

  ``flat_state=True``: the residual (and velocity) as one vector in ``ravel_pytree`` order (see :func:`sidco`;
  with ``per_tensor=False`` only); bitwise the same updates and residual values.

  Example:
    >>> tx = optax.chain(dgc(0.01, exact=True), optax.sgd(0.1))
  """
  ratio, max_ratio = _resolve_ratio(ratio, max_ratio)
  sample_fraction = _static("sample_fraction", sample_fraction, None)
  capacity_factor = _static("capacity_factor", capacity_factor, 2.0)
  seed = _static("seed", seed, 0, int)
  check_range("capacity_factor", capacity_factor, 1.0)
  if sample_fraction is not None:
    check_range("sample_fraction", sample_fraction, 0.0, 1.0, low_inclusive=False)
  check_int("seed", seed)
  exact = bool(_static("exact", exact, False))

  def select(vec, k, k_max, cap, key, stages, r):
    a = jnp.abs(vec)
    t = dgc_threshold(key, a, r, sample_fraction, max_ratio=max_ratio)
    payload = compact(vec, a >= t, cap)
    above = jnp.sum(a >= t)

    def second_round(_):   # more than cap exceed t, so the k largest all do: Top-k's set of vec
      return _topk_set_payload(vec, k, k_max, cap)

    payload = _when(payload.overflow, second_round, payload)
    if exact:   # at most k: the k largest of what the threshold selected, in a payload of k_max slots
      lay = _Layout([vec.shape[0]], [[0]])
      payload = _seg_trim(payload, jnp.zeros((1,), jnp.float32), lay, jnp.reshape(jnp.asarray(k, jnp.int32), (1,)),
                          k_max)[0]
    return payload, above

  return _sparsifier(select, ratio, capacity_factor=capacity_factor, per_tensor=per_tensor,
                     axis_name=axis_name, seed=seed, initial_stages=1, max_ratio=max_ratio,
                     precondition=precondition, flat_state=_flat_flag(flat_state), batch_leaves=True)


def sidco(ratio: float, *, distribution: str = "exponential", stages: int | str = "adaptive",
          first_ratio: float | None = None, adapt_every: int | None = None, tolerance: float | None = None,
          capacity_factor: float | None = None, axis_name: str | None = None, per_tensor: bool = False,
          momentum: float | None = None, max_ratio: float | None = None,
          precondition: optax.GradientTransformation | None = None,
          min_fraction: float | None = None, max_fraction: float | None = None,
          min_group_count: float | None = None, exact: bool | None = None,
          overshoot: float | None = None, flat_state: bool | None = None) -> optax.GradientTransformation:
  """SIDCo threshold sparsification with error feedback (Abdelmoniem et al., MLSys 2021).

  Args:
    ratio: target density delta in (0, 1) (e.g. 0.001). May be a schedule through
      ``optax.inject_hyperparams`` (then pass a static ``max_ratio``).
    distribution: ``'exponential'``, ``'gpareto'`` or ``'gamma'`` (see :func:`sidco_threshold`).
      ``distribution``, ``stages``, ``first_ratio``, ``adapt_every``, ``tolerance``, ``min_fraction`` and
      ``max_fraction`` configure SIDCo's fit: they are read only with ``exact=False`` (see ``exact``).
    stages: a fixed number of fitting stages, or ``'adaptive'`` (start at 1, adapt every
      ``adapt_every`` steps by the mean achieved/target density ratio against ``1 +- tolerance``; skipped
      non-finite steps do not count).
    first_ratio: density kept by the first stage of a multi-stage fit (default 0.25).
    adapt_every, tolerance: the adaptation rule (defaults 10 steps, 0.1).
    capacity_factor: payload capacity in units of the target count (default 2); more selected elements
      overflow into the residual.
    axis_name: mapped axis for the collective (None: one device, the update is the local sparse vector).
    per_tensor: one threshold per leaf (True) or one for the whole gradient tree (False). Either way
      the leaves are compressed together: one flat buffer, one statistics pass, one packing and ONE
      payload whose capacity the leaves share (so a small leaf that overshoots borrows the slack of the
      others instead of overflowing its own two slots). Leaves too small to fit (target count below
      ``min_group_count``) are pooled with their neighbours (see below).
    momentum: DGC's momentum correction with momentum-factor masking (Lin et al., ICLR 2018, Sec. 3.2):
      the worker's velocity, not the raw gradient, is accumulated and sparsified; chain with plain
      ``optax.sgd`` (no second momentum). 0 (default) turns it off.
    max_ratio: the largest density a traced ``ratio`` takes; it fixes the payload capacity
      (``capacity_factor * max_ratio * n``). Needed when ``ratio`` is an array.
    precondition: a local optax transform applied to this worker's gradient before error feedback,
      e.g. ``optax.scale_by_adam()``: the local Adam direction is compressed (as 1-bit Adam compresses
      after the moment update), so chain with ``optax.sgd(lr)`` instead of ``optax.adam(lr)``. See the
      note on adaptive optimizers below.
    min_fraction: floor on the selected count, as a fraction of the target count (default 0.25; 0
      turns it off): when the fitted threshold would select fewer, it is lowered to the
      ``min_fraction * k``-th largest 64-entry block maximum (see ``min_count`` of
      :func:`sidco_compress`). Error-compensated vectors drift away from the fitted family; without
      the floor the default exponential fit sends nothing at all on Gaussian-like gradients. Per
      threshold segment (each leaf with ``per_tensor=True``).
    max_fraction: ceiling on overshooting steps, in units of the target count (default 1; 0 turns it
      off; at most ``capacity_factor``): when the fitted thresholds select more than the payload holds,
      every segment's threshold is raised (if needed) to keep at most ``max_fraction * k`` of its
      entries (exact counts, found by bisection) and the payload is packed again, so nothing overflows
      and what is sent are the largest entries. Costs a search over the float bits on such steps only (11
      passes over the gradient, 8 thresholds each, with the Pallas count on GPU; 31 bisection passes elsewhere).
    min_group_count: with ``per_tensor=True``, a leaf whose target count ``ratio * size`` is below this
      (default 16) does not get its own threshold: runs of consecutive small leaves are pooled into one
      segment, and a pool still below it joins the next leaf's segment. A threshold fitted on a
      32-entry bias at ratio 0.01 (a target of 0.3 entries) is noise.
    exact: send exactly the target count ``k`` of every threshold segment (default True), i.e. Top-k's
      set (ties to the lower index, as ``lax.top_k``) in a payload of ``k`` slots (Top-k's bytes;
      without ``exact`` the payload is ``capacity_factor * k`` slots). No SIDCo fit runs: each segment's
      ``k``-th largest magnitude is found exactly by a block select (a sort of the 64-entry block
      maxima picks ``k`` blocks per segment, a sort of their 8-entry sub-block maxima ``k`` sub-blocks,
      a sort of those ``8 k`` entries the ``k``-th), the segment is packed above the float
      just below it (one packing, as the estimator's), and a segment that selected more than ``k``
      (magnitudes tied at the cut) is cut back to its ``k`` largest, in index order among the tied ones, by
      prefix counts over the payload's slots (no sort, no conditional). On a GPU, for one segment (the
      flat default, outside ``shard_map``), the same ``k``-th largest comes from counting searches over the
      block maxima and the candidate blocks, one Pallas kernel per pass (``sparse._EXACT_SEARCH = "auto"``,
      since session 37: the same thresholds bit for bit, no sort). ``distribution``, ``stages``, ``first_ratio``, ``adapt_every``,
      ``tolerance``, ``min_fraction``, ``max_fraction`` and ``overshoot`` then change nothing that is
      sent. The set is the top-k of sidco's own error-compensated buffer ``gradient + residual``, written
      leaf by leaf in place (``_SUM_FLATTEN = "dus"``): for gradients that are materialized before the
      update (a jitted ``update`` on its own) it is, with ``per_tensor=False``, bitwise ``topk``'s update
      and residual (tested; also seen over whole training steps of ``models.make_simulated_data_parallel_step``
      on CPU); when the gradient's producer ends in a multiply inside the same jit, XLA may
      contract it with the residual's add into an FMA, so a value can differ from ``topk``'s in the last
      bit and, where the ``k``-th and ``(k+1)``-th magnitudes are that close, one entry of the set can
      differ. Nothing is lost either way (what is not sent stays in the residual, from the same buffer);
      docs/comm.md, "Rounding caveat of dus". Why no fit: the payload is
      Top-k's set whatever threshold a fit finds, so fitting first (the default until session 9: aim at
      ``overshoot * k``, then the search on the steps where the fit missed) only costs time; see
      "Speed" below. ``exact=False`` is SIDCo's estimator (Sec. 3-4): the fitted thresholds decide the
      count, with the floor and the ceiling above. With ``exact=False`` the count moves around the
      target from step to step (digits CNN, 8 workers, 1%: ``'gpareto'`` 0.45-1.4x in the first 10
      steps, 0.75-1.2x later; the default exponential fit 0.6-0.95x, mean 0.8x, for most of a 300-step
      run, sending 70-76% of the exact Top-k set), although what it selects is always the largest
      entries; docs/comm.md has the diagnosis.
    overshoot: kept for the fit-first path of before session 9 (a private benchmark switch): the fit's
      aim in units of the target count (default 1.5; between 1 and ``capacity_factor``). It never
      changes what is sent.
    flat_state: keep the error-feedback residual (and the momentum velocity) as ONE vector, the leaves
      concatenated in tree order (``jax.flatten_util.ravel_pytree(params)[0]``'s layout; unravel it with
      ``ravel_pytree(params)[1]``), instead of a tree like the parameters (default False). The state then
      has 1 buffer where it had one per leaf (161 for ResNet-50): a jitted step that donates and returns its
      optimizer state hands the runtime fewer buffers per call, and the residual is written by one pass
      instead of one per leaf. What is sent, the update and the residual's values are bitwise those of
      ``flat_state=False`` in float32 (tested, also inside ``density_warmup`` with per-tensor segments, whose
      padding changes with the density: the flat layout does not); in bfloat16/float16 the error feedback is
      exact in both layouts, but per tensor entries tied at a threshold may be chosen differently (XLA may
      compare their unrounded sums in one layout's fusions). Every parameter leaf must have one
      dtype. Code that reads ``state.residual`` as a tree must unravel it first;
      :func:`mlsys_jax.comm.adaptive_ef.decay_residual` works on either layout.

  Adaptive optimizers: ``optax.chain(sidco(delta), optax.adam(lr))`` gives Adam a gradient in which
  each coordinate is non-zero on about a fraction p of the steps and then carries the residual of the
  ~1/p steps before it; Adam's per-coordinate normalization divides by the RMS of that spiky signal, so
  a coordinate with a consistent gradient moves about sqrt(p) as far as under dense Adam (0.1x at
  p = 0.01): the chain trains like Adam with a far smaller step size at first. Trained long enough it
  gets closer: at 600 steps (8 workers, 1%, 15 seeds) the chain is 0.56 pt below Adam on digits and
  1.69 pt on mnist1d (the Top-k chain, whose entries ``exact=True`` sends;
  ``experiments/results/compressed_adam_0.01_chain_topk_s9_pooled15.json``). At 0.1% use the
  warm-up recipe of docs/comm.md (``density_warmup`` with ``rms_selection``; 15 seeds: digits -0.91,
  mnist1d -1.07 pt). At short horizons compressing after the moment update is better:
  ``optax.chain(sidco(delta, precondition=optax.scale_by_adam()), optax.sgd(lr))`` (unstable on mnist1d;
  docs/comm.md).

  Hyperparameters other than ``ratio`` default to None (meaning the value above) so that
  ``optax.inject_hyperparams`` leaves them static; pass ``static_args`` for the ones you set, e.g.
  ``optax.inject_hyperparams(sidco, static_args=('max_ratio',))(ratio=schedule, max_ratio=0.05)``.

  Speed (issue 18): the transform costs one flat error-compensated buffer and one statistics pass over it
  (per-tile sums, per-block maxima): on a GPU, for float32 trees (without ``precondition`` or ``momentum``),
  both come from one Pallas kernel per group of leaves that writes the buffer tile by tile with each tile's
  statistics (``sparse._SUM_BUILD``, since session 31; with ``flat_state`` and per-tensor segments a second kernel
  writes the new residual from the buffer, in place); elsewhere XLA writes the leafwise sums by chunks in place
  and a statistics pass reads them. Then per-segment thresholds (with
  ``exact``: the block select's three small sorts, or on a GPU for one segment the counting search's passes;
  without: the fit, from reshapes and one small gather),
  one packing with per-segment thresholds, one collective, and one elementwise pass per leaf for its
  residual and output (an entry was sent iff it is above its segment's threshold and not after the last
  packed index). No Python loop of kernels over leaves (with ``exact``, no conditional); deterministic. In a
  whole f32 batch-64 ResNet-50 training step on an H100 (session 31, ``sidco_model_step_h100_s31{b,c}.json``, cost
  over Adam alone) the default adds +0.075 / +0.103 ms against ``topk``'s +0.952 / +1.009 (per tensor +0.173 /
  +0.157, ``flat_state=True`` -0.003 / +0.035); session 38 (H100, two runs, ``sidco_model_step_h100_s38{a,b}.json``,
  wall over Adam alone): the default +0.019 / +0.030 ms against the block select's +0.051 / +0.149 and ``topk``'s
  +0.983 / +1.095; one jitted update alone 0.573 ms against the block select's 1.055 and ``topk``'s 1.653
  (``sidco_tree_h100_s38a.json``). The
  figures below are older update-alone loops. On an H200
  (ResNet-50's 161 leaves, 25.56M float32, ratio 0.001, device time per update in a 20-update loop;
  session 10, two runs, ``benchmarks/results/sidco_tree_s10a_h200.json`` and ``sidco_tree_s10b_h200.json``):
  the defaults (tie cut by prefix counts, the buffer's zeros a fill of their own, narrow segment keys)
  0.794 / 0.789 ms, per tensor 0.828 / 0.820, against session 9's defaults 1.016 / 1.010 (per tensor
  1.091 / 1.115) and ``topk`` 1.686 / 1.683 ms (2.12x / 2.13x; per tensor 2.04x / 2.05x); every loop
  bitwise that of session 9's defaults. In ``optax.chain(..., optax.adam(1e-3))`` session 9's defaults
  cost 0.865 ms for the compressor against ``topk``'s 1.370 (``sidco_chain_s9_h200.json``; not re-run).
  ``exact=False`` on a GPU runs without data-dependent control flow (``sparse._BRANCHES``, default
  "auto"): the adaptive stages unrolled up to ``max_stages(ratio)`` and masked, the floor and the ceiling
  computed every step and kept elementwise; the same payloads bitwise as with ``lax.cond`` and a ``while_loop``
  (its path elsewhere), whose predicates went to the host every step. In a whole f32 batch-64 ResNet-50
  training step on an H200 (session 23, ``benchmarks/results/sidco_model_step_h200_s23_est.json``) it adds
  1.17 ms per step (per tensor 1.10) against 7.76 (7.61) with the conditionals and ``topk``'s 0.81: still
  slower than ``topk`` there (more kernels: 1.45 ms of them); for speed keep the default ``exact=True``
  (0.06-0.15 ms in the same step). Since session 24 the ceiling on GPU uses the block select of ``exact=True``
  (``sparse._CEILING = "auto"``; the same thresholds): on an H100 the same step's cost fell from +1.56 to +1.27 ms
  (``topk`` +0.98). With a traced ratio schedule (``max_ratio``) the stage count has no static
  bound and its loop stays a ``while_loop`` (one host round trip per stage on a GPU); the floor and the
  ceiling are still branch-free.

  Example:
    >>> tx = optax.chain(sidco(0.001), optax.adam(1e-3))          # Top-k's set, no fit
    >>> tx = optax.chain(sidco(0.001, distribution='gpareto', exact=False), optax.adam(1e-3))  # the estimator
    >>> # momentum SGD as in DGC, one threshold per tensor (mnist1d, 8 workers, 1%, measured with
    >>> # exact=False: 94.7% vs 93.1% dense)
    >>> tx = optax.chain(sidco(0.01, momentum=0.9, per_tensor=True), optax.sgd(0.05))
  """
  ratio, max_ratio = _resolve_ratio(ratio, max_ratio)
  first_ratio = _static("first_ratio", first_ratio, 0.25)
  adapt_every = _static("adapt_every", adapt_every, 10, int)
  tolerance = _static("tolerance", tolerance, 0.1)
  capacity_factor = _static("capacity_factor", capacity_factor, 2.0)
  check_range("capacity_factor", capacity_factor, 1.0)   # (before the bounds that read it)
  momentum = _static("momentum", momentum, 0.0)
  min_fraction = _static("min_fraction", min_fraction, 0.25)
  check_range("min_fraction", min_fraction, 0.0, 1.0)
  capacity_factor = _static("capacity_factor", capacity_factor, 2.0)
  max_fraction = _static("max_fraction", max_fraction, 1.0)
  check_range("max_fraction", max_fraction, 0.0, capacity_factor)
  if 0 < max_fraction < min_fraction:
    raise ValueError(f"max_fraction {max_fraction} is below min_fraction {min_fraction}: the band of selected "
                     f"counts would be empty; raise max_fraction (or 0 turns the ceiling off).")
  min_group_count = _static("min_group_count", min_group_count, 16.0)
  check_range("min_group_count", min_group_count, 0.0)
  exact = bool(_static("exact", exact, True))
  flat_state = _flat_flag(flat_state)
  overshoot = _static("overshoot", overshoot, min(1.5, capacity_factor))
  check_range("overshoot", overshoot, 1.0, capacity_factor)
  stages = _static("stages", stages, "adaptive", int) if not isinstance(stages, str) else stages
  check_range("capacity_factor", capacity_factor, 1.0)
  check_choice("distribution", distribution, DISTRIBUTIONS)
  check_range("first_ratio", first_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_int("adapt_every", adapt_every, 1)
  check_range("tolerance", tolerance, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
  adaptive = stages == "adaptive"
  if not adaptive:
    check_int("stages", stages, 1, 64)
  elif exact:   # no adaptation (the fit-first path of _EXACT_FIT: one stage at 4x the target, then a
    adaptive, stages = False, 2   # count-corrected final stage)
  if max_ratio is None:
    hi = max_stages(ratio)
  else:   # the bound follows the traced ratio
    hi = jnp.maximum(1, jnp.ceil(jnp.log(jnp.asarray(ratio, jnp.float32)) / math.log(0.5))).astype(jnp.int32)

  def select(flat, lay, k, k_max, cap, n_stages, r, stats=None):
    n_stages = n_stages if adaptive else stages   # fixed stages stay a Python int (unrolled)
    if exact:   # Top-k's set per segment (the block select; no fit unless _EXACT_FIT, whose aim is r_fit)
      r_fit = min(r * overshoot, 0.999) if _is_static(r) else jnp.minimum(jnp.asarray(r, jnp.float32) * overshoot, 0.999)
      return _sidco_segments(flat, lay, r_fit, cap, distribution, n_stages, first_ratio, None, None,
                             packing=_TRANSFORM_PACKING,
                             exact=(jnp.asarray(k, jnp.int32), int(np.sum(k_max)), k_max), stats=stats)
    j = None
    if min_fraction > 0:   # the floor of each segment (sidco_compress's min_count, per segment)
      floor_max = np.maximum(1, np.round(min_fraction * k_max)).astype(np.int64)
      kk = np.maximum(1, np.minimum(floor_max, lay.seg_blocks // 4))
      j = floor_max if max_ratio is None else jnp.maximum(jnp.round(min_fraction * k), 1)
      j = jnp.clip(jnp.asarray(j, jnp.int32), 1, jnp.asarray(kk, jnp.int32))
    hi_count = hi_bound = None
    if max_fraction > 0:   # the ceiling on overflow steps: max_fraction * k entries per segment
      hi_count = hi_bound = np.maximum(1, np.round(max_fraction * k_max)).astype(np.int64)
      if max_ratio is not None:   # (a traced count: no static bound for the ceiling's block select)
        hi_count, hi_bound = jnp.maximum(jnp.round(max_fraction * k), 1), None
      hi_count = jnp.asarray(hi_count, jnp.int32)
    return _sidco_segments(flat, lay, r, cap, distribution, n_stages, first_ratio, j, hi_count,
                           packing=_TRANSFORM_PACKING,
                           stage_bound=hi if adaptive and isinstance(hi, int) else None,
                           max_count_bound=hi_bound, stats=stats)

  select.min_group_count = min_group_count
  return _sparsifier(None, ratio, capacity_factor=capacity_factor, per_tensor=per_tensor,
                     axis_name=axis_name, seed=0, initial_stages=1 if adaptive else stages,
                     adapt=(hi, adapt_every, tolerance) if adaptive else None,
                     momentum=momentum,
                     max_ratio=max_ratio, precondition=precondition, segmented=select,
                     flat_state=flat_state)
