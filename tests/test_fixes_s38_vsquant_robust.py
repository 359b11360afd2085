"""Regression tests of session 38's fixes: VS-Quant ``coarse_axes``/``coarse_amax``, argument checks of
``bit_error_rate``/``sqnr_db``, GradSigns black-box extraction of integer inputs and the exact
false-claim probability."""

import functools
import itertools
import math
from fractions import Fraction

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import quant
from mlsys_jax.robust import bit_error_rate
from mlsys_jax.robust import gradsigns as gs

DN = (((1,), (0,)), ((), ()))


def _np_vs(x, bits, axis, v, m, coarse_axes, amax=None):
  """float64 reference of :func:`quant.vs_quantize` + dequantize for any axis, non-negative coarse axes
  and an optional calibrated amax (a scalar or an array of the coarse shape in the split layout)."""
  x = np.asarray(x, np.float64)
  q = 2 ** (bits - 1) - 1
  k = x.shape[axis]
  g = -(-k // v)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, g * v - k)
  xs = np.pad(x, widths).reshape(x.shape[:axis] + (g, v) + x.shape[axis + 1:])
  s = np.abs(xs).max(axis=axis + 1, keepdims=True) / q
  red = tuple(sorted({axis} | {a if a < axis else a + 1 for a in coarse_axes if a != axis}))
  cap = None if amax is None else np.abs(np.asarray(amax, np.float64)) / q
  if m is None:
    if cap is not None:
      s = np.minimum(s, cap)
    scale = np.where(s > 0, s, 1.0)
  else:
    top = s.max(axis=red, keepdims=True) if cap is None else np.broadcast_to(cap, s.max(red, keepdims=True).shape)
    gamma = np.where(top > 0, top / (2 ** m - 1), 1.0)
    scale = np.clip(np.round(s / gamma), 1, 2 ** m - 1) * gamma
  out = (np.clip(np.round(xs / scale), -q, q) * scale).reshape(x.shape[:axis] + (g * v,) + x.shape[axis + 1:])
  return np.take(out, np.arange(k), axis=axis)


# ----------------------------------------------------------------------------------------------------
# Bug 1: coarse_axes normalised and validated.


@pytest.mark.parametrize("m", [None, 4])
def test_vs_quantize_negative_coarse_axes_are_the_same_axes(m):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64, 8))
  ref = _np_vs(x, 4, 2, 16, m, (0,))
  for axes in ((0,), (-4,), 0, -4, (0, 2), (-4, -2)):
    qt = jax.jit(lambda a, axes=axes: quant.vs_quantize(a, 4, axis=2, scale_bits=m, coarse_axes=axes))(x)
    if m is not None:
      assert qt.coarse_scale.shape == (1, 3, 1, 1, 8), axes      # shared over axis 0 only (not axis 1)
    np.testing.assert_allclose(quant.vs_dequantize(qt), ref, rtol=1e-5, atol=1e-6, err_msg=str(axes))
  # Several negative axes, vectors along a negative axis.
  qt = quant.vs_quantize(x, 4, axis=-2, coarse_axes=(-4, -3))
  assert qt.coarse_scale.shape == (1, 1, 1, 1, 8)
  np.testing.assert_allclose(quant.vs_dequantize(qt), _np_vs(x, 4, 2, 16, 8, (0, 1)), rtol=1e-5, atol=1e-6)


def test_vs_quantize_bad_coarse_axes_raise_clear_errors():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 8))
  with pytest.raises(ValueError, match=r"coarse_axes entry 7 is out of range for x of rank 3"):
    quant.vs_quantize(x, 4, axis=1, coarse_axes=(7,))
  with pytest.raises(ValueError, match=r"coarse_axes entry -4 is out of range"):
    quant.vs_fake_quant(x, 4, axis=1, coarse_axes=(-4,))
  with pytest.raises(ValueError, match=r"names axis 0 more than once"):
    quant.vs_quantize(x, 4, axis=1, coarse_axes=(0, -3))
  with pytest.raises(TypeError, match=r"coarse_axes\[0\] must be an integer"):
    quant.vs_quantize(x, 4, axis=1, coarse_axes=(0.0,))
  with pytest.raises(TypeError, match=r"coarse_axes must be None, an int or a sequence"):
    quant.vs_quantize(x, 4, axis=1, coarse_axes=object())
  # The reduction axis itself may be listed (its vectors always share the coarse scale): -2 == axis 1.
  a = quant.vs_quantize(x, 4, axis=1, coarse_axes=(0, -2))
  b = quant.vs_quantize(x, 4, axis=1, coarse_axes=(0,))
  chex.assert_trees_all_equal(a, b)
  # Per-row coarse scales given as the (negative) vector axis: same result as coarse_axes=().
  chex.assert_trees_all_equal(quant.vs_quantize(x, 4, axis=-1, vector_size=8, coarse_axes=(-1,)),
                              quant.vs_quantize(x, 4, axis=-1, vector_size=8, coarse_axes=()))


