"""The figures docs/value.md and rule_fresh_s29.md's Result quote from session 29's fresh-data test on new H100
programs (the two collections session 28 reserved, h100_collect_s28c and _s28d, scored together; trained on the
twenty-one earlier files), recomputed from the committed JSONs; and the two collections session 29 reserved unread."""

import json
import pathlib

import numpy as np
import pytest

from mlsys_jax import cost
from tests.test_value_eval_fresh_h100_s26 import check_fresh_whole_program
from tests.test_value_eval_fresh_h100_s27 import FRESH_OPTION_TESTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
RES = ROOT / "experiments" / "results" / "value_eval"
H100 = ROOT / "mlsys_jax" / "cost" / "data" / "h100"
TEST = ("h100_collect_s28c.npz", "h100_collect_s28d.npz")


@pytest.mark.parametrize("tag,blend,ratio,ci,plain,per_file,fam_range,gammas", [
    ("", 0.132, 3.10, [2.71, 3.58], 2.97, (2.96, 3.30), (0.59, 1.02), None),                # (b-P), the primary
    ("_covariate", 0.137, 2.99, [2.62, 3.48], 2.96, (2.85, 3.21), (0.56, 1.04), (0.92, 4.58))])  # (b-C)
def test_quoted_whole_program_figures(tag, blend, ratio, ci, plain, per_file, fam_range, gammas):
  res = check_fresh_whole_program(f"kernel_fresh_h100_s29{tag}", train=3158, test=290, files=21, analytical=0.409,
                                  blend=blend, ratio=ratio, ci=ci, plain=plain, families=18, above=0, gammas=gammas)
  td = res["dataset"]["test_data"]
  train = [s["name"] for s in td["per_source"] if not s["test"]]
  assert not set(train) & set(TEST) and "h100_collect_s28b.npz" in train and "h100_collect_s28a.npz" in train
  assert sorted(s["name"] for s in td["per_source"] if s["test"]) == list(TEST)
  t = res["test_data"]
  src = [t["per_test_source"][f] for f in TEST]
  assert [(s["programs"], s["rows"]) for s in src] == [(122, 291), (99, 231)]
  assert tuple(round(s["analytical"] / s["kernel_roofline_blend"], 2) for s in src) == per_file
  ratios = [v["kernel_roofline_median_pred_over_measured"] for v in t["per_family"].values()]
  assert (round(min(ratios), 2), round(max(ratios), 2)) == fam_range
  if tag == "":      # the primary: met on the point estimate, its interval reaches below 3 -> not on the lower bound
    assert t["analytical_over_kernel_roofline_blend_ci95"][0] < 3.0 <= t["analytical_over_kernel_roofline_blend"]
    fam = {f: round(v["kernel_roofline_blend"], 2) for f, v in t["per_family"].items()}
    assert (fam["resblock"], fam["conv_grad"], fam["depthwise_conv"], fam["segment_sum"]) == (0.31, 0.22, 0.2, 0.19)
    assert t["per_family"]["segment_sum"]["rows"] == 65


@pytest.mark.parametrize("tag,chosen,within,ci,faster,slower,regret", [
    ("tuned", (1.0, 0.0), 0.890, [0.855, 0.924], 28, 17, 0.021),
    ("fixed", (2.0, 0.0), 0.893, [0.859, 0.928], 27, 15, 0.020)])
