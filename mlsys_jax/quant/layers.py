"""Quantized ``dot_general`` and convolution from a config, injectable into flax layers.

``quantized_dot_general(config)`` returns a drop-in replacement for ``jax.lax.dot_general`` and
``quantized_conv_general_dilated(config)`` one for ``jax.lax.conv_general_dilated``; pass them to
``flax.linen.Dense(dot_general=...)`` / ``Conv(conv_general_dilated=...)``, ``flax.nnx.Linear(dot_general=
...)`` or the library's models. The first operand is taken as the activation, the second as the weight
(flax's convention). :class:`QuantDotGeneral` and :class:`QuantConv` are the same as flax modules (for
``dot_general_cls=`` / ``conv_general_dilated_cls=``) that also record activation statistics for static
calibration (:func:`calibration_to_amax`).

Two execution paths:

- emulation (default): both operands are quantized and dequantized, then multiplied in float32. Per
  layer this is exact emulation of integer hardware with per-vector rescaling up to float32 summation
  order, and it carries straight-through gradients for quantization-aware training. Across a deep
  network the two paths are not bit-identical: a last-bit difference in one layer's output can flip a
  rounding decision when the next layer quantizes it, and the flips compound (on ResNet-18 W8A8 the
  outputs of the two paths differ by about 1% relative, as measured in issue 17), so compare paths
  layer by layer, not end to end;
- integer (``integer=True``): int8 codes multiplied with int32 accumulation
  (``preferred_element_type=jnp.int32``) then rescaled: one product for per-tensor/per-channel scales;
  for per-vector scales one batched product per vector group, rescaled per group and summed (VS-Quant's
  datapath). Its gradient is the emulation path's straight-through gradient (a ``custom_vjp`` whose
  backward pass differentiates the emulation), so both paths train alike. Supports every dot_general
  without batch axes and convolutions with per-tensor/per-channel scales; other cases raise.

Contractions over several axes (flax ``DenseGeneral`` kernels shaped (E, heads, head_dim), the output
projection of ``MultiHeadDotProductAttention`` that contracts (heads, head_dim)) are brought to one
``(M, K) x (K, N)`` product inside the dot_general, K being the contracting axes flattened row-major in
the order of the dimension numbers: per-channel scales are per output (per row for activations),
per-vector scales run along the flattened K on both paths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlsys_jax._checks import check_choice, check_int, check_range
from mlsys_jax.quant import _pallas_gemm
from mlsys_jax.quant.calibration import CALIBRATION_METHODS, calibrate_amax
from mlsys_jax.quant.fixed_point import (_check_bits, fake_quant, quantize)
from mlsys_jax.quant.vsquant import _split, vs_fake_quant, vs_quantize

__all__ = [
    "QuantConfig",
    "QuantConv",
    "QuantDotGeneral",
    "QuantSpec",
    "calibration_to_amax",
    "quantized_conv_general_dilated",
    "quantized_dot_general",
]

GRANULARITIES = ("tensor", "channel", "vector")
# Above this many (group, row, column) partial products the per-vector integer path loops over groups.
_BATCHED_PARTIALS_LIMIT = 1 << 26


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one operand is quantized.

  Attributes:
    bits: code width (2..16).
    granularity: ``'tensor'`` (one scale), ``'channel'`` (weights: one per output channel;
      activations: one per row/pixel), or ``'vector'`` (VS-Quant: one per ``vector_size`` elements
      along the reduction axis).
    vector_size: V for ``'vector'``.
    scale_bits: M, integer bits of two-level per-vector scales (``'vector'`` only); None = float scales.
    calibration: method used by :func:`calibration_to_amax` for static activation ranges.
    percentile: percentile for ``calibration='percentile'``.

  Example:
    >>> QuantSpec(4, "vector", 16, scale_bits=4).granularity        # VS-Quant: 4-bit codes, 4-bit scales
    'vector'
    >>> QuantSpec(8, "tensor", scale_bits=4)
    Traceback (most recent call last):
    ValueError: scale_bits (two-level scaling) applies to granularity='vector' only.
  """
  bits: int = 8
  granularity: str = "channel"
  vector_size: int = 16
  scale_bits: int | None = None
  calibration: str = "max"
  percentile: float = 99.99

  def __post_init__(self):
    _check_bits(self.bits)
    check_choice("granularity", self.granularity, GRANULARITIES)
    check_int("vector_size", self.vector_size, 1)
    if self.scale_bits is not None:
      check_int("scale_bits", self.scale_bits, 1, 16)
      if self.granularity != "vector":
        raise ValueError("scale_bits (two-level scaling) applies to granularity='vector' only.")
    check_choice("calibration", self.calibration, CALIBRATION_METHODS)
    check_range("percentile", self.percentile, 0.0, 100.0, low_inclusive=False)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization of a layer's operands: ``weight`` and ``activation`` specs (None = keep float).

  Example:
    >>> cfg = QuantConfig()                                   # W8 per channel, A8 per tensor, emulated
    >>> cfg.weight.granularity, cfg.activation.granularity, cfg.integer
    ('channel', 'tensor', False)
    >>> x, w, dn = jnp.array([[1.0, -2.0, 0.5]]), jnp.array([[1.0], [0.5], [-1.0]]), (((1,), (0,)), ((), ()))
    >>> y = quantized_dot_general(cfg)(x, w, dn)              # a drop-in for lax.dot_general
    >>> round(float(y[0, 0]), 4), float(jax.lax.dot_general(x, w, dn)[0, 0])
    (-0.5039, -0.5)
  """
  weight: QuantSpec | None = QuantSpec(8, "channel")
  activation: QuantSpec | None = QuantSpec(8, "tensor")
  integer: bool = False

  def __post_init__(self):
    for name in ("weight", "activation"):
      v = getattr(self, name)
      if v is not None and not isinstance(v, QuantSpec):
        raise TypeError(f"QuantConfig.{name} must be a QuantSpec or None, got {type(v).__name__}.")


# ----------------------------------------------------------------------------------------------------
# Operand quantization (emulation path).


def _fq(x, spec: QuantSpec | None, red_axes: tuple[int, ...], vec_axis: int | None,
        coarse_axes: tuple[int, ...] | None, amax=None):
  """Fake-quantize one operand. ``red_axes``: the reduction axes (shared scale for 'channel')."""
  if spec is None:
    return x
  if spec.granularity == "tensor":
    return fake_quant(x, spec.bits, axis=None, bounds=amax)
  if spec.granularity == "channel":
    return fake_quant(x, spec.bits, axis=red_axes, bounds=amax)
  if vec_axis is None:
    raise ValueError("per-vector quantization needs a single reduction axis; flatten the operand.")
  return vs_fake_quant(x, spec.bits, axis=vec_axis, vector_size=spec.vector_size,
                       scale_bits=spec.scale_bits, coarse_axes=coarse_axes, coarse_amax=amax)


def _int_operand(x, spec: QuantSpec, red_axis: int, amax=None):
  """int8/int16 codes and float scales of one operand with ONE reduction axis (integer path).

  Returns ``(codes, scale)`` where for 'tensor'/'channel' ``scale`` keeps the reduced axis as size 1, and
  for 'vector' ``(codes_split, scale_split)`` in the split layout (K -> (G, V)).
  """
  if spec.granularity in ("tensor", "channel"):
    qt = quantize(x, spec.bits, axis=None if spec.granularity == "tensor" else red_axis, bounds=amax)
    return qt.codes, qt.scale
  coarse = tuple(range(x.ndim)) if red_axis == x.ndim - 1 else None
  qt = vs_quantize(x, spec.bits, axis=red_axis, vector_size=spec.vector_size,
                   scale_bits=spec.scale_bits, coarse_axes=coarse, coarse_amax=amax)
  cs, _ = _split(qt.codes, red_axis, spec.vector_size, True)
  return cs, qt.scales()


def _use_pallas_kernel(vector_size: int) -> bool:
  """Per-vector integer products go to the Pallas kernel on the GPU when it supports V and passed its
  once-per-process self-test against XLA (otherwise the XLA path, with a warning)."""
  return (_pallas_gemm.on_gpu() and vector_size in _pallas_gemm.SUPPORTED_VECTOR_SIZES
          and _pallas_gemm.kernel_self_test(vector_size))


def _dot_int_pallas(lhs2, rhs, a: QuantSpec, w: QuantSpec, amax):
  """Per-vector ``lhs2 (M, K) @ rhs (K, N)`` through the Pallas int8 GEMM (the same codes and scales
  as the XLA path: integer vector scales in the K loop, coarse scales once at the end)."""
  qa = vs_quantize(lhs2, a.bits, axis=1, vector_size=a.vector_size, scale_bits=a.scale_bits,
                   coarse_axes=(0, 1), coarse_amax=amax)
  qw = vs_quantize(rhs, w.bits, axis=0, vector_size=w.vector_size, scale_bits=w.scale_bits)
  g = qa.vector_scale.shape[1]
  return _pallas_gemm.vs_int8_matmul(
      qa.codes.astype(jnp.int8), qa.vector_scale.reshape(-1, g), qw.codes.astype(jnp.int8),
      qw.vector_scale.reshape(g, -1), vector_size=a.vector_size,
      a_coarse=qa.coarse_scale.reshape(()), w_coarse=qw.coarse_scale.reshape(-1),
      integer_scales=a.scale_bits is not None)


def _dot_int(lhs, rhs, config: QuantConfig, amax):
  """Integer path for ``lhs (M, K) @ rhs (K, N)`` (any dot_general is brought to this form first)."""
  w, a = config.weight, config.activation
  if w is None or a is None or w.bits > 8 or a.bits > 8:
    raise ValueError("integer=True needs both operands quantized to at most 8 bits.")
  if (w.granularity == "vector") != (a.granularity == "vector"):
    raise ValueError("integer=True with per-vector scales needs both operands per-vector (same V).")
  lead = lhs.shape[:-1]
  lhs2 = lhs.reshape(-1, lhs.shape[-1])
  if w.granularity != "vector":
    ca, sa = _int_operand(lhs2, a, 1, amax)
    cw, sw = _int_operand(rhs, w, 0)
    acc = jax.lax.dot(ca, cw, preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * sa * sw
  else:
    if w.vector_size != a.vector_size:
      raise ValueError("per-vector integer path needs the same vector_size for both operands.")
    if _use_pallas_kernel(w.vector_size):
      return _dot_int_pallas(lhs2, rhs, a, w, amax).reshape(*lead, rhs.shape[-1])
    ca, sa = _int_operand(lhs2, a, 1, amax)    # (M, G, V), (M, G, 1)
    cw, sw = _int_operand(rhs, w, 0)           # (G, V, N), (G, 1, N)
    out = _vs_dot_xla(ca, sa, cw, sw)
  return out.reshape(*lead, rhs.shape[-1])


def _vs_dot_xla(ca, sa, cw, sw):
  """XLA per-vector integer product from split codes ``ca (M, G, V)``, ``cw (G, V, N)`` and float
  scales ``sa (M, G, 1)``, ``sw (G, 1, N)``: int32 partial sums per vector, rescaled and summed."""
  g, m, n = cw.shape[0], ca.shape[0], cw.shape[-1]
  if g * m * n <= _BATCHED_PARTIALS_LIMIT:
    part = jax.lax.dot_general(ca, cw, (((2,), (1,)), ((1,), (0,))),
                               preferred_element_type=jnp.int32)       # (G, M, N)
    return jnp.sum(part.astype(jnp.float32) * jnp.transpose(sa, (1, 0, 2)) * sw, axis=0)

  def body(acc, xs):  # large: accumulate one vector group at a time, not G partial products at once
    ca_g, sa_g, cw_g, sw_g = xs
    part = jax.lax.dot(ca_g, cw_g, preferred_element_type=jnp.int32)  # (M, N)
    return acc + part.astype(jnp.float32) * sa_g * sw_g, None

  xs = (jnp.moveaxis(ca, 1, 0), jnp.moveaxis(sa, 1, 0), cw, sw)
  out, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32), xs)
  return out


def _integer_with_emulation_grad(int_fn, emu_fn, lhs, rhs, amax):
  """``int_fn(lhs, rhs, amax)`` forward; backward the VJP of ``emu_fn`` (the emulation path).

  The integer path rounds to codes, so its own derivative is zero almost everywhere (and the scales
  carry a meaningless one). The emulation path computes the same forward values (up to float32
  summation order) with straight-through gradients, so its VJP is the gradient the integer path should
  have: quantization-aware training gives the same gradients on both paths. The backward pass
  recomputes the emulation forward (one extra float product per layer). A calibrated ``amax`` gets a
  zero cotangent, as on the emulation path.
  """

  @jax.custom_vjp
  def f(lhs, rhs, amax):
    return int_fn(lhs, rhs, amax)

  def fwd(lhs, rhs, amax):
    return int_fn(lhs, rhs, amax), (lhs, rhs, amax)

  def bwd(res, g):
    lhs, rhs, amax = res
    _, vjp = jax.vjp(lambda a, b: emu_fn(a, b, amax), lhs, rhs)
    ga, gb = vjp(g.astype(jnp.result_type(lhs, rhs)))
    return ga, gb, jax.tree_util.tree_map(jnp.zeros_like, amax)

  f.defvjp(fwd, bwd)
  return f(lhs, rhs, amax)


def _canonical(lhs, rhs, lc: tuple[int, ...], rc: tuple[int, ...]):
  """``(M, K)`` and ``(K, N)`` views of a dot_general without batch axes, and its output shape.

  The contracting axes are flattened in the order the dimension numbers pair them (row-major), so a
  multi-axis contraction such as attention's output projection (heads, head_dim) becomes one K axis
  with head_dim fastest; vectors of V elements then lie inside one head when V divides head_dim.
  """
  lf = [a for a in range(lhs.ndim) if a not in lc]
  rf = [a for a in range(rhs.ndim) if a not in rc]
  k = math.prod(lhs.shape[a] for a in lc)
  m = math.prod(lhs.shape[a] for a in lf)
  n = math.prod(rhs.shape[a] for a in rf)
  l2 = jnp.transpose(lhs, lf + list(lc)).reshape(m, k)
  r2 = jnp.transpose(rhs, list(rc) + rf).reshape(k, n)
  out_shape = tuple(lhs.shape[a] for a in lf) + tuple(rhs.shape[a] for a in rf)
  return l2, r2, out_shape


def _qdot(config: QuantConfig, lhs, rhs, dimension_numbers, precision=None,
          preferred_element_type=None, act_amax=None, **kwargs):
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
  if config.integer:
    if lb or rb:
      raise ValueError("integer=True does not support dot_general batch dimensions (got "
                       f"dimension_numbers {dimension_numbers}, e.g. DenseGeneral(batch_dims=...)): the "
                       "weight would need one scale set per batch entry. Use the emulation path "
                       "(integer=False), which handles them.")
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)

    def int_fn(l, r, amax):
      l2, r2, out_shape = _canonical(l, r, lc, rc)
      return _dot_int(l2, r2, config, amax).reshape(out_shape).astype(out_dtype)

    def emu_fn(l, r, amax):
      return _qdot_emulate(config, l, r, dimension_numbers, precision, preferred_element_type, amax,
                           **kwargs).astype(out_dtype)

    return _integer_with_emulation_grad(int_fn, emu_fn, lhs, rhs, act_amax)
  return _qdot_emulate(config, lhs, rhs, dimension_numbers, precision, preferred_element_type,
                       act_amax, **kwargs)


def _qdot_emulate(config: QuantConfig, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, act_amax=None, **kwargs):
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
  uses_vector = any(s is not None and s.granularity == "vector"
                    for s in (config.weight, config.activation))
  if uses_vector and (len(lc) > 1 or len(rc) > 1):
    # Per-vector scales run along ONE reduction axis: flatten the contracting axes into one K.
    if lb or rb:
      raise ValueError("per-vector quantization of a contraction over several axes with batch dimensions "
                       f"is not supported (dimension_numbers {dimension_numbers}); use per-channel scales.")
    l2, r2, out_shape = _canonical(lhs, rhs, lc, rc)
    out = _qdot_emulate(config, l2, r2, (((1,), (0,)), ((), ())), precision, preferred_element_type,
                        act_amax, **kwargs)
    return out.reshape(out_shape)
  w_vec = rc[0] if len(rc) == 1 else None
  a_vec = lc[0] if len(lc) == 1 else None
  # Weights: coarse scale per output (all axes but the non-contracting ones are shared).
  w_coarse = tuple(a for a in range(rhs.ndim) if a in rc or a in rb)
  a_coarse = tuple(range(lhs.ndim))
  ql = _fq(lhs, config.activation, lc, a_vec, a_coarse, act_amax)
  qr = _fq(rhs, config.weight, rc, w_vec, w_coarse)
  return jax.lax.dot_general(ql, qr, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def quantized_dot_general(config: QuantConfig, act_amax: jax.Array | None = None):
  """A ``lax.dot_general`` replacement that quantizes activation (lhs) and weight (rhs) per ``config``.

  Args:
    config: a :class:`QuantConfig`.
    act_amax: optional static (calibrated) activation range; otherwise ranges are dynamic.

  Example:
    >>> cfg = QuantConfig(weight=QuantSpec(4, 'vector', 16, scale_bits=4), activation=QuantSpec(8, 'vector'))
    >>> layer = nn.Dense(8, dot_general=quantized_dot_general(cfg))
    >>> x = jnp.ones((2, 32))
    >>> variables = layer.init(jax.random.PRNGKey(0), x)
    >>> layer.apply(variables, x).shape
    (2, 8)
    >>> mha_out = nn.DenseGeneral(8, axis=(-2, -1), dot_general=quantized_dot_general(cfg))  # (heads, dim)
    >>> y, _ = mha_out.init_with_output(jax.random.PRNGKey(1), jnp.ones((2, 2, 16)))
    >>> y.shape
    (2, 8)
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}.")
  return functools.partial(_qdot, config, act_amax=act_amax)


