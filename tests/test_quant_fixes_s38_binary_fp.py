"""Regression tests: packed binary thresholds at zero-padded borders, FP8 scaling with a float16/bfloat16
accumulator output, and zero products in the alignment-shift histogram."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import binary as qb
from mlsys_jax.quant import fp_align
from mlsys_jax.quant.binary import packed as qbp

DN = (((1,), (0,)), ((), ()))


# ----------------------------------------------------------------------------------------------------
# 1. pack_conv2d(pad_value=0, threshold=True): border dots of the other parity.


def _pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def _zero_pad_conv(x, w, strides, padding):
  """Integer dots of a +-1 convolution with zero padding (float32 is exact for these small sums)."""
  out = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(w), strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  return np.asarray(out).astype(np.int64)


def _sign_of_transform(dot, mul, bias, lo, hi):
  """+-1 sign of the float32 output transform ``clip(dot, lo, hi) mul + bias`` (ties -> +1)."""
  dc = np.clip(dot, -np.inf if lo is None else lo, np.inf if hi is None else hi).astype(np.float32)
  y = dc * mul.astype(np.float32) + bias.astype(np.float32)
  return np.where(y < 0, -1.0, 1.0)


def test_threshold_zero_padding_border_reproducer():
  k = jnp.ones((3, 3, 1, 1))
  x = qb.pack_bits(jnp.ones((1, 3, 3, 1)), pad=True)
  th = qb.pack_conv2d(k, (3, 3), pad_value=0.0, mul=[1.0], bias=[-5.5], threshold=True)
  got = qb.unpack_bits(jax.jit(qb.packed_conv2d)(x, th), 1)[0, :, :, 0]
  # dots [[4, 6, 4], [6, 9, 6], [4, 6, 4]] -> dot - 5.5: corners -1.5, edges +0.5, centre +3.5
  np.testing.assert_array_equal(got, [[-1, 1, -1], [1, 1, 1], [-1, 1, -1]])


@pytest.mark.parametrize("strides,padding,clamp", [
    (1, "SAME", (None, None)), (2, "SAME", (0, None)), (1, ((2, 1), (0, 2)), (-3, 5))])
def test_threshold_with_zero_padding_matches_float_transform(strides, padding, clamp):
  rng = np.random.default_rng(38)
  cin, o = 3, 8                                  # K = 27 (odd); border dots sum 12 or 18 taps (even)
  x, w = _pm1(rng, (2, 7, 6, cin)), _pm1(rng, (3, 3, cin, o))
  mul = rng.normal(size=o).astype(np.float32)
  bias = (rng.normal(size=o) * 3 + 0.5).astype(np.float32)
  mul[0], bias[0] = 0.0, -0.25                   # mul = 0: the sign of bias alone
  mul[1], bias[1] = -1.0, 3.0                    # mul < 0, tie y == 0 at dot = 3 (odd) -> +1
  mul[2], bias[2] = 0.5, -2.0                    # tie at dot = 4 (even)
  mul[3], bias[3] = 1.0, 0.5                     # flips between dot = -1 and 0: even/odd boundary
  layer = qb.pack_conv2d(w, (7, 6), strides, padding, pad_value=0.0, mul=mul, bias=bias, clamp=clamp,
                         threshold=True)
  got = qb.unpack_bits(jax.jit(qb.packed_conv2d)(qb.pack_bits(x, pad=True), layer), o)
  pads = padding if isinstance(padding, str) else tuple(padding)
  dot = _zero_pad_conv(x, w, (strides, strides), pads)
  assert np.any(dot % 2 == 0) and np.any(dot % 2 == 1)     # both parities are reachable
  np.testing.assert_array_equal(got, _sign_of_transform(dot, mul, bias, *clamp))


@pytest.mark.parametrize("k", [1, 2, 7, 27, 100])
@pytest.mark.parametrize("clamp", [(None, None), (0, None), (-3, 5)])
def test_thresholds_exact_for_every_integer_dot(k, clamp):
  rng = np.random.default_rng(k)
  c = 12
  mul = rng.normal(size=c).astype(np.float32)
  bias = (rng.normal(size=c) * k / 2).astype(np.float32)
  mul[:4] = [0.0, -0.0, -1.0, 1e-30]
  bias[:4] = [0.0, -1.0, 1.0, -0.0]
  mul[4], bias[4] = 0.25, -0.25                  # tie at dot = 1
  thr, flip = qbp._thresholds(mul, bias, k, *clamp)
  dots = np.arange(-k, k + 1)[:, None]
  neg = np.where(flip, dots > thr, dots < thr)
  np.testing.assert_array_equal(np.where(neg, -1.0, 1.0), _sign_of_transform(dots, mul, bias, *clamp))


# ----------------------------------------------------------------------------------------------------
# 2. FP8 'pow2' operand scaling with out_dtype float16/bfloat16.


def _round_to(v: Fraction, p: int, qmin: int, emax: int) -> float:
  """Nearest-even rounding of an exact rational to ``p`` bits, quantum >= 2^qmin, overflow -> inf."""
  if v == 0:
    return 0.0
  a = abs(v)
  e = a.numerator.bit_length() - a.denominator.bit_length()
  while Fraction(2) ** e > a:
    e -= 1
  while Fraction(2) ** (e + 1) <= a:
    e += 1
  q = max(e - p + 1, qmin)
  n, rem = divmod(a / Fraction(2) ** q, 1)
  n = int(n)
  if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
    n += 1
  val = n * Fraction(2) ** q
  if val >= Fraction(2) ** (emax + 1):
    return math.copysign(math.inf, v)
  return math.copysign(float(val), v)


_OUT = {"float16": (11, -24, 15), "bfloat16": (8, -133, 127)}


def _exact_ref(qa, ka, qb_, kb, out):
  """Correctly rounded exact inner products of the unscaled FP8 operands ``q 2^-k``."""
  a = [[Fraction(float(v)) / Fraction(2) ** int(ka) for v in row] for row in np.asarray(qa, np.float64)]
  b = [[Fraction(float(v)) / Fraction(2) ** int(kb) for v in row] for row in np.asarray(qb_, np.float64)]
  res = np.zeros((len(a), len(b[0])))
  for i in range(len(a)):
    for j in range(len(b[0])):
      res[i, j] = _round_to(sum(a[i][t] * b[t][j] for t in range(len(b))), *_OUT[out])
  return res


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_float16_output_reproducer(fmt):
  dot = fp_align.fp_align_dot_general(fp_align.FpAlignConfig(fmt, align_bits=8, out_dtype=jnp.float16))
  got = jax.jit(lambda a, b: dot(a, b, DN))(jnp.full((1, 4), 0.5), jnp.full((4, 1), 0.5))
  np.testing.assert_array_equal(np.asarray(got), [[1.0]])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("out", ["float16", "bfloat16"])
def test_fp8_scaled_dot_is_correctly_rounded_in_narrow_output(fmt, out):
  rng = np.random.default_rng(2)
  cfg = fp_align.FpAlignConfig(fmt, align_bits=None, out_dtype=jnp.dtype(out))
  # Same-sign operands close to their maxima: the scaled sums (~12 x 448^2 for E4M3) overflow float16,
  # the true sums (~2^-10) do not; row 0's true sums (~2^-16) are float16 subnormals.
  a = rng.uniform(0.25, 1.0, (5, 12)).astype(np.float32)
  b = (rng.uniform(0.25, 1.0, (12, 4)) * 2.0 ** -12).astype(np.float32)
  a[3:] *= rng.choice([-1.0, 1.0], (2, 12)).astype(np.float32)
  b[:, 3] *= rng.choice([-1.0, 1.0], 12).astype(np.float32)
  a[0] *= 2.0 ** -6
  got = np.asarray(jax.jit(lambda u, v: fp_align.fp_align_dot_general(cfg)(u, v, DN))(a, b), np.float64)
  (qa, ka), (qb_, kb) = fp_align._cast(a, cfg), fp_align._cast(b, cfg)
  want = _exact_ref(qa.astype(jnp.float32), ka, qb_.astype(jnp.float32), kb, out)
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, want)
  # the same through the convolution path (1x1 convolution = the same inner products)
  conv = fp_align.fp_align_conv_general_dilated(cfg)
  gc = jax.jit(lambda u, v: conv(u, v, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))(
      a[:, None, None, :], b[None, None])
  np.testing.assert_array_equal(np.asarray(gc, np.float64)[:, 0, 0, :], want)


@pytest.mark.parametrize("fmt,w,conv", [("fp8_e4m3", 8, "truncate"), ("fp8_e5m2", 2, "drop"),
                                        ("fp16", 4, "truncate")])
def test_float32_output_bitwise_unchanged_by_folding_the_scale(fmt, w, conv):
  # float32 output, no overflow or underflow: identical to rounding the scaled sum, then scaling back
  rng = np.random.default_rng(5)
  cfg = fp_align.FpAlignConfig(fmt, align_bits=w, convention=conv)
  a = (rng.normal(size=(6, 40)) * np.exp2(rng.uniform(-6, 6, (6, 40)))).astype(np.float32)
  b = (rng.normal(size=(40, 5)) * np.exp2(rng.uniform(-6, 6, (40, 5)))).astype(np.float32)
  got = jax.jit(lambda u, v: fp_align.fp_align_dot_general(cfg)(u, v, DN))(a, b)
  (qa, ka), (qb_, kb) = fp_align._cast(a, cfg), fp_align._cast(b, cfg)
  old = fp_align.fp_dot(qa, qb_, fmt=fmt, align_bits=w, convention=conv)
  old = np.asarray(old, np.float64) * 2.0 ** -(int(ka) + int(kb))
  np.testing.assert_array_equal(np.asarray(got, np.float64), old)


# ----------------------------------------------------------------------------------------------------
# 3. alignment_shift_histogram: zero products are not counted.


def _hist_ref(a: np.ndarray, b: np.ndarray, fmt: str) -> np.ndarray:
  f = fp_align.FORMATS[fmt]
  e = lambda v: max(math.frexp(abs(float(v)))[1] - 1, f.emin)
  out = np.zeros(fp_align.max_alignment_shift(fmt) + 1, np.int64)
  for i in range(a.shape[0]):
    for j in range(b.shape[1]):
      pe = [e(a[i, t]) + e(b[t, j]) for t in range(a.shape[1]) if a[i, t] != 0 and b[t, j] != 0]
      for p in pe:
        out[max(pe) - p] += 1
  return out


def test_histogram_ignores_zero_products_reproducer():
  f = jax.jit(functools.partial(fp_align.alignment_shift_histogram, fmt="fp16"))
  h = f(jnp.array([[0.0, 0.0]], jnp.float16), jnp.array([[2.0], [4.0]], jnp.float16))
  np.testing.assert_array_equal(np.asarray(h), np.zeros(59))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_histogram_matches_reference_with_zeros_and_large_operands(fmt):
  rng = np.random.default_rng(3)
  dt = fp_align.FORMATS[fmt].dtype
  a = rng.normal(size=(7, 9)) * np.exp2(rng.uniform(-4, 8, (7, 9))) * (rng.random((7, 9)) > 0.4)
  b = rng.normal(size=(9, 6)) * np.exp2(rng.uniform(-4, 8, (9, 6))) * (rng.random((9, 6)) > 0.4)
  a[0] = 0.0                                     # an all-zero row against large weights
  b[:, 1] = 0.0
  b[:, 2] = 100.0
  a, b = np.asarray(a).astype(dt), np.asarray(b).astype(dt)
  got = jax.jit(functools.partial(fp_align.alignment_shift_histogram, fmt=fmt, block_elems=64))(a, b)
  want = _hist_ref(a, b, fmt)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert want.sum() == np.sum((a.astype(np.float64) != 0)[:, :, None] & (b.astype(np.float64) != 0)[None])


def test_dot_general_module_records_only_nonzero_products():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(6, 5)) * 4).astype(np.float32)
  x[:2] = 0.0                                    # e.g. dead ReLU rows
  kernel = (rng.normal(size=(5, 3)) * 8).astype(np.float16).astype(np.float32)
  x = x.astype(np.float16).astype(np.float32)
  cls = functools.partial(fp_align.FpAlignDotGeneral, config=fp_align.FpAlignConfig("fp16", None))
  dense = nn.Dense(3, use_bias=False, dot_general_cls=cls)
  _, st = jax.jit(lambda v, xb: dense.apply(v, xb, mutable=[fp_align.SPREAD_COLLECTION]))(
      {"params": {"kernel": kernel}}, x)
  h = np.asarray(st[fp_align.SPREAD_COLLECTION]["FpAlignDotGeneral_0"]["shift_histogram"])
  np.testing.assert_array_equal(h, _hist_ref(x.astype(np.float16), kernel.astype(np.float16), "fp16"))
