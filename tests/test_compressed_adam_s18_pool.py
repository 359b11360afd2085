"""The figures docs/comm.md and README quote from session 18's precision run of the 0.1% recipe on mnist1d
(experiments/results/compressed_adam_pool.py s18): the pooled JSON holds exactly its runs' accuracies, and the
paired differences recompute from them."""

import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
R = ROOT / "experiments" / "results"


def _compare(a, b):
  """The paired mean difference and its percentile-bootstrap interval, as experiments/compressed_adam.py computes
  them (2,000 resamples of the per-seed differences, numpy's generator seeded 0). Written out here: importing the
  experiment would define its absl flags in the test process, where other experiments' flags clash."""
  diff = np.asarray(a) - np.asarray(b)
  boot = np.random.default_rng(0).choice(diff, (2000, len(diff))).mean(1)
  lo, hi = np.quantile(boot, [0.025, 0.975])
  return {"mean_diff": float(diff.mean()), "mean_diff_ci95": [float(lo), float(hi)]}


def _load(name):
  return json.loads((R / name).read_text())


def test_pooled_accuracies_are_the_runs_and_the_quoted_differences_recompute():
  pooled = _load("compressed_adam_mnist1d_0.001_s18_recipe_pooled.json")
  adam = {int(k): v for k, v in pooled["adam"].items()}
  for arm, quoted_all, quoted_fresh in (("recipe_topk", (-1.12, -1.68, -0.60), (-1.15, -1.92, -0.49)),
                                        ("recipe_dgc", (-0.97, -1.52, -0.47), (-0.97, -1.52, -0.47))):
    res = pooled[arm]
    acc, seeds = [], []
    for f in res["files"]:
      run = _load(f)
      acc += run["accuracy"][res["key"]]
      seeds += run["seeds"]
      assert [adam[s] for s in run["seeds"]] == run["accuracy"]["adam"]   # Adam re-run in every file, paired
    assert acc == res["accuracy"] and seeds == res["seeds"]
    assert len(set(seeds)) == len(seeds)
    for c, quoted in ((_compare(acc, [adam[s] for s in seeds]), quoted_all),
                      (res["vs_adam_seeds100-129"], quoted_fresh)):
      got = (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1])
      assert got == pytest.approx(quoted, abs=0.005)
  c = pooled["recipe_dgc"]["vs_recipe_topk_seeds100-129"]   # DGC vs Top-k, paired on the fresh seeds
  assert (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]) == pytest.approx(
      (0.18, -0.35, 0.74), abs=0.005)
  t = dict(zip(pooled["recipe_topk"]["seeds"], pooled["recipe_topk"]["accuracy"]))
  assert c["mean_diff"] == pytest.approx(
      sum(a - t[s] for s, a in zip(pooled["recipe_dgc"]["seeds"], pooled["recipe_dgc"]["accuracy"])) / 30, abs=1e-12)
  assert pooled["recipe_topk"]["seeds"] == list(range(15)) + list(range(100, 130))
  assert pooled["recipe_dgc"]["seeds"] == list(range(100, 130))
  # DGC's static payload holds 2k slots: twice Top-k's bytes at the same target density
  assert pooled["recipe_dgc"]["mb_per_worker"][0] == pytest.approx(2 * pooled["recipe_topk"]["mb_per_worker"][0],
                                                                   rel=0.01)


def test_dgc_cells_recompute_from_their_runs():
  pooled = _load("compressed_adam_s18_dgc_pooled.json")
  quoted = {"digits_1%_chain": (-1.81, -3.76, -0.52), "digits_1%_until450": (-0.56, -0.88, -0.24),
            "digits_0.1%_recipe": (-1.11, -1.72, -0.56),
            "digits_0.1%_recipe_units": (-0.30, -0.46, -0.12), "mnist1d_1%_until450": (-0.40, -0.94, 0.10)}
  for cell, q in quoted.items():
    res = pooled[cell]
    acc, adam = [], []
    for f in res["files"]:
      run = _load(f)
      acc += run["accuracy"][res["key"]]
      adam += run["accuracy"]["adam"]
    assert acc == res["accuracy"] and adam == res["adam"] and len(acc) == 15
    c = _compare(acc, adam)
    assert (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]) == pytest.approx(q, abs=0.005)


def test_session30_per_tensor_screen_recomputes_and_has_no_winner():
  """Session 30's screen of the 0.1% recipe with per-tensor selection (rule s30_pt/RULE.md, written first): the
  summary JSON holds the runs' accuracies, the quoted differences recompute, and by the rule there is no winner."""
  key = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  rec, pt = _load("s30_pt/recipe_seeds0-4.json"), _load("s30_pt/pt_seeds0-4.json")
  out = _load("s30_pt/screen_seeds0-4.json")
  assert rec["per_tensor"] is False and pt["per_tensor"] is True
  assert rec["seeds"] == pt["seeds"] == [0, 1, 2, 3, 4]
  assert rec["accuracy"]["adam"] == pt["accuracy"]["adam"]   # Adam deterministic on this host: paired
  assert out["recipe"]["accuracy"] == rec["accuracy"][key] and out["per_tensor"]["accuracy"] == pt["accuracy"][key]
  adam = rec["accuracy"]["adam"]
  for acc, ref, quoted in ((rec["accuracy"][key], adam, (-0.44, -1.62, 0.92)),
                           (pt["accuracy"][key], adam, (-1.20, -2.10, 0.00)),
                           (pt["accuracy"][key], rec["accuracy"][key], (-0.76, -1.76, 0.24))):
    c = _compare(acc, ref)
    assert (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]) == pytest.approx(
        quoted, abs=0.005)
  assert out["winner"] is False and out["per_tensor"]["vs_recipe"]["mean_diff"] < 0
  # per tensor every leaf sends at least one entry a step: a few more bytes than the global selection
  assert out["per_tensor"]["mb_per_worker"][0] > out["recipe"]["mb_per_worker"][0]