# ----------------------------------------------------------------------------------------------------
# Convolutions.


def _conv_vector(config, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                 feature_group_count, precision, preferred_element_type, act_amax):
  """Per-vector convolution as im2col + quantized dot: vectors run along C fastest, then the window."""
  if feature_group_count != 1:
    raise ValueError("per-vector quantized convolution supports feature_group_count=1 only.")
  nsp = lhs.ndim - 2
  # Bring operands to N..C / ..IO layouts.
  lhs_t = jnp.transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  rhs_t = jnp.transpose(rhs, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  spatial = "".join("HWDXYZ"[i] for i in range(nsp))
  dn_t = jax.lax.conv_dimension_numbers(lhs_t.shape, rhs_t.shape,
                                        ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))
  window = rhs_t.shape[:nsp]
  patches = jax.lax.conv_general_dilated_patches(
      lhs_t, window, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dn_t, precision=precision)                  # (N, ..., C * prod(window)), C slowest
  c = lhs_t.shape[-1]
  p = patches.reshape(*patches.shape[:-1], c, -1)
  p = jnp.swapaxes(p, -1, -2).reshape(*patches.shape[:-1], -1)    # window-major, C fastest
  kmat = rhs_t.reshape(-1, rhs_t.shape[-1])                        # (prod(window) * C, O), C fastest
  out = _qdot(config, p, kmat, (((p.ndim - 1,), (0,)), ((), ())), precision=precision,
              preferred_element_type=preferred_element_type, act_amax=act_amax)
  # out is N..O; move to the requested output layout.
  perm = [0] * out.ndim
  perm[dn.out_spec[0]] = 0
  perm[dn.out_spec[1]] = out.ndim - 1
  for i, a in enumerate(dn.out_spec[2:]):
    perm[a] = 1 + i
  return jnp.transpose(out, perm)


