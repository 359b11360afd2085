"""IOS schedules of the four benchmark CNNs (Ding et al., "IOS: Inter-Operator Scheduler for CNN
Acceleration", MLSys 2021): graph statistics, DP statistics and predicted latency of IOS-Merge,
IOS-Parallel and IOS-Both against the sequential schedule, search time, and a numerical check of every
scheduled function against the original.

On a CPU (default) the stage costs come from the analytical H100 model; with ``--profiler=device`` they
are measured on the default device (GPU) with the differential-timing stage profiler.

  python experiments/ios_schedule.py                                  # small nets, analytical, CPU
  python experiments/ios_schedule.py --nets=inception_v3 --full       # full-size Inception-V3 graph
  python experiments/ios_schedule.py --schedule_in=benchmarks/results/ios_schedule_inception_v3_float32_merge_any_h100.json \
      --nets=inception_v3 --full                                      # reuse an H100 schedule, no search
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402

_NETS = flags.DEFINE_list("nets", ["squeezenet", "inception_v3", "randwire", "nasnet"], "Networks.")
_STRATS = flags.DEFINE_list("strategies", ["merge", "parallel", "both"], "IOS strategies.")
_R = flags.DEFINE_integer("r", 3, "Max operators per group (paper: 3).")
_S = flags.DEFINE_integer("s", 8, "Max groups per stage (paper: 8).")
_RS_LARGE = flags.DEFINE_string("rs_large", "1,3", "r,s for RandWire and NasNet (Python DP cost).")
_PART = flags.DEFINE_integer("part_size", 50, "Max units per DP part (paper: 50).")
_PART_NAS = flags.DEFINE_integer("part_size_nasnet", 25, "Max units per DP part for NasNet (IOS cuts it "
                                 "into 25 parts at cell boundaries; parts of 50 take minutes of DP).")
_MERGE_KERNELS = flags.DEFINE_enum("merge_kernels", "any", ["any", "same"],
                                   "'same': merge only convs with equal kernel sizes.")
_FULL = flags.DEFINE_bool("full", False, "Full-size nets (default: the small CPU configs).")
_PROFILER = flags.DEFINE_enum("profiler", "analytical", ["analytical", "device"], "Stage cost model.")
_SCHEDULE_IN = flags.DEFINE_string("schedule_in", "", "Apply this saved schedule JSON (no search).")
_OUT = flags.DEFINE_string("out", "experiments/results/ios_schedule.json", "Output JSON.")


def main(_):
  nets = ios_benchmark_nets(small=not _FULL.value)
  results = {"device": jax.devices()[0].device_kind if hasattr(jax.devices()[0], "device_kind") else
             jax.default_backend(), "full": _FULL.value, "profiler": _PROFILER.value, "nets": {}}
  for name in _NETS.value:
    model, shape = nets[name]
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    # random weights with nonzero biases, like trained ones: model.init's zero biases are folded away by
    # XLA when the weights are constants, which changes the programs (and stage profiles) on a GPU
    params = ios_init_params(model, shape, seed=0)
    f = lambda x: model.apply(params, x)
    apply = jax.jit(model.apply)
    ref = apply(params, x)
    out = {}
    t0 = time.perf_counter()
    if _SCHEDULE_IN.value:
      text = pathlib.Path(_SCHEDULE_IN.value).read_text()
      s = sched.Schedule.from_json(text, f, x)
      y = s(x)
      out["loaded"] = {"counts": s.counts(), "load_s": time.perf_counter() - t0,
                       "max_abs_diff": float(jnp.max(jnp.abs(y - ref)))}
      print(f"{name}: loaded {s.counts()} max|diff| {out['loaded']['max_abs_diff']:.2e}", flush=True)
      results["nets"][name] = out
      continue
    part = _PART_NAS.value if name == "nasnet" else _PART.value
    g = sched.build_graph(f, x, part_size=part)
    out["graph"] = sched.graph.summarize_graph(g)
    out["graph_s"] = time.perf_counter() - t0
    cost = sched.AnalyticalCost() if _PROFILER.value == "analytical" else sched.StageProfiler()
    seq = sched.sequential_schedule(g)
    # the same cost model as the search, so that the predicted speedup compares like with like
    out["sequential_pred_us"] = sum(cost(g, st) for st in seq) * 1e6
    r, s_ = (_R.value, _S.value)
    if name in ("randwire", "nasnet"):
      r, s_ = (int(v) for v in _RS_LARGE.value.split(","))
    print(f"{name}: {out['graph']['units']} units in {out['graph']['blocks']} parts "
          f"(largest {out['graph']['largest_part']}); r={r} s={s_}", flush=True)
    x2 = jax.random.normal(jax.random.PRNGKey(7), shape)   # fresh input; its reference serves every strategy
    ref2 = apply(params, x2)
    ref_max = float(jnp.max(jnp.abs(ref)))
    for strat in _STRATS.value:
      t0 = time.perf_counter()
      sc = sched.ios_schedule(f, x, r=r, s=s_, strategy=strat, profiler=cost, part_size=part,
                              merge_kernels=_MERGE_KERNELS.value)
      dt = time.perf_counter() - t0
      diff = float(jnp.max(jnp.abs(sc(x2) - ref2)))
      rel = diff / ref_max
      out[strat] = {"counts": sc.counts(), "pred_us": sc.predicted_latency * 1e6, "search_s": dt,
                    "max_abs_diff": diff, "rel_diff": rel,
                    "speedup_pred_vs_sequential": out["sequential_pred_us"] / (sc.predicted_latency * 1e6)}
      print(f"  IOS-{strat:8s} {sc.counts()['stages']:4d} stages, {sc.counts()['merge_stages']:3d} merges, "
            f"{sc.counts()['concurrent_stages']:3d} concurrent; predicted {sc.predicted_latency * 1e6:8.1f} us "
            f"(sequential {out['sequential_pred_us']:8.1f}); search {dt:6.2f} s; rel diff {rel:.1e}",
            flush=True)
    results["nets"][name] = out
  results["provenance"] = provenance.record(script=__file__)   # no data set: random inputs, schedules
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
