"""Tests of the per-vector scaled int8 GEMM kernel (mlsys_jax.quant._pallas_gemm).

On CPU the kernel runs in Pallas's interpreter; the integer partial sums are compared exactly against
XLA / numpy, the float32 output against a float64 reference and the XLA integer path of
``quantized_dot_general`` to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax import quant
from mlsys_jax.quant import _pallas_gemm as pg
from mlsys_jax.quant import layers

from _triton import cuda_target, triton_ir  # tests/_triton.py


def _codes(rng, shape):
  return jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)


def _reference(a, sa, w, sw, v, ca=1.0, cw=1.0):
  """float64 numpy: sum_g sa[m, g] sw[g, n] P_g[m, n], times the coarse scales; and P (G, M, N)."""
  m, k = a.shape
  g = sa.shape[1]
  A = np.pad(np.asarray(a, np.float64), ((0, 0), (0, g * v - k))).reshape(m, g, v)
  W = np.pad(np.asarray(w, np.float64), ((0, g * v - k), (0, 0))).reshape(g, v, -1)
  P = np.einsum("mgv,gvn->gmn", A, W)
  out = np.einsum("gmn,mg,gn->mn", P, np.asarray(sa, np.float64), np.asarray(sw, np.float64))
  coarse = np.reshape(np.asarray(ca, np.float64), (-1, 1)) * np.reshape(np.asarray(cw, np.float64), (1, -1))
  return out * coarse, P


# (M, K, N, V, layout, convert, prefetch, vectors_per_step): ragged M/N/K (padded to blocks and whole
# vectors), every supported V, both weight layouts, every conversion, V=16 through the masked K=32 product.
CASES = [(37, 200, 24, 16, "kn", "magic_fma", 1, 1), (16, 96, 40, 32, "nk", "magic", 2, 2),
         (50, 130, 33, 64, "kn", "cast", 0, 1), (20, 256, 16, 128, "nk", "magic_fma", 2, 1)]


@pytest.mark.parametrize("m,k,n,v,layout,convert,prefetch,per_step", CASES)
def test_partial_sums_exact(m, k, n, v, layout, convert, prefetch, per_step):
  del convert, prefetch, per_step
  rng = np.random.default_rng(v)
  a, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  g = -(-k // v)
  _, P = _reference(a, np.ones((m, g)), w, np.ones((g, n)), v)
  ps = pg.vs_int8_partial_sums(a, w, vector_size=v, w_layout=layout)
  assert ps.dtype == jnp.int32 and ps.shape == (g, m, n)
  np.testing.assert_array_equal(np.asarray(ps), P.astype(np.int64))
  # ... and against XLA's int8 x int8 -> int32 batched product of the split codes.
  from mlsys_jax.quant.vsquant import _split
  xla = jax.lax.dot_general(_split(a, 1, v, True)[0], _split(w, 0, v, True)[0],
                            (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)
  np.testing.assert_array_equal(np.asarray(ps), np.asarray(xla))


@pytest.mark.parametrize("m,k,n,v,layout,convert,prefetch,per_step", CASES)
def test_gemm_matches_float64_reference(m, k, n, v, layout, convert, prefetch, per_step):
  rng = np.random.default_rng(100 + v)
  a, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  g = -(-k // v)
  sa = jnp.asarray(rng.integers(1, 256, (m, g)), jnp.float32)     # two-level: 8-bit integer scales
  sw = jnp.asarray(rng.integers(1, 256, (g, n)), jnp.float32)
  ca, cw = jnp.float32(0.0123), jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
  ref, _ = _reference(a, sa, w, sw, v, ca, cw)
  out = pg.vs_int8_matmul(a, sa, w, sw, vector_size=v, a_coarse=ca, w_coarse=cw, integer_scales=True,
                          convert=convert, prefetch=prefetch, vectors_per_step=per_step,
                          overlap=per_step == 1 and v != 64,
                          w_layout=layout, block_n=16)      # several column tiles (grouped order)
  assert out.dtype == jnp.float32 and out.shape == (m, n)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def test_float_vector_scales_and_jit():
  """Single-level (float) vector scales, default conversion, under jit."""
  rng = np.random.default_rng(7)
  a, w = _codes(rng, (24, 192)), _codes(rng, (192, 20))
  sa = jnp.asarray(rng.uniform(1e-3, 1e-1, (24, 3)), jnp.float32)
  sw = jnp.asarray(rng.uniform(1e-3, 1e-1, (3, 20)), jnp.float32)
  ref, _ = _reference(a, sa, w, sw, 64)
  out = jax.jit(functools.partial(pg.vs_int8_matmul, vector_size=64))(a, sa, w, sw)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def test_nan_coarse_scale_propagates():
  rng = np.random.default_rng(8)
  a, w = _codes(rng, (16, 64)), _codes(rng, (64, 16))
  cw = jnp.ones((16,)).at[3].set(jnp.nan)
  out = pg.vs_int8_matmul(a, jnp.ones((16, 1)), w, jnp.ones((1, 16)), vector_size=64, w_coarse=cw)
  assert bool(jnp.all(jnp.isnan(out[:, 3]))) and bool(jnp.all(jnp.isfinite(jnp.delete(out, 3, axis=1))))


def test_bad_input_messages():
  a, w = jnp.zeros((16, 64), jnp.int8), jnp.zeros((64, 16), jnp.int8)
  s1, s2 = jnp.ones((16, 1)), jnp.ones((1, 16))
  with pytest.raises(ValueError, match="vector_size must be one of"):
    pg.vs_int8_matmul(a, jnp.ones((16, 8)), w, jnp.ones((8, 16)), vector_size=8)
  with pytest.raises(ValueError, match="K=64.*K=32"):
    pg.vs_int8_matmul(a, s1, w[:32], s2, vector_size=64)
  with pytest.raises(ValueError, match=r"a_scale must have shape \(M, ceil\(K / V\)\) = \(16, 1\)"):
    pg.vs_int8_matmul(a, jnp.ones((16, 2)), w, s2, vector_size=64)
  with pytest.raises(ValueError, match=r"w_scale must have shape"):
    pg.vs_int8_matmul(a, s1, w, jnp.ones((2, 16)), vector_size=64)
  with pytest.raises(TypeError, match="int8 codes"):
    pg.vs_int8_matmul(a.astype(jnp.int32), s1, w, s2, vector_size=64)
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    pg.vs_int8_matmul(a, s1, w, s2, vector_size=64, block_m=48)
  with pytest.raises(ValueError, match="magic_fma"):
    pg.vs_int8_matmul(a, s1, w, s2, vector_size=64, convert="magic_fma")
  with pytest.raises(ValueError, match="min_dot_k"):
    pg.vs_int8_matmul(a, s1, w, s2, vector_size=64, min_dot_k=16)


def _cfg(v, scale_bits):
  spec = quant.QuantSpec(8, "vector", v, scale_bits=scale_bits)
  return quant.QuantConfig(spec, spec, integer=True)


@pytest.mark.parametrize("scale_bits", [8, None])
def test_integer_path_dispatch_matches_xla_path(monkeypatch, scale_bits):
  """quantized_dot_general(integer=True) through the kernel (as on the GPU; interpreter here) equals
  the XLA integer path to rounding, for a 3-D activation and a ragged K; gradients are unchanged."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 150))
  w = jax.random.normal(jax.random.PRNGKey(1), (150, 16))
  dn = (((2,), (0,)), ((), ()))
  cfg = _cfg(64, scale_bits)
  f = jax.jit(lambda p, q: quant.quantized_dot_general(cfg)(p, q, dn))
  ref = f(x, w)
  calls = []
  monkeypatch.setattr(layers, "_use_pallas_kernel", lambda v: calls.append(v) or True)
  g = jax.jit(lambda p, q: quant.quantized_dot_general(cfg)(p, q, dn))
  out = g(x, w)
  assert calls == [64]
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5,
                             atol=1e-6 * float(jnp.abs(ref).max()))


