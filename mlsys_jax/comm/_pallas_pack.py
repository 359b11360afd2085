"""Pallas (Triton backend) kernels for SIDCo's select-and-pack: block statistics and candidate packing.

Used by :func:`mlsys_jax.comm.sparse.compact_above` / :func:`~mlsys_jax.comm.sparse.sidco_compress` with
``packing='pallas'`` (the default on GPU), in place of the XLA path's chain of prefix sums, binary
searches and gathers (about 25 kernels):

1. :func:`block_stats`: one read of ``x``; per tile the float32 sum and sum of squares of ``|x|``, per
   block of 64 entries the maximum of ``|x|`` (what the SIDCo fit and the packing need).
2. :func:`pack_above`, given the threshold ``t``: count the candidate blocks (maximum > t) per tile of
   block maxima; list them in index order (each tile writes at the sum of the earlier tiles' counts, read
   in-kernel); count the selected entries per group of 64 listed blocks (masked loads of those blocks
   only: about 6% of ``x`` at ratio 0.001); each group writes value and index of its entries at its
   offset plus their rank (prefix sums along and across block rows) into a zero-initialised payload.

For the transforms on a tree: :func:`sum_leaves` builds the padded buffer ``g + residual`` of every leaf and step 1's
statistics in one read of the leaves (one kernel per group of leaves), :func:`kept_from_padded` writes a flat
per-tensor residual back from that buffer, and :func:`write_leaves` every leaf's residual and output;
:func:`search_bits` (per segment :func:`seg_search_bits`) runs the exact selection's counting search one kernel per
pass, adding counts with integer atomics (order-free, so still deterministic).

The payload is identical to ``compact(x, abs(x) > t, capacity)``: ascending index, the first ``capacity``
selected entries, zeros in unused slots. Deterministic (no atomics). On an H100 (jax 0.11.2) at 25M float32,
ratio 0.001: statistics 36 us, packing ~18 us of kernel time (benchmarks/sidco_compression.py --profile).

Off GPU the same kernels run in Pallas' interpreter (``interpret=True``; for tests, slow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
try:  # Pallas and its Triton-specific load/store with masks
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover - jax without Pallas/Triton support
  pl = plgpu = None

from mlsys_jax._compat import triton_compiler_params

BLOCK = 64          # entries per block (the granularity of the block maxima)
TILE_BLOCKS = 64    # blocks per program of the count/write kernels (4096 entries)
STATS_BLOCKS = 128  # blocks per program of the statistics kernel (8192 entries)
NUM_WARPS = 4       # warps per program of the count/write kernels
STATS_WARPS = 8     # warps per program of the statistics kernel
LIST_BLOCKS = 2048  # blocks per program when listing candidate blocks (pack_above)
ROWS = 64           # candidate blocks per program when counting / writing (pack_above)
MAX_TILES = 8192    # tiles/groups are widened so that their counts fit one in-kernel vector
THR_BLOCKS = 64     # blocks per threshold tile: a threshold array holds one threshold per 4096 entries

# In-kernel offsets, block ids, positions and counts are int32 (``program_id * span + arange``, ``ids * BLOCK +
# arange``, compared with the static length ``n``). Past 2**31 - 1 they wrap to negative values, which pass the
# ``offs < n`` masks: wrong blocks read or written, silently (where a static length past int32 meets an int32 array,
# jax raises an OverflowError instead, deep in tracing). Every public entry point below refuses, at trace time
# (static shapes), a size whose largest int32 value would not fit (``_check_int32``, a ValueError naming the size,
# the limit and what to do). The largest sizes accepted, default parameters: 2**31 - 1 entries for tile_stats /
# block_stats, pack_above, pack_above_all_tiles, search_pass / search_bits, and seg_search_pass (rows x columns: its
# int32 counts); 2**31 for tile_counts_above and zero_sent (no static length compared in-kernel: the last offset,
# 2**31 - 1, fits); for kept_from_padded, write_leaves and write_sent a flat buffer of 2**31 with at most 2**31 - 1
# real entries, resp. a leaf of at most 2**31 - 1; 2**31 - 4096 padded entries for sum_leaves (its int32 table
# holds each tile's end, up to the buffer's length: the padded layout's tables are int32 too); 2**31 - 1 block
# maxima for kth_blocks; payload capacities up to 2**31 + 1 minus the entries one program ranks past its base.
# A program span that is not a power of two (tile_blocks=96) lowers a limit: offsets are rounded up to whole spans.
INT32_MAX = 2**31 - 1


def _span_fits(n: int, span: int) -> bool:
  """Programs of ``span`` entries over ``n`` entries, whose offsets are compared in-kernel with ``n``: ``n`` and
  every lane's offset (at most ``ceil(n / span) * span - 1``) fit int32."""
  return n <= INT32_MAX and -(-n // span) * span <= 2**31


def _largest_fitting(fits) -> int:
  """The largest size ``m`` in ``[0, 2**33)`` with ``fits(m)`` (``fits`` holds from 0 up to a point, then not)."""
  lo, hi = 0, 2**33
  if not fits(lo):
    return -1
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def _check_int32(fn: str, n: int, fits, what: str = "entries", hint: str = ""):
  """Refuse (ValueError at trace time) a size ``n`` for which ``fits`` says an int32 in-kernel offset or count of
  ``fn`` would wrap, naming the largest size that fits and what to do."""
  n = int(n)
  if fits(n):
    return
  limit = _largest_fitting(fits)
  raise ValueError(
      f"{fn}: {n} {what} is more than its int32 in-kernel offsets address correctly: at most {limit} {what} here "
      f"(past that they would wrap: wrong entries read or written, silently). {hint}Split the data so that each "
      f"buffer holds at most {limit} {what} (e.g. compress the gradient tree in parts, or shard it over more "
      f"devices); the XLA path is no way around it (its payload indices and positions are int32 too).")


def _check_capacity(fn: str, capacity: int, past: int):
  """Refuse a payload ``capacity`` whose slots plus the ``past`` entries one program may rank beyond its base
  (``base < capacity``) would wrap int32."""
  if int(capacity) + past - 2 > INT32_MAX:
    raise ValueError(f"{fn}: capacity {capacity} is too large for its int32 payload slots (at most "
                     f"{INT32_MAX + 2 - past} here); use a smaller capacity.")


def available() -> bool:
  """Whether the Pallas Triton primitives exist in this jax."""
  return plgpu is not None and hasattr(plgpu, "load") and hasattr(plgpu, "store")


def _compiler_params(num_warps: int):
  return triton_compiler_params(num_warps, 1)


def _interpreting(interpret: bool | None) -> bool:
  """``interpret`` as given, or (None) compiled Triton on GPU and the Pallas interpreter elsewhere."""
  return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def _call(kernel, out_shape, grid, interpret, num_warps, **kw):
  interpret = _interpreting(interpret)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                        compiler_params=None if interpret else _compiler_params(num_warps), **kw)


