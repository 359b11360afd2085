"""Tests of the one-kernel Pallas embedding stage of mlsys_jax.infer.microrec (MicroRec, Jiang et al., MLSys
2021): every kernel variant equals the XLA gathers bit for bit in Pallas's interpreter, clamps and counts
out-of-range indices the same way, and lowers to Triton IR for the GPU (without a GPU)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.infer import microrec as mr
from _triton import cuda_target  # tests/_triton.py


def _stage():
  # widths 4 and 8 (chunk 4, so 8-wide tables are 2 chunk columns), a pair, a triple and singles
  specs = [mr.TableSpec(r, d) for r, d in [(3, 4), (5, 8), (7, 4), (40, 4), (2, 8), (300, 4), (4, 4)]]
  tables = mr.init_tables(9, specs)
  st = mr.build_stage(tables, mr.Plan(((0, 1), (2, 4, 6), (3,), (5,))), fuse="chunks")
  return specs, st


def test_every_kernel_bit_identical_and_counts_out_of_range():
  """All kernels (tile: blocks 1 and 16, more than the batch; rows: block 4, a ragged last program of batch
  11), in ONE jit against the
  XLA gathers: same embeddings bit for bit, same count of out-of-range indices (one bad index in a pair,
  one in a triple, one negative)."""
  specs, st = _stage()
  assert mr.pallas_supported(st) and st.layout.chunk == 4
  _, idx = mr.synthetic_batch(1, specs, 11)
  idx[3, 4], idx[7, 0], idx[10, 6], idx[5, 5] = 2, -3, 99, 300
  configs = [("tile", 1), ("tile", 16), ("tile_direct", 2), ("tile_grouped", 2), ("tile_ef", 2), ("tile_atomic", 2), ("rows", 4),
             ("rows_loads_first", 4), ("rows_wide", 4)]
  assert {k for k, _ in configs} == set(mr.PALLAS_KERNELS)

  @jax.jit
  def run(s, i):
    return mr.lookup(s, i), [mr.lookup(s, i, impl="pallas", kernel=k, block=b) for k, b in configs]

  (ref, rbad), outs = run(st, idx)
  # the reference itself against numpy: clamped rows of the separate tables, original order
  tables = mr.init_tables(9, specs)
  cl = np.clip(idx, 0, np.array([s.rows for s in specs]) - 1)
  want = np.concatenate([np.asarray(t)[cl[:, j]] for j, t in enumerate(tables)], axis=1)
  np.testing.assert_array_equal(np.asarray(ref), want)
  assert int(rbad) == 4
  for (k, b), (out, bad) in zip(configs, outs):
    np.testing.assert_array_equal(np.asarray(out), want, err_msg=f"kernel={k} block={b}")
    assert int(bad) == 4, (k, b)


def test_direct_kernel_and_partial_counts_on_the_per_table_plan():
  """The per-table plan (every column its own table: ``tile_direct`` takes the raw index as the row) and
  ``count="partial"`` (per-program counts, summed by the caller): same embeddings bit for bit as the XLA
  gathers and the numpy reference, partial counts summing to the total; a ragged last program (batch 7,
  block 2); the XLA path's partial count is its total as a (1,) vector."""
  specs = [mr.TableSpec(r, 4) for r in (3, 5, 7, 40, 2, 300)]
  tables = mr.init_tables(4, specs)
  st = mr.build_stage(tables, mr.Plan.identity(len(specs)), fuse="chunks")
  meta, width, gmax, ncol = mr._tile_columns(st.layout)
  assert gmax == 1 and ncol == len(specs) and (meta[1, :ncol] == np.arange(ncol)).all()  # the direct case
  _, idx = mr.synthetic_batch(3, specs, 7)
  idx[0, 5], idx[4, 1], idx[6, 3] = 300, -1, 41

  @jax.jit
  def run(s, i):
    return ([mr.lookup(s, i, impl="pallas", kernel=k, block=2, count=c)
             for k in ("tile", "tile_direct", "tile_atomic") for c in ("total", "partial")]
            + [mr.lookup(s, i, count="partial")])

  cl = np.clip(idx, 0, np.array([s.rows for s in specs]) - 1)
  want = np.concatenate([np.asarray(t)[cl[:, j]] for j, t in enumerate(tables)], axis=1)
  outs = run(st, idx)
  for j, (out, bad) in enumerate(outs):
    np.testing.assert_array_equal(np.asarray(out), want, err_msg=str(j))
    assert int(np.sum(bad)) == 3, j
  assert outs[0][1].shape == () and outs[1][1].shape == (4,) and outs[5][1].shape == (1,)
  assert outs[-1][1].shape == (1,)
  with pytest.raises(ValueError, match="count"):
    mr.lookup(st, idx, count="sum")


