"""Session 39's review of mlsys_jax.profile.attribution and .report: damaged trace files and corrupt trace
events crashed with bare EOFError/OverflowError (or a negative duration silently dropped device time), a
trace that cannot be aligned (no operation recorded) was used anyway, NaN/inf passed table_rows and
to_jsonable, a string for format_table's columns was split into letters, and an operation whose name ends
in '(none)' was treated as time outside every operation. Each test fails on the code before the fix."""

import gzip
import json
import pathlib
import time

import numpy as np
import pytest

from mlsys_jax import profile
from mlsys_jax.profile import attribution as A
from mlsys_jax.profile import report as R
from mlsys_jax.profile.attribution import Attribution
from mlsys_jax.profile.scopes import Record

_OPS = [Record("operation", "step", 1000, 6000, "p")]


def _trace(ts=11.0, dur=2.0):
  return {"traceEvents": [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
                          {"ph": "X", "name": "rlscope/step", "pid": 1, "tid": 1, "ts": 10.0, "dur": 5.0},
                          {"ph": "X", "name": "kernel", "pid": 2, "tid": 7, "ts": ts, "dur": dur}]}


def test_load_trace_damaged_files_raise_a_clear_value_error(tmp_path):
  raw = gzip.compress(json.dumps({"traceEvents": []}).encode())
  truncated = tmp_path / "cut.json.gz"   # a run killed while writing: EOFError before
  truncated.write_bytes(raw[:-10])
  misnamed = tmp_path / "gz.json"        # gzip bytes under a .json name: UnicodeDecodeError before
  misnamed.write_bytes(raw)
  corrupt = tmp_path / "bad.json.gz"     # damaged deflate stream: zlib.error before
  corrupt.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:-8]) + raw[-8:])
  for p in (truncated, misnamed, corrupt):
    with pytest.raises(ValueError, match="is not a JSON trace"):
      A.load_trace(str(p))
  with pytest.raises(TypeError, match="path must be the path"):
    A.load_trace(None)
  good = tmp_path / "t.json.gz"
  good.write_bytes(raw)
  assert A.load_trace(pathlib.Path(good)) == {"traceEvents": []} == A.load_trace(str(good))


@pytest.mark.parametrize("ts,dur", [(float("nan"), 2.0), (11.0, float("inf")), (11.0, -2.0), ("x", 1.0),
                                    (11.0, None)])
def test_parse_trace_refuses_corrupt_events(ts, dur):
  kinds = []
  with pytest.raises(ValueError, match=r"trace event 'kernel' \(pid 2, tid 7\) has ts=.*the trace is corrupt"):
    A.parse_trace(_trace(ts, dur), _OPS, kinds)
  assert kinds == []
  assert A.parse_trace(_trace(), _OPS) == ([(2000, 4000)], [1000, 2000])  # valid events: unchanged


def test_attribute_does_not_use_a_trace_it_cannot_align():
  """Without an operation there is no annotation to align the trace's clock: the old code used offset 0
  and reported has_device=True with no device time (or time at random places)."""
  with profile.Profiler("scopes") as p:
    time.sleep(0.001)
  a = A.attribute(p, _trace())
  assert not a.has_device and "no operation was recorded" in a.note
  row = a.table[("default", "(none)")]
  assert row["device"] == 0 and row["cpu_only"] == row["total"] == p.wall_ns
  assert a.counts[("default", "(none)")]["trace"] == 0
  with pytest.raises(TypeError, match="trace must be a chrome-trace dict"):  # still validated
    A.attribute(p, {"events": []})


def test_attribute_refuses_what_is_not_a_profiler():
  with profile.Profiler("scopes") as p:
    pass
  for bad in (p.records, None, {"start_ns": 0}):
    with pytest.raises(TypeError, match="prof must be a finished profile.Profiler"):
      A.attribute(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), np.float32(-np.inf), "1", None])
def test_table_rows_refuses_non_finite_or_non_numeric_values(bad):
  a = Attribution({("p", "a"): {"total": bad}, ("p", "b"): {"total": 1e9}}, {}, 1, False, "")
  with pytest.raises(ValueError, match=r"a.table\[\('p', 'a'\)\] holds \{'total': .*finite real number"):
    R.table_rows(a)


def test_format_table_refuses_a_string_for_columns():
  rows = [{"operation": "a", "total": 1.0}]
  with pytest.raises(TypeError, match=r"columns must be a tuple .* write \('total',\)"):
    R.format_table(rows, "total")
  assert R.format_table(rows, ["total"]) == R.format_table(rows, ("total",))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), np.float64(-np.inf)])
def test_to_jsonable_refuses_nan_and_inf(bad):
  with pytest.raises(ValueError, match=r"rows\[0\]\['total'\] = .* is not a real number"):
    R.to_jsonable([{"operation": "a", "total": bad}])


def test_an_operation_named_like_none_is_an_operation(tmp_path):
  a = Attribution({("p", "warmup(none)"): {"total": 1e9, "python": 1e9},
                   ("p", "b"): {"total": 0.5e9, "python": 0.5e9},
                   ("p", "(none)"): {"total": 2e9, "python": 2e9}}, {}, 1, False, "")
  assert [r["operation"] for r in R.table_rows(a)] == ["warmup(none)", "b", "(none)"]
  assert [r["operation"] for r in R.table_rows(a, by_phase=True)] == ["p/warmup(none)", "p/b", "p/(none)"]
  pytest.importorskip("matplotlib")
  rows = [r for r in R.table_rows(a) if r["operation"] != "b"]
  R.plot_stacked({"w": rows}, str(tmp_path / "ops.png"))  # 'no operation to draw' before
  assert (tmp_path / "ops.png").stat().st_size > 0
