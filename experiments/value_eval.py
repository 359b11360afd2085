"""Value Learning (Steiner et al., MLSys 2021) for IOS schedules: value model vs the DP, CPU, analytical.

The LSTM value model of :mod:`mlsys_jax.cost.value` is trained on random Inception-style conv nets plus
all IOS benchmark nets but the held-out one (leave one net out), with targets from rollouts costed by
:class:`mlsys_jax.sched.AnalyticalCost` (and the DP's own schedule, as IOS's stage cache would give).
On each held-out net it reports the predicted latency (analytical model) of: the sequential schedule,
the DP (IOS search with every stage costed), greedy decoding (no stage costed) and the top-k hybrid
(only the k final candidates costed), with search times and stage-cost calls.

  python experiments/value_eval.py                        # small nets, ~minutes on a loaded CPU
  python experiments/value_eval.py --nets=squeezenet --random_nets=4 --steps=200   # quick look

``--part=options`` (issue 24 item 2b): per-program XLA option choice on the committed H100 cost dataset
(``mlsys_jax/cost/data``: 487 programs, 1,471 distinct compilations under the option variants of
``experiments/cost_collect.py``). The value model of :mod:`mlsys_jax.cost.value` (``fit_option_model``)
predicts each candidate compilation's log runtime relative to the default compilation from its
optimized HLO; the predicted-best option is compared with the exhaustively measured best, on programs
held out by program (5 random folds, several seeds) and by network family (leave one of 12 families
out). Baselines in the same run: always ``default``; the single option best on the training programs;
the single option best on the test programs (an oracle for any one global option); per family, the
option best on the training programs of that family (program split only); a gradient-boosted-trees
regressor (scikit-learn) on the same features. Runtimes: the collection's medians, and the same with
compilations that are one program (``canonical_hlo``) pooled, since their measured medians disagree by
more than 5% in most cases (reported as the noise floor).

  python experiments/value_eval.py --part=options                        # ~10 min on the shared CPU
  python experiments/value_eval.py --part=options --option_seeds=1 --option_steps=100 --option_ensemble=1

``--part=options_nested``: the held-out-family number with a clean protocol: the choice's pessimism and
margin are chosen by cross-validation over families *inside* each outer fold's training families, and
each held-out family is scored once (``value_options_nested.json``).

``--part=program_mape`` (target (b)): whole-program latency MAPE on the cost dataset, held out by program
and by family: the per-kernel roofline of :mod:`mlsys_jax.cost.kernel_roofline` vs the analytical roofline
on XLA's totals (the baseline), the same roofline on the kernel tables' totals, and gradient-boosted trees
(``value_program_mape<tag>.json``; ``--kr_correction`` adds a bounded tree correction of the kernel roofline).
``--option_test_data=<files>``: fitted once on ``--option_data``, scored on these files only (new collections).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import provenance  # noqa: E402  (experiments/provenance.py)
from mlsys_jax import sched  # noqa: E402
from mlsys_jax.cost import value as V  # noqa: E402
from mlsys_jax.models import ios_benchmark_nets, ios_init_params  # noqa: E402
from mlsys_jax.sched.api import _check_cover  # noqa: E402

_NETS = flags.DEFINE_list("nets", ["squeezenet", "inception_v3", "randwire", "nasnet"], "IOS nets.")
_RANDOM = flags.DEFINE_integer("random_nets", 8, "Random conv nets added to the training set.")
_ROLLOUTS = flags.DEFINE_integer("rollouts", 12, "Random rollouts per training graph.")
_STEPS = flags.DEFINE_integer("steps", 500, "Adam steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Training rounds (>1: model-greedy rollouts added).")
_K = flags.DEFINE_integer("k", 4, "Hybrid: beam width = candidates costed.")
_R = flags.DEFINE_integer("r", 2, "Max units per group (IOS r).")
_S = flags.DEFINE_integer("s", 4, "Max groups per stage (IOS s).")
_PART = flags.DEFINE_integer("part_size", 20, "Units per DP part.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUT = flags.DEFINE_string("out_dir", "results/value_eval", "Output directory.")
_WHAT = flags.DEFINE_enum("part", "ios", ["ios", "options", "options_nested", "program_mape"],
                          "ios: IOS schedules; options: XLA option choice; program_mape: whole-program latency "
                          "MAPE of a learned model vs the analytical roofline on the cost dataset.")
_ODATA = flags.DEFINE_list("option_data", [str(pathlib.Path(__file__).resolve().parents[1] / "mlsys_jax" / "cost"
                                              / "data" / "h100_collect_a.npz")],
                           "Cost dataset(s) (options/program_mape parts); several are merged "
                           "(cost.dataset.merge_datasets: device kind kept per program, graph duplicates "
                           "on one device dropped).")
_ODEDUPE = flags.DEFINE_bool("option_dedupe", False, "Drop programs whose default compilation repeats an "
                             "earlier program's graph on the same device (always on with several datasets).")
_ODEVICES = flags.DEFINE_list("option_devices", [], "Keep only programs timed on a device whose kind "
                              "contains one of these strings (e.g. H200).")
_OSPLIT = flags.DEFINE_enum("option_split", "both", ["both", "program", "family"],
                            "options part: held-out programs (random folds), held-out families, or both.")
_OTAG = flags.DEFINE_string("option_tag", "", "Suffix of the output JSON names (e.g. _s12).")
_OSEEDS = flags.DEFINE_integer("option_seeds", 3, "Program-split repetitions (fold seeds).")
_OSTEPS = flags.DEFINE_integer("option_steps", 400, "Adam steps per ensemble member.")
_OENS = flags.DEFINE_integer("option_ensemble", 4, "Ensemble members.")
_OPESS = flags.DEFINE_float("option_pessimism", 2.0, "Prediction = mean + pessimism * std of the members.")
_OMARGIN = flags.DEFINE_float("option_margin", 0.0, "Leave the default only if predicted faster by this (log).")
_OK = flags.DEFINE_integer("option_k", 2, "Hybrid: candidates timed per program.")
_OTARGET = flags.DEFINE_enum("option_target", "measured", ["measured", "pooled"],
                             "Training target of the options part: the measured medians, or the pooled ones "
                             "(compilations that are one program share their geometric mean).")
_OINNER = flags.DEFINE_integer("option_inner_folds", 4, "options_nested: inner folds of training families.")
_OPGRID = flags.DEFINE_list("option_pessimism_grid", ["0", "0.5", "1", "2", "3"],
                            "options_nested: pessimism values the inner validation chooses from.")
_OMGRID = flags.DEFINE_list("option_margin_grid", ["0", "0.02", "0.05"],
                            "options_nested: margins the inner validation chooses from.")
_OGBDT = flags.DEFINE_bool("option_gbdt", True, "Also fit scikit-learn gradient-boosted trees (if installed).")
_OTUNE = flags.DEFINE_bool("option_tune", False, "options with --option_test_data: choose (pessimism, margin) from "
                           "--option_pessimism_grid x --option_margin_grid by grouped-family cross-validation "
                           "(--option_inner_folds) inside the training programs (most programs within 5%, ties: "
                           "lower mean regret), then score the test programs with that choice.")
_OTEST = flags.DEFINE_list("option_test_data", [], "options / program_mape: cost dataset(s) held out as a whole: "
                           "every model is fitted once on the kept rows of --option_data and scored on the kept "
                           "rows of these files (split 'test_data'; merged after --option_data, so a program whose "
                           "graph repeats a training program on the same device is dropped; one that shares a "
                           "program key with a training program is not scored). Replaces --option_split.")


def _load_cost_data(test_paths=()):
  """The options/program_mape dataset: one file as stored, or several merged (device kept), with graph
  dedupe and the device filter; returns (dataset, description for the JSON). ``test_paths``
  (``--option_test_data``) are merged after ``--option_data``: their programs get the highest group ids."""
  from mlsys_jax.cost import dataset as cds
  paths = list(_ODATA.value)
  test_paths = list(test_paths)
  both = [os.path.realpath(p) for p in paths + test_paths]
  if len(set(both)) != len(both):
    raise ValueError(f"--option_data and --option_test_data must name distinct files; got {paths} and {test_paths}.")
  paths += test_paths
  dss = [cds.load_dataset(p) for p in paths]
  desc = {"paths": [os.path.relpath(p) for p in paths]}
  if test_paths:
    desc["test_paths"] = [os.path.relpath(p) for p in test_paths]
  if len(dss) > 1 or _ODEDUPE.value or _ODEVICES.value:
    ds, info = cds.merge_datasets(dss, [os.path.basename(p) for p in paths], dedupe=len(dss) > 1 or _ODEDUPE.value)
    r = info.duplicate_default_ratios
    desc.update({"merged": True, "sources": info.sources, "duplicates_dropped": info.duplicates_dropped,
                 "duplicate_default_ratio_median": float(np.median(r)) if r.size else None,
                 "duplicate_default_ratio_frac_over_5pct": float(np.mean(r > 1.05)) if r.size else None,
                 "programs_after_dedupe": info.programs, "unique_programs_all_devices": info.unique_programs})
    if _ODEVICES.value:
      dev = cds.row_devices(ds)
      keep = np.array([any(s_ in d for s_ in _ODEVICES.value) for d in dev])
      if not keep.any():
        raise ValueError(f"--option_devices={_ODEVICES.value} matches none of {sorted(set(dev))}.")
      ds = ds.select(keep)
      desc["devices_kept"] = sorted(set(map(str, cds.row_devices(ds))))
  else:
    ds = dss[0]
    desc["merged"] = False
  desc["devices"] = sorted(set(map(str, cds.row_devices(ds))))
  print(f"cost data: {len(ds)} rows, {len(np.unique(ds.group))} programs, devices {desc['devices']}"
        + (f", {desc.get('duplicates_dropped')} graph duplicates dropped" if desc.get("merged") else ""), flush=True)
  return ds, desc


def _device_breakdown(chosen: dict, rt, od, devs) -> dict:
  """Within-5% metrics of a choice and of always-default per device (several devices only)."""
  if len(set(devs.tolist())) < 2:
    return {}
  d0 = V.fixed_choice(0, od.option, od.group)
  out = {}
  for dv in sorted(set(devs.tolist())):
    sel = {g: r for g, r in chosen.items() if devs[r] == dv}
    out[dv] = {"value_model": V.choice_metrics(sel, rt, od.group),
               "always_default": V.choice_metrics({g: d0[g] for g in sel}, rt, od.group)}
  return out


def _family_sets(chosen: dict, rt, od) -> dict:
  """Within-5% metrics over the 12 original families and over the session-12 extra ones (if any)."""
  from mlsys_jax.cost import programs
  out = {}
  d0 = V.fixed_choice(0, od.option, od.group)
  for name, fams in (("original12", programs.FAMILIES), ("extra", programs.EXTRA_FAMILIES)):
    sel = {g: r for g, r in chosen.items() if str(od.family[r]) in fams}
    if sel and len(sel) < len(chosen):
      out[name] = {"value_model": V.choice_metrics(sel, rt, od.group),
                   "always_default": V.choice_metrics({g: d0[g] for g in sel}, rt, od.group)}
  return out


def _net_graph(name: str):
  model, shape = ios_benchmark_nets(small=True)[name]
  params = ios_init_params(model, shape)
  return sched.build_graph(lambda x: model.apply(params, x), jnp.ones(shape), part_size=_PART.value)


def _seq_cost(g, cost):
  return V.schedule_cost(g, [sched.Stage("parallel", ((u,),)) for u in range(len(g.units))], cost)


def _option_splits(od, seeds, prog_keys=None):
  from mlsys_jax.cost import value as V  # noqa: F811
  keys = od.group if prog_keys is None else prog_keys  # one program on several devices: one fold
  out = [("program", f"seed{k}", V.group_folds(keys, 5, k)) for k in range(seeds)] \
      if _OSPLIT.value in ("both", "program") else []
  fams = np.unique(od.family)
  if _OSPLIT.value in ("both", "family"):
    out.append(("family", "lofo", [od.family == f for f in fams]))
  return out


def _global_best(od, rows_mask, runtime):
  """The option whose fixed choice is within 5% of the best for the most programs of ``rows_mask``."""
  best, key = 0, None
  grp = od.group[rows_mask]
  for k in range(len(od.options)):
    if not np.any(od.option[rows_mask] == k):
      continue
    ch = V.fixed_choice(k, od.option[rows_mask], grp)
    m = V.choice_metrics(ch, runtime[rows_mask], grp)
    score = (m["within_tol"], -m["mean_regret"])
    if key is None or score > key:
      best, key = k, score
  return best


def _option_test_split(ds, desc, od):
  """``--option_test_data`` for the options part: the option-candidate rows of the test files' programs (the
  model's test fold) and of those that may be scored (:func:`_test_data_rows`), as masks over ``od``'s rows."""
  test_rows, test_scored, desc["test_data"], _ = _test_data_rows(ds, desc["sources"], len(_ODATA.value))
  group = np.asarray(ds.group, np.int64)
  test = np.isin(od.group, np.unique(group[test_rows]))
  scored = np.isin(od.group, np.unique(group[test_scored]))
  if not scored.any():
    raise ValueError("--option_test_data: no test program may be scored (each shares a program key with training).")
  return test, scored


def _option_rows(od, sel):
  """``od`` (``cost.value.OptionData``) restricted to the rows ``sel`` (a boolean mask over its rows)."""
  n = len(od.y)
  return od._replace(**{f: np.asarray(v)[sel] for f, v in od._asdict().items()
                        if isinstance(v, np.ndarray) and v.shape[:1] == (n,)})


def _hp_grid():
  """The (pessimism, margin) pairs of ``--option_pessimism_grid`` x ``--option_margin_grid``."""
  return [(float(p), float(m)) for p in _OPGRID.value for m in _OMGRID.value]


def _inner_predictions(od, train, cfg):
  """Ensemble predictions (members, rows) for the rows ``train`` (a mask over ``od``), each from a fit on the
  other training families (``--option_inner_folds`` family-grouped folds inside ``train``; other rows 0), and
  the number of fits."""
  idx_tr = np.flatnonzero(train)
  inner = np.zeros((cfg.ensemble, len(od.y)))
  folds = V.group_folds(od.family[train], _OINNER.value, _SEED.value)
  for va_local in folds:
    va, it = idx_tr[va_local], idx_tr[~va_local]
    m = V.fit_option_model(od.x[it], od.y[it], od.group[it], cfg)
    inner[:, va] = V.predict_members(m, od.x[va])
  return inner, len(folds)


def _grid_scores(od, train, inner, runtime, grid):
  """Per (pessimism, margin) of ``grid``: (within 5%, -mean regret) of the choice made from ``inner`` on the
  programs of the rows ``train``, scored with ``runtime``."""
  idx_tr = np.flatnonzero(train)
  dm = od.option == 0
  scores = {}
  for p, mg in grid:
    pr = inner[:, train].mean(0) + p * inner[:, train].std(0)
    ch = V.choose(pr, od.group[train], default_mask=dm[train], margin=mg)
    met = V.choice_metrics({g: int(idx_tr[r]) for g, r in ch.items()}, runtime, od.group)
    scores[(p, mg)] = (met["within_tol"], -met["mean_regret"])
  return scores


def _tune_choice(od, train, cfg, runtime):
  """(pessimism, margin, scores) chosen from the grids by grouped-family cross-validation inside the rows
  ``train`` (a mask over ``od``): every training row gets a prediction from an ensemble fitted without its family
  group; the pair with the most training programs within 5% of their best (ties: lower mean regret) wins. The
  test rows are never read."""
  grid = _hp_grid()
  n_fam = len(np.unique(od.family[train]))
  if n_fam < _OINNER.value:
    raise ValueError(f"--option_tune: the training programs hold {n_fam} families, fewer than "
                     f"--option_inner_folds={_OINNER.value}; lower --option_inner_folds (>= 2) or add data.")
  inner, _ = _inner_predictions(od, train, cfg)
  scores = _grid_scores(od, train, inner, runtime, grid)
  best = max(grid, key=lambda k: scores[k])
  return best[0], best[1], {f"{p}/{mg}": {"within_tol": sc[0], "mean_regret": -sc[1]} for (p, mg), sc in scores.items()}


def part_options():
  from mlsys_jax.cost import dataset as cds
  t0 = time.perf_counter()
  test_mode = bool(_OTEST.value)
  if test_mode and (flags.FLAGS["option_split"].present or flags.FLAGS["option_seeds"].present):
    raise ValueError("--option_test_data replaces the folds of --option_split / --option_seeds (one split, "
                     "'test_data'): drop one.")
  ds, desc = _load_cost_data(_OTEST.value)
  od = V.option_data(ds)
  devs = cds.row_devices(ds)   # (option_data keeps the dataset's rows one to one)
  test_masks = _option_test_split(ds, desc, od) if test_mode else None
  print(f"option data: {len(od.y)} candidates of {len(np.unique(od.group))} programs, "
        f"{od.x.shape[1]} features ({time.perf_counter() - t0:.0f} s)", flush=True)
  dm = od.option == 0
  if _OTARGET.value == "pooled":  # labels without the same-program timing disagreement
    lp = np.log(od.runtime_pooled)
    d_of = {int(g): lp[(od.group == g) & dm][0] for g in np.unique(od.group)}
    od = od._replace(y=lp - np.array([d_of[int(g)] for g in od.group]))
  # Noise floor: compilations that are the same program (pooled), their medians compared.
  ratios = []
  for gid in np.unique(od.group):
    rows = np.flatnonzero(od.group == gid)
    same = rows[np.isclose(od.runtime_pooled[rows], od.runtime_pooled[rows][:, None]).sum(0) > 1]
    if same.size >= 2 and not np.allclose(od.runtime_s[same], od.runtime_s[same][0]):
      ratios.append(od.runtime_s[same].max() / od.runtime_s[same].min())
  ratios = np.asarray(ratios)
  noise = {"same_program_pairs": int(ratios.size),
           "frac_differ_over_5pct": float(np.mean(ratios > 1.05)) if ratios.size else None,
           "median_max_over_min": float(np.median(ratios)) if ratios.size else None}
  print("noise floor:", noise, flush=True)
  cfg = V.OptionConfig(steps=_OSTEPS.value, ensemble=_OENS.value, seed=_SEED.value,
                       pessimism=_OPESS.value, margin=_OMARGIN.value)
  runtimes = {"measured": od.runtime_s, "pooled": od.runtime_pooled}
  results = {}
  splits = ([("test_data", "fresh", [test_masks[0]])] if test_mode
            else _option_splits(od, _OSEEDS.value, cds.program_keys(ds)))
  od_all, devs_all, dm_all = od, devs, dm
  pess, margin, tuned = _OPESS.value, _OMARGIN.value, None
  if _OTUNE.value:
    if not test_mode:
      raise ValueError("--option_tune needs --option_test_data (the folds of options_nested tune per family).")
    if flags.FLAGS["option_pessimism"].present or flags.FLAGS["option_margin"].present:
      raise ValueError("--option_tune chooses the pessimism and the margin: drop --option_pessimism / "
                       "--option_margin (the grids are --option_pessimism_grid / --option_margin_grid).")
    pess, margin, tuned = _tune_choice(od, ~test_masks[0], cfg,   # scored on the target's runtimes
                                       od.runtime_pooled if _OTARGET.value == "pooled" else od.runtime_s)
    print(f"tuned on the training programs: pessimism {pess}, margin {margin}", flush=True)
  for split, tag, folds in splits:
    od, devs, dm = od_all, devs_all, dm_all
    members = np.zeros((cfg.ensemble, len(od.y)))
    flag = np.zeros(len(od.y), bool)
    gb = np.full(len(od.y), np.nan)
    glob_choice = {}
    fam_choice = {}
    t = time.perf_counter()
    for te in folds:
      tr = ~te
      m = V.fit_option_model(od.x[tr], od.y[tr], od.group[tr], cfg)
      members[:, te] = V.predict_members(m, od.x[te])
      flag[te] = V.option_ood(m, od.x[te])
      if _OGBDT.value:
        try:
          from sklearn.ensemble import HistGradientBoostingRegressor
          from threadpoolctl import threadpool_limits
        except ImportError:
          pass
        else:
          with threadpool_limits(1):  # OpenMP threads on a shared CPU: 25x slower than one thread
            reg = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.1, random_state=_SEED.value)
            gb[te] = reg.fit(od.x[tr], od.y[tr]).predict(od.x[te])
      for name, rt in runtimes.items():
        k = _global_best(od, tr, rt)
        idx = np.flatnonzero(te)
        glob_choice.setdefault(name, {}).update(
            {g: int(idx[r]) for g, r in V.fixed_choice(k, od.option[te], od.group[te]).items()})
        if split == "program":
          for f in np.unique(od.family[te]):
            trf = tr & (od.family == f)
            tef = te & (od.family == f)
            kf = _global_best(od, trf, rt) if trf.any() else 0
            fam_choice.setdefault(name, {}).update(
                {g: int(np.flatnonzero(tef)[r]) for g, r in V.fixed_choice(kf, od.option[tef], od.group[tef]).items()})
    fit_s = time.perf_counter() - t
    if split == "test_data":   # score the scored test programs only (every other row trained the model)
      sel = test_masks[1]
      pos = np.cumsum(sel) - 1
      od, devs, dm = _option_rows(od, sel), devs[sel], dm[sel]
      members, flag, gb = members[:, sel], flag[sel], gb[sel]
      glob_choice = {name: {g: int(pos[i]) for g, i in c.items() if sel[i]} for name, c in glob_choice.items()}
    scored_rt = {"measured": od.runtime_s, "pooled": od.runtime_pooled}   # (of the rows scored in this split)
    pred = members.mean(0) + pess * members.std(0)
    res = {"fit_s": fit_s, "folds": len(folds), "programs_flagged_ood": int(len(np.unique(od.group[flag])))}
    for name, rt in scored_rt.items():
      r = {}
      r["value_model"] = V.choice_metrics(V.choose(pred, od.group, default_mask=dm, margin=margin),
                                          rt, od.group)
      r["value_model_mean_only"] = V.choice_metrics(V.choose(members.mean(0), od.group), rt, od.group)
      r["value_model_ood_to_default"] = V.choice_metrics(
          V.choose(pred, od.group, default_mask=dm, margin=margin, flagged=flag), rt, od.group)
      h, timed = V.hybrid_choice(pred, rt, od.group, _OK.value)
      r[f"hybrid_top{_OK.value}"] = {**V.choice_metrics(h, rt, od.group), "timed": timed,
                                      "timed_exhaustive": int(len(od.y))}
      if np.all(np.isfinite(gb)):
        r["gbdt"] = V.choice_metrics(V.choose(gb, od.group, default_mask=dm, margin=margin), rt, od.group)
      r["always_default"] = V.choice_metrics(V.fixed_choice(0, od.option, od.group), rt, od.group)
      # paired per program against the default: clearly faster (> 5%) / clearly slower
      d0 = V.fixed_choice(0, od.option, od.group)
      for key, ch_ in [("value_model", V.choose(pred, od.group, default_mask=dm, margin=margin))] + (
          [("gbdt", V.choose(gb, od.group, default_mask=dm, margin=margin))] if np.all(np.isfinite(gb)) else []):
        ratio = np.array([rt[ch_[g]] / rt[d0[g]] for g in d0])
        r[key]["vs_default"] = {"faster_by_5pct": int(np.sum(ratio < 1 / 1.05)),
                                "slower_by_5pct": int(np.sum(ratio > 1.05)),
                                "geomean_speedup": float(np.exp(-np.mean(np.log(ratio))))}
      r["global_option_from_training"] = V.choice_metrics(glob_choice[name], rt, od.group)
      best_k = _global_best(od, np.ones(len(od.y), bool), rt)
      r["global_option_oracle"] = {**V.choice_metrics(V.fixed_choice(best_k, od.option, od.group), rt, od.group),
                                   "option": od.options[best_k]}
      if fam_choice:
        r["per_family_option_from_training"] = V.choice_metrics(fam_choice[name], rt, od.group)
      per_fam = {}
      ch = V.choose(pred, od.group, default_mask=dm, margin=margin)
      d0 = V.fixed_choice(0, od.option, od.group)
      for f in np.unique(od.family):
        gsel = {g: v for g, v in ch.items() if od.family[v] == f}
        per_fam[str(f)] = {"value_model": V.choice_metrics(gsel, rt, od.group),
                           "always_default": V.choice_metrics({g: d0[g] for g in gsel}, rt, od.group)}
      r["per_family"] = per_fam
      r["per_device"] = _device_breakdown(ch, rt, od, devs)
      r["family_sets"] = _family_sets(ch, rt, od)
      res[name] = r
      print(f"[{split} {tag}] {name}: value model within 5% {r['value_model']['within_tol']:.3f} "
            f"(regret {r['value_model']['mean_regret']:.3f}) | default {r['always_default']['within_tol']:.3f} "
            f"({r['always_default']['mean_regret']:.3f}) | global (train) "
            f"{r['global_option_from_training']['within_tol']:.3f} | oracle global "
            f"{r['global_option_oracle']['within_tol']:.3f} ({r['global_option_oracle']['option']})"
            + (f" | gbdt {r['gbdt']['within_tol']:.3f}" if "gbdt" in r else "")
            + f" | hybrid top{_OK.value} {r[f'hybrid_top{_OK.value}']['within_tol']:.3f} "
            f"({timed}/{len(od.y)} timed)  [{fit_s:.0f} s]", flush=True)
    results[f"{split}/{tag}"] = res
  od = od_all
  out = {"dataset": {**desc, "programs": int(len(np.unique(od.group))),
                     "candidates": int(len(od.y)), "options": list(od.options), "device": ds.meta.get("device")},
         "config": {**cfg._asdict(), "pessimism": pess, "margin": margin, "tuned": tuned, "k": _OK.value,
                    "seeds": _OSEEDS.value, "target": _OTARGET.value, "split": _OSPLIT.value,
                    "program_folds": "by program key (one program on several devices in one fold)"},
         "noise_floor": noise, "results": results, "total_s": time.perf_counter() - t0,
         # the cost dataset: the HLO texts, then the columns (meta left out)
         "provenance": provenance.record(data_arrays=[*ds.hlo, *ds[1:-1]], script=__file__)}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, (f"value_options{_OTAG.value}.json" if _OTARGET.value == "measured"
                                   else f"value_options_{_OTARGET.value}_target{_OTAG.value}.json"))
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


def part_options_nested():
  """Held-out families with the choice's hyper-parameters fixed inside the training families only.

  For each family F (outer fold): the training rows are the other 11 families; they are split into
  ``--option_inner_folds`` groups of families; the ensemble is fitted on all but one group and predicts
  the held-out group (every training row gets an out-of-family prediction); the (pessimism, margin) of
  the grid with the most training programs within 5% (ties: lower mean regret) is kept; the ensemble is
  fitted on all 11 families and F's choice made with the kept values. F's runtimes are never looked at
  before its choice is made. The model's own settings (features, width, steps, ensemble size) are the
  defaults of ``OptionConfig``; they were set in an earlier session while looking at the family split,
  which this protocol cannot undo."""
  from mlsys_jax.cost import dataset as cds
  t0 = time.perf_counter()
  ds, desc = _load_cost_data()
  devs = cds.row_devices(ds)
  od = V.option_data(ds)
  dm = od.option == 0
  print(f"option data: {len(od.y)} candidates of {len(np.unique(od.group))} programs "
        f"({time.perf_counter() - t0:.0f} s)", flush=True)
  cfg = V.OptionConfig(steps=_OSTEPS.value, ensemble=_OENS.value, seed=_SEED.value)
  grid = _hp_grid()
  rt = od.runtime_s  # the selection uses the target's runtimes (measured medians) on training rows only
  fams = np.unique(od.family)
  choice, chosen_hp, inner_scores, fit_count = {}, {}, {}, 0
  outer_members = np.zeros((cfg.ensemble, len(od.y)))
  for f in fams:
    te = od.family == f
    tr = ~te
    inner, n_fits = _inner_predictions(od, tr, cfg)
    fit_count += n_fits
    scores = _grid_scores(od, tr, inner, rt, grid)
    best = max(grid, key=lambda k: scores[k])
    chosen_hp[str(f)] = {"pessimism": best[0], "margin": best[1], "inner_within_tol": scores[best][0],
                         "inner_mean_regret": -scores[best][1]}
    inner_scores[str(f)] = {f"{p}/{mg}": scores[(p, mg)][0] for p, mg in grid}
    m = V.fit_option_model(od.x[tr], od.y[tr], od.group[tr], cfg)
    fit_count += 1
    mem = V.predict_members(m, od.x[te])
    outer_members[:, te] = mem
    idx_te = np.flatnonzero(te)
    pr = mem.mean(0) + best[0] * mem.std(0)
    ch = V.choose(pr, od.group[te], default_mask=dm[te], margin=best[1])
    choice.update({g: int(idx_te[r]) for g, r in ch.items()})
    print(f"[{f}] chose pessimism {best[0]}, margin {best[1]} (inner within 5%: {scores[best][0]:.3f}) "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
  res = {}
  for name, r_ in (("measured", od.runtime_s), ("pooled", od.runtime_pooled)):
    res[name] = {"value_model_nested": V.choice_metrics(choice, r_, od.group),
                 "always_default": V.choice_metrics(V.fixed_choice(0, od.option, od.group), r_, od.group)}
    # the same outer fits with the earlier fixed setting (pessimism 2, margin 0), for comparison
    fixed = V.choose(outer_members.mean(0) + 2.0 * outer_members.std(0), od.group, default_mask=dm)
    res[name]["value_model_fixed_p2_m0"] = V.choice_metrics(fixed, r_, od.group)
    d0 = V.fixed_choice(0, od.option, od.group)
    ratio = np.array([r_[choice[g]] / r_[d0[g]] for g in d0])
    res[name]["value_model_nested"]["vs_default"] = {
        "faster_by_5pct": int(np.sum(ratio < 1 / 1.05)), "slower_by_5pct": int(np.sum(ratio > 1.05)),
        "geomean_speedup": float(np.exp(-np.mean(np.log(ratio))))}
    res[name]["per_device"] = _device_breakdown(choice, r_, od, devs)
    res[name]["family_sets"] = _family_sets(choice, r_, od)
    v = res[name]["value_model_nested"]
    print(f"held-out families, nested ({name}): within 5% {v['within_tol']:.3f} "
          f"[{v['within_tol_ci95'][0]:.3f}, {v['within_tol_ci95'][1]:.3f}], mean regret {v['mean_regret']:.3f} | "
          f"always default {res[name]['always_default']['within_tol']:.3f} | fixed p=2 "
          f"{res[name]['value_model_fixed_p2_m0']['within_tol']:.3f}", flush=True)
  out = {"dataset": {**desc, "programs": int(len(np.unique(od.group))),
                     "candidates": int(len(od.y)), "device": ds.meta.get("device")},
         "protocol": f"leave one family out (outer, {len(fams)}); pessimism and margin chosen by grouped-family "
                     f"cross-validation ({_OINNER.value} folds) inside the {len(fams) - 1} training families, on the "
                     "measured runtimes; the held-out family's choice made once with the chosen values",
         "config": {**cfg._asdict(), "grid": grid, "inner_folds": _OINNER.value}, "fits": fit_count,
         "chosen": chosen_hp, "inner_scores": inner_scores, "results": res,
         "total_s": time.perf_counter() - t0,
         # the cost dataset: the HLO texts, then the columns (meta left out)
         "provenance": provenance.record(data_arrays=[*ds.hlo, *ds[1:-1]], script=__file__)}
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, f"value_options_nested{_OTAG.value}.json")
  with open(path, "w") as fh:
    json.dump(out, fh, indent=1)
  print(f"wrote {path}")


_KR_SHARP = flags.DEFINE_float("kr_sharpness", 16.0, "program_mape: kernel roofline soft-max sharpness.")
_KR_RIDGE = flags.DEFINE_float("kr_ridge", 0.001, "program_mape: kernel roofline ridge.")
_KR_STEPS = flags.DEFINE_integer("kr_steps", 1500, "program_mape: kernel roofline Adam steps.")
_KR_CORR = flags.DEFINE_bool("kr_correction", False, "program_mape: also a bounded learned correction of the "
                             "kernel roofline (trees on log(runtime / prediction), clipped to +-b; b chosen by "
                             "an inner 4-fold cross-validation grouped like the outer split).")
_KR_LABELS = flags.DEFINE_bool("kr_labels", False, "program_mape: also the kernel roofline fitted with per-kernel "
                               "profiler times as labels (datasets with profiler columns; "
                               "kernel_roofline.match_kernel_times) plus a per-launch gap "
                               "(model 'kernel_roofline_labels').")
_KR_GAP = flags.DEFINE_bool("kr_gap_per_class", True, "program_mape: --kr_labels model's launch gap per kernel "
                             "class and device (else one per device).")
_KR_FLOOR = flags.DEFINE_bool("kr_host_floor", False, "program_mape: kernel roofline models (with and without "
                               "labels) with a per-device host floor: wall = softmax_8(device-side time, H_d).")
_KR_KW = flags.DEFINE_float("kr_kernel_weight", 1.0, "program_mape: weight of the per-kernel loss (--kr_labels).")
_KR_HL = flags.DEFINE_bool("kr_host_launch", False, "program_mape: kernel roofline with a host cost per launch "
                           "and class on the host side of the floor's overlap (KernelRooflineConfig.host_launch; "
                           "needs --kr_host_floor).")
_KR_BR = flags.DEFINE_string("kr_bytes_ridge", "none", "program_mape: penalty of the byte rates' class terms "
                             "(KernelRooflineConfig.bytes_ridge; 'none': kr_ridge).")
_KR_BR_GRID = flags.DEFINE_list("kr_bytes_ridge_grid", [], "program_mape: if given, bytes_ridge is chosen per outer "
                                "fold from these values ('none' allowed) by an inner cross-validation inside the "
                                "training rows, grouped like the outer split (--kr_inner_folds), lowest inner MAPE.")
_KR_LHL = flags.DEFINE_bool("kr_labels_host_launch", False, "program_mape: the --kr_labels model with "
                            "KernelRooflineConfig.host_launch (default off: --kr_host_launch is the plain model's).")
_KR_GLIB = flags.DEFINE_bool("kr_gap_library_only", False, "program_mape: the --kr_labels model's launch gap on "
                             "library calls only (KernelRooflineConfig.gap_library_only).")
_KR_WS = flags.DEFINE_bool("kr_wall_scale", False, "program_mape: the --kr_labels model with a per-device ratio of "
                           "wall time to profiled kernel time (KernelRooflineConfig.wall_scale).")
_KR_INNER = flags.DEFINE_integer("kr_inner_folds", 4, "program_mape: inner folds of --kr_bytes_ridge_grid.")
_KR_REF = flags.DEFINE_bool("kr_reference", False, "program_mape: also the session-14 configuration (host floor "
                            "only, one ridge) as 'kernel_roofline_floor_only', same folds.")
_KR_KOPT_GRID = flags.DEFINE_list("kr_kernel_options_grid", [], "program_mape: kernel-table options "
                                  "(cost.kernel_roofline.program_kernels: 'sort' = sort_model, 'scatter' = "
                                  "scatter_contention, 'conv' = conv_model; the labels' rule: 'shared' = "
                                  "match_kernel_times(shared_kernels=True); fit options of KernelRooflineConfig: "
                                  "'huber' = objective 'huber_log', 'l2' = l2_bytes=L2_BYTES, 'overlap' = "
                                  "overhead_overlap; session 20: 'tiles' = program_kernels(sort_tiles=True), 'cfusion' "
                                  "= custom_fusion_calls=True, 'bodies' = the labels' match_kernel_times(kernel_bodies"
                                  "=True, kernel_suffixes=True), 'hostgap' = gap_on_host (the labelled model with "
                                  "--kr_gap_library_only), 'convgemm' = conv_gemm_rates; session 27: 'scatterw' = "
                                  "program_kernels(scatter_width=True) (with 'scatter'), 'convdir' = conv_direction=True; "
                                  "'+'-joined sets, or 'none'), chosen "
                                  "per outer fold and per "
                                  "kernel-roofline model by the inner cross-validation inside the training rows "
                                  "(--kr_inner_folds, grouped like the outer split; jointly with "
                                  "--kr_bytes_ridge_grid); one value: used in every fold; empty: 'none'.")
_KR_BLEND = flags.DEFINE_bool("kr_blend", False, "program_mape: also 'kernel_roofline_blend', the geometric blend "
                              "exp(w log labelled + (1 - w) log plain) of the two kernel-roofline models, w in "
                              "_KR_BLEND_W chosen per outer fold on the two models' inner cross-validation "
                              "predictions (needs --kr_labels and an inner grid).")
_KR_DFLOOR = flags.DEFINE_bool("kr_dispatch_floor_scale", False, "program_mape (session 25): both kernel-roofline "
                                "models take each row's collection-measured dispatch floor f (its file's "
                                "meta['dispatch_floor_s']: cost_collect's timing of a trivial jitted program, measured "
                                "before any program) as a host covariate z = log(f / 40 us): the host side of the "
                                "floor's overlap scales by exp(gamma_h z), the program overhead by exp(gamma_o z), "
                                "gamma_h, gamma_o fitted and shared by the devices (fit_kernel_roofline host_covariate). "
                                "Off: the models and outputs of before.")
_KR_DFLOOR_FROM = flags.DEFINE_enum("kr_dispatch_floor_from", "start", ["start", "timing", "end"],
                                    "program_mape, with --kr_dispatch_floor_scale: which of the collection's floors "
                                    "is the covariate: 'start' meta['dispatch_floor_s'] (before any program); "
                                    "'timing' the median of the floors probed before each program's timing "
                                    "(meta['dispatch_floor_timing_s'], recorded since session 25); 'end' "
                                    "meta['dispatch_floor_end_s']. A file without the chosen one uses its start "
                                    "floor, recorded per file in the JSON (dispatch_floor_source).")
_KR_DFLOOR_HOST = flags.DEFINE_bool("kr_dispatch_floor_host_only", False, "program_mape: with "
                                    "--kr_dispatch_floor_scale, gamma_o held at 0 (the covariate scales the host side "
                                    "of the floor's overlap only, not the program overhead).")
_KR_FILE_HOST = flags.DEFINE_bool("kr_file_host_effect", False, "program_mape (session 25): both kernel-roofline "
                                  "models fitted with a factor per training data file on the host side of the "
                                  "floor's overlap and one on the program overhead, centred over each device's files "
                                  "(fit_kernel_roofline host_group): a device's host terms are its files' equal-weight "
                                  "average, and a test file is predicted as a typical collection of its device. Off: "
                                  "the models and outputs of before.")
_KR_DFLOOR_TIED = flags.DEFINE_bool("kr_dispatch_floor_tied", False, "program_mape (session 26 diagnosis): with "
                                    "--kr_dispatch_floor_scale, one fitted exponent for the host side and the program "
                                    "overhead (fit_kernel_roofline host_covariate_tied: gamma_o = gamma_h). Off: as before.")
_KR_DFLOOR_EXP = flags.DEFINE_list("kr_dispatch_floor_exponents", [], "program_mape (session 26 diagnosis): with "
                                   "--kr_dispatch_floor_scale, two fixed exponents 'gamma_h,gamma_o' instead of fitted "
                                   "ones (fit_kernel_roofline host_covariate_exponents; '1,1': host side and program "
                                   "overhead proportional to the file's floor). Empty (default): fitted, as before.")
_KR_DFLOOR_LAUNCH = flags.DEFINE_bool("kr_dispatch_floor_launch", False, "program_mape (session 27 helper): with "
                                     "--kr_dispatch_floor_scale, the covariate scales the per-launch device-side wall "
                                     "costs (kernel overhead o and launch gap g, x exp(gamma_k z), one fitted exponent) "
                                     "instead of the program overhead (gamma_o held at 0; host side x exp(gamma_h z) as "
                                     "before): fit_kernel_roofline host_covariate_launch. Off: as before.")
_KR_DFLOOR_BOUND = flags.DEFINE_float("kr_dispatch_floor_bound", None, "program_mape (session 27 helper): with "
                                      "--kr_dispatch_floor_scale, every fitted exponent of the covariate kept inside "
                                      "(-B, B) as B tanh(u / B) (fit_kernel_roofline host_covariate_bound; e.g. 2). "
                                      "Unset (default): unbounded, as before.")
_KR_LIBF = flags.DEFINE_bool("kr_library_floor_scale", False, "program_mape (session 28 helper): both kernel-roofline "
                              "models take each row's file dispatch floor f (the one --kr_dispatch_floor_from names) "
                              "as a library covariate z_L = log(f / 40 us): the host-side costs of library calls "
                              "(cuBLAS / cuDNN custom calls: per-launch host cost, host-side launch gap) scale by "
                              "exp(gamma_{L,d} z_L), one fitted exponent per device (fit_kernel_roofline "
                              "library_covariate). Needs --kr_host_floor; independent of --kr_dispatch_floor_scale. "
                              "Off: the models and outputs of before.")
_PM_ROWS_OUT = flags.DEFINE_string("program_mape_rows_out", "", "program_mape (session 26 diagnosis): if given, a "
                                   "pickle path: per split, every row's measured runtime, kept / scored masks, family, "
                                   "device, data file, host covariate, profiled busy time and each model's prediction "
                                   "(wall and device busy), plus each outer fold's fitted kernel-roofline models, "
                                   "their kernel-table options, blend weight and the test rows' kernel tables. Empty "
                                   "(default): nothing written, every other output unchanged.")
_DFLOOR_REF_S = 40e-6
_KR_BLEND_W = [0.0, 0.25, 0.5, 0.75, 1.0]
_KR_BOUNDS = [0.0, float(np.log(1.25)), float(np.log(1.5)), float(np.log(2.0)), float("inf")]


def _bytes_ridge(v: str):
  """'none' -> None, else a float >= 0 (flag values of --kr_bytes_ridge / --kr_bytes_ridge_grid)."""
  if str(v).strip().lower() == "none":
    return None
  try:
    r = float(v)
  except ValueError:
    raise ValueError(f"bytes ridge must be 'none' or a number >= 0, got {v!r}.") from None
  if not r >= 0:
    raise ValueError(f"bytes ridge must be 'none' or a number >= 0, got {v!r}.")
  return r


# option tokens of --kr_kernel_options_grid: kernel-table options of program_kernels, then fit options of
# KernelRooflineConfig (session 17: 'conv' = conv_model; 'shared' = the labels' shared_kernels rule of
# match_kernel_times; 'huber' = objective 'huber_log'; 'l2' = l2_bytes=L2_BYTES; 'overlap' = overhead_overlap)
_KOPT_TABLE = ("sort", "scatter", "conv", "tiles", "cfusion", "scatterw", "convdir")
_KOPT_FIT = ("shared", "huber", "l2", "overlap", "bodies", "hostgap", "convgemm")
# session 20: 'tiles' = sort_tiles, 'cfusion' = custom_fusion_calls (program_kernels); 'bodies' = the labels'
# kernel_bodies and kernel_suffixes rules (match_kernel_times); 'hostgap' = gap_on_host, 'convgemm' = conv_gemm_rates;
# session 27: 'scatterw' = scatter_width (needs 'scatter'), 'convdir' = conv_direction (program_kernels)


def _kernel_option(v: str) -> str:
  """A --kr_kernel_options_grid value, normalised: 'none', or '+'-joined tokens of sort, scatter, conv, tiles,
  cfusion, scatterw, convdir, shared, huber, l2, overlap, bodies, hostgap, convgemm in that order ('scatter+sort' ->
  'sort+scatter'); 'scatterw' needs 'scatter' in the same set."""
  toks = [t.strip() for t in str(v).strip().lower().split("+")]
  order = _KOPT_TABLE + _KOPT_FIT
  if toks == ["none"]:
    return "none"
  if not toks or any(t not in order for t in toks) or len(set(toks)) != len(toks):
    raise ValueError(f"kernel option set must be 'none' or '+'-joined distinct tokens of {', '.join(order)}; got {v!r}.")
  if "scatterw" in toks and "scatter" not in toks:
    raise ValueError(f"kernel option 'scatterw' (scatter_width) changes 'scatter''s feature: add 'scatter'; got {v!r}.")
  return "+".join(t for t in order if t in toks)


def _kopt_tables(o: str) -> str:
  """The kernel-table part of a normalised option set ('sort+conv+l2' -> 'sort+conv'; 'none' if empty)."""
  return "+".join(t for t in o.split("+") if t in _KOPT_TABLE) or "none"


def _kopt_table_kwargs(o: str) -> dict:
  """program_kernels keyword arguments of a kernel-table option set."""
  toks = o.split("+")
  kw = {"sort_model": "sort" in toks, "scatter_contention": "scatter" in toks, "conv_model": "conv" in toks}
  for tok, name in (("tiles", "sort_tiles"), ("cfusion", "custom_fusion_calls"),   # session 20, only when asked
                    ("scatterw", "scatter_width"), ("convdir", "conv_direction")):   # session 27
    if tok in toks:
      kw[name] = True
  return kw


def _kopt_config(o: str, cfg):
  """``cfg`` (a KernelRooflineConfig) with the fit options of option set ``o``. 'hostgap' (gap_on_host) acts on
  the labelled model's library launch gap: it is set only where ``cfg`` has ``gap_library_only`` and ``host_floor``
  (the plain model has no launch gap)."""
  from mlsys_jax.cost import kernel_roofline as KR
  toks = o.split("+")
  return cfg._replace(l2_bytes=KR.L2_BYTES if "l2" in toks else None, overhead_overlap="overlap" in toks,
                      objective="huber_log" if "huber" in toks else cfg.objective,
                      gap_on_host="hostgap" in toks and cfg.gap_library_only and cfg.host_floor,
                      conv_gemm_rates="convgemm" in toks)


def _check_kr_flags(host_floor: bool, host_launch: bool, labels: bool, labels_host_launch: bool,
                    gap_library_only: bool, wall_scale: bool) -> None:
  """Flag combinations of --part=program_mape that would fail (or be ignored) only after minutes of
  feature extraction: raise at once, saying which flag to add."""
  if (host_launch or labels_host_launch) and not host_floor:
    raise ValueError("--kr_host_launch / --kr_labels_host_launch put per-launch costs on the host floor's side: "
                     "add --kr_host_floor.")
  if (labels_host_launch or gap_library_only or wall_scale) and not labels:
    raise ValueError("--kr_labels_host_launch, --kr_gap_library_only and --kr_wall_scale configure the labelled "
                     "model: add --kr_labels (with profiled --option_data).")


def _choose_by_inner_cv(fit, predict, rows, runtime, inner_keys, configs, n_folds, seed, inner_pred=None):
  """The config of ``configs`` with the lowest MAPE over an inner cross-validation of the (training) rows
  ``rows``: ``n_folds`` folds of their distinct ``inner_keys`` (programs, or families: grouped like the outer
  split), each predicted by ``fit(other rows, config)`` through ``predict(model, rows)``. Returns (index of
  the chosen config, inner MAPE per config, pooled over the inner validation rows). With ``inner_pred`` (a
  float array over all rows), the chosen config's inner-validation predictions are written into it at
  ``rows`` (for a blend chosen on the same inner folds, ``--kr_blend``)."""
  rows, keys = np.asarray(rows), np.asarray(inner_keys)[rows]
  err = [[] for _ in configs]
  preds = [np.full(len(runtime), np.nan) for _ in configs] if inner_pred is not None else None
  for va in V.group_folds(keys, min(n_folds, len(np.unique(keys))), seed):
    it, iv = rows[~va], rows[va]
    for j, cfg in enumerate(configs):
      p_ = predict(fit(it, cfg), iv)
      err[j].append(np.abs(p_ / runtime[iv] - 1.0))
      if preds is not None:
        preds[j][iv] = p_
  scores = [float(np.concatenate(e).mean()) for e in err]
  best = int(np.argmin(scores))
  if inner_pred is not None:
    inner_pred[rows] = preds[best][rows]
  return best, scores


def _ratio_ci(ape_base, ape_model, rows_of, progs, seed):
  """95% bootstrap interval over programs (rows of one program resampled together) of
  mean(ape_base) / mean(ape_model)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(1000):
    idx = np.concatenate([rows_of[p_] for p_ in rng.choice(progs, progs.size)])
    out.append(ape_base[idx].mean() / ape_model[idx].mean())
  return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))]


