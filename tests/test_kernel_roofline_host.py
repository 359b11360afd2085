"""Kernel roofline, session 15 (issue 24 target (b)): the non-device side of the wall time and the shared
byte rate. Per-launch host costs on the host side of the floor's overlap (``host_launch``), a separate
penalty of the byte rates' class terms (``bytes_ridge``), the wall-time scale of labelled kernel times
(``wall_scale``), a launch gap on library calls only (``gap_library_only``): predictions against a numpy
reference, fits that recover known constants on synthetic programs, and bad input. The ``while``-loop
counting (a known trip count launches no condition) is in ``test_cost_kernel_roofline.py``."""

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR

C = KR.CLASS_ID
Cn = len(KR.KERNEL_CLASSES)


def _model(**kw):
  """One device; every class F = 1e14 FLOP/s, B = 1e12 B/s, o = 2 us; dispatch 20 us."""
  base = KR.KernelRoofline(("d",), np.log(np.full((1, Cn), 1e14)), np.log(np.full((1, Cn), 1e12)),
                           np.log(np.full((1, Cn), 2e-6)), np.log([2e-5]), 16.0, np.ones((1, Cn)))
  return base._replace(**kw)


def _table(n, klass, scale=1.0, library=None):
  """``n`` memory-bound kernels of class ``klass`` (1 MB each x scale), one launch each."""
  lib = np.zeros(n, bool) if library is None else np.asarray(library, bool)
  return KR.KernelTable(np.full(n, 1e3 * scale), np.full(n, 1e6 * scale), np.full(n, klass, np.int32),
                        np.ones(n), 0, tuple(f"k.{j}" for j in range(n)), lib)


def _numpy_wall(model, t, host_launch=None, wall_scale=1.0, gap=None, gap_lib_only=False, q=8.0):
  """Reference: wall = softmax_q(O + sum (s * dev_k + g_k), H + sum h_k) for one table, device 0."""
  k = t.klass
  a = t.flops / np.exp(model.log_flops_rate[0, k])
  b = t.bytes / np.exp(model.log_bytes_rate[0, k])
  dev = (a ** 16 + b ** 16) ** (1 / 16) + np.exp(model.log_overhead[0, k])
  g = np.zeros_like(dev) if gap is None else gap[k] * (t.library if gap_lib_only else 1.0)
  dside = np.exp(model.log_program_overhead[0]) + np.sum(t.count * (wall_scale * dev + g))
  hside = np.exp(model.log_host_floor[0]) + (0.0 if host_launch is None else np.sum(t.count * host_launch[k]))
  return (dside ** q + hside ** q) ** (1 / q)


def test_host_launch_prediction_matches_numpy():
  h = np.full(Cn, 1e-6)
  h[C["gemm"]] = 6e-6
  m = _model(log_overhead=np.log(np.full((1, Cn), 3e-7)), log_host_floor=np.log([5e-5]),
             log_host_launch=np.log(h)[None, :])
  tabs = [_table(3, C["elementwise"]), _table(200, C["elementwise"], 1e-3), _table(4, C["gemm"], 30.0)]
  got = KR.predict_kernel_roofline(m, tabs, ["d"] * 3)
  want = [_numpy_wall(m, t, host_launch=h) for t in tabs]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # many tiny launches: the host side (floor + 200 x 1 us) sets the wall time, above the floor alone
  assert got[1] > 1.5 * KR.predict_kernel_roofline(m._replace(log_host_launch=None), tabs[1:2], ["d"])[0]
  # busy time ignores the host side; the scale folds into the host costs too
  np.testing.assert_allclose(KR.predict_kernel_roofline(m, tabs, ["d"] * 3, what="busy"),
                             KR.predict_kernel_roofline(m._replace(log_host_floor=None, log_host_launch=None), tabs,
                                                        ["d"] * 3, what="busy"), rtol=1e-12)
  np.testing.assert_allclose(KR.predict_kernel_roofline(KR.scale_kernel_roofline(m, 3.0), tabs, ["d"] * 3),
                             3.0 * got, rtol=1e-12)
  with pytest.raises(ValueError, match="needs model.log_host_floor"):
    KR.predict_kernel_roofline(m._replace(log_host_floor=None), tabs, ["d"] * 3)


