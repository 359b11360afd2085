"""The tree-native SIDCo update (mlsys_jax/comm/_sidco_tree.py) against the package's ``sparse.sidco``: the same
outputs and state bitwise (it only moves the tree's bytes differently), exact error feedback, the Top-k set
of every segment against numpy, non-finite steps, and the collective under shard_map and pmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax.comm import _sidco_tree as ft
from mlsys_jax.comm import sparse as sp

try:
  from jax import shard_map
except ImportError:  # older jax
  from jax.experimental.shard_map import shard_map


def _tree(seed, scale=(1.0, 30.0, 0.01)):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"conv": jax.random.laplace(ks[0], (3, 3, 8, 16)) * scale[0],
          "dense": jax.random.laplace(ks[1], (60, 50)) * scale[1],
          "bias": jax.random.laplace(ks[2], (16,)) * scale[2],
          "z": jax.random.laplace(ks[3], (700,)) * scale[0]}


def _same(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kw,flatten", [
    pytest.param(dict(), "dus", marks=pytest.mark.slow),
    pytest.param(dict(per_tensor=True), "chunks", marks=pytest.mark.slow),
    pytest.param(dict(per_tensor=True, momentum=0.9), "concat", marks=pytest.mark.slow),
    pytest.param(dict(distribution="gpareto", stages=1, exact=False), "dus", marks=pytest.mark.slow),
])
def test_same_update_and_state_as_the_package_bitwise(kw, flatten, monkeypatch):
  monkeypatch.setattr(ft, "FLATTEN", flatten)
  ref, tx = sp.sidco(0.01, **kw), ft.sidco(0.01, **kw)
  g0 = _tree(0)
  s_ref, s = ref.init(g0), tx.init(g0)
  u_ref, u = jax.jit(ref.update), jax.jit(tx.update)
  for i in range(2):
    g = _tree(i + 1)
    prev = s.residual if "momentum" not in kw else None
    o_ref, s_ref = u_ref(g, s_ref)
    o, s = u(g, s)
    _same((o, s), (o_ref, s_ref))
    if prev is not None:   # exact error feedback: sent + residual == gradient + previous residual
      for n in g:
        np.testing.assert_array_equal(np.asarray(o[n] + s.residual[n]), np.asarray(g[n] + prev[n]))
  assert int(s.overflow_steps) == 0 and int(s.step) == 2


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.slow
def test_sends_the_numpy_topk_of_every_segment(per_tensor):
  r = 0.01
  tx = ft.sidco(r, per_tensor=per_tensor, min_group_count=0)   # every leaf its own segment
  g = _tree(5)
  out, st = jax.jit(tx.update)(g, tx.init(g))
  names = sorted(g)
  mags = {n: np.abs(np.asarray(g[n])).ravel() for n in names}
  if per_tensor:
    want = {n: np.argsort(-mags[n], kind="stable")[:max(1, round(r * mags[n].size))] for n in names}
  else:
    flat = np.concatenate([mags[n] for n in names])
    top = np.argsort(-flat, kind="stable")[:round(r * flat.size)]
    want, off = {}, 0
    for n in names:
      want[n] = top[(top >= off) & (top < off + mags[n].size)] - off
      off += mags[n].size
  for n in names:
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out[n]).ravel()), np.sort(want[n]), err_msg=n)
    np.testing.assert_array_equal(np.asarray(out[n] + st.residual[n]), np.asarray(g[n]))


@pytest.mark.slow
def test_nonfinite_step_sends_nothing_and_keeps_the_residual():
  tx, ref = ft.sidco(0.01), sp.sidco(0.01)
  g = _tree(1)
  u = jax.jit(tx.update)
  _, s = u(g, tx.init(g))
  bad = dict(g, dense=g["dense"].at[3, 4].set(jnp.nan))
  o, s2 = u(bad, s)
  for n in g:
    np.testing.assert_array_equal(np.asarray(o[n]), 0.0)
    np.testing.assert_array_equal(np.asarray(s2.residual[n]), np.asarray(s.residual[n]))
  assert int(s2.nonfinite_steps) == 1 and float(s2.bytes_sent) == 0.0
  _, sr = jax.jit(ref.update)(g, ref.init(g))
  _same(jax.jit(ref.update)(bad, sr), (o, s2))


@pytest.mark.parametrize("mapper", ["shard_map", "pmap"])
@pytest.mark.slow
def test_collective_equals_the_package(devices, mapper):
  kw = dict(per_tensor=True, axis_name="d")
  tx, ref = ft.sidco(0.01, **kw), sp.sidco(0.01, **kw)
  grads = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_tree(10 + i) for i in range(8)])

  def step(t):
    def f(g):
      out, st = t.update(g, t.init(g))
      return out, st.residual, st.bytes_sent
    return f

  if mapper == "pmap":
    run = lambda t: jax.pmap(step(t), axis_name="d", devices=devices)(grads)
  else:
    mesh = Mesh(np.array(devices), ("d",))

    def run(t):
      f = step(t)
      g1 = lambda g: jax.tree_util.tree_map(lambda x: x[None], f(jax.tree_util.tree_map(lambda x: x[0], g)))
      return jax.jit(shard_map(g1, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(grads)

  got, want = run(tx), run(ref)
  _same(got, want)
  out = got[0]
  for n in out:   # every device holds the same averaged update
    np.testing.assert_array_equal(np.asarray(out[n]), np.broadcast_to(np.asarray(out[n][0]), out[n].shape))


@pytest.mark.parametrize("cf,per_tensor", [(4.0, True), pytest.param(4.0, False, marks=pytest.mark.slow),
                                           pytest.param(2.0, True, marks=pytest.mark.slow),
                                           pytest.param(2.0, False, marks=pytest.mark.slow)])
def test_ties_at_the_cut_and_the_fallback_equal_the_package(cf, per_tensor):
  # 30 equal magnitudes at the cut, k = 10: cf 4 the fit lands in the band (the correction stage cuts the
  # ties by index, as lax.top_k); cf 2 the fit overflows and the bisection fallback runs
  x = jnp.zeros((1000,)).at[jnp.arange(0, 600, 20)].set(1.0).at[990].set(-5.0).at[7].set(2.0)
  g = {"w": x, "v": jax.random.normal(jax.random.PRNGKey(1), (3000,))}   # Gaussian: the fit misses
  kw = dict(stages=1, capacity_factor=cf, overshoot=1.0, per_tensor=per_tensor)
  tx, ref = ft.sidco(0.01, **kw), sp.sidco(0.01, **kw)
  got = jax.jit(tx.update)(g, tx.init(g))
  _same(got, jax.jit(ref.update)(g, ref.init(g)))
  np.testing.assert_array_equal(np.asarray(got[0]["w"] + got[1].residual["w"]), np.asarray(x))


def test_multisection_finds_the_bisection_thresholds_bitwise():
  # per segment the largest float bit pattern with #(|x| > t) >= k: scales over six decades, ties (rounded
  # values), a segment with fewer non-zero entries than k (then 0), k = 1
  rng = np.random.default_rng(0)
  sizes = [5000, 300, 12000, 7]
  for per_tensor in (False, True):
    lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, 0.01, 0.0))
    for trial in range(3):
      leaves = [jnp.asarray(rng.laplace(size=n).astype(np.float32) * 10.0 ** rng.uniform(-3, 3)) for n in sizes]
      if trial == 2:
        leaves[1] = jnp.zeros(300).at[5].set(1.0)
        leaves[0] = jnp.round(leaves[0])
      flat = lay.flatten(leaves, jnp.float32)
      a_tiles = jnp.abs(flat).reshape(lay.num_tiles, sp._TILE)
      bmax = sp._block_stats(jnp.abs(flat))[2]
      k = jnp.asarray(rng.integers(1, 60, lay.num_segments), jnp.int32).at[0].set(1 if trial == 1 else 40)
      want = np.asarray(sp._seg_exact(a_tiles, bmax, lay, k)).view(np.int32)
      got = np.asarray(ft._seg_exact_multi(a_tiles, bmax, lay, k)).view(np.int32)
      np.testing.assert_array_equal(got, want)
  assert ft._search_passes(32) == 7 and ft._search_passes(1) == 31
