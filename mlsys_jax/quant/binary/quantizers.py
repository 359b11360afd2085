"""Larq's binary/ternary/low-bit quantizers as ``jax.custom_vjp`` functions, and a weight clip.

Bannink et al., "Larq Compute Engine: Design, Benchmark, and Deploy State-of-the-Art Binarized Neural
Networks", MLSys 2021 (Sec. 2: the Larq training library). Every quantizer reproduces Larq's forward
value and pseudo-gradient exactly, including the edges:

- ``sign(0) = +1`` (Larq's ``sign(sign(x) + 0.1)``; ``-0.0`` also maps to ``+1``; NaN stays NaN);
- the gradient clip is inclusive: ``d/dx = 1`` for ``|x| <= clip`` (``clip=None``: identity).

Functions take the input and keyword hyperparameters; bind them with ``functools.partial`` to get the
one-argument quantizer that :func:`mlsys_jax.quant.binary.binary_dot_general` takes.

NaN/inf: a NaN input gives a NaN output (never a silent +-1); its gradient is 0 (the clipped-STE
mask is false), as in Larq.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mlsys_jax._checks import check_choice, check_int, check_range

__all__ = [
    "approx_sign",
    "dorefa",
    "larq_sign",
    "magnitude_aware_sign",
    "ste_heaviside",
    "ste_sign",
    "ste_tern",
    "swish_sign",
    "weight_clip",
]


def _check_clip(clip: float | None) -> None:
  if clip is not None:
    check_range("clip", clip, 0.0, None, low_inclusive=False)


def larq_sign(x: jax.Array) -> jax.Array:
  """Sign that is never zero: ``-1`` for ``x < 0``, ``+1`` for ``x >= 0`` (Larq's ``math.sign``).

  Bannink et al., MLSys 2021, Sec. 2 (Larq): computed as Larq does, ``sign(sign(x) + 0.1)``, so
  ``sign(0) = sign(-0.0) = +1``, ``+-inf -> +-1`` and NaN stays NaN; the dtype is kept. This is the
  forward value only: its gradient is 0 everywhere (that of ``sign``). For training use the quantizers
  built on it, e.g. :func:`ste_sign` (clipped straight-through gradient). Subnormal inputs: where the
  backend flushes them to zero in arithmetic (XLA on CPU does, in comparisons too) they count as zero
  and give +1.

  Args:
    x: floating-point array (integer or bool inputs raise ``TypeError``: ``sign(0) + 0.1`` would round
      to 0 there and give 0).

  >>> larq_sign(jnp.array([-2.0, -0.0, 0.0, 3.0]))
  Array([-1.,  1.,  1.,  1.], dtype=float32)
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"larq_sign needs a floating-point array, got dtype {x.dtype}; cast it first, e.g. "
                    "x.astype(jnp.float32).")
  return jnp.sign(jnp.sign(x) + jnp.asarray(0.1, x.dtype))


def _clipped(x, dy, clip):
  if clip is None:
    return dy
  return jnp.where(jnp.abs(x) <= clip, dy, jnp.zeros_like(dy))


# ---------------------------------------------------------------------------------------------------
# ste_sign


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_sign(x, clip):
  return larq_sign(x)


def _ste_sign_fwd(x, clip):
  return larq_sign(x), x


def _ste_sign_bwd(clip, x, dy):
  return (_clipped(x, dy, clip),)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: jax.Array, clip: float | None = 1.0) -> jax.Array:
  """Binarize to +-1 with the clipped straight-through estimator (Larq ``SteSign``).

  Forward ``q(x) = -1 if x < 0 else +1``; backward ``dq/dx = 1{|x| <= clip}`` (Courbariaux et al.,
  2016; Larq ``quantizers.ste_sign``). ``clip=None`` passes the gradient unchanged.

  Args:
    x: floating-point array.
    clip: gradient clip value, > 0, or None.

  >>> x = jnp.array([-1.5, -0.2, 0.0, 1.0])
  >>> ste_sign(x)
  Array([-1., -1.,  1.,  1.], dtype=float32)
  >>> jax.grad(lambda v: ste_sign(v).sum())(x)
  Array([0., 1., 1., 1.], dtype=float32)
  """
  _check_clip(clip)
  return _ste_sign(jnp.asarray(x), None if clip is None else float(clip))


# ---------------------------------------------------------------------------------------------------
# approx_sign


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """Binarize with the ApproxSign pseudo-gradient of Bi-Real Net (Liu et al., 2018; Larq ``ApproxSign``).

  Forward as :func:`ste_sign`; backward ``dq/dx = (2 - 2|x|) 1{|x| <= 1}``.

  >>> jax.grad(lambda v: approx_sign(v).sum())(jnp.array([-0.5, 0.0, 1.0, 2.0]))
  Array([1., 2., 0., 0.], dtype=float32)
  """
  return larq_sign(x)


