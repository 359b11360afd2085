"""The figures docs/value.md and the rule's Result quote from session 26's fresh-data tests on new H100 programs
(experiments/results/value_eval/rule_fresh_s26.md and its addenda: trained on the fourteen earlier files, scored on
the two seed-26/27 H100 collections together; primary (b) with the in-timing dispatch-floor covariate), recomputed
from the committed JSONs; and the two collections themselves."""

import json
import pathlib

import numpy as np
import pytest

from mlsys_jax import cost

ROOT = pathlib.Path(__file__).resolve().parents[1]
RES = ROOT / "experiments" / "results" / "value_eval"
H100 = ROOT / "mlsys_jax" / "cost" / "data" / "h100"


def check_fresh_whole_program(name: str, *, train: int, test: int, files: int, analytical: float, blend: float,
                              ratio: float, ci, families: int, above: int, gammas, plain: float | None = None) -> dict:
  """The figures every fresh-data Result quotes for target (b), from ``value_program_mape_<name>.json``: training and
  test programs (none sharing a program key), the number of training files, analytical and blend MAPE, the
  analytical / blend ratio with its CI (and the plain model's ratio), families with median predicted / measured
  above 1.1, and the fitted (gamma_h, gamma_o) of the floor covariate (None: fitted without it). Returns the JSON
  (shared by the session 26-28 fresh tests)."""
  res = json.loads((RES / f"value_program_mape_{name}.json").read_text())
  td = res["dataset"]["test_data"]
  assert td["training_programs"] == train and td["test_programs"] == test
  assert td["test_programs_sharing_a_program_key_with_training"] == 0
  assert sum(not s["test"] for s in td["per_source"]) == files
  t = res["test_data"]
  assert (round(t["mape_analytical"], 3), round(t["mape_kernel_roofline_blend"], 3)) == (analytical, blend)
  assert t["analytical_over_kernel_roofline_blend"] == pytest.approx(ratio, abs=0.005)
  assert t["analytical_over_kernel_roofline_blend_ci95"] == pytest.approx(ci, abs=0.005)
  if plain is not None:
    assert t["analytical_over_kernel_roofline"] == pytest.approx(plain, abs=0.005)
  ratios = [v["kernel_roofline_median_pred_over_measured"] for v in t["per_family"].values()]
  assert len(ratios) == families and sum(r > 1.1 for r in ratios) == above
  fitted = t.get("kernel_roofline_host_scale_fitted")
  assert (fitted is None) if gammas is None else tuple(round(g, 2) for g in fitted[0]["kernel_roofline"]) == gammas
  return res


@pytest.mark.parametrize("name,seed,rows,programs,noisy,kept,floors", [
    ("h100_collect_s26a", 26, 315, 103, 116, 79, (33.2, 31.7, 28.5)),
    ("h100_collect_s26b", 27, 410, 141, 126, 111, (26.5, 30.1, 28.3))])
def test_the_collections_are_what_the_addenda_name(name, seed, rows, programs, noisy, kept, floors):
  d = cost.load_dataset(str(H100 / f"{name}.npz"))
  assert d.meta["device"] == "NVIDIA H100 80GB HBM3" and d.meta["seed"] == seed
  assert len(d) == rows and len(set(np.asarray(d.group).tolist())) == programs
  assert int(np.sum(d.noisy)) == noisy
  assert len(set(np.asarray(d.group)[~np.asarray(d.noisy)].tolist())) == kept
  timing = d.meta["dispatch_floor_timing_s"]
  assert timing["n"] == programs                      # one probe before each program's timing
  got = (d.meta["dispatch_floor_s"], timing["median"], d.meta["dispatch_floor_end_s"])
  assert tuple(round(f * 1e6, 1) for f in got) == floors


def test_s26a_alone_was_too_small_and_the_pool_is_not():
  kept = 0
  for name in ("h100_collect_s26a", "h100_collect_s26b"):
    d = cost.load_dataset(str(H100 / f"{name}.npz"))
    kept += len(set(np.asarray(d.group)[~np.asarray(d.noisy)].tolist()))
  assert kept == 190 >= 100


