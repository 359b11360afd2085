"""comm.dense_warmup: dense steps first (exact mean over workers), then the wrapped compressor from its
initial state; bytes, non-finite steps and replicas under shard_map and pmap (issue 18).
comm.density_warmup: DGC's decreasing densities, each stage equal to its compressor run on the carried
state; bytes per stage; vmap / shard_map / pmap equal to a float64 numpy Top-k reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import (dense_warmup, density_warmup, dgc, dgc_density_schedule, powersgd, sidco,
                            stage_boundaries, topk)

from _trees import grads as _grads, params as _params  # tests/_trees.py
from _np_ref import topk_rows  # tests/_np_ref.py

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


# ---- density_warmup ----

def test_dgc_schedule_is_the_papers():
  assert dgc_density_schedule(0.001) == [0.25, 0.0625, 0.015625, 0.00390625]   # Lin et al. Sec. 3.3
  assert dgc_density_schedule(0.01, start=0.1, factor=2.0) == [0.1, 0.05, 0.025, 0.0125]
  assert dgc_density_schedule(0.3) == []


@pytest.mark.parametrize("make", [lambda r: topk(r),
                                  pytest.param(lambda r: sidco(r), marks=pytest.mark.slow),
                                  pytest.param(lambda r: dgc(r, seed=1), marks=pytest.mark.slow)])
def test_one_device_each_stage_is_its_compressor_on_the_carried_state(make):
  """Stages (ratios 0.3 for 2 steps, 0.1 for 1, then 0.02): every output and state equals the stage's own
  compressor applied to the carried state, and the bytes are that stage's payload."""
  tx = density_warmup(make, 0.02, steps=3, ratios=[0.3, 0.1])
  st = tx.init(_params())
  ref_st = make(0.3).init(_params())
  stage_of = [0, 0, 1, 2]
  comps = {j: make(r) for j, r in enumerate([0.3, 0.1, 0.02])}
  update = jax.jit(tx.update)
  total, seen = 0.0, []
  for s, j in enumerate(stage_of):
    g = _grads(s)
    out, st = update(g, st)
    ref, ref_st = jax.jit(comps[j].update)(g, ref_st)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out, ref)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           st.inner_state, ref_st)
    assert int(st.stage) == j
    assert float(st.bytes_sent) == float(ref_st.bytes_sent)
    total += float(ref_st.bytes_sent)
    seen.append(float(st.bytes_sent))
  assert float(st.total_bytes) == total
  assert seen[0] == seen[1] > seen[2] > seen[3] > 0     # fewer bytes as the density falls
  # the same stages dispatched outside jit (fixed_stage, switched at stage_boundaries): the same state
  assert stage_boundaries(3, 2) == [2, 3]
  fixed = [density_warmup(make, 0.02, steps=3, ratios=[0.3, 0.1], fixed_stage=j) for j in range(3)]
  fst = fixed[0].init(_params())
  for s, j in enumerate(stage_of):
    _, fst = jax.jit(fixed[j].update)(_grads(s), fst)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), fst, st)
  assert int(fst.off_schedule_steps) == 0 == int(st.off_schedule_steps)
  # a stage dispatched at the wrong steps is counted, never silent: the final stage run from step 0
  wrong = fixed[2].init(_params())
  for s in range(3):
    _, wrong = jax.jit(fixed[2].update)(_grads(s), wrong)
  assert int(wrong.off_schedule_steps) == 3                  # steps 0-1 are stage 0, step 2 stage 1
  # steps=0: the final compressor itself
  tx0, inner = density_warmup(make, 0.05, steps=0), make(0.05)
  out, st0 = tx0.update(_grads(0), tx0.init(_params()))
  ref, ref_st = inner.update(_grads(0), inner.init(_params()))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), out, ref)
  assert float(st0.total_bytes) == float(ref_st.total_bytes)