def test_fit_recovers_host_launch_cost():
  """Programs of 1-400 short launches behind a 60 us floor, and programs of a few long kernels: the wall
  time of the first grows with the launches at the host's 1.5 us each, not at the device's 0.3 us per
  kernel; the fit with ``host_launch`` recovers 1.5 us, the one without cannot follow both kinds."""
  rng = np.random.default_rng(0)
  h = np.full(Cn, 1.5e-6)
  truth = _model(log_overhead=np.log(np.full((1, Cn), 3e-7)), log_host_floor=np.log([6e-5]),
                 log_host_launch=np.log(h)[None, :])
  progs = [_table(int(n), C["elementwise"], 1e-3) for n in np.unique(np.geomspace(1, 400, 25).astype(int))]
  progs += [_table(int(rng.integers(1, 5)), C["elementwise"], s) for s in 10 ** rng.uniform(0.5, 2.5, 15)]
  dv = ["d"] * len(progs)
  wall = KR.predict_kernel_roofline(truth, progs, dv)
  cfg = KR.KernelRooflineConfig(steps=2000, host_floor=True, host_launch=True, init_host_floor_s=5e-5)
  m = KR.fit_kernel_roofline(progs, wall, dv, cfg)
  assert m.log_host_launch.shape == (1, Cn)
  assert np.exp(m.log_host_launch[0, C["elementwise"]]) == pytest.approx(1.5e-6, rel=0.15)
  err = np.mean(np.abs(KR.predict_kernel_roofline(m, progs, dv) / wall - 1))
  m0 = KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(host_launch=False))
  err0 = np.mean(np.abs(KR.predict_kernel_roofline(m0, progs, dv) / wall - 1))
  assert err < 0.03 and err0 > 2 * err, (err, err0)
  # one cost per device instead of per class: the same value for every class
  m1 = KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(host_launch_per_class=False, steps=300))
  assert np.ptp(m1.log_host_launch) == 0.0
  with pytest.raises(ValueError, match="set host_floor=True too"):
    KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(host_floor=False))
  with pytest.raises(ValueError, match="init_host_launch_s > 0"):
    KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(init_host_launch_s=0.0))


def test_bytes_ridge_ties_byte_rates_across_classes():
  """Two classes whose memory-bound kernels run at 1 and 3 TB/s: a small bytes_ridge fits both rates,
  a large one pulls them toward one shared rate (their log ratio shrinks), while the flops rates keep
  their own (ridge) penalty; bytes_ridge=None is the same fit as bytes_ridge=ridge."""
  rng = np.random.default_rng(1)
  truth = _model(log_bytes_rate=np.log(np.full((1, Cn), 1e12)))
  truth.log_bytes_rate[0, C["transpose"]] = np.log(3e12)
  progs = [_table(int(rng.integers(1, 4)), c, s) for c in (C["elementwise"], C["transpose"])
           for s in 10 ** rng.uniform(1, 3, 12)]
  dv = ["d"] * len(progs)
  wall = KR.predict_kernel_roofline(truth, progs, dv)
  cfg = KR.KernelRooflineConfig(steps=1500, ridge=0.001)
  gap = lambda m: float(m.log_bytes_rate[0, C["transpose"]] - m.log_bytes_rate[0, C["elementwise"]])
  loose, tight = (KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(bytes_ridge=r)) for r in (0.001, 100.0))
  assert gap(loose) == pytest.approx(np.log(3.0), abs=0.1)
  assert abs(gap(tight)) < 0.25 * np.log(3.0)
  same = KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(bytes_ridge=None, steps=200))
  np.testing.assert_allclose(same.log_bytes_rate,
                             KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(bytes_ridge=0.001, steps=200))
                             .log_bytes_rate, rtol=1e-6)
  with pytest.raises(ValueError, match="bytes_ridge None or >= 0"):
    KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(bytes_ridge=-1.0))


