"""Learned cost model vs analytical roofline vs MLP on held-out program families.

Reproduces the comparison of Kaufman et al. ("A Learned Performance Model for Tensor Processing
Units", MLSys 2021, Sec. 5) for XLA GPU programs collected by experiments/cost_collect.py: the GraphSAGE
model (mlsys_jax.cost.models) against XLA's analytical cost analysis turned into runtime by a roofline
with two rates fitted on the training set to minimise MAPE (max and sum forms; plus the measured
peak rates, max form; and 'analytical_kernels': the same roofline, with a fixed overhead, on flops and
bytes counted by our parser from shapes, since XLA's GPU cost analysis counts no flops inside cuBLAS and
cuDNN custom-calls), and an MLP on
aggregate program features. Families are split into folds; each fold's families are never seen in
training. Metrics over all held-out rows/groups: MAPE, Kendall's tau within groups of variants of one
program, ordered-pair accuracy, top-1 slowdown; percentile-bootstrap 95% intervals over groups, and
P(GNN better than analytical per group) with mlsys_jax.stats.bootstrap_ci.

  python3 experiments/cost_model_eval.py                      # full run on the committed dataset (CPU)
  python3 experiments/cost_model_eval.py --max_rows 200 --epochs 3 --folds 2   # smoke test
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import stats  # noqa: E402
from mlsys_jax.cost import dataset as ds  # noqa: E402
from mlsys_jax.cost import features, graph, hlo, metrics, train  # noqa: E402

FLAGS = flags.FLAGS
_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mlsys_jax", "cost", "data")
flags.DEFINE_list("data", sorted(glob.glob(os.path.join(_DATA, "*.npz"))), "dataset npz files")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "cost_model_eval.json"), "output JSON")
flags.DEFINE_integer("folds", 4, "family folds (each fold's families held out once)")
flags.DEFINE_integer("epochs", 40, "GNN epochs")
flags.DEFINE_integer("hidden", 64, "GNN width")
flags.DEFINE_integer("layers", 3, "GraphSAGE layers")
flags.DEFINE_float("rank_weight", 2.0, "weight of the pairwise ranking loss")
flags.DEFINE_integer("max_rows", 0, "use at most this many rows (0: all), for smoke tests")
flags.DEFINE_float("noise_iqr", 0.2, "exclude rows whose IQR exceeds this fraction of the median")
flags.DEFINE_float("floor_mult", 2.0, "exclude rows faster than this multiple of the dispatch floor")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_bool("drop_model_duplicates", False,
                  "keep one row per set of variants of a program whose graph and node features are "
                  "identical (e.g. 'autotune0' differing from 'default' only in the module fingerprint): "
                  "no model can order them, so their measured order is timing noise")


def load_all(paths, max_rows, noise_iqr, floor_mult):
  """Concatenate datasets (group ids offset per file), drop noisy rows; return arrays and graphs."""
  rows = {k: [] for k in ("hlo", "group", "family", "variant", "runtime_s", "flops", "bytes",
                          "trans", "source")}
  goff = 0
  metas = []
  for si, p in enumerate(paths):
    d = ds.load_dataset(p)
    metas.append({"file": os.path.basename(p), **{k: d.meta.get(k) for k in (
        "device", "jax", "date", "dispatch_floor_s", "matmul_bfloat16_flops_per_s",
        "matmul_float32_flops_per_s", "copy_bytes_per_s", "programs_timed")}, "rows": len(d)})
    floor = d.meta.get("dispatch_floor_s", 0.0)
    ok = (d.runtime_iqr_s <= noise_iqr * d.runtime_s) & (d.runtime_s >= floor_mult * floor)
    ok &= np.isfinite(d.runtime_s) & (d.runtime_s > 0)
    idx = np.where(ok)[0]
    rows["hlo"].extend(d.hlo[i] for i in idx)
    for k, v in (("group", d.group[idx].astype(np.int64) + goff), ("family", d.family[idx]),
                 ("variant", d.variant[idx]), ("runtime_s", d.runtime_s[idx].astype(np.float64)),
                 ("flops", np.maximum(d.flops[idx].astype(np.float64), 0.0)),
                 ("bytes", np.maximum(d.bytes_accessed[idx].astype(np.float64), 0.0)),
                 ("trans", np.maximum(d.transcendentals[idx].astype(np.float64), 0.0)),
                 ("source", np.full(idx.size, si))):
      rows[k].extend(v.tolist())
    metas[-1]["rows_kept"] = int(ok.sum())
    goff += int(d.group.max()) + 1 if len(d) else 0
  n = len(rows["hlo"])
  if max_rows and n > max_rows:
    keep = np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))
    rows = {k: [v[i] for i in keep] for k, v in rows.items()}
  arr = {k: np.asarray(v) for k, v in rows.items() if k != "hlo"}
  return rows["hlo"], arr, metas


def model_duplicates(graphs, feats, group):
  """Boolean mask of rows whose (graph, node features) equal an earlier row's of the same group."""
  seen, dup = set(), np.zeros(len(graphs), bool)
  for i, (g, x) in enumerate(zip(graphs, feats)):
    key = (int(group[i]), g.opcode.tobytes(), g.kernel.tobytes(), g.senders.tobytes(),
           g.receivers.tobytes(), x.tobytes())
    dup[i] = key in seen
    seen.add(key)
  return dup


