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

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_int, is_concrete

__all__ = [
    "CONVENTIONS",
    "FORMATS",
    "FloatFormat",
    "alignment_shift_histogram",
    "decode",
    "fp_dot",
    "max_alignment_shift",
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
  """``floor(x * 2^r)`` for non-negative int32 ``x`` and int32 ``r`` (bits beyond 32 are lost)."""
  left = jax.lax.shift_left(x, jnp.clip(r, 0, 31))
  right = jax.lax.shift_right_logical(x, jnp.clip(-r, 0, 31))
  return jnp.where(r >= 0, jnp.where(r > 31, 0, left), jnp.where(r < -31, 0, right))


def _block_sums(sa, ea, sb, eb, emax, w, drop: bool, nl: int, lw: int):
  """Limb sums ``(rows, cols, nl)`` of the aligned products of a row block.

  ``sa (r, K)``/``sb (K, c)``: signed significands; ``ea``/``eb``: exponents with zero operands at
  ``-_BIG``; ``emax (r, c)``: the largest product exponent.
  """
  mag = jnp.abs(sa)[:, :, None] * jnp.abs(sb)[None, :, :]              # exact: < 2^(2M+2) <= 2^22
  neg = (sa[:, :, None] < 0) != (sb[None, :, :] < 0)
  d = emax[:, None, :] - ea[:, :, None] - eb[None, :, :]                 # alignment shift, >= 0
  s = w - d                                                              # position of the product LSB
  if drop:
    mag = jnp.where(d > w, 0, mag)
  mag = jnp.where(neg, -mag, mag)
  limbs = []
  for j in range(nl):            # one fused reduction over K per limb
    v = _shift(jnp.abs(mag), s - j * lw)
    if j < nl - 1:
      v = v & ((1 << lw) - 1)
    limbs.append(jnp.sum(jnp.where(mag < 0, -v, v), axis=1))
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
  pow2 = lambda t: jax.lax.bitcast_convert_type((t + 127) << 23, jnp.float32)
  val = kept.astype(jnp.float32) * pow2(e1) * pow2(e2)
  val = jnp.where(top > emax_out, jnp.inf, val)
  val = jnp.where(zero, 0.0, val)
  return jnp.where(neg, -val, val).astype(out_dtype)


def _num_limbs(f: FloatFormat, w_bound: int, k: int) -> int:
  return -(-(f.product_bits + w_bound) // _limb_width(k))


def _matmul(a: Decoded, b: Decoded, f: FloatFormat, w, nl: int, convention: str, out_dtype,
            block_elems: int):
  """``(M, K) x (K, N)`` limited-alignment products of decoded operands (``w`` may be traced)."""
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
    limbs = _block_sums(sa_blk, ea_blk, b.sig, eb, emax, w, convention == "drop", nl, lw)
    base = emax - 2 * f.man_bits - w
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


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _fp_matmul(a, b, bad_a, bad_b, w, fmt: str, nl: int, convention: str, out_dtype, block_elems: int):
  """One compiled program per (shapes, format, limb count, convention); ``w`` is an argument."""
  f = FORMATS[fmt]
  da, db = decode(a, f), decode(b, f)
  da = da._replace(bad=da.bad | bad_a)
  db = db._replace(bad=db.bad | bad_b)
  w = jnp.asarray(w, jnp.int32)
  out = _matmul(da, db, f, w, nl, convention, out_dtype, block_elems)
  lw = _limb_width(a.shape[1])
  ok = (w >= 0) & (f.product_bits + w <= nl * lw)     # a traced w outside its declared bound
  return jnp.where(ok, out, jnp.nan).astype(out_dtype)


def fp_dot(a: jax.Array, b: jax.Array, *, fmt: str, align_bits: int | None = None,
           convention: str = "truncate", out_dtype: Any = jnp.float32,
           max_align_bits: int | None = None, block_elems: int = 1 << 24) -> jax.Array:
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
      A traced ``align_bits`` outside ``[0, max_align_bits]`` makes the whole output NaN.
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
    out = _fp_matmul(a2, b2, ba, bb, w, f.name, nl, convention, od, block_elems)
  if a.ndim == 1:
    out = out[0]
  if b.ndim == 1:
    out = out[..., 0]
  return out


def alignment_shift_histogram(a: jax.Array, b: jax.Array, *, fmt: str,
                              max_rows: int | None = 4096, block_elems: int = 1 << 23) -> jax.Array:
  """Counts of alignment shifts ``d = E - e(a_k) - e(b_k)`` over the nonzero products of ``a @ b``.

  ``out[d]`` for ``d = 0 .. max_alignment_shift(fmt)``; the paper's motivation (Sec. 3) is this spread.
  Zero products (e.g. after ReLU) are not counted: they need no alignment. ``max_rows`` subsamples rows
  of ``a`` evenly (None = all).

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
    d = jnp.where(pe > -_BIG, emax - pe, nb)                  # zero products -> overflow bin
    return carry + jnp.bincount(d.ravel(), length=nb + 1)[:nb], None

  out, _ = jax.lax.scan(one, jnp.zeros((nb,), jnp.int32), ea.reshape(nblk, rows, k))
  return out
