"""Serialized packed QuickNet: exact sizes, round trip, and the inference function rebuilt from bytes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import binary as qb
from mlsys_jax.quant.binary import export


@functools.lru_cache(maxsize=None)
def _small(shortcut=True):
  m = qb.QuickNet(section_blocks=(1, 1), section_filters=(32, 64), num_classes=5, stem_strides=(1, 1),
                  shortcut=shortcut)
  v = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))
  # non-trivial BatchNorm statistics (a trained model's, not the init's zeros and ones)
  rng = np.random.default_rng(1)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: (jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype) if p[-1].key == "var" else
                    jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype) if p[-1].key == "mean" else a), v)
  return m, v


@pytest.mark.parametrize("shortcut", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_float32_blob_reproduces_flax_and_round_trips(shortcut):
  m, v = _small(shortcut)
  c = export.compress_quicknet(m, v, (8, 8, 1), head_bits=32, transition_bits=32, stem_bits=32)
  blob = export.serialize(c)
  back = export.deserialize(blob)
  assert back["meta"] == json_roundtrip(c["meta"])
  for name, a in c["arrays"].items():
    np.testing.assert_array_equal(back["arrays"][name], a)
    assert back["arrays"][name].dtype == a.dtype
  infer, model = export.load_quicknet(blob)          # from the bytes alone
  assert model.section_filters == (32, 64) and model.shortcut == shortcut
  x = jax.random.normal(jax.random.PRNGKey(2), (6, 8, 8, 1))
  # binary accumulators are exact; the BatchNorm folds differ from flax's formula by float rounding
  np.testing.assert_allclose(infer(x), jax.jit(m.apply)(v, x), rtol=1e-4, atol=1e-4)


def json_roundtrip(meta):
  import json
  return json.loads(json.dumps(meta))


def test_sizes_are_exact_and_quantized_weights_decode():
  m, v = _small()
  blob = export.serialize(export.compress_quicknet(m, v, (8, 8, 1)))      # head 4-bit, transitions int8
  parts = export.serialized_nbytes(blob)
  assert parts["total"] == len(blob)
  assert sum(val for k, val in parts.items() if k != "total") == len(blob)
  assert parts["binary_kernels"] == (9 * 32 * 32 + 9 * 64 * 64) // 8          # 1 bit per binary weight
  assert parts["binary_transforms"] == 2 * 4 * (32 + 64)                       # float32 mul, add
  # head: 64 x 5 codes at 4 bits, 64 / 16 vectors x 5 uint8 scales, float32 coarse scale + bias per class
  assert parts["head"] == 64 * 5 // 2 + 4 * 5 + 4 * 5 + 4 * 5
  arr = export.deserialize(blob)["arrays"]
  codes = export._unpack_nibbles(arr["Head/codes"], (64, 5))
  assert codes.min() >= -7 and codes.max() <= 7
  k = np.asarray(v["params"]["Head"]["kernel"])
  deq = (codes.reshape(4, 16, 5) * arr["Head/vector_scale"].astype(np.float32)
         * arr["Head/coarse_scale"].reshape(1, 1, 5)).reshape(64, 5)
  # per-vector 4-bit: error <= half a step of that vector's scale (plus the 8-bit scale's rounding)
  step = np.repeat(arr["Head/vector_scale"].astype(np.float32) * arr["Head/coarse_scale"], 16, axis=0).reshape(64, 5)
  assert np.all(np.abs(deq - k) <= 0.5 * step + np.abs(k) * 0.07 + 1e-7)
  t = arr["TransitionConv_0/codes"].astype(np.float32) * arr["TransitionConv_0/scale"]
  w = np.asarray(v["params"]["TransitionConv_0"]["kernel"])
  assert np.all(np.abs(t - w) <= 0.5 * arr["TransitionConv_0/scale"] + 1e-7)
  infer, _ = export.load_quicknet(blob)
  assert np.all(np.isfinite(np.asarray(infer(jnp.ones((2, 8, 8, 1))))))


def test_blocks_pack_like_convert_quicknet_with_the_block_batchnorm_epsilon():
  """compress_quicknet and convert_quicknet share one block packer: same words and fused transform, and the
  fold uses the block BatchNorm's epsilon (1e-5), not the stem's Keras 1e-3."""
  m, v = _small()
  arr = export.compress_quicknet(m, v, (8, 8, 1))["arrays"]
  _, layers = qb.convert_quicknet(m, v, (8, 8, 1))
  assert [("/".join(p)) for p in layers] == ["QuickNetBlock_0", "QuickNetBlock_1"]
  for path, layer in layers.items():
    name = "/".join(path)
    np.testing.assert_array_equal(arr[name + "/words"], layer.words)
    np.testing.assert_array_equal(arr[name + "/mul"], layer.transform.mul)
    np.testing.assert_array_equal(arr[name + "/add"], layer.transform.bias)
    bn, st = v["params"][name]["BatchNorm"], v["batch_stats"][name]["BatchNorm"]
    mul = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(st["var"], np.float64) + 1e-5)
    np.testing.assert_allclose(arr[name + "/mul"], mul, rtol=1e-6)
    np.testing.assert_allclose(arr[name + "/add"], np.asarray(bn["bias"]) - np.asarray(st["mean"]) * mul,
                               rtol=1e-6, atol=1e-7)
    k = np.asarray(v["params"][name]["BinaryConv"]["kernel"])
    np.testing.assert_array_equal(layer.words, qb.pack_conv2d(np.where(k < 0, -1.0, 1.0), (8, 8)).words)


def test_zoo_quicknet_is_under_one_25th_of_float32():
  """The Larq Zoo QuickNet (ImageNet shapes): exact serialized bytes of the default setting."""
  m = qb.QuickNet()
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  v = jax.tree_util.tree_map_with_path(
      lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "var" else np.full(s.shape, 0.01, s.dtype), shapes)
  blob = export.serialize(export.compress_quicknet(m, v, (224, 224, 3)))
  parts = export.serialized_nbytes(blob)
  f32 = 4 * qb.larq_param_count(m, shapes)["larq_total"]
  assert f32 == 4 * 13_234_088
  assert parts["binary_kernels"] == 12_533_760 // 8                            # 4 x 9 x (64^2 + ... + 512^2) bits
  assert parts["head"] == 512 * 1000 // 2 + 512 // 16 * 1000 + 4 * 1000 + 4 * 1000
  assert parts["float_convs"] == 4 * (27 * 16 + 9 * 16 + 16 * 64) + (64 * 128 + 128 * 256 + 256 * 512) + 4 * 896
  assert len(blob) == parts["total"]
  assert f32 / len(blob) >= 25, f32 / len(blob)


def test_bad_inputs_raise():
  m, v = _small()
  with pytest.raises(ValueError, match="magic"):
    export.deserialize(b"not a model")
  with pytest.raises(ValueError, match="head_bits"):
    export.compress_quicknet(m, v, (8, 8, 1), head_bits=3)
  with pytest.raises(ValueError, match="binary"):
    export.compress_quicknet(qb.QuickNet(binary=False), v, (8, 8, 1))
  with pytest.raises(ValueError, match="input_shape"):
    export.compress_quicknet(m, v, (8, 8))
