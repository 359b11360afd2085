"""Pool disjoint seed sets of `experiments/compressed_adam.py` runs (same flags) into one paired comparison per
data set. Run from the repository root: `python3 experiments/results/compressed_adam_pool.py [s8|s9]`.

  s8: the 0.1% Top-k recipe (rmsfrom@1, density warm-up 300 steps from 1%), seeds 0-4, 5-9, 10-14 (session 8)
  s9: the plain 1% chain `chain(topk(0.01), adam)` (SIDCo's default set), seeds 0-4 and 5-14 (session 9)
  s11: `chain(spread_releases(sidco(0.01), mode='leaky', max_interval=16 | 32), adam)` (session 11; digits
       max_interval=16 only), each
       arm against Adam and, paired, against the plain chain of s9 (same seeds, same data)
  s13: the 0.1% arm chosen on session 13's mnist1d screen (seeds 0-4): DGC's density warm-up from 25% over
       300 steps, raw selection down to 1.56%, the RMS selection from 0.39% on, delivered in gradient units
       (`comm.adaptive_ef.gradient_units`); mnist1d seeds 0-4 (screen) + 5-14 (confirmation), digits 0-14;
       against Adam and, paired, against the session-8 recipe (s8's pool)
  s13u: the session-8 recipe with only `gradient_units` added (its mnist1d screen arm, seeds 0-4, run on
       digits 0-14 and then on mnist1d 5-14; not the screen's choice), same comparisons
  s16: mnist1d, everything re-run on session 16's host (which reproduces session 7's accuracies, not those of
       sessions 8-15: the same data digest, other XLA CPU numerics): Adam, the plain 1% chain, the 1% option
       `spread_releases(leaky, 16)` and the 0.1% recipe of s8, seeds 0-14, and the 1% arms also on the fresh
       seeds 15-29; each arm vs Adam and the spread arm also vs the plain chain (paired)
  s17: the same host (checked: Adam and the plain chain of seeds 0-1 re-run equal to s16's JSONs): the session-17
       winner `spread_releases(topk(0.01), mode='rate', max_interval=16)` on its screen seeds 0-4 and the fresh
       seeds 30-44 (never used before session 17), with Adam, the plain chain and spread16 re-run on 30-44; the
       confirmation (30-44) against Adam, spread16 and the plain chain (paired), and Adam / plain / spread16
       pooled over all 45 seeds of this host (0-44); round 3's winner `spread_releases(topk(0.01), mode='leaky',
       max_interval=16, until=450)` on its screen seeds 0-4 and the fresh seeds 45-59 (Adam, plain and spread16
       re-run there), the same comparisons on 45-59, and Adam / plain / spread16 over all 60 seeds (0-59)

  s18: the 0.1% recipe of s8 on this host (Top-k: session 16's seeds 0-14 and the fresh seeds 100-129; DGC with its
       default sample: 100-129), each against Adam re-run with it; a precision run whose rule was written first
  s18dgc: DGC (default sample) cells on current code: digits 1% (plain chain and the 1% option) and 0.1% (the
       recipe, and inside gradient_units) on the fresh seeds 100-114, mnist1d 1% option on seeds 45-59 (session 17's 45-49 + 50-59)
  s30p: session 30's precision run (rule: s30_precision/RULE.md): the 0.1% recipe on the fresh seeds 130-159, alone
       and pooled with session 18's 45 seeds (0-14, 100-129), each against Adam re-run with it (paired)
  s30s2: session 30's second screen (rule: s30_screen2/RULE.md): five one-flag arms of the 0.1% recipe on mnist1d
       seeds 0-4, each vs Adam and, paired, vs the recipe of s30_pt (the same host and seeds)
  s30: session 30's screen (rule: s30_pt/RULE.md): the 0.1% recipe with per-tensor selection against the recipe
       re-run on this host, mnist1d seeds 0-4 (two runs, Adam checked equal seed by seed), each vs Adam and paired
  s36: session 36's powered screen (rule: s36_screen/RULE.md): the recipe's raw stage spread (leaky@16u150) on
       mnist1d seeds 0-19, one run with Adam and the recipe, vs Adam and, paired, vs the recipe

Sets whose JSONs carry data digests must agree (`provenance.check_same_data` raises otherwise); the seed
sets must not overlap; the runs pooled into one arm must agree in every setting outside the arm names (data set,
steps, workers, batch, lr, per_tensor, residual_decay, ...: `compressed_adam.check_same_settings`, --merge's
check), and runs with DGC arms in DGC's default sample where both record it (`compressed_adam.check_same_dgc_sample`),
so that they differ in their seeds only."""

import json
import os
import sys

sys.path.insert(0, "experiments")
from compressed_adam import _compare, check_same_dgc_sample, check_same_settings  # noqa: E402
from provenance import check_same_data  # noqa: E402

R = "experiments/results/"