def summarize(name, pred, y, group):
  gm = metrics.group_metrics(pred, y, group)
  ape = np.abs(pred - y) / y
  out = {"model": name, "mape": float(ape.mean()), "mape_ci": metrics.bootstrap_mean_ci(ape),
         "median_ape": float(np.median(ape)),
         "kendall_tau": float(np.mean(gm.tau)) if gm.tau.size else float("nan"),
         "kendall_tau_ci": metrics.bootstrap_mean_ci(gm.tau),
         "pair_accuracy": float(np.mean(gm.opa)) if gm.opa.size else float("nan"),
         "top1_slowdown": float(np.mean(gm.slowdown)) if gm.slowdown.size else float("nan"),
         "top1_slowdown_ci": metrics.bootstrap_mean_ci(gm.slowdown), "groups": int(gm.groups.size),
         "rows": int(y.size)}
  return out, gm


def main(argv):
  del argv
  t0 = time.time()
  texts, a, metas = load_all(FLAGS.data, FLAGS.max_rows, FLAGS.noise_iqr, FLAGS.floor_mult)
  print(f"{len(texts)} rows kept from {FLAGS.data}", flush=True)
  graphs = [graph.program_graph(hlo.parse_hlo(t)) for t in texts]
  feats = [features.node_features(g) for g in graphs]
  dup = model_duplicates(graphs, feats, a["group"])
  print(f"{int(dup.sum())} rows repeat an earlier variant of their program as the model sees it "
        f"({'dropped' if FLAGS.drop_model_duplicates else 'kept'})", flush=True)
  n_model_duplicates = int(dup.sum())
  if FLAGS.drop_model_duplicates and dup.any():
    keep = np.where(~dup)[0]
    graphs, feats = [graphs[i] for i in keep], [feats[i] for i in keep]
    a = {k: v[keep] for k, v in a.items()}
  # Shape-based counts from our parser (XLA's GPU cost analysis counts no flops in cuBLAS/cuDNN calls).
  own_flops = np.asarray([float(g.attrs[:, graph.ATTR_ID["flops"]].sum()) for g in graphs])
  own_bytes = np.asarray([float(graph.kernel_io_bytes(g).sum()) for g in graphs])
  progf = np.stack([features.program_features(g, {"flops": f, "bytes accessed": b, "transcendentals": tr})
                    for g, f, b, tr in zip(graphs, a["flops"], a["bytes"], a["trans"])])
  print(f"parsed {len(graphs)} programs in {time.time() - t0:.0f}s; nodes median "
        f"{int(np.median([g.n_node[0] for g in graphs]))}, max {max(int(g.n_node[0]) for g in graphs)}",
        flush=True)
  fams = sorted(set(a["family"]))
  rng = np.random.default_rng(FLAGS.seed)
  order = list(rng.permutation(fams))
  folds = [order[i::FLAGS.folds] for i in range(FLAGS.folds)]
  y = a["runtime_s"]
  preds = {k: np.full(len(y), np.nan) for k in ("gnn", "analytical_max", "analytical_sum",
                                                 "analytical_peak", "analytical_kernels", "mlp")}
  fitted = []
  peak_f = float(np.mean([m["matmul_float32_flops_per_s"] or np.nan for m in metas]))
  peak_b = float(np.mean([m["copy_bytes_per_s"] or np.nan for m in metas]))
  for fi, test_fams in enumerate(folds):
    te = np.isin(a["family"], test_fams)
    tr = ~te
    if te.sum() == 0 or tr.sum() == 0:
      continue
    itr, ite = np.where(tr)[0], np.where(te)[0]
    print(f"fold {fi}: test families {test_fams} ({te.sum()} rows), train {tr.sum()} rows", flush=True)
    for comb in ("max", "sum"):
      r = metrics.fit_roofline(a["flops"][tr], a["bytes"][tr], y[tr], comb, objective="mape")
      preds[f"analytical_{comb}"][ite] = r.predict(a["flops"][te], a["bytes"][te])
      fitted.append({"fold": fi, "combine": comb, "flops_per_s": r.flops_per_s, "bytes_per_s": r.bytes_per_s})
    rk = metrics.fit_roofline(own_flops[tr], own_bytes[tr], y[tr], "max", fit_overhead=True,
                              objective="mape")
    preds["analytical_kernels"][ite] = rk.predict(own_flops[te], own_bytes[te])
    fitted.append({"fold": fi, "combine": "max+overhead (own counts)", "flops_per_s": rk.flops_per_s,
                   "bytes_per_s": rk.bytes_per_s, "overhead_s": rk.overhead_s})
    preds["analytical_peak"][ite] = metrics.Roofline(peak_f, peak_b, "max").predict(a["flops"][te], a["bytes"][te])
    st = train.fit_mlp(progf[tr], y[tr], a["group"][tr], train.MLPConfig(seed=FLAGS.seed,
                                                                          rank_weight=FLAGS.rank_weight))
    # Learned models are trained on log error; one scale fitted on the training rows turns their median
    # prediction into the MAPE-optimal one (the roofline rates above are fitted to MAPE directly).
    c_mlp = metrics.mape_scale(train.predict_mlp(st, progf[tr]), y[tr])
    preds["mlp"][ite] = c_mlp * train.predict_mlp(st, progf[te])
    cfg = train.GNNConfig(hidden=FLAGS.hidden, num_layers=FLAGS.layers, epochs=FLAGS.epochs,
                          rank_weight=FLAGS.rank_weight, seed=FLAGS.seed, verbose=True)
    tg = time.time()
    g_tr, f_tr = [graphs[i] for i in itr], [feats[i] for i in itr]
    params = train.fit_gnn(g_tr, y[tr], a["group"][tr], cfg, f_tr)
    c_gnn = metrics.mape_scale(train.predict_gnn(params, g_tr, cfg, f_tr), y[tr])
    preds["gnn"][ite] = c_gnn * train.predict_gnn(params, [graphs[i] for i in ite], cfg,
                                                  [feats[i] for i in ite])
    fitted.append({"fold": fi, "gnn_mape_scale": c_gnn, "mlp_mape_scale": c_mlp})
    print(f"  gnn trained in {time.time() - tg:.0f}s; fold MAPE gnn "
          f"{metrics.mape(preds['gnn'][ite], y[ite]):.3f} analytical_max "
          f"{metrics.mape(preds['analytical_max'][ite], y[ite]):.3f}", flush=True)
  finite = {k: np.isfinite(p) for k, p in preds.items()}
  for k, f in finite.items():
    if not f.all():
      print(f"WARNING: {k} has {int((~f).sum())} non-finite predictions; those rows are left out", flush=True)
  done = np.all(np.stack(list(finite.values())), axis=0)
  results, per_group = [], {}
  for name, p in preds.items():
    s, gm = summarize(name, p[done], y[done], a["group"][done])
    results.append(s)
    per_group[name] = gm
  # Per-family breakdown of GNN vs the best analytical baseline.
  best_an = min((r for r in results if r["model"].startswith("analytical")), key=lambda r: r["mape"])["model"]
  fam_rows = []
  for f in fams:
    m = done & (a["family"] == f)
    if m.sum() == 0:
      continue
    row = {"family": f, "rows": int(m.sum())}
    for name in ("gnn", best_an, "mlp"):
      s, _ = summarize(name, preds[name][m], y[m], a["group"][m])
      row[f"{name}_mape"] = s["mape"]
      row[f"{name}_tau"] = s["kendall_tau"]
    fam_rows.append(row)
  # Paired per-group comparison of Kendall tau: GNN vs each analytical model.
  comparisons = {}
  g_gnn = per_group["gnn"]
  for name in ("analytical_max", "analytical_sum", "analytical_kernels", "mlp"):
    g_b = per_group[name]
    common, ia, ib = np.intersect1d(g_gnn.groups, g_b.groups, return_indices=True)
    if common.size:
      c = stats.compare(g_gnn.tau[ia], g_b.tau[ib])
      comparisons[f"gnn_vs_{name}_tau"] = {"p_gnn_better": c.p, "ci": [c.ci_low, c.ci_high],
                                            "verdict": c.verdict, "groups": int(common.size)}
  ape = {k: np.abs(p[done] - y[done]) / y[done] for k, p in preds.items()}
  for name in sorted({"analytical_max", best_an}):
    c = stats.compare(ape["gnn"], ape[name], lower_is_better=True)
    comparisons[f"gnn_vs_{name}_ape"] = {"p_gnn_better": c.p, "ci": [c.ci_low, c.ci_high],
                                         "verdict": c.verdict, "rows": int(done.sum())}
  print("\nheld-out families (each fold's families unseen in training):")
  print(f"{'model':16s} {'MAPE':>8s} {'95% CI':>18s} {'tau':>7s} {'95% CI':>16s} {'OPA':>6s} {'top1 slow':>9s}")
  for r in results:
    print(f"{r['model']:16s} {r['mape']:8.3f} [{r['mape_ci'][0]:7.3f},{r['mape_ci'][1]:7.3f}] "
          f"{r['kendall_tau']:7.3f} [{r['kendall_tau_ci'][0]:6.3f},{r['kendall_tau_ci'][1]:6.3f}] "
          f"{r['pair_accuracy']:6.3f} {r['top1_slowdown']:9.3f}")
  for k, v in comparisons.items():
    print(f"{k}: P={v['p_gnn_better']:.3f} CI [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] {v['verdict']}")
  print("\nper family:", json.dumps(fam_rows, indent=None)[:2000])
  out = {"results": results, "comparisons": comparisons, "per_family": fam_rows, "folds": folds,
         "fitted_rooflines": fitted, "datasets": metas,
         "flags": {k: FLAGS[k].value for k in ("epochs", "hidden", "layers", "rank_weight", "max_rows",
                                                "noise_iqr", "floor_mult", "seed", "folds",
                                                "drop_model_duplicates")},
         "rows": int(done.sum()), "model_duplicate_rows": n_model_duplicates, "seconds": time.time() - t0,
         "provenance": provenance.record(   # every --data file as loaded: HLO texts, then the other columns
             data_arrays=[x for p in FLAGS.data for d in [ds.load_dataset(p)] for x in (*d.hlo, *d[1:-1])],
             script=__file__)}
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {FLAGS.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
