"""Demo rows of mlsys_jax.cost.value: Value Learning (Steiner et al., MLSys 2021) on IOS schedules.

An LSTM value model trained on three small random conv nets (analytical stage costs as targets)
schedules two held-out nets greedily, with no stage-cost call, and is compared with IOS's DP, which
costs every candidate stage. CPU, analytical costs (no GPU timing here)."""

import numpy as np

from mlsys_jax import sched
from mlsys_jax.cost import value as V

ORDER = 81
TECHNIQUE = "Value Learning"


def run(seed: int):
  cost = sched.AnalyticalCost()
  train = [sched.build_graph(*V.random_conv_net(10 * seed + i)) for i in range(3)]
  test = [sched.build_graph(*V.random_conv_net(10 * seed + 5 + i)) for i in range(2)]
  model, _ = V.train_value_model(train, cost, rounds=1, rollouts=12, steps=250, hidden=32, seed=seed)
  gr, hy, calls = [], [], []
  for g in test:
    _, dp_cost, dp_calls = V.dp_schedule(g, cost)
    res = V.greedy_schedule(model, g)
    gr.append(V.schedule_cost(g, res.stages, cost) / dp_cost)
    h = V.hybrid_schedule(model, g, cost, k=4)
    hy.append(h.cost_s / dp_cost)
    calls.append((h.evaluated, dp_calls, h.fallback))
  return [
      ("Value Learning", "held-out conv nets: greedy (0 stage-cost calls) latency / IOS DP latency, "
       "analytical model", ", ".join(f"{x:.3f}" for x in gr)),
      ("Value Learning", "top-4 hybrid latency / DP; stage-cost calls hybrid vs DP",
       ", ".join(f"{x:.3f}" for x in hy) + "; " + ", ".join(f"{a} vs {b}" + (" (OOD flagged: DP fallback)" if fb else "") for a, b, fb in calls)),
  ]
