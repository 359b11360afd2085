"""One-pass row quantization kernels (Pallas, Triton backend): range, scales and codes from ONE read.

Used on GPU by :func:`mlsys_jax.quant.fixed_point.quantize` when the scale groups are rows (the reduced
axes are the trailing ones: per-row activations, per-output-channel weights stored ``(out, in)``) and by
:func:`mlsys_jax.quant.vsquant.vs_quantize` when the vectors run along the last axis and the coarse scale of
the two-level scheme (Dai et al., "VS-Quant", MLSys 2021, Sec. 3.2) is per row (``coarse_axes=()``) or
absent (``scale_bits=None``). The input is viewed as ``(R, C)``; one program loads ``rows`` complete rows
(``C`` padded to a power of two) into registers, reduces them (row range, or per-vector ``amax`` and the
row maximum of the vector scales), computes the scales and the codes from the same registers, and writes
codes and scales. Each input byte is read once and each output byte written once; the XLA path reads the
input two or three times (range, non-finite check, codes).

Exactness. The kernels compute the XLA path's expressions in the same order, so the results are the same
bit for bit (tested in the interpreter against XLA on CPU, and on the GPU by the self-test and the
benchmark's full-size checks):

- XLA's algebraic simplifier turns ``a / c`` for a constant ``c`` into ``a * (1 / c)`` (``1 / c`` rounded on
  the host); the kernels write those products explicitly with the same float32 constant;
- every other quotient stays a division in both: XLA's GPU backend emits ``div.full.f32`` for float32
  ``fdiv`` (LLVM ``-nvptx-prec-divf32=1``) and so does Triton for ``/``; in the interpreter (CPU) both are
  correctly rounded;
- round half to even is exact in both (PTX ``cvt.rni.f32.f32`` in the kernel);
- a scale group (row, or row of vectors for two-level scales) holding NaN or +-inf gets a NaN scale and
  codes 0, exactly as the XLA path (``x / NaN`` is NaN and XLA converts NaN to integer 0). The one
  exception to bit-identity: the zero point of an *asymmetric* group holding a NaN. The XLA path computes
  it from the group's min/max before the NaN rule, and whether XLA's min/max reduction returns the NaN
  depends on the backend's vectorization (on CPU a 200-element row gave a finite zero point, a 4-element
  row NaN). The kernel returns NaN there. Either way the scale is NaN, so the group dequantizes to NaN.

Off GPU the kernels run in Pallas' interpreter (``impl='interpret'``; for tests):

  >>> import jax.numpy as jnp
  >>> from mlsys_jax.quant import quantize
  >>> x = jnp.array([[0.5, -2.0, 1.0], [3.0, 0.0, -1.5]])
  >>> qt = quantize(x, 8, axis=1, impl="interpret")        # one scale per row, from one read of each row
  >>> qt.codes.tolist(), bool(jnp.all(qt.codes == quantize(x, 8, axis=1, impl="xla").codes))
  ([[32, -127, 64], [127, 0, -64]], True)
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

from mlsys_jax._checks import check_choice
from mlsys_jax._compat import run_outside_traces, triton_compiler_params

BLOCK_ELEMS = 8192      # elements (rows * padded row length) per program
MAX_ROW = 32768         # longest padded row one program takes in registers
NUM_WARPS = 8
NUM_STAGES = 1
ENABLED = True          # False: the public functions keep the XLA path on GPU too
VECTOR_SIZES = (16, 32, 64, 128)
_F32 = jnp.float32
_INF = np.float32(np.inf)


def available() -> bool:
  return plgpu is not None and hasattr(plgpu, "load") and hasattr(plgpu, "store")


def _pow2(v: int) -> int:
  return 1 << max(0, (int(v) - 1).bit_length())


def row_ok(c: int) -> bool:
  """Whether a row of ``c`` elements (padded to a power of two) fits one program."""
  return 0 < c and _pow2(c) <= MAX_ROW


def _round(v, rnd: str):
  """Round half to even, exactly (+-inf and NaN pass through). ``'asm'``: PTX ``cvt.rni.f32.f32``, one
  instruction (Pallas-Triton has no lowering of ``round``); ``'floor'``: from ``floor`` (about ten
  instructions); ``'jnp'``: ``jnp.round`` (the interpreter)."""
  if rnd == "jnp":
    return jnp.round(v)
  if rnd == "floor":
    return _rne(v)
  sd = jax.ShapeDtypeStruct(v.shape, _F32)
  return plgpu.elementwise_inline_asm("cvt.rni.f32.f32 $0, $1;", args=[v], constraints="=f,f", pack=1,
                                      result_shape_dtypes=[sd])[0]


def _abs_or_inf(v):
  """``|v|`` where finite, +inf for +-inf and NaN (``NaN < inf`` is false): one compare and select."""
  a = jnp.abs(v)
  return jnp.where(a < _INF, a, _INF)


def _rne(v):
  """Round half to even from ``floor`` (exact for every float32; +-inf and NaN pass through)."""
  r = jnp.floor(v)
  d = v - r
  odd = jnp.floor(r * np.float32(0.5)) * np.float32(2.0) != r
  return jnp.where((d > np.float32(0.5)) | ((d == np.float32(0.5)) & odd), r + np.float32(1.0), r)


def _recip(c) -> np.float32:
  """``1 / c`` in float32, as XLA's simplifier folds a division by the constant ``c``."""
  return np.float32(1.0) / np.float32(c)


