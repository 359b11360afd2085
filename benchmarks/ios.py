"""The IOS benchmarks (Ding et al., "IOS: Inter-Operator Scheduler for CNN Acceleration", MLSys 2021) in one
script with modes; every mode writes a JSON of raw numbers (seconds, counts) to --out (default $OUT).

  search     ios_schedule's search time with the stage profiler: cold (empty profile cache), then warm (a
             new profiler reading the cache file), and the schedule's output error vs plain jit
  check      ios_schedule(check='measure') as a user runs it: IOS vs the best XLA program per (net, dtype,
             batch), which program runs, search time
  batch      batch-size specialization (IOS Sec. 7): best XLA vs IOS-Merge vs IOS-Both per batch size, the
             cross table (schedule found at b1 run at b2), predicted vs measured latency and the
             whole-program correction fit (--fit); --cases NET:DTYPE:BATCH,... for an ordered list
  isolated   IOS and XLA programs, each compiled and timed in a fresh process, then all interleaved in one
  chain      the longest dependency chains of the network timed alone: a bound on any schedule of its kernels
  trace      per-call CUPTI kernel statistics (kernels, summed kernel time, busy, overlap, span) and HLO
             statistics of the best XLA configurations and the IOS programs of one net

  PYTHONPATH=. python3 benchmarks/ios.py MODE [mode arguments]       # MODE --help for the arguments
  PYTHONPATH=. python3 benchmarks/ios.py batch --small                # CPU smoke test (every mode has --small)

Earlier one-off probes (ios_latency.py, ios_probe.py, ios_compile_probe.py, ios_xla_baselines.py) were
folded away in session 7: their JSONs stay in benchmarks/results/ (see benchmarks/results/ios_history.md).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402
from mlsys_jax.sched.api import _check_cover, _rel_err  # noqa: E402
from mlsys_jax.sched.cost import time_calls  # noqa: E402
from mlsys_jax.sched.graph import build_graph, relayout_conv_kernels  # noqa: E402


# ============================================================================ shared helpers

def _mode_parser(doc: str, name: str | None) -> argparse.ArgumentParser:
  """A mode's parser with the flags every mode has: ``--name`` (JSON file name without .json), ``--out``
  (directory) and ``--small`` (small nets, CPU smoke test)."""
  ap = argparse.ArgumentParser(description=doc)
  ap.add_argument("--name", default=name, help="JSON file name (without .json)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="small nets, CPU smoke test")
  return ap


def relerr(a, b) -> float:
  """Relative L2 error of ``a`` against ``b`` (float64)."""
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def interleaved_times(fns: dict, number: int, repeat: int) -> dict:
  """Seconds per call of every ``fns[name] = (f, args)`` in ``repeat`` rounds of ``number``
  back-to-back calls each, the rounds interleaved across programs with a rotating start."""
  names = list(fns)
  ts = {k: [] for k in names}
  for i in range(repeat):
    for k in names[i % len(names):] + names[:i % len(names)]:
      ts[k] += time_calls(*fns[k], number, 1)
  return ts


def start_run(args, out_dir: str, prefix: str):
  """Scratch folder ``args.work`` (with ``args.cache`` copied in per dtype), the environment printed, and
  ``(payload, flush, t_start)``: ``flush()`` writes ``payload`` (+ wall time) to ``out_dir/args.name.json``."""
  args.work = tempfile.mkdtemp(prefix=prefix)
  if args.cache:
    for dt in args.dtypes.split(","):
      shutil.copy(args.cache, os.path.join(args.work, f"cache_{dt}.json"))
  env = environment()
  print(env, flush=True)
  t_start = time.perf_counter()
  payload = {"env": env, "argv": sys.argv[1:], "rows": []}

  def flush():
    payload["wall_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(out_dir, args.name + ".json"), "w") as fh:
      json.dump(payload, fh, indent=1)

  return payload, flush, t_start



def _gpu_kernel_events(d):
  """GPU kernel events ``(start_us, dur_us, stream tid, name)`` of the perfetto trace under ``d`` (sorted),
  or an error dict."""
  files = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    return {"error": "no perfetto trace"}
  with gzip.open(files[0]) as fh:
    tr = json.load(fh)
  ev = tr["traceEvents"] if isinstance(tr, dict) else tr
  pname, tname = {}, {}
  for e in ev:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e["pid"]] = e["args"].get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e["pid"], e["tid"])] = e["args"].get("name", "")
  gpu_pids = {p for p, n in pname.items() if "GPU" in n or "gpu" in n}
  ks = sorted((float(e["ts"]), float(e.get("dur", 0)), e["tid"], e.get("name", ""))
              for e in ev if e.get("ph") == "X" and e.get("pid") in gpu_pids and "Stream" in tname.get(
                  (e["pid"], e["tid"]), "Stream"))
  if not ks:
    return {"error": "no GPU events", "pids": list(pname.values())[:10]}
  return ks


def _busy_overlap(ks):
  """(time with >= 1 kernel running, time with >= 2 running) for events ``(start, dur, ...)``."""
  pts = sorted([(a, 1) for a, *_ in ks] + [(a + b, -1) for a, b, *_ in ks])
  act, last, busy, over = 0, None, 0.0, 0.0
  for t, dlt in pts:
    if last is not None and act >= 1:
      busy += t - last
      if act >= 2:
        over += t - last
    act += dlt
    last = t
  return busy, over


def trace_kernels(f, args, tag, iters=5):
  """Per-call GPU kernel statistics from a CUPTI trace: calls are separated by a sync and a sleep."""
  d = tempfile.mkdtemp(prefix=f"prof_{tag}_")
  jax.block_until_ready(f(*args))
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(iters):
      jax.block_until_ready(f(*args))
      time.sleep(0.003)
  ks = _gpu_kernel_events(d)
  if isinstance(ks, dict):
    return ks
  calls, cur, end = [], [], None
  for k in ks:
    if cur and k[0] - end > 1000.0:
      calls.append(cur)
      cur = []
    cur.append(k)
    end = max(end or 0.0, k[0] + k[1]) if cur[1:] else k[0] + k[1]
  calls.append(cur)
  stats_ = []
  for c in calls:
    busy, over = _busy_overlap(c)
    t0 = c[0][0]
    span = max(a + b for a, b, _, _ in c) - t0
    stats_.append({"kernels": len(c), "sum_us": sum(b for _, b, _, _ in c), "busy_us": busy,
                   "overlap_us": over, "span_us": span, "streams": len({t for _, _, t, _ in c})})
  med = {k: float(np.median([s_[k] for s_ in stats_])) for k in stats_[0]}
  last = calls[len(calls) // 2]
  t0 = last[0][0]
  med["kernel_list"] = [(round(a - t0, 2), round(b, 2), t, n[:90]) for a, b, t, n in last]
  return med


def hlo_stats(compiled) -> dict:
  import re
  txt = compiled.as_text()
  convs = re.findall(r"= \(([a-z0-9]+)\[([0-9,]*)\]\{([0-9,]*)\}, u8\[(\d+)\]\{0\}\) custom-call\("
                     r"[^)]*\), custom_call_target=\"(__cudnn\$conv[A-Za-z]*)\"", txt)
  layouts = {}
  for _, _, lay, _, _ in convs:
    layouts[lay] = layouts.get(lay, 0) + 1
  return {"convs": len(convs), "conv_targets": sorted({c[4] for c in convs}),
          "scratch_nonzero": sum(1 for c in convs if int(c[3]) > 0),
          "scratch_max": max([int(c[3]) for c in convs] + [0]), "conv_out_layouts": layouts,
          "fusions": txt.count(" fusion("), "copies": len(re.findall(r"= [a-z0-9]+\[[^\]]*\]\{[^}]*\} copy\(", txt)),
          "transposes": txt.count(" transpose("), "lines": txt.count("\n")}


# ============================================================================ search

def search_main() -> None:
  """``search`` mode: how long ``ios_schedule`` takes with the on-device stage profiler, from an empty
  profile cache (cold) and from the cache file the cold search wrote (warm: a new ``StageProfiler``
  loading it, in the same process), and the relative L2 error of the schedule's outputs against plain
  ``jax.jit`` (run with NVIDIA_TF32_OVERRIDE=0 for the float32-rounding check)."""
  ap = _mode_parser(search_main.__doc__, name=None)
  ap.add_argument("--net", default="inception_v3")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--strategy", default="merge", choices=("merge", "both", "parallel"))
  ap.add_argument("--warm", type=int, default=2, help="warm searches after the cold one")
  ap.add_argument("--cache", default=None, help="profile cache file (default: a new temporary file)")
  ap.add_argument("--compile_threads", type=int, default=8, help="StageProfiler compile threads")
  args = ap.parse_args()
  t_start = time.perf_counter()
  dtype = jnp.dtype(args.dtype)
  model, shape = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)[args.net]
  params = ios_init_params(model, shape, seed=0)
  f = lambda v: model.apply(params, v)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch,) + tuple(shape[1:]), dtype)
  on_gpu = jax.default_backend() == "gpu"
  cache = args.cache or os.path.join(tempfile.mkdtemp(), "ios_profile_cache.json")
  if os.path.exists(cache) and not args.cache:
    os.remove(cache)
  runs, sc = [], None
  for i in range(1 + args.warm):
    prof = (sched.StageProfiler(cache_path=cache, compile_threads=args.compile_threads) if on_gpu
            else sched.AnalyticalCost())
    t0 = time.perf_counter()
    sc = sched.ios_schedule(f, x, strategy=args.strategy, profiler=prof, check="off", verbose=i == 0)
    wall = time.perf_counter() - t0
    runs.append({"kind": "cold" if i == 0 else "warm", "search_s": sc.search_s, "wall_s": wall,
                 "profiler": type(prof).__name__, "hits": getattr(prof, "hits", None),
                 "misses": getattr(prof, "misses", None), "compile_s": getattr(prof, "compile_s", None),
                 "profiled_stages": sc.info.get("profiled_stages"), "counts": sc.counts(),
                 "predicted_s": sc.predicted_latency})
    print(f"{runs[-1]['kind']} search: {sc.search_s:.2f} s ({runs[-1]['misses']} stages measured)", flush=True)
    payload = {"env": environment(), "argv": sys.argv[1:], "net": args.net, "dtype": args.dtype,
               "batch": args.batch, "strategy": args.strategy, "runs": runs,
               "cold_search_s": runs[0]["search_s"],
               "warm_search_s": min(r["search_s"] for r in runs[1:]) if runs[1:] else None,
               "tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"), "wall_s": time.perf_counter() - t_start}
    write_json(args.out, args.name or f"ios_search_{args.net}_{args.dtype}", payload)   # after every search
  payload["rel_err_vs_jit"] = err = _rel_err(sc(x), jax.jit(f)(x))
  payload["wall_s"] = time.perf_counter() - t_start
  print(f"rel. L2 error vs plain jit {err:.3g} (NVIDIA_TF32_OVERRIDE={payload['tf32_override']})", flush=True)
  write_json(args.out, args.name or f"ios_search_{args.net}_{args.dtype}", payload)




# ============================================================================ check

CHECK_DOC = """IOS as a user runs it: ``ios_schedule(..., check='measure')`` on the IOS networks over batch sizes and
dtypes. For each (net, dtype, batch) the search runs with the stage profiler, then the never-slower check
compiles the emitted schedule and the unscheduled function under plain jit and the best command-buffer
configurations (all before any run) and times them interleaved; the JSON keeps both times, the choice,
the search time and the output error against plain jit.

  PYTHONPATH=. python3 benchmarks/ios.py check --nets squeezenet,inception_v3 --batches 1,8 --out $OUT   # GPU
  PYTHONPATH=. python3 benchmarks/ios.py check --small                                                # CPU smoke
