"""The figures docs/value.md and the rules' Results quote from session 27's fresh-data tests on new H100 programs
(experiments/results/value_eval/rule_fresh_s27.md: trained on the sixteen earlier files, scored on the seed-28 H100
collection; primary (b) with the in-timing dispatch-floor covariate and the scatterw / convdir kernel options),
recomputed from the committed JSONs; and the collections themselves, with their library-call probes."""

import json
import pathlib

import numpy as np
import pytest

from mlsys_jax import cost
from tests.test_value_eval_fresh_h100_s26 import check_fresh_whole_program

ROOT = pathlib.Path(__file__).resolve().parents[1]
RES = ROOT / "experiments" / "results" / "value_eval"
H100 = ROOT / "mlsys_jax" / "cost" / "data" / "h100"


@pytest.mark.parametrize("name,seed,rows,programs,noisy,kept,floors,conv_probe", [
    ("h100_collect_s27a", 28, 464, 164, 154, 138, (32.8, 50.4, 39.6), (109.6, 91.7, 81.5)),
    ("h100_collect_s27b", 29, 673, 230, 290, 166, (34.8, 45.3, 51.2), (64.4, 80.2, 86.4)),
    # reserved, unread, for the next session's rule (reserved_fresh_s27c.md): only counts, floors and probes here
    ("h100_collect_s27c", 30, 344, 120, 98, 100, (43.0, 43.9, 33.9), (80.7, 88.3, 53.9)),
    # session 28, reserved unread for the next rule (reserved_fresh_s28.md): the two files together are its test
    ("h100_collect_s28a", 31, 286, 103, 124, 75, (41.5, 43.8, 32.7), (47.3, 75.2, 49.6)),
    ("h100_collect_s28b", 32, 280, 94, 42, 86, (39.3, 42.9, 52.9), (81.8, 92.6, 79.3)),
    # reserved unread for the next session's rule (reserved_fresh_s28c.md)
    ("h100_collect_s28c", 33, 427, 148, 136, 122, (38.4, 44.7, 44.1), (100.4, 81.9, 78.7)),
    ("h100_collect_s28d", 34, 422, 142, 191, 99, (40.2, 39.3, 37.8), (50.1, 75.9, 70.2)),
    # session 29, reserved unread, then scored together under rule_fresh_s29b.md (reserved_fresh_s29.md)
    ("h100_collect_s29a", 35, 350, 120, 180, 83, (45.8, 30.6, 31.7), (40.2, 47.6, 50.1)),
    ("h100_collect_s29b", 36, 524, 179, 190, 143, (29.6, 30.4, 27.5), (58.6, 50.4, 42.2)),
    # reserved unread for the next session's rule (reserved_fresh_s29c.md; a shorter collection: 200 s)
    ("h100_collect_s29c", 37, 197, 65, 49, 53, (26.6, 37.6, 32.5), (60.8, 61.9, 46.3))])
def test_the_collections_are_what_the_addenda_name(name, seed, rows, programs, noisy, kept, floors, conv_probe):
  d = cost.load_dataset(str(H100 / f"{name}.npz"))
  assert d.meta["device"] == "NVIDIA H100 80GB HBM3" and d.meta["seed"] == seed
  assert len(d) == rows and len(set(np.asarray(d.group).tolist())) == programs
  assert int(np.sum(d.noisy)) == noisy
  assert len(set(np.asarray(d.group)[~np.asarray(d.noisy)].tolist())) == kept
  # a test needs 100 programs keeping a row: each s27 file, s28c and s29b alone; s28a + s28b (75 + 86), s28d (99, with
  # s28c), s29a (83, with s29b) and s29c (53, with the next collection) only together
  assert kept >= 100 or name in ("h100_collect_s28a", "h100_collect_s28b", "h100_collect_s28d", "h100_collect_s29a",
                                 "h100_collect_s29c")
  timing = d.meta["dispatch_floor_timing_s"]
  got = (d.meta["dispatch_floor_s"], timing["median"], d.meta["dispatch_floor_end_s"])
  assert tuple(round(f * 1e6, 1) for f in got) == floors
  # the library-call probe (new in session 27): the conv probe is a cuDNN call, the f32 GEMM probe none on the H100
  assert d.meta["library_probe_targets"] == {"conv": ["__cudnn$convForward"], "gemm": []}
  lib = d.meta["library_floor_timing_s"]
  assert lib["conv"]["n"] == timing["n"]
  got = (d.meta["library_floor_s"]["conv"], lib["conv"]["median"], d.meta["library_floor_end_s"]["conv"])
  assert tuple(round(f * 1e6, 1) for f in got) == conv_probe


