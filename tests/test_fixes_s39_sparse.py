"""Session 39's line-by-line review of the public boundary of mlsys_jax.comm.sparse: inputs that gave wrong
results silently (a stacked payload in decompress, a block_max of the wrong length, a 2-D x in topk_payload,
hyperparameters of sidco_compress / dgc_threshold outside their ranges) or crashed with a raw error
(empty vectors, a bad ratio in max_stages, a capacity_factor below 1 in sidco, empty leaves)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import sparse as sp


def _payload(indices, values, count):
  return sp.SparsePayload(jnp.asarray(indices, jnp.int32), jnp.asarray(values), jnp.asarray(count, jnp.int32),
                          jnp.asarray(False))


def test_decompress_refuses_stacked_payloads():
  """A (2, 2) payload used to be scattered as one with a wrong validity mask: [7, 1, 5, 2], not [0, 1, 5, 2]."""
  p = sp.SparsePayload(jnp.array([[2, 0], [1, 3]], jnp.int32), jnp.array([[5., 7.], [1., 2.]]),
                       jnp.array([1, 2], jnp.int32), jnp.array([False, False]))
  with pytest.raises(ValueError, match="1-D"):
    sp.decompress(p, 4)
  with pytest.raises(ValueError, match="1-D"):
    sp.decompress(_payload(2, 5., 1)._replace(indices=jnp.array(2), values=jnp.array(5.)), 4)
  with pytest.raises(ValueError, match="count must be a scalar"):
    sp.decompress(_payload([2, 0], [5., 7.], 1)._replace(count=jnp.array([1, 1])), 4)
  # what it should have given, one payload at a time
  want = sp.decompress(_payload([2, 0], [5., 7.], 1), 4) + sp.decompress(_payload([1, 3], [1., 2.], 2), 4)
  np.testing.assert_array_equal(want, [0., 1., 5., 2.])


def test_decompress_dtype_must_be_floating():
  """dtype=int32 used to return float32 (the NaN marker promoted it); now a clear TypeError."""
  p = _payload([2, 0], [5., 7.], 1)
  for fn in (lambda: sp.decompress(p, 4, jnp.int32), lambda: jax.jit(lambda q: sp.decompress(q, 4, jnp.int32))(p)):
    with pytest.raises(TypeError, match="floating dtype"):
      fn()
  out = sp.decompress(p._replace(values=p.values.astype(jnp.bfloat16)), 4, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), [0., 0., 5., 0.])


def test_decompress_refuses_float_indices():
  with pytest.raises(TypeError, match="indices must be integers"):
    sp.decompress(_payload([2, 0], [5., 7.], 1)._replace(indices=jnp.array([2., 0.])), 4)


def test_compact_and_compact_above_refuse_empty_vectors():
  """An empty x used to raise a raw IndexError from the prefix sum."""
  with pytest.raises(ValueError, match="at least one entry"):
    sp.compact(jnp.zeros((0,)), jnp.zeros((0,), bool), 1)
  with pytest.raises(ValueError, match="at least one entry"):
    sp.compact_above(jnp.zeros((0,)), 1.0, 1, packing="xla")
  p = sp.compact(jnp.array([3.]), jnp.array([True]), 1)   # size 1 still works
  assert int(p.count) == 1 and float(p.values[0]) == 3.


def test_compact_above_checks_block_max_length():
  """A block_max of the wrong length used to select nothing silently (count 0 instead of 2)."""
  x = jnp.array([0.1, -3., 0.2, 5.])
  with pytest.raises(ValueError, match="block_max"):
    sp.compact_above(x, 1.0, 4, block_max=jnp.zeros((3,)), packing="xla")
  p, n = sp.compact_above(x, 1.0, 4, block_max=jnp.array([5.]), packing="xla")
  assert int(n) == 2 and list(np.asarray(p.indices[:2])) == [1, 3]


def test_topk_payload_checks_rank_and_k():
  """A 2-D x used to give a payload with 2-D indices and 3-D values; a float or too large k a raw error."""
  with pytest.raises(ValueError, match="rank 1"):
    sp.topk_payload(jnp.ones((2, 3)), 2)
  with pytest.raises(ValueError, match="k must be an integer in"):
    sp.topk_payload(jnp.ones((4,)), 5)
  with pytest.raises(TypeError, match="k must be an integer"):
    sp.topk_payload(jnp.ones((4,)), 2.0)
  p = sp.topk_payload(jnp.array([1., -5., 3.]), 3)   # k = n still fine
  assert sorted(np.asarray(p.indices).tolist()) == [0, 1, 2]


def test_max_stages_checks_ratio():
  """max_stages(0) raised 'math domain error', nan a conversion error, and 2.0 returned 1."""
  for bad in (0.0, -0.1, 2.0, float("nan")):
    with pytest.raises(ValueError, match="ratio"):
      sp.max_stages(bad)
  assert sp.max_stages(0.001) == 10 and sp.max_stages(1.0) == 1


def test_sidco_threshold_refuses_empty_and_float_stages():
  """An empty abs_x gave NaN; stages=2.5 was truncated to 2 silently."""
  with pytest.raises(ValueError, match="at least one entry"):
    sp.sidco_threshold(jnp.zeros((0,)), 0.5)
  with pytest.raises(TypeError, match="stages"):
    sp.sidco_threshold(jnp.ones((8,)), 0.5, stages=2.5)


def test_sidco_compress_checks_first_ratio_stages_and_min_count():
  """sidco_compress accepted first_ratio=2 (a negative first-stage threshold), stages=0 or -3, and a static
  min_count above max_min_count (clipped), all of which sidco_threshold refuses."""
  g = jax.random.laplace(jax.random.PRNGKey(0), (1000,))
  with pytest.raises(ValueError, match="first_ratio"):
    sp.sidco_compress(g, 0.01, 20, stages=2, first_ratio=2.0, packing="xla")
  with pytest.raises(ValueError, match="first_ratio"):
    sp.sidco_compress(g, 0.01, 20, first_ratio=float("nan"), packing="xla")
  for bad in (0, -3):
    with pytest.raises(ValueError, match="stages"):
      sp.sidco_compress(g, 0.01, 20, stages=bad, packing="xla")
  with pytest.raises(TypeError, match="stages"):
    sp.sidco_compress(g, 0.01, 20, stages="adaptive", packing="xla")
  with pytest.raises(ValueError, match="min_count"):
    sp.sidco_compress(g, 0.01, 20, min_count=9, max_min_count=4, packing="xla")
  with pytest.raises(ValueError, match="at least one entry"):
    sp.sidco_compress(jnp.zeros((0,)), 0.5, 1, packing="xla")
  # traced stages and min_count are still accepted
  f = jax.jit(lambda v, s, m: sp.sidco_compress(v, 0.01, 20, stages=s, min_count=m, max_min_count=4,
                                                packing="xla")[1])
  assert int(f(g, jnp.int32(2), jnp.int32(3))) > 0


def test_dgc_threshold_checks_ratio():
  """With max_ratio a ratio above it, NaN or negative was clipped silently; without it a string ratio
  was parsed by float() and None raised a raw TypeError."""
  key = jax.random.PRNGKey(0)
  a = jnp.abs(jax.random.laplace(key, (1000,)))
  with pytest.raises(ValueError, match="exceeds max_ratio"):
    sp.dgc_threshold(key, a, 0.5, max_ratio=0.01)
  for bad in (float("nan"), -1.0):
    with pytest.raises(ValueError, match="ratio"):
      sp.dgc_threshold(key, a, bad, max_ratio=0.01)
  for bad in ("0.1", None):
    with pytest.raises(TypeError, match="ratio"):
      sp.dgc_threshold(key, a, bad)
  with pytest.raises(ValueError, match="at least one entry in abs_x"):
    sp.dgc_threshold(key, jnp.zeros((0,)), 0.5)
  # a ratio equal to max_ratio in float32, and a traced one, still work
  sp.dgc_threshold(key, a, jnp.float32(0.05), max_ratio=0.05)
  jax.jit(lambda r: sp.dgc_threshold(key, a, r, max_ratio=0.05))(jnp.float32(0.01))


def test_sidco_capacity_factor_error_names_it():
  """sidco(capacity_factor=0.5) used to fail with 'max_fraction must lie in [0.0, 0.5], got 1.0'."""
  for bad in (0.5, -1.0, float("nan")):
    with pytest.raises(ValueError, match="capacity_factor"):
      sp.sidco(0.1, capacity_factor=bad)


def test_sparsifiers_refuse_trees_without_entries():
  """A tree whose leaves are all empty, or an empty leaf with per_tensor=True (topk, randomk, dgc), used to
  crash in update with raw errors from lax.top_k / random.choice / dgc_sample_size."""
  for make in (sp.topk, sp.randomk, sp.dgc, sp.sidco):
    with pytest.raises(ValueError, match="at least one parameter entry"):
      make(0.5).init({"e": jnp.ones((0,))})
  for make in (sp.topk, sp.randomk, sp.dgc):
    with pytest.raises(ValueError, match="per_tensor=True"):
      make(0.5, per_tensor=True).init({"w": jnp.ones((4,)), "e": jnp.ones((0,))})
  # one raveled vector (per_tensor=False) keeps handling an empty leaf beside others
  params = {"w": jnp.array([1., -2., 3., -4.]), "e": jnp.ones((0,))}
  tx = sp.topk(0.5)
  out, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_array_equal(out["w"], [0., 0., 3., -4.])
