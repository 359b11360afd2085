"""Per-kernel labels for the kernel roofline (issue 24 target (b), session 14): profiler kernel names
matched to the HLO kernels of ``program_kernels``, the fit with per-kernel labels recovering known
per-kernel times and the launch gap on synthetic programs whose program totals alone cannot tell two
classes apart, the device-busy prediction, and bad input."""

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR

C = KR.CLASS_ID

MIXED = """HloModule m
%fused_add (p0: f32[64,64], p1: f32[64,64]) -> f32[64,64] {
  %p0 = f32[64,64]{1,0} parameter(0)
  %p1 = f32[64,64]{1,0} parameter(1)
  ROOT %a = f32[64,64]{1,0} add(%p0, %p1)
}
ENTRY %e (x: f32[64,64], w: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %w = f32[64,64]{1,0} parameter(1)
  %loop_add_fusion.2 = f32[64,64]{1,0} fusion(%x, %w), kind=kLoop, calls=%fused_add
  %cublas-lt-matmul.1 = (f32[64,64]{1,0}, s8[1024]{0}) custom-call(%loop_add_fusion.2, %w), custom_call_target="__cublas$lt$matmul"
  %g = f32[64,64]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  ROOT %wrapped_transpose = f32[64,64]{0,1} transpose(%g), dimensions={1,0}
}
"""


def test_profile_name():
  assert KR.profile_name("%gemm_fusion_dot.3") == "gemm_fusion_dot_3"
  assert KR.profile_name("cublas-lt-matmul.0") == "cublas_lt_matmul_0"
  assert KR.profile_name("loop_add_fusion") == "loop_add_fusion"
  for bad in ("", "%", None, 3):
    with pytest.raises(ValueError, match="non-empty HLO instruction name"):
      KR.profile_name(bad)


def test_program_kernels_names_and_library_flags():
  kt = KR.program_kernels(MIXED)
  assert kt.names == ("loop_add_fusion.2", "cublas-lt-matmul.1", "wrapped_transpose")
  np.testing.assert_array_equal(kt.library, [False, True, False])
  assert [KR.KERNEL_CLASSES[c] for c in kt.klass] == ["elementwise", "gemm_f32", "transpose"]


def test_match_kernel_times_rules():
  kt = KR.program_kernels(MIXED)
  times = {"loop_add_fusion_2": 2e-6, "wrapped_transpose": 3e-6,
           "sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize64x128x32": 5e-6,   # library kernels: pooled
           "void cublasLt::splitKreduce_kernel<32, 16>": 1e-6, "Memset (Device)": 0.5e-6}
  lab = KR.match_kernel_times(kt, times)
  by_group = {}
  for r, g in zip(lab.rows, lab.group):
    by_group.setdefault(int(g), []).append(kt.names[r])
  got = sorted((tuple(v), float(lab.time_s[g])) for g, v in by_group.items())
  want = sorted([(("loop_add_fusion.2",), 2e-6), (("wrapped_transpose",), 3e-6), (("cublas-lt-matmul.1",), 6.5e-6)])
  assert [g[0] for g in got] == [w[0] for w in want]
  np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-12)
  np.testing.assert_allclose([lab.matched_s, lab.library_s, lab.unassigned_s], [5e-6, 6.5e-6, 0.0], rtol=1e-12)
  # every HLO kernel matched by name: the extra (memset) time has no kernel to go to
  lab2 = KR.match_kernel_times(kt, {"loop_add_fusion_2": 2e-6, "wrapped_transpose": 3e-6,
                                    "cublas_lt_matmul_1": 4e-6, "Memset": 1e-6})
  assert lab2.time_s.size == 3 and lab2.unassigned_s == pytest.approx(1e-6) and lab2.library_s == 0.0
  # a kernel the profiler did not see gets no label; a zero time labels nothing
  lab3 = KR.match_kernel_times(kt, {"wrapped_transpose": 0.0})
  assert lab3.time_s.size == 0 and lab3.matched_s == 0.0
  assert KR.match_kernel_times(kt, {}).time_s.size == 0
  # a kernel that never launches (count 0, e.g. a zero-trip loop body) is labelled by nothing: its name match
  # is unassigned time, and the pool goes to the launching kernels only (a fittable label in every case)
  kt0 = kt._replace(count=np.asarray([0.0, 1.0, 1.0]))
  lab4 = KR.match_kernel_times(kt0, {"loop_add_fusion_2": 2e-6, "Memset": 1e-6})
  assert sorted(kt0.names[r] for r in lab4.rows) == ["cublas-lt-matmul.1", "wrapped_transpose"]
  np.testing.assert_allclose([lab4.matched_s, lab4.library_s, lab4.unassigned_s], [0.0, 1e-6, 2e-6], rtol=1e-12)
  KR.fit_kernel_roofline([kt0], [1e-4], ["d"], KR.KernelRooflineConfig(steps=2), kernel_labels=[lab4])