def _kendall(pred: dict, rt, keep, prog_keys) -> dict:
  """Kendall's tau between each model's predictions and the measured runtimes on the kept rows: over all
  rows, and the mean over programs with >= 3 kept rows of the tau among one program's compilations (the
  ranking an option choice needs; ties in a program's predictions, e.g. compilations with one HLO, count
  as tau-b)."""
  from scipy.stats import kendalltau
  out = {}
  progs = [np.flatnonzero(keep & (prog_keys == p_)) for p_ in np.unique(prog_keys[keep])]
  progs = [r for r in progs if r.size >= 3]
  for k, p_ in pred.items():
    within = [kendalltau(p_[r], rt[r]).statistic for r in progs]
    within = [w for w in within if np.isfinite(w)]
    out[k] = {"all_rows": float(kendalltau(p_[keep], rt[keep]).statistic),
              "within_program_mean": float(np.mean(within)) if within else None,
              "programs": len(within)}
  return out


def _kernel_labels(ds, kts, paths, shared_kernels: bool = False, kernel_bodies: bool = False):
  """Per-kernel labels of the rows of ``ds`` (kernel tables ``kts``) whose source file in ``paths`` has
  profiler columns (matched by HLO text and runtime; rows the profiler missed count as without):
  (labels per row or None, device_busy_s and device_span_s per row (NaN without), stats)."""
  from mlsys_jax.cost import dataset as cds
  from mlsys_jax.cost import kernel_roofline as KR
  by_key = {}
  for p in paths:
    dt = cds.load_device_times(p)
    if dt is None:
      continue
    src = cds.load_dataset(p)
    for i in range(len(src)):
      if dt["kernel_times"][i] and np.isfinite(dt["device_busy_s"][i]):   # NaN / {}: the profiler missed it
        by_key[(src.hlo[i], float(src.runtime_s[i]))] = (dt["kernel_times"][i], float(dt["device_busy_s"][i]),
                                                         float(dt["device_span_s"][i]))
  if not by_key:
    raise ValueError("--kr_labels: no row of --option_data has profiler columns (cost_collect.py --profile_calls).")
  labels, busy, span = [None] * len(ds), np.full(len(ds), np.nan), np.full(len(ds), np.nan)
  st = {"rows_with_profile": 0, "groups": 0, "matched_s": 0.0, "pooled_s": 0.0, "unassigned_s": 0.0,
        "kernels": 0, "kernels_labelled": 0}
  for i in range(len(ds)):
    hit = by_key.get((ds.hlo[i], float(ds.runtime_s[i])))
    if hit is None:
      continue
    busy[i], span[i] = hit[1], hit[2]
    lab = KR.match_kernel_times(kts[i], hit[0], shared_kernels=shared_kernels, kernel_bodies=kernel_bodies,
                                kernel_suffixes=kernel_bodies)
    st["rows_with_profile"] += 1
    st["matched_s"] += lab.matched_s
    st["pooled_s"] += lab.library_s
    st["unassigned_s"] += lab.unassigned_s
    st["kernels"] += int(kts[i].flops.size)
    st["kernels_labelled"] += int(np.unique(lab.rows).size)
    if lab.time_s.size:
      labels[i] = lab
      st["groups"] += int(lab.time_s.size)
  prof = np.isfinite(busy) & ~np.asarray(ds.noisy, bool)
  if prof.any():
    st["device_time_oracle"] = KR.device_time_oracle(ds.runtime_s[prof], busy[prof], span[prof])
  tot = st["matched_s"] + st["pooled_s"] + st["unassigned_s"]
  st["frac_time_matched_by_name"] = st["matched_s"] / tot if tot else None
  st["frac_time_pooled"] = st["pooled_s"] / tot if tot else None
  st["frac_time_unassigned"] = st["unassigned_s"] / tot if tot else None
  print(f"kernel labels: {st}", flush=True)
  return labels, busy, span, st


