"""Fixed-point (integer) codes: quantize, dequantize and straight-through fake quantization.

A real tensor x is represented by integer codes q and a scale s (and, for asymmetric quantization, an
integer zero point z) so that x ~ s * (q - z):

- symmetric, signed codes:   q = clip(round(x / s), -Q, Q),  s = amax / Q,  Q = 2^(b-1) - 1;
- asymmetric, unsigned codes: q = clip(round(x / s) + z, 0, 2^b - 1), s = (hi - lo) / (2^b - 1),
  z = round(-lo / s), with the range [lo, hi] widened to contain 0 so that zero is exact.

Granularity is given by ``axis``: the axes that share one scale (they are reduced when the range is
computed). ``axis=None`` is per-tensor; for a dense kernel of shape (in, out), ``axis=0`` gives one scale
per output channel (per-channel). Per-vector scales live in :mod:`mlsys_jax.quant.vsquant`.

Codes can be stored *signed* (int8/int16, symmetric around 0) or *unsigned* (uint8/uint16, what a memory
holds and what bit-error models flip, see Stutz et al., MLSys 2021): ``unsigned=True`` with a symmetric
quantizer stores q + 2^(b-1) and keeps the zero point 2^(b-1).

Rounding is round-to-nearest-even (``'nearest'``) or stochastic (``'stochastic'``, unbiased:
E[q] = x / s inside the range), the latter needs a PRNG ``key``.

Non-finite inputs: concrete arrays with NaN/inf raise ``ValueError``. Under ``jit`` (or any tracing:
``grad``, ``vmap``) the check cannot run, and integer codes cannot hold NaN, so the *scale* carries it:
every scale group (the elements that share one scale) holding a NaN gets scale NaN, and so does a
group holding +-inf when its range is computed from the data (the range is then undefined);
:func:`dequantize` and :func:`fake_quant` return NaN for the whole group, never zeros. With a calibrated
range (``bounds``) +-inf saturates to the end of the range like any out-of-range value. Bounds that do
not define a range get a NaN scale for their groups when they are traced (a NaN or +-inf end, or
``lo > hi``: reversed or infinite bounds have no finite scale, and a scale of inf or 0 would quantize
silently to the wrong values); concrete ones raise ``ValueError`` instead (:func:`compute_scale`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mlsys_jax._checks import check_bool, check_choice, check_finite, check_int, is_concrete
from mlsys_jax.quant import _pallas_quant, _pallas_quantize

__all__ = [
    "QuantizedTensor",
    "code_dtype",
    "compute_scale",
    "dequantize",
    "fake_quant",
    "qrange",
    "quantize",
    "sqnr_db",
]

Axis = int | Sequence[int] | None


def _check_bits(bits: int) -> None:
  check_int("bits", bits, 2, 16)


def _check_float(name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}; quantize real values, "
                    "or cast with x.astype(jnp.float32).")


def _norm_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for an array of rank {ndim}.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis {axis} repeats an axis.")
  return tuple(sorted(out))


def qrange(bits: int, symmetric: bool, unsigned: bool) -> tuple[int, int]:
  """Smallest and largest code: symmetric signed [-Q, Q], symmetric unsigned [1, 2^b - 1]
  (Q = 2^(b-1) - 1, zero at 2^(b-1)), asymmetric unsigned [0, 2^b - 1], asymmetric signed
  [-2^(b-1), 2^(b-1) - 1].

  Example:
    >>> qrange(8, symmetric=True, unsigned=False), qrange(8, symmetric=False, unsigned=True)
    ((-127, 127), (0, 255))
  """
  _check_bits(bits)
  half = 2 ** (bits - 1)
  if symmetric:
    return (1, 2 * half - 1) if unsigned else (-(half - 1), half - 1)
  return (0, 2 * half - 1) if unsigned else (-half, half - 1)


def code_dtype(bits: int, unsigned: bool) -> jnp.dtype:
  """Narrowest integer dtype that holds ``bits``-bit codes (uint8/uint16 or int8/int16).

  Example:
    >>> code_dtype(8, unsigned=False), code_dtype(12, unsigned=True)
    (dtype('int8'), dtype('uint16'))
  """
  _check_bits(bits)
  if unsigned:
    return jnp.dtype(jnp.uint8 if bits <= 8 else jnp.uint16)
  return jnp.dtype(jnp.int8 if bits <= 8 else jnp.int16)


@struct.dataclass
class QuantizedTensor:
  """Integer codes with their scale and zero point; a pytree (codes, scale, zero_point are leaves).

  The real value is ``scale * (codes - zero_point)``. ``scale`` and ``zero_point`` broadcast against
  ``codes`` (they keep reduced axes as size 1).

  Attributes:
    codes: integer codes (int8/int16, or uint8/uint16 when ``unsigned``).
    scale: float32 step size, broadcastable to ``codes``.
    zero_point: integer-valued float32 zero point (0 for symmetric signed codes).
    bits: code width in bits (static).
    symmetric: whether the range is symmetric around zero (static).
    unsigned: whether the codes are stored unsigned (static).
    axis: the axes that share one scale, e.g. ``(0, 1, 2)`` for per-tensor of a 3-D array (static).

  Example:
    >>> qt = quantize(jnp.array([0.0, 1.0, 2.0, 4.0]), 8, symmetric=False, unsigned=True)
    >>> qt.codes.tolist(), str(qt.codes.dtype), qt.shape, float(qt.nbytes_payload)   # 4 codes + scale + zp
    ([0, 64, 127, 255], 'uint8', (4,), 12.0)
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  bits: int = struct.field(pytree_node=False)
  symmetric: bool = struct.field(pytree_node=False)
  unsigned: bool = struct.field(pytree_node=False)
  axis: tuple[int, ...] = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def nbytes_payload(self) -> float:
    """Bits of the codes plus 32 bits per scale and zero point, in bytes."""
    return (np.prod(self.codes.shape) * self.bits + 32 * np.size(self.scale) * (1 if self.symmetric else 2)) / 8


