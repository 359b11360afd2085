"""Regression tests for session 42's review of the sparsifiers' selection internals (mlsys_jax/comm/sparse.py):
each fails on the code before the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import sparse


def _huge_vector():
  g = np.zeros(4096, np.float32)
  g[10], g[20], g[30] = 2e38, -2e38, 1.0      # every entry finite; sum |x| = 4e38 overflows float32
  return g


@pytest.mark.parametrize("kw", [{}, {"per_tensor": True}, {"flat_state": True}], ids=["flat", "per_tensor", "flat_state"])
def test_sidco_exact_sends_finite_entries_whose_sum_overflows(kw):
  """A buffer of finite entries whose |x| sum exceeds float32's range (two entries of 2e38) was flagged non-finite
  by ``isfinite(sum |x|)``: the step was skipped (nothing sent, ``nonfinite_steps`` 1) and, the residual kept, every
  later step too, while ``topk`` sends the entries. Now finiteness is read from the block maxima (inf) and the tile
  sums (NaN), and the step sends Top-k's set."""
  g = _huge_vector()
  tx = sparse.sidco(0.001, **kw)                  # k = round(4.096) = 4: the three non-zero entries
  st = tx.init({"w": jnp.zeros(4096)})
  o, st = jax.jit(tx.update)({"w": jnp.asarray(g)}, st)
  out = np.asarray(o["w"])
  assert int(st.nonfinite_steps) == 0
  np.testing.assert_array_equal(np.nonzero(out)[0], [10, 20, 30])
  np.testing.assert_array_equal(out[[10, 20, 30]], g[[10, 20, 30]])
  res = np.asarray(st.residual if kw.get("flat_state") else st.residual["w"])
  np.testing.assert_array_equal(res, np.zeros(4096, np.float32))   # acc - sent, exactly
  ref, rst = jax.jit(sparse.topk(0.001).update)({"w": jnp.asarray(g)}, sparse.topk(0.001).init({"w": jnp.zeros(4096)}))
  np.testing.assert_array_equal(out, np.asarray(ref["w"]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kw", [{}, {"per_tensor": True}, {"exact": False}], ids=["flat", "per_tensor", "estimator"])
def test_sidco_still_skips_a_non_finite_buffer(bad, kw):
  """The finiteness flag after the fix: a NaN or inf entry (next to huge finite ones) still skips the step."""
  g = _huge_vector()
  g[100] = bad
  tx = sparse.sidco(0.001, **kw)
  st = tx.init({"w": jnp.zeros(4096), "b": jnp.zeros(3)})
  o, st2 = jax.jit(tx.update)({"w": jnp.asarray(g), "b": jnp.ones(3)}, st)
  assert int(st2.nonfinite_steps) == 1 and float(st2.bytes_sent) == 0.0
  assert not np.any(np.asarray(o["w"])) and not np.any(np.asarray(o["b"]))
  np.testing.assert_array_equal(np.asarray(st2.residual["w"]), 0.0)


@pytest.mark.parametrize("distribution", ["gpareto", "gamma"])
def test_sidco_estimator_never_silent_when_its_moments_overflow(distribution):
  """Finite entries above ~1.8e19 square to inf in float32: the gpareto / gamma fit's threshold was NaN, which the
  floor kept (``min(NaN, floor)``), so the estimator sent nothing at all, with no overflow or non-finite count (the
  same vector scaled by 1e-20 sends hundreds). Now a NaN threshold selects every non-zero entry and the ceiling keeps
  the k largest."""
  rng = np.random.default_rng(0)
  g = (rng.standard_normal(20000) * 1e20).astype(np.float32)
  tx = sparse.sidco(0.01, exact=False, distribution=distribution)
  st = tx.init({"w": jnp.zeros(20000)})
  o, st = jax.jit(tx.update)({"w": jnp.asarray(g)}, st)
  out = np.asarray(o["w"])
  sent = out != 0
  assert int(st.nonfinite_steps) == 0
  assert 50 <= int(sent.sum()) <= 400, int(sent.sum())      # k = 200; never nothing
  np.testing.assert_array_equal(out[sent], g[sent])
  assert np.abs(g[sent]).min() >= np.abs(g[~sent]).max()   # the largest entries
  np.testing.assert_array_equal(np.asarray(st.residual["w"]), np.where(sent, 0, g))


@pytest.mark.parametrize("dtype,r0,g1", [(jnp.bfloat16, 1.6796875, 1.375), (jnp.float16, 2.0, 0.0029296875)],
                         ids=["bfloat16", "float16"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["flat", "per_tensor"])
def test_sidco_16bit_sum_rounded_once_for_payload_and_output(dtype, r0, g1, per_tensor):
  """16-bit leaves (flat_state=False): the payload was selected from the rounded buffer ``a + r`` (here 3.0625 in
  bfloat16, the only entry of Top-1), but each leaf's output and residual re-derived the sum inside a fusion in
  float32 without the rounding (3.0546875, below the cut): the entry was counted as sent (density 1/65) yet missing
  from the output and kept whole in the residual. Now the buffer is materialized once for every reader."""
  tx = sparse.sidco(0.003, per_tensor=per_tensor)                 # n = 65: k = 1
  st = tx.init({"w": jnp.zeros(65, dtype)})
  upd = jax.jit(tx.update)
  g0 = np.zeros(65, np.float32)
  g0[0], g0[16] = 10.0, r0
  o, st = upd({"w": jnp.asarray(g0, dtype)}, st)                 # sends index 0; the residual keeps r0 at 16
  assert float(o["w"][0]) == 10.0 and float(st.residual["w"][16]) == r0
  g1v = np.zeros(65, np.float32)
  g1v[16] = g1
  o, st = upd({"w": jnp.asarray(g1v, dtype)}, st)
  want = np.asarray(jnp.asarray(r0, dtype) + jnp.asarray(g1, dtype))   # the sum rounded to dtype
  assert float(want) != r0 + g1                                   # (the case: the rounding moves it up)
  out, res = np.asarray(o["w"]), np.asarray(st.residual["w"])
  assert float(st.density) * 65 == pytest.approx(1.0)
  np.testing.assert_array_equal(np.nonzero(out)[0], [16])
  assert out[16] == want and res[16] == 0, (out[16], res[16], want)
  np.testing.assert_array_equal(res, np.zeros(65, res.dtype))


@pytest.mark.parametrize("dist", ["gpareto", "gamma"])
def test_sidco_compress_never_silent_when_its_moments_overflow(dist):
  """The public one-array functions on N(0, 1) x 1e20 (the fit's sum of squares overflows float32):
  ``sidco_threshold`` gave a meaningless value (-4.4e18 for gpareto, inf for gamma) and ``sidco_compress`` an
  empty payload with ``n_above`` 0 (nothing sent, nothing said). Now the threshold is NaN, every non-zero entry
  is above ``sidco_compress``'s, the payload holds ``capacity`` of them and ``n_above`` (20000 > 400) shows the
  overflow; at a normal scale both are unchanged (the payload equals compact of the fitted threshold)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (20000,))
  assert bool(jnp.isnan(sparse.sidco_threshold(jnp.abs(x) * 1e20, 0.01, distribution=dist)))
  p, n_above = sparse.sidco_compress(x * 1e20, 0.01, 400, distribution=dist)
  assert int(n_above) == 20000 and int(jnp.sum(p.values != 0)) == 400
  p1, n1 = sparse.sidco_compress(x, 0.01, 400, distribution=dist)
  mask = jnp.abs(x) > sparse.sidco_threshold(jnp.abs(x), 0.01, distribution=dist)
  ref = sparse.compact(x, mask, 400)
  assert int(n1) == int(jnp.sum(mask))
  np.testing.assert_array_equal(np.asarray(p1.values), np.asarray(ref.values))
  np.testing.assert_array_equal(np.asarray(p1.indices), np.asarray(ref.indices))