_POOL_WHY = ("pooled, its seeds would count as more seeds of one setting. Pool only runs that differ in their seeds "
             "(compare the others as separate arms).")
_PAIR_WHY = ("its arms would be paired seed by seed with arms trained under other settings. Compare only runs that "
             "differ in their arms and seeds.")


def _check_pooled(base: dict, run: dict, names) -> None:
  """The checks of two runs pooled as one setting's seed sets: the same settings outside the seeds
  (``check_same_settings``) and, for DGC arms, the same default sample (``check_same_dgc_sample``)."""
  check_same_settings(base, run, names, _POOL_WHY)
  check_same_dgc_sample(base, run, names, _POOL_WHY)


def _check_against_pool(pooled_entry: dict, run: dict, f: str):
  """The settings check of ``run`` (file ``f``) against every run behind one data set's entry of a pooled JSON
  (its ``files``), whose arms it is paired with."""
  for ref in pooled_entry.get("files", []):
    check_same_settings(json.load(open(R + ref)), run, (ref, f), _PAIR_WHY)


POOLS = {
    "s8": ("topk 0.001 rmsfrom@1 dwarmup300 start0.01",
           ["compressed_adam_{D}_600_0.001_rmsfrom1_dw300_dgc_sample_ref.json",
            "compressed_adam_{D}_600_0.001_rmsfrom1_dw300_s8_seeds5-9.json",
            "compressed_adam_{D}_600_0.001_rmsfrom1_dw300_s8_seeds10-14.json"],
           "compressed_adam_0.001_rmsfrom1_dw300_topk_s8_pooled15.json"),
    "s9": ("topk 0.01 chain",
           ["compressed_adam_{D}_600_0.01_s9_topk_chain_seeds0-4.json",
            "compressed_adam_{D}_600_0.01_s9_topk_chain_seeds5-14.json"],
           "compressed_adam_0.01_chain_topk_s9_pooled15.json"),
}


def pool(name: str) -> dict:
  key, patterns, out_name = POOLS[name]
  out = {}
  for D in ("mnist1d", "digits"):
    files = [p.format(D=D) for p in patterns]
    runs = [json.load(open(R + f)) for f in files]
    for i in range(1, len(runs)):
      check_same_data(runs[0], runs[i], (files[0], files[i]))
      _check_pooled(runs[0], runs[i], (files[0], files[i]))
    seeds = sum([r["seeds"] for r in runs], [])
    assert len(set(seeds)) == len(seeds), f"{name} {D}: seed sets overlap"
    A = sum([r["accuracy"]["adam"] for r in runs], [])
    T = sum([r["accuracy"][key] for r in runs], [])
    c = _compare(T, A)
    sets = [_compare(r["accuracy"][key], r["accuracy"]["adam"])["mean_diff"] for r in runs]
    out[D] = {"files": files, "seeds": seeds, "adam": A, "topk": T, "pooled_vs_adam": c, "per_set_mean_diff": sets,
              "mb_per_worker": {a: sum([r["bytes_per_worker"][a] for r in runs], []) for a in ("adam", key)}}
    if runs[0].get("provenance") is not None:
      out[D]["provenance"] = runs[0]["provenance"]
    print(name, D, seeds, "pooled %+.2f [%+.2f, %+.2f]" % (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0],
          100 * c["mean_diff_ci95"][1]), "sets", ["%+.2f" % (100 * s) for s in sets], "P", c["p"])
  json.dump(out, open(R + out_name, "w"), indent=1)
  return out


S11 = {"mnist1d": ["compressed_adam_mnist1d_600_0.01_s11_spread_seeds0-4.json",
                   "compressed_adam_mnist1d_600_0.01_s11_spread_seeds5-14.json"],
       "digits": ["compressed_adam_digits_600_0.01_s11_spread_seeds0-14.json"]}
S11_ARMS = ("sidco 0.01 chain spread-leaky@16", "sidco 0.01 chain spread-leaky@32")


