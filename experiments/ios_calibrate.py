"""IOS whole-program latency predicted from in-graph measurements (issue 20, item 2), on a CPU.

The GPU batch runs (`benchmarks/ios.py batch`, JSONs `benchmarks/results/ios_batch*.json`) timed IOS-Merge and
IOS-Both programs of the four IOS networks as whole programs on an H200 and recorded each program's analytical
prediction. The analytical search does not depend on the device, so every timed schedule is rebuilt here (and
checked: its predicted latency must equal the recorded one to 1e-9), then `sched.calibrate.calibrate_cost` fits
the roofline's parameters to the measured programs. Reported, against the default model's raw predictions:

  * leave one batch size out, within a network and dtype (the use case: time a few programs of your network,
    predict the rest);
  * leave one network out, within a dtype (a new network with no measurement of its own);
  * the fit on all programs of a dtype (its parameters: how much launch cost and concurrency survive in-graph);
  * the DP run with each network's calibrated cost at batch 1: the schedule it picks and its predicted latency
    against the IOS-Merge / IOS-Both schedules that were timed (the candidates for the next GPU run).

    python3 experiments/ios_calibrate.py                          # ~3-6 min on 2 CPU cores
    python3 experiments/ios_calibrate.py --search_calibrated=false  # predictions only
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mlsys_jax import sched  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402
from mlsys_jax.sched import calibrate  # noqa: E402

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FLAGS = flags.FLAGS
flags.DEFINE_string("inputs", os.path.join(_ROOT, "benchmarks/results/ios_batch*.json"),
                    "glob of ios_batch JSONs with 'points' (measured whole programs)")
flags.DEFINE_string("saved_dir", os.path.join(_ROOT, "benchmarks/results/ios_sched_cpu_s10"),
                    "saved analytical schedules (sched_<net>_<dtype>_b<batch>_<strategy>.json) loaded instead of "
                    "searching (RandWire IOS-Both, NasNet-A)")
flags.DEFINE_string("out", os.path.join(_ROOT, "experiments/results/ios_calibrate_s17.json"), "output JSON")
flags.DEFINE_string("schedules_out", os.path.join(_ROOT, "experiments/results/ios_calibrate_schedules"),
                    "directory for the schedules the calibrated DP picks, named as `benchmarks/ios.py batch "
                    "--schedules DIR --no_search` loads them (to time them on a GPU)")
flags.DEFINE_float("ridge", 1e-5, "pull toward the default model in the fit (log space)")
flags.DEFINE_float("within", 0.15, "the issue's whole-program prediction tolerance")
flags.DEFINE_bool("search_calibrated", True, "run the DP with each network's calibrated cost at batch 1")


def load_points(pattern: str) -> list:
  pts = []
  for f in sorted(glob.glob(pattern)):
    for p in json.load(open(f)).get("points", []):
      if not p["program"].startswith("ios:"):
        continue
      own = [t for t in p["program"][4:].split("+") if int(re.match(r"b(\d+)", t).group(1)) == p["batch"]]
      if not own:
        continue   # (every recorded point names a schedule found at its own batch size)
      pts.append(dict(p, source=os.path.basename(f), strategy={"m": "merge", "b": "both"}[own[0][-1]]))
  return pts


_NETS: dict = {}


def net_fn(net: str, dt: str, batch: int):
  """The benchmark network as `benchmarks/ios.py batch` builds it: (fn, x)."""
  dtype = jnp.dtype(dt)
  if (net, dt) not in _NETS:
    model, shape = ios_benchmark_nets(dtype=None if dtype == jnp.float32 else dtype)[net]
    _NETS[(net, dt)] = (model, shape, ios_init_params(model, shape, seed=0))
  model, shape, params = _NETS[(net, dt)]
  f = lambda v, p=params, m=model: m.apply(p, v)
  return f, jax.random.normal(jax.random.PRNGKey(1), (batch,) + tuple(shape[1:]), dtype)


def rebuild(key, recorded_s: float, log):
  net, dt, b, strat = key
  f, x = net_fn(net, dt, b)
  path = os.path.join(FLAGS.saved_dir, f"sched_{net}_{dt}_b{b}_{strat}.json")
  t0 = time.perf_counter()
  if os.path.exists(path):
    sc = sched.Schedule.from_json(open(path).read(), f, x, check="off")
    how = "loaded"
  else:
    sc = sched.ios_schedule(f, x, strategy=strat, profiler=sched.AnalyticalCost(), check="off")
    how = "searched"
  pred = calibrate.predict_latency(sched.AnalyticalCost(), sc)
  ok = abs(pred / recorded_s - 1) < 1e-9
  log(f"{net} {dt} b{b} {strat}: {how} in {time.perf_counter() - t0:.1f} s, {len(sc.stages)} stages, "
      f"predicted {pred * 1e3:.6f} ms vs recorded {recorded_s * 1e3:.6f} ms {'(same)' if ok else '(DIFFERENT: dropped)'}")
  return sc if ok else None


def err_stats(rel: list, within: float) -> dict:
  a = np.abs(np.asarray(rel))
  return {"n": int(a.size), "median_abs_rel_err": float(np.median(a)), "max_abs_rel_err": float(a.max()),
          "mape": float(a.mean()), "frac_within": float(np.mean(a <= within))}


def held_out(keys, progs, meas, default_pred, split, ridge, within):
  """Fit on every program but one group (split(key) names the group), predict the group."""
  rows = []
  for grp in sorted({split(k) for k in keys}):
    tr = [i for i, k in enumerate(keys) if split(k) != grp]
    te = [i for i, k in enumerate(keys) if split(k) == grp]
    if len(tr) < 2:
      continue
    cal = calibrate.calibrate_cost([progs[i] for i in tr], [meas[i] for i in tr], ridge=ridge)
    for i in te:
      p = cal.predict(progs[i])
      rows.append({"program": list(keys[i]), "held_out": str(grp), "measured_s": meas[i], "calibrated_s": p,
                   "calibrated_rel_err": p / meas[i] - 1, "default_s": default_pred[i],
                   "default_rel_err": default_pred[i] / meas[i] - 1, "n_train": len(tr)})
  return {"rows": rows, "calibrated": err_stats([r["calibrated_rel_err"] for r in rows], within),
          "default": err_stats([r["default_rel_err"] for r in rows], within)}


def main(_):
  t_start = time.perf_counter()
  log = lambda m: print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)
  pts = load_points(FLAGS.inputs)
  groups: dict = {}
  for p in pts:
    groups.setdefault((p["net"], p["dtype"], p["batch"], p["strategy"]), []).append(p)
  log(f"{len(pts)} measured points, {len(groups)} distinct programs")
  keys, progs, meas, runs, default_pred, dropped = [], [], [], [], [], []
  for key in sorted(groups):
    sc = rebuild(key, groups[key][0]["predicted_s"], log)
    if sc is None:
      dropped.append(list(key))
      continue
    m = [p["measured_s"] for p in groups[key]]
    keys.append(key)
    progs.append(sc)
    meas.append(float(np.exp(np.mean(np.log(m)))))   # geometric mean over the runs that timed it
    runs.append({"runs_s": m, "sources": [p["source"] for p in groups[key]]})
    default_pred.append(calibrate.predict_latency(sched.AnalyticalCost(), sc))
  spread = [max(r["runs_s"]) / min(r["runs_s"]) - 1 for r in runs if len(r["runs_s"]) > 1]
  res = {"what": __doc__.split("\n\n")[0], "argv": sys.argv[1:], "ridge": FLAGS.ridge, "within": FLAGS.within,
         "programs": [{"key": list(k), "stages": len(p.stages), "measured_s": m, "default_pred_s": d, **r}
                      for k, p, m, d, r in zip(keys, progs, meas, default_pred, runs)],
         "dropped": dropped,
         "run_to_run_spread": {"programs_timed_twice_or_more": len(spread),
                               "max_over_min_minus_1_median": float(np.median(spread)) if spread else None,
                               "max_over_min_minus_1_max": float(max(spread)) if spread else None}}

  # (1) leave one batch size out, within (net, dtype) with >= 3 batch sizes
  lobo = {"rows": [], "per_net": {}}
  for nd in sorted({k[:2] for k in keys}):
    idx = [i for i, k in enumerate(keys) if k[:2] == nd]
    if len({keys[i][2] for i in idx}) < 3:
      continue
    r = held_out([keys[i] for i in idx], [progs[i] for i in idx], [meas[i] for i in idx],
                 [default_pred[i] for i in idx], lambda k: k[2], FLAGS.ridge, FLAGS.within)
    lobo["rows"] += r["rows"]
    lobo["per_net"][f"{nd[0]}/{nd[1]}"] = {"calibrated": r["calibrated"], "default": r["default"]}
    log(f"leave-one-batch-out {nd}: calibrated {r['calibrated']}, default {r['default']}")
  lobo["calibrated"] = err_stats([r["calibrated_rel_err"] for r in lobo["rows"]], FLAGS.within)
  lobo["default"] = err_stats([r["default_rel_err"] for r in lobo["rows"]], FLAGS.within)
  res["leave_one_batch_out"] = lobo

  # (2) leave one network out, within a dtype; (3) the fit on all programs of a dtype
  lono = {"rows": [], "per_dtype": {}}
  res["fit_all"] = {}
  for dt in sorted({k[1] for k in keys}):
    idx = [i for i, k in enumerate(keys) if k[1] == dt]
    r = held_out([keys[i] for i in idx], [progs[i] for i in idx], [meas[i] for i in idx],
                 [default_pred[i] for i in idx], lambda k: k[0], FLAGS.ridge, FLAGS.within)
    lono["rows"] += r["rows"]
    lono["per_dtype"][dt] = {"calibrated": r["calibrated"], "default": r["default"]}
    log(f"leave-one-network-out {dt}: calibrated {r['calibrated']}, default {r['default']}")
    cal = calibrate.calibrate_cost([progs[i] for i in idx], [meas[i] for i in idx], ridge=FLAGS.ridge)
    res["fit_all"][dt] = {"params": cal.params(), "log_rms": cal.log_rms,
                          "in_sample": err_stats(list(cal.rel_err), FLAGS.within)}
    log(f"fit on all {dt} programs: {cal.params()}, log rms {cal.log_rms:.3f}")
  lono["calibrated"] = err_stats([r["calibrated_rel_err"] for r in lono["rows"]], FLAGS.within)
  lono["default"] = err_stats([r["default_rel_err"] for r in lono["rows"]], FLAGS.within)
  res["leave_one_network_out"] = lono

  # (4) the DP with each (net, dtype)'s calibrated cost, batch 1
  res["calibrated_search"] = []
  if FLAGS.search_calibrated:
    os.makedirs(FLAGS.schedules_out, exist_ok=True)
    for nd in sorted({k[:2] for k in keys}):
      idx = [i for i, k in enumerate(keys) if k[:2] == nd]
      b1 = [i for i in idx if keys[i][2] == 1]
      if len(idx) < 3 or not b1 or nd[0] in ("nasnet", "randwire"):
        continue   # (NasNet-A / RandWire: too few timed programs, and IOS-Both's search takes minutes)
      cal = calibrate.calibrate_cost([progs[i] for i in idx], [meas[i] for i in idx], ridge=FLAGS.ridge)
      f, x = net_fn(nd[0], nd[1], 1)
      row = {"net": nd[0], "dtype": nd[1], "batch": 1, "params": cal.params(), "timed": {}}
      for i in b1:
        row["timed"][keys[i][3]] = {"measured_s": meas[i], "calibrated_pred_s": cal.predict(progs[i]),
                                    "stages": len(progs[i].stages), "counts": progs[i].counts()}
      for strat in ("merge", "both"):
        t0 = time.perf_counter()
        sc = sched.ios_schedule(f, x, strategy=strat, profiler=cal.cost, check="off")
        same = [keys[i][3] for i in b1 if list(progs[i].stages) == list(sc.stages)]
        name = f"sched_{nd[0]}_{nd[1]}_b1_{strat}.json"   # the names `benchmarks/ios.py batch --schedules` loads
        with open(os.path.join(FLAGS.schedules_out, name), "w") as fh:
          fh.write(sc.to_json())
        row[f"calibrated_{strat}"] = {"calibrated_pred_s": cal.predict(sc), "stages": len(sc.stages),
                                      "counts": sc.counts(), "same_as_timed": same, "saved": name,
                                      "search_s": time.perf_counter() - t0}
        timed = {k: round(v["calibrated_pred_s"] * 1e3, 3) for k, v in row["timed"].items()}
        log(f"calibrated DP {nd} b1 {strat}: {len(sc.stages)} stages, {sc.counts()}, predicted "
            f"{cal.predict(sc) * 1e3:.3f} ms (the timed schedules, predicted: {timed} ms), same as timed: {same}")
      res["calibrated_search"].append(row)

  res["wall_s"] = time.perf_counter() - t_start
  res["env"] = {"jax": jax.__version__, "backend": jax.default_backend(), "numpy": np.__version__}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    json.dump(res, fh, indent=1)
  log(f"wrote {FLAGS.out}")
  print("\n| evaluation | programs | calibrated median / max abs rel err | within "
        f"{FLAGS.within:.0%} | default model median / max | within |")
  print("|---|---|---|---|---|---|")
  for name, blk in (("leave one batch size out", lobo), ("leave one network out", lono)):
    c, d = blk["calibrated"], blk["default"]
    print(f"| {name} | {c['n']} | {c['median_abs_rel_err']:.3f} / {c['max_abs_rel_err']:.3f} | "
          f"{c['frac_within']:.2f} | {d['median_abs_rel_err']:.3f} / {d['max_abs_rel_err']:.3f} | {d['frac_within']:.2f} |")


if __name__ == "__main__":
  app.run(main)
