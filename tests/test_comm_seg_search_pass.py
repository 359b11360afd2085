"""The per-tensor counting search with one Pallas kernel per pass (``sparse._COUNT_PASS = "pallas"`` with several
segments): ``_pallas_pack.seg_search_pass`` / ``seg_search_bits`` against ``sparse._search_bits`` with the segmented
count, and sidco per tensor against the block select, bitwise (Pallas interpret mode on CPU). A file of its own so
that pytest-xdist's per-file workers share the search tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps, vmapped_under_modes  # tests/_trees.py
from test_comm_search_pass import bits  # tests/test_comm_search_pass.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")


def _xla_seg_search(rows, row_seg, k, ways):
  """The XLA segmented search: rows counted per segment by a segment sum (as ``sparse._seg_kth_counts``' level 2
  sums them with a cumulative sum)."""
  ns = k.shape[0]
  top = jax.lax.bitcast_convert_type(
      jnp.maximum(jax.ops.segment_max(jnp.nan_to_num(rows.max(1), nan=0.0), row_seg, ns), 1e-30), jnp.int32)

  def ok(tm):
    c = jnp.sum(rows[:, :, None] > tm[row_seg][:, None, :], axis=1, dtype=jnp.int32)
    return jax.ops.segment_sum(c, row_seg, ns) >= k[:, None]

  return sp._search_bits(ok, top, keep_low=True, ways=ways), top


@pytest.mark.parametrize("nr,ns,ways,sorted_segs", [(70, 5, 16, True), (53, 7, 16, False),
                                                    pytest.param(3, 2, 32, True, marks=pytest.mark.slow)])   # (32 ways: a
                                                    # benchmark switch, ~4 s)
def test_seg_search_bits_is_the_xla_segmented_search(nr, ns, ways, sorted_segs):
  """Per segment, the largest threshold with at least k_s of the segment's entries above it: the XLA search's bits,
  with ties, a NaN, zero (padding) rows, k = 1, k above a segment's positives (0) and a segment without rows;
  rows of one segment inside one program and across programs, sorted or interleaved, a ragged last program."""
  rng = np.random.default_rng(nr + ns)
  x = np.abs(rng.standard_normal((nr, 64))).astype(np.float32)
  x[::3] = np.round(x[::3], 1)                       # ties
  x[min(4, nr - 1), 5] = np.nan
  x[-max(1, nr // 8):] = 0.0                         # zero rows, as past the packed count
  seg = rng.integers(0, max(1, ns - 1), nr).astype(np.int32)   # (the last segment of several has no row)
  seg = np.sort(seg) if sorted_segs else seg
  k = np.resize(np.asarray([1, 50, 300, 100000, 7, 64, 2], np.int32), ns)
  rows, row_seg, kj = jnp.asarray(x), jnp.asarray(seg), jnp.asarray(k)
  want, top = _xla_seg_search(rows, row_seg, kj, ways)
  run = jax.jit(lambda r, s, k, t, lo: pp.seg_search_bits(r, s, k, t, lo, ways=ways, interpret=True))
  got = run(rows, row_seg, kj, top, jnp.int32(0))
  np.testing.assert_array_equal(bits(got), bits(want))
  lo = jnp.asarray(np.maximum(bits(want) - np.asarray([1000, 0, 3, 1, 7, 0, 99])[:ns], 0), jnp.int32)
  np.testing.assert_array_equal(bits(run(rows, row_seg, kj, top, lo)), bits(want))   # (starts <= the answers)
  tiny = np.float32(1e-45)                           # (the smallest denormal: the first positive threshold)
  pos = np.asarray([(np.nan_to_num(x[seg == s]) > tiny).sum() for s in range(ns)])
  np.testing.assert_array_equal(np.asarray(got) == 0, pos < k)   # 0 exactly where k exceeds the positives
  assert (np.asarray(got) > 0).any()


def test_seg_search_pass_bad_input():
  rows, seg = jnp.ones((20, 64), jnp.float32), jnp.zeros((20,), jnp.int32)
  tk = jnp.asarray([[0, 0], [100, 100], [3, 3]], jnp.int32)
  c = jnp.zeros((2 * 3 * 8,), jnp.int32)
  with pytest.raises(ValueError, match="2-D float32"):
    pp.seg_search_pass(rows.reshape(-1), seg, tk, c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="multiple of"):
    pp.seg_search_pass(rows[:, :10], seg, tk, c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="one integer segment per row"):
    pp.seg_search_pass(rows, seg[:5], tk, c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="bounds must be int32"):
    pp.seg_search_pass(rows, seg, tk[0], c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="bounds must be int32"):
    pp.seg_search_pass(rows, seg, tk[1:], c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="counters must be int32"):
    pp.seg_search_pass(rows, seg, tk, c, 2, ways=8, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pp.seg_search_bits(rows, seg, 3, jnp.asarray([100, 100]), ways=6, interpret=True)


@pytest.mark.slow   # (~8 s; a switch: per tensor the default is the block select on every backend, and the kernel
# itself is checked against the XLA search above)
def test_per_tensor_with_one_kernel_per_pass_is_bitwise_the_block_select(monkeypatch):
  """sidco per tensor (several segments: seg_search_pass) with the counting search's passes as kernels: updates
  and states bitwise the block select's, over a NaN step and a step with ties at the cut; the segmented kernel
  runs at both levels."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SEARCH_WAYS", 16)   # (the ways timed on the GPU; 8 passes a level in the interpreter)
  res = {}
  for search, passes in (("counts", "pallas"), ("blocks", "xla")):
    monkeypatch.setattr(sp, "_EXACT_SEARCH", search)
    monkeypatch.setattr(sp, "_COUNT_PASS", passes)
    res[search] = nan_and_tie_steps(sp.sidco(0.05, per_tensor=True), 7)
  for x, y in zip(jax.tree_util.tree_leaves(res["counts"]), jax.tree_util.tree_leaves(res["blocks"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  assert int(res["counts"][1][1].nonfinite_steps) == 1
  calls = []
  real = pp.seg_search_pass
  monkeypatch.setattr(pp, "seg_search_pass", lambda *a, **k: calls.append(a[2].shape[1]) or real(*a, **k))
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "counts")
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")
  g = {"a": jnp.ones((300, 40)), "b": jnp.ones((60, 90))}
  tx = sp.sidco(0.02, per_tensor=True)
  jax.make_jaxpr(tx.update)(g, tx.init(g))
  passes = -(-31 // (sp._SEARCH_WAYS.bit_length() - 1))
  assert calls == [2] * (2 * passes)   # two levels, ceil(31 / log2 W) passes each, two segments


@pytest.mark.slow   # (~17 s on 2 CPU cores; the kernel's atomics under vmap are in the default suite one segment)
def test_per_tensor_one_kernel_per_pass_under_vmap(monkeypatch):
  """Vmapped (three workers' states), per tensor: bitwise the XLA passes."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "counts")
  res = vmapped_under_modes(monkeypatch, sp, "_COUNT_PASS", ("pallas", "xla"), lambda: sp.sidco(0.02, per_tensor=True))
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
