"""Tests of mlsys_jax.cost.value (Value Learning on IOS schedules). CPU, analytical stage costs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import sched
from mlsys_jax.cost import value as V
from mlsys_jax.sched.api import _check_cover

COST = sched.AnalyticalCost()


@pytest.fixture(scope="module")
def trained():
  graphs = [sched.build_graph(*V.random_conv_net(i)) for i in range(3)]
  model, stats = V.train_value_model(graphs, COST, rounds=1, rollouts=12, steps=250, hidden=32)
  return graphs, model, stats


def _seq_cost(g):
  return V.schedule_cost(g, [sched.Stage("parallel", ((u,),)) for u in range(len(g.units))], COST)


def test_decision_process_reaches_the_dp_schedule_and_random_schedules_are_valid():
  g = sched.build_graph(*V.random_conv_net(5, blocks=2))
  stages, dp_cost, n = V.dp_schedule(g, COST)
  info = V.graph_info(g)
  _, final = V.rollout(info, V.demo_policy(g, stages), 3, 8)
  _check_cover(g, V.to_stages(final))
  assert math.isclose(V.schedule_cost(g, V.to_stages(final), COST), dp_cost, rel_tol=1e-9)
  rng = np.random.default_rng(0)
  for _ in range(20):
    _, fin = V.rollout(info, V.random_policy(rng, 0.3), 3, 8)
    sts = V.to_stages(fin)
    _check_cover(g, sts)
    assert all(len(grp) <= 3 for st in sts for grp in st.groups)
    # The DP is optimal over its space; random schedules of the same process are not better by much
    # more than what the DP's chain pruning leaves out.
    assert V.schedule_cost(g, sts, COST) >= 0.8 * dp_cost


def test_targets_are_best_completions():
  g = sched.build_graph(*V.random_conv_net(1))
  info = V.graph_info(g)
  data, best = V.collect_states([info], COST, 6, seed=3)
  # The empty state's target is the best of all rollouts; every target is >= it and finite.
  t0 = math.log(best[0][V.initial_state(g).where])
  assert np.all(np.isfinite(data.target)) and np.all(data.target >= t0 - 1e-12)
  assert math.isclose(t0, float(data.target.min()), rel_tol=0, abs_tol=1e-12)
  assert all(f.shape == (len(g.units), V.NUM_FEATURES) for f in data.feats)


def test_greedy_valid_and_close_to_dp(trained):
  graphs, model, stats = trained
  assert stats["losses"][0][-1] < stats["losses"][0][0]
  ratios, hybrid = [], []
  for g in graphs:
    res = V.greedy_schedule(model, g)
    _check_cover(g, res.stages)
    assert res.evaluated == 0 and res.confident and res.ood == []
    _, dp_cost, _ = V.dp_schedule(g, COST)
    got = V.schedule_cost(g, res.stages, COST)
    assert got < 0.9 * _seq_cost(g)  # far better than running the operators one by one
    ratios.append(got / dp_cost)
    hy = V.hybrid_schedule(model, g, COST, k=4)
    _check_cover(g, hy.stages)
    assert hy.cost_s <= got * (1 + 1e-12) and hy.evaluated > 0 and not hy.fallback
    hybrid.append(hy.cost_s / dp_cost)
  # No stage-cost calls: within a few % of the DP that calls the cost model for every stage.
  assert np.mean(ratios) <= 1.05 and max(ratios) <= 1.10, ratios
  assert max(hybrid) <= 1.05, hybrid


def test_out_of_distribution_is_flagged_and_hybrid_falls_back(trained):
  _, model, _ = trained
  # A matmul + tanh program: kinds never seen in conv-net training.
  g = sched.build_graph(lambda x: jnp.tanh(x @ jnp.ones((4, 4))) @ jnp.ones((4, 4)), jnp.ones((2, 4)))
  res = V.greedy_schedule(model, g)
  _check_cover(g, res.stages)
  assert not res.confident and any("unseen" in why for _, why in res.ood)
  hy = V.hybrid_schedule(model, g, COST)
  assert hy.fallback and math.isclose(hy.cost_s, V.dp_schedule(g, COST)[1])
  # A conv net far larger than any training one: in-vocabulary kinds, sizes outside the range.
  big = sched.build_graph(*V.random_conv_net(0, hw=96, cin=64))
  assert any("outside" in why for _, why in V.greedy_schedule(model, big).ood)


def test_bad_input():
  with pytest.raises(ValueError):
    V.fit_value_model(V.StateData([], [], np.zeros(0), []))
  g = sched.build_graph(*V.random_conv_net(0))
  with pytest.raises(ValueError):
    V.apply_action(V.initial_state(g), 0, ("teleport", 0, 0), 0)
  with pytest.raises(TypeError):
    V.collect_states([V.graph_info(g)], COST, 2.5)


def test_random_conv_net_average_pooling():
  kinds = lambda **kw: {u.kind for i in range(6)
                        for u in sched.build_graph(*V.random_conv_net(100 + i, **kw)).units}
  assert "reduce_window_sum" not in kinds() and "reduce_window_max" in kinds()
  assert "reduce_window_sum" in kinds(avg_pool=True)
  fn, x = V.random_conv_net(100, avg_pool=True)
  assert bool(jnp.all(jnp.isfinite(fn(x))))
