"""Calibration of quantization ranges from sample values: max, percentile and MSE search."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mlsys_jax._checks import check_choice, check_finite, check_int, check_range
from mlsys_jax.quant.fixed_point import _check_bits, qrange

__all__ = ["calibrate_amax", "CALIBRATION_METHODS"]

CALIBRATION_METHODS = ("max", "percentile", "mse")


def _mse_for_amax(x: jax.Array, amax: jax.Array, bits: int) -> jax.Array:
  _, q = qrange(bits, True, False)
  s = jnp.maximum(amax, 1e-30) / q
  xq = jnp.clip(jnp.round(x / s), -q, q) * s
  return jnp.mean((x - xq) ** 2)


def calibrate_amax(samples: jax.Array, bits: int, method: str = "max", *, percentile: float = 99.99,
                   num_candidates: int = 128) -> jax.Array:
  """Choose the symmetric clipping range ``amax`` for ``bits``-bit codes from sample values.

  Methods (as in NVIDIA's calibrators, which VS-Quant's Sec. 5 uses for activations):

  - ``'max'``: the largest magnitude (no clipping).
  - ``'percentile'``: the ``percentile``-th percentile of ``|x|`` (clips rare outliers).
  - ``'mse'``: the candidate in ``max|x| * linspace(1/num_candidates, 1, num_candidates)`` minimising
    the mean squared error between the samples and their quantize-dequantize.

  Args:
    samples: values observed (any shape; flattened).
    bits: code width (2..16).
    method: one of ``'max'``, ``'percentile'``, ``'mse'``.
    percentile: for ``'percentile'``, in (0, 100].
    num_candidates: grid size for ``'mse'``.

  Returns:
    A float32 scalar ``amax``.

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4096,))
    >>> [round(float(calibrate_amax(x, 4, m, percentile=99.0)), 2) for m in ("max", "percentile", "mse")]
    [3.92, 2.62, 2.45]
  """
  _check_bits(bits)
  check_choice("method", method, CALIBRATION_METHODS)
  check_range("percentile", percentile, 0.0, 100.0, low_inclusive=False)
  check_int("num_candidates", num_candidates, 2)
  check_finite("samples", samples)
  x = jnp.abs(jnp.ravel(jnp.asarray(samples, jnp.float32)))
  if x.size == 0:
    raise ValueError("calibrate_amax needs at least one sample value.")
  top = jnp.max(x)
  if method == "max":
    return top
  if method == "percentile":
    return jnp.percentile(x, percentile)
  cands = top * jnp.linspace(1.0 / num_candidates, 1.0, num_candidates)
  errs = jax.vmap(lambda a: _mse_for_amax(x, a, bits))(cands)
  return cands[jnp.argmin(errs)]