def _approx_fwd(x):
  return larq_sign(x), x


def _approx_bwd(x, dy):
  ax = jnp.abs(x)
  return (jnp.where(ax <= 1.0, (1 - ax) * 2 * dy, jnp.zeros_like(dy)),)


approx_sign.defvjp(_approx_fwd, _approx_bwd)


# ---------------------------------------------------------------------------------------------------
# swish_sign


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swish_sign(x, beta):
  return larq_sign(x)


def _swish_fwd(x, beta):
  return larq_sign(x), x


def _swish_bwd(beta, x, dy):
  # At x = +-inf the formula is -inf / inf = NaN; its limit there is 0 (cosh outgrows the numerator,
  # and it is already 0 where cosh overflows for large finite x). The infinities get 0 through a
  # select, and a finite stand-in keeps NaN out of the unselected branch (and of higher derivatives).
  inf = jnp.isinf(x)
  bx = beta * jnp.where(inf, jnp.zeros_like(x), x)
  g = dy * beta * (2 - bx * jnp.tanh(bx * 0.5)) / (1 + jnp.cosh(bx))
  return (jnp.where(inf, jnp.zeros_like(g), g),)


_swish_sign.defvjp(_swish_fwd, _swish_bwd)


def swish_sign(x: jax.Array, beta: float = 5.0) -> jax.Array:
  """Binarize with the SignSwish pseudo-gradient of BNN+ (Darabi et al., 2018; Larq ``SwishSign``).

  Backward ``dq/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))`` (beta at x = 0), and
  its limit 0 at ``x = +-inf`` (the formula itself gives ``-inf / inf = NaN`` there); a NaN input gives
  a NaN gradient.

  >>> float(jax.grad(lambda v: swish_sign(v))(0.0))
  5.0
  """
  check_range("beta", beta, 0.0, None, low_inclusive=False)
  return _swish_sign(jnp.asarray(x), float(beta))


# ---------------------------------------------------------------------------------------------------
# ste_heaviside


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_heaviside(x, clip):
  return jnp.sign(jax.nn.relu(x))


def _heav_fwd(x, clip):
  return jnp.sign(jax.nn.relu(x)), x


def _heav_bwd(clip, x, dy):
  return (_clipped(x, dy, clip),)


_ste_heaviside.defvjp(_heav_fwd, _heav_bwd)


def ste_heaviside(x: jax.Array, clip: float | None = 1.0) -> jax.Array:
  """Binarize to {0, 1}: ``q(x) = 1{x > 0}`` (so ``q(0) = 0``), clipped STE backward (Larq ``SteHeaviside``).

  >>> ste_heaviside(jnp.array([-1.0, 0.0, 0.5]))
  Array([0., 0., 1.], dtype=float32)
  """
  _check_clip(clip)
  return _ste_heaviside(jnp.asarray(x), None if clip is None else float(clip))


# ---------------------------------------------------------------------------------------------------
# ste_tern


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _ste_tern(x, threshold, twn, clip):
  return _tern_value(x, threshold, twn)


def _tern_value(x, threshold, twn):
  t = 0.7 * jnp.mean(jnp.abs(x)) if twn else jnp.asarray(threshold, x.dtype)
  return jnp.sign(jnp.sign(x + t) + jnp.sign(x - t))


def _tern_fwd(x, threshold, twn, clip):
  return _tern_value(x, threshold, twn), x


def _tern_bwd(threshold, twn, clip, x, dy):
  return (_clipped(x, dy, clip),)


_ste_tern.defvjp(_tern_fwd, _tern_bwd)


def ste_tern(x: jax.Array, threshold: float = 0.05, ternary_weight_networks: bool = False,
             clip: float | None = 1.0) -> jax.Array:
  """Ternarize to {-1, 0, +1} with a clipped STE (Li et al., 2016, TWN; Larq ``SteTern``).

  ``q(x) = sign(sign(x + t) + sign(x - t))``: ``+1`` for ``x >= t``, ``-1`` for ``x <= -t`` (the
  threshold itself is inclusive), 0 in between; ``t = threshold``, or ``0.7 mean|x|`` (over the whole
  tensor, not differentiated) with ``ternary_weight_networks=True``.

  >>> ste_tern(jnp.array([-0.05, -0.01, 0.0, 0.05, 0.2]))
  Array([-1.,  0.,  0.,  1.,  1.], dtype=float32)
  """
  check_range("threshold", threshold, 0.0, None)
  if not isinstance(ternary_weight_networks, bool):
    raise TypeError(f"ternary_weight_networks must be a bool, got {ternary_weight_networks!r}.")
  _check_clip(clip)
  return _ste_tern(jnp.asarray(x), float(threshold), ternary_weight_networks,
                   None if clip is None else float(clip))


