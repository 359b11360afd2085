"""Direct tests of public classes that no test named before session 21: each one's documented contract
against an independent reference (numpy/float64 or a hand-computed case) and its bad-input errors, and
for data containers the fields of an instance made by its real producer.

Classes: cost.models.SAGELayer, MLPCostModel; quant.binary.packed.PackedDense, PackedConv2D;
quant.binary.quicknet.QuickNetBlock; infer.microrec.ShardedStage; profile.workloads.PendulumNP;
sched.dynamic BucketedFunction, SymbolicFunction; containers cost.hlo.Computation/Instruction,
cost.value.ValueSchedule, quant.vsquant.VSQuantizedTensor, quant.fp_align.FloatFormat."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mlsys_jax import sched
from mlsys_jax.cost import value as V
from mlsys_jax.cost.hlo import Computation, Instruction, parse_hlo
from mlsys_jax.cost.models import MLPCostModel, SAGELayer
from mlsys_jax.infer import microrec as mr
from mlsys_jax.infer.microrec import ShardedStage
from mlsys_jax.profile.workloads import PENDULUM_TORQUES, PendulumNP, pendulum_step
from mlsys_jax.quant.binary.packed import (PackedConv2D, PackedDense, pack_bits, pack_conv2d, pack_dense,
                                           packed_conv2d, packed_dense, unpack_bits)
from mlsys_jax.quant.binary.quicknet import QuickNetBlock
from mlsys_jax.quant.fp_align import FORMATS, FloatFormat
from mlsys_jax.quant.vsquant import VSQuantizedTensor, vs_dequantize, vs_quantize
from mlsys_jax.sched.dynamic import BucketedFunction, SymbolicFunction, bucketed_jit, export_symbolic


# ---- cost.models ------------------------------------------------------------------------------------
def _layer_norm64(z, scale, bias, eps=1e-6):
  mu = z.mean(-1, keepdims=True)
  var = ((z - mu) ** 2).mean(-1, keepdims=True)
  return (z - mu) / np.sqrt(var + eps) * scale + bias


def test_sage_layer_is_graphsage_mean_aggregation_over_operands_and_users():
  rng = np.random.default_rng(0)
  h = rng.standard_normal((5, 3)).astype(np.float32)
  # 0->2, 1->2 (twice: a parallel edge counts twice), 2->3; node 4 is isolated (both means are 0).
  snd, rcv = np.array([0, 1, 1, 2], np.int32), np.array([2, 2, 2, 3], np.int32)
  layer = SAGELayer(4)
  params = layer.init(jax.random.PRNGKey(1), h, snd, rcv)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
  h64 = h.astype(np.float64)
  m_in, m_out = np.zeros_like(h64), np.zeros_like(h64)
  for v in range(5):
    ins = [s for s, r in zip(snd, rcv) if r == v]
    outs = [r for s, r in zip(snd, rcv) if s == v]
    if ins:
      m_in[v] = h64[ins].mean(0)
    if outs:
      m_out[v] = h64[outs].mean(0)
  dense, ln = p["Dense_0"], p["LayerNorm_0"]
  z = np.maximum(np.concatenate([h64, m_in, m_out], -1) @ dense["kernel"] + dense["bias"], 0.0)
  ref = _layer_norm64(z, ln["scale"], ln["bias"])
  out = np.asarray(layer.apply(params, h, snd, rcv), np.float64)
  assert out.shape == (5, 4)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_sage_layer_bad_input():
  h, e = jnp.ones((3, 2)), jnp.array([0, 1], jnp.int32)
  with pytest.raises(ValueError, match="h must be node states"):
    SAGELayer(4).init(jax.random.PRNGKey(0), jnp.ones(3), e, e)
  with pytest.raises(ValueError, match="senders must be an integer"):
    SAGELayer(4).init(jax.random.PRNGKey(0), h, e.astype(jnp.float32), e)
  with pytest.raises(ValueError, match="same length"):
    SAGELayer(4).init(jax.random.PRNGKey(0), h, e, e[:1])
  with pytest.raises(ValueError, match="features must be an integer >= 1"):
    SAGELayer(0).init(jax.random.PRNGKey(0), h, e, e)


def test_mlp_cost_model_matches_numpy_forward_and_checks_input():
  x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
  for layers in (0, 2):
    m = MLPCostModel(hidden=5, num_layers=layers)
    params = m.init(jax.random.PRNGKey(0), x)["params"]
    y = x.astype(np.float64)
    for i in range(layers):
      y = np.maximum(y @ np.asarray(params[f"Dense_{i}"]["kernel"], np.float64) + params[f"Dense_{i}"]["bias"], 0)
    last = params[f"Dense_{layers}"]
    ref = (y @ np.asarray(last["kernel"], np.float64) + np.asarray(last["bias"], np.float64))[:, 0]
    np.testing.assert_allclose(np.asarray(m.apply({"params": params}, x)), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"x must be program features \[B, F\]"):
    MLPCostModel().init(jax.random.PRNGKey(0), jnp.ones(6))
  with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
    MLPCostModel(hidden=0).init(jax.random.PRNGKey(0), jnp.ones((1, 6)))
  with pytest.raises(ValueError, match="num_layers must be an integer >= 0"):
    MLPCostModel(num_layers=-1).init(jax.random.PRNGKey(0), jnp.ones((1, 6)))


# ---- quant.binary: packed layers, QuickNet block ------------------------------------------------------
def _pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def test_packed_dense_equals_float64_binary_dense_with_its_output_transform():
  rng = np.random.default_rng(0)
  k, n = 40, 5                                   # K not a multiple of 32: padded tail words
  w, a = _pm1(rng, (k, n)), _pm1(rng, (3, k))
  aw = pack_bits(jnp.asarray(a), pad=True)
  ref = a.astype(np.float64) @ w.astype(np.float64)
  layer = pack_dense(jnp.asarray(w), pad=True)
  assert isinstance(layer, PackedDense) and layer.k == k and layer.words.shape == (n, 2)
  assert layer.words.dtype == jnp.uint32
  out = jax.jit(packed_dense)(aw, layer)                 # a pytree: passes through jit, k static
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), ref)
  mul, bias = rng.uniform(-2, 2, n), rng.uniform(-3, 3, n)
  t = pack_dense(jnp.asarray(w), mul=mul, bias=bias, clamp=(0, None), pad=True)
  y = np.maximum(ref, 0) * mul.astype(np.float32) + bias.astype(np.float32)
  np.testing.assert_allclose(np.asarray(packed_dense(aw, t)), y, rtol=1e-5, atol=1e-5)
  bits = packed_dense(aw, pack_dense(jnp.asarray(w), mul=mul, bias=bias, clamp=(0, None), threshold=True,
                                     pad=True))
  np.testing.assert_array_equal(np.asarray(unpack_bits(bits, n)), np.where(y < 0, -1.0, 1.0))


def test_packed_dense_bad_input():
  w = jnp.ones((32, 2))
  with pytest.raises(ValueError, match=r"\+-1"):
    pack_dense(w.at[0, 0].set(0.5))
  with pytest.raises(ValueError, match="multiple of 32"):
    pack_dense(jnp.ones((33, 2)))
  with pytest.raises(ValueError, match="both mul and bias"):
    pack_dense(w, mul=np.ones(2))
  with pytest.raises(ValueError, match="uint32 words"):
    packed_dense(jnp.ones((1, 1), jnp.float32), pack_dense(w))


def _conv_pm1_64(x, w, stride, pads):
  """Float64 NHWC/HWIO convolution with zero padding."""
  x = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw, _, o = w.shape
  ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, o))
  for i in range(ho):
    for j in range(wo):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w.astype(np.float64))
  return out


def test_packed_conv2d_equals_float64_zero_padded_convolution():
  rng = np.random.default_rng(1)
  w, x = _pm1(rng, (3, 3, 5, 4)), _pm1(rng, (2, 5, 5, 5))
  xw = pack_bits(jnp.asarray(x), pad=True)
  for stride, padding, pads in ((2, "SAME", ((1, 1), (1, 1))), (1, "VALID", ((0, 0), (0, 0)))):
    layer = pack_conv2d(jnp.asarray(w), (5, 5), strides=stride, padding=padding, pad_value=0.0)
    assert isinstance(layer, PackedConv2D) and layer.pads == pads and layer.cin == 5
    np.testing.assert_array_equal(np.asarray(packed_conv2d(xw, layer)), _conv_pm1_64(x, w, stride, pads))
  # pad_value=+1 (free): the same as convolving an input padded with +1.
  one = pack_conv2d(jnp.asarray(w), (5, 5), pad_value=1.0)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
  np.testing.assert_array_equal(np.asarray(packed_conv2d(xw, one)), _conv_pm1_64(xp, w, 1, ((0, 0), (0, 0))))


def test_packed_conv2d_bad_input():
  w = jnp.ones((3, 3, 5, 4))
  with pytest.raises(ValueError, match="pad_value"):
    pack_conv2d(w, (5, 5), pad_value=0.5)
  with pytest.raises(ValueError, match="strides must be an int or a pair"):
    pack_conv2d(w, (5, 5), strides=(1, 1, 1))
  layer = pack_conv2d(w, (5, 5), pad_value=0.0)
  with pytest.raises(ValueError, match="uint32 words"):
    packed_conv2d(jnp.zeros((1, 5, 5, 2), jnp.uint32), layer)
  with pytest.raises(ValueError, match="another input size"):
    packed_conv2d(jnp.zeros((1, 6, 6, 1), jnp.uint32), layer)


def test_quicknet_block_is_residual_plus_bn_relu_of_binary_conv_padded_with_plus_one():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  block = QuickNetBlock()
  v = block.init(jax.random.PRNGKey(0), x)
  kern = np.asarray(v["params"]["BinaryConv"]["kernel"])
  assert kern.shape == (3, 3, 3, 3)
  sx, sk = np.where(x < 0, -1.0, 1.0), np.where(kern < 0, -1.0, 1.0)
  conv = _conv_pm1_64(np.pad(sx, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0), sk, 1,
                      ((0, 0), (0, 0)))
  bn = np.maximum(conv, 0) / np.sqrt(1.0 + 1e-5)        # initial statistics: mean 0, var 1, scale 1, bias 0
  out = np.asarray(block.apply(v, x))
  assert out.shape == x.shape
  np.testing.assert_allclose(out, x + bn, rtol=1e-5, atol=1e-5)
  no_sc = np.asarray(QuickNetBlock(shortcut=False).apply(v, x))
  np.testing.assert_allclose(no_sc, bn, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"feature maps \(N, H, W, C\)"):
    block.init(jax.random.PRNGKey(0), x[0])
  with pytest.raises(ValueError, match="clip must be a finite number > 0"):
    QuickNetBlock(clip=0.0).init(jax.random.PRNGKey(0), x)


# ---- infer.microrec.ShardedStage ----------------------------------------------------------------------
def test_sharded_stage_holds_each_physical_table_once_and_looks_up_like_numpy(devices):
  specs = [mr.TableSpec(r, d) for r, d in ((3, 2), (4, 3), (5, 2), (6, 4))]
  tables = mr.init_tables(0, specs)
  plan = mr.Plan(((0, 1), (2,), (3,)))
  stage = mr.build_stage(tables, plan)
  sh = mr.shard_stage(tables, plan, 2)
  assert isinstance(sh, ShardedStage) and sh.buffers.ndim == 3 and sh.buffers.shape[0] == 2
  width = max(p.shape[1] for p in stage.buffers)
  assert sh.buffers.shape[2] == width
  assert sorted(k for row in sh.slot_group for k in row if k >= 0) == [0, 1, 2]
  used = np.zeros(sh.buffers.shape[:2], bool)
  for d, row in enumerate(sh.slot_group):
    for s, k in enumerate(row):
      if k < 0:
        continue
      p = np.asarray(stage.buffers[k])
      o = int(sh.offsets[d, s])
      np.testing.assert_array_equal(np.asarray(sh.buffers[d, o:o + p.shape[0], :p.shape[1]]), p)
      assert not np.any(np.asarray(sh.buffers[d, o:o + p.shape[0], p.shape[1]:]))   # zero width padding
      used[d, o:o + p.shape[0]] = True
  assert not np.any(np.asarray(sh.buffers)[~used])                                  # zero padding rows
  leaves, tree = jax.tree_util.tree_flatten(sh)                                     # a pytree
  again = jax.tree_util.tree_unflatten(tree, leaves)
  assert again.slot_group == sh.slot_group and len(leaves) == 2
  mesh = jax.sharding.Mesh(np.array(devices[:2]), ("t",))
  idx = np.stack([np.random.default_rng(1).integers(0, s.rows, 6) for s in specs], 1)
  out, bad = jax.jit(lambda s, i: mr.sharded_lookup(s, i, mesh, "t"))(sh, idx)
  ref = np.concatenate([np.asarray(t)[idx[:, i]] for i, t in enumerate(tables)], 1)
  np.testing.assert_array_equal(np.asarray(out), ref)
  assert int(bad) == 0
  with pytest.raises(ValueError, match="buffers must be"):
    ShardedStage(sh.buffers[0], sh.offsets, sh.slot_group, sh.layout)
  with pytest.raises(ValueError, match="one group id"):
    ShardedStage(sh.buffers, sh.offsets, sh.slot_group[:1], sh.layout)
  dup = tuple(tuple(0 if k >= 0 else k for k in row) for row in sh.slot_group)
  with pytest.raises(ValueError, match="exactly once"):
    ShardedStage(sh.buffers, sh.offsets, dup, sh.layout)


# ---- profile.workloads.PendulumNP ----------------------------------------------------------------------
def test_pendulum_np_equals_pendulum_step_in_float64_and_hand_computed_first_step():
  e = PendulumNP(seed=3)
  th0, thd0 = e.th, e.thd
  # Hand-computed from the documented equations for action 2 (u = 2).
  thd1 = min(max(thd0 + (15.0 * math.sin(th0) + 6.0) * 0.05, -8.0), 8.0)
  cost0 = (((th0 + math.pi) % (2 * math.pi)) - math.pi) ** 2 + 0.1 * thd0 ** 2 + 0.004
  obs, r, done = e.step(2)
  assert obs.dtype == np.float32 and obs.shape == (3,) and done is False
  assert math.isclose(r, -cost0, rel_tol=1e-12)
  np.testing.assert_allclose(obs, [math.cos(th0 + thd1 * 0.05), math.sin(th0 + thd1 * 0.05), thd1], rtol=1e-6)
  # An angle outside [-pi, pi): the cost uses the normalised angle (7 - 2 pi), the dynamics the raw one.
  e = PendulumNP(seed=0)
  e.th, e.thd = 7.0, 0.5
  obs, r, _ = e.step(1)
  assert math.isclose(r, -((7.0 - 2 * math.pi) ** 2 + 0.1 * 0.25), rel_tol=1e-12)
  np.testing.assert_allclose(obs[2], 0.5 + 15.0 * math.sin(7.0) * 0.05, rtol=1e-6)
  e = PendulumNP(seed=4)
  e.th = 5.0                                              # compared from an unnormalised angle too
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    s = jnp.asarray([e.th, e.thd, 0.0], jnp.float64)
    step = jax.jit(pendulum_step)
    for t in range(12):
      a = int(rng.integers(3))
      obs, r, done = e.step(a)
      s, obs_j, r_j, done_j = step(s, jnp.int32(a))
      assert s.dtype == jnp.float64
      np.testing.assert_allclose([e.th, e.thd], np.asarray(s[:2]), rtol=1e-12, atol=1e-12)
      assert math.isclose(r, float(r_j), rel_tol=1e-12, abs_tol=1e-12) and done == bool(done_j)
  for _ in range(200 - 12 - 1):
    assert not e.step(1)[2]
  assert e.step(1)[2]                                     # done after 200 steps


def test_pendulum_np_bad_input():
  e = PendulumNP(0)
  with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
    e.step(3)
  with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
    e.step(-1)                                            # would silently index the last torque
  with pytest.raises(TypeError, match="one integer action"):
    e.step(1.0)
  with pytest.raises(ValueError, match="seed"):
    PendulumNP(seed=-1)
  assert len(PENDULUM_TORQUES) == e.n_actions == 3


# ---- sched.dynamic: BucketedFunction, SymbolicFunction ---------------------------------------------------
def _ref_masked_cumsum(x):
  return np.cumsum(x.astype(np.float64), 0) / len(x)


def _fn(x, length):
  return jnp.cumsum(x, 0) / length


def test_bucketed_function_equals_the_plain_function_and_compiles_once_per_bucket():
  f = bucketed_jit(_fn, dims={0: 0}, buckets=(4, 8))
  assert isinstance(f, BucketedFunction) and f.buckets == (4, 8)
  rng = np.random.default_rng(0)
  for n in (1, 3, 4, 5, 8, 2, 7):
    x = rng.standard_normal(n).astype(np.float32)
    y = f(x)
    assert y.shape == (n,)
    np.testing.assert_allclose(y, _ref_masked_cumsum(x), rtol=1e-5, atol=1e-6)
  assert f.compile_count == 2 and f.calls == 7
  assert f.true_elements == 30 and f.padded_elements == 4 + 4 + 4 + 8 + 8 + 4 + 8
  with pytest.raises(ValueError, match="largest bucket|exceeds"):
    f(np.ones(9, np.float32))
  with pytest.raises(ValueError, match="buckets is empty"):
    BucketedFunction(_fn, {0: 0}, ())
  with pytest.raises(TypeError, match="fn must be callable"):
    BucketedFunction(3, {0: 0}, (4,))
  with pytest.raises(ValueError, match="unpad"):
    BucketedFunction(_fn, {0: 0}, (4,), unpad="sideways")
  with pytest.raises(TypeError, match="dims"):
    BucketedFunction(_fn, "x", (4,))


def test_symbolic_function_equals_the_plain_function_with_and_without_buckets():
  ex = np.ones(3, np.float32)
  f = export_symbolic(_fn, ex, dims={0: 0})
  g = export_symbolic(_fn, ex, dims={0: 0}, buckets=(4, 8))
  assert isinstance(f, SymbolicFunction) and g.buckets == (4, 8)
  rng = np.random.default_rng(1)
  for n in (2, 3, 5, 8, 6):
    x = rng.standard_normal(n).astype(np.float32)
    for h in (f, g):
      y = h(x)
      assert isinstance(y, np.ndarray) and y.shape == (n,)
      np.testing.assert_allclose(y, _ref_masked_cumsum(x), rtol=1e-5, atol=1e-6)
  assert f.compile_count == 5 and g.compile_count == 2 and f.calls == g.calls == 5
  with pytest.raises(ValueError, match="largest bucket"):
    g(np.ones(9, np.float32))
  with pytest.raises(ValueError, match="disagree"):
    export_symbolic(lambda x, y, length: x + y, ex, ex, dims={0: 0, 1: 0})(np.ones(3, np.float32),
                                                                            np.ones(4, np.float32))
  with pytest.raises(ValueError, match="positional argument"):
    f(ex, ex)
  with pytest.raises(TypeError, match="fn must be callable"):
    SymbolicFunction(None, (ex,), {0: 0})
  with pytest.raises(ValueError, match="names argument 1"):
    SymbolicFunction(_fn, (ex,), {1: 0})
  with pytest.raises(ValueError, match="buckets"):
    SymbolicFunction(_fn, (ex,), {0: 0}, buckets=(0, 4))
  with pytest.raises(ValueError, match="out_dims"):
    SymbolicFunction(_fn, (ex,), {0: 0}, out_dims="all")


# ---- data containers made by their producers ---------------------------------------------------------------
_HLO = """HloModule tiny

