"""One-pass row quantize kernels (mlsys_jax/quant/_pallas_quantize.py) against the XLA path, bit for bit.

On CPU the kernels run in Pallas' interpreter (``impl='interpret'``); the public functions use them on
GPU only. Shapes are ragged on purpose (rows not a multiple of the rows per program, row length not a
power of two nor a multiple of the vector size) and small block sizes give several programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.quant import _pallas_quantize as pq
from mlsys_jax.quant import dequantize, quantize, vs_dequantize, vs_fake_quant, vs_quantize
from mlsys_jax.quant import fixed_point as fp
from mlsys_jax.quant import vsquant as vs
from _triton import cuda_target  # tests/_triton.py

BLOCK = 256      # elements per program: 4 rows of 40 (padded to 64) per program, 2 programs for 6 rows


def _data(shape=(6, 40), dtype=jnp.float32, seed=0, nonfinite=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  x *= np.exp(rng.uniform(-4, 4, shape[:-1] + (1,))).astype(np.float32)     # rows of mixed ranges
  x[..., 1, :] = 0.0                                                          # an all-zero row
  x[..., 2, 7] = np.float32(np.round(x[..., 2, 7]))                           # exact halves after scaling
  if nonfinite:
    x[..., 3, 5] = np.nan
    x[..., 4, 0] = np.inf
    x[..., 5, 9] = -np.inf
  return jnp.asarray(x).astype(dtype)


def _xla(f, x):
  """The XLA path compiled as a whole (what the kernels reproduce; see test_reference_is_the_compiled_xla_path)."""
  return jax.jit(f)(x)


def _assert_same(a, b, skip_zp_rows=()):
  """Every leaf identical bit for bit (NaN == NaN), dtypes and shapes included; the zero points of
  ``skip_zp_rows`` (rows holding a NaN, asymmetric codes: the documented exception) are not compared."""
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for i, (p, q) in enumerate(zip(la, lb)):
    p, q = np.asarray(p), np.asarray(q)
    assert p.shape == q.shape and p.dtype == q.dtype, (i, p.shape, q.shape, p.dtype, q.dtype)
    if p.dtype.kind == "f":
      ok = (p.view(np.uint32) == q.view(np.uint32)) | (np.isnan(p) & np.isnan(q))
    else:
      ok = p == q
    if i == 2 and len(skip_zp_rows):
      ok[list(skip_zp_rows)] = True
    assert ok.all(), (i, np.argwhere(~ok)[:4].tolist(), p[~ok][:4], q[~ok][:4])


@pytest.mark.parametrize("symmetric,unsigned", [(True, False), (False, False), (False, True), (True, True)])
def test_quantize_rows_identical_to_xla_with_nonfinite_under_jit(symmetric, unsigned):
  """Codes, scales and zero points bit for bit, NaN/+inf/-inf rows included (under jit: the scale carries
  the NaN; the codes of such a row are 0 in both paths)."""
  x = _data(nonfinite=True)
  kw = dict(symmetric=symmetric, unsigned=unsigned, axis=1)
  got = jax.jit(lambda a: fp._quantize_rows(a, 8, symmetric, unsigned, (1,), "interpret", block_elems=BLOCK,
                                            loop=2 if symmetric else None))(x)   # loop: 2 blocks/program
  ref = jax.jit(lambda a: quantize(a, 8, **kw, impl="xla"))(x)
  # An asymmetric row holding a NaN: the XLA path's zero point depends on its backend's min/max NaN
  # handling (documented exception); the scale is NaN in both.
  _assert_same(got, ref, skip_zp_rows=() if symmetric else (3,))   # +-inf rows (4, 5) compared
  assert np.isnan(np.asarray(got.scale)[3:6]).all() and (np.asarray(got.codes)[3:6] == 0).all()
  assert not np.isnan(np.asarray(got.scale)[[0, 1, 2]]).any()


def test_quantize_rows_bf16_and_bits_and_public_impl():
  """bfloat16 input, 4- and 12-bit codes (int16), the public ``impl='interpret'`` entry, and a property:
  finite rows dequantize within half a step."""
  x = _data(dtype=jnp.bfloat16)
  for bits in (4, 12):
    got = jax.jit(lambda a: quantize(a, bits, axis=-1, impl="interpret"))(x)
    ref = jax.jit(lambda a: quantize(a, bits, axis=-1, impl="xla"))(x)
    _assert_same(got, ref)
  err = np.abs(np.asarray(dequantize(got)) - np.asarray(x, np.float32))
  assert (err <= np.asarray(got.scale) / 2 * (1 + 1e-6)).all()


def test_quantize_trailing_axes_of_3d_and_vmap():
  """Scale groups over the two trailing axes of a 3-D array (rows of 2 x 20), and ``vmap`` over a
  leading axis (each mapped row quantized on its own), identical to the XLA path."""
  x = _data((2, 6, 20))
  got = jax.jit(lambda a: quantize(a, 8, axis=(1, 2), impl="interpret"))(x)
  _assert_same(got, _xla(lambda a: quantize(a, 8, axis=(1, 2), impl="xla"), x))
  assert got.scale.shape == (2, 1, 1)
  y = _data((2, 6, 40))
  f = lambda impl: jax.vmap(lambda a: quantize(a, 8, axis=-1, impl=impl))(y)
  _assert_same(jax.jit(lambda: f("interpret"))(), jax.jit(lambda: f("xla"))())


@pytest.mark.parametrize("v,scale_bits", [(16, 8), (32, 6), (64, 8), (128, 8), (16, None)])
def test_vs_quantize_rows_identical_to_xla(v, scale_bits):
  """Vectors along the last axis, two-level scales with a per-row coarse scale (or float vector scales):
  codes, integer vector scales and coarse scales bit for bit. Row length 200: not a multiple of V (the
  last vector is zero-padded as in the XLA path), not a power of two; NaN/+-inf rows included."""
  x = _data((6, 200), nonfinite=True)
  kw = dict(axis=1, vector_size=v, scale_bits=scale_bits, coarse_axes=())
  got = jax.jit(lambda a: vs._vs_quantize_rows(a, 4, v, scale_bits, "interpret", block_elems=BLOCK * 4,
                                               loop=2 if v == 16 else None))(x)
  ref = jax.jit(lambda a: vs_quantize(a, 4, **kw, impl="xla"))(x)
  _assert_same(got, ref)
  assert (got.bits, got.scale_bits, got.vector_size, got.axis) == (4, scale_bits, v, 1)
  fin = [0, 1, 2]                        # finite rows: dequantized within half a vector step
  err = np.abs(np.asarray(vs_dequantize(got))[fin] - np.asarray(x)[fin])
  step = np.repeat(np.asarray(got.scales())[fin, :, 0], v, axis=1)[:, :200]
  assert (err <= step / 2 * (1 + 1e-6)).all()


def test_vs_quantize_public_impl_bf16_3d_and_vmap():
  """The public entry with ``impl='interpret'`` on a 3-D bfloat16 input (leading axes become rows), the
  default coarse axes of a 1-D input (one row), and vmap."""
  x = _data((2, 6, 40), dtype=jnp.bfloat16)
  kw = dict(axis=-1, vector_size=16, scale_bits=8, coarse_axes=())
  _assert_same(jax.jit(lambda a: vs_quantize(a, 4, **kw, impl="interpret"))(x),
               _xla(lambda a: vs_quantize(a, 4, **kw, impl="xla"), x))
  x1 = _data((6, 40))[0]
  _assert_same(jax.jit(lambda a: vs_quantize(a, 4, axis=0, vector_size=32, impl="interpret"))(x1),
               _xla(lambda a: vs_quantize(a, 4, axis=0, vector_size=32, impl="xla"), x1))
  y = _data((6, 40))
  f = lambda impl: jax.vmap(lambda a: vs_quantize(a, 4, axis=0, vector_size=16, scale_bits=8, impl=impl))(y)
  _assert_same(jax.jit(lambda: f("interpret"))(), jax.jit(lambda: f("xla"))())


def test_reference_is_the_compiled_xla_path():
  """Why the references above are jitted: XLA folds ``a / constant`` into ``a * (1 / constant)`` when it
  compiles the whole function, and the kernels reproduce that; run op by op (eager), the XLA path divides
  instead, which can move a two-level coarse scale by one ulp (this input). The kernel matches the
  jitted path (test_vs_quantize_public_impl_bf16_3d_and_vmap, same input)."""
  x1 = _data((6, 40))[0]
  eager = vs_quantize(x1, 4, axis=0, vector_size=32, impl="xla").coarse_scale
  jitted = _xla(lambda a: vs_quantize(a, 4, axis=0, vector_size=32, impl="xla"), x1).coarse_scale
  e, j = (int(np.asarray(c, np.float32).view(np.int32).ravel()[0]) for c in (eager, jitted))
  assert e != j and abs(e - j) <= 1


def test_bad_input_and_routing():
  """Layouts the kernel does not take are refused with the dimension named when the kernel is asked for,
  and go to the XLA path automatically; off GPU the automatic path is XLA."""
  x = _data()
  with pytest.raises(ValueError, match=r"axis=\(0,\)"):
    quantize(x, 8, axis=0, impl="interpret")
  with pytest.raises(ValueError, match="rounding='nearest'"):
    quantize(x, 8, axis=1, rounding="stochastic", key=jax.random.PRNGKey(0), impl="interpret")
  with pytest.raises(ValueError, match="impl"):
    quantize(x, 8, axis=1, impl="triton")
  with pytest.raises(ValueError, match="vector_size"):
    vs_quantize(x, 4, axis=1, vector_size=8, coarse_axes=(), impl="interpret")
  with pytest.raises(ValueError, match="coarse_axes"):
    vs_quantize(x, 4, axis=1, vector_size=16, impl="interpret")          # per-tensor coarse: not one pass
  with pytest.raises(ValueError, match="axis 0"):
    vs_quantize(x, 4, axis=0, vector_size=16, impl="interpret")
  with pytest.raises(ValueError, match="row length 40000"):
    pq.quantize_rows(jnp.zeros((2, 40000)), 8, True, False, jnp.int8, impl="interpret")
  with pytest.raises(ValueError, match="does not divide"):                # pad=False keeps its error
    vs_quantize(x, 4, axis=1, vector_size=16, coarse_axes=(), pad=False)
  assert fp._row_groups(x, (1,)) and fp._row_groups(x, (0, 1)) and not fp._row_groups(x, (0,))
  assert not fp._row_groups(x.astype(jnp.int8), (1,)) and not fp._row_groups(jnp.zeros((2, 40000)), (1,))
  if jax.default_backend() != "gpu":
    assert pq.default_impl() is None
    jaxpr = str(jax.make_jaxpr(lambda a: quantize(a, 8, axis=1).codes)(x))
    assert "pallas_call" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda a: quantize(a, 8, axis=1, impl="interpret").codes)(x))
    assert "pallas_call" in jaxpr


def test_lowers_to_triton_ir():
  """The GPU (Triton) lowering runs here without a GPU: catches Pallas-Triton lowering errors before a
  device run (ragged and whole-tile shapes, float32 and bfloat16, the explicit PTX division probes)."""
  for shape, dt in (((37, 200), jnp.float32), ((64, 256), jnp.bfloat16)):
    sd = jax.ShapeDtypeStruct(shape, dt)
    for f in (lambda a: fp._quantize_rows(a, 8, False, False, (1,), "pallas", div="full"),
              lambda a: vs._vs_quantize_rows(a, 4, 16, 8, "pallas"),
              lambda a: vs._vs_quantize_rows(a, 4, 128, None, "pallas", num_warps=4)):
      with cuda_target():
        text = jax.jit(f).trace(sd).lower(lowering_platforms=("cuda",)).as_text()
      assert "triton" in text.lower()


@pytest.mark.slow
def test_self_test_passes_and_catches_a_wrong_kernel(monkeypatch):
  """The once-per-process self-test that gates the automatic GPU path (here in the interpreter): passes
  for the real kernels, warns and returns False when a kernel is off by one code."""
  pq.kernel_self_test.cache_clear()
  try:
    # first reached while tracing (as the automatic path does inside jit): runs on a fresh thread
    ok = []
    jax.jit(lambda a: (ok.append(pq.kernel_self_test("interpret")), a)[1])(jnp.zeros(3))
    assert ok == [True]
    real = pq.quantize_rows
    monkeypatch.setattr(pq, "quantize_rows", lambda *a, **k: (lambda c, s, z: (c + 1, s, z))(*real(*a, **k)))
    pq.kernel_self_test.cache_clear()
    with pytest.warns(RuntimeWarning, match="failed their self-test"):
      assert not pq.kernel_self_test("interpret")
  finally:
    pq.kernel_self_test.cache_clear()


def test_gradients_through_the_kernel_match_the_xla_path(monkeypatch):
  """Under ``grad`` (``vs_fake_quant``'s straight-through estimator, and the derivative of a dequantized
  value through the scale) the kernel path gives the XLA path's gradients: primal from the kernel,
  tangents from the XLA path."""
  x = _data((4, 40))
  fq = lambda a: (dequantize(quantize(a, 8, axis=1)) * a).sum()     # through the codes and the scale
  vfq = lambda a: vs_fake_quant(a, 4, axis=1, vector_size=16, coarse_axes=()).sum()
  ref = [jax.jit(jax.grad(fq))(x), jax.jit(jax.grad(vfq))(x)]
  monkeypatch.setattr(pq, "default_impl", lambda: "interpret")     # the automatic path takes the kernel
  assert "pallas_call" in str(jax.make_jaxpr(lambda a: quantize(a, 8, axis=1).codes)(x))
  got = [jax.jit(jax.grad(fq))(x), jax.jit(jax.grad(vfq))(x)]
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(ref[0]).sum()) > 0
