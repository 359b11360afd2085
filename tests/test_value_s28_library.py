"""Session 28 helper: the library calls' host-side costs scaled by the collection's dispatch floor, one exponent per
device (fit_kernel_roofline(library_covariate=z_L), value_eval --kr_library_floor_scale).

Mechanism: on the profiled H100 files the idle (wall - busy) of programs with cuBLAS / cuDNN calls is ~9-12 us per
library call on the low-floor hosts and ~31-49 us on the high-floor ones, while XLA's own kernels' idle moves much
less; the variant multiplies each library call's host-side costs (per-launch host cost ``h``, a host-side launch gap
``g``) by ``exp(gamma_{L,d} z_L)``; the floor, XLA's kernels and the device side are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR
from tests.test_value_s26_diagnosis import assert_same_kernel_roofline
from tests.test_value_s26_diagnosis import run_value_eval_flag_checks

_CFG = KR.KernelRooflineConfig(host_floor=True, host_launch=True, steps=1500, calibrate=False, init_host_launch_s=1e-5)
_EW, _GEMM = KR.CLASS_ID["elementwise"], KR.CLASS_ID["gemm"]


def _table(nbytes, library):
  n = len(nbytes)
  lib = np.asarray(library, bool)
  return KR.KernelTable(np.zeros(n), np.asarray(nbytes, np.float64), np.where(lib, _GEMM, _EW).astype(np.int32),
                        np.ones(n), 0, tuple(f"k.{j}" for j in range(n)), lib)


def _hand_model(gl, gap_on_host=False):
  """One device: byte rate 1e12 B/s, o = 2 us, O = 10 us, H = 30 us, host cost per launch 4 us (every class), a
  host-side launch gap of 6 us on library calls with ``gap_on_host``; ``gamma_L`` = ``gl`` (None: no response)."""
  Cn = len(KR.KERNEL_CLASSES)
  return KR.KernelRoofline(("d",), np.log(np.full((1, Cn), 1e20)), np.log(np.full((1, Cn), 1e12)),
                           np.log(np.full((1, Cn), 2e-6)), np.log([10e-6]), 64.0, np.ones((1, Cn)),
                           log_launch_gap=np.log(np.full((1, Cn), 6e-6)) if gap_on_host else None,
                           log_host_floor=np.log([30e-6]), floor_sharpness=8.0,
                           log_host_launch=np.log(np.full((1, Cn), 4e-6)), gap_library_only=gap_on_host,
                           gap_on_host=gap_on_host, library_scale=None if gl is None else np.asarray([gl]))


def test_library_host_costs_scale_as_hand_computed():
  # three kernels of 1e6, 4e6, 2e7 bytes (1, 4, 20 us at 1e12 B/s), the second a library call
  tab = _table([1e6, 4e6, 2e7], library=[False, True, False])
  gl, z = 2.0, np.log(50.0 / 40.0)
  f = np.exp(gl * z)
  dev_t = 10e-6 + sum(w + 2e-6 for w in (1e-6, 4e-6, 20e-6))   # the device side does not move
  for goh, lib_host in ((False, 4e-6), (True, 4e-6 + 6e-6)):
    host = 30e-6 + 2 * 4e-6 + lib_host * f                    # two XLA launches unscaled, the library call x f
    want = (dev_t ** 8 + host ** 8) ** (1 / 8)
    got = KR.predict_kernel_roofline(_hand_model(gl, goh), [tab], ["d"], library_covariate=[z])
    np.testing.assert_allclose(got, [want], rtol=1e-12)
    busy = KR.predict_kernel_roofline(_hand_model(gl, goh), [tab], ["d"], what="busy", library_covariate=[z])
    np.testing.assert_allclose(busy, [dev_t - 10e-6], rtol=1e-12)
    # gamma_L = 0 or z_L = 0: the model without the response, bitwise
    for m_, z_ in ((_hand_model(0.0, goh), z), (_hand_model(gl, goh), 0.0)):
      np.testing.assert_array_equal(KR.predict_kernel_roofline(m_, [tab], ["d"], library_covariate=[z_]),
                                    KR.predict_kernel_roofline(_hand_model(None, goh), [tab], ["d"]))
  # a program without library calls does not move with z_L
  t0 = _table([1e6, 2e7], library=[False, False])
  np.testing.assert_array_equal(KR.predict_kernel_roofline(_hand_model(gl), [t0], ["d"], library_covariate=[z]),
                                KR.predict_kernel_roofline(_hand_model(None), [t0], ["d"]))


def _collections(floors_us, lib_exp, device, n_per=30, seed=0):
  """Host-bound programs of 1-6 small XLA kernels and 0-3 library calls on collections of floor f: host side 20 us
  + 3 us per XLA launch + 15 us x (f / 40) ** lib_exp per library call; device side 5 us + bytes / 2e12."""
  rng = np.random.default_rng(seed)
  tabs, rt, z, dev = [], [], [], []
  for f in floors_us:
    for _ in range(n_per):
      nx, nl = int(rng.integers(1, 7)), int(rng.integers(0, 4))
      nbytes = 10 ** rng.uniform(5, 6.5, nx + nl)
      tabs.append(_table(nbytes, [False] * nx + [True] * nl))
      r = f / 40.0
      dev_t = 5e-6 + float(np.sum(nbytes / 2e12))
      host = 20e-6 + 3e-6 * nx + 15e-6 * r ** lib_exp * nl
      rt.append(float((dev_t ** 8 + host ** 8) ** (1 / 8)))
      z.append(np.log(r))
      dev.append(device)
  return tabs, rt, z, dev


def test_fit_recovers_per_device_library_exponents():
  ta, ya, za, da = _collections([28.0, 40.0, 50.0], 2.0, "h100")
  tb, yb, zb, db = _collections([30.0, 48.0], 0.0, "h200", seed=1)
  t, y, z, dev = ta + tb, np.asarray(ya + yb), np.asarray(za + zb), da + db
  m = KR.fit_kernel_roofline(t, y, dev, _CFG, library_covariate=z)
  gl = dict(zip(m.devices, m.library_scale))
  assert 1.5 < gl["h100"] < 2.5, gl    # the true exponents: 2 on h100, 0 on h200
  assert abs(gl["h200"]) < 0.2, gl
  p = KR.predict_kernel_roofline(m, t, dev, library_covariate=z)
  base = KR.fit_kernel_roofline(t, y, dev, _CFG)
  pb = KR.predict_kernel_roofline(base, t, dev)
  err, err_base = np.mean(np.abs(p / y - 1)), np.mean(np.abs(pb / y - 1))
  assert err < 0.01 and err_base > 0.05, (err, err_base)   # one exponent for both devices could not fit both


def test_defaults_unchanged():
  t, y, z, dev = _collections([30.0, 48.0], 1.0, "gpu", n_per=8)
  y = np.asarray(y)
  a = KR.fit_kernel_roofline(t, y, dev, _CFG)
  b = KR.fit_kernel_roofline(t, y, dev, _CFG, library_covariate=None)
  assert a.library_scale is None and b.library_scale is None
  assert_same_kernel_roofline(a, b)
  np.testing.assert_array_equal(KR.predict_kernel_roofline(a, t, dev), KR.predict_kernel_roofline(b, t, dev,
                                                                                                  library_covariate=None))
  # z_L = 0 everywhere: the exponent gets no gradient and the fit is the one without it
  c = KR.fit_kernel_roofline(t, y, dev, _CFG, library_covariate=np.zeros(len(t)))
  np.testing.assert_array_equal(c.library_scale, [0.0])
  np.testing.assert_allclose(KR.predict_kernel_roofline(c, t, dev, library_covariate=np.zeros(len(t))),
                             KR.predict_kernel_roofline(a, t, dev), rtol=1e-5)


def test_bad_input_refused():
  t, y, z, dev = _collections([40.0], 1.0, "gpu", n_per=4)
  y, z = np.asarray(y), np.asarray(z)
  with pytest.raises(ValueError, match="host_floor"):
    KR.fit_kernel_roofline(t, y, dev, KR.KernelRooflineConfig(steps=5), library_covariate=z)
  with pytest.raises(ValueError, match="library_covariate must be .* finite values"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, library_covariate=z[:-1])
  with pytest.raises(ValueError, match="library_covariate must be .* non-finite"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, library_covariate=[np.nan] * len(t))
  nolib = [tb._replace(library=None) for tb in t]
  with pytest.raises(ValueError, match="library"):
    KR.fit_kernel_roofline(nolib, y, dev, _CFG, library_covariate=z)
  with pytest.raises(ValueError, match="library_covariate: .*model.library_scale is set"):   # needs z_L ...
    KR.predict_kernel_roofline(_hand_model(1.0), t[:1], ["d"])
  with pytest.raises(ValueError, match="library_covariate: .*exactly when"):                 # ... and only then
    KR.predict_kernel_roofline(_hand_model(None), t[:1], ["d"], library_covariate=[0.1])


def test_value_eval_flag_off_by_default_and_validated():
  run_value_eval_flag_checks(
      "VE._KR_LIBF.value is False",
      [(["--kr_library_floor_scale"], "add --kr_host_floor"),
       (["--kr_library_floor_scale", "--kr_host_floor", "--kr_file_host_effect"], "use one of them")])
