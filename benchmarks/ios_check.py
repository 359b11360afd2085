"""IOS as a user runs it: ``ios_schedule(..., check='measure')`` on the IOS networks over batch sizes and
dtypes. For each (net, dtype, batch) the search runs with the stage profiler, then the never-slower check
compiles the emitted schedule and the unscheduled function under plain jit and the best command-buffer
configurations (all before any run) and times them interleaved; the JSON keeps both times, the choice,
the search time and the output error against plain jit.

  PYTHONPATH=. python3 benchmarks/ios.py check --nets squeezenet,inception_v3 --batches 1,8 --out $OUT   # GPU
  PYTHONPATH=. python3 benchmarks/ios.py check --small                                                # CPU smoke
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import environment, print_table, write_json  # noqa: E402
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402


def _args():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--nets", default="squeezenet,inception_v3")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--strategy", default="merge", choices=("merge", "both", "parallel"))
  ap.add_argument("--cache", default=None, help="stage-profile cache file (JSON), kept between runs")
  ap.add_argument("--time_budget_s", type=float, default=480.0, help="stop starting new cases after this")
  ap.add_argument("--name", default="ios_check", help="JSON file name (without .json)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--small", action="store_true", help="small nets, CPU smoke test")
  return ap.parse_args()


def main():
  args = _args()
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


if __name__ == "__main__":
  main()
