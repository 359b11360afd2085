"""Bit-packed XOR-popcount path: layout, bit-exactness against the +-1 float computation, converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import binary as qb
from mlsys_jax.quant.binary import packed as pk


def _pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def _conv_ref(x, w, strides, padding, pad_value):
  pads = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding) \
      if isinstance(padding, str) else padding
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=pad_value).astype(np.float64)
  return _np_corr(xp, w, strides)


def _np_corr(xp, w, strides):
  kh, kw, _, o = w.shape
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  out = np.zeros((xp.shape[0], ho, wo, o))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + strides[0] * (ho - 1) + 1:strides[0], j:j + strides[1] * (wo - 1) + 1:strides[1]]
      out += patch @ w[i, j].astype(np.float64)
  return out


def test_layout_bit_i_is_element_i_and_roundtrip():
  x = np.ones(70, np.float32)
  x[[0, 5, 31, 32, 69]] = -1
  words = np.asarray(qb.pack_bits(jnp.asarray(x), pad=True))
  assert words.dtype == np.uint32 and words.shape == (3,)
  assert words[0] == (1 << 0) | (1 << 5) | (1 << 31) and words[1] == 1 and words[2] == 1 << 5
  rng = np.random.default_rng(0)
  a = _pm1(rng, (3, 4, 64))
  back = jax.jit(lambda w, a: (qb.unpack_bits(w, 70), qb.unpack_bits(qb.pack_bits(a), 64)))(words, a)
  np.testing.assert_array_equal(back[0], x)
  np.testing.assert_array_equal(back[1], a)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="multiple of 32"):
    qb.pack_bits(jnp.ones(40))
  with pytest.raises(ValueError, match=r"\+-1"):
    qb.pack_bits(jnp.array([1.0, 0.0] * 16))
  with pytest.raises(ValueError, match=r"\+-1"):
    qb.pack_dense(jnp.full((32, 2), 0.5))
  with pytest.raises(ValueError, match="pad_value"):
    qb.pack_conv2d(jnp.ones((3, 3, 32, 2)), (4, 4), pad_value=-1.0)


@pytest.mark.parametrize("k", [pytest.param(32, marks=pytest.mark.slow), 100])
def test_packed_dense_bit_exact_with_transforms(k):
  rng = np.random.default_rng(k)
  a, w = _pm1(rng, (5, k)), _pm1(rng, (k, 7))
  ref = a.astype(np.float64) @ w
  aw = qb.pack_bits(a, pad=True)
  got = jax.jit(qb.packed_dense)(aw, qb.pack_dense(w, pad=True))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, ref)
  mul = rng.normal(size=7).astype(np.float32)
  mul[0], mul[1] = 0.0, -1.0
  bias = rng.normal(size=7).astype(np.float32)
  bias[1] = np.float32(ref[0, 1] * -1)  # a tie: y == 0 exactly for row 0 -> sign +1
  y32 = np.maximum(ref, 0).astype(np.float32) * mul + bias
  layer = qb.pack_dense(w, mul, bias, clamp=(0, None), pad=True)
  # Equal to the float32 formula up to one ulp: under jit XLA may contract mul + add into an FMA.
  np.testing.assert_allclose(jax.jit(qb.packed_dense)(aw, layer), y32, rtol=2e-7, atol=1e-6)
  tl = qb.pack_dense(w, mul, bias, clamp=(0, None), threshold=True, pad=True)
  bits = jax.jit(qb.packed_dense)(aw, tl)
  np.testing.assert_array_equal(qb.unpack_bits(bits, 7), np.where(y32 < 0, -1.0, 1.0))
  # vmap over a leading axis gives the same result.
  np.testing.assert_allclose(jax.jit(jax.vmap(qb.packed_dense, (0, None)))(aw[:, None], layer)[:, 0],
                             y32, rtol=2e-7, atol=1e-6)


@pytest.mark.parametrize("cin,ksize,strides,padding,pad_value", [
    (3, 3, 1, "SAME", 1.0), (40, 3, 2, "SAME", 0.0), (64, 1, 1, "VALID", 1.0), (8, 2, 2, "SAME", 0.0),
    pytest.param(32, 3, 1, "SAME", 0.0, marks=pytest.mark.slow),
    pytest.param(5, 3, 2, "VALID", 0.0, marks=pytest.mark.slow)])
def test_packed_conv_bit_exact(cin, ksize, strides, padding, pad_value):
  rng = np.random.default_rng(cin + ksize)
  x, w = _pm1(rng, (2, 7, 6, cin)), _pm1(rng, (ksize, ksize, cin, 5))
  layer = qb.pack_conv2d(w, (7, 6), strides, padding, pad_value)
  got = jax.jit(qb.packed_conv2d)(qb.pack_bits(x, pad=True), layer)
  ref = _conv_ref(x, w, (strides, strides), padding, pad_value)
  np.testing.assert_array_equal(got, ref)
  # The binary layers of flax (binary_conv_general_dilated) compute the same numbers in float.
  f = qb.binary_conv_general_dilated(pad_value=pad_value)
  np.testing.assert_array_equal(f(x, w, (strides, strides), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")), ref)


def test_threshold_chain_of_binary_convs_is_exact():
  rng = np.random.default_rng(7)
  x, w1, w2 = _pm1(rng, (1, 5, 5, 32)), _pm1(rng, (3, 3, 32, 40)), _pm1(rng, (3, 3, 40, 8))
  mul = rng.normal(size=40).astype(np.float32)
  bias = (rng.normal(size=40) * 20).astype(np.float32)
  l1 = qb.pack_conv2d(w1, (5, 5), mul=mul, bias=bias, clamp=(0, None), threshold=True)
  l2 = qb.pack_conv2d(w2, (5, 5), pad_value=0.0)
  got = jax.jit(lambda x, l1, l2: qb.packed_conv2d(qb.packed_conv2d(qb.pack_bits(x), l1), l2))(x, l1, l2)
  y1 = np.maximum(_conv_ref(x, w1, (1, 1), "SAME", 1.0), 0).astype(np.float32) * mul + bias
  ref = _conv_ref(np.where(y1 < 0, -1.0, 1.0), w2, (1, 1), "SAME", 0.0)
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shortcut", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_convert_quicknet_matches_flax(shortcut):
  m = qb.QuickNet(section_blocks=(1,), section_filters=(32,), num_classes=5, shortcut=shortcut)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
  v = jax.jit(m.init)(jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(2)  # non-trivial BatchNorm statistics
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
      v["batch_stats"])}
  infer, layers = qb.convert_quicknet(m, v, (16, 16, 3))
  assert len(layers) == 1
  ref = jax.jit(lambda v, x: m.apply(v, x))(v, x)
  np.testing.assert_allclose(infer(x), ref, rtol=1e-4, atol=1e-4)
  words = sum(pk.packed_nbytes(l.words) for l in layers.values())
  assert words * 32 == 9 * 32 * 32 * 4   # exactly 1/32 of float32


@pytest.mark.parametrize("variant,splits", [("acc", 1), ("acc", 2), ("rows", 1), ("csa", 1), ("csa4", 2),
                                            ("sub", 2), ("pipe", 2), ("pipe4", 1), ("rows2", 2), ("csa4r2", 1),
                                            pytest.param("bcast", 2, marks=pytest.mark.slow),
                                            pytest.param("rows", 4, marks=pytest.mark.slow)])
def test_pallas_kernel_interpret_matches_xla_packed_path(variant, splits):
  from mlsys_jax.quant.binary.pallas_dense import pallas_packed_dense
  rng = np.random.default_rng(11)
  a = jnp.asarray(rng.integers(0, 2**32, size=(3, 16), dtype=np.uint64).astype(np.uint32))  # B=3: padded
  w = jnp.asarray(rng.integers(0, 2**32, size=(32, 16), dtype=np.uint64).astype(np.uint32))
  tail = np.ones(16, np.uint32) * np.uint32(2**32 - 1)
  tail[-1] = (1 << (500 - 15 * 32)) - 1                      # LCE layout: bits past K are 0
  a, w = a & tail, w & tail
  # Several programs along N and along the words, several loop steps each.
  block_k = 8 if variant == "csa" else 4     # csa: 8 slices of one word; csa4: 4 slices; sub/pipe: 4 rows per sub-tile
  if variant == "pipe":                      # the Triton-pipelined loop form too
    np.testing.assert_array_equal(pallas_packed_dense(a, w, 500, variant, block_n=16, block_k=4, splits=splits,
                                                      num_stages=2, interpret=True), pk._popcount_dot(a, w, 500))
  got = pallas_packed_dense(a, w, 500, variant, block_n=16, block_k=block_k, splits=splits,
                            interpret=True)
  np.testing.assert_array_equal(got, pk._popcount_dot(a, w, 500))
  # Against the float +-1 computation itself (bits -> +-1, float64 dot over the true length).
  ua, uw = qb.unpack_bits(a, 500, jnp.float32), qb.unpack_bits(w, 500, jnp.float32)
  np.testing.assert_array_equal(got, np.asarray(ua, np.float64) @ np.asarray(uw, np.float64).T)


@pytest.mark.parametrize("variant,block_k", [("csa", 16), ("csa4", 8)])
def test_pallas_carry_save_trees_saturate_exactly(variant, block_k):
  """Every bit differs (and then none does): every adder of the tree carries in every bit."""
  from mlsys_jax.quant.binary.pallas_dense import pallas_packed_dense
  a = jnp.zeros((2, 32), jnp.uint32)
  w = jnp.full((16, 32), 2**32 - 1, jnp.uint32)
  np.testing.assert_array_equal(pallas_packed_dense(a, w, 1024, variant, block_n=16, block_k=block_k,
                                                    interpret=True), -1024)
  np.testing.assert_array_equal(pallas_packed_dense(a, w * 0, 1024, variant, block_n=16, block_k=block_k,
                                                    interpret=True), 1024)


def test_pallas_kernel_bad_configs_raise():
  from mlsys_jax.quant.binary.pallas_dense import pallas_packed_dense
  a = jnp.zeros((1, 8), jnp.uint32)
  w = jnp.zeros((32, 8), jnp.uint32)
  with pytest.raises(ValueError, match="multiple"):
    pallas_packed_dense(a, w, 250, block_n=64, interpret=True)
  with pytest.raises(ValueError, match="multiple"):
    pallas_packed_dense(a, w, 250, block_k=4, splits=4, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pallas_packed_dense(a, w, 250, block_n=24, interpret=True)
  with pytest.raises(ValueError, match="variant"):
    pallas_packed_dense(a, w, 250, "tiles", interpret=True)
  with pytest.raises(ValueError, match="block_k must be >= 8"):
    pallas_packed_dense(a, w, 250, "csa", block_k=4, interpret=True)
  with pytest.raises(ValueError, match="block_k must be >= 4"):
    pallas_packed_dense(a, w, 250, "csa4", block_k=2, interpret=True)
  with pytest.raises(ValueError, match="sub-tile"):
    pallas_packed_dense(a, w, 250, "sub", block_n=32, block_k=1, interpret=True)
  with pytest.raises(TypeError, match="uint32"):
    pallas_packed_dense(a.astype(jnp.int32), w, 250, interpret=True)
  with pytest.raises(ValueError):
    pallas_packed_dense(a, w, 257, interpret=True)          # k > 32 W


def test_default_config_fits_every_shape_and_dispatch_rule():
  from mlsys_jax.quant.binary import pallas_dense as pd
  for n, wn in [(8192, 256), (16384, 512), (48, 12), (96, 3), (7, 5)]:
    cfg = pd.default_config(1, n, wn)
    assert n % cfg.block_n == 0 and wn % (cfg.splits * cfg.block_k) == 0
  assert pd.kernel_applies(8, 8192, 256) and not pd.kernel_applies(9, 8192, 256)
  assert not pd.kernel_applies(1, 8192, 250) and not pd.kernel_applies(1, 8200, 256)


def test_packed_dense_kernel_dispatch_is_exact_with_transform_and_leading_dims():
  rng = np.random.default_rng(3)
  a, w = _pm1(rng, (2, 3, 100)), _pm1(rng, (100, 48))
  ref = a.astype(np.float64) @ w
  aw = qb.pack_bits(a, pad=True)
  f = jax.jit(qb.packed_dense, static_argnames="kernel")
  for kernel in ("auto", "xla", "pallas"):            # 'auto' on CPU is XLA's path
    np.testing.assert_array_equal(f(aw, qb.pack_dense(w, pad=True), kernel=kernel), ref)
  mul = rng.normal(size=48).astype(np.float32)
  bias = rng.normal(size=48).astype(np.float32)
  tl = qb.pack_dense(w, mul, bias, clamp=(0, None), threshold=True, pad=True)
  np.testing.assert_array_equal(f(aw, tl, kernel="pallas"), f(aw, tl, kernel="xla"))
  with pytest.raises(ValueError, match="kernel"):
    qb.packed_dense(aw, tl, kernel="cuda")
