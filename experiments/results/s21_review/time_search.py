"""Time the IOS DP search (AnalyticalCost) and the value-model greedy decoding / random rollouts with the
mlsys_jax found on sys.path (run once per checkout: base 1aef2d6 in a worktree vs HEAD).

Usage: PYTHONPATH=<checkout> python3 time_search.py --label base --out base.json
Each repeat: a fresh AnalyticalCost (its per-graph memo emptied) and a fresh DP over every part; graph
building and jit warm-up are outside the timed region. Reports per-repeat seconds and the median.
"""
import argparse, json, statistics, sys, time

import jax, numpy as np
import mlsys_jax
from mlsys_jax import sched
from mlsys_jax.sched import emit
from mlsys_jax.sched.dp import ios_dp
from mlsys_jax.models.ios_nets import ios_benchmark_nets, ios_init_params
from mlsys_jax.cost import value as V

ap = argparse.ArgumentParser()
ap.add_argument("--label", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--cases", default="inception_v3:merge,inception_v3:both,squeezenet:both,randwire:merge,nasnet:merge")
a = ap.parse_args()

res = {"label": a.label, "mlsys_jax": mlsys_jax.__file__, "argv": sys.argv, "dp": {}, "value": {}}
nets = ios_benchmark_nets(small=True)
graphs = {}
def graph(net):
  if net not in graphs:
    model, shape = nets[net]
    params = ios_init_params(model, shape, seed=0)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    graphs[net] = sched.build_graph(lambda v: model.apply(params, v), x)
  return graphs[net]

for case in a.cases.split(","):
  net, strategy = case.split(":")
  g = graph(net)
  succ = {u.idx: u.succs for u in g.units}
  mk = lambda u, g=g: emit.merge_key(g, u)
  ts, tot, calls = [], None, None
  for _ in range(a.repeats):
    cost = sched.AnalyticalCost()
    n = [0]
    def c(st):
      n[0] += 1
      return cost(g, st)
    t0 = time.perf_counter()
    total = 0.0
    for part in g.blocks:
      total += ios_dp(part, succ, c, strategy=strategy, merge_key=mk)[1]
    ts.append(time.perf_counter() - t0)
    tot, calls = total, n[0]
  res["dp"][case] = {"seconds": ts, "median_s": statistics.median(ts), "total_cost_s": tot, "cost_calls": calls,
                     "units": len(g.units)}
  print(case, res["dp"][case]["median_s"], calls, flush=True)

# value model: random (untrained) parameters of the right shapes, as in tests/test_public_api_core.py
for net in ("squeezenet", "inception_v3"):
  g = graph(net)
  info = V.graph_info(g)
  vocab = {k: i + 1 for i, k in enumerate(sorted(set(info.kinds)))}
  module = V.ValueLSTM(vocab=len(vocab), hidden=16, embed=4)
  x = np.zeros((1, 4, V.NUM_FEATURES), np.float32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.ones((1, 4), np.int32), x, np.asarray([4], np.int32))
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda s: jax.numpy.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)
  model = V.ValueModel(module, params, vocab, info.static.min(0), info.static.max(0), 3, 8)
  V.greedy_schedule(model, g)  # compile the buckets
  tg, tr = [], []
  for i in range(a.repeats):
    t0 = time.perf_counter(); vs = V.greedy_schedule(model, g); tg.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for k in range(10):
      V.rollout(info, V.random_policy(np.random.default_rng(k)), 3, 8)
    tr.append(time.perf_counter() - t0)
  res["value"][net] = {"greedy_s": tg, "greedy_median_s": statistics.median(tg), "greedy_stages": len(vs.stages),
                       "rollouts10_s": tr, "rollouts10_median_s": statistics.median(tr), "units": len(g.units)}
  print(net, res["value"][net]["greedy_median_s"], res["value"][net]["rollouts10_median_s"], flush=True)

# per-call micro-benchmarks of the functions that gained checks (median of repeats of N calls, us/call)
import timeit
from mlsys_jax.sched.cost import roofline_time, merge_flops_bytes
from mlsys_jax.sched.dp import Stage
from mlsys_jax.quant import fixed_point as fp
g = graph("inception_v3")
convs = [u.idx for u in g.units if u.kind == "conv_general_dilated"]
by_key = {}
for u in convs:
  by_key.setdefault(emit.merge_key(g, u), []).append(u)
grp = max(by_key.values(), key=len)[:3]
mst = Stage("merge", (tuple(grp),))
info = V.graph_info(g)
st0 = V.initial_state(g)
mkv = V._merge_keys(g)
part = V._part_of(g)
# a half-decided state for valid_actions
st = st0
pol = V.random_policy(np.random.default_rng(0))
for u in st0.order[: len(st0.order) // 2]:
  st = V.apply_action(st, u, pol(st, u, V.valid_actions(g, st, u, 3, 8, mkv)), part[u])
u_next = st.order[st.step]
xq = jax.numpy.asarray(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))
jax.block_until_ready(fp.quantize(xq, 8, axis=0).codes)
micro = {
  "roofline_time": (lambda: roofline_time(1e6, 1e3, 400e12, 3e12, 2e9), 20000),
  "merge_flops_bytes": (lambda: merge_flops_bytes(g, mst), 2000),
  "valid_actions_half_inception": (lambda: V.valid_actions(g, st, u_next, 3, 8, mkv), 2000),
  "quantize_eager_256x256_axis0": (lambda: jax.block_until_ready(fp.quantize(xq, 8, axis=0).codes), 200),
  "compute_scale_eager": (lambda: jax.block_until_ready(fp.compute_scale(jax.numpy.float32(-1.0), jax.numpy.float32(3.0), 8, False, True)), 500),
}
res["micro_us_per_call"] = {}
for name, (fn, n) in micro.items():
  rs = [t / n * 1e6 for t in timeit.repeat(fn, number=n, repeat=max(a.repeats, 5))]
  res["micro_us_per_call"][name] = {"runs": rs, "median": statistics.median(rs), "calls_per_run": n}
  print(name, statistics.median(rs), flush=True)

with open(a.out, "w") as fh:
  json.dump(res, fh, indent=1)
