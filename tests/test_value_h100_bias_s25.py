"""Session 25: the kernel roofline's host covariate (fit_kernel_roofline(host_covariate=z), value_eval's
--kr_dispatch_floor_scale with z = log(collection dispatch floor / 40 us)).

The H100 bias of session 24 was the host side: the per-device host floor and program overhead were fitted mostly
on a collection whose host dispatched slower (h100_collect_a: 48 us measured dispatch floor; the new files 35 and
28 us), so small programs of a new collection were predicted slow. Here: on synthetic collections whose host floor
scales with a known per-collection covariate, the covariate model recovers the scaling and predicts a held-out
collection better; z = 0 gives the model without it; prediction refuses a missing covariate; value_eval's flag is
off by default and maps each row to its file's floor. The per-file host factor (fit_kernel_roofline(host_group=...),
--kr_file_host_effect) makes a device's host floor its files' equal-weight average, not its programs' average."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mlsys_jax.cost import kernel_roofline as KR

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CFG = KR.KernelRooflineConfig(host_floor=True, steps=400, calibrate=False)


def _collections(floors_us, n_per=24, seed=0):
  """Programs of 1-40 memory-bound elementwise kernels; wall = softmax_8(T, H) with H = 60 us * (f / 40 us) and
  T = 10 us + kernel times: small programs sit on the floor, large ones on their kernels."""
  rng = np.random.default_rng(seed)
  tabs, rt, z = [], [], []
  for f in floors_us:
    for _ in range(n_per):
      n = int(rng.integers(1, 40))
      nbytes = 10 ** rng.uniform(5, 8.3, n)
      t = KR.KernelTable(np.zeros(n), nbytes, np.full(n, KR.CLASS_ID["elementwise"], np.int32), np.ones(n), 0,
                         tuple(f"k.{j}" for j in range(n)), np.zeros(n, bool))
      dev_t = 10e-6 + float(np.sum(nbytes / 3e12 + 2e-6))
      host = 60e-6 * (f / 40.0)
      tabs.append(t)
      rt.append(float((dev_t ** 8 + host ** 8) ** (1 / 8)))
      z.append(np.log(f / 40.0))
  return tabs, np.asarray(rt), np.asarray(z)


def test_host_covariate_recovers_floor_scaling_and_transfers():
  tr_t, tr_y, tr_z = _collections([32.0, 40.0, 48.0, 56.0])
  te_t, te_y, te_z = _collections([26.0], seed=1)
  dev = ["gpu"] * len(tr_t)
  plain = KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG)
  cov = KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG, host_covariate=tr_z)
  assert plain.host_scale is None and cov.host_scale.shape == (2,)
  assert 0.5 < cov.host_scale[0] < 1.5   # true exponent of the floor: 1
  ape = lambda p: float(np.mean(np.abs(p / te_y - 1.0)))
  e_plain = ape(KR.predict_kernel_roofline(plain, te_t, ["gpu"] * len(te_t)))
  e_cov = ape(KR.predict_kernel_roofline(cov, te_t, ["gpu"] * len(te_t), host_covariate=te_z))
  assert e_cov < 0.5 * e_plain, (e_cov, e_plain)
  host = KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG, host_covariate=tr_z, host_covariate_overhead=False)
  assert host.host_scale[1] == 0.0 and 0.5 < host.host_scale[0] < 1.5   # --kr_dispatch_floor_host_only: gamma_o = 0


def test_zero_covariate_is_the_model_without_it_and_prediction_needs_it():
  tr_t, tr_y, _ = _collections([40.0], n_per=16)
  dev = ["gpu"] * len(tr_t)
  plain = KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG)
  zero = KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG, host_covariate=np.zeros(len(tr_t)))
  p0 = KR.predict_kernel_roofline(plain, tr_t, dev)
  p1 = KR.predict_kernel_roofline(zero, tr_t, dev, host_covariate=np.zeros(len(tr_t)))
  np.testing.assert_allclose(p1, p0, rtol=1e-5)
  np.testing.assert_array_equal(zero.host_scale, [0.0, 0.0])   # no gradient at z = 0
  with pytest.raises(ValueError, match="host_covariate"):
    KR.predict_kernel_roofline(zero, tr_t, dev)
  with pytest.raises(ValueError, match="host_covariate"):
    KR.predict_kernel_roofline(plain, tr_t, dev, host_covariate=np.zeros(len(tr_t)))
  with pytest.raises(ValueError, match="host_covariate"):
    KR.fit_kernel_roofline(tr_t, tr_y, dev, _CFG, host_covariate=np.zeros(3))


def _floor_bound(n, host_s, seed):
  """``n`` programs of 1-3 tiny kernels (device time ~10 us): wall = softmax_8(T, host_s), i.e. about host_s."""
  rng = np.random.default_rng(seed)
  tabs, rt = [], []
  for _ in range(n):
    k = int(rng.integers(1, 4))
    nbytes = 10 ** rng.uniform(4, 6, k)
    tabs.append(KR.KernelTable(np.zeros(k), nbytes, np.full(k, KR.CLASS_ID["elementwise"], np.int32), np.ones(k),
                               0, tuple(f"k.{j}" for j in range(k)), np.zeros(k, bool)))
    dev_t = 10e-6 + float(np.sum(nbytes / 3e12 + 2e-6))
    rt.append(float((dev_t ** 8 + host_s ** 8) ** (1 / 8)))
  return tabs, np.asarray(rt)


def test_file_host_effect_weighs_files_equally_and_one_file_is_the_plain_model():
  ta, ya = _floor_bound(90, 80e-6, 0)   # a large collection with a slow host
  tb, yb = _floor_bound(10, 40e-6, 1)   # a small one with a fast host
  tabs, y = ta + tb, np.concatenate([ya, yb])
  dev, grp = ["gpu"] * len(tabs), np.array([0] * 90 + [1] * 10)
  plain = KR.fit_kernel_roofline(tabs, y, dev, _CFG)
  fe = KR.fit_kernel_roofline(tabs, y, dev, _CFG, host_group=grp)
  h_plain, h_fe = float(np.exp(plain.log_host_floor[0])), float(np.exp(fe.log_host_floor[0]))
  assert h_plain > 70e-6, h_plain                           # the programs' average: the large collection's host
  assert abs(np.log(h_fe / np.sqrt(80e-6 * 40e-6))) < 0.1, h_fe   # the files' (log) average: ~57 us
  one = KR.fit_kernel_roofline(tabs, y, dev, _CFG, host_group=np.zeros(len(tabs), np.int64))
  np.testing.assert_allclose(KR.predict_kernel_roofline(one, tabs, dev), KR.predict_kernel_roofline(plain, tabs, dev),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="host_group"):
    KR.fit_kernel_roofline(tabs, y, dev, _CFG, host_group=np.zeros(3, np.int64))
  # a covariate constant per group (a file's floor per file) is absorbed by the group factors: refused
  with pytest.raises(ValueError, match="constant within every host_group"):
    KR.fit_kernel_roofline(tabs, y, dev, _CFG, host_group=grp, host_covariate=np.log(np.where(grp == 0, 2.0, 1.0)))


_SNIPPET = r"""
import sys, types, numpy as np
sys.argv = ["value_eval.py"]
sys.path.insert(0, "experiments")
import value_eval as VE
from absl import flags
flags.FLAGS(["value_eval.py"])
assert VE._KR_DFLOOR.value is False and VE._KR_FILE_HOST.value is False
from mlsys_jax.cost import dataset as cds
floors = {"a.npz": 48e-6, "b.npz": 28e-6}
cds.load_dataset = lambda p: types.SimpleNamespace(meta={"dispatch_floor_s": floors[p]})
ds = types.SimpleNamespace(group=np.array([0, 0, 1, 2, 2]))
desc = {"merged": True, "sources": [{"programs_kept": 2}, {"programs_kept": 1}]}
z = VE._dispatch_floor_covariate(ds, desc, ["a.npz", "b.npz"])
np.testing.assert_allclose(z, np.log(np.array([48, 48, 48, 28, 28]) / 40.0))
assert desc["dispatch_floor_us"] == {"a.npz": 48.0, "b.npz": 28.0}
for argv, msg in ((["--kr_dispatch_floor_host_only"], "add it"),
                  (["--kr_dispatch_floor_scale", "--kr_file_host_effect"], "use one of them")):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["value_eval.py"] + argv)
  try:
    VE.part_program_mape()
    raise AssertionError(f"{argv} accepted")
  except ValueError as e:
    assert msg in str(e), e
print("ok")
"""


def test_value_eval_flag_off_by_default_and_rows_get_their_files_floor():
  r = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
