"""Session 44 review of the issue-18 speed benchmarks (``benchmarks/sidco_tree.py``, ``benchmarks/sidco_model_step.py``):
measurement fixes, each checked on CPU with synthetic profiler events (the GPU paths take their events from
``common.device_stream_events``, replaced here).

1. Kernel time (``busy_s``) summed the durations of every GPU event, so kernels that run at the same time (the
   independent nodes of one command buffer, or several streams) were counted more than once: the stored training-step
   JSONs have ``busy_s > device_s`` (``idle_s`` about -0.3 ms per step) in every compressor row, and
   ``busy_overhead_s`` ("kernel time over Adam") differences of two such sums. Now the union of the intervals.
2. ``sidco_tree``'s read+write floor came from the wall time of dispatched 1 GiB copies (dispatch and the host's
   synchronisation included): now from the device span of that copy on a GPU.
3. ``sidco_tree``'s JSON did not record its command line.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import sidco_model_step as ms
from benchmarks import sidco_tree as st

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _call(t0, kernels):
  """One call's events ``(start, end, duration, name)`` from ``(offset, duration)`` pairs (ns) after ``t0``."""
  return [(t0 + a, t0 + a + d, d, f"k{i}") for i, (a, d) in enumerate(kernels)]


# one call: a 100-ns kernel, then two 50-ns kernels that run side by side (one command buffer), then a 30-ns one
# after 20 ns idle: span 200 ns, device busy 180 ns, durations summed 230 ns
CALL = [(0, 100), (100, 50), (100, 50), (170, 30)]


def test_model_step_profile_counts_overlapping_kernels_once():
  evs = _call(0, CALL) + _call(1000, CALL)   # two steps back to back (gap 800 ns < 5 ms: one cluster)
  p = ms._profile(evs, 2)
  assert p["device_s"] == pytest.approx(600e-9)          # first start to last end, per step
  assert p["busy_s"] == pytest.approx(180e-9)            # was the summed durations, 230 ns: more than the span
  assert p["kernel_sum_s"] == pytest.approx(230e-9)
  assert p["idle_s"] == pytest.approx(420e-9) and p["idle_s"] >= 0
  assert p["kernels"] == 4 and p["clusters"] == 1


def test_model_step_busy_overhead_is_not_inflated_by_concurrency():
  # Adam alone runs its kernels one after another; the compressor row runs the same kernels plus one of 40 ns that
  # overlaps another kernel completely: it adds no device time, but the summed durations added 40 ns
  adam = _call(0, [(0, 100), (100, 100)])
  comp = _call(0, [(0, 100), (100, 100), (120, 40)])
  rows = [{"row": "adam", "step_s": 1.0, "step_s_all": [1.0], **ms._profile(adam, 1)},
          {"row": "sidco", "step_s": 1.0, "step_s_all": [1.0], **ms._profile(comp, 1)}]
  ms._summarize(rows)
  assert rows[1]["busy_overhead_s"] == pytest.approx(0.0, abs=1e-15)
  assert rows[1]["kernel_sum_overhead_s"] == pytest.approx(40e-9)
  assert rows[1]["device_overhead_s"] == pytest.approx(0.0, abs=1e-15)
  assert all(r["idle_s"] >= 0 for r in rows)


def _fake_gpu_trace(monkeypatch, events):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(st.time, "sleep", lambda s: None)

  def fake(run, host=False):
    run()
    return sorted(events)
  monkeypatch.setattr(st, "device_stream_events", fake)


def test_tree_device_busy_counts_overlapping_kernels_once(monkeypatch):
  # three profiled calls 50 ms apart (the split is at 10 ms idle)
  _fake_gpu_trace(monkeypatch, [e for c in range(3) for e in _call(c * 50_000_000, CALL)])
  d = st._device(lambda: jnp.zeros(()), 3, 1)
  assert "device_error" not in d, d
  assert d["device_s"] == pytest.approx(200e-9)
  assert d["busy_s"] == pytest.approx(180e-9)            # was 230 ns
  assert d["kernel_sum_s"] == pytest.approx(230e-9)
  assert d["idle_s"] == pytest.approx(20e-9)             # (largest_gaps already took the union)
  assert d["busy_s"] + d["idle_s"] == pytest.approx(d["device_s"])


def test_tree_rw_floor_uses_the_device_time_of_the_copy(monkeypatch):
  n = 1000
  # CPU: the wall-clock bandwidth, as before
  f = st._rw_floor(n, 2e12, nbytes=1 << 16)
  assert f["rw_floor_measure"] == "wall" and f["rw_floor_s"] == pytest.approx(8 * n / 2e12)
  # GPU: a 1 GiB copy's device span (here a fake 0.7 ms), not the dispatched copy's wall time
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(st, "_device", lambda fn, calls, per_call, **kw: {"device_s": 0.7e-3})
  f = st._rw_floor(n, 2e12, nbytes=1 << 16)
  bw = 8 * (1 << 14) / 0.7e-3
  assert f["rw_floor_measure"] == "device"
  assert f["copy_bandwidth"] == pytest.approx(bw) and f["rw_floor_s"] == pytest.approx(8 * n / bw)
  assert f["rw_floor_wall_s"] == pytest.approx(8 * n / 2e12)
  # no device time (a profiler failure): the wall figure, and the error kept
  monkeypatch.setattr(st, "_device", lambda fn, calls, per_call, **kw: {"device_error": "boom"})
  f = st._rw_floor(n, 2e12, nbytes=1 << 16)
  assert f["rw_floor_measure"] == "wall" and f["copy_device_error"] == "boom"


def test_tree_json_records_the_command(tmp_path):
  args = ["--small", "--no_wall", "--only", "flat copy", "--steps", "2", "--repeats", "3", "--out", str(tmp_path),
          "--name", "argv_check"]
  subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sidco_tree.py"), *args], cwd=ROOT, check=True,
                 capture_output=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
  d = json.loads((tmp_path / "argv_check.json").read_text())
  assert d["argv"] == args
  assert {"device", "jax"} <= set(d["env"])
  assert d["rw_floor_measure"] == "wall" and d["rw_floor_s"] == pytest.approx(8 * d["n_params"] / d["copy_bandwidth"])
