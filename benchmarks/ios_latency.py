"""IOS (Ding et al., MLSys 2021) on the four benchmark CNNs at batch 1: latency of plain jax.jit, of the
best XLA configuration for the unscheduled function, of IOS-Merge and IOS-Both schedules (searched on
this GPU with the stage profiler), search time cold and warm, and the roofline floor.

  PYTHONPATH=. python3 benchmarks/ios_latency.py --nets inception_v3 --out $OUT     # GPU
  PYTHONPATH=. python3 benchmarks/ios_latency.py --small                           # CPU smoke test

All variants are timed interleaved in one loop (median of rounds; each round ``number`` back-to-back
calls, then block). Ratios are against the best XLA configuration measured in the same run.
Weights are arguments of the baselines (``jax.jit(model.apply)(params, x)``) and constants passed as
arguments of the IOS program, so neither embeds 20-80M parameters in the HLO.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets  # noqa: E402
from mlsys_jax.sched.cost import time_calls  # noqa: E402

try:
  from benchmarks.ios_xla_baselines import XLA_CONFIGS
except Exception:  # noqa: BLE001
  XLA_CONFIGS = {"jit": {}, "cmdbuf_conv_concurrent": dict(sched.CUDA_GRAPH_OPTIONS)}

# pruning per net (paper: r=3, s=8; RandWire/NasNet DPs are minutes of Python at r3s8, so the
# paper's cheaper r/s trade-off points are used there, see its run_expr_prune.sh)
RS = {"inception_v3": (3, 8), "squeezenet": (3, 8), "randwire": (2, 3), "nasnet": (1, 3)}
PART = {"nasnet": 25}  # IOS cuts NasNet into 25 parts at cell boundaries; here parts of <= 25 units
PEAK = {"float32": 400e12, "bfloat16": 790e12}  # tf32 / bf16 dense tensor-core rates (H100, measured bf16)
BW = 3.0e12  # measured device copy bandwidth on the H100 (bytes read + written)


def relerr(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_net(name, model, shape, dtype, args, cache_path, log):
  dn = jnp.dtype(dtype).name
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  params = jax.jit(model.init)(key, x)
  f_closed = lambda x: model.apply(params, x)
  row = {"net": name, "dtype": dn}
  fns = {}
  # ---- XLA baselines (unscheduled)
  configs = {k: v for k, v in XLA_CONFIGS.items() if k in args.configs.split(",")} or XLA_CONFIGS
  ref = None
  for cname, opts in configs.items():
    if jax.default_backend() != "gpu" and opts:
      continue
    t0 = time.perf_counter()
    try:
      c = jax.jit(model.apply, compiler_options=opts or None).lower(params, x).compile()
      y = c(params, x)
      jax.block_until_ready(y)
    except Exception as e:  # noqa: BLE001
      row[f"err_{cname}"] = str(e)[:200]
      continue
    row[f"compile_{cname}_s"] = round(time.perf_counter() - t0, 1)
    if ref is None:
      ref = y
    fns[cname] = (c, (params, x))
    log(f"{name} {dn}: compiled {cname} in {row[f'compile_{cname}_s']} s")
  # ---- IOS searches
  r, s = RS.get(name, (3, 8))
  if args.small:
    r, s = min(r, 2), min(s, 3)
  row["r"], row["s"] = r, s
  mode = "cuda_graph"
  on_gpu = jax.default_backend() == "gpu"
  schedules = {}
  for strat in args.strategies.split(","):
    prof = (sched.StageProfiler(mode=mode, cache_path=cache_path, s=s, parallel="sum")
            if on_gpu and not args.analytical else sched.AnalyticalCost())
    t0 = time.perf_counter()
    sc = sched.ios_schedule(f_closed, x, r=r, s=s, strategy=strat, profiler=prof, emission=mode,
                            part_size=PART.get(name, 50))
    row[f"search_{strat}_s"] = round(time.perf_counter() - t0, 1)
    row[f"profiled_{strat}"] = getattr(prof, "misses", 0)
    c = sc.counts()
    row[f"{strat}_stages"], row[f"{strat}_merges"] = c["stages"], c["merge_stages"]
    row[f"{strat}_pred_ms"] = round(sc.predicted_latency * 1e3, 4)
    schedules[strat] = sc
    log(f"{name} {dn}: IOS-{strat} search {row[f'search_{strat}_s']} s, {c}")
    if strat == "both" and on_gpu and not args.analytical and name in args.warm.split(","):
      prof2 = sched.StageProfiler(mode=mode, cache_path=cache_path, s=s, parallel="sum")
      t0 = time.perf_counter()
      sched.ios_schedule(f_closed, x, r=r, s=s, strategy=strat, profiler=prof2, emission=mode,
                         part_size=PART.get(name, 50))
      row["search_both_warm_s"] = round(time.perf_counter() - t0, 1)
  if on_gpu:  # the same schedules under the latency-hiding scheduler too (best XLA set for f32)
    for k in list(schedules):
      b = schedules[k]
      schedules[k + "_lhs"] = sched.Schedule(b.graph, b.stages, b.stage_latency, "cuda_graph_lhs",
                                             b.search_s, dict(b.info))
  if "both" in schedules and on_gpu and args.streams:
    b = schedules["both"]
    schedules["both_streams"] = sched.Schedule(b.graph, b.stages, b.stage_latency, "streams",
                                               b.search_s, dict(b.info))
  for k, sc in schedules.items():
    t0 = time.perf_counter()
    try:
      jitted, consts = sc._build()
      comp = jitted.lower(consts, x).compile()
      y = comp(consts, x)
      jax.block_until_ready(y)
    except Exception as e:  # noqa: BLE001
      row[f"err_ios_{k}"] = str(e)[:200]
      continue
    if k == "both_streams":
      txt = comp.as_text()
      row["streams_call_start"] = txt.count("call-start")
    row[f"compile_ios_{k}_s"] = round(time.perf_counter() - t0, 1)
    row[f"relerr_ios_{k}"] = relerr(y, ref)
    fns[f"ios_{k}"] = (comp, (consts, x))
    if k in ("merge", "both") and name in args.save_schedules.split(","):
      with open(os.path.join(args.out_dir, f"ios_schedule_{name}_{dn}_{k}.json"), "w") as fh:
        fh.write(sc.to_json())
  # ---- interleaved timing
  ts = {k: [] for k in fns}
  for k, (f, a) in fns.items():
    time_calls(f, a, 3, 1)
  for _ in range(args.repeat):
    for k, (f, a) in fns.items():
      ts[k] += time_calls(f, a, args.number, 1)
  med = {k: float(np.median(v)) for k, v in ts.items()}
  base_names = [k for k in fns if not k.startswith("ios_")]
  best = min(base_names, key=lambda k: med[k])
  row["best_xla"] = best
  for k, v in med.items():
    row[f"{k}_ms"] = round(v * 1e3, 4)
  for k in fns:
    if k.startswith("ios_"):
      row[f"{k}_vs_best_xla"] = round(med[best] / med[k], 3)
      row[f"{k}_vs_jit"] = round(med.get("jit", np.nan) / med[k], 3)
  row["best_xla_vs_jit"] = round(med.get("jit", np.nan) / med[best], 3)
  # ---- floor
  g = schedules[next(iter(schedules))].graph
  flops = sum(g.unit_flops_bytes(u)[0] for u in range(len(g.units)))
  pbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(params))
  io_bytes = x.size * x.dtype.itemsize + ref.size * ref.dtype.itemsize
  row["gflops"] = round(flops / 1e9, 2)
  row["floor_ms"] = round(max(flops / PEAK.get(dn, 400e12), (pbytes + io_bytes) / BW) * 1e3, 4)
  return row, schedules


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--nets", default="inception_v3,squeezenet,randwire,nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--strategies", default="merge,both")
  ap.add_argument("--configs", default="jit,cmdbuf_conv,cmdbuf_conv_concurrent,cmdbuf_conv_concurrent_lhs")
  ap.add_argument("--streams", action="store_true", help="also emit IOS-Both with stream annotations")
  ap.add_argument("--analytical", action="store_true", help="search with the analytical cost model")
  ap.add_argument("--pairs", default=None, help="net:dtype,... in this order (overrides --nets/--dtypes)")
  ap.add_argument("--warm", default="inception_v3", help="nets whose IOS-Both search is repeated warm")
  ap.add_argument("--save_schedules", default="inception_v3", help="nets whose schedules go to JSON")
  ap.add_argument("--number", type=int, default=50)
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--cache", default=None, help="stage-latency cache JSON (default: $OUT/ios_cache.json)")
  args = ap.parse_args()
  args.out_dir = args.out or os.environ.get("OUT") or "results/benchmarks"
  os.makedirs(args.out_dir, exist_ok=True)
  cache = args.cache or os.path.join(args.out_dir, "ios_cache.json")
  if args.small:
    args.number, args.repeat = 3, 2
  env = environment()
  print(env, flush=True)
  t_start = time.perf_counter()
  log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)
  rows = []
  pairs = ([p.split(":") for p in args.pairs.split(",")] if args.pairs else
           [(n, d) for d in args.dtypes.split(",") for n in args.nets.split(",")])
  for name, dt in pairs:
    dtype = jnp.dtype(dt)
    nets = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)
    model, shape = nets[name]
    row, _ = bench_net(name, model, shape, dtype, args, cache, log)
    rows.append(row)
    print(json.dumps(row), flush=True)
    write_json(args.out_dir, "ios_latency", {"env": env, "rows": rows})
  cols = ["net", "dtype", "jit_ms", "best_xla", "best_xla_vs_jit"]
  cols += sorted({c for r in rows for c in r if c.startswith("ios_") and
                  (c.endswith("_ms") or c.endswith("vs_best_xla"))})
  cols += ["floor_ms", "search_merge_s", "search_both_s", "search_both_warm_s"]
  print_table(rows, cols)


if __name__ == "__main__":
  main()