def test_match_kernel_times_bad_input():
  kt = KR.program_kernels(MIXED)
  with pytest.raises(TypeError, match="needs a KernelTable"):
    KR.match_kernel_times({"a": 1.0}, {})
  with pytest.raises(ValueError, match="names and library flags"):
    KR.match_kernel_times(KR.KernelTable(np.ones(1), np.ones(1), np.zeros(1, np.int32), np.ones(1)), {})
  with pytest.raises(TypeError, match="must be a dict"):
    KR.match_kernel_times(kt, [("wrapped_transpose", 1e-6)])
  for bad in ({"wrapped_transpose": -1e-6}, {"wrapped_transpose": float("nan")}, {"wrapped_transpose": "1"},
              {3: 1e-6}):
    with pytest.raises(ValueError, match="finite time >= 0"):
      KR.match_kernel_times(kt, bad)


# ---------------------------------------------------------------------------------------------
# The fit on synthetic programs with known per-kernel times.

_TRUE = {"gemm": (3e14, 1e13, 12e-6), "elementwise": (5e12, 1.5e12, 0.5e-6)}  # F, B, o per class
_GAP, _DISPATCH = 3e-6, 2e-5


def _truth():
  D, Cn = 1, len(KR.KERNEL_CLASSES)
  lf, lb, lo = np.log(np.full((D, Cn), 1e14)), np.log(np.full((D, Cn), 1e12)), np.log(np.full((D, Cn), 2e-6))
  for c, (f, b, o) in _TRUE.items():
    lf[0, C[c]], lb[0, C[c]], lo[0, C[c]] = np.log(f), np.log(b), np.log(o)
  return KR.KernelRoofline(("d",), lf, lb, lo, np.log([_DISPATCH]), 16.0, np.ones((D, Cn)),
                           np.log(np.full((D, Cn), _GAP)))


def _program(kinds, scale, i):
  """Kernels: GEMMs (compute-bound) and elementwise kernels (memory-bound) of size ``scale``."""
  f, b, k = [], [], []
  for c in kinds:
    if c == "gemm":
      f.append(2e9 * scale)
      b.append(1e6 * scale)
    else:
      f.append(1e6 * scale)
      b.append(4e6 * scale)
    k.append(C[c])
  n = len(kinds)
  return KR.KernelTable(np.asarray(f), np.asarray(b), np.asarray(k, np.int32), np.ones(n), 0,
                        tuple(f"fusion.{i}.{j}" for j in range(n)), np.zeros(n, bool))


