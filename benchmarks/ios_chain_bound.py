"""The fastest any inter-operator schedule can be: time the network's longest dependency chains alone.

IOS's concurrent and merge stages never shorten a chain of dependent operators (``mlsys_jax.sched.bound``).
This script measures that floor on the device:

1. a child process measures every unit alone with the stage profiler (``--cache`` to start from a
   saved stage cache) and picks up to ``--paths`` candidate chains: the two longest source-to-sink unit
   chains (``longest_paths``) of the measured latencies, the longest of the same latencies less a
   per-stage floor, of the analytical cost model and of ``--perturb`` randomly perturbed copies;
2. every program runs in its own fresh process (compiled, run, timed), then all of them interleaved in
   one more: the fastest XLA configurations of the whole network (weights closed over), the saved
   IOS-Merge schedule (``--schedules DIR``), and each chain alone (``path_program``: only the chain's
   units; same compiler options, weights embedded, kernel layout as the IOS emission; the off-chain
   values are closed over as constants, like the weights, so per-call host work does not hide the GPU
   time).

The slowest chain bounds every schedule built from these kernels: ``best XLA / chain`` is the largest
speedup over the best XLA program that any IOS schedule could reach.

  PYTHONPATH=. python3 benchmarks/ios_chain_bound.py --net inception_v3 --dtypes float32,bfloat16 \
      --schedules benchmarks/results/ios_sched_h100 --out $OUT                       # GPU
  PYTHONPATH=. python3 benchmarks/ios_chain_bound.py --small                             # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _setup(args, dtype_name):
  from benchmarks.ios_isolated import _setup as setup
  ns = argparse.Namespace(small=args.small, net=args.net, init="random")
  return setup(ns, dtype_name)


def _graph(args, model, params, x):
  from mlsys_jax import sched
  return sched.relayout_conv_kernels(
      sched.build_graph(lambda x: model.apply(params, x), x, part_size=args.part_size), "auto")


def _options(args):
  """The IOS emission's XLA options (empty off GPU), as the chains are compiled."""
  import jax
  from mlsys_jax.sched import emit
  from benchmarks.ios_isolated import _search_options
  if jax.default_backend() != "gpu":
    return {}
  return {**emit.compiler_options("cuda_graph"), **_search_options(args)}


def child_paths(args):
  import jax
  from mlsys_jax import sched
  from mlsys_jax.sched.bound import longest_paths
  model, params, x = _setup(args, args.dtype)
  from benchmarks.ios_isolated import _search_options
  g = _graph(args, model, params, x)
  t0 = time.perf_counter()
  ana = sched.AnalyticalCost()
  ana_lat = [ana.unit_time(g, u) for u in range(len(g.units))]
  if jax.default_backend() == "gpu":
    prof = sched.StageProfiler(mode="cuda_graph", compiler_options=_search_options(args),
                               cache_path=os.path.join(args.work, f"cache_{args.dtype}.json"))
    stages = [sched.Stage("parallel", ((u,),)) for u in range(len(g.units))]
    prof.prefetch(g, stages)
    lat = [prof(g, st) for st in stages]
    prof.save()
    source = "StageProfiler (each unit alone, differential timing)"
  else:
    lat, source = ana_lat, "AnalyticalCost (no GPU)"
  # which chain is longest in the program is uncertain: isolated stage latencies carry a per-stage
  # overhead (a 2 us pooling kernel measures ~15 us alone) and noise, so candidates come from several
  # estimates; every candidate is timed and the slowest bounds the schedules
  # per-stage overhead: the 10th percentile of the unit latencies (the minimum can be the profiler's
  # 0.1 us clamp), clamped so no estimate turns negative
  floor = float(np.percentile(lat, 10))
  rng = np.random.default_rng(0)
  estimates = [("profiled", lat), ("profiled minus per-stage floor", [max(t - 0.8 * floor, 0.0) for t in lat]),
               ("analytical", ana_lat)]
  estimates += [(f"profiled x lognormal(0.15) #{i}", list(np.asarray(lat) * rng.lognormal(0, 0.15, len(lat))))
                for i in range(args.perturb)]
  paths, sources = [], []
  for name, est in estimates:
    for _, p in longest_paths(g, est, k=2 if name == "profiled" else 1):
      if p not in paths and len(paths) < args.paths:
        paths.append(p)
        sources.append(name)
  paths = [(sum(lat[u] for u in p), p) for p in paths]
  med = float(np.median(lat))
  suspicious = {u: round(t * 1e6, 1) for u, t in enumerate(lat) if t > 10 * med}
  out = {"units": len(g.units), "unit_latency_source": source, "profile_s": round(time.perf_counter() - t0, 1),
         "sum_unit_us": round(sum(lat) * 1e6, 1),
         "unit_us": [round(t * 1e6, 2) for t in lat], "unit_kinds": [u.kind for u in g.units],
         "units_over_10x_median_us": suspicious,  # likely profiler outliers; pred_us includes them
         "paths": [{"pred_us": round(t * 1e6, 1), "units": list(p), "chosen_by": src,
                    "kinds": [g.units[u].kind for u in p]} for (t, p), src in zip(paths, sources)]}
  with open(os.path.join(args.work, f"paths_{args.dtype}.json"), "w") as fh:
    json.dump(out, fh)
  print("RESULT " + json.dumps(out), flush=True)


