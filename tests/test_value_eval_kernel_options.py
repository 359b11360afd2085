"""experiments/value_eval.py --part=program_mape, sessions 16-17: the --kr_kernel_options_grid parser, and
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
out = {"ok": [VE._kernel_option(v) for v in ("none", "SORT", " scatter", "sort+scatter", "scatter+sort",
                                             "huber+conv+scatter+sort+shared", "overlap+l2")],
       "tables": {k: VE._kopt_tables(k) for k in ("none", "sort+scatter+conv+shared+huber", "l2", "conv+overlap")},
       "kwargs": {k: VE._kopt_table_kwargs(k) for k in ("none", "sort", "scatter", "sort+scatter", "conv")}}
from mlsys_jax.cost import kernel_roofline as KR
c = VE._kopt_config("sort+huber+l2", KR.KernelRooflineConfig())
c0 = VE._kopt_config("none", KR.KernelRooflineConfig())
out["config"] = [c.objective, c.l2_bytes, c.overhead_overlap, c0.objective, c0.l2_bytes, c0.overhead_overlap,
                 VE._kopt_config("overlap", KR.KernelRooflineConfig()).overhead_overlap]
for bad in ("sorts", "", "sort,scatter", "sort+sort", "none+sort"):
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
  assert out["ok"] == ["none", "sort", "scatter", "sort+scatter", "sort+scatter", "sort+scatter+conv+shared+huber",
                       "l2+overlap"]
  assert out["tables"] == {"none": "none", "sort+scatter+conv+shared+huber": "sort+scatter+conv", "l2": "none",
                           "conv+overlap": "conv"}
  f, t = False, True
  assert out["kwargs"]["none"] == {"sort_model": f, "scatter_contention": f, "conv_model": f}
  assert out["kwargs"]["sort"] == {"sort_model": t, "scatter_contention": f, "conv_model": f}
  assert out["kwargs"]["scatter"] == {"sort_model": f, "scatter_contention": t, "conv_model": f}
  assert out["kwargs"]["sort+scatter"] == {"sort_model": t, "scatter_contention": t, "conv_model": f}
  assert out["kwargs"]["conv"] == {"sort_model": f, "scatter_contention": f, "conv_model": t}
  assert out["config"] == ["huber_log", 50e6, False, "log", None, False, True]
  for bad in ("sorts", "", "sort,scatter", "sort+sort", "none+sort"):
    assert "kernel option set must be 'none' or '+'-joined distinct tokens" in out["bad_" + bad]


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["sort+scatter", "sort+scatter+conv+shared+huber"])
def test_kernel_options_chosen_by_inner_cv(tmp_path, opt):
  """A short run on the s14a collection (the one with topk_sort and segment_sum programs, profiled):
  each outer fold records the option set its inner cross-validation chose, for both models (session 17:
  also with the conv, shared-kernel-label and Huber tokens)."""
  d = ROOT / "mlsys_jax" / "cost" / "data" / "h200"
  r = subprocess.run([sys.executable, "experiments/value_eval.py", "--part=program_mape",
                      f"--option_data={d / 'h200_collect_s14a.npz'},{d / 'h200_collect_s12c.npz'}",
                      "--kr_host_floor", "--kr_labels", f"--kr_kernel_options_grid=none,{opt}",
                      "--kr_inner_folds=2", "--kr_steps=20", "--option_split=program", "--option_tag=_t",
                      f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "value_program_mape_t.json").read_text())
  assert res["kernel_options"]["grid"] == ["none", opt]
  p = res["program"]
  assert len(p["kernel_roofline_kernel_options_chosen"]) == 5
  assert set(p["kernel_roofline_kernel_options_chosen"]) <= {"none", opt}
  assert len(p["kernel_roofline_labels_kernel_options_chosen"]) == 5
  assert p["inner_grid"] == [["none", None], [opt, None]]
  assert 0 < p["mape_kernel_roofline"] < 10 and 0 < p["mape_kernel_roofline_labels"] < 10