"""


def check_args():
  ap = _mode_parser(CHECK_DOC, name="ios_check")
  ap.add_argument("--nets", default="squeezenet,inception_v3")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--strategy", default="merge", choices=("merge", "both", "parallel"))
  ap.add_argument("--cache", default=None, help="stage-profile cache file (JSON), kept between runs")
  ap.add_argument("--time_budget_s", type=float, default=480.0, help="stop starting new cases after this")
  return ap.parse_args()


def check_main():
  args = check_args()
  env = environment()
  on_gpu = jax.default_backend() == "gpu"
  rows, t_start = [], time.perf_counter()
  for net in args.nets.split(","):
    for dtype_name in args.dtypes.split(","):
      dtype = jnp.dtype(dtype_name)
      model, shape = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)[net]
      params = ios_init_params(model, shape, seed=0)   # nonzero biases, like trained weights
      for b in (int(v) for v in args.batches.split(",")):
        if time.perf_counter() - t_start > args.time_budget_s:
          print(f"time budget reached; skipping {net} {dtype_name} batch {b}", flush=True)
          continue
        x = jax.random.normal(jax.random.PRNGKey(1), (b,) + tuple(shape[1:]), dtype)
        f = lambda v, p=params, m=model: m.apply(p, v)
        profiler = sched.StageProfiler(cache_path=args.cache) if on_gpu else None
        t0 = time.perf_counter()
        s = sched.ios_schedule(f, x, strategy=args.strategy, profiler=profiler, check="measure")
        total_s = time.perf_counter() - t0
        ref = jax.jit(f)(x)
        err = float(jnp.linalg.norm((s(x) - ref).astype(jnp.float32)) /
                    jnp.maximum(jnp.linalg.norm(ref.astype(jnp.float32)), 1e-30))
        c = s.info["check"]
        row = {"net": net, "dtype": dtype_name, "batch": b, "ios_s": c["ios_s"], "best_xla_s": c["xla_s"],
               "best_xla_config": c["xla_config"], "xla_all_s": c["xla_all_s"],
               "ios_vs_best_xla": c["xla_s"] / c["ios_s"], "choice": c["choice"],
               "program_vs_best_xla": c["xla_s"] / min(c["ios_s"], c["xla_s"]),
               "search_s": s.search_s, "search_and_check_s": total_s, "rel_err_vs_jit": err,
               "counts": s.counts(), "predicted_s": s.predicted_latency,
               "predicted_cp_s": s.predicted_critical_path,
               "profiler": {k: s.info.get(f"profiler_{k}") for k in ("hits", "misses", "compile_s")}}
        rows.append(row)
        print(f"{net} {dtype_name} b={b}: IOS {c['ios_s'] * 1e3:.3f} ms, best XLA {c['xla_s'] * 1e3:.3f} ms "
              f"({c['xla_config']}), runs {c['choice']}; search {s.search_s:.1f} s", flush=True)
        write_json(args.out, args.name, {"env": env, "argv": sys.argv, "rows": rows})
  print_table(rows, ["net", "dtype", "batch", "ios_s", "best_xla_s", "best_xla_config", "ios_vs_best_xla",
                     "choice", "search_s", "rel_err_vs_jit"])


# ============================================================================ batch

BATCH_DOC = """IOS batch-size specialization (Ding et al., MLSys 2021, Sec. 7): for each (net, dtype, batch) the
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


