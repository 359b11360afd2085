"""Timing order of the cost collection (experiments/cost_collect.py, issue 24: fixed-order bias)."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax.cost.dataset import timing_orders


@pytest.mark.parametrize("n,rounds", [(1, 4), (2, 10), (3, 9), (5, 12), (4, 0)])
def test_rows_are_permutations(n, rounds):
  o = timing_orders(n, rounds, np.random.default_rng(1))
  assert o.shape == (rounds, n)
  for row in o:
    assert sorted(row.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_each_variant_at_each_position_equally_often(n):
  o = timing_orders(n, 4 * n, np.random.default_rng(n))
  for pos in range(n):
    np.testing.assert_array_equal(np.bincount(o[:, pos], minlength=n), np.full(n, 4))


def test_first_variant_is_not_always_first_and_predecessors_vary():
  # The bias seen in the H100 data: variant 1 always timed right after variant 0. Over many blocks both
  # orders of the pair occur, each about half the time.
  o = timing_orders(2, 400, np.random.default_rng(0))
  first0 = np.mean(o[:, 0] == 0)
  assert first0 == 0.5  # exact: complete blocks
  o5 = timing_orders(5, 500, np.random.default_rng(0))
  after0 = [int(r[(list(r).index(0) + 1) % 5]) for r in o5 if list(r).index(0) < 4]
  counts = np.bincount(after0, minlength=5)
  assert counts[0] == 0 and (counts[1:] > 0.15 * len(after0)).all()


def test_deterministic_per_seed_and_differs_across_seeds():
  a = timing_orders(4, 8, np.random.default_rng(7))
  b = timing_orders(4, 8, np.random.default_rng(7))
  c = timing_orders(4, 8, np.random.default_rng(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("n,rounds", [(0, 3), (-1, 3), (2, -1), (2.0, 3), (True, 3)])
def test_bad_input(n, rounds):
  with pytest.raises(ValueError, match="timing_orders"):
    timing_orders(n, rounds, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# Growing the dataset (issue 24 item 3): graph identity, merging collections of several devices, the
# extra program families.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mlsys_jax.cost import dataset as cds  # noqa: E402
from mlsys_jax.cost import hlo as hlo_lib  # noqa: E402
from mlsys_jax.cost import programs  # noqa: E402

_MOD = """HloModule jit_f, entry_computation_layout={(f32[4,8]{1,0})->f32[4]{0}}

%region_0.5 (Arg_0.6: f32[], Arg_1.7: f32[]) -> f32[] {
  %Arg_0.6 = f32[] parameter(0)
  %Arg_1.7 = f32[] parameter(1)
  ROOT %add.8 = f32[] add(f32[] %Arg_0.6, f32[] %Arg_1.7)
}

%fused_computation (param_0.1: f32[4,8]) -> f32[4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %tanh.1 = f32[4,8]{1,0} tanh(f32[4,8]{1,0} %param_0.1), metadata={op_name="jit(f)/tanh"}
  %constant.2 = f32[] constant(0)
  ROOT %reduce.3 = f32[4]{0} reduce(f32[4,8]{1,0} %tanh.1, f32[] %constant.2), dimensions={1}, to_apply=%region_0.5
}