# ---------------------------------------------------------------------------------------------------
# magnitude_aware_sign


def magnitude_aware_sign(x: jax.Array, clip: float | None = 1.0) -> jax.Array:
  """``stop_gradient(mean|x|) * ste_sign(x)``, the mean over all axes but the last (Bi-Real Net Sec. 3.3).

  For a kernel ``(..., out)`` this is one scale per output channel (Larq ``MagnitudeAwareSign``).

  >>> magnitude_aware_sign(jnp.array([[1.0, -2.0], [-3.0, 0.0]]))
  Array([[ 2., -1.],
         [-2.,  1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(x), axis=tuple(range(x.ndim - 1))))
  return scale * ste_sign(x, clip)


# ---------------------------------------------------------------------------------------------------
# DoReFa


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _round_levels(x, n):
  return jnp.round(x * n) / n


def _round_fwd(x, n):
  return jnp.round(x * n) / n, None


def _round_bwd(n, res, dy):
  return (dy,)


_round_levels.defvjp(_round_fwd, _round_bwd)


@jax.custom_vjp
def _clip01(x):
  return jnp.clip(x, 0.0, 1.0)


def _clip01_fwd(x):
  return jnp.clip(x, 0.0, 1.0), x


def _clip01_bwd(x, dy):
  return (jnp.where((x >= 0) & (x <= 1), dy, jnp.zeros_like(dy)),)


_clip01.defvjp(_clip01_fwd, _clip01_bwd)


def dorefa(x: jax.Array, k_bit: int = 2, mode: str = "activations") -> jax.Array:
  """DoReFa k-bit quantizer (Zhou et al., 2016; Larq ``DoReFa``), activation or weight mode.

  ``mode='activations'``: ``q = round(clip(x, 0, 1) n) / n`` with ``n = 2^k - 1`` (round half to even),
  gradient ``1{0 <= x <= 1}``. ``mode='weights'``: ``y = tanh(x) / (2 max|tanh(x)|) + 1/2``, then
  ``2 round(y n) / n - 1`` in ``[-1, 1]``; the rounding passes the gradient straight through and the
  tanh normalisation (including the max) is differentiated.

  >>> dorefa(jnp.array([-0.3, 0.1, 0.5, 0.9, 1.4]), k_bit=2)
  Array([0.       , 0.       , 0.6666667, 1.       , 1.       ], dtype=float32)
  """
  check_int("k_bit", k_bit, 1, 16)
  check_choice("mode", mode, ("activations", "weights"))
  x = jnp.asarray(x)
  n = float(2 ** k_bit - 1)
  if mode == "activations":
    return _round_levels(_clip01(x), n)
  t = jnp.tanh(x)
  y = t / (2 * jnp.max(jnp.abs(t))) + 0.5
  return 2 * _round_levels(y, n) - 1


# ---------------------------------------------------------------------------------------------------
# Weight clip as an optax projection.


class WeightClipState(optax.EmptyState):
  """No state: the projection depends on the parameters only."""


def weight_clip(clip: float = 1.0) -> optax.GradientTransformation:
  """Project parameters into ``[-clip, clip]`` after the update (Larq ``constraints.WeightClip``).

  Chain it after the optimizer: the returned update is ``clip(p + u, -c, c) - p`` so that
  ``optax.apply_updates`` lands on the clipped value. Needs ``params`` in ``update``. Route it to the
  binary kernels only with ``optax.multi_transform`` (see :func:`mlsys_jax.quant.binary.case_optimizer`).

  >>> tx = optax.chain(optax.sgd(1.0), weight_clip(1.25))
  >>> p = jnp.array([1.0, -1.0, 0.0])
  >>> u, _ = tx.update(jnp.array([-1.0, 1.0, 0.5]), tx.init(p), p)
  >>> optax.apply_updates(p, u)
  Array([ 1.25, -1.25, -0.5 ], dtype=float32)
  """
  check_range("clip", clip, 0.0, None, low_inclusive=False)
  c = float(clip)

  def init_fn(params: Any):
    del params
    return WeightClipState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight_clip needs the current parameters: call tx.update(grads, state, params).")
    new = jax.tree_util.tree_map(lambda p, u: jnp.clip(p + u, -c, c) - p, params, updates)
    return new, state

  return optax.GradientTransformation(init_fn, update_fn)