def pool_s11() -> dict:
  """Session 11: the spread arms pooled over their seed sets, vs Adam and vs the plain chain (s9's pool)."""
  plain = json.load(open(R + POOLS["s9"][2]))
  out = {}
  for D, files in S11.items():
    runs = [json.load(open(R + f)) for f in files]
    for f, r in zip(files, runs):
      check_same_data(runs[0], r, (files[0], f))
      _check_pooled(runs[0], r, (files[0], f))
      _check_against_pool(plain[D], r, f)
      if plain[D].get("provenance", {}).get("data_sha256") not in (None, r["provenance"]["data_sha256"]):
        raise ValueError(f"{f}: other data than {POOLS['s9'][2]}")
    seeds = sum([r["seeds"] for r in runs], [])
    assert len(set(seeds)) == len(seeds), f"s11 {D}: seed sets overlap"
    by_seed = {s: (a, t) for s, a, t in zip(plain[D]["seeds"], plain[D]["adam"], plain[D]["topk"])}
    A = sum([r["accuracy"]["adam"] for r in runs], [])
    assert A == [by_seed[s][0] for s in seeds], f"s11 {D}: Adam differs from {POOLS['s9'][2]}"
    P = [by_seed[s][1] for s in seeds]
    out[D] = {"files": files, "seeds": seeds, "adam": A, "plain_chain": P,
              "plain_vs_adam": _compare(P, A), "arms": {}}
    for key in [k for k in S11_ARMS if all(k in r["accuracy"] for r in runs)]:   # digits: @16 only
      X = sum([r["accuracy"][key] for r in runs], [])
      c, cp = _compare(X, A), _compare(X, P)
      sets = [_compare(r["accuracy"][key], r["accuracy"]["adam"])["mean_diff"] for r in runs]
      out[D]["arms"][key] = {"accuracy": X, "vs_adam": c, "vs_plain_chain": cp, "per_set_mean_diff": sets,
                             "mb_per_worker": sum([r["bytes_per_worker"][key] for r in runs], [])}
      print("s11", D, key, len(seeds), "seeds: vs Adam %+.2f [%+.2f, %+.2f]" % (
          100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]),
          "P %.2f [%.2f, %.2f]" % (c["p"], c["ci_low"], c["ci_high"]),
          "vs plain %+.2f [%+.2f, %+.2f]" % (100 * cp["mean_diff"], 100 * cp["mean_diff_ci95"][0],
                                            100 * cp["mean_diff_ci95"][1]), "sets", ["%+.2f" % (100 * s) for s in sets])
    out[D]["provenance"] = runs[0]["provenance"]
  json.dump(out, open(R + "compressed_adam_0.01_spread_s11_pooled15.json", "w"), indent=1)
  return out


S13 = {  # name: (arm, files per data set, output)
    "s13": ("topk 0.001 rmsfrom@3 dwarmup300 units",
            {"mnist1d": ["compressed_adam_mnist1d_600_0.001_s13_dw25_units_screen.json",
                         "compressed_adam_mnist1d_600_0.001_s13_dw25_units_seeds5-14.json"],
             "digits": ["compressed_adam_digits_600_0.001_s13_dw25_units_seeds0-14.json"]},
            "compressed_adam_0.001_dw25_units_s13_pooled15.json"),
    "s13u": ("topk 0.001 rmsfrom@1 dwarmup300 start0.01 units",
             {"mnist1d": ["compressed_adam_mnist1d_600_0.001_s13_units_screen.json",
                          "compressed_adam_mnist1d_600_0.001_s13_units_seeds5-14.json"],
              "digits": ["compressed_adam_digits_600_0.001_s13_units_seeds0-14.json"]},
            "compressed_adam_0.001_rmsfrom1_units_s13_pooled15.json"),
}


def pool_s13(name: str = "s13") -> dict:
  """Session 13: an arm pooled over its seed sets, vs Adam and vs the s8 recipe (same seeds, paired).

  s13: DGC's warm-up from 25% + gradient_units (chosen on the mnist1d screen, seeds 0-4); s13u: the s8
  recipe + gradient_units (the recipe with only the units fix)."""
  arm, sets_, out_name = S13[name]
  recipe = json.load(open(R + POOLS["s8"][2]))
  out = {}
  for D, files in sets_.items():
    runs = [json.load(open(R + f)) for f in files]
    for f, r in zip(files, runs):
      check_same_data(runs[0], r, (files[0], f))
      _check_pooled(runs[0], r, (files[0], f))
      _check_against_pool(recipe[D], r, f)
    seeds = sum([r["seeds"] for r in runs], [])
    assert len(set(seeds)) == len(seeds), f"{name} {D}: seed sets overlap"
    by_seed = {s: (a, t) for s, a, t in zip(recipe[D]["seeds"], recipe[D]["adam"], recipe[D]["topk"])}
    A = sum([r["accuracy"]["adam"] for r in runs], [])
    assert A == [by_seed[s][0] for s in seeds], f"{name} {D}: Adam differs from {POOLS['s8'][2]}"
    P = [by_seed[s][1] for s in seeds]
    X = sum([r["accuracy"][arm] for r in runs], [])
    c, cp = _compare(X, A), _compare(X, P)
    sets = [_compare(r["accuracy"][arm], r["accuracy"]["adam"])["mean_diff"] for r in runs]
    out[D] = {"files": files, "arm": arm, "seeds": seeds, "adam": A, "recipe_s8": P, "accuracy": X,
              "vs_adam": c, "vs_recipe_s8": cp, "recipe_s8_vs_adam": _compare(P, A), "per_set_mean_diff": sets,
              "mb_per_worker": sum([r["bytes_per_worker"][arm] for r in runs], []),
              "provenance": runs[0]["provenance"]}
    print(name, D, len(seeds), "seeds: vs Adam %+.2f [%+.2f, %+.2f]" % (
        100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]),
        "P %.2f [%.2f, %.2f]" % (c["p"], c["ci_low"], c["ci_high"]),
        "vs recipe %+.2f [%+.2f, %+.2f] P %.2f" % (100 * cp["mean_diff"], 100 * cp["mean_diff_ci95"][0],
                                                 100 * cp["mean_diff_ci95"][1], cp["p"]),
        "sets", ["%+.2f" % (100 * s) for s in sets])
  json.dump(out, open(R + out_name, "w"), indent=1)
  return out


