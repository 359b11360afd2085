"""VS-Quant: per-vector scaled quantization with two-level scales.

Dai, Venkatesan, Ren, Zimmer, Dally and Khailany, "VS-Quant: Per-vector Scaled Quantization for Accurate
Low-Precision Neural Network Inference", MLSys 2021.

A tensor is cut along its reduction (contraction) axis into vectors of ``V`` consecutive elements, and each
vector gets its own scale, so a dot product of length K becomes K/V partial integer dot products, each
rescaled (Sec. 3):

    s_v = amax_v / Q,   q = clip(round(x / s_v), -Q, Q),   Q = 2^(b-1) - 1.

Two-level scaling (Sec. 3.2): the per-vector scales are themselves quantized to ``M``-bit unsigned
integers against one coarse floating-point scale per channel (weights) or per tensor (activations):

    gamma = max_v s_v / (2^M - 1),   s_v^int = clip(round(s_v / gamma), 1, 2^M - 1),   s_v ~ gamma * s_v^int,

so the hardware multiplies integers and applies one floating-point scale per output. A calibrated
``amax`` for activations fixes gamma (``coarse_amax``) while the per-vector scales stay dynamic: the
largest vector scale is then amax / Q and vectors with a larger range saturate. With float per-vector
scales (single level, ``scale_bits=None``) the same ``coarse_amax`` caps each vector's scale at amax / Q,
s_v = min(amax_v, amax) / Q: the limit of two-level scaling as M grows, and the static activation range
of :class:`~mlsys_jax.quant.QuantSpec` ``('vector', scale_bits=None)`` after calibration.

If the reduction length K is not a multiple of V, it is padded with zeros to the next multiple (zeros
do not change any dot product); codes keep the original shape and the scales have ceil(K / V) vectors.

Non-finite inputs: concrete arrays raise ``ValueError``; under tracing (``jit``, ``grad``, ``vmap``) a
vector holding NaN/inf gets a NaN scale: with float per-vector scales that vector dequantizes to NaN;
with two-level scales the integer vector scale cannot hold NaN, so the coarse scale of its group (a
channel for weights, the tensor for activations) becomes NaN. Never zeros. The same holds for a calibrated
``coarse_amax``: a concrete NaN/inf raises ``ValueError``; a traced one makes the scales of its group NaN,
so they dequantize to NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mlsys_jax._checks import check_finite, check_int
from mlsys_jax.quant import _pallas_quant, _pallas_quantize
from mlsys_jax.quant.fixed_point import _check_bits, _check_float, code_dtype, qrange, straight_through

__all__ = [
    "VSQuantizedTensor",
    "vs_dequantize",
    "vs_fake_quant",
    "vs_quantize",
]


@struct.dataclass
class VSQuantizedTensor:
  """Codes with per-vector scales (a pytree).

  The real value of element ``i`` of vector ``g`` is ``codes[i] * vector_scale[g] * coarse_scale``,
  where ``vector_scale`` is an integer-valued array (two-level, ``scale_bits`` = M) or the float scales
  themselves (``scale_bits`` None, then ``coarse_scale`` is 1).

  Attributes:
    codes: signed integer codes, same shape as the input.
    vector_scale: shape of the input with ``axis`` replaced by ``(ceil(K / V), 1)`` (split layout).
    coarse_scale: float32 per-channel/per-tensor scale, broadcastable to ``vector_scale``.
    bits, scale_bits, vector_size, axis: static metadata (``axis`` is the reduction axis).

  Example:
    >>> qt = vs_quantize(jax.random.normal(jax.random.PRNGKey(0), (64, 8)), 4, axis=0, vector_size=16)
    >>> qt.codes.shape, qt.vector_scale.shape, str(qt.vector_scale.dtype), qt.coarse_scale.shape
    ((64, 8), (4, 1, 8), 'uint8', (1, 1, 8))
  """
  codes: jax.Array
  vector_scale: jax.Array
  coarse_scale: jax.Array
  bits: int = struct.field(pytree_node=False)
  scale_bits: int | None = struct.field(pytree_node=False)
  vector_size: int = struct.field(pytree_node=False)
  axis: int = struct.field(pytree_node=False)

  def scales(self) -> jax.Array:
    """The effective float scale of every vector (split layout)."""
    return self.vector_scale.astype(jnp.float32) * self.coarse_scale


def _split(x: jax.Array, axis: int, v: int, pad: bool) -> tuple[jax.Array, int]:
  k = x.shape[axis]
  rem = k % v
  if rem:
    if not pad:
      raise ValueError(f"vector_size {v} does not divide the reduction length {k} (axis {axis}); use "
                       f"a divisor of {k} or pad=True to zero-pad to {k + v - rem}.")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, v - rem)
    x = jnp.pad(x, widths)
  shape = x.shape[:axis] + (x.shape[axis] // v, v) + x.shape[axis + 1:]
  return x.reshape(shape), k


def _merge(xs: jax.Array, axis: int, k: int) -> jax.Array:
  shape = xs.shape[:axis] + (xs.shape[axis] * xs.shape[axis + 1],) + xs.shape[axis + 2:]
  return jax.lax.slice_in_dim(xs.reshape(shape), 0, k, axis=axis)


def vs_quantize(x: jax.Array, bits: int, *, axis: int, vector_size: int = 16,
                scale_bits: int | None = 8, coarse_axes: tuple[int, ...] | None = None,
                coarse_amax: jax.Array | None = None, pad: bool = True,
                impl: str | None = None) -> VSQuantizedTensor:
  """Per-vector symmetric quantization of ``x`` along its reduction axis (VS-Quant, Sec. 3).

  Args:
    x: floating-point array.
    bits: code width b (2..16).
    axis: the reduction axis that vectors run along (0 for a dense kernel ``(in, out)``, -1 for
      activations ``(batch, in)``, the input-channel axis 2 of an HWIO convolution kernel).
    vector_size: V, elements per vector (16, 32 or 64 in the paper).
    scale_bits: M, bits of the integer per-vector scales (two-level scaling); None keeps float
      per-vector scales (single level).
    coarse_axes: axes (of ``x``, negative ones counted from the end, each at most once) over which the
      coarse scale is shared, besides ``axis`` (which may be listed; its vectors always share one coarse
      scale). Default: all but the last axis for weights-like use (per output channel when ``axis`` is not
      the last axis), and all axes when ``axis`` is the last one (per tensor, for activations).
    coarse_amax: calibrated amax (finite; its absolute value is used) that fixes the coarse scale (e.g.
      of an activation), broadcastable to the coarse shape (the split layout with the vector axes and
      ``coarse_axes`` of size 1); vectors with a larger range saturate. With ``scale_bits=None`` it caps
      each float vector scale at ``|coarse_amax| / Q`` instead (one cap per coarse group). A concrete
      NaN/inf raises ``ValueError``; a traced one gives NaN scales for its group.
    pad: zero-pad K to a multiple of V (True) or raise (False).
    impl: None (automatic: on a GPU the one-pass Pallas kernel of :mod:`mlsys_jax.quant._pallas_quantize`
      when the vectors run along the last axis, V is 16/32/64/128 and the coarse scale is per row
      (``coarse_axes=()``) or absent (``scale_bits=None``), after a once-per-process self-test against
      XLA; the XLA path otherwise), ``'xla'``, ``'pallas'`` (the kernel; GPU) or ``'interpret'`` (the
      kernel in Pallas' interpreter). The kernel's results are identical to the XLA path's, bit for bit.
      (A per-tensor coarse scale, the default for ``axis=-1``, needs the whole tensor's range before the
      first integer vector scale, so it cannot come from one read; it stays on the XLA path.)

  Returns:
    A :class:`VSQuantizedTensor`.

  Example:
    >>> from mlsys_jax.quant.fixed_point import dequantize, quantize, sqnr_db
    >>> w = jax.random.normal(jax.random.PRNGKey(0), (64, 8))     # dense kernel (in, out): vectors along in
    >>> qt = vs_quantize(w, 4, axis=0, vector_size=16)
    >>> per_channel = dequantize(quantize(w, 4, axis=0))          # one scale per output channel
    >>> round(float(sqnr_db(w, vs_dequantize(qt))), 1), round(float(sqnr_db(w, per_channel)), 1)   # dB
    (21.6, 19.3)
  """
  _check_bits(bits)
  _check_float("x", x)
  check_int("vector_size", vector_size, 1)
  if scale_bits is not None:
    check_int("scale_bits", scale_bits, 1, 16)
  check_finite("x", x)
  if coarse_amax is not None:
    check_finite("coarse_amax", coarse_amax)
  x = jnp.asarray(x)
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} out of range for rank {x.ndim}.")
  axis %= x.ndim
  if coarse_axes is not None:
    coarse_axes = _norm_coarse_axes(coarse_axes, x.ndim)
  rows_ok = impl != "xla" and _rows_ok(x, axis, vector_size, scale_bits, coarse_axes, coarse_amax, pad)
  kimpl = _pallas_quantize.choose_impl(
      impl, rows_ok, lambda: f"vectors along the last axis (got axis {axis} of rank {x.ndim}), vector_size in "
      f"{_pallas_quantize.VECTOR_SIZES} (got {vector_size}), a per-row coarse scale (coarse_axes=(), got "
      f"{coarse_axes}) or scale_bits=None, no coarse_amax, a float dtype and rows of at most "
      f"{_pallas_quantize.MAX_ROW} elements (got {x.shape[-1] if x.ndim else 0})")
  if kimpl:
    return _vs_quantize_rows(x, bits, vector_size, scale_bits, kimpl)
  xs, k = _split(x.astype(jnp.float32), axis, vector_size, pad)
  _, qmax = qrange(bits, True, False)
  amax_v = jnp.max(jnp.abs(xs), axis=axis + 1, keepdims=True)     # one per vector
  bad_v = jnp.any(~jnp.isfinite(xs), axis=axis + 1, keepdims=True)
  s_v = jnp.where(bad_v, jnp.nan, amax_v / qmax)
  if coarse_axes is None:
    coarse_axes = tuple(range(x.ndim)) if axis == x.ndim - 1 else tuple(range(x.ndim - 1))
  # Axes of the split layout reduced for the coarse scale: the vector-index axis plus coarse_axes.
  red = tuple(sorted({axis} | {a if a < axis else a + 1 for a in coarse_axes if a != axis}))
  cshape = tuple(1 if d in red or d == axis + 1 else n for d, n in enumerate(xs.shape))
  cap = None if coarse_amax is None else _coarse_cap(coarse_amax, qmax, cshape)
  if scale_bits is None:
    if cap is not None:
      s_v = jnp.minimum(s_v, cap)        # NaN (bad vector or traced NaN/inf amax) stays NaN
    vec, coarse = jnp.where(s_v == 0, 1.0, s_v), jnp.ones((1,) * xs.ndim, jnp.float32)
  else:
    smax = (2 ** scale_bits) - 1
    top = jnp.max(s_v, axis=red, keepdims=True) if cap is None else cap
    coarse = jnp.where(top > 0, top / smax, 1.0)
    coarse = jnp.where(jnp.any(bad_v, axis=red, keepdims=True) | jnp.isnan(top), jnp.nan, coarse)
    vec = jnp.clip(jnp.nan_to_num(jnp.round(s_v / coarse), nan=1.0), 1, smax)
  scale = vec * coarse
  q = jnp.clip(jnp.round(xs / scale), -qmax, qmax)
  codes = _merge(q, axis, k).astype(code_dtype(bits, False))
  if scale_bits is not None:
    vec = vec.astype(code_dtype(scale_bits, True))
  return VSQuantizedTensor(codes, vec, coarse, bits, scale_bits, vector_size, axis)


def _norm_coarse_axes(coarse_axes, ndim: int) -> tuple[int, ...]:
  """``coarse_axes`` as sorted non-negative axes of an array of rank ``ndim``; raises on bad entries."""
  axes = (coarse_axes,) if isinstance(coarse_axes, (int, np.integer)) else coarse_axes
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"coarse_axes must be None, an int or a sequence of ints, got "
                    f"{type(coarse_axes).__name__} ({coarse_axes!r}).") from None
  out = []
  for i, a in enumerate(axes):
    check_int(f"coarse_axes[{i}]", a)
    if not -ndim <= a < ndim:
      raise ValueError(f"coarse_axes entry {a} is out of range for x of rank {ndim}; use axes in "
                       f"[{-ndim}, {ndim - 1}] (negative ones count from the end).")
    a = int(a) % ndim
    if a in out:
      raise ValueError(f"coarse_axes {tuple(axes)} names axis {a} more than once (negative axes count from "
                       "the end); list each axis once.")
    out.append(a)
  return tuple(sorted(out))


def _coarse_cap(coarse_amax, qmax: int, shape: tuple[int, ...]) -> jax.Array:
  """``|coarse_amax| / qmax`` broadcast to the coarse shape (split layout); non-finite (traced) -> NaN."""
  amax = jnp.asarray(coarse_amax, jnp.float32)
  try:
    full = jnp.broadcast_shapes(amax.shape, shape)
  except ValueError:
    full = None
  if full != shape:
    raise ValueError(f"coarse_amax of shape {amax.shape} does not broadcast to the coarse-scale shape {shape} "
                     "(x's split layout with the vector axes and the coarse_axes of size 1); pass a scalar "
                     "or one amax per coarse group.")
  cap = jnp.abs(amax) / qmax
  return jnp.broadcast_to(jnp.where(jnp.isfinite(cap), cap, jnp.nan), shape)


def _rows_ok(x: jax.Array, axis: int, vector_size: int, scale_bits, coarse_axes, coarse_amax,
             pad: bool) -> bool:
  """Whether the one-pass row kernel takes this call (see ``impl`` in :func:`vs_quantize`)."""
  per_row = scale_bits is None or (coarse_axes is None and x.ndim == 1) or (
      coarse_axes is not None and all(a == axis for a in coarse_axes))
  return (x.ndim >= 1 and axis == x.ndim - 1 and coarse_amax is None and per_row
          and vector_size in _pallas_quantize.VECTOR_SIZES and 0 < x.size < 2 ** 31
          and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
          and _pallas_quantize.row_ok(x.shape[-1]) and (pad or x.shape[-1] % vector_size == 0))


def _vs_quantize_rows(x: jax.Array, bits: int, vector_size: int, scale_bits: int | None, impl: str,
                      **tile) -> VSQuantizedTensor:
  """:func:`vs_quantize` along the last axis with a per-row (or no) coarse scale, through the one-pass
  row kernel of :mod:`mlsys_jax.quant._pallas_quantize`; identical results."""
  lead, k = x.shape[:-1], x.shape[-1]
  sdt = code_dtype(scale_bits, True) if scale_bits is not None else jnp.float32

  def kernel(x):
    codes, vec, coarse = _pallas_quantize.vs_quantize_rows(x.reshape(-1, k), bits, vector_size, scale_bits,
                                                           code_dtype(bits, False), sdt, impl=impl, **tile)
    g = vec.shape[-1]
    if coarse is None:
      coarse = jnp.ones((1,) * (x.ndim + 1), jnp.float32)
    else:
      coarse = coarse.reshape(lead + (1, 1))
    return VSQuantizedTensor(codes.reshape(x.shape), vec.reshape(lead + (g, 1)), coarse, bits, scale_bits,
                             vector_size, x.ndim - 1)

  xla = lambda x: vs_quantize(x, bits, axis=x.ndim - 1, vector_size=vector_size, scale_bits=scale_bits,
                              coarse_axes=(), impl="xla")
  return _pallas_quantize.differentiable_like(kernel, xla)(x)


def _onepass_ok(x: jax.Array, axis: int, vector_size: int, coarse_axes, coarse_amax) -> bool:
  """Whether the one-pass kernel takes this call: a 2-D kernel quantized along axis 0 with the default
  (per-column) coarse scale, K a multiple of V, V a power of two."""
  return (x.ndim == 2 and axis == 0 and coarse_amax is None and coarse_axes in (None, (0,), [0])
          and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) and 0 < x.size < 2 ** 31
          and x.shape[0] % vector_size == 0 and vector_size & (vector_size - 1) == 0
          and vector_size <= 1024)


def _vs_quantize_onepass(x: jax.Array, bits: int, vector_size: int, scale_bits: int | None, impl: str,
                         **tile) -> VSQuantizedTensor:
  """:func:`vs_quantize` through the one-pass kernel of :mod:`mlsys_jax.quant._pallas_quant`."""
  sdt = code_dtype(scale_bits, True) if scale_bits is not None else jnp.float32
  codes, vec, coarse = _pallas_quant.vs_quantize_cols(x, bits, vector_size, scale_bits,
                                                      code_dtype(bits, False), sdt, impl=impl, **tile)
  return VSQuantizedTensor(codes, vec, coarse, bits, scale_bits, vector_size, 0)


def vs_dequantize(qt: VSQuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """Real values of a :class:`VSQuantizedTensor` (the inverse of :func:`vs_quantize` up to rounding).

  Example:
    >>> w = jnp.arange(32.0).reshape(32, 1)                # two vectors: 0..15 and 16..31
    >>> qt = vs_quantize(w, 8, axis=0, vector_size=16, scale_bits=None)    # float per-vector scales
    >>> np.asarray(qt.scales(), float).round(4).ravel().tolist()          # amax / 127 per vector
    [0.1181, 0.2441]
    >>> bool(jnp.all(jnp.abs(vs_dequantize(qt) - w) <= qt.scales().max() / 2))
    True
  """
  if not isinstance(qt, VSQuantizedTensor):
    raise TypeError(f"vs_dequantize expects a VSQuantizedTensor, got {type(qt).__name__}.")
  cs, k = _split(qt.codes.astype(jnp.float32), qt.axis, qt.vector_size, True)
  return _merge(cs * qt.scales(), qt.axis, k).astype(dtype)


def vs_fake_quant(x: jax.Array, bits: int, *, axis: int, vector_size: int = 16,
                  scale_bits: int | None = 8, coarse_axes=None, coarse_amax=None) -> jax.Array:
  """``vs_dequantize(vs_quantize(x, ...))`` with a straight-through gradient (zero where saturated).

  Example:
    >>> x = jnp.array([[0.1, -0.2, 0.3, 4.0]])
    >>> np.asarray(vs_fake_quant(x, 4, axis=-1, vector_size=2, scale_bits=None), float).round(2).tolist()
    [[0.09, -0.2, 0.57, 4.0]]
    >>> from mlsys_jax.quant.fixed_point import fake_quant
    >>> np.asarray(fake_quant(x, 4), float).round(2).tolist()    # one scale per tensor: small values vanish
    [[0.0, 0.0, 0.57, 4.0]]
  """
  qt = vs_quantize(x, bits, axis=axis, vector_size=vector_size, scale_bits=scale_bits,
                   coarse_axes=coarse_axes, coarse_amax=coarse_amax)
  y = vs_dequantize(qt, x.dtype)
  _, qmax = qrange(bits, True, False)
  ones = jnp.ones(x.shape, jnp.float32)
  hs, k = _split(ones, qt.axis, vector_size, True)
  hi = _merge(hs * qt.scales() * qmax, qt.axis, k)
  return straight_through(x, y, -hi, hi)
