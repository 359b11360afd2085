"""One-pass quantize kernels (mlsys_jax/quant/_pallas_quant.py) against the XLA path, bit for bit.

On CPU the kernels run in Pallas' interpreter; the public functions use them on GPU only.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import _pallas_quant as pq
from mlsys_jax.quant import fixed_point as fp
from mlsys_jax.quant import vsquant as vs

TILE = {"cols": 16, "chunk": 32, "row_elems": 256}


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
  np.testing.assert_array_equal(a, b)


def _onepass(x, bits, symmetric, unsigned, axis):
  axes = fp._norm_axes(axis, x.ndim)
  groups = fp._onepass_groups(x, axes)
  assert groups is not None
  tile = {k: v for k, v in TILE.items() if (k == "row_elems") == (groups == "rows")}
  return fp._quantize_onepass(x, bits, symmetric, unsigned, axes, groups, "interpret", **tile)


def _check_quantize(x, bits, symmetric, unsigned, axis):
  ref = fp.quantize(x, bits, symmetric=symmetric, unsigned=unsigned, axis=axis)
  got = jax.jit(lambda a: _onepass(a, bits, symmetric, unsigned, axis))(x)
  for f in ("codes", "scale", "zero_point"):
    _same(getattr(got, f), getattr(ref, f))
  assert (got.bits, got.symmetric, got.unsigned, got.axis) == (ref.bits, ref.symmetric, ref.unsigned, ref.axis)


def _data(shape, seed=0, dtype=jnp.float32):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x *= np.exp(np.random.default_rng(seed + 1).uniform(-3, 3, shape[-1:])).astype(np.float32)  # mixed ranges
  return jnp.asarray(x).astype(dtype)


def test_routing():
  x = jnp.zeros((3, 4, 5))
  assert fp._onepass_groups(x, (0,)) == "cols" and fp._onepass_groups(x, (0, 1)) == "cols"
  assert fp._onepass_groups(x, (2,)) == "rows" and fp._onepass_groups(x, (1, 2)) == "rows"
  assert fp._onepass_groups(x, (0, 1, 2)) is None          # per tensor: XLA
  assert fp._onepass_groups(x, (1,)) is None               # middle axis: XLA
  assert fp._onepass_groups(jnp.zeros((2, 40000)), (1,)) is None   # a row longer than a program
  assert fp._onepass_groups(jnp.zeros((2, 3), jnp.int8), (0,)) is None
  assert vs._onepass_ok(jnp.zeros((64, 3)), 0, 16, None, None)
  assert not vs._onepass_ok(jnp.zeros((60, 3)), 0, 16, None, None)     # K not a multiple of V: XLA
  assert not vs._onepass_ok(jnp.zeros((64, 3)), 1, 16, None, None)
  assert not vs._onepass_ok(jnp.zeros((64, 3)), 0, 16, None, 1.0)      # calibrated coarse scale: XLA
  if jax.default_backend() != "gpu":
    assert pq.default_impl() is None                       # the public functions stay on XLA here


def test_rne_is_round_half_even():
  v = np.concatenate([np.random.default_rng(0).standard_normal(20000).astype(np.float32) * 300,
                      np.arange(-40, 40, 0.5, dtype=np.float32),
                      np.float32([np.inf, -np.inf, 2 ** 23 + 1, -2 ** 24, 0.49999997, -0.49999997, 1e-40,
                                  np.nextafter(np.float32(2.5), np.float32(3))])])
  np.testing.assert_array_equal(np.asarray(jax.jit(pq._rne)(v)), np.round(v))


@pytest.mark.parametrize("symmetric,unsigned,bits,axis,shape,dtype", [
    (False, True, 8, (0, 1, 2), (3, 3, 5, 7), jnp.bfloat16),     # per output channel of an HWIO kernel
    (True, False, 4, -1, (45, 23), jnp.float32),                 # per row, ragged
    pytest.param(False, False, 12, 0, (77, 40), jnp.float32, marks=pytest.mark.slow),  # stored signed
])
def test_quantize_matches_xla(symmetric, unsigned, bits, axis, shape, dtype):
  _check_quantize(_data(shape, dtype=dtype), bits, symmetric, unsigned, axis)


@pytest.mark.slow
@pytest.mark.parametrize("symmetric,unsigned,bits,axis", list(itertools.product(
    [True, False], [True, False], [2, 8, 16], [0, 1])))
def test_quantize_matches_xla_sweep(symmetric, unsigned, bits, axis):
  _check_quantize(_data((70, 50), seed=bits), bits, symmetric, unsigned, axis)


def test_quantize_ties_round_to_even():
  # Row range [-2.5, 127] -> symmetric 8-bit scale 1: every .5 is a tie between two codes.
  x = jnp.asarray([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 100.5]], jnp.float32)
  got = jax.jit(lambda a: _onepass(a, 8, True, False, 1))(x)
  assert got.codes.tolist() == [[127, 0, 2, 2, -2, 0, 4, 100]]
  _check_quantize(x, 8, True, False, 1)


def test_nonfinite_groups_get_nan_scale():
  x = np.array(_data((40, 6)))
  x[3, 1], x[39, 4] = np.nan, np.inf
  x = jnp.asarray(x)
  for axis, bad in ((0, [1, 4]), (1, [3, 39])):
    ref = jax.jit(lambda a: fp.quantize(a, 8, axis=axis, symmetric=False, unsigned=True))(x)
    got = jax.jit(lambda a: _onepass(a, 8, False, True, axis))(x)
    s = np.asarray(got.scale).ravel()
    assert np.all(np.isnan(s[bad])) and np.all(np.isfinite(np.delete(s, bad)))
    _same(got.scale, ref.scale)
    ok = np.ones(x.shape, bool)
    if axis == 0:
      ok[:, bad] = False
    else:
      ok[bad, :] = False
    np.testing.assert_array_equal(np.asarray(got.codes)[ok], np.asarray(ref.codes)[ok])


@pytest.mark.parametrize("bits,vsize,scale_bits,shape", [(4, 16, 8, (96, 37)), (8, 32, None, (64, 20)),
                                                         pytest.param(4, 16, 3, (128, 18), marks=pytest.mark.slow)])
def test_vs_quantize_matches_xla(bits, vsize, scale_bits, shape):
  w = _data(shape, seed=vsize)
  ref = vs.vs_quantize(w, bits, axis=0, vector_size=vsize, scale_bits=scale_bits)
  got = jax.jit(lambda a: vs._vs_quantize_onepass(a, bits, vsize, scale_bits, "interpret", cols=16,
                                                  chunk=64))(w)
  for f in ("codes", "vector_scale", "coarse_scale"):
    _same(getattr(got, f), getattr(ref, f))
  assert (got.bits, got.scale_bits, got.vector_size, got.axis) == (bits, scale_bits, vsize, 0)


def test_vs_quantize_nonfinite_column():
  w = np.array(_data((64, 5)))
  w[20, 2] = np.nan
  ref = jax.jit(lambda a: vs.vs_quantize(a, 4, axis=0, vector_size=16))(jnp.asarray(w))
  got = jax.jit(lambda a: vs._vs_quantize_onepass(a, 4, 16, 8, "interpret", cols=16, chunk=32))(jnp.asarray(w))
  c = np.asarray(got.coarse_scale).ravel()
  assert np.isnan(c[2]) and np.all(np.isfinite(np.delete(c, 2)))
  _same(got.coarse_scale, ref.coarse_scale)
  _same(got.vector_scale, ref.vector_scale)
  np.testing.assert_array_equal(np.delete(np.asarray(got.codes), 2, axis=1),
                                np.delete(np.asarray(ref.codes), 2, axis=1))


@pytest.mark.slow
def test_self_test_runs_while_tracing(monkeypatch):
  """The GPU self-test (kernels vs XLA) runs on its own thread, so it works when first called inside jit."""
  o1, o2 = pq.quantize_2d, pq.vs_quantize_cols
  monkeypatch.setattr(pq, "quantize_2d", lambda *a, impl="pallas", **k: o1(*a, impl="interpret", **k))
  monkeypatch.setattr(pq, "vs_quantize_cols", lambda *a, impl="pallas", **k: o2(*a, impl="interpret", **k))
  pq._kernel_self_test.cache_clear()
  seen = []
  jax.jit(lambda x: seen.append(pq._kernel_self_test()) or x)(jnp.ones(2))
  pq._kernel_self_test.cache_clear()
  assert seen == [True]