S16_FRESH = "compressed_adam_mnist1d_600_0.01_s16_fresh_seeds15-29.json"   # seeds never used before session 16
S16 = {  # arm: (key, files for seeds 0-4 and 5-14 [and the fresh seeds 15-29])
    "plain": ("topk 0.01 chain", ["compressed_adam_mnist1d_600_0.01_s16_baseline_seeds0-4.json",
                                  "compressed_adam_mnist1d_600_0.01_s16_baseline_seeds5-14.json", S16_FRESH]),
    "spread": ("topk 0.01 chain spread-leaky@16", ["compressed_adam_mnist1d_600_0.01_s16_spread16_seeds0-4.json",
                                                   "compressed_adam_mnist1d_600_0.01_s16_baseline_seeds5-14.json",
                                                   S16_FRESH]),
    "recipe_0.001": ("topk 0.001 rmsfrom@1 dwarmup300 start0.01",
                     ["compressed_adam_mnist1d_600_0.001_s16_recipe_seeds0-4.json",
                      "compressed_adam_mnist1d_600_0.001_s16_recipe_seeds5-14.json"]),
}


def _fmt(c) -> str:
  return "%+.2f [%+.2f, %+.2f]" % (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1])


def _load_arm(tag: str, arm: str, key: str, files: list, adam: dict, complete: bool = False):
  """One arm's seed sets from ``files`` (same data digest; seeds distinct), with Adam checked equal seed by seed
  against ``adam`` (seed -> accuracy, filled in place). With ``complete`` every file must hold one result of the
  arm per Adam seed (not a run still going). Returns (runs, seeds, Adam accuracies, the arm's accuracies)."""
  runs = [json.load(open(R + f)) for f in files]
  for f, r in zip(files, runs):
    check_same_data(runs[0], r, (files[0], f))
    _check_pooled(runs[0], r, (files[0], f))
    if complete and not len(r["accuracy"][key]) == len(r["accuracy"]["adam"]) == len(r["seeds"]):
      raise ValueError(f"{tag} {arm}: {f} holds {len(r['accuracy'][key])} results of {key!r} for "
                       f"{len(r['accuracy']['adam'])} Adam seeds (a run still going or stopped): finish it first.")
  seeds = sum([r["seeds"] for r in runs], [])
  assert len(set(seeds)) == len(seeds), f"{tag} {arm}: overlapping seed sets {seeds}"
  A = sum([r["accuracy"]["adam"] for r in runs], [])
  for sd, a in zip(seeds, A):
    assert adam.setdefault(sd, a) == a, f"{tag} {arm}: Adam of seed {sd} differs between files"
  return runs, seeds, A, sum([r["accuracy"][key] for r in runs], [])


def pool_s16() -> dict:
  """Session 16's host: every arm against Adam re-run on the same host (same seeds, paired), over seeds 0-14 (the
  seeds of sessions 7-15) and, for the 1% arms, also over the fresh seeds 15-29 and all 30; the spread arm also
  against the plain chain."""
  out, adam, acc = {}, {}, {}
  for arm, (key, files) in S16.items():
    runs, seeds, A, X = _load_arm("s16", arm, key, files, adam)
    assert seeds == list(range(len(seeds))), f"s16 {arm}: seeds {seeds}"
    acc[arm] = X
    res = {"key": key, "files": files, "seeds": seeds, "accuracy": X,
           "mb_per_worker": sum([r["bytes_per_worker"][key] for r in runs], []), "provenance": runs[0]["provenance"],
           "per_set_mean_diff": [_compare(r["accuracy"][key], r["accuracy"]["adam"])["mean_diff"] for r in runs]}
    for name, lo, hi in (("seeds0-14", 0, 15), ("seeds15-29", 15, 30), ("seeds0-29", 0, 30)):
      if len(seeds) >= hi:
        res["vs_adam_" + name] = c = _compare(X[lo:hi], A[lo:hi])
        print("s16", arm, name, "vs Adam", _fmt(c), "P %.2f [%.2f, %.2f]" % (c["p"], c["ci_low"], c["ci_high"]))
    out[arm] = res
  for name, lo, hi in (("seeds0-14", 0, 15), ("seeds15-29", 15, 30), ("seeds0-29", 0, 30)):
    out["spread"]["vs_plain_chain_" + name] = cp = _compare(acc["spread"][lo:hi], acc["plain"][lo:hi])
    print("s16 spread vs plain", name, _fmt(cp))
  out["adam"] = [adam[sd] for sd in sorted(adam)]
  json.dump(out, open(R + "compressed_adam_mnist1d_s16_host_pooled.json", "w"), indent=1)
  return out