ENTRY %main.10 (Arg_0.1: f32[4,8]) -> f32[4] {
  %Arg_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %fusion = f32[4]{0} fusion(f32[4,8]{1,0} %Arg_0.1), kind=kInput, calls=%fused_computation, backend_config={"x":1}
}
"""


def _renamed(text):
  for a, b in [("region_0.5", "region_9.1"), ("Arg_0.6", "lhs.2"), ("Arg_1.7", "rhs.3"), ("add.8", "sum.4"),
               ("fused_computation", "fused_reduce.7"), ("param_0.1", "p0"), ("tanh.1", "tanh.22"),
               ("main.10", "main.99"), ("jit_f", "jit_g")]:
    text = text.replace(a, b)
  return text


def test_graph_fingerprint_ignores_names_and_debug_attributes_only():
  fp = cds.graph_fingerprint(_MOD)
  assert fp == cds.graph_fingerprint(_renamed(_MOD))                           # every name changed
  assert fp == cds.graph_fingerprint(_MOD.replace('backend_config={"x":1}', 'backend_config={"x":2}'))
  assert fp == cds.graph_fingerprint(hlo_lib.strip_metadata(_MOD))
  for a, b in [("tanh(", "exponential("), ("dimensions={1}", "dimensions={0}"), ("constant(0)", "constant(1)"),
               ("kind=kInput", "kind=kLoop")]:
    assert fp != cds.graph_fingerprint(_MOD.replace(a, b)), a
  # operands by position: a different wiring is a different graph
  two = "HloModule m\nENTRY e { a = f32[2]{0} parameter(0)\n b = f32[2]{0} parameter(1)\n ROOT s = f32[2]{0} subtract(a, b) }"
  assert cds.graph_fingerprint(two) != cds.graph_fingerprint(two.replace("subtract(a, b)", "subtract(b, a)"))
  # two compiles of one jitted function: the same graph
  f = lambda x: jnp.tanh(x).sum(1)
  t1 = jax.jit(f).lower(jnp.ones((4, 8))).compile().as_text()
  t2 = jax.jit(lambda y: jnp.tanh(y).sum(1)).lower(jnp.ones((4, 8))).compile().as_text()
  assert cds.graph_fingerprint(t1) == cds.graph_fingerprint(t2)
  with pytest.raises(TypeError):
    cds.graph_fingerprint(b"HloModule m")


def _ds(device, progs, seed=0):
  """A dataset of ``progs`` = [(family, config, [(variant, hlo, runtime)])] timed on ``device``."""
  hlo, grp, fam, var, cfg, rt = [], [], [], [], [], []
  for g, (f, c, rows) in enumerate(progs):
    for v, h, t in rows:
      hlo.append(h), grp.append(10 + g), fam.append(f), var.append(v), cfg.append(c), rt.append(t)
  n = len(hlo)
  return cds.CostDataset(
      hlo=hlo, group=np.asarray(grp, np.int32), family=np.asarray(fam), variant=np.asarray(var),
      config=np.asarray(cfg), runtime_s=np.asarray(rt), runtime_iqr_s=np.zeros(n), runtime_min_s=np.asarray(rt),
      n_inner=np.ones(n, np.int32), n_rounds=np.full(n, 10, np.int32), noisy=np.zeros(n, bool),
      flops=np.full(n, 1e6), bytes_accessed=np.full(n, 1e4), transcendentals=np.zeros(n), compile_s=np.zeros(n),
      meta={"device": device, "seed": seed, "copy_bytes_per_s": 1e12 if "H1" in device else 2e12,
            "variants": [["default", {}], ["no_fusion", {}]]})


def test_merge_datasets_keeps_devices_and_drops_graph_duplicates(tmp_path):
  other = _MOD.replace("tanh(", "exponential(")
  a = _ds("GPU-A", [("f", "{\"n\": 1}", [("default", _MOD, 1.0), ("no_fusion", other, 2.0)]),
                    ("f", "{\"n\": 2}", [("default", _renamed(_MOD), 1.5)])])   # same graph: a duplicate
  b = _ds("GPU-B", [("g", "{}", [("default", _renamed(_MOD), 0.5)]),              # same graph, other GPU
                    ("f", "{\"n\": 2}", [("default", other, 0.7), ("no_fusion", _MOD, 0.9)])])
  m, info = cds.merge_datasets([a, b], ["a", "b"])
  assert len(m) == 5 and info.duplicates_dropped == 1 and info.programs == 3
  np.testing.assert_allclose(info.duplicate_default_ratios, [1.5])
  assert [s["programs_kept"] for s in info.sources] == [1, 2]
  np.testing.assert_array_equal(m.group, [0, 0, 1, 2, 2])                        # renumbered, no clash
  np.testing.assert_array_equal(cds.row_devices(m), ["GPU-A"] * 2 + ["GPU-B"] * 3)
  np.testing.assert_allclose(m.runtime_s, [1.0, 2.0, 0.5, 0.7, 0.9])
  # program identity across devices: group 1 = group 0's graph; group 2 = the dropped duplicate's config,
  # which is joined too (family + config), so all three are one program for the folds
  k = cds.program_keys(m)
  assert k[0] == k[2] and info.unique_programs == 1 and len(set(k.tolist())) == 1
  assert m.meta["device"] == "mixed" and m.meta["device_meta"]["GPU-B"]["copy_bytes_per_s"] == 2e12
  sub = m.select(cds.row_devices(m) == "GPU-B")
  np.testing.assert_array_equal(cds.row_devices(sub), ["GPU-B"] * 3)
  m2, info2 = cds.merge_datasets([a, b], dedupe=False)
  assert len(m2) == 6 and info2.duplicates_dropped == 0
  with pytest.raises(ValueError, match="already a merged"):
    cds.merge_datasets([m])
  with pytest.raises(ValueError, match="non-empty"):
    cds.merge_datasets([])
  with pytest.raises(ValueError, match="names"):
    cds.merge_datasets([a], ["x", "y"])
  bad = _ds("GPU-A", [("f", "{}", [("no_fusion", _MOD, 1.0)])])
  with pytest.raises(ValueError, match="'default' rows"):
    cds.merge_datasets([bad])


def test_extra_families_compile_run_and_are_deterministic():
  assert set(programs.EXTRA_FAMILIES).isdisjoint(programs.FAMILIES)
  assert programs.ALL_FAMILIES == programs.FAMILIES + programs.EXTRA_FAMILIES
  for k, fam in enumerate(programs.EXTRA_FAMILIES):
    spec = programs.sample_program(fam, np.random.default_rng(k), "cpu")
    again = programs.sample_program(fam, np.random.default_rng(k), "cpu")
    assert spec.family == fam and spec.config == again.config
    out = jax.jit(spec.fn)(*programs.make_args(spec, k))
    assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in jax.tree_util.tree_leaves(out)), fam
    big = programs.sample_program(fam, np.random.default_rng(k), "gpu")   # GPU shapes: bounded size
    assert sum(int(np.prod(a.shape)) for a in big.args) <= 3 * (1 << 26), (fam, big.config)


def test_profiler_columns_split_calls_and_roundtrip(tmp_path):
  """Device times of profiled calls (cost_collect --profile_calls): calls split at idle gaps, medians
  per call, per-kernel times; stored as optional columns that old files lack."""
  ev = [(0, 10, 10, "a"), (15, 30, 15, "b"), (5000, 5012, 12, "a"), (5013, 5030, 17, "b"),
        (9000, 9040, 40, "a"), (9041, 9060, 19, "b"), (9061, 9070, 9, "a")]
  cl = cds.split_calls(ev, 1000)
  assert [len(c) for c in cl] == [2, 2, 3]
  t = cds.call_times(cl)
  np.testing.assert_allclose(t["device_span_s"], 30e-9)            # spans 30, 30, 70 ns
  np.testing.assert_allclose(t["device_busy_s"], 29e-9)            # busy 25, 29, 68 ns
  assert t["device_kernels"] == 2.0
  np.testing.assert_allclose(t["kernel_times"]["a"], 12e-9)        # 10, 12, 40 + 9 per call
  np.testing.assert_allclose(t["kernel_times"]["b"], 17e-9)
  with pytest.raises(ValueError):
    cds.call_times([])
  rows = [{"hlo": _MOD, "group": 0, "family": "f", "variant": "default", "runtime_s": 2e-5, **t},
          {"hlo": _MOD, "group": 0, "family": "f", "variant": "no_fusion", "runtime_s": 3e-5}]
  p = str(tmp_path / "d.npz")
  cds.save_dataset(p, rows, {"device": "x"})
  d = cds.load_dataset(p)
  assert len(d) == 2 and d.hlo[0] == _MOD
  got = cds.load_device_times(p)
  np.testing.assert_allclose(got["device_span_s"], [30e-9, np.nan])
  assert got["kernel_times"][0] == pytest.approx(t["kernel_times"]) and got["kernel_times"][1] == {}
  cds.save_dataset(p, rows[1:], {"device": "x"})
  assert cds.load_device_times(p) is None


def test_cost_dataset_replace_keeps_rows_and_names_unknown_fields():
  n = 3
  arr = lambda: np.arange(n, dtype=np.float64)
  ds = cds.CostDataset(hlo=["a", "b", "c"], group=np.arange(n), family=np.array(["f"] * n),
                       variant=np.array(["default"] * n), config=np.array(["{}"] * n), runtime_s=arr(),
                       runtime_iqr_s=arr(), runtime_min_s=arr(), n_inner=np.ones(n), n_rounds=np.ones(n),
                       noisy=np.zeros(n, bool), flops=arr(), bytes_accessed=arr(), transcendentals=arr(),
                       compile_s=arr(), meta={"device": "x"})
  assert len(ds) == n                                     # rows, not fields
  r = ds._replace(runtime_s=arr() * 2, meta={"device": "y"})
  np.testing.assert_array_equal(r.runtime_s, [0.0, 2.0, 4.0])
  assert r.meta == {"device": "y"} and r.hlo == ds.hlo and len(r) == n
  np.testing.assert_array_equal(ds.runtime_s, arr())     # the original is unchanged
  with pytest.raises(ValueError, match="no fields"):
    ds._replace(runtime=arr())


def test_floor_probe_and_its_summary():
  """cost_collect's host floor probe (recorded before, during and after the timing phase since session 25):
  a positive wall time per call; the summary is the median and quartiles of the probes; bad input is refused."""
  import sys
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "experiments"))
  import cost_collect as cc
  probe = cc.make_floor_probe()
  f = probe(5, 2)
  assert np.isfinite(f) and 0 < f < 0.1
  with pytest.raises(ValueError, match="calls and reps"):
    probe(0, 1)
  s = cc.floor_summary([3e-5, 1e-5, 2e-5, 4e-5])
  assert s["n"] == 4 and s["median"] == pytest.approx(2.5e-5)
  assert s["q25"] == pytest.approx(1.75e-5) and s["q75"] == pytest.approx(3.25e-5)
  assert cc.floor_summary([]) == {"n": 0}
  with pytest.raises(ValueError, match="finite and > 0"):
    cc.floor_summary([1e-5, float("nan")])


def test_library_probe_and_its_summary():
  """cost_collect's library-call probe (session 27): both probe programs time to a positive wall time per call, the
  targets are recorded per program, the in-timing summary is per program the median and quartiles; bad input is
  refused."""
  import sys
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "experiments"))
  import cost_collect as cc
  probe = cc.make_library_probe()
  assert set(probe.targets) == {"gemm", "conv"} and all(isinstance(v, list) for v in probe.targets.values())
  r = probe(3, 2)
  assert set(r) == {"gemm", "conv"} and all(np.isfinite(v) and 0 < v < 0.5 for v in r.values())
  with pytest.raises(ValueError, match="calls and reps"):
    probe(1, 0)
  s = cc.library_summary([{"gemm": 1e-5, "conv": 4e-5}, {"gemm": 3e-5, "conv": 2e-5}, {"gemm": 2e-5, "conv": 3e-5}])
  assert s["gemm"]["n"] == 3 and s["gemm"]["median"] == pytest.approx(2e-5)
  assert s["conv"]["median"] == pytest.approx(3e-5) and s["conv"]["q25"] == pytest.approx(2.5e-5)
  assert cc.library_summary([]) == {}
  with pytest.raises(ValueError, match="same programs"):
    cc.library_summary([{"gemm": 1e-5}, {"conv": 1e-5}])
  with pytest.raises(ValueError, match="finite and > 0"):
    cc.library_summary([{"gemm": -1e-5}])