def _num_blocks(n: int, block_max: jax.Array) -> int:
  """Number of 64-entry blocks of ``n`` entries, checking that ``block_max`` has one maximum per block."""
  nb = -(-n // BLOCK)
  if block_max.shape != (nb,):
    raise ValueError(f"block_max must have shape ({nb},) (one maximum per 64 entries), got "
                     f"{block_max.shape}.")
  return nb


def _store_ranked(idx_ref, val_ref, offs, v, sel, base, capacity: int):
  """In-kernel: write the selected entries of a (rows, 64) tile to payload slots ``base`` + their rank in
  index order (prefix sums along and across the block rows); slots at or past ``capacity`` are dropped."""
  s = sel.astype(jnp.int32)
  within = jnp.cumsum(s, axis=1)                         # inclusive rank inside each block row
  row = jnp.sum(s, axis=1)
  slot = base + (jnp.cumsum(row) - row)[:, None] + within - 1   # + selected entries in earlier rows
  ok = sel & (slot < capacity)
  dst = jnp.where(ok, slot, capacity)
  plgpu.store(idx_ref.at[dst], offs, mask=ok)
  plgpu.store(val_ref.at[dst], v, mask=ok)


def _thr(t_ref, blk, n_thr: int):
  """In-kernel: the threshold of each block id in ``blk`` (one threshold per ``THR_BLOCKS`` blocks; a
  single threshold when ``n_thr == 1``)."""
  if n_thr == 1:
    return jnp.broadcast_to(t_ref[0], blk.shape)
  return plgpu.load(t_ref.at[jnp.clip(blk // THR_BLOCKS, 0, n_thr - 1)])


def _load_blocks(x_ref, ids, row_ok, t_ref, n: int, n_thr: int):
  """In-kernel: offsets (rows, 64), values and selection mask (``|x| > t``, the threshold of each block)
  of the 64-entry blocks ``ids``; rows where ``row_ok`` is False and entries past ``n`` are not loaded
  (zeros, not selected)."""
  offs = ids[:, None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)[None, :]
  m = row_ok[:, None] & (offs < n)
  v = plgpu.load(x_ref.at[offs], mask=m, other=jnp.zeros((), x_ref.dtype))
  return offs, v, m & (jnp.abs(v.astype(jnp.float32)) > _thr(t_ref, ids, n_thr)[:, None])


def _block_flags(bmax_ref, t_ref, i, *, nb: int, tb: int, n_thr: int):
  """In-kernel: ids of the ``tb`` blocks of tile ``i`` and whether each is a candidate (maximum > its
  threshold)."""
  blk = i * tb + jnp.arange(tb, dtype=jnp.int32)
  bm = plgpu.load(bmax_ref.at[blk], mask=blk < nb, other=-jnp.inf)
  return blk, bm > _thr(t_ref, blk, n_thr)


def _tile(x_ref, bmax_ref, t_ref, i, *, n: int, nb: int, tb: int, n_thr: int):
  """Offsets (tb, 64), loaded values and the selection mask of tile ``i`` (candidate blocks only)."""
  blk, cand = _block_flags(bmax_ref, t_ref, i, nb=nb, tb=tb, n_thr=n_thr)
  return _load_blocks(x_ref, blk, cand, t_ref, n, n_thr)


def _thresholds(threshold, nb: int):
  """``(t, n_thr)``: a float32 threshold array, one entry or one per ``THR_BLOCKS`` blocks."""
  t = jnp.asarray(threshold, jnp.float32).reshape(-1)
  n_thr = t.shape[0]
  if n_thr != 1 and n_thr != -(-nb // THR_BLOCKS):
    raise ValueError(f"threshold must be a scalar or hold one value per {THR_BLOCKS * BLOCK} entries "
                     f"({-(-nb // THR_BLOCKS)} here), got shape {t.shape}.")
  return t, n_thr


def block_stats(x: jax.Array, *, interpret: bool | None = None, tile_blocks: int | None = None,
                num_warps: int | None = None):
  """One read of a 1-D ``x``: ``(sum |x|, sum x^2, block_max)`` (float32; block maxima per 64 entries)."""
  s1, s2, bmax = tile_stats(x, interpret=interpret, tile_blocks=tile_blocks, num_warps=num_warps)
  return jnp.sum(s1), jnp.sum(s2), bmax


def tile_stats(x: jax.Array, *, interpret: bool | None = None, tile_blocks: int | None = None,
               num_warps: int | None = None):
  """One read of a 1-D ``x``: per tile of ``tile_blocks`` blocks the float32 sum of ``|x|`` and of
  ``x^2``, per block of 64 entries the maximum of ``|x|``: ``(s1 (tiles,), s2 (tiles,), block_max)``."""
  tile_blocks = tile_blocks or STATS_BLOCKS
  num_warps = num_warps or STATS_WARPS
  n = x.shape[0]
  _check_int32("tile_stats", n, functools.partial(_span_fits, span=tile_blocks * BLOCK),
               hint="" if tile_blocks & (tile_blocks - 1) else
               f"(tile_blocks={tile_blocks}: a power of two allows up to {INT32_MAX}.) ")
  nb = -(-n // BLOCK)
  tiles = -(-nb // tile_blocks)
  tb = tile_blocks

  def kernel(x_ref, bmax_ref, s1_ref, s2_ref):
    i = pl.program_id(0)
    blk = i * tb + jnp.arange(tb, dtype=jnp.int32)
    offs = blk[:, None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)[None, :]
    v = plgpu.load(x_ref.at[offs], mask=offs < n, other=jnp.zeros((), x_ref.dtype))
    a = jnp.abs(v.astype(jnp.float32))
    plgpu.store(bmax_ref.at[blk], jnp.max(a, axis=1), mask=blk < nb)
    s1_ref[i] = jnp.sum(a)
    s2_ref[i] = jnp.sum(a * a)

  f32 = jnp.float32
  bmax, s1, s2 = _call(kernel, (jax.ShapeDtypeStruct((nb,), f32), jax.ShapeDtypeStruct((tiles,), f32),
                                jax.ShapeDtypeStruct((tiles,), f32)), (tiles,), interpret, num_warps)(x)
  return s1, s2, bmax


def pack_above_all_tiles(x: jax.Array, threshold: jax.Array, capacity: int, block_max: jax.Array, *,
                         interpret: bool | None = None, tile_blocks: int | None = None,
                         num_warps: int | None = None):
  """First design, kept for the benchmark: ``(indices, values, total)`` with an exact ``total``, from a
  count kernel and a write kernel over tiles of ``tile_blocks`` blocks covering all of ``x`` (loads of
  non-candidate blocks are masked off, so only candidates are read, but every lane of every tile still
  runs the compare/scan instructions: on an H100 this is instruction-bound, 0.10 ms at 25M, slower than
  :func:`pack_above`)."""
  tile_blocks = tile_blocks or TILE_BLOCKS
  num_warps = num_warps or NUM_WARPS
  n = x.shape[0]
  # (block ids reach ceil(nb / tb) * tb - 1; offsets of candidate blocks nb * 64 - 1, the others masked by block)
  _check_int32("pack_above_all_tiles", n,
               lambda m: m <= INT32_MAX and -(-(-(-m // BLOCK)) // tile_blocks) * tile_blocks <= 2**31)
  _check_capacity("pack_above_all_tiles", capacity, tile_blocks * BLOCK)
  nb = _num_blocks(n, block_max)
  tb = tile_blocks
  tiles = -(-nb // tb)
  t, n_thr = _thresholds(threshold, nb)
  bmax = block_max.astype(jnp.float32)
  tile = functools.partial(_tile, n=n, nb=nb, tb=tb, n_thr=n_thr)

  def count_kernel(t_ref, bmax_ref, x_ref, cnt_ref):
    i = pl.program_id(0)
    _, _, sel = tile(x_ref, bmax_ref, t_ref, i)
    cnt_ref[i] = jnp.sum(sel.astype(jnp.int32))

  counts = _call(count_kernel, jax.ShapeDtypeStruct((tiles,), jnp.int32), (tiles,), interpret,
                 num_warps)(t, bmax, x)
  incl = jnp.cumsum(counts)
  base = incl - counts

  def write_kernel(t_ref, bmax_ref, x_ref, base_ref, idx0_ref, val0_ref, idx_ref, val_ref):
    del idx0_ref, val0_ref   # aliased to idx_ref / val_ref (zero-initialised payload)
    i = pl.program_id(0)
    b = base_ref[i]

    @pl.when(b < capacity)
    def _():
      offs, v, sel = tile(x_ref, bmax_ref, t_ref, i)
      _store_ranked(idx_ref, val_ref, offs, v, sel, b, capacity)

  idx, vals = _call(
      write_kernel, (jax.ShapeDtypeStruct((capacity,), jnp.int32), jax.ShapeDtypeStruct((capacity,), x.dtype)),
      (tiles,), interpret, num_warps, input_output_aliases={4: 0, 5: 1})(
          t, bmax, x, base, jnp.zeros((capacity,), jnp.int32), jnp.zeros((capacity,), x.dtype))
  return idx, vals, incl[-1]


def _pow2(v: int) -> int:
  return 1 << max(0, (int(v) - 1).bit_length())


def pack_above(x: jax.Array, threshold: jax.Array, capacity: int, block_max: jax.Array, *,
               interpret: bool | None = None, list_blocks: int | None = None, rows: int | None = None,
               num_warps: int | None = None):
  """``(indices, values, total, n_cand)``: the first ``capacity`` entries of ``x`` with ``|x| > threshold``
  in index order (zeros after them). ``threshold`` is a scalar or holds one threshold per 4096 entries
  (``THR_BLOCKS`` blocks: the per-segment thresholds of :func:`mlsys_jax.comm.sidco` on its flat buffer).

  Candidate blocks (``block_max > threshold``) are listed first and only the first
  ``cap_b = min(n / 64, capacity)`` of them are packed (each holds at least one selected entry, so more
  means overflow): ``total`` counts the selected entries in those, ``n_cand`` is the number of candidate
  blocks (``total`` is exact when ``n_cand <= cap_b``). Four launches, each touching only what it needs:

  1. per tile of ``list_blocks`` blocks, the number of candidate blocks (reads the block maxima);
  2. each tile writes the ids of its candidate blocks at its offset (sum of the earlier tiles' counts,
     read in-kernel) plus its in-tile rank: the ordered candidate list;
  3. per group of ``rows`` candidate blocks, the number of selected entries (reads those blocks);
  4. each group writes its entries at its offset (earlier groups' counts, read in-kernel) plus their
     rank in index order (prefix sums along and across the block rows).
  """
  num_warps = num_warps or NUM_WARPS
  n = x.shape[0]

  def spans(m):   # (list and row programs of m entries: their block spans)
    nb_, cap_ = -(-m // BLOCK), min(-(-m // BLOCK), capacity)
    return (list_blocks or max(LIST_BLOCKS, _pow2(-(-nb_ // MAX_TILES))),
            rows or max(ROWS, _pow2(-(-cap_ // MAX_TILES))), nb_, cap_)

  def fits(m):    # n and block offsets (candidate ids < nb) fit; list / row ids reach ceil(./span) * span - 1
    lb_, rb_, nb_, cap_ = spans(m)
    return m <= INT32_MAX and -(-nb_ // lb_) * lb_ <= 2**31 and -(-cap_ // rb_) * rb_ <= 2**31

  _check_int32("pack_above", n, fits)
  lb, rb, _, cap_b = spans(n)       # (list blocks, rows per group; cap_b = min(nb, capacity))
  _check_capacity("pack_above", capacity, max(lb, rb * BLOCK))   # (list ranks, payload slots)
  nb = _num_blocks(n, block_max)
  nt = -(-nb // lb)                 # list tiles
  ng = -(-cap_b // rb)              # row groups
  ntp, ngp = _pow2(nt), _pow2(ng)
  t, n_thr = _thresholds(threshold, nb)
  bmax = block_max.astype(jnp.float32)
  i32 = jnp.int32
  flags_of = functools.partial(_block_flags, nb=nb, tb=lb, n_thr=n_thr)

  def before(cnt_ref, i, size, padded):
    """Sum of cnt_ref[:i] (the exclusive prefix of tile i), read in-kernel."""
    j = jnp.arange(padded, dtype=i32)
    c = plgpu.load(cnt_ref.at[j], mask=j < size, other=0)
    return jnp.sum(jnp.where(j < i, c, 0))

  def tile_count_kernel(t_ref, bmax_ref, tc_ref):
    i = pl.program_id(0)
    _, f = flags_of(bmax_ref, t_ref, i)
    tc_ref[i] = jnp.sum(f.astype(i32))

  tile_counts = _call(tile_count_kernel, jax.ShapeDtypeStruct((nt,), i32), (nt,), interpret,
                      num_warps)(t, bmax)

  def list_kernel(t_ref, bmax_ref, tc_ref, cand_ref):
    i = pl.program_id(0)
    b = before(tc_ref, i, nt, ntp)

    @pl.when(b < cap_b)
    def _():
      blk, f = flags_of(bmax_ref, t_ref, i)
      r = b + jnp.cumsum(f.astype(i32)) - 1
      ok = f & (r < cap_b)
      plgpu.store(cand_ref.at[jnp.where(ok, r, cap_b)], blk, mask=ok)

  cand = _call(list_kernel, jax.ShapeDtypeStruct((cap_b,), i32), (nt,), interpret, num_warps)(
      t, bmax, tile_counts)
  n_cand = jnp.sum(tile_counts)
  n_rows = jnp.reshape(jnp.minimum(n_cand, cap_b).astype(i32), (1,))

  def rows_of(x_ref, cand_ref, t_ref, nr, g):
    r = g * rb + jnp.arange(rb, dtype=i32)
    valid = r < nr
    ids = plgpu.load(cand_ref.at[r], mask=valid, other=0)
    return _load_blocks(x_ref, ids, valid, t_ref, n, n_thr)

  def group_count_kernel(t_ref, nr_ref, cand_ref, x_ref, gc_ref):
    g = pl.program_id(0)
    nr = nr_ref[0]
    gc_ref[g] = 0

    @pl.when(g * rb < nr)
    def _():
      _, _, sel = rows_of(x_ref, cand_ref, t_ref, nr, g)
      gc_ref[g] = jnp.sum(sel.astype(i32))

  group_counts = _call(group_count_kernel, jax.ShapeDtypeStruct((ng,), i32), (ng,), interpret,
                       num_warps)(t, n_rows, cand, x)

  def write_kernel(t_ref, nr_ref, cand_ref, x_ref, gc_ref, idx0_ref, val0_ref, idx_ref, val_ref):
    del idx0_ref, val0_ref   # aliased to idx_ref / val_ref (zero-initialised payload)
    g = pl.program_id(0)
    nr = nr_ref[0]
    b = before(gc_ref, g, ng, ngp)

    @pl.when((g * rb < nr) & (b < capacity))
    def _():
      offs, v, sel = rows_of(x_ref, cand_ref, t_ref, nr, g)
      _store_ranked(idx_ref, val_ref, offs, v, sel, b, capacity)

  idx, vals = _call(
      write_kernel, (jax.ShapeDtypeStruct((capacity,), i32), jax.ShapeDtypeStruct((capacity,), x.dtype)),
      (ng,), interpret, num_warps, input_output_aliases={5: 0, 6: 1})(
          t, n_rows, cand, x, group_counts, jnp.zeros((capacity,), i32), jnp.zeros((capacity,), x.dtype))
  return idx, vals, jnp.sum(group_counts), n_cand


def kth_blocks(block_max: jax.Array, big: jax.Array, k, capacity: int, *, interpret: bool | None = None,
               list_blocks: int | None = None, num_warps: int | None = None):
  """``(ids, count)``: the blocks of the exact k-th largest search's second level, in two kernels.

  SIDCo's exact counts (:func:`mlsys_jax.comm.sparse._seg_kth_counts`, one segment) find ``T1 = big``, the
  ``k``-th largest block maximum's float, then search the entries of the blocks above ``T1`` and of the
  lowest-index blocks equal to it, ``k`` blocks in all: every entry above the segment's ``k``-th largest
  magnitude lies in one of them. This lists those blocks in block order: ``ids[:count]`` (int32, zeros after), with
  ``count = min(#selected, capacity)``; the same as ``compact(block_max, sel, capacity)``'s indices and count for
  ``sel = (bm > big) | ((bm == big) & (#{bm == big up to the block} <= k - #{bm > big}))`` (XLA: two prefix sums
  over every block, then the compaction's ~8 kernels). Kernel 1 counts, per tile of ``list_blocks`` blocks, the
  maxima above and equal to ``big``; kernel 2 reads those counts in-kernel (the tiles before it, and all for the
  total above) and writes each selected block's id at its rank. NaN maxima are never selected."""
  num_warps = num_warps or NUM_WARPS
  if block_max.ndim != 1 or block_max.shape[0] == 0:
    raise ValueError(f"block_max must be a non-empty 1-D array of block maxima, got shape {block_max.shape}.")
  if int(capacity) < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}.")
  capacity = int(capacity)
  nb = block_max.shape[0]
  lb_of = lambda m: list_blocks or max(LIST_BLOCKS, _pow2(-(-m // MAX_TILES)))
  _check_int32("kth_blocks", nb, lambda m: m <= INT32_MAX and -(-m // lb_of(m)) * lb_of(m) <= 2**31,
               what="block maxima")
  _check_capacity("kth_blocks", capacity, lb_of(nb))
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  lb = lb_of(nb)
  nt = -(-nb // lb)
  ntp = _pow2(nt)
  i32 = jnp.int32
  scal = jnp.stack([jax.lax.bitcast_convert_type(jnp.asarray(big, jnp.float32).reshape(()), i32),
                    jnp.asarray(k, i32).reshape(())])
  bmax = block_max.astype(jnp.float32)

  def flags(bmax_ref, sc_ref, i):
    blk = i * lb + jnp.arange(lb, dtype=i32)
    bm = plgpu.load(bmax_ref.at[jnp.where(blk < nb, blk, 0) if interpret else blk], mask=blk < nb,
                    other=-jnp.inf)
    b = jax.lax.bitcast_convert_type(sc_ref[0], jnp.float32)
    return blk, bm > b, bm == b

  def count_kernel(sc_ref, bmax_ref, c_ref):
    i = pl.program_id(0)
    _, gt, eq = flags(bmax_ref, sc_ref, i)
    c_ref[2 * i] = jnp.sum(gt.astype(i32))
    c_ref[2 * i + 1] = jnp.sum(eq.astype(i32))

  counts = _call(count_kernel, jax.ShapeDtypeStruct((2 * nt,), i32), (nt,), interpret, num_warps,
                 name="kth_blocks_count")(scal, bmax)

  def list_kernel(sc_ref, bmax_ref, c_ref, ids0_ref, ids_ref):
    del ids0_ref   # (aliased to ids_ref: zeros past the count)
    i = pl.program_id(0)
    j = jnp.arange(ntp, dtype=i32)
    c_gt = plgpu.load(c_ref.at[2 * j], mask=j < nt, other=0)
    c_eq = plgpu.load(c_ref.at[2 * j + 1], mask=j < nt, other=0)
    quota = jnp.maximum(sc_ref[1] - jnp.sum(c_gt), 0)        # tied blocks kept: k - #{above}
    gt_before = jnp.sum(jnp.where(j < i, c_gt, 0))
    eq_before = jnp.sum(jnp.where(j < i, c_eq, 0))
    base = gt_before + jnp.minimum(eq_before, quota)        # selected blocks in the tiles before

    @pl.when(base < capacity)
    def _():
      blk, gt, eq = flags(bmax_ref, sc_ref, i)
      sel = gt | (eq & (eq_before + jnp.cumsum(eq.astype(i32)) <= quota))
      r = base + jnp.cumsum(sel.astype(i32)) - 1
      ok = sel & (r < capacity)
      plgpu.store(ids_ref.at[jnp.where(ok, r, capacity)], blk, mask=ok)   # (as _store_ranked: past the end, masked)

  ids = _call(list_kernel, jax.ShapeDtypeStruct((capacity,), i32), (nt,), interpret, num_warps,
              input_output_aliases={3: 0}, name="kth_blocks_list")(scal, bmax, counts, jnp.zeros((capacity,), i32))
  c = counts.reshape(nt, 2)
  n_gt, n_eq = jnp.sum(c[:, 0]), jnp.sum(c[:, 1])
  k32 = jnp.asarray(k, i32).reshape(())
  count = jnp.minimum(n_gt + jnp.minimum(n_eq, jnp.maximum(k32 - n_gt, 0)), capacity).astype(i32)
  return ids, count


COUNT_CHUNK = 1024   # entries per inner step of tile_counts_above (chunk x W compares, summed per step)
COUNT_WARPS = 4


def tile_counts_above(x: jax.Array, thresholds: jax.Array, block_max: jax.Array | None = None, *,
                      interpret: bool | None = None, chunk: int | None = None,
                      num_warps: int | None = None) -> jax.Array:
  """Per tile of ``THR_BLOCKS * BLOCK`` (4096) entries of a 1-D ``x`` whose length is a multiple of 4096:
  the number of entries with ``|x| > t`` for each of the tile's ``W`` thresholds ``thresholds[tile]``
  (``(tiles, W)`` float32, W a power of two): ``(tiles, W)`` int32. One read of each tile (the W-way
  threshold searches of :func:`mlsys_jax.comm.sparse._search_bits`: W thresholds per pass).

  Each inner step compares a chunk of entries with the W thresholds and sums over the chunk. On an H200 at
  25M entries: 32 us per pass at W = 8, 55 us at W = 16, 192 us at W = 64 (reading 100 MB takes ~30 us). A
  version accumulating ``(chunk, W)`` counts in registers and summing once per tile (with the block skip
  below) was slower, 102 us per pass at W = 16 (batch s6c2).

  ``block_max`` (the maxima of ``|x|`` per 64 entries): entries of blocks whose maximum is not above the
  tile's smallest threshold are not loaded (they cannot count), so a search's later passes, whose
  thresholds have closed in on the answer, read only the blocks near or above it."""
  tile = THR_BLOCKS * BLOCK
  n = x.shape[0]
  if n % tile:
    raise ValueError(f"tile_counts_above needs a length that is a multiple of {tile}, got {n}.")
  tiles = n // tile
  t = jnp.asarray(thresholds, jnp.float32)
  w = t.shape[1]
  if t.shape != (tiles, w) or w & (w - 1):
    raise ValueError(f"thresholds must have shape ({tiles}, W) with W a power of two, got {t.shape}.")
  # (offsets up to n - 1, threshold / count slots up to tiles * W - 1; no static n compared in-kernel)
  _check_int32("tile_counts_above", n, lambda m: m <= 2**31 and -(-m // tile) * w <= 2**31)
  c = min(tile, chunk or max(128, COUNT_CHUNK * 16 // max(w, 16)))
  steps = tile // c
  i32 = jnp.int32

  skip = block_max is not None
  if skip and block_max.shape != (n // BLOCK,):
    raise ValueError(f"block_max must have shape ({n // BLOCK},), got {block_max.shape}.")

  def kernel(*refs):
    if skip:
      x_ref, t_ref, bm_ref, out_ref = refs
    else:
      x_ref, t_ref, out_ref = refs
    i = pl.program_id(0)
    jw = jnp.arange(w, dtype=i32)
    thr = plgpu.load(t_ref.at[i * w + jw])
    t_min = jnp.min(jnp.where(jnp.isnan(thr), jnp.inf, thr))   # (a NaN threshold counts nothing: not the minimum)

    def body(s, acc):
      offs = i * tile + s * c + jnp.arange(c, dtype=i32)
      if skip:   # blocks whose maximum is not above every threshold are not read (zeros never count)
        need = jnp.logical_not(plgpu.load(bm_ref.at[offs // BLOCK]) <= t_min)   # (a NaN maximum: read the block)
        v = plgpu.load(x_ref.at[offs], mask=need, other=jnp.zeros((), x_ref.dtype))
      else:
        v = plgpu.load(x_ref.at[offs])
      a = jnp.abs(v.astype(jnp.float32))
      return acc + jnp.sum((a[:, None] > thr[None, :]).astype(i32), axis=0)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((w,), i32))
    plgpu.store(out_ref.at[i * w + jw], acc)

  args = (x, t.reshape(-1)) + ((block_max.astype(jnp.float32),) if skip else ())
  out = _call(kernel, jax.ShapeDtypeStruct((tiles * w,), i32), (tiles,), interpret,
              num_warps or COUNT_WARPS)(*args)
  return out.reshape(tiles, w)




PASS_CHUNK = 2048    # entries per program of search_pass
PASS_STEP = 1024     # entries per inner step (PASS_STEP x W compares, summed per step)
PASS_WARPS = 4


def _search_mids(lo, hi, ways: int):
  """The ``ways`` thresholds (as int32 float bits) one pass of a W-way bit search tests between ``lo`` and
  ``hi``: ``lo + floor((hi - lo) j / W)`` for j = 1..W, clipped to [lo + 1, hi]; ``(W,)`` for scalar bounds,
  ``(segments, W)`` for ``(segments,)`` bounds (:func:`mlsys_jax.comm.sparse._search_bits`)."""
  j = jnp.arange(1, ways + 1, dtype=jnp.int32)
  if jnp.ndim(lo):
    lo, hi = lo[:, None], hi[:, None]
  w = hi - lo
  q, r = w // ways, w % ways
  return jnp.clip(lo + q * j + (r * j) // ways, lo + 1, hi)


def _search_narrow(lo, hi, mid, ok, keep_low: bool = True):
  """The bounds after a pass that tested ``mid`` (last axis) with outcome ``ok``. ``keep_low`` (the answer is
  the largest bits with ``ok``): the largest passing threshold raises ``lo``, the smallest failing one lowers
  ``hi``; otherwise (the smallest bits with ``ok``) the smallest passing one lowers ``hi`` and the largest
  failing one raises ``lo``."""
  big = jnp.iinfo(jnp.int32).max
  if keep_low:
    return (jnp.maximum(lo, jnp.max(jnp.where(ok, mid, -1), axis=-1)),
            jnp.minimum(hi, jnp.min(jnp.where(ok, big, mid), axis=-1)))
  return (jnp.maximum(lo, jnp.max(jnp.where(ok, -1, mid), axis=-1)),
          jnp.minimum(hi, jnp.min(jnp.where(ok, mid, big), axis=-1)))


def _search_step(lo, hi, counts, k, ways: int):
  """One pass of the keep-low search that counted ``counts`` entries above its thresholds: the new bounds."""
  return _search_narrow(lo, hi, _search_mids(lo, hi, ways), counts >= k)


def _search_chain(rows, lo, top, k, ways: int):
  """The bounds ``(lo, hi)`` after the passes whose total counts are ``rows`` (each ``(W,)``, or ``(S, W)`` for
  ``(S,)`` segments' ``lo``, ``top`` and ``k``), from ``(lo, top)``."""
  hi = top
  k = k[..., None] if jnp.ndim(k) else k
  for c in rows:
    lo, hi = _search_step(lo, hi, c, k, ways)
  return lo, hi


def search_passes(ways: int) -> int:
  """Passes of a W-way bit search over ``[0, 2^31)``: ``ceil(31 / log2 W)`` (``ways`` a power of two >= 2)."""
  if ways < 2 or ways & (ways - 1):
    raise ValueError(f"ways must be a power of two >= 2, got {ways}.")
  return -(-31 // (int(ways).bit_length() - 1))


def _check_bounds(ways: int, bounds: jax.Array, shape: tuple):
  """Refuse a search's bad ``ways`` or ``bounds`` (int32 ``[lo, top, k]`` of the given shape) by name."""
  search_passes(ways)
  if bounds.shape != shape or bounds.dtype != jnp.int32:
    raise ValueError(f"bounds must be int32 [lo bits, top bits, k] of shape {shape}, got "
                     f"{bounds.dtype}{tuple(bounds.shape)}.")


def _zero_counters(size: int, bounds: jax.Array) -> jax.Array:
  """Zero int32 counters for one search's pass kernels, which add into them in place (aliased): a broadcast of
  ``k < 0 and k > 0`` (false for every ``k``, which XLA cannot fold) from the search's ``bounds``, a buffer of its
  own written each call. (A zero constant gave the same answers on an H100, two searches in one program included:
  ``benchmarks/results/search_pass_check_h100_s35b.json``; this form is the one timed.)"""
  k = bounds.reshape(-1)[-1]
  return jnp.broadcast_to(((k < 0) & (k > 0)).astype(jnp.int32), (size,))


def _check_counters(counters: jax.Array, span: int, what: str, j: int | None = None):
  """Refuse a search's bad ``counters``: int32, 1-D, whole passes of ``span`` counters (``what`` names the shape),
  holding pass ``j`` when given."""
  passes = counters.shape[0] // span if counters.ndim == 1 and span else 0
  if counters.dtype != jnp.int32 or counters.ndim != 1 or counters.shape[0] % span or not passes or \
     (j is not None and not 0 <= j < passes):
    among = "" if j is None else f" with pass {j} among them"
    raise ValueError(f"counters must be int32 ({what},){among}, got {counters.dtype}{tuple(counters.shape)}.")


def _add_counts(c_ref, idx: jax.Array, counts: jax.Array):
  """``c_ref[idx] += counts`` for int32 ``counts`` from many programs at once: integer atomic adds on the GPU
  (exact in any order), a scatter-add in the interpreter (repeated addresses all add).

  Not ``plgpu.atomic_add``: Pallas' Triton lowering (jax 0.10.2 and 0.11.2) picks the float add for it whenever
  the value is a vector, integer or not (``tt.atomic_rmw fadd`` on int32 pointers: it tests the value's tensor type
  for an integer type instead of its element type), so every count's bits were added as a float (a subnormal,
  flushed to zero) and the counters stayed zero on the GPU while the interpreter counted right (issue 18, session
  35). ``jax.ref.addupdate`` lowers to ``tt.atomic_rmw add`` for integer elements
  (``tests/test_comm_search_pass.py::test_integer_atomics_lower_to_an_integer_add``)."""
  jax.ref.addupdate(c_ref, (idx,), counts)


def search_pass(x: jax.Array, bounds: jax.Array, counters: jax.Array, j: int, *, ways: int,
                interpret: bool | None = None) -> jax.Array:
  """Pass ``j`` of SIDCo's W-way threshold search over a 1-D float32 ``x`` (non-negative: magnitudes or
  block maxima) as ONE kernel; returns ``counters`` with row ``j`` filled.

  The search (:func:`mlsys_jax.comm.sparse._search_bits` with ``keep_low``, one segment) looks for the
  largest float bits ``b`` with ``#{x > f32(b)} >= k``; each pass counts the entries above ``W``
  thresholds between its bounds and narrows them. Done in XLA a pass is four kernels (the count, its sum,
  the new ``lo`` and ``hi``). Here ``counters`` (``(passes * W,)`` int32, zero from row ``j`` on) holds the
  total counts of the earlier passes: every program replays the bounds from ``(lo, top)`` through those rows
  (``bounds = [lo, top, k]``; ``lo`` is 0, or any bits known to have at least ``k`` entries above them),
  counts its ``PASS_CHUNK`` entries above this pass's ``W`` thresholds and adds them to row ``j`` with integer
  atomics (exact, in any order: the search's answer is ``_search_bits``' bit for bit). Once the bounds have
  closed (``hi - lo <= 1``: the answer is ``lo``) a pass reads nothing and adds nothing, which leaves the
  replayed bounds as they are: a search started from a tighter ``lo`` finishes in fewer working passes. NaN
  entries never count."""
  n = x.shape[0]
  if x.ndim != 1 or x.dtype != jnp.float32:
    raise ValueError(f"search_pass needs a 1-D float32 array, got {x.dtype}{tuple(x.shape)}.")
  _check_bounds(ways, bounds, (3,))
  _check_counters(counters, ways, f"passes * {ways}", j)
  _check_int32("search_pass", n, functools.partial(_span_fits, span=PASS_CHUNK))   # (counts <= n fit too)
  progs = max(1, -(-n // PASS_CHUNK))
  i32 = jnp.int32

  def kernel(x_ref, b_ref, c_in_ref, c_ref):
    i = pl.program_id(0)
    jw = jnp.arange(ways, dtype=i32)
    rows = [plgpu.load(c_in_ref.at[p * ways + jw]) for p in range(j)]
    lo, hi = _search_chain(rows, b_ref[0], b_ref[1], b_ref[2], ways)

    @pl.when(hi - lo > 1)
    def _():
      thr = jax.lax.bitcast_convert_type(_search_mids(lo, hi, ways), jnp.float32)

      def body(st, acc):
        offs = i * PASS_CHUNK + st * PASS_STEP + jnp.arange(PASS_STEP, dtype=i32)
        v = plgpu.load(x_ref.at[offs], mask=offs < n, other=jnp.zeros((), jnp.float32))
        return acc + jnp.sum((v[:, None] > thr[None, :]).astype(i32), axis=0)

      acc = jax.lax.fori_loop(0, PASS_CHUNK // PASS_STEP, body, jnp.zeros((ways,), i32))
      _add_counts(c_ref, j * ways + jw, acc)

  return _call(kernel, jax.ShapeDtypeStruct(counters.shape, i32), (progs,), interpret, PASS_WARPS,
               input_output_aliases={2: 0}, name=f"search_pass_{j}")(x, bounds, counters)


def search_bits(x: jax.Array, k, top_bits, lo_bits=0, *, ways: int, interpret: bool | None = None) -> jax.Array:
  """:func:`mlsys_jax.comm.sparse._search_bits` (``keep_low``, one segment) for the count
  ``#{x > t} >= k`` over a 1-D float32 ``x``, one :func:`search_pass` kernel per pass and a
  :func:`search_finish`: the largest float32 ``t`` in ``[f32(lo_bits), f32(top_bits))`` (by its bits) with at
  least ``k`` entries above it (``lo_bits`` when none), as float32. ``ceil(31 / log2 W)`` passes; with
  ``lo_bits = 0``, or any ``lo_bits`` with at least ``k`` entries above it, the same bits as the XLA search."""
  passes = search_passes(ways)
  bounds = jnp.stack([jnp.asarray(lo_bits, jnp.int32).reshape(()), jnp.asarray(top_bits, jnp.int32).reshape(()),
                      jnp.asarray(k, jnp.int32).reshape(())])
  counters = _zero_counters(passes * ways, bounds)
  for j in range(passes):
    counters = search_pass(x, bounds, counters, j, ways=ways, interpret=interpret)
  return search_finish(bounds, counters, ways=ways, interpret=interpret)


def search_finish(bounds: jax.Array, counters: jax.Array, *, ways: int, interpret: bool | None = None) -> jax.Array:
  """The answer of a finished :func:`search_pass` chain (every row of ``counters`` filled): the bounds replayed
  from ``(lo, top)`` (``bounds = [lo, top, k]``) through every pass's totals, ``lo`` as float32, in ONE
  single-program kernel (the passes' replay). In XLA the replay is two small reductions per pass, ~1.2 us each on
  an H200, ~10 us a search."""
  _check_bounds(ways, bounds, (3,))
  _check_counters(counters, ways, f"passes * {ways}")
  passes = counters.shape[0] // ways

  def kernel(b_ref, c_ref, o_ref):
    jw = jnp.arange(ways, dtype=jnp.int32)
    rows = [plgpu.load(c_ref.at[p * ways + jw]) for p in range(passes)]
    o_ref[0], _ = _search_chain(rows, b_ref[0], b_ref[1], b_ref[2], ways)

  lo = _call(kernel, jax.ShapeDtypeStruct((1,), jnp.int32), (1,), interpret, 1, name="search_finish")(
      bounds, counters)
  return jax.lax.bitcast_convert_type(lo.reshape(()), jnp.float32)


SEG_ROWS = 16        # rows per program of seg_search_pass
SEG_COLS = 16        # columns compared per inner step (SEG_ROWS x SEG_COLS x W compares)


def seg_search_pass(rows: jax.Array, row_seg: jax.Array, bounds: jax.Array, counters: jax.Array, j: int, *,
                    ways: int, interpret: bool | None = None) -> jax.Array:
  """Pass ``j`` of the per-segment W-way threshold search over the rows of a 2-D float32 ``rows`` (non-negative:
  magnitudes or block maxima; row ``r`` belongs to segment ``row_seg[r]``) as ONE kernel; returns ``counters``
  with pass ``j``'s counts added.

  :func:`search_pass` for ``S`` segments at once (sidco's per-tensor thresholds, SIDCo Sec. 4: one threshold per
  layer): segment ``s`` looks for the largest float bits ``b`` with ``#{x in s : x > f32(b)} >= k_s``.
  ``bounds`` (``(3, S)`` int32) holds every segment's ``[lo, top, k]`` (``lo`` as in :func:`search_pass`);
  ``counters`` (``(passes * (S + 1) * W,)`` int32, zero from pass ``j`` on; segment ``S`` is a spare) the
  per-segment totals of the earlier passes. Each program takes ``SEG_ROWS`` rows (none of them read once all
  their segments' bounds have closed), replays every row's segment bounds from ``(lo, top)`` through those totals,
  counts the row's entries above its segment's ``W`` thresholds, sums the counts of its rows of one segment and
  adds each sum to that segment's counters with integer atomics (:func:`_add_counts`; exact in any order: the
  answer is :func:`mlsys_jax.comm.sparse._search_bits`' with the segmented count, bit for bit); the segment's other
  rows add zeros at the same address, rows past the end zeros into the spare segment. In XLA a pass is a
  compare-and-sum with a gathered threshold per row, a cumulative sum over the rows and three small kernels. NaN
  entries never count; zero rows (padding) never count (every threshold is positive)."""
  if rows.ndim != 2 or rows.dtype != jnp.float32:
    raise ValueError(f"seg_search_pass needs 2-D float32 rows, got {rows.dtype}{tuple(rows.shape)}.")
  _check_bounds(ways, bounds, (3, bounds.shape[-1] if bounds.ndim else 0))   # (3, segments)
  nr, nc = rows.shape
  if nc % SEG_COLS:
    raise ValueError(f"rows need a multiple of {SEG_COLS} columns, got {nc}.")
  if row_seg.shape != (nr,) or not jnp.issubdtype(row_seg.dtype, jnp.integer):
    raise ValueError(f"row_seg must hold one integer segment per row ({nr},), got "
                     f"{row_seg.dtype}{tuple(row_seg.shape)}.")
  ns = bounds.shape[1]
  _check_counters(counters, (ns + 1) * ways, f"passes * ({ns} + 1) * {ways}", j)
  # (live offsets up to nr * nc - 1 and a segment's count up to nr * nc; row ids reach ceil(nr / 16) * 16 - 1)
  _check_int32("seg_search_pass", nr * nc,
               lambda m: m <= INT32_MAX and -(-(-(-m // max(nc, 1))) // SEG_ROWS) * SEG_ROWS <= 2**31,
               what="entries (rows x columns)")
  progs = max(1, -(-nr // SEG_ROWS))
  i32 = jnp.int32

  def kernel(x_ref, seg_ref, b_ref, c_in_ref, c_ref):
    i = pl.program_id(0)
    r = i * SEG_ROWS + jnp.arange(SEG_ROWS, dtype=i32)
    live = r < nr
    seg = jnp.where(live, jnp.clip(plgpu.load(seg_ref.at[r], mask=live, other=0), 0, ns - 1), ns)
    sc = jnp.minimum(seg, ns - 1)                                                        # (loads stay in range)
    jw = jnp.arange(ways, dtype=i32)
    lo, top, k = (plgpu.load(b_ref.at[q * ns + sc]) for q in range(3))
    prev = [plgpu.load(c_in_ref.at[(p * (ns + 1) + sc)[:, None] * ways + jw[None, :]]) for p in range(j)]
    lo, hi = _search_chain(prev, lo, top, k, ways)

    @pl.when(jnp.max(jnp.where(live, hi - lo, 0)) > 1)   # (some row's segment still open)
    def _():
      thr = jax.lax.bitcast_convert_type(_search_mids(lo, hi, ways), jnp.float32)      # (rows, W)
      cc = jnp.arange(SEG_COLS, dtype=i32)

      def body(st, acc):
        offs = r[:, None] * nc + st * SEG_COLS + cc[None, :]
        v = plgpu.load(x_ref.at[offs], mask=live[:, None], other=jnp.zeros((), jnp.float32))   # (rows, cols)
        return acc + jnp.sum((v[:, :, None] > thr[:, None, :]).astype(i32), axis=1)

      acc = jax.lax.fori_loop(0, nc // SEG_COLS, body, jnp.zeros((SEG_ROWS, ways), i32))
      same = seg[:, None] == seg[None, :]                                                # (rows, rows)
      tot = jnp.sum(jnp.where(same[:, :, None], acc[None, :, :], 0), axis=1)             # (rows, W)
      first = jnp.sum((same & (r[None, :] < r[:, None])).astype(i32), axis=1) == 0
      # (the first row of each segment adds the sum; the segment's other rows add zeros at the same address, and
      # rows past the end zeros into the spare segment: no spare address that every program hits)
      _add_counts(c_ref, (j * (ns + 1) + seg)[:, None] * ways + jw[None, :], jnp.where(first[:, None], tot, 0))

  return _call(kernel, jax.ShapeDtypeStruct(counters.shape, i32), (progs,), interpret, PASS_WARPS,
               input_output_aliases={3: 0}, name=f"seg_search_pass_{j}")(
      rows.reshape(-1), row_seg.astype(i32), bounds.reshape(-1), counters)


def seg_search_bits(rows: jax.Array, row_seg: jax.Array, k, top_bits, lo_bits=0, *, ways: int,
                    interpret: bool | None = None) -> jax.Array:
  """:func:`search_bits` per segment: for every segment ``s`` (``k``, ``top_bits`` and ``lo_bits`` are ``(S,)`` or
  broadcast to it), the largest float32 ``t`` in ``[f32(lo_bits[s]), f32(top_bits[s]))`` (by its bits) with at
  least ``k[s]`` entries of the rows of segment ``s`` above it (``lo_bits[s]`` when none), one
  :func:`seg_search_pass` kernel per pass: ``(S,)`` float32; from ``lo_bits = 0``, or bits with at least ``k[s]``
  entries above them, the same bits as :func:`mlsys_jax.comm.sparse._search_bits` with the segmented count."""
  top = jnp.asarray(top_bits, jnp.int32).reshape(-1)
  bounds = jnp.stack([jnp.broadcast_to(jnp.asarray(lo_bits, jnp.int32), top.shape), top,
                      jnp.broadcast_to(jnp.asarray(k, jnp.int32), top.shape)])
  passes = search_passes(ways)
  ns = top.shape[0]
  counters = _zero_counters(passes * (ns + 1) * ways, bounds)
  for j in range(passes):
    counters = seg_search_pass(rows, row_seg, bounds, counters, j, ways=ways, interpret=interpret)
  lo, _ = _search_chain(list(counters.reshape(passes, ns + 1, ways)[:, :ns]), bounds[0], top, bounds[2], ways)
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _sent(v, t, tie, last, pos):
  """In-kernel: which entries ``v`` at flat positions ``pos`` were sent, with their segment's threshold ``t`` and
  tie cut ``tie`` (scalars) and the last packed position ``last``: ``|v| > t``, or ``|v| == t`` up to ``tie``, and
  at or before ``last`` (``sparse._sent``'s test)."""
  a = jnp.abs(v.astype(jnp.float32))
  return ((a > t) | ((a == t) & (pos <= tie))) & (pos <= last)


def _tile_ranges(starts: np.ndarray, sizes: np.ndarray, q0: np.ndarray, q1: np.ndarray):
  """Per tile of positions ``[q0, q1)``: the first and last of the consecutive pieces (``starts``, ``sizes``; empty
  pieces skipped) it touches, as ``(lo, hi)``; ``lo > hi`` (1, 0) for a tile with no position."""
  nz = np.flatnonzero(sizes)
  ends = starts + sizes
  some = q1 > q0
  lo = np.where(some, nz[np.searchsorted(ends[nz], q0, side="right").clip(0, len(nz) - 1)], 1)
  hi = np.where(some, nz[(np.searchsorted(starts[nz], q1 - 1, side="right") - 1).clip(0, len(nz) - 1)], 0)
  return lo, hi


def _pow2_divisor(values, cap: int = 16) -> int:
  """The largest power of two, at most ``cap``, that divides every one of the integers ``values`` (``cap`` when
  all are 0): an alignment Triton can be told with ``pl.multiple_of``."""
  g = int(np.gcd.reduce(np.asarray(values, np.int64).reshape(-1))) if np.size(values) else 0
  return cap if g == 0 else min(cap, g & -g)


def _leaf_args(flat, sizes, offsets, t_leaf, tie_leaf, last, finite, fn: str, tile: int):
  """The leaf writers' checked arguments: ``(sizes, offsets, t_leaf, tie_leaf, scal)`` (static int lists, the
  per-leaf float32 thresholds and int32 tie cuts, and ``[last, finite]`` as int32)."""
  sizes = [int(s) for s in sizes]
  offsets = [int(o) for o in offsets]
  if len(sizes) != len(offsets):
    raise ValueError(f"sizes and offsets must have the same length, got {len(sizes)} and {len(offsets)}.")
  if any(o < 0 or o + s > flat.shape[0] for s, o in zip(sizes, offsets)):
    raise ValueError(f"every leaf must lie inside flat (length {flat.shape[0]}).")
  # (positions offset + r up to len(flat) - 1 where loaded; r up to ceil(size / tile) * tile - 1, compared with size)
  _check_int32(fn, flat.shape[0], lambda m: m <= 2**31, what="entries (the flat buffer)")
  _check_int32(fn, max(sizes, default=0), functools.partial(_span_fits, span=tile), what="entries (one leaf)")
  i32 = jnp.int32
  t_leaf = jnp.asarray(t_leaf, jnp.float32).reshape(-1)
  tie_leaf = jnp.asarray(tie_leaf, i32).reshape(-1)
  if t_leaf.shape != (len(sizes),) or tie_leaf.shape != (len(sizes),):
    raise ValueError(f"t_leaf and tie_leaf need one entry per leaf ({len(sizes)}), got {t_leaf.shape[0]} and "
                     f"{tie_leaf.shape[0]}.")
  scal = jnp.stack([jnp.asarray(last, i32).reshape(()), jnp.asarray(finite).astype(i32).reshape(())])
  return sizes, offsets, t_leaf, tie_leaf, scal


def _leaf_programs(sizes, ids, tile: int):
  """The static program -> (leaf in the group, start) table of the leaf writers: one program per ``tile``
  entries of each leaf ``ids`` (empty leaves none)."""
  prog_leaf = np.concatenate([np.full(-(-sizes[i] // tile) if sizes[i] else 0, j, np.int32)
                              for j, i in enumerate(ids)])
  prog_start = np.concatenate([np.arange(0, sizes[i], tile, dtype=np.int32) for i in ids])
  return prog_leaf, prog_start


def _nonempty(sizes):
  """Indices of the non-empty leaves, or None when every leaf has an entry (or none has). The leaf writers take
  the empty leaves out of their kernels (an output or input of size 0 cannot be a ``pallas_call`` operand in the
  interpreter, nor indexed in a kernel) and hand back empty arrays for them."""
  nz = [i for i, n in enumerate(sizes) if n]
  return nz if 0 < len(nz) < len(sizes) else None


def _spread(xs, nz, count: int, dt):
  """The writers' per-leaf results ``xs`` of the non-empty leaves ``nz`` among ``count`` leaves, empty arrays of
  ``dt`` in the other places."""
  at = {i: j for j, i in enumerate(nz)}
  return [xs[at[i]] if i in at else jnp.zeros((0,), dt) for i in range(count)]


WRITE_TILE = 4096   # entries per program of write_leaves
WRITE_WARPS = 4
WRITE_GROUP = 96    # leaves per write_leaves kernel (its arguments: ~3 pointers per leaf; 96: two kernels for
                    # ResNet-50, 105-108 us on an H200 against 116-118 with 48, benchmarks/results/sidco_tree_h200_s33*)


def write_leaves(flat: jax.Array, sizes, offsets, t_leaf: jax.Array, tie_leaf: jax.Array, last: jax.Array,
                 finite: jax.Array, old=None, *, write_out: bool = True, in_place: bool = False,
                 interpret: bool | None = None, tile: int | None = None, group: int | None = None,
                 num_warps: int | None = None):
  """The error-feedback outputs of every leaf of a flat buffer, in a few kernels instead of one per leaf.

  Leaf ``i`` is ``v = flat[offsets[i]:offsets[i] + sizes[i]]`` (static offsets and sizes); an entry at flat
  position ``p`` was sent iff ``(|v| > t_leaf[i] or (|v| == t_leaf[i] and p <= tie_leaf[i])) and p <= last``.
  Returns ``(outs, residuals)`` (lists of 1-D arrays of ``flat``'s dtype; ``outs`` is None without
  ``write_out``): ``out_i = where(sent, v, 0)`` and ``res_i = where(sent, 0, v)`` when ``finite`` is true;
  else ``out_i = 0`` and ``res_i = old[i]`` (the residual kept: ``old`` is read only then). Bitwise what the
  elementwise XLA expressions give. One program writes one tile of ``tile`` entries of one leaf (a static
  program -> (leaf, start) table, a chain of ``pl.when`` picks the leaf's output refs); ``group`` leaves per
  kernel keep the kernel's argument list short. In a loop body XLA writes each leaf in a kernel of its own
  (siblings reading disjoint slices of one buffer are never fused, and horizontal fusion runs only on the
  entry computation): 161 kernels of ~1.8 us for a ResNet-50 tree.

  ``in_place``: each residual output is aliased to its ``old`` leaf (``input_output_aliases``; every ``old``
  leaf must be given): a non-finite step then writes no residual at all, and in a loop body whose state
  carries the residual XLA need not copy a fresh output into the loop's buffer (it does, one copy per leaf,
  when the old residual is an operand of a kernel with fresh outputs). Outside a loop the caller should
  donate the state, or XLA copies every old leaf first."""
  tile = tile or WRITE_TILE
  group = group or WRITE_GROUP
  num_warps = num_warps or WRITE_WARPS
  sizes, offsets, t_leaf, tie_leaf, scal = _leaf_args(flat, sizes, offsets, t_leaf, tie_leaf, last, finite,
                                                      "write_leaves", tile)
  if old is None:
    old = [None] * len(sizes)
  if in_place and any(o is None for o in old):
    raise ValueError("in_place=True needs the old residual of every leaf (old).")
  i32, dt = jnp.int32, flat.dtype
  nz = _nonempty(sizes)
  if nz is not None:   # (the non-empty leaves alone; empty arrays for the others)
    sub = np.asarray(nz, np.int32)
    outs_nz, ress_nz = write_leaves(flat, [sizes[i] for i in nz], [offsets[i] for i in nz], t_leaf[sub], tie_leaf[sub],
                                    last, finite, [old[i] for i in nz], write_out=write_out, in_place=in_place,
                                    interpret=interpret, tile=tile, group=group, num_warps=num_warps)
    return (_spread(outs_nz, nz, len(sizes), dt) if write_out else None), _spread(ress_nz, nz, len(sizes), dt)
  outs, ress = [], []
  for g0 in range(0, len(sizes), group):
    ids = list(range(g0, min(len(sizes), g0 + group)))
    nl = len(ids)
    prog_leaf, prog_start = _leaf_programs(sizes, ids, tile)
    if prog_leaf.size == 0:
      outs += [jnp.zeros((0,), dt)] * nl
      ress += [jnp.zeros((0,), dt)] * nl
      continue
    leaf_off = np.asarray([offsets[i] for i in ids], np.int32)
    leaf_n = np.asarray([sizes[i] for i in ids], np.int32)
    has_old = [old[i] is not None for i in ids]
    olds = [old[i].reshape(-1).astype(dt) for i in ids if old[i] is not None]

    def kernel(pl_ref, ps_ref, off_ref, n_ref, t_ref, tie_ref, sc_ref, flat_ref, *refs, ids=ids, nl=nl,
               has_old=has_old, g0=g0):
      n_old = sum(has_old)
      old_refs, out_refs = refs[:n_old], refs[n_old:]
      p = pl.program_id(0)
      j = pl_ref[p]
      r = pl.multiple_of(ps_ref[p], tile) + jnp.arange(tile, dtype=i32)   # (aligned: vector stores)
      m = r < n_ref[j]
      pos = off_ref[j] + r
      v = plgpu.load(flat_ref.at[pos], mask=m, other=jnp.zeros((), dt))
      sel = _sent(v, t_ref[g0 + j], tie_ref[g0 + j], sc_ref[0], pos)   # (all leaves' t / tie: no gather per group)
      zero = jnp.zeros((), dt)
      fin = sc_ref[1] != 0
      res = jnp.where(sel, zero, v)
      out = jnp.where(sel, v, zero)
      k_old = 0
      for jj in range(nl):
        o_res = out_refs[2 * jj + 1] if write_out else out_refs[jj]
        o_out = out_refs[2 * jj] if write_out else None
        o_old = old_refs[k_old] if has_old[jj] else None
        k_old += int(has_old[jj])

        @pl.when(j == jj)
        def _(o_res=o_res, o_out=o_out, o_old=o_old):
          @pl.when(fin)
          def _():
            plgpu.store(o_res.at[r], res, mask=m)
            if o_out is not None:
              plgpu.store(o_out.at[r], out, mask=m)

          @pl.when(jnp.logical_not(fin))
          def _():
            if not in_place:   # (in place: the aliased residual already holds the old values)
              keep = plgpu.load(o_old.at[r], mask=m, other=zero) if o_old is not None else jnp.zeros_like(v)
              plgpu.store(o_res.at[r], keep, mask=m)
            if o_out is not None:
              plgpu.store(o_out.at[r], jnp.zeros_like(v), mask=m)

    shapes = []
    for i in ids:
      if write_out:
        shapes.append(jax.ShapeDtypeStruct((sizes[i],), dt))
      shapes.append(jax.ShapeDtypeStruct((sizes[i],), dt))
    aliases = {}
    if in_place:   # old_j (input 8 + j) -> res_j (output 2j + 1, or j without outputs)
      aliases = {8 + jj: (2 * jj + 1 if write_out else jj) for jj in range(nl)}
    res_all = _call(kernel, tuple(shapes), (int(prog_leaf.size),), interpret, num_warps,
                    input_output_aliases=aliases)(
        jnp.asarray(prog_leaf), jnp.asarray(prog_start), jnp.asarray(leaf_off), jnp.asarray(leaf_n),
        t_leaf, tie_leaf, scal, flat, *olds)
    if write_out:
      outs += list(res_all[0::2])
      ress += list(res_all[1::2])
    else:
      ress += list(res_all)
  return (outs if write_out else None), ress


def write_sent(flat: jax.Array, sizes, offsets, t_leaf: jax.Array, tie_leaf: jax.Array, last: jax.Array,
               finite: jax.Array, block_max: jax.Array, *, interpret: bool | None = None,
               tile: int | None = None, group: int | None = None, num_warps: int | None = None):
  """The error-feedback outputs (the sent entries, zeros elsewhere) of every leaf of a flat buffer, reading
  only the 64-entry blocks that can hold a sent entry.

  :func:`write_leaves`' outputs (``out_i = where(sent, v, 0)`` when ``finite``, else 0; the same sent test,
  bitwise the same values) without its residuals. An entry can be sent only if ``|v| >= t`` (``t`` its leaf's
  threshold), so only if the maximum of ``|flat|`` over its block, ``block_max[p // 64]``, is ``>= t``: a program
  reads the maxima of its tile's blocks and loads ``flat`` only in those blocks (masked loads: at ratio 0.001 a few
  percent of the buffer); every other entry is written 0 without being read. ``block_max`` is the per-64-entry
  maximum of ``|flat|`` (:func:`sum_leaves` / :func:`tile_stats`'s), one per block of ``flat``.

  For a residual kept elsewhere (``flat_state=True``: one flat residual written by :func:`kept_from_padded`): the
  outputs then cost about one write of the gradients' bytes instead of a read and a write."""
  tile = tile or WRITE_TILE
  group = group or WRITE_GROUP
  num_warps = num_warps or WRITE_WARPS
  sizes, offsets, t_leaf, tie_leaf, scal = _leaf_args(flat, sizes, offsets, t_leaf, tie_leaf, last, finite,
                                                      "write_sent", tile)
  nb = -(-flat.shape[0] // BLOCK)
  if block_max.shape != (nb,):
    raise ValueError(f"block_max must hold one maximum per {BLOCK} entries of flat, shape ({nb},), got "
                     f"{block_max.shape}.")
  i32, dt = jnp.int32, flat.dtype
  nz = _nonempty(sizes)
  if nz is not None:   # (the non-empty leaves alone; empty arrays for the others)
    sub = np.asarray(nz, np.int32)
    outs_nz = write_sent(flat, [sizes[i] for i in nz], [offsets[i] for i in nz], t_leaf[sub], tie_leaf[sub], last,
                         finite, block_max, interpret=interpret, tile=tile, group=group, num_warps=num_warps)
    return _spread(outs_nz, nz, len(sizes), dt)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  bmax = block_max.astype(jnp.float32)
  outs = []
  for g0 in range(0, len(sizes), group):
    ids = list(range(g0, min(len(sizes), g0 + group)))
    prog_leaf, prog_start = _leaf_programs(sizes, ids, tile)
    if prog_leaf.size == 0:
      outs += [jnp.zeros((0,), dt)] * len(ids)
      continue
    leaf_off = np.asarray([offsets[i] for i in ids], np.int32)
    leaf_n = np.asarray([sizes[i] for i in ids], np.int32)

    def kernel(pl_ref, ps_ref, off_ref, n_ref, t_ref, tie_ref, sc_ref, bmax_ref, flat_ref, *out_refs, ids=ids,
               g0=g0):
      p = pl.program_id(0)
      j = pl_ref[p]
      r = pl.multiple_of(ps_ref[p], tile) + jnp.arange(tile, dtype=i32)   # (aligned: vector stores)
      m = r < n_ref[j]
      pos = off_ref[j] + r
      t = t_ref[g0 + j]
      zero = jnp.zeros((), dt)
      safe = (lambda ix, mk: jnp.where(mk, ix, 0)) if interpret else (lambda ix, mk: ix)
      # (a non-finite step writes zeros and reads nothing; NaN maxima never compare true)
      bm = plgpu.load(bmax_ref.at[safe(pos // BLOCK, m)], mask=m, other=-jnp.inf)
      cand = m & (bm >= t) & (pos <= sc_ref[0]) & (sc_ref[1] != 0)
      v = plgpu.load(flat_ref.at[safe(pos, cand)], mask=cand, other=zero)
      out = jnp.where(cand & _sent(v, t, tie_ref[g0 + j], sc_ref[0], pos), v, zero)
      for jj in range(len(ids)):
        @pl.when(j == jj)
        def _(o_ref=out_refs[jj]):
          plgpu.store(o_ref.at[r], out, mask=m)

    shapes = tuple(jax.ShapeDtypeStruct((sizes[i],), dt) for i in ids)
    outs += list(_call(kernel, shapes, (int(prog_leaf.size),), interpret, num_warps, name="write_sent")(
        jnp.asarray(prog_leaf), jnp.asarray(prog_start), jnp.asarray(leaf_off), jnp.asarray(leaf_n),
        t_leaf, tie_leaf, scal, bmax, flat))
  return outs


SUM_GROUP = 24      # leaves per sum_leaves kernel (at least the leaves one tile touches; each program walks a
                    # chain of conditions over its kernel's leaves: 24 -> eight kernels for ResNet-50, 122 us on an
                    # H200 against 139-142 with 48, 129 / 132 with 16 / 32, 502 with all 161; sidco_tree_h200_s33*)
SUM_WARPS = 8       # warps per program of sum_leaves (as tile_stats: the same reductions)


def _sum_groups(lo: np.ndarray, hi: np.ndarray, group: int):
  """Runs of consecutive tiles whose leaf ranges ``[lo, hi]`` (``lo > hi``: no leaf) together span at most
  ``group`` leaves (or one tile's range, when that alone is wider): ``[(tile0, tile1, leaf0, leaf1)]``."""
  runs, t0, a, b = [], 0, None, None
  for t in range(lo.shape[0]):
    if lo[t] > hi[t]:   # (a padding tile: no leaf)
      continue
    na, nb = (lo[t], hi[t]) if a is None else (min(a, lo[t]), max(b, hi[t]))
    if a is not None and nb - na + 1 > group:
      runs.append((t0, t, a, b))
      t0, na, nb = t, lo[t], hi[t]
    a, b = na, nb
  runs.append((t0, lo.shape[0], 0 if a is None else a, -1 if b is None else b))
  return runs


def sum_leaves(addends, residual, tile_shift, tile_limit, *, interpret: bool | None = None,
               group: int | None = None, num_warps: int | None = None, whole_tiles: bool = True,
               align: bool = True):
  """The padded error-compensated buffer of a tree and its statistics, in one read of every leaf.

  SIDCo (Abdelmoniem et al., MLSys 2021) thresholds the error-compensated gradient ``acc = g + e`` (error feedback:
  what is not sent stays in ``e``); its fit and the exact block select read per-tile
  ``sum |acc|``, ``sum acc^2`` and per-block ``max |acc|`` (Sec. 3-4). This kernel produces ``acc`` and those.

  ``addends`` (a list of arrays, the leaves in order, every one of ``residual``'s dtype) and ``residual``
  (a list of arrays of the same shapes, or ONE 1-D array of the leaves concatenated, ``flat_state``'s
  layout, which with one segment may also be the padded buffer's length: only its real entries are read):
  the leaves' sums ``a_i + r_i`` concatenated (``n_real`` entries, "real" positions), then laid out
  in the padded buffer by tiles of ``THR_BLOCKS * BLOCK`` (4096) entries: padded position ``p`` of tile
  ``T = p // 4096`` holds real position ``p + tile_shift[T]`` when ``p < tile_limit[T]``, else 0 (the
  layout of :class:`mlsys_jax.comm.sparse._Layout`, whose ``tile_shift`` / ``tile_limit`` these are; static).

  Returns ``(flat, s1, s2, block_max)``: the buffer (``tiles * 4096``,), per tile the float32 sum of ``|x|``
  and of ``x^2``, per 64 entries the maximum of ``|x|``: bitwise :func:`tile_stats` of ``flat`` with
  ``tile_blocks=THR_BLOCKS``, and ``flat`` bitwise the XLA sums (one rounding of each sum in the leaves'
  dtype). It replaces XLA's leafwise sums written into the buffer (a concatenation or chunked in-place
  writes: the sums written, then read again by the statistics pass) by one kernel per group of leaves:
  each program writes one tile, reading each leaf the tile touches (a chain of ``lax.cond`` over the
  group's leaves, static offsets; a tile touches few of them), and computes the tile's statistics from
  the values it holds. ``group`` leaves per kernel keep the argument list short; the kernels write
  disjoint runs of tiles into the same buffers (aliased from one kernel to the next).

  ``whole_tiles``: a tile inside one leaf (most of a large tree) loads without masks. ``align``: the loads'
  start positions are declared multiples of the largest power of two (up to 16) dividing every leaf offset
  and tile shift (static), so that Triton can vectorize them. Neither changes a value."""
  group = group or SUM_GROUP
  num_warps = num_warps or SUM_WARPS
  addends = [a.reshape(-1) for a in addends]
  if not addends:
    raise ValueError("sum_leaves needs at least one leaf.")
  dt = jnp.result_type(addends[0])
  flat_res = not isinstance(residual, (list, tuple))
  sizes = np.asarray([a.shape[0] for a in addends], np.int64)
  n_real = int(sizes.sum())
  if n_real == 0:
    raise ValueError("sum_leaves needs at least one non-empty leaf.")
  tiles_ = np.asarray(tile_shift).shape[0]
  if flat_res:
    padded_res = residual.shape == (tiles_ * THR_BLOCKS * BLOCK,) and not np.any(np.asarray(tile_shift))
    if residual.shape != (n_real,) and not padded_res:
      raise ValueError(f"a flat residual must have shape ({n_real},) (the leaves concatenated), or the padded "
                       f"buffer's ({tiles_ * THR_BLOCKS * BLOCK},) with one segment (tile_shift all 0), got "
                       f"{residual.shape}.")
    residual = residual.reshape(-1)
  else:
    residual = [r.reshape(-1) for r in residual]
    if [r.shape[0] for r in residual] != sizes.tolist():
      raise ValueError("residual must hold one leaf per addend leaf, of the same size.")
  if any(jnp.result_type(x) != dt for x in addends + ([residual] if flat_res else residual)):
    raise ValueError(f"sum_leaves needs one dtype for every addend and residual leaf (the first is {dt}).")
  if not sizes.all():   # (empty leaves hold no position; a size-0 operand breaks the interpreter's pallas_call)
    keep = np.flatnonzero(sizes)
    addends = [addends[j] for j in keep]
    residual = residual if flat_res else [residual[j] for j in keep]
    sizes = sizes[keep]
  tile = THR_BLOCKS * BLOCK
  shift = np.asarray(tile_shift, np.int64)
  limit = np.asarray(tile_limit, np.int64)
  tiles = shift.shape[0]
  if limit.shape != (tiles,):
    raise ValueError(f"tile_shift and tile_limit must have one entry per tile, got {shift.shape} and {limit.shape}.")
  # (padded positions up to tiles * 4096 - 1, stored unmasked; the int32 table holds each tile's end, up to
  # tiles * 4096, and its shift and limit; real positions and leaf sizes are compared with static ints)
  _check_int32("sum_leaves", tiles * tile, lambda m: -(-m // tile) * tile + tile <= 2**31, what="padded entries")
  _check_int32("sum_leaves", n_real, lambda m: m <= INT32_MAX, what="real entries")
  if shift.size and (shift.min() < -2**31 or shift.max() > INT32_MAX or limit.min() < -2**31
                     or limit.max() > INT32_MAX):
    raise ValueError("sum_leaves: tile_shift / tile_limit hold values outside int32 (its in-kernel table); split "
                     "the data so that each padded buffer holds fewer than 2**31 entries.")
  roff = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  p0 = np.arange(tiles, dtype=np.int64) * tile
  q0 = p0 + shift                                         # first real position of each tile
  q1 = np.minimum(p0 + tile, limit) + shift               # one past its last (q1 <= q0: none)
  if np.any((q1 > q0) & ((q0 < 0) | (q1 > n_real))):
    raise ValueError("tile_shift / tile_limit map a tile outside the leaves' real positions.")
  lo, hi = _tile_ranges(roff, sizes, q0, q1)
  whole = (lo == hi) & (q1 - q0 == tile) & whole_tiles    # (inside one leaf, no padding: no mask)
  g_al = _pow2_divisor(np.concatenate([[tile], roff, shift[q1 > q0]])) if align else 1
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  i32, f32 = jnp.int32, jnp.float32
  shapes = (jax.ShapeDtypeStruct((tiles * tile,), dt), jax.ShapeDtypeStruct((tiles,), f32),
            jax.ShapeDtypeStruct((tiles,), f32), jax.ShapeDtypeStruct((tiles * THR_BLOCKS,), f32))
  out = None
  for t0, t1, l0, l1 in _sum_groups(lo, hi, group):
    ids = list(range(l0, l1 + 1))
    nt = t1 - t0
    tab = np.stack([shift[t0:t1], limit[t0:t1], lo[t0:t1], hi[t0:t1], whole[t0:t1]],
                   axis=1).astype(np.int32).reshape(-1)
    n_in = 1 + len(ids) + (1 if flat_res else len(ids))

    def kernel(tab_ref, *refs, ids=ids, t0=t0, n_in=n_in):
      a_refs = refs[:len(ids)]
      r_refs = refs[len(ids):n_in - 1]
      flat_ref, s1_ref, s2_ref, bmax_ref = refs[-4:]
      i = pl.program_id(0)
      t = t0 + i
      sh, lim, tlo, thi = tab_ref[5 * i], tab_ref[5 * i + 1], tab_ref[5 * i + 2], tab_ref[5 * i + 3]
      full = tab_ref[5 * i + 4] != 0
      r2 = jnp.arange(THR_BLOCKS, dtype=i32)[:, None] * BLOCK + jnp.arange(BLOCK, dtype=i32)[None, :]
      p = t * tile + r2
      q0 = t * tile + sh                                # (the tile's first real position)
      ok = p < lim
      acc = jnp.zeros((THR_BLOCKS, BLOCK), dt)
      for jj, leaf in enumerate(ids):
        o, n = int(roff[leaf]), int(sizes[leaf])
        if n == 0:
          continue

        def take(acc, jj=jj, o=o, n=n):
          b = pl.multiple_of(q0 - o, g_al) if g_al > 1 else q0 - o
          br = pl.multiple_of(q0, g_al) if g_al > 1 else q0
          a_ref, r_ref = a_refs[jj], r_refs[0] if flat_res else r_refs[jj]
          rb = br if flat_res else b

          def whole_tile(acc):   # (inside the leaf: no mask)
            return plgpu.load(a_ref.at[b + r2]) + plgpu.load(r_ref.at[rb + r2])

          def part(acc):
            m = ok & (b + r2 >= 0) & (b + r2 < n)
            ia, ir = b + r2, rb + r2
            if interpret:   # (the interpreter gathers: keep masked-off indices in range)
              ia, ir = jnp.where(m, ia, 0), jnp.where(m, ir, 0)
            z = jnp.zeros((), dt)
            a = plgpu.load(a_ref.at[ia], mask=m, other=z)
            r = plgpu.load(r_ref.at[ir], mask=m, other=z)
            return jnp.where(m, a + r, acc)

          return jax.lax.cond(full, whole_tile, part, acc)

        acc = jax.lax.cond((tlo <= leaf) & (leaf <= thi), take, lambda acc: acc, acc)
      plgpu.store(flat_ref.at[p], acc)
      av = jnp.abs(acc.astype(f32))
      plgpu.store(bmax_ref.at[t * THR_BLOCKS + jnp.arange(THR_BLOCKS, dtype=i32)], jnp.max(av, axis=1))
      s1_ref[t] = jnp.sum(av)
      s2_ref[t] = jnp.sum(av * av)

    args = [jnp.asarray(tab)] + [addends[j] for j in ids]
    args += [residual] if flat_res else [residual[j] for j in ids]
    aliases = {}
    if out is not None:   # (the buffers written by the earlier kernels, in place)
      aliases = {n_in + j: j for j in range(4)}
      args += list(out)
    # (kernel reads its inputs from the front of refs and its outputs from the back: aliased inputs sit between)
    out = _call(kernel, shapes, (nt,), interpret, num_warps, input_output_aliases=aliases,
                name=f"sum_leaves_{t0}")(*args)   # (profiles name the kernel after its first tile)
  flat, s1, s2, bmax = out
  return flat, s1, s2, bmax


def kept_from_padded(flat: jax.Array, seg_n, seg_start, t_seg: jax.Array, tie_seg: jax.Array, last: jax.Array,
                     finite: jax.Array, old: jax.Array, *, in_place: bool = True, interpret: bool | None = None,
                     num_warps: int | None = None):
  """The new error-feedback residual in the leaves' own layout, written in place over ``old``.

  Error feedback (SIDCo, Abdelmoniem et al., MLSys 2021; Top-k with memory): ``e' = acc - sent``, i.e. the
  entries of ``acc`` that were not sent, and 0 where they were.

  ``flat`` is the padded buffer of :class:`mlsys_jax.comm.sparse._Layout` with segments of ``seg_n`` real entries
  starting at padded positions ``seg_start`` (static); real position ``q`` of segment ``s`` (the segments'
  real entries concatenated, ``old``'s layout) is padded position ``p = q - src0[s] + seg_start[s]``. An entry
  was sent iff ``(|v| > t_seg[s] or (|v| == t_seg[s] and p <= tie_seg[s])) and p <= last``. Returns ``old``
  updated in place (``input_output_aliases``): ``where(sent, 0, v)`` when ``finite``, else unchanged (nothing
  written). Bitwise the XLA expression ``where(finite, where(sent, 0, v), old)``. One program writes one tile
  of 4096 real positions, reading the segments it touches (a chain of ``lax.cond``; static offsets). In a loop
  or a step that donates its state the residual is written where it lies; a jitted update whose state is not
  donated gets a copy of ``old`` from XLA first.

  ``in_place=False``: a fresh output instead, ``old`` read only on a non-finite step (then copied): no copy of
  ``old`` first where the state is not donated, but in a loop XLA may copy the fresh output into the carried
  buffer. The same values either way."""
  num_warps = num_warps or WRITE_WARPS
  seg_n = np.asarray(seg_n, np.int64)
  seg_start = np.asarray(seg_start, np.int64)
  src0 = np.concatenate([[0], np.cumsum(seg_n)[:-1]])
  n_real = int(seg_n.sum())
  if old.shape != (n_real,):
    raise ValueError(f"old must be the residual of the segments' real entries, shape ({n_real},), got {old.shape}.")
  if seg_start.shape != seg_n.shape or np.any(seg_start + seg_n > flat.shape[0]):
    raise ValueError("every segment must lie inside flat (seg_start, seg_n).")
  if old.dtype != flat.dtype:
    raise ValueError(f"old ({old.dtype}) and flat ({flat.dtype}) must have one dtype.")
  # (real positions up to ceil(n_real / 4096) * 4096 - 1, compared with n_real; padded ones up to len(flat) - 1)
  _check_int32("kept_from_padded", n_real, functools.partial(_span_fits, span=WRITE_TILE), what="real entries")
  _check_int32("kept_from_padded", flat.shape[0], lambda m: m <= 2**31, what="padded entries")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tile = WRITE_TILE
  tiles = -(-n_real // tile)
  q0 = np.arange(tiles, dtype=np.int64) * tile
  q1 = np.minimum(q0 + tile, n_real)
  lo, hi = _tile_ranges(src0, seg_n, q0, q1)
  whole = (lo == hi) & (q1 - q0 == tile)
  tab = np.stack([lo, hi, whole], axis=1).astype(np.int32).reshape(-1)
  i32, dt = jnp.int32, flat.dtype
  scal = jnp.stack([jnp.asarray(last, i32).reshape(()), jnp.asarray(finite).astype(i32).reshape(())])

  def kernel(tab_ref, t_ref, tie_ref, sc_ref, flat_ref, old_ref, out_ref):
    # (in place: old_ref is aliased to out_ref, and a non-finite step writes nothing)
    i = pl.program_id(0)
    slo, shi, full = tab_ref[3 * i], tab_ref[3 * i + 1], tab_ref[3 * i + 2] != 0
    r = jnp.arange(tile, dtype=i32)
    q = i * tile + r
    acc = jnp.zeros((tile,), dt)
    zero = jnp.zeros((), dt)
    for s in np.flatnonzero(seg_n).tolist():
      off = int(seg_start[s] - src0[s])   # p = q + off
      n0, n1 = int(src0[s]), int(src0[s] + seg_n[s])
      al = _pow2_divisor([tile, off])

      def take(acc, s=s, off=off, n0=n0, n1=n1, al=al):
        b = i * tile + off
        b = pl.multiple_of(b, al) if al > 1 else b
        p = b + r

        def select(v, m):
          return jnp.where(m, jnp.where(_sent(v, t_ref[s], tie_ref[s], sc_ref[0], p), zero, v), acc)

        def whole_tile(acc):
          return select(plgpu.load(flat_ref.at[p]), True)

        def part(acc):
          m = (q >= n0) & (q < n1)
          return select(plgpu.load(flat_ref.at[jnp.where(m, p, 0) if interpret else p], mask=m, other=zero), m)

        return jax.lax.cond(full, whole_tile, part, acc)

      acc = jax.lax.cond((slo <= s) & (s <= shi), take, lambda acc: acc, acc)

    @pl.when(sc_ref[1] != 0)
    def _():
      plgpu.store(out_ref.at[q], acc, mask=q < n_real)

    if not in_place:
      @pl.when(sc_ref[1] == 0)
      def _():
        m = q < n_real
        keep = plgpu.load(old_ref.at[jnp.where(m, q, 0) if interpret else q], mask=m, other=zero)
        plgpu.store(out_ref.at[q], keep, mask=m)

  return _call(kernel, jax.ShapeDtypeStruct((n_real,), dt), (tiles,), interpret, num_warps,
               input_output_aliases={5: 0} if in_place else {},
               name="kept_from_padded" if in_place else "kept_from_padded_fresh")(
      jnp.asarray(tab), jnp.asarray(t_seg, jnp.float32).reshape(-1), jnp.asarray(tie_seg, i32).reshape(-1), scal,
      flat, old)


def zero_sent(flat: jax.Array, t: jax.Array, tie: jax.Array, last: jax.Array, finite: jax.Array,
              block_max: jax.Array, old: jax.Array, *, after=(), interpret: bool | None = None,
              num_warps: int | None = None) -> jax.Array:
  """The new error-feedback residual written over the buffer it comes from: only the sent entries are written.

  Error feedback (SIDCo, Abdelmoniem et al., MLSys 2021; Top-k with memory) keeps ``e' = acc - sent``: ``acc``
  itself except at the ``k`` sent entries, which become 0. ``flat`` is that ``acc`` for ONE segment of the
  padded layout (:class:`mlsys_jax.comm.sparse._Layout`: the real entries first, zeros after), and the residual
  is kept in the same padded layout, so the new residual is ``flat`` with its sent entries zeroed:
  ``where(finite, where(sent, 0, flat), old)``, returned in ``flat``'s own memory (``input_output_aliases``).
  An entry is sent iff ``(|v| > t or (|v| == t and p <= tie)) and p <= last`` (``t``, ``tie``: the segment's
  threshold and tie cut, shape ``(1,)`` or scalars); it can be sent only where its 64-entry block's maximum
  ``block_max[p // 64]`` is ``>= t``, so a finite step reads and writes only those blocks (a few percent of the
  buffer at ratio 0.001) instead of reading ``flat`` and ``old`` and writing every entry; a non-finite step
  copies ``old`` (the residual is unchanged). Bitwise the XLA expression.

  ``after``: arrays that must be computed before the buffer is overwritten (the buffer's other readers, e.g.
  outputs written from it); passed to the kernel unread, they order it after their producers, so that XLA need
  not copy the buffer to keep it for them. A reader left out is still correct (XLA then copies ``flat``)."""
  num_warps = num_warps or WRITE_WARPS
  tile = THR_BLOCKS * BLOCK
  n_pad = flat.shape[0] if flat.ndim == 1 else -1
  if flat.ndim != 1 or n_pad % tile:
    raise ValueError(f"flat must be one padded segment, a vector of whole tiles of {tile} entries, got shape "
                     f"{flat.shape}.")
  if old.shape != flat.shape or old.dtype != flat.dtype:
    raise ValueError(f"old must be the residual in flat's padded layout, {flat.shape} {flat.dtype}, got "
                     f"{old.shape} {old.dtype}.")
  if block_max.shape != (n_pad // BLOCK,):
    raise ValueError(f"block_max must hold one maximum per {BLOCK} entries of flat, shape ({n_pad // BLOCK},), "
                     f"got {block_max.shape}.")
  _check_int32("zero_sent", n_pad, lambda m: m <= 2**31)   # (positions up to n_pad - 1; no static n in-kernel)
  if np.size(t) != 1 or np.size(tie) != 1:
    raise ValueError(f"zero_sent handles one segment: t and tie must hold one value each, got shapes "
                     f"{np.shape(t)} and {np.shape(tie)}.")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  i32, dt = jnp.int32, flat.dtype
  scal = jnp.stack([jnp.asarray(last, i32).reshape(()), jnp.asarray(finite).astype(i32).reshape(()),
                    jnp.asarray(tie, i32).reshape(())])
  after = [jnp.asarray(a) for a in jax.tree_util.tree_leaves(after)]
  after = [a.astype(jnp.int32) if a.dtype == jnp.bool_ else a for a in after]   # (no boolean kernel arguments)

  def kernel(t_ref, sc_ref, bmax_ref, flat_ref, old_ref, *refs):
    out_ref = refs[-1]   # (aliased to flat_ref; refs[:-1]: the ``after`` arrays, never read)
    i = pl.program_id(0)
    p = i * tile + jnp.arange(THR_BLOCKS, dtype=i32)[:, None] * BLOCK + jnp.arange(BLOCK, dtype=i32)[None, :]
    safe = (lambda ix, mk: jnp.where(mk, ix, 0)) if interpret else (lambda ix, mk: ix)
    t = t_ref[0]

    @pl.when(sc_ref[1] != 0)
    def _():
      bm = plgpu.load(bmax_ref.at[i * THR_BLOCKS + jnp.arange(THR_BLOCKS, dtype=i32)])
      cand = (bm >= t)[:, None] & (p <= sc_ref[0])
      v = plgpu.load(flat_ref.at[safe(p, cand)], mask=cand, other=jnp.zeros((), dt))
      hit = cand & _sent(v, t, sc_ref[2], sc_ref[0], p)
      # (p itself, always in range: the interpreter's masked store writes every lane, the masked-off ones with the
      # value they read, so masked-off lanes sent to one index (0) wrote flat[0] back over a sent entry 0)
      plgpu.store(out_ref.at[p], jnp.zeros(p.shape, dt), mask=hit)

    @pl.when(sc_ref[1] == 0)
    def _():
      plgpu.store(out_ref.at[p], plgpu.load(old_ref.at[p]))

  return _call(kernel, jax.ShapeDtypeStruct(flat.shape, dt), (n_pad // tile,), interpret, num_warps,
               input_output_aliases={3: 0}, name="zero_sent")(
      jnp.asarray(t, jnp.float32).reshape(1), scal, block_max.astype(jnp.float32), flat, old, *after)
