"""The figures docs/value.md and the Results of rule_fresh_s29.md / rule_fresh_s29b.md quote from session 29's two
fresh-data tests on new H100 programs (the collections session 28 reserved, h100_collect_s28c and _s28d, trained on
the twenty-one earlier files; then the two collected this session, _s29a and _s29b, trained on twenty-three),
recomputed from the committed JSONs; and the counts of the two session-29 collections."""

import json
import pathlib

import pytest

from mlsys_jax import cost
from tests.test_value_eval_fresh_h100_s26 import check_fresh_whole_program
from tests.test_value_eval_fresh_h100_s27 import FRESH_OPTION_TESTS, pooled_option_choice

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


def _check_option_choice(name, chosen, programs, within, ci, faster, slower, regret, default, hybrid, timed):
  """The quoted figures of one fresh option-choice JSON (its registered decoder against always-default);
  ``default`` = (within, mean regret) of always-default, ``hybrid`` = the top-2 hybrid's within, ``timed`` = its
  (timed, exhaustive) counts. Returns the measured results for the test's own assertions."""
  res = json.loads((RES / name).read_text())
  assert (res["config"]["pessimism"], res["config"]["margin"]) == chosen
  m = res["results"]["test_data/fresh"]["measured"]
  v, d = m["value_model"], m["always_default"]
  assert v["programs"] == d["programs"] == programs
  assert (round(v["within_tol"], 3), round(d["within_tol"], 3)) == (within, default[0])
  assert v["within_tol_ci95"] == pytest.approx(ci, abs=5e-4)
  assert (v["vs_default"]["faster_by_5pct"], v["vs_default"]["slower_by_5pct"]) == (faster, slower)
  assert (round(v["mean_regret"], 3), round(d["mean_regret"], 3)) == (regret, default[1])
  assert round(m["hybrid_top2"]["within_tol"], 3) == hybrid
  assert (m["hybrid_top2"]["timed"], m["hybrid_top2"]["timed_exhaustive"]) == timed
  return m


@pytest.mark.parametrize("tag,chosen,within,ci,faster,slower,regret", [
    ("tuned", (1.0, 0.0), 0.890, [0.855, 0.924], 28, 17, 0.021),
    ("fixed", (2.0, 0.0), 0.893, [0.859, 0.928], 27, 15, 0.020)])
def test_quoted_option_choice(tag, chosen, within, ci, faster, slower, regret):
  m = _check_option_choice(f"value_options_fresh_h100_s29_{tag}.json", chosen, 290, within, ci, faster, slower,
                           regret, (0.845, 0.028), 0.962, (580, 849))
  v, d = m["value_model"], m["always_default"]
  assert d["within_tol_ci95"] == pytest.approx([0.803, 0.883], abs=5e-4)
  assert v["within_tol_ci95"][0] > 0.80 and v["within_tol"] > d["within_tol"]     # met, above the default here
  assert round(m["gbdt"]["within_tol"], 3) == 0.876


@pytest.mark.parametrize("extra,counts,hits,quoted", [
    # rule_fresh_s29.md: nine tests (sessions 23-29), 0.885 (0.870-0.899), default 0.877
    (("s29",), (1779, 1575, 1561, 1739), (143, 127, 8), (0.885, 0.87, 0.899, 0.877, 0.978)),
    # rule_fresh_s29b.md / docs/value.md: ten tests, 0.864 (0.849-0.878), default 0.859
    (("s29", "s29b"), (2078, 1796, 1786, 2029), (169, 157, 8), (0.864, 0.849, 0.878, 0.859, 0.976))])
def test_quoted_pooled_fresh_option_choice(extra, counts, hits, quoted):
  """Pooled over every fresh option-choice test, each with its registered decoder: met on the lower bound, about
  as often as XLA's default; 8 files at or above 0.80 alone."""
  c = pooled_option_choice(FRESH_OPTION_TESTS + tuple(f"value_options_fresh_h100_{t}_tuned.json" for t in extra))
  assert (c["n"], c["hit"], c["hit_default"], c["hit_hybrid"]) == counts
  assert (c["faster"], c["slower"], c["per_file_met"]) == hits
  got = (round(c["share"], 3), round(c["wilson"][0], 3), round(c["wilson"][1], 3), round(c["hit_default"] / c["n"], 3),
         round(c["hit_hybrid"] / c["n"], 3))
  assert got == quoted
  assert c["wilson"][0] > 0.80                                                  # (a) met on the pooled fresh programs