S17_CONFIRM = "compressed_adam_mnist1d_600_0.01_s17_confirm_seeds30-44.json"   # seeds never used before session 17
S17_CONFIRM2 = "compressed_adam_mnist1d_600_0.01_s17_confirm2_seeds45-59.json"   # round 3's fresh seeds
S17 = {  # arm: (key, files of its seed sets, in seed order)
    "plain": ("topk 0.01 chain", S16["plain"][1] + [S17_CONFIRM, S17_CONFIRM2]),
    "spread16": ("topk 0.01 chain spread-leaky@16", S16["spread"][1] + [S17_CONFIRM, S17_CONFIRM2]),
    "rate16": ("topk 0.01 chain spread-rate@16", ["compressed_adam_mnist1d_600_0.01_s17_rate_screen_seeds0-4.json",
                                                   S17_CONFIRM]),
    "until450": ("topk 0.01 chain spread-leaky@16u450",
                 ["compressed_adam_mnist1d_600_0.01_s17_until_screen_seeds0-4.json", S17_CONFIRM2]
                 # after the confirmation: the same arm on the earlier seed sets of this host (Adam, plain and
                 # spread16 from their runs), where they exist
                 + [f for f in ("compressed_adam_mnist1d_600_0.01_s17_until450_seeds5-14.json",
                                "compressed_adam_mnist1d_600_0.01_s17_until450_seeds15-29.json",
                                "compressed_adam_mnist1d_600_0.01_s17_until450_seeds30-44.json")
                    if os.path.exists(R + f)]),
}
S17_FRESH = {"rate16": (30, 45), "until450": (45, 60)}   # each winner's confirmation seeds


def _fmt_p(c) -> str:
  return "P %.2f [%.2f, %.2f]" % (c["p"], c["ci_low"], c["ci_high"])


def pool_s17() -> dict:
  """Session 17 (session 16's host): each round's winner on its fresh seeds (rate holding: 30-44; leaky16 with
  until=450: 45-59) against Adam, spread16 and the plain chain, all re-run on those seeds (paired); every arm's seed
  sets pooled (Adam checked equal seed by seed across files)."""
  out, adam, acc = {}, {}, {}
  for arm, (key, files) in S17.items():
    runs, seeds, A, X = _load_arm("s17", arm, key, files, adam, complete=True)
    acc[arm] = dict(zip(seeds, X))
    res = {"key": key, "files": files, "seeds": seeds, "accuracy": X,
           "mb_per_worker": sum([r["bytes_per_worker"][key] for r in runs], []), "provenance": runs[-1]["provenance"],
           "vs_adam_all": _compare(X, A)}
    for lo, hi in ((30, 45), (45, 60)):
      fresh = [i for i, sd in enumerate(seeds) if lo <= sd < hi]
      if fresh:
        res[f"vs_adam_seeds{lo}-{hi - 1}"] = c = _compare([X[i] for i in fresh], [A[i] for i in fresh])
        print("s17", arm, f"seeds{lo}-{hi - 1} vs Adam", _fmt(c), _fmt_p(c))
    print("s17", arm, f"all {len(seeds)} seeds vs Adam", _fmt(res["vs_adam_all"]))
    out[arm] = res
  for a, (lo, hi) in S17_FRESH.items():
    fresh = list(range(lo, hi))
    for b in ("spread16", "plain"):
      out[a][f"vs_{b}_seeds{lo}-{hi - 1}"] = c = _compare([acc[a][sd] for sd in fresh], [acc[b][sd] for sd in fresh])
      print("s17", a, "vs", b, f"seeds{lo}-{hi - 1}", _fmt(c), _fmt_p(c))
    both = sorted(set(acc[a]) & set(acc["spread16"]))
    out[a]["vs_spread16_shared_seeds"] = c = _compare([acc[a][sd] for sd in both], [acc["spread16"][sd] for sd in both])
    print("s17", a, "vs spread16 on seeds", both, _fmt(c))
    unsel = [sd for sd in sorted(acc[a]) if sd >= 5]   # every seed but the screen's 0-4
    out[a]["unselected_seeds"] = unsel
    for b in ("adam", "spread16", "plain"):
      ref = adam if b == "adam" else acc[b]
      out[a][f"vs_{b}_unselected_seeds"] = c = _compare([acc[a][sd] for sd in unsel], [ref[sd] for sd in unsel])
      print("s17", a, "vs", b, f"on the {len(unsel)} seeds >= 5", _fmt(c), _fmt_p(c))
  for lo, hi in ((30, 45), (45, 60)):
    fresh = list(range(lo, hi))
    out["spread16"][f"vs_plain_seeds{lo}-{hi - 1}"] = c = _compare([acc["spread16"][sd] for sd in fresh],
                                                                  [acc["plain"][sd] for sd in fresh])
    print("s17 spread16 vs plain", f"seeds{lo}-{hi - 1}", _fmt(c))
  out["adam"] = {str(sd): adam[sd] for sd in sorted(adam)}
  json.dump(out, open(R + "compressed_adam_mnist1d_s17_host_pooled.json", "w"), indent=1)
  return out