def compute_scale(lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool, unsigned: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point of ``bits``-bit codes for the real range ``[lo, hi]`` (uniform affine quantization).

  The range is first widened to contain 0 (``lo <- min(lo, 0)``, ``hi <- max(hi, 0)``) so that real 0
  has an exact code (Jacob et al., CVPR 2018, Sec. 2.1). With ``[qmin, qmax] = qrange(bits, symmetric,
  unsigned)``:

  - symmetric: ``s = amax / Q``, ``amax = max(-lo, hi)``, ``Q = (qmax - qmin) // 2 = 2^(b-1) - 1``;
    zero point ``2^(b-1)`` for unsigned codes, else 0;
  - asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = clip(round(qmin - lo / s), qmin, qmax)``
    (round half to even), so ``lo`` maps to code ``qmin`` and ``hi`` to ``qmax`` (up to rounding of ``z``).

  A zero-width range (``amax = 0``, or ``lo = hi = 0`` after widening) gets scale 1, so it quantizes to
  the zero point without dividing by zero.

  Args:
    lo, hi: range ends, any broadcastable shapes (e.g. per channel, with reduced axes kept), cast to
      float32. Concrete values must be finite with ``lo <= hi`` (else ``ValueError``). Traced values
      (under ``jit``, ``vmap``, ``grad``) cannot be checked in Python: where an end is NaN or +-inf, or
      ``lo > hi``, the scale is NaN (and so is everything dequantized with it), never a finite or
      infinite scale that would give wrong codes silently.
    bits: code width, 2..16.
    symmetric, unsigned: bools, as in :func:`quantize` (and :func:`qrange`).

  Returns:
    ``(scale, zero_point)``: float32 arrays of the broadcast shape of ``lo`` and ``hi``; the zero point
    holds integer values.

  Example:
    >>> scale, zp = compute_scale(jnp.float32(-1.0), jnp.float32(3.0), 8, symmetric=False, unsigned=True)
    >>> round(float(scale), 6), float(zp)                    # 4 / 255 per step; real 0 maps to code 64
    (0.015686, 64.0)
  """
  check_bool("symmetric", symmetric)
  check_bool("unsigned", unsigned)
  qrange(bits, symmetric, unsigned)          # checks bits
  checked = is_concrete(lo) and is_concrete(hi)
  if checked:
    # one host copy of each end (an eager call on device arrays synchronizes here)
    lo_n, hi_n = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    check_finite("lo", lo_n)
    check_finite("hi", hi_n)
    try:
      lo_b, hi_b = np.broadcast_arrays(lo_n, hi_n)
    except ValueError:
      raise ValueError(f"lo and hi must broadcast together, got shapes {lo_n.shape} and {hi_n.shape}.") from None
    if np.any(lo_b > hi_b):
      i = tuple(int(v) for v in np.argwhere(lo_b > hi_b)[0])
      raise ValueError(f"lo must be <= hi, got lo = {lo_b[i]!r} > hi = {hi_b[i]!r} at index {list(i)}; "
                       "pass the range as (lo, hi) = (min, max).")
  else:
    check_finite("lo", lo)                   # the concrete one of the two, if any
    check_finite("hi", hi)
  # concrete ends were checked above (finite, ordered): the in-graph test would be a no-op there
  return _scale_zp(lo, hi, bits, symmetric, unsigned, nan_scale=not checked)


def _scale_zp(lo, hi, bits: int, symmetric: bool, unsigned: bool, nan_scale: bool = True
              ) -> tuple[jax.Array, jax.Array]:
  """:func:`compute_scale` without its argument checks, for :func:`quantize`'s data-driven range (the
  min and max of an already checked ``x``: finite and ordered by construction, so checking them again
  would only add a device-to-host copy per eager call). ``nan_scale=True`` (unchecked, e.g. traced,
  ends) makes the scale NaN where the ends define no range: a NaN or +-inf end, or ``lo > hi``.
  ``nan_scale=False`` leaves that test out, for ends known to be finite and ordered (checked concrete
  ends; the data's min/max, where ``quantize`` marks every group holding a NaN/inf itself)."""
  qmin, qmax = qrange(bits, symmetric, unsigned)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  # no range: NaN/inf ends or reversed ends; the scale says so (never 1, inf or a reversed-range value).
  # ~(lo <= hi) is also True where either end is NaN.
  undefined = (~(lo <= hi) | jnp.isinf(lo) | jnp.isinf(hi)) if nan_scale else None
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  if symmetric:
    amax = jnp.maximum(-lo, hi)
    q = (qmax - qmin) // 2
    scale = jnp.where(amax > 0, amax / q, 1.0)
    zp = jnp.full_like(scale, 2 ** (bits - 1) if unsigned else 0)
  else:
    scale = jnp.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
    zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
  return (jnp.where(undefined, jnp.nan, scale) if nan_scale else scale), zp


def _round(v: jax.Array, rounding: str, key) -> jax.Array:
  if rounding == "nearest":
    return jnp.round(v)
  return jnp.floor(v + jax.random.uniform(key, v.shape, v.dtype))


def quantize(x: jax.Array, bits: int, *, symmetric: bool = True, axis: Axis = None,
             unsigned: bool = False, rounding: str = "nearest", key: jax.Array | None = None,
             bounds: jax.Array | tuple[jax.Array, jax.Array] | None = None,
             impl: str | None = None) -> QuantizedTensor:
  """Quantize ``x`` to ``bits``-bit fixed-point codes.

  Args:
    x: floating-point array.
    bits: code width, 2..16.
    symmetric: range [-amax, amax] (True) or [min, max] with an integer zero point (False).
    axis: axes sharing one scale (reduced when computing the range); None = per-tensor. For a dense
      kernel ``(in, out)``, ``axis=0`` is per output channel.
    unsigned: store unsigned codes (uint8/uint16). Asymmetric codes are unsigned by nature; with
      ``unsigned=False`` they are shifted by -2^(b-1) into a signed type.
    rounding: ``'nearest'`` or ``'stochastic'`` (needs ``key``).
    key: PRNG key for stochastic rounding.
    bounds: calibrated range instead of the data's own: ``amax`` (symmetric) or ``(lo, hi)``, each
      broadcastable to the reduced shape; values outside saturate.
    impl: None (automatic: on a GPU the one-pass Pallas kernel of
      :mod:`mlsys_jax.quant._pallas_quantize` when the scale groups are rows, i.e. ``axis`` is the
      trailing axes, rounding is nearest and the range comes from the data, after a once-per-process
      self-test against XLA; the XLA path otherwise), ``'xla'``, ``'pallas'`` (the kernel; GPU) or
      ``'interpret'`` (the kernel in Pallas' interpreter, any backend). The kernel's results are
      identical to the XLA path's, bit for bit.

  Returns:
    A :class:`QuantizedTensor`. An empty ``x`` gives empty codes of the same shape; a scale group with
    no elements (a zero-size reduced axis) gets the scale and zero point of an all-zero group (the
    zero-width range [0, 0]: scale 1), instead of failing on the min/max of nothing.

  Example:
    >>> w = jnp.array([[0.5, -2.0], [-1.0, 1.0]])
    >>> qt = quantize(w, 8, axis=0)            # per-output-channel int8 codes of a (in, out) kernel
    >>> qt.codes.tolist(), qt.scale.shape
    ([[64, -127], [-127, 64]], (1, 2))
    >>> bool(jnp.all(jnp.abs(dequantize(qt) - w) <= qt.scale / 2))
    True
  """
  _check_bits(bits)
  _check_float("x", x)
  check_choice("rounding", rounding, ("nearest", "stochastic"))
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a PRNG key: quantize(..., key=jax.random.PRNGKey(0)).")
  check_finite("x", x)
  x = jnp.asarray(x)
  axes = _norm_axes(axis, x.ndim)
  rows_ok = impl != "xla" and bounds is None and rounding == "nearest" and _row_groups(x, axes)
  kimpl = _pallas_quantize.choose_impl(
      impl, rows_ok, lambda: f"rounding='nearest', no bounds, a float dtype and axis = the trailing axes with at "
      f"most {_pallas_quantize.MAX_ROW} elements per row; got axis={axes} for shape {x.shape}, dtype {x.dtype}, "
      f"rounding={rounding!r}, bounds {'given' if bounds is not None else 'None'}")
  if kimpl:
    return _quantize_rows(x, bits, symmetric, unsigned, axes, kimpl)
  xf = x.astype(jnp.float32)
  if bounds is None and x.size == 0:
    # an empty tensor: no groups, or groups without elements (a zero-size reduced axis, where min/max
    # have no identity); an empty group's range is the zero-width [0, 0]: scale 1, no codes to hold
    kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    lo = hi = jnp.zeros(kept, jnp.float32)
  elif bounds is None:
    lo = jnp.min(xf, axis=axes, keepdims=True)
    hi = jnp.max(xf, axis=axes, keepdims=True)
  elif symmetric and not isinstance(bounds, tuple):
    hi = jnp.abs(jnp.asarray(bounds, jnp.float32))
    lo = -hi
  elif isinstance(bounds, tuple) and len(bounds) == 2:
    lo, hi = (jnp.asarray(b, jnp.float32) for b in bounds)
  else:
    raise ValueError("bounds must be amax (symmetric) or a (lo, hi) pair.")
  if bounds is None:   # min/max of the checked x: finite and lo <= hi already
    scale, zp = _scale_zp(lo, hi, bits, symmetric, unsigned or not symmetric, nan_scale=False)
  else:
    scale, zp = compute_scale(lo, hi, bits, symmetric, unsigned or not symmetric)
  # NaN (and, for a data-driven range, +-inf) makes the group's scale NaN: codes cannot carry it.
  bad = jnp.isnan(xf) if bounds is not None else ~jnp.isfinite(xf)
  scale = jnp.where(jnp.any(bad, axis=axes, keepdims=True), jnp.nan, scale)
  qmin, qmax = qrange(bits, symmetric, unsigned or not symmetric)
  q = jnp.clip(_round(xf / scale, rounding, key) + zp, qmin, qmax)
  if not symmetric and not unsigned:  # asymmetric codes stored signed: shift by -2^(b-1)
    shift = 2 ** (bits - 1)
    q, zp = q - shift, zp - shift
  codes = q.astype(code_dtype(bits, unsigned))
  return QuantizedTensor(codes, scale, zp.astype(jnp.float32), bits, symmetric, unsigned, axes)


def _row_groups(x: jax.Array, axes: tuple[int, ...]) -> bool:
  """Whether the scale groups are rows that the kernel of :mod:`mlsys_jax.quant._pallas_quantize` takes:
  the reduced axes are the trailing ones (all of them: one row), the row fits one program, float input
  with fewer than 2^31 elements."""
  nd = x.ndim
  return (0 < len(axes) and axes == tuple(range(nd - len(axes), nd)) and 0 < x.size < 2 ** 31
          and x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
          and _pallas_quantize.row_ok(int(np.prod([x.shape[a] for a in axes]))))


def _quantize_rows(x: jax.Array, bits: int, symmetric: bool, unsigned: bool, axes: tuple[int, ...],
                   impl: str, **tile) -> QuantizedTensor:
  """:func:`quantize` (nearest rounding, data range, row groups) through the one-pass row kernel."""
  shape = x.shape
  red = int(np.prod([shape[a] for a in axes]))
  kept = [1 if a in axes else d for a, d in enumerate(shape)]

  def kernel(x):
    codes, scale, zp = _pallas_quantize.quantize_rows(x.reshape(-1, red), bits, symmetric, unsigned,
                                                      code_dtype(bits, unsigned), impl=impl, **tile)
    return QuantizedTensor(codes.reshape(shape), scale.reshape(kept), zp.reshape(kept), bits, symmetric,
                           unsigned, axes)

  xla = lambda x: quantize(x, bits, symmetric=symmetric, axis=axes, unsigned=unsigned, impl="xla")
  return _pallas_quantize.differentiable_like(kernel, xla)(x)


def _onepass_groups(x: jax.Array, axes: tuple[int, ...]) -> str | None:
  """Whether the one-pass kernel of :mod:`mlsys_jax.quant._pallas_quant` takes these scale groups:
  ``'cols'`` when the reduced axes are the leading ones (per output channel), ``'rows'`` when they are
  the trailing ones and a padded row fits a program (per row), None otherwise (per tensor, mixed axes,
  other dtypes, more than 2^31 elements)."""
  nd = x.ndim
  if (not 0 < len(axes) < nd or x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16)
      or x.size == 0 or x.size >= 2 ** 31):
    return None
  a = len(axes)
  if axes == tuple(range(a)):
    return "cols"
  if axes == tuple(range(nd - a, nd)) and _pallas_quant._pow2(int(np.prod(x.shape[nd - a:]))) <= \
      _pallas_quant.MAX_ROW:
    return "rows"
  return None