def test_quoted_second_test_whole_program_figures():
  """rule_fresh_s29b.md: the same primary on s29a + s29b (trained on twenty-three files) reads 2.47x (2.13-2.82): the
  3.10x did not repeat; pooled over the two session-29 tests (row-weighted MAPEs) 2.77x."""
  test = ("h100_collect_s29a.npz", "h100_collect_s29b.npz")
  for tag, blend, ratio, ci, plain, gammas, above in (("", 0.149, 2.47, [2.13, 2.82], 2.46, None, 2),
                                                       ("_covariate", 0.150, 2.46, [2.17, 2.80], 2.43, (0.91, 4.97), 1)):
    res = check_fresh_whole_program(f"kernel_fresh_h100_s29b{tag}", train=3448, test=299, files=23,
                                    analytical=0.369, blend=blend, ratio=ratio, ci=ci, plain=plain, families=16,
                                    above=above, gammas=gammas)
    td = res["dataset"]["test_data"]
    train = {s["name"] for s in td["per_source"] if not s["test"]}
    assert not train & set(test) and set(TEST) <= train
    t = res["test_data"]
    src = [t["per_test_source"][f] for f in test]
    assert [(s["programs"], s["rows"]) for s in src] == [(83, 170), (143, 334)]
    if tag == "":
      assert t["analytical_over_kernel_roofline_blend_ci95"][1] < 3.0                     # not met
      assert tuple(round(s["analytical"] / s["kernel_roofline_blend"], 2) for s in src) == (3.10, 2.20)
      fam = {f: round(v["kernel_roofline_blend"], 2) for f, v in t["per_family"].items()}
      assert (fam["depthwise_conv"], fam["conv"], fam["rnn"], fam["embedding"]) == (0.37, 0.25, 0.24, 0.23)
  both = [json.loads((RES / f"value_program_mape_kernel_fresh_h100_{x}.json").read_text())["test_data"]
          for x in ("s29", "s29b")]
  rows = [sum(p["rows"] for p in t["per_test_source"].values()) for t in both]
  ana = sum(r * t["mape_analytical"] for r, t in zip(rows, both)) / sum(rows)
  blend = sum(r * t["mape_kernel_roofline_blend"] for r, t in zip(rows, both)) / sum(rows)
  assert (rows, round(ana, 3), round(blend, 3), round(ana / blend, 2)) == ([522, 504], 0.389, 0.141, 2.77)


@pytest.mark.parametrize("tag,chosen,within,ci,faster,slower,regret", [
    ("tuned", (2.0, 0.02), 0.739, [0.689, 0.789], 26, 30, 0.056),
    ("fixed", (2.0, 0.0), 0.749, [0.699, 0.799], 44, 45, 0.049)])
def test_quoted_second_test_option_choice(tag, chosen, within, ci, faster, slower, regret):
  m = _check_option_choice(f"value_options_fresh_h100_s29b_{tag}.json", chosen, 299, within, ci, faster, slower,
                           regret, (0.753, 0.05), 0.97, (598, 874))
  v, d = m["value_model"], m["always_default"]
  assert v["within_tol"] < 0.80 and v["within_tol"] < d["within_tol"]                # not met on this file
  assert round(m["gbdt"]["within_tol"], 3) == {"tuned": 0.769, "fixed": 0.789}[tag]


def test_quoted_plain_model_error_range_on_fresh_h100_files():
  """docs/value.md: the plain model's blend MAPE on the eight fresh H100 tests since session 25 is 0.132-0.156, the
  analytical model's 0.305-0.444; the ratio reaches 3 on one of them (s28c + s28d)."""
  tags = ("s25", "s26_plain", "s27_plain", "s27b", "s27c", "s28", "s29", "s29b")
  got = [json.loads((RES / f"value_program_mape_kernel_fresh_h100_{t}.json").read_text())["test_data"] for t in tags]
  blend = [round(t["mape_kernel_roofline_blend"], 3) for t in got]
  ana = [round(t["mape_analytical"], 3) for t in got]
  assert (min(blend), max(blend)) == (0.132, 0.156) and (min(ana), max(ana)) == (0.305, 0.444)
  assert all(t.get("kernel_roofline_host_scale_fitted") is None for t in got)     # none with the floor covariate
  assert [t["analytical_over_kernel_roofline_blend"] >= 3.0 for t in got] == [False] * 6 + [True, False]


def test_the_reserved_session29_collections_exclude_every_earlier_file():
  """reserved_fresh_s29.md (counts, floors and probes pinned in tests/test_value_eval_fresh_h100_s27.py): s29a excluded
  the twenty-three earlier files, s28c and s28d among them; s29b those and s29a."""
  a, b = (cost.load_dataset(str(H100 / f"h100_collect_s29{x}.npz")) for x in "ab")
  ex_a, ex_b = ({pathlib.Path(p).name for p in d.meta["exclude"]} for d in (a, b))
  assert {"h100_collect_s28c.npz", "h100_collect_s28d.npz"} <= ex_a and len(ex_a) == 23
  assert ex_b == ex_a | {"h100_collect_s29a.npz"}
  assert (a.meta["seed"], b.meta["seed"]) == (35, 36)


def test_quoted_device_time_oracle_range():
  """docs/value.md: on the profiled training rows of sessions 28-29's fresh tests, the wall time fitted from the
  profiled kernel times leaves MAPE 0.097-0.102 (more rows each time)."""
  got = []
  for tag in ("s27c", "s29", "s29b"):
    res = json.loads((RES / f"value_program_mape_kernel_fresh_h100_{tag}.json").read_text())
    o = res["kernel_roofline_labels"]["labels"]["device_time_oracle"]
    got.append((o["rows"], round(o["wall_from_softmax_busy_plus_c0_floor_h"]["mape"], 3)))
  assert got == [(3942, 0.097), (4841, 0.101), (5345, 0.102)]