S18_FRESH = ["compressed_adam_mnist1d_600_0.001_s18_recipe_seeds100-114.json",   # seeds never used before
             "compressed_adam_mnist1d_600_0.001_s18_recipe_seeds115-129.json"]
S18 = {  # arm: (key, files in seed order)
    "recipe_topk": ("topk 0.001 rmsfrom@1 dwarmup300 start0.01", S16["recipe_0.001"][1] + S18_FRESH),
    "recipe_dgc": ("dgc 0.001 rmsfrom@1 dwarmup300 start0.01", S18_FRESH),
}


def pool_s18() -> dict:
  """Session 18's precision run of the 0.1% recipe on mnist1d (rule in docs/comm.md, written before the runs):
  Top-k over this host's seeds 0-14 (session 16) and the fresh seeds 100-129, DGC (its default sample) over
  100-129, each against Adam re-run with it (paired); also each seed set alone."""
  out, adam = {}, {}
  for arm, (key, files) in S18.items():
    runs, seeds, A, X = _load_arm("s18", arm, key, files, adam, complete=True)
    res = {"key": key, "files": files, "seeds": seeds, "accuracy": X,
           "mb_per_worker": sum([r["bytes_per_worker"][key] for r in runs], []), "provenance": runs[-1]["provenance"],
           "vs_adam_all": _compare(X, A)}
    print("s18", arm, f"all {len(seeds)} seeds vs Adam", _fmt(res["vs_adam_all"]), _fmt_p(res["vs_adam_all"]))
    for name, lo, hi in (("seeds0-14", 0, 15), ("seeds100-129", 100, 130)):
      idx = [i for i, sd in enumerate(seeds) if lo <= sd < hi]
      if idx:
        res["vs_adam_" + name] = c = _compare([X[i] for i in idx], [A[i] for i in idx])
        print("s18", arm, name, "vs Adam", _fmt(c), _fmt_p(c))
    out[arm] = res
  t = dict(zip(out["recipe_topk"]["seeds"], out["recipe_topk"]["accuracy"]))
  d = dict(zip(out["recipe_dgc"]["seeds"], out["recipe_dgc"]["accuracy"]))
  out["recipe_dgc"]["vs_recipe_topk_seeds100-129"] = c = _compare([d[sd] for sd in sorted(d)], [t[sd] for sd in sorted(d)])
  print("s18 recipe_dgc vs recipe_topk seeds100-129", _fmt(c), _fmt_p(c))
  out["adam"] = {str(sd): adam[sd] for sd in sorted(adam)}
  json.dump(out, open(R + "compressed_adam_mnist1d_0.001_s18_recipe_pooled.json", "w"), indent=1)
  return out


S18_DGC = {  # cell: (data set, key, files in seed order)
    "digits_1%_chain": ("digits", "dgc 0.01 chain", ["compressed_adam_digits_600_0.01_s18_dgc_seeds100-114.json"]),
    "digits_1%_until450": ("digits", "dgc 0.01 chain spread-leaky@16u450",
                           ["compressed_adam_digits_600_0.01_s18_dgc_seeds100-114.json"]),
    "digits_0.1%_recipe": ("digits", "dgc 0.001 rmsfrom@1 dwarmup300 start0.01",
                           ["compressed_adam_digits_600_0.001_s18_recipe_dgc_seeds100-114.json"]),
    "digits_0.1%_recipe_units": ("digits", "dgc 0.001 rmsfrom@1 dwarmup300 start0.01 units",
                                 ["compressed_adam_digits_600_0.001_s18_recipe_units_dgc_seeds100-114.json"]),
    "mnist1d_1%_until450": ("mnist1d", "dgc 0.01 chain spread-leaky@16u450",
                            ["compressed_adam_mnist1d_600_0.01_s17_until450_dgc_seeds45-49.json",
                             "compressed_adam_mnist1d_600_0.01_s18_until450_dgc_seeds50-59.json"]),
}