def test_wall_scale_and_library_gap_prediction_matches_numpy():
  gap = np.full(Cn, 4e-6)
  m = _model(log_launch_gap=np.log(gap)[None, :], log_wall_scale=np.log([1.1]), gap_library_only=True)
  tabs = [_table(3, C["gemm"], 10.0, library=[True, False, True]), _table(5, C["elementwise"], 0.1)]
  got = KR.predict_kernel_roofline(m._replace(log_host_floor=np.log([1e-9])), tabs, ["d"] * 2)
  want = [_numpy_wall(m._replace(log_host_floor=np.log([1e-9])), t, wall_scale=1.1, gap=gap, gap_lib_only=True)
          for t in tabs]
  np.testing.assert_allclose(got, want, rtol=1e-9)
  # busy time: the kernels' device time, neither scaled nor gapped
  busy = KR.predict_kernel_roofline(m, tabs, ["d"] * 2, what="busy")
  np.testing.assert_allclose(busy, KR.predict_kernel_roofline(_model(), tabs, ["d"] * 2, what="busy"), rtol=1e-12)
  # all launches gapped without gap_library_only
  allgap = KR.predict_kernel_roofline(m._replace(gap_library_only=False), tabs[:1], ["d"])[0]
  assert allgap == pytest.approx(KR.predict_kernel_roofline(m, tabs[:1], ["d"])[0] + 4e-6, rel=1e-9)


def test_fit_recovers_wall_scale_and_library_gap():
  """Labelled programs whose wall time counts each kernel's profiled time 1.12 times, plus 5 us per
  library call and nothing per XLA kernel: the fit with wall_scale and gap_library_only recovers both."""
  rng = np.random.default_rng(3)
  gap = np.full(Cn, 5e-6)
  truth = _model(log_launch_gap=np.log(gap)[None, :], log_wall_scale=np.log([1.12]), gap_library_only=True)
  progs, labels = [], []
  for i in range(40):
    n = int(rng.integers(1, 6))
    lib = rng.random(n) < 0.4
    t = _table(n, C["gemm"], 10 ** rng.uniform(0, 3), library=lib)._replace(
        names=tuple(f"k.{i}.{j}" for j in range(n)))
    progs.append(t)
    per = KR.predict_kernel_roofline(truth, [t], ["d"], what="busy")[0] / n   # equal kernels
    labels.append(KR.KernelLabels(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), np.full(n, per),
                                  per * n, 0.0, 0.0))
  dv = ["d"] * len(progs)
  wall = KR.predict_kernel_roofline(truth, progs, dv)
  cfg = KR.KernelRooflineConfig(steps=2500, gap_per_class=False, wall_scale=True, gap_library_only=True,
                                calibrate=False)
  m = KR.fit_kernel_roofline(progs, wall, dv, cfg, kernel_labels=labels)
  assert m.gap_library_only and np.exp(m.log_wall_scale[0]) == pytest.approx(1.12, rel=0.03)
  assert np.exp(m.log_launch_gap[0, C["gemm"]]) == pytest.approx(5e-6, rel=0.2)
  assert np.mean(np.abs(KR.predict_kernel_roofline(m, progs, dv) / wall - 1)) < 0.02
  # without labels there is nothing to tell the scale from the rates: an error, not a silent plain fit
  with pytest.raises(ValueError, match="pass kernel_labels"):
    KR.fit_kernel_roofline(progs, wall, dv, cfg._replace(steps=50))


# review fixes (session 15): the default configuration fits as before the session's options; bad config
def _golden_case():
  """16 programs on two devices, half with one labelled group; fitted 120 steps (float32 Adam)."""
  rng = np.random.default_rng(7)
  tabs = []
  for i in range(16):
    n = int(rng.integers(1, 5))
    k = rng.choice([C["gemm"], C["elementwise"], C["reduce"]], n).astype(np.int32)
    tabs.append(KR.KernelTable(10 ** rng.uniform(6, 10, n), 10 ** rng.uniform(4, 8, n), k, rng.choice([1.0, 3.0], n),
                               0, tuple(f"k{i}.{j}" for j in range(n)), rng.random(n) < 0.3))
  dv = ["a" if i % 3 else "b" for i in range(16)]
  y = 10 ** rng.uniform(-5, -3, 16)
  labs = [KR.KernelLabels(np.arange(t.flops.size, dtype=np.int32), np.zeros(t.flops.size, np.int32),
                          np.array([0.5 * y[i]]), 0.0, 0.0, 0.0) if i % 2 == 0 else None for i, t in enumerate(tabs)]
  return tabs, dv, y, labs