def _rows_by_program(mask: np.ndarray, pk: np.ndarray) -> tuple[np.ndarray, dict]:
  """The programs (``cost.dataset.program_keys`` ids) with a row in ``mask``, and each one's rows in it
  (the grouping of :func:`_ratio_ci`'s program bootstrap)."""
  progs = np.unique(pk[mask])
  return progs, {p_: np.flatnonzero(mask & (pk == p_)) for p_ in progs}


def _source_index(ds, sources: list) -> np.ndarray:
  """Each row's data file: its index in ``sources`` (``_load_cost_data``'s, in the order of the paths). Merging
  numbers the kept programs (``group``) file by file, so a row of group ``g`` comes from the first file whose
  cumulative kept-program count exceeds ``g``. Example: files keeping 3 and 2 programs, groups
  ``[0, 2, 3, 4]`` -> ``[0, 0, 1, 1]``."""
  kept = np.cumsum([src["programs_kept"] for src in sources])
  group = np.asarray(ds.group, np.int64)
  if group.size and (group.min() < 0 or group.max() >= kept[-1]):
    raise ValueError(f"row groups span [{group.min()}, {group.max()}] but the sources keep {int(kept[-1])} programs: "
                     f"the dataset and its source list do not match.")
  return np.searchsorted(kept, group, side="right")


