"""Tests of mlsys_jax.profile (RL-Scope, Gleeson et al., MLSys 2021): scopes, attribution, overhead."""

from __future__ import annotations

import gzip
import json
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import profile
from mlsys_jax.profile import scopes as S


def _spin(ms):
  profile.spin_ns(int(ms * 1e6))


def test_categories_sum_to_wall_and_match_known_intervals():
  ref = {}
  with profile.Profiler("intercept") as p:
    with profile.operation("outer"):
      _spin(3)                                   # python in outer
      with profile.operation("inner"):
        t0 = time.perf_counter_ns()
        with profile.simulator():
          time.sleep(0.008)
        ref["sim"] = time.perf_counter_ns() - t0
        t0 = time.perf_counter_ns()
        _spin(4)                                 # python in inner
        ref["py_inner"] = time.perf_counter_ns() - t0
  a = profile.attribute(p)
  assert not a.has_device and "CPU categories only" in a.note
  tot = sum(r["total"] for r in a.table.values())
  assert tot == p.wall_ns                        # every instant attributed exactly once
  for row in a.table.values():
    assert sum(row[c] for c in profile.HOST_CATEGORIES) == row["total"]
    assert sum(row[c] for c in profile.RESOURCES) == row["total"]
  inner, outer = a.table[("default", "inner")], a.table[("default", "outer")]
  assert abs(inner["simulator"] - ref["sim"]) < 0.3e6
  assert abs(inner["python"] - ref["py_inner"]) < 0.5e6
  assert outer["simulator"] == 0 and outer["python"] >= 3e6
  # scope events land where their book-keeping ran: outer's in (none), inner's in outer, simulator's in inner
  assert [a.counts[("default", k)]["scope"] for k in ("(none)", "outer", "inner")] == [1, 1, 1]


def test_dispatch_compile_transfer_wait_and_phases():
  g = profile.jit(lambda x: jnp.tanh(x) * 3.0 + x.sum())   # fresh function: compiles on first call
  x = np.ones((64,), np.float32)
  with profile.Profiler("intercept") as p:
    profile.set_phase("first")
    with profile.operation("step"):
      y = profile.block_until_ready(g(profile.device_put(x)))
    profile.set_phase("second")
    with profile.operation("step"):
      y = profile.device_get(g(y))
  a = profile.attribute(p)
  first, second = a.table[("first", "step")], a.table[("second", "step")]
  assert first["compile"] > 0 and second["compile"] == 0
  assert first["compile"] <= first["dispatch"] + first["compile"] <= first["total"]
  assert second["dispatch"] > 0 and second["transfer"] > 0 and first["wait"] > 0
  assert a.counts[("first", "step")]["intercept"] == 3
  np.testing.assert_allclose(y, np.tanh(np.tanh(x) * 3 + 64) * 3 + (np.tanh(x) * 3 + 64).sum(), rtol=1e-5)
  s = profile.summarize(a)
  assert s["step"]["total"] == pytest.approx((first["total"] + second["total"]) / 1e9)


def test_decorator_noop_without_profiler_and_level_off():
  @profile.operation("deco")
  def f(v):
    return v + 1

  assert f(1) == 2                               # no current profiler: plain call
  with profile.Profiler("off") as p:
    assert f(2) == 3
  assert p.records == [] and p.counts["scope"] == 0
  with profile.Profiler("scopes") as p:
    f(3)
    f(4)
  assert [r.name for r in p.records] == ["deco", "deco"]
  assert profile.CURRENT.get() is None


def test_bad_scopes_raise():
  with profile.Profiler("scopes") as p:
    with profile.operation("a"):
      with pytest.raises(ValueError, match="already open"):
        with profile.operation("a"):
          pass
    p.push("x")
    p.push("y")
    with pytest.raises(ValueError, match="unbalanced"):
      p.pop("x")
    p.pop("y")
    p.pop("x")
  with pytest.raises(ValueError, match="still open"):
    with profile.Profiler("scopes") as q:
      q.push("left_open")
  with pytest.raises(ValueError, match="level"):
    profile.Profiler("verbose")
  with pytest.raises(TypeError):
    profile.operation("")
  with pytest.raises(ValueError, match="has not run"):
    profile.attribute(profile.Profiler())


def test_trace_bad_inputs(tmp_path):
  bad = tmp_path / "x.json"
  bad.write_text("{\"foo\": 1}")
  with pytest.raises(ValueError, match="traceEvents"):
    profile.load_trace(str(bad))
  nojson = tmp_path / "y.json.gz"
  nojson.write_bytes(gzip.compress(b"not json"))
  with pytest.raises(ValueError, match="not a JSON trace"):
    profile.load_trace(str(nojson))
  ops = [profile.Record("operation", "a", 0, 10, "default")]
  foreign = {"traceEvents": [{"ph": "X", "name": "kernel", "ts": 1.0, "dur": 2.0, "pid": 1, "tid": 1}]}
  with pytest.raises(ValueError, match="annotations"):
    profile.device_intervals(foreign, ops)


