"""experiments/value_eval.py --part=program_mape helpers of session 15: the inner cross-validation that
chooses a kernel-roofline setting on the training rows only (grouped like the outer split), Kendall's tau
of the predictions, and the bytes-ridge flag parser.

The script is imported in a subprocess: its absl flags would collide with those of other experiment
scripts that tests import in-process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "experiments")
import numpy as np
import value_eval as VE

out = {}
rng = np.random.default_rng(0)
keys = np.repeat(np.arange(12), 3)          # 12 groups (families) of 3 rows
runtime = 10 ** rng.uniform(-5, -3, keys.size)
rows = np.flatnonzero(keys < 10)            # the outer fold's training rows (groups 0-9)
seen = []

def fit(idx, cfg):                          # a "model" that predicts runtime * cfg (cfg = a scale)
  seen.append(sorted(set(keys[idx].tolist())))
  return cfg

def predict(model, idx):
  seen.append(("val", sorted(set(keys[idx].tolist()))))
  return runtime[idx] * model

j, scores = VE._choose_by_inner_cv(fit, predict, rows, runtime, keys, [1.5, 0.9, 1.2], 4, 0)
out["choice"], out["scores"] = j, scores
tr = [s for s in seen if not (isinstance(s, tuple) and s[0] == "val")]
va = [s[1] for s in seen if isinstance(s, tuple) and s[0] == "val"]
out["disjoint"] = all(not (set(a) & set(b)) for a, b in zip(tr, va))
out["only_training_groups"] = all(max(s) <= 9 for s in tr + va)
out["covers"] = sorted({g for s in va for g in s})

pred = {"exact": runtime.copy(), "reversed": 1.0 / runtime}
keep = np.ones(keys.size, bool)
out["tau"] = VE._kendall(pred, runtime, keep, keys)
out["br"] = [VE._bytes_ridge("none"), VE._bytes_ridge("0.03")]
for bad in ("-1", "x"):
  try:
    VE._bytes_ridge(bad)
    out["br_bad_" + bad] = "accepted"
  except ValueError as e:
    out["br_bad_" + bad] = str(e)
ok = dict(host_floor=True, host_launch=True, labels=True, labels_host_launch=True, gap_library_only=True,
          wall_scale=True)
VE._check_kr_flags(**ok)
for off, on in (("host_floor", "host_launch"), ("labels", "wall_scale")):
  try:
    VE._check_kr_flags(**{**ok, off: False, "labels_host_launch": False})
    out["flags_" + off] = "accepted"
  except ValueError as e:
    out["flags_" + off] = str(e)
print(json.dumps(out))
"""


def test_inner_cv_kendall_and_flag_parser():
  r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # MAPE of a constant scale s is |s - 1|: 0.1 for 0.9, the lowest
  assert out["choice"] == 1
  assert [round(s, 12) for s in out["scores"]] == [0.5, 0.1, 0.2]
  assert out["disjoint"] and out["only_training_groups"] and out["covers"] == list(range(10))
  tau = out["tau"]
  assert tau["exact"]["all_rows"] == 1.0 and tau["exact"]["within_program_mean"] == 1.0
  assert tau["reversed"]["all_rows"] == -1.0 and tau["reversed"]["within_program_mean"] == -1.0
  assert tau["exact"]["programs"] == 12
  assert out["br"] == [None, 0.03]
  assert "'none' or a number >= 0" in out["br_bad_-1"] and "'none' or a number >= 0" in out["br_bad_x"]
  # flag combinations that would fail after minutes of feature extraction are refused at once
  assert "add --kr_host_floor" in out["flags_host_floor"]
  assert "add --kr_labels" in out["flags_labels"]
