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


@pytest.mark.parametrize("kind,v,shape,convert,bps", [("fp8", 128, (100, 72, 200), "cast", 1),
                                                      ("int8", 64, (200, 136, 128), "magic", 1),
                                                      pytest.param("int8", 64, (100, 64, 200), "cast", 2,
                                                                   marks=pytest.mark.slow),
                                                      pytest.param("int8", 64, (100, 64, 200), "bias", 2,
                                                                   marks=pytest.mark.slow),
                                                      pytest.param("fp8", 128, (200, 64, 128), "cast", -3,
                                                                   marks=pytest.mark.slow)])
def test_interpreter_matches_float64(kind, v, shape, convert, bps):
  m, n, k = shape   # ragged M / N / K (padded by the wrapper), several row and column tiles
  a, sa, w, sw = _operands(kind, m, n, k, v)
  cfg = mg.MgpuConfig(tile_m=64, tile_n=128, stages=2, grid_group=2, convert=convert,
                      blocks_per_step=max(bps, 1), compute_wgs=3 if bps == -3 else 2)   # bps -3: 3 warpgroups
  out = mg.scaled_matmul(a, sa, w, sw, vector_size=v, interpret=True, config=cfg)
  ref = _reference(a, sa, w, sw, v)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  # int8: exact int32 partial sums, float32 scaling (two roundings per block); fp8: float32 sums
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.parametrize("kind,v,convert,bps", [("fp8", 128, "cast", 1), ("int8", 64, "cast", 1),
                                                ("int8", 64, "magic", 1), ("int8", 128, "cast", 1),
                                                ("fp8", 128, "cast", 2), ("int8", 64, "magic", 2),
                                                ("fp8", 128, "cast", -3), ("int8", 64, "cast", -2),
                                                ("int8", 64, "bias", 2), ("int8", 128, "bias", 1)])
