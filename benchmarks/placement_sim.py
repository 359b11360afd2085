"""Placement decisions per second: the vmapped jax FirePlace simulator vs a straightforward numpy one.

Both simulate the same synthetic spiky traces (8 machines, 1024 VMs, 512 steps, 64-step lifetimes)
with the same deterministic policy (least-loaded-now and best-fit); placements are checked identical on
the traces numpy runs. jax: one jitted call = ``lax.scan`` over arrivals vmapped over B traces; numpy: a
Python loop per trace (timed on ``--numpy_traces`` traces, decisions/s is per decision).

  PYTHONPATH=. python benchmarks/placement_sim.py --out $OUT                # GPU: B = 1024, 4096, 16384
  PYTHONPATH=. python benchmarks/placement_sim.py --small                   # CPU smoke test
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, parse_args, print_table, write_json  # noqa: E402
from mlsys_jax.sched import placement as P  # noqa: E402


def _extra(ap):
  ap.add_argument("--batches", default=None, help="comma-separated trace batch sizes B")
  ap.add_argument("--numpy_traces", type=int, default=4, help="traces the numpy simulator runs")
  ap.add_argument("--repeats", type=int, default=5)


def main():
  args = parse_args(__doc__, _extra)
  env = environment()
  if args.small:
    n_vms, horizon, life, batches = 256, 128, 32, [16, 64]
  else:
    n_vms, horizon, life, batches = 1024, 512, 64, [1024, 4096, 16384]
  if args.batches:
    batches = [int(b) for b in args.batches.split(",")]
  spec = P.Spec(horizon=horizon, window=8)
  cl = P.make_cluster(8)
  gen = jax.jit(jax.vmap(lambda k: P.synthetic_trace(k, n_vms=n_vms, horizon=horizon, max_life=life)))
  rows = []
  for name in ("least_loaded", "best_fit"):
    pol = P.BASELINES[name]
    sim = jax.jit(jax.vmap(lambda tr: P.simulate(tr, cl, pol, spec=spec).actions))
    # numpy baseline and the equality check
    k = args.numpy_traces
    trs = gen(jax.random.split(jax.random.PRNGKey(0), k))
    jax_actions = np.asarray(sim(trs))
    host = [jax.tree_util.tree_map(lambda x: np.asarray(x[i]), trs) for i in range(k)]
    P.validate_trace(host[0], cl, horizon)
    t0 = time.perf_counter()
    np_actions = [P.simulate_numpy(h, cl, name, spec=spec, check=False).actions for h in host]
    t_np = time.perf_counter() - t0
    same = bool(np.array_equal(np.stack(np_actions), jax_actions))
    np_rate = k * n_vms / t_np
    for b in batches:
      trs = gen(jax.random.split(jax.random.PRNGKey(1), b))
      jax.block_until_ready(sim(trs))  # compile
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(sim(trs))
        times.append(time.perf_counter() - t0)
      t = float(np.median(times))
      rows.append({"policy": name, "traces": b, "decisions": b * n_vms, "jax_seconds": t,
                   "jax_decisions_per_s": b * n_vms / t, "numpy_traces": k, "numpy_seconds": t_np,
                   "numpy_decisions_per_s": np_rate, "speedup": b * n_vms / t / np_rate,
                   "same_placements": same, "times": times})
      print(f"{name} B={b}: jax {b * n_vms / t:.3e} decisions/s, numpy {np_rate:.3e}/s, "
            f"x{b * n_vms / t / np_rate:.1f}, same placements: {same}", flush=True)
  print(env)
  print_table([{k: (f"{v:.3e}" if isinstance(v, float) else v) for k, v in r.items() if k != "times"}
               for r in rows], ["policy", "traces", "jax_decisions_per_s", "numpy_decisions_per_s",
                                "speedup", "same_placements"])
  write_json(args.out, "placement_sim", {"env": env, "config": {"machines": 8, "n_vms": n_vms,
                                                                  "horizon": horizon, "max_life": life,
                                                                  "window": 8, "small": args.small},
                                         "rows": rows})


if __name__ == "__main__":
  main()