def _per_source(ev: np.ndarray, src_idx: np.ndarray, sources: list, ape: dict, pk: np.ndarray, first: int = 0
                ) -> dict:
  """Per data file (``sources[first:]`` with a scored row in ``ev``): each model's MAPE, the rows, the programs and
  the analytical model's ratio to the kernel models with its program-bootstrap interval (:func:`_ratio_ci`)."""
  out = {}
  for k_, src in enumerate(sources):
    m = ev & (src_idx == k_)
    if k_ < first or not m.any():
      continue
    pm, s_rows = _rows_by_program(m, pk)
    out[src["name"]] = {
        **{k: float(a[m].mean()) for k, a in ape.items()}, "rows": int(m.sum()), "programs": int(pm.size),
        **{f"analytical_over_{k}_ci95": _ratio_ci(ape["analytical"], ape[k], s_rows, pm, _SEED.value)
           for k in ("kernel_roofline", "kernel_roofline_labels", "kernel_roofline_blend") if k in ape}}
  return out


def _test_data_rows(ds, sources: list, n_train_files: int) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
  """Rows of a merged dataset (``cost.dataset.merge_datasets``, sources in the order of ``--option_data``
  then ``--option_test_data``) that come from the last ``len(sources) - n_train_files`` sources: merge
  numbers groups source by source, so these are the groups at or above the training sources' kept programs.
  Returns (test rows, test rows that may be scored, stats, each row's source index): a test program that shares a
  ``cost.dataset.program_keys`` id with a training program (the same graph timed on another device, or
  the same family and config) is not scored, so nothing scored was seen in training in any form.
  Example: sources kept 3 and 2 programs, ``n_train_files=1`` -> rows of groups 3 and 4 are the test rows."""
  from mlsys_jax.cost import dataset as cds
  if not 1 <= n_train_files < len(sources):
    raise ValueError(f"--option_test_data: need at least one training and one test source; got {len(sources)} "
                     f"sources, {n_train_files} of them training.")
  group = np.asarray(ds.group, np.int64)
  src_idx = _source_index(ds, sources)
  test = src_idx >= n_train_files
  if not test.any():
    raise ValueError("--option_test_data: every program of the test files repeats a training program's graph on the "
                     "same device (merge_datasets dropped them all); nothing to test on.")
  if test.all():
    raise ValueError("--option_test_data: no training row is left (after --option_devices?).")
  pk = cds.program_keys(ds)
  shared = test & np.isin(pk, pk[~test])
  stats = {"training_programs": int(np.unique(group[~test]).size), "test_programs": int(np.unique(group[test]).size),
           "test_rows": int(test.sum()), "test_programs_sharing_a_program_key_with_training": int(
               np.unique(group[shared]).size), "test_rows_not_scored_shared_key": int(shared.sum()),
           "per_source": [{"name": src["name"], "programs_kept": src["programs_kept"], "rows_kept": src["rows_kept"],
                           "test": k >= n_train_files} for k, src in enumerate(sources)]}
  return test, test & ~shared, stats, src_idx