def pool_s18_dgc() -> dict:
  """Session 18's DGC cells on current code (rule written before the runs): each against Adam of the same seeds
  (re-run in the digits runs; session 17's confirmation run of this host for mnist1d), paired."""
  out = {}
  for cell, (ds, key, files) in S18_DGC.items():
    adam = {}
    runs, seeds, A, X = _load_arm("s18dgc", cell, key, files, adam, complete=True)
    out[cell] = {"dataset": ds, "key": key, "files": files, "seeds": seeds, "accuracy": X, "adam": A,
                 "mb_per_worker": sum([r["bytes_per_worker"][key] for r in runs], []),
                 "vs_adam": _compare(X, A)}
    print("s18dgc", cell, f"{len(seeds)} seeds vs Adam", _fmt(out[cell]["vs_adam"]), _fmt_p(out[cell]["vs_adam"]))
  json.dump(out, open(R + "compressed_adam_s18_dgc_pooled.json", "w"), indent=1)
  return out


def pool_s30() -> dict:
  """Session 30's screen (``s30_pt/RULE.md``): the 0.1% recipe selecting per tensor (``--per_tensor``) against the
  recipe re-run on this host, seeds 0-4. The two runs share the arm's key (the flag is not in it), so they are
  paired here; Adam must agree seed by seed."""
  key = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  adam = {}
  arms = {}
  for arm, f in (("recipe", "s30_pt/recipe_seeds0-4.json"), ("per_tensor", "s30_pt/pt_seeds0-4.json")):
    runs, seeds, A, X = _load_arm("s30", arm, key, [f], adam, complete=True)
    if arm == "per_tensor" and runs[0]["per_tensor"] is not True:
      raise ValueError(f"s30: {f} was not run with --per_tensor")
    arms[arm] = {"file": f, "seeds": seeds, "accuracy": X, "adam": A,
                 "mb_per_worker": runs[0]["bytes_per_worker"][key], "vs_adam": _compare(X, A)}
  assert arms["recipe"]["seeds"] == arms["per_tensor"]["seeds"] == [0, 1, 2, 3, 4]
  pt = arms["per_tensor"]
  pt["vs_recipe"] = _compare(pt["accuracy"], arms["recipe"]["accuracy"])
  winner = pt["vs_recipe"]["mean_diff"] > 0 and pt["vs_adam"]["mean_diff"] >= -0.01
  out = {"key": key, "rule": "s30_pt/RULE.md", **arms, "winner": bool(winner)}
  for arm in arms:
    print("s30", arm, "vs Adam", _fmt(arms[arm]["vs_adam"]))
  print("s30 per_tensor vs recipe", _fmt(pt["vs_recipe"]), _fmt_p(pt["vs_recipe"]), "winner:", winner)
  json.dump(out, open(R + "s30_pt/screen_seeds0-4.json", "w"), indent=1)
  return out


def pool_s30p() -> dict:
  """Session 30's precision run (``s30_precision/RULE.md``): the 0.1% recipe (Top-k) on the fresh seeds 130-159,
  and pooled with session 18's 45 seeds: the per-seed differences against Adam of all files together."""
  key = S18["recipe_topk"][0]
  fresh = ["s30_precision/recipe_seeds130-159.json"]
  adam = {}
  _, s_new, a_new, x_new = _load_arm("s30p", "fresh", key, fresh, adam, complete=True)
  runs, seeds, A, X = _load_arm("s30p", "all", key, S18["recipe_topk"][1] + fresh, adam, complete=True)
  assert s_new == list(range(130, 160)) and len(seeds) == 75
  out = {"key": key, "rule": "s30_precision/RULE.md", "files": S18["recipe_topk"][1] + fresh, "seeds": seeds,
         "accuracy": X, "adam": A, "mb_per_worker": runs[-1]["bytes_per_worker"][key][0],
         "vs_adam_seeds130-159": _compare(x_new, a_new), "vs_adam_all75": _compare(X, A)}
  m = out["vs_adam_all75"]
  out["reading"] = ("met" if m["mean_diff_ci95"][0] >= -0.01 else "met on the mean" if m["mean_diff"] >= -0.01
                    else "not met")
  print("s30p seeds 130-159 vs Adam", _fmt(out["vs_adam_seeds130-159"]), _fmt_p(out["vs_adam_seeds130-159"]))
  print("s30p all 75 seeds vs Adam", _fmt(m), _fmt_p(m), "->", out["reading"])
  json.dump(out, open(R + "s30_precision/pooled75.json", "w"), indent=1)
  return out


S30_SCREEN2 = {  # arm: (file under s30_screen2/, key, the flag that makes it, as recorded in the file)
    "a_leaky16_until150": ("spread_seeds0-4.json", "topk 0.001 rmsfrom@1 dwarmup300 start0.01 spread-leaky@16u150",
                           ("spread", ["leaky@16u150", "leaky@64u150"])),
    "b_leaky64_until150": ("spread_seeds0-4.json", "topk 0.001 rmsfrom@1 dwarmup300 start0.01 spread-leaky@64u150",
                           ("spread", ["leaky@16u150", "leaky@64u150"])),
    "c_factor2": ("factor2_seeds0-4.json", "topk 0.001 rmsfrom@1 dwarmup300 start0.01", ("dwarmup_factor", 2.0)),
    "d_start2": ("start2_seeds0-4.json", "topk 0.001 rmsfrom@1 dwarmup300 start0.02", ("dwarmup_start", [0.02])),
    "e_decay0999": ("decay_seeds0-4.json", "topk 0.001 rmsfrom@1 dwarmup300 start0.01", ("residual_decay", 0.999)),
}