def batch_args():
  ap = _mode_parser(BATCH_DOC, name="ios_batch")
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
  ap.add_argument("--schedules", default="", help="directory of saved schedules sched_<net>_<dtype>_b<batch>_"
                  "<strategy>.json (Schedule.to_json, e.g. written by --save_schedules on a CPU: the "
                  "analytical search does not depend on the device): loaded with Schedule.from_json, which "
                  "checks the graph fingerprint and that the stages are a valid schedule, instead of a search; "
                  "a missing or mismatched file falls back to the search (or is skipped with --no_search)")
  ap.add_argument("--no_search", action="store_true", help="with --schedules: a case and strategy without a "
                  "saved schedule that fits is skipped, not searched (e.g. NasNet-A's IOS-Both, whose "
                  "analytical search takes many minutes at part_size 50)")
  ap.add_argument("--save_schedules", default="", help="directory to write every schedule used to")
  ap.add_argument("--search_only", action="store_true", help="search (and --save_schedules) only, time nothing")
  ap.add_argument("--fit", action="store_true", help="only fit the correction model on --inputs JSONs")
  ap.add_argument("--inputs", default="", help="comma-separated ios_batch JSONs for --fit")
  ap.add_argument("--table", action="store_true", help="only print markdown tables of --inputs JSONs")
  return ap.parse_args()


def stage_sig(sc) -> str:
  return json.dumps([[st.kind, [list(g) for g in st.groups]] for st in sc.stages])


_GRAPHS: dict = {}


def batch_retarget(sc, fn, x, profiler):
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


def saved_schedule_name(net: str, dtype: str, batch: int, strategy: str) -> str:
  return f"sched_{net}_{dtype}_b{batch}_{strategy}.json"


