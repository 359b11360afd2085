"""Regression tests for session 43: ``flat_state=True`` refuses gradients laid out unlike the parameters it was
initialised with (same entry count), and ``density_warmup`` refuses warm-up densities that increase."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import density_warmup, dgc, randomk, sidco, topk

_PARAMS = {"a": jnp.arange(12.0).reshape(4, 3) + 1.0, "b": jnp.linspace(-1.0, 1.0, 5)}

_MAKERS = {"sidco": lambda: sidco(0.2, flat_state=True), "sidco_pt": lambda: sidco(0.2, per_tensor=True,
                                                                                   flat_state=True),
           "topk": lambda: topk(0.2, flat_state=True), "dgc": lambda: dgc(0.2, flat_state=True),
           "randomk": lambda: randomk(0.2, flat_state=True), "momentum": lambda: sidco(0.2, momentum=0.9,
                                                                                        flat_state=True)}


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_flat_state_refuses_a_reshaped_leaf_with_the_same_entry_count(name):
  tx = _MAKERS[name]()
  st = tx.init(_PARAMS)
  good = jax.tree_util.tree_map(lambda p: p * 0.5, _PARAMS)
  out, st2 = jax.jit(tx.update)(good, st)          # the parameters' layout passes
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(_PARAMS)
  reshaped = {"a": good["a"].reshape(3, 4), "b": good["b"]}      # 12 entries either way
  with pytest.raises(ValueError, match=r"gradient\['a'\] has shape \(3, 4\).*initialised with shape \(4, 3\)"):
    tx.update(reshaped, st)
  with pytest.raises(ValueError, match=r"gradient\['a'\] has shape \(3, 4\)"):
    jax.jit(tx.update)(reshaped, st2)               # the layout survives a jitted update
  other_tree = {"a": good["a"].reshape(-1)[:5], "b": jnp.concatenate([good["a"].reshape(-1)[5:], good["b"]])}
  with pytest.raises(ValueError, match="has shape"):   # 5 + 12 entries: same count, other leaf sizes
    tx.update(other_tree, st)
  renamed = {"a": good["a"], "c": good["b"]}
  with pytest.raises(ValueError, match="tree structure"):
    tx.update(renamed, st)


def test_flat_state_layout_costs_no_memory_and_matches_the_parameters():
  st = sidco(0.2, flat_state=True).init(_PARAMS)
  assert jax.tree_util.tree_leaves(st.layout) == []   # static (session 45; zero-size arrays before)
  assert st.layout.shapes == ((4, 3), (5,))
  assert sidco(0.2).init(_PARAMS).layout == ()       # the tree layout keeps the shapes in its residual


def test_flat_state_without_a_layout_field_is_still_accepted():
  """A state built before the field existed (``layout=()``) is not checked, and updates as before."""
  tx = sidco(0.2, flat_state=True)
  st = tx.init(_PARAMS)
  old = st._replace(layout=())
  g = jax.tree_util.tree_map(lambda p: p * 0.5, _PARAMS)
  o1, s1 = tx.update(g, st)
  o2, s2 = tx.update(g, old)
  for x, y in zip(jax.tree_util.tree_leaves(o1), jax.tree_util.tree_leaves(o2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(s1.residual), np.asarray(s2.residual))
  assert s2.layout == ()


def test_flat_state_layout_under_pmap_and_vmap():
  n = 8
  tx = sidco(0.2, flat_state=True, axis_name="d")
  st = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tx.init(_PARAMS))
  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.standard_normal((n, 4, 3)), jnp.float32),
       "b": jnp.asarray(rng.standard_normal((n, 5)), jnp.float32)}
  out, st2 = jax.pmap(tx.update, axis_name="d")(g, st)
  assert st2.layout == st.layout and st2.layout.shapes == ((4, 3), (5,))   # carried unchanged (no mapped axis)
  np.testing.assert_array_equal(np.asarray(out["a"][0]), np.asarray(out["a"][n - 1]))   # replicas identical
  with pytest.raises(ValueError, match="has shape"):
    jax.pmap(tx.update, axis_name="d")({"a": g["a"].reshape(n, 3, 4), "b": g["b"]}, st)
  local = sidco(0.2, flat_state=True)
  sv = jax.vmap(local.init)(jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), _PARAMS))
  gv = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x]), _PARAMS)
  ov, _ = jax.vmap(local.update)(gv, sv)
  assert ov["a"].shape == (2, 4, 3)
  with pytest.raises(ValueError, match="has shape"):
    jax.vmap(local.update)({"a": gv["a"].reshape(2, 3, 4), "b": gv["b"]}, sv)


def test_density_warmup_refuses_increasing_warmup_densities():
  with pytest.raises(ValueError, match=r"ratios\[1\]=0.01 is denser than ratios\[0\]=0.0025.*\[0.01, 0.0025\]"):
    density_warmup(topk, 0.001, steps=300, ratios=[0.0025, 0.01])
  with pytest.raises(ValueError, match=r"ratios\[2\]"):
    density_warmup(topk, 0.001, steps=300, ratios=[0.1, 0.01, 0.05])
  tx = density_warmup(topk, 0.001, steps=4, ratios=[0.01, 0.01])   # equal densities are a valid (flat) warm-up
  st = tx.init(_PARAMS)
  tx.update(jax.tree_util.tree_map(lambda p: p * 0.5, _PARAMS), st)


def _mesh(n=8):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("d",))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_allgather_mean_of_16_bit_payloads_is_summed_in_float32(dtype):
  """8 workers send 16-bit values at shared indices: the mean is the float32 mean of the (rounded) values, rounded
  once. Summed in float16, 8 entries of 10^4 overflowed to inf though their mean (10^4) fits; in bfloat16 every add
  rounded (the mean of 1 + k/128 values was off by an ulp)."""
  from mlsys_jax._compat import shard_map
  from mlsys_jax.comm.sparse import SparsePayload, allgather_mean
  n = 8
  vals = np.stack([[1e4 + 8 * d, 1.0 + d / 128.0, -3.0 - d / 64.0] for d in range(n)]).astype(np.float32)
  idx = np.tile(np.array([0, 2, 5], np.int32), (n, 1))
  cnt = np.full((n,), 3, np.int32)
  spec = jax.sharding.PartitionSpec("d")

  def body(i, v, c):
    return allgather_mean(SparsePayload(i[0], v[0].astype(dtype), c[0], jnp.array(False)), 6, "d")[None]

  out = np.asarray(jax.jit(shard_map(body, mesh=_mesh(n), in_specs=(spec, spec, spec), out_specs=spec))(
      jnp.asarray(idx), jnp.asarray(vals), jnp.asarray(cnt)))
  rounded = np.asarray(jnp.asarray(vals).astype(dtype).astype(jnp.float32))
  ref = np.zeros(6, np.float32)
  ref[[0, 2, 5]] = rounded.sum(0) / n
  want = np.asarray(jnp.asarray(ref).astype(dtype))
  assert out.dtype == np.dtype(dtype) and np.all(np.isfinite(out.astype(np.float32)))
  np.testing.assert_array_equal(out[0], want)
  assert all(np.array_equal(out[0], out[d]) for d in range(n))


@pytest.mark.parametrize("make", [lambda: topk(0.25, axis_name="d"), lambda: sidco(0.25, axis_name="d"),
                                  lambda: sidco(0.25, axis_name="d", flat_state=True)],
                         ids=["topk", "sidco", "sidco_flat"])
def test_float16_sparsifier_mean_in_range_is_sent_not_inf(make):
  """float16 gradients and residual, 8 workers whose largest entries (~10^4) share an index: the mean (~10^4) is
  sent (it was inf, not counted as a skipped step, and every worker dropped the entry from its residual)."""
  from mlsys_jax._compat import shard_map
  n = 8
  tx = make()
  params = {"w": jnp.zeros((16,), jnp.float16)}
  g = np.tile(np.linspace(-1.0, 1.0, 16, dtype=np.float32), (n, 1))
  g[:, 3] = 1e4 + 16 * np.arange(n)
  spec = jax.sharding.PartitionSpec("d")

  def body(x):
    st = tx.init(params)
    out, st = tx.update({"w": x[0].astype(jnp.float16)}, st)
    return out["w"][None], st.nonfinite_steps[None]

  out, nf = jax.jit(shard_map(body, mesh=_mesh(n), in_specs=(spec,), out_specs=(spec, spec)))(jnp.asarray(g))
  out = np.asarray(out, np.float32)
  assert np.all(np.asarray(nf) == 0) and np.all(np.isfinite(out))
  want = np.float32(np.asarray(jnp.asarray(g[:, 3]).astype(jnp.float16).astype(jnp.float32)).mean())
  assert out[0, 3] == np.float32(np.float16(want))
  assert all(np.array_equal(out[0], out[d]) for d in range(n))
