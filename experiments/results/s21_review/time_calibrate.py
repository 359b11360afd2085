"""Time sched.calibrate's per-evaluation model (_Terms.predict, which calls roofline_time on numpy arrays
once or twice per Nelder-Mead step) and roofline_time's numpy path, with the mlsys_jax on sys.path.
Usage: PYTHONPATH=<checkout> python3 time_calibrate.py --label base --out base.json"""
import argparse, json, statistics, sys, timeit
import jax, numpy as np
import mlsys_jax
from mlsys_jax import sched
from mlsys_jax.sched import emit, calibrate as C
from mlsys_jax.sched.api import sequential_schedule
from mlsys_jax.sched.dp import ios_dp
from mlsys_jax.sched.cost import roofline_time
from mlsys_jax.models.ios_nets import ios_benchmark_nets, ios_init_params

ap = argparse.ArgumentParser(); ap.add_argument("--label"); ap.add_argument("--out"); ap.add_argument("--repeats", type=int, default=7)
a = ap.parse_args()
progs = []
for net in ("inception_v3", "squeezenet", "randwire"):
  model, shape = ios_benchmark_nets(small=True)[net]
  params = ios_init_params(model, shape, seed=0)
  g = sched.build_graph(lambda v: model.apply(params, v), jax.random.normal(jax.random.PRNGKey(1), shape))
  cost = sched.AnalyticalCost(); succ = {u.idx: u.succs for u in g.units}
  for strat in ("both", "merge"):
    st = []
    for part in g.blocks:
      st += ios_dp(part, succ, lambda s: cost(g, s), strategy=strat, merge_key=lambda u: emit.merge_key(g, u))[0]
    progs.append((g, st))
  progs.append((g, sequential_schedule(g)))
terms = C._Terms(progs)
th = {"peak_flops": 400e12, "bandwidth": 3e12, "launch_s": 2e-6, "sat_flops": 2e9, "merge_launch_s": 2e-6,
      "serial_fraction": 0.1, "call_s": 1e-5}
f = np.abs(np.random.default_rng(0).normal(size=2000)) * 1e6; b = f * 3
res = {"label": a.label, "mlsys_jax": mlsys_jax.__file__, "argv": sys.argv, "programs": len(progs),
       "merge_terms": int(terms.m_f.size), "unit_terms": int(terms.u_f.size), "micro_us_per_call": {}}
for name, fn, n in (("terms_predict", lambda: terms.predict(th), 300),
                    ("roofline_time_numpy_2000", lambda: roofline_time(f, b, 400e12, 3e12, 2e9), 3000)):
  rs = [t / n * 1e6 for t in timeit.repeat(fn, number=n, repeat=a.repeats)]
  res["micro_us_per_call"][name] = {"runs": rs, "median": statistics.median(rs), "calls_per_run": n}
  print(name, statistics.median(rs), flush=True)
json.dump(res, open(a.out, "w"), indent=1)