def _build_chain(args, i, g, x):
  """(compiled, call args) of chain ``i`` of this dtype's paths file, on the unit graph ``g``."""
  import jax
  from mlsys_jax.sched.bound import path_program
  from mlsys_jax.sched.cost import _random_like
  with open(os.path.join(args.work, f"paths_{args.dtype}.json")) as fh:
    units = json.load(fh)["paths"][i]["units"]
  fn, extra_ids = path_program(g, units)
  extras = tuple(_random_like(g.avals[v], jax.random.PRNGKey(10 + j)) for j, v in enumerate(extra_ids))
  consts = g.consts
  if args.extras == "arg":
    f = jax.jit(lambda extras, x: fn(consts, extras, x), compiler_options=_options(args) or None)
    return f.lower(extras, x).compile(), (extras, x)
  # closed over, like the weights: as 35 jit arguments they cost more host time per call than the
  # chain's GPU time (bf16 Inception-V3: 0.39 ms per call for a 0.31 ms GPU span)
  f = jax.jit(lambda x: fn(consts, extras, x), compiler_options=_options(args) or None)
  return f.lower(x).compile(), (x,)


def offchain_stages(stages, chain_units) -> list:
  """The schedule with every unit of ``chain_units`` taken out of its merge stage and run alone right
  after it (the rest of the merge stays merged if it keeps >= 2 convs)."""
  from mlsys_jax.sched import Stage
  out = []
  for st in stages:
    if st.kind != "merge" or not set(st.units) & chain_units:
      out.append(st)
      continue
    rest = tuple(u for u in st.groups[0] if u not in chain_units)
    if len(rest) >= 2:
      out.append(Stage("merge", (rest,)))
    else:
      out.extend(Stage("parallel", ((u,),)) for u in rest)
    out.extend(Stage("parallel", ((u,),)) for u in st.groups[0] if u in chain_units)
  return out


def _build_offchain(args, model, params, x, which=None):
  """IOS-Merge with no merge on the timed chains (all of them, or chain ``which``): a merge puts a bigger
  kernel and a slice copy on the chain (bf16 Inception-V3 Mixed_5b: 2.85 us alone vs 6.08 + 1.44 us)."""
  from benchmarks.ios_isolated import build_saved
  with open(os.path.join(args.work, f"paths_{args.dtype}.json")) as fh:
    paths = json.load(fh)["paths"]
  chain_units = {u for i, p in enumerate(paths) if which in (None, i) for u in p["units"]}
  return build_saved(args, model, params, x, "merge", lambda sc: offchain_stages(sc.stages, chain_units))