def load_schedule(args, net, dtype, batch, strategy, fn, x, ios_opts, log):
  """The saved schedule of ``--schedules`` for this case (``Schedule.from_json``: the graph fingerprint
  must match and the stages must be a valid schedule of it; no never-slower check, the batch run times
  the programs itself), its IOS compiler options set to this run's ``--ios_options``; None when there is
  no such file or it does not fit this graph (the caller then searches; with --no_search it skips the
  case)."""
  if not args.schedules:
    return None
  path = os.path.join(args.schedules, saved_schedule_name(net, dtype, batch, strategy))
  if not os.path.exists(path):
    log(f"{net} {dtype} b{batch} {strategy}: no saved schedule {path}")
    return None
  try:
    sc = sched.Schedule.from_json(open(path).read(), fn, x, check="off")
  except ValueError as e:
    log(f"{net} {dtype} b{batch} {strategy}: saved schedule {path} rejected ({e})")
    return None
  if sc.info.get("strategy") != strategy:
    log(f"{net} {dtype} b{batch} {strategy}: {path} holds a {sc.info.get('strategy')!r} schedule")
    return None
  sc.info["compiler_options"] = dict(ios_opts or {})
  sc.info["loaded_from"] = os.path.basename(path)
  return sc


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


def batch_main():
  args = batch_args()
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
  configs = configs or ["jit"]   # off GPU the command-buffer configurations do not apply
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
        sc = load_schedule(args, net, dt, b, strat, f, xs[b], ios_opts, log)
        if sc is None and args.schedules and args.no_search:
          payload["skipped"].append(f"search {net} {dt} b{b} {strat} (no saved schedule, --no_search)")
          continue
        if sc is None:
          sc = sched.ios_schedule(f, xs[b], strategy=strat, profiler=prof, check="off",
                                  compiler_options=ios_opts)
        found[(b, strat)] = sc
        if args.save_schedules:
          os.makedirs(args.save_schedules, exist_ok=True)
          with open(os.path.join(args.save_schedules, saved_schedule_name(net, dt, b, strat)), "w") as fh:
            fh.write(sc.to_json())
        log(f"{net} {dt} b{b} {strat}: {'loaded' if sc.info.get('loaded_from') else 'search'} "
            f"{sc.search_s:.1f} s, {sc.counts()}, pred {sc.predicted_latency * 1e3:.3f} ms")
    sigs = {k: stage_sig(sc) for k, sc in found.items()}
    distinct = {}   # signature -> list of (b, strategy) that found it
    for k, sg in sigs.items():
      distinct.setdefault(sg, []).append(k)
    log(f"{net} {dt}: {len(found)} searches, {len(distinct)} distinct schedules")
    if args.search_only:
      for (b, strat), sc in found.items():
        payload["rows"].append({"net": net, "dtype": dt, "batch": b, "strategy": strat,
                                "search_s": sc.search_s, "counts": sc.counts(),
                                "pred_s": sc.predicted_latency, "fingerprint": sc.graph.fingerprint()})
      flush()
      continue
    for b in batches:
      if time.perf_counter() - t_start > args.time_budget_s:
        payload["skipped"].append(f"time {net} {dt} b{b}")
        log(f"skip {net} {dt} b{b}: time budget")
        continue
      if args.confirm_only and (net, dt, b) not in earlier:
        continue   # nothing to confirm at this batch size
      if args.no_search and not any(kb == b for kb, _ in found):
        payload["skipped"].append(f"time {net} {dt} b{b} (no IOS schedule)")
        continue   # nothing of IOS to time against the XLA programs
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
        sc = src if own else batch_retarget(src, f, x, prof if isinstance(prof, sched.AnalyticalCost)
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
        if found[(b, strat)].info.get("loaded_from"):
          row[f"ios_{strat}_loaded_from"] = found[(b, strat)].info["loaded_from"]
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


# ============================================================================ isolated

ISOLATED_DOC = """IOS vs XLA with every program timed in a fresh process (no shared autotuning or capture state).

Why: a long process that has run the stage profiler (hundreds of captured command-buffer programs,
compiles from several threads) is not a safe place to compile what you compare: on an H100 a later
compilation there failed XLA's autotuning outright ("All configs failed during profiling ...
cudaErrorStreamCaptureInvalidated"). Here:

1. one child process searches IOS-Merge / IOS-Both with the stage profiler and writes the schedules
   (or ``--schedules DIR`` gives saved ones);
2. every program (XLA configurations of the unscheduled net, IOS schedules re-applied with
   ``Schedule.from_json``) is compiled, run and timed in its own fresh child process (``isolated``);
3. one more child compiles every program before running any of them (``--run_after_compile``: each right
   after its compilation), then times them interleaved (rounds of ``number`` back-to-back calls with a
   rotating start).

Ratios are against the fastest XLA program of the same method. Outputs are compared with plain jit (from
the interleaved child). Weights: ``--init random`` (nonzero biases, like trained weights) or ``flax``
(``model.init``: zero biases, which XLA folds away when the weights are constants, changing its program).

  PYTHONPATH=. python3 benchmarks/ios.py isolated --net inception_v3 --dtypes float32 --out $OUT  # GPU
  PYTHONPATH=. python3 benchmarks/ios.py isolated --small                                    # CPU smoke
"""


XLA_PROGRAMS = {  # name -> (XLA_CONFIGS key, weights closed over)
    "jit": ("jit", False),
    "cc": ("cmdbuf_conv_concurrent", False),
    "jit_const": ("jit", True),
    "cc_const": ("cmdbuf_conv_concurrent", True),
    "cc_const_lhs": ("cmdbuf_conv_concurrent_lhs", True),
    "cc_const_cf": ("cmdbuf_conv_concurrent_convfusion", True),
}
IOS_PROGRAMS = ("ios_seq", "ios_seq_ka", "ios_merge", "ios_both")


def iso_setup(args, dtype_name):
  dtype = jnp.dtype(dtype_name)
  nets = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)
  model, shape = nets[args.net]
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  if args.init == "flax":  # flax's initial values: zero biases (XLA folds adds of zero constants)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  else:  # random nonzero kernels and biases, like trained weights
    params = ios_init_params(model, shape, seed=0)
  return model, params, x


def iso_sched_path(args, dtype_name, strategy):
  return os.path.join(args.schedules or args.work, f"sched_{args.net}_{dtype_name}_{strategy}.json")