fused_add {
  a = f32[2,3]{1,0} parameter(0)
  b = f32[2,3]{1,0} parameter(1)
  ROOT s = f32[2,3]{1,0} add(a, b)
}

ENTRY main {
  p0 = f32[2,3]{1,0} parameter(0)
  c = f32[] constant(1.5)
  bc = f32[2,3]{1,0} broadcast(c), dimensions={}
  ROOT f = f32[2,3]{1,0} fusion(p0, bc), kind=kLoop, calls=fused_add
}
"""


def test_hlo_computation_and_instruction_fields_from_parse_hlo():
  mod = parse_hlo(_HLO)
  assert list(mod.computations) == ["fused_add", "main"] and mod.entry_name == "main"
  main, fused = mod.computations["main"], mod.computations["fused_add"]
  assert isinstance(main, Computation) and main.is_entry and not fused.is_entry
  assert main.name == "main" and main.lineno == 9 and fused.lineno == 3
  assert [i.name for i in main.instructions] == ["p0", "c", "bc", "f"]
  assert main.root.name == "f" and fused.root.name == "s"
  assert set(main.by_name()) == {"p0", "c", "bc", "f"} and main.by_name()["bc"] is main.instructions[2]
  p0, c, bc, f = main.instructions
  assert all(isinstance(i, Instruction) for i in main.instructions)
  assert (p0.opcode, p0.literal, p0.shape.dtype, p0.shape.dims, p0.lineno) == ("parameter", "0", "f32", (2, 3), 10)
  assert c.opcode == "constant" and c.literal == "1.5" and c.shape.dims == ()
  assert bc.operands == ["c"] and bc.attrs["dimensions"] == "{}"
  assert f.is_root and not p0.is_root and f.operands == ["p0", "bc"] and f.attrs["kind"] == "kLoop"
  assert f.called() == ["fused_add"] and bc.called() == []


def test_value_schedule_fields_from_hybrid_schedule_fallback():
  cost = sched.AnalyticalCost()
  g = sched.build_graph(*V.random_conv_net(0))
  nf = V.static_features(g).shape[1]
  # A model with an empty kind vocabulary: every operator is out of distribution, so hybrid_schedule
  # does not use the network and falls back to IOS's DP with the cost function (no training needed).
  model = V.ValueModel(None, None, {}, np.zeros(nf), np.ones(nf), 3, 8)
  hy = V.hybrid_schedule(model, g, cost)
  assert isinstance(hy, V.ValueSchedule)
  stages, tot, n = V.dp_schedule(g, cost, 3, 8)
  covered = sorted(u for st in hy.stages for grp in st.groups for u in grp)
  assert covered == list(range(len(g.units)))                     # every unit scheduled exactly once
  assert hy.fallback and not hy.confident and len(hy.ood) == len(g.units)
  assert all("unseen" in why for _, why in hy.ood)
  assert hy.stages == stages and hy.cost_s == hy.predicted_s == tot and hy.evaluated == n > 0
  assert math.isclose(V.schedule_cost(g, hy.stages, cost), tot, rel_tol=1e-12) and hy.search_s >= 0


def test_vs_quantized_tensor_fields_and_value_formula_from_vs_quantize():
  x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)   # K = 40: padded to 48
  qt = vs_quantize(jnp.asarray(x), 4, axis=0, vector_size=16, scale_bits=6)
  assert isinstance(qt, VSQuantizedTensor)
  assert (qt.bits, qt.scale_bits, qt.vector_size, qt.axis) == (4, 6, 16, 0)
  assert qt.codes.shape == x.shape and jnp.issubdtype(qt.codes.dtype, jnp.integer)
  assert qt.vector_scale.shape == (3, 1, 3) and qt.coarse_scale.shape == (1, 1, 3)
  codes, vs = np.asarray(qt.codes, np.int64), np.asarray(qt.vector_scale, np.float64)
  assert np.all(np.abs(codes) <= 7) and np.all(vs >= 0) and np.all(vs <= 63) and np.all(vs == np.round(vs))
  # The documented value of element i of vector g: codes[i] * vector_scale[g] * coarse_scale.
  scale = (vs * np.asarray(qt.coarse_scale, np.float64))[:, 0, :]                 # (vectors, channels)
  ref = codes * np.repeat(scale, 16, axis=0)[:40]
  np.testing.assert_allclose(np.asarray(vs_dequantize(qt)), ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(qt.scales())[:, 0, :], scale, rtol=1e-6)
  # Rounding error of each element is at most one step of its vector's scale.
  assert np.all(np.abs(ref - x) <= np.repeat(scale, 16, axis=0)[:40] * (1 + 1e-6))
  leaves = jax.tree_util.tree_leaves(qt)                      # static metadata is not a leaf
  assert len(leaves) == 3


def test_float_format_fields_match_ml_dtypes_finfo():
  for name, f in FORMATS.items():
    assert isinstance(f, FloatFormat) and f.name == name
    fi = ml_dtypes.finfo(f.dtype)
    assert (f.man_bits, f.emin, f.emax) == (fi.nmant, fi.minexp, fi.maxexp - 1), name
    assert f.width == 8 * jnp.dtype(f.dtype).itemsize == 1 + f.exp_bits + f.man_bits
    assert f.bias == (1 << (f.exp_bits - 1)) - 1 and f.product_bits == 2 * (fi.nmant + 1)
  assert FORMATS["fp16"].emax - FORMATS["fp16"].emin == 29 and FORMATS["fp8_e4m3"].ieee is False


def test_cartpole_np_step_refuses_actions_other_than_0_and_1():
  from mlsys_jax import profile
  e = profile.CartPoleNP(seed=0)
  s0 = e.s.copy()
  for bad in (-1, 2, 7):
    with pytest.raises(ValueError, match="0 \\(push left\\) or 1"):
      e.step(bad)
  for bad in (1.0, True, np.array([1])):
    with pytest.raises(TypeError, match="one integer action"):
      e.step(bad)
  np.testing.assert_array_equal(e.s, s0)            # a refused action leaves the state untouched
  obs, r, done = e.step(np.int64(1))                # numpy integers (e.g. from argmax) are accepted
  assert obs.shape == (4,) and r == 1.0 and not done
