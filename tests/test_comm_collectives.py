"""Every collective comm transform under shard_map and pmap on 8 simulated CPU devices: the same result
both ways, replicas identical, and one shared decision on a non-finite gradient (issues 17 and 18)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import accordion, dgc, powersgd, randomk, sidco, topk

from _trees import grads as _grads, params as _params  # tests/_trees.py

_W = 8


_SPARSE = ("sidco", "topk", "dgc", "randomk")


def _transforms(axis, names=None):
  txs = {
      "sidco": sidco(0.05, distribution="gpareto", stages=2, axis_name=axis),
      "topk": topk(0.05, axis_name=axis),
      "dgc": dgc(0.05, sample_fraction=0.5, axis_name=axis),
      "randomk": randomk(0.05, axis_name=axis),
      "powersgd": powersgd(2, axis_name=axis),
      "accordion": accordion("powersgd", 2, 1, interval=2, axis_name=axis),
  }
  return {k: v for k, v in txs.items() if names is None or k in names}


def _worker_grads(bad_worker=None):
  """(steps=2, workers, ...) gradients; step 1 holds a NaN on ``bad_worker`` when given."""
  steps = [[_grads(100 * s + w) for w in range(_W)] for s in range(2)]
  if bad_worker is not None:
    g = steps[1][bad_worker]
    steps[1][bad_worker] = {**g, "dense": g["dense"].at[3, 4].set(jnp.nan)}
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(2, _W, *x[0].shape), *sum(steps, []))


def _run_all(g_all, axis, names=None):
  """Two steps of every transform (or of ``names``) on one worker's gradients ``g_all`` (2, ...): outputs
  per step and the final states."""
  txs = _transforms(axis, names)
  params = _params()
  outs, finals = {}, {}
  for name, tx in txs.items():
    st = tx.init(params)
    o = []
    for s in range(2):
      u, st = tx.update(jax.tree_util.tree_map(lambda x: x[s], g_all), st)
      o.append(u)
    outs[name], finals[name] = o, st
  return outs, finals


def _by_shard_map(devices, g_w, names):
  mesh = Mesh(np.array(devices), ("d",))

  def sm(gw):
    res = _run_all(jax.tree_util.tree_map(lambda x: x[0], gw), "d", names)
    return jax.tree_util.tree_map(lambda x: x[None], res)

  return jax.jit(shard_map(sm, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(g_w)


@pytest.fixture(scope="module")
def g_w():
  """(workers, steps, ...) gradients with a NaN on worker 5 at step 1."""
  return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), _worker_grads(bad_worker=5))


@pytest.fixture(scope="module")
def sparse_run(devices, g_w):
  """shard_map run of the four sparsifiers (one program)."""
  return _by_shard_map(devices, g_w, _SPARSE)


@pytest.fixture(scope="module")
def runs(devices, g_w):
  """shard_map and pmap runs of all six transforms, one program each."""
  by_pmap = jax.pmap(lambda gw: _run_all(gw, "d"), axis_name="d", devices=devices)(g_w)
  return _by_shard_map(devices, g_w, None), by_pmap


@pytest.mark.slow   # two programs of six transforms: ~1 min of compilation on 2 CPU cores
def test_pmap_equals_shard_map_for_every_collective_transform(runs):
  a, b = runs
  (outs_a, st_a), (outs_b, st_b) = a, b
  assert set(outs_a) == {"sidco", "topk", "dgc", "randomk", "powersgd", "accordion"}
  for name in outs_a:
    for x, y in zip(jax.tree_util.tree_leaves(outs_a[name]), jax.tree_util.tree_leaves(outs_b[name])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=name)
    for x, y in zip(jax.tree_util.tree_leaves(st_a[name]), jax.tree_util.tree_leaves(st_b[name])):
      np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-6,
                                 err_msg=name)


def _check_skipped_everywhere(outs, st):
  for name, steps in outs.items():
    for s, u in enumerate(steps):
      leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(u)]
      for leaf in leaves:
        assert np.all(np.isfinite(leaf)), (name, s)
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape), err_msg=f"{name} {s}")
      # step 0 applies an update, the bad step 1 applies nothing anywhere
      assert any(np.any(x) for x in leaves) == (s == 0), (name, s)
    np.testing.assert_array_equal(np.asarray(st[name].nonfinite_steps), np.ones(_W), err_msg=name)


def test_one_nonfinite_worker_skips_the_step_on_every_replica(g_w, sparse_run):
  outs, st = sparse_run
  assert set(outs) == set(_SPARSE)
  _check_skipped_everywhere(outs, st)
  # every worker's residual is what step 0 left (finite; the bad step changed nothing):
  # sent + residual == gradient for Top-k's first step on each worker
  local = topk(0.05)
  upd = jax.jit(local.update)
  for w in range(_W):
    g0 = jax.tree_util.tree_map(lambda x: x[w, 0], g_w)
    _, st0 = upd(g0, local.init(_params()))
    for k in g0:
      np.testing.assert_array_equal(np.asarray(st["topk"].residual[k][w]), np.asarray(st0.residual[k]))


@pytest.mark.slow
def test_pmap_and_shard_map_skip_nonfinite_steps_for_powersgd_and_accordion_too(runs):
  for outs, st in runs:
    _check_skipped_everywhere(outs, st)


def test_mean_of_payloads_equals_single_device_sum(g_w, sparse_run):
  # step 0 (all finite) of Top-k: the collective update is the mean of the workers' local Top-k vectors
  outs, _ = sparse_run
  local = topk(0.05)
  upd = jax.jit(local.update)
  ref = []
  for w in range(_W):
    g0 = jax.tree_util.tree_map(lambda x: x[w, 0], g_w)
    ref.append(upd(g0, local.init(_params()))[0])
  ref = jax.tree_util.tree_map(lambda *x: np.mean(np.stack(x), 0), *ref)
  for k in ref:
    np.testing.assert_allclose(np.asarray(outs["topk"][0][k][0]), ref[k], rtol=1e-5, atol=1e-6)
