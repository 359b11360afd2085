"""Tests of mlsys_jax.sched.bound (critical-path bounds of inter-operator schedules). CPU."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from mlsys_jax import sched
from mlsys_jax.models import ios_benchmark_nets, ios_init_params
from mlsys_jax.sched import emit
from mlsys_jax.sched import build_graph
from mlsys_jax.sched.bound import longest_paths, path_program


def _random_dag_fn(seed, n=9, width=4, sinks=1):
  """A function whose dots form a random DAG: node i reads the sum of 1-3 earlier nodes (or x); with
  ``sinks > 1`` the unused nodes are returned as separate outputs (several sinks)."""
  rng = np.random.default_rng(seed)
  ins = [sorted(rng.choice(i + 1, size=min(i + 1, rng.integers(1, 4)), replace=False)) for i in range(n)]
  ws = [jnp.asarray(rng.normal(size=(width, width)) / width, jnp.float32) for _ in range(n)]

  def f(x):
    vals = [x]
    for i in range(n):
      h = vals[ins[i][0]]
      for j in ins[i][1:]:
        h = h + vals[j]
      vals.append(jnp.tanh(h @ ws[i]))
    used = {j for js in ins for j in js}
    ends = [vals[i] for i in range(1, n + 1) if i not in used]
    if sinks > 1:
      return tuple(ends)
    return sum(ends) + 0.0
  return f, jnp.ones((2, width), jnp.float32)


def _all_paths(g):
  srcs = [u.idx for u in g.units if not u.preds]
  out = []

  def walk(path):
    succ = g.units[path[-1]].succs
    if not succ:
      out.append(tuple(path))
    for s in sorted(succ):
      walk(path + [s])
  for s in srcs:
    walk([s])
  return out


@pytest.mark.parametrize("seed,sinks", [(s, 1) for s in range(6)] + [(s, 2) for s in range(6, 10)])
def test_longest_paths_match_brute_force(seed, sinks):
  f, x = _random_dag_fn(seed, sinks=sinks)
  g = sched.build_graph(f, x)
  if sinks > 1:
    assert sum(1 for u in g.units if not u.succs) >= 2, "the case must have several sinks"
  lat = np.random.default_rng(100 + seed).uniform(0.5, 3.0, len(g.units))
  paths = _all_paths(g)
  length = {p: float(sum(lat[u] for u in p)) for p in paths}
  res = longest_paths(g, lat, k=len(g.units))
  assert res[0][0] == pytest.approx(max(length.values()), rel=1e-12)
  seen = set()
  for t, p in res:
    assert p in length, f"{p} is not a source-to-sink path"
    assert t == pytest.approx(length[p], rel=1e-12)
    assert set(p) - seen, "each path must visit a unit no earlier path visits"
    # the documented choice: the longest of all paths that visit a not-yet-visited unit
    assert t == pytest.approx(max(length[q] for q in paths if set(q) - seen), rel=1e-12)
    seen.update(p)
  assert [t for t, _ in res] == sorted((t for t, _ in res), reverse=True)
  assert seen == set(range(len(g.units)))  # with k >= units, every unit ends up on some path


def test_critical_path_bounds_every_schedule_of_the_analytical_model():
  model, shape = ios_benchmark_nets(small=True)["inception_v3"]
  params = ios_init_params(model, shape, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  cost = sched.AnalyticalCost()
  s = sched.ios_schedule(lambda x: model.apply(params, x), x, r=2, s=3, strategy="parallel",
                         profiler=cost)
  g = s.graph
  lat = [cost.unit_time(g, u) for u in range(len(g.units))]
  (cp, path), = longest_paths(g, lat)
  assert cp <= sum(lat) + 1e-15
  # a stage of independent units costs at least its longest group in the analytical model, so the
  # schedule's predicted latency cannot be below the critical path of unit times
  assert s.predicted_latency >= cp * (1 - 1e-9)
  assert len(path) < len(g.units)


@pytest.mark.parametrize("net", [pytest.param("inception_v3", marks=pytest.mark.slow),   # ~30 s eager units
                                 "randwire"])
def test_path_program_reproduces_the_full_function(net):
  model, shape = ios_benchmark_nets(small=True)[net]
  params = ios_init_params(model, shape, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  f = lambda x: model.apply(params, x)
  g = sched.build_graph(f, x)
  env = dict(zip(g.in_ids, [x]))
  for u in range(len(g.units)):
    emit.run_unit(g, u, env, g.consts)
  lat = np.random.default_rng(0).uniform(1.0, 2.0, len(g.units))
  for _, path in longest_paths(g, lat, k=3):
    fn, extra_ids = path_program(g, path)
    assert not set(extra_ids) & set(g.in_ids)
    produced = {o for u in path for ei in g.units[u].eqns for o in g.eqns[ei].outputs}
    assert not set(extra_ids) & produced, "values the chain computes must not be passed in"
    assert set(extra_ids) == {v for u in path for v in g.units[u].inputs} - produced - set(g.in_ids)
    extras = tuple(env[v] for v in extra_ids)
    got = jax.jit(fn)(g.consts, extras, x)
    want = [env[o] for o in g.units[path[-1]].outputs]
    for a, b in zip(got, want):  # jitted chain vs eager units: XLA may reassociate a little
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # the critical path ends at the output unit: the chain computes the network's output
  (_, path), = longest_paths(g, lat)
  fn, extra_ids = path_program(g, path)
  np.testing.assert_allclose(fn(g.consts, tuple(env[v] for v in extra_ids), x)[0], f(x),
                             rtol=1e-5, atol=1e-6)


def test_bound_bad_input_errors():
  f, x = _random_dag_fn(0)
  g = sched.build_graph(f, x)
  n = len(g.units)
  with pytest.raises(ValueError, match="one latency per unit"):
    longest_paths(g, [1.0] * (n - 1))
  with pytest.raises(ValueError, match="finite and >= 0"):
    longest_paths(g, [1.0] * (n - 1) + [float("nan")])
  with pytest.raises(ValueError, match="finite and >= 0"):
    longest_paths(g, [-1.0] + [1.0] * (n - 1))
  for bad_k in (0, None, True, 1.5):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
      longest_paths(g, [1.0] * n, k=bad_k)
  with pytest.raises(ValueError, match="out of range"):
    path_program(g, [0, n])
  with pytest.raises(ValueError, match="repeats"):
    path_program(g, [0, 0])
  with pytest.raises(ValueError, match="empty"):
    path_program(g, [])
  (_, path), = longest_paths(g, [1.0] * n)
  if len(path) > 1:
    with pytest.raises(ValueError, match="dependency order"):
      path_program(g, list(reversed(path)))
  fn, extra_ids = path_program(g, path)
  extras = tuple(jnp.zeros(g.avals[v].shape) for v in extra_ids)
  with pytest.raises(ValueError, match="extra values"):
    fn(g.consts, extras + (jnp.zeros(1),), x)
  with pytest.raises(ValueError, match="array leaves"):
    fn(g.consts, extras, x, x)


def test_path_program_refuses_a_last_unit_without_outputs():
  f, x = _random_dag_fn(1)
  g = sched.build_graph(f, x)
  sink = next(u.idx for u in g.units if not u.succs)
  saved = g.units[sink].outputs
  g.units[sink].outputs = []  # as for a unit whose value nothing reads
  try:
    with pytest.raises(ValueError, match="has no outputs"):
      path_program(g, [sink])
  finally:
    g.units[sink].outputs = saved


def test_stage_critical_path_between_longest_unit_path_and_sum():
  from mlsys_jax.sched.bound import stage_critical_path
  rng = np.random.default_rng(3)
  for seed in range(4):   # one unit per stage: the stage DAG is the unit DAG
    fn, x = _random_dag_fn(seed, sinks=1 + seed % 2)
    g = build_graph(fn, x)
    lat = [float(t) for t in rng.uniform(0.5, 2.0, len(g.units))]
    assert stage_critical_path(g, sched.sequential_schedule(g), lat) == pytest.approx(
        longest_paths(g, lat)[0][0])
  f = lambda x: jnp.tanh(x @ jnp.ones((4, 4))) @ jnp.ones((4, 2)) + x @ jnp.ones((4, 2))
  g = build_graph(f, jnp.ones((1, 4)))      # units: 0 -> 1 -> 3 and 2 -> 3
  lat = [float(t) for t in rng.uniform(0.5, 2.0, len(g.units))]
  assert stage_critical_path(g, [sched.Stage("parallel", ((0, 1, 2, 3),))], [7.0]) == 7.0
  # units 0 and 2 in one stage: the path waits for the slower of them, and never exceeds the sum
  st2 = [sched.Stage("parallel", ((0,), (2,))), sched.Stage("parallel", ((1,),)),
         sched.Stage("parallel", ((3,),))]
  t2 = [max(lat[0], lat[2]), lat[1], lat[3]]
  cp = stage_critical_path(g, st2, t2)
  assert cp == pytest.approx(max(lat[0], lat[2]) + lat[1] + lat[3])
  assert longest_paths(g, lat)[0][0] <= cp + 1e-12 <= sum(t2) + 2e-12


def test_stage_critical_path_bad_input():
  from mlsys_jax.sched.bound import stage_critical_path
  g = build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) + x @ jnp.ones((4, 4)), jnp.ones((1, 4)))
  seq = sched.sequential_schedule(g)
  with pytest.raises(ValueError, match="one per stage"):
    stage_critical_path(g, seq, [1.0])
  with pytest.raises(ValueError, match="finite"):
    stage_critical_path(g, seq, [1.0, float("nan"), 1.0])
  with pytest.raises(ValueError, match="no stage"):
    stage_critical_path(g, seq[:2], [1.0, 1.0])
  with pytest.raises(ValueError, match="dependency order"):
    stage_critical_path(g, seq[::-1], [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="once"):
    stage_critical_path(g, seq + seq[:1], [1.0] * 4)
