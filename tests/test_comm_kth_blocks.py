"""The exact search's level-1 -> level-2 handoff for one segment as two Pallas kernels (``sparse._KTH_LIST``,
:func:`_pallas_pack.kth_blocks`): the blocks above the k-th largest block maximum and the first tied ones, in block
order, against the XLA prefix sums and :func:`compact`, and sidco end to end bitwise (Pallas interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps  # tests/_trees.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

bits = lambda x: np.asarray(x).view(np.int32) if np.asarray(x).dtype == np.float32 else np.asarray(x)


def _reference(bm, big, k, cap):
  """The XLA path of sparse._seg_kth_counts (one segment): the selected blocks compacted."""
  gt, eq = bm > big, bm == big
  c_eq = jnp.cumsum(eq.astype(jnp.int32))
  sel = gt | (eq & (c_eq <= k - jnp.sum(gt.astype(jnp.int32))))
  p = sp.compact(bm, sel, cap)
  return p.indices, p.count


@pytest.mark.parametrize("k,cap,at_kth", [(40, 60, True), pytest.param(23, 30, True, marks=pytest.mark.slow),
                                         (31, 31, True), (50, 20, True),
                                         (1, 5, True), (300, 400, True), (40, 60, False), (300, 400, False)])
# (23, 30: the tie cut in a middle tile with room to spare, as 40, 60 (tile 3 of 7); slow suite)
def test_kth_blocks_is_the_compacted_selection(k, cap, at_kth):
  """``big`` the k-th largest maximum (ties at it cut by the quota k - #above, across tiles) or a fixed value (the
  quota 0, or covering every tie), NaN maxima, a capacity below the selection (the first ``capacity`` blocks);
  7 tiles of 64 blocks."""
  rng = np.random.default_rng(k)
  bm = np.round(np.abs(rng.normal(size=429)) * 4) / 4
  bm[[5, 77, 300]] = np.nan
  big = np.float32(-np.sort(-bm[~np.isnan(bm)])[k - 1] if at_kth else 1.25)
  got_ids, got_n = pp.kth_blocks(jnp.asarray(bm, jnp.float32), big, k, cap, interpret=True, list_blocks=64)
  want_ids, want_n = _reference(jnp.asarray(bm, jnp.float32), big, k, cap)
  np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
  assert int(got_n) == int(want_n) == min(cap, int((bm > big).sum()) + min(int((bm == big).sum()),
                                                                            max(k - int((bm > big).sum()), 0)))
  n_gt, n_eq = int((bm > big).sum()), int((bm == big).sum())
  if at_kth and k > 1:
    assert n_gt < k < n_gt + n_eq   # (the tie cut bites)


def test_kth_blocks_bad_input():
  with pytest.raises(ValueError, match="1-D"):
    pp.kth_blocks(jnp.zeros((0,)), 1.0, 1, 4)
  with pytest.raises(ValueError, match="capacity"):
    pp.kth_blocks(jnp.ones((8,)), 1.0, 1, 0)


@pytest.mark.parametrize("ratio", [0.02, pytest.param(0.3, marks=pytest.mark.slow)])   # (the same code, ~15 s)
def test_sidco_with_the_kernel_handoff_is_bitwise_the_xla_handoff(ratio, monkeypatch):
  """sidco (one segment, the counting search's Pallas passes) with the handoff kernels: every update and state
  bitwise the XLA handoff's, over a NaN step and steps with ties (integer-valued gradients); the kernels run.
  The reference is the block select (``_EXACT_SEARCH = "blocks"``), which the counting search with the XLA handoff
  equals bitwise (tests/test_comm_search_pass.py) and which compiles in a fraction of the time (no interpreted
  pass kernels)."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  res = {}
  for mode, search, passes in (("pallas", "counts", "pallas"), ("xla", "blocks", "xla")):
    monkeypatch.setattr(sp, "_EXACT_SEARCH", search)
    monkeypatch.setattr(sp, "_COUNT_PASS", passes)
    monkeypatch.setattr(sp, "_KTH_LIST", mode)
    res[mode] = nan_and_tie_steps(sp.sidco(ratio), 11)
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "counts")
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")
  assert int(res["pallas"][2][1].nonfinite_steps) == 1 and float(res["pallas"][2][1].density) > 0
  calls = []
  real = pp.kth_blocks
  monkeypatch.setattr(pp, "kth_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(sp, "_KTH_LIST", "pallas")
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,))}
  tx = sp.sidco(0.02)
  jax.make_jaxpr(tx.update)(g, tx.init(g))
  assert calls == [1]
  monkeypatch.setattr(sp, "_KTH_LIST", "kernels")
  tx = sp.sidco(0.02)   # (a fresh transform: a new trace)
  with pytest.raises(ValueError, match="_KTH_LIST"):
    jax.make_jaxpr(tx.update)(g, tx.init(g))


def test_kth_blocks_with_denormal_maxima_on_the_default_backend():
  """Block maxima between the smallest denormal and float32's smallest normal, ``big`` the smallest denormal (the
  value the search hands over when its first threshold is 0): the compacted selection exactly. Runs the kernels on
  the default backend (interpret mode on the CPU; compiled on a GPU, where a comparison that flushed denormals to
  zero would select differently from XLA's prefix sums)."""
  rng = np.random.default_rng(5)
  tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
  bm = (rng.integers(0, 4, size=300) * tiny).astype(np.float32)             # 0, 1, 2, 3 x the smallest denormal
  bm[::7] = np.float32(1e-39)                                               # larger denormals
  for big, k in ((tiny, 150), (np.float32(0), 250), (np.float32(1e-39), 20)):
    got_ids, got_n = pp.kth_blocks(jnp.asarray(bm), jnp.float32(big), k, 320, list_blocks=64)
    want_ids, want_n = _reference(jnp.asarray(bm), jnp.float32(big), k, 320)
    np.testing.assert_array_equal(np.asarray(got_ids), np.asarray(want_ids))
    assert int(got_n) == int(want_n) > 0
  # (XLA's CPU backend flushes denormals to zero, so on this host both sides compare zeros; the default path's
  # answer, not numpy's, is the reference: on a GPU XLA keeps them unless --xla_gpu_ftz)