def _quantize_onepass(x: jax.Array, bits: int, symmetric: bool, unsigned: bool, axes: tuple[int, ...],
                      groups: str, impl: str, **tile) -> QuantizedTensor:
  """:func:`quantize` (nearest rounding, data range) through the one-pass kernel; identical results."""
  shape = x.shape
  red = int(np.prod([shape[a] for a in axes]))
  kept = [1 if a in axes else d for a, d in enumerate(shape)]
  x2 = x.reshape(red, -1) if groups == "cols" else x.reshape(-1, red)
  codes, scale, zp = _pallas_quant.quantize_2d(x2, bits, symmetric, unsigned, code_dtype(bits, unsigned),
                                               groups=groups, impl=impl, **tile)
  return QuantizedTensor(codes.reshape(shape), scale.reshape(kept), zp.reshape(kept), bits, symmetric,
                         unsigned, axes)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """Real values ``scale * (codes - zero_point)`` of a :class:`QuantizedTensor`.

  Example:
    >>> qt = quantize(jnp.array([-1.0, 0.5, 1.0]), 4)        # codes in [-7, 7], scale 1/7
    >>> qt.codes.tolist(), np.asarray(dequantize(qt), float).round(3).tolist()
    ([-7, 3, 7], [-1.0, 0.429, 1.0])
  """
  if not isinstance(qt, QuantizedTensor):
    raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}.")
  return ((qt.codes.astype(jnp.float32) - qt.zero_point) * qt.scale).astype(dtype)


