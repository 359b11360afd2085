"""Regression tests of reviewed bugs in mlsys_jax.infer (microrec, sensai, video): narrow index dtypes and
empty batches in MicroRec lookups, argument checks of the sensAI temperature fitting and combination, and
the ConvLayer checks of the range-bound video convolution."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh

from mlsys_jax import models
from mlsys_jax.infer import microrec as mr
from mlsys_jax.infer import sensai, video

# ---------------------------------------------------------------------------------------------- microrec

_NARROW = (np.int8, np.uint8, np.int16, np.uint16)


def _ref_lookup(tables, idx):
  """numpy reference: the rows of every table, concatenated in table order (bags summed)."""
  idx = np.asarray(idx, np.int64)
  cols = []
  for t, tab in enumerate(tables):
    tab = np.asarray(tab, np.float64)
    cols.append(tab[idx[:, t]] if idx.ndim == 2 else tab[idx[:, t]].sum(1))
  return np.concatenate(cols, axis=-1)


@pytest.mark.parametrize("dtype", _NARROW)
def test_lookup_accepts_narrow_integer_indices(dtype):
  # reviewer's repro: a 40000-row table and int16 indices -> OverflowError (rows cast to the index dtype)
  tables = mr.init_tables(0, (mr.TableSpec(40000, 2), mr.TableSpec(4, 2), mr.TableSpec(120, 2)))
  idx = np.array([[100, 3, 119], [0, 0, 7], [127, 2, 64]], dtype)
  want = _ref_lookup(tables, idx)
  for plan in (mr.Plan.identity(3), mr.Plan(((0,), (1, 2)))):   # (1, 2): a combined 480-row table
    for fuse in (False, True, "chunks"):
      st = mr.build_stage(tables, plan, fuse=fuse)
      for fn in (mr.lookup, jax.jit(mr.lookup)):
        emb, bad = fn(st, idx)
        np.testing.assert_array_equal(np.asarray(emb, np.float64), want)
        assert int(bad) == 0
  st = mr.build_stage(tables, mr.Plan.identity(3))
  # traced narrow indices out of range are still clamped and counted (not wrapped)
  neg = np.array([[-1, 3, 119]], np.int8 if np.issubdtype(dtype, np.signedinteger) else np.int16)
  emb, bad = jax.jit(mr.lookup)(st, neg)
  assert int(bad) == 1
  np.testing.assert_array_equal(np.asarray(emb, np.float64), _ref_lookup(tables, np.array([[0, 3, 119]])))
  with pytest.raises(ValueError, match="table 0"):   # concrete ones are refused
    mr.lookup(st, neg)
  # multi-hot bags (per-table plan) in a narrow dtype
  bag = np.array([[[1, 2], [3, 0], [5, 6]]], dtype)
  np.testing.assert_allclose(np.asarray(jax.jit(mr.lookup)(st, bag)[0], np.float64), _ref_lookup(tables, bag),
                             rtol=1e-6)


def test_pallas_lookup_accepts_narrow_indices_and_empty_batches():
  tables = mr.init_tables(1, [mr.TableSpec(r, 4) for r in (300, 5, 7)])
  st = mr.build_stage(tables, mr.Plan(((0,), (1, 2))), fuse="chunks")
  assert mr.pallas_supported(st)
  idx = np.array([[299, 4, 6], [0, 1, 2]], np.int16)
  emb, bad = mr.lookup(st, idx, impl="pallas", interpret=True)
  np.testing.assert_array_equal(np.asarray(emb, np.float64), _ref_lookup(tables, idx))
  assert int(bad) == 0
  for count, shape in (("total", ()), ("partial", (1,))):
    emb, bad = mr.lookup(st, np.zeros((0, 3), np.int32), impl="pallas", interpret=True, count=count)
    assert emb.shape == (0, 12) and bad.shape == shape and int(np.sum(bad)) == 0


def test_lookup_and_server_on_an_empty_batch():
  # reviewer's repro: fuse="chunks" and an empty batch -> ZeroDivisionError (reshape with -1 of 0 elements)
  tables = mr.init_tables(2, [mr.TableSpec(r, 4) for r in (5, 4, 3)])
  for plan in (mr.Plan.identity(3), mr.Plan(((0, 1), (2,)))):
    for fuse in (False, True, "chunks"):
      st = mr.build_stage(tables, plan, fuse=fuse)
      shapes = [(0, 3)] + ([(0, 3, 2)] if len(plan.groups) == 3 else [])
      for shape in shapes:
        for fn in (mr.lookup, jax.jit(mr.lookup)):
          emb, bad = fn(st, np.zeros(shape, np.int32))
          assert emb.shape == (0, 12) and emb.dtype == jnp.float32 and int(bad) == 0, (plan, fuse, shape)
  specs = [mr.TableSpec(r, 4) for r in (3, 5, 7, 40)]
  tables = mr.init_tables(8, specs)
  dense, idx = mr.synthetic_batch(3, specs, 6, num_dense=3)
  model = mr.DLRM(bottom=(8, 4), top=(8,))   # dot interaction: reshapes the embeddings per table
  base = mr.build_stage(tables, mr.Plan.identity(len(specs)))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), base, dense, idx)
  logits, bad = jax.jit(model.apply)(variables, base, dense[:0], idx[:0])
  assert logits.shape == (0,) and int(bad) == 0
  plan = mr.Plan(((0, 1), (2,), (3,)))
  for pack_max_batch in (64, 0):   # packed and split requests
    sv = mr.Server(model, variables, tables, plan, num_dense=3, pack_max_batch=pack_max_batch)
    logits, bad = sv(dense[:0], idx[:0])
    assert logits.shape == (0,) and logits.dtype == np.float32 and bad == 0
    full, _ = sv(dense, idx)   # the same server still answers a real batch
    ref, _ = jax.jit(model.apply)(variables, base, dense, idx)
    np.testing.assert_allclose(full, np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_sharded_lookup_narrow_dtypes_bag_axis_and_empty_batch(devices):
  specs = [mr.TableSpec(r, d) for r, d in ((40000, 2), (4, 3), (7, 2), (11, 1), (3, 2))]
  tables = mr.init_tables(5, specs)
  plan = mr.Plan(((0,), (1, 2), (3,), (4,)))
  mesh = Mesh(np.array(devices), ("t",))
  sh = mr.shard_stage(tables, plan, 8)
  fn = jax.jit(lambda s, i: mr.sharded_lookup(s, i, mesh, "t"))
  idx = np.array([[100, 3, 6, 10, 2], [0, 0, 0, 0, 0], [127, 1, 2, 3, 1]])
  want = _ref_lookup(tables, idx)
  for dtype in _NARROW + (np.int32,):
    for x in (idx.astype(dtype), idx.astype(dtype)[:, :, None]):   # (batch, tables) and (batch, tables, 1)
      out, bad = fn(sh, x)
      np.testing.assert_array_equal(np.asarray(out, np.float64), want)
      assert int(bad) == 0
  out, bad = mr.sharded_lookup(sh, idx[:, :, None].astype(np.int16), mesh, "t")   # eager as well
  np.testing.assert_array_equal(np.asarray(out, np.float64), want)
  out, bad = fn(sh, np.zeros((0, 5), np.int32))
  assert out.shape == (0, 10) and int(bad) == 0
  with pytest.raises(ValueError, match="one-hot"):
    mr.sharded_lookup(sh, np.zeros((3, 5, 2), np.int32), mesh, "t")
  with pytest.raises(ValueError, match="table 0"):
    mr.sharded_lookup(sh, np.where(np.arange(5) == 0, 40000, idx), mesh, "t")


# ---------------------------------------------------------------------------------------------- sensai

_LG = [np.array([[2.0, 1, 0], [0, 1, 2]]), np.array([[1.0, 0, 2], [2, 0, 1]])]


def test_joint_temperatures_check_labels_and_bounds():
  groups = [(0, 1), (2, 3)]
  # reviewer's repro: label 9 (and -1, which indexed like label 3) were accepted silently
  for labels in ([9, 1], [-1, 1], [0, 4]):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
      sensai.calibrate_temperatures_joint(_LG, groups, np.array(labels), 4)
  with pytest.raises(TypeError, match="integer"):
    sensai.calibrate_temperatures_joint(_LG, groups, np.array([0.0, 3.0]), 4)
  with pytest.raises(ValueError, match=r"\(n,\)"):
    sensai.calibrate_temperatures_joint(_LG, groups, np.array([[0, 3]]), 4)
  for kw, name in ((dict(low=0.0), "low"), (dict(low=-1.0), "low"), (dict(low=2.0, high=1.0), "high"),
                   (dict(high=float("inf")), "high"), (dict(low=float("nan")), "low")):
    with pytest.raises(ValueError, match=name):
      sensai.calibrate_temperatures_joint(_LG, groups, np.array([0, 3]), 4, **kw)
  with pytest.raises(ValueError, match="2 groups"):   # zip() used to drop the missing group silently
    sensai.calibrate_temperatures_joint(_LG[:1], groups, np.array([0, 3]), 4)
  t = sensai.calibrate_temperatures_joint(_LG, groups, np.array([0, 3]), 4, steps=50, low=0.1, high=5.0)
  assert t.shape == (2,) and t.dtype == np.float64 and np.all((t >= 0.1 - 1e-9) & (t <= 5.0 + 1e-9))


def _softmax64(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _cnn_subnets(num_classes, groups):
  model = models.CNN(num_classes=num_classes, channels=(4, 4), hidden=6)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32), shapes)
  x = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  st = sensai.channel_stats(model, variables, x)
  return [sensai.make_subnet(model, variables, g, sensai.prune_masks(st, keep_fraction=0.5)) for g in groups], x


def test_combine_and_stack_subnets_refuse_non_finite_temperatures():
  groups = [(0, 1), (2, 3)]
  bad_temps = ([1.0, np.inf], [1.0, np.nan], [1.0, 0.0], [1.0, -2.0], [1.0, 1e39], [1.0, 1e-50], [1.0])
  for temps in bad_temps:   # inf used to pass (a uniform softmax); 1e39 / 1e-50 are inf / 0 in float32
    with pytest.raises(ValueError, match="positive finite"):
      sensai.combine(_LG, groups, 4, temps)
  temps = [0.5, 3.0]   # valid ones: float64 reference
  ref = np.zeros((2, 4))
  for z, g, t in zip(_LG, groups, temps):
    ref[:, list(g)] = _softmax64(z / t)[:, 1:]
  np.testing.assert_allclose(sensai.combine(_LG, groups, 4, temps), ref / ref.sum(1, keepdims=True), rtol=1e-5)
  subs, x = _cnn_subnets(4, groups)
  for temps in bad_temps:
    with pytest.raises(ValueError, match="positive finite"):
      sensai.stack_subnets(subs, 4, temps)
    with pytest.raises(ValueError, match="positive finite"):
      sensai.make_branch_predictor(subs, 4, temps)
  ens = sensai.stack_subnets(subs, 4, [0.5, 3.0])
  want = sensai.combine([sensai.subnet_predict(s, x) for s in subs], groups, 4, [0.5, 3.0])
  np.testing.assert_allclose(sensai.ensemble_predict(ens, x), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- video

def _conv64(x, kernel, bias, padding):
  """float64 numpy reference of a stride-1 HWIO conv + bias with symmetric padding ``padding``."""
  kh, kw, _, _ = kernel.shape
  xp = np.pad(np.asarray(x, np.float64), ((padding[0], padding[0]), (padding[1], padding[1]), (0, 0)))
  ho, wo = xp.shape[0] - kh + 1, xp.shape[1] - kw + 1
  out = np.zeros((ho, wo, kernel.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("hwc,cd->hwd", xp[i:i + ho, j:j + wo], np.asarray(kernel[i, j], np.float64))
  return out + np.asarray(bias, np.float64)


def test_conv_layer_even_same_kernel_is_refused():
  # reviewer's repro: a 2x2 SAME ConvLayer gave (7, 7, 1) where flax SAME gives (8, 8, 1)
  x = np.ones((8, 8, 1), np.float32)
  even = video.ConvLayer(jnp.ones((2, 2, 1, 1)), jnp.zeros(1), "SAME")
  assert nn.Conv(1, (2, 2), padding="SAME").init_with_output(jax.random.PRNGKey(0), x[None])[0].shape == (1, 8, 8, 1)
  with pytest.raises(ValueError, match="even kernel"):
    video.dense_conv(even, x)
  with pytest.raises(ValueError, match="even kernel"):
    jax.jit(lambda k, b, f: video.dense_conv(video.ConvLayer(k, b, "SAME"), f))(even.kernel, even.bias, x)
  with pytest.raises(ValueError, match="even kernel"):
    video.range_bound_model([even], None, (8, 8, 1), tile=4)
  with pytest.raises(ValueError, match="even kernel"):
    video.range_bound_model([video.ConvLayer(jnp.ones((3, 4, 1, 1)), jnp.zeros(1))], None, (8, 8, 1), tile=4)
  with pytest.raises(ValueError, match="even kernel"):
    video.conv_layer_init(even, x, 4)
  # VALID even kernels and SAME odd kernels stay supported: values against float64
  rng = np.random.default_rng(0)
  xr = rng.normal(size=(9, 8, 2)).astype(np.float32)
  for shape, padding, pads in (((2, 2, 2, 3), "VALID", (0, 0)), ((3, 5, 2, 3), "SAME", (1, 2))):
    layer = video.ConvLayer(jnp.asarray(rng.normal(size=shape), jnp.float32),
                            jnp.asarray(rng.normal(size=3), jnp.float32), padding, relu=False)
    want = _conv64(xr, np.asarray(layer.kernel), np.asarray(layer.bias), pads)
    for got in (video.dense_conv(layer, xr), jax.jit(lambda f, l=layer: video.dense_conv(l, f))(xr)):
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    rb = video.range_bound_model([layer], None, xr.shape, tile=4)
    st, y = rb.init(xr)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(video.dense_conv(layer, xr)))


def test_conv_layer_bias_shape_and_dtypes_are_checked():
  x = np.ones((8, 8, 1), np.float32)
  k = jnp.ones((3, 3, 1, 2), jnp.float32)
  wrong_bias = video.ConvLayer(k, jnp.zeros(3, jnp.float32))   # used to fail in a raw broadcast
  for call in (lambda l: video.dense_conv(l, x), lambda l: video.range_bound_model([l], None, (8, 8, 1)),
               lambda l: video.conv_layer_init(l, x, 4)):
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
      call(wrong_bias)
    with pytest.raises(TypeError, match="kernel must be float32"):   # used to fail inside lax
      call(video.ConvLayer(k.astype(jnp.bfloat16), jnp.zeros(2, jnp.float32)))
    with pytest.raises(TypeError, match="bias must be float32"):
      call(video.ConvLayer(k, jnp.zeros(2, jnp.bfloat16)))
    with pytest.raises(ValueError, match="rank 4"):
      call(video.ConvLayer(k[0], jnp.zeros(2, jnp.float32)))
    with pytest.raises(ValueError, match="padding"):
      call(video.ConvLayer(k, jnp.zeros(2, jnp.float32), "FULL"))
  # the cast the message suggests makes the layer valid, with flax's SAME values (bf16 -> f32 is exact)
  bf = video.ConvLayer(jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, 2)), jnp.bfloat16),
                       jnp.zeros(2, jnp.float32))
  ok = bf._replace(kernel=bf.kernel.astype(jnp.float32))
  xr = np.random.default_rng(2).normal(size=(8, 8, 1)).astype(np.float32)
  want = np.maximum(_conv64(xr, np.asarray(ok.kernel, np.float64), np.zeros(2), (1, 1)), 0)
  np.testing.assert_allclose(np.asarray(video.dense_conv(ok, xr), np.float64), want, rtol=1e-5, atol=1e-5)
  ref = lax.conv_general_dilated(xr[None], ok.kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(np.asarray(video.dense_conv(ok, xr)), np.maximum(np.asarray(ref[0]), 0))