def test_the_two_reserved_session28_collections_share_no_program():
  """reserved_fresh_s28.md: the next rule's test is the two files together; each excluded the earlier ones."""
  a, b = (cost.load_dataset(str(H100 / f"h100_collect_s28{x}.npz")) for x in "ab")
  ka, kb = (set(np.asarray(d.group)[~np.asarray(d.noisy)].tolist()) for d in (a, b))
  assert len(ka) + len(kb) == 161
  excluded = [pathlib.Path(p).name for p in b.meta["exclude"]]   # s28b was deduplicated against s28a and the rest
  assert "h100_collect_s28a.npz" in excluded and "h100_collect_s27c.npz" in excluded and len(excluded) == 20


_B = [  # tag, blend, ratio, ci, plain KR ratio, families > 1.1 (plain KR), gammas
    ("", 0.486, 0.88, [0.70, 1.13], 0.88, 11, (0.92, 6.99)),            # primary: covariate + tokens
    ("_replication", 0.471, 0.90, [0.72, 1.16], 0.92, 10, (0.90, 6.15)),  # session 26's primary
    ("_plain", 0.151, 2.82, [2.41, 3.28], 2.77, 0, None),                 # no covariate, tokens
    ("x_plain_notokens", 0.154, 2.76, [2.35, 3.25], 2.77, 0, None),       # exploratory, after the result
    ("x_dfloor_start", 0.152, 2.80, [2.39, 3.25], 2.74, 0, (0.93, 7.21)),
    ("x_dfloor_unit", 0.160, 2.67, [2.21, 3.19], 2.65, 0, (1.0, 1.0))]


@pytest.mark.parametrize("tag,blend,ratio,ci,plain,above,gammas", _B)
def test_quoted_whole_program_figures(tag, blend, ratio, ci, plain, above, gammas):
  t = check_fresh_whole_program(f"kernel_fresh_h100_s27{tag}", train=2447, test=164, files=16, analytical=0.426,
                                blend=blend, ratio=ratio, ci=ci, plain=plain, families=16, above=above,
                                gammas=gammas)["test_data"]
  assert t["analytical_over_kernel_roofline_blend"] < 3.0                      # target (b) not met
  assert t["per_test_source"]["h100_collect_s27a.npz"]["programs"] == 138
  assert t["per_test_source"]["h100_collect_s27a.npz"]["rows"] == 310


def test_the_covariate_failed_where_the_in_timing_floor_rose():
  """The primary is worse than the analytical model (ratio < 1); with gamma_o ~7 a 50.4 us in-timing floor multiplies
  the program overhead by ~5; the same flags with the start floor (32.8 us) are back near the plain model."""
  r = {tag: json.loads((RES / f"value_program_mape_kernel_fresh_h100_s27{tag}.json").read_text())["test_data"]
       for tag, *_ in _B}
  assert r[""]["analytical_over_kernel_roofline_blend"] < 1.0 < r["_plain"]["analytical_over_kernel_roofline_blend"]
  g_o = r[""]["kernel_roofline_host_scale_fitted"][0]["kernel_roofline"][1]
  assert np.exp(g_o * np.log(50.4 / 40)) == pytest.approx(5.0, abs=0.1)
  assert abs(r["x_dfloor_start"]["analytical_over_kernel_roofline_blend"]
             - r["_plain"]["analytical_over_kernel_roofline_blend"]) < 0.05
  # the two kernel tokens add a little to the plain model on these programs
  assert r["_plain"]["mape_kernel_roofline_blend"] < r["x_plain_notokens"]["mape_kernel_roofline_blend"]