def iso_build(args, name, model, params, x):
  """(compiled, call args) of one program, compiled but not run."""
  on_gpu = jax.default_backend() == "gpu"
  if name in XLA_PROGRAMS:
    cfg, const = XLA_PROGRAMS[name]
    opts = sched.XLA_CONFIGS[cfg] if on_gpu else {}
    if const:
      return jax.jit(lambda x: model.apply(params, x), compiler_options=opts or None).lower(x).compile(), (x,)
    return jax.jit(model.apply, compiler_options=opts or None).lower(params, x).compile(), (params, x)
  if name.startswith("ios_seq"):
    return iso_build_saved(args, model, params, x, "merge", lambda sc: sched.sequential_schedule(sc.graph),
                       keep_alive=name.endswith("_ka"))
  return iso_build_saved(args, model, params, x, name[len("ios_"):])


def iso_build_saved(args, model, params, x, strategy, restage=None, **info):
  """(compiled, call args) of the saved ``strategy`` schedule (``Schedule.from_json``, no search); with
  ``restage``, its stages replaced by ``restage(schedule)``; ``info`` overrides emission options (e.g.
  ``keep_alive``)."""
  sc = sched.Schedule.from_json(open(iso_sched_path(args, x.dtype.name, strategy)).read(),
                                lambda x: model.apply(params, x), x, part_size=args.part_size)
  if restage is not None or info:
    stages = sc.stages if restage is None else restage(sc)
    sc = sched.Schedule(sc.graph, stages, [0.0] * len(stages), sc.emission, 0.0, {**sc.info, **info})
  return sc.lower(x).compile(), (sc._build()[1], x)


def iso_search_options(args) -> dict:
  """Extra XLA options of the stage profiles and of the emitted IOS programs."""
  return dict(sched.CONV_FUSION_OPTIONS) if args.conv_fusion else {}


def stats_ms(ts):
  return {"ms": round(float(np.median(ts)) * 1e3, 4),
          "iqr_ms": [round(float(np.percentile(ts, q)) * 1e3, 4) for q in (25, 75)]}


def iso_child_search(args):
  model, params, x = iso_setup(args, args.dtype)
  fc = lambda x: model.apply(params, x)
  on_gpu = jax.default_backend() == "gpu"
  out = {}
  opts = iso_search_options(args) if on_gpu else {}
  for strategy in args.strategies.split(","):
    prof = (sched.StageProfiler(mode="cuda_graph", parallel="sum", compiler_options=opts,
                                cache_path=os.path.join(args.work, f"cache_{args.dtype}.json"))
            if on_gpu else None)
    t0 = time.perf_counter()
    sc = sched.ios_schedule(fc, x, r=args.r, s=args.s, strategy=strategy, profiler=prof,
                            part_size=args.part_size,
                            compiler_options=opts or None)
    out[f"search_{strategy}_s"] = round(time.perf_counter() - t0, 1)
    out[f"{strategy}_pred_ms"] = round(sc.predicted_latency * 1e3, 4)
    out[f"{strategy}_counts"] = sc.counts()
    with open(iso_sched_path(args, args.dtype, strategy), "w") as fh:
      fh.write(sc.to_json())
  print("RESULT " + json.dumps(out), flush=True)


def iso_child_time(args):
  """Compile every named program, then run each once (``--run_after_compile``: right after its own
  compilation), then time them (interleaved if several)."""
  model, params, x = iso_setup(args, args.dtype)
  names = args.programs.split(",")
  built, res = {}, {}
  first = {}

  def first_call(n):
    c, a = built[n]
    t0 = time.perf_counter()
    first[n] = jax.block_until_ready(c(*a))
    res[n]["first_call_s"] = round(time.perf_counter() - t0, 3)

  for n in names:
    t0 = time.perf_counter()
    try:
      built[n] = iso_build(args, n, model, params, x)
      res[n] = {"compile_s": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001
      res[n] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      continue
    if args.run_after_compile:  # the order of a naive script: compile, run, compile the next, ...
      first_call(n)
  for n in built:  # otherwise: first calls only after every compilation
    if n not in first:
      first_call(n)
    np.save(os.path.join(args.work, f"y_{args.tag}_{args.dtype}_{n}.npy"),
            np.asarray(first[n].astype("float32")))
  ts = interleaved_times(built, args.number, args.repeat)
  for n in built:
    res[n].update(stats_ms(ts[n]))
  for n in [t for t in args.trace.split(",") if t in built]:
    # per-call CUPTI kernel statistics (kernels, sum of kernel times, busy = union, overlap)
    try:
      tr = trace_kernels(built[n][0], built[n][1], n)
      res[n]["trace"] = {k: v for k, v in tr.items() if k != "kernel_list"}
    except Exception as e:  # noqa: BLE001
      res[n]["trace"] = {"error": str(e)[:200]}
  print("RESULT " + json.dumps(res), flush=True)


def iso_run_child(args, mode, dtype, programs="", tag="iso"):
  cmd = [sys.executable, __file__, "isolated", "--child", mode, "--net", args.net, "--dtype", dtype,
         "--work", args.work, "--schedules", args.schedules, "--programs", programs,
         "--number", str(args.number), "--repeat", str(args.repeat), "--r", str(args.r), "--s", str(args.s),
         "--trace", args.trace if tag == "inter" else "", "--tag", tag,
         "--strategies", args.strategies, "--part_size", str(args.part_size), "--init", args.init,
         "--conv_fusion", str(args.conv_fusion),
         *(["--run_after_compile"] if args.run_after_compile else [])]
  if args.small:
    cmd.append("--small")
  t0 = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout_s)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
  if p.returncode != 0 or not lines:
    tail = (p.stderr or p.stdout)[-600:]
    return {"error": f"child {mode} {programs} rc={p.returncode}: {tail}"}, time.perf_counter() - t0
  return json.loads(lines[-1][len("RESULT "):]), time.perf_counter() - t0