def test_fit_with_kernel_labels_recovers_per_kernel_times():
  """Training programs always hold as many GEMMs as elementwise kernels, of proportional sizes, so their
  wall times alone cannot say how the time splits between the two classes (nor the per-launch gap from
  the per-kernel overheads); the profiler's per-kernel times can. Held-out programs of elementwise
  kernels only: the labelled fit predicts them within a few %, the unlabelled one cannot."""
  rng = np.random.default_rng(0)
  truth = _truth()
  train = [_program(["gemm", "elementwise"] * (1 + i % 3), 10 ** rng.uniform(0, 2.5), i) for i in range(40)]
  test = [_program(["elementwise"] * 6, 10 ** rng.uniform(0, 2.5), 100 + i) for i in range(10)]
  dv = ["d"] * len(train)
  wall = KR.predict_kernel_roofline(truth, train, dv)
  labels = []
  for t in train:   # the profiler's view: each kernel's device time (no gap, no dispatch), by name
    per = [KR.predict_kernel_roofline(truth, [t._replace(flops=t.flops[j:j + 1], bytes=t.bytes[j:j + 1],
                                                          klass=t.klass[j:j + 1], count=t.count[j:j + 1])],
                                      ["d"], what="busy")[0] for j in range(t.flops.size)]
    labels.append(KR.match_kernel_times(t, {KR.profile_name(n): v for n, v in zip(t.names, per)}))
  cfg = KR.KernelRooflineConfig(steps=1500, learning_rate=0.05, ridge=0.001)
  m_lab = KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=labels)
  m_plain = KR.fit_kernel_roofline(train, wall, dv, cfg)
  true_test = KR.predict_kernel_roofline(truth, test, ["d"] * 10)
  err = lambda m: float(np.mean(np.abs(KR.predict_kernel_roofline(m, test, ["d"] * 10) / true_test - 1)))
  assert err(m_lab) < 0.02, err(m_lab)
  assert err(m_plain) > 5 * err(m_lab), (err(m_plain), err(m_lab))
  busy_true = KR.predict_kernel_roofline(truth, test, ["d"] * 10, what="busy")
  busy = KR.predict_kernel_roofline(m_lab, test, ["d"] * 10, what="busy")
  np.testing.assert_allclose(busy, busy_true, rtol=0.08)
  assert m_plain.log_launch_gap is None
  np.testing.assert_allclose(np.exp(m_lab.log_launch_gap[0, [C["gemm"], C["elementwise"]]]), _GAP, rtol=0.1)
  # wall = busy + gaps + dispatch, by construction of the prediction
  t0 = test[0]
  np.testing.assert_allclose(
      KR.predict_kernel_roofline(m_lab, [t0], ["d"])[0],
      busy[0] + t0.count.sum() * np.exp(m_lab.log_launch_gap[0, C["elementwise"]])
      + np.exp(m_lab.log_program_overhead[0]),
      rtol=1e-12)


def test_fit_kernel_labels_bad_input():
  train = [_program(["gemm", "elementwise"], 1.0, i) for i in range(3)]
  wall, dv = np.full(3, 1e-4), ["d"] * 3
  cfg = KR.KernelRooflineConfig(steps=2)
  lab = KR.match_kernel_times(train[0], {KR.profile_name(train[0].names[0]): 1e-5})
  with pytest.raises(ValueError, match="one kernel_labels entry"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab])
  with pytest.raises(TypeError, match="not KernelLabels"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab, {"x": 1.0}, None])
  with pytest.raises(ValueError, match="no labelled kernel"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[None, None, None])
  with pytest.raises(ValueError, match="rows must index its table"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab._replace(rows=np.asarray([7], np.int32)),
                                                                None, None])
  with pytest.raises(ValueError, match="rows must index its table"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab._replace(time_s=np.asarray([0.0])), None, None])
  with pytest.raises(ValueError, match="need sharpness"):
    KR.fit_kernel_roofline(train, wall, dv, cfg._replace(kernel_weight=-1.0), kernel_labels=[lab, None, None])
  # labels whose group cannot be predicted (no row; rows that never launch) were fitted as log(0): refused
  no_row = KR.KernelLabels(np.asarray([0], np.int32), np.asarray([0], np.int32), np.asarray([1e-5, 2e-5]), 0, 0, 0)
  with pytest.raises(ValueError, match=r"groups \[1\] have no row that launches"):
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[no_row, None, None])
  never = [train[0]._replace(count=np.asarray([0.0, 1.0]))] + train[1:]
  with pytest.raises(ValueError, match=r"groups \[0\] have no row that launches"):
    KR.fit_kernel_roofline(never, wall, dv, cfg, kernel_labels=[lab, None, None])
  with pytest.raises(TypeError, match="integer indices"):   # 0.7 was silently truncated to row 0
    KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab._replace(rows=np.asarray([0.7])), None, None])
  with pytest.raises(ValueError, match="kernel_weight >= 0"):
    KR.fit_kernel_roofline(train, wall, dv, cfg._replace(kernel_weight=-1.0), kernel_labels=[lab, None, None])
  m = KR.fit_kernel_roofline(train, wall, dv, cfg, kernel_labels=[lab, None, None])
  with pytest.raises(ValueError, match="'wall' or 'busy'"):
    KR.predict_kernel_roofline(m, train, dv, what="device")
  # the scale folds into the launch gap too
  s = KR.scale_kernel_roofline(m, 2.0)
  np.testing.assert_allclose(KR.predict_kernel_roofline(s, train, dv), 2 * KR.predict_kernel_roofline(m, train, dv),
                             rtol=1e-12)


