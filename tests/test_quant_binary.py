"""Tests of mlsys_jax.quant.binary quantizers against Larq's closed forms (edges included)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax.quant import binary as qb

# Edges: 0, -0, the clip boundary, just inside/outside it, NaN-free.
X = np.array([-2.0, -1.25, -1.2500001, -1.0, -0.5, -1e-8, -0.0, 0.0, 1e-8, 0.5, 1.0, 1.25, 1.2500001,
              3.0], np.float32)


def _np_sign(x):
  return np.where(x < 0, -1.0, 1.0).astype(np.float32)


def _grad(f, x):
  return np.asarray(jax.grad(lambda v: jnp.sum(f(v) * jnp.arange(1, v.size + 1, dtype=v.dtype)))(x))


W = np.arange(1, X.size + 1, dtype=np.float32)  # distinct upstream gradients


@pytest.mark.parametrize("clip", [1.0, 1.25, None])
def test_ste_sign_forward_backward_edges(clip):
  f = lambda v: qb.ste_sign(v, clip)
  np.testing.assert_array_equal(f(jnp.asarray(X)), _np_sign(X))
  mask = np.ones_like(X) if clip is None else (np.abs(X) <= np.float32(clip)).astype(np.float32)
  np.testing.assert_array_equal(_grad(f, jnp.asarray(X)), W * mask)
  if clip == 1.25:  # inclusive boundary, exclusive just outside
    g = _grad(f, jnp.asarray(X))
    assert g[1] != 0 and g[2] == 0 and g[11] != 0 and g[12] == 0


def test_sign_nan_propagates_and_minus_zero_is_plus_one():
  y = qb.ste_sign(jnp.array([jnp.nan, -0.0]))
  assert np.isnan(y[0]) and y[1] == 1.0


def test_approx_and_swish_sign_gradients():
  x = jnp.asarray(X)
  np.testing.assert_array_equal(qb.approx_sign(x), _np_sign(X))
  ax = np.abs(X)
  np.testing.assert_allclose(_grad(qb.approx_sign, x), W * np.where(ax <= 1, 2 - 2 * ax, 0), rtol=1e-6)
  for beta in (1.0, 5.0):
    f = lambda v: qb.swish_sign(v, beta)
    np.testing.assert_array_equal(f(x), _np_sign(X))
    b = beta * X.astype(np.float64)
    ref = beta * (2 - b * np.tanh(b / 2)) / (1 + np.cosh(b))
    np.testing.assert_allclose(_grad(f, x), W * ref, rtol=1e-5, atol=1e-6)
    # The SignSwish pseudo-gradient is the derivative of 2 sigmoid(beta x)(1 + beta x (1 - sigmoid)) - 1.
    s = lambda v: 2 * jax.nn.sigmoid(beta * v) * (1 + beta * v * (1 - jax.nn.sigmoid(beta * v))) - 1
    np.testing.assert_allclose(_grad(f, x), _grad(s, x), rtol=1e-3, atol=1e-3)


def test_heaviside_and_tern():
  x = jnp.asarray(X)
  np.testing.assert_array_equal(qb.ste_heaviside(x), (X > 0).astype(np.float32))
  np.testing.assert_array_equal(_grad(qb.ste_heaviside, x), W * (np.abs(X) <= 1))
  t = np.float32(0.5)
  ref = np.where(X >= t, 1.0, np.where(X <= -t, -1.0, 0.0))
  np.testing.assert_array_equal(qb.ste_tern(x, threshold=0.5), ref)       # +-threshold inclusive
  np.testing.assert_array_equal(_grad(functools.partial(qb.ste_tern, threshold=0.5), x),
                                W * (np.abs(X) <= 1))
  twn = 0.7 * np.mean(np.abs(X))
  ref = np.where(X >= twn, 1.0, np.where(X <= -twn, -1.0, 0.0))
  np.testing.assert_array_equal(qb.ste_tern(x, ternary_weight_networks=True), ref)


def test_magnitude_aware_sign_scales_per_output_channel():
  w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
  y = np.asarray(qb.magnitude_aware_sign(w))
  np.testing.assert_allclose(y, np.abs(w).mean(axis=(0, 1, 2)) * _np_sign(w), rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(qb.magnitude_aware_sign(v, 0.5)))(w)   # scale is not differentiated
  np.testing.assert_allclose(g, np.abs(w).mean(axis=(0, 1, 2)) * (np.abs(w) <= 0.5), rtol=1e-6)


def test_dorefa_activation_and_weight_modes():
  x = np.array([-0.3, 0.0, 1 / 6, 0.1667, 0.5, 5 / 6, 1.0, 1.4], np.float32)
  for k in (1, 3):
    n = 2 ** k - 1
    ref = np.round(np.clip(x, 0, 1) * n) / n  # numpy rounds half to even, like tf.round
    y, g = jax.jit(jax.value_and_grad(lambda v: qb.dorefa(v, k) @ jnp.ones_like(v)))(jnp.asarray(x))
    np.testing.assert_allclose(jax.jit(lambda v: qb.dorefa(v, k))(x), ref, rtol=1e-6)
    np.testing.assert_array_equal(g, ((x >= 0) & (x <= 1)).astype(np.float32))
  w = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  t = np.tanh(w.astype(np.float64))
  y = t / (2 * np.abs(t).max()) + 0.5
  ref = 2 * np.round(y * 3) / 3 - 1
  # Straight-through rounding: the gradient is that of the unrounded surrogate.
  sur = lambda v: 2 * (jnp.tanh(v) / (2 * jnp.max(jnp.abs(jnp.tanh(v)))) + 0.5) - 1
  cot = jnp.asarray(np.random.default_rng(2).normal(size=w.shape), jnp.float32)

  @jax.jit
  def both(v):
    return (qb.dorefa(v, 2, "weights"), jax.grad(lambda u: jnp.sum(cot * qb.dorefa(u, 2, "weights")))(v),
            jax.grad(lambda u: jnp.sum(cot * sur(u)))(v))

  yw, ga, gb = both(jnp.asarray(w))
  np.testing.assert_allclose(yw, ref, atol=1e-6)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)


def test_quantizers_under_jit_and_vmap():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 7)).astype(np.float32))
  fs = (qb.ste_sign, qb.swish_sign, functools.partial(qb.dorefa, k_bit=3))
  both = lambda v: [(f(v), jax.grad(lambda u: jnp.sum(f(u) * u))(v)) for f in fs]
  got = jax.jit(jax.vmap(both))(x)
  for f, (y, g) in zip(fs, got):
    np.testing.assert_array_equal(y, f(x))
    np.testing.assert_allclose(g, jax.grad(lambda v: jnp.sum(f(v) * v))(x), rtol=1e-6)


def test_weight_clip_projection():
  tx = optax.chain(optax.sgd(0.5), qb.weight_clip(1.25))
  p = jnp.array([1.2, -1.2, 0.3, 2.0])
  u, _ = tx.update(jnp.array([-1.0, 1.0, 0.2, 0.0]), tx.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, u), [1.25, -1.25, 0.2, 1.25], rtol=1e-6)
  with pytest.raises(ValueError, match="parameters"):
    tx.update(p, tx.init(p))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_clip_raises(bad):
  for f in (lambda: qb.ste_sign(jnp.ones(2), bad), lambda: qb.ste_heaviside(jnp.ones(2), bad),
            lambda: qb.ste_tern(jnp.ones(2), clip=bad), lambda: qb.weight_clip(bad),
            lambda: qb.magnitude_aware_sign(jnp.ones((2, 2)), bad)):
    with pytest.raises(ValueError, match="clip"):
      f()
  with pytest.raises(ValueError, match="mode"):
    qb.dorefa(jnp.ones(2), 2, "bias")
