"""Tests of mlsys_jax.comm.accordion: detector rule, per-layer switching, levels, bytes, collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import lowrank as lr
from mlsys_jax.comm import sparse as sp
from mlsys_jax.comm.accordion import (AccordionState, accordion, accordion_batch_size, accordion_regime, accordion_report,
                                      critical_regime)

from _trees import grads as _grads, params as _params  # tests/_trees.py


def test_critical_regime_rule():
  prev = jnp.array([10.0, 10.0, 10.0, 0.0, 4.0])
  now = jnp.array([5.0, 5.1, 16.0, 3.0, 4.0])
  # ratios 0.5 (>= eta: critical), 0.49, 0.6, prev == 0 (critical), 0
  np.testing.assert_array_equal(critical_regime(prev, now, 0.5), [True, False, True, True, False])
  assert bool(critical_regime(3.0, 3.0, 0.5, has_prev=False))


def test_detector_switching_matches_hand_computed_sequence():
  # Two leaves with fixed unit-norm directions; the scales make the window norms known exactly.
  u = jnp.ones((4, 3)) / jnp.sqrt(12.0)
  c = [1, 10, 1, 10, 1, 4, 1, 3.9, 1, 1.0]     # leaf a; windows (odd steps): 10, 10, 4, 3.9, 1
  d = [1, 2, 1, 1.2, 1, 1.2, 1, 0.0, 1, 5.0]   # leaf b; windows: 2, 1.2, 1.2, 0, 5
  lr_sched = optax.piecewise_constant_schedule(0.1, {5: 0.1})   # drops between steps 4 and 5
  tx = accordion("topk", low=0.5, high=0.25, eta=0.5, interval=2, accumulate=1, lr_schedule=lr_sched)
  st = tx.init({"a": u, "b": u})
  upd = jax.jit(tx.update)
  expected = {0: [1, 1], 1: [1, 1], 2: [1, 1], 3: [0, 0], 4: [1, 1],   # 4: learning-rate decay rule
              5: [1, 0], 6: [1, 0], 7: [0, 1], 8: [0, 1], 9: [1, 1]}
  # 3: |10-10|/10 = 0, |2-1.2|/2 = 0.4; 5: 0.6, 0; 7: 0.025, 1.0; 9: 0.74, prev 0 -> critical
  exp_norms = {1: [10, 2], 3: [10, 1.2], 5: [4, 1.2], 7: [3.9, 0], 9: [1, 5]}
  for t in range(10):
    flags_used = np.asarray(st.critical)
    _, st = upd({"a": c[t] * u, "b": d[t] * u}, st)
    np.testing.assert_array_equal(np.asarray(st.critical), np.asarray(expected[t], bool), err_msg=str(t))
    if t in exp_norms:
      np.testing.assert_allclose(np.asarray(st.prev_norm), exp_norms[t], rtol=1e-5, atol=1e-6)
    # bytes: Top-k payloads of the level each leaf used in this step (k = 6 or 3 of 12; int32 + f32)
    want = sum((6 if f else 3) * 8 + 4 for f in flags_used)
    assert float(st.bytes_sent) == want, t
  assert int(st.decisions) == 5
  rep = accordion_report(st, {"a": u, "b": u})
  assert rep["critical"] == {"['a']": True, "['b']": True} and rep["steps"] == 10


@pytest.mark.parametrize("compressor,low,high", [("powersgd", 4, 1), ("topk", 0.2, 0.05)])
def test_levels_equal_the_underlying_compressor(compressor, low, high):
  params = {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((40, 10))}
  tx = accordion(compressor, low=low, high=high, interval=1000)    # stays critical: low compression
  ref = lr.powersgd(low) if compressor == "powersgd" else sp.topk(low, per_tensor=True)
  st, rst = tx.init(params), ref.init(params)
  upd, rupd = jax.jit(tx.update), jax.jit(ref.update)
  for i in range(3):
    g = {k: v for k, v in _grads(i).items() if k in params}
    before = st.residual
    out, st = upd(g, st)
    rout, rst = rupd(g, rst)
    for k in params:
      np.testing.assert_allclose(np.asarray(out[k]), np.asarray(rout[k]), rtol=1e-5, atol=1e-6)
      acc = np.asarray(g[k] + before[k])
      np.testing.assert_array_equal(np.asarray(st.residual[k]), acc - np.asarray(out[k]))  # exact EF
  # force the high-compression level and compare with the compressor at that level
  st = st._replace(critical=jnp.zeros_like(st.critical))
  g = {k: v for k, v in _grads(7).items() if k in params}
  out, st2 = upd(g, st)
  for i, k in enumerate(sorted(params)):
    acc = g[k] + st.residual[k]
    if compressor == "powersgd":
      want, _, _ = lr.powersgd_step(acc.reshape(lr.matrix_shape(acc.shape)), st.q[i][:, :high])
      want = want.reshape(acc.shape)
      assert np.linalg.matrix_rank(np.asarray(out[k]).reshape(-1, acc.shape[-1]),
                                   tol=1e-4) == high
    else:
      kk = max(1, round(high * acc.size))
      want = sp.decompress(sp.topk_payload(acc.reshape(-1), kk), acc.size).reshape(acc.shape)
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(want), rtol=1e-5, atol=1e-6)
  sizes = {"powersgd": (36 + 8) * high * 4 + (40 + 10) * high * 4,
           "topk": (round(high * 288) * 8 + 4) + (round(high * 400) * 8 + 4)}
  assert float(st2.bytes_sent) == sizes[compressor]


def test_collectives_agree_with_single_device(devices):
  mesh = Mesh(np.array(devices), ("d",))
  params = _params()
  spec = jax.tree_util.tree_map(lambda _: P("d"), params)
  g0 = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_grads(w) for w in range(8)])
  # step 2: the conv gradient grows 3x on every worker, the others stay the same
  g1 = dict(g0, conv=3.0 * g0["conv"])
  tx = accordion("powersgd", low=2, high=1, interval=1, axis_name="d")

  def run(g0, g1):
    first = jax.tree_util.tree_map(lambda x: x[0], g0)
    second = jax.tree_util.tree_map(lambda x: x[0], g1)
    st = tx.init(first)
    out0, st = tx.update(first, st)
    _, st = tx.update(second, st)
    crit, norms, nb = st.critical, st.prev_norm, st.bytes_sent
    out2, _ = tx.update(second, st)          # third step: rank 1 where the detector said so
    return (jax.tree_util.tree_map(lambda x: x[None], out0), crit[None], norms[None], nb[None],
            jax.tree_util.tree_map(lambda x: x[None], out2))

  f = jax.jit(shard_map(run, mesh=mesh, in_specs=(spec, spec),
                        out_specs=(spec, P("d"), P("d"), P("d"), spec), check_vma=False))
  out0, crit, norms, nbytes, _ = f(g0, g1)
  # step 1 is critical (rank 2): the global output equals single-device PowerSGD on the mean gradient
  ref, _ = jax.jit(lr.powersgd(2).update)(jax.tree_util.tree_map(lambda x: x.mean(0), g0),
                                          lr.powersgd(2).init(params))
  for k in params:
    np.testing.assert_allclose(np.asarray(out0[k][3]), np.asarray(ref[k]), rtol=2e-4, atol=2e-5)
  # identical gradients on every worker: all three steps (both levels) equal the single-device run
  rep = lambda g: jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[:1], x.shape), g)
  *_, out2 = f(rep(g0), rep(g1))
  single = accordion("powersgd", low=2, high=1, interval=1)
  sst = single.init(params)
  for i, g in enumerate((g0, g1, g1)):
    if i == 2:   # the flags the third step uses: conv at rank 2, dense at rank 1
      np.testing.assert_array_equal(np.asarray(sst.critical), [False, True, False])
    sout, sst = jax.jit(single.update)(jax.tree_util.tree_map(lambda x: x[0], g), sst)
  for k in params:
    np.testing.assert_allclose(np.asarray(out2[k][5]), np.asarray(sout[k]), rtol=2e-4, atol=2e-5)
  # decisions: same on every device, from the mean over devices of the local window norms
  crit = np.asarray(crit)
  assert (crit == crit[0]).all()
  leaves = ["bias", "conv", "dense"]             # flatten order
  mean_norms = [np.mean([np.linalg.norm(np.asarray(g1[k][w])) for w in range(8)]) for k in leaves]
  np.testing.assert_allclose(np.asarray(norms)[0], mean_norms, rtol=1e-5)
  np.testing.assert_array_equal(crit[0], [False, True, False])     # |n - 3n| / n = 2 >= 0.5 for conv
  # bytes of step 2 (rank 2 everywhere) plus the detector's 3 floats
  assert float(np.asarray(nbytes)[0]) == lr.powersgd_bytes(params, 2) + 3 * 4
  # Top-k: the global update is the mean of the workers' local sparse updates
  txk = accordion("topk", low=0.1, high=0.01, axis_name="d")
  loc = accordion("topk", low=0.1, high=0.01)

  def runk(g):
    g = jax.tree_util.tree_map(lambda x: x[0], g)
    return jax.tree_util.tree_map(lambda x: x[None], txk.update(g, txk.init(g))[0])

  outk = jax.jit(shard_map(runk, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False))(g0)
  loc_upd = jax.jit(lambda g: loc.update(g, loc.init(params))[0])
  local = [loc_upd(jax.tree_util.tree_map(lambda x: x[w], g0)) for w in range(8)]
  for k in ("conv", "dense"):
    np.testing.assert_allclose(np.asarray(outk[k][0]), np.mean([np.asarray(o[k]) for o in local], 0),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(outk["bias"][0]), np.asarray(g0["bias"]).mean(0), rtol=1e-5)


def test_nonfinite_step_is_skipped():
  tx = accordion("powersgd", low=2, high=1, interval=3)
  params = _params()
  st = tx.init(params)
  _, st = tx.update(_grads(0), st)
  bad = _grads(1)
  bad["conv"] = bad["conv"].at[0, 0, 0, 0].set(jnp.nan)
  out, st2 = jax.jit(tx.update)(bad, st)
  assert int(st2.nonfinite_steps) == 1 and float(st2.bytes_sent) == 0.0
  assert all(float(jnp.abs(o).sum()) == 0.0 for o in jax.tree_util.tree_leaves(out))
  for a, b in zip(jax.tree_util.tree_leaves((st.residual, st.q, st.accum)),
                  jax.tree_util.tree_leaves((st2.residual, st2.q, st2.accum))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_size_state_machine():
  sched = accordion_batch_size(64, 512, eta=0.5)
  st = sched.init()
  assert st.batch_size == 64 and st.critical
  sizes = []
  for norm in [10.0, 10.0, 4.0, 3.9, 1.0, 0.9]:
    st = sched.update(st, norm)
    sizes.append(st.batch_size)
  # first window critical; 0 -> large; 0.6 -> small; 0.025 -> large; 0.74 -> small; 0.1 -> large
  assert sizes == [64, 512, 64, 512, 64, 512]
  assert sched.update(st, 0.9, lr_decayed=True).batch_size == 64     # decay rule
  tree = {"a": jnp.full((4,), 0.45), "b": jnp.zeros((3,))}          # global norm 0.9
  assert sched.update(st, tree).batch_size == 512
  with pytest.raises(ValueError, match="finite"):
    sched.update(st, float("nan"))


def test_bad_inputs():
  for eta in (0.0, 1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="eta"):
      accordion(eta=eta)
  with pytest.raises(ValueError, match="interval"):
    accordion(interval=0)
  with pytest.raises(ValueError, match="accumulate"):
    accordion(interval=5, accumulate=6)
  with pytest.raises(ValueError, match="smaller rank"):
    accordion("powersgd", low=1, high=2)
  with pytest.raises(ValueError, match="smaller density"):
    accordion("topk", low=0.01, high=0.1)
  with pytest.raises(ValueError, match="density"):
    accordion("topk", low=1.5, high=0.1)
  with pytest.raises(ValueError, match="compressor"):
    accordion("signsgd")
  with pytest.raises(ValueError, match="clamp_rank"):
    accordion("powersgd", low=4, high=1).init({"w": jnp.zeros((3, 50))})
  with pytest.raises(TypeError, match="lr_schedule"):
    accordion(lr_schedule=0.1)
  with pytest.raises(ValueError, match="large > small"):
    accordion_batch_size(128, 128)
  with pytest.raises(ValueError, match="eta"):
    accordion_batch_size(32, 128, eta=1.0)
  tx = accordion(axis_name="batch")
  with pytest.raises(NameError, match="not bound"):
    tx.update({"w": jnp.ones((4, 4))}, tx.init({"w": jnp.ones((4, 4))}))


def _assert_same_but_bytes(a, b):
  """Updates and every AccordionState field but the byte counts bitwise equal: ``a``, ``b`` = (updates, state)."""
  jax.tree_util.tree_map(np.testing.assert_array_equal, a[0], b[0])
  for f in AccordionState._fields:
    if f not in ("bytes_sent", "total_bytes"):
      jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(a[1], f), getattr(b[1], f))


def _scaled_grads(t):
  # window norms that change by more or less than eta: levels switch back and forth over the run
  s = [1.0, 1.0, 3.0, 3.0, 3.2, 3.2, 1.0, 1.0, 1.1, 1.1, 4.0, 4.0][t % 12]
  return _grads(t, scale=s)


@pytest.mark.parametrize("compressor,low,high", [("powersgd", 4, 1), ("topk", 0.2, 0.05)])
def test_static_regime_equals_the_conditional_path(compressor, low, high):
  """One compiled step per regime, picked by accordion_regime: the same updates and state (bytes aside) as
  regime=None, no conditional in the compiled step, off_regime_steps 0; a stale step is counted."""
  params = _params()
  lr_sched = optax.piecewise_constant_schedule(0.1, {9: 0.1})
  make = lambda reg: accordion(compressor, low=low, high=high, interval=2, accumulate=1,   # noqa: E731
                               lr_schedule=lr_sched, regime=reg)
  ref_tx = make(None)
  ref = st = ref_tx.init(params)
  ref_upd = jax.jit(ref_tx.update)
  compiled, regimes_seen = {}, set()
  for t in range(12):
    reg = accordion_regime(st)
    regimes_seen.add(reg)
    if reg not in compiled:
      compiled[reg] = jax.jit(make(reg).update)
      hlo = compiled[reg].lower(_scaled_grads(t), st).compile().as_text()
      assert "conditional(" not in hlo
    g = _scaled_grads(t)
    out, st = compiled[reg](g, st)
    rout, ref = ref_upd(g, ref)
    _assert_same_but_bytes((out, st), (rout, ref))
  assert len(regimes_seen) >= 2                       # the levels did switch
  # the dense bias leaf (flatten order: bias, conv, dense) never splits regimes: always read as True
  assert [bool(x) for x in np.asarray(st.levels_differ)] == [False, True, True]
  assert all(r[0] for r in regimes_seen)
  assert "conditional(" in ref_upd.lower(_scaled_grads(0), ref).compile().as_text()
  assert int(st.off_regime_steps) == 0
  # a step compiled for one regime and run after the detector moved on: counted, not silent
  stale = next(r for r in regimes_seen if r != accordion_regime(st))
  _, st2 = compiled[stale](_scaled_grads(12), st)
  assert int(st2.off_regime_steps) == 1 and accordion_report(st2)["off_regime_steps"] == 1


def test_static_regime_bytes_and_bad_regimes():
  params = _params()
  n = len(jax.tree_util.tree_leaves(params))
  with pytest.raises(ValueError, match="regime has 2 flags but the gradient tree has 3 leaves"):
    accordion("topk", low=0.2, high=0.05, regime=(True, False)).init(params)
  with pytest.raises(TypeError, match=r"regime\[1\] is 1"):
    accordion("topk", low=0.2, high=0.05, regime=(True, 1, False))
  with pytest.raises(TypeError, match="sequence of one bool per leaf"):
    accordion("topk", low=0.2, high=0.05, regime=True)
  # without axis_name the bytes are the chosen levels' payloads, as with regime=None
  tx, ref = (accordion("topk", low=0.2, high=0.05, interval=3, regime=r) for r in ((True,) * n, None))
  _, s = jax.jit(tx.update)(_grads(0), tx.init(params))
  _, r = jax.jit(ref.update)(_grads(0), ref.init(params))
  assert float(s.bytes_sent) == float(r.bytes_sent)


def test_static_regime_under_shard_map(devices):
  """Eight devices: with a static regime the detector's pmean runs every step, and is counted (4 bytes per leaf
  more than regime=None on non-decision steps); updates and the rest of the state equal, replicas identical."""
  mesh = Mesh(np.asarray(devices[:8]), ("d",))
  params = _params()
  n = len(jax.tree_util.tree_leaves(params))
  g = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_grads(w) for w in range(8)])
  spec = P("d")

  def run_with(reg):
    tx = accordion("powersgd", low=4, high=1, interval=3, axis_name="d", regime=reg)

    def run(gw):
      st = tx.init(params)
      out, st = tx.update(jax.tree_util.tree_map(lambda x: x[0], gw), st)
      return jax.tree_util.tree_map(lambda x: x[None], (out, st))
    return jax.jit(shard_map(run, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False))(g)

  (o1, s1), (o2, s2) = run_with(None), run_with((True,) * n)
  jax.tree_util.tree_map(np.testing.assert_array_equal, o1, o2)
  for leaf in jax.tree_util.tree_leaves(o2):
    a = np.asarray(leaf)
    assert all(np.array_equal(a[0], a[i]) for i in range(1, 8))
  assert np.all(np.asarray(s2.bytes_sent) == np.asarray(s1.bytes_sent) + 4 * n)   # step 0 is no decision step


def test_static_regime_switches_under_shard_map(devices):
  """Eight devices, per-device states carried across calls, the regime re-read every step: the levels switch and
  the dispatched static steps give the conditional path's updates and states (bytes aside), replicas identical."""
  mesh = Mesh(np.asarray(devices[:8]), ("d",))
  params = _params()

  def stepper(tx):
    def body(g, st):
      u, st = tx.update(jax.tree_util.tree_map(lambda x: x[0], g), jax.tree_util.tree_map(lambda x: x[0], st))
      return jax.tree_util.tree_map(lambda x: x[None], (u, st))
    return jax.jit(shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"), check_vma=False))

  make = lambda reg: accordion("powersgd", low=4, high=1, interval=2, accumulate=1, axis_name="d",   # noqa: E731
                               regime=reg)
  stacked = lambda t: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_scaled_grads(t + 13 * w)   # noqa: E731
                                                                       for w in range(8)])
  st = ref = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (8,) + jnp.shape(x)), make(None).init(params))
  ref_step, compiled, seen = stepper(make(None)), {}, set()
  for t in range(8):
    reg = accordion_regime(st)
    seen.add(reg)
    if reg not in compiled:
      compiled[reg] = stepper(make(reg))
    g = stacked(t)
    out, st = compiled[reg](g, st)
    rout, ref = ref_step(g, ref)
    _assert_same_but_bytes((out, st), (rout, ref))
    for leaf in jax.tree_util.tree_leaves(out):
      a = np.asarray(leaf)
      assert all(np.array_equal(a[0], a[i]) for i in range(1, 8))
  assert len(seen) >= 2 and int(np.asarray(st.off_regime_steps).max()) == 0
