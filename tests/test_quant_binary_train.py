"""Binary layers injected into flax linen/nnx and the library's CNN; Bop and the case optimizer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mlsys_jax import models
from mlsys_jax.quant import binary as qb


def _sgn(x):
  return np.where(np.asarray(x) < 0, -1.0, 1.0)


def _np_conv(x, w, stride, pads, pad_value):
  """Reference NHWC x HWIO convolution (cross-correlation) in float64 with constant padding."""
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=pad_value)
  kh, kw, _, o = w.shape
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, o))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return out


def test_linen_dense_is_sign_matmul_with_ste_grads():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 12)).astype(np.float32)
  layer = nn.Dense(7, use_bias=False, dot_general=qb.binary_dot_general())
  w = rng.normal(size=(12, 7)).astype(np.float32) * 1.5  # some |w| > 1: zero STE gradient there
  v = {"params": {"kernel": jnp.asarray(w)}}
  dy = rng.normal(size=(5, 7)).astype(np.float32)
  y, gw = jax.jit(jax.value_and_grad(lambda p: jnp.sum(layer.apply({"params": p}, x) * dy)))(v["params"])
  gw = gw["kernel"]
  np.testing.assert_allclose(y, np.sum((_sgn(x) @ _sgn(w)) * dy), rtol=1e-5)
  np.testing.assert_allclose(gw, (_sgn(x).T @ dy) * (np.abs(w) <= 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_value,stride", [(1.0, 1), (0.0, 2), (1.0, 2)])
def test_linen_conv_matches_reference_with_pad_values(pad_value, stride):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  iq = functools.partial(qb.ste_sign, clip=1.25)
  conv = nn.Conv(4, (3, 3), strides=stride, padding="SAME", use_bias=False,
                 conv_general_dilated=qb.binary_conv_general_dilated(iq, iq, pad_value))
  v = {"params": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)}}
  got = jax.jit(conv.apply)(v, x)
  pads = jax.lax.padtype_to_pads((6, 5), (3, 3), (stride, stride), "SAME")
  ref = _np_conv(_sgn(x), _sgn(v["params"]["kernel"]), stride, pads, pad_value)
  np.testing.assert_array_equal(got, ref)


def test_nnx_linear_and_conv():
  rngs = nnx.Rngs(0)
  lin = nnx.Linear(9, 4, use_bias=False, dot_general=qb.binary_dot_general(), rngs=rngs)
  conv = nnx.Conv(3, 2, (3, 3), padding="SAME", use_bias=False,
                  conv_general_dilated=qb.binary_conv_general_dilated(pad_value=1.0), rngs=rngs)
  x = np.random.default_rng(2).normal(size=(3, 9)).astype(np.float32)
  xi = np.random.default_rng(3).normal(size=(1, 4, 4, 3)).astype(np.float32)
  y1, y2 = nnx.jit(lambda a, b: (a(x), b(xi)))(lin, conv)
  np.testing.assert_array_equal(y1, _sgn(x) @ _sgn(lin.kernel[...]))
  ref = _np_conv(_sgn(xi), _sgn(conv.kernel[...]), 1, ((1, 1), (1, 1)), 1.0)
  np.testing.assert_array_equal(y2, ref)


def test_library_cnn_binary_weights_equal_float_cnn_on_signed_kernels():
  x = np.random.default_rng(4).normal(size=(2, 8, 8, 1)).astype(np.float32)
  kw = dict(channels=(4,), hidden=8)
  bcnn = models.CNN(conv_general_dilated=qb.binary_conv_general_dilated(None), **kw,
                    dot_general=qb.binary_dot_general(None))
  fcnn = models.CNN(**kw)
  v = jax.jit(bcnn.init)(jax.random.PRNGKey(0), x)
  signed = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.asarray(_sgn(a), a.dtype) if p[-1].key == "kernel" else a, v)
  got, ref = jax.jit(lambda v, s: (bcnn.apply(v, x), fcnn.apply(s, x)))(v, signed)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_bop_matches_closed_form_with_schedules():
  rng = np.random.default_rng(5)
  w0 = _sgn(rng.normal(size=(50,))).astype(np.float32)
  grads = rng.normal(size=(6, 50)).astype(np.float32) * 0.1
  gam = optax.linear_schedule(0.5, 0.1, 5)
  tau = optax.linear_schedule(0.0, 0.02, 5)
  tx = qb.bop(threshold=tau, gamma=gam)
  w, m, s = w0.astype(np.float64), np.zeros(50), tx.init(jnp.asarray(w0))
  p = jnp.asarray(w0)
  step = jax.jit(tx.update)
  for t in range(6):
    u, s = step(jnp.asarray(grads[t]), s, p)
    p = optax.apply_updates(p, u)
    m = m + float(gam(t)) * (grads[t] - m)   # no reset after a flip
    new = _sgn(-np.sign(w * m - float(tau(t))) * w)
    ratio = np.mean(_sgn(new) != _sgn(w))
    w = new
    np.testing.assert_array_equal(p, w)
    np.testing.assert_allclose(s.momentum, m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.flip_ratio, ratio, rtol=1e-6)
  assert int(s.count) == 6
  # From a latent (non-binary) init the first step binarizes (to within float rounding of +-1).
  lat = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
  big = qb.bop(threshold=1.0, gamma=0.5)   # no flip possible: w <- sign(w)
  u, _ = big.update(jnp.asarray(grads[0]), big.init(lat), lat)
  np.testing.assert_allclose(optax.apply_updates(lat, u), _sgn(lat), atol=2e-7)
  # Larq's edge: w m == tau exactly gives sign(0) = 0, and sign(-0 w) = +1.
  u, _ = qb.bop(threshold=0.0).update(jnp.zeros(3), big.init(jnp.ones(3)), -jnp.ones(3))
  np.testing.assert_array_equal(optax.apply_updates(-jnp.ones(3), u), [1.0, 1.0, 1.0])


def test_bop_zero_threshold_zero_gradient_flips_minus_one_to_plus_one():
  # Larq's sign(0) = +1: with tau = 0 and m = 0, w m == tau for every weight, so each weight becomes
  # sign(-0 w) = +1: the -1 flips, the +1 stays (documented in bop's docstring).
  w = jnp.array([1.0, -1.0])
  tx = qb.bop(threshold=0.0, gamma=0.5)
  u, s = jax.jit(tx.update)(jnp.zeros(2), tx.init(w), w)
  np.testing.assert_array_equal(optax.apply_updates(w, u), [1.0, 1.0])
  assert float(s.flip_ratio) == 0.5 and int(s.num_flips) == 1
  # a positive threshold (Larq's default 1e-8) keeps both weights
  tx = qb.bop(threshold=1e-8, gamma=0.5)
  u, s = tx.update(jnp.zeros(2), tx.init(w), w)
  np.testing.assert_array_equal(optax.apply_updates(w, u), [1.0, -1.0])
  assert float(s.flip_ratio) == 0.0


def test_case_optimizer_routes_bop_and_adam_with_weight_clip():
  params = {"BinaryConv_0": {"kernel": jnp.array([0.5, -0.5, 1.0])},
            "Dense_0": {"kernel": jnp.array([0.1, 0.2]), "bias": jnp.array([0.3])}}
  grads = jax.tree_util.tree_map(lambda a: jnp.full_like(a, -0.7), params)
  tx = qb.case_optimizer(qb.bop(0.0, 1.0), optax.adam(0.1))
  u, s = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, u)
  # Bop with gamma=1: m = g = -0.7; w m > 0 flips w < 0 to +1; binarized.
  np.testing.assert_array_equal(new["BinaryConv_0"]["kernel"], [1.0, 1.0, 1.0])
  a = optax.adam(0.1)
  ua, _ = a.update(grads["Dense_0"], a.init(params["Dense_0"]))
  np.testing.assert_allclose(new["Dense_0"]["kernel"], optax.apply_updates(params["Dense_0"], ua)["kernel"])
  assert float(qb.flip_ratio(s)) == pytest.approx(1 / 3)
  latent = qb.case_optimizer(optax.chain(optax.sgd(1.0), qb.weight_clip(1.25)), optax.sgd(1.0))
  u, _ = jax.jit(latent.update)(grads, latent.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, u)["BinaryConv_0"]["kernel"], [1.2, 0.2, 1.25])
  np.testing.assert_allclose(optax.apply_updates(params, u)["Dense_0"]["kernel"], [0.8, 0.9])
  with pytest.raises(ValueError, match="labelled binary"):
    tx.init({"Dense_0": params["Dense_0"]})


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5])
def test_bop_bad_hyperparameters(gamma):
  with pytest.raises(ValueError, match="gamma"):
    qb.bop(gamma=gamma)
  with pytest.raises(ValueError, match="threshold"):
    qb.bop(threshold=-1.0)
  with pytest.raises(TypeError, match="callable"):
    qb.binary_dot_general("ste_sign")
