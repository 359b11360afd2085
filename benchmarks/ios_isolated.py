"""IOS vs XLA with every program timed in a fresh process (no shared autotuning or capture state).

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

  PYTHONPATH=. python3 benchmarks/ios_isolated.py --net inception_v3 --dtypes float32 --out $OUT  # GPU
  PYTHONPATH=. python3 benchmarks/ios_isolated.py --small                                    # CPU smoke
"""

from __future__ import annotations

import argparse
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

XLA_PROGRAMS = {  # name -> (XLA_CONFIGS key, weights closed over)
    "jit": ("jit", False),
    "cc": ("cmdbuf_conv_concurrent", False),
    "jit_const": ("jit", True),
    "cc_const": ("cmdbuf_conv_concurrent", True),
    "cc_const_lhs": ("cmdbuf_conv_concurrent_lhs", True),
    "cc_const_cf": ("cmdbuf_conv_concurrent_convfusion", True),
}
IOS_PROGRAMS = ("ios_seq", "ios_seq_ka", "ios_merge", "ios_both")


def _setup(args, dtype_name):
  import jax
  import jax.numpy as jnp
  from mlsys_jax.models import ios_benchmark_nets, ios_init_params
  dtype = jnp.dtype(dtype_name)
  nets = ios_benchmark_nets(small=args.small, dtype=None if dtype == jnp.float32 else dtype)
  model, shape = nets[args.net]
  x = jax.random.normal(jax.random.PRNGKey(1), shape, dtype)
  if args.init == "flax":  # flax's initial values: zero biases (XLA folds adds of zero constants)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  else:  # random nonzero kernels and biases, like trained weights
    params = ios_init_params(model, shape, seed=0)
  return model, params, x


def _sched_path(args, dtype_name, strategy):
  return os.path.join(args.schedules or args.work, f"sched_{args.net}_{dtype_name}_{strategy}.json")


def _build(args, name, model, params, x):
  """(compiled, call args) of one program, compiled but not run."""
  import jax
  from mlsys_jax import sched
  from benchmarks.ios_xla_baselines import XLA_CONFIGS
  on_gpu = jax.default_backend() == "gpu"
  if name in XLA_PROGRAMS:
    cfg, const = XLA_PROGRAMS[name]
    opts = XLA_CONFIGS[cfg] if on_gpu else {}
    if const:
      return jax.jit(lambda x: model.apply(params, x), compiler_options=opts or None).lower(x).compile(), (x,)
    return jax.jit(model.apply, compiler_options=opts or None).lower(params, x).compile(), (params, x)
  if name.startswith("ios_seq"):
    return build_saved(args, model, params, x, "merge", lambda sc: sched.sequential_schedule(sc.graph),
                       keep_alive=name.endswith("_ka"))
  return build_saved(args, model, params, x, name[len("ios_"):])


def build_saved(args, model, params, x, strategy, restage=None, **info):
  """(compiled, call args) of the saved ``strategy`` schedule (``Schedule.from_json``, no search); with
  ``restage``, its stages replaced by ``restage(schedule)``; ``info`` overrides emission options (e.g.
  ``keep_alive``)."""
  from mlsys_jax import sched
  sc = sched.Schedule.from_json(open(_sched_path(args, x.dtype.name, strategy)).read(),
                                lambda x: model.apply(params, x), x, part_size=args.part_size)
  if restage is not None or info:
    stages = sc.stages if restage is None else restage(sc)
    sc = sched.Schedule(sc.graph, stages, [0.0] * len(stages), sc.emission, 0.0, {**sc.info, **info})
  return sc.lower(x).compile(), (sc._build()[1], x)


def _search_options(args) -> dict:
  """Extra XLA options of the stage profiles and of the emitted IOS programs."""
  from benchmarks.ios_xla_baselines import CONV_FUSION_OPTIONS
  return dict(CONV_FUSION_OPTIONS) if args.conv_fusion else {}


