"""Tests of mlsys_jax.quant against float64 numpy references, closed forms and properties."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import quant

DN = (((1,), (0,)), ((), ()))


def _np_sym(x, bits, axes):
  q = 2 ** (bits - 1) - 1
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  s = np.where(amax > 0, amax / q, 1.0)
  return np.clip(np.round(x / s), -q, q) * s


def _np_asym(x, bits, axes):
  lo = np.minimum(np.min(x, axis=axes, keepdims=True), 0)
  hi = np.maximum(np.max(x, axis=axes, keepdims=True), 0)
  s = np.where(hi > lo, (hi - lo) / (2 ** bits - 1), 1.0)
  z = np.clip(np.round(-lo / s), 0, 2 ** bits - 1)
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("axis", [None, 0, (0, 1)])
def test_quantize_matches_numpy_reference(bits, axis):
  x = np.random.default_rng(bits).normal(size=(6, 5, 4)).astype(np.float32)
  axes = tuple(range(3)) if axis is None else ((axis,) if isinstance(axis, int) else axis)
  for sym, ref in ((True, _np_sym), (False, _np_asym)):
    for unsigned in (False, True):
      qt = quant.quantize(x, bits, symmetric=sym, axis=axis, unsigned=unsigned)
      got = np.asarray(quant.dequantize(qt))
      np.testing.assert_allclose(got, ref(x.astype(np.float64), bits, axes), rtol=1e-5, atol=1e-6)
      lo, hi = quant.qrange(bits, sym, unsigned or not sym)
      codes = np.asarray(qt.codes).astype(np.int64) + (0 if unsigned or sym else 2 ** (bits - 1))
      assert codes.min() >= lo and codes.max() <= hi
      assert qt.codes.dtype == quant.code_dtype(bits, unsigned)
      # Inside the range the error is at most half a step.
      assert np.all(np.abs(got - x) <= np.asarray(qt.scale) / 2 + 1e-6)


def test_payload_size():
  qt = quant.quantize(jnp.ones((64, 8)), 4, axis=0)
  assert qt.nbytes_payload == (64 * 8 * 4 + 32 * 8) / 8      # 4-bit codes + one fp32 scale per channel
  qa = quant.quantize(jnp.ones((64, 8)), 4, axis=0, symmetric=False)
  assert qa.nbytes_payload == (64 * 8 * 4 + 2 * 32 * 8) / 8  # + a zero point per channel


def test_zero_is_exact_and_constant_tensor():
  x = jnp.array([-0.3, 0.0, 0.7, 1.9])
  assert float(quant.dequantize(quant.quantize(x, 4, symmetric=False))[1]) == 0.0
  z = quant.dequantize(quant.quantize(jnp.zeros((3,)), 8))
  np.testing.assert_array_equal(z, 0.0)


def test_stochastic_rounding_is_unbiased():
  x = jnp.linspace(-1, 1, 37)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  f = jax.jit(jax.vmap(lambda k: quant.dequantize(quant.quantize(x, 3, rounding="stochastic", key=k,
                                                                  bounds=1.0))))
  mean = np.asarray(f(keys)).mean(0)
  step = 1.0 / 3
  assert np.max(np.abs(mean - np.asarray(x))) < 4 * step / np.sqrt(4000) * 0.5 + 1e-3
  nearest = quant.dequantize(quant.quantize(x, 3, bounds=1.0))
  assert np.max(np.abs(np.asarray(nearest) - np.asarray(x))) > 0.1  # nearest is biased per element


def test_fake_quant_straight_through_gradient():
  x = jnp.array([-2.0, -0.5, 0.1, 0.4, 3.0])
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, 4, bounds=1.0) * jnp.arange(5.0)))(x)
  np.testing.assert_array_equal(g, [0.0, 1.0, 2.0, 3.0, 0.0])
  y = quant.fake_quant(x, 4, bounds=1.0)
  np.testing.assert_allclose(y, quant.dequantize(quant.quantize(x, 4, bounds=1.0)))


def _np_vs(w, bits, v, m, axis=0):
  """float64 reference of two-level per-vector quantization of a (K, N) kernel along axis 0."""
  k, n = w.shape
  q = 2 ** (bits - 1) - 1
  g = -(-k // v)
  wp = np.zeros((g * v, n))
  wp[:k] = w
  ws = wp.reshape(g, v, n)
  s = np.abs(ws).max(axis=1, keepdims=True) / q
  if m is None:
    scale = np.where(s > 0, s, 1.0)
  else:
    gamma = s.max(axis=0, keepdims=True) / (2 ** m - 1)
    gamma = np.where(gamma > 0, gamma, 1.0)
    scale = np.clip(np.round(s / gamma), 1, 2 ** m - 1) * gamma
  out = np.clip(np.round(ws / scale), -q, q) * scale
  return out.reshape(g * v, n)[:k]


@pytest.mark.parametrize("m", [None, 4, 8])
@pytest.mark.parametrize("k", [64, 50])
def test_vs_quantize_matches_reference(m, k):
  w = np.random.default_rng(k).standard_t(3, size=(k, 12)).astype(np.float32)
  qt = quant.vs_quantize(w, 4, axis=0, vector_size=16, scale_bits=m)
  assert qt.codes.shape == w.shape and qt.vector_scale.shape == (-(-k // 16), 1, 12)
  if m is not None:
    assert qt.vector_scale.dtype == jnp.uint8 and int(qt.vector_scale.max()) <= 2 ** m - 1
  np.testing.assert_allclose(quant.vs_dequantize(qt), _np_vs(w.astype(np.float64), 4, 16, m),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="does not divide") if k % 16 else _nullcontext():
    quant.vs_quantize(w, 4, axis=0, vector_size=16, pad=False)


class _nullcontext:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def test_per_vector_beats_per_channel_sqnr():
  rng = np.random.default_rng(0)
  # Rows of very different magnitude within each output channel: what per-vector scales are for.
  w = rng.normal(size=(256, 32)) * np.exp(rng.normal(size=(256, 1)))
  w = jnp.asarray(w, jnp.float32)
  pc = float(quant.sqnr_db(w, quant.dequantize(quant.quantize(w, 4, axis=0))))
  pv = float(quant.sqnr_db(w, quant.vs_dequantize(quant.vs_quantize(w, 4, axis=0, scale_bits=6))))
  assert pv > pc + 3.0


@pytest.mark.parametrize("gran", ["tensor", "channel", "vector"])
def test_integer_path_equals_emulation_dense(gran):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 64))
  w = jax.random.normal(jax.random.PRNGKey(1), (64, 10))
  a_gran = "vector" if gran == "vector" else "tensor"
  cfg = quant.QuantConfig(quant.QuantSpec(4, gran, 16, scale_bits=4 if gran == "vector" else None),
                          quant.QuantSpec(8, a_gran, 16))
  emu = quant.quantized_dot_general(cfg)(x, w, (((2,), (0,)), ((), ())))
  integer = jax.jit(quant.quantized_dot_general(quant.QuantConfig(cfg.weight, cfg.activation, True)),
                    static_argnums=2)(x, w, (((2,), (0,)), ((), ())))
  np.testing.assert_allclose(integer, emu, rtol=1e-5, atol=1e-5)
  # and the emulation equals the float64 product of the dequantized operands
  assert float(jnp.linalg.norm(emu - x @ w) / jnp.linalg.norm(x @ w)) < 0.2


def test_per_vector_integer_path_loops_over_groups_when_large(monkeypatch):
  from mlsys_jax.quant import layers
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 64))
  w = jax.random.normal(jax.random.PRNGKey(1), (64, 5))
  cfg = quant.QuantConfig(quant.QuantSpec(4, "vector", 16, scale_bits=6),
                          quant.QuantSpec(8, "vector", 16, scale_bits=6), integer=True)
  batched = quant.quantized_dot_general(cfg)(x, w, DN)
  monkeypatch.setattr(layers, "_BATCHED_PARTIALS_LIMIT", 1)
  looped = quant.quantized_dot_general(cfg)(x, w, DN)
  np.testing.assert_allclose(looped, batched, rtol=1e-5, atol=1e-5)


def test_quantized_conv_paths():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 7, 24))
  k = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 24, 5))
  dn = ("NHWC", "HWIO", "NHWC")
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                           dimension_numbers=dn)
  # Per-vector weights only: equal to a conv with the kernel quantized in vectors along (C, then window).
  cfg = quant.QuantConfig(quant.QuantSpec(4, "vector", 16, scale_bits=None), None)
  got = quant.quantized_conv_general_dilated(cfg)(x, k, (1, 1), "SAME", dimension_numbers=dn)
  kq = quant.vs_dequantize(quant.vs_quantize(k.reshape(-1, 5), 4, axis=0, vector_size=16,
                                             scale_bits=None)).reshape(k.shape)
  np.testing.assert_allclose(got, conv(x, kq), rtol=1e-4, atol=1e-4)
  # Integer per-channel conv equals emulation.
  cfg = quant.QuantConfig(quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "tensor"))
  emu = quant.quantized_conv_general_dilated(cfg)(x, k, (1, 1), "SAME", dimension_numbers=dn)
  icfg = quant.QuantConfig(cfg.weight, cfg.activation, integer=True)
  integer = quant.quantized_conv_general_dilated(icfg)(x, k, (1, 1), "SAME", dimension_numbers=dn)
  np.testing.assert_allclose(integer, emu, rtol=1e-4, atol=1e-4)
  assert float(jnp.linalg.norm(emu - conv(x, k)) / jnp.linalg.norm(conv(x, k))) < 0.02


def test_flax_linen_and_nnx_injection():
  cfg = quant.QuantConfig(quant.QuantSpec(4, "vector", 16, scale_bits=6), quant.QuantSpec(8, "vector"))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32))
  dense = nn.Dense(8, dot_general=quant.quantized_dot_general(cfg))
  v = dense.init(jax.random.PRNGKey(1), x)
  ref = quant.quantized_dot_general(cfg)(x, v["params"]["kernel"], DN) + v["params"]["bias"]
  np.testing.assert_allclose(dense.apply(v, x), ref, rtol=1e-6)
  from flax import nnx
  lin = nnx.Linear(32, 8, dot_general=quant.quantized_dot_general(cfg), rngs=nnx.Rngs(0))
  ref = quant.quantized_dot_general(cfg)(x, lin.kernel[...], DN) + lin.bias[...]
  np.testing.assert_allclose(lin(x), ref, rtol=1e-6)
  # vmap over a batch of weight matrices works
  ws = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 8))
  out = jax.vmap(lambda w: quant.quantized_dot_general(cfg)(x, w, DN))(ws)
  assert out.shape == (3, 4, 8)


def test_calibration_methods_and_model_flow():
  rng = np.random.default_rng(0)
  s = np.concatenate([rng.normal(size=20000), [40.0]]).astype(np.float32)
  amax_max = float(quant.calibrate_amax(s, 4, "max"))
  amax_pct = float(quant.calibrate_amax(s, 4, "percentile", percentile=99.9))
  amax_mse = float(quant.calibrate_amax(s, 4, "mse"))
  assert amax_max == pytest.approx(40.0)
  assert amax_pct == pytest.approx(np.percentile(np.abs(s), 99.9), rel=1e-4)
  assert amax_mse < 10.0  # MSE clips the lone outlier
  from mlsys_jax import models
  cfg = quant.QuantConfig(quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "tensor", calibration="mse"))
  m = models.CNN(num_classes=3, channels=(4,), hidden=8,
                 dot_general_cls=functools.partial(quant.QuantDotGeneral, config=cfg),
                 conv_general_dilated_cls=functools.partial(quant.QuantConv, config=cfg))
  xb = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1))
  v = m.init(jax.random.PRNGKey(1), xb)
  v = {"params": v["params"]}
  _, st = m.apply(v, xb, mutable=["quant_calib"])
  q = quant.calibration_to_amax(st["quant_calib"], cfg)
  amaxes = jax.tree_util.tree_leaves(q)
  assert len(amaxes) == 3 and all(float(a) > 0 for a in amaxes)
  out_static = m.apply({**v, "quant": q}, xb)
  out_dynamic = m.apply(v, xb)
  assert out_static.shape == out_dynamic.shape == (16, 3)


def test_bad_inputs():
  x = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="bits"):
    quant.quantize(x, 1)
  with pytest.raises(ValueError, match="bits"):
    quant.quantize(x, 17)
  with pytest.raises(TypeError, match="floating-point"):
    quant.quantize(jnp.ones((4,), jnp.int32), 8)
  with pytest.raises(ValueError, match="NaN"):
    quant.quantize(jnp.array([1.0, jnp.nan]), 8)
  with pytest.raises(ValueError, match="PRNG key"):
    quant.quantize(x, 8, rounding="stochastic")
  with pytest.raises(ValueError, match="out of range"):
    quant.quantize(x, 8, axis=3)
  with pytest.raises(ValueError, match="scale_bits"):
    quant.QuantSpec(4, "channel", scale_bits=4)
  with pytest.raises(ValueError, match="granularity"):
    quant.QuantSpec(4, "row")
  with pytest.raises(ValueError, match="percentile"):
    quant.QuantSpec(8, calibration="percentile", percentile=150.0)
  with pytest.raises(ValueError, match="percentile"):
    quant.QuantSpec(8, calibration="percentile", percentile=0.0)
  with pytest.raises(ValueError, match="integer=True"):
    quant.quantized_dot_general(quant.QuantConfig(quant.QuantSpec(4), None, integer=True))(x, x, DN)
  with pytest.raises(TypeError, match="QuantizedTensor"):
    quant.dequantize(x)


# ----------------------------------------------------------------------------------------------------
# Issue 17: integer-path gradients, NaN under jit; issue 21: multi-axis contractions.


def _cos(a, b):
  a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_integer_path_gradient_is_the_emulation_straight_through_gradient():
  # per-vector dense here; per-channel goes through the same custom_vjp in the conv test below
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (32, 5))
  wspec, aspec = quant.QuantSpec(8, "vector", 16, scale_bits=6), quant.QuantSpec(8, "vector", 16)
  t = jax.random.normal(jax.random.PRNGKey(2), (6, 5))

  def loss(integer):
    dg = quant.quantized_dot_general(quant.QuantConfig(wspec, aspec, integer))
    return lambda x, w: jnp.sum((dg(x, w, DN) - t) ** 2)

  g_int = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, w)
  g_emu = jax.jit(jax.grad(loss(False), argnums=(0, 1)))(x, w)
  g_float = jax.grad(lambda x, w: jnp.sum((x @ w - t) ** 2), argnums=(0, 1))(x, w)
  for gi, ge, gf in zip(g_int, g_emu, g_float):
    np.testing.assert_allclose(gi, ge, rtol=1e-4, atol=1e-4)
    assert _cos(gi, gf) > 0.99


def test_integer_conv_gradient_is_the_emulation_gradient():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 3))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 2))
  spec = (quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "tensor"))

  def loss(integer):
    conv = quant.quantized_conv_general_dilated(quant.QuantConfig(*spec, integer))
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))

  gi = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, k)
  ge = jax.jit(jax.grad(loss(False), argnums=(0, 1)))(x, k)
  for a, b in zip(gi, ge):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(a).max()) > 0.1


import chex  # noqa: E402


class NaNUnderJitTest(chex.TestCase):
  """One NaN must never come back as zeros: eager calls raise, traced calls give NaN for its scale group."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_and_fake_quant(self):
    x = jnp.array([[1.0, jnp.nan, 2.0], [0.5, -1.0, 3.0]])

    def fns(x):
      return (quant.dequantize(quant.quantize(x, 8, axis=1)),          # one scale per row: row 0 NaN
              quant.fake_quant(x, 8),                                    # per tensor: all NaN
              quant.dequantize(quant.quantize(x, 8, axis=1, bounds=jnp.full((2, 1), 4.0))),  # static
              quant.vs_dequantize(quant.vs_quantize(x, 8, axis=1, vector_size=2, scale_bits=None)),
              quant.vs_fake_quant(x, 4, axis=1, vector_size=2, scale_bits=4))

    if self.variant.type == chex.ChexVariantType.WITHOUT_JIT:
      with self.assertRaisesRegex(ValueError, "NaN"):
        self.variant(fns)(x)
      return
    per_row, per_tensor, static, vs1, vs2 = self.variant(fns)(x)
    np.testing.assert_array_equal(np.isnan(per_row), [[True] * 3, [False] * 3])
    assert np.all(np.isnan(per_tensor))
    np.testing.assert_array_equal(np.isnan(static), [[True] * 3, [False] * 3])
    np.testing.assert_array_equal(np.isnan(vs1), [[True, True, False], [False, False, False]])
    assert np.all(np.isnan(vs2[0]))  # the row's coarse scale is undefined
    # the finite values elsewhere are still quantized normally
    np.testing.assert_allclose(per_row[1], quant.dequantize(quant.quantize(x[1], 8)), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantize_round_trip_is_the_same_with_and_without_jit(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    got = self.variant(lambda x: quant.dequantize(quant.quantize(x, 4, axis=0)))(x)
    chex.assert_trees_all_close(got, _np_sym(np.asarray(x, np.float64), 4, (0,)), rtol=1e-5, atol=1e-6)


def test_integer_path_propagates_nan_under_jit():
  x = jnp.ones((2, 16)).at[0, 3].set(jnp.nan)
  w = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
  cfg = quant.QuantConfig(quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "channel"), integer=True)
  out = jax.jit(lambda x, w: quant.quantized_dot_general(cfg)(x, w, DN))(x, w)
  assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))


