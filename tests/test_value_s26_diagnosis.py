"""Session 26 diagnosis (helper): the dispatch-floor covariate's exponents tied (fit_kernel_roofline(
host_covariate_tied=True), value_eval --kr_dispatch_floor_tied) or fixed (host_covariate_exponents=(g_h, g_o),
--kr_dispatch_floor_exponents), and value_eval's opt-in per-row dump (--program_mape_rows_out).

Free exponents let the program overhead's take whatever a few training files put on it (5.5 with h100_collect_a,
0.8 without); tying makes the overhead scale with the host like the floor, fixing them removes the fit."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CFG = KR.KernelRooflineConfig(host_floor=True, steps=300, calibrate=False)


def _collections(floors_us, overhead_exp, n_per=20, seed=0):
  """Programs of 1-30 memory-bound kernels on collections of host floor f: wall = softmax_8(T, H), H = 60 us * (f /
  40 us), T = 20 us * (f / 40 us) ** overhead_exp + kernel times."""
  rng = np.random.default_rng(seed)
  tabs, rt, z = [], [], []
  for f in floors_us:
    for _ in range(n_per):
      n = int(rng.integers(1, 30))
      nbytes = 10 ** rng.uniform(5, 8.3, n)
      tabs.append(KR.KernelTable(np.zeros(n), nbytes, np.full(n, KR.CLASS_ID["elementwise"], np.int32), np.ones(n),
                                 0, tuple(f"k.{j}" for j in range(n)), np.zeros(n, bool)))
      dev_t = 20e-6 * (f / 40.0) ** overhead_exp + float(np.sum(nbytes / 3e12 + 2e-6))
      host = 60e-6 * (f / 40.0)
      rt.append(float((dev_t ** 8 + host ** 8) ** (1 / 8)))
      z.append(np.log(f / 40.0))
  return tabs, np.asarray(rt), np.asarray(z)


def test_tied_exponents_are_one_fitted_number():
  t, y, z = _collections([30.0, 40.0, 50.0], overhead_exp=1.0)
  dev = ["gpu"] * len(t)
  free = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z)
  tied = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_tied=True)
  assert tied.host_scale.shape == (2,) and tied.host_scale[0] == tied.host_scale[1]
  assert free.host_scale[0] != free.host_scale[1]          # the default keeps two free exponents
  assert 0.5 < tied.host_scale[0] < 1.5, tied.host_scale   # the true common exponent: 1
  p = KR.predict_kernel_roofline(tied, t, dev, host_covariate=z)
  assert float(np.mean(np.abs(p / y - 1.0))) < 0.1


def test_fixed_exponents_are_not_fitted_and_zero_is_the_model_without_covariate():
  t, y, z = _collections([30.0, 40.0, 50.0], overhead_exp=1.0, n_per=12)
  dev = ["gpu"] * len(t)
  unit = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_exponents=(1.0, 1.0))
  np.testing.assert_array_equal(unit.host_scale, [1.0, 1.0])
  # (0, 0): the covariate multiplies by exp(0) = 1, so the fit is the one without it
  zero = KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_exponents=(0.0, 0.0))
  plain = KR.fit_kernel_roofline(t, y, dev, _CFG)
  np.testing.assert_allclose(KR.predict_kernel_roofline(zero, t, dev, host_covariate=z),
                             KR.predict_kernel_roofline(plain, t, dev), rtol=1e-5)
  # the fixed unit exponent moves a floor-bound program with its collection's floor
  small = [t[int(np.argmin(y))]]
  lo = KR.predict_kernel_roofline(unit, small, ["gpu"], host_covariate=[np.log(30 / 40.0)])
  hi = KR.predict_kernel_roofline(unit, small, ["gpu"], host_covariate=[np.log(60 / 40.0)])
  assert 1.6 < float(hi[0] / lo[0]) <= 2.0 + 1e-9


def test_tied_and_fixed_exponents_validate():
  t, y, z = _collections([40.0], overhead_exp=1.0, n_per=4)
  dev = ["gpu"] * len(t)
  with pytest.raises(ValueError, match="host_covariate"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate_tied=True)
  with pytest.raises(ValueError, match="one of them"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_tied=True,
                           host_covariate_exponents=(1.0, 1.0))
  with pytest.raises(ValueError, match="two finite"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_exponents=(1.0,))
  with pytest.raises(ValueError, match="host_covariate_overhead"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_overhead=False,
                           host_covariate_tied=True)
  with pytest.raises(TypeError, match="bool"):
    KR.fit_kernel_roofline(t, y, dev, _CFG, host_covariate=z, host_covariate_tied=1)


_FLAG_HARNESS = r"""
import sys
sys.argv = ["value_eval.py"]
sys.path.insert(0, "experiments")
import value_eval as VE
from absl import flags
flags.FLAGS(["value_eval.py"])
assert {defaults}
for argv, msg in {cases!r}:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["value_eval.py", "--part=program_mape", *argv])
  try:
    VE.main([])
    raise AssertionError(f"accepted {{argv}}")
  except ValueError as e:
    assert msg in str(e), (argv, str(e))
print("ok")
"""


def assert_same_kernel_roofline(a, b) -> None:
  """Two fitted KernelRoofline models field by field: arrays bitwise, every other field equal (shared by the tests
  of opt-in fit options that must leave the default fit unchanged)."""
  assert type(a) is type(b)
  for name, x, w in zip(a._fields, a, b):
    if isinstance(x, np.ndarray):
      np.testing.assert_array_equal(x, w, err_msg=name)
    else:
      assert x == w, name


def run_value_eval_flag_checks(defaults: str, cases) -> None:
  """In a fresh process (absl flags are global): ``defaults`` (an expression on ``VE``, value_eval) holds with no
  flags, and the script's ``main`` refuses each ``(argv, message)`` case with a ValueError naming ``message``
  (``--part=program_mape`` unless the case's argv names another part: the last ``--part`` wins)."""
  code = _FLAG_HARNESS.format(defaults=defaults, cases=tuple(cases))
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_value_eval_flags_off_by_default_and_validated():
  run_value_eval_flag_checks(
      'VE._KR_DFLOOR_TIED.value is False and VE._KR_DFLOOR_EXP.value == [] and VE._PM_ROWS_OUT.value == ""',
      [(["--kr_dispatch_floor_tied"], "configure --kr_dispatch_floor_scale"),
       (["--kr_dispatch_floor_exponents=1,1"], "configure --kr_dispatch_floor_scale"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_tied", "--kr_dispatch_floor_exponents=1,1"], "use one"),
       (["--kr_dispatch_floor_scale", "--kr_dispatch_floor_exponents=1"], "two numbers")])
