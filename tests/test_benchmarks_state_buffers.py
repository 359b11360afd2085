"""benchmarks/state_buffers.py: the figures docs/comm.md quotes from its committed CPU JSON, and its row table."""

import json
import pathlib

import pytest

from benchmarks import state_buffers as sb

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_quoted_cpu_figures():
  d = json.loads((RESULTS / "state_buffers_cpu_s18.json").read_text())
  rows = {r["row"]: r for r in d["rows"]}
  assert d["leaves"] == 161 and d["args"]["div"] == 16
  ms = {k: rows[k]["step_s"] * 1e3 for k in rows}
  quoted = {"adam": 1.56, "adam_flat": 0.74, "topk": 2.21, "topk_flat": 1.86, "sidco": 3.49, "sidco_flat": 3.21,
            "sidco_flat_adam_flat": 3.06, "sidco_pt": 4.03, "sidco_pt_flat": 4.05}
  for k, v in quoted.items():
    assert ms[k] == pytest.approx(v, abs=0.005), k
  assert [rows[k]["state_buffers"] for k in ("adam", "adam_flat", "sidco", "sidco_flat", "sidco_flat_adam_flat")] == \
      [323, 3, 493, 333, 13]
  fusions = {k: rows[k]["entry_fusions"] for k in rows}
  assert (fusions["topk"] - fusions["topk_flat"], fusions["sidco"] - fusions["sidco_flat"]) == (160, 321)
  assert fusions["sidco_pt"] - fusions["sidco_pt_flat"] == 318
  for k, ratio in (("topk_flat", 1.19), ("sidco_flat", 1.09), ("sidco_pt_flat", 1.00)):
    assert rows[k]["same_as_tree"] is True
    assert rows[k]["vs_tree"] == pytest.approx(ratio, abs=0.005)
    assert rows[k]["vs_tree"] == pytest.approx(rows[rows[k]["tree_row"]]["step_s"] / rows[k]["step_s"], rel=1e-9)
  assert ms["topk"] - ms["topk_flat"] == pytest.approx(0.35, abs=0.005)
  assert ms["sidco"] - ms["sidco_flat"] == pytest.approx(0.28, abs=0.005)
  assert ms["adam"] / ms["adam_flat"] == pytest.approx(2.1, abs=0.05)


def test_rows_build_transforms_and_name_their_tree_rows():
  for name, (make, tree_row) in sb.ROWS.items():
    tx = make(0.01)
    assert callable(tx.init) and callable(tx.update), name
    assert tree_row is None or (tree_row in sb.ROWS and sb.ROWS[tree_row][1] is None), name


def test_quoted_h200_figures():
  # docs/comm.md "State buffers and the flat residual on the H200" (session 19), table 1
  ms_ = {}
  for div in (1, 16):
    d = json.loads((RESULTS / f"state_buffers_h200_s19_div{div}.json").read_text())
    assert d["env"]["device"] == "NVIDIA H200" and d["args"]["div"] == div and d["leaves"] == 161
    rows = {r["row"]: r for r in d["rows"]}
    ms_[div] = {k: rows[k]["step_s"] * 1e3 for k in rows}
    for k in ("topk_flat", "sidco_flat", "sidco_pt_flat"):
      assert rows[k]["same_as_tree"] is True
      assert rows[k]["vs_tree"] == pytest.approx(rows[rows[k]["tree_row"]]["step_s"] / rows[k]["step_s"], rel=1e-9)
  one, six = ms_[1], ms_[16]
  quoted1 = {"adam": 5.87, "adam_flat": 1.74, "topk": 9.24, "topk_flat": 5.70, "sidco": 8.12, "sidco_flat": 5.90,
             "sidco_flat_adam_flat": 2.12, "sidco_pt": 7.88, "sidco_pt_flat": 6.05}
  quoted16 = {"adam": 5.69, "adam_flat": 1.91, "topk": 9.60, "topk_flat": 6.04, "sidco": 6.71, "sidco_flat": 4.62,
              "sidco_flat_adam_flat": 2.06, "sidco_pt": 6.89, "sidco_pt_flat": 5.02}
  for k in quoted1:
    assert one[k] == pytest.approx(quoted1[k], abs=0.005), k
    assert six[k] == pytest.approx(quoted16[k], abs=0.005), k
  assert one["adam"] / one["adam_flat"] == pytest.approx(3.38, abs=0.005)
  assert six["adam"] / six["adam_flat"] == pytest.approx(2.98, abs=0.005)
  assert one["sidco"] / one["sidco_flat_adam_flat"] == pytest.approx(3.83, abs=0.005)
  assert one["sidco_flat_adam_flat"] - one["adam_flat"] == pytest.approx(0.38, abs=0.005)
  # "~13 us per buffer" from Adam's 323 buffers to flattened Adam's 3
  assert (one["adam"] - one["adam_flat"]) / (323 - 3) * 1e3 == pytest.approx(13, abs=0.5)


def test_quoted_h100_session22_figures():
  # BENCHMARKS.md "Optimizer-state buffers", the H100 run of session 22 (a second run, another device)
  d = json.loads((RESULTS / "state_buffers_h100_s22_div1.json").read_text())
  assert d["env"]["device"] == "NVIDIA H100 80GB HBM3" and d["args"]["div"] == 1 and d["leaves"] == 161
  rows = {r["row"]: r for r in d["rows"]}
  ms_ = {k: rows[k]["step_s"] * 1e3 for k in rows}
  quoted = {"adam": 5.73, "adam_flat": 1.54, "topk": 8.82, "topk_flat": 5.31, "sidco": 7.06, "sidco_flat": 4.83,
            "sidco_flat_adam_flat": 2.21}
  for k, v in quoted.items():
    assert ms_[k] == pytest.approx(v, abs=0.005), k
  for k, ratio in (("topk_flat", 1.66), ("sidco_flat", 1.46)):
    assert rows[k]["same_as_tree"] is True
    assert rows[k]["vs_tree"] == pytest.approx(ratio, abs=0.005)
  assert ms_["adam"] / ms_["adam_flat"] == pytest.approx(3.72, abs=0.005)
  assert ms_["sidco"] / ms_["sidco_flat_adam_flat"] == pytest.approx(3.19, abs=0.005)