def iso_ratios(res: dict, programs: list) -> dict:
  """Ratios against the fastest XLA program that ran; programs without a time are listed as failed."""
  ms = {n: res[n]["ms"] for n in programs if isinstance(res.get(n), dict) and "ms" in res[n]}
  out = {"failed": [n for n in programs if n in res and n not in ms]}
  xla = [n for n in ms if n in XLA_PROGRAMS]
  if not xla:
    return out
  best = min(xla, key=ms.get)
  out.update(best_xla=best, best_xla_ms=ms[best])
  for n in ms:
    out[f"{n}_vs_best_xla"] = round(ms[best] / ms[n], 3)
    if "jit" in ms:
      out[f"{n}_vs_jit"] = round(ms["jit"] / ms[n], 3)
  return out


def isolated_main():
  ap = _mode_parser(ISOLATED_DOC, name="ios_isolated")
  ap.add_argument("--net", default=None, help="inception_v3 (default), squeezenet, randwire, nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--dtype", default="float32", help="(child) the dtype of this child")
  ap.add_argument("--programs", default="jit,cc,cc_const,cc_const_lhs,ios_seq,ios_seq_ka,ios_merge,ios_both",
                  help=f"XLA programs {sorted(XLA_PROGRAMS)} and IOS programs {IOS_PROGRAMS}")
  ap.add_argument("--schedules", default="",
                  help="directory with sched_<net>_<dtype>_<merge|both>.json to use instead of a search")
  ap.add_argument("--strategies", default="merge,both", help="IOS searches (merge, both, parallel)")
  ap.add_argument("--conv_fusion", type=int, default=0,
                  help="1: stage profiles and IOS programs compiled with conv fusion (nets with many "
                       "depthwise convs; compare with cc_const_cf)")
  ap.add_argument("--cache", default="", help="stage-latency cache JSON to start from (copied)")
  ap.add_argument("--part_size", type=int, default=50, help="units per DP part (IOS cuts NasNet into ~25)")
  ap.add_argument("--r", type=int, default=3)
  ap.add_argument("--s", type=int, default=8)
  ap.add_argument("--number", type=int, default=30)
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--trace", default="", help="programs whose kernels are traced (interleaved child)")
  ap.add_argument("--init", default="random", choices=("random", "flax"),
                  help="weights: ios_init_params (nonzero biases) or jax.jit(model.init) (zero biases)")
  ap.add_argument("--skip_isolated", action="store_true", help="only the interleaved child")
  ap.add_argument("--run_after_compile", action="store_true",
                  help="interleaved child: run each program right after compiling it (a naive script's "
                       "order) instead of compiling every program first")
  ap.add_argument("--child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--work", default="", help=argparse.SUPPRESS)
  ap.add_argument("--tag", default="iso", help=argparse.SUPPRESS)
  ap.add_argument("--child_timeout_s", type=float, default=400)
  args = ap.parse_args()
  if args.child == "search":
    return iso_child_search(args)
  if args.child == "time":
    return iso_child_time(args)
  if args.net is None:
    args.net = "squeezenet" if args.small else "inception_v3"
  if args.small:
    args.number, args.repeat, args.r, args.s = 2, 2, 2, 3
  out_dir = args.out or os.environ.get("OUT") or "results/benchmarks"
  os.makedirs(out_dir, exist_ok=True)
  programs = args.programs.split(",")
  bad = [p for p in programs if p not in XLA_PROGRAMS and p not in IOS_PROGRAMS]
  if bad:
    raise SystemExit(f"unknown programs {bad}; choose from {sorted(XLA_PROGRAMS)} + {list(IOS_PROGRAMS)}")
  strategies = args.strategies.split(",")
  need = {"merge" if p.startswith("ios_seq") else p[len("ios_"):] for p in programs if p in IOS_PROGRAMS}
  if not args.schedules and need - set(strategies):
    raise SystemExit(f"programs {sorted(p for p in programs if p in IOS_PROGRAMS)} need the schedules "
                     f"{sorted(need)} (ios_seq* reuses the merge schedule's graph); add them to "
                     f"--strategies or pass --schedules DIR")
  # stage cache, searched schedules and outputs in a fresh scratch folder (the device returns at most 8
  # files); the searched schedules are copied next to the JSON at the end
  payload, flush, t_start = start_run(args, out_dir, "ios_isolated_")
  table = []
  for dt in args.dtypes.split(","):
    row = {"net": args.net, "dtype": dt}
    payload["rows"].append(row)
    if not args.schedules and any(p in IOS_PROGRAMS for p in programs):
      row["search"], secs = iso_run_child(args, "search", dt)
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} search ({secs:.0f} s): {row['search']}", flush=True)
      flush()
    iso = {}
    for p in programs if not args.skip_isolated else ():
      r, secs = iso_run_child(args, "time", dt, p)
      iso[p] = r.get(p, r)
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} isolated {p} ({secs:.0f} s): {iso[p]}", flush=True)
      row["isolated"] = iso
      row["isolated_ratios"] = iso_ratios(iso, programs)
      flush()
    row["isolated_ratios"] = iso_ratios(iso, programs)
    inter, secs = iso_run_child(args, "time", dt, ",".join(programs), tag="inter")
    row["interleaved"] = inter
    row["interleaved_ratios"] = iso_ratios(inter, programs)
    print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} interleaved ({secs:.0f} s): {inter}", flush=True)
    # outputs of the interleaved child (all programs of one process), else of the isolated children
    for tag in ("inter", "iso"):
      y = {p: os.path.join(args.work, f"y_{tag}_{dt}_{p}.npy") for p in programs}
      y = {p: f for p, f in y.items() if os.path.exists(f)}
      if "jit" in y:
        ref = np.load(y["jit"])
        row["relerr_vs_jit"] = {p: relerr(np.load(f), ref) for p, f in y.items()}
        row["relerr_from"] = "interleaved" if tag == "inter" else "isolated"
        break
    flush()
    for p in programs:
      table.append({"dtype": dt, "program": p,
                    "isolated_ms": iso.get(p, {}).get("ms"),
                    "iso_vs_best_xla": row["isolated_ratios"].get(f"{p}_vs_best_xla"),
                    "interleaved_ms": inter.get(p, {}).get("ms") if isinstance(inter.get(p), dict) else None,
                    "inter_vs_best_xla": row["interleaved_ratios"].get(f"{p}_vs_best_xla"),
                    "relerr_vs_jit": row.get("relerr_vs_jit", {}).get(p)})
  if not args.schedules:
    for dt in args.dtypes.split(","):
      for strategy in args.strategies.split(","):
        src = iso_sched_path(args, dt, strategy)
        if os.path.exists(src):
          shutil.copy(src, os.path.join(out_dir, os.path.basename(src)))
  shutil.rmtree(args.work, ignore_errors=True)
  print_table(table, ["dtype", "program", "isolated_ms", "iso_vs_best_xla", "interleaved_ms",
                      "inter_vs_best_xla", "relerr_vs_jit"])


