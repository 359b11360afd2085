"""Tests of mlsys_jax.sched.placement (FirePlace): simulator vs the numpy reference, objective closed
forms, capacity, vmap/jit, hindsight scores, offline optimum bound, equivariance, bad input."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.sched import placement as P
from mlsys_jax.sched.placement import hindsight as H

SPEC = P.Spec(horizon=32, window=4)
N, L = 40, 8
F = 2 * (5 * 2 + 4) + 4 + 2  # machine_features width for R=2, K=4
# One compiled simulation for every policy (jit caches on the policy object): index = position here.
NAMES = list(P.BASELINES) + ["imitation", "oracle"]
ALL = P.switch_policy(*P.BASELINES.values(), H.imitation_policy, P.hindsight_oracle)


def _run(tr, cl, name, spec=SPEC, key=None, net=None):
  return P.simulate(tr, cl, ALL, spec=spec, key=key, params=(NAMES.index(name), net),
                    with_hindsight=True)


def _net(m=3):
  return H.PlacementNet().init(jax.random.PRNGKey(0), jnp.zeros((m, F)))


def _trace(seed, workload="spiky", n=N):
  return P.synthetic_trace(jax.random.PRNGKey(seed), n_vms=n, horizon=SPEC.horizon, max_life=L,
                           workload=workload, span=0.8)


def _reserved_np(tr, actions, m, horizon):
  res = np.zeros((m, horizon + L, 2), np.float64)
  for i, j in enumerate(np.asarray(actions)):
    if j >= 0:
      a = int(tr.arrival[i])
      res[j, a:a + int(tr.lifetime[i])] += np.asarray(tr.size[i])
  return res


# ------------------------------------------------------------------ objective
def test_par_closed_forms():
  cap = jnp.ones((4, 1))
  u = jnp.array([3.0, 1.0, 0.0, 0.0])[:, None, None]  # max 3, mean 1
  np.testing.assert_allclose(P.par_per_step(u, cap), [[3.0]])
  assert float(P.par_per_step(jnp.zeros((4, 5, 2)), jnp.ones((4, 2))).max()) == 1.0  # idle -> 1
  bal = jnp.full((4, 3, 2), 0.25)
  assert float(P.par_objective(bal, jnp.ones((4, 2)))) == 1.0
  # utilisation, not raw usage: machine 1 has twice the capacity
  u2 = jnp.array([[[1.0]], [[2.0]]])
  np.testing.assert_allclose(P.par_objective(u2, jnp.array([[1.0], [2.0]])), 1.0)
  # mean over time and resources vs peak aggregation, against numpy
  rng = np.random.default_rng(0)
  u3 = rng.uniform(0, 1, (3, 7, 2)).astype(np.float32)
  u3[:, 2] = 0  # an idle step
  cap3 = np.array([[1.0, 2.0], [1.0, 1.0], [2.0, 1.0]], np.float32)
  util = u3 / cap3[:, None]
  par = np.where(util.mean(0) > 0, util.max(0) / np.maximum(util.mean(0), 1e-30), 1.0)
  np.testing.assert_allclose(P.par_objective(u3, cap3), par.mean(), rtol=1e-6)
  peak = (util.max((0, 1)) / util.mean((0, 1))).mean()
  np.testing.assert_allclose(P.par_objective(u3, cap3, "peak"), peak, rtol=1e-6)


# ------------------------------------------------------------------ simulator vs numpy reference
@pytest.mark.parametrize("workload,capacity", [("spiky", (1.0, 1.0)), ("bursty", (0.3, 0.3)),
                                               ("steady", (0.25, 0.5))])
def test_simulator_matches_numpy_reference(workload, capacity):
  tr = _trace(3, workload)
  cl = P.make_cluster(3, capacity)
  saw_reject = False
  for name in P.NUMPY_POLICIES:
    ref = P.simulate_numpy(tr, cl, name, spec=SPEC)
    got = _run(tr, cl, name, net=_net())
    np.testing.assert_array_equal(np.asarray(got.actions), ref.actions, err_msg=name)
    assert int(got.rejected) == int(ref.rejected), name
    np.testing.assert_array_equal(np.asarray(got.usage), ref.usage)
    np.testing.assert_allclose(float(got.objective), ref.objective, rtol=1e-6)
    saw_reject |= int(ref.rejected) > 0
  if capacity[0] < 0.5:
    assert saw_reject, "tight capacity should reject some VMs (the test would not exercise rejection)"


def test_usage_buffer_is_sum_of_placed_vms():
  tr = _trace(5)
  r = _run(tr, P.make_cluster(3), "random", key=jax.random.PRNGKey(2), net=_net())
  want = np.zeros((3, SPEC.horizon + L, 2))
  for i, j in enumerate(np.asarray(r.actions)):
    a = int(tr.arrival[i])
    want[j, a:a + L] += np.asarray(tr.usage[i])
  np.testing.assert_allclose(np.asarray(r.usage), want[:, :SPEC.horizon], atol=1e-6)


# ------------------------------------------------------------------ capacity
def test_every_policy_respects_capacity():
  tr = _trace(11, "bursty")
  cap = (0.3, 0.3)
  cl = P.make_cluster(3, cap)
  for name in NAMES:
    r = _run(tr, cl, name, key=jax.random.PRNGKey(1), net=_net())
    acts = np.asarray(r.actions)
    res = _reserved_np(tr, acts, 3, SPEC.horizon)
    assert np.all(res <= np.asarray(cap) + 1e-6), name
    # a rejected VM had no machine with room at its arrival
    for i in np.flatnonzero(acts < 0):
      a = int(tr.arrival[i])
      before = _reserved_np(tr, np.where(np.arange(N) < i, acts, -1), 3, SPEC.horizon)[:, a]
      assert not np.any(np.all(before + np.asarray(tr.size[i]) <= np.asarray(cap) + 1e-6, -1)), name
    assert int(r.rejected) == int(np.sum(acts < 0)), name
    assert int(r.nonfinite) == 0, name
  # a policy emitting NaN is counted, and capacity still holds
  nan_pol = lambda p, obs, k: jnp.where(jnp.arange(3) == 1, jnp.nan, 0.0)
  r = P.simulate(tr, cl, nan_pol, spec=SPEC)
  assert int(r.nonfinite) > 0
  assert np.all(_reserved_np(tr, r.actions, 3, SPEC.horizon) <= np.asarray(cap) + 1e-6)


# ------------------------------------------------------------------ jit / vmap
def test_vmap_over_traces_matches_loop():
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  trs = jax.vmap(lambda k: P.synthetic_trace(k, n_vms=N, horizon=SPEC.horizon, max_life=L))(keys)
  cl = P.make_cluster(4)
  f = jax.jit(jax.vmap(lambda tr, k: P.simulate(tr, cl, P.power_of_two, spec=SPEC, key=k)))
  batch = f(trs, keys)
  for b in range(3):
    tr = jax.tree_util.tree_map(lambda x: x[b], trs)
    one = P.simulate(tr, cl, P.power_of_two, spec=SPEC, key=keys[b])
    np.testing.assert_array_equal(np.asarray(batch.actions[b]), np.asarray(one.actions))
    np.testing.assert_allclose(float(batch.objective[b]), float(one.objective), rtol=1e-6)


def test_synthetic_trace_properties():
  tr = _trace(0)
  tr2 = _trace(0)
  np.testing.assert_array_equal(np.asarray(tr.usage), np.asarray(tr2.usage))  # seeded
  assert np.all(np.diff(np.asarray(tr.arrival)) >= 0)
  assert np.all(np.asarray(tr.usage) <= np.asarray(tr.size)[:, None, :])
  ages = np.arange(L)[None, :, None]
  assert np.all(np.asarray(tr.usage)[ages.repeat(N, 0).repeat(2, 2) >= np.asarray(tr.lifetime)[:, None, None]] == 0)
  assert not np.array_equal(np.asarray(_trace(1).usage), np.asarray(tr.usage))


# ------------------------------------------------------------------ hindsight
def test_hindsight_scores_against_numpy():
  rng = np.random.default_rng(1)
  fut = rng.uniform(0, 0.5, (3, 5, 2)).astype(np.float32)
  vm = rng.uniform(0, 0.2, (5, 2)).astype(np.float32)
  cap = np.array([[1.0, 1.0], [0.5, 1.0], [1.0, 2.0]], np.float32)
  got = np.asarray(P.hindsight_scores(jnp.asarray(fut), jnp.asarray(vm), jnp.asarray(cap), 4))
  for m in range(3):
    u = fut.copy()
    u[m] += vm
    util = u[:, :4] / cap[:, None]
    np.testing.assert_allclose(got[m], (util.max(0) / util.mean(0)).sum(), rtol=1e-5)


def test_offline_optimum_bounds_every_policy():
  # 7 real VMs padded to the shared trace shape (padding rows are skipped by both), 3 machines
  full = _trace(2)
  tr = full._replace(valid=jnp.arange(N) < 7)
  cl = P.make_cluster(3)
  opt, assign = H.offline_optimum(tr, cl, spec=SPEC)
  assert np.all(assign[7:] == -1)
  objs = []
  for name in NAMES:
    r = _run(tr, cl, name, net=_net())
    assert int(r.rejected) == 0 and np.all(np.asarray(r.actions)[7:] == -1)
    objs.append(float(r.objective))
    assert opt <= float(r.objective) + 1e-6, name
  # the optimum's own assignment scores as reported
  u = np.zeros((3, SPEC.horizon + L, 2), np.float32)
  for i in range(7):
    a = int(tr.arrival[i])
    u[assign[i], a:a + L] += np.asarray(tr.usage[i])
  np.testing.assert_allclose(float(P.par_objective(u[:, :SPEC.horizon], cl.capacity)), opt, rtol=1e-6)
  assert opt < max(objs)  # the bound is informative on this instance


def test_placement_net_is_permutation_equivariant():
  feats = jax.random.normal(jax.random.PRNGKey(0), (5, 34))
  params = H.PlacementNet().init(jax.random.PRNGKey(1), feats)
  perm = np.array([3, 0, 4, 1, 2])
  out = H.PlacementNet().apply(params, feats)
  np.testing.assert_allclose(H.PlacementNet().apply(params, feats[perm]), out[perm], rtol=1e-5, atol=1e-6)


def test_imitation_loss_learns_the_hindsight_label():
  import optax
  h = jnp.array([[3.0, 1.0, 2.0, 0.5]])       # machine 3 is best but infeasible; 1 is the label
  fe = jnp.array([[True, True, True, False]])
  feats = jax.random.normal(jax.random.PRNGKey(3), (1, 4, F))
  params = jax.tree_util.tree_map(jnp.zeros_like, _net(4))
  # equal logits: cross-entropy of the soft target against uniform over the 3 feasible machines
  np.testing.assert_allclose(H.imitation_loss(params, feats, h, fe), np.log(3.0), rtol=1e-5)
  params = _net(4)
  opt = optax.adam(3e-2)
  st = opt.init(params)
  step = jax.jit(lambda p, s: (lambda l, g: (l,) + opt.update(g, s, p))(
      *jax.value_and_grad(H.imitation_loss)(p, feats, h, fe)))
  l0 = None
  for _ in range(30):
    loss, upd, st = step(params, st)
    params = optax.apply_updates(params, upd)
    l0 = loss if l0 is None else l0
  logits = H.PlacementNet().apply(params, feats[0])
  assert int(jnp.argmax(jnp.where(fe[0], logits, -jnp.inf))) == 1
  assert float(loss) < 0.5 * float(l0)


def test_step_rewards_sum_to_objective():
  from mlsys_jax.sched.placement import ppo
  tr = _trace(6)
  cl = P.make_cluster(3)
  r = _run(tr, cl, "least_loaded", net=_net())
  rw = ppo.step_rewards(r.usage, cl.capacity, tr.arrival, tr.valid)
  ex = np.asarray(P.par_per_step(r.usage, cl.capacity)).mean(-1) - 1
  np.testing.assert_allclose(float(rw.sum()), -ex[int(tr.arrival[0]):].sum() / SPEC.horizon, rtol=1e-5)


# ------------------------------------------------------------------ CSV and bad input
def test_csv_round_trip(tmp_path):
  p = tmp_path / "t.csv"
  p.write_text("vm_id,time,cpu,mem,size_cpu,size_mem,type\n"
               "a,0,0.5,0.25,0.5,0.5,1\na,2,0.25,0.25,0.5,0.5,1\nb,1,0.125,0.0,0.25,0.25,0\n")
  tr = P.load_csv_trace(str(p), n_pad=3)
  assert tr.arrival.tolist() == [0, 1, 1] and tr.lifetime.tolist()[:2] == [3, 1]
  assert tr.valid.tolist() == [True, True, False] and tr.vm_type.tolist()[:2] == [1, 0]
  np.testing.assert_allclose(np.asarray(tr.usage[0]), [[0.5, 0.25], [0, 0], [0.25, 0.25]])
  r = P.simulate(tr, P.make_cluster(2), P.round_robin, spec=P.Spec(horizon=4))
  assert r.actions.tolist() == [0, 1, -1] and int(r.rejected) == 0
  p.write_text("vm_id,time,cpu,mem,size_cpu,size_mem,type\na,3,0.1,0.1,1,1,0\nb,1,0.1,0.1,1,1,0\n")
  with pytest.raises(ValueError, match="arrival order"):
    P.load_csv_trace(str(p))
  p.write_text("vm_id,time,cpu,mem,size_cpu,size_mem,type\na,0,-0.1,0.1,1,1,0\n")
  with pytest.raises(ValueError, match="negative usage"):
    P.load_csv_trace(str(p))


def test_bad_input_errors():
  with pytest.raises(ValueError, match="at least one machine"):
    P.make_cluster(0)
  with pytest.raises(ValueError, match="zero machines"):
    P.simulate(_trace(0), P.Cluster(jnp.zeros((0, 2))), P.first_fit, spec=SPEC)
  with pytest.raises(ValueError, match="sorted"):
    P.make_trace([2, 1], np.zeros((2, 2, 1)), np.ones((2, 1)))
  with pytest.raises(ValueError, match="non-negative"):
    P.make_trace([0, 1], -np.ones((2, 2, 1)), np.ones((2, 1)))
  big = P.make_trace([0, 1], np.full((2, 2, 2), 0.5), np.array([[0.5, 0.5], [2.0, 0.5]]))
  with pytest.raises(ValueError, match="larger than every machine"):
    P.simulate(big, P.make_cluster(2), P.first_fit, spec=P.Spec(horizon=4))
  tr = _trace(0)
  unsorted = tr._replace(arrival=tr.arrival[::-1])
  with pytest.raises(ValueError, match="sorted"):
    P.simulate(unsorted, P.make_cluster(2), P.first_fit, spec=SPEC)
  with pytest.raises(ValueError, match="uses more than its declared size"):
    P.simulate(tr._replace(size=tr.size * 0.1), P.make_cluster(2), P.first_fit, spec=SPEC)
  with pytest.raises(ValueError, match="horizon"):
    P.simulate(tr, P.make_cluster(2), P.first_fit, spec=P.Spec(horizon=4))
  with pytest.raises(ValueError, match="workload"):
    P.synthetic_trace(jax.random.PRNGKey(0), workload="smooth")
  with pytest.raises(ValueError, match="brute force"):
    H.offline_optimum(_trace(0), P.make_cluster(3), spec=SPEC)
  with pytest.raises(TypeError, match="policy must be a function.*simulate_numpy"):   # a name, not a function
    P.simulate(_trace(0), P.make_cluster(2), "least_loaded", spec=SPEC)


# ------------------------------------------------------------------ review fixes (capacity, validation)
def _two_big_vms(arrival=(0, 0), lifetime=None):
  usage = np.full((2, 4, 1), 0.8, np.float32)
  return P.make_trace(np.array(arrival), usage, np.full((2, 1), 0.8, np.float32), lifetime=lifetime)


def test_nonfinite_scores_never_place_on_an_infeasible_machine():
  # VM0 (finite scores) goes to machine 0; VM1 gets -inf everywhere: machine 0 is full, so it must go
  # to machine 1, never on top of VM0 (capacity 1, sizes 0.8).
  pol = lambda p, obs, k: jnp.where(obs.index == 0, -jnp.arange(2.0), -jnp.inf)
  cl = P.make_cluster(2, (1.0,))
  r = P.simulate(_two_big_vms(), cl, pol, spec=P.Spec(horizon=8))
  assert r.actions.tolist() == [0, 1]
  assert int(r.rejected) == 0 and int(r.nonfinite) == 1
  assert float(r.usage.max()) <= 1.0
  # a NaN on a feasible machine still wins (documented rule) and is counted; NaN on an infeasible one
  # is ignored (the only feasible machine is chosen).
  nan0 = lambda p, obs, k: jnp.array([jnp.nan, 0.0])
  r = P.simulate(_two_big_vms(), cl, nan0, spec=P.Spec(horizon=8))
  assert r.actions.tolist() == [0, 1] and int(r.nonfinite) == 1
  assert float(r.usage.max()) <= 1.0
  # no feasible machine at all (one machine): rejected, whatever the scores
  r = P.simulate(_two_big_vms(), P.make_cluster(1, (1.0,)), lambda p, o, k: jnp.full((1,), -jnp.inf),
                 spec=P.Spec(horizon=8))
  assert r.actions.tolist() == [0, -1] and int(r.rejected) == 1
  assert float(r.usage.max()) <= 1.0


def test_usage_after_lifetime_is_rejected_or_masked():
  # usage rows run 4 steps but the declared lifetimes are 1 step (reviewer's repro)
  bad = _two_big_vms(arrival=(0, 1), lifetime=np.array([1, 1]))
  cl = P.make_cluster(1, (1.0,))
  with pytest.raises(ValueError, match="VM 0 uses resources after its lifetime"):
    P.validate_trace(bad, cl, 8)
  with pytest.raises(ValueError, match="after its lifetime"):
    P.simulate(bad, cl, P.first_fit, spec=P.Spec(horizon=8))
  with pytest.raises(ValueError, match="after its lifetime"):
    P.simulate_numpy(bad, cl, "first_fit", spec=P.Spec(horizon=8))
  # under vmap validation is skipped: the simulator masks usage after the lifetime instead
  batch = jax.tree_util.tree_map(lambda x: x[None], bad)
  r = jax.vmap(lambda t: P.simulate(t, cl, P.first_fit, spec=P.Spec(horizon=8)))(batch)
  assert r.actions[0].tolist() == [0, 0]
  np.testing.assert_allclose(np.asarray(r.usage[0, 0, :4, 0]), [0.8, 0.8, 0.0, 0.0])
  ref = P.simulate_numpy(bad, cl, "first_fit", spec=P.Spec(horizon=8), check=False)
  np.testing.assert_array_equal(np.asarray(r.usage[0]), ref.usage)


def test_train_ppo_validates_its_traces():
  from mlsys_jax.sched.placement import ppo
  trs = jax.tree_util.tree_map(lambda *x: jnp.stack(x), _trace(0), _trace(1))
  unsorted = trs._replace(arrival=trs.arrival.at[1].set(trs.arrival[1, ::-1]))
  with pytest.raises(ValueError, match="sorted"):
    ppo.train_ppo(unsorted, P.make_cluster(3), spec=SPEC, key=jax.random.PRNGKey(0), iterations=1)
  with pytest.raises(ValueError, match="horizon"):
    ppo.train_ppo(trs, P.make_cluster(3), spec=P.Spec(4), key=jax.random.PRNGKey(0), iterations=1)