def test_quoted_option_choice_figures():
  tuned = json.loads((RES / "value_options_fresh_h100_s27_tuned.json").read_text())
  fixed = json.loads((RES / "value_options_fresh_h100_s27_fixed.json").read_text())
  assert (tuned["config"]["pessimism"], tuned["config"]["margin"]) == (1.0, 0.0)
  m = tuned["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == 164
  assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (0.854, 0.793)
  assert v["within_tol_ci95"] == pytest.approx([0.799, 0.909], abs=5e-4)
  assert d["within_tol_ci95"] == pytest.approx([0.732, 0.854], abs=5e-4)
  # met on the point estimate; the interval's lower end is just under 0.80; better than the default by the rule
  assert v["within_tol"] >= 0.80 > v["within_tol_ci95"][0] and v["within_tol"] > d["within_tol"]
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (27, 20)
  assert (round(v["mean_regret"], 3), round(d["mean_regret"], 3)) == (0.032, 0.049)
  assert round(m["gbdt"]["within_tol"], 3) == 0.823 and round(m["hybrid_top2"]["within_tol"], 3) == 0.982
  fv = fixed["results"]["test_data/fresh"]["measured"]["value_model"]
  assert round(fv["within_tol"], 3) == 0.835
  assert (fv["vs_default"]["faster_by_5pct"], fv["vs_default"]["slower_by_5pct"]) == (25, 21)


@pytest.mark.parametrize("tag,blend,ratio,ci,plain,above,gammas", [
    ("", 0.137, 2.23, [1.90, 2.61], 2.16, 1, None),                     # rule s27b's primary: plain + tokens
    ("_covariate", 0.136, 2.24, [1.93, 2.59], 2.26, 4, (0.85, 3.84))])  # (b-C)
def test_quoted_second_collection_figures(tag, blend, ratio, ci, plain, above, gammas):
  """rule_fresh_s27b.md: trained on the seventeen files (s27a included), scored on the seed-29 collection."""
  t = check_fresh_whole_program(f"kernel_fresh_h100_s27b{tag}", train=2611, test=230, files=17, analytical=0.305,
                                blend=blend, ratio=ratio, ci=ci, plain=plain, families=18, above=above,
                                gammas=gammas)["test_data"]
  assert t["analytical_over_kernel_roofline_blend"] < 3.0 and t["analytical_over_kernel_roofline_blend_ci95"][0] < 2.66
  src = t["per_test_source"]["h100_collect_s27b.npz"]
  assert (src["programs"], src["rows"]) == (166, 383)
  if tag == "":
    fam = {f: round(v["kernel_roofline_blend"], 2) for f, v in t["per_family"].items()}
    assert (fam["conv_grad"], fam["depthwise_conv"], fam["pooling"]) == (0.28, 0.25, 0.20)
    assert (t["per_family"]["pooling"]["rows"], t["per_family"]["transpose"]["rows"]) == (61, 100)


def test_quoted_second_collection_option_choice():
  for tag in ("tuned", "fixed"):    # the tuned decoder chose the fixed decoder's values: the same figures
    res = json.loads((RES / f"value_options_fresh_h100_s27b_{tag}.json").read_text())
    assert (res["config"]["pessimism"], res["config"]["margin"]) == (2.0, 0.0)
    m = res["results"]["test_data/fresh"]["measured"]
    v, d = m["value_model"], m["always_default"]
    assert v["programs"] == d["programs"] == 230
    assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (0.796, 0.826)
    assert v["within_tol_ci95"] == pytest.approx([0.743, 0.843], abs=5e-4)
    assert v["within_tol"] < 0.80 and v["within_tol"] < d["within_tol"]      # not met; worse than the default
    assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (28, 32)
    assert round(m["hybrid_top2"]["within_tol"], 3) == 0.957 and round(m["gbdt"]["within_tol"], 3) == 0.8
    assert (m["hybrid_top2"]["timed"], m["hybrid_top2"]["timed_exhaustive"]) == (459, 673)


@pytest.mark.parametrize("tag,blend,ratio,ci,plain,above,gammas", [
    ("", 0.145, 2.30, [1.93, 2.77], 2.31, 1, None),                     # rule s27c's primary: plain + tokens
    ("_covariate", 0.126, 2.65, [2.23, 3.19], 2.71, 3, (0.81, 4.04))])  # (b-C)
def test_quoted_reserved_collection_figures(tag, blend, ratio, ci, plain, above, gammas):
  """rule_fresh_s27c.md (session 28): trained on the eighteen files (s27b included), scored on the seed-30
  collection that session 27 reserved unread."""
  res = check_fresh_whole_program(f"kernel_fresh_h100_s27c{tag}", train=2841, test=120, files=18, analytical=0.333,
                                  blend=blend, ratio=ratio, ci=ci, plain=plain, families=16, above=above,
                                  gammas=gammas)
  train = [s for s in res["dataset"]["test_data"]["per_source"] if not s["test"]]
  assert not any("s27c" in str(s) for s in train)
  t = res["test_data"]
  assert t["analytical_over_kernel_roofline_blend_ci95"][0] < 3.0            # not met
  src = t["per_test_source"]["h100_collect_s27c.npz"]
  assert (src["programs"], src["rows"]) == (100, 246)
  if tag == "":
    fam = {f: round(v["kernel_roofline_blend"], 2) for f, v in t["per_family"].items()}
    assert (fam["mlp"], fam["pooling"], fam["conv_grad"], fam["mlp_train"]) == (0.27, 0.24, 0.23, 0.22)


@pytest.mark.parametrize("tag,chosen,faster", [("tuned", (1.0, 0.0), 9), ("fixed", (2.0, 0.0), 8)])
def test_quoted_reserved_collection_option_choice(tag, chosen, faster):
  res = json.loads((RES / f"value_options_fresh_h100_s27c_{tag}.json").read_text())
  assert (res["config"]["pessimism"], res["config"]["margin"]) == chosen
  m = res["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == 120
  assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (0.9, 0.892)
  assert v["within_tol_ci95"] == pytest.approx([0.842, 0.95], abs=5e-4)
  assert d["within_tol_ci95"] == pytest.approx([0.833, 0.942], abs=5e-4)
  assert v["within_tol_ci95"][0] > 0.80                                      # met on this file
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (faster, 7)
  assert round(m["hybrid_top2"]["within_tol"], 3) == 0.983 and round(m["gbdt"]["within_tol"], 3) == 0.883
  assert (m["hybrid_top2"]["timed"], m["hybrid_top2"]["timed_exhaustive"]) == (240, 344)


# every pre-registered fresh option-choice test, with the decoder its rule named as primary (sessions 23-28: eight)
FRESH_OPTION_TESTS = ("value_options_fresh_s23.json", "value_options_fresh_h100_s24_tuned.json",
                      "value_options_fresh_h100_s25_tuned.json", "value_options_fresh_h100_s26_tuned.json",
                      "value_options_fresh_h100_s27_tuned.json", "value_options_fresh_h100_s27b_tuned.json",
                      "value_options_fresh_h100_s27c_tuned.json", "value_options_fresh_h100_s28_tuned.json")


def pooled_option_choice(files) -> dict:
  """Target (a) pooled over fresh option-choice tests (each JSON's registered decoder): program counts within 5% for
  the model, always-default and the hybrid; programs faster / slower than the default; files at or above 0.80 alone;
  the model's share with its Wilson 95% interval."""
  c = dict(n=0, hit=0, hit_default=0, hit_hybrid=0, faster=0, slower=0, per_file_met=0)
  for f in files:
    m = json.loads((RES / f).read_text())["results"]["test_data/fresh"]["measured"]
    v = m["value_model"]
    k = v["programs"]
    c["n"] += k
    c["hit"] += round(v["within_tol"] * k)
    c["hit_default"] += round(m["always_default"]["within_tol"] * k)
    c["hit_hybrid"] += round(m["hybrid_top2"]["within_tol"] * k)
    c["faster"] += v["vs_default"]["faster_by_5pct"]
    c["slower"] += v["vs_default"]["slower_by_5pct"]
    c["per_file_met"] += v["within_tol"] >= 0.80
  n, p, z = c["n"], c["hit"] / c["n"], 1.959964
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  c["share"], c["wilson"] = p, (centre - half, centre + half)
  return c


def test_quoted_pooled_fresh_option_choice():
  """docs/value.md (a): pooled over the eight fresh tests, 0.884 (Wilson 95% 0.867-0.900) within 5%; the default
  0.884 too (one program fewer); 7 of 8 files at or above 0.80 alone."""
  c = pooled_option_choice(FRESH_OPTION_TESTS)
  assert (c["n"], c["hit"], c["hit_default"], c["hit_hybrid"]) == (1489, 1317, 1316, 1460)
  assert (c["faster"], c["slower"], c["per_file_met"]) == (115, 110, 7)
  assert (round(c["share"], 3), round(c["wilson"][0], 3), round(c["wilson"][1], 3)) == (0.884, 0.867, 0.9)
  assert round(c["hit_default"] / c["n"], 3) == 0.884 and round(c["hit_hybrid"] / c["n"], 3) == 0.981
  assert c["wilson"][0] > 0.80                                                  # (a) met on the pooled fresh programs


def test_quoted_device_time_oracle():
  """docs/value.md: the wall time fitted from the profiled kernel times of the training rows leaves MAPE 0.097."""
  res = json.loads((RES / "value_program_mape_kernel_fresh_h100_s27c.json").read_text())
  o = res["kernel_roofline_labels"]["labels"]["device_time_oracle"]
  assert o["rows"] == 3942 and round(o["wall_from_softmax_busy_plus_c0_floor_h"]["mape"], 3) == 0.097
  assert round(0.333 / 3, 3) == 0.111 and o["wall_from_softmax_busy_plus_c0_floor_h"]["mape"] < 0.111