def _np_topk_ef(g_ws, ratios):
  """float64 numpy reference: per worker Top-k of (gradient + residual) over the raveled tree at each
  step's density, averaged over the workers; returns the outputs (steps, n)."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(g_ws)]
  steps, w = leaves[0].shape[:2]
  flat = np.concatenate([x.reshape(steps, w, -1) for x in leaves], axis=2)
  n = flat.shape[2]
  res, outs = np.zeros((w, n)), []
  for s, r in enumerate(ratios):
    k = max(1, int(round(r * n)))
    acc = flat[s] + res
    sent = topk_rows(acc, k)
    res = acc - sent
    outs.append(sent.mean(0))
  return np.stack(outs)


def test_vmap_shard_map_pmap_equal_the_numpy_reference(devices):
  """8 workers, densities 0.3 -> 0.1 -> 0.02 (one step each): the same aggregated outputs under vmap
  (the simulated workers of the experiments: every stage computed, one selected), shard_map and pmap, equal
  to the float64 numpy reference; byte counts identical on every worker."""
  steps, ratios = 3, [0.3, 0.1, 0.02]
  g_w = jax.tree_util.tree_map(
      lambda *x: jnp.stack(x).reshape(steps, _W, *x[0].shape),
      *[_grads(100 * s + w) for s in range(steps) for w in range(_W)])   # (steps, workers, ...)

  def run(g):        # one worker's (steps, ...) gradients
    tx = density_warmup(lambda r: topk(r, axis_name="d"), 0.02, steps=2, ratios=[0.3, 0.1])
    st, outs = tx.init(_params()), []
    for s in range(steps):
      o, st = tx.update(jax.tree_util.tree_map(lambda x: x[s], g), st)
      outs.append(o)
    return outs, st

  per_worker = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), g_w)    # (workers, steps, ...)
  by_vmap = jax.jit(jax.vmap(run, axis_name="d"))(per_worker)
  mesh = Mesh(np.array(devices), ("d",))
  sm = lambda g: jax.tree_util.tree_map(lambda x: x[None], run(jax.tree_util.tree_map(lambda x: x[0], g)))
  by_sm = jax.jit(shard_map(sm, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(per_worker)
  by_pmap = jax.pmap(run, axis_name="d", devices=devices)(per_worker)
  ref = _np_topk_ef(g_w, ratios)
  for outs, st in (by_vmap, by_sm, by_pmap):
    got = np.stack([np.concatenate([np.asarray(x)[0].reshape(-1) for x in jax.tree_util.tree_leaves(o)])
                    for o in outs])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for o in outs:   # every replica holds the same mean
      jax.tree_util.tree_map(lambda x: np.testing.assert_array_equal(np.asarray(x) - np.asarray(x)[0], 0.0), o)
    np.testing.assert_array_equal(np.asarray(st.total_bytes) - np.asarray(st.total_bytes)[0], 0.0)
    np.testing.assert_array_equal(np.asarray(st.stage), 2)


def test_density_warmup_bad_input():
  with pytest.raises(TypeError, match="function ratio"):
    density_warmup(topk(0.1), 0.01, steps=4)
  with pytest.raises(ValueError, match="final_ratio"):
    density_warmup(topk, 1.5, steps=4)
  with pytest.raises(ValueError, match="fewer than"):
    density_warmup(topk, 0.001, steps=2)                  # 4 DGC densities, 2 steps
  with pytest.raises(ValueError, match=r"ratios\[1\]"):
    density_warmup(topk, 0.01, steps=4, ratios=[0.5, 0.0])
  with pytest.raises(ValueError, match=r"ratios\[0\]=0.0001 is sparser than final_ratio"):
    density_warmup(topk, 0.001, steps=300, ratios=[0.0001, 0.01])
  with pytest.raises(TypeError, match="state layout"):
    density_warmup(lambda r: topk(r, momentum=0.9 if r > 0.05 else None), 0.01, steps=2,
                   ratios=[0.1]).init(_params())
  with pytest.raises(TypeError, match="bytes_sent"):
    density_warmup(lambda r: optax.identity(), 0.01, steps=2, ratios=[0.1]).init(_params())
  with pytest.raises(ValueError, match="fixed_stage=2"):
    density_warmup(topk, 0.01, steps=2, ratios=[0.1], fixed_stage=2)


@pytest.mark.parametrize("flat_state", [pytest.param(False, marks=pytest.mark.slow), True])   # (the raveled selection
# runs in both; the tree residual form ~8 s more in the slow suite)
def test_recipe_with_a_raveled_rms_selection_sends_the_same(flat_state):
  """The 0.1% recipe with its RMS selection on the raveled gradient (``optax.flatten(rms_selection(...))``: one
  buffer instead of one per leaf; the GPU form of benchmarks/sidco_model_step.py ``recipe_fixed_flat*``, not yet
  timed) sends the same entries with the same values as the tree form through every stage (raw selection, then
  RMS), and keeps the same residual; ``flat_state=True`` only changes the residual's layout."""
  from mlsys_jax.comm import rms_selection
  def recipe(pre, fs=False):
    return density_warmup(lambda r: sidco(r, precondition=pre(rms_selection(r < 0.2)), flat_state=fs), 0.05,
                          steps=2, ratios=[0.3, 0.1])
  tree, flat = recipe(lambda t: t), recipe(optax.flatten, flat_state)
  st, fst = tree.init(_params()), flat.init(_params())
  for s in range(4):
    g = _grads(s)
    out, st = jax.jit(tree.update)(g, st)
    fout, fst = jax.jit(flat.update)(g, fst)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), fout, out)
    assert int(fst.stage) == int(st.stage)
    assert float(fst.bytes_sent) == float(st.bytes_sent) > 0
  res = st.inner_state.residual
  fres = fst.inner_state.residual
  want = jax.flatten_util.ravel_pytree(res)[0]
  got = fres if flat_state else jax.flatten_util.ravel_pytree(fres)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got == 0, want == 0)          # the same entries sent (zeroed) in both
  # the RMS state: one vector, the tree's leaves raveled
  nu = jax.flatten_util.ravel_pytree(st.inner_state.precondition)[0]
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(fst.inner_state.precondition)[0], nu, rtol=1e-6)