def _file_floor(meta: dict, which: str):
  """(floor in s, where it came from) of one collection's meta for ``--kr_dispatch_floor_from``: 'timing' /
  'end' where the file records them (cost_collect since session 25), else its start floor, named as such."""
  if which not in ("start", "timing", "end"):
    raise ValueError(f"--kr_dispatch_floor_from: unknown {which!r}; use start, timing or end.")
  if which == "timing":
    t = meta.get("dispatch_floor_timing_s") or {}
    if t.get("n", 0) > 0:
      return float(t["median"]), "timing"
  if which == "end" and meta.get("dispatch_floor_end_s") is not None:
    return float(meta["dispatch_floor_end_s"]), "end"
  f = meta.get("dispatch_floor_s")
  return (None if f is None else float(f)), "start"


def _dispatch_floor_covariate(ds, desc: dict, paths: list) -> np.ndarray:
  """--kr_dispatch_floor_scale: each row's z = log(f / 40 us), f its data file's measured dispatch floor
  (``meta['dispatch_floor_s']``, ``paths`` in the order of ``desc['sources']``; one file: its floor). Records the
  floors in ``desc['dispatch_floor_us']``."""
  from mlsys_jax.cost import dataset as cds
  floors, sources = [], {}
  for p in paths:
    meta = cds.load_dataset(p).meta
    f, src = _file_floor(meta, _KR_DFLOOR_FROM.value)
    if f is None or not (np.isfinite(f) and f > 0):
      raise ValueError(f"--kr_dispatch_floor_scale: {p} records no positive meta['dispatch_floor_s'].")
    floors.append(float(f))
    sources[os.path.basename(p)] = src
  desc["dispatch_floor_us"] = {os.path.basename(p): f * 1e6 for p, f in zip(paths, floors)}
  desc["dispatch_floor_source"] = sources
  return np.log(np.asarray(floors)[_row_files(ds, desc)] / _DFLOOR_REF_S)


def _row_files(ds, desc: dict) -> np.ndarray:
  """Each row's data file (its index in ``desc['sources']``; one file: all 0)."""
  return _source_index(ds, desc["sources"]) if desc.get("merged") else np.zeros(len(ds), np.int64)