def test_session30_precision_run_recomputes_and_reads_not_met():
  """Session 30's precision run of the 0.1% recipe on mnist1d (rule s30_precision/RULE.md, written first): the fresh
  seeds 130-159 and the 75-seed pool with session 18's files, as docs/comm.md and README quote them."""
  key = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  run = _load("s30_precision/recipe_seeds130-159.json")
  pooled18 = _load("compressed_adam_mnist1d_0.001_s18_recipe_pooled.json")
  out = _load("s30_precision/pooled75.json")
  assert run["seeds"] == list(range(130, 160)) and not set(run["seeds"]) & set(pooled18["recipe_topk"]["seeds"])
  new = _compare(run["accuracy"][key], run["accuracy"]["adam"])
  adam18 = {int(k): v for k, v in pooled18["adam"].items()}
  acc = pooled18["recipe_topk"]["accuracy"] + run["accuracy"][key]
  ref = [adam18[s] for s in pooled18["recipe_topk"]["seeds"]] + run["accuracy"]["adam"]
  assert out["accuracy"] == acc and out["adam"] == ref and len(acc) == 75
  for c, quoted in ((new, (-1.40, -1.93, -0.90)), (_compare(acc, ref), (-1.23, -1.63, -0.86))):
    assert (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]) == pytest.approx(
        quoted, abs=0.005)
  assert out["reading"] == "not met" and out["mb_per_worker"] == pooled18["recipe_topk"]["mb_per_worker"][0]


def test_session30_second_screen_recomputes_and_has_no_winner():
  """Session 30's second screen of the 0.1% recipe on mnist1d (rule s30_screen2/RULE.md, written first): five
  one-flag arms against the recipe of the same host and seeds; every arm below it, no winner."""
  out = _load("s30_screen2/screen_seeds0-4.json")
  rec = _load("s30_pt/recipe_seeds0-4.json")
  key0 = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  assert out["recipe"]["accuracy"] == rec["accuracy"][key0]
  quoted = {"a_leaky16_until150": (-0.58, -0.14), "b_leaky64_until150": (-1.16, -0.72), "c_factor2": (-1.92, -1.48),
            "d_start2": (-1.18, -0.74), "e_decay0999": (-2.38, -1.94)}
  assert set(out["arms"]) == set(quoted)
  for arm, (vs_adam, vs_recipe) in quoted.items():
    a = out["arms"][arm]
    run = _load("s30_screen2/" + a["file"])
    assert run["accuracy"][a["key"]] == a["accuracy"] and run["accuracy"]["adam"] == rec["accuracy"]["adam"]
    assert round(100 * _compare(a["accuracy"], rec["accuracy"]["adam"])["mean_diff"], 2) == vs_adam
    assert round(100 * _compare(a["accuracy"], rec["accuracy"][key0])["mean_diff"], 2) == vs_recipe
  assert out["winner"] is None and out["best"] == "a_leaky16_until150"
  assert _load("s30_screen2/factor2_seeds0-4.json")["dwarmup_factor"] == 2.0


def test_session36_powered_screen_recomputes_and_has_no_winner():
  """Session 36's screen (rule s36_screen/RULE.md, written first): the recipe's raw stage spread on mnist1d seeds
  0-19, one run with Adam and the recipe; the figures docs/comm.md quotes recompute from the run, no winner."""
  out = _load("s36_screen/screen_summary.json")
  run = _load("s36_screen/screen_seeds0-19.json")
  key0 = "topk 0.001 rmsfrom@1 dwarmup300 start0.01"
  assert run["seeds"] == list(range(20)) and out["adam"] == run["accuracy"]["adam"]
  rec, arm = run["accuracy"][key0], run["accuracy"][key0 + " spread-leaky@16u150"]
  assert out["recipe"]["accuracy"] == rec and out["spread"]["accuracy"] == arm
  for c, quoted in ((_compare(rec, out["adam"]), (-0.99, -1.53, -0.42)), (_compare(arm, out["adam"]), (-0.90, -1.68, -0.15)),
                    (_compare(arm, rec), (0.09, -0.57, 0.72))):
    assert (100 * c["mean_diff"], 100 * c["mean_diff_ci95"][0], 100 * c["mean_diff_ci95"][1]) == pytest.approx(
        quoted, abs=0.005)
  assert out["winner"] is False and out["spread"]["mb_per_worker"] / 1e6 == pytest.approx(1.636, abs=5e-4)
