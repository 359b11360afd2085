"""IOS with learned stage costs (Value Learning, Steiner et al., MLSys 2021, on IOS, Ding et al.):
``ios_dp(rank=, top_k=)``, ``ios_schedule(predictor=, top_k=)`` and ``cost.value_ios``. CPU; the
analytical model stands in for the profiler, plus one run with real CPU timing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import sched
from mlsys_jax.cost import value as V
from mlsys_jax.cost import value_ios as VI
from mlsys_jax.sched.api import _check_cover

COST = sched.AnalyticalCost()


class Counting:
  """A stage cost that counts the distinct stages it is asked for (the profiler's work)."""

  def __init__(self, base):
    self.base, self.asked = base, set()

  def __call__(self, g, st):
    self.asked.add(st)
    return self.base(g, st)


def _total(s):
  return sum(COST(s.graph, st) for st in s.stages)


@pytest.fixture(scope="module")
def predictor():
  train = [sched.build_graph(*V.random_conv_net(i, blocks=1 + i % 2)) for i in range(3)]
  ex = VI.stage_examples(train, COST, r=3, s=8, max_per_graph=300)
  p, stats = VI.fit_stage_model(ex, hidden=32, steps=150)
  return p, stats


# ------------------------------------------------------------------------------------------------ ios_dp

def _random_dag(rng, n):
  succ = {u: set() for u in range(n)}
  for v in range(1, n):
    for u in rng.choice(v, size=min(v, int(rng.integers(1, 3))), replace=False):
      succ[int(u)].add(v)
  return succ


def test_hybrid_dp_with_exact_ranks_is_optimal_and_asks_for_fewer_stages():
  rng = np.random.default_rng(0)
  for trial in range(4):
    n = 9
    succ = _random_dag(rng, n)
    w = rng.uniform(1, 5, n)
    cost = lambda st: float(max(sum(w[u] for u in grp) for grp in st.groups) + 0.5 * len(st.groups))
    asked_full, asked_hy = set(), set()
    _, full = sched.ios_dp(list(range(n)), succ, lambda st: asked_full.add(st) or cost(st),
                           merge_key=lambda u: None)
    # rank == the true cost: the predicted DP's best ending at each state is the optimal one
    st_hy, hy = sched.ios_dp(list(range(n)), succ, lambda st: asked_hy.add(st) or cost(st),
                             merge_key=lambda u: None, rank=cost, top_k=1)
    assert math.isclose(hy, full, rel_tol=1e-12)
    assert math.isclose(sum(cost(s) for s in st_hy), hy, rel_tol=1e-12)
    assert len(asked_hy) < len(asked_full)
    # a noisy rank: k = every candidate recovers the DP; k = 1 is valid, never below the optimum
    noisy = lambda st: cost(st) * float(np.exp(np.random.default_rng(hash(st) % 2**32).normal(0, 0.5)))
    _, all_k = sched.ios_dp(list(range(n)), succ, cost, merge_key=lambda u: None, rank=noisy, top_k=10**6)
    assert math.isclose(all_k, full, rel_tol=1e-12)
    st1, one = sched.ios_dp(list(range(n)), succ, cost, merge_key=lambda u: None, rank=noisy, top_k=1)
    assert one >= full - 1e-12 and sorted(u for s in st1 for u in s.units) == list(range(n))


def test_hybrid_dp_tries_more_candidates_when_the_top_k_cost_inf():
  succ = {0: set(), 1: set()}
  # the profiler rejects every two-unit stage; the rank prefers them
  cost = lambda st: math.inf if len(st.units) > 1 else 1.0
  rank = lambda st: 0.1 if len(st.units) > 1 else 1.0
  stages, tot = sched.ios_dp([0, 1], succ, cost, merge_key=lambda u: None, rank=rank, top_k=1)
  assert tot == 2.0 and [s.units for s in stages] in ([(0,), (1,)], [(1,), (0,)])


def test_bad_arguments():
  succ = {0: set()}
  with pytest.raises(ValueError, match="rank"):
    sched.ios_dp([0], succ, lambda st: 1.0, top_k=2)
  with pytest.raises(ValueError, match="top_k"):
    sched.ios_dp([0], succ, lambda st: 1.0, rank=lambda st: 1.0, top_k=-1)
  f, x = lambda x: jnp.tanh(x), jnp.ones((2, 2))
  with pytest.raises(ValueError, match="predictor"):
    sched.ios_schedule(f, x, top_k=3, check="off")
  with pytest.raises(ValueError, match="top_k"):
    sched.ios_schedule(f, x, predictor=COST, top_k=-1, check="off")
  with pytest.raises(TypeError, match="callable"):
    sched.ios_schedule(f, x, predictor="model", check="off")
  with pytest.raises(ValueError, match="at least one"):
    VI.fit_stage_model([])
  g = sched.build_graph(f, x)
  with pytest.raises(ValueError, match="finite positive"):
    VI.fit_stage_model([(g, sched.Stage("parallel", ((0,),)), -1.0)])


# ------------------------------------------------------------------------------------------------ model

def test_stage_predictor_accuracy_and_cache(predictor):
  p, stats = predictor
  assert stats["losses"][-1] < stats["losses"][0]
  g = sched.build_graph(*V.random_conv_net(11, blocks=2))        # held out
  stages = VI.candidate_stages(g, 3, 8)
  calls0 = p.calls
  assert p.prefetch(g, stages) == len(set(stages)) and p.calls - calls0 == len(set(stages))
  pred = np.asarray([p(g, st) for st in stages])
  assert p.calls - calls0 == len(set(stages))                     # served from the cache
  true = np.asarray([COST(g, st) for st in stages])
  mape = float(np.mean(np.abs(pred - true) / true))
  # the analytical costs span ~6x; the learned model is within 25% on average on an unseen net (~5% here)
  assert true.max() / true.min() > 3 and mape < 0.25, mape
  # and ranks the candidates: Kendall-like concordance on random pairs
  rng = np.random.default_rng(0)
  i, j = rng.integers(0, len(stages), (2, 2000))
  keep = np.abs(np.log(true[i] / true[j])) > 0.1
  conc = np.mean(np.sign(pred[i] - pred[j])[keep] == np.sign(true[i] - true[j])[keep])
  assert conc > 0.85, conc
  # base=: the model as a correction factor of another stage cost
  corr = VI.StagePredictor(p.model, base=COST)
  assert np.allclose(corr.log_predict(g, stages[:20]) - p.log_predict(g, stages[:20]),
                     np.log([COST(g, st) for st in stages[:20]]))


def test_predicted_and_hybrid_ios_schedule(predictor):
  p, _ = predictor
  fn, x = V.random_conv_net(7, blocks=2)
  prof = Counting(COST)
  full = sched.ios_schedule(fn, x, profiler=prof, check="off")
  n_full = len(prof.asked)
  assert full.info["profiled_stages"] == n_full and "predictor" not in full.info
  prof = Counting(COST)
  pred = sched.ios_schedule(fn, x, profiler=prof, predictor=p, check="off")
  assert len(prof.asked) == 0 and pred.info["profiled_stages"] == 0     # no stage profiled
  assert pred.info["predictor"]["n_ood"] == 0 and pred.info["predictor"]["profiled_parts"] == 0
  _check_cover(pred.graph, pred.stages)
  assert np.allclose(pred(x), fn(x), atol=1e-5)
  # stage_latency holds the model's predictions of the chosen stages
  assert np.allclose(pred.stage_latency, [p(pred.graph, st) for st in pred.stages])
  prof = Counting(COST)
  hy = sched.ios_schedule(fn, x, profiler=prof, predictor=p, top_k=3, check="off")
  assert 0 < len(prof.asked) < n_full / 10 and hy.info["profiled_stages"] == len(prof.asked)
  assert np.allclose(hy.stage_latency, [COST(hy.graph, st) for st in hy.stages])
  # schedule quality under the "profiler" (the analytical model here)
  assert _total(pred) <= 1.05 * _total(full) and _total(hy) <= 1.03 * _total(full)
  assert _total(full) <= _total(hy) * (1 + 1e-12)
  seq = sum(COST(full.graph, st) for st in sched.sequential_schedule(full.graph))
  assert _total(hy) < 0.9 * seq


def test_out_of_distribution_parts_are_profiled(predictor):
  p, _ = predictor

  def f(x):   # matmuls, tanh and a sort: kinds never seen by a conv-trained model
    h = jnp.tanh(x @ jnp.ones((8, 8)))
    return jnp.sort(h @ jnp.ones((8, 8)), axis=-1) + h

  x = jnp.ones((4, 8))
  g = sched.build_graph(f, x)
  ood = p.ood(g)
  assert ood and any("unseen" in why for _, why in ood)
  prof = Counting(COST)
  s = sched.ios_schedule(f, x, profiler=prof, predictor=p, top_k=0, check="off")
  info = s.info["predictor"]
  assert info["n_ood"] == len(ood) and info["profiled_parts"] == info["parts"] >= 1
  ref = sched.ios_schedule(f, x, profiler=COST, check="off")
  assert len(prof.asked) == ref.info["profiled_stages"] > 0            # fell back to profiling
  assert s.stages == ref.stages and np.allclose(s(x), f(x), atol=1e-5)
  # in-vocabulary kinds far outside the training sizes are flagged too
  big = sched.build_graph(*V.random_conv_net(0, hw=96, cin=64))
  assert any("outside" in why for _, why in p.ood(big))


def _small_inception(c=8, hw=6):
  """Three conv branches on one input, concatenated; every unit reads a (1, hw, hw, c) tensor (the
  profiler draws random inputs per shape: one shape keeps the test fast)."""
  rng = np.random.default_rng(0)
  w = lambda k: jnp.asarray(rng.normal(size=(k, k, c, c)).astype(np.float32) / (k * c ** 0.5))
  b = jnp.asarray(rng.normal(size=(c,)).astype(np.float32) * 0.01)
  conv = lambda x, k: jax.nn.relu(jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)
  k1, k3, k1b, k3b = w(1), w(3), w(1), w(3)
  fn = lambda x: jnp.concatenate([conv(x, k1), conv(x, k3), conv(conv(x, k1b), k3b)], -1)
  return fn, jnp.ones((1, hw, hw, c), jnp.float32)


def test_hybrid_with_real_cpu_timing(predictor):
  """The hybrid with the real stage profiler (differential timing on this CPU): only a few stages
  timed, the emitted program computes the function."""
  p, _ = predictor
  fn, x = _small_inception()
  prof = sched.StageProfiler(mode="plain", k=2, number=2, repeat=2, warmup=1)
  s = sched.ios_schedule(fn, x, profiler=prof, predictor=p, top_k=1, prefetch=False, check="off")
  n_all = len(VI.candidate_stages(s.graph, 3, 8))
  assert s.info["predictor"]["n_ood"] == 0 and s.info["predictor"]["profiled_parts"] == 0
  # stages timed on the CPU (a concurrent stage is timed group by group: parallel='sum')
  assert 0 < s.info["profiled_stages"] < n_all / 2 and prof.misses > 0
  assert all(lat > 0 and math.isfinite(lat) for lat in s.stage_latency)
  _check_cover(s.graph, s.stages)
  assert np.allclose(s(x), fn(x), atol=1e-5)


def test_stage_costs_from_a_profiler_cache():
  fn, x = V.random_conv_net(2, blocks=1, hw=5, cin=4)
  g = sched.build_graph(fn, x)
  prof = sched.StageProfiler(mode="plain", k=2, number=1, repeat=1, warmup=0)
  stages = [sched.Stage("parallel", ((u,),)) for u in range(3)]
  want = {st: prof(g, st) for st in stages}
  got = VI.stage_costs_from_cache(prof.cache, g)
  assert got == want
  other = sched.build_graph(*V.random_conv_net(4, blocks=1, hw=5, cin=4))
  assert VI.stage_costs_from_cache(prof.cache, other) == {}