def part_program_mape():
  """Issue 24 target (b) on the data that exists: whole-program latency of the cost dataset's programs
  (every compilation, rows the collection flagged noisy left out), held out by program (5 folds) and by
  family (leave one out). Models, all fitted on the training rows of each fold:

  - ``analytical``: the roofline on XLA's whole-program flops/bytes (``cost_analysis``; -1, i.e. 0 here,
    where XLA gives none, e.g. programs with cuBLAS/cuDNN calls) with two rates and an overhead fitted
    per device (MAPE objective) -- the baseline of the target;
  - ``analytical_kernel_totals``: the same roofline on the totals of :func:`cost.kernel_roofline.program_kernels`
    (every kernel's flops/bytes times its launches: library calls and loop trip counts included) -- a
    stronger analytical baseline;
  - ``kernel_roofline``: :func:`cost.kernel_roofline.fit_kernel_roofline`, a sum of per-kernel rooflines
    with per-class, per-device rates and overheads (hyper-parameters: ``--kr_*``, chosen on the
    held-out-program folds only);
  - ``learned``: gradient-boosted trees on the value model's candidate features (program features +
    compile decisions + roofline), and ``learned_residual``: trees on log(runtime / fitted roofline).

  Ratios: model MAPE against ``analytical`` (and ``analytical_kernel_totals``), with 95% bootstrap
  intervals over programs. With ``--option_test_data`` the only split is ``test_data``: every model (and
  each inner choice, inner folds by program) is fitted on the kept rows of ``--option_data`` and scored on
  the kept rows of the test files (:func:`_test_data_rows`), per family and per test file too."""
  from sklearn.ensemble import HistGradientBoostingRegressor
  from threadpoolctl import threadpool_limits
  from mlsys_jax.cost import dataset as cds
  from mlsys_jax.cost import features, graph, hlo, metrics
  from mlsys_jax.cost import kernel_roofline as KR
  _check_kr_flags(_KR_FLOOR.value, _KR_HL.value, _KR_LABELS.value, _KR_LHL.value, _KR_GLIB.value, _KR_WS.value)
  if _KR_DFLOOR_HOST.value and not _KR_DFLOOR.value:
    raise ValueError("--kr_dispatch_floor_host_only configures --kr_dispatch_floor_scale: add it.")
  if (_KR_DFLOOR_TIED.value or _KR_DFLOOR_EXP.value) and not _KR_DFLOOR.value:
    raise ValueError("--kr_dispatch_floor_tied / --kr_dispatch_floor_exponents configure --kr_dispatch_floor_scale: add it.")
  if _KR_DFLOOR_TIED.value and _KR_DFLOOR_EXP.value:
    raise ValueError("--kr_dispatch_floor_tied fits one exponent, --kr_dispatch_floor_exponents fixes both: use one.")
  if _KR_DFLOOR_LAUNCH.value and not _KR_DFLOOR.value:
    raise ValueError("--kr_dispatch_floor_launch configures --kr_dispatch_floor_scale: add it.")
  if _KR_DFLOOR_LAUNCH.value and (_KR_DFLOOR_TIED.value or _KR_DFLOOR_EXP.value or _KR_DFLOOR_HOST.value):
    raise ValueError("--kr_dispatch_floor_launch replaces the program overhead's exponent: not with "
                     "--kr_dispatch_floor_tied, --kr_dispatch_floor_exponents or --kr_dispatch_floor_host_only.")
  if _KR_DFLOOR_BOUND.value is not None and not _KR_DFLOOR.value:
    raise ValueError("--kr_dispatch_floor_bound configures --kr_dispatch_floor_scale: add it.")
  if _KR_DFLOOR_BOUND.value is not None and (_KR_DFLOOR_EXP.value or not _KR_DFLOOR_BOUND.value > 0):
    raise ValueError("--kr_dispatch_floor_bound needs a positive bound on fitted exponents (not with "
                     f"--kr_dispatch_floor_exponents), got {_KR_DFLOOR_BOUND.value}.")
  if _KR_DFLOOR_EXP.value and len(_KR_DFLOOR_EXP.value) != 2:
    raise ValueError(f"--kr_dispatch_floor_exponents needs two numbers 'gamma_h,gamma_o', got {_KR_DFLOOR_EXP.value}.")
  if _KR_LIBF.value and not _KR_FLOOR.value:
    raise ValueError("--kr_library_floor_scale scales the library calls' host-side costs: add --kr_host_floor.")
  if _KR_LIBF.value and _KR_FILE_HOST.value:
    raise ValueError("--kr_library_floor_scale and --kr_file_host_effect: the per-file host factors absorb each "
                     "file's floor; use one of them.")
  if _KR_DFLOOR.value and _KR_FILE_HOST.value:
    raise ValueError("--kr_dispatch_floor_scale and --kr_file_host_effect: the per-file host factors absorb each "
                     "file's dispatch floor (its exponents would not be identified); use one of them.")
  br_grid = [_bytes_ridge(v) for v in _KR_BR_GRID.value]
  kopt_grid = list(dict.fromkeys(_kernel_option(v) for v in _KR_KOPT_GRID.value)) or ["none"]
  t0 = time.perf_counter()
  test_mode = bool(_OTEST.value)
  if test_mode and flags.FLAGS["option_split"].present:
    raise ValueError("--option_test_data replaces the folds of --option_split (one split, 'test_data'): drop one.")
  ds, desc = _load_cost_data(_OTEST.value)
  data_paths = list(_ODATA.value) + list(_OTEST.value)   # every file's profiler columns (labels, busy times)
  if test_mode:
    test_rows, test_scored, desc["test_data"], src_idx = _test_data_rows(ds, desc["sources"], len(_ODATA.value))
    print(f"test data: {desc['test_data']}", flush=True)
  floor_z = _dispatch_floor_covariate(ds, desc, data_paths) if _KR_DFLOOR.value or _KR_LIBF.value else None
  hzv = floor_z if _KR_DFLOOR.value else None
  hz = (lambda idx: None) if hzv is None else (lambda idx: hzv[np.asarray(idx)])
  zlv = floor_z if _KR_LIBF.value else None   # session 28 helper: the same per-row covariate
  lib_kw = (lambda idx: {}) if zlv is None else (lambda idx: {"library_covariate": zlv[np.asarray(idx)]})
  file_of = _row_files(ds, desc) if _KR_FILE_HOST.value else None

  def host_kw(idx):   # the host terms' options of fit_kernel_roofline for the rows idx
    kw = {"host_covariate": hz(idx), "host_covariate_overhead": not _KR_DFLOOR_HOST.value,
          "host_group": None if file_of is None else file_of[np.asarray(idx)]}
    if _KR_DFLOOR_TIED.value:   # session 26 diagnosis (opt-in; absent: the call of before)
      kw["host_covariate_tied"] = True
    if _KR_DFLOOR_EXP.value:
      kw["host_covariate_exponents"] = tuple(float(v) for v in _KR_DFLOOR_EXP.value)
    if _KR_DFLOOR_LAUNCH.value:   # session 27 helper (opt-in; absent: the call of before)
      kw["host_covariate_launch"] = True
    if _KR_DFLOOR_BOUND.value is not None:
      kw["host_covariate_bound"] = float(_KR_DFLOOR_BOUND.value)
    kw.update(lib_kw(idx))   # session 28 helper (opt-in; absent: the call of before)
    return kw
  devs = cds.row_devices(ds)
  udev = sorted(set(devs.tolist()))
  mods = [hlo.parse_hlo(t) for t in ds.hlo]
  pf = np.stack([features.program_features(graph.program_graph(mods[i]),
                                           {"flops": ds.flops[i], "bytes accessed": ds.bytes_accessed[i],
                                            "transcendentals": ds.transcendentals[i]}) for i in range(len(ds))])
  dec = np.stack([V.compile_decision_features(t) for t in ds.hlo])
  kts_by = {o: [KR.program_kernels(m, **_kopt_table_kwargs(o)) for m in mods]
            for o in dict.fromkeys(["none", *(_kopt_tables(o_) for o_ in kopt_grid)])}
  kts = kts_by["none"]   # the analytical kernel totals, the labels' rows (the same rows under every option)
  kfl = np.asarray([float((k.flops * k.count).sum()) for k in kts])
  kby = np.asarray([float((k.bytes * k.count).sum()) for k in kts])
  print(f"features and kernel tables ({time.perf_counter() - t0:.0f} s)", flush=True)
  if _KR_LABELS.value and any("shared" in o.split("+") for o in kopt_grid):
    klabels_shared = _kernel_labels(ds, kts, data_paths, shared_kernels=True)[0]
  if _KR_LABELS.value and any("bodies" in o.split("+") for o in kopt_grid):   # session 20's label rules
    klabels_bodies = _kernel_labels(ds, kts, data_paths, shared_kernels=True, kernel_bodies=True)[0]
  klabels, busy, span, lab_stats = _kernel_labels(ds, kts, data_paths) if _KR_LABELS.value \
      else (None, None, None, None)
  fl, by = np.maximum(ds.flops, 0.0), np.maximum(ds.bytes_accessed, 0.0)
  roof = np.log(np.maximum(fl / 4e14, by / 3e12) + 5e-6)
  dev_hot = (devs[:, None] == np.asarray(udev)[None, :]).astype(np.float64) if len(udev) > 1 \
      else np.zeros((len(ds), 0))
  x = np.concatenate([pf, dec, roof[:, None], dev_hot], 1)
  y = np.log(ds.runtime_s)
  rt = ds.runtime_s
  keep = ~np.asarray(ds.noisy, bool)
  kcfg = KR.KernelRooflineConfig(sharpness=_KR_SHARP.value, ridge=_KR_RIDGE.value, steps=_KR_STEPS.value,
                                 host_floor=_KR_FLOOR.value, host_launch=_KR_HL.value,
                                 bytes_ridge=_bytes_ridge(_KR_BR.value))
  ref_cfg = KR.KernelRooflineConfig(sharpness=_KR_SHARP.value, ridge=_KR_RIDGE.value, steps=_KR_STEPS.value,
                                    host_floor=_KR_FLOOR.value)
  out = {"dataset": desc, "rows": int(len(y)), "rows_kept": int(keep.sum()),
         "xla_flops_missing_rows": int(np.sum(ds.flops <= 0)),
         "analytical": "roofline max(flops/F, bytes/B) + overhead on XLA's cost_analysis flops/bytes, F, B, "
                       "overhead fitted per device on the training rows (MAPE objective)",
         "analytical_kernel_totals": "the same roofline on the kernel tables' totals (program_kernels: library "
                                     "calls and loop trip counts included)",
         "kernel_roofline": {"config": kcfg._asdict(),
                             "hyperparameters_chosen_on": (
                                 "held-out-program folds (seed 0) of H100+H200 s12a-c, before this configuration's "
                                 "held-out-family run: objective log/mape x sharpness 1.5/4/16 x ridge 0.1/1, then "
                                 "ridge 0.03/0.01/0.003/0.001/0 at sharpness 16; MAPE 0.2266 -> 0.1618 "
                                 "(calibrated). Not clean of the family split: the class split (GEMM/conv by width, "
                                 "untuned convolutions) and the median fallback for unseen classes came after "
                                 "family-split runs of earlier versions (docs/value.md section 5)"),
                             **({"host_launch_and_bytes_ridge": (
                                 "session 15: the per-launch host cost (host_launch) and a separate penalty of the "
                                 "byte rates' class terms (bytes_ridge) were added after held-out-family runs of "
                                 "this session (docs/value.md); bytes_ridge's value is chosen per outer fold by the "
                                 "inner cross-validation of kr_bytes_ridge_grid on training rows only"),
                                 "bytes_ridge_grid": [b for b in br_grid], "inner_folds": _KR_INNER.value}
                                if (_KR_HL.value or br_grid or kcfg.bytes_ridge is not None) else {})},
         "while_loops": ("program_kernels counts no launch of a while loop's condition when XLA annotated "
                         "known_trip_count (XLA's GPU WhileThunk runs the body trip_count times without the "
                         "condition); before session 15 it counted trips + 1")}
  out["kernel_options"] = {
      "grid": kopt_grid,
      "what": ("kernel-table options of program_kernels for both kernel-roofline models (not the session-14 "
               "reference, which keeps the default tables): 'sort' = sort_model (XLA's bitonic sorts: bytes of "
               "every stage; cub radix sorts: cub_sort_passes launches, ceil(key bits / 8) for one array, "
               "ceil(key bits / 6) for a batch of rows since session 19), 'scatter' = scatter_contention (scatter "
               "classes by element width, FLOPs = scatter_atomic_steps * SCATTER_CHAIN_FLOPS: the longer of the "
               "16-bit update chain and element updates / SCATTER_STEP_ELEMENTS since session 19), 'conv' = "
               "conv_model (cuDNN convolutions' FLOPs by direction: backward passes count the forward "
               "convolution's multiply-adds); 'shared' = the labels' shared_kernels rule "
               "(match_kernel_times); fit options of both models: 'huber' = objective huber_log, 'l2' = "
               "l2_bytes=L2_BYTES (a per-device L2 speed-up of each kernel's first 50 MB), 'overlap' = "
               "overhead_overlap (kernel time softmax(work, o) instead of work + o); session 20: 'tiles' = "
               "sort_tiles (XLA's tiled bitonic sort: launches and HBM-equivalent bytes), 'cfusion' = "
               "custom_fusion_calls (dynamic-slice fusions are their cuBLAS call: no workspace bytes, library), "
               "'bodies' = the labels' kernel_bodies and kernel_suffixes rules (XLA's kernel reuse by fused "
               "computation; '<name>__k' kernels), 'hostgap' = gap_on_host (the labelled model's library gap on the "
               "host side of the floor's overlap), 'convgemm' = conv_gemm_rates (tuned convolutions at the GEMM "
               "classes' rates); several values: chosen per "
               "outer fold by the inner cross-validation "
               "(kr_inner_folds folds of the training rows, grouped like the outer split), jointly with "
               "bytes_ridge")}
  if any(t in o.split("+") for o in kopt_grid for t in ("scatterw", "convdir")):   # session 27, only when asked
    out["kernel_options"]["session_27"] = (
        "'scatterw' = program_kernels(scatter_width=True): a 16-bit scatter's FLOPs are scatter_serial_steps = (c + E "
        "/ SCATTER_SERIAL_STEP_ELEMENTS) chain steps (compare-and-swap rounds: the chain's latency and the element "
        "updates' throughput add) instead of max(c, E / SCATTER_STEP_ELEMENTS); 'convdir' = program_kernels("
        "conv_direction=True): untuned cuDNN backward-input / backward-filter calls get class conv_untuned_bwd (own "
        "rates and overhead)")
  if _KR_FILE_HOST.value:
    out["kernel_roofline_file_host_effect"] = (
        "session 25 (--kr_file_host_effect): both kernel-roofline models fitted with a host-side factor and a "
        "program-overhead factor per training data file, centred over each device's files; predictions use the "
        "device's terms (no file factor)")
  if _KR_DFLOOR.value:
    out["kernel_roofline_dispatch_floor_scale"] = {
        "what": "session 25 (--kr_dispatch_floor_scale): both kernel-roofline models (not the analytical baselines, "
                "not the trees) with the host covariate z = log(f / 40 us) of each row's collection (f: its file's "
                "meta dispatch_floor_s): host side of the floor's overlap x exp(gamma_h z), program overhead x "
                "exp(gamma_o z), (gamma_h, gamma_o) fitted with the model, shared by the devices",
        "dispatch_floor_us": desc.get("dispatch_floor_us"), "host_only": _KR_DFLOOR_HOST.value}
    if _KR_DFLOOR_TIED.value or _KR_DFLOOR_EXP.value:   # (absent by default: the JSON of before)
      out["kernel_roofline_dispatch_floor_scale"]["exponents"] = (
          "tied: gamma_o = gamma_h, one fitted exponent" if _KR_DFLOOR_TIED.value
          else f"fixed (gamma_h, gamma_o) = {tuple(float(v) for v in _KR_DFLOOR_EXP.value)}")
    if _KR_DFLOOR_LAUNCH.value:
      out["kernel_roofline_dispatch_floor_scale"]["exponents"] = (
          "launch: gamma_o = 0; per-launch wall costs (kernel overhead o, launch gap g) x exp(gamma_k z), gamma_k "
          "fitted (test_data kernel_roofline_host_scale_fitted: kernel_roofline_gamma_k)")
    if _KR_DFLOOR_BOUND.value is not None:
      out["kernel_roofline_dispatch_floor_scale"]["exponent_bound"] = (
          f"every fitted exponent = B tanh(u / B), B = {float(_KR_DFLOOR_BOUND.value)}")
  if _KR_REF.value:
    out["kernel_roofline_floor_only"] = {"config": ref_cfg._asdict(), "what": "the session-14 configuration (host "
                                         "floor, one ridge) on this session's kernel tables, same folds"}
  splits = [("program", V.group_folds(cds.program_keys(ds), 5, _SEED.value), cds.program_keys(ds)),
            ("family", [ds.family == f for f in np.unique(ds.family)], ds.family)]
  splits = [s_ for s_ in splits if _OSPLIT.value in ("both", s_[0])]
  if test_mode:   # one fold: train on --option_data, test on --option_test_data (inner folds by program)
    splits = [("test_data", [test_rows], cds.program_keys(ds))]
  if _KR_LABELS.value:
    out["kernel_roofline_labels"] = {
        "what": "the kernel roofline fitted with per-kernel device times of the training rows that have profiler "
                "columns as extra labels (squared log error of each labelled group, weight kr_kernel_weight) and "
                "a launch gap per class and device (kr_gap_per_class; else per device): T = O_d + sum_k m_k "
                "(softmax + o_c + g_{c,d}), with --kr_host_floor wall = softmax_8(T, H_d); same folds, same config",
        "kernel_weight": _KR_KW.value, "gap_per_class": _KR_GAP.value, "gap_library_only": _KR_GLIB.value,
        "wall_scale": _KR_WS.value, "host_launch": _KR_LHL.value,
        "bytes_ridge": "as kernel_roofline (its own inner choice when kr_bytes_ridge_grid is given)",
        "labels": lab_stats}
  if _KR_CORR.value:
    out["kernel_roofline_corrected"] = {
        "what": "kernel roofline x exp(clip(g(x), -b, b)); g: gradient-boosted trees (200 iterations, lr 0.05, "
                "absolute error) on the program features + compile decisions + log kernel-roofline prediction, "
                "fitted to the training rows' log(runtime / in-sample kernel-roofline prediction)",
        "bounds_grid": [b if np.isfinite(b) else None for b in _KR_BOUNDS],  # None: unbounded
        "bound_chosen_by": "inner 4-fold cross-validation inside the training rows, grouped like the outer split "
                           "(programs / families), lowest inner MAPE"}
  for name, folds, inner_key in splits:
    pred = {k: np.zeros(len(y)) for k in ("learned", "analytical", "learned_residual",
                                           "analytical_kernel_totals", "kernel_roofline")}
    if _KR_CORR.value:
      pred["kernel_roofline_corrected"] = np.zeros(len(y))
    if _KR_REF.value:
      pred["kernel_roofline_floor_only"] = np.zeros(len(y))
    br_chosen, br_inner, lbr_chosen, lbr_inner, kopt_chosen, lkopt_chosen = [], [], [], [], [], []
    blend_w, blend_inner = [], []
    inner_plain, inner_labels = np.full(len(y), np.nan), np.full(len(y), np.nan)   # reset per outer fold below
    if _KR_BLEND.value:
      if not _KR_LABELS.value or not (br_grid or len(kopt_grid) > 1):
        raise ValueError("--kr_blend needs --kr_labels and an inner grid (--kr_kernel_options_grid with 2+ values or "
                         "--kr_bytes_ridge_grid).")
      pred["kernel_roofline_blend"] = np.zeros(len(y))
    if _KR_LABELS.value:
      pred["kernel_roofline_labels"] = np.zeros(len(y))
      busy_pred = {"kernel_roofline": np.full(len(y), np.nan), "kernel_roofline_labels": np.full(len(y), np.nan)}
      fitted_terms, folds_unlabelled = [], 0
    bounds_chosen, host_scales = [], []
    lib_scales = []   # --kr_library_floor_scale: gamma_{L,d} per outer fold
    fold_models = []   # --program_mape_rows_out: per outer fold, the fitted kernel-roofline models
    ood = np.zeros(len(y), bool)
    tk = time.perf_counter()
    for te in folds:
      tr = ~te & keep
      with threadpool_limits(1):
        reg = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, loss="absolute_error",
                                            random_state=_SEED.value)
        pred["learned"][te] = np.exp(reg.fit(x[tr], y[tr]).predict(x[te]))
      base = np.ones(len(y))  # the fitted roofline on every row of this fold (training and test)
      for dv in udev:  # one roofline per device: its own rates
        trd, ted = tr & (devs == dv), te & (devs == dv)
        src = trd if trd.sum() >= 3 else tr
        rl = metrics.fit_roofline(fl[src], by[src], rt[src], objective="mape", fit_overhead=True)
        alld = devs == dv
        base[alld] = rl.predict(fl[alld], by[alld])
        pred["analytical"][ted] = base[ted]
        rk = metrics.fit_roofline(kfl[src], kby[src], rt[src], objective="mape", fit_overhead=True)
        pred["analytical_kernel_totals"][ted] = rk.predict(kfl[ted], kby[ted])
      # learned correction of the analytical model (as value_ios.fit_stage_model(base=...)): trees on the
      # same features predict log(runtime / roofline); the roofline keeps extrapolating in flops/bytes
      with threadpool_limits(1):
        reg = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, loss="absolute_error",
                                            random_state=_SEED.value)
        pred["learned_residual"][te] = base[te] * np.exp(reg.fit(x[tr], y[tr] - np.log(base[tr])).predict(x[te]))
      itr, ite = np.flatnonzero(tr), np.flatnonzero(te)
      inner_plain[:], inner_labels[:] = np.nan, np.nan
      kopt = kopt_grid[0]
      # a config is (kernel-table option set, KernelRooflineConfig); a fitted model carries its option set
      tabs_of = lambda o: kts_by[_kopt_tables(o)]
      fit_plain = lambda idx, oc: (oc[0], KR.fit_kernel_roofline([tabs_of(oc[0])[i] for i in idx], rt[idx],
                                                                 devs[idx], oc[1], **host_kw(idx)))
      predict_rows = lambda om, idx: KR.predict_kernel_roofline(om[1], [tabs_of(om[0])[i] for i in idx], devs[idx],
                                                                host_covariate=hz(idx), **lib_kw(idx))
      grid_of = lambda c: [(o, _kopt_config(o, c._replace(bytes_ridge=b))) for o in kopt_grid
                           for b in (br_grid or [c.bytes_ridge])]
      kcfg_fold = _kopt_config(kopt, kcfg)
      with threadpool_limits(1):
        if br_grid or len(kopt_grid) > 1:  # chosen inside the training rows only, inner folds grouped like the outer split
          cands = grid_of(kcfg)
          j, sc = _choose_by_inner_cv(fit_plain, predict_rows, itr, rt, inner_key, cands, _KR_INNER.value, _SEED.value,
                                      inner_pred=inner_plain)
          kopt, kcfg_fold = cands[j]
          br_chosen.append(kcfg_fold.bytes_ridge)
          kopt_chosen.append(kopt)
          br_inner.append(sc)
        kts_f = tabs_of(kopt)
        km = KR.fit_kernel_roofline([kts_f[i] for i in itr], rt[itr], devs[itr], kcfg_fold, **host_kw(itr))
        if _KR_REF.value:
          kmr = KR.fit_kernel_roofline([kts[i] for i in itr], rt[itr], devs[itr], ref_cfg)
          pred["kernel_roofline_floor_only"][ite] = KR.predict_kernel_roofline(kmr, [kts[i] for i in ite], devs[ite])
      pred["kernel_roofline"][ite] = KR.predict_kernel_roofline(km, [kts_f[i] for i in ite], devs[ite],
                                                                host_covariate=hz(ite), **lib_kw(ite))
      ood[ite] = [bool(f) for f in KR.kernel_roofline_ood(km, [kts_f[i] for i in ite], devs[ite])]
      if km.host_scale is not None and not _KR_LABELS.value:   # (with --kr_labels: recorded with the labelled model)
        host_scales.append({"kernel_roofline": km.host_scale.tolist()})
        if km.host_scale_launch is not None:
          host_scales[-1]["kernel_roofline_gamma_k"] = km.host_scale_launch
      if _KR_LABELS.value:
        labs = [klabels[i] for i in itr]
        kml, kopt_l = km, kopt   # no profiled training row in this fold: the plain kernel roofline (counted below)
        if any(lb is not None for lb in labs):
          lcfg = kcfg._replace(kernel_weight=_KR_KW.value, gap_per_class=_KR_GAP.value, host_launch=_KR_LHL.value,
                               gap_library_only=_KR_GLIB.value, wall_scale=_KR_WS.value)

          def fit_labels(idx, oc):
            o, cfg = oc
            lab_ = [(klabels_bodies if "bodies" in o.split("+") else klabels_shared if "shared" in o.split("+")
                     else klabels)[i] for i in idx]
            tb = [tabs_of(o)[i] for i in idx]
            if not any(lb is not None for lb in lab_):   # an inner fold without profiled rows: the plain model
              return o, KR.fit_kernel_roofline(tb, rt[idx], devs[idx],
                                               cfg._replace(wall_scale=False, gap_library_only=False,
                                                            gap_on_host=False), **host_kw(idx))
            return o, KR.fit_kernel_roofline(tb, rt[idx], devs[idx], cfg, kernel_labels=lab_, **host_kw(idx))
          kopt_l = kopt_grid[0]
          lcfg = _kopt_config(kopt_l, lcfg)
          with threadpool_limits(1):
            if br_grid or len(kopt_grid) > 1:   # the labelled model's own inner choice (same inner folds)
              cands = grid_of(lcfg)
              j, sc = _choose_by_inner_cv(fit_labels, predict_rows, itr, rt, inner_key, cands, _KR_INNER.value,
                                          _SEED.value, inner_pred=inner_labels)
              kopt_l, lcfg = cands[j]
              lbr_chosen.append(lcfg.bytes_ridge)
              lkopt_chosen.append(kopt_l)
              lbr_inner.append(sc)
            kml = fit_labels(itr, (kopt_l, lcfg))[1]
        else:
          folds_unlabelled += 1
        kts_l = tabs_of(kopt_l)
        pred["kernel_roofline_labels"][ite] = KR.predict_kernel_roofline(kml, [kts_l[i] for i in ite], devs[ite],
                                                                         host_covariate=hz(ite), **lib_kw(ite))
        if _KR_BLEND.value:   # w from the two models' inner predictions of the training rows (same inner folds)
          ok_ = np.isfinite(inner_plain[itr]) & np.isfinite(inner_labels[itr])
          if not ok_.any():
            raise ValueError("--kr_blend: no training row has inner predictions of both models (the labelled model "
                             "needs profiled training rows and an inner grid).")
          bl = lambda w, a, b_: np.exp(w * np.log(a) + (1.0 - w) * np.log(b_))
          ib = itr[ok_]
          sc_w = [float(np.mean(np.abs(bl(w, inner_labels[ib], inner_plain[ib]) / rt[ib] - 1.0))) for w in _KR_BLEND_W]
          w_ = _KR_BLEND_W[int(np.argmin(sc_w))]
          blend_w.append(w_)
          blend_inner.append(sc_w)
          pred["kernel_roofline_blend"][ite] = bl(w_, pred["kernel_roofline_labels"][ite], pred["kernel_roofline"][ite])
        if _PM_ROWS_OUT.value:
          fold_models.append({"test_rows": ite, "plain": km, "plain_options": kopt, "labels": kml,
                              "labels_options": kopt_l, "blend_weight": w_ if _KR_BLEND.value else None,
                              "plain_tables": [kts_f[i] for i in ite], "labels_tables": [kts_l[i] for i in ite]})
        for key_, mdl, tb_ in (("kernel_roofline", km, kts_f), ("kernel_roofline_labels", kml, kts_l)):
          busy_pred[key_][ite] = KR.predict_kernel_roofline(mdl, [tb_[i] for i in ite], devs[ite], what="busy",
                                                            host_covariate=hz(ite), **lib_kw(ite))
        if kml.host_scale is not None:
          host_scales.append({"kernel_roofline": km.host_scale.tolist(),
                              "kernel_roofline_labels": kml.host_scale.tolist()})
          if kml.host_scale_launch is not None:   # (absent by default: the JSON of before)
            host_scales[-1]["kernel_roofline_gamma_k"] = km.host_scale_launch
            host_scales[-1]["kernel_roofline_labels_gamma_k"] = kml.host_scale_launch
        fitted_terms.append({dv: {"program_overhead_us": float(np.exp(kml.log_program_overhead[j]) * 1e6),
                                  **({} if kml.log_wall_scale is None else {
                                      "wall_scale": float(np.exp(kml.log_wall_scale[j]))}),
                                  **({} if kml.log_host_floor is None else {
                                      "host_floor_us": float(np.exp(kml.log_host_floor[j]) * 1e6)}),
                                  **({} if kml.log_launch_gap is None else {
                                      f"launch_gap_us_{c}": float(np.exp(kml.log_launch_gap[j, ci]) * 1e6)
                                      for ci, c in enumerate(KR.KERNEL_CLASSES) if kml.train_kernels[j, ci] > 0})}
                             for j, dv in enumerate(kml.devices)})
      if zlv is not None:   # session 28 helper (absent by default: the JSON of before)
        lib_scales.append({"kernel_roofline": dict(zip(map(str, km.devices), km.library_scale.tolist()))})
        if _KR_LABELS.value and kml.library_scale is not None:
          lib_scales[-1]["kernel_roofline_labels"] = dict(zip(map(str, kml.devices), kml.library_scale.tolist()))
      if _KR_CORR.value:
        p_all = KR.predict_kernel_roofline(km, kts_f, devs, host_covariate=hz(np.arange(len(y))),
                                           **lib_kw(np.arange(len(y))))  # in-sample
        x2 = np.concatenate([x, np.log(p_all)[:, None]], 1)
        resid = np.log(rt / p_all)

        def trees(a, b_):
          with threadpool_limits(1):
            return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, loss="absolute_error",
                                                 random_state=_SEED.value).fit(a, b_)
        err = {b: [] for b in _KR_BOUNDS}
        for va_l in V.group_folds(inner_key[tr], 4, _SEED.value):
          va, it = itr[va_l], itr[~va_l]
          g = trees(x2[it], resid[it]).predict(x2[va])
          for b in _KR_BOUNDS:
            err[b].append(np.abs(p_all[va] * np.exp(np.clip(g, -b, b)) / rt[va] - 1.0))
        best = min(_KR_BOUNDS, key=lambda b: float(np.concatenate(err[b]).mean()))
        bounds_chosen.append(best)
        g = trees(x2[itr], resid[itr]).predict(x2[ite])
        pred["kernel_roofline_corrected"][ite] = p_all[ite] * np.exp(np.clip(g, -best, best))
    kr_s = time.perf_counter() - tk
    ev = keep & test_scored if name == "test_data" else keep   # the rows scored (every row is in a test fold)
    ape = {k: np.abs(p / rt - 1.0) for k, p in pred.items()}
    mp = {k: float(a[ev].mean()) for k, a in ape.items()}
    pk = cds.program_keys(ds)
    progs, rows_of = _rows_by_program(ev, pk)
    ma = mp["analytical"]
    res = {f"mape_{k}": v for k, v in mp.items()}
    for k, key in (("learned", "learned"), ("learned_residual", "learned_residual"),
                   ("kernel_roofline", "kernel_roofline"), ("analytical_kernel_totals", "kernel_totals"),
                   ("kernel_roofline_corrected", "kernel_roofline_corrected"),
                   ("kernel_roofline_floor_only", "kernel_roofline_floor_only"),
                   ("kernel_roofline_labels", "kernel_roofline_labels"),
                   ("kernel_roofline_blend", "kernel_roofline_blend")):
      if k not in pred:
        continue
      res[f"analytical_over_{key}"] = ma / mp[k]
      res[f"analytical_over_{key}_ci95"] = _ratio_ci(ape["analytical"], ape[k], rows_of, progs, _SEED.value)
    res["kernel_totals_over_kernel_roofline"] = mp["analytical_kernel_totals"] / mp["kernel_roofline"]
    res["kernel_totals_over_kernel_roofline_ci95"] = _ratio_ci(ape["analytical_kernel_totals"],
                                                               ape["kernel_roofline"], rows_of, progs, _SEED.value)
    if _KR_LABELS.value:
      res["kernel_roofline_over_kernel_roofline_labels"] = mp["kernel_roofline"] / mp["kernel_roofline_labels"]
      res["kernel_roofline_over_kernel_roofline_labels_ci95"] = _ratio_ci(
          ape["kernel_roofline"], ape["kernel_roofline_labels"], rows_of, progs, _SEED.value)
      prof = ev & np.isfinite(busy)
      res["profiled_rows"] = {  # held-out rows with profiler columns (the s14a collection)
          "rows": int(prof.sum()), **{f"mape_{k}": float(a[prof].mean()) for k, a in ape.items()},
          **{f"busy_mape_{k}": float(np.abs(b_ / busy - 1.0)[prof].mean()) for k, b_ in busy_pred.items()},
          "measured_busy_over_wall_median": float(np.median(busy[prof] / rt[prof])),
          "measured_span_over_wall_median": float(np.median(span[prof] / rt[prof]))}
      res["kernel_roofline_labels_folds_without_labels"] = folds_unlabelled
      res["kernel_roofline_labels_fitted_terms_median"] = {  # over folds
          dv: {k: float(np.median([ft[dv][k] for ft in fitted_terms if k in ft.get(dv, {})]))
               for k in sorted({k for ft in fitted_terms for k in ft.get(dv, {})})} for dv in udev}
    if np.any(ev & ~ood):  # every model on the rows the kernel roofline does not flag (e.g. all but rnn)
      ind = ev & ~ood
      ind_progs, ind_rows = _rows_by_program(ind, pk)
      res["in_distribution_rows"] = {
          "rows": int(ind.sum()), **{f"mape_{k}": float(a[ind].mean()) for k, a in ape.items()},
          **{f"analytical_over_{k}": float(ape["analytical"][ind].mean() / a[ind].mean())
             for k, a in ape.items() if k != "analytical"},
          **{f"analytical_over_{k}_ci95": _ratio_ci(ape["analytical"], ape[k], ind_rows, ind_progs, _SEED.value)
             for k in ("kernel_roofline", "kernel_roofline_labels") if k in ape}}
    res["kernel_roofline_ood_rows"] = int(np.sum(ood & ev))
    res["mape_kernel_roofline_in_distribution"] = float(ape["kernel_roofline"][ev & ~ood].mean()) \
        if np.any(ev & ~ood) else None
    res["mape_kernel_roofline_ood"] = float(ape["kernel_roofline"][ev & ood].mean()) if np.any(ev & ood) else None
    if np.any(ev & ~ood):  # the same ratio on the rows the kernel roofline does not flag
      res["mape_analytical_in_distribution"] = float(ape["analytical"][ev & ~ood].mean())
      res["analytical_over_kernel_roofline_in_distribution"] = \
          res["mape_analytical_in_distribution"] / res["mape_kernel_roofline_in_distribution"]
    if _KR_BLEND.value:
      res["kernel_roofline_blend_weight_chosen"] = blend_w   # per outer fold: weight of the labelled model
      res["kernel_roofline_blend_inner_mape"] = blend_inner  # per outer fold, per _KR_BLEND_W value
    if lib_scales:   # --kr_library_floor_scale: gamma_{L,d} per outer fold
      res["kernel_roofline_library_scale_fitted"] = lib_scales
    if host_scales:   # --kr_dispatch_floor_scale: (gamma_h, gamma_o) per outer fold
      res["kernel_roofline_host_scale_fitted"] = host_scales
      res["kernel_roofline_host_terms_at"] = ("the fitted host floor, launch host costs and program overhead "
                                              "(fitted_terms) are at covariate z = 0, a 40 us dispatch floor; a "
                                              "file's terms are those times exp(gamma * z)")
    if _KR_CORR.value:
      res["kernel_roofline_corrected_bounds_chosen"] = [b if np.isfinite(b) else None for b in bounds_chosen]
    if len(kopt_grid) > 1:
      res["kernel_roofline_kernel_options_chosen"] = kopt_chosen
      if _KR_LABELS.value:
        res["kernel_roofline_labels_kernel_options_chosen"] = lkopt_chosen
    if br_grid or len(kopt_grid) > 1:
      res["inner_grid"] = [[o, b] for o in kopt_grid for b in (br_grid or [kcfg.bytes_ridge])]
      res["kernel_roofline_bytes_ridge_chosen"] = br_chosen
      res["kernel_roofline_bytes_ridge_inner_mape"] = br_inner   # per outer fold, per grid value
      if _KR_LABELS.value:
        res["kernel_roofline_labels_bytes_ridge_chosen"] = lbr_chosen
        res["kernel_roofline_labels_bytes_ridge_inner_mape"] = lbr_inner
    if _KR_REF.value:
      res["kernel_roofline_floor_only_over_kernel_roofline"] = mp["kernel_roofline_floor_only"] / mp["kernel_roofline"]
      res["kernel_roofline_floor_only_over_kernel_roofline_ci95"] = _ratio_ci(
          ape["kernel_roofline_floor_only"], ape["kernel_roofline"], rows_of, progs, _SEED.value)
    res["kendall_tau"] = _kendall(pred, rt, ev, pk)
    res["fit_s"] = kr_s
    fam = {}
    if name in ("family", "test_data"):
      for f in np.unique(ds.family):
        m = ev & (ds.family == f)
        if m.any():
          fam[str(f)] = {**{k: float(a[m].mean()) for k, a in ape.items()}, "rows": int(m.sum()),
                         "median_log_pred_over_measured": {k: float(np.median(np.log(p_[m] / rt[m])))
                                                           for k, p_ in pred.items()},
                         "kernel_roofline_median_pred_over_measured": float(np.median(
                             pred["kernel_roofline"][m] / rt[m])),
                         "kernel_roofline_ood_rows": int(np.sum(ood & m))}
    per_dev = {}
    if len(udev) > 1:
      for dv in udev:
        m = ev & (devs == dv)
        if not m.any():   # a device with no scored row (--option_test_data: e.g. H100, training only)
          continue
        pm, d_rows = _rows_by_program(m, pk)
        per_dev[dv] = {**{k: float(a[m].mean()) for k, a in ape.items()}, "rows": int(m.sum()),
                       "analytical_over_kernel_roofline": float(ape["analytical"][m].mean()
                                                                / ape["kernel_roofline"][m].mean()),
                       "analytical_over_kernel_roofline_ci95": _ratio_ci(
                           ape["analytical"], ape["kernel_roofline"], d_rows, pm, _SEED.value)}
    if name != "test_data" and len(desc.get("sources", [])) > 1:   # per data file within the folds (e.g. a new device's)
      res["per_source"] = _per_source(ev, _source_index(ds, desc["sources"]), desc["sources"], ape, pk)
    if name == "test_data":   # per test file, and the test rows the collection flagged noisy (not scored above)
      res["per_test_source"] = _per_source(ev, src_idx, desc["sources"], ape, pk, first=len(_ODATA.value))
      nz = test_scored & ~keep
      res["noisy_test_rows"] = {"rows": int(nz.sum()), **({f"mape_{k}": float(a[nz].mean()) for k, a in ape.items()}
                                                          if nz.any() else {})}
    res["per_family"], res["per_device"] = fam, per_dev
    out[name] = res
    if _PM_ROWS_OUT.value:   # session 26 diagnosis: per-row predictions and the fitted models (opt-in)
      import pickle
      dump = {"split": name, "runtime_s": rt, "keep": keep, "scored": ev, "family": np.asarray(ds.family),
              "device": devs, "file": (np.asarray([s_["name"] for s_ in desc["sources"]])[_row_files(ds, desc)]
                       if desc.get("merged") else np.full(len(y), "single")),
              "host_covariate": hzv, "pred": pred, "folds": fold_models,
              "busy": busy if _KR_LABELS.value else None, "span": span if _KR_LABELS.value else None,
              "busy_pred": busy_pred if _KR_LABELS.value else None, "program_key": pk}
      rows_path = _PM_ROWS_OUT.value if len(splits) == 1 else f"{_PM_ROWS_OUT.value}.{name}"
      os.makedirs(os.path.dirname(os.path.abspath(rows_path)), exist_ok=True)
      with open(rows_path, "wb") as fh:
        pickle.dump(dump, fh)
      print(f"wrote {rows_path}", flush=True)
    print(f"[{name}] whole-program MAPE: kernel roofline {mp['kernel_roofline']:.3f}, learned "
          f"{mp['learned']:.3f}, learned correction {mp['learned_residual']:.3f}, analytical on kernel totals "
          f"{mp['analytical_kernel_totals']:.3f}, analytical (XLA totals) {ma:.3f} -> kernel roofline "
          f"{res['analytical_over_kernel_roofline']:.2f}x "
          f"{res['analytical_over_kernel_roofline_ci95']}, trees {res['analytical_over_learned']:.2f}x "
          + (f"| with kernel labels {mp['kernel_roofline_labels']:.3f} -> "
             f"{res['analytical_over_kernel_roofline_labels']:.2f}x "
             f"{res['analytical_over_kernel_roofline_labels_ci95']} "
             if _KR_LABELS.value else "") +
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
  out["total_s"] = time.perf_counter() - t0
  # the cost dataset: the HLO texts, then the columns (meta left out)
  out["provenance"] = provenance.record(data_arrays=[*ds.hlo, *ds[1:-1]], script=__file__)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, f"value_program_mape{_OTAG.value}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


def main(_):
  if _OTEST.value and _WHAT.value not in ("options", "program_mape"):
    raise ValueError(f"--option_test_data is read by --part=options and --part=program_mape only, not {_WHAT.value!r}.")
  if _WHAT.value == "options":
    return part_options()
  if _WHAT.value == "program_mape":
    return part_program_mape()
  if _WHAT.value == "options_nested":
    return part_options_nested()
  cost = sched.AnalyticalCost()
  r, s = _R.value, _S.value
  t0 = time.perf_counter()
  nets = {}
  for n in _NETS.value:
    nets[n] = _net_graph(n)
    print(f"graph {n}: {len(nets[n].units)} units, {len(nets[n].blocks)} parts "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  rand = [sched.build_graph(*V.random_conv_net(i, blocks=1 + i % 3), part_size=_PART.value)
          for i in range(_RANDOM.value)]
  rows = {}
  for held in _NETS.value:
    g = nets[held]
    train = rand + [nets[n] for n in _NETS.value if n != held]
    t = time.perf_counter()
    model, stats = V.train_value_model(train, cost, rounds=_ROUNDS.value, rollouts=_ROLLOUTS.value,
                                       steps=_STEPS.value, seed=_SEED.value, r=r, s=s)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    dp_stages, dp_cost, dp_calls = V.dp_schedule(g, cost, r, s)
    dp_s = time.perf_counter() - t
    gr = V.greedy_schedule(model, g)
    _check_cover(g, gr.stages)
    gr_cost = V.schedule_cost(g, gr.stages, cost)
    hy = V.hybrid_schedule(model, g, cost, k=_K.value)
    _check_cover(g, hy.stages)
    seq = _seq_cost(g, cost)
    rows[held] = {
        "units": len(g.units), "parts": len(g.blocks), "train_states": stats["states"],
        "train_s": train_s, "sequential_s": seq, "dp_s": dp_cost, "dp_search_s": dp_s,
        "dp_stage_calls": dp_calls, "greedy_s": gr_cost, "greedy_pred_s": gr.predicted_s,
        "greedy_search_s": gr.search_s, "greedy_over_dp": gr_cost / dp_cost,
        "hybrid_s": hy.cost_s, "hybrid_over_dp": hy.cost_s / dp_cost, "hybrid_stage_calls": hy.evaluated,
        "hybrid_search_s": hy.search_s, "hybrid_fallback": hy.fallback,
        "ood": [[int(u), why] for u, why in gr.ood][:20], "n_ood": len(gr.ood),
        "final_loss": stats["losses"][-1][-1],
    }
    print(f"{held}: seq/dp {seq / dp_cost:.3f}  greedy/dp {gr_cost / dp_cost:.3f} ({gr.search_s:.2f} s, 0 "
          f"stage calls)  hybrid/dp {hy.cost_s / dp_cost:.3f} ({hy.search_s:.2f} s, {hy.evaluated} calls"
          f"{', fallback' if hy.fallback else ''})  dp {dp_s:.2f} s, {dp_calls} calls; ood {len(gr.ood)}",
          flush=True)
  out = {"config": {k: getattr(f, "value") for k, f in
                    [("nets", _NETS), ("random_nets", _RANDOM), ("rollouts", _ROLLOUTS), ("steps", _STEPS),
                     ("rounds", _ROUNDS), ("k", _K), ("r", _R), ("s", _S), ("part_size", _PART),
                     ("seed", _SEED)]},
         "cost_model": "AnalyticalCost (H100-like roofline), CPU", "nets": rows,
         "geomean_greedy_over_dp": float(np.exp(np.mean([np.log(v["greedy_over_dp"]) for v in rows.values()]))),
         "geomean_hybrid_over_dp": float(np.exp(np.mean([np.log(v["hybrid_over_dp"]) for v in rows.values()]))),
         "total_s": time.perf_counter() - t0,
         "provenance": provenance.record(script=__file__)}   # no data set: generated nets, analytical costs
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "value_eval.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