_B = [  # tag, training programs, analytical, blend, ratio, ci, s26a ratio, s26b ratio, families > 1.1 (plain), gammas
    ("", 2203, 0.353, 0.132, 2.66, [2.32, 3.06], 2.40, 2.88, 1, (0.92, 5.54)),       # primary: in-timing floor
    ("_plain", 2203, 0.353, 0.156, 2.25, [1.94, 2.60], 2.05, 2.42, 6, None),          # session 25's primary
    ("_no_h100a", 1757, 0.349, 0.131, 2.67, [2.32, 3.10], 2.64, 2.69, 0, None),
    ("_dfloor_start", 2203, 0.353, 0.129, 2.74, [2.39, 3.12], 2.28, 3.16, 1, (0.92, 5.54)),
    ("_dfloor_end", 2203, 0.353, 0.124, 2.85, [2.48, 3.28], 2.58, 3.07, 0, (0.92, 5.54)),
    ("_dfloor_no_h100a", 1757, 0.349, 0.129, 2.72, [2.37, 3.14], 2.62, 2.79, 0, (0.88, 0.78))]


@pytest.mark.parametrize("tag,train,ana,blend,ratio,ci,ra,rb,above,gammas", _B)
def test_quoted_whole_program_figures(tag, train, ana, blend, ratio, ci, ra, rb, above, gammas):
  t = check_fresh_whole_program(f"kernel_fresh_h100_s26{tag}", train=train, test=244,
                                files=13 if "no_h100a" in tag else 14, analytical=ana, blend=blend, ratio=ratio,
                                ci=ci, families=17, above=above, gammas=gammas)["test_data"]
  assert t["analytical_over_kernel_roofline_blend"] < 3.0                      # target (b) not met
  src = t["per_test_source"]
  assert (src["h100_collect_s26a.npz"]["programs"], src["h100_collect_s26b.npz"]["programs"]) == (79, 111)
  assert sum(s["rows"] for s in src.values()) == 483
  for name, want in (("h100_collect_s26a.npz", ra), ("h100_collect_s26b.npz", rb)):
    assert src[name]["analytical"] / src[name]["kernel_roofline_blend"] == pytest.approx(want, abs=0.005)
  if tag == "":   # not "improved" by the rule: the interval does not lie above session 25's 2.46x
    assert t["analytical_over_kernel_roofline_blend_ci95"][0] < 2.46


def test_every_floor_covariate_beats_the_plain_model_on_these_programs():
  r = {tag: json.loads((RES / f"value_program_mape_kernel_fresh_h100_s26{tag}.json").read_text())["test_data"]
       ["analytical_over_kernel_roofline_blend"] for tag, *_ in _B}
  assert all(r[t] > r["_plain"] + 0.4 for t in ("", "_dfloor_start", "_dfloor_end"))
  assert max(r, key=r.get) == "_dfloor_end"


def test_quoted_option_choice_figures():
  tuned = json.loads((RES / "value_options_fresh_h100_s26_tuned.json").read_text())
  fixed = json.loads((RES / "value_options_fresh_h100_s26_fixed.json").read_text())
  cfg = tuned["config"]
  assert (cfg["pessimism"], cfg["margin"]) == (1.0, 0.0)
  sc = cfg["tuned"]
  assert len(sc) == 20 and max(sc, key=lambda k: (sc[k]["within_tol"], -sc[k]["mean_regret"])) == "1.0/0.0"
  assert round(sc["1.0/0.0"]["within_tol"], 3) == 0.856 and round(sc["2.0/0.0"]["within_tol"], 3) == 0.853
  m = tuned["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == 244
  assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (0.951, 0.922)
  assert v["within_tol_ci95"] == pytest.approx([0.922, 0.975], abs=5e-4)
  assert d["within_tol_ci95"] == pytest.approx([0.885, 0.955], abs=5e-4)
  # the rule: met (lower bound >= 0.80) and better than the default (higher, more clearly faster than slower)
  assert v["within_tol_ci95"][0] >= 0.80 and v["within_tol"] > d["within_tol"]
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (14, 7)
  assert (round(v["mean_regret"], 3), round(d["mean_regret"], 3)) == (0.009, 0.023)
  assert (round(v["max_regret"], 2), round(d["max_regret"], 2)) == (0.33, 0.97)
  assert round(m["gbdt"]["within_tol"], 3) == 0.939 and round(m["hybrid_top2"]["within_tol"], 3) == 0.988
  fv = fixed["results"]["test_data/fresh"]["measured"]["value_model"]
  assert round(fv["within_tol"], 3) == 0.955
  assert (fv["vs_default"]["faster_by_5pct"], fv["vs_default"]["slower_by_5pct"]) == (14, 6)