def _qconv(config: QuantConfig, lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None, act_amax=None, **kwargs):
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  uses_vector = any(s is not None and s.granularity == "vector"
                    for s in (config.weight, config.activation))
  if uses_vector:
    if config.integer:
      raise ValueError("integer=True convolutions support per-tensor/per-channel scales only.")
    if batch_group_count != 1:
      raise ValueError("per-vector quantized convolution supports batch_group_count=1 only.")
    return _conv_vector(config, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                        feature_group_count, precision, preferred_element_type, act_amax)
  w_red = tuple(a for a in range(rhs.ndim) if a != dn.rhs_spec[0])     # all but the output channel
  a_red = (dn.lhs_spec[1],)                                             # 'channel' = per pixel
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=window_strides,
                           padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dn, feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision)
  if config.integer:
    w, a = config.weight, config.activation
    if w is None or a is None or w.bits > 8 or a.bits > 8:
      raise ValueError("integer=True needs both operands quantized to at most 8 bits.")
    if a.granularity != "tensor":
      raise ValueError("integer=True convolutions need per-tensor activation scales.")
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)

    def int_fn(lhs, rhs, amax):
      qa = quantize(lhs, a.bits, axis=None, bounds=amax)
      qw = quantize(rhs, w.bits, axis=None if w.granularity == "tensor" else w_red)
      acc = conv(qa.codes, qw.codes, preferred_element_type=jnp.int32)
      sw = jnp.reshape(qw.scale, (-1,)) if w.granularity == "channel" else qw.scale.reshape(())
      shape = [1] * acc.ndim
      shape[dn.out_spec[1]] = -1
      out = acc.astype(jnp.float32) * qa.scale.reshape(()) * jnp.reshape(sw, shape)
      return out.astype(out_dtype)

    def emu_fn(lhs, rhs, amax):
      ql = _fq(lhs, a, a_red, None, None, amax)
      qr = _fq(rhs, w, w_red, None, None)
      return conv(ql, qr, preferred_element_type=preferred_element_type, **kwargs).astype(out_dtype)

    return _integer_with_emulation_grad(int_fn, emu_fn, lhs, rhs, act_amax)
  ql = _fq(lhs, config.activation, a_red, None, None, act_amax)
  qr = _fq(rhs, config.weight, w_red, None, None)
  return conv(ql, qr, preferred_element_type=preferred_element_type, **kwargs)