def test_device_intervals_alignment_and_union():
  # a synthetic GPU trace: annotation of op 'a' at ts=1000us; our record starts at 5_000 ns.
  tr = {"traceEvents": [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "tid": 7, "name": S._ANN_PREFIX + "a", "ts": 1000.0, "dur": 10.0},
      {"ph": "X", "pid": 2, "tid": 1, "name": "k1", "ts": 1002.0, "dur": 3.0},
      {"ph": "X", "pid": 2, "tid": 2, "name": "k2", "ts": 1004.0, "dur": 3.0},
      {"ph": "X", "pid": 2, "tid": 1, "name": "k3", "ts": 1009.0, "dur": 1.0}]}
  ops = [profile.Record("operation", "a", 5_000, 15_000, "default")]
  assert profile.device_intervals(tr, ops) == [(7_000, 12_000), (14_000, 15_000)]


def test_trace_level_device_columns_or_clear_degradation(monkeypatch, tmp_path):
  import tempfile
  f = profile.jit(lambda x: (x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with profile.Profiler("trace", trace_dir=str(tmp_path / "trace")) as p:
    with profile.operation("op"):
      for _ in range(3):
        profile.block_until_ready(f(x))
  a = profile.attribute(p)
  row = a.table[("default", "op")]
  assert a.has_device and p.trace_path is not None
  assert 0 <= row["device"] <= row["total"]
  assert row["device_only"] + row["overlap"] == row["device"]
  assert p.counts["trace"] >= 1
  # the trace events split by kind: one annotation per operation, kinds sum to the count
  assert sum(p.trace_kinds.values()) == p.counts["trace"] and p.trace_kinds["annotation"] == 1
  # no profiler backend: degrade to CPU categories, warn once
  def broken(*a, **k):
    raise RuntimeError("no profiler backend")
  monkeypatch.setattr(jax.profiler, "start_trace", broken)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  S._warned.clear()
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(2):
      with profile.Profiler("trace") as q:
        with profile.operation("op"):
          f(x)
  assert sum("CPU categories only" in str(m.message) for m in w) == 1
  assert q.trace_dir is None and not list((tmp_path / "tmp").iterdir())  # the unused directory it made: removed
  b = profile.attribute(q)
  assert not b.has_device and "no profiler backend" in b.note


def test_calibration_recovers_injected_overhead():
  inject_ns = 200_000

  def work():
    p = profile.CURRENT.get()
    for _ in range(40):
      if p is not None and p.level != "off":      # a known per-scope cost, where book-keeping runs:
        profile.spin_ns(inject_ns)                # in the enclosing operation, before the scope opens
      with profile.operation("step"):
        profile.spin_ns(250_000)

  cal = profile.calibrate(work, repeats=5, levels=("off", "scopes"), warmup=0)
  assert cal.counts["scopes"]["scope"] == 40
  assert cal.delta_ns["scope"] == pytest.approx(inject_ns, rel=0.15)
  # correction with the calibrated delta brings the instrumented total back to the uninstrumented one
  v = profile.validate(work, cal, level="scopes", repeats=3, warmup=0)
  assert v.cpu_overhead > 1.5                    # 40 x 200 us on top of 40 x 250 us
  assert abs(v.cpu_bias) < 0.1
  assert v.wall_corrected_s < v.wall_instrumented_s  # wall time is too noisy on a shared CPU for more


def test_insitu_calibration_recovers_injected_overhead_on_heldout_pairs():
  inject_ns = 200_000

  def work():
    p = profile.CURRENT.get()
    for _ in range(30):
      if p is not None and p.level != "off":      # a known per-scope cost where the book-keeping runs
        profile.spin_ns(inject_ns)
      with profile.operation("step"):
        profile.spin_ns(250_000)

  ins = profile.calibrate_insitu(work, fit=("scope",), level="scopes", repeats=4, folds=2, warmup=0)
  assert ins.fitted == ("scope",) and len(ins.runs["counts"]) == 4
  assert ins.runs["counts"][0]["scope"] == 30
  assert ins.cpu.delta_ns["scope"] == pytest.approx(inject_ns, rel=0.15)
  assert ins.wall.delta_ns["scope"] > 0.5 * inject_ns
  h = ins.heldout
  assert h["cpu_overhead"] > 1.5                   # 30 x 200 us on top of 30 x 250 us
  assert abs(h["cpu_bias"]) < 0.1                  # pairs corrected with deltas fitted on the other fold
  assert h["fixed_cpu_bias"] > 0.5                 # no fixed costs given: the fallback corrects nothing
  assert [f["pairs"] for f in h["folds"]] == [[0, 1], [2, 3]]
  # the min statistic on the same pairs
  hm = profile.crossvalidate(ins.runs, None, fit=("scope",), folds=2, stat="min")
  assert abs(hm["cpu_bias"]) < 0.1 and hm["stat"] == "min"


def test_spin_ns_costs_cpu_time_on_the_chosen_clock():
  # the default spins on the thread's CPU clock: the cost is exact in CPU time however busy the machine is
  t0 = time.thread_time_ns()
  profile.spin_ns(3_000_000)
  assert 3_000_000 <= time.thread_time_ns() - t0 < 6_000_000
  t0 = time.perf_counter_ns()
  profile.spin_ns(2_000_000, clock="wall")
  assert time.perf_counter_ns() - t0 >= 2_000_000
  with pytest.raises(ValueError, match="clock"):
    profile.spin_ns(10, clock="cpu")
  with pytest.raises(ValueError, match="ns"):
    profile.spin_ns(-1)


def _synthetic_runs(deltas, counts, off=0.01):
  on = [off + sum(c[s] * deltas.get(s, 0.0) for s in c) / 1e9 for c in counts]
  return {"cpu_off": [off] * len(counts), "cpu_inst": on, "wall_off": [off] * len(counts), "wall_inst": on,
          "counts": counts, "attribution": [None] * len(counts)}


def test_fit_deltas_and_crossvalidation_are_held_out():
  # several sources: least squares on counts that vary across pairs recovers each cost exactly
  cnt = [{"scope": 10 * i + 5, "intercept": 7 * (i % 3) + 1, "trace": 100 + 13 * i * i} for i in range(6)]
  true = {"scope": 800.0, "intercept": 500.0, "trace": 300.0}
  r = _synthetic_runs(true, cnt)
  d = profile.fit_deltas(np.subtract(r["cpu_inst"], r["cpu_off"]), cnt, {}, ("scope", "intercept", "trace"))
  assert d == pytest.approx(true, rel=1e-6)
  # one fitted source with the others known
  d1 = profile.fit_deltas(np.subtract(r["cpu_inst"], r["cpu_off"]), cnt, {"scope": 800.0, "intercept": 500.0},
                          ("trace",))
  assert d1["trace"] == pytest.approx(300.0, rel=1e-6)
  # held-out: the second block costs twice as much per event; each block is corrected with the OTHER's fit
  c = [{"scope": 0, "intercept": 0, "trace": 1000}] * 4
  r2 = _synthetic_runs({"trace": 100.0}, c[:2])
  r3 = _synthetic_runs({"trace": 200.0}, c[2:])
  runs = {k: r2[k] + r3[k] for k in r2}
  h = profile.crossvalidate(runs, {}, fit=("trace",), folds=2)
  assert h["folds"][0]["cpu_delta_ns"]["trace"] == pytest.approx(200.0)   # fitted on block 2
  assert h["cpu_ratios"][0] == pytest.approx((0.01 + 100e-6 - 200e-6) / 0.01)
  assert h["cpu_ratios"][3] == pytest.approx((0.01 + 200e-6 - 100e-6) / 0.01)
  with pytest.raises(ValueError, match="folds"):
    profile.crossvalidate(runs, {}, folds=5)
  with pytest.raises(ValueError, match="no events"):
    profile.fit_deltas([1e-3], [{"scope": 0, "intercept": 0, "trace": 0}], {}, ("trace",))
  with pytest.raises(ValueError, match="source"):
    profile.fit_deltas([1e-3], [{"trace": 1}], {}, ("cupti",))


def test_correct_subtracts_where_events_ran():
  table = {("default", "a"): dict(python=1000, simulator=500, dispatch=0, compile=0, transfer=0, wait=0,
                                  cpu_only=1500, overlap=0, device_only=0, idle_wait=0, total=1500,
                                  device=0),
           ("default", "b"): dict(python=100, simulator=0, dispatch=900, compile=0, transfer=0, wait=0,
                                  cpu_only=1000, overlap=0, device_only=0, idle_wait=0, total=1000,
                                  device=0)}
  counts = {("default", "a"): {"scope": 4, "intercept": 0, "trace": 0},
            ("default", "b"): {"scope": 1, "intercept": 2, "trace": 0}}
  a = profile.Attribution(table, counts, 2500, False, "")
  c = profile.correct(a, {"scope": 100.0, "intercept": 200.0})
  assert c.table[("default", "a")]["python"] == 600 and c.table[("default", "a")]["total"] == 1100
  assert c.table[("default", "b")]["python"] == 0 and c.table[("default", "b")]["dispatch"] == 500
  assert c.total_ns == 2500 - 400 - 500 and c.removed_ns == 900 and c.unabsorbed_ns == 0
  with pytest.raises(ValueError, match="source"):
    profile.correct(a, {"cupti": 1.0})


def test_numpy_and_jax_simulators_agree():
  assert profile.numpy_jax_agree("cartpole", steps=40) < 1e-4
  assert profile.numpy_jax_agree("pendulum", steps=40) < 1e-3
  e = profile.CartPoleNP(0)
  lens = []
  for _ in range(3):  # random actions end CartPole episodes well before the 200-step limit
    e.reset()
    n, done = 0, False
    while not done:
      _, _, done = e.step(int(e.rng.integers(2)))
      n += 1
    lens.append(n)
  assert all(5 <= n < 200 for n in lens)


def test_workload_rollout_without_update_is_annotated():
  w = profile.make_workload("a2c", "pendulum", "numpy", steps=20)  # < one 32-step rollout: no update
  with profile.Profiler("intercept") as p:
    w()
  a = profile.attribute(p)
  assert {op for _, op in a.table} == {"inference", "simulation", "(none)"}
  assert a.table[("default", "inference")]["compile"] > 0            # first call of the policy
  assert a.table[("default", "simulation")]["simulator"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("algo,backend", [("a2c", "numpy"), ("dqn", "jax")])
def test_workloads_are_annotated(algo, backend):
  w = profile.make_workload(algo, "cartpole", backend, steps=70)
  w()
  with profile.Profiler("intercept") as p:
    w()
  a = profile.attribute(p)
  ops = {op for _, op in a.table}
  assert {"inference", "simulation", "backpropagation"} <= ops
  sim = sum(r["simulator"] for (_, op), r in a.table.items() if op == "simulation")
  assert sim > 0 and sum(r["total"] for r in a.table.values()) == p.wall_ns
  with pytest.raises(ValueError, match="algo"):
    profile.make_workload("ppo")


def test_measurement_loops_freeze_the_heap_only_while_they_run(monkeypatch):
  """run_levels / run_pairs collect once and freeze the surviving heap so that the per-run gc.collect() is cheap in
  a large process; the heap must be unfrozen afterwards, also when the workload raises. (gc.collect is counted,
  not run: a full collection of the test session's heap costs ~1.5 s and is not what is tested.)"""
  import gc

  collects = []
  monkeypatch.setattr(gc, "collect", lambda *a: collects.append(gc.get_freeze_count()) or 0)
  seen = []

  def work():
    seen.append(gc.get_freeze_count())
    with profile.operation("step"):
      sum(range(100))

  from mlsys_jax.profile import overhead
  assert gc.get_freeze_count() == 0
  overhead.run_levels(work, ("off", "scopes"), repeats=2, warmup=0)
  overhead.run_pairs(work, level="scopes", repeats=2, warmup=0)
  assert gc.get_freeze_count() == 0
  assert len(seen) == 8 and min(seen) > 0          # frozen while measured
  # per loop: one full collection before freezing (nothing frozen yet), then one before each of its 4 runs
  assert len(collects) == 10 and collects[0] == collects[5] == 0 and min(collects[1:5] + collects[6:]) > 0

  def bad():
    raise RuntimeError("workload failed")
  with pytest.raises(RuntimeError, match="workload failed"):
    overhead.run_pairs(bad, level="scopes", repeats=1, warmup=0)
  assert gc.get_freeze_count() == 0


def test_measurement_loops_remove_their_traces(monkeypatch, tmp_path):
  """run_levels / run_pairs read each traced run's counts and attribution inside the loop and leave no trace
  directory behind (one per traced run before: 6 MB on average, up to 29 MB, 536 MB under the dev host's /tmp)."""
  import tempfile
  from mlsys_jax.profile import overhead
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  f = profile.jit(lambda x: (x * 2.0).sum())
  x = jnp.arange(64.0)

  def work():
    with profile.operation("step"):
      profile.block_until_ready(f(x))

  runs = overhead.run_pairs(work, level="trace", repeats=2, warmup=1)
  assert all(c["trace"] >= 1 for c in runs["counts"]) and all(a.has_device for a in runs["attribution"])
  _, counts, profs = overhead.run_levels(work, ("off", "trace"), repeats=1, warmup=0)
  assert counts["trace"]["trace"] >= 1 and profs["trace"].trace_path is None
  assert list(tmp_path.iterdir()) == []
