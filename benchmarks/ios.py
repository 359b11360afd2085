"""One entry point for the IOS benchmarks (Ding et al., MLSys 2021); each mode is a script of its own:

  search     search time of ios_schedule with the stage profiler: cold (empty profile cache), then warm
             (a new profiler reading the cache file), and the schedule's output error vs plain jit
  check      ios_schedule(check='measure') over nets, dtypes and batch sizes: IOS vs the best XLA program
             and which one runs (benchmarks/ios_check.py)
  batch      batch-size specialization: best XLA vs IOS-Merge vs IOS-Both per batch, and the cross table
             (schedule found at b1 run at b2) (ios_batch.py)
  baselines  plain jit vs per-jit XLA configurations of the unscheduled nets (ios_xla_baselines.py)
  isolated   IOS and XLA programs, each timed in a fresh process (ios_isolated.py)
  chain      the longest dependency chain alone: a bound on any schedule (ios_chain_bound.py)
  latency    search + in-process interleaved timing, one process (ios_latency.py)
  probe      network / stage probes with kernel traces (ios_probe.py)
  compile    first-call cost of programs with many depthwise convs (ios_compile_probe.py)

  PYTHONPATH=. python3 benchmarks/ios.py MODE [mode arguments]     # e.g. check --small; MODE --help
"""

from __future__ import annotations

import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MODES = {"check": "ios_check", "batch": "ios_batch", "baselines": "ios_xla_baselines", "isolated": "ios_isolated",
         "chain": "ios_chain_bound", "latency": "ios_latency", "probe": "ios_probe",
         "compile": "ios_compile_probe"}


def search_main() -> None:
  """``search`` mode: how long ``ios_schedule`` takes with the on-device stage profiler, from an empty
  profile cache (cold) and from the cache file the cold search wrote (warm: a new ``StageProfiler``
  loading it, in the same process), and the relative L2 error of the schedule's outputs against plain
  ``jax.jit`` (run with NVIDIA_TF32_OVERRIDE=0 for the float32-rounding check)."""
  import argparse
  import os
  import tempfile
  import time
  import jax
  import jax.numpy as jnp
  from benchmarks.common import environment, write_json
  from mlsys_jax import sched
  from mlsys_jax.models import ios_benchmark_nets, ios_init_params
  from mlsys_jax.sched.api import _rel_err
  ap = argparse.ArgumentParser(description=search_main.__doc__)
  ap.add_argument("--net", default="inception_v3")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--strategy", default="merge", choices=("merge", "both", "parallel"))
  ap.add_argument("--warm", type=int, default=2, help="warm searches after the cold one")
  ap.add_argument("--cache", default=None, help="profile cache file (default: a new temporary file)")
  ap.add_argument("--name", default=None)
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="small nets, CPU smoke test (analytical model)")
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
    prof = sched.StageProfiler(cache_path=cache) if on_gpu else sched.AnalyticalCost()
    t0 = time.perf_counter()
    sc = sched.ios_schedule(f, x, strategy=args.strategy, profiler=prof, check="off")
    wall = time.perf_counter() - t0
    runs.append({"kind": "cold" if i == 0 else "warm", "search_s": sc.search_s, "wall_s": wall,
                 "profiler": type(prof).__name__, "hits": getattr(prof, "hits", None),
                 "misses": getattr(prof, "misses", None), "compile_s": getattr(prof, "compile_s", None),
                 "profiled_stages": sc.info.get("profiled_stages"), "counts": sc.counts(),
                 "predicted_s": sc.predicted_latency})
    print(f"{runs[-1]['kind']} search: {sc.search_s:.2f} s ({runs[-1]['misses']} stages measured)", flush=True)
  err = _rel_err(sc(x), jax.jit(f)(x))
  payload = {"env": environment(), "argv": sys.argv[1:], "net": args.net, "dtype": args.dtype,
             "batch": args.batch, "strategy": args.strategy, "runs": runs,
             "cold_search_s": runs[0]["search_s"],
             "warm_search_s": min(r["search_s"] for r in runs[1:]) if runs[1:] else None,
             "rel_err_vs_jit": err, "tf32_override": os.environ.get("NVIDIA_TF32_OVERRIDE"),
             "wall_s": time.perf_counter() - t_start}
  print(f"rel. L2 error vs plain jit {err:.3g} (NVIDIA_TF32_OVERRIDE={payload['tf32_override']})", flush=True)
  write_json(args.out, args.name or f"ios_search_{args.net}_{args.dtype}", payload)


def main() -> None:
  if len(sys.argv) >= 2 and sys.argv[1] == "search":
    sys.argv.pop(1)
    return search_main()
  if len(sys.argv) < 2 or sys.argv[1] not in MODES:
    raise SystemExit(f"usage: ios.py MODE [args]; MODE is one of {sorted(MODES)}\n\n{__doc__}")
  mode = sys.argv.pop(1)
  importlib.import_module(f"benchmarks.{MODES[mode]}").main()


if __name__ == "__main__":
  main()
