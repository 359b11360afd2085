"""The Mosaic GPU per-block scaled GEMM (mlsys_jax/quant/_mgpu_gemm.py) on the CPU: Pallas's Mosaic GPU
interpreter against a float64 reference (pipeline, scales, tile order, padding), lowering for CUDA (the
kernel's Mosaic GPU program is built here without a GPU), and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import _mgpu_gemm as mg


def _operands(kind, m, n, k, v, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  if kind == "fp8":
    a = jax.random.normal(ks[0], (m, k)).astype(jnp.float8_e4m3fn)
    w = jax.random.normal(ks[1], (k, n)).astype(jnp.float8_e4m3fn)
  else:
    a = jax.random.randint(ks[0], (m, k), -127, 128).astype(jnp.int8)
    w = jax.random.randint(ks[1], (k, n), -127, 128).astype(jnp.int8)
  g = -(-k // v)
  sa = jax.random.uniform(ks[2], (m, g), minval=0.5, maxval=2.0)
  sw = jax.random.uniform(ks[3], (g, n), minval=0.5, maxval=2.0)
  return a, sa, w, sw


def _reference(a, sa, w, sw, v):
  """float64: sum over K blocks of (A_g * sa_g) @ (W_g * sw_g); zero-padded K blocks add nothing."""
  af = np.asarray(a.astype(jnp.float32), np.float64)
  wf = np.asarray(w.astype(jnp.float32), np.float64)
  k = af.shape[1]
  out = 0.0
  for g in range(-(-k // v)):
    sl = slice(g * v, min((g + 1) * v, k))
    out = out + (af[:, sl] * np.asarray(sa, np.float64)[:, g:g + 1]) @ (
        wf[sl] * np.asarray(sw, np.float64)[g:g + 1])
  return out


# (kind, V, (M, N, K), blocks per step, persistent CTAs or 0, extra): ragged M / N / K (padded by the wrapper),
# several row and column tiles; persistent: that many CTAs loop over the tiles. extra: "w3" three compute
# warpgroups, "wb" one weight scale per 128-column block (w_block=128).
# (one block per step is also checked against float64 by test_public_dispatch, int8 V=64)
_INTERP_CASES = [("fp8", 128, (100, 136, 200), 2, 1, ""),       # the default configuration: one CTA, two tiles
                 ("fp8", 128, (72, 200, 200), 2, 0, "wb"),
                 pytest.param("int8", 64, (70, 40, 152), 1, 0, "", marks=pytest.mark.slow),
                 pytest.param("int8", 64, (200, 136, 256), 2, 3, "", marks=pytest.mark.slow),
                 pytest.param("int8", 128, (100, 64, 200), 2, 0, "", marks=pytest.mark.slow),
                 pytest.param("fp8", 128, (200, 64, 128), 1, 0, "w3", marks=pytest.mark.slow),
                 pytest.param("int8", 64, (72, 260, 128), 1, 1, "wb", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind,v,shape,bps,persistent,extra", _INTERP_CASES)
def test_interpreter_matches_float64(monkeypatch, kind, v, shape, bps, persistent, extra):
  monkeypatch.setattr(mg, "_num_sms", lambda: max(persistent, 1))
  m, n, k = shape
  a, sa, w, sw = _operands(kind, m, n, k, v)
  cfg = mg.MgpuConfig(tile_m=64, tile_n=128, stages=2, grid_group=2, blocks_per_step=bps,
                      compute_wgs=3 if extra == "w3" else 2, persistent=persistent > 0)
  w_block = None
  if extra == "wb":   # weight scales per V x 128 block; the reference sees them repeated over the columns
    w_block, sw = 128, sw[:, ::128]
  out = mg.scaled_matmul(a, sa, w, sw, vector_size=v, interpret=True, config=cfg, w_block=w_block)
  ref = _reference(a, sa, w, sw if w_block is None else np.repeat(np.asarray(sw), 128, axis=1)[:, :n], v)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  # int8: exact int32 partial sums, float32 scaling (two roundings per block); fp8: float32 sums
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-6


def test_fp8_block_quantize():
  """One scale per 128 x 128 tile (partial tiles at the edges); codes * scale within E4M3's rounding (2^-4
  relative) of the weight; the largest magnitude of each tile maps to 448."""
  w = jax.random.normal(jax.random.PRNGKey(4), (200, 300)) * jnp.linspace(0.1, 10.0, 300)
  codes, s = mg.fp8_block_quantize(w)
  assert codes.shape == (200, 300) and codes.dtype == jnp.float8_e4m3fn and s.shape == (2, 3)
  wn, sn = np.asarray(w, np.float64), np.asarray(s, np.float64)
  for i in range(2):
    for j in range(3):
      tile = wn[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
      np.testing.assert_allclose(sn[i, j], np.abs(tile).max() / 448, rtol=1e-6)
  deq = np.asarray(codes.astype(jnp.float32), np.float64) * np.repeat(np.repeat(sn, 128, 0), 128, 1)[:200, :300]
  np.testing.assert_allclose(deq, wn, rtol=2.0 ** -4, atol=sn.max() * 2.0 ** -9)
  assert float(mg.fp8_block_quantize(jnp.zeros((4, 4)))[1][0, 0]) == 1.0
  with pytest.raises(ValueError, match="2-D"):
    mg.fp8_block_quantize(jnp.ones(4))


@pytest.mark.slow
def test_unscaled_diagnostic_interpreter():
  """promote=False (the benchmark's diagnostic: one accumulator through all K blocks, no scales) is the plain
  product of the codes."""
  a, sa, w, _ = _operands("int8", 128, 128, 256, 64, seed=2)
  out = mg.scaled_matmul_padded(a, sa.T, w.T, jnp.ones((4, 128)), vector_size=64, promote=False, interpret=True,
                                config=mg.MgpuConfig(stages=2, blocks_per_step=2))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(a, np.float64) @ np.asarray(w, np.float64))


# (kind, V, config overrides, scaled_matmul_padded keywords): every configuration the benchmark runs
_LOWER_CASES = [("fp8", 128, {}, {}),
                ("int8", 64, {}, {}),
                ("int8", 128, {}, {}),
                ("fp8", 128, dict(stages=2, blocks_per_step=2), {}),
                ("int8", 64, dict(stages=2, blocks_per_step=2, persistent=True), {}),
                ("fp8", 128, dict(stages=2, blocks_per_step=2, persistent=True), dict(w_tile_scales=True)),
                ("fp8", 128, dict(stages=2, blocks_per_step=2, persistent=True), dict(promote=False)),
                ("int8", 64, dict(stages=2, blocks_per_step=2, persistent=True), dict(promote=False)),
                ("fp8", 128, dict(stages=2, blocks_per_step=2, persistent=True, cluster_m=2), {}),
                ("int8", 64, dict(cluster_m=2), {}),
                ("fp8", 128, dict(stages=3, compute_wgs=3), {})]


@pytest.mark.parametrize("kind,v,overrides,kw", _LOWER_CASES)
def test_lowers_for_cuda(kind, v, overrides, kw):
  """The Mosaic GPU program is built for CUDA on this CPU (layouts, wgmma operand types, TMA transforms,
  cluster multicast, which the interpreter cannot run: its numbers are checked on the GPU by the benchmark)."""
  dt = jnp.float8_e4m3fn if kind == "fp8" else jnp.int8
  cfg = mg.MgpuConfig(**overrides)
  m, n, k = max(512, 2 * cfg.compute_wgs * cfg.tile_m * cfg.cluster_m), 512, 512
  specs = (jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((k // v, m), jnp.float32),
           jax.ShapeDtypeStruct((n, k), dt), jax.ShapeDtypeStruct((k // v, n), jnp.float32))
  f = jax.jit(functools.partial(mg.scaled_matmul_padded, vector_size=v, config=cfg, **kw))
  assert "mosaic_gpu" in f.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def test_bad_input():
  a, sa, w, sw = _operands("int8", 64, 64, 128, 64)
  with pytest.raises(ValueError, match="vector_size"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=32)
  with pytest.raises(ValueError, match="both be int8"):
    mg.scaled_matmul(a.astype(jnp.float32), sa, w, sw, vector_size=64)
  with pytest.raises(ValueError, match="scales must be"):
    mg.scaled_matmul(a, sa[:, :1], w, sw, vector_size=64)
  with pytest.raises(ValueError, match="contracting sizes"):
    mg.scaled_matmul(a, sa, w[:64], sw, vector_size=64)
  with pytest.raises(ValueError, match="w_layout"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, w_layout="mk")
  with pytest.raises(ValueError, match="tile_m"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, config=mg.MgpuConfig(tile_m=32))
  with pytest.raises(ValueError, match="cluster_m"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, config=mg.MgpuConfig(cluster_m=4))
  with pytest.raises(ValueError, match="compute_wgs"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, config=mg.MgpuConfig(compute_wgs=4))
  with pytest.raises(ValueError, match="blocks_per_step"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, config=mg.MgpuConfig(blocks_per_step=3))
  with pytest.raises(ValueError, match="persistent"):
    mg.MgpuConfig(persistent=1.5)
  with pytest.raises(ValueError, match="stages"):
    mg.MgpuConfig(stages=0)
  with pytest.raises(ValueError, match="w_block must be"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, w_block=64)
  with pytest.raises(ValueError, match=r"ceil\(N/w_block\)"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, w_block=128)
  fa, fsa, fw, fsw = _operands("fp8", 64, 64, 128, 128)
  with pytest.raises(ValueError, match="vector_size"):
    mg.scaled_matmul(fa, fsa, fw, fsw, vector_size=64)


def test_public_dispatch(monkeypatch):
  """backend=None picks the Mosaic kernel where it is available and self-tested, and applies the coarse scales
  as the Triton kernel does (here both in their interpreters); backend errors name the fix."""
  from mlsys_jax.quant import _pallas_gemm as pg
  a, sa, w, sw = _operands("int8", 100, 72, 200, 64, seed=3)
  ca = jax.random.uniform(jax.random.PRNGKey(8), (100,), minval=0.5, maxval=2.0)
  cw = jax.random.uniform(jax.random.PRNGKey(9), (72,), minval=0.5, maxval=2.0)
  triton = pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, a_coarse=ca, w_coarse=cw, backend="triton")
  calls = []
  orig = mg.scaled_matmul

  def interpreted(*args, **kw):
    calls.append(kw["vector_size"])
    return orig(*args, **kw, interpret=True, config=mg.MgpuConfig(stages=2))
  monkeypatch.setattr(mg, "available", lambda: True)
  monkeypatch.setattr(mg, "kernel_self_test", lambda kind, v: True)
  monkeypatch.setattr(mg, "scaled_matmul", interpreted)
  mosaic = pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, a_coarse=ca, w_coarse=cw)
  assert calls == [64]
  ref = _reference(a, sa, w, sw, 64) * np.asarray(ca)[:, None] * np.asarray(cw)[None, :]
  for out in (triton, mosaic):
    assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-6
  pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, block_m=32)   # a Triton knob keeps Triton
  assert calls == [64]
  with pytest.raises(ValueError, match="backend='mosaic' runs"):
    pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, backend="mosaic", num_warps=4)
  with pytest.raises(ValueError, match="backend"):
    pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, backend="cuda")
  monkeypatch.setattr(mg, "available", lambda: False)
  with pytest.raises(ValueError, match="Hopper"):
    pg.vs_int8_matmul(a, sa, w, sw, vector_size=64, backend="mosaic")


def test_self_test_runs_outside_traces(monkeypatch):
  """The once-per-process self-test may first be reached while a user's function is being traced (a jitted
  layer): it must still compile and compare on concrete arrays (session 10's first GPU run cached False
  because it ran inside the trace), cache its answer, and reject a kernel that computes something else. The
  kernel (default configuration) runs in the interpreter on a smaller ragged problem than on the GPU (M, N, K =
  70, 40, 64 + 24: padded in all three)."""
  orig = mg.scaled_matmul
  calls = []

  def interpreted(*a, **kw):
    calls.append(kw["vector_size"])
    return orig(*a, **kw, interpret=True)
  monkeypatch.setattr(mg, "available", lambda: True)
  monkeypatch.setattr(mg, "_SELF_TEST_SHAPE", {"m": 70, "n": 40, "blocks": 1, "extra": 24})
  monkeypatch.setattr(mg, "scaled_matmul", interpreted)
  seen = []

  @jax.jit
  def traced(x):
    seen.append(mg.kernel_self_test("int8", 64))
    return x + 1
  mg.kernel_self_test.cache_clear()
  try:
    traced(jnp.ones(2))
    assert seen == [True] and calls == [64]
    assert mg.kernel_self_test("int8", 64) and calls == [64]    # cached: the kernel does not run again
  finally:
    mg.kernel_self_test.cache_clear()   # (the True above holds only under this test's patches)

  def xla(a, sa, w, sw, *, vector_size, scale=1.0, **kw):   # the per-vector product by XLA, times `scale`
    g = sa.shape[1]
    a3 = jnp.pad(a, ((0, 0), (0, g * vector_size - a.shape[1]))).reshape(a.shape[0], g, vector_size)
    w3 = jnp.pad(w, ((0, g * vector_size - w.shape[0]), (0, 0))).reshape(g, vector_size, w.shape[1])
    return scale * jnp.einsum("mgv,gvn,mg,gn->mn", a3.astype(jnp.float32), w3.astype(jnp.float32), sa, sw,
                              precision=jax.lax.Precision.HIGHEST)
  for kind, v, scale in (("int8", 64, 1.001), ("fp8", 128, 1.01)):   # (tolerances 1e-6 and 2e-3)
    monkeypatch.setattr(mg, "scaled_matmul", functools.partial(xla, scale=scale))
    with pytest.warns(UserWarning, match="disagrees"):
      assert not mg.kernel_self_test.__wrapped__(kind, v)
  monkeypatch.setattr(mg, "scaled_matmul", xla)
  assert mg.kernel_self_test.__wrapped__("fp8", 128)              # (the check itself passes a right answer)
  assert not mg.kernel_self_test.__wrapped__("int8", 32)     # V the kernel does not run


def test_default_config():
  assert mg.default_config("int8", 64).blocks_per_step == 2
  assert mg.default_config("fp8", 128) == mg.MgpuConfig(stages=2, blocks_per_step=2, persistent=True)
