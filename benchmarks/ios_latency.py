"""IOS (Ding et al., MLSys 2021) on the four benchmark CNNs at batch 1: latency of plain jax.jit, of the
best XLA configuration for the unscheduled function, of IOS-Merge and IOS-Both schedules (searched on
this GPU with the stage profiler), search time cold and warm, and the roofline floor.

  PYTHONPATH=. python3 benchmarks/ios_latency.py --nets inception_v3 --out $OUT     # GPU
  PYTHONPATH=. python3 benchmarks/ios_latency.py --small                           # CPU smoke test

On the GPU the stage profiler compiles stages with the emission's options (command buffers incl.
convolutions + CONCURRENT) plus ``xla_gpu_experimental_enable_conv_fusion`` (``--conv_fusion 1``,
default): without it every depthwise conv of an executable builds a runtime-compiled cuDNN plan on its
first call (~0.25 s each, see benchmarks/ios_compile_probe.py), so profiling the hundreds of RandWire /
NasNet-A stages would take many minutes. The IOS programs are then compiled both with the emission's
options alone (``ios_merge``, ``ios_both``: the same options as the XLA baseline
``cmdbuf_conv_concurrent``) and with conv fusion too (``ios_*_cf``, as ``*_convfusion``); "best XLA" is
the best of all XLA configurations timed.
The JSON is rewritten after every compiled variant (a time-out keeps what was measured).

Caution: everything here runs in one process after the stage profiler; on an H100 a later compilation in
such a process once failed autotuning outright (its timings still agreed with fresh processes). Figures to
report come from ``benchmarks/ios_isolated.py`` (a fresh process per program); this script remains useful
for quick searches and for the stage cache.

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

from benchmarks.common import environment, print_table  # noqa: E402
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402
from mlsys_jax.sched.cost import time_calls  # noqa: E402

from benchmarks.ios_xla_baselines import CONV_FUSION_OPTIONS, XLA_CONFIGS  # noqa: E402

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


def ios_compiled(sc, x, extra_options):
  """Compile the schedule's program with its emission options plus ``extra_options`` (the same extra
  options the XLA baselines and the stage profiler get, e.g. conv fusion)."""
  jitted, consts = sc._build()
  opts = {**sched.emit.compiler_options(sc.emission, sc.info.get("s", 8)), **extra_options}
  f = jax.jit(getattr(jitted, "__wrapped__", jitted), compiler_options=opts or None)
  return f.lower(consts, x).compile(), consts


def bench_net(name, model, shape, dtype, args, cache_path, log, flush):
  """One (net, dtype) row; ``flush(row)`` is called after every variant so a time-out keeps data."""
  dn = jnp.dtype(dtype).name
  on_gpu = jax.default_backend() == "gpu"
  params = ios_init_params(model, shape, seed=0)  # no jit(model.init): threefry for 200-500 kernels
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  f_closed = lambda x: model.apply(params, x)
  row = {"net": name, "dtype": dn, "commit": args.commit}
  extra = dict(CONV_FUSION_OPTIONS) if (args.conv_fusion and on_gpu) else {}
  row["profile_extra_options"] = extra
  # IOS program options: the emission's own (cc: suffix ""), and the same plus conv fusion ("_cf")
  wanted = (args.ios_variants or "cc,cf").split(",")
  emit_variants = {"": {}} if "cc" in wanted else {}
  if extra and "cf" in wanted:
    emit_variants["_cf"] = extra
  fns, outs = {}, {}

  def add(key, comp, fargs, t_compile):
    t0 = time.perf_counter()
    y = jax.block_until_ready(comp(*fargs))
    row[f"compile_{key}_s"] = round(t_compile, 2)
    row[f"first_call_{key}_s"] = round(time.perf_counter() - t0, 2)
    fns[key], outs[key] = (comp, fargs), y
    log(f"{name} {dn}: {key} compile {t_compile:.1f} s, first call {row[f'first_call_{key}_s']} s")
    flush(row)

  # ---- XLA baselines (unscheduled)
  configs = {k: XLA_CONFIGS[k] for k in args.configs.split(",") if k in XLA_CONFIGS}
  for cname, opts in configs.items():
    if not on_gpu and opts:
      continue
    t0 = time.perf_counter()
    try:
      c = jax.jit(model.apply, compiler_options=opts or None).lower(params, x).compile()
    except Exception as e:  # noqa: BLE001
      row[f"err_{cname}"] = str(e)[:300]
      flush(row)
      continue
    add(cname, c, (params, x), time.perf_counter() - t0)
  # the same configurations with the weights closed over (constants in the HLO, as the IOS program
  # embeds them): no per-call conv-kernel transposes (see /work/notes/ios_requests.md)
  for cname in [c for c in args.const_configs.split(",") if c in XLA_CONFIGS]:
    opts = XLA_CONFIGS[cname]
    if not on_gpu and opts:
      continue
    t0 = time.perf_counter()
    try:
      c = jax.jit(f_closed, compiler_options=opts or None).lower(x).compile()
    except Exception as e:  # noqa: BLE001
      row[f"err_{cname}_const"] = str(e)[:300]
      flush(row)
      continue
    add(f"{cname}_const", c, (x,), time.perf_counter() - t0)
  if fns:  # baseline-only timing first: kept even if the IOS part runs out of time
    _time_into(row, fns, args.number, max(3, args.repeat // 2), prefix="pre_")
    flush(row)
  # ---- IOS searches
  r, s = RS.get(name, (3, 8))
  if args.small:
    r, s = min(r, 2), min(s, 3)
  row["r"], row["s"], row["part_size"] = r, s, PART.get(name, 50)
  mode = "cuda_graph"
  schedules = {}

  def profiler():
    if not on_gpu or args.analytical:
      return sched.AnalyticalCost()
    # stages measured as the final program compiles them (extra options, e.g. conv fusion); the
    # library's prefetch compiles every stage before timing any
    prof = sched.StageProfiler(mode=mode, cache_path=cache_path, s=s, parallel="sum", k=args.k,
                               compiler_options=extra)
    return prof

  for strat in args.strategies.split(","):
    prof = profiler()
    t0 = time.perf_counter()
    sc = sched.ios_schedule(f_closed, x, r=r, s=s, strategy=strat, profiler=prof, emission=mode,
                            part_size=PART.get(name, 50))
    row[f"search_{strat}_s"] = round(time.perf_counter() - t0, 1)
    row[f"profiled_{strat}"] = getattr(prof, "misses", 0)
    row[f"profile_compile_{strat}_s"] = round(getattr(prof, "compile_s", 0.0), 1)
    c = sc.counts()
    row[f"{strat}_counts"] = c
    row[f"{strat}_pred_ms"] = round(sc.predicted_latency * 1e3, 4)
    schedules[strat] = sc
    log(f"{name} {dn}: IOS-{strat} search {row[f'search_{strat}_s']} s "
        f"({row[f'profiled_{strat}']} stages profiled), {c}")
    flush(row)
    if on_gpu and not args.analytical and name in args.warm.split(",") and strat == "both":
      t0 = time.perf_counter()
      sched.ios_schedule(f_closed, x, r=r, s=s, strategy=strat, profiler=profiler(), emission=mode,
                         part_size=PART.get(name, 50))
      row[f"search_{strat}_warm_s"] = round(time.perf_counter() - t0, 1)
      log(f"{name} {dn}: IOS-{strat} warm search {row[f'search_{strat}_warm_s']} s")
      flush(row)
    if name in args.save_schedules.split(","):
      with open(os.path.join(args.out_dir, f"ios_schedule_{name}_{dn}_{strat}.json"), "w") as fh:
        fh.write(sc.to_json())
  if on_gpu and args.lhs:
    for k in list(schedules):
      b = schedules[k]
      schedules[k + "_lhs"] = sched.Schedule(b.graph, b.stages, b.stage_latency, "cuda_graph_lhs",
                                             b.search_s, dict(b.info))
  if "both" in schedules and on_gpu and args.streams:
    b = schedules["both"]
    schedules["both_streams"] = sched.Schedule(b.graph, b.stages, b.stage_latency, "streams",
                                               b.search_s, dict(b.info))
  ref_key = "jit" if "jit" in outs else next(iter(outs), None)
  for suffix, eopts in sorted(emit_variants.items(), key=lambda kv: -len(kv[0])):  # cheap first
    for k0, sc in schedules.items():
      k = k0 + suffix
      t0 = time.perf_counter()
      try:
        comp, consts = ios_compiled(sc, x, eopts)
      except Exception as e:  # noqa: BLE001
        row[f"err_ios_{k}"] = str(e)[:300]
        flush(row)
        continue
      add(f"ios_{k}", comp, (consts, x), time.perf_counter() - t0)
      same = "cmdbuf_conv_concurrent" + ("_convfusion" if suffix else "")
      for rk in {ref_key, same}:  # vs plain jit, and vs the XLA config with the same options
        if rk in outs:
          row[f"relerr_ios_{k}_vs_{rk}"] = relerr(outs[f"ios_{k}"], outs[rk])
  if args.precision_check and schedules:
    # default precision lets cuDNN use TF32 for float32 convs, so two programs that pick different conv
    # algorithms differ at TF32 rounding (~1e-4); with every conv at HIGHEST precision the scheduled
    # program must match the original to float32 rounding
    with jax.default_matmul_precision("highest"):
      ref_hi = jax.jit(f_closed, compiler_options=extra or None).lower(x).compile()(x)
      for k0, sc in schedules.items():
        comp, consts = ios_compiled(sc, x, extra)
        row[f"relerr_highest_ios_{k0}_vs_jit_highest"] = relerr(comp(consts, x), ref_hi)
    if ref_key in outs:
      row[f"relerr_{ref_key}_default_vs_jit_highest"] = relerr(outs[ref_key], ref_hi)
    log(f"{name} {dn}: precision check " + ", ".join(f"{k}={v:.2e}" for k, v in row.items()
                                                     if k.startswith("relerr_") and "highest" in k))
    flush(row)
  for k in outs:
    if not k.startswith("ios_") and ref_key is not None and k != ref_key:
      row[f"relerr_{k}_vs_{ref_key}"] = relerr(outs[k], outs[ref_key])
  # ---- floor
  g = schedules[next(iter(schedules))].graph if schedules else None
  if g is not None:
    flops = sum(g.unit_flops_bytes(u)[0] for u in range(len(g.units)))
    pbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(params))
    y0 = next(iter(outs.values()))
    io_bytes = x.size * x.dtype.itemsize + y0.size * y0.dtype.itemsize
    row["gflops"] = round(flops / 1e9, 2)
    row["floor_ms"] = round(max(flops / PEAK.get(dn, 400e12), (pbytes + io_bytes) / BW) * 1e3, 4)
  flush(row)
  # ---- interleaved timing of everything
  _time_into(row, fns, args.number, args.repeat)
  flush(row)
  return row, schedules


def interleaved_times(fns: dict, number: int, repeat: int) -> dict:
  """Seconds per call of every ``fns[name] = (f, args)`` in ``repeat`` rounds of ``number``
  back-to-back calls each, the rounds interleaved across programs with a rotating start."""
  names = list(fns)
  ts = {k: [] for k in names}
  for i in range(repeat):
    for k in names[i % len(names):] + names[:i % len(names)]:
      ts[k] += time_calls(*fns[k], number, 1)
  return ts


def _time_into(row, fns, number, repeat, prefix=""):
  """Median per-call latency of every compiled variant, rounds interleaved with a rotating start."""
  names = list(fns)
  for k in names:
    time_calls(*fns[k], 3, 1)
  ts = interleaved_times(fns, number, repeat)
  med = {k: float(np.median(v)) for k, v in ts.items()}
  for k in names:
    row[f"{prefix}{k}_ms"] = round(med[k] * 1e3, 4)
    row[f"{prefix}{k}_iqr_ms"] = [round(float(np.percentile(ts[k], q)) * 1e3, 4) for q in (25, 75)]
  base = [k for k in names if not k.startswith("ios_")]
  if not base:
    return
  best = min(base, key=lambda k: med[k])
  row[f"{prefix}best_xla"] = best
  row[f"{prefix}best_xla_ms"] = round(med[best] * 1e3, 4)
  if "jit" in med:
    row[f"{prefix}best_xla_vs_jit"] = round(med["jit"] / med[best], 3)
  for k in names:
    if k.startswith("ios_"):
      row[f"{prefix}{k}_vs_best_xla"] = round(med[best] / med[k], 3)
      if "jit" in med:
        row[f"{prefix}{k}_vs_jit"] = round(med["jit"] / med[k], 3)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--nets", default="inception_v3,squeezenet,randwire,nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--strategies", default="merge,both")
  ap.add_argument("--configs", default="jit,cmdbuf_conv_concurrent,cmdbuf_conv_concurrent_convfusion",
                  help="XLA configurations of the unscheduled net (names of XLA_CONFIGS)")
  ap.add_argument("--const_configs", default="cmdbuf_conv_concurrent,cmdbuf_conv_concurrent_convfusion",
                  help="XLA configurations also timed with the weights closed over (name_const)")
  ap.add_argument("--conv_fusion", type=int, default=1,
                  help="1: stage profiles compiled with xla_gpu_experimental_enable_conv_fusion, and "
                       "the IOS programs emitted both without (ios_*) and with it (ios_*_cf)")
  ap.add_argument("--ios_variants", default="", help="subset of cc,cf (IOS program options; all)")
  ap.add_argument("--lhs", action="store_true", help="also time the IOS programs with the LHS")
  ap.add_argument("--streams", action="store_true", help="also emit IOS-Both with stream annotations")
  ap.add_argument("--analytical", action="store_true", help="search with the analytical cost model")
  ap.add_argument("--pairs", default=None, help="net:dtype,... in this order (overrides --nets/--dtypes)")
  ap.add_argument("--warm", default="inception_v3,squeezenet,randwire,nasnet",
                  help="nets whose IOS-Both search is repeated warm (profile cache on disk)")
  ap.add_argument("--save_schedules", default="inception_v3,randwire,nasnet",
                  help="nets whose schedules go to JSON")
  ap.add_argument("--k", type=int, default=5, help="chained copies for differential stage timing")
  ap.add_argument("--number", type=int, default=50)
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--time_budget_s", type=float, default=1e9,
                  help="skip the remaining (net, dtype) pairs once this much wall time has passed")
  ap.add_argument("--commit", default=os.environ.get("IOS_COMMIT", ""), help="recorded in the JSON")
  ap.add_argument("--name", default="ios_latency", help="JSON file name (without .json)")
  ap.add_argument("--precision_check", action="store_true",
                  help="also compare IOS programs with the original, both with every conv at HIGHEST precision")
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
  rows, skipped = [], []
  payload = {"env": env, "argv": sys.argv[1:], "rows": rows, "skipped": skipped}

  def flush(row):
    payload["wall_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out_dir, args.name + ".json"), "w") as fh:
      json.dump(payload, fh, indent=1)

  pairs = ([p.split(":") for p in args.pairs.split(",")] if args.pairs else
           [(n, d) for d in args.dtypes.split(",") for n in args.nets.split(",")])
  for name, dt in pairs:
    if time.perf_counter() - t_start > args.time_budget_s:
      skipped.append(f"{name}:{dt}")
      log(f"skip {name} {dt}: time budget")
      continue
    dtype = jnp.dtype(dt)
    nets = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)
    model, shape = nets[name]
    row = {"net": name, "dtype": dtype.name}
    rows.append(row)
    r, _ = bench_net(name, model, shape, dtype, args, cache, log,
                     lambda rr: (rows.__setitem__(len(rows) - 1, rr), flush(rr)))
    print(json.dumps({k: v for k, v in r.items() if "iqr" not in k}), flush=True)
  flush(None)
  cols = ["net", "dtype", "jit_ms", "best_xla", "best_xla_ms", "best_xla_vs_jit"]
  cols += sorted({c for r in rows for c in r if c.startswith("ios_") and
                  (c.endswith("_ms") or c.endswith("vs_best_xla")) and "iqr" not in c})
  cols += ["floor_ms", "search_merge_s", "search_both_s", "search_both_warm_s"]
  print_table(rows, cols)


if __name__ == "__main__":
  main()
