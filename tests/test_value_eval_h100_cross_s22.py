"""The figures docs/value.md, README and the history quote from session 22's cross-device test of the
whole-program latency model (trained on the ten files, scored on the first profiled H100 collection), recomputed
from its committed JSON; and the collection itself (the test set the rule names)."""

import json
import pathlib
import statistics

import numpy as np
import pytest

from mlsys_jax import cost

ROOT = pathlib.Path(__file__).resolve().parents[1]
JSON = ROOT / "experiments" / "results" / "value_eval" / "value_program_mape_kernel_h100_cross_s22.json"
DATA = ROOT / "mlsys_jax" / "cost" / "data" / "h100" / "h100_collect_s22a.npz"


def test_quoted_cross_device_figures():
  t = json.loads(JSON.read_text())["test_data"]
  assert t["profiled_rows"]["rows"] == 229
  for k, v in (("mape_analytical", 0.684), ("mape_kernel_roofline", 0.497), ("mape_kernel_roofline_labels", 0.696),
               ("mape_kernel_roofline_blend", 0.624)):
    assert t[k] == pytest.approx(v, abs=5e-4), k
  assert t["analytical_over_kernel_roofline"] == pytest.approx(1.38, abs=0.005)
  assert t["analytical_over_kernel_roofline_ci95"] == pytest.approx([1.27, 1.52], abs=0.005)
  assert t["analytical_over_kernel_roofline_blend"] == pytest.approx(1.10, abs=0.005)
  assert t["analytical_over_kernel_roofline_blend_ci95"] == pytest.approx([0.94, 1.28], abs=0.005)
  assert t["analytical_over_kernel_roofline_labels"] == pytest.approx(0.98, abs=0.005)
  assert t["profiled_rows"]["busy_mape_kernel_roofline"] == pytest.approx(0.237, abs=5e-4)
  # the ratio is the analytical model's MAPE over the kernel model's, on the same rows
  assert t["analytical_over_kernel_roofline"] == pytest.approx(t["mape_analytical"] / t["mape_kernel_roofline"],
                                                               rel=1e-6)
  ratios = {f: v["kernel_roofline_median_pred_over_measured"] for f, v in t["per_family"].items()}
  assert len(ratios) == 20 and statistics.median(ratios.values()) == pytest.approx(1.32, abs=0.005)
  slow = sorted(r for f, r in ratios.items() if f != "segment_sum")
  assert len(slow) == 19 and slow[0] == pytest.approx(1.11, abs=0.005) and slow[-1] == pytest.approx(1.90, abs=0.005)
  assert ratios["segment_sum"] == pytest.approx(0.12, abs=0.005)


def test_the_h100_collection_is_what_the_rule_names():
  d = cost.load_dataset(str(DATA))
  assert len(d) == 310 and len(set(np.asarray(d.group).tolist())) == 103
  assert d.meta["device"] == "NVIDIA H100 80GB HBM3" and d.meta["seed"] == 22
  assert int(np.sum(d.noisy)) == 81


def test_quoted_program_fold_figures_with_the_h100_file():
  p = json.loads((ROOT / "experiments" / "results" / "value_eval"
                  / "value_program_mape_kernel_program_options_s22h100.json").read_text())["program"]
  s = p["per_source"]["h100_collect_s22a.npz"]
  assert (s["rows"], s["programs"]) == (229, 83)
  assert (s["analytical"], s["kernel_roofline"], s["kernel_roofline_labels"], s["kernel_roofline_blend"]) == \
      pytest.approx((0.418, 0.216, 0.229, 0.223), abs=5e-4)
  assert s["analytical"] / s["kernel_roofline_blend"] == pytest.approx(1.87, abs=0.005)
  assert s["analytical"] / s["kernel_roofline"] == pytest.approx(1.93, abs=0.005)
  assert s["analytical_over_kernel_roofline_blend_ci95"] == pytest.approx([1.60, 2.23], abs=0.005)
  h200 = [v["analytical"] / v["kernel_roofline_blend"] for k, v in p["per_source"].items() if k.startswith("h200")]
  assert (min(h200), max(h200)) == pytest.approx((2.14, 4.53), abs=0.005)
  d = p["per_device"]["NVIDIA H200"]
  assert d["analytical"] / d["kernel_roofline_blend"] == pytest.approx(2.93, abs=0.005)
  a = p["per_source"]["h100_collect_a.npz"]
  assert (a["analytical"], a["kernel_roofline_blend"]) == pytest.approx((0.469, 0.165), abs=5e-4)
  assert a["analytical"] / a["kernel_roofline_blend"] == pytest.approx(2.84, abs=0.005)
  assert (p["mape_kernel_roofline_blend"], p["mape_analytical"]) == pytest.approx((0.151, 0.422), abs=5e-4)
  assert p["analytical_over_kernel_roofline_blend"] == pytest.approx(2.78, abs=0.005)
  assert p["analytical_over_kernel_roofline_blend_ci95"] == pytest.approx([2.63, 2.96], abs=0.005)
