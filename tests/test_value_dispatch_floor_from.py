"""value_eval --kr_dispatch_floor_from (session 25): the dispatch-floor covariate read from the floor cost_collect
probed before any program ('start', every file), before each program's timing ('timing') or at the end ('end');
a file without the chosen floor falls back to its start floor, and the JSON names which one each file used."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SNIPPET = r"""
import sys, types, numpy as np
sys.argv = ["value_eval.py"]
sys.path.insert(0, "experiments")
import value_eval as VE
from absl import flags
flags.FLAGS(["value_eval.py"])
assert VE._KR_DFLOOR_FROM.value == "start"
from mlsys_jax.cost import dataset as cds
floors = {"a.npz": {"dispatch_floor_s": 48e-6}, "b.npz": {"dispatch_floor_s": 28e-6}}
cds.load_dataset = lambda p: types.SimpleNamespace(meta=floors[p])
ds = types.SimpleNamespace(group=np.array([0, 0, 1, 2, 2]))
desc = {"merged": True, "sources": [{"programs_kept": 2}, {"programs_kept": 1}]}
z = VE._dispatch_floor_covariate(ds, desc, ["a.npz", "b.npz"])
assert desc["dispatch_floor_source"] == {"a.npz": "start", "b.npz": "start"}
# --kr_dispatch_floor_from: the in-timing / end floors where a file records them, else its start floor (named)
m = {"dispatch_floor_s": 48e-6, "dispatch_floor_timing_s": {"n": 5, "median": 31e-6}, "dispatch_floor_end_s": 30e-6}
assert VE._file_floor(m, "timing") == (31e-6, "timing") and VE._file_floor(m, "end") == (30e-6, "end")
assert VE._file_floor(m, "start") == (48e-6, "start")
old = {"dispatch_floor_s": 48e-6}
assert VE._file_floor(old, "timing") == (48e-6, "start") == VE._file_floor(old, "end")
assert VE._file_floor({"dispatch_floor_s": 48e-6, "dispatch_floor_timing_s": {"n": 0}}, "timing")[1] == "start"
try:
  VE._file_floor(m, "middle")
  raise AssertionError("accepted")
except ValueError as e:
  assert "start, timing or end" in str(e)
flags.FLAGS.unparse_flags()
flags.FLAGS(["value_eval.py", "--kr_dispatch_floor_from=timing"])
floors2 = {"a.npz": {"dispatch_floor_s": 48e-6, "dispatch_floor_timing_s": {"n": 3, "median": 32e-6}},
           "b.npz": {"dispatch_floor_s": 28e-6}}
cds.load_dataset = lambda p: types.SimpleNamespace(meta=floors2[p])
desc = {"merged": True, "sources": [{"programs_kept": 2}, {"programs_kept": 1}]}
z = VE._dispatch_floor_covariate(ds, desc, ["a.npz", "b.npz"])
np.testing.assert_allclose(z, np.log(np.array([32, 32, 32, 28, 28]) / 40.0))
assert desc["dispatch_floor_source"] == {"a.npz": "timing", "b.npz": "start"}
print("ok")
"""


def test_dispatch_floor_from():
  r = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_host_scale_recorded_without_labels(tmp_path):
  """--kr_dispatch_floor_scale without --kr_labels records the plain model's (gamma_h, gamma_o) per fold, and the
  JSON says at which floor the fitted host terms are (z = 0)."""
  import json
  d = ROOT / "mlsys_jax" / "cost" / "data" / "h200"
  cmd = [sys.executable, "experiments/value_eval.py", "--part=program_mape", "--kr_host_floor", "--kr_dispatch_floor_scale",
         f"--option_data={d / 'h200_collect_s19a.npz'},{d / 'h200_collect_s14b.npz'}",
         f"--option_test_data={d / 'h200_collect_s12c.npz'}", "--option_tag=_t", f"--out_dir={tmp_path}"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  t = json.loads((tmp_path / "value_program_mape_t.json").read_text())["test_data"]
  (fold,) = t["kernel_roofline_host_scale_fitted"]
  assert set(fold) == {"kernel_roofline"} and len(fold["kernel_roofline"]) == 2
  assert "z = 0" in t["kernel_roofline_host_terms_at"]
