"""experiments/value_eval.py --kr_labels: the profiler columns of a cost dataset joined to its rows
(``_kernel_labels``: per-kernel labels by :func:`mlsys_jax.cost.kernel_roofline.match_kernel_times`, the
measured device busy/span times, the label statistics), on a tiny dataset written here.

The script is imported in a subprocess: its absl flags (``out_dir``, ...) would collide with those of
other experiment scripts that tests import in-process."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlsys_jax.cost import dataset as cds
from mlsys_jax.cost import kernel_roofline as KR

ROOT = pathlib.Path(__file__).resolve().parents[1]

_HLO = """HloModule m{i}
%fused_add (p0: f32[64,64], p1: f32[64,64]) -> f32[64,64] {{
  %p0 = f32[64,64]{{1,0}} parameter(0)
  %p1 = f32[64,64]{{1,0}} parameter(1)
  ROOT %a = f32[64,64]{{1,0}} add(%p0, %p1)
}}
ENTRY %e (x: f32[64,64], w: f32[64,64]) -> f32[64,64] {{
  %x = f32[64,64]{{1,0}} parameter(0)
  %w = f32[64,64]{{1,0}} parameter(1)
  %loop_add_fusion.{i} = f32[64,64]{{1,0}} fusion(%x, %w), kind=kLoop, calls=%fused_add
  %cublas-lt-matmul.1 = (f32[64,64]{{1,0}}, s8[1024]{{0}}) custom-call(%loop_add_fusion.{i}, %w), custom_call_target="__cublas$lt$matmul"
  ROOT %g = f32[64,64]{{1,0}} get-tuple-element(%cublas-lt-matmul.1), index=0
}}
"""

_PROFILED = {"loop_add_fusion_0": 2e-6, "sm90_xmma_gemm_f32f32": 5e-6, "Memset (Device)": 1e-6}

_RUN = """
import json, sys
sys.path.insert(0, {exp!r})
import numpy as np
import value_eval as ve
from mlsys_jax.cost import dataset as cds, kernel_roofline as KR
paths = {paths!r}
ds = cds.load_dataset(paths[0])
kts = [KR.program_kernels(t) for t in ds.hlo]
try:
  ve._kernel_labels(ds, kts, paths[1:])
except ValueError as e:
  print("ERROR", e)
labels, busy, span, st = ve._kernel_labels(ds, kts, paths)
lab = [None if l is None else [l.rows.tolist(), l.group.tolist(), l.time_s.tolist()] for l in labels]
print("RESULT", json.dumps({{"labels": lab, "busy": busy.tolist(), "span": span.tolist(), "stats": st}}))
"""


def _rows(with_profile: bool):
  rows = []
  for i in range(3):
    r = {"hlo": _HLO.format(i=i), "group": i, "family": "f", "variant": "default", "runtime_s": 1e-4 * (i + 1),
         "runtime_iqr_s": 1e-6, "runtime_min_s": 1e-4 * (i + 1), "n_inner": 10, "n_rounds": 3, "noisy": False,
         "flops": 1e6, "bytes_accessed": 1e5, "transcendentals": 0.0, "compile_s": 0.1}
    if with_profile and i == 0:      # profiled
      r.update(device_span_s=12e-6, device_busy_s=8e-6, device_kernels=3.0, kernel_times=_PROFILED)
    elif with_profile and i == 1:    # the profiler missed this call: NaN / {}
      r.update(device_span_s=float("nan"), device_busy_s=float("nan"), device_kernels=float("nan"), kernel_times={})
    rows.append(r)                   # row 2: no profiler fields (NaN / {} in the file too)
  return rows


def test_kernel_labels_join_profiled_rows_only(tmp_path):
  prof, plain = str(tmp_path / "prof.npz"), str(tmp_path / "plain.npz")
  cds.save_dataset(prof, _rows(True), {"device": "H200"})
  cds.save_dataset(plain, _rows(False), {"device": "H200"})
  code = _RUN.format(exp=str(ROOT / "experiments"), paths=[prof, plain])
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  # a file without profiler columns alone: refused, naming the flag to fix
  assert any(ln.startswith("ERROR") and "profile_calls" in ln for ln in lines), out.stdout
  res = json.loads(next(ln for ln in lines if ln.startswith("RESULT"))[len("RESULT "):])
  # row 0: the labels match_kernel_times gives on its own (name match + pooled library kernels)
  ref = KR.match_kernel_times(KR.program_kernels(_HLO.format(i=0)), _PROFILED)
  assert res["labels"][0] == [ref.rows.tolist(), ref.group.tolist(), ref.time_s.tolist()]
  assert res["labels"][0][2] == pytest.approx([2e-6, 6e-6])
  assert res["busy"][0] == 8e-6 and res["span"][0] == 12e-6
  # rows 1 (missed by the profiler) and 2 (not profiled): no label, NaN device times, not counted
  assert res["labels"][1:] == [None, None]
  assert all(math.isnan(v) for v in res["busy"][1:] + res["span"][1:])
  st = res["stats"]
  assert st["rows_with_profile"] == 1 and st["kernels"] == 2 and st["kernels_labelled"] == 2 and st["groups"] == 2
  np.testing.assert_allclose([st["matched_s"], st["pooled_s"], st["unassigned_s"]], [2e-6, 6e-6, 0.0], rtol=1e-12)
  assert st["frac_time_matched_by_name"] == pytest.approx(0.25)
  # the oracle on the one profiled, not noisy row: wall 100 us vs busy 8 us + c (grid up to 150 us)
  assert st["device_time_oracle"]["rows"] == 1
  assert st["device_time_oracle"]["wall_from_busy_plus_c"]["c_us"] == pytest.approx(92.0)
