"""Tests of weight-only int4 quantization (mlsys_jax.quant.weight_only) and its Pallas GEMV kernel.

Packing is checked against a numpy quantizer and a hand-built bit layout; the matmul (XLA path and the
kernel in Pallas's interpreter) against ``x @ dequantize(W)`` in numpy float64.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mlsys_jax.quant import _pallas_gemv as pg
from mlsys_jax.quant import weight_only as wo

from _triton import triton_ir  # tests/_triton.py


def _np_quantize(w, gs, scale_dtype):
  """float64 numpy reference of pack_int4's codes (K, N) and scales (G, N). The scale is amax / 7 to
  within one float32 rounding (XLA may divide by 7 as a multiply by 1/7), then rounded to bf16."""
  k, n = w.shape
  wg = np.asarray(w, np.float64).reshape(k // gs, gs, n)
  amax = np.abs(wg).max(axis=1)
  s = (amax / 7).astype(np.float32)
  if scale_dtype == jnp.bfloat16:
    s = s.astype(ml_dtypes.bfloat16).astype(np.float32)
  s = np.where(amax == 0, 1.0, s).astype(np.float64)
  codes = np.clip(np.round(wg / s[:, None, :]), -7, 7)
  return codes.reshape(k, n), s


def _assert_scales(got, want, scale_dtype):
  ulp = 2.0 ** (-7 if scale_dtype == jnp.bfloat16 else -23)
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), ulp * np.abs(want) * 1.01)


def _packed_np(p):
  return np.asarray(wo._unpack_codes(p.words), np.float64), np.asarray(p.scales, np.float64)


def _np_matmul(x, codes, s, gs):
  w = codes * np.repeat(s, gs, axis=0)
  return np.asarray(x, np.float64) @ w, np.abs(np.asarray(x, np.float64)) @ np.abs(w)


@pytest.mark.parametrize("gs,scale_dtype", [(16, jnp.float32), (128, jnp.bfloat16), (None, jnp.float32)])
def test_pack_matches_numpy(gs, scale_dtype):
  w = jax.random.normal(jax.random.PRNGKey(0), (256, 40))
  p = wo.pack_int4(w, gs, scale_dtype=scale_dtype)
  g = 256 if gs is None else gs
  codes, s = _np_quantize(w, g, scale_dtype)
  assert p.words.dtype == jnp.uint32 and p.words.shape == (32, 40) and p.scales.dtype == scale_dtype
  assert (p.k, p.n, p.group_size) == (256, 40, g)
  _assert_scales(p.scales, s, scale_dtype)
  s = np.asarray(p.scales, np.float64)          # the codes are round(w / s) for the stored scales
  codes = np.clip(np.round(np.asarray(w, np.float64).reshape(-1, g, 40) / s[:, None]), -7, 7).reshape(256, 40)
  np.testing.assert_array_equal(np.asarray(wo._unpack_codes(p.words)), codes)
  np.testing.assert_array_equal(np.asarray(wo.dequantize_int4(p), np.float64),
                                (codes * np.repeat(s, g, axis=0)).astype(np.float32))
  # Quantization error at most half a step per element (no clipping: s = amax / 7).
  err = np.abs(np.asarray(wo.dequantize_int4(p), np.float64) - np.asarray(w, np.float64))
  assert np.all(err <= np.repeat(s, g, axis=0) / 2 * (1 + 2 ** -7) + 1e-7)
  assert p.nbytes() == 32 * 40 * 4 + (256 // g) * 40 * jnp.dtype(scale_dtype).itemsize


def test_bit_layout_and_axis():
  # codes c[k] = (k % 15) - 7 for one column; element k = 128 t + 16 i + j sits in nibble i of row 16 t + j.
  k = np.arange(256)
  c = (k % 15) - 7
  p = wo.pack_int4(jnp.asarray(c, jnp.float32)[:, None], None, scale_dtype=jnp.float32)
  assert float(p.scales[0, 0]) == 1.0
  words = np.asarray(p.words)[:, 0].astype(np.int64)
  for kk in (0, 1, 17, 127, 128, 200, 255):
    t, r = divmod(kk, 128)
    i, j = divmod(r, 16)
    assert (words[16 * t + j] >> (4 * i)) & 15 == c[kk] + 8
  # axis=1 takes (N, K) weights (the torch layout) and packs their transpose.
  w = jax.random.normal(jax.random.PRNGKey(1), (24, 128))
  a, b = wo.pack_int4(w, 32, axis=1), wo.pack_int4(w.T, 32)
  assert np.array_equal(np.asarray(a.words), np.asarray(b.words))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_xla_matmul_vs_float64(dtype):
  w = jax.random.normal(jax.random.PRNGKey(2), (384, 72))
  p = wo.pack_int4(w, 64)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 384)).astype(dtype)
  y = wo.w4a16_matmul(x, p)                    # CPU: 'auto' is the XLA path
  assert y.shape == (2, 3, 72) and y.dtype == jnp.float32
  codes, s = _packed_np(p)        # the packing itself is checked against numpy above
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)).reshape(6, 384), codes, s, 64)
  np.testing.assert_array_less(np.abs(np.asarray(y).reshape(6, 72) - ref), 384 * 2 ** -24 * mag + 1e-30)
  yb = wo.w4a16_matmul(x, p, out_dtype=jnp.bfloat16)
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(yb), np.asarray(y.astype(jnp.bfloat16)))


# (variant, batch, group size, block_n, blocks_per_step, split_k): ragged N (40 over blocks of 16/32),
# groups smaller than, equal to and larger than a loop step, per-column scales, split K, batch padding.
# The interpreter compiles each configuration anew (seconds each): two cases by default, the rest slow.
KERNEL_CASES = [("fma", 2, 16, 32, 1, 2, True), ("dot", 5, 32, 32, 2, 1, False),
                pytest.param("fmad", 2, 64, 16, 1, 2, False, marks=pytest.mark.slow),
                pytest.param("dotb", 3, 64, 16, 1, 2, True, marks=pytest.mark.slow),
                pytest.param("fma", 3, 16, 32, 2, 1, False, marks=pytest.mark.slow),
                pytest.param("fma_shift", 1, 128, 16, 1, 1, True, marks=pytest.mark.slow),
                pytest.param("fma", 2, 64, 16, 1, 2, False, marks=pytest.mark.slow),
                pytest.param("dot_shift", 1, None, 16, 2, 1, True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant,b,gs,bn,bps,sk,pf", KERNEL_CASES)
def test_kernel_interpret_vs_float64(variant, b, gs, bn, bps, sk, pf):
  w = jax.random.normal(jax.random.PRNGKey(4), (256, 40))
  p = wo.pack_int4(w, gs)
  x = jax.random.normal(jax.random.PRNGKey(5), (b, 256)).astype(jnp.bfloat16)
  y = wo.w4a16_matmul(x, p, impl="pallas", variant=variant, block_n=bn, blocks_per_step=bps, split_k=sk,
                      prefetch=pf)
  assert y.shape == (b, 40) and y.dtype == jnp.float32
  codes, s = _packed_np(p)
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)), codes, s, 256 if gs is None else gs)
  np.testing.assert_array_less(np.abs(np.asarray(y) - ref), 256 * 2 ** -24 * mag + 1e-30)
  xla = wo.w4a16_matmul(x, p, impl="xla")
  assert float(jnp.linalg.norm(y - xla) / jnp.linalg.norm(xla)) < 1e-6


@pytest.mark.parametrize("variant,b", [("fmad2", 3), pytest.param("fma", 1, marks=pytest.mark.slow),
                                       pytest.param("fmad4", 2, marks=pytest.mark.slow),
                                       pytest.param("dot", 2, marks=pytest.mark.slow)])
def test_kernel_atomic_split_k(variant, b):
  # split_k partial outputs added by atomics into one zero-initialized float32 output (one launch);
  # 'fmad2'/'fmad4' cut each 64-column block into sub-tiles of 32/16 (N = 72: one ragged block).
  w = jax.random.normal(jax.random.PRNGKey(14), (512, 72))
  p = wo.pack_int4(w, 64)
  x = jax.random.normal(jax.random.PRNGKey(15), (b, 512)).astype(jnp.bfloat16)
  y = wo.w4a16_matmul(x, p, impl="pallas", variant=variant, block_n=64, split_k=4, atomic=True,
                      blocks_per_step=1, out_dtype=jnp.bfloat16)   # (4 K blocks: one per split)
  assert y.shape == (b, 72) and y.dtype == jnp.bfloat16
  ref = wo.w4a16_matmul(x, p, impl="xla")
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32),
                             rtol=2 ** -7, atol=1e-6)


def test_fmad_denormal_identity_and_scaled_activations():
  # The 'fmad' unpacking on the GPU: a nibble masked in place at bit pos (< 24) read as a float32 is the
  # denormal (or smallest-exponent) value u 2^(pos - 149) exactly (numpy keeps denormals; XLA on the CPU
  # flushes them, so the interpreter forms the same products without them).
  words = np.arange(16, dtype=np.uint32) * 0x11111111
  for pos in range(0, 24, 4):
    f = (words & np.uint32(15 << pos)).view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(f, np.arange(16) * 2.0 ** (pos - 149))
  # The kernel's power-of-two scaling of the activations is exact from tiny to huge magnitudes.
  w = jax.random.normal(jax.random.PRNGKey(16), (256, 16))
  p = wo.pack_int4(w, 128)
  codes, s = _packed_np(p)
  for mag, peel in ((1e-20, False), (1.0, True), (3e30, True)):     # peel: step 0 off the loop (2 steps)
    x = (mag * jax.random.normal(jax.random.PRNGKey(17), (1, 256))).astype(jnp.bfloat16)
    y = wo.w4a16_matmul(x, p, impl="pallas", variant="fmad", block_n=16, blocks_per_step=1, split_k=1,
                        peel=peel)
    ref, bound = _np_matmul(np.asarray(x.astype(jnp.float32), np.float64), codes, s, 128)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 256 * 2 ** -24 * bound + 1e-300)


def test_kernel_jit_vmap_float32_and_nan():
  w = jax.random.normal(jax.random.PRNGKey(6), (128, 32))
  x = jax.random.normal(jax.random.PRNGKey(7), (3, 1, 128))           # float32 activations
  f = jax.jit(lambda x, w: jax.vmap(lambda xi: wo.w4a16_matmul(
      xi, wo.pack_int4(w, 32), impl="pallas", block_n=16))(x))
  y = f(x, w)
  assert y.shape == (3, 1, 32)
  p = wo.pack_int4(w, 32)
  ref = wo.w4a16_matmul(x, p, impl="xla")
  assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 1e-6
  # vmap over stacked packed weights on the XLA path (one packed matrix per expert).
  ws = jax.random.normal(jax.random.PRNGKey(8), (3, 128, 32))
  ps = jax.vmap(lambda w: wo.pack_int4(w, 64))(ws)
  ye = jax.jit(jax.vmap(lambda p, x: wo.w4a16_matmul(x, p)))(ps, x[:3, 0])
  for e in range(3):
    pe = wo.Int4Weights(ps.words[e], ps.scales[e])
    np.testing.assert_array_equal(np.asarray(ye[e]), np.asarray(wo.w4a16_matmul(x[e, 0], pe)))
  # Under jit a NaN weight cannot raise: its group's scale is NaN and the outputs it touches are NaN.
  wn = w.at[5, 3].set(jnp.nan)
  yn = f(x, wn)
  assert bool(jnp.all(jnp.isnan(yn[..., 3]))) and bool(jnp.all(jnp.isfinite(yn[..., :3])))
  pn = jax.jit(wo.pack_int4, static_argnums=1)(wn, 32)
  assert bool(jnp.all(jnp.isnan(wo.w4a16_matmul(x[0], pn)[:, 3])))


def test_errors():
  w = jnp.ones((256, 8))
  with pytest.raises(ValueError, match="multiple of 128"):
    wo.pack_int4(jnp.ones((100, 8)))
  with pytest.raises(ValueError, match="power of two"):
    wo.pack_int4(w, 48)
  with pytest.raises(ValueError, match="not a multiple of group_size"):
    wo.pack_int4(jnp.ones((384, 8)), 256)
  with pytest.raises(TypeError, match="group_size"):
    wo.pack_int4(w, 64.0)
  with pytest.raises(ValueError, match="NaN"):
    wo.pack_int4(w.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="rank 2"):
    wo.pack_int4(jnp.ones((256,)))
  with pytest.raises(TypeError, match="floating"):
    wo.pack_int4(jnp.ones((256, 8), jnp.int32))
  p = wo.pack_int4(w)
  with pytest.raises(ValueError, match="K=256"):
    wo.w4a16_matmul(jnp.ones((1, 255)), p)
  with pytest.raises(TypeError, match="floating"):
    wo.w4a16_matmul(jnp.ones((1, 256), jnp.int32), p)
  with pytest.raises(TypeError, match="Int4Weights"):
    wo.w4a16_matmul(jnp.ones((1, 256)), (p.words, p.scales))
  with pytest.raises(ValueError, match="does not match"):
    wo.w4a16_matmul(jnp.ones((1, 256)), wo.Int4Weights(p.words, p.scales[:, :4]))
  with pytest.raises(ValueError, match="impl='pallas'"):
    wo.w4a16_matmul(jnp.ones((1, 256)), p, block_n=32)
  with pytest.raises(ValueError, match="must divide"):
    wo.w4a16_matmul(jnp.ones((1, 256)), p, impl="pallas", blocks_per_step=4)
  with pytest.raises(ValueError, match="power of two"):
    wo.w4a16_matmul(jnp.ones((1, 256)), p, impl="pallas", block_n=48)
  with pytest.raises(ValueError, match="split_k"):
    wo.w4a16_matmul(jnp.ones((1, 256)), wo.pack_int4(w, None), impl="pallas", split_k=2)
  with pytest.raises(ValueError, match="block_n >= 64"):
    wo.w4a16_matmul(jnp.ones((1, 256)), p, impl="pallas", variant="fmad4", block_n=32)


def test_kernel_every_nibble_vs_float64():
  # Random words hold every nibble 0..15 (code -8 too, which pack_int4 never writes) in all eight planes:
  # the CUDA-core kernel unpacks planes 0-4 from w and 5-7 from w >> 12, each with its own power of two.
  words = jax.random.bits(jax.random.PRNGKey(11), (32, 16), jnp.uint32)
  scales = (0.5 + jax.random.uniform(jax.random.PRNGKey(12), (4, 16))).astype(jnp.bfloat16)
  p = wo.Int4Weights(words, scales)
  x = jax.random.normal(jax.random.PRNGKey(13), (1, 256)).astype(jnp.bfloat16)
  codes, s = _packed_np(p)
  assert codes.min() == -8 and codes.max() == 7
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)), codes, s, 64)
  y = wo.w4a16_matmul(x, p, impl="pallas", variant="fma", block_n=16, blocks_per_step=2, split_k=1)
  np.testing.assert_array_less(np.abs(np.asarray(y) - ref), 256 * 2 ** -24 * mag + 1e-30)


def test_self_test_and_default_config():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert wo.kernel_self_test()
  assert pg.default_config(1, 8192, 8192, 64)["variant"] == "fmad2"    # CUDA cores at batch 1-2,
  assert pg.default_config(2, 8192, 8192, 64)["variant"] == "fma"
  assert pg.default_config(16, 8192, 8192, 64)["variant"] == "dot"     # tensor cores above
  cfg = pg.default_config(1, 8192, 8192, 64)
  assert (8192 // pg.BLOCK_K) % (cfg["split_k"] * cfg["blocks_per_step"]) == 0 and 64 % cfg["split_k"] == 0
  # Batch 1: one step per program (split_k * blocks_per_step = K's blocks), step 0 peeled, relaxed adds;
  # a K too long for one step loops without the peel; narrow N falls back to 'fmad'.
  assert cfg["split_k"] * cfg["blocks_per_step"] == 64 and cfg["peel"] and cfg["relaxed"] and cfg["atomic"]
  cfg = pg.default_config(1, 28672, 8192, 224)
  assert cfg["split_k"] == 32 and cfg["blocks_per_step"] == 1 and not cfg["peel"]
  assert pg.default_config(1, 1024, 16, 8)["variant"] == "fmad"
  cfg = pg.default_config(16, 384, 20, 3)           # 3 blocks: nothing but 1 divides them
  assert cfg["blocks_per_step"] == 1 and cfg["split_k"] == 1 and cfg["block_n"] <= 32
  assert cfg["variant"].startswith("dot")
  assert pg.default_config(1, 8192, 64, 1)["split_k"] == 1       # one scale per column: no split
  # The defaults run for per-column scales (the split must divide the groups).
  p = wo.pack_int4(jnp.ones((256, 16)), None)
  want = 256 * 7 * float(p.scales[0, 0])                          # every code 7, s = bf16(1 / 7)
  np.testing.assert_allclose(np.asarray(wo.w4a16_matmul(jnp.ones((1, 256)), p, impl="pallas")), want,
                             rtol=1e-6)


@pytest.mark.parametrize("ls", [0, 3])
def test_loop_stages_sets_the_loop_attribute(ls, monkeypatch):
  """``loop_stages=n`` puts ``tt.num_stages = n`` on the kernel's K loop (what lets Triton pipeline the
  weight loads through cp.async; checked offline with Triton 3.9 for sm_90a), and nothing without it."""
  k, n = 1024, 256
  text = triton_ir(
      lambda x, w, s: pg.int4_gemv(x, w, s, variant="fmad2", block_n=64, blocks_per_step=1, split_k=2,
                                   atomic=True, loop_stages=ls, interpret=False),
      jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((k // 8, n), jnp.uint32),
      jax.ShapeDtypeStruct((k // 128, n), jnp.bfloat16), monkeypatch=monkeypatch)
  assert text.count("scf.for") == 1
  assert text.count(f"tt.num_stages = {ls} : i32") == (1 if ls else 0)
  assert "tt.num_stages" in text if ls else "tt.num_stages" not in text


def test_loop_stages_same_result_and_errors():
  """In the interpreter the attribute does not exist: the same numbers, also with the activations
  loaded one step ahead (prefetch=2, the same sums in the same order), within the float64 bound of
  the packed product; bad values are refused."""
  p = wo.pack_int4(jax.random.normal(jax.random.PRNGKey(0), (512, 64)), 128)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 512)).astype(jnp.bfloat16)
  kw = dict(variant="fmad2", block_n=32, blocks_per_step=1, split_k=2, atomic=True)
  a = pg.int4_gemv(x, p.words, p.scales, loop_stages=3, prefetch=2, **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(pg.int4_gemv(x, p.words, p.scales, **kw)))
  codes, s = _packed_np(p)
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)), codes, s, 128)
  np.testing.assert_array_less(np.abs(np.asarray(a) - ref), 512 * 2 ** -24 * mag + 1e-30)
  with pytest.raises(ValueError, match="prefetch"):
    pg.int4_gemv(x, p.words, p.scales, prefetch=3, **kw)
  with pytest.raises(ValueError, match="loop_stages=1"):
    pg.int4_gemv(x, p.words, p.scales, loop_stages=1, **kw)
  with pytest.raises(ValueError, match="loop_stages"):
    pg.int4_gemv(x, p.words, p.scales, loop_stages=9, **kw)


@pytest.mark.parametrize("rx", [False, True])
def test_relaxed_atomics_set_the_semantic(rx, monkeypatch):
  """``relaxed=True`` turns the split-K atomic adds from Pallas's acquire-release into relaxed ones
  (``REDG`` instead of ``MEMBAR`` + ``ATOMG`` + ``CCTL.IVALL`` in the sm_90a SASS, checked offline with
  Triton 3.9); without it, or without atomics, nothing changes."""
  k, n = 1024, 256
  shapes = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((k // 8, n), jnp.uint32),
            jax.ShapeDtypeStruct((k // 128, n), jnp.bfloat16))
  text = triton_ir(
      lambda x, w, s: pg.int4_gemv(x, w, s, variant="fmad2", block_n=64, blocks_per_step=2, split_k=4,
                                   atomic=True, peel=True, relaxed=rx, interpret=False),
      *shapes, monkeypatch=monkeypatch)
  adds = [ln for ln in text.splitlines() if "tt.atomic_rmw" in ln]
  assert len(adds) == 2                                        # one per 32-column sub-tile
  assert all(("relaxed" in ln) == rx and ("acq_rel" in ln) == (not rx) for ln in adds)
  # No atomics without atomic=True: relaxed has nothing to change (and no tag on the kernel name).
  text = triton_ir(
      lambda x, w, s: pg.int4_gemv(x, w, s, variant="fmad2", block_n=64, blocks_per_step=2, split_k=4,
                                   atomic=False, relaxed=rx, interpret=False),
      *shapes, monkeypatch=monkeypatch)
  assert "tt.atomic_rmw" not in text and "_rx" not in text


def test_evict_first_weight_loads(monkeypatch):
  """``evict=True`` loads every weight block with the L2 evict_first policy (the 4 sub-tile loads of a
  2-block step of 'fmad2', and nothing else: no activations, no scales) and gives the same numbers as without it
  (interpreter, where the policy is dropped)."""
  k, n = 256, 64
  shapes = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((k // 8, n), jnp.uint32),
            jax.ShapeDtypeStruct((k // 128, n), jnp.bfloat16))
  kw = dict(variant="fmad2", block_n=64, blocks_per_step=2, split_k=1, num_warps=2)
  for ev in (False, True):
    text = triton_ir(lambda x, w, s: pg.int4_gemv(x, w, s, evict=ev, interpret=False, **kw), *shapes,
                     monkeypatch=monkeypatch)
    weights = [ln for ln in text.splitlines() if "tt.load" in ln and "x!tt.ptr<i32>>" in ln]
    assert len(weights) >= 4 and all(("evict_first" in ln) == ev for ln in weights)
    assert text.count("evict_first") == (len(weights) if ev else 0)
  p = wo.pack_int4(jax.random.normal(jax.random.PRNGKey(22), (k, n)), 128)
  x = jax.random.normal(jax.random.PRNGKey(23), (1, k)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(pg.int4_gemv(x, p.words, p.scales, evict=True, **kw)),
                                np.asarray(pg.int4_gemv(x, p.words, p.scales, **kw)))


def test_fmadr_row_scaling_vs_float64():
  """'fmadr2' (the activation scaling per plane row from the one step's planes, no block-wide reduction)
  within the float64 bound of the packed product, batch 2 with plane rows whose magnitudes span 2^-20 ..
  2^25 (each row its own exponent; the interpreter forms the kernel's scaled products with them), ragged
  N, atomic split K; multi-step programs are refused."""
  k, n = 512, 40
  p = wo.pack_int4(jax.random.normal(jax.random.PRNGKey(24), (k, n)), 128)
  x = (jax.random.normal(jax.random.PRNGKey(25), (2, k)) * jnp.exp2(jnp.arange(k) % 16 * 3.0 - 20)
       * jnp.asarray([[1.0], [2.0 ** -30]])).astype(jnp.bfloat16)
  kw = dict(block_n=64, split_k=2, num_warps=2, atomic=True, relaxed=True)
  a = pg.int4_gemv(x, p.words, p.scales, variant="fmadr2", blocks_per_step=2, **kw)
  codes, s = _packed_np(p)
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)), codes, s, 128)
  np.testing.assert_array_less(np.abs(np.asarray(a) - ref), 512 * 2 ** -24 * mag + 1e-30)
  with pytest.raises(ValueError, match="split_k \\* blocks_per_step must equal"):
    pg.int4_gemv(x, p.words, p.scales, variant="fmadr2", blocks_per_step=1, **kw)


def test_one_step_programs_relaxed_vs_float64():
  """Programs covering their whole K range in one step (``split_k * blocks_per_step`` = K's blocks), step
  0 peeled ahead of the activation-range prologue, relaxed atomic adds (the interpreter has no memory
  ordering: the flag only renames the kernel), within the float64 bound of the packed product; ragged N."""
  p = wo.pack_int4(jax.random.normal(jax.random.PRNGKey(20), (256, 40)), 64)
  x = jax.random.normal(jax.random.PRNGKey(21), (1, 256)).astype(jnp.bfloat16)
  a = pg.int4_gemv(x, p.words, p.scales, variant="fmad2", block_n=64, blocks_per_step=1, split_k=2, num_warps=1,
                   atomic=True, peel=True, relaxed=True)
  codes, s = _packed_np(p)
  ref, mag = _np_matmul(np.asarray(x.astype(jnp.float32)), codes, s, 64)
  np.testing.assert_array_less(np.abs(np.asarray(a) - ref), 256 * 2 ** -24 * mag + 1e-30)
