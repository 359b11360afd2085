"""Binary ``dot_general`` and convolution factories, injected into flax layers (no new layer classes).

Bannink et al., MLSys 2021, Sec. 2 (Larq's ``QuantDense``/``QuantConv2D`` with ``input_quantizer``,
``kernel_quantizer`` and ``pad_values``). Here the same is a drop-in replacement for
``jax.lax.dot_general`` / ``jax.lax.conv_general_dilated``: pass it to ``flax.linen.Dense(dot_general=)``,
``flax.linen.Conv(conv_general_dilated=)``, ``flax.nnx.Linear``/``nnx.Conv`` or the library's models
(:class:`mlsys_jax.models.CNN`). The first operand is the activation, the second the kernel (flax's
convention). The product itself runs in float on the +-1 values, so training gets the quantizers'
pseudo-gradients; :mod:`mlsys_jax.quant.binary.packed` runs the same layers bit-packed at inference.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mlsys_jax.quant.binary.quantizers import ste_sign

__all__ = ["binary_conv_general_dilated", "binary_dot_general"]

Quantizer = Callable[[jax.Array], jax.Array] | None

_DEFAULT = functools.partial(ste_sign, clip=1.0)


def _check_quantizer(name: str, q: Any) -> None:
  if q is not None and not callable(q):
    raise TypeError(f"{name} must be a callable x -> q(x) (e.g. functools.partial(ste_sign, clip=1.25)) "
                    f"or None, got {type(q).__name__}.")


def _bdot(iq, kq, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  x = iq(lhs) if iq is not None else lhs
  w = kq(rhs) if kq is not None else rhs
  return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def binary_dot_general(input_quantizer: Quantizer = _DEFAULT, kernel_quantizer: Quantizer = _DEFAULT):
  """A ``lax.dot_general`` that quantizes the activation (lhs) and the kernel (rhs) first.

  Args:
    input_quantizer: callable applied to the activations, or None (keep float). Default:
      ``ste_sign`` with clip 1.
    kernel_quantizer: callable applied to the kernel, or None. Default: ``ste_sign`` with clip 1.

  Example:
    >>> import flax.linen as nn
    >>> layer = nn.Dense(4, use_bias=False, dot_general=binary_dot_general())
    >>> v = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
    >>> y = layer.apply(v, jnp.full((1, 8), -0.3))   # = sign(x) @ sign(W): even integers in [-8, 8]
    >>> bool(jnp.all(y % 2 == 0)), bool(jnp.all(jnp.abs(y) <= 8))
    (True, True)
  """
  _check_quantizer("input_quantizer", input_quantizer)
  _check_quantizer("kernel_quantizer", kernel_quantizer)
  return functools.partial(_bdot, input_quantizer, kernel_quantizer)


def _bconv(iq, kq, pad_value, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
           preferred_element_type=None, **kwargs):
  x = iq(lhs) if iq is not None else lhs
  w = kq(rhs) if kq is not None else rhs
  if pad_value != 0.0:
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    nsp = lhs.ndim - 2
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
      raise ValueError("pad_value != 0 is not supported with lhs_dilation (transposed convolution); "
                       "use pad_value=0.")
    in_sp = [lhs.shape[a] for a in dn.lhs_spec[2:]]
    k_sp = [rhs.shape[a] for a in dn.rhs_spec[2:]]
    rd = rhs_dilation or (1,) * nsp
    eff = [(k - 1) * d + 1 for k, d in zip(k_sp, rd)]
    if isinstance(padding, str):
      pads = jax.lax.padtype_to_pads(in_sp, eff, window_strides, padding)
    else:
      pads = [tuple(p) for p in padding]
    widths = [(0, 0)] * lhs.ndim
    for a, p in zip(dn.lhs_spec[2:], pads):
      widths[a] = (int(p[0]), int(p[1]))
    x = jnp.pad(x, widths, constant_values=jnp.asarray(pad_value, x.dtype))
    padding = [(0, 0)] * nsp
  return jax.lax.conv_general_dilated(
      x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)


def binary_conv_general_dilated(input_quantizer: Quantizer = _DEFAULT,
                                kernel_quantizer: Quantizer = _DEFAULT, pad_value: float = 0.0):
  """A ``lax.conv_general_dilated`` that quantizes input and kernel, padding with ``pad_value``.

  Larq's ``pad_values``: the *quantized* input is padded with ``pad_value`` (``+1`` or ``0``; LCE's
  optimized kernels want ``+1``, which is free in the bit-packed layout, while ``0`` needs the zero
  padding correction of :func:`mlsys_jax.quant.binary.pack_conv2d`).

  Args:
    input_quantizer, kernel_quantizer: as in :func:`binary_dot_general`.
    pad_value: value of the spatial padding: 0.0 (like ``lax``) or 1.0 (or -1.0).

  Example:
    >>> import flax.linen as nn
    >>> conv = nn.Conv(2, (3, 3), padding='SAME', use_bias=False,
    ...                conv_general_dilated=binary_conv_general_dilated(pad_value=1.0))
    >>> v = conv.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)))
    >>> conv.apply(v, jnp.ones((1, 4, 4, 3))).shape
    (1, 4, 4, 2)
  """
  _check_quantizer("input_quantizer", input_quantizer)
  _check_quantizer("kernel_quantizer", kernel_quantizer)
  if pad_value not in (0.0, 1.0, -1.0):
    raise ValueError(f"pad_value must be 0, 1 or -1 (a binary padding value), got {pad_value!r}.")
  return functools.partial(_bconv, input_quantizer, kernel_quantizer, float(pad_value))
