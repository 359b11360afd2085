"""IOS batch-size specialization (Ding et al., MLSys 2021, Sec. 7): for each (net, dtype, batch) the
best XLA program of the unscheduled net (weights closed over; plain jit and the command-buffer
configurations of ``sched.CHECK_CONFIGS``) vs IOS-Merge vs IOS-Both schedules searched at that batch,
plus the cross table: every distinct schedule found at batch b1 emitted and run at batch b2.

Everything of one (net, dtype, batch) is compiled before any of it runs, then timed in interleaved
rounds (median per program): ratios are same-run. Schedules of one net are searched once per batch and
strategy; a schedule found at several batches is compiled once per target batch (cross entries equal
to the diagonal cost nothing). ``--cost analytical`` (default) searches with the roofline model (the
DP alone, ~1 s a search), ``--cost profiler`` with the on-device stage profiler (20-100 s a cold search
per net; ``--cache`` keeps its measurements).

The JSON also holds, for every emitted program, the search's predicted latency (sum of stage costs)
and the measured one: the data of the whole-program correction model (``--fit``; issue 20.2).

  PYTHONPATH=. python3 benchmarks/ios.py batch --nets squeezenet,inception_v3 --dtypes float32 --out $OUT
  PYTHONPATH=. python3 benchmarks/ios.py batch --small                                       # CPU smoke
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
from mlsys_jax.sched.api import _check_cover, _rel_err  # noqa: E402
from mlsys_jax.sched.cost import time_calls  # noqa: E402
from mlsys_jax.sched.graph import build_graph, relayout_conv_kernels  # noqa: E402


def _args():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--nets", default="squeezenet,inception_v3")
  ap.add_argument("--dtypes", default="float32")
  ap.add_argument("--batches", default="1,2,4,8,16,32")
  ap.add_argument("--strategies", default="merge,both")
  ap.add_argument("--configs", default=",".join(sched.CHECK_CONFIGS), help="XLA configurations (XLA_CONFIGS)")
  ap.add_argument("--cost", default="analytical", choices=("analytical", "profiler"))
  ap.add_argument("--cache", default=None, help="stage-profile cache (with --cost profiler)")
  ap.add_argument("--cross", type=int, default=1, help="1: run every schedule at every batch size")
  ap.add_argument("--cross_from", default="", help="with --cross: only schedules found at these batches "
                  "(comma-separated; default all) are run at the other batch sizes")
  ap.add_argument("--number", type=int, default=10)
  ap.add_argument("--repeat", type=int, default=7)
  ap.add_argument("--cases", default="", help="explicit cases NET:DTYPE:BATCH, comma-separated, run in this "
                  "order (instead of --nets x --dtypes x --batches); consecutive cases of one net and dtype "
                  "share their searches and cross table")
  ap.add_argument("--ios_options", default="", help="XLA_CONFIGS name whose options are added to the IOS "
                  "programs' (e.g. convfusion for RandWire/NasNet-A, whose depthwise convs otherwise cost "
                  "~0.25 s each on the first call)")
  ap.add_argument("--time_budget_s", type=float, default=1e9, help="skip remaining cases after this")
  ap.add_argument("--choices_from", default="", help="ios_batch JSON of an earlier run: report how the "
                  "program it chose per (net, dtype, batch) compares with this run's best XLA program")
  ap.add_argument("--confirm_only", action="store_true", help="with --choices_from: search and time only "
                  "the IOS program the earlier run chose (plus the XLA configurations), no cross table")
  ap.add_argument("--fit", action="store_true", help="only fit the correction model on --inputs JSONs")
  ap.add_argument("--inputs", default="", help="comma-separated ios_batch JSONs for --fit")
  ap.add_argument("--table", action="store_true", help="only print markdown tables of --inputs JSONs")
  ap.add_argument("--name", default="ios_batch")
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="small nets, CPU smoke test")
  return ap.parse_args()


def stage_sig(sc) -> str:
  return json.dumps([[st.kind, [list(g) for g in st.groups]] for st in sc.stages])


_GRAPHS: dict = {}


def retarget(sc, fn, x, profiler):
  """``sc``'s stages on the graph of ``fn`` at ``x`` (another batch size): same units, other shapes."""
  key = (id(fn), x.shape, str(x.dtype), sc.info.get("kernel_layout", "auto"))
  if key not in _GRAPHS:
    _GRAPHS.clear()   # one batch size at a time
    _GRAPHS[key] = relayout_conv_kernels(build_graph(fn, x, part_size=50), key[-1])
  g = _GRAPHS[key]
  if len(g.units) != len(sc.graph.units):
    raise ValueError("unit graphs differ between batch sizes")
  _check_cover(g, sc.stages)
  lat = [profiler(g, st) for st in sc.stages]
  info = {k: v for k, v in sc.info.items() if k != "check"}
  return sched.Schedule(g, list(sc.stages), lat, sc.emission, 0.0, info, _fn=fn)


