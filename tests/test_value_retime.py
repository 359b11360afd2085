"""experiments/value_retime.py (session 29): matching two timings of the same programs and the label-noise figures,
checked on a real collection against itself and against scaled / perturbed copies of it (the expected values follow
from the definitions), plus its errors on bad input and its command line's. Run in a subprocess: the script defines absl flags."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SNIPPET = r"""
import sys, numpy as np
sys.path.insert(0, "experiments")
import value_retime as VR
from mlsys_jax.cost import dataset as ds
d = ds.load_dataset("mlsys_jax/cost/data/h100/h100_collect_s26a.npz")
kept = int((~np.asarray(d.noisy)).sum())
# against itself: every kept row matches, no error, ratio 1
r = VR.compare(d, d, n_boot=50)
assert r["all"]["rows"] == kept and r["median_ratio"] == 1.0, r["all"]
assert r["all"]["mape_old_as_prediction"] == 0.0 and r["all"]["mape_after_scale"] == 0.0
assert r["programs_matched"] == r["programs_original"] == len(set(np.asarray(d.group).tolist()))
assert sum(v["rows"] for v in r["by_runtime"].values()) == kept
assert sum(v["rows"] for v in r["by_family"].values()) == kept
assert sum(v["rows"] for v in r["library_call_rows"].values() if v) == kept
# a host 10% slower on every program: old predicts new with |1 - 1.1| / 1.1 error; the median scale removes it
slow = d._replace(runtime_s=np.asarray(d.runtime_s, np.float64) * 1.1)
r = VR.compare(d, slow, n_boot=50)
assert abs(r["median_ratio"] - 1.1) < 1e-9
assert abs(r["all"]["mape_old_as_prediction"] - 0.1 / 1.1) < 1e-9 and r["all"]["mape_after_scale"] < 1e-9
lo, hi = r["all"]["mape_old_as_prediction_ci95"]
assert lo <= r["all"]["mape_old_as_prediction"] <= hi
# noise of known size on each row: the mean APE against a float64 reference
rng = np.random.default_rng(0)
f = np.exp(rng.normal(0, 0.2, len(d)))
noisy = d._replace(runtime_s=np.asarray(d.runtime_s, np.float64) * f)
r = VR.compare(d, noisy, n_boot=0)
m = ~np.asarray(d.noisy)
assert abs(r["all"]["mape_old_as_prediction"] - np.mean(np.abs(1 - f[m]) / f[m])) < 1e-12
assert abs(r["median_ratio"] - np.median(f[m])) < 1e-12
# rows flagged noisy in either file are left out
half = d._replace(noisy=np.asarray(d.noisy) | (np.arange(len(d)) % 2 == 0))
assert VR.compare(d, half, n_boot=0)["all"]["rows"] == int((m & (np.arange(len(d)) % 2 == 1)).sum())
# bad input: another device kind, nothing in common
other = d._replace(meta={**d.meta, "device": "NVIDIA H200"})
for bad, words in ((other, "different devices"), (d._replace(family=np.array(["x"] * len(d))), "no row kept")):
  try:
    VR.compare(d, bad)
  except ValueError as e:
    assert words in str(e), e
  else:
    raise AssertionError(words)
# the command line names its three required flags
from absl import app, flags
flags.FLAGS(["value_retime.py"])
try:
  VR.main([])
except app.UsageError as e:
  assert "--original, --retime and --out are required" in str(e), e
else:
  raise AssertionError("no UsageError")
print("ok")
"""


def test_value_retime_compare():
  out = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]