def pool_s30s2() -> dict:
  """Session 30's second screen (``s30_screen2/RULE.md``): each arm against Adam and, paired by seed, against the
  recipe of ``s30_pt/recipe_seeds0-4.json``; the winner by the rule (or none)."""
  key0 = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  adam = {}
  _, seeds0, _, rec = _load_arm("s30s2", "recipe", key0, ["s30_pt/recipe_seeds0-4.json"], adam, complete=True)
  out = {"rule": "s30_screen2/RULE.md", "recipe": {"accuracy": rec, "seeds": seeds0}, "arms": {}}
  for arm, (f, key, (flag, val)) in S30_SCREEN2.items():
    runs, seeds, A, X = _load_arm("s30s2", arm, key, ["s30_screen2/" + f], adam, complete=True)
    if runs[0].get(flag) != val:
      raise ValueError(f"s30s2 {arm}: {f} records {flag}={runs[0].get(flag)!r}, expected {val!r}")
    assert seeds == seeds0 == [0, 1, 2, 3, 4]
    out["arms"][arm] = {"file": f, "key": key, "accuracy": X, "mb_per_worker": runs[0]["bytes_per_worker"][key][0],
                        "vs_adam": _compare(X, A), "vs_recipe": _compare(X, rec)}
    print("s30s2", arm, "vs Adam", _fmt(out["arms"][arm]["vs_adam"]), "vs recipe", _fmt(out["arms"][arm]["vs_recipe"]))
  best = max(out["arms"], key=lambda a: out["arms"][a]["vs_recipe"]["mean_diff"])
  b = out["arms"][best]
  out["best"] = best
  out["winner"] = best if b["vs_recipe"]["mean_diff"] > 0.003 and b["vs_adam"]["mean_diff"] >= -0.01 else None
  print("s30s2 best", best, "winner", out["winner"])
  json.dump(out, open(R + "s30_screen2/screen_seeds0-4.json", "w"), indent=1)
  return out


def pool_s36() -> dict:
  """Session 36's powered screen (``s36_screen/RULE.md``): the recipe's 1% raw stage spread (``leaky@16u150``) on
  mnist1d seeds 0-19, one run with Adam and the recipe beside it: the arm against Adam and, paired by seed, against
  the recipe; the winner by the rule (> +0.3 pt over the recipe and >= -1.0 against Adam) or none."""
  f = "s36_screen/screen_seeds0-19.json"
  key0 = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  key = key0 + " spread-leaky@16u150"
  adam = {}
  runs, seeds, A, rec = _load_arm("s36", "recipe", key0, [f], adam, complete=True)
  _, _, _, X = _load_arm("s36", "spread", key, [f], adam, complete=True)
  assert seeds == list(range(20)) and runs[0]["spread"] == ["none", "leaky@16u150"]
  out = {"rule": "s36_screen/RULE.md", "file": f, "seeds": seeds, "adam": A,
         "recipe": {"key": key0, "accuracy": rec, "vs_adam": _compare(rec, A)},
         "spread": {"key": key, "accuracy": X, "mb_per_worker": runs[0]["bytes_per_worker"][key][0],
                    "vs_adam": _compare(X, A), "vs_recipe": _compare(X, rec)}}
  d = out["spread"]
  out["winner"] = bool(d["vs_recipe"]["mean_diff"] > 0.003 and d["vs_adam"]["mean_diff"] >= -0.01)
  print("s36 recipe vs Adam", _fmt(out["recipe"]["vs_adam"]), _fmt_p(out["recipe"]["vs_adam"]))
  print("s36 spread vs Adam", _fmt(d["vs_adam"]), _fmt_p(d["vs_adam"]), "vs recipe", _fmt(d["vs_recipe"]),
        _fmt_p(d["vs_recipe"]), "winner:", out["winner"])
  json.dump(out, open(R + "s36_screen/screen_summary.json", "w"), indent=1)
  return out


# pools with their own function (the rest are POOLS entries, pooled by ``pool``)
SPECIAL = {"s11": pool_s11, "s13": lambda: pool_s13("s13"), "s13u": lambda: pool_s13("s13u"), "s16": pool_s16,
           "s17": pool_s17, "s18": pool_s18, "s18dgc": pool_s18_dgc,
           "s30": pool_s30, "s30p": pool_s30p, "s30s2": pool_s30s2, "s36": pool_s36}

if __name__ == "__main__":
  if len(sys.argv) == 2 and sys.argv[1] in SPECIAL:
    SPECIAL[sys.argv[1]]()
    sys.exit()
  for n in sys.argv[1:] or list(POOLS):
    pool(n)
