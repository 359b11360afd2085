"""RL-Scope (Gleeson et al., MLSys 2021) in JAX: where the time of small RL and supervised workloads goes,
per operation and category, overhead-corrected, with the correction validated against uninstrumented runs.

Steps: (1) calibrate the per-event cost of each instrumentation source on book-keeping-bound loops
(`profile.calibrate_micro`, the fallback); (2) per workload, as the paper does, calibrate on the workload
itself (`profile.calibrate_insitu`): adjacent uninstrumented/`level='trace'` pairs, the tracer's per-event
cost fitted on the pairs' extra time (scope/intercept costs from (1)), validated on pairs HELD OUT of the
fit (contiguous folds, `profile.crossvalidate`; bias = corrected / uninstrumented - 1, paper Fig. 11:
-16.8% to +10.9%), on the median of per-pair ratios ('paired') and on minima ('min'); the same pairs
corrected with (1) alone; each workload corrected with the median cost fitted on the OTHER workloads
(transfer); the uncorrected overhead; (3) attribute traced runs per workload, corrected; (4) the
paper's qualitative findings with numbers: on-policy (A2C) vs off-policy (DQN) simulation share, numpy vs
JAX simulator.

  python experiments/rlscope_eval.py                          # CPU, about 4 minutes on an idle 2-core host
  python experiments/rlscope_eval.py --gpu_util               # on a GPU host: + nvidia-smi utilization
                                                              #   vs the trace's device-busy fraction

Writes ``<out_dir>/rlscope.json`` (raw seconds, counts, deltas, per-operation rows) and
``<out_dir>/rlscope_ops.png`` (stacked bars per workload and operation, corrected).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import profile  # noqa: E402

_OUT = flags.DEFINE_string("out_dir", "results/rlscope", "Output folder.")
_STEPS = flags.DEFINE_integer("steps", 256, "Environment (or training) steps per workload run.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Interleaved uninstrumented/instrumented run pairs per workload.")
_FOLDS = flags.DEFINE_integer("folds", 4, "Contiguous folds of the pairs for the held-out check of the in-situ fit.")
_CAL_N = flags.DEFINE_integer("calib_n", 3000, "Events per calibration loop.")
_CAL_REPEATS = flags.DEFINE_integer("calib_repeats", 5, "Repeats per calibration level.")
_ATTR_RUNS = flags.DEFINE_integer("attr_runs", 3, "Traced runs whose corrected attributions are median-merged.")
_WORKLOADS = flags.DEFINE_list("workloads", ["a2c/cartpole/numpy", "a2c/cartpole/jax", "a2c/pendulum/numpy",
                                             "dqn/cartpole/numpy", "dqn/cartpole/jax", "dqn/pendulum/numpy",
                                             "supervised/-/-"], "algo/env/backend triples.")
_GPU_UTIL = flags.DEFINE_bool("gpu_util", False, "Poll nvidia-smi during an uninstrumented run of each workload "
                              "and compare its mean utilization with the trace's device-busy fraction.")


class _NvidiaSmi:
  """Polls ``nvidia-smi --query-gpu=utilization.gpu`` every 50 ms in a thread (GPU hosts only)."""

  def __init__(self):
    self.samples: list[float] = []
    self._p = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "50", "-i", "0"], stdout=subprocess.PIPE, text=True)
    self._t = threading.Thread(target=self._read, daemon=True)
    self._t.start()

  def _read(self):
    for line in self._p.stdout:
      try:
        self.samples.append(float(line.strip()))
      except ValueError:
        pass

  def stop(self) -> list[float]:
    self._p.terminate()
    self._p.wait()
    return self.samples


def _build(spec: str, steps: int):
  algo, env, backend = spec.split("/")
  if algo == "supervised":
    return profile.make_workload("supervised", steps=steps)
  return profile.make_workload(algo, env, backend, steps=steps)


def _median_rows(runs: list[list[dict]]) -> list[dict]:
  ops = sorted({r["operation"] for rs in runs for r in rs})
  out = []
  for op in ops:
    rs = [next((r for r in rr if r["operation"] == op), None) for rr in runs]
    rs = [r for r in rs if r is not None]
    out.append({"operation": op, **{c: float(np.median([r[c] for r in rs])) for c in rs[0] if c != "operation"}})
  return sorted(out, key=lambda r: (r["operation"] == "(none)", -r["total"]))


def _share(rows: list[dict], op: str) -> float:
  tot = sum(r["total"] for r in rows)
  return sum(r["total"] for r in rows if r["operation"] == op) / tot if tot else 0.0


def main(_):
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; calibrating ...", flush=True)
  cal = profile.calibrate_micro(n=_CAL_N.value, repeats=_CAL_REPEATS.value)
  print("  per-event cost (ns, process CPU time):", {k: round(v, 1) for k, v in cal.raw_delta_ns.items()})
  res: dict = {"flags": {f: getattr(flags.FLAGS, f) for f in ("steps", "repeats", "folds", "calib_n", "calib_repeats", "attr_runs",
                                                                  "workloads", "gpu_util")},
               "jax": jax.__version__, "platform": jax.devices()[0].platform,
               "provenance": provenance.record(script=__file__),   # no data set: simulated environments
               "calibration": {"delta_ns": cal.delta_ns, "raw_delta_ns": cal.raw_delta_ns,
                               "seconds": cal.wall_s, "counts": cal.counts, "clock": cal.clock},
               "workloads": {}}
  groups = {}
  for spec in _WORKLOADS.value:
    t0 = time.time()
    w = _build(spec, _STEPS.value)
    for _ in range(2):  # compile + warm caches
      with profile.Profiler("off"):
        w()
    # in situ (the paper's protocol: calibrate on this workload): adjacent off/trace pairs; the tracer's
    # per-event cost is fitted on the pairs' extra time (scope/intercept costs from the micro calibration),
    # and validated on pairs held out of the fit (contiguous folds), on two statistics
    ins = profile.calibrate_insitu(w, cal, repeats=_REPEATS.value, folds=_FOLDS.value, warmup=0, stat="paired")
    held = {"paired": ins.heldout, "min": profile.crossvalidate(ins.runs, cal, folds=_FOLDS.value, stat="min")}
    runs = {k: v for k, v in ins.runs.items() if k != "attribution"}
    # attribution: element-wise median over traced runs (single runs are noisy on a shared host)
    per_run_c, per_run_u = [], []
    with tempfile.TemporaryDirectory(prefix="mlsys_jax_profile_") as tmp:  # traces read here, then removed
      for i in range(_ATTR_RUNS.value):
        with profile.Profiler("trace", trace_dir=f"{tmp}/{i}") as p:
          w()
        a = profile.attribute(p)
        per_run_c.append(profile.table_rows(profile.correct(a, ins.wall)))
        per_run_u.append(profile.table_rows(a))
    rows_c, rows_u = _median_rows(per_run_c), _median_rows(per_run_u)
    groups[spec] = rows_c
    entry = {"pairs": runs, "heldout": held, "fitted_trace_delta_ns": {"cpu": ins.cpu.raw_delta_ns["trace"],
                                                                       "wall": ins.wall.raw_delta_ns["trace"]},
             "uninstrumented_wall_s": float(np.median(runs["wall_off"])),
             "uninstrumented_wall_min_s": float(np.min(runs["wall_off"])),
             "counts": p.counts, "has_device": a.has_device, "note": a.note,
             "trace_setup_s": p.setup_ns / 1e9, "rows_corrected": profile.to_jsonable(rows_c),
             "rows_uncorrected": profile.to_jsonable(rows_u),
             "simulation_share": _share(rows_c, "simulation"),
             "backprop_share": _share(rows_c, "backpropagation"),
             "device_busy_fraction": (sum(r["device"] for r in rows_c) / max(1e-12, sum(r["total"] for r in rows_c)))}
    if _GPU_UTIL.value:
      smi = _NvidiaSmi()
      with profile.Profiler("off"):
        for _ in range(5):
          w()
      util = smi.stop()
      entry["nvidia_smi_util_mean_pct"] = float(np.mean(util)) if util else None
      entry["nvidia_smi_samples"] = len(util)
    res["workloads"][spec] = entry
    (out / "rlscope.json").write_text(json.dumps(res, indent=1, default=float))  # a cut-short run keeps these
    hp, hm = held["paired"], held["min"]
    print(f"[{time.time() - t_start:6.1f}s] {spec:<22} off {1e3 * entry['uninstrumented_wall_s']:7.1f} ms  traced "
          f"x{hp['wall_overhead']:.2f} (cpu x{hp['cpu_overhead']:.2f})  trace event {ins.cpu.raw_delta_ns['trace']:.0f} ns  "
          f"held-out bias paired wall {100 * hp['wall_bias']:+.1f}% cpu {100 * hp['cpu_bias']:+.1f}%, min wall "
          f"{100 * hm['wall_bias']:+.1f}% cpu {100 * hm['cpu_bias']:+.1f}%  (micro-cal paired cpu "
          f"{100 * hp['fixed_cpu_bias']:+.1f}%)  sim share {100 * entry['simulation_share']:.1f}%  ({time.time() - t0:.0f}s)",
          flush=True)
    print(profile.format_table(rows_c), flush=True)

  W = res["workloads"]
  (out / "rlscope.json").write_text(json.dumps(res, indent=1, default=float))   # raw results first
  findings: dict = {}
  for env in ("cartpole", "pendulum"):
    for be in ("numpy", "jax"):
      on, off = W.get(f"a2c/{env}/{be}"), W.get(f"dqn/{env}/{be}")
      if on and off and off["simulation_share"] > 0:
        findings[f"onpolicy_over_offpolicy_sim_share/{env}/{be}"] = on["simulation_share"] / off["simulation_share"]
  for algo in ("a2c", "dqn"):
    n, j = W.get(f"{algo}/cartpole/numpy"), W.get(f"{algo}/cartpole/jax")
    if n and j:
      def sim_row(e):
        return next((r for r in e["rows_corrected"] if r["operation"] == "simulation"), None)
      rn, rj = sim_row(n), sim_row(j)
      if not rn or not rj or rn["total"] <= 0 or rj["total"] <= 0:
        continue          # a run attributed no time to `simulation` (e.g. cut short): no ratio
      findings[f"sim_time_jax_over_numpy/{algo}/cartpole"] = rj["total"] / rn["total"]
      findings[f"sim_split/{algo}/cartpole/numpy"] = {c: rn[c] / rn["total"] for c in profile.HOST_CATEGORIES}
      findings[f"sim_split/{algo}/cartpole/jax"] = {c: rj[c] / rj["total"] for c in profile.HOST_CATEGORIES}
  # transfer across workloads: correct each workload's pairs with the median per-event trace cost fitted
  # on the OTHER workloads (a single calibration for a family of workloads, never fitted on this one)
  for spec, e in W.items():
    others = [W[o]["fitted_trace_delta_ns"]["cpu"] for o in W if o != spec]
    if not others:
      continue
    d = dict(cal.delta_ns, trace=max(0.0, float(np.median(others))))
    r = e["pairs"]
    ratios = [(ci - sum(n[s] * d[s] for s in profile.SOURCES) / 1e9) / co
              for ci, n, co in zip(r["cpu_inst"], r["counts"], r["cpu_off"])]
    e["leave_one_workload_out"] = {"trace_delta_ns": d["trace"], "cpu_bias": float(np.median(ratios)) - 1.0}
  # event types with separate costs: the trace events split by kind (annotation, other events on the
  # Python thread, executor threads, device) with one cost per kind, fitted by non-negative least squares
  # on the pooled pairs of the OTHER workloads (the kind mix differs across workloads, so the split is
  # identified there, not within one workload) and applied to this workload's pairs
  from scipy.optimize import nnls
  from mlsys_jax.profile.attribution import TRACE_KINDS

  def kind_rows(spec):
    r = W[spec]["pairs"]
    x = [[tk.get(k, 0) for k in TRACE_KINDS] for tk in r["trace_kinds"]]
    fix = [(n["scope"] * cal.delta_ns["scope"] + n["intercept"] * cal.delta_ns["intercept"]) / 1e9 for n in r["counts"]]
    y = [ci - co - f for ci, co, f in zip(r["cpu_inst"], r["cpu_off"], fix)]
    return np.array(x, float), np.array(y) * 1e9, r, fix

  if all(W[sp]["pairs"].get("trace_kinds") and W[sp]["pairs"]["trace_kinds"][0] for sp in W) and len(W) > 1:
    X_all = np.concatenate([kind_rows(sp)[0] for sp in W])
    y_all = np.concatenate([kind_rows(sp)[1] for sp in W])
    findings["trace_kind_cost_ns_all_workloads"] = dict(zip(TRACE_KINDS, map(float, nnls(X_all, y_all)[0])))
    for spec, e in W.items():
      X = np.concatenate([kind_rows(o)[0] for o in W if o != spec])
      y = np.concatenate([kind_rows(o)[1] for o in W if o != spec])
      beta = nnls(X, y)[0]
      x, _, r, fix = kind_rows(spec)
      ratios = [(ci - f - float(xi @ beta) / 1e9) / co for ci, f, xi, co in zip(r["cpu_inst"], fix, x, r["cpu_off"])]
      e["leave_one_workload_out_by_kind"] = {"kind_cost_ns": dict(zip(TRACE_KINDS, map(float, beta))),
                                             "cpu_bias": float(np.median(ratios)) - 1.0,
                                             "kinds_per_run": dict(zip(TRACE_KINDS, map(float, x.mean(0))))}
    lk = [e["leave_one_workload_out_by_kind"]["cpu_bias"] for e in W.values()]
    findings["leave_one_workload_out_by_kind_cpu_bias_range"] = [min(lk), max(lk)]
  for st in ("paired", "min"):
    for clk in ("wall", "cpu"):
      vals = [e["heldout"][st][f"{clk}_bias"] for e in W.values()]
      micro = [e["heldout"][st][f"fixed_{clk}_bias"] for e in W.values()]
      findings[f"heldout_bias_{clk}_{st}_range"] = [min(vals), max(vals)]
      findings[f"heldout_bias_{clk}_{st}_within_10pct"] = sum(abs(x) <= 0.1 for x in vals)
      findings[f"micro_bias_{clk}_{st}_range"] = [min(micro), max(micro)]
      findings[f"micro_bias_{clk}_{st}_within_10pct"] = sum(abs(x) <= 0.1 for x in micro)
  lowo = [e["leave_one_workload_out"]["cpu_bias"] for e in W.values() if "leave_one_workload_out" in e]
  if lowo:
    findings["leave_one_workload_out_cpu_bias_range"] = [min(lowo), max(lowo)]
  findings["n_workloads"] = len(W)
  findings["overhead_wall_worst"] = max(e["heldout"]["paired"]["wall_overhead"] for e in W.values())
  findings["overhead_cpu_worst"] = max(e["heldout"]["paired"]["cpu_overhead"] for e in W.values())
  findings["fitted_trace_delta_ns_cpu"] = {k: e["fitted_trace_delta_ns"]["cpu"] for k, e in W.items()}
  res["findings"] = findings
  res["elapsed_s"] = time.time() - t_start
  (out / "rlscope.json").write_text(json.dumps(res, indent=1, default=float))
  try:
    profile.plot_stacked(groups, str(out / "rlscope_ops.png"),
                         f"RL-Scope in JAX ({res['platform']}), {_STEPS.value} steps per run, corrected")
  except ImportError as e:
    print("no plot:", e)
  print(json.dumps(findings, indent=1, default=float))
  print(f"wrote {out / 'rlscope.json'} in {res['elapsed_s']:.0f}s")


if __name__ == "__main__":
  app.run(main)