def test_defaults_and_bad_launch_arguments():
  specs, st = _stage()
  _, idx = mr.synthetic_batch(2, specs, 5)
  assert mr.PALLAS_DEFAULTS["kernel"] in mr.PALLAS_KERNELS
  out, bad = jax.jit(lambda s, i: mr.lookup(s, i, impl="pallas"))(st, idx)  # the defaults
  np.testing.assert_array_equal(np.asarray(out), np.asarray(mr.lookup(st, idx)[0]))
  assert int(bad) == 0
  with pytest.raises(ValueError, match="power of two"):
    mr.lookup(st, idx, impl="pallas", block=3)
  with pytest.raises(ValueError, match="kernel"):
    mr.lookup(st, idx, impl="pallas", kernel="nope")
  with pytest.raises(ValueError, match="out of range"):  # concrete indices: a clear error, not a clamp
    mr.lookup(st, np.where(idx == idx[0, 0], -1, idx), impl="pallas")


def test_tile_columns_match_combined_index():
  """The tile kernel's static column tables: chunk row of column q = base + sum clip(idx) * mult is the
  chunk row the XLA path reads (mixed radix x group chunk width + offset + chunk within the row)."""
  _, st = _stage()
  lay = st.layout
  meta, width, gmax, ncol = mr._tile_columns(lay)
  assert width == 16 and gmax == 3 and ncol == sum(lay.dims) // lay.chunk == 9
  rng = np.random.default_rng(0)
  idx = np.stack([rng.integers(0, r, 50) for r in lay.rows], 1)
  col = np.concatenate([[0], np.cumsum(lay.dims)]) // lay.chunk
  for g, (_, off) in zip(lay.groups, lay.where):
    gw = sum(lay.dims[i] for i in g) // lay.chunk
    grow = np.asarray(mr.combined_index(idx[:, list(g)], [lay.rows[i] for i in g]))
    j = 0
    for i in g:
      for k in range(lay.dims[i] // lay.chunk):
        q = col[i] + k
        got = meta[-2, q] + sum(np.clip(idx[:, meta[1 + 3 * m, q]], 0, meta[2 + 3 * m, q] - 1) * meta[3 + 3 * m, q]
                                for m in range(gmax))
        np.testing.assert_array_equal(got, grow * gw + off + j + k)
      j += lay.dims[i] // lay.chunk
  # grouped: the same columns, tile rows permuted (out row says which output column each holds)
  gm, *_ = mr._tile_columns(lay, grouped=True)
  order = gm[-1]
  assert sorted(order) == list(range(width)) and (gm[0] == meta[0]).all()
  np.testing.assert_array_equal(gm[1:-1], meta[1:-1][:, order])
  first = [col[g[0]] for g in lay.groups]  # group-major: each group's first chunk column, in plan order
  assert [int(q) for q in order if q in first] == first


def _criteo_shape_stage(identity: bool = False):
  """The benchmark's stage (26 Criteo tables, d=16, optimal plan at +5%, or the per-table plan) as shapes
  only (no 2 GB buffer)."""
  specs = mr.CRITEO_26
  plan = mr.Plan.identity(len(specs)) if identity else mr.optimal_plan(specs, 0.05)
  c, where, off = 16, [], 0
  for g in plan.groups:
    where.append((0, off))
    off += math.prod(specs[i].rows for i in g) * sum(specs[i].dim for i in g) // c
  lay = mr._Layout(tuple(s.rows for s in specs), tuple(s.dim for s in specs), plan.groups, "chunks",
                   tuple(where), c)
  return mr.EmbeddingStage([jax.ShapeDtypeStruct((off, c), jnp.float32)], lay)


@pytest.mark.parametrize("kernel,block,num_warps", [("tile", 1, 4), ("tile", 8, 8), ("tile_direct", 1, 2),
                                                    ("tile_grouped", 2, 4),
                                                    ("tile_atomic", 1, 2), ("rows", 32, 2),
                                                    ("rows_loads_first", 8, 2), ("rows_wide", 8, 2)])
def test_lowers_to_triton_ir(kernel, block, num_warps):
  """The GPU (Triton) lowering of the Criteo-sized stage runs here without a GPU: catches Pallas-Triton
  lowering errors before a device run."""
  st = _criteo_shape_stage(identity=kernel == "tile_direct")
  f = jax.jit(lambda s, i: mr.lookup(s, i, impl="pallas", kernel=kernel, block=block, num_warps=num_warps,
                                     interpret=False, count="partial" if kernel == "tile_direct" else "total"))
  with cuda_target():
    lowered = f.trace(st, jax.ShapeDtypeStruct((4096, 26), jnp.int32)).lower(lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text().lower()