def child_time(args):
  import jax
  from benchmarks.ios_isolated import _build, _stats
  from benchmarks.ios_latency import interleaved_times
  model, params, x = _setup(args, args.dtype)
  built, res = {}, {}
  g = None  # the unit graph, built once for all chains
  for n in args.programs.split(","):
    t0 = time.perf_counter()
    try:
      if n.startswith("chain"):
        g = g or _graph(args, model, params, x)
        built[n] = _build_chain(args, int(n[len("chain"):]), g, x)
      elif n.startswith("ios_merge_offchain"):
        k = n[len("ios_merge_offchain"):]
        built[n] = _build_offchain(args, model, params, x, int(k) if k else None)
      else:
        built[n] = _build(args, n, model, params, x)
      res[n] = {"compile_s": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001
      res[n] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  outs = {}
  for n, (c, a) in built.items():
    t0 = time.perf_counter()
    outs[n] = jax.block_until_ready(c(*a))
    res[n]["first_call_s"] = round(time.perf_counter() - t0, 3)
  ref = next((n for n in built if not n.startswith(("chain", "ios"))), None)
  if ref is not None:  # whole-network programs must agree with the XLA program
    from benchmarks.ios_latency import relerr
    for n in built:
      if not n.startswith("chain"):
        res[n]["relerr_vs_" + ref] = relerr(np.asarray(outs[n], np.float32), np.asarray(outs[ref], np.float32))
  ts = interleaved_times(built, args.number, args.repeat)
  for n in built:
    res[n].update(_stats(ts[n]))
  if args.trace and jax.default_backend() == "gpu":
    from benchmarks.ios_probe import trace_kernels
    for n in built:
      try:
        tr = trace_kernels(built[n][0], built[n][1], n)
        keep = n in args.kernel_lists.split(",")  # one call's [start, dur, stream, name] per kernel
        res[n]["trace"] = {k: v for k, v in tr.items() if k != "kernel_list" or keep}
      except Exception as e:  # noqa: BLE001
        res[n]["trace"] = {"error": str(e)[:200]}
  print("RESULT " + json.dumps(res), flush=True)


def _run_child(args, mode, dtype, programs=""):
  cmd = [sys.executable, __file__, "--child", mode, "--net", args.net, "--dtype", dtype,
         "--work", args.work, "--schedules", args.schedules, "--programs", programs,
         "--number", str(args.number), "--repeat", str(args.repeat), "--paths", str(args.paths),
         "--perturb", str(args.perturb),
         "--part_size", str(args.part_size), "--conv_fusion", str(args.conv_fusion),
         "--trace", str(args.trace if mode == "time" and "," in programs else 0),
         "--kernel_lists", args.kernel_lists, "--extras", args.extras]
  if args.small:
    cmd.append("--small")
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout_s)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
  if p.returncode != 0 or not lines:
    return {"error": f"child {mode} {programs} rc={p.returncode}: {(p.stderr or p.stdout)[-600:]}"}
  return json.loads(lines[-1][len("RESULT "):])