def _stats(ts):
  return {"ms": round(float(np.median(ts)) * 1e3, 4),
          "iqr_ms": [round(float(np.percentile(ts, q)) * 1e3, 4) for q in (25, 75)]}


def child_search(args):
  import jax
  from mlsys_jax import sched
  model, params, x = _setup(args, args.dtype)
  fc = lambda x: model.apply(params, x)
  on_gpu = jax.default_backend() == "gpu"
  out = {}
  opts = _search_options(args) if on_gpu else {}
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
    with open(_sched_path(args, args.dtype, strategy), "w") as fh:
      fh.write(sc.to_json())
  print("RESULT " + json.dumps(out), flush=True)


def child_time(args):
  """Compile every named program, then run each once (``--run_after_compile``: right after its own
  compilation), then time them (interleaved if several)."""
  import jax
  from benchmarks.ios_latency import interleaved_times
  model, params, x = _setup(args, args.dtype)
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
      built[n] = _build(args, n, model, params, x)
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
    res[n].update(_stats(ts[n]))
  for n in [t for t in args.trace.split(",") if t in built]:
    # per-call CUPTI kernel statistics (kernels, sum of kernel times, busy = union, overlap)
    from benchmarks.ios_probe import trace_kernels
    try:
      tr = trace_kernels(built[n][0], built[n][1], n)
      res[n]["trace"] = {k: v for k, v in tr.items() if k != "kernel_list"}
    except Exception as e:  # noqa: BLE001
      res[n]["trace"] = {"error": str(e)[:200]}
  print("RESULT " + json.dumps(res), flush=True)


def _run_child(args, mode, dtype, programs="", tag="iso"):
  cmd = [sys.executable, __file__, "--child", mode, "--net", args.net, "--dtype", dtype,
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


def _ratios(res: dict, programs: list) -> dict:
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


def start_run(args, out_dir: str, prefix: str):
  """Scratch folder ``args.work`` (with ``args.cache`` copied in per dtype), the environment printed, and
  ``(payload, flush, t_start)``: ``flush()`` writes ``payload`` (+ wall time) to ``out_dir/args.name.json``."""
  from benchmarks.common import environment
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


def main():
  ap = argparse.ArgumentParser(description=__doc__)
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
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--name", default="ios_isolated")
  args = ap.parse_args()
  if args.child == "search":
    return child_search(args)
  if args.child == "time":
    return child_time(args)
  if args.net is None:
    args.net = "squeezenet" if args.small else "inception_v3"
  if args.small:
    args.number, args.repeat, args.r, args.s = 2, 2, 2, 3
  from benchmarks.common import print_table
  from benchmarks.ios_latency import relerr
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
      row["search"], secs = _run_child(args, "search", dt)
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} search ({secs:.0f} s): {row['search']}", flush=True)
      flush()
    iso = {}
    for p in programs if not args.skip_isolated else ():
      r, secs = _run_child(args, "time", dt, p)
      iso[p] = r.get(p, r)
      print(f"[{time.perf_counter() - t_start:6.1f}s] {dt} isolated {p} ({secs:.0f} s): {iso[p]}", flush=True)
      row["isolated"] = iso
      row["isolated_ratios"] = _ratios(iso, programs)
      flush()
    row["isolated_ratios"] = _ratios(iso, programs)
    inter, secs = _run_child(args, "time", dt, ",".join(programs), tag="inter")
    row["interleaved"] = inter
    row["interleaved_ratios"] = _ratios(inter, programs)
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
        src = _sched_path(args, dt, strategy)
        if os.path.exists(src):
          shutil.copy(src, os.path.join(out_dir, os.path.basename(src)))
  shutil.rmtree(args.work, ignore_errors=True)
  print_table(table, ["dtype", "program", "isolated_ms", "iso_vs_best_xla", "interleaved_ms",
                      "inter_vs_best_xla", "relerr_vs_jit"])


if __name__ == "__main__":
  main()
