"""One-pass quantization kernels (Pallas, Triton backend): range and codes from one read of the input.

Used by :func:`mlsys_jax.quant.fixed_point.quantize` (per-channel / per-row ranges) and
:func:`mlsys_jax.quant.vsquant.vs_quantize` (per-vector scales along axis 0 of a 2-D kernel) on GPU. The
XLA path of those functions computes the range in one fusion and the codes in another, reading the input
twice (plus a third reduction for the non-finite check). Here one program owns whole scale groups:

- groups along the *last* axes (per row; ``quantize(x, axis=-1)`` of activations): a program loads
  ``rows`` complete rows once, reduces them and writes their codes;
- groups along the *leading* axes (per output channel of an ``(in, out)`` kernel, ``axis=0``; VS-Quant
  vectors along axis 0 with a per-column coarse scale): a program owns a strip of ``cols`` columns, takes
  the range in a first loop over row chunks and writes the codes in a second loop that runs the chunks
  in reverse order, so that the most recently read chunks are re-read from L2 rather than memory.
  (A column's range needs the whole column before its first code, so a strip of a tensor larger than
  L2 cannot be written from one read of memory; the reverse order recovers part of the second read.)

Bit-identical to the XLA path: the kernels compute exactly what XLA compiles the jnp code to. XLA's
algebraic simplifier turns ``a / c`` for a constant ``c`` into ``a * (1 / c)`` and ``a / broadcast(b)``
into ``a * broadcast(1 / b)``; the kernels write those products explicitly, round the remaining
quotients and reciprocals correctly (PTX ``div.rn.f32`` / ``rcp.rn.f32``; Triton's own ``/`` is the
approximate ``div.full.f32``), and round half to even from ``floor`` (the 1.5 * 2^23 trick would be
folded away by XLA in the interpreter). Groups holding NaN or +-inf get a NaN scale as in the XLA path; their
codes are unspecified.

Off GPU the kernels run in Pallas' interpreter (``impl='interpret'``; for tests, slow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
except Exception:  # pragma: no cover - jax without Pallas/Triton support
  pl = plgpu = None

from mlsys_jax._compat import run_outside_traces, triton_compiler_params

ROW_ELEMS = 8192        # elements per program of the per-row kernel (rows * padded row length)
MAX_ROW = 16384         # longest row (padded to a power of two) the per-row kernel takes
COLS = 16               # columns per program of the column-strip kernels (256 programs at 4096)
CHUNK = 512             # rows per loop step of the column-strip kernels
NUM_WARPS = 8
NUM_STAGES = 1          # Triton software-pipelining depth of the chunk loops
ENABLED = True          # False sends the public functions to the XLA path (for benchmarks)
_F32 = jnp.float32


def available() -> bool:
  return plgpu is not None and hasattr(plgpu, "load") and hasattr(plgpu, "elementwise_inline_asm")


_IN_SELF_TEST = False


@functools.lru_cache(maxsize=None)
def _kernel_self_test() -> bool:
  """Once per process: compile the kernels on small inputs and compare them with the XLA path bit for
  bit. On failure warn and use the XLA path."""
  global _IN_SELF_TEST
  import warnings
  from mlsys_jax.quant import fixed_point, vsquant
  _IN_SELF_TEST = True

  def same():
    x = jnp.sin(jnp.arange(96 * 40, dtype=_F32) * 0.37).reshape(96, 40) * jnp.exp(
        jnp.cos(jnp.arange(40, dtype=_F32)) * 3)
    out = []
    for sym, uns, axis, groups in ((True, False, 0, "cols"), (False, True, 1, "rows"),
                                   (False, False, 0, "cols")):
      a = fixed_point._quantize_onepass(x, 8, sym, uns, (axis,), groups, "pallas")
      b = fixed_point.quantize(x, 8, symmetric=sym, unsigned=uns, axis=axis)
      out += [jnp.all(a.codes == b.codes), jnp.all(a.scale == b.scale), jnp.all(a.zero_point == b.zero_point)]
    for sb in (8, None):
      a = vsquant._vs_quantize_onepass(x, 4, 16, sb, "pallas")
      b = vsquant.vs_quantize(x, 4, axis=0, vector_size=16, scale_bits=sb)
      out += [jnp.all(a.codes == b.codes), jnp.all(a.vector_scale == b.vector_scale),
              jnp.all(a.coarse_scale == b.coarse_scale)]
    return jnp.stack(out)

  try:
    ok = run_outside_traces(jax.jit(same))
    if not ok.all():
      raise RuntimeError(f"kernels and XLA path differ: {ok.tolist()}")
    return True
  except Exception as e:  # pragma: no cover - GPU only
    warnings.warn(f"mlsys_jax.quant: the one-pass quantize kernels failed their self-test ({e!r:.300}); "
                  "using the XLA path.", RuntimeWarning, stacklevel=3)
    return False
  finally:
    _IN_SELF_TEST = False


def default_impl() -> str | None:
  """``'pallas'`` on a GPU backend with Pallas Triton whose kernels passed their self-test, None (use
  XLA) elsewhere."""
  if not ENABLED or _IN_SELF_TEST or jax.default_backend() != "gpu" or not available():
    return None
  return "pallas" if _kernel_self_test() else None


def _pow2(v: int) -> int:
  return 1 << max(0, (int(v) - 1).bit_length())


def _asm(op: str, args, exact: bool):
  """Correctly rounded ``div.rn.f32`` / ``rcp.rn.f32`` in compiled Triton; plain jnp in the interpreter."""
  args = jnp.broadcast_arrays(*args)
  if not exact:
    return args[0] / args[1] if op == "div" else 1.0 / args[0]
  sd = jax.ShapeDtypeStruct(args[0].shape, _F32)
  if op == "div":
    return plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=args, constraints="=f,f,f",
                                        pack=1, result_shape_dtypes=[sd])[0]
  return plgpu.elementwise_inline_asm("rcp.rn.f32 $0, $1;", args=args, constraints="=f,f", pack=1,
                                      result_shape_dtypes=[sd])[0]


def _rne(v):
  """Round half to even from ``floor`` (exact for every float32; +-inf and NaN pass through)."""
  r = jnp.floor(v)
  d = v - r                                    # exact wherever it decides the result
  odd = jnp.floor(r * np.float32(0.5)) * np.float32(2.0) != r
  return jnp.where((d > np.float32(0.5)) | ((d == np.float32(0.5)) & odd), r + np.float32(1.0), r)


def _recip_const(c) -> np.float32:
  return np.float32(1.0) / np.float32(c)


def _scale_zp(lo, hi, nbad, bits: int, symmetric: bool, unsigned: bool, qmin: int, qmax: int, exact: bool):
  """compute_scale + the non-finite rule of quantize, as XLA compiles them (see module docstring)."""
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  if symmetric:
    amax = jnp.maximum(-lo, hi)
    scale = jnp.where(amax > 0, amax * _recip_const((qmax - qmin) // 2), np.float32(1.0))
    zp = jnp.full_like(scale, np.float32(2 ** (bits - 1) if unsigned else 0))
  else:
    scale = jnp.where(hi > lo, (hi - lo) * _recip_const(qmax - qmin), np.float32(1.0))
    zp = jnp.clip(_rne(np.float32(qmin) - _asm("div", (lo, scale), exact)), qmin, qmax)
  scale = jnp.where(nbad > 0, np.float32(np.nan), scale)
  return scale, zp


def _call(kernel, out_shape, grid, impl: str, num_warps: int, num_stages: int | None, *args):
  interpret = impl == "interpret"
  cp = None if interpret else triton_compiler_params(num_warps, num_stages or NUM_STAGES)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                        compiler_params=cp)(*args)


def quantize_2d(x: jax.Array, bits: int, symmetric: bool, unsigned: bool, code_dtype, *, groups: str,
                impl: str = "pallas", cols: int | None = None, chunk: int | None = None,
                row_elems: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None):
  """Codes, scale and zero point of a 2-D ``x`` (R, C) with one range per column (``groups='cols'``,
  scale (1, C)) or per row (``groups='rows'``, scale (R, 1)); asymmetric codes use an unsigned code
  range (shifted by -2^(b-1) into signed codes when ``unsigned`` is False), as in ``quantize``."""
  r_, c_ = x.shape
  asym_unsigned = unsigned or not symmetric
  half = 2 ** (bits - 1)
  if symmetric:
    qmin, qmax = (1, 2 * half - 1) if asym_unsigned else (-(half - 1), half - 1)
  else:
    qmin, qmax = 0, 2 * half - 1
  shift = half if (not symmetric and not unsigned) else 0
  exact = impl != "interpret"
  nw = num_warps or NUM_WARPS
  xf = x.reshape(-1)
  inf = np.float32(np.inf)

  def codes_of(v, inv, zp):
    q = jnp.clip(_rne(v * inv) + zp, qmin, qmax)
    return (q - shift).astype(code_dtype) if shift else q.astype(code_dtype)

  if groups == "rows":
    cp = _pow2(c_)
    br = max(1, (row_elems or ROW_ELEMS) // cp)
    grid = -(-r_ // br)

    def kernel(x_ref, c_ref, s_ref, z_ref):
      i = pl.program_id(0)
      rows = i * br + jnp.arange(br, dtype=jnp.int32)
      cidx = jnp.arange(cp, dtype=jnp.int32)
      offs = rows[:, None] * c_ + cidx[None, :]
      m = (rows < r_)[:, None] & (cidx < c_)[None, :]
      v = plgpu.load(x_ref.at[offs], mask=m, other=jnp.zeros((), x.dtype)).astype(_F32)
      lo = jnp.min(jnp.where(m, v, inf), axis=1)
      hi = jnp.max(jnp.where(m, v, -inf), axis=1)
      nbad = jnp.sum(jnp.where(m & ~jnp.isfinite(v), 1, 0), axis=1)
      scale, zp = _scale_zp(lo, hi, nbad, bits, symmetric, unsigned, qmin, qmax, exact)
      inv = _asm("rcp", (scale,), exact)
      plgpu.store(c_ref.at[offs], codes_of(v, inv[:, None], zp[:, None]), mask=m)
      rok = rows < r_
      plgpu.store(s_ref.at[rows], scale, mask=rok)
      plgpu.store(z_ref.at[rows], zp - shift, mask=rok)

    codes, scale, zp = _call(kernel, (jax.ShapeDtypeStruct((r_ * c_,), code_dtype),
                                      jax.ShapeDtypeStruct((r_,), _F32), jax.ShapeDtypeStruct((r_,), _F32)),
                             (grid,), impl, nw, num_stages, xf)
    return codes.reshape(r_, c_), scale.reshape(r_, 1), zp.reshape(r_, 1)

  if groups != "cols":
    raise ValueError(f"groups must be 'rows' or 'cols', got {groups!r}.")
  bn, bk = cols or COLS, chunk or CHUNK
  nchunks = -(-r_ // bk)
  grid = -(-c_ // bn)

  def kernel(x_ref, c_ref, s_ref, z_ref):
    j = pl.program_id(0)
    cidx = j * bn + jnp.arange(bn, dtype=jnp.int32)
    cok = cidx < c_

    def load(i):
      rows = i * bk + jnp.arange(bk, dtype=jnp.int32)
      offs = rows[:, None] * c_ + cidx[None, :]
      m = (rows < r_)[:, None] & cok[None, :]
      return offs, m, plgpu.load(x_ref.at[offs], mask=m, other=jnp.zeros((), x.dtype)).astype(_F32)

    def stats(i, c):
      lo, hi, nbad = c
      _, m, v = load(i)
      lo = jnp.minimum(lo, jnp.min(jnp.where(m, v, inf), axis=0))
      hi = jnp.maximum(hi, jnp.max(jnp.where(m, v, -inf), axis=0))
      return lo, hi, nbad + jnp.sum(jnp.where(m & ~jnp.isfinite(v), 1, 0), axis=0)

    lo, hi, nbad = jax.lax.fori_loop(0, nchunks, stats, (jnp.full((bn,), inf, _F32),
                                                         jnp.full((bn,), -inf, _F32),
                                                         jnp.zeros((bn,), jnp.int32)))
    scale, zp = _scale_zp(lo, hi, nbad, bits, symmetric, unsigned, qmin, qmax, exact)
    inv = _asm("rcp", (scale,), exact)

    def write(k, carry):
      offs, m, v = load(nchunks - 1 - k)         # newest chunks first: still in L2
      plgpu.store(c_ref.at[offs], codes_of(v, inv[None, :], zp[None, :]), mask=m)
      return carry

    jax.lax.fori_loop(0, nchunks, write, 0)
    plgpu.store(s_ref.at[cidx], scale, mask=cok)
    plgpu.store(z_ref.at[cidx], zp - shift, mask=cok)

  codes, scale, zp = _call(kernel, (jax.ShapeDtypeStruct((r_ * c_,), code_dtype),
                                    jax.ShapeDtypeStruct((c_,), _F32), jax.ShapeDtypeStruct((c_,), _F32)),
                           (grid,), impl, nw, num_stages, xf)
  return codes.reshape(r_, c_), scale.reshape(1, c_), zp.reshape(1, c_)


def vs_quantize_cols(x: jax.Array, bits: int, vector_size: int, scale_bits: int | None, code_dtype,
                     scale_dtype, *, impl: str = "pallas", cols: int | None = None,
                     chunk: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None):
  """VS-Quant of a 2-D ``x`` (K, N) with vectors of ``vector_size`` rows along axis 0 and, for two-level
  scales, one coarse scale per column (``vs_quantize(x, axis=0)``'s default). K must be a multiple of
  ``vector_size`` (a power of two). Returns ``(codes (K, N), vector_scale (K/V, 1, N), coarse)`` with
  ``coarse`` (1, 1, N) (two-level) or ones (1, 1, 1) (float per-vector scales)."""
  k_, n_ = x.shape
  v_ = vector_size
  g_ = k_ // v_
  qmax = 2 ** (bits - 1) - 1
  smax = (2 ** scale_bits - 1) if scale_bits is not None else None
  exact = impl != "interpret"
  nw = num_warps or NUM_WARPS
  bn = cols or COLS
  bk = max(chunk or CHUNK, v_)
  gk = bk // v_
  nchunks = -(-k_ // bk)
  grid = -(-n_ // bn)
  inf = np.float32(np.inf)
  rq = _recip_const(qmax)

  def kernel(x_ref, c_ref, vec_ref, co_ref):
    j = pl.program_id(0)
    cidx = j * bn + jnp.arange(bn, dtype=jnp.int32)
    cok = cidx < n_

    def load(i):
      rows = i * bk + jnp.arange(bk, dtype=jnp.int32)
      offs = rows[:, None] * n_ + cidx[None, :]
      m = (rows < k_)[:, None] & cok[None, :]
      return offs, m, plgpu.load(x_ref.at[offs], mask=m, other=jnp.zeros((), x.dtype)).astype(_F32)

    coarse = inv_coarse = None
    if scale_bits is not None:
      def stats(i, c):
        top, nbad = c
        _, m, v = load(i)
        # max_v s_v = max over the column of |x| * (1/Q) (rounding is monotone); the product is taken
        # before the reduction, as in XLA, so that no compiler folds it into the next constant.
        top = jnp.maximum(top, jnp.max(jnp.where(m, jnp.abs(v) * rq, -inf), axis=0))
        return top, nbad + jnp.sum(jnp.where(m & ~jnp.isfinite(v), 1, 0), axis=0)

      top, nbad = jax.lax.fori_loop(0, nchunks, stats, (jnp.full((bn,), -inf, _F32),
                                                        jnp.zeros((bn,), jnp.int32)))
      coarse = jnp.where(top > 0, top * _recip_const(smax), np.float32(1.0))
      coarse = jnp.where(nbad > 0, np.float32(np.nan), coarse)
      inv_coarse = _asm("rcp", (coarse,), exact)

    def write(k, carry):
      i = nchunks - 1 - k                          # newest chunks first: still in L2
      offs, m, v = load(i)
      v3 = v.reshape(gk, v_, bn)
      amax_v = jnp.max(jnp.abs(v3), axis=1)        # (gk, bn)
      bad_v = jnp.sum(jnp.where(jnp.isfinite(v3), 0, 1), axis=1) > 0
      s_v = jnp.where(bad_v, np.float32(np.nan), amax_v * rq)
      if scale_bits is None:
        vec = jnp.where(s_v == 0, np.float32(1.0), s_v)
        scale = vec
      else:
        r = s_v * inv_coarse[None, :]
        vec = jnp.clip(jnp.where(jnp.isnan(r), np.float32(1.0), _rne(r)), 1, smax)
        scale = vec * coarse[None, :]
      inv = _asm("rcp", (scale,), exact)
      q = jnp.clip(_rne(v3 * inv[:, None, :]), -qmax, qmax).reshape(bk, bn)
      plgpu.store(c_ref.at[offs], q.astype(code_dtype), mask=m)
      g = i * gk + jnp.arange(gk, dtype=jnp.int32)
      goffs = g[:, None] * n_ + cidx[None, :]
      plgpu.store(vec_ref.at[goffs], vec.astype(scale_dtype), mask=(g < g_)[:, None] & cok[None, :])
      return carry

    jax.lax.fori_loop(0, nchunks, write, 0)
    if scale_bits is not None:
      plgpu.store(co_ref.at[cidx], coarse, mask=cok)
    else:
      @pl.when(j == 0)
      def _():
        co_ref[0] = np.float32(1.0)

  n_co = n_ if scale_bits is not None else 1
  codes, vec, coarse = _call(kernel, (jax.ShapeDtypeStruct((k_ * n_,), code_dtype),
                                      jax.ShapeDtypeStruct((g_ * n_,), scale_dtype),
                                      jax.ShapeDtypeStruct((n_co,), _F32)),
                             (grid,), impl, nw, num_stages, x.reshape(-1))
  return codes.reshape(k_, n_), vec.reshape(g_, 1, n_), coarse.reshape(1, 1, n_co)