FEATURES = {"sum": ("predicted_s",), "critical_path": ("predicted_cp_s",),
            "sum+critical_path": ("predicted_s", "predicted_cp_s"),
            "sum+stages": ("predicted_s", "stages")}   # per-stage a * t + c: a correction the DP can use


def fit_correction(points):
  """Least squares ``measured = a . features + c`` per (net, dtype) and feature set (the schedule's sum
  of stage costs, its stage-DAG critical path, or both), with leave-one-out relative errors; also the
  raw relative error of each prediction. ``points``: dicts with net, dtype, predicted_s, predicted_cp_s,
  measured_s."""
  out = []
  keys = sorted({(p["net"], p["dtype"]) for p in points})
  for net, dt in keys:
    ps = [p for p in points if p["net"] == net and p["dtype"] == dt and "predicted_cp_s" in p]
    ym = np.array([p["measured_s"] for p in ps])
    for fname, feats in FEATURES.items():
      if len(ps) < len(feats) + 3:
        continue
      A = np.array([[p[k] for k in feats] + [1.0] for p in ps])
      coef = np.linalg.lstsq(A, ym, rcond=None)[0]
      loo = []
      for i in range(len(ps)):
        m = np.arange(len(ps)) != i
        ci = np.linalg.lstsq(A[m], ym[m], rcond=None)[0]
        loo.append(abs(float(A[i] @ ci) - ym[i]) / ym[i])
      row = {"net": net, "dtype": dt, "features": fname, "n": len(ps),
             "coef": [float(c) for c in coef], "loo_rel_err_median": float(np.median(loo)),
             "loo_rel_err_max": float(max(loo))}
      if len(feats) == 1:
        raw = np.abs(A[:, 0] - ym) / ym
        row.update(raw_rel_err_median=float(np.median(raw)), raw_rel_err_max=float(raw.max()))
      out.append(row)
  return out


def earlier_pick(prev: dict) -> str:
  """The program an earlier run's row chose: 'xla:<config>' or 'ios:<strategy>' (fastest median);
  '' for no row."""
  if not prev:
    return ""
  cands = {"xla:" + prev["best_xla"]: prev["best_xla_s"]}
  cands.update({f"ios:{s}": prev[f"ios_{s}_s"] for s in ("merge", "both", "parallel") if f"ios_{s}_s" in prev})
  return min(cands, key=cands.get)


def compile_all(lowered: dict) -> dict:
  """``{name: (lowered, args)}`` -> ``{name: (compiled, args)}``, one compile at a time and all before any
  program runs. (Compiling in 4 threads on the H200 (run s6c2) never finished a first batch in 60 s: XLA's
  conv autotuning in parallel threads timed out its delay kernel again and again.)"""
  return {k: (low.compile(), a) for k, (low, a) in lowered.items()}