def _np_vs_rows(a, bits, v, m):
  """float64 per-vector quantization of a (M, K) activation along K; one coarse scale for the tensor."""
  q = 2 ** (bits - 1) - 1
  mm, k = a.shape
  s = np.abs(a.reshape(mm, k // v, v)).max(-1, keepdims=True) / q
  gamma = s.max() / (2 ** m - 1)
  scale = np.clip(np.round(s / gamma), 1, 2 ** m - 1) * gamma
  return (np.clip(np.round(a.reshape(mm, k // v, v) / scale), -q, q) * scale).reshape(mm, k)


_VEC = quant.QuantConfig(quant.QuantSpec(8, "vector", 8, scale_bits=6), quant.QuantSpec(8, "vector", 8, scale_bits=6))
_CHAN = quant.QuantConfig(quant.QuantSpec(8, "channel"), quant.QuantSpec(8, "tensor"))


def _np_ref(cfg, a2, w2):
  """float64 reference of a quantized (M, K) @ (K, N) product for the two configs above."""
  a2, w2 = np.asarray(a2, np.float64), np.asarray(w2, np.float64)
  if cfg.weight.granularity == "vector":
    return _np_vs_rows(a2, 8, 8, 6) @ _np_vs(w2, 8, 8, 6)
  return _np_sym(a2, 8, (0, 1)) @ _np_sym(w2, 8, (0,))


@pytest.mark.parametrize("cfg", [_VEC, _CHAN], ids=["vector", "channel"])
def test_multi_axis_contractions_linen_dense_general(cfg):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
  qkv = nn.DenseGeneral((2, 8), use_bias=False)                   # kernel (E, heads, head_dim)
  out = nn.DenseGeneral(5, axis=(-2, -1), use_bias=False)          # kernel (heads, head_dim, E): two axes
  kq = qkv.init(jax.random.PRNGKey(1), x)["params"]["kernel"]
  h = x @ kq.reshape(16, 16)
  ko = out.init(jax.random.PRNGKey(2), h.reshape(2, 3, 2, 8))["params"]["kernel"]
  ref_qkv = _np_ref(cfg, x.reshape(6, 16), kq.reshape(16, 16)).reshape(2, 3, 2, 8)
  ref_out = _np_ref(cfg, h.reshape(6, 16), ko.reshape(16, 5)).reshape(2, 3, 5)
  for integer in (False, True):
    dg = quant.quantized_dot_general(quant.QuantConfig(cfg.weight, cfg.activation, integer))
    both = jax.jit(lambda x, h: (
        nn.DenseGeneral((2, 8), use_bias=False, dot_general=dg).apply({"params": {"kernel": kq}}, x),
        nn.DenseGeneral(5, axis=(-2, -1), use_bias=False, dot_general=dg).apply({"params": {"kernel": ko}}, h)))
    got_qkv, got_out = both(x, h.reshape(2, 3, 2, 8))
    np.testing.assert_allclose(got_qkv, ref_qkv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_out, ref_out, rtol=1e-4, atol=1e-4)


def test_multi_axis_contractions_attention_and_nnx():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
  mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=16)
  v = jax.jit(mha.init)(jax.random.PRNGKey(1), x)
  ref = jax.jit(mha.apply)(v, x)
  # every dot of the layer on the integer path (emulation == integer is checked on DenseGeneral above)
  dg = quant.quantized_dot_general(quant.QuantConfig(_VEC.weight, _VEC.activation, True))
  q = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=16,
                                      qkv_dot_general=dg, out_dot_general=dg)
  got = jax.jit(q.apply)(v, x)
  assert 1e-4 < float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.03
  from flax import nnx
  lin = nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(0),
                   dot_general=quant.quantized_dot_general(quant.QuantConfig(_VEC.weight, _VEC.activation, True)))
  got = nnx.jit(lambda m, x: m(x))(lin, x)
  np.testing.assert_allclose(got, _np_ref(_VEC, x.reshape(8, 16), lin.kernel[...]).reshape(2, 4, 8),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="batch dimensions"):
    quant.quantized_dot_general(_CHAN.__class__(_CHAN.weight, _CHAN.activation, True))(
        jnp.ones((3, 4, 5)), jnp.ones((3, 5, 2)), (((2,), (1,)), ((0,), (0,))))