# ============================================================================ chain

CHAIN_DOC = """The fastest any inter-operator schedule can be: time the network's longest dependency chains alone.

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

  PYTHONPATH=. python3 benchmarks/ios.py chain --net inception_v3 --dtypes float32,bfloat16 \
      --schedules benchmarks/results/ios_sched_h100 --out $OUT                       # GPU
  PYTHONPATH=. python3 benchmarks/ios.py chain --small                             # CPU smoke
"""


def chain_setup(args, dtype_name):
  ns = argparse.Namespace(small=args.small, net=args.net, init="random")
  return iso_setup(ns, dtype_name)


def chain_graph(args, model, params, x):
  return sched.relayout_conv_kernels(
      sched.build_graph(lambda x: model.apply(params, x), x, part_size=args.part_size), "auto")


def chain_options(args):
  """The IOS emission's XLA options (empty off GPU), as the chains are compiled."""
  from mlsys_jax.sched import emit
  if jax.default_backend() != "gpu":
    return {}
  return {**emit.compiler_options("cuda_graph"), **iso_search_options(args)}


def chain_child_paths(args):
  from mlsys_jax.sched.bound import longest_paths
  model, params, x = chain_setup(args, args.dtype)
  g = chain_graph(args, model, params, x)
  t0 = time.perf_counter()
  ana = sched.AnalyticalCost()
  ana_lat = [ana.unit_time(g, u) for u in range(len(g.units))]
  if jax.default_backend() == "gpu":
    prof = sched.StageProfiler(mode="cuda_graph", compiler_options=iso_search_options(args),
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


def chain_build(args, i, g, x):
  """(compiled, call args) of chain ``i`` of this dtype's paths file, on the unit graph ``g``."""
  from mlsys_jax.sched.bound import path_program
  from mlsys_jax.sched.cost import _random_like
  with open(os.path.join(args.work, f"paths_{args.dtype}.json")) as fh:
    units = json.load(fh)["paths"][i]["units"]
  fn, extra_ids = path_program(g, units)
  extras = tuple(_random_like(g.avals[v], jax.random.PRNGKey(10 + j)) for j, v in enumerate(extra_ids))
  consts = g.consts
  if args.extras == "arg":
    f = jax.jit(lambda extras, x: fn(consts, extras, x), compiler_options=chain_options(args) or None)
    return f.lower(extras, x).compile(), (extras, x)
  # closed over, like the weights: as 35 jit arguments they cost more host time per call than the
  # chain's GPU time (bf16 Inception-V3: 0.39 ms per call for a 0.31 ms GPU span)
  f = jax.jit(lambda x: fn(consts, extras, x), compiler_options=chain_options(args) or None)
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


def chain_build_offchain(args, model, params, x, which=None):
  """IOS-Merge with no merge on the timed chains (all of them, or chain ``which``): a merge puts a bigger
  kernel and a slice copy on the chain (bf16 Inception-V3 Mixed_5b: 2.85 us alone vs 6.08 + 1.44 us)."""
  with open(os.path.join(args.work, f"paths_{args.dtype}.json")) as fh:
    paths = json.load(fh)["paths"]
  chain_units = {u for i, p in enumerate(paths) if which in (None, i) for u in p["units"]}
  return iso_build_saved(args, model, params, x, "merge", lambda sc: offchain_stages(sc.stages, chain_units))


def chain_child_time(args):
  model, params, x = chain_setup(args, args.dtype)
  built, res = {}, {}
  g = None  # the unit graph, built once for all chains
  for n in args.programs.split(","):
    t0 = time.perf_counter()
    try:
      if n.startswith("chain"):
        g = g or chain_graph(args, model, params, x)
        built[n] = chain_build(args, int(n[len("chain"):]), g, x)
      elif n.startswith("ios_merge_offchain"):
        k = n[len("ios_merge_offchain"):]
        built[n] = chain_build_offchain(args, model, params, x, int(k) if k else None)
      else:
        built[n] = iso_build(args, n, model, params, x)
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
    for n in built:
      if not n.startswith("chain"):
        res[n]["relerr_vs_" + ref] = relerr(np.asarray(outs[n], np.float32), np.asarray(outs[ref], np.float32))
  ts = interleaved_times(built, args.number, args.repeat)
  for n in built:
    res[n].update(stats_ms(ts[n]))
  if args.trace and jax.default_backend() == "gpu":
    for n in built:
      try:
        tr = trace_kernels(built[n][0], built[n][1], n)
        keep = n in args.kernel_lists.split(",")  # one call's [start, dur, stream, name] per kernel
        res[n]["trace"] = {k: v for k, v in tr.items() if k != "kernel_list" or keep}
      except Exception as e:  # noqa: BLE001
        res[n]["trace"] = {"error": str(e)[:200]}
  print("RESULT " + json.dumps(res), flush=True)


def chain_run_child(args, mode, dtype, programs=""):
  cmd = [sys.executable, __file__, "chain", "--child", mode, "--net", args.net, "--dtype", dtype,
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


def chain_main():
  ap = _mode_parser(CHAIN_DOC, name="ios_chain_bound")
  ap.add_argument("--net", default=None, help="inception_v3 (default), squeezenet, randwire, nasnet")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  ap.add_argument("--xla", default="cc_const,cc_const_lhs", help="XLA programs (isolated mode names: XLA_PROGRAMS)")
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
  args = ap.parse_args()
  if args.net is None:
    args.net = "squeezenet" if args.small else "inception_v3"
  if args.child == "paths":
    return chain_child_paths(args)
  if args.child == "time":
    return chain_child_time(args)
  if args.small:
    args.number, args.repeat = 2, 2
  if args.ios and not args.schedules:
    raise SystemExit("--ios programs need --schedules DIR (saved schedules); pass --ios '' to skip them")
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
      row["paths"] = chain_run_child(args, "paths", dt)
    print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} paths: "
          f"{[(p['pred_us'], len(p['units'])) for p in row['paths'].get('paths', [])]}", flush=True)
    flush()
    if "error" in row["paths"]:
      continue
    chains_dt = chains[:len(row["paths"]["paths"])]
    iso = {}
    for p in (xla + ios + chains_dt) if not args.skip_isolated else ():
      iso[p] = chain_run_child(args, "time", dt, p).get(p, {"error": "no result"})
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} isolated {p}: {iso[p]}", flush=True)
      row["isolated"] = iso
      flush()
    if iso:
      row["isolated_bound"] = bound_ratios(iso, xla, chains_dt)
    inter = chain_run_child(args, "time", dt, ",".join(xla + ios + chains_dt))
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


