"""The figures docs/value.md, README and the history quote from session 24's fresh-data tests on new H100 programs
(experiments/results/value_eval/rule_fresh_s24.md: trained on the twelve earlier files, scored on the seed-23 H100
collection), recomputed from the committed JSONs; and the collection itself."""

import json
import pathlib

import numpy as np
import pytest

from mlsys_jax import cost

ROOT = pathlib.Path(__file__).resolve().parents[1]
RES = ROOT / "experiments" / "results" / "value_eval"
DATA = ROOT / "mlsys_jax" / "cost" / "data" / "h100" / "h100_collect_s24a.npz"


def test_the_collection_is_what_the_rule_names():
  d = cost.load_dataset(str(DATA))
  assert len(d) == 614 and len(set(np.asarray(d.group).tolist())) == 212
  assert d.meta["device"] == "NVIDIA H100 80GB HBM3" and d.meta["seed"] == 23
  assert int(np.sum(d.noisy)) == 200


def test_quoted_whole_program_figures():
  res = json.loads((RES / "value_program_mape_kernel_fresh_h100_s24.json").read_text())
  td = res["dataset"]["test_data"]
  assert td["training_programs"] == 1812 and td["test_programs"] == 212
  assert td["test_programs_sharing_a_program_key_with_training"] == 0
  assert sum(not s["test"] for s in td["per_source"]) == 12
  t = res["test_data"]
  src = t["per_test_source"]["h100_collect_s24a.npz"]
  assert (src["programs"], src["rows"]) == (166, 414)
  assert (round(t["mape_analytical"], 3), round(t["mape_kernel_roofline_blend"], 3)) == (0.542, 0.328)
  assert t["analytical_over_kernel_roofline_blend"] == pytest.approx(1.65, abs=0.005)
  assert t["analytical_over_kernel_roofline_blend_ci95"] == pytest.approx([1.50, 1.83], abs=0.005)
  assert t["analytical_over_kernel_roofline_blend"] < 3.0
  assert t["analytical_over_kernel_roofline"] == pytest.approx(1.71, abs=0.005)
  assert t["analytical_over_kernel_roofline_labels"] == pytest.approx(1.63, abs=0.005)
  # session 22's fold figure for H100 rows, 1.87x (1.60-2.23): the intervals overlap
  assert t["analytical_over_kernel_roofline_blend_ci95"][1] >= 1.60
  ratios = {f: v["kernel_roofline_median_pred_over_measured"] for f, v in t["per_family"].items()}
  assert len(ratios) == 18 and sum(r > 1.1 for r in ratios.values()) == 15
  assert (round(min(ratios.values()), 2), round(max(ratios.values()), 2)) == (0.93, 1.52)


def test_quoted_option_choice_figures():
  tuned = json.loads((RES / "value_options_fresh_h100_s24_tuned.json").read_text())
  fixed = json.loads((RES / "value_options_fresh_h100_s24_fixed.json").read_text())
  cfg = tuned["config"]
  assert (cfg["pessimism"], cfg["margin"]) == (2.0, 0.02)
  sc = cfg["tuned"]
  assert len(sc) == 20 and max(sc, key=lambda k: (sc[k]["within_tol"], -sc[k]["mean_regret"])) == "2.0/0.02"
  assert round(sc["2.0/0.02"]["within_tol"], 3) == 0.831 and round(sc["2.0/0.0"]["within_tol"], 3) == 0.828
  m = tuned["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == 212
  assert round(v["within_tol"], 3) == 0.939 and v["within_tol_ci95"] == pytest.approx([0.906, 0.967], abs=5e-4)
  assert round(d["within_tol"], 3) == 0.915 and d["within_tol_ci95"] == pytest.approx([0.873, 0.948], abs=5e-4)
  # the rule: met (lower bound >= 0.80) and better than the default (higher, more clearly faster than slower)
  assert v["within_tol_ci95"][0] >= 0.80 and v["within_tol"] > d["within_tol"]
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (9, 2)
  assert (round(v["mean_regret"], 3), round(d["mean_regret"], 3)) == (0.015, 0.021)
  assert (round(v["max_regret"], 2), round(d["max_regret"], 2)) == (0.39, 0.54)
  assert round(v["vs_default"]["geomean_speedup"], 3) == 1.005
  assert round(m["gbdt"]["within_tol"], 3) == 0.943
  assert (m["gbdt"]["vs_default"]["faster_by_5pct"], m["gbdt"]["vs_default"]["slower_by_5pct"]) == (13, 4)
  assert round(m["hybrid_top2"]["within_tol"], 3) == 0.981 and m["hybrid_top2"]["timed"] == 424
  fam = m["per_family"]["batched_matmul"]
  assert (round(fam["value_model"]["within_tol"], 2), round(fam["always_default"]["within_tol"], 2)) == (0.85, 0.77)
  fv = fixed["results"]["test_data/fresh"]["measured"]["value_model"]
  assert round(fv["within_tol"], 3) == 0.943
  assert (fixed["config"]["pessimism"], fixed["config"]["margin"]) == (2.0, 0.0)
