"""Floating-point inner products with limited alignment (Abdelaziz et al., MLSys 2021).

"Rethinking Floating Point Overheads for Mixed Precision DNN Accelerators" (Abdelaziz, Shafiee, Shin,
Pedram, Hassoun; MLSys 2021) observes that an FP16 inner-product unit must align every product to the
largest one, and that the exponent spread between products can reach 58 binades, so full alignment
logic is large; about 8 bits of alignment keep inference accuracy. This module emulates such a unit
bit-exactly:

1. every product ``a_k * b_k`` is formed exactly from integer significands (sign, exponent and integer
   significand are decoded with integer bit operations; the product of two significands fits int32);
2. ``E`` = the largest product exponent of the inner product (zero products excluded);
   ``d_k = E - e(a_k) - e(b_k)`` is each product's alignment shift;
3. the aligned products are accumulated in a fixed-point accumulator whose LSB lies ``w`` bits below the
   LSB of the largest product (a ``P + w``-bit window, ``P = 2 (M + 1)`` product significand bits):

   - ``convention='drop'``: a product with ``d_k > w`` contributes 0; the others are exact;
   - ``convention='truncate'``: every product is shifted into the window and the bits below it are
     chopped (magnitude truncation, i.e. toward zero, as in the sign-magnitude alignment shifter of a
     floating-point adder); a product with ``d_k >= w + P`` contributes 0;

4. the accumulator is normalised once and rounded to nearest-even to the output format.

``align_bits=None`` is exact (``w`` = :func:`max_alignment_shift`, which no shift can exceed), so the
result is the correctly rounded exact inner product. When every shift satisfies ``d_k <= w`` both
conventions are exact too.

**Integer width (jax x64 is off).** No int64 and no float64: the accumulator is a set of ``L``-bit limbs
held in int32, ``L = min(24, 30 - ceil(log2 K))``, so a limb's sum over the ``K`` products can never
overflow int32 (``K (2^L - 1) < 2^31``). Each product's aligned magnitude is cut into limbs with
variable shifts and masks, summed per limb, then the limbs are carry-propagated, made sign-magnitude and
rounded to the output format with integer operations only (round/sticky bits from the limbs). The
number of limbs is ``ceil((P + w) / L)``: e.g. 2 for FP16 with ``w = 8`` at ``K <= 64``, 4 for exact
FP16 at ``K = 1024``; exact BF16 (``w = 506``) needs ~30 and is meant for small reference checks.

**Vectorisation.** The inner products are computed as broadcast integer expressions over
``(rows, K, cols)`` reduced over ``K`` (XLA fuses them into reductions), in blocks of rows so the
working set stays bounded: no Python loop over elements.

**Bad input.** Unsupported formats, negative ``align_bits`` or an unknown convention raise at call time.
Inputs may be given in the format's own dtype (``jnp.float16``, ``jnp.bfloat16``,
``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``) or any float dtype holding representable values; outside
``jit`` a value that is not representable raises ``ValueError`` naming it and the format (inputs are
never rounded silently). Under ``jit`` an unrepresentable input, a NaN or an infinity makes every output
that reads it NaN.

Example:
  >>> import jax.numpy as jnp
  >>> a = jnp.array([[1.0, 2.0 ** -12]], jnp.float16)    # products 1 and 2^-12
  >>> b = jnp.array([[1.0], [1.0]], jnp.float16)
  >>> float(fp_dot(a, b, fmt='fp16', align_bits=None)[0, 0]) == 1 + 2.0 ** -12
  True
  >>> float(fp_dot(a, b, fmt='fp16', align_bits=8, convention='drop')[0, 0])   # d = 12 > 8: dropped
  1.0
  >>> max_alignment_shift('fp16')
  58
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, is_concrete

__all__ = [
    "BfpConfig",
    "CONVENTIONS",
    "Decoded",
    "FORMATS",
    "FloatFormat",
    "FpAlignConfig",
    "FpAlignConv",
    "FpAlignDotGeneral",
    "SCALINGS",
    "SPREAD_COLLECTION",
    "TemporalProduct",
    "alignment_shift_histogram",
    "bfp_conv_general_dilated",
    "bfp_dot_general",
    "bfp_quantize",
    "decode",
    "fp_align_conv_general_dilated",
    "fp_align_dot_general",
    "fp_dot",
    "lane_split",
    "max_alignment_shift",
    "temporal_dot",
    "temporal_passes",
    "temporal_product",
]

CONVENTIONS = ("drop", "truncate")
_BIG = 1 << 12          # exponent given to zero products so that they never set the maximum


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """A binary floating-point format: ``exp_bits`` exponent bits, ``man_bits`` stored fraction bits.

  ``ieee``: the all-ones exponent encodes inf/NaN (FP16, BF16, E5M2); otherwise (OCP FP8 E4M3, "fn")
  it holds normal numbers and only ``S.1111.111`` is NaN.
  """
  name: str
  dtype: Any
  exp_bits: int
  man_bits: int
  ieee: bool = True

  @property
  def bias(self) -> int:
    return (1 << (self.exp_bits - 1)) - 1

  @property
  def emin(self) -> int:
    """Exponent of the smallest normal number (subnormals share it)."""
    return 1 - self.bias

  @property
  def emax(self) -> int:
    top = (1 << self.exp_bits) - (2 if self.ieee else 1)
    return top - self.bias

  @property
  def width(self) -> int:
    return 1 + self.exp_bits + self.man_bits

  @property
  def product_bits(self) -> int:
    """P: bits of the product of two integer significands (``(M+1) + (M+1)``)."""
    return 2 * (self.man_bits + 1)


FORMATS = {
    "fp16": FloatFormat("fp16", jnp.float16, 5, 10),
    "bf16": FloatFormat("bf16", jnp.bfloat16, 8, 7),
    "fp8_e4m3": FloatFormat("fp8_e4m3", jnp.float8_e4m3fn, 4, 3, ieee=False),
    "fp8_e5m2": FloatFormat("fp8_e5m2", jnp.float8_e5m2, 5, 2),
}
_OUT = {  # output formats: (precision p incl. the hidden bit, exponent of the smallest quantum, emax)
    jnp.dtype(jnp.float32): (24, -149, 127),
    jnp.dtype(jnp.float16): (11, -24, 15),
    jnp.dtype(jnp.bfloat16): (8, -133, 127),
}


def _format(fmt: str | FloatFormat) -> FloatFormat:
  if isinstance(fmt, FloatFormat):
    return fmt
  check_choice("fmt", fmt, tuple(FORMATS))
  return FORMATS[fmt]


def max_alignment_shift(fmt: str) -> int:
  """Largest alignment shift between two products of an inner product in format ``fmt``.

  A product's exponent is ``e(a) + e(b)``; normal exponents (subnormals share the smallest) lie in
  ``[emin, emax]``, so product exponents lie in ``[2 emin, 2 emax]`` and two products can differ by
  ``2 (emax - emin)`` binades. For FP16, ``emin = -14`` and ``emax = 15``: products lie in ``[-28, 30]``
  and the spread is **58** (the paper's number). FP8 E4M3 (``-6..8``) gives 28, E5M2 58, BF16
  (``-126..127``) 506. An accumulator with ``align_bits >= max_alignment_shift(fmt)`` is exact.

  >>> [max_alignment_shift(f) for f in ('fp16', 'bf16', 'fp8_e4m3', 'fp8_e5m2')]
  [58, 506, 28, 58]
  """
  f = _format(fmt)
  return 2 * (f.emax - f.emin)


class Decoded(NamedTuple):
  """``x = sig * 2^(exp - M)``: signed integer significand (int32), exponent (int32), bad-value flag."""
  sig: jax.Array
  exp: jax.Array
  bad: jax.Array


def decode(x: jax.Array, fmt: str | FloatFormat) -> Decoded:
  """Sign, exponent and integer significand of ``x`` (dtype of ``fmt``) with integer bit operations.

  Zeros and subnormals get exponent ``emin``; inf/NaN get ``sig = 0`` and ``bad = True``.
  """
  f = _format(fmt)
  uint = {8: jnp.uint8, 16: jnp.uint16}[f.width]
  u = jax.lax.bitcast_convert_type(x.astype(f.dtype), uint).astype(jnp.int32)
  m_bits = f.man_bits
  frac = u & ((1 << m_bits) - 1)
  field = (u >> m_bits) & ((1 << f.exp_bits) - 1)
  neg = (u >> (f.width - 1)) & 1
  top = (1 << f.exp_bits) - 1
  if f.ieee:
    bad = field == top
  else:
    bad = (field == top) & (frac == (1 << m_bits) - 1)
  sig = jnp.where(field > 0, frac | (1 << m_bits), frac)
  sig = jnp.where(bad, 0, sig)
  sig = jnp.where(neg == 1, -sig, sig)
  exp = jnp.maximum(field, 1) - f.bias
  return Decoded(sig, exp, bad)


# ----------------------------------------------------------------------------------------------------
# Input checks.


def _to_format(name: str, x: Any, f: FloatFormat) -> tuple[jax.Array, jax.Array]:
  """``x`` in ``f.dtype`` and a flag of values that were not representable (traced inputs only)."""
  if not isinstance(x, jax.Array):           # numpy/Python input: check in its own precision (float64)
    xn = np.asarray(x)
    floating = jnp.issubdtype(xn.dtype, jnp.floating)
    if floating and xn.dtype != np.dtype(f.dtype):
      _raise_unrepresentable(name, xn, xn.astype(f.dtype).astype(xn.dtype), f)
    x = jnp.asarray(xn.astype(f.dtype) if floating else xn)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array holding {f.name} values, got dtype "
                    f"{x.dtype}. Cast it first, e.g. x.astype(jnp.{jnp.dtype(f.dtype).name}).")
  if x.dtype == jnp.dtype(f.dtype):
    return x, jnp.zeros(x.shape, bool)
  xf = x.astype(f.dtype)
  back = xf.astype(x.dtype)
  differs = ~((back == x) | (jnp.isnan(back) & jnp.isnan(x)))
  if is_concrete(x):
    _raise_unrepresentable(name, np.asarray(x), np.asarray(back), f)
  return xf, differs


def _raise_unrepresentable(name: str, x: np.ndarray, back: np.ndarray, f: FloatFormat) -> None:
  differs = ~((back == x) | (np.isnan(back) & np.isnan(x)))
  if np.any(differs):
    idx = tuple(int(i) for i in np.argwhere(differs)[0])
    raise ValueError(f"{name}[{', '.join(map(str, idx))}] = {x[idx]!r} is not representable in {f.name} "
                     f"(nearest {f.name} value: {float(back[idx])!r}); {int(np.sum(differs))} value(s) "
                     f"in all. fp_dot never rounds its inputs: round them explicitly first "
                     f"(x.astype(jnp.{jnp.dtype(f.dtype).name})).")


def _check_common(fmt, align_bits, convention, out_dtype, max_align_bits=None):
  """Validated ``(format, w, w_bound, out dtype)``; ``w`` is an int or a traced int32 scalar."""
  f = _format(fmt)
  check_choice("convention", convention, CONVENTIONS)
  od = jnp.dtype(out_dtype)
  if od not in _OUT:
    raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {od}.")
  shift = max_alignment_shift(f.name)
  if max_align_bits is not None:
    check_int("max_align_bits", max_align_bits, 0)
  if isinstance(align_bits, (jax.Array, np.ndarray)) and not isinstance(align_bits, np.integer):
    if np.ndim(align_bits) != 0 or not jnp.issubdtype(jnp.result_type(align_bits), jnp.integer):
      raise TypeError(f"align_bits given as an array must be an integer scalar, got "
                      f"{jnp.result_type(align_bits)} of shape {np.shape(align_bits)}.")
    if is_concrete(align_bits):
      align_bits = int(align_bits)
    else:
      bound = shift if max_align_bits is None else min(max_align_bits, shift)
      return f, jnp.minimum(jnp.asarray(align_bits, jnp.int32), shift), bound, od
  if align_bits is not None:
    check_int("align_bits", align_bits, 0)
    if max_align_bits is not None and align_bits > max_align_bits:
      raise ValueError(f"align_bits={align_bits} exceeds max_align_bits={max_align_bits}.")
  w = shift if align_bits is None else min(int(align_bits), shift)
  return f, w, w, od


# ----------------------------------------------------------------------------------------------------
# The accumulator.


def _limb_width(k: int) -> int:
  """L: limb bits such that ``K`` limb values below ``2^L`` (plus carries) stay inside int32."""
  return int(max(1, min(24, 30 - math.ceil(math.log2(max(k, 2))))))


def _shift(x, r):
  """The low 31 bits of ``floor(x * 2^r)`` for non-negative int32 ``x`` (< 2^31) and int32 ``r``.

  Shift amounts are clamped to 31. A right shift by 31 gives 0, as it should. A left shift by more
  than 31 would give 0 in its low bits; the clamp leaves bit 31 set instead, which every caller removes
  (limb masks of at most 24 bits, bit windows of at most 25; the unmasked top limb never shifts left
  by more than ``L - P``).
  """
  left = jax.lax.shift_left(x, jnp.clip(r, 0, 31))
  right = jax.lax.shift_right_logical(x, jnp.clip(-r, 0, 31))
  return jnp.where(r >= 0, left, right)


def _block_sums(sa, ea, sb, eb, emax, w, drop: bool, nl: int, lw: int, lanes: tuple | None = None):
  """Limb sums ``(rows, cols, nl)`` of the aligned products of a row block.

  ``sa (r, K)``/``sb (K, c)``: signed significands; ``ea``/``eb``: exponents with zero operands at
  ``-_BIG``; ``emax (r, c)``: the largest product exponent.
  """
  if lanes is None:
    mag = jnp.abs(sa)[:, :, None] * jnp.abs(sb)[None, :, :]            # exact: < 2^(2M+2) <= 2^22
  else:                                                                  # temporal decomposition
    mag = temporal_product(jnp.abs(sa)[:, :, None], jnp.abs(sb)[None, :, :], *lanes).product
  neg = (sa[:, :, None] < 0) != (sb[None, :, :] < 0)
  d = emax[:, None, :] - ea[:, :, None] - eb[None, :, :]                 # alignment shift, >= 0
  s = w - d                                                              # position of the product LSB
  if drop:
    mag = jnp.where(d > w, 0, mag)
  limbs = []
  for j in range(nl):            # one fused reduction over K per limb
    v = _shift(mag, s - j * lw)
    if j < nl - 1:
      v = v & ((1 << lw) - 1)
    limbs.append(jnp.sum(jnp.where(neg, -v, v), axis=1))
  return jnp.stack(limbs, -1)


def _carry(limbs, lw: int):
  """Propagate carries so limbs ``0..nl-2`` lie in ``[0, 2^L)``; the top limb keeps the sign."""
  out, c = [], jnp.zeros_like(limbs[..., 0])
  nl = limbs.shape[-1]
  for j in range(nl):
    v = limbs[..., j] + c
    if j < nl - 1:
      c = v >> lw
      v = v & ((1 << lw) - 1)
    out.append(v)
  return jnp.stack(out, -1)


def _bits(u, lw: int, lo, n: int):
  """Bits ``[lo, lo + n)`` (n <= 30) of the magnitude held in limbs ``u (..., nl)``; ``lo`` may be < 0."""
  j = jnp.arange(u.shape[-1], dtype=jnp.int32)
  parts = _shift(u, j * lw - lo[..., None]) & ((1 << n) - 1)            # disjoint bit ranges
  return jnp.sum(parts, axis=-1)


def _any_below(u, lw: int, lo):
  """Whether any bit below position ``lo`` of the limbs ``u`` is set."""
  j = jnp.arange(u.shape[-1], dtype=jnp.int32)
  nb = jnp.clip(lo[..., None] - j * lw, 0, 32)
  m = jnp.where(nb >= 32, -1, jax.lax.shift_left(jnp.int32(1), jnp.minimum(nb, 31)) - 1)
  return jnp.any((u & m) != 0, axis=-1)


def _round(limbs, base, lw: int, out_dtype):
  """Round ``sum_j limbs_j 2^(j L) * 2^base`` to nearest-even in ``out_dtype`` (integer ops only)."""
  p, qmin, emax_out = _OUT[jnp.dtype(out_dtype)]
  u = _carry(limbs, lw)
  neg = u[..., -1] < 0
  u = _carry(jnp.where(neg[..., None], -u, u), lw)                       # magnitude, all limbs >= 0
  nl = u.shape[-1]
  pos = jnp.arange(nl, dtype=jnp.int32) * lw + 31 - jax.lax.clz(u)      # top bit of each limb
  h = jnp.max(jnp.where(u != 0, pos, -1), axis=-1)                      # top bit of the accumulator
  zero = h < 0
  lo = jnp.maximum(h - p + 1, qmin - base)                              # LSB kept in the output
  chunk = _bits(u, lw, lo - 1, p + 1)                                    # kept bits + round bit
  kept, rbit = chunk >> 1, chunk & 1
  sticky = _any_below(u, lw, lo - 1)
  kept = kept + (rbit & ((sticky | ((kept & 1) == 1)).astype(jnp.int32)))
  e = lo + base                                                          # kept * 2^e, kept <= 2^p
  top = e + 31 - jax.lax.clz(jnp.maximum(kept, 1))
  # kept * 2^e in float32 exactly: two power-of-two factors, each a normal float32.
  e1 = jnp.clip(e, -126, 127)
  e2 = jnp.clip(e - e1, -126, 127)
  val = kept.astype(jnp.float32) * _pow2(e1) * _pow2(e2)
  val = jnp.where(top > emax_out, jnp.inf, val)
  val = jnp.where(zero, 0.0, val)
  return jnp.where(neg, -val, val).astype(out_dtype)


def _num_limbs(f: FloatFormat, w_bound: int, k: int) -> int:
  return -(-(f.product_bits + w_bound) // _limb_width(k))


def _pow2(t):
  """``2.0 ** t`` in float32, exactly, for int32 ``t`` in ``[-126, 127]`` (jnp.exp2 is not exact)."""
  t = jnp.clip(jnp.asarray(t, jnp.int32), -126, 127)
  return jax.lax.bitcast_convert_type((t + 127) << 23, jnp.float32)


def _matmul(a: Decoded, b: Decoded, f: FloatFormat, w, nl: int, convention: str, out_dtype,
            block_elems: int, lane_bits: int | None = None, scale=0):
  """``(M, K) x (K, N)`` limited-alignment products of decoded operands (``w`` may be traced).

  The result is ``2^-scale`` times the accumulated value, rounded once: ``scale`` (int32, may be traced)
  undoes a power-of-two scaling of the operands inside the rounding, so the scaled sum never has to fit
  ``out_dtype`` on its own.
  """
  m, k = a.sig.shape
  n = b.sig.shape[1]
  lw = _limb_width(k)
  ea = jnp.where(a.sig == 0, -_BIG, a.exp)
  eb = jnp.where(b.sig == 0, -_BIG, b.exp)
  rows = int(max(1, min(m, block_elems // max(1, k * n * nl))))
  nblk = -(-m // rows)
  pad = nblk * rows - m

  def one(xs):
    sa_blk, ea_blk = xs
    emax = jnp.max(ea_blk[:, :, None] + eb[None, :, :], axis=1)
    lanes = None if lane_bits is None else (f.man_bits + 1, lane_bits)
    limbs = _block_sums(sa_blk, ea_blk, b.sig, eb, emax, w, convention == "drop", nl, lw, lanes)
    base = emax - 2 * f.man_bits - w - scale
    return _round(limbs, base, lw, out_dtype)

  sa = jnp.pad(a.sig, ((0, pad), (0, 0)))
  ea = jnp.pad(ea, ((0, pad), (0, 0)), constant_values=-_BIG)
  if nblk == 1:
    out = one((sa, ea))
  else:
    out = jax.lax.map(one, (sa.reshape(nblk, rows, k), ea.reshape(nblk, rows, k)))
    out = out.reshape(nblk * rows, n)
  out = out[:m]
  bad = jnp.any(a.bad, axis=1)[:, None] | jnp.any(b.bad, axis=0)[None, :]
  return jnp.where(bad, jnp.nan, out).astype(out_dtype)


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10, 11))
def _fp_matmul(a, b, bad_a, bad_b, w, scale, fmt: str, nl: int, convention: str, out_dtype, block_elems: int,
               lane_bits: int | None = None):
  """One compiled program per (shapes, format, limb count, convention); ``w`` and ``scale`` (the result is
  multiplied by ``2^-scale`` inside the final rounding) are arguments."""
  f = FORMATS[fmt]
  da, db = decode(a, f), decode(b, f)
  da = da._replace(bad=da.bad | bad_a)
  db = db._replace(bad=db.bad | bad_b)
  w = jnp.asarray(w, jnp.int32)
  out = _matmul(da, db, f, w, nl, convention, out_dtype, block_elems, lane_bits,
                jnp.asarray(scale, jnp.int32))
  lw = _limb_width(a.shape[1])
  ok = (w >= 0) & (f.product_bits + w <= nl * lw)     # a traced w outside its declared bound
  return jnp.where(ok, out, jnp.nan).astype(out_dtype)


def fp_dot(a: jax.Array, b: jax.Array, *, fmt: str, align_bits: int | None = None,
           convention: str = "truncate", out_dtype: Any = jnp.float32,
           max_align_bits: int | None = None, lane_bits: int | None = None,
           block_elems: int = 1 << 24) -> jax.Array:
  """Matrix product ``a @ b`` through an emulated accumulator with ``align_bits`` bits of alignment.

  Abdelaziz et al., MLSys 2021, Sec. 3 (alignment of products in an FP inner-product unit); the
  datapath is described in the module docstring.

  Args:
    a: ``(M, K)`` or ``(K,)`` values of format ``fmt`` (its dtype or any float dtype holding
      representable values).
    b: ``(K, N)`` or ``(K,)``.
    fmt: input format, one of ``'fp16'``, ``'bf16'``, ``'fp8_e4m3'``, ``'fp8_e5m2'``.
    align_bits: ``w >= 0``, bits of the accumulator below the largest product's LSB; None = exact.
    convention: ``'truncate'`` (chop bits below the window) or ``'drop'`` (drop products shifted by
      more than ``w``).
    out_dtype: float32 (default), float16 or bfloat16: the single final rounding (nearest-even).
    max_align_bits: static upper bound for a *traced* ``align_bits`` (an int32 scalar, e.g. to sweep
      ``w`` without recompiling); it sets the accumulator width. Default: the format's maximum shift.
      A traced ``align_bits`` below 0, or too wide for the accumulator sized for ``max_align_bits``,
      makes the whole output NaN (a value above ``max_alignment_shift(fmt)`` means exact).
    lane_bits: if set (1..8), significand products are built from ``lane_bits``-bit integer lanes over
      several passes (:func:`temporal_product`); the result is bit-identical.
    block_elems: rows are processed in blocks of about this many ``(row, k, col, limb)`` elements.

  Returns:
    ``(M, N)`` (or ``(M,)``, ``(N,)``, ``()``) in ``out_dtype``; NaN where a row/column holds NaN, inf or
    (under jit) an unrepresentable value. Inference only: there is no gradient.

  Example:
    >>> a = jnp.array([[3.0, -1.0]], jnp.float16)
    >>> b = jnp.array([[2.0], [0.5]], jnp.float16)
    >>> float(fp_dot(a, b, fmt='fp16', align_bits=8)[0, 0])
    5.5
  """
  f, w, w_bound, od = _check_common(fmt, align_bits, convention, out_dtype, max_align_bits)
  check_int("block_elems", block_elems, 1)
  if lane_bits is not None:
    check_int("lane_bits", lane_bits, 1, 8)
  a, bad_a = _to_format("a", a, f)
  b, bad_b = _to_format("b", b, f)
  if a.ndim not in (1, 2) or b.ndim not in (1, 2):
    raise ValueError(f"fp_dot takes 1-D or 2-D operands, got shapes {a.shape} and {b.shape}; use "
                     "fp_align_dot_general for batched contractions.")
  a2 = a[None, :] if a.ndim == 1 else a
  b2 = b[:, None] if b.ndim == 1 else b
  ba = bad_a[None, :] if a.ndim == 1 else bad_a
  bb = bad_b[:, None] if b.ndim == 1 else bad_b
  if a2.shape[1] != b2.shape[0]:
    raise ValueError(f"contracting sizes differ: a {a.shape} and b {b.shape}.")
  if a2.shape[1] == 0:
    out = jnp.zeros((a2.shape[0], b2.shape[1]), od)
  else:
    nl = _num_limbs(f, w_bound, a2.shape[1])
    if not isinstance(w, jax.Array):
      w = np.int32(w)
    out = _fp_matmul(a2, b2, ba, bb, w, np.int32(0), f.name, nl, convention, od, block_elems, lane_bits)
  if a.ndim == 1:
    out = out[0]
  if b.ndim == 1:
    out = out[..., 0]
  return out


def alignment_shift_histogram(a: jax.Array, b: jax.Array, *, fmt: str,
                              max_rows: int | None = 4096, block_elems: int = 1 << 23) -> jax.Array:
  """Counts of alignment shifts ``d = E - e(a_k) - e(b_k)`` over the nonzero products of ``a @ b``.

  ``out[d]`` for ``d = 0 .. max_alignment_shift(fmt)``; the paper's motivation (Sec. 3) is this spread.
  Zero products (e.g. after ReLU) are not counted: they need no alignment; a product counts only where
  both operands are nonzero (and finite), whatever the other operand's exponent, and an inner product
  whose products are all zero adds nothing. ``max_rows`` subsamples rows of ``a`` evenly (None = all).

  >>> a = jnp.array([[1.0, 0.25, 0.0]], jnp.float16)
  >>> b = jnp.ones((3, 1), jnp.float16)
  >>> [int(c) for c in alignment_shift_histogram(a, b, fmt='fp16')[:3]]
  [1, 0, 1]
  """
  f = _format(fmt)
  a, _ = _to_format("a", a, f)
  b, _ = _to_format("b", b, f)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"alignment_shift_histogram needs a (M, K) and b (K, N), got {a.shape}, {b.shape}.")
  if max_rows is not None and a.shape[0] > max_rows:
    a = a[np.linspace(0, a.shape[0] - 1, max_rows).astype(np.int64)]
  da, db = decode(a, f), decode(b, f)
  nb = max_alignment_shift(f.name) + 1
  ea = jnp.where(da.sig == 0, -_BIG, da.exp)
  eb = jnp.where(db.sig == 0, -_BIG, db.exp)
  m, k = ea.shape
  n = eb.shape[1]
  rows = int(max(1, min(m, block_elems // max(1, k * n))))
  nblk = -(-m // rows)
  ea = jnp.pad(ea, ((0, nblk * rows - m), (0, 0)), constant_values=-_BIG)

  def one(carry, ea_blk):
    pe = ea_blk[:, :, None] + eb[None, :, :]
    emax = jnp.max(pe, axis=1, keepdims=True)
    nonzero = (ea_blk[:, :, None] > -_BIG) & (eb[None, :, :] > -_BIG)   # both operands nonzero
    d = jnp.where(nonzero, emax - pe, nb)                     # zero products -> overflow bin
    return carry + jnp.bincount(d.ravel(), length=nb + 1)[:nb], None

  out, _ = jax.lax.scan(one, jnp.zeros((nb,), jnp.int32), ea.reshape(nblk, rows, k))
  return out


# ----------------------------------------------------------------------------------------------------
# Temporal decomposition: wide integer products from narrow integer lanes over several passes.


def lane_split(x: jax.Array, bits: int, lane_bits: int) -> jax.Array:
  """Split ``bits``-bit integers into ``ceil(bits / lane_bits)`` lanes, least significant first.

  ``x = sum_i lanes[..., i] * 2^(i * lane_bits)``. Lower lanes are unsigned in ``[0, 2^lane_bits)``;
  the top lane carries the sign (two's complement), so signed ``x`` works too.

  >>> [int(v) for v in lane_split(jnp.int32(-1000), 12, 4)]
  [8, 1, -4]
  """
  check_int("bits", bits, 1, 31)
  check_int("lane_bits", lane_bits, 1, 16)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"lane_split takes integers, got dtype {x.dtype}.")
  x = x.astype(jnp.int32)
  n = -(-bits // lane_bits)
  lanes = [(x >> (i * lane_bits)) & ((1 << lane_bits) - 1) for i in range(n - 1)]
  lanes.append(x >> ((n - 1) * lane_bits))                     # arithmetic: keeps the sign
  return jnp.stack(lanes, -1)


def temporal_passes(bits: int, lane_bits: int, bits_b: int | None = None) -> int:
  """Passes of a ``lane_bits`` x ``lane_bits`` multiplier for a ``bits`` x ``bits_b`` product.

  Abdelaziz et al. (MLSys 2021) build higher-precision products from low-bit integer units over time;
  one pass multiplies one lane of each operand. FP16 significands (11 bits): 9 passes of 4-bit lanes,
  4 passes of 8-bit lanes; INT8 x INT8 with 4-bit lanes: 4.

  >>> temporal_passes(11, 4), temporal_passes(11, 8), temporal_passes(8, 4)
  (9, 4, 4)
  """
  check_int("bits", bits, 1, 31)
  check_int("lane_bits", lane_bits, 1, 16)
  bits_b = bits if bits_b is None else bits_b
  check_int("bits_b", bits_b, 1, 31)
  return (-(-bits // lane_bits)) * (-(-bits_b // lane_bits))


class TemporalProduct(NamedTuple):
  """Result of :func:`temporal_product` / :func:`temporal_dot`: the exact integer product (int32) and how
  many lane-by-lane multiplications a ``lane_bits``-wide multiplier needs for it (the temporal cost)."""
  product: jax.Array   # int32, bit-exact x * y
  passes: int          # number of lane-by-lane multiplications


def temporal_product(x: jax.Array, y: jax.Array, bits: int, lane_bits: int) -> TemporalProduct:
  """``x * y`` of ``bits``-bit integers from ``lane_bits``-bit lane products, shifted and summed.

  Each pass multiplies one lane of ``x`` by one lane of ``y`` (a ``2 * lane_bits``-bit product, what a
  narrow integer multiplier computes) and adds it at offset ``(i + j) * lane_bits``. Bit-exact when the
  product fits int32 (``2 * bits <= 31``; FP16 significands: ``bits = 11``; INT8/INT16 signed).

  >>> r = temporal_product(jnp.int32(2047), jnp.int32(-1365), 12, 4)
  >>> int(r.product) == 2047 * -1365, r.passes
  (True, 9)
  """
  check_int("bits", bits, 1, 16)
  lx, ly = lane_split(x, bits, lane_bits), lane_split(y, bits, lane_bits)
  n = lx.shape[-1]
  acc = jnp.zeros(jnp.broadcast_shapes(lx.shape[:-1], ly.shape[:-1]), jnp.int32)
  for i in range(n):
    for j in range(n):
      acc = acc + ((lx[..., i] * ly[..., j]) << ((i + j) * lane_bits))
  return TemporalProduct(acc, n * n)


def temporal_dot(x: jax.Array, y: jax.Array, bits: int, lane_bits: int) -> TemporalProduct:
  """Integer matrix product ``x (M, K) @ y (K, N)`` from lane matrix products (int32 accumulation).

  Every pass is one integer matmul of lane matrices (``|lane| < 2^lane_bits``), e.g. the four INT4
  passes of an INT8 product; the partial results are shifted and summed. Raises if the exact result
  could overflow int32 (``K * 2^(2 bits - 2) >= 2^31``).

  >>> x = jnp.array([[-128, 127]], jnp.int8); y = jnp.array([[3], [-5]], jnp.int8)
  >>> r = temporal_dot(x, y, 8, 4)
  >>> int(r.product[0, 0]), r.passes
  (-1019, 4)
  """
  check_int("bits", bits, 1, 16)
  if np.ndim(x) != 2 or np.ndim(y) != 2 or np.shape(x)[1] != np.shape(y)[0]:
    raise ValueError(f"temporal_dot needs x (M, K) and y (K, N), got {np.shape(x)} and {np.shape(y)}.")
  k = np.shape(x)[1]
  if k * 2.0 ** (2 * bits - 2) >= 2.0 ** 31:
    raise ValueError(f"K={k} products of {bits}-bit integers may overflow int32; split K into chunks.")
  lx, ly = lane_split(x, bits, lane_bits), lane_split(y, bits, lane_bits)
  n = lx.shape[-1]
  acc = jnp.zeros((lx.shape[0], ly.shape[1]), jnp.int32)
  for i in range(n):
    for j in range(n):
      part = jax.lax.dot(lx[..., i], ly[..., j], preferred_element_type=jnp.int32)
      acc = acc + (part << ((i + j) * lane_bits))
  return TemporalProduct(acc, n * n)


# ----------------------------------------------------------------------------------------------------
# Injection into flax layers: dot_general and convolution.

SCALINGS = ("auto", "none", "pow2")


@dataclasses.dataclass(frozen=True)
class FpAlignConfig:
  """How a layer's products are computed by :func:`fp_dot`.

  Attributes:
    fmt: input format of both operands (``'fp16'``, ``'bf16'``, ``'fp8_e4m3'``, ``'fp8_e5m2'``).
    align_bits: ``w``; None = exact accumulation.
    convention: ``'truncate'`` or ``'drop'``.
    scaling: operands are rounded to ``fmt`` (nearest-even) before the product; ``'pow2'`` first scales
      each operand by a power of two so that its largest magnitude sits just below the format's maximum
      (exact; what FP8 inference needs) and undoes it inside the final rounding, so the output is the
      correctly rounded value in ``out_dtype`` of the unscaled (aligned) inner product and the scaled
      sum never overflows ``out_dtype`` on its own (FP8 with ``out_dtype=float16``); ``'none'`` casts
      directly, ``'auto'`` = ``'pow2'`` for FP8 and ``'none'`` for FP16/BF16. Values beyond the range
      become inf and the outputs that read them NaN. The ``'pow2'`` scale is one per *operand tensor*,
      computed from its largest magnitude over every row, batch included (in a flax layer: over the
      whole input batch). So one example's FP8 rounding, and hence its output, depends on the other examples in
      its batch, and FP8 accuracy can change with the evaluation batch size; evaluate with a fixed
      batch size (or batch 1) when comparing runs.
    out_dtype: accumulator output format (float32 by default).
    lane_bits: optional temporal decomposition of significand products (bit-identical results).
    max_align_bits: static bound when ``align_bits`` is a traced int32 scalar (a sweep over ``w``
      inside one compiled program); see :func:`fp_dot`.
  """
  fmt: str = "fp16"
  align_bits: int | None = 8
  convention: str = "truncate"
  scaling: str = "auto"
  out_dtype: Any = jnp.float32
  lane_bits: int | None = None
  max_align_bits: int | None = None

  def __post_init__(self):
    _check_common(self.fmt, self.align_bits, self.convention, self.out_dtype, self.max_align_bits)
    check_choice("scaling", self.scaling, SCALINGS)
    if self.lane_bits is not None:
      check_int("lane_bits", self.lane_bits, 1, 8)


def _cast(x, cfg: FpAlignConfig):
  """``(x * 2^k rounded to cfg.fmt, k)``: explicit rounding of a model tensor to the input format.

  ``k`` is one scalar per call, from the amax of the whole of ``x`` (batch rows included): examples
  that share a batch share the scale (documented in :class:`FpAlignConfig`)."""
  f = FORMATS[cfg.fmt]
  x = jnp.asarray(x, jnp.float32)
  mode = cfg.scaling if cfg.scaling != "auto" else ("pow2" if f.width == 8 else "none")
  if mode == "none":
    return x.astype(f.dtype), jnp.zeros((), jnp.int32)
  fmax = float(jnp.finfo(f.dtype).max)
  amax = jnp.max(jnp.abs(jnp.where(jnp.isfinite(x), x, 0.0)))
  k = jnp.where(amax > 0, jnp.floor(jnp.log2(fmax / jnp.maximum(amax, 1e-30))), 0.0)
  k = jnp.clip(k, -100, 100).astype(jnp.int32)
  k = jnp.where(amax * _pow2(k) > fmax, k - 1, k)                       # log2 is not exact
  scaled = x * _pow2(k)
  return scaled.astype(f.dtype), k


def _batched_fp_dot(a, b, cfg: FpAlignConfig, scale=0):
  """``(B, M, K) x (B, K, N)`` of format-typed operands -> float32 ``(B, M, N)``, times ``2^-scale``.

  ``scale`` (an int32 scalar) undoes the operands' power-of-two scaling (:func:`_cast`) inside the single
  rounding to ``cfg.out_dtype``: the result is the correctly rounded unscaled value, so a scaled sum
  beyond the range of ``out_dtype`` (FP8 operands scaled near their maximum, ``out_dtype=float16``)
  does not overflow to inf.
  """
  f, w, bound, od = _check_common(cfg.fmt, cfg.align_bits, cfg.convention, cfg.out_dtype,
                                  cfg.max_align_bits)
  k = a.shape[-1]
  if k == 0:
    return jnp.zeros((a.shape[0], a.shape[1], b.shape[2]), jnp.float32)
  nl = _num_limbs(f, bound, k)
  w = w if isinstance(w, jax.Array) else np.int32(w)
  zb = lambda x: jnp.zeros(x.shape[1:], bool)
  scale = jnp.asarray(scale, jnp.int32)
  fn = lambda x, y: _fp_matmul(x, y, zb(a), zb(b), w, scale, f.name, nl, cfg.convention, od,
                               1 << 24, cfg.lane_bits)
  return jax.vmap(fn)(a, b).astype(jnp.float32)


def _fpa_dot(cfg: FpAlignConfig | None, lhs, rhs, dimension_numbers, precision=None,
             preferred_element_type=None, **kwargs):
  if cfg is None:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(i % lhs.ndim for i in lc), tuple(i % rhs.ndim for i in rc)
  lb, rb = tuple(i % lhs.ndim for i in lb), tuple(i % rhs.ndim for i in rb)
  lf = tuple(i for i in range(lhs.ndim) if i not in lc + lb)
  rf = tuple(i for i in range(rhs.ndim) if i not in rc + rb)
  shp = lambda x, ax: tuple(x.shape[i] for i in ax)
  bsz, ksz = int(np.prod(shp(lhs, lb))), int(np.prod(shp(lhs, lc)))
  a = jnp.transpose(lhs, lb + lf + lc).reshape(bsz, int(np.prod(shp(lhs, lf))), ksz)
  b = jnp.transpose(rhs, rb + rc + rf).reshape(bsz, ksz, int(np.prod(shp(rhs, rf))))
  (qa, ka), (qb, kb) = _cast(a, cfg), _cast(b, cfg)
  out = _batched_fp_dot(qa, qb, cfg, ka + kb)                          # scale undone in the rounding
  out = out.reshape(shp(lhs, lb) + shp(lhs, lf) + shp(rhs, rf))
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def fp_align_dot_general(config: FpAlignConfig | None):
  """A ``lax.dot_general`` replacement whose products go through :func:`fp_dot` per ``config``.

  Pass it to ``flax.linen.Dense(dot_general=...)``, ``flax.nnx.Linear(dot_general=...)`` or the
  library's models (``models.CNN(dot_general=...)``). Operands are first rounded to ``config.fmt``
  (see :class:`FpAlignConfig`); any batch/contracting dimensions are supported. ``None`` = plain
  float product. Inference only (no gradient).

  >>> import flax.linen as nn
  >>> layer = nn.Dense(3, dot_general=fp_align_dot_general(FpAlignConfig('fp16', align_bits=8)))
  >>> x = jnp.ones((2, 4))
  >>> y = layer.apply(layer.init(jax.random.PRNGKey(0), x), x)
  >>> y.shape
  (2, 3)
  """
  if config is not None and not isinstance(config, FpAlignConfig):
    raise TypeError(f"config must be an FpAlignConfig or None, got {type(config).__name__}.")
  return functools.partial(_fpa_dot, config)


def _fpa_conv(cfg: FpAlignConfig | None, lhs, rhs, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None, **kwargs):
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides,
                           padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers,
                           feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision)
  if cfg is None:
    return conv(lhs, rhs, preferred_element_type=preferred_element_type, **kwargs)
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError("fp_align convolutions support feature_group_count=1 and batch_group_count=1; "
                     f"got {feature_group_count} and {batch_group_count}.")
  (qa, ka), (qb, kb) = _cast(lhs, cfg), _cast(rhs, cfg)
  dt = FORMATS[cfg.fmt].dtype
  # Round to the format first (exact copies from here on), then im2col: patches are one-hot
  # convolutions of format values, exact at any precision (<= 11 significant bits, wide exponent).
  pa, km, finish = _im2col(qa.astype(jnp.float32), qb.astype(jnp.float32), window_strides, padding,
                           lhs_dilation, rhs_dilation, dimension_numbers)
  out = _batched_fp_dot(pa[None].astype(dt), km[None].astype(dt), cfg, ka + kb)[0]
  out = finish(out)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def _im2col(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers):
  """``(patches (P, K), kernel (K, O), finish)``: a convolution as one matrix product.

  ``K`` runs over input channels (slowest) and the window; ``finish((P, O))`` restores the output
  layout of ``dimension_numbers``.
  """
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nsp = lhs.ndim - 2
  lhs_t = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  rhs_t = jnp.transpose(rhs, (dn.rhs_spec[1],) + tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[0],))
  sp = "".join("HWDXYZ"[i] for i in range(nsp))
  dn_t = jax.lax.conv_dimension_numbers(lhs_t.shape, (rhs_t.shape[-1], rhs_t.shape[0]) +
                                        rhs_t.shape[1:-1], ("N" + sp + "C", "OI" + sp, "N" + sp + "C"))
  patches = jax.lax.conv_general_dilated_patches(
      lhs_t, rhs_t.shape[1:-1], window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dn_t,
      precision=jax.lax.Precision.HIGHEST)                              # (N, sp'..., C * window)
  lead = patches.shape[:-1]
  o = rhs_t.shape[-1]

  def finish(out):
    out = out.reshape(lead + (o,))                                      # N, sp'..., O
    perm = [0] * out.ndim
    perm[dn.out_spec[0]] = 0
    perm[dn.out_spec[1]] = out.ndim - 1
    for i, ax in enumerate(dn.out_spec[2:]):
      perm[ax] = 1 + i
    return jnp.transpose(out, perm)

  return patches.reshape(-1, patches.shape[-1]), rhs_t.reshape(-1, o), finish


def fp_align_conv_general_dilated(config: FpAlignConfig | None):
  """A ``lax.conv_general_dilated`` replacement computing every output as an :func:`fp_dot` inner product.

  The inner product of one output pixel runs over input channels x window (im2col); for
  ``flax.linen.Conv(conv_general_dilated=...)`` and the library's models. Grouped convolutions raise.
  """
  if config is not None and not isinstance(config, FpAlignConfig):
    raise TypeError(f"config must be an FpAlignConfig or None, got {type(config).__name__}.")
  return functools.partial(_fpa_conv, config)


# ----------------------------------------------------------------------------------------------------
# flax modules: per-layer configs and exponent-spread statistics.

SPREAD_COLLECTION = "fp_align_spread"


class _PerLayer:
  """Shared logic of the flax modules: pick the layer's config; record shift histograms."""

  def _config(self) -> FpAlignConfig | None:
    names = [str(p) for p in self.path[:-1]]
    for key, cfg in self.overrides:
      if key in names:
        return cfg
    return self.config

  def _record(self, a2, b2, fmt):
    if self.is_mutable_collection(SPREAD_COLLECTION) and fmt is not None:
      (qa, _), (qb, _) = _cast(a2, fmt), _cast(b2, fmt)
      h = alignment_shift_histogram(qa, qb, fmt=fmt.fmt, max_rows=self.max_rows)
      var = self.variable(SPREAD_COLLECTION, "shift_histogram", jnp.zeros, h.shape, jnp.int32)
      var.value = var.value + h


class FpAlignDotGeneral(nn.Module, _PerLayer):
  """``dot_general_cls`` for flax ``Dense`` with per-layer configs and shift histograms.

  Attributes:
    config: default :class:`FpAlignConfig` (None = float).
    overrides: ``((layer_name, config_or_None), ...)``: a layer whose path contains ``layer_name``
      (e.g. ``'Dense_1'``) uses that config instead.
    max_rows: rows sampled per call for the histogram.

  With ``mutable=['fp_align_spread']`` each layer adds the histogram of its alignment shifts
  (:func:`alignment_shift_histogram`, ``config.fmt``) to ``fp_align_spread/.../shift_histogram``.
  """
  config: FpAlignConfig | None = FpAlignConfig()
  overrides: tuple = ()
  max_rows: int = 512

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    cfg = self._config()
    (lc, rc), (lb, rb) = dimension_numbers
    if not lb and not rb and len(lc) == 1 and len(rc) == 1 and rhs.ndim == 2:
      a2 = jnp.moveaxis(lhs, lc[0], -1).reshape(-1, lhs.shape[lc[0]])
      self._record(a2, jnp.moveaxis(rhs, rc[0], 0), cfg)
    return _fpa_dot(cfg, lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


class FpAlignConv(nn.Module, _PerLayer):
  """``conv_general_dilated_cls`` counterpart of :class:`FpAlignDotGeneral` (im2col inner products)."""
  config: FpAlignConfig | None = FpAlignConfig()
  overrides: tuple = ()
  max_rows: int = 512

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None, **kw):
    cfg = self._config()
    if cfg is not None and self.is_mutable_collection(SPREAD_COLLECTION):
      pa, km, _ = _im2col(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                          dimension_numbers)
      self._record(pa, km, cfg)
    return _fpa_conv(cfg, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count, precision,
                     preferred_element_type, **kw)


# ----------------------------------------------------------------------------------------------------
# MX-style block floating point: the same alignment window applied to the inputs, per block.


@dataclasses.dataclass(frozen=True)
class BfpConfig:
  """Block floating point with a shared exponent per ``block`` elements along the reduction axis.

  Each operand is rounded to ``fmt`` (as :class:`FpAlignConfig` with ``scaling='auto'``), then every
  block of ``block`` consecutive reduction elements shares the exponent of its largest element and
  each element is truncated (toward zero) to the grid ``2^(E_block - M - align_bits)``: elements within
  ``align_bits`` binades of the block maximum stay exact, smaller ones lose low bits (MX formats use
  ``block=32``). The products are then accumulated in float32.

  ``align_bits`` lies in ``[0, emax - emin]`` of ``fmt`` (fp16 29, bf16 253, E4M3 14, E5M2 29): at the
  upper bound every element of every block is exact, so larger values are rejected. It may be a traced
  int32; a traced value above the bound is clamped to it (the same exact result), and a traced negative
  value (it cannot be checked in Python) makes the whole :func:`bfp_quantize` output NaN, as a negative
  ``align_bits`` does in :func:`fp_dot`. A negative value raises ``ValueError`` when it is concrete (a
  Python int or a concrete array).

  FP8 operands are first scaled by one power of two per *tensor* (see :class:`FpAlignConfig`), so an
  example's result can depend on the other examples in its batch.
  """
  fmt: str = "fp8_e4m3"
  align_bits: Any = 8
  block: int = 32

  def __post_init__(self):
    f = _format(self.fmt)
    check_int("block", self.block, 1)
    if isinstance(self.align_bits, jax.Array) and is_concrete(self.align_bits):
      if np.ndim(self.align_bits) == 0 and int(self.align_bits) < 0:
        raise ValueError(f"align_bits must be >= 0 (bits kept below the block maximum's LSB), got "
                         f"{int(self.align_bits)}.")
    if not isinstance(self.align_bits, jax.Array):
      check_int("align_bits", self.align_bits, 0)
      top = _bfp_max_align(f)
      if self.align_bits > top:
        raise ValueError(f"align_bits={self.align_bits} is too large for BFP in {f.name}: it must lie in "
                         f"[0, {top}] (emax - emin); align_bits={top} already keeps every element exact.")


def _bfp_max_align(f: FloatFormat) -> int:
  """The largest useful BFP ``align_bits``: the grid then lies at or below every element's quantum."""
  return f.emax - f.emin


def _scale_pow2(x, t):
  """``x * 2^t`` for int32 ``t`` in ``[-252, 254]``, as two in-range exact power-of-two factors."""
  t1 = jnp.clip(t, -126, 127)
  return x * _pow2(t1) * _pow2(t - t1)


def bfp_quantize(x: jax.Array, cfg: BfpConfig, axis: int = -1) -> jax.Array:
  """``x`` (float) as block floating point per ``cfg`` along ``axis``; returns float32 values.

  Power-of-two scalings are exact: they are applied as at most two in-range float32 factors, and only to
  elements with bits below the block's grid. XLA on CPU flushes float32 subnormals, so there BF16
  subnormal inputs (below 2^-126) already read as 0.

  A traced negative ``cfg.align_bits`` gives an all-NaN output (see :class:`BfpConfig`).

  >>> x = jnp.array([1.0, 0.75, 3 * 2.0 ** -12, 0.0])     # grid 2^(0 - 10 - 1)
  >>> [float(v) * 2 ** 11 for v in bfp_quantize(x, BfpConfig('fp16', 1, block=4))]
  [2048.0, 1536.0, 1.0, 0.0]
  """
  if not isinstance(cfg, BfpConfig):
    raise TypeError(f"cfg must be a BfpConfig, got {type(cfg).__name__}.")
  f = FORMATS[cfg.fmt]
  q, k = _cast(x, FpAlignConfig(cfg.fmt, None))
  v = jnp.moveaxis(q.astype(jnp.float32), axis, -1)
  n = v.shape[-1]
  pad = (-n) % cfg.block
  vb = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]).reshape(v.shape[:-1] + (-1, cfg.block))
  e = decode(vb.astype(f.dtype), f).exp
  e = jnp.where(vb != 0, e, -_BIG)
  eblk = jnp.max(e, axis=-1, keepdims=True)
  w = jnp.minimum(jnp.asarray(cfg.align_bits, jnp.int32), _bfp_max_align(f))
  # Values of fmt are multiples of 2^(emin - M), so a finer grid changes nothing: clamping the grid there
  # keeps 2^-grid in [2^(M - emax), 2^(M - emin)] (two float32 power-of-two factors at most).
  grid = jnp.maximum(eblk - f.man_bits - w, f.emin - f.man_bits)
  small = e - f.man_bits < grid                                       # has bits below the grid
  t = jnp.trunc(_scale_pow2(jnp.where(small, vb, 0.0), -grid))        # |t| < 2^(M+1): no overflow
  out = jnp.where(small, _scale_pow2(t, grid), vb)                    # exact power-of-two scalings
  out = jnp.where(jnp.isfinite(vb), out, vb)
  out = out.reshape(v.shape[:-1] + (-1,))[..., :n] * _pow2(-k)
  if isinstance(cfg.align_bits, jax.Array):
    # a traced negative align_bits (concrete ones raise in BfpConfig) would put the grid above the block
    # maximum's LSB and truncate silently: the whole output says so instead
    out = jnp.where(w < 0, jnp.nan, out)
  return jnp.moveaxis(out, -1, axis)