def test_quoted_option_choice(tag, chosen, within, ci, faster, slower, regret):
  res = json.loads((RES / f"value_options_fresh_h100_s29_{tag}.json").read_text())
  assert (res["config"]["pessimism"], res["config"]["margin"]) == chosen
  m = res["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == 290
  assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (within, 0.845)
  assert v["within_tol_ci95"] == pytest.approx(ci, abs=5e-4)
  assert d["within_tol_ci95"] == pytest.approx([0.803, 0.883], abs=5e-4)
  assert v["within_tol_ci95"][0] > 0.80 and v["within_tol"] > d["within_tol"]     # met, above the default here
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (faster, slower)
  assert (round(v["mean_regret"], 3), round(d["mean_regret"], 3)) == (regret, 0.028)
  assert round(m["gbdt"]["within_tol"], 3) == 0.876 and round(m["hybrid_top2"]["within_tol"], 3) == 0.962
  assert (m["hybrid_top2"]["timed"], m["hybrid_top2"]["timed_exhaustive"]) == (580, 849)


def test_quoted_pooled_fresh_option_choice_nine_tests():
  """docs/value.md (a): pooled over the nine fresh tests (sessions 23-29), 0.885 (Wilson 95% 0.870-0.899) within 5%;
  always-default 0.877; 8 of 9 files at or above 0.80 alone."""
  n = hit = hit_default = hit_hybrid = faster = slower = per_file_met = 0
  for f in FRESH_OPTION_TESTS + ("value_options_fresh_h100_s29_tuned.json",):
    m = json.loads((RES / f).read_text())["results"]["test_data/fresh"]["measured"]
    v = m["value_model"]
    k = v["programs"]
    n += k
    hit += round(v["within_tol"] * k)
    hit_default += round(m["always_default"]["within_tol"] * k)
    hit_hybrid += round(m["hybrid_top2"]["within_tol"] * k)
    faster += v["vs_default"]["faster_by_5pct"]
    slower += v["vs_default"]["slower_by_5pct"]
    per_file_met += v["within_tol"] >= 0.80
  assert (n, hit, hit_default, hit_hybrid) == (1779, 1575, 1561, 1739)
  assert (faster, slower, per_file_met) == (143, 127, 8)
  p, z = hit / n, 1.959964
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  assert (round(p, 3), round(centre - half, 3), round(centre + half, 3)) == (0.885, 0.87, 0.899)
  assert round(hit_default / n, 3) == 0.877 and round(hit_hybrid / n, 3) == 0.978
  assert centre - half > 0.80                                                   # (a) met on the pooled fresh programs


def test_quoted_plain_model_error_range_on_fresh_h100_files():
  """docs/value.md: the plain model's blend MAPE on the seven fresh H100 tests since session 25 is 0.132-0.156, the
  analytical model's 0.305-0.444; the ratio reaches 3 on one of them (this session's)."""
  tags = ("s25", "s26_plain", "s27_plain", "s27b", "s27c", "s28", "s29")
  got = [json.loads((RES / f"value_program_mape_kernel_fresh_h100_{t}.json").read_text())["test_data"] for t in tags]
  blend = [round(t["mape_kernel_roofline_blend"], 3) for t in got]
  ana = [round(t["mape_analytical"], 3) for t in got]
  assert (min(blend), max(blend)) == (0.132, 0.156) and (min(ana), max(ana)) == (0.305, 0.444)
  assert all(t.get("kernel_roofline_host_scale_fitted") is None for t in got)     # none with the floor covariate
  assert [t["analytical_over_kernel_roofline_blend"] >= 3.0 for t in got] == [False] * 6 + [True]


@pytest.mark.parametrize("name,seed,rows,programs,noisy,kept,floors,conv_probe", [
    # reserved, unread, for the next session's rule (reserved_fresh_s29.md): only counts, floors and probes here
    ("h100_collect_s29a", 35, 350, 120, 180, 83, (45.8, 30.6, 31.7), (40.2, 47.6, 50.1)),
    ("h100_collect_s29b", 36, 524, 179, 190, 143, (29.6, 30.4, 27.5), (58.6, 50.4, 42.2))])
def test_the_reserved_session29_collections(name, seed, rows, programs, noisy, kept, floors, conv_probe):
  d = cost.load_dataset(str(H100 / f"{name}.npz"))
  assert d.meta["device"] == "NVIDIA H100 80GB HBM3" and d.meta["seed"] == seed
  assert len(d) == rows and len(set(np.asarray(d.group).tolist())) == programs
  assert int(np.sum(d.noisy)) == noisy
  assert len(set(np.asarray(d.group)[~np.asarray(d.noisy)].tolist())) == kept
  timing = d.meta["dispatch_floor_timing_s"]
  got = (d.meta["dispatch_floor_s"], timing["median"], d.meta["dispatch_floor_end_s"])
  assert tuple(round(f * 1e6, 1) for f in got) == floors
  lib = d.meta["library_floor_timing_s"]
  got = (d.meta["library_floor_s"]["conv"], lib["conv"]["median"], d.meta["library_floor_end_s"]["conv"])
  assert tuple(round(f * 1e6, 1) for f in got) == conv_probe
  excluded = {pathlib.Path(p).name for p in d.meta["exclude"]}   # every earlier file, s28c and s28d included
  assert {"h100_collect_s28c.npz", "h100_collect_s28d.npz"} <= excluded
  assert len(excluded) == {"h100_collect_s29a": 23, "h100_collect_s29b": 24}[name]
  if name == "h100_collect_s29b":
    assert "h100_collect_s29a.npz" in excluded
