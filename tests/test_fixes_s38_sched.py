"""Regression tests (s38) for sched.placement and sched.dynamic: NaN usage must not score as the best PAR,
VM types outside [0, n_types) are refused (and NaN on traced input), CSV duplicates and empty offline
problems are refused, bucket_for on unsorted buckets, tree_lstm_recursive on a forest."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.sched import dynamic as dyn
from mlsys_jax.sched import placement as P
from mlsys_jax.sched.placement import hindsight as H
from mlsys_jax.sched.placement import ppo, sim, traces

# ---------------------------------------------------------------- bug 1: NaN usage is not PAR = 1


def _par_np(usage, cap):
  """float64 reference: PAR = max/mean per step, 1 where the mean is exactly 0, NaN propagates."""
  util = np.asarray(usage, np.float64) / np.asarray(cap, np.float64)[:, None, :]
  mean, peak = util.mean(0), util.max(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(mean == 0, 1.0, peak / np.where(mean == 0, 1.0, mean))


@pytest.mark.parametrize("jit", [False, True])
def test_par_per_step_nan_step_is_nan_not_one(jit):
  u = jnp.array([[[1.0], [jnp.nan]], [[0.0], [1.0]]])
  cap = jnp.ones((2, 1))
  f = jax.jit(sim.par_per_step) if jit else sim.par_per_step
  got = np.asarray(f(u, cap))
  assert got[0, 0] == 2.0
  assert np.isnan(got[1, 0])                      # was 1.0: the best possible score
  np.testing.assert_array_equal(np.isnan(got), np.isnan(_par_np(u, cap)))


@pytest.mark.parametrize("aggregate", ["mean", "peak"])
def test_par_objective_nan_propagates_under_jit(aggregate):
  u = jnp.array([[[1.0], [jnp.nan]], [[0.0], [1.0]]])
  obj = jax.jit(sim.par_objective, static_argnums=2)(u, jnp.ones((2, 1)), aggregate)
  assert np.isnan(float(obj))                     # 'peak' was 1.0, 'mean' was 1.5
  inf_u = u.at[0, 1, 0].set(jnp.inf)
  assert not np.isfinite(float(sim.par_objective(inf_u, jnp.ones((2, 1)), aggregate)))


def test_par_unused_steps_still_one_with_finite_gradient():
  u = jnp.array([[[0.0], [2.0]], [[0.0], [1.0]]])
  cap = jnp.array([[1.0], [2.0]])
  np.testing.assert_allclose(np.asarray(sim.par_per_step(u, cap)), _par_np(u, cap), rtol=1e-6)
  assert float(sim.par_objective(jnp.zeros((3, 4, 2)), jnp.ones((3, 2)))) == 1.0
  assert float(sim.par_objective(jnp.zeros((3, 4, 2)), jnp.ones((3, 2)), "peak")) == 1.0
  g = jax.grad(lambda x: sim.par_objective(x, cap))(u)
  assert np.all(np.isfinite(np.asarray(g)))


def test_hindsight_scores_and_step_rewards_nan_propagate():
  future = jnp.zeros((3, 4, 1)).at[1, 2, 0].set(jnp.nan)
  vm = jnp.full((4, 1), 0.25)
  cost = sim.hindsight_scores(future, vm, jnp.ones((3, 1)), 4)
  assert np.all(np.isnan(np.asarray(cost)))       # was finite: the NaN step counted as PAR 1
  cost_out = sim.hindsight_scores(future, vm, jnp.ones((3, 1)), 2)  # the NaN step is past the horizon
  assert np.all(np.isfinite(np.asarray(cost_out)))
  usage = jnp.zeros((2, 6, 1)).at[0, :, 0].set(0.5).at[1, 3, 0].set(jnp.nan)
  rew = np.asarray(ppo.step_rewards(usage, jnp.ones((2, 1)), jnp.array([0, 2, 4]), jnp.ones(3, bool)))
  assert np.isfinite(rew[0]) and np.isnan(rew[1])  # decision 1 owns steps [2, 4), which hold the NaN


def _nan_batch():
  tr = traces.synthetic_trace(jax.random.PRNGKey(3), n_vms=12, horizon=16, max_life=4)
  bad = tr._replace(usage=tr.usage.at[2, 0, 0].set(jnp.nan))
  return jax.tree.map(lambda a, b: jnp.stack([a, b]), tr, bad), tr


def test_simulate_under_vmap_nan_trace_scores_nan():
  batch, good = _nan_batch()
  spec, cl = sim.Spec(16, window=4), sim.make_cluster(3)
  res = jax.jit(jax.vmap(lambda t: sim.simulate(t, cl, P.least_loaded, spec=spec)))(batch)
  obj = np.asarray(res.objective)
  ref = P.simulate_numpy(good, cl, "least_loaded", spec=spec)
  assert obj[0] == pytest.approx(ref.objective, rel=1e-6)
  assert np.isnan(obj[1])                         # a NaN trace must not look like a good placement


def test_simulate_numpy_unchecked_nan_objective():
  _, good = _nan_batch()
  bad = good._replace(usage=good.usage.at[2, 0, 0].set(jnp.nan))
  ref = P.simulate_numpy(bad, sim.make_cluster(3), "first_fit", spec=sim.Spec(16, window=4), check=False)
  assert np.isnan(ref.objective)


# ---------------------------------------------------------------- bug 2: VM types, CSV duplicates


def _typed_trace(types):
  tr = traces.make_trace([0, 0, 1], np.full((3, 2, 1), .25), np.full((3, 1), .25))
  return tr._replace(vm_type=jnp.asarray(types, jnp.int32))


def test_simulate_refuses_vm_type_out_of_range():
  cl = sim.make_cluster(2, (1.,))
  with pytest.raises(ValueError, match=r"VM 0 has vm_type 7, outside \[0, n_types=4\)"):
    sim.simulate(_typed_trace([7, -3, 1]), cl, P.least_loaded, spec=sim.Spec(4, n_types=4), record=True)
  with pytest.raises(ValueError, match=r"VM 1 has vm_type -3"):
    sim.simulate(_typed_trace([0, -3, 1]), cl, P.least_loaded, spec=sim.Spec(4, n_types=4))
  with pytest.raises(ValueError, match=r"n_types=2"):
    P.simulate_numpy(_typed_trace([0, 2, 1]), cl, "first_fit", spec=sim.Spec(4, n_types=2))
  # in range: accepted, and the counts see every active VM
  r = sim.simulate(_typed_trace([3, 0, 1]), cl, P.least_loaded, spec=sim.Spec(4, n_types=4), record=True)
  assert float(r.obs.counts[2].sum()) == 2.0


def test_validate_trace_types_padding_rows_unchecked():
  cl = sim.make_cluster(2, (1.,))
  tr = _typed_trace([0, 9, 1])._replace(valid=jnp.array([True, False, True]))
  sim.validate_trace(tr, cl, 4, n_types=2)        # the padding row's type does not matter
  r = sim.simulate(tr, cl, H.imitation_policy, spec=sim.Spec(4, n_types=4),
                   params=H.PlacementNet().init(jax.random.PRNGKey(0), jnp.zeros((2, 2 * (5 + 4) + 4 + 1))))
  assert int(r.nonfinite) == 0 and r.actions.tolist()[1] == -1
  with pytest.raises(ValueError, match="vm_type 9"):
    sim.validate_trace(tr._replace(valid=jnp.ones(3, bool)), cl, 4, n_types=4)


def test_out_of_range_type_under_vmap_is_nan_not_dropped():
  cl = sim.make_cluster(2, (1.,))
  spec = sim.Spec(4, n_types=4)
  batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), _typed_trace([0, 1, 1]), _typed_trace([7, 1, 1]))
  net = H.PlacementNet().init(jax.random.PRNGKey(0), jnp.zeros((2, 2 * (5 + 4) + 4 + 1)))
  run = jax.jit(jax.vmap(lambda t: sim.simulate(t, cl, H.imitation_policy, spec=spec, params=net, record=True)))
  r = run(batch)
  counts = np.asarray(r.obs.counts)               # [B, N, M, K]
  assert np.all(np.isfinite(counts[0])) and counts[0, 2].sum() == 2.0
  # VM 0 of trace 1 has type 7: the machine it sits on shows NaN counts while it is active (was zeros)
  m0 = int(r.actions[1, 0])
  assert np.all(np.isnan(counts[1, 1, m0])) and np.all(np.isfinite(counts[1, 1, 1 - m0]))
  assert int(r.nonfinite[0]) == 0 and int(r.nonfinite[1]) >= 1   # the learned policy's NaN scores counted
  feats = H.machine_features(jax.tree.map(lambda x: x[1, 0], r.obs))
  assert np.all(np.isnan(np.asarray(feats)[:, -4 - 1:-1]))         # the type one-hot block


def test_make_trace_refuses_bad_types():
  u, s = np.full((2, 2, 1), .25), np.full((2, 1), .25)
  with pytest.raises(ValueError, match="VM 1 has vm_type -3"):
    traces.make_trace([0, 1], u, s, vm_type=[0, -3])
  with pytest.raises(ValueError, match="integer VM types"):
    traces.make_trace([0, 1], u, s, vm_type=[0, 1.5])
  with pytest.raises(ValueError, match="shape"):
    traces.make_trace([0, 1], u, s, vm_type=[0, 1, 2])
  assert traces.make_trace([0, 1], u, s, vm_type=[2, 5]).vm_type.tolist() == [2, 5]


def _csv(tmp_path, body):
  p = tmp_path / "t.csv"
  p.write_text("vm_id,time,cpu,mem,size_cpu,size_mem,type\n" + body)
  return str(p)


def test_load_csv_refuses_duplicates_and_negative_types(tmp_path):
  dup = _csv(tmp_path, "a,0,0.1,0.1,0.5,0.5,1\na,1,0.2,0.1,0.5,0.5,1\nb,1,0.1,0.1,0.5,0.5,0\na,1,0.3,0.1,0.5,0.5,1\n")
  with pytest.raises(ValueError, match=r":5: VM a has a second row for time 1 \(the first is on line 3\)"):
    traces.load_csv_trace(dup)                    # was: the last row silently won (cpu 0.3)
  neg = _csv(tmp_path, "a,0,0.1,0.1,0.5,0.5,-1\n")
  with pytest.raises(ValueError, match="negative type -1"):
    traces.load_csv_trace(neg)
  ok = traces.load_csv_trace(_csv(tmp_path, "a,0,0.1,0.1,0.5,0.5,1\na,1,0.25,0.1,0.5,0.5,1\nb,1,0.1,0.1,0.5,0.5,0\n"))
  np.testing.assert_allclose(np.asarray(ok.usage[0, :, 0]), [0.1, 0.25])


def test_offline_optimum_no_valid_vms_clear_error():
  tr = traces.make_trace([0, 0], np.full((2, 2, 1), 0.5), np.full((2, 1), 0.5))
  tr = tr._replace(valid=jnp.zeros(2, bool))
  with pytest.raises(ValueError, match="no valid VMs"):
    H.offline_optimum(tr, sim.Cluster(jnp.ones((2, 1))), spec=sim.Spec(horizon=2))


# ---------------------------------------------------------------- bug 3: sched.dynamic


def test_bucket_for_any_order_matches_brute_force():
  assert dyn.bucket_for(17, (64, 32, 16)) == 32   # was 64 (bisect on unsorted input)
  rng = np.random.default_rng(0)
  for _ in range(200):
    bs = [int(b) for b in rng.integers(1, 100, size=rng.integers(1, 6))]
    n = int(rng.integers(0, 110))
    want = min((b for b in bs if b >= n), default=None)
    assert dyn.bucket_for(n, bs) == want
    assert dyn.bucket_for(n, tuple(sorted(set(bs)))) == want
    assert dyn.bucket_for(np.int64(n), np.asarray(bs)) == want


def test_bucket_for_bad_buckets():
  with pytest.raises(ValueError, match="empty"):
    dyn.bucket_for(3, ())
  with pytest.raises(ValueError, match=r"\[1, inf\], got 0"):
    dyn.bucket_for(3, (0, 8))
  with pytest.raises(TypeError, match="integer"):
    dyn.bucket_for(3, (4.5, 8))
  with pytest.raises(TypeError, match="n must be an integer"):
    dyn.bucket_for(3.5, (4, 8))


def test_bucketed_jit_unsorted_buckets_pads_to_smallest():
  f = dyn.bucketed_jit(lambda x, length: x.sum(), dims={0: 0}, buckets=(64, 32, 16), length_arg="length")
  assert f.bucket_of(17) == 32
  assert float(f(np.ones(17, np.float32))) == 17.0


def _cell_vars(d=3, h=4):
  b = dyn.encode_trees([[-1, 0]], [np.ones((2, d), np.float32)])
  return dyn.ChildSumTreeLSTM(h).init(jax.random.PRNGKey(0), b)


def test_tree_lstm_recursive_refuses_forest_and_bad_trees():
  v = _cell_vars()
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="exactly one root .* 2 roots"):
    dyn.tree_lstm_recursive(v, [-1, -1], x)       # was: silently the first root only
  with pytest.raises(ValueError, match="0 roots"):
    dyn.tree_lstm_recursive(v, [1, 0], x)         # a cycle: was RecursionError
  with pytest.raises(ValueError, match="same tree"):
    dyn.tree_lstm_recursive(v, [-1, 5], x)
  with pytest.raises(ValueError, match=r"x must have shape \(2, d\)"):
    dyn.tree_lstm_recursive(v, [-1, 0], jnp.ones((3, 3)))
  # one tree: unchanged, and equal to the level-by-level batch (also under jit with static parents)
  b = dyn.encode_trees([[-1, 0]], [np.ones((2, 3), np.float32)])
  root_h, _ = dyn.ChildSumTreeLSTM(4).apply(v, b)
  rec = jax.jit(dyn.tree_lstm_recursive, static_argnums=1)(v, (-1, 0), x)
  np.testing.assert_allclose(np.asarray(rec), np.asarray(root_h[0]), atol=1e-6)