@jax.custom_vjp
def _ste(x, y, lo, hi):
  del x, lo, hi
  return y


def _ste_fwd(x, y, lo, hi):
  return y, (x >= lo) & (x <= hi)


def _ste_bwd(mask, g):
  return (jnp.where(mask, g, 0).astype(g.dtype), None, None, None)


_ste.defvjp(_ste_fwd, _ste_bwd)


def straight_through(x: jax.Array, x_quant: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Return ``x_quant`` forward; backward pass the gradient to ``x`` where ``lo <= x <= hi``, else 0.

  The clipped straight-through estimator (Bengio, Leonard and Courville 2013, arXiv:1308.3432; as in
  quantization-aware training, e.g. Jacob et al. 2018): ``d out / d x = 1{lo <= x <= hi}`` elementwise,
  bounds inclusive, so the vector-Jacobian product is the incoming cotangent where ``x`` lies in the
  range and 0 elsewhere (also 0 where ``x`` is NaN). ``x_quant``, ``lo`` and ``hi`` get no gradient
  (they are wrapped in ``stop_gradient``).

  Args:
    x: floating-point array (the real values).
    x_quant: the forward value (e.g. the dequantized codes), same shape and dtype as ``x``.
    lo, hi: range ends, broadcastable to ``x.shape`` (e.g. per channel).

  Example:
    >>> x = jnp.array([-2.0, 0.3, 0.7])
    >>> f = lambda x: straight_through(x, jnp.round(x), -1.0, 1.0).sum()    # forward: round(x)
    >>> jax.grad(f)(x).tolist()                                             # backward: 1 inside [-1, 1]
    [0.0, 1.0, 1.0]
  """
  _check_float("x", x)
  xs, qs = np.shape(x), np.shape(x_quant)
  if qs != xs:
    raise ValueError(f"x_quant must have the shape of x, got {qs} for x of shape {xs}.")
  if jnp.result_type(x_quant) != jnp.result_type(x):
    raise TypeError(f"x_quant must have the dtype of x, got {jnp.result_type(x_quant)} for x of dtype "
                    f"{jnp.result_type(x)}; dequantize to x.dtype (e.g. dequantize(qt, x.dtype)).")
  for name, b in (("lo", lo), ("hi", hi)):
    try:
      shape = np.broadcast_shapes(np.shape(b), xs)
    except ValueError:
      shape = None
    if shape != xs:
      raise ValueError(f"{name} of shape {np.shape(b)} does not broadcast to x's shape {xs}; give one bound "
                       "per element or per scale group (reduced axes kept as size 1).")
  return _ste(x, jax.lax.stop_gradient(x_quant), jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi))


def fake_quant(x: jax.Array, bits: int, *, symmetric: bool = True, axis: Axis = None,
               rounding: str = "nearest", key: jax.Array | None = None,
               bounds=None) -> jax.Array:
  """Quantize and dequantize ``x`` (same arguments as :func:`quantize`) with a straight-through gradient.

  The forward value is ``dequantize(quantize(x, ...))``; the gradient with respect to ``x`` is the
  identity inside the quantization range and zero where ``x`` saturates.

  Example:
    >>> x = jnp.array([-1.0, 0.3, 1.0])
    >>> np.round(fake_quant(x, 2), 3).tolist()               # 2 bits: codes -1, 0, 1
    [-1.0, 0.0, 1.0]
    >>> jax.grad(lambda x: fake_quant(x, 4, bounds=0.5).sum())(x).tolist()   # zero where x saturates
    [0.0, 1.0, 0.0]
  """
  qt = quantize(x, bits, symmetric=symmetric, axis=axis, unsigned=False, rounding=rounding, key=key,
                bounds=bounds)
  y = dequantize(qt, x.dtype)
  qmin, qmax = qrange(bits, symmetric, False)  # the codes of quantize(..., unsigned=False)
  lo = (qmin - qt.zero_point) * qt.scale
  hi = (qmax - qt.zero_point) * qt.scale
  return straight_through(x, y, lo, hi)


def sqnr_db(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x - x_hat)^2) in dB.

  ``x`` and ``x_hat`` must have the same shape (no broadcasting: a reconstruction of another shape is a
  bug, not a comparison); both are computed in float32.

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1000,))
    >>> round(float(sqnr_db(x, fake_quant(x, 8))), 1), round(float(sqnr_db(x, fake_quant(x, 4))), 1)
    (40.9, 15.6)
  """
  if np.shape(x) != np.shape(x_hat):
    raise ValueError(f"sqnr_db needs x and x_hat of the same shape, got {np.shape(x)} and {np.shape(x_hat)}; "
                     "compare a tensor with its own reconstruction (reshape one of them if they only differ "
                     "in layout).")
  x = jnp.asarray(x, jnp.float32)
  err = jnp.sum((x - jnp.asarray(x_hat, jnp.float32)) ** 2)
  return 10.0 * jnp.log10(jnp.sum(x ** 2) / jnp.maximum(err, 1e-30))