def _check_bfp_operands(what: str, lhs, rhs) -> None:
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{what}: {name} must be a floating-point array (it is rounded to the BFP format), "
                      f"got dtype {dtype}; cast it first, e.g. x.astype(jnp.float32).")


def _bfp_dot(cfg: BfpConfig, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
             **kwargs):
  _check_bfp_operands("bfp_dot_general", lhs, rhs)
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError("dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
                     f"each a tuple of axes, got {dimension_numbers!r}.") from None
  if len(lc) != 1 or len(rc) != 1:
    raise ValueError("bfp_dot_general needs exactly one contracting dimension per operand (the axis the "
                     f"blocks run along), got {lc} and {rc}; reshape the operands to merge them.")
  for name, x, dims in (("lhs", lhs, lc + lb), ("rhs", rhs, rc + rb)):
    bad = [d for d in dims if not 0 <= d < np.ndim(x)]
    if bad:
      raise ValueError(f"dimension_numbers name axes {bad} of {name}, which has rank {np.ndim(x)} (shape "
                       f"{np.shape(x)}); axes must lie in [0, {np.ndim(x)}).")
  if np.shape(lhs)[lc[0]] != np.shape(rhs)[rc[0]]:
    raise ValueError(f"contracting dimensions differ: lhs axis {lc[0]} has {np.shape(lhs)[lc[0]]} elements, rhs "
                     f"axis {rc[0]} has {np.shape(rhs)[rc[0]]}.")
  qa, qb = bfp_quantize(lhs, cfg, lc[0]), bfp_quantize(rhs, cfg, rc[0])
  out = jax.lax.dot_general(qa, qb, ((lc, rc), (lb, rb)), precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def bfp_dot_general(cfg: BfpConfig):
  """A ``lax.dot_general`` replacement on block-floating-point operands (see :class:`BfpConfig`).

  MX-style block floating point: the alignment window of Abdelaziz et al. (MLSys 2021) applied to the
  inputs, per block. Each operand is quantized by :func:`bfp_quantize` along its one contracting axis
  (rounded to ``cfg.fmt``; blocks of ``cfg.block`` consecutive elements of that axis, the last one
  shorter when ``block`` does not divide it; every element truncated toward zero to its block's grid
  ``2^(E_block - M - align_bits)``), and the quantized operands are multiplied with float32
  accumulation (``Precision.HIGHEST``). Batch dimensions are supported; the output has the layout of
  ``lax.dot_general`` and dtype ``preferred_element_type`` or ``result_type(lhs, rhs)``. Inference only.

  For ``flax.linen.Dense(dot_general=...)`` and the library's models. Raises ``TypeError`` for a config
  that is not a :class:`BfpConfig` and, when called, for non-float operands; ``ValueError`` unless the
  dimension numbers name exactly one contracting axis per operand, in range and of equal length.

  >>> dot = bfp_dot_general(BfpConfig('fp16', align_bits=1, block=4))
  >>> a = jnp.array([[1.0, 0.75, 3 * 2.0 ** -12, 0.0]])        # the third element loses its low bit
  >>> f = jax.jit(lambda a, b: dot(a, b, (((1,), (0,)), ((), ()))))   # one compile (eager: one per op)
  >>> float(f(a, jnp.ones((4, 1)))[0, 0]) == 1.75 + 2.0 ** -11
  True
  """
  if not isinstance(cfg, BfpConfig):
    raise TypeError(f"cfg must be a BfpConfig, got {type(cfg).__name__}.")
  return functools.partial(_bfp_dot, cfg)


def _bfp_conv(cfg: BfpConfig, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
              preferred_element_type=None, **kwargs):
  _check_bfp_operands("bfp_conv_general_dilated", lhs, rhs)
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError("bfp convolutions support feature_group_count=1 and batch_group_count=1; got "
                     f"{feature_group_count} and {batch_group_count}.")
  if np.ndim(lhs) != np.ndim(rhs) or np.ndim(lhs) < 3:
    raise ValueError(f"lhs and rhs must have the same rank >= 3 (batch, feature, spatial...), got shapes "
                     f"{np.shape(lhs)} and {np.shape(rhs)}.")
  dn = jax.lax.conv_dimension_numbers(np.shape(lhs), np.shape(rhs), dimension_numbers)
  cin, kin = np.shape(lhs)[dn.lhs_spec[1]], np.shape(rhs)[dn.rhs_spec[1]]
  if cin != kin:
    raise ValueError(f"lhs has {cin} input features but the kernel expects {kin} (dimension_numbers "
                     f"{dimension_numbers!r}); check the layouts.")
  pa, km, finish = _im2col(jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32),
                           window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  out = _bfp_dot(cfg, pa, km, (((1,), (0,)), ((), ())))
  return finish(out).astype(preferred_element_type or jnp.result_type(lhs, rhs))


def bfp_conv_general_dilated(cfg: BfpConfig):
  """A ``lax.conv_general_dilated`` replacement: im2col, then :func:`bfp_dot_general` (blocks along K).

  Every output pixel is one inner product over ``K = C_in * prod(window)`` (input channels slowest, then
  the window positions in row-major order, zero padding included) and the BFP blocks of ``cfg.block``
  run along that ``K`` for both the patch and the kernel column (:class:`BfpConfig`; MX-style, the
  alignment window of Abdelaziz et al., MLSys 2021, on the inputs). Strides, padding, dilations and
  dimension numbers as in ``lax.conv_general_dilated``; grouped convolutions raise ``ValueError``, as do
  mismatched feature counts; non-float operands raise ``TypeError``. Inference only. For
  ``flax.linen.Conv(conv_general_dilated=...)`` and the library's models.

  >>> conv = bfp_conv_general_dilated(BfpConfig('fp16', align_bits=8, block=32))
  >>> f = jax.jit(lambda x, k: conv(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  >>> f(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 1)))[0, :2, :2, 0].tolist()   # zero padding at the edge
  [[8.0, 12.0], [12.0, 18.0]]
  """
  if not isinstance(cfg, BfpConfig):
    raise TypeError(f"cfg must be a BfpConfig, got {type(cfg).__name__}.")
  return functools.partial(_bfp_conv, cfg)
