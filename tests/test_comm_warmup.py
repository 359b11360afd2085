"""comm.dense_warmup: dense steps first (exact mean over workers), then the wrapped compressor from its
initial state; bytes, non-finite steps and replicas under shard_map and pmap (issue 18)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import dense_warmup, powersgd, sidco, topk

from _trees import grads as _grads, params as _params  # tests/_trees.py

_W = 8
_STEPS = 4       # 2 warm-up + 2 compressed


def _dense_bytes():
  return 4.0 * sum(x.size for x in jax.tree_util.tree_leaves(_params()))


def test_one_device_dense_then_compressor_from_its_initial_state():
  inner = topk(0.1)
  tx = dense_warmup(inner, 2)
  st = tx.init(_params())
  ref_st = inner.init(_params())
  update, ref_update = jax.jit(tx.update), jax.jit(inner.update)
  for s in range(_STEPS):
    g = _grads(s)
    out, st = update(g, st)
    if s < 2:
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out, g)
      assert float(st.bytes_sent) == _dense_bytes()
    else:
      ref, ref_st = ref_update(g, ref_st)
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out, ref)
      assert float(st.bytes_sent) == float(ref_st.bytes_sent) < _dense_bytes() / 3
  assert float(st.total_bytes) == 2 * _dense_bytes() + float(ref_st.total_bytes)
  assert int(st.step) == _STEPS and int(st.inner_state.step) == 2


def test_zero_steps_is_the_compressor():
  inner = sidco(0.1, distribution="gpareto")
  tx = dense_warmup(inner, 0)
  st, ref_st = tx.init(_params()), inner.init(_params())
  for s in range(2):
    out, st = jax.jit(tx.update)(_grads(s), st)
    ref, ref_st = jax.jit(inner.update)(_grads(s), ref_st)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out, ref)
  assert float(st.total_bytes) == float(ref_st.total_bytes)


def _worker_grads(bad_worker, bad_step):
  """(workers, steps, ...) gradients with a NaN on ``bad_worker`` at ``bad_step``."""
  steps = [[_grads(100 * s + w) for w in range(_W)] for s in range(_STEPS)]
  g = steps[bad_step][bad_worker]
  steps[bad_step][bad_worker] = {**g, "dense": g["dense"].at[1, 2].set(jnp.nan)}
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(_STEPS, _W, *x[0].shape), *sum(steps, []))
  return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), stacked)


def _txs(axis, names):
  txs = {"topk": lambda: dense_warmup(topk(0.1, axis_name=axis), 2, axis_name=axis),
         "powersgd": lambda: dense_warmup(powersgd(2, axis_name=axis), 2, axis_name=axis)}
  return {n: txs[n]() for n in names}


def _run(g, axis, names=("topk", "powersgd")):
  """All steps of the wrapped transforms ``names`` on one worker's gradients (steps, ...)."""
  res = {}
  for name, tx in _txs(axis, names).items():
    st = tx.init(_params())
    outs = []
    for s in range(_STEPS):
      o, st = tx.update(jax.tree_util.tree_map(lambda x: x[s], g), st)
      outs.append(o)
    res[name] = (outs, st)
  return res


@pytest.fixture(scope="module")
def runs(devices):
  g_w = _worker_grads(bad_worker=3, bad_step=1)
  mesh = Mesh(np.array(devices), ("d",))

  def sm(gw):
    return jax.tree_util.tree_map(lambda x: x[None], _run(jax.tree_util.tree_map(lambda x: x[0], gw), "d"))

  by_sm = jax.jit(shard_map(sm, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(g_w)
  by_pmap = jax.pmap(lambda g: _run(g, "d", ("topk",)), axis_name="d", devices=devices)(g_w)
  return g_w, by_sm, by_pmap


def test_warmup_is_the_mean_and_a_bad_worker_skips_the_step_everywhere(runs):
  g_w, by_sm, _ = runs
  for name in ("topk", "powersgd"):
    outs, st = by_sm[name]
    mean0 = jax.tree_util.tree_map(lambda x: x[:, 0].mean(0), g_w)
    for w in range(_W):
      jax.tree_util.tree_map(lambda o, m: np.testing.assert_allclose(o[w], m, rtol=1e-6, atol=1e-6),
                             outs[0], mean0)
      jax.tree_util.tree_map(lambda o: np.testing.assert_array_equal(o[w], 0.0), outs[1])  # NaN on worker 3
    np.testing.assert_array_equal(st.nonfinite_steps, np.ones(_W))
    np.testing.assert_array_equal(st.total_bytes - st.total_bytes[0], 0.0)
    assert st.total_bytes[0] > _dense_bytes()          # one dense step counted, the skipped one not
    for o in outs[2:]:                                 # compressed steps: every replica identical
      jax.tree_util.tree_map(lambda x: np.testing.assert_array_equal(x - x[0], 0.0), o)


def test_pmap_equals_shard_map(runs):
  _, by_sm, by_pmap = runs
  for a, b in zip(jax.tree_util.tree_leaves(by_sm["topk"]), jax.tree_util.tree_leaves(by_pmap["topk"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bad_input():
  with pytest.raises(TypeError, match="GradientTransformation"):
    dense_warmup(lambda g: g, 2)
  with pytest.raises(ValueError, match="steps"):
    dense_warmup(topk(0.1), -1)
  with pytest.raises(TypeError, match="bytes_sent"):
    dense_warmup(optax.identity(), 2).init(_params())
  with pytest.raises(NameError, match="not bound"):
    dense_warmup(topk(0.1, axis_name="d"), 2, axis_name="d").update(_grads(0), dense_warmup(
        topk(0.1, axis_name="d"), 2, axis_name="d").init(_params()))