def quantized_conv_general_dilated(config: QuantConfig, act_amax: jax.Array | None = None):
  """A ``lax.conv_general_dilated`` replacement quantizing activations (lhs) and kernels (rhs).

  Per-channel weights get one scale per output channel; per-vector operands use vectors of
  ``vector_size`` along the flattened reduction (input channels fastest, then the window), computed
  through im2col patches so that each partial dot product of V elements is rescaled, as in VS-Quant.

  Example:
    >>> conv = nn.Conv(4, (3, 3), conv_general_dilated=quantized_conv_general_dilated(QuantConfig()))
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
    >>> variables = jax.jit(conv.init)(jax.random.PRNGKey(1), x)
    >>> y, y_float = jax.jit(conv.apply)(variables, x), nn.Conv(4, (3, 3)).apply(variables, x)
    >>> y.shape, bool(jnp.linalg.norm(y - y_float) < 0.02 * jnp.linalg.norm(y_float))      # W8A8: ~1% error
    ((1, 8, 8, 4), True)
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}.")
  return functools.partial(_qconv, config, act_amax=act_amax)


# ----------------------------------------------------------------------------------------------------
# flax modules with static calibration.

_CALIB = "quant_calib"
_STATIC = "quant"


class _Recorder(nn.Module):
  """Shared logic: record |activation| samples while 'quant_calib' is mutable; read static amax."""
  config: QuantConfig
  num_samples: int = 4096
  num_batches: int = 8

  def _amax(self, x):
    if self.config.activation is None:
      return None
    if self.is_mutable_collection(_CALIB):
      buf = self.variable(_CALIB, "samples", jnp.zeros, (self.num_batches, self.num_samples), jnp.float32)
      cnt = self.variable(_CALIB, "count", jnp.zeros, (), jnp.int32)
      mx = self.variable(_CALIB, "max", jnp.zeros, (), jnp.float32)
      flat = jnp.abs(jnp.ravel(jax.lax.stop_gradient(x))).astype(jnp.float32)
      idx = jnp.linspace(0, flat.size - 1, self.num_samples).astype(jnp.int32)
      slot = cnt.value % self.num_batches
      buf.value = buf.value.at[slot].set(flat[idx])
      cnt.value = cnt.value + 1
      mx.value = jnp.maximum(mx.value, jnp.max(flat))
    if self.has_variable(_STATIC, "act_amax"):
      return self.get_variable(_STATIC, "act_amax")
    return None


class QuantDotGeneral(_Recorder):
  """``dot_general_cls`` for flax Dense: quantizes per ``config``; records/uses static activation ranges.

  Use ``functools.partial(QuantDotGeneral, config=cfg)`` as ``dot_general_cls``. Run a few batches with
  ``mutable=['quant_calib']`` to collect statistics, convert them with :func:`calibration_to_amax`, and
  pass the result as the ``'quant'`` collection at inference. Without it, ranges are dynamic.

  Example:
    >>> import functools
    >>> cfg = QuantConfig(activation=QuantSpec(8, "tensor"))
    >>> layer = nn.Dense(2, dot_general_cls=functools.partial(QuantDotGeneral, config=cfg, num_samples=16))
    >>> x = jnp.linspace(-3.0, 3.0, 8).reshape(2, 4)
    >>> variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
    >>> _, stats = jax.jit(functools.partial(layer.apply, mutable=["quant_calib"]))(variables, x)   # 1 batch
    >>> static = calibration_to_amax(stats["quant_calib"], cfg)
    >>> float(static["QuantDotGeneral_0"]["act_amax"]), layer.apply({**variables, "quant": static}, x).shape
    (3.0, (2, 2))
  """

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    return _qdot(self.config, lhs, rhs, dimension_numbers, precision, preferred_element_type,
                 act_amax=self._amax(lhs), **kw)


class QuantConv(_Recorder):
  """``conv_general_dilated_cls`` counterpart of :class:`QuantDotGeneral`.

  Example:
    >>> import functools
    >>> cfg = QuantConfig(activation=QuantSpec(8, "tensor"))
    >>> conv = nn.Conv(4, (3, 3), conv_general_dilated_cls=functools.partial(QuantConv, config=cfg))
    >>> x = jnp.linspace(-1.0, 2.0, 48).reshape(1, 4, 4, 3)
    >>> variables = jax.jit(conv.init)(jax.random.PRNGKey(0), x)
    >>> y, stats = jax.jit(functools.partial(conv.apply, mutable=["quant_calib"]))(variables, x)
    >>> y.shape, float(calibration_to_amax(stats["quant_calib"], cfg)["QuantConv_0"]["act_amax"])
    ((1, 4, 4, 4), 2.0)
  """

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None, **kw):
    return _qconv(self.config, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count, precision,
                  preferred_element_type, act_amax=self._amax(lhs), **kw)


def calibration_to_amax(calib: Any, config: QuantConfig) -> Any:
  """Turn a ``'quant_calib'`` collection into a ``'quant'`` collection of static activation ranges.

  Each recorder's samples (from up to ``num_batches`` batches) give ``act_amax`` by
  ``config.activation.calibration`` (``'max'`` uses the exact running maximum).

  Example:
    >>> import functools
    >>> cfg = QuantConfig(activation=QuantSpec(8, "tensor", calibration="percentile", percentile=50.0))
    >>> layer = nn.Dense(2, dot_general_cls=functools.partial(QuantDotGeneral, config=cfg, num_samples=16))
    >>> x = jnp.linspace(-3.0, 3.0, 8).reshape(2, 4)
    >>> _, stats = layer.apply(layer.init(jax.random.PRNGKey(0), x), x, mutable=["quant_calib"])
    >>> jax.tree_util.tree_map(lambda a: round(float(a), 3), calibration_to_amax(stats["quant_calib"], cfg))
    {'QuantDotGeneral_0': {'act_amax': 1.714}}
  """
  spec = config.activation
  if spec is None:
    raise ValueError("config.activation is None: there is nothing to calibrate.")

  def convert(node):
    if isinstance(node, dict) and {"samples", "count", "max"} <= set(node):
      n = int(jnp.minimum(node["count"], node["samples"].shape[0]))
      if n == 0:
        raise ValueError("a recorder saw no batch; run the model with mutable=['quant_calib'] first.")
      if spec.calibration == "max":
        amax = node["max"]
      else:
        amax = calibrate_amax(node["samples"][:n], spec.bits, spec.calibration,
                              percentile=spec.percentile)
      return {"act_amax": jnp.asarray(amax, jnp.float32)}
    if isinstance(node, dict):
      return {k: convert(v) for k, v in node.items()}
    raise ValueError(f"unexpected entry in the calibration collection: {type(node).__name__}")

  return convert(dict(calib))