def test_host_floor_prediction_and_fit():
  """wall = softmax_8(device-side time, H_d): small programs cost about H_d, large ones their kernels;
  the fit recovers H_d from wall times of programs on both sides of it."""
  rng = np.random.default_rng(2)
  truth = _truth()._replace(log_launch_gap=None, log_host_floor=np.log([8e-5]), floor_sharpness=8.0)
  progs = [_program(["gemm", "elementwise"][: 1 + i % 2], 10 ** rng.uniform(0, 3.5), i) for i in range(40)]
  dv = ["d"] * 40
  wall = KR.predict_kernel_roofline(truth, progs, dv)
  dev_side = KR.predict_kernel_roofline(truth._replace(log_host_floor=None), progs, dv)
  np.testing.assert_allclose(wall, (dev_side ** 8 + 8e-5 ** 8) ** (1 / 8), rtol=1e-12)
  assert wall.min() >= 8e-5 and np.any(dev_side < 8e-5) and np.any(dev_side > 3e-4)
  cfg = KR.KernelRooflineConfig(steps=1500, host_floor=True)
  m = KR.fit_kernel_roofline(progs, wall, dv, cfg)
  assert np.exp(m.log_host_floor[0]) == pytest.approx(8e-5, rel=0.15)
  assert np.mean(np.abs(KR.predict_kernel_roofline(m, progs, dv) / wall - 1)) < 0.03
  # without the floor the sum model cannot bend: worse on the same programs
  m0 = KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(host_floor=False))
  assert m0.log_host_floor is None
  assert np.mean(np.abs(KR.predict_kernel_roofline(m0, progs, dv) / wall - 1)) > \
      2 * np.mean(np.abs(KR.predict_kernel_roofline(m, progs, dv) / wall - 1))
  with pytest.raises(ValueError, match="need sharpness"):
    KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(floor_sharpness=0.5))


def test_device_time_oracle_recovers_constructed_relations():
  rng = np.random.default_rng(0)
  busy = 10 ** rng.uniform(-5.5, -3.5, 200)
  span = busy * 1.2
  wall = busy + 30e-6                       # wall = busy + a constant dispatch
  o = KR.device_time_oracle(wall, busy, span)
  assert o["rows"] == 200
  assert o["wall_from_busy_plus_c"]["mape"] < 1e-9 and o["wall_from_busy_plus_c"]["c_us"] == pytest.approx(30.0)
  assert o["wall_from_span_plus_c"]["mape"] > 0.01   # span is not busy: no constant fits exactly
  np.testing.assert_allclose(o["wall_minus_span_us_quartiles"], np.percentile((wall - span) * 1e6, [25, 50, 75]),
                             rtol=1e-12)
  # back-to-back calls: wall = softmax_8(busy + 20 us, 100 us); the overlap form fits, the sum cannot
  wall2 = ((busy + 20e-6) ** 8 + 100e-6 ** 8) ** (1 / 8)
  ov = KR.device_time_oracle(wall2, busy, span)
  fit = ov["wall_from_softmax_busy_plus_c0_floor_h"]
  assert fit["mape"] < 1e-6 and fit["q"] == 8.0
  assert fit["c0_us"] == pytest.approx(20.0) and fit["h_us"] == pytest.approx(100.0)
  assert ov["wall_from_busy_plus_c"]["mape"] > 0.05
  with pytest.raises(ValueError, match="one non-zero length"):
    KR.device_time_oracle(wall, busy[:3], span)
  with pytest.raises(ValueError, match="positive and finite"):
    KR.device_time_oracle(np.append(wall[:3], np.nan), busy[:4], span[:4])
