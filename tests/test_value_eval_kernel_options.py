"""experiments/value_eval.py --part=program_mape, session 16: the --kr_kernel_options_grid parser, and
a smoke run in which the option set is chosen per outer fold by the inner cross-validation.

The script runs in a subprocess: its absl flags would collide with those of other experiment scripts
that tests import in-process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "experiments")
import value_eval as VE
out = {"ok": [VE._kernel_option(v) for v in ("none", "SORT", " scatter", "sort+scatter", "scatter+sort")],
       "map": {k: list(v) for k, v in VE._KOPTS.items()}}
for bad in ("sorts", "", "sort,scatter"):
  try:
    VE._kernel_option(bad)
    out["bad_" + bad] = "accepted"
  except ValueError as e:
    out["bad_" + bad] = str(e)
print(json.dumps(out))
"""


def test_kernel_option_parser():
  r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["ok"] == ["none", "sort", "scatter", "sort+scatter", "sort+scatter"]
  assert out["map"]["sort"] == [True, False] and out["map"]["scatter"] == [False, True]
  assert out["map"]["sort+scatter"] == [True, True] and out["map"]["none"] == [False, False]
  for bad in ("sorts", "", "sort,scatter"):
    assert "must be one of none, sort, scatter, sort+scatter" in out["bad_" + bad]


@pytest.mark.slow
def test_kernel_options_chosen_by_inner_cv(tmp_path):
  """A short run on the s14a collection (the one with topk_sort and segment_sum programs, profiled):
  each outer fold records the option set its inner cross-validation chose, for both models."""
  d = ROOT / "mlsys_jax" / "cost" / "data" / "h200"
  r = subprocess.run([sys.executable, "experiments/value_eval.py", "--part=program_mape",
                      f"--option_data={d / 'h200_collect_s14a.npz'},{d / 'h200_collect_s12c.npz'}",
                      "--kr_host_floor", "--kr_labels", "--kr_kernel_options_grid=none,sort+scatter",
                      "--kr_inner_folds=2", "--kr_steps=20", "--option_split=program", "--option_tag=_t",
                      f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "value_program_mape_t.json").read_text())
  assert res["kernel_options"]["grid"] == ["none", "sort+scatter"]
  p = res["program"]
  assert len(p["kernel_roofline_kernel_options_chosen"]) == 5
  assert set(p["kernel_roofline_kernel_options_chosen"]) <= {"none", "sort+scatter"}
  assert len(p["kernel_roofline_labels_kernel_options_chosen"]) == 5
  assert p["inner_grid"] == [["none", None], ["sort+scatter", None]]
  assert 0 < p["mape_kernel_roofline"] < 10 and 0 < p["mape_kernel_roofline_labels"] < 10