# predictions of the code before session 15 (commit e88256e^) on _golden_case: default config, + host_floor,
# + labels, + both; the new options off must give the same fits (a 3x ridge moves them by 0.2-0.7%)
_GOLDEN_PRE_S15 = np.array([
    [1.0853557907e-04, 5.2184319838e-06, 2.2905251791e-05, 3.5038440859e-05, 2.2785474652e-05, 3.5359519148e-05,
     2.3919583828e-05, 4.6463232870e-06, 1.9955625308e-04, 1.4707710917e-04, 3.6398099071e-05, 1.1132899945e-04,
     1.1553002882e-04, 2.0957628681e-05, 5.5537409920e-06, 7.6376573458e-06],
    [1.6165953552e-04, 1.6139463369e-05, 3.5384782942e-05, 5.2478156491e-05, 1.6139430700e-05, 5.1608072385e-05,
     3.5651997386e-05, 1.6139555514e-05, 3.0134791547e-04, 2.1790334560e-04, 5.7566405047e-05, 4.1322760396e-05,
     1.7072857435e-04, 2.5392696613e-05, 1.6140115257e-05, 1.0975672676e-05],
    [1.2765780846e-04, 4.8733893883e-06, 1.3296300947e-05, 4.5086008666e-05, 3.8847423570e-05, 4.3079230190e-05,
     3.0417708348e-05, 1.0186359841e-05, 1.4955693999e-04, 1.6696266827e-04, 2.6583028604e-05, 1.9315577446e-04,
     1.3191360224e-04, 3.2863534048e-05, 6.1064364301e-06, 9.5158572370e-06],
    [1.3449356133e-04, 6.1299277881e-06, 1.3296300947e-05, 4.7731362773e-05, 4.0301468623e-05, 4.6882811475e-05,
     3.2146357886e-05, 1.0035012631e-05, 1.5849916619e-04, 1.7564516857e-04, 2.7740517838e-05, 2.0386919587e-04,
     1.3873028060e-04, 3.4973896922e-05, 6.1378066869e-06, 1.0053157641e-05]])


def test_default_config_fits_as_before_session_15():
  tabs, dv, y, labs = _golden_case()
  cfg = KR.KernelRooflineConfig(steps=120)
  got = [KR.predict_kernel_roofline(KR.fit_kernel_roofline(tabs, y, dv, c, kernel_labels=lb), tabs, dv)
         for c, lb in ((cfg, None), (cfg._replace(host_floor=True), None), (cfg, labs),
                       (cfg._replace(host_floor=True), labs))]
  np.testing.assert_allclose(np.stack(got), _GOLDEN_PRE_S15, rtol=2e-4)


def test_config_bad_input_says_the_fix():
  tabs, dv, y, labs = _golden_case()
  cfg = KR.KernelRooflineConfig(steps=5)
  fit = lambda c, lb=None: KR.fit_kernel_roofline(tabs, y, dv, c, kernel_labels=lb)
  for nm in ("host_launch", "host_launch_per_class", "wall_scale", "gap_library_only", "host_floor"):
    with pytest.raises(TypeError, match=f"{nm} must be a bool"):
      fit(cfg._replace(**{nm: "yes"}))
  with pytest.raises(TypeError, match="bytes_ridge must be a number or None"):
    fit(cfg._replace(bytes_ridge="0.03"))
  with pytest.raises(TypeError, match="bytes_ridge must be a number"):
    fit(cfg._replace(bytes_ridge=True))
  for nm in ("bytes_ridge", "ridge", "init_host_launch_s"):
    with pytest.raises(ValueError, match=f"{nm} must be finite"):
      fit(cfg._replace(**{nm: float("inf")}))
  with pytest.raises(ValueError, match="init_host_launch_s > 0"):
    fit(cfg._replace(host_floor=True, host_launch=True, init_host_launch_s=-1e-6))
  # options that act on labelled kernel times: an error that names the fix, not a silent plain fit
  for nm in ("wall_scale", "gap_library_only"):
    with pytest.raises(ValueError, match="pass kernel_labels"):
      fit(cfg._replace(**{nm: True}))
  # the library gap needs every table's library flags
  no_flags = [t._replace(library=None) if i == 3 else t for i, t in enumerate(tabs)]
  with pytest.raises(ValueError, match=r"tables\[3\]: gap_library_only needs KernelTable.library"):
    KR.fit_kernel_roofline(no_flags, y, dv, cfg._replace(gap_library_only=True), kernel_labels=labs)
  m = fit(cfg._replace(gap_library_only=True), labs)
  assert m.gap_library_only
  with pytest.raises(ValueError, match="gap_library_only needs KernelTable.library"):
    KR.predict_kernel_roofline(m, no_flags, dv)