def markdown_tables(rows) -> str:
  """The batch table (best XLA vs IOS-Merge vs IOS-Both, ms and ratios) and the cross tables (schedule
  found at b1 run at b2, as a ratio to the schedule found at b2) of ``rows`` from one or more runs."""
  ms = lambda v: "–" if v is None else f"{v * 1e3:.3f}"
  rt = lambda v: "–" if v is None else f"{v:.3f}x"
  lines = ["| net | dtype | batch | best XLA (config) ms | IOS-Merge ms | IOS-Both ms | Merge vs XLA | "
           "Both vs XLA | program run | earlier choice vs XLA |", "|" + "---|" * 10]
  for r in rows:
    choice = min([("xla", r["best_xla_s"])] + [(s, r[f"ios_{s}_s"]) for s in ("merge", "both")
                                              if f"ios_{s}_s" in r], key=lambda kv: kv[1])[0]
    lines.append(f"| {r['net']} | {r['dtype']} | {r['batch']} | {ms(r['best_xla_s'])} ({r['best_xla']}) | "
                 f"{ms(r.get('ios_merge_s'))} | {ms(r.get('ios_both_s'))} | "
                 f"{rt(r.get('ios_merge_vs_best_xla'))} | {rt(r.get('ios_both_vs_best_xla'))} | {choice} | "
                 f"{rt(r.get('earlier_choice_vs_best_xla'))} |")
  for (net, dt) in sorted({(r["net"], r["dtype"]) for r in rows}):
    rs = sorted([r for r in rows if r["net"] == net and r["dtype"] == dt], key=lambda r: r["batch"])
    srcs = sorted({k for r in rs for k in r.get("cross_s", {})}, key=lambda k: (k.split("_")[1],
                                                                                int(k.split("_")[0][1:])))
    if not any(len(r.get("cross_s", {})) > 2 for r in rs):
      continue
    lines += ["", f"Cross table, {net} {dt}: latency of the schedule found at (b1, strategy) run at b2, "
              "relative to the schedule found at b2 (< 1: slower; =: the same schedule)", "",
              "| found at \\ run at | " + " | ".join(f"b{r['batch']}" for r in rs) + " |",
              "|" + "---|" * (len(rs) + 1)]
    for k in srcs:
      strat = k.split("_")[1]
      cells = []
      for r in rs:
        own = r.get(f"ios_{strat}_s")
        v = r.get("cross_s", {}).get(k)
        cells.append("–" if v is None or own is None else "=" if v == own else f"{own / v:.3f}")
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  args = _args()
  if args.table:
    rows = [r for f in args.inputs.split(",") for r in json.load(open(f))["rows"]]
    print(markdown_tables(rows))
    return
  if args.fit:
    pts = []
    for f in args.inputs.split(","):
      pts += json.load(open(f)).get("points", [])
    res = fit_correction(pts)
    print_table(res, list(res[0]) if res else [])
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      json.dump({"fits": res, "inputs": args.inputs}, open(os.path.join(args.out, args.name + "_fit.json"), "w"),
                indent=1)
    return
  out_dir = args.out or os.environ.get("OUT") or "results/benchmarks"
  os.makedirs(out_dir, exist_ok=True)
  if args.small:
    args.number, args.repeat = 2, 2
  on_gpu = jax.default_backend() == "gpu"
  configs = [c for c in args.configs.split(",") if c in sched.XLA_CONFIGS and (on_gpu or not sched.XLA_CONFIGS[c])]
  batches = [int(b) for b in args.batches.split(",")]
  strategies = args.strategies.split(",")
  cross_from = {int(b) for b in args.cross_from.split(",") if b}
  t_start = time.perf_counter()
  log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)
  payload = {"env": environment(), "argv": sys.argv[1:], "cost": args.cost, "rows": [], "points": [],
             "skipped": []}

  def flush():
    payload["wall_s"] = round(time.perf_counter() - t_start, 1)
    payload["fits"] = fit_correction(payload["points"])
    with open(os.path.join(out_dir, args.name + ".json"), "w") as fh:
      json.dump(payload, fh, indent=1)

  earlier = {}
  if args.choices_from:
    for fname in args.choices_from.split(","):   # later files override earlier ones
      for r in json.load(open(fname))["rows"]:
        earlier[(r["net"], r["dtype"], r["batch"])] = r

  if args.cases:
    cases = [(c.split(":")[0], c.split(":")[1], int(c.split(":")[2])) for c in args.cases.split(",")]
  else:
    cases = [(n, d, b) for n in args.nets.split(",") for d in args.dtypes.split(",") for b in batches]
  groups = []   # runs of consecutive cases of one (net, dtype)
  for n, d, b in cases:
    if groups and groups[-1][:2] == (n, d):
      groups[-1][2].append(b)
    else:
      groups.append((n, d, [b]))
  ios_opts = dict(sched.XLA_CONFIGS[args.ios_options]) if args.ios_options else None
  nets_cache: dict = {}
  for net, dt, batches in groups:
    if True:
      dtype = jnp.dtype(dt)
      if (net, dt) not in nets_cache:
        model, shape = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)[net]
        params = ios_init_params(model, shape, seed=0)   # nonzero biases, like trained weights
        nets_cache[(net, dt)] = (model, shape, params)
      model, shape, params = nets_cache[(net, dt)]
      f = lambda v, p=params, m=model: m.apply(p, v)
      xs = {b: jax.random.normal(jax.random.PRNGKey(1), (b,) + tuple(shape[1:]), dtype) for b in batches}
      if args.cost == "profiler" and on_gpu:
        prof = sched.StageProfiler(cache_path=args.cache)
      else:
        prof = sched.AnalyticalCost()
      found = {}   # (b, strategy) -> Schedule
      for b in batches:
        for strat in strategies:
          if time.perf_counter() - t_start > args.time_budget_s:
            payload["skipped"].append(f"search {net} {dt} b{b} {strat}")
            continue
          if args.confirm_only and earlier_pick(earlier.get((net, dt, b), {})) != "ios:" + strat:
            continue   # only the program the earlier run chose (and the XLA configurations) is timed
          sc = sched.ios_schedule(f, xs[b], strategy=strat, profiler=prof, check="off",
                                  compiler_options=ios_opts)
          found[(b, strat)] = sc
          log(f"{net} {dt} b{b} {strat}: search {sc.search_s:.1f} s, {sc.counts()}, "
              f"pred {sc.predicted_latency * 1e3:.3f} ms")
      sigs = {k: stage_sig(sc) for k, sc in found.items()}
      distinct = {}   # signature -> list of (b, strategy) that found it
      for k, sg in sigs.items():
        distinct.setdefault(sg, []).append(k)
      log(f"{net} {dt}: {len(found)} searches, {len(distinct)} distinct schedules")
      for b in batches:
        if time.perf_counter() - t_start > args.time_budget_s:
          payload["skipped"].append(f"time {net} {dt} b{b}")
          log(f"skip {net} {dt} b{b}: time budget")
          continue
        if args.confirm_only and (net, dt, b) not in earlier:
          continue   # nothing to confirm at this batch size
        x = xs[b]
        progs, t0 = {}, time.perf_counter()
        for c in configs:
          opts = sched.XLA_CONFIGS[c]
          progs["xla:" + c] = (jax.jit(f, compiler_options=opts or None).lower(x), (x,))
        sched_of = {}   # program name -> (schedule at this batch, found-at keys)
        for sg, ks in distinct.items():
          own = [k for k in ks if k[0] == b]
          if not own and not (args.cross and (not cross_from or any(k[0] in cross_from for k in ks))):
            continue
          src = found[own[0] if own else ks[0]]
          sc = src if own else retarget(src, f, x, prof if isinstance(prof, sched.AnalyticalCost)
                                        else sched.AnalyticalCost())
          name = "ios:" + "+".join(f"b{kb}{ks_[0]}" for kb, ks_ in ks)
          jf, consts = sc._build()
          progs[name] = (jf.lower(consts, x), (consts, x))
          sched_of[name] = (sc, ks)
        progs = compile_all(progs)   # every program compiled before any runs
        compile_s = time.perf_counter() - t0
        ref = progs["xla:" + configs[0]][0](x)
        errs = {k: _rel_err(p(*a), ref) for k, (p, a) in progs.items()}
        names = list(progs)
        for k in names:
          time_calls(*progs[k], 2, 1)
        ts = {k: [] for k in names}
        for i in range(args.repeat):
          for k in names[i % len(names):] + names[:i % len(names)]:
            ts[k] += time_calls(*progs[k], args.number, 1)
        med = {k: float(np.median(v)) for k, v in ts.items()}
        iqr = {k: [float(np.percentile(v, 25)), float(np.percentile(v, 75))] for k, v in ts.items()}
        xla = {k[4:]: v for k, v in med.items() if k.startswith("xla:")}
        best = min(xla, key=xla.get)
        row = {"net": net, "dtype": dt, "batch": b, "best_xla": best, "best_xla_s": xla[best],
               "xla_s": xla, "compile_s": compile_s, "iqr_s": iqr, "rel_err_vs_" + configs[0]: errs}
        for strat in strategies:
          if (b, strat) not in found:
            continue
          name = next(n for n, (_, ks) in sched_of.items() if (b, strat) in ks)
          row[f"ios_{strat}_cp_s"] = found[(b, strat)].predicted_critical_path
          row[f"ios_{strat}_s"] = med[name]
          row[f"ios_{strat}_vs_best_xla"] = xla[best] / med[name]
          row[f"ios_{strat}_pred_s"] = found[(b, strat)].predicted_latency
          row[f"ios_{strat}_search_s"] = found[(b, strat)].search_s
          row[f"ios_{strat}_counts"] = found[(b, strat)].counts()
        ios_keys = [k for k in row if k.startswith("ios_") and k.endswith("_s") and k.count("_") == 2]
        if ios_keys:
          row["checked_vs_best_xla"] = xla[best] / min([xla[best]] + [row[k] for k in ios_keys])
        prev = earlier.get((net, dt, b))
        if prev is not None:   # the earlier run's choice, timed in this run (no selection on these timings)
          pick = earlier_pick(prev)
          now = xla.get(pick[4:]) if pick.startswith("xla:") else row.get(f"ios_{pick[4:]}_s")
          if now is not None:
            row["earlier_choice"] = pick
            row["earlier_choice_vs_best_xla"] = xla[best] / now
        # cross: the schedule found at (b1, strategy) run at this batch
        row["cross_s"] = {f"b{kb}_{ks_}": med[n] for n, (_, ks) in sched_of.items() for kb, ks_ in ks}
        for n, (sc, ks) in sched_of.items():
          if args.cost != "analytical" and not any(kb == b for kb, _ in ks):
            continue   # a retargeted schedule's stages were costed by the roofline, not the profiler
          payload["points"].append({"net": net, "dtype": dt, "batch": b, "program": n,
                                    "predicted_s": sc.predicted_latency,
                                    "predicted_cp_s": sc.predicted_critical_path, "measured_s": med[n],
                                    "stages": len(sc.stages), "cost": args.cost})
        payload["rows"].append(row)
        log(f"{net} {dt} b{b}: best XLA {best} {xla[best] * 1e3:.3f} ms; " +
            ", ".join(f"{s} {row.get(f'ios_{s}_s', float('nan')) * 1e3:.3f} ms" for s in strategies) +
            f"; {len(progs)} programs, compile {compile_s:.1f} s")
        flush()
        del progs
  flush()
  cols = ["net", "dtype", "batch", "best_xla", "best_xla_s"] + \
      [f"ios_{s}_vs_best_xla" for s in strategies] + ["checked_vs_best_xla"]
  print_table(payload["rows"], cols)


if __name__ == "__main__":
  main()
