"""Tests of mlsys_jax.quant.fp_align against an exact Python (fractions) reference and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mlsys_jax.quant import fp_align
from mlsys_jax.quant.fp_align import fp_dot

FMTS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
_OUT_P = {"float32": (24, -149, 127), "float16": (11, -24, 15), "bfloat16": (8, -133, 127)}


# ----------------------------------------------------------------------------------------------------
# Exact reference: Python integers and Fractions, one product at a time.


def _exp(x: float, f) -> int:
  """Exponent of a nonzero finite value of format f (subnormals: emin)."""
  return max(math.frexp(abs(x))[1] - 1, f.emin)


def _round_to(v: Fraction, out: str) -> float:
  """Round an exact rational to nearest-even in the output format (p bits, smallest quantum 2^qmin)."""
  p, qmin, emax = _OUT_P[out]
  if v == 0:
    return 0.0
  sign, a = (-1 if v < 0 else 1), abs(v)
  e = math.floor(math.log2(a.numerator)) - math.floor(math.log2(a.denominator))
  while Fraction(2) ** e > a:
    e -= 1
  while Fraction(2) ** (e + 1) <= a:
    e += 1
  q = max(e - p + 1, qmin)                      # quantum exponent
  scaled = a / Fraction(2) ** q
  n = scaled.numerator // scaled.denominator
  rem = scaled - n
  if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
    n += 1
  val = n * Fraction(2) ** q
  if val >= Fraction(2) ** (emax + 1):
    return sign * math.inf
  return sign * float(val)


def _ref_dot(a: np.ndarray, b: np.ndarray, fmt: str, w: int | None, conv: str, out="float32"):
  f = fp_align.FORMATS[fmt]
  w = fp_align.max_alignment_shift(fmt) if w is None else w
  m2 = 2 * f.man_bits
  res = np.zeros((a.shape[0], b.shape[1]))
  for i in range(a.shape[0]):
    for j in range(b.shape[1]):
      prods = [(float(a[i, k]), float(b[k, j])) for k in range(a.shape[1])]
      nz = [(x, y) for x, y in prods if x != 0 and y != 0]
      if not nz:
        res[i, j] = 0.0
        continue
      emax = max(_exp(x, f) + _exp(y, f) for x, y in nz)
      acc = 0                                      # in units of 2^(emax - 2M - w)
      for x, y in nz:
        d = emax - _exp(x, f) - _exp(y, f)
        t = Fraction(x) * Fraction(y) / Fraction(2) ** (emax - m2 - w)   # in accumulator LSBs
        if conv == "drop":
          if d > w:
            continue
          assert t.denominator == 1
          acc += int(t)
        else:
          mag = abs(t)
          acc += (1 if t > 0 else -1) * (mag.numerator // mag.denominator)
      res[i, j] = _round_to(acc * Fraction(2) ** (emax - m2 - w), out)
  return res


def _rand(fmt, shape, rng, spread=6.0, zeros=0.0):
  """Random representable values of fmt with exponents spread over about 2*spread binades."""
  dt = fp_align.FORMATS[fmt].dtype
  x = rng.normal(size=shape) * np.exp2(rng.uniform(-spread, spread, size=shape))
  x = x * (rng.uniform(size=shape) >= zeros)
  return np.asarray(x).astype(dt)


# ----------------------------------------------------------------------------------------------------


def test_max_alignment_shift_closed_form():
  assert [fp_align.max_alignment_shift(f) for f in FMTS] == [58, 506, 28, 58]
  for name in FMTS:  # against ml_dtypes' finfo: 2 * (maxexp - 1 - minexp)
    fi = ml_dtypes.finfo(fp_align.FORMATS[name].dtype)
    assert fp_align.max_alignment_shift(name) == 2 * (int(np.log2(float(fi.max))) - int(np.log2(
        float(fi.smallest_normal))))


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_roundtrip_all_codes(fmt):
  f = fp_align.FORMATS[fmt]
  codes = np.arange(256, dtype=np.uint8) if f.width == 8 else np.arange(0, 65536, 7, dtype=np.uint16)
  x = codes.view(f.dtype)
  d = jax.jit(fp_align.decode, static_argnums=1)(jnp.asarray(x), fmt)
  finite = np.isfinite(x.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(d.bad), ~finite)
  val = np.asarray(d.sig).astype(np.float64) * np.exp2(np.asarray(d.exp) - f.man_bits)
  np.testing.assert_array_equal(val[finite], x.astype(np.float64)[finite])


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("fmt,w,conv", [("fp16", None, "truncate"), ("fp16", 3, "drop"),
                                        ("bf16", 6, "truncate"), ("fp8_e4m3", 2, "drop"),
                                        ("fp8_e5m2", 0, "truncate"),
                                        pytest.param("fp16", 4, "truncate", marks=_SLOW),
                                        pytest.param("bf16", None, "drop", marks=_SLOW),
                                        pytest.param("fp8_e4m3", 5, "truncate", marks=_SLOW)])
def test_matches_exact_reference(fmt, w, conv):
  rng = np.random.default_rng(hash((fmt, w, conv)) % 2**32)
  spread = {"fp16": 5.0, "bf16": 20.0, "fp8_e4m3": 3.0, "fp8_e5m2": 6.0}[fmt]
  a = _rand(fmt, (5, 7), rng, spread, zeros=0.15)
  b = _rand(fmt, (7, 4), rng, spread, zeros=0.15)
  got = np.asarray(fp_dot(a, b, fmt=fmt, align_bits=w, convention=conv))
  np.testing.assert_array_equal(got, _ref_dot(a, b, fmt, w, conv))


def test_exact_is_correctly_rounded_and_cancels():
  # Large products cancel exactly; only the tiny product remains (needs the full 58-bit window).
  a = np.array([[60000.0, -60000.0, 2.0 ** -24, 1.0]], np.float16)
  b = np.array([[60000.0], [60000.0], [2.0 ** -24], [0.0]], np.float16)
  f = jax.jit(lambda w: fp_dot(a, b, fmt="fp16", align_bits=w, convention="drop"))
  assert float(f(58)[0, 0]) == 2.0 ** -48
  assert float(f(57)[0, 0]) == 0.0      # d = 58 > 57
  # Correct rounding vs float64 on values whose exact sum float64 holds, to fp16 and bf16 outputs.
  rng = np.random.default_rng(1)
  a = _rand("fp8_e5m2", (6, 16), rng, 3.0)
  b = _rand("fp8_e5m2", (16, 5), rng, 3.0)
  exact = a.astype(np.float64) @ b.astype(np.float64)      # exact: few bits, narrow range
  for out in ("float16", "bfloat16"):     # float32 outputs: test_matches_exact_reference
    got = np.asarray(fp_dot(a, b, fmt="fp8_e5m2", out_dtype=out)).astype(np.float64)
    want = exact.astype(getattr(ml_dtypes, out) if out == "bfloat16" else out).astype(np.float64)
    np.testing.assert_array_equal(got, want)


def test_exact_when_spread_fits_and_equal_exponents():
  rng = np.random.default_rng(2)
  # one compiled program per convention: align_bits traced; w = 58 is exact for FP16
  fns = {c: jax.jit(lambda x, y, w, c=c: fp_dot(x, y, fmt="fp16", align_bits=w, convention=c))
         for c in fp_align.CONVENTIONS}
  # Exponents in [0, 3] for both operands: product shifts <= 6, so w >= 6 is exact in both conventions.
  a = (rng.integers(1024, 2048, (8, 32)) * np.exp2(rng.integers(0, 4, (8, 32)) - 10)
       * rng.choice([-1, 1], (8, 32))).astype(np.float16)
  b = (rng.integers(1024, 2048, (32, 6)) * np.exp2(rng.integers(0, 4, (32, 6)) - 10)).astype(np.float16)
  exact = np.asarray(fns["drop"](a, b, 58))
  for conv, f in fns.items():
    for w in (6, 9):
      np.testing.assert_array_equal(np.asarray(f(a, b, w)), exact)
    assert not np.array_equal(np.asarray(f(a, b, 0)), exact)      # shifts up to 6 do occur
  # Equal exponents: every shift is 0, so even w = 0 is exact.
  a0 = (rng.integers(1024, 2048, (8, 32)) * rng.choice([-1, 1], (8, 32)) / 1024).astype(np.float16)
  b0 = (rng.integers(1024, 2048, (32, 6)) / 1024).astype(np.float16)
  hist = np.asarray(fp_align.alignment_shift_histogram(a0, b0, fmt="fp16"))
  assert hist[0] == 8 * 32 * 6 and hist[1:].sum() == 0
  for f in fns.values():
    np.testing.assert_array_equal(np.asarray(f(a0, b0, 0)), np.asarray(fns["drop"](a0, b0, 58)))


@pytest.mark.parametrize("fmt", ["fp16", pytest.param("fp8_e4m3", marks=pytest.mark.slow)])
def test_error_non_increasing_in_w(fmt):
  rng = np.random.default_rng(3)
  a = _rand(fmt, (16, 64), rng, 4.0)
  b = _rand(fmt, (64, 16), rng, 4.0)
  exact = a.astype(np.float64) @ b.astype(np.float64)
  for conv in fp_align.CONVENTIONS:
    # one compiled program for every w: align_bits traced, accumulator sized for the format's maximum
    f = jax.jit(lambda w: fp_dot(a, b, fmt=fmt, align_bits=w, convention=conv))
    errs = [float(np.mean(np.abs(np.asarray(f(jnp.int32(w))) - exact)))
            for w in range(0, fp_align.max_alignment_shift(fmt) + 1, 2)]
    # Truncation of a window that grows downward only removes error; same for drop.
    assert all(e2 <= e1 + 1e-6 * abs(e1) for e1, e2 in zip(errs, errs[1:])), (conv, errs)
    assert errs[0] > errs[-1]


def test_conventions_on_a_hand_example():
  # Products 1 (exponent 0) and 2047^2 * 2^-30 (exponent -10 + 0): alignment shift d = 10.
  a = np.array([[1.0, 2047 * 2.0 ** -20]], np.float16)
  b = np.array([[1.0], [2047 / 1024]], np.float16)
  small = 2047 ** 2 * 2.0 ** -30
  fns = {c: jax.jit(lambda w, c=c: fp_dot(a, b, fmt="fp16", align_bits=w, convention=c,
                                          max_align_bits=12)) for c in fp_align.CONVENTIONS}
  dot = lambda w, c: float(fns[c](jnp.int32(w))[0, 0])
  assert dot(9, "drop") == 1.0 and dot(10, "drop") == np.float32(1.0 + small)
  # truncate: the accumulator LSB is 2^(0 - 20 - w); the small product is chopped to it.
  for w in (0, 3, 5, 9, 10):
    lsb = 2.0 ** (-20 - w)
    assert dot(w, "truncate") == np.float32(1.0 + np.floor(small / lsb) * lsb), w
  assert dot(0, "truncate") == 1.0 + 4092 * 2.0 ** -20
  # negative products are truncated toward zero (magnitude), not toward -inf
  neg = float(fp_dot(a, -b, fmt="fp16", align_bits=0, convention="truncate")[0, 0])
  assert neg == -dot(0, "truncate")
  assert np.isnan(float(fns["drop"](jnp.int32(-1))[0, 0]))     # a traced negative w: NaN, not garbage


def test_jit_vmap_and_nonfinite():
  rng = np.random.default_rng(4)
  a = _rand("fp16", (3, 4, 8), rng)
  b = _rand("fp16", (8, 5), rng)
  f = jax.jit(lambda x, y: fp_dot(x, y, fmt="fp16", align_bits=6))
  batched = jax.vmap(f, in_axes=(0, None))(jnp.asarray(a), jnp.asarray(b))
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(f(a[i], b)))
  # NaN / inf inputs: NaN exactly where the row or column reads them
  a2 = a[0].astype(np.float32).copy()
  a2[1, 2] = np.inf
  out = np.asarray(f(a2.astype(np.float16), b))
  assert np.all(np.isnan(out[1])) and np.all(np.isfinite(np.delete(out, 1, 0)))
  # Under jit an unrepresentable float32 input gives NaN (never a silent rounding).
  a3 = a[0].astype(np.float32).copy()
  a3[2, 0] = 0.1
  out = np.asarray(jax.jit(lambda x: fp_dot(x, b, fmt="fp16", align_bits=6))(jnp.asarray(a3)))
  assert np.all(np.isnan(out[2])) and np.all(np.isfinite(np.delete(out, 2, 0)))


@pytest.mark.slow
def test_vector_operands_and_output_overflow():
  rng = np.random.default_rng(4)
  a, b = _rand("fp16", (4, 8), rng), _rand("fp16", (8, 5), rng)
  full = np.asarray(fp_dot(a, b, fmt="fp16", align_bits=6))
  assert float(fp_dot(a[0], b[:, 0], fmt="fp16", align_bits=6)) == full[0, 0]
  np.testing.assert_array_equal(np.asarray(fp_dot(a[1], b, fmt="fp16", align_bits=6)), full[1])
  big = np.full((1, 4), 256.0, np.float16)
  assert np.isinf(float(fp_dot(big, big.T, fmt="fp16", out_dtype=jnp.float16)[0, 0]))


def test_bad_input():
  a = np.ones((2, 3), np.float16)
  with pytest.raises(ValueError, match="fmt"):
    fp_dot(a, a.T, fmt="fp32")
  with pytest.raises(ValueError, match="align_bits"):
    fp_dot(a, a.T, fmt="fp16", align_bits=-1)
  with pytest.raises(TypeError, match="align_bits"):
    fp_dot(a, a.T, fmt="fp16", align_bits=2.5)
  with pytest.raises(ValueError, match="convention"):
    fp_dot(a, a.T, fmt="fp16", convention="round")
  with pytest.raises(ValueError, match=r"a\[0, 1\] = .*0\.1\)? is not representable in fp16"):
    fp_dot(np.array([[1.0, 0.1]]), np.ones((2, 1)), fmt="fp16")
  with pytest.raises(ValueError, match=r"b\[0, 0\] = .*not representable in fp8_e4m3"):
    fp_dot(np.ones((1, 2)), jnp.array([[1000.0], [1.0]]), fmt="fp8_e4m3")
  with pytest.raises(ValueError, match="not representable in fp16"):   # float64 detail lost in float32
    fp_dot(np.array([[1.0 + 2.0 ** -30]]), np.ones((1, 1)), fmt="fp16")
  with pytest.raises(TypeError, match="floating-point"):
    fp_dot(np.ones((2, 3), np.int32), a.T, fmt="fp16")
  with pytest.raises(ValueError, match="out_dtype"):
    fp_dot(a, a.T, fmt="fp16", out_dtype=jnp.int32)
  with pytest.raises(ValueError, match="contracting"):
    fp_dot(a, a, fmt="fp16")


# ----------------------------------------------------------------------------------------------------
# Temporal decomposition.


@pytest.mark.parametrize("bits,lane_bits,passes", [(12, 4, 9), (12, 8, 4), (8, 4, 4), (16, 8, 4)])
def test_temporal_product_bit_exact(bits, lane_bits, passes):
  rng = np.random.default_rng(bits * lane_bits)
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
  x = np.concatenate([rng.integers(lo, hi, 2000), [lo, hi - 1, 0, -1]]).astype(np.int32)
  y = np.concatenate([rng.integers(lo, hi, 2000), [lo, hi - 1, 0, lo]]).astype(np.int32)
  r = jax.jit(fp_align.temporal_product, static_argnums=(2, 3))(jnp.asarray(x), jnp.asarray(y), bits,
                                                                lane_bits)
  np.testing.assert_array_equal(np.asarray(r.product), x.astype(np.int64) * y)
  assert r.passes == passes == fp_align.temporal_passes(bits, lane_bits)
  lanes = np.asarray(jax.jit(fp_align.lane_split, static_argnums=(1, 2))(jnp.asarray(x), bits,
                                                                         lane_bits)).astype(np.int64)
  np.testing.assert_array_equal((lanes * 2 ** (lane_bits * np.arange(lanes.shape[-1]))).sum(-1), x)
  assert lanes[:, :-1].min() >= 0 and lanes[:, :-1].max() < 2 ** lane_bits


def test_temporal_dot_and_fp_dot_with_lanes():
  rng = np.random.default_rng(5)
  x = rng.integers(-128, 128, (6, 40)).astype(np.int8)
  y = rng.integers(-128, 128, (40, 3)).astype(np.int8)
  r = fp_align.temporal_dot(jnp.asarray(x), jnp.asarray(y), 8, 4)
  np.testing.assert_array_equal(np.asarray(r.product), x.astype(np.int64) @ y.astype(np.int64))
  assert r.passes == 4
  with pytest.raises(ValueError, match="overflow"):
    fp_align.temporal_dot(jnp.zeros((2, 4), jnp.int32), jnp.zeros((4, 2), jnp.int32), 16, 8)
  # FP16 significand products from 4-bit lanes (9 passes): bit-identical fp_dot.
  a, b = _rand("fp16", (8, 24), rng), _rand("fp16", (24, 5), rng)
  for w in (3,):
    np.testing.assert_array_equal(np.asarray(fp_dot(a, b, fmt="fp16", align_bits=w, lane_bits=4)),
                                  np.asarray(fp_dot(a, b, fmt="fp16", align_bits=w)))


# ----------------------------------------------------------------------------------------------------
# Injection into flax.


def _conv_case(cfg, x, k, stride, pad, dn):
  want = jax.lax.conv_general_dilated(x, k, stride, pad, dimension_numbers=dn)
  got = jax.jit(lambda u, v: fp_align.fp_align_conv_general_dilated(cfg)(
      u, v, stride, pad, dimension_numbers=dn))(x, k)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_dot_general_and_conv_match_lax_when_exact():
  import flax.linen as nn
  rng = np.random.default_rng(6)
  cfg = fp_align.FpAlignConfig("fp16", align_bits=None)
  # small integers: every product and partial sum is exact in float32, so results must be identical
  x = rng.integers(-8, 9, (2, 7, 6, 3)).astype(np.float32)
  k = rng.integers(-8, 9, (3, 3, 3, 4)).astype(np.float32)
  _conv_case(cfg, x, k, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"))
  # dot_general with a batch dimension and two contracting dimensions
  a = rng.integers(-8, 9, (2, 3, 4, 5)).astype(np.float32)
  b = rng.integers(-8, 9, (2, 5, 4, 6)).astype(np.float32)
  dn = (((2, 3), (2, 1)), ((0,), (0,)))
  got = jax.jit(lambda u, v: fp_align.fp_align_dot_general(cfg)(u, v, dn))(a, b)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.dot_general(a, b, dn)))
  # a Dense layer with limited alignment drops what fp_dot drops
  dense = nn.Dense(2, use_bias=False,
                   dot_general=fp_align.fp_align_dot_general(fp_align.FpAlignConfig("fp16", 4, "drop")))
  xs = np.array([[1.0, 2.0 ** -8]], np.float32)
  out = jax.jit(dense.apply)({"params": {"kernel": np.ones((2, 2), np.float32)}}, xs)
  np.testing.assert_array_equal(np.asarray(out), [[1.0, 1.0]])


@pytest.mark.slow
def test_conv_layouts_strides_and_fp8_scaling():
  rng = np.random.default_rng(8)
  cfg = fp_align.FpAlignConfig("fp16", align_bits=None)
  x = rng.integers(-8, 9, (2, 7, 6, 3)).astype(np.float32)
  k = rng.integers(-8, 9, (3, 3, 3, 4)).astype(np.float32)
  _conv_case(cfg, x, k, (2, 1), "VALID", ("NHWC", "HWIO", "NHWC"))
  _conv_case(cfg, np.transpose(x, (0, 3, 1, 2)), np.transpose(k, (3, 2, 0, 1)), (1, 1), "SAME",
             ("NCHW", "OIHW", "NCHW"))
  # FP8 with power-of-two scaling: exact for values representable after scaling
  cfg8 = fp_align.FpAlignConfig("fp8_e4m3", align_bits=None)
  a8 = rng.integers(-8, 9, (3, 5)).astype(np.float32) * 1024
  b8 = rng.integers(-8, 9, (5, 6)).astype(np.float32) / 64
  np.testing.assert_array_equal(np.asarray(fp_align.fp_align_dot_general(cfg8)(a8, b8, DN)), a8 @ b8)


def test_bfp_quantize_matches_numpy():
  rng = np.random.default_rng(9)
  x = (rng.normal(size=(3, 70)) * np.exp2(rng.uniform(-6, 6, (3, 70)))).astype(np.float16)
  x[0, :32] = 0.0
  for w in (0, 3, 8):
    got = np.asarray(fp_align.bfp_quantize(x.astype(np.float32), fp_align.BfpConfig("fp16", w, 32)))
    xd = x.astype(np.float64)
    want = np.zeros_like(xd)
    for s in range(0, 70, 32):
      blk = xd[:, s:s + 32]
      nz = np.where(blk != 0, np.maximum(np.floor(np.log2(np.abs(np.where(blk != 0, blk, 1)))), -14),
                    -np.inf)
      grid = np.exp2(nz.max(1, keepdims=True) - 10 - w)
      ok = grid > 0                                   # all-zero block: grid 2^-inf
      want[:, s:s + 32] = np.where(ok, np.trunc(blk / np.where(ok, grid, 1)) * np.where(ok, grid, 0), 0)
    np.testing.assert_array_equal(got, want)
    # elements within w binades of their block maximum are exact
    assert np.mean(got == xd) > (0.5 if w == 8 else 0.1)
  with pytest.raises(TypeError, match="BfpConfig"):
    fp_align.bfp_quantize(x, fp_align.FpAlignConfig())
  with pytest.raises(ValueError, match="block"):
    fp_align.BfpConfig("fp16", 2, 0)



def _bfp_reference(x: np.ndarray, fmt: str, w: int, block: int) -> np.ndarray:
  """Exact float64 BFP reference for formats used unscaled (fp16, bf16): each block's grid is
  2^(E_block - M - w) with E_block the largest element exponent (subnormals: emin); truncate."""
  f = fp_align.FORMATS[fmt]
  out = np.zeros(x.shape, np.float64)
  for r in range(x.shape[0]):
    for s in range(0, x.shape[1], block):
      blk = [float(v) for v in x[r, s:s + block]]
      nz = [_exp(v, f) for v in blk if v != 0]
      if not nz:
        continue
      grid = max(nz) - f.man_bits - w
      out[r, s:s + block] = [math.ldexp(math.trunc(math.ldexp(v, -grid)), grid) for v in blk]
  return out


def test_bfp_quantize_out_of_range_scales_match_exact_reference():
  # reviewer's repros: a bf16 block near 1e-35 (grid < -126) came back doubled
  x = np.array([[1.0e-35, 5.0e-36, 0.0, 0.0]], np.float32).astype(ml_dtypes.bfloat16)
  got = np.asarray(fp_align.bfp_quantize(jnp.asarray(x, jnp.float32), fp_align.BfpConfig("bf16", 8, 4)))
  np.testing.assert_array_equal(got, _bfp_reference(x, "bf16", 8, 4))
  np.testing.assert_array_equal(got, x.astype(np.float64))     # within 8 binades: exact
  # fp16 with align_bits=120 used to return x2: now align_bits is bounded with a clear error
  with pytest.raises(ValueError, match=r"align_bits=120 .* fp16"):
    fp_align.BfpConfig("fp16", 120, block=4)
  top = fp_align.FORMATS["fp16"].emax - fp_align.FORMATS["fp16"].emin
  one = np.array([[1.0, 0.5, 3 * 2.0 ** -24, 0.0]], np.float16)  # 2^-24: the smallest subnormal
  got = np.asarray(fp_align.bfp_quantize(jnp.asarray(one, jnp.float32), fp_align.BfpConfig("fp16", top, 4)))
  np.testing.assert_array_equal(got, one.astype(np.float64))    # the largest align_bits is exact
  # random bf16 blocks spanning the whole normal exponent range, every w up to the bound (subnormals are
  # left out: XLA on CPU flushes float32 subnormals, so bf16 subnormal inputs already read as 0 there)
  rng = np.random.default_rng(3)
  f = fp_align.FORMATS["bf16"]
  e = rng.integers(f.emin, f.emax, (4, 1)) - rng.integers(0, 40, (4, 48))
  xb = (rng.uniform(1, 2, (4, 48)) * rng.choice([-1, 1], (4, 48)) * np.exp2(np.maximum(e, f.emin)))
  xb = xb.astype(np.float32).astype(ml_dtypes.bfloat16)
  xb[0, :16] = 0
  xb[1, 3] = np.float32(2.0 ** f.emin)
  # (one compiled program for the sweep: align_bits traced; the static path is the one checked above)
  jq = jax.jit(lambda v, w: fp_align.bfp_quantize(v, fp_align.BfpConfig("bf16", w, 16)))
  for w in (0, 5, 60, 130, f.emax - f.emin):
    got = np.asarray(jq(jnp.asarray(xb, jnp.float32), jnp.int32(w)))
    np.testing.assert_array_equal(got, _bfp_reference(xb, "bf16", w, 16), err_msg=f"w={w}")
  # a traced align_bits above the bound is clamped to it (exact), as fp_dot does
  np.testing.assert_array_equal(np.asarray(jq(jnp.asarray(xb, jnp.float32), jnp.int32(400))),
                                xb.astype(np.float64))



def test_fp8_pow2_scale_is_per_tensor_batch_included():
  # documented behaviour (FpAlignConfig.scaling): one scale per operand, so a row's FP8 rounding depends
  # on the other rows of its batch. Alone, row 0 is scaled up and exact; next to a row 2^12 larger it
  # shares that row's scale and its small entries lose bits (E4M3 keeps 3 fraction bits).
  cfg = fp_align.FpAlignConfig("fp8_e4m3", align_bits=None)
  dot = fp_align.fp_align_dot_general(cfg)
  row = np.array([[1.0, 2.0 ** -5, 2.0 ** -9]], np.float32)
  w = np.eye(3, dtype=np.float32)
  alone = np.asarray(dot(np.concatenate([row, row]), w, (((1,), (0,)), ((), ()))))  # same shape: one compile
  np.testing.assert_array_equal(alone, np.concatenate([row, row]))
  both = np.asarray(dot(np.concatenate([row, row * 2.0 ** 12]), w, (((1,), (0,)), ((), ()))))
  np.testing.assert_array_equal(both[1], row[0] * 2.0 ** 12)
  assert both[0, 2] != row[0, 2]                   # 2^-9 is 21 binades below the batch amax: flushed


DN = (((1,), (0,)), ((), ()))


def test_flax_modules_per_layer_configs_and_histograms():
  import functools
  from mlsys_jax import models
  rng = np.random.default_rng(7)
  x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  plain = models.CNN(channels=(4,), hidden=8)
  variables = plain.init(jax.random.PRNGKey(0), x)
  ref = np.asarray(plain.apply(variables, x))
  exact = fp_align.FpAlignConfig("fp16", None)
  coarse = fp_align.FpAlignConfig("fp16", 0, "drop")
  mk = lambda cfg, ov=(): models.CNN(
      channels=(4,), hidden=8,
      dot_general_cls=functools.partial(fp_align.FpAlignDotGeneral, config=cfg, overrides=ov),
      conv_general_dilated_cls=functools.partial(fp_align.FpAlignConv, config=cfg, overrides=ov))
  # per-layer: convolution exact, hidden dense in float, logits with w = 0 'drop' (coarse)
  model = mk(coarse, (("Conv_0", exact), ("Dense_0", None)))
  out, st = jax.jit(lambda v, xb: model.apply(v, xb, mutable=[fp_align.SPREAD_COLLECTION]))(variables, x)
  assert np.max(np.abs(np.asarray(out) - ref)) > 1e-2          # the coarse logit layer is far off
  hists = st[fp_align.SPREAD_COLLECTION]
  assert set(hists) == {"Conv_0", "Dense_1"}                   # Dense_0 runs in float: no histogram
  conv_h = np.asarray(hists["Conv_0"]["FpAlignConv_0"]["shift_histogram"])
  assert conv_h.shape == (59,) and conv_h.sum() > 0 and conv_h[0] > 0
  # the logit layer's histogram equals a direct one on its fp16 inputs
  _, inter = jax.jit(lambda v, xb: plain.apply(v, xb, capture_intermediates=True,
                                               mutable=["intermediates"]))(variables, x)
  feats = jax.nn.relu(inter["intermediates"]["Dense_0"]["__call__"][0])
  want = fp_align.alignment_shift_histogram(feats.astype(jnp.float16),
                                            variables["params"]["Dense_1"]["kernel"].astype(jnp.float16),
                                            fmt="fp16")
  np.testing.assert_array_equal(np.asarray(hists["Dense_1"]["FpAlignDotGeneral_0"]["shift_histogram"]),
                                np.asarray(want))
