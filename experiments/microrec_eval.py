"""MicroRec (Jiang et al., MLSys 2021): Cartesian-combination planners on the public table specs, and CPU
latency of the lookup paths.

Planners: the authors' outer-inner pairing of the 2i smallest tables, greedy (fewest extra elements per
saved lookup), and the exact integer program over pairs/triples of table types (``optimal_plan``).
For each spec: (a) the storage each planner needs for the built designs' lookup counts (47 -> 42,
98 -> 84; the built designs cost +3.2% and +1.9%); (b) the lookups each planner reaches at the built
designs' budgets; (c) the lookups/storage frontier over a budget sweep. Then CPU latency (this machine)
of the embedding stage for the three lookup paths (per-table take, fused gather, combined plan) on
Criteo-like tables with rows capped at ``--max_rows`` (no download, synthetic indices), each interleaved
with the fused gather over ``--seeds`` index draws.

  python experiments/microrec_eval.py                       # ~1 minute of CPU
  python experiments/microrec_eval.py --max_rows=1000000 --zipf=1.05

Writes ``<out_dir>/microrec_eval.json``.
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
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.infer import microrec as mr  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "results/microrec_eval", "Output folder.")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 100_000, "Cap on Criteo table rows for the CPU latency part.")
_BATCHES = flags.DEFINE_list("batches", ["1", "64", "1024"], "Batch sizes of the latency part.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Index draws per batch size.")
_BUDGET = flags.DEFINE_float("budget", 0.05, "Extra storage of the combined plan in the latency part.")
_ZIPF = flags.DEFINE_float("zipf", 0.0, "Zipf exponent of the synthetic accesses (0: uniform).")
_LOOP = flags.DEFINE_integer("loop", 20, "Lookup batches per jitted loop.")

SPECS = {"alibaba47": (mr.ALIBABA_47, 5, 0.032), "alibaba98": (mr.ALIBABA_98, 14, 0.019),
         "criteo26": (mr.CRITEO_26, None, 0.05)}
SWEEP = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.019, 0.032, 0.05, 0.1, 0.2]


def planners(specs):
  return {"authors": lambda b: mr.authors_plan(specs, b), "greedy": lambda b: mr.greedy_plan(specs, b),
          "optimal": lambda b: mr.optimal_plan(specs, b)}


def planner_results() -> dict:
  out = {}
  for name, (specs, saved, budget) in SPECS.items():
    res: dict = {"tables": len(specs), "elements": sum(s.rows * s.dim for s in specs)}
    if saved is not None:
      a = mr.plan_report(specs, mr.authors_plan(specs, 10.0, num_pairs=saved))
      o = mr.plan_report(specs, mr.optimal_plan(specs, budget, min_saved=saved))
      res["built_design"] = {"lookups": len(specs) - saved, "overhead": budget}
      res["at_built_lookups"] = {"authors": a._asdict(), "optimal": o._asdict()}
    res["at_built_budget"] = {k: mr.plan_report(specs, f(budget))._asdict() for k, f in planners(specs).items()}
    res["frontier"] = {k: mr.frontier(specs, k, SWEEP) for k in ("authors", "greedy", "optimal")}
    out[name] = res
    print(f"{name}: at +{100 * budget:.1f}% -> " + ", ".join(
        f"{k} {v['lookups']} lookups (+{100 * v['overhead']:.2f}%)" for k, v in res["at_built_budget"].items()))
    if saved is not None:
      print(f"  {len(specs)} -> {len(specs) - saved} lookups: authors +{100 * a.overhead:.3f}%, "
            f"optimal +{100 * o.overhead:.3f}% (built design +{100 * budget:.1f}%)")
  return out


def stage_loop(stage, rows, n):
  rows = jnp.asarray(rows, jnp.int32)[None]

  @jax.jit
  def run(st, idx):
    def body(i, acc):
      return acc + jnp.sum(mr.lookup(st, (idx + i) % rows)[0])
    return jax.lax.fori_loop(0, n, body, jnp.float32(0))
  return lambda idx: run(stage, idx)


def latency() -> dict:
  specs = tuple(mr.TableSpec(min(s.rows, _MAX_ROWS.value), s.dim) for s in mr.CRITEO_26)
  plan = mr.optimal_plan(specs, _BUDGET.value)
  rep = mr.plan_report(specs, plan)
  tables = mr.init_tables(0, specs)
  stages = {"per_table": mr.build_stage(tables, mr.Plan.identity(len(specs))),
            "fused": mr.build_stage(tables, mr.Plan.identity(len(specs)), fuse=True),
            "combined": mr.build_stage(tables, plan, fuse=True)}
  rows = [s.rows for s in specs]
  loops = {k: stage_loop(v, rows, _LOOP.value) for k, v in stages.items()}
  out = {"plan": rep._asdict(), "max_rows": _MAX_ROWS.value, "rows": []}
  for b in map(int, _BATCHES.value):
    for path in ("per_table", "combined"):
      ratios, ta, tb = [], [], []
      for seed in range(_SEEDS.value):
        _, idx = mr.synthetic_batch(seed, specs, b, zipf=_ZIPF.value or None)
        idx = jnp.asarray(idx)
        t = stats.time_interleaved(lambda: loops["fused"](idx), lambda: loops[path](idx), repeats=9, warmup=2)
        ratios.append(t.median_b / t.median_a)
        ta.append(t.median_a / _LOOP.value)
        tb.append(t.median_b / _LOOP.value)
      row = {"batch": b, "path": path, "lookups": stages[path].lookups, "stage_s": tb, "fused_stage_s": ta,
             "ratio_vs_fused": ratios, "ratio_median": float(np.median(ratios))}
      out["rows"].append(row)
      print(f"  batch {b:5d} {path:9s}: {1e6 * np.median(tb):9.1f} us vs fused {1e6 * np.median(ta):9.1f} us "
            f"(x{row['ratio_median']:.2f})")
  return out


def main(_):
  t0 = time.time()
  res = {"planners": planner_results()}
  print(f"CPU latency of the lookup paths (Criteo-like, rows <= {_MAX_ROWS.value}):")
  res["latency_cpu"] = latency()
  res["flags"] = {k: v.value for k, v in flags.FLAGS._flags().items() if k in {
      "out_dir", "max_rows", "batches", "seeds", "budget", "zipf", "loop"}}
  res["device"] = str(jax.devices()[0])
  res["seconds"] = time.time() - t0
  res["provenance"] = provenance.record(script=__file__)   # no data set: closed-form plans, timings
  path = pathlib.Path(_OUT.value)
  path.mkdir(parents=True, exist_ok=True)
  (path / "microrec_eval.json").write_text(json.dumps(res, indent=1))
  print(f"wrote {path / 'microrec_eval.json'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