# ============================================================================ trace

TRACE_DOC = """``trace`` mode: what the GPU runs per call. For one net, dtype and batch size, compiles the unscheduled
net (weights closed over) under the XLA configurations ``--configs`` and the IOS programs (``--strategies``,
searched with the analytical model, or ``--schedules DIR`` with saved ``sched_<net>_<dtype>_<strategy>.json``),
all before any runs; times them interleaved, then traces each (CUPTI via jax.profiler: kernels per call,
summed kernel time, busy time, time with >= 2 kernels running, span, streams) and counts HLO conv custom
calls, fusions, copies and transposes. On a machine without a GPU the trace entries hold an error.

  PYTHONPATH=. python3 benchmarks/ios.py trace --net inception_v3 --dtype float32 --out $OUT   # GPU
  PYTHONPATH=. python3 benchmarks/ios.py trace --small                                         # CPU smoke
"""


def trace_main():
  ap = _mode_parser(TRACE_DOC, name=None)
  ap.add_argument("--net", default="inception_v3")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--configs", default="cmdbuf_conv_concurrent,cmdbuf_conv_concurrent_lhs")
  ap.add_argument("--strategies", default="merge")
  ap.add_argument("--schedules", default="", help="directory with saved schedules (no search)")
  ap.add_argument("--kernel_lists", default="", help="programs whose kernels are all listed")
  ap.add_argument("--number", type=int, default=30)
  ap.add_argument("--repeat", type=int, default=7)
  args = ap.parse_args()
  if args.small:
    args.number, args.repeat = 2, 2
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.dtype(args.dtype)
  model, shape = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)[args.net]
  params = ios_init_params(model, shape, seed=0)
  f = lambda v: model.apply(params, v)
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch,) + tuple(shape[1:]), dtype)
  progs = {}
  for c in args.configs.split(","):
    opts = sched.XLA_CONFIGS[c] if on_gpu else {}
    progs["xla:" + c] = (jax.jit(f, compiler_options=opts or None).lower(x).compile(), (x,))
  for strat in [s for s in args.strategies.split(",") if s]:
    if args.schedules:
      path = os.path.join(args.schedules, f"sched_{args.net}_{args.dtype}_{strat}.json")
      sc = sched.Schedule.from_json(open(path).read(), f, x, check="off")
    else:
      sc = sched.ios_schedule(f, x, strategy=strat, profiler=sched.AnalyticalCost(), check="off")
    jf, consts = sc._build()
    progs["ios:" + strat] = (jf.lower(consts, x).compile(), (consts, x))
  ref = progs[next(iter(progs))][0](*progs[next(iter(progs))][1])
  ts = interleaved_times(progs, args.number, args.repeat)
  res = {}
  for n, (c, a) in progs.items():
    res[n] = {**stats_ms(ts[n]), "relerr_vs_first": relerr(c(*a), ref), "hlo": hlo_stats(c)}
    try:
      tr = trace_kernels(c, a, n.replace(":", "_"))
      keep = n in args.kernel_lists.split(",")
      res[n]["trace"] = {k: v for k, v in tr.items() if k != "kernel_list" or keep}
    except Exception as e:  # noqa: BLE001
      res[n]["trace"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(n, res[n]["ms"], "ms", {k: v for k, v in res[n]["trace"].items() if k != "kernel_list"}, flush=True)
  write_json(args.out, args.name or f"ios_trace_{args.net}_{args.dtype}_b{args.batch}",
             {"env": environment(), "argv": sys.argv[1:], "programs": res})


MODES = {"search": search_main, "check": check_main, "batch": batch_main, "isolated": isolated_main,
         "chain": chain_main, "trace": trace_main}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in MODES:
    raise SystemExit(f"usage: ios.py MODE [args]; MODE is one of {sorted(MODES)}\n\n{__doc__}")
  mode = sys.argv.pop(1)
  MODES[mode]()


if __name__ == "__main__":
  main()
