"""Session 27 helper: the dispatch-floor covariate on the per-launch wall costs instead of the program overhead
(fit_kernel_roofline(host_covariate_launch=True), value_eval --kr_dispatch_floor_launch), and its fitted exponents
bounded (host_covariate_bound=B: gamma = B tanh(u / B), value_eval --kr_dispatch_floor_bound=B).

Mechanism: a slower host leaves idle gaps between kernels, also inside long device-bound programs, an idle that
grows with the launches; the variant scales each launch's kernel overhead ``o`` and launch gap ``g`` in the wall
time by ``exp(gamma_k z)`` (``gamma_o`` held at 0, host side ``x exp(gamma_h z)`` as before); the busy time keeps
``o`` unscaled."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR
from tests.test_value_s26_diagnosis import assert_same_kernel_roofline, run_value_eval_flag_checks

_CFG = KR.KernelRooflineConfig(host_floor=True, steps=300, calibrate=False)
_EW = KR.CLASS_ID["elementwise"]


def _table(nbytes, library=None):
  n = len(nbytes)
  lib = np.zeros(n, bool) if library is None else np.asarray(library, bool)
  return KR.KernelTable(np.zeros(n), np.asarray(nbytes, np.float64), np.full(n, _EW, np.int32), np.ones(n), 0,
                        tuple(f"k.{j}" for j in range(n)), lib)


def _hand_model(gk):
  """One device: byte rate 1e12 B/s, o = 2 us, g = 5 us (library calls only), O = 10 us, s = 1.1, H = 30 us,
  (gamma_h, gamma_o) = (0.5, 0), gamma_k = ``gk`` (None: the default model, no per-launch response)."""
  Cn = len(KR.KERNEL_CLASSES)
  return KR.KernelRoofline(("d",), np.log(np.full((1, Cn), 1e20)), np.log(np.full((1, Cn), 1e12)),
                           np.log(np.full((1, Cn), 2e-6)), np.log([10e-6]), 64.0, np.ones((1, Cn)),
                           log_launch_gap=np.log(np.full((1, Cn), 5e-6)), log_host_floor=np.log([30e-6]),
                           floor_sharpness=8.0, log_wall_scale=np.log([1.1]), gap_library_only=True,
                           host_scale=np.asarray([0.5, 0.0]), host_scale_launch=gk)


def test_wall_response_to_the_covariate_matches_the_hand_computed_value():
  # three kernels of 1e6, 4e6, 2e7 bytes (1, 4, 20 us at 1e12 B/s), the second a library call
  tab = _table([1e6, 4e6, 2e7], library=[False, True, False])
  gk, z = 1.5, np.log(50.0 / 40.0)
  f = np.exp(gk * z)
  kern = lambda w, o: w + o   # overhead_overlap off: softmax_p(0, c) + o = c + o (no FLOPs)
  dev_t = 10e-6 + sum(1.1 * kern(w, 2e-6 * f) for w in (1e-6, 4e-6, 20e-6)) + 5e-6 * f   # O not scaled (gamma_o 0)
  host = 30e-6 * np.exp(0.5 * z)
  want = (dev_t ** 8 + host ** 8) ** (1 / 8)
  got = KR.predict_kernel_roofline(_hand_model(gk), [tab], ["d"], host_covariate=[z])
  np.testing.assert_allclose(got, [want], rtol=1e-12)
  # the busy time keeps o unscaled and does not move with z
  busy = KR.predict_kernel_roofline(_hand_model(gk), [tab], ["d"], what="busy", host_covariate=[z])
  np.testing.assert_allclose(busy, [sum(kern(w, 2e-6) for w in (1e-6, 4e-6, 20e-6))], rtol=1e-12)
  # gamma_k = 0 (or z = 0) is the model without the per-launch response, bitwise
  for m_, z_ in ((_hand_model(0.0), z), (_hand_model(gk), 0.0)):
    np.testing.assert_array_equal(KR.predict_kernel_roofline(m_, [tab], ["d"], host_covariate=[z_]),
                                  KR.predict_kernel_roofline(_hand_model(None), [tab], ["d"], host_covariate=[z_]))


def _collections(floors_us, launch_exp=0.0, n_per=24, seed=0, *, overhead_exp=0.0, max_kernels=40, launch_s=3e-6,
                 overhead_s=10e-6, host_s=40e-6, host_exp=1.0):
  """Programs of 1 to ``max_kernels`` small memory-bound kernels on collections of floor f: per-launch cost
  ``launch_s x (f / 40) ** launch_exp``, program overhead ``overhead_s x (f / 40) ** overhead_exp``, host side
  ``host_s x (f / 40) ** host_exp`` (defaults: 3 us x (f / 40) ** launch_exp, 10 us, 40 us x f / 40)."""
  rng = np.random.default_rng(seed)
  tabs, rt, z = [], [], []
  for f in floors_us:
    for _ in range(n_per):
      n = int(rng.integers(1, max_kernels))
      nbytes = 10 ** rng.uniform(5, 7.5, n)
      tabs.append(_table(nbytes))
      r = f / 40.0
      dev_t = overhead_s * r ** overhead_exp + float(np.sum(nbytes / 2e12 + launch_s * r ** launch_exp))
      host = host_s * r ** host_exp
      rt.append(float((dev_t ** 8 + host ** 8) ** (1 / 8)))
      z.append(np.log(r))
  return tabs, np.asarray(rt), np.asarray(z)


def test_fit_recovers_a_per_launch_exponent_and_holds_gamma_o_at_zero():
  t, y, z = _collections([28.0, 40.0, 56.0], launch_exp=2.0)
  dev = ["gpu"] * len(t)
  m = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=True)
  assert isinstance(m.host_scale_launch, float)
  assert m.host_scale[1] == 0.0
  assert 1.3 < m.host_scale_launch < 2.7, m.host_scale_launch   # the true per-launch exponent: 2
  p = KR.predict_kernel_roofline(m, t, dev, host_covariate=z)
  assert float(np.mean(np.abs(p / y - 1.0))) < 0.08


def test_defaults_unchanged():
  t, y, z = _collections([30.0, 48.0], launch_exp=1.0, n_per=8)
  dev = ["gpu"] * len(t)
  a = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z)
  b = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=False)
  assert a.host_scale_launch is None and b.host_scale_launch is None
  assert_same_kernel_roofline(a, b)
  # a model without the new field predicts as the formula of before (program overhead x exp(gamma_o z))
  hm = _hand_model(None)._replace(host_scale=np.asarray([0.5, 2.0]))
  tab, zz = _table([1e6, 4e6], library=[True, False]), 0.3
  dev_t = 10e-6 * np.exp(2.0 * zz) + 1.1 * (1e-6 + 2e-6) + 1.1 * (4e-6 + 2e-6) + 5e-6
  want = (dev_t ** 8 + (30e-6 * np.exp(0.5 * zz)) ** 8) ** (1 / 8)
  np.testing.assert_allclose(KR.predict_kernel_roofline(hm, [tab], ["d"], host_covariate=[zz]), [want], rtol=1e-12)


def test_bad_input_refused():
  t, y, z = _collections([40.0], launch_exp=1.0, n_per=4)
  dev = ["gpu"] * len(t)
  with pytest.raises(ValueError, match="pass it"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate_launch=True)
  with pytest.raises(ValueError, match="not with"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=True, host_covariate_tied=True)
  with pytest.raises(ValueError, match="not with"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=True,
                           host_covariate_exponents=(1.0, 1.0))
  with pytest.raises(ValueError, match="not with"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=True,
                           host_covariate_overhead=False)
  with pytest.raises(TypeError, match="bool"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_launch=1)
  with pytest.raises(ValueError, match="host_covariate"):   # a launch-scaled model needs z at prediction
    KR.predict_kernel_roofline(_hand_model(1.0), t[:1], ["d"])


def _overhead_collections(floors_us, overhead_exp, n_per=24, seed=1):
  """Programs of 1-20 kernels: program overhead 30 us x (f / 40) ** overhead_exp, host side 20 us (no response)."""
  return _collections(floors_us, 0.0, n_per, seed, overhead_exp=overhead_exp, max_kernels=20, launch_s=2e-6,
                      overhead_s=30e-6, host_s=20e-6, host_exp=0.0)


def test_bound_keeps_a_steep_exponent_inside_and_leaves_a_small_one():
  t, y, z = _overhead_collections([28.0, 40.0, 56.0], overhead_exp=5.0)
  dev = ["gpu"] * len(t)
  free = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z)
  bnd = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_bound=2.0)
  assert free.host_scale[1] > 3.5, free.host_scale            # the true overhead exponent: 5
  assert 1.6 < bnd.host_scale[1] < 2.0, bnd.host_scale        # pressed against the bound, never past it
  assert np.all(np.abs(bnd.host_scale) < 2.0)
  # the stored exponents are the bounded ones: prediction is the formula with them (O x exp(gamma_o z))
  zz = np.log(56.0 / 40.0)
  lo = KR.predict_kernel_roofline(bnd._replace(host_scale=np.asarray([bnd.host_scale[0], 0.0])), t[:1], dev[:1],
                                  host_covariate=[zz])
  hi = KR.predict_kernel_roofline(bnd, t[:1], dev[:1], host_covariate=[zz])
  o = np.exp(bnd.log_program_overhead[0])
  host = np.exp(bnd.log_host_floor[0] + bnd.host_scale[0] * zz)
  dev_lo = (lo[0] ** 8 - host ** 8) ** (1 / 8)
  want = ((dev_lo + o * (np.exp(bnd.host_scale[1] * zz) - 1.0)) ** 8 + host ** 8) ** (1 / 8)
  np.testing.assert_allclose(hi, [want], rtol=1e-9)
  # an exponent well inside the bound fits about as without it (slope 1 at 0)
  t1, y1, z1 = _overhead_collections([28.0, 40.0, 56.0], overhead_exp=0.5)
  f1 = KR.fit_kernel_roofline(t1, y1, dev, _CFG, host_covariate=z1)
  b1 = KR.fit_kernel_roofline(t1, y1, dev, _CFG, host_covariate=z1, host_covariate_bound=20.0)
  np.testing.assert_allclose(b1.host_scale, f1.host_scale, atol=0.05)


def test_bound_refuses_bad_input():
  t, y, z = _collections([40.0], launch_exp=1.0, n_per=4)
  dev = ["gpu"] * len(t)
  for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2"):
    with pytest.raises(ValueError, match="host_covariate_bound"):
      KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_bound=bad)
  with pytest.raises(ValueError, match="pass host_covariate"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate_bound=2.0)
  with pytest.raises(ValueError, match="use one"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_bound=2.0,
                           host_covariate_exponents=(1.0, 1.0))


def test_value_eval_flag_off_by_default_and_validated():
  run_value_eval_flag_checks(
      "VE._KR_DFLOOR_LAUNCH.value is False and VE._KR_DFLOOR_BOUND.value is None",
      [(["--kr_dispatch_floor_launch"], "configures --kr_dispatch_floor_scale"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_launch", "--kr_dispatch_floor_tied"], "not with"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_launch", "--kr_dispatch_floor_host_only"], "not with"),
       (["--kr_dispatch_floor_bound=2"], "configures --kr_dispatch_floor_scale"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_bound=0"], "positive bound"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_bound=2", "--kr_dispatch_floor_exponents=1,1"],
        "positive bound")])