def bound_ratios(res: dict, xla: list, chains: list) -> dict:
  """The best XLA program, the slowest chain, and ``best XLA / slowest chain`` (the largest speedup
  any schedule of these kernels can have over the best XLA program)."""
  ms = {n: r["ms"] for n, r in res.items() if isinstance(r, dict) and "ms" in r}
  xs, cs = [n for n in xla if n in ms], [n for n in chains if n in ms]
  if not xs or not cs:
    return {"failed": sorted(set(xla + chains) - set(ms))}
  best, slow = min(xs, key=ms.get), max(cs, key=ms.get)
  out = {"best_xla": best, "best_xla_ms": ms[best], "slowest_chain": slow, "chain_ms": ms[slow],
         "max_speedup_over_best_xla": round(ms[best] / ms[slow], 3)}
  for n in ms:
    if n not in xla and n not in chains:
      out[f"{n}_vs_best_xla"] = round(ms[best] / ms[n], 3)
      out[f"{n}_over_chain"] = round(ms[n] / ms[slow], 3)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--net", default=None, help="inception_v3 (default), squeezenet, randwire, nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  ap.add_argument("--xla", default="cc_const,cc_const_lhs", help="XLA programs (ios_isolated names)")
  ap.add_argument("--ios", default="ios_merge",
                  help="IOS programs (need --schedules): ios_merge, ios_both, ios_seq_ka, and "
                       "ios_merge_offchain (IOS-Merge without merges on any timed chain; "
                       "ios_merge_offchain<K>: on chain K only); '' for none")
  ap.add_argument("--schedules", default="", help="directory with sched_<net>_<dtype>_merge.json")
  ap.add_argument("--paths", type=int, default=6, help="most chains timed")
  ap.add_argument("--paths_from", default="",
                  help="JSON of an earlier run of the same net: reuse its chains instead of profiling")
  ap.add_argument("--perturb", type=int, default=8,
                  help="candidate chains from this many randomly perturbed latency estimates")
  ap.add_argument("--cache", default="", help="stage-latency cache JSON to start from (copied)")
  ap.add_argument("--conv_fusion", type=int, default=0)
  ap.add_argument("--part_size", type=int, default=50)
  ap.add_argument("--number", type=int, default=30)
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--trace", type=int, default=1, help="1: CUPTI kernel statistics (interleaved child)")
  ap.add_argument("--extras", default="const", choices=("const", "arg"),
                  help="off-chain values closed over (const) or passed as arguments (arg: host-bound)")
  ap.add_argument("--kernel_lists", default="",
                  help="programs whose traced kernels are all saved (start, duration, stream, name)")
  ap.add_argument("--skip_isolated", action="store_true")
  ap.add_argument("--programs", default="", help=argparse.SUPPRESS)
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--work", default="", help=argparse.SUPPRESS)
  ap.add_argument("--child_timeout_s", type=float, default=400)
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="ios_chain_bound")
  args = ap.parse_args()
  if args.net is None:
    args.net = "squeezenet" if args.small else "inception_v3"
  if args.child == "paths":
    return child_paths(args)
  if args.child == "time":
    return child_time(args)
  if args.small:
    args.number, args.repeat = 2, 2
  if args.ios and not args.schedules:
    raise SystemExit("--ios programs need --schedules DIR (saved schedules); pass --ios '' to skip them")
  from benchmarks.common import print_table
  from benchmarks.ios_isolated import start_run
  out_dir = args.out or os.environ.get("OUT") or "results/benchmarks"
  os.makedirs(out_dir, exist_ok=True)
  xla = [p for p in args.xla.split(",") if p]
  ios = [p for p in args.ios.split(",") if p]
  chains = [f"chain{i}" for i in range(args.paths)]
  payload, flush, t_start = start_run(args, out_dir, "ios_chain_")
  table = []
  for dt in args.dtypes.split(","):
    row = {"net": args.net, "dtype": dt}
    payload["rows"].append(row)
    if args.paths_from:  # the chains of an earlier run (same net, dtype and graph), no profiling
      prev = {r["dtype"]: r for r in json.load(open(args.paths_from))["rows"]}
      row["paths"] = dict(prev[dt]["paths"], paths_from=args.paths_from)
      row["paths"]["paths"] = row["paths"]["paths"][:args.paths]
      with open(os.path.join(args.work, f"paths_{dt}.json"), "w") as fh:
        json.dump(row["paths"], fh)
    else:
      row["paths"] = _run_child(args, "paths", dt)
    print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} paths: "
          f"{[(p['pred_us'], len(p['units'])) for p in row['paths'].get('paths', [])]}", flush=True)
    flush()
    if "error" in row["paths"]:
      continue
    chains_dt = chains[:len(row["paths"]["paths"])]
    iso = {}
    for p in (xla + ios + chains_dt) if not args.skip_isolated else ():
      iso[p] = _run_child(args, "time", dt, p).get(p, {"error": "no result"})
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} isolated {p}: {iso[p]}", flush=True)
      row["isolated"] = iso
      flush()
    if iso:
      row["isolated_bound"] = bound_ratios(iso, xla, chains_dt)
    inter = _run_child(args, "time", dt, ",".join(xla + ios + chains_dt))
    row["interleaved"] = inter
    row["interleaved_bound"] = bound_ratios(inter, xla, chains_dt)
    print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} interleaved: {inter}", flush=True)
    flush()
    for p in xla + ios + chains_dt:
      k = int(p[len("chain"):]) if p.startswith("chain") else None
      table.append({"dtype": dt, "program": p,
                    "units": len(row["paths"]["paths"][k]["units"]) if k is not None else None,
                    "pred_us": row["paths"]["paths"][k]["pred_us"] if k is not None else None,
                    "isolated_ms": iso.get(p, {}).get("ms"),
                    "interleaved_ms": inter.get(p, {}).get("ms") if isinstance(inter.get(p), dict) else None,
                    "gpu_span_us": (inter.get(p, {}).get("trace", {}).get("span_us")
                                    if isinstance(inter.get(p), dict) else None)})
  shutil.rmtree(args.work, ignore_errors=True)
  flush()
  print_table(table, ["dtype", "program", "units", "pred_us", "isolated_ms", "interleaved_ms",
                      "gpu_span_us"])
  for row in payload["rows"]:
    for tag in ("isolated_bound", "interleaved_bound"):
      print(row["dtype"], tag, row.get(tag))


if __name__ == "__main__":
  main()