def test_lowers_for_cuda(kind, v, convert, bps):
  """(bps -3: one block per step, three compute warpgroups; -2: clusters of two CTAs sharing W by TMA
  multicast, which the interpreter cannot run: its numbers are checked on the GPU by the benchmark)"""
  """The Mosaic GPU program is built for CUDA on this CPU (layouts, wgmma operand types, TMA transforms)."""
  dt = jnp.float8_e4m3fn if kind == "fp8" else jnp.int8
  m = n = k = 512
  specs = (jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((k // v, m), jnp.float32),
           jax.ShapeDtypeStruct((n, k), dt), jax.ShapeDtypeStruct((k // v, n), jnp.float32))
  cfg = mg.MgpuConfig(convert=convert, blocks_per_step=max(bps, 1), compute_wgs=3 if bps == -3 else 2,
                      stages=3 if bps == -3 else 4, cluster_m=2 if bps == -2 else 1)
  m = 3 * 64 * 2 if bps == -3 else m
  specs = (jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((k // v, m), jnp.float32)) + specs[2:]
  f = jax.jit(functools.partial(mg.scaled_matmul_padded, vector_size=v, config=cfg))
  text = f.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("kind,v,shape,convert,bps,persistent,bitwise", [
    ("int8", 64, (72, 136, 128), "bias", 1, True, False),
    pytest.param("int8", 64, (72, 40, 256), "bias", 2, False, False, marks=pytest.mark.slow),
    pytest.param("fp8", 128, (100, 72, 384), "cast", 1, False, False, marks=pytest.mark.slow),
    pytest.param("fp8", 128, (200, 136, 256), "cast", 1, True, False, marks=pytest.mark.slow),
    pytest.param("int8", 64, (100, 72, 200), "bias", 1, False, True, marks=pytest.mark.slow)])
def test_overlap_interpreter_matches_float64(monkeypatch, kind, v, shape, convert, bps, persistent, bitwise):
  """overlap=True folds every block one pipeline step late (carried partial sum and scales, the last block
  after the loop); convert='bias' presets the block accumulator to 0x4B400000; persistent=True loops each CTA
  over several output tiles (here 1 or 3 CTAs for 2 or 4 tiles; the int8 one stores in two column chunks). Same numbers as the float64 reference, and
  for int8 bitwise the default 'cast' kernel's (the bias identity is exact)."""
  monkeypatch.setattr(mg, "_num_sms", lambda: 1 if shape[0] <= 128 else 3)
  m, n, k = shape
  a, sa, w, sw = _operands(kind, m, n, k, v, seed=1)
  cfg = mg.MgpuConfig(stages=2, grid_group=2, convert=convert, blocks_per_step=bps, overlap=True,
                      persistent=persistent, epi_chunks=2 if persistent and kind == "int8" else 1)
  out = mg.scaled_matmul(a, sa, w, sw, vector_size=v, interpret=True, config=cfg)
  ref = _reference(a, sa, w, sw, v)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-6
  if bitwise:   # float32 folds in the same order as the cast kernel: identical bits
    cast = mg.scaled_matmul(a, sa, w, sw, vector_size=v, interpret=True,
                            config=mg.MgpuConfig(stages=2, grid_group=2, blocks_per_step=bps))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(cast))


@pytest.mark.parametrize("kind,v,convert,bps,cm,persistent", [("fp8", 128, "cast", 1, 1, False),
                                                              ("int8", 64, "bias", 2, 1, True),
                                                              ("int8", 128, "bias", 1, 2, False),
                                                              ("fp8", 128, "cast", 1, 1, "epi2"),
                                                              ("fp8", 128, "cast", 2, 1, "epi4")])
def test_overlap_lowers_for_cuda(kind, v, convert, bps, cm, persistent):
  """The overlapped pipeline (run_state accumulators, carried scales) and the persistent tile loop are built
  for CUDA on this CPU."""
  dt = jnp.float8_e4m3fn if kind == "fp8" else jnp.int8
  m = n = k = 512
  specs = (jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((k // v, m), jnp.float32),
           jax.ShapeDtypeStruct((n, k), dt), jax.ShapeDtypeStruct((k // v, n), jnp.float32))
  # output in 2 / 4 column chunks: 32 / 16 KiB staging, room for a fifth FP8 stage / a third two-block one
  epi = {"epi2": 2, "epi4": 4}.get(persistent, 1)
  stages = {1: 4 // bps, 2: 5, 4: 3}[epi]
  cfg = mg.MgpuConfig(convert=convert, blocks_per_step=bps, stages=stages, cluster_m=cm, overlap=epi != 4,
                      persistent=persistent is True, epi_chunks=epi)
  f = jax.jit(functools.partial(mg.scaled_matmul_padded, vector_size=v, config=cfg))
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
  with pytest.raises(ValueError, match="convert"):
    mg.scaled_matmul(a, sa, w, sw, vector_size=64, config=mg.MgpuConfig(convert="round"))
  with pytest.raises(ValueError, match="overlap"):
    mg.MgpuConfig(overlap=1.5)
  with pytest.raises(ValueError, match="epi_chunks"):
    mg.MgpuConfig(epi_chunks=3)
  with pytest.raises(ValueError, match="epi_chunks=4 needs tile_n"):
    mg.MgpuConfig(epi_chunks=4, tile_n=64)
  with pytest.raises(ValueError, match="persistent=True needs cluster_m=1"):
    mg.MgpuConfig(persistent=True, cluster_m=2)
  fa, fsa, fw, fsw = _operands("fp8", 64, 64, 128, 128)
  with pytest.raises(ValueError, match="vector_size"):
    mg.scaled_matmul(fa, fsa, fw, fsw, vector_size=64)


def test_public_dispatch(monkeypatch):
  """backend=None picks the Mosaic kernel where it is available and self-tested, and applies the coarse scales
  as the Triton kernel does (here both in their interpreters); backend errors name the fix."""
  from mlsys_jax.quant import _pallas_gemm as pg
  a, sa, w, sw = _operands("int8", 130, 72, 200, 64, seed=3)
  ca = jax.random.uniform(jax.random.PRNGKey(8), (130,), minval=0.5, maxval=2.0)
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
  because it ran inside the trace), and it must reject a kernel that computes something else."""
  orig = mg.scaled_matmul
  monkeypatch.setattr(mg, "available", lambda: True)
  monkeypatch.setattr(mg, "scaled_matmul",
                      lambda *a, **kw: orig(*a, **kw, interpret=True, config=mg.MgpuConfig(stages=2)))
  seen = []

  @jax.jit
  def traced(x):
    seen.append(mg.kernel_self_test.__wrapped__("int8", 64))
    return x + 1
  traced(jnp.ones(2))
  assert seen == [True]
  monkeypatch.setattr(mg, "scaled_matmul", lambda *a, **kw: orig(*a, **kw, interpret=True,
                                                                  config=mg.MgpuConfig(stages=2)) * 1.001)
  with pytest.warns(UserWarning, match="disagrees"):
    assert not mg.kernel_self_test.__wrapped__("int8", 64)
  assert not mg.kernel_self_test.__wrapped__("int8", 32)     # V the kernel does not run


def test_default_config():
  assert mg.default_config("int8", 64).blocks_per_step == 2
  assert mg.default_config("fp8", 128) == mg.MgpuConfig(stages=2, blocks_per_step=2)