@pytest.mark.slow
def test_integer_path_kernel_gradient_is_emulation_gradient(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 150))
  w = jax.random.normal(jax.random.PRNGKey(1), (150, 16))
  dn = (((2,), (0,)), ((), ()))
  cfg = _cfg(64, 8)
  monkeypatch.setattr(layers, "_use_pallas_kernel", lambda v: True)
  loss = lambda q: jnp.sum(quant.quantized_dot_general(cfg)(x, q, dn) ** 2)
  gk = jax.jit(jax.grad(loss))(w)
  monkeypatch.setattr(layers, "_use_pallas_kernel", lambda v: False)
  gx = jax.jit(jax.grad(loss))(w)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gx), rtol=1e-4, atol=1e-4 * float(jnp.abs(gx).max()))


def test_off_gpu_uses_xla_path():
  """On a non-GPU backend the dispatcher keeps the XLA integer path (identical results by construction);
  V outside the kernel's set never goes to the kernel."""
  assert not pg.on_gpu()
  assert not layers._use_pallas_kernel(64)
  assert not any(layers._use_pallas_kernel(v) for v in (8, 24, 256))


@pytest.mark.parametrize("v", [64, 128])
def test_w4a8_packed_equals_int8_kernel(v):
  """int4 weights packed two per byte and unpacked in the kernel give the same int32 partial sums, hence
  bit-identical outputs, as the int8 kernel on the unpacked codes; and match the float64 reference."""
  rng = np.random.default_rng(v)
  a = _codes(rng, (20, 150))
  w = jnp.asarray(rng.integers(-8, 8, (150, 24)), jnp.int8)
  g = -(-150 // v)
  sa = jnp.asarray(rng.integers(1, 256, (20, g)), jnp.float32)
  sw = jnp.asarray(rng.integers(1, 256, (g, 24)), jnp.float32)
  packed = pg.pack_int4_vectors(w, v)
  assert packed.shape == (g * v // 2, 24) and packed.dtype == jnp.int8
  o4 = pg.vs_w4a8_matmul(a, sa, packed, sw, vector_size=v, integer_scales=True, prefetch=1)
  o8 = pg.vs_int8_matmul(a, sa, w, sw, vector_size=v, integer_scales=True)
  np.testing.assert_array_equal(np.asarray(o4), np.asarray(o8))
  ref, _ = _reference(a, sa, w, sw, v)
  np.testing.assert_allclose(np.asarray(o4, np.float64), ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


def test_pack_int4_roundtrip_and_errors():
  w = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (100, 3)), jnp.int8)
  b = np.asarray(pg.pack_int4_vectors(w, 64)).astype(np.int64)
  lo, hi = ((b & 15) ^ 8) - 8, (((b >> 4) & 15) ^ 8) - 8       # sign-extend nibbles (numpy reference)
  un = np.concatenate([lo.reshape(2, 32, 3), hi.reshape(2, 32, 3)], axis=1).reshape(128, 3)
  np.testing.assert_array_equal(un[:100], np.asarray(w))
  assert not un[100:].any()
  with pytest.raises(ValueError, match="W4A8 needs vector_size 64 or 128"):
    pg.vs_w4a8_matmul(jnp.zeros((16, 64), jnp.int8), jnp.ones((16, 2)), jnp.zeros((32, 16), jnp.int8),
                      jnp.ones((2, 16)), vector_size=32)
  with pytest.raises(ValueError, match="packed by pack_int4_vectors: 32 rows"):
    pg.vs_w4a8_matmul(jnp.zeros((16, 64), jnp.int8), jnp.ones((16, 1)), jnp.zeros((64, 16), jnp.int8),
                      jnp.ones((1, 16)), vector_size=64)


def test_fp8_per_block_matches_dequantized_product():
  x = jax.random.normal(jax.random.PRNGKey(2), (16, 200))
  w = jax.random.normal(jax.random.PRNGKey(3), (200, 16))
  (ca, sa), (cw, sw) = pg.fp8_vector_quantize(x, 1, 128), pg.fp8_vector_quantize(w, 0, 128)
  assert ca.dtype == jnp.float8_e4m3fn and sa.shape == (16, 2) and sw.shape == (2, 16)
  y = pg.vs_fp8_matmul(ca, sa, cw, sw, w_layout="nk")
  deq_a = np.asarray(ca, np.float64) * np.repeat(np.asarray(sa, np.float64), 128, axis=1)[:, :200]
  deq_w = np.asarray(cw, np.float64) * np.repeat(np.asarray(sw, np.float64), 128, axis=0)[:200]
  ref = deq_a @ deq_w
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.linalg.norm(ref - exact) < 0.05 * np.linalg.norm(exact)        # E4M3 rounding: ~3%
  with pytest.raises(TypeError, match="float8_e4m3fn codes"):
    pg.vs_fp8_matmul(x, sa, cw, sw)


def test_fp8_weight_blocks_equal_the_dequantized_block_product(monkeypatch):
  """``w_block=128`` (DeepGEMM's 128 x 128 weight scale blocks from ``fp8_block_quantize``) is the sum with
  ``w_scale[g, n // 128]``: against float64 on the CPU path, and handed to the Mosaic kernel compact (not
  repeated per column) where that kernel runs; shapes and kinds are checked."""
  x = jax.random.normal(jax.random.PRNGKey(4), (16, 200))
  w = jax.random.normal(jax.random.PRNGKey(5), (200, 144)) * jnp.linspace(0.1, 3.0, 144)
  (ca, sa), (cw, sw) = pg.fp8_vector_quantize(x, 1, 128), pg.fp8_block_quantize(w, 128)
  assert sw.shape == (2, 2) and cw.dtype == jnp.float8_e4m3fn
  y = pg.vs_fp8_matmul(ca, sa, cw, sw, w_block=128)
  deq_a = np.asarray(ca, np.float64) * np.repeat(np.asarray(sa, np.float64), 128, axis=1)[:, :200]
  blocks = np.repeat(np.repeat(np.asarray(sw, np.float64), 128, axis=0), 128, axis=1)[:200, :144]
  ref = deq_a @ (np.asarray(cw, np.float64) * blocks)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.linalg.norm(ref - exact) < 0.05 * np.linalg.norm(exact)
  seen = {}
  def fake_mosaic(a, sa_, wc, ws, *, vector_size, w_block=None):
    seen.update(shape=ws.shape, w_block=w_block)
    return jnp.zeros((a.shape[0], wc.shape[1]), jnp.float32)
  monkeypatch.setattr(pg._mgpu_gemm, "available", lambda: True)
  monkeypatch.setattr(pg._mgpu_gemm, "scaled_matmul", fake_mosaic)
  pg.vs_fp8_matmul(ca, sa, cw, sw, w_block=128, backend="mosaic")
  assert seen == {"shape": (2, 2), "w_block": 128}
  with pytest.raises(ValueError, match=r"\(G, ceil\(N / w_block\)\) = \(G, 2\)"):
    pg.vs_fp8_matmul(ca, sa, cw, jnp.ones((2, 144)), w_block=128)
  with pytest.raises(ValueError, match="FP8 format"):
    pg._vs_gemm(jnp.ones((16, 128), jnp.int8), jnp.ones((16, 2)), jnp.ones((128, 16), jnp.int8),
                jnp.ones((2, 1)), vector_size=64, kind="int8", w_block=128)


@pytest.mark.parametrize("kind,v,opts", [
    ("int8", 64, dict(w_layout="nk", prefetch=1, overlap=True)),
    ("int8", 16, dict(w_layout="kn", prefetch=0, vectors_per_step=2, convert="cast")),
    ("w4a8", 64, dict(prefetch=1)),
    ("fp8", 128, dict(w_layout="nk")),
])
def test_lowers_to_triton_ir(kind, v, opts):
  """The GPU (Triton) lowering runs here without a GPU: catches Pallas-Triton lowering errors (seen: a
  jnp remainder and an alignment hint on a constant offset) before a device run."""
  dt = jnp.float8_e4m3fn if kind == "fp8" else jnp.int8
  fn = {"int8": pg.vs_int8_matmul, "w4a8": pg.vs_w4a8_matmul, "fp8": pg.vs_fp8_matmul}[kind]
  m = k = n = 256
  g = k // v
  f = jax.jit(functools.partial(fn, vector_size=v, interpret=False, integer_scales=kind != "fp8",
                                **opts))
  with cuda_target():
    lowered = f.trace(jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((m, g), jnp.float32),
                      jax.ShapeDtypeStruct((k // 2 if kind == "w4a8" else k, n), dt),
                      jax.ShapeDtypeStruct((g, n), jnp.float32)).lower(lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text().lower()


def test_self_test_passes_and_catches_a_wrong_kernel(monkeypatch):
  """The once-per-process self-test that gates the layer path: passes for the real kernel (interpreter
  here), returns False with a warning for a kernel that computes the wrong thing."""
  pg.kernel_self_test.cache_clear()
  try:
    assert pg.kernel_self_test(32)
    real = pg.vs_int8_matmul
    monkeypatch.setattr(pg, "vs_int8_matmul", lambda *a, **k: real(*a, **k) * 1.001)
    pg.kernel_self_test.cache_clear()
    with pytest.warns(RuntimeWarning, match="failed its self-test"):
      assert not pg.kernel_self_test(32)
  finally:
    pg.kernel_self_test.cache_clear()


@pytest.mark.parametrize("ia", [0, 128])
def test_fp8_imprecise_acc_sets_the_dot_attribute(ia, monkeypatch):
  """``imprecise_acc`` puts ``maxNumImpreciseAcc`` on the FP8 kernel's tensor-core product (without it
  Triton keeps ``mma.sync`` on Hopper; with it, ``wgmma``: checked offline with Triton 3.9 for sm_90a)."""
  m = k = n = 256
  text = triton_ir(functools.partial(pg.vs_fp8_matmul, vector_size=128, interpret=False, imprecise_acc=ia),
                   jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((m, 2), jnp.float32),
                   jax.ShapeDtypeStruct((k, n), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((2, n), jnp.float32),
                   monkeypatch=monkeypatch)
  dots = [line for line in text.splitlines() if "tt.dot" in line]
  assert dots and all((f"maxNumImpreciseAcc = {ia} : i32" in d) == bool(ia) for d in dots)


def test_fp8_imprecise_acc_interpreter_and_errors():
  """Same numbers in the interpreter (the attribute only exists in Triton); refused for integer codes."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  (ca, sa), (cw, sw) = pg.fp8_vector_quantize(x, 1, 128), pg.fp8_vector_quantize(w, 0, 128)
  np.testing.assert_array_equal(np.asarray(pg.vs_fp8_matmul(ca, sa, cw, sw, imprecise_acc=128)),
                                np.asarray(pg.vs_fp8_matmul(ca, sa, cw, sw)))
  a8 = jnp.ones((16, 64), jnp.int8)
  with pytest.raises(ValueError, match="FP8 products only"):
    pg.vs_int8_matmul(a8, jnp.ones((16, 1)), jnp.ones((64, 16), jnp.int8), jnp.ones((1, 16)), vector_size=64,
                      imprecise_acc=128)