def _div(a, b, mode: str):
  """``a / b``. ``'xla'``: the plain quotient (``div.full.f32`` compiled by Triton, as XLA's GPU backend
  emits; correctly rounded in the interpreter). ``'rn'``/``'full'``: that PTX instruction explicitly
  (for the benchmark's exactness probe; GPU only)."""
  if mode == "xla":
    return a / b
  a, b = jnp.broadcast_arrays(a, b)
  sd = jax.ShapeDtypeStruct(a.shape, _F32)
  return plgpu.elementwise_inline_asm(f"div.{mode}.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f",
                                      pack=1, result_shape_dtypes=[sd])[0]


def _geometry(r: int, c: int, block_elems: int | None, v: int, loop: int | None):
  """(padded row length, rows per step, steps per program, programs, whether loads need a mask)."""
  cp = max(_pow2(c), v)
  br = max(1, block_elems // cp)
  br = min(br, _pow2(r))
  steps = -(-r // br)
  loop = max(1, min(loop or 1, steps))
  grid = -(-steps // loop)
  return cp, br, loop, grid, cp != c or r % br != 0 or steps % loop != 0


def _run_steps(step, loop: int):
  """``step(j)`` for the ``loop`` row blocks of this program (a loop Triton can software-pipeline with
  ``num_stages`` > 1), or once."""
  if loop == 1:
    step(0)
  else:
    jax.lax.fori_loop(0, loop, lambda j, c: (step(j), c)[1], 0)


def _call(kernel, out_shape, grid, impl: str, num_warps: int, num_stages: int, *args):
  interpret = impl == "interpret"
  cp = None if interpret else triton_compiler_params(num_warps, num_stages)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(grid,), interpret=interpret,
                        compiler_params=cp)(*args)


EVICT = None            # eviction policy of the input loads (e.g. 'evict_first': streamed once)

# Launch configuration per (kind, input itemsize): block_elems, num_warps, loop, num_stages. From the H200
# sweeps of 2026-12-02 (benchmarks/results/quant_throughput_rows_h200_run{1,2}.json), rows of 8192
# elements; the row loop with software pipelining (loop > 1) was slower in every case.
_TUNED = {
    ("q", 4): (16384, 8, 1, 1),
    ("q", 2): (8192, 4, 1, 1),
    ("vs16", 4): (8192, 4, 1, 1),
    ("vs16", 2): (8192, 8, 1, 1),
    ("vs", 4): (16384, 8, 1, 1),
    ("vs", 2): (8192, 4, 1, 1),
}


def _config(kind: str, itemsize: int, block_elems, num_warps, loop, num_stages):
  tb, tw, tl, ts = _TUNED.get((kind, itemsize), (BLOCK_ELEMS, NUM_WARPS, 1, NUM_STAGES))
  return block_elems or tb, num_warps or tw, loop or tl, num_stages or ts


def _load_rows(x_ref, i, br: int, cp: int, r: int, c: int, dtype, masked: bool, evict: str | None):
  rows = i * br + jnp.arange(br, dtype=jnp.int32)
  cidx = jnp.arange(cp, dtype=jnp.int32)
  offs = rows[:, None] * c + cidx[None, :]
  kw = {"eviction_policy": evict} if evict else {}
  if not masked:
    return rows, offs, None, plgpu.load(x_ref.at[offs], **kw).astype(_F32)
  m = (rows < r)[:, None] & (cidx < c)[None, :]
  return rows, offs, m, plgpu.load(x_ref.at[offs], mask=m, other=jnp.zeros((), dtype), **kw).astype(_F32)


def quantize_rows(x: jax.Array, bits: int, symmetric: bool, unsigned: bool, code_dtype, *,
                  impl: str = "pallas", block_elems: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, loop: int | None = None, div: str = "xla",
                  evict: str | None = None, rnd: str | None = None):
  """``quantize(x, bits, axis=1, ...)`` of a 2-D ``x`` (R, C) with nearest rounding and the data range:
  ``(codes (R, C), scale (R, 1), zero_point (R, 1))``, identical to the XLA path."""
  r_, c_ = x.shape
  if not row_ok(c_):
    raise ValueError(f"row length {c_} (the reduced trailing axes) is longer than the kernel's limit "
                     f"{MAX_ROW}; use impl='xla'.")
  half = 2 ** (bits - 1)
  if symmetric:
    qmin, qmax = (1, 2 * half - 1) if (unsigned or not symmetric) else (-(half - 1), half - 1)
  else:
    qmin, qmax = 0, 2 * half - 1
  shift = half if (not symmetric and not unsigned) else 0
  block_elems, num_warps, loop, num_stages = _config("q", x.dtype.itemsize, block_elems, num_warps, loop,
                                                     num_stages)
  cp, br, loop, grid, masked = _geometry(r_, c_, block_elems, 1, loop)
  rnd = "jnp" if impl == "interpret" else (rnd or "asm")

  def kernel(x_ref, c_ref, s_ref, z_ref):
    pid = pl.program_id(0)            # outside the loop body (the interpreter needs it there)
    _run_steps(lambda j: step(pid * loop + j, x_ref, c_ref, s_ref, z_ref), loop)

  def step(i, x_ref, c_ref, s_ref, z_ref):
    rows, offs, m, v = _load_rows(x_ref, i, br, cp, r_, c_, x.dtype, masked, evict or EVICT)
    # Padding loads as 0, which changes neither range: the XLA path widens [lo, hi] to contain 0.
    if symmetric:
      # One reduction: max(-min(lo, 0), max(hi, 0)) = max |x| for a finite row; a non-finite element
      # counts as +inf, which marks the row (NaN scale) whatever the reduction does with NaN.
      amax = jnp.max(_abs_or_inf(v), axis=1)
      isbad = amax == _INF
      scale = jnp.where(amax > 0, amax * _recip((qmax - qmin) // 2), np.float32(1.0))
      zp = jnp.full_like(scale, np.float32(half if unsigned else 0))
    else:
      lo = jnp.minimum(jnp.min(v, axis=1), np.float32(0.0))
      hi = jnp.maximum(jnp.max(v, axis=1), np.float32(0.0))
      hasnan = jnp.sum(jnp.where(v != v, 1, 0), axis=1) > 0
      isbad = hasnan | (lo == -_INF) | (hi == _INF)
      scale = jnp.where(hi > lo, (hi - lo) * _recip(qmax - qmin), np.float32(1.0))
      t = _round(np.float32(qmin) - _div(lo, scale, div), rnd)
      # XLA's clip propagates NaN (a -inf row: -inf / inf); Triton's min/max need not, so say it.
      zp = jnp.where(t != t, np.float32(np.nan), jnp.clip(t, qmin, qmax))
      # the zero point comes from the range before the NaN rule, as in the XLA path (+-inf included)
      zp = jnp.where(hasnan, np.float32(np.nan), zp)
    scale = jnp.where(isbad, np.float32(np.nan), scale)
    q = _round(_div(v, scale[:, None], div), rnd)
    if not (symmetric and not unsigned):     # symmetric signed codes: zp = 0 (x + 0 changes no code)
      q = q + zp[:, None]
    q = jnp.clip(q, qmin, qmax)
    if shift:
      q = q - np.float32(shift)
    q = jnp.where(isbad[:, None], np.float32(0.0), q)     # XLA converts the NaN codes to 0
    plgpu.store(c_ref.at[offs], q.astype(code_dtype), mask=m)
    rok = None if not masked else rows < r_
    plgpu.store(s_ref.at[rows], scale, mask=rok)
    plgpu.store(z_ref.at[rows], zp - np.float32(shift), mask=rok)

  codes, scale, zp = _call(kernel, (jax.ShapeDtypeStruct((r_ * c_,), code_dtype),
                                    jax.ShapeDtypeStruct((r_,), _F32), jax.ShapeDtypeStruct((r_,), _F32)),
                           grid, impl, num_warps, num_stages, x.reshape(-1))
  return codes.reshape(r_, c_), scale.reshape(r_, 1), zp.reshape(r_, 1)


def vs_quantize_rows(x: jax.Array, bits: int, vector_size: int, scale_bits: int | None, code_dtype,
                     scale_dtype, *, impl: str = "pallas", block_elems: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None, loop: int | None = None,
                     div: str = "xla", evict: str | None = None, rnd: str | None = None):
  """``vs_quantize(x, bits, axis=1, vector_size=V, scale_bits=M, coarse_axes=())`` of a 2-D ``x`` (R, C):
  vectors of V consecutive elements along each row (C zero-padded to whole vectors, as the XLA path
  does) and, for two-level scales, one coarse scale per row. Returns ``(codes (R, C), vector_scale
  (R, G), coarse (R,))`` with G = ceil(C / V); ``coarse`` is None for float per-vector scales."""
  r_, c_ = x.shape
  v_ = int(vector_size)
  if v_ not in VECTOR_SIZES:
    raise ValueError(f"vector_size must be one of {VECTOR_SIZES} for the kernel, got {v_}; use impl='xla'.")
  if not row_ok(c_):
    raise ValueError(f"row length {c_} (the vector axis) is longer than the kernel's limit {MAX_ROW}; "
                     "use impl='xla'.")
  g_ = -(-c_ // v_)
  qmax = 2 ** (bits - 1) - 1
  smax = (2 ** scale_bits - 1) if scale_bits is not None else None
  block_elems, num_warps, loop, num_stages = _config("vs16" if v_ == 16 else "vs", x.dtype.itemsize,
                                                     block_elems, num_warps, loop, num_stages)
  cp, br, loop, grid, masked = _geometry(r_, c_, block_elems, v_, loop)
  rnd = "jnp" if impl == "interpret" else (rnd or "asm")
  gp = cp // v_

  def kernel(x_ref, c_ref, vec_ref, co_ref):
    pid = pl.program_id(0)
    _run_steps(lambda j: step(pid * loop + j, x_ref, c_ref, vec_ref, co_ref), loop)

  def step(i, x_ref, c_ref, vec_ref, co_ref):
    rows, offs, m, v = _load_rows(x_ref, i, br, cp, r_, c_, x.dtype, masked, evict or EVICT)
    v3 = v.reshape(br, gp, v_)
    # One reduction per vector: a non-finite element counts as +inf, which marks the vector.
    amax_v = jnp.max(_abs_or_inf(v3), axis=2)                      # (br, gp); padding: 0
    bad_v = amax_v == _INF
    s_v = jnp.where(bad_v, np.float32(np.nan), amax_v * _recip(qmax))
    rok = None if not masked else rows < r_
    if scale_bits is None:
      vec = jnp.where(s_v == 0, np.float32(1.0), s_v)
      scale = vec
    else:
      top = jnp.max(jnp.where(bad_v, _INF, s_v), axis=1)     # padded vectors: s_v = 0; a bad one: +inf
      coarse = jnp.where(top > 0, top * _recip(smax), np.float32(1.0))
      coarse = jnp.where(top == _INF, np.float32(np.nan), coarse)
      rr = _round(_div(s_v, coarse[:, None], div), rnd)
      vec = jnp.clip(jnp.where(jnp.isnan(rr), np.float32(1.0), rr), 1, smax)   # nan_to_num(nan=1) + clip
      scale = vec * coarse[:, None]
      plgpu.store(co_ref.at[rows], coarse, mask=rok)
    q = jnp.clip(_round(_div(v3, scale[:, :, None], div), rnd), -qmax, qmax)
    # A NaN scale gives NaN codes in XLA (its clip propagates NaN), converted to 0; Triton's clip need
    # not propagate NaN, so the rule is written out.
    q = jnp.where((scale != scale)[:, :, None], np.float32(0.0), q).reshape(br, cp)
    plgpu.store(c_ref.at[offs], q.astype(code_dtype), mask=m)
    g = jnp.arange(gp, dtype=jnp.int32)
    goffs = rows[:, None] * g_ + g[None, :]
    gm = None if not masked else (rows < r_)[:, None] & (g < g_)[None, :]
    plgpu.store(vec_ref.at[goffs], vec.astype(scale_dtype), mask=gm)

  n_co = r_ if scale_bits is not None else 1
  codes, vec, coarse = _call(kernel, (jax.ShapeDtypeStruct((r_ * c_,), code_dtype),
                                      jax.ShapeDtypeStruct((r_ * g_,), scale_dtype),
                                      jax.ShapeDtypeStruct((n_co,), _F32)),
                             grid, impl, num_warps, num_stages, x.reshape(-1))
  return codes.reshape(r_, c_), vec.reshape(r_, g_), (coarse if scale_bits is not None else None)


def differentiable_like(kernel_fn, xla_fn):
  """``kernel_fn`` (a kernel call on one array) with the derivatives of ``xla_fn`` (the XLA path computing
  the same values): the primal comes from the kernel, tangents from ``jax.jvp`` of the XLA path (integer
  codes get float0 tangents there). Pallas kernels with pointer loads have no JVP rule of their own, and
  ``fake_quant`` differentiates through ``quantize`` (its straight-through gradient discards the result)."""
  f = jax.custom_jvp(kernel_fn)

  @f.defjvp
  def _jvp(primals, tangents):
    out = kernel_fn(*primals)
    return out, jax.jvp(xla_fn, primals, tangents)[1]

  return f


_IN_SELF_TEST = False


@functools.lru_cache(maxsize=None)
def kernel_self_test(impl: str = "pallas") -> bool:
  """Once per process (GPU): compile the kernels on small ragged inputs (float32 and bfloat16, one row
  with a NaN) and compare them with the XLA path bit for bit. On failure warn and use the XLA path.
  (``impl='interpret'`` runs the same test in the interpreter, for the CPU tests.)"""
  global _IN_SELF_TEST
  import warnings
  from mlsys_jax.quant import fixed_point, vsquant
  _IN_SELF_TEST = True

  x = np.sin(np.arange(37 * 200, dtype=np.float32) * np.float32(0.37)).reshape(37, 200) * np.exp(
      np.cos(np.arange(37, dtype=np.float32)) * np.float32(3))[:, None]
  x[5, 7], x[6, 0], x[7, 9] = np.nan, np.inf, -np.inf
  # Both inputs are (concrete, numpy) arguments of the jitted test: a bfloat16 cast inside it may be
  # skipped by XLA (excess precision), which would hand the XLA path float32 values the kernel never
  # sees; and a jnp cast here would be a tracer when the self-test is first reached inside jit.
  args = (x, x.astype(jnp.bfloat16))

  def same(*inputs):
    out = []
    for data in inputs:
      for sym, uns in ((True, False), (False, True)):
        a = fixed_point.quantize(data, 8, symmetric=sym, unsigned=uns, axis=1, impl=impl)
        b = fixed_point.quantize(data, 8, symmetric=sym, unsigned=uns, axis=1, impl="xla")
        out += [_same(a, b, skip_nan_zp=not sym)]
      for v, sb in ((16, 8), (64, None)):
        a = vsquant.vs_quantize(data, 4, axis=1, vector_size=v, scale_bits=sb, coarse_axes=(), impl=impl)
        b = vsquant.vs_quantize(data, 4, axis=1, vector_size=v, scale_bits=sb, coarse_axes=(), impl="xla")
        out += [_same(a, b)]
    return jnp.stack(out)

  try:
    ok = run_outside_traces(lambda: jax.jit(same)(*args))
    if not ok.all():
      raise RuntimeError(f"kernels and XLA path differ: {ok.tolist()}")
    return True
  except Exception as e:  # pragma: no cover - GPU only
    warnings.warn(f"mlsys_jax.quant: the one-pass row quantize kernels failed their self-test ({e!r:.300}); "
                  "using the XLA path.", RuntimeWarning, stacklevel=3)
    return False
  finally:
    _IN_SELF_TEST = False


def _same(a, b, skip_nan_zp: bool = False) -> jax.Array:
  """All leaves equal bit for bit (NaN equal to NaN); with ``skip_nan_zp`` the zero points of groups whose
  scale is NaN are not compared (see the module docstring)."""
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  eq = []
  for i, (p, q) in enumerate(zip(la, lb)):
    ok = ((p == q) | (jnp.isnan(p) & jnp.isnan(q))) if jnp.issubdtype(p.dtype, jnp.floating) else p == q
    if skip_nan_zp and i == 2:
      ok = ok | jnp.isnan(la[1]) | jnp.isnan(lb[1])
    eq.append(jnp.all(ok))
  return jnp.all(jnp.stack(eq))


def choose_impl(impl: str | None, rows_ok: bool, needs) -> str | None:
  """The path a public quantize function takes: ``impl`` as given (``'pallas'``/``'interpret'``), None for
  ``'xla'``, and for ``impl=None`` the kernel where the layout fits (``rows_ok``) and :func:`default_impl`
  allows it. An explicit kernel request on a layout it cannot take raises, naming what it ``needs``."""
  if impl is not None:
    check_choice("impl", impl, ("xla", "pallas", "interpret"))
  if impl == "xla":
    return None
  if impl is not None and not rows_ok:
    raise ValueError(f"impl={impl!r}: the one-pass kernel takes {needs()}. Use impl=None or 'xla'.")
  return impl or (default_impl() if rows_ok else None)


def default_impl() -> str | None:
  """``'pallas'`` on a GPU backend whose kernels passed their self-test, None (XLA path) elsewhere."""
  if not ENABLED or _IN_SELF_TEST or jax.default_backend() != "gpu" or not available():
    return None
  return "pallas" if kernel_self_test() else None