# ----------------------------------------------------------------------------------------------------
# Bug 2: coarse_amax NaN/inf, and coarse_amax with float per-vector scales.


class CoarseAmaxNonFiniteTest(chex.TestCase):
  """A NaN/inf calibrated amax never becomes a finite scale: eager raises, traced gives NaN."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_nan_and_inf_coarse_amax(self):
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 8))

    def fns(w, amax):
      return (quant.vs_dequantize(quant.vs_quantize(w, 4, axis=0, coarse_amax=amax)),
              quant.vs_fake_quant(w, 4, axis=0, scale_bits=4, coarse_amax=amax),
              quant.vs_fake_quant(w, 4, axis=0, scale_bits=None, coarse_amax=amax))

    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      if self.variant.type == chex.ChexVariantType.WITHOUT_JIT:
        with self.assertRaisesRegex(ValueError, "coarse_amax holds 1 NaN/inf"):
          self.variant(fns)(w, jnp.float32(bad))
        continue
      for out in self.variant(fns)(w, jnp.float32(bad)):
        assert np.all(np.isnan(out)), bad

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_channel_amax_with_one_nan_only_poisons_its_channel(self):
    w = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    amax = np.full((1, 1, 8), 1.5, np.float32)
    good = self.variant(lambda w, a: quant.vs_dequantize(quant.vs_quantize(w, 4, axis=0, coarse_amax=a)))(w, amax)
    np.testing.assert_allclose(good, _np_vs(w, 4, 0, 16, 8, (0,), amax), rtol=1e-5, atol=1e-6)
    if self.variant.type == chex.ChexVariantType.WITH_JIT:
      for m in (None, 6):
        out = self.variant(lambda w, a, m=m: quant.vs_dequantize(
            quant.vs_quantize(w, 4, axis=0, scale_bits=m, coarse_amax=a)))(w, _with_nan(amax, 3))
        nan_cols = np.all(np.isnan(np.asarray(out)), axis=0)
        np.testing.assert_array_equal(nan_cols, np.arange(8) == 3)
        ok = np.arange(8) != 3
        np.testing.assert_allclose(np.asarray(out)[:, ok], _np_vs(w, 4, 0, 16, m, (0,), amax)[:, ok],
                                   rtol=1e-5, atol=1e-6)


def _with_nan(a, col):
  a = np.array(a)
  a[0, 0, col] = np.nan
  return a


@pytest.mark.parametrize("m", [None, 4, 8])
@pytest.mark.parametrize("amax", [0.5, 1.7, 100.0])
def test_coarse_amax_matches_reference_for_float_and_two_level_scales(m, amax):
  x = np.random.default_rng(3).standard_t(3, size=(4, 50)).astype(np.float32)
  f = jax.jit(lambda x, a: quant.vs_dequantize(quant.vs_quantize(x, 4, axis=-1, vector_size=8, scale_bits=m,
                                                                  coarse_amax=a)))
  got = np.asarray(f(x, amax))
  ref = _np_vs(x, 4, 1, 8, m, (0, 1), amax)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.abs(got).max() <= amax * (1 + 1e-6) + 1e-6       # the calibrated range bounds every value
  if m is None and amax < np.abs(x).max():   # the cap has an effect with float scales (ignored before)
    dyn = quant.vs_dequantize(quant.vs_quantize(x, 4, axis=-1, vector_size=8, scale_bits=None))
    assert not np.allclose(got, dyn)


def test_float_scale_coarse_amax_saturates_and_stops_the_gradient():
  x = jnp.array([[0.1, -0.25, 0.3, 4.0]])
  y = quant.vs_fake_quant(x, 4, axis=-1, vector_size=2, scale_bits=None, coarse_amax=0.5)
  np.testing.assert_allclose(y, _np_vs(x, 4, 1, 2, None, (0, 1), 0.5), rtol=1e-6)
  np.testing.assert_allclose(y, [[0.75 / 7, -0.25, 2 / 7, 0.5]], rtol=1e-6)    # the old code returned 0.571, 4.0
  g = jax.grad(lambda x: quant.vs_fake_quant(x, 4, axis=-1, vector_size=2, scale_bits=None,
                                             coarse_amax=0.5).sum())(x)
  np.testing.assert_array_equal(g, [[1.0, 1.0, 1.0, 0.0]])       # zero where x saturates
  # Large M approaches the float-scale cap.
  y16 = quant.vs_fake_quant(x, 4, axis=-1, vector_size=2, scale_bits=16, coarse_amax=0.5)
  np.testing.assert_allclose(y16, y, atol=1e-4)
  with pytest.raises(ValueError, match="does not broadcast to the coarse-scale shape"):
    quant.vs_quantize(x, 4, axis=-1, vector_size=2, scale_bits=None, coarse_amax=jnp.ones(3))


@pytest.mark.parametrize("integer", [False, True])
def test_static_act_amax_applies_to_float_vector_scales_in_quant_config(integer):
  """QuantConfig(activation=QuantSpec(8, 'vector', 16)) (scale_bits None) honours a calibrated act_amax."""
  x = np.random.default_rng(0).standard_t(2, size=(6, 32)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(32, 5)).astype(np.float32)
  amax = np.float32(np.percentile(np.abs(x), 90))
  spec = quant.QuantSpec(8, "vector", 16)
  wspec = quant.QuantSpec(8, "vector", 16) if integer else None
  cfg = quant.QuantConfig(weight=wspec, activation=spec, integer=integer)
  got = jax.jit(lambda x, w, a: quant.quantized_dot_general(cfg, act_amax=a)(x, w, DN))(x, w, amax)
  wq = w if wspec is None else _np_vs(w, 8, 0, 16, None, (0,))
  ref = _np_vs(x, 8, 1, 16, None, (0, 1), amax) @ np.asarray(wq, np.float64)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  dyn = quant.quantized_dot_general(cfg)(x, w, DN)
  assert np.abs(np.asarray(got) - np.asarray(dyn)).max() > 1e-2       # the static range has an effect
  # Through the flax module and calibration_to_amax (percentile calibration clips the heavy tail).
  ccfg = quant.QuantConfig(weight=wspec, activation=quant.QuantSpec(8, "vector", 16, calibration="percentile",
                                                                    percentile=90.0), integer=integer)
  layer = nn.Dense(5, use_bias=False, dot_general_cls=functools.partial(quant.QuantDotGeneral, config=ccfg,
                                                                        num_samples=192, num_batches=1))
  variables = {"params": {"kernel": jnp.asarray(w)}}
  _, st = layer.apply(variables, x, mutable=["quant_calib"])
  static = quant.calibration_to_amax(st["quant_calib"], ccfg)
  a = float(static["QuantDotGeneral_0"]["act_amax"])
  assert a < np.abs(x).max()
  y_static = layer.apply({**variables, "quant": static}, x)
  ref = _np_vs(x, 8, 1, 16, None, (0, 1), a) @ np.asarray(wq, np.float64)
  np.testing.assert_allclose(y_static, ref, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(y_static) - np.asarray(layer.apply(variables, x))).max() > 1e-2


# ----------------------------------------------------------------------------------------------------
# Bug 3: bit_error_rate and sqnr_db argument checks.


def _np_ber(a, b, bits):
  d = np.bitwise_xor(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)) & ((1 << bits) - 1)
  return sum(bin(int(v)).count("1") for v in d.ravel()) / (d.size * bits)


@pytest.mark.parametrize("dtype,width", [(jnp.uint8, 8), (jnp.int8, 8), (jnp.uint16, 16), (jnp.int32, 32)])
def test_bit_error_rate_matches_reference(dtype, width):
  info = np.iinfo(dtype)
  rng = np.random.default_rng(width)
  a = rng.integers(info.min, info.max, size=(7, 9), endpoint=True).astype(dtype)
  b = rng.integers(info.min, info.max, size=(7, 9), endpoint=True).astype(dtype)
  for bits in (1, width // 2, width):
    got = jax.jit(functools.partial(bit_error_rate, bits=bits))(a, b)
    assert float(got) == pytest.approx(_np_ber(a, b, bits), rel=1e-6), bits


def test_bit_error_rate_rejects_bad_arguments():
  z = jnp.zeros(4, jnp.uint8)
  assert float(bit_error_rate(z, jnp.ones(4, jnp.uint8), 8)) == 0.125
  with pytest.raises(ValueError, match=r"same shape, got \(4,\) and \(4, 1\)"):
    bit_error_rate(z, jnp.ones((4, 1), jnp.uint8), 8)          # the old code returned 0.5
  with pytest.raises(TypeError, match="same dtype, got uint8 and int32"):
    bit_error_rate(z, jnp.ones(4, jnp.int32), 8)
  with pytest.raises(TypeError, match="integer codes"):
    bit_error_rate(z.astype(jnp.float32), z.astype(jnp.float32), 8)
  with pytest.raises(ValueError, match=r"bits must be an integer in \[1, inf\], got 0"):
    bit_error_rate(z, z, 0)                                     # NaN before
  for bits in (9, 16, 40):                                      # 0.5-scaled rate / OverflowError before
    with pytest.raises(ValueError, match=f"bits must be at most 8, the width of the codes' dtype uint8, got {bits}"):
      bit_error_rate(z, z, bits)
  with pytest.raises(ValueError, match="empty"):
    bit_error_rate(z[:0], z[:0], 8)


def test_sqnr_db_requires_equal_shapes_and_matches_float64():
  with pytest.raises(ValueError, match=r"same shape, got \(4,\) and \(4, 1\)"):
    quant.sqnr_db(jnp.ones(4), jnp.ones((4, 1)) * 0.5)          # 0.0 dB before
  assert float(jax.jit(quant.sqnr_db)(jnp.ones(4), jnp.full(4, 0.5))) == pytest.approx(20 * math.log10(2), rel=1e-6)
  x = np.random.default_rng(0).normal(size=(32, 3))
  xh = x + np.random.default_rng(1).normal(scale=0.1, size=x.shape)
  ref = 10 * np.log10(np.sum(x ** 2) / np.sum((x - xh) ** 2))
  assert float(jax.jit(quant.sqnr_db)(x.astype(np.float32), xh.astype(np.float32))) == pytest.approx(ref, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bug 4: black-box extraction of integer inputs.


def test_extract_blackbox_and_whitebox_reject_integer_inputs():
  wm = gs.gradsigns_keygen(jax.random.PRNGKey(0), (4,), num_bits=8, num_classes=3)
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  xi = jnp.arange(20, dtype=jnp.int32).reshape(5, 4)
  proba = lambda x: jax.nn.softmax(x.astype(jnp.float32) @ w)
  with pytest.raises(TypeError, match="x_target must hold real-valued .* got dtype int32"):
    gs.extract_blackbox(proba, xi, wm)           # the old code returned bits from unperturbed queries
  with pytest.raises(TypeError, match="x_target must hold real-valued"):
    gs.extract_whitebox(lambda x: x @ w, xi.astype(jnp.uint8), wm)
  # The documented fix: cast the inputs; then black-box agrees with white-box.
  bits, q = gs.extract_blackbox(proba, xi.astype(jnp.float32) / 20, wm, step=1e-3)
  np.testing.assert_array_equal(bits, gs.extract_whitebox(lambda x: x @ w, xi.astype(jnp.float32) / 20, wm))
  assert q == 25


# ----------------------------------------------------------------------------------------------------
# Bug 5: false-claim probability for any num_bits.


def test_false_claim_probability_exact_for_any_num_bits():
  exact = lambda m, n: float(Fraction(sum(math.comb(n, k) for k in range(m, n + 1)), 2 ** n))
  assert gs.false_claim_probability(1000, 1024) == exact(1000, 1024)      # OverflowError before
  assert gs.false_claim_probability(1000, 1024) == pytest.approx(1.2369276608711294e-260, rel=1e-12)
  assert gs.false_claim_probability(1024, 1024) == 2.0 ** -1024            # subnormal, exact
  assert gs.false_claim_probability(0, 5000) == 1.0
  assert gs.false_claim_probability(5000, 5000) == 0.0                     # 2^-5000 underflows
  assert gs.false_claim_probability(2500, 5000) == pytest.approx(0.5 + math.comb(5000, 2500) / 2 ** 5001, rel=1e-12)
  for n in range(1, 11):                    # direct enumeration of all 2^n bit strings
    counts = np.bincount([sum(s) for s in itertools.product((0, 1), repeat=n)], minlength=n + 1)
    for m in range(n + 1):
      assert gs.false_claim_probability(m, n) == counts[m:].sum() / 2 ** n == exact(m, n), (m, n)
