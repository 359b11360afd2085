"""mlsys_jax.sched._pallas_block: an Inception block as level kernels (Pallas interpreter on the CPU) against
``lax.conv_general_dilated`` in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.sched import _pallas_block as pb
from _triton import cuda_target  # tests/_triton.py


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_inception_a_matches_lax_conv():
  # cin 16, width 0.25: channels 16/12/24/4 -> 'tap' steps (16) and the 'flat' fallback (12, 24, 4);
  # 4x5 = 20 pixels: a partial pixel tile; 24 channels with bn 16: a partial channel tile
  p = pb.init_inception_a(0, cin=16, pool_features=16, width=0.25)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 5, 16), np.float32))
  ops, cat = pb.inception_a_ops(p)
  blk = pb.build_block(ops, cat, pb.BlockConfig(bm=16, bn=16, bk=16))
  assert [len(lv.tasks) for lv in blk.levels] == [4, 3, 1]          # merged 1x1s; 5x5, 3x3, pool; 3x3
  assert {t.flat for lv in blk.levels for t in lv.tasks} == {True, False}
  y = pb.apply_block(blk, x, interpret=True)
  ref = pb.inception_a_xla(p, x)
  assert y.shape == ref.shape == (1, 4, 5, 60)
  assert np.isfinite(np.asarray(y)).all()                            # every element written
  assert _rel(y, ref) < 1e-5
  # a wrong kernel would fail: the same check against a perturbed reference
  assert _rel(y, pb.inception_a_xla({**p, "b3_3": (p["b3_3"][0] * 1.01, p["b3_3"][1])}, x)) > 1e-4


def test_split_k_asymmetric_kernels_and_batch():
  # 1x1 -> 1x3 -> 3x1 (the Inception-C pattern) next to a concatenated 1x1, two images, below level 1 a
  # 'flat' K walk with bk 32 over cin 16 (several taps a step) and split-K in chunks of 1 step: the 1x3 adds its partial sums
  # atomically into a float32 accumulator that level 1 zeroed, the 3x1 applies its bias/ReLU on load and is
  # split too, so a fourth level runs its epilogue ('final') into the output
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((1, 1, 16, 16)).astype(np.float32)
  w1 = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
  w2 = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)
  b0, b1, b2 = (rng.standard_normal(16).astype(np.float32) for _ in range(3))
  ops = [pb.ConvOp("p", "x", w0, b0, (0, 0)), pb.ConvOp("a", "p", w1, b1, (0, 1), relu=True, scale=0.5),
         pb.ConvOp("c", "a", w2, b2, (1, 0)), pb.ConvOp("q", "x", w0, None, (0, 0), relu=False)]
  cfgs = (pb.BlockConfig(bm=16, bn=16, bk=16), pb.BlockConfig(bm=16, bn=16, bk=32, k_mode="flat", split_steps=1))
  blk = pb.build_block(ops, ["q", "c"], cfgs)          # per-level configurations: the second one repeats
  assert [lv.config for lv in blk.levels] == [cfgs[0]] + [cfgs[1]] * 3
  kinds = [sorted({(t.kind, t.atomic, t.src_acc) for t in lv.tasks}) for lv in blk.levels]
  assert kinds == [[("conv", False, False), ("zero", False, False)],
                   [("conv", True, False), ("zero", False, False)],
                   [("conv", True, True)], [("final", False, False)]]
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 16), np.float32))
  y = pb.apply_block(blk, x, interpret=True)
  conv = lambda v, w, pad: jax.lax.conv_general_dilated(v, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO",
                                                                                               "NHWC"))
  t = jnp.maximum(conv(x, w0, [(0, 0), (0, 0)]) + b0, 0)
  t = jnp.maximum(0.5 * conv(t, w1, [(0, 0), (1, 1)]) + b1, 0)
  ref = jnp.concatenate([conv(x, w0, [(0, 0), (0, 0)]), jnp.maximum(conv(t, w2, [(1, 1), (0, 0)]) + b2, 0)], -1)
  assert _rel(y, ref) < 1e-5


def test_bad_inputs():
  w = np.ones((3, 3, 16, 16), np.float32)
  with pytest.raises(ValueError, match="padding"):
    pb.build_block([pb.ConvOp("a", "x", w, None, (0, 0))], ["a"])
  with pytest.raises(ValueError, match="neither"):
    pb.build_block([pb.ConvOp("a", "y", w, None, (1, 1))], ["a"])
  with pytest.raises(ValueError, match="power of two"):
    pb.build_block([pb.ConvOp("a", "x", w, None, (1, 1))], ["a"], pb.BlockConfig(bm=24))
  with pytest.raises(ValueError, match="input channels"):
    pb.build_block([pb.ConvOp("a", "x", w, None, (1, 1)),
                    pb.ConvOp("b", "a", np.ones((1, 1, 8, 16), np.float32), None, (0, 0))], ["b"])
  with pytest.raises(ValueError, match="concatenated and read"):
    pb.build_block([pb.ConvOp("a", "x", w, None, (1, 1)), pb.ConvOp("b", "a", w, None, (1, 1))], ["a", "b"])
  blk = pb.build_block([pb.ConvOp("a", "x", w, None, (1, 1))], ["a"])
  with pytest.raises(ValueError, match="16 channels"):
    pb.apply_block(blk, jnp.ones((1, 4, 4, 8)))


def test_block_flops():
  p = pb.init_inception_a(0)
  # Mixed_5b: 1x1s 192 -> 64+48+64+32, 5x5 48->64, 3x3 64->96, 3x3 96->96 at 35x35
  macs = 35 * 35 * (192 * 208 + 25 * 48 * 64 + 9 * 64 * 96 + 9 * 96 * 96)
  assert pb.block_flops(p, 35, 35) == 2 * macs


def test_lowers_to_triton_for_cuda():
  # the GPU path (interpret=False) through Pallas's Triton lowering, here without a GPU: one kernel per
  # level, tl.dot in TF32 for float32 operands (as XLA's convolutions by default)
  from jax._src.pallas.triton import lowering as tl
  seen, hooked = [], tl.lower_jaxpr_to_triton_module

  def capture(*a, **k):
    r = hooked(*a, **k)
    seen.append(r.module.operation.get_asm(enable_debug_info=False))
    return r

  p = pb.init_inception_a(0, cin=32, pool_features=32, width=0.5)
  try:
    tl.lower_jaxpr_to_triton_module = capture
    for dt, want in ((jnp.float32, "inputPrecision = tf32"),):
      ops, cat = pb.inception_a_ops({k: (w.astype(dt), b.astype(dt)) for k, (w, b) in p.items()})
      blk = pb.build_block(ops, cat, pb.BlockConfig(bm=32, bn=32, bk=32), dtype=dt)
      n0 = len(seen)
      with cuda_target():
        jax.jit(lambda v: pb.apply_block(blk, v, interpret=False)).trace(
            jax.ShapeDtypeStruct((1, 7, 7, 32), dt)).lower(lowering_platforms=("cuda",))
      irs = seen[n0:]
      assert [ir.count("tt.dot") for ir in irs] == [4, 3, 1]
      assert all(want in ir for ir in irs)
      # split-K: float32 atomic adds in level 2 (the 5x5 and the first 3x3) and 3, a fourth level
      blk = pb.build_block(ops, cat, pb.BlockConfig(bm=32, bn=32, bk=32, split_steps=4), dtype=dt)
      n0 = len(seen)
      with cuda_target():
        jax.jit(lambda v: pb.apply_block(blk, v, interpret=False)).trace(
            jax.ShapeDtypeStruct((1, 7, 7, 32), dt)).lower(lowering_platforms=("cuda",))
      assert len(seen) - n0 == 4 and all("tt.atomic_rmw fadd" in ir for ir in seen[n0 + 1:n0 + 3])
  finally:
    tl.lower_jaxpr_to_triton_module = hooked
