"""Per-vector scaled int8 GEMM as a Pallas (Triton backend) kernel: VS-Quant's datapath on the GPU.

Dai, Venkatesan, Ren, Zimmer, Dally and Khailany, "VS-Quant: Per-vector Scaled Quantization for Accurate
Low-Precision Neural Network Inference", MLSys 2021, Sec. 3 and Fig. 3: a dot product of length K is cut
into K/V vectors; each vector pair gives an integer partial sum that is multiplied by the product of the
two (integer, two-level) vector scales and accumulated; one floating-point scale per output channel and
per activation row/tensor is applied at the end:

    out[m, n] = ca[m] * cw[n] * sum_g  sa[m, g] * sw[g, n] * P_g[m, n],
    P_g[m, n] = sum_{k in vector g} A[m, k] * W[k, n]          (int8 x int8 -> int32, exact).

The kernel tiles the output in ``block_m x block_n`` programs; each program walks K one vector (V
elements) at a time: an int8 x int8 -> int32 tensor-core product of ``(block_m, V) x (V, block_n)``
(``tl.dot`` on int8 through Pallas's Triton lowering), then the int32 partial sum is converted to float32,
scaled by ``sa[:, g] * sw[g, :]`` and added to a float32 accumulator held in registers. This is how
fine-grained-scaled FP8 GEMMs (DeepSeek's DeepGEMM, per-128-element scales along K) promote their partial
accumulators once per K block. The coarse scales multiply the accumulator once, after the loop.

The int32 -> float32 conversion of the partial sums uses the exact "magic number" form by default
(``convert='magic'``): ``bitcast_f32(p + 0x4B400000) - 12582912.0`` equals ``float(p)`` for
``|p| < 2^22``, which holds for every int8 product of V <= 128 (``|p| <= 128 * 128 * 128 = 2^21``). It
runs as an integer add and a float add instead of a conversion instruction, which on Hopper has a
quarter of the float throughput; ``convert='cast'`` uses ``astype`` instead. Both are exact.

Shapes are padded with zeros to whole blocks (M to ``block_m``, N to ``block_n``, K to whole vectors);
zero codes and zero scales add nothing, and the padding is sliced off. Vector sizes must be one of
16/32/64/128 (powers of two the tensor-core tiles accept). Off the GPU the kernel runs in Pallas's
interpreter (``interpret=True``), which is how the CPU tests check it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mlsys_jax._checks import check_choice, check_int

__all__ = ["SUPPORTED_VECTOR_SIZES", "default_config", "on_gpu", "vs_int8_matmul",
           "vs_int8_partial_sums"]

SUPPORTED_VECTOR_SIZES = (16, 32, 64, 128)
CONVERSIONS = ("magic", "magic_fma", "cast")
MIN_DOT_KS = (32, 64, 128)
_MAGIC_I = 0x4B400000          # bit pattern of 1.5 * 2^23
_MAGIC_F = 12582912.0          # 1.5 * 2^23: float(p) = bitcast(p + _MAGIC_I) - _MAGIC_F for |p| < 2^22


def on_gpu() -> bool:
  """Whether the default JAX backend is a GPU (where the kernel compiles through Triton)."""
  return jax.default_backend() == "gpu"


def _compiler_params(num_warps: int | None, num_stages: int | None):
  """Triton compiler parameters under either name (``CompilerParams`` in jax >= 0.7,
  ``TritonCompilerParams`` before)."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _pow2_at_least(x: int, low: int) -> int:
  return max(low, 1 << max(0, (x - 1).bit_length()))


# Launch parameters per V for large products: the fastest configuration verified on an H200 by
# benchmarks/vsquant_gemm.py (run of 2026-12-02, benchmarks/results/vsquant_gemm_h200.json). Later
# runs of that script print `best_config` from a wider sweep (scale prefetch, K-major weights).
_TUNED = {v: dict(block_m=256, block_n=128, vectors_per_step=1, num_warps=8, num_stages=3,
                  min_dot_k=32, convert="magic", convert_integer_scales="magic_fma",
                  w_layout="kn", prefetch=0)
          for v in SUPPORTED_VECTOR_SIZES}


def default_config(m: int, n: int, vector_size: int) -> dict:
  """Launch parameters for an ``M x N`` output: the tuned tile for V, shrunk to the next power of two
  (at least 16, the smallest tensor-core tile) for small M or N (decode shapes)."""
  cfg = dict(_TUNED.get(vector_size, _TUNED[64]))
  cfg["block_m"] = min(cfg["block_m"], _pow2_at_least(m, 16))
  cfg["block_n"] = min(cfg["block_n"], _pow2_at_least(n, 16))
  return cfg


def _check_codes(name: str, x) -> None:
  if not hasattr(x, "dtype") or x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D integer array, got {getattr(x, 'shape', type(x))}.")
  if x.dtype != jnp.int8:
    raise TypeError(f"{name} must hold int8 codes (signed), got {x.dtype}; quantize with bits <= 8 "
                    "and cast with .astype(jnp.int8).")


def _check_args(a_codes, a_scale, w_codes, w_scale, vector_size: int):
  _check_codes("a_codes", a_codes)
  _check_codes("w_codes", w_codes)
  if vector_size not in SUPPORTED_VECTOR_SIZES:
    raise ValueError(f"vector_size must be one of {SUPPORTED_VECTOR_SIZES} for the Pallas kernel, got "
                     f"{vector_size}; use the XLA integer path (quantized_dot_general) for other V.")
  m, k = a_codes.shape
  k2, n = w_codes.shape
  if k != k2:
    raise ValueError(f"contraction lengths differ: a_codes is {a_codes.shape} (K={k}) but w_codes is "
                     f"{w_codes.shape} (K={k2}).")
  g = -(-k // vector_size)
  if tuple(a_scale.shape) != (m, g):
    raise ValueError(f"a_scale must have shape (M, ceil(K / V)) = {(m, g)}, got {tuple(a_scale.shape)}.")
  if tuple(w_scale.shape) != (g, n):
    raise ValueError(f"w_scale must have shape (ceil(K / V), N) = {(g, n)}, got {tuple(w_scale.shape)}.")
  return m, k, n, g


def _pad_to(x, shape):
  widths = [(0, t - s) for s, t in zip(x.shape, shape)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _vector_dot(a_ref, w_ref, g, v: int, kdot: int, w_nk: bool):
  """int32 partial sum of vector ``g``: ``A[:, gV:(g+1)V] @ W[gV:(g+1)V, :]`` on the tensor cores.

  ``w_nk``: the weight block is stored ``(block_n, K)`` (K-major, the operand layout Hopper's 8-bit
  tensor-core instructions read) instead of ``(K, block_n)``. With ``kdot > v`` the product runs over
  the ``kdot``-wide K block holding vector ``g`` with the weight entries of the other vectors zeroed:
  exact, at ``kdot / v`` times the tensor-core work. (Triton's int8 products need K >= 32: with K = 16
  the H200 returned wrong sums, so ``kdot`` is at least 32.)
  """
  dn = (((1,), (1,)), ((), ())) if w_nk else (((1,), (0,)), ((), ()))
  r = kdot // v
  if r == 1:
    k0 = pl.multiple_of(g * v, v)
  else:
    k0 = pl.multiple_of(jax.lax.div(g, jnp.int32(r)) * kdot, kdot)
  a = a_ref[:, pl.ds(k0, kdot)]
  w = w_ref[:, pl.ds(k0, kdot)] if w_nk else w_ref[pl.ds(k0, kdot), :]
  if r > 1:
    axis = 1 if w_nk else 0
    sub = jax.lax.broadcasted_iota(jnp.int32, w.shape, axis) // v
    w = jnp.where(sub == jax.lax.rem(g, jnp.int32(r)), w, jnp.zeros_like(w))
  return jax.lax.dot_general(a, w, dn, preferred_element_type=jnp.int32)


def _fma(x, y, z, use_asm: bool):
  """``x * y + z`` rounded once: PTX ``fma.rn.f32`` on the GPU (no reliance on the compiler
  contracting a multiply and an add); in the interpreter the caller's operands make the two-step form
  exact (see :func:`_scaled_f32`)."""
  if not use_asm:
    return x * y + z
  from jax.experimental.pallas import triton as plgpu
  [out] = plgpu.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=[x, y, z], constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return out


def _scaled_f32(p, sa, convert: str, use_asm: bool):
  """``float32(p) * sa`` for an int32 partial sum ``p`` (|p| < 2^22) and a row scale ``sa (bm, 1)``.

  - ``'cast'``: convert, multiply.
  - ``'magic'``: ``y = bitcast_f32(p + 0x4B400000)`` is exactly ``1.5 * 2^23 + p``, so
    ``y - 1.5 * 2^23`` is exactly ``float(p)``: an integer add and a float add instead of the
    conversion instruction; then multiply.
  - ``'magic_fma'``: ``fma(y, sa, -1.5 * 2^23 * sa)`` in one instruction. Exact-equivalent to the
    others (``round(p * sa)``) when ``1.5 * 2^23 * sa`` is exact in float32, i.e. ``sa`` has at most 22
    significant bits: true for the integer vector scales of two-level scaling (``sa < 2^22``).
  """
  if convert == "cast":
    return p.astype(jnp.float32) * sa
  y = jax.lax.bitcast_convert_type(p + jnp.int32(_MAGIC_I), jnp.float32)
  if convert == "magic":
    return (y - jnp.float32(_MAGIC_F)) * sa
  if not use_asm:   # interpreter: the same value, (y - magic) is exact and the product rounds once
    return (y - jnp.float32(_MAGIC_F)) * sa
  sab = jnp.broadcast_to(sa, p.shape)
  return _fma(y, sab, jnp.broadcast_to(sa * jnp.float32(-_MAGIC_F), p.shape), True)


def _grouped_tile(pid, nm: int, nn: int, group: int):
  """Program id -> (row block, column block), ``group`` row blocks at a time (L2 reuse of W tiles)."""
  width = group * nn
  first = (pid // width) * group
  size = jnp.minimum(nm - first, group)
  return first + (pid % width) % size, (pid % width) // size


def _gemm_kernel(a_ref, w_ref, sa_ref, sw_ref, ca_ref, cw_ref, o_ref, *, v: int, kdot: int,
                 steps: int, per_step: int, convert: str, use_asm: bool, w_nk: bool, prefetch: int):
  bm, bn = o_ref.shape

  def scales(s):  # the vector scales of loop step s: per_step columns of sa, per_step rows of sw
    gs = [s * per_step + u for u in range(per_step)]
    return (tuple(sa_ref[:, pl.ds(g, 1)] for g in gs), tuple(sw_ref[pl.ds(g, 1), :] for g in gs))

  def body(s, carry):
    acc, pending = carry[0], carry[1:]
    if prefetch:   # load the scales of step s + prefetch now; use those loaded `prefetch` steps ago
      cur, pending = pending[0], pending[1:] + (scales(s + prefetch),)
    else:
      cur = scales(s)
    for u in range(per_step):                       # unrolled: per_step vectors per loop iteration
      p = _vector_dot(a_ref, w_ref, s * per_step + u, v, kdot, w_nk)   # (bm, bn) int32
      acc = acc + _scaled_f32(p, cur[0][u], convert, use_asm) * cur[1][u]
    return (acc,) + pending

  init = (jnp.zeros((bm, bn), jnp.float32),) + tuple(scales(i) for i in range(prefetch))
  acc = jax.lax.fori_loop(0, steps, body, init)[0]
  o_ref[...] = acc * ca_ref[...] * cw_ref[...]


def vs_int8_matmul(a_codes: jax.Array, a_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                   *, vector_size: int, a_coarse: jax.Array | float = 1.0,
                   w_coarse: jax.Array | float = 1.0, block_m: int | None = None,
                   block_n: int | None = None, vectors_per_step: int | None = None, group_m: int = 8,
                   num_warps: int | None = None, num_stages: int | None = None,
                   integer_scales: bool = False, convert: str | None = None,
                   min_dot_k: int | None = None, w_layout: str | None = None,
                   prefetch: int | None = None, interpret: bool | None = None) -> jax.Array:
  """Per-vector scaled int8 GEMM ``(M, K) x (K, N) -> float32 (M, N)`` (VS-Quant, Sec. 3) in Pallas.

  ``out[m, n] = a_coarse[m] * w_coarse[n] * sum_g a_scale[m, g] * w_scale[g, n] * P_g[m, n]`` where
  ``P_g`` is the exact int32 product of vector ``g`` (V consecutive elements of K).

  Args:
    a_codes: int8 activation codes ``(M, K)``.
    a_scale: per-vector activation scales ``(M, ceil(K / V))`` (integer-valued for two-level scales,
      or the float scales themselves).
    w_codes: int8 weight codes ``(K, N)``.
    w_scale: per-vector weight scales ``(ceil(K / V), N)``.
    vector_size: V, one of 16, 32, 64, 128.
    a_coarse: float scale per activation row, shape ``(M,)``, ``(M, 1)`` or scalar.
    w_coarse: float scale per output channel, shape ``(N,)``, ``(1, N)`` or scalar.
    block_m, block_n: output tile (powers of two >= 16); default :func:`default_config`.
    vectors_per_step: vectors per iteration of the K loop (unrolled; a K block of this many V).
      None (and the block sizes, ``num_warps``, ``num_stages`` when None): :func:`default_config`.
    group_m: row blocks visited together (tile order for L2 reuse).
    num_warps, num_stages: Triton launch/pipelining parameters.
    integer_scales: whether ``a_scale`` holds integers below 2^22 (two-level scaling), which allows
      the one-instruction ``'magic_fma'`` conversion.
    convert: int32 -> float32 conversion and row scaling of the partial sums, ``'magic'``,
      ``'magic_fma'`` (needs ``integer_scales``) or ``'cast'``, all exact up to the one rounding of
      ``p * a_scale`` (see :func:`_scaled_f32`); None: :func:`default_config`.
    min_dot_k: shortest K of one tensor-core product (32, 64 or 128); vectors shorter than that are
      multiplied in a ``min_dot_k`` block with the other vectors' weights masked (see
      :func:`_vector_dot`).
    w_layout: the weight layout inside the kernel: ``'kn'`` as given or ``'nk'`` (transposed by the
      wrapper; K-major, as Hopper's 8-bit tensor-core instructions read it).
    prefetch: load the vector scales this many K steps ahead (0, 1 or 2), so their memory latency
      hides behind the products of the steps in between.
    interpret: run in Pallas's interpreter; default: on every backend but the GPU.

  Returns:
    float32 ``(M, N)``.

  Example:
    >>> a = jnp.arange(-64, 64, dtype=jnp.int8).reshape(2, 64)
    >>> w = jnp.ones((64, 16), jnp.int8)
    >>> sa, sw = jnp.array([[1.0, 2.0], [3.0, 1.0]]), jnp.ones((2, 16))    # V=32: two vectors
    >>> out = vs_int8_matmul(a, sa, w, sw, vector_size=32)
    >>> out[:, 0].tolist()        # row 0: 1 * sum(-64..-33) + 2 * sum(-32..-1); row 1: 3 * sum(0..31) + sum(32..63)
    [-2576.0, 2960.0]
  """
  m, k, n, g = _check_args(a_codes, a_scale, w_codes, w_scale, vector_size)
  cfg = default_config(m, n, vector_size)
  if convert is None:
    convert = cfg["convert_integer_scales" if integer_scales else "convert"]
  check_choice("convert", convert, CONVERSIONS)
  if convert == "magic_fma" and not integer_scales:
    raise ValueError("convert='magic_fma' is exact only for integer activation vector scales below "
                     "2^22 (two-level scaling); pass integer_scales=True if a_scale holds such "
                     "integers, or use convert='magic'.")
  bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
  vectors_per_step = vectors_per_step or cfg["vectors_per_step"]
  num_warps, num_stages = num_warps or cfg["num_warps"], num_stages or cfg["num_stages"]
  check_int("vectors_per_step", vectors_per_step, 1, 16)
  check_int("group_m", group_m, 1)
  for name, b in (("block_m", bm), ("block_n", bn)):
    check_int(name, b, 16, 512)
    if b & (b - 1):
      raise ValueError(f"{name} must be a power of two (Triton tiles), got {b}.")
  if interpret is None:
    interpret = not on_gpu()
  v = vector_size
  min_dot_k = min_dot_k or cfg["min_dot_k"]
  check_choice("min_dot_k", min_dot_k, MIN_DOT_KS)
  kdot = max(v, min_dot_k)
  w_layout = w_layout or cfg["w_layout"]
  check_choice("w_layout", w_layout, ("kn", "nk"))
  prefetch = cfg["prefetch"] if prefetch is None else prefetch
  check_int("prefetch", prefetch, 0, 2)
  unit = math.lcm(vectors_per_step, kdot // v)
  gp = -(-g // unit) * unit                                 # whole loop steps and whole dot blocks
  steps = gp // vectors_per_step
  mp, np_, kp = -(-m // bm) * bm, -(-n // bn) * bn, gp * v
  a = _pad_to(a_codes, (mp, kp))
  w = _pad_to(w_codes, (kp, np_))
  if w_layout == "nk":
    w = w.T
  # Scales: prefetch steps of zero padding past the end, so the last prefetches stay in bounds.
  gs = gp + prefetch * vectors_per_step
  sa = _pad_to(jnp.asarray(a_scale, jnp.float32), (mp, gs))           # (M, G): a column per vector
  sw = _pad_to(jnp.asarray(w_scale, jnp.float32), (gs, np_))          # (G, N): a row per vector
  ca = _pad_to(jnp.broadcast_to(jnp.reshape(jnp.asarray(a_coarse, jnp.float32), (-1, 1)), (m, 1)), (mp, 1))
  cw = _pad_to(jnp.broadcast_to(jnp.reshape(jnp.asarray(w_coarse, jnp.float32), (1, -1)), (1, n)), (1, np_))
  nm, nn = mp // bm, np_ // bn
  tile = functools.partial(_grouped_tile, nm=nm, nn=nn, group=min(group_m, nm))

  def row(pid):
    return tile(pid)[0]

  def col(pid):
    return tile(pid)[1]

  kernel = functools.partial(_gemm_kernel, v=v, kdot=kdot, steps=steps, per_step=vectors_per_step,
                             convert=convert, use_asm=not interpret, w_nk=w_layout == "nk",
                             prefetch=prefetch)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
      grid=(nm * nn,),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda p: (row(p), 0)),
          (pl.BlockSpec((bn, kp), lambda p: (col(p), 0)) if w_layout == "nk"
           else pl.BlockSpec((kp, bn), lambda p: (0, col(p)))),
          pl.BlockSpec((bm, gs), lambda p: (row(p), 0)),
          pl.BlockSpec((gs, bn), lambda p: (0, col(p))),
          pl.BlockSpec((bm, 1), lambda p: (row(p), 0)),
          pl.BlockSpec((1, bn), lambda p: (0, col(p))),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda p: (row(p), col(p))),
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
      interpret=interpret,
      name=f"vs_int8_gemm_v{v}_{w_layout}",
  )(a, w, sa, sw, ca, cw)
  return out[:m, :n]


def _partials_kernel(a_ref, w_ref, o_ref, *, v: int, kdot: int, w_nk: bool):
  o_ref[...] = _vector_dot(a_ref, w_ref, pl.program_id(2), v, kdot, w_nk)


def vs_int8_partial_sums(a_codes: jax.Array, w_codes: jax.Array, *, vector_size: int,
                         block_m: int | None = None, block_n: int | None = None,
                         min_dot_k: int | None = None, w_layout: str | None = None,
                         interpret: bool | None = None) -> jax.Array:
  """The int32 partial sums ``P_g = A[:, vector g] @ W[vector g, :]``, shape ``(G, M, N)``.

  The same tensor-core step (:func:`_vector_dot`) as :func:`vs_int8_matmul`, written out instead of
  scaled and accumulated: for checking the kernel's integer arithmetic exactly against XLA.

  Example:
    >>> a, w = jnp.ones((16, 64), jnp.int8), jnp.full((64, 16), 2, jnp.int8)
    >>> vs_int8_partial_sums(a, w, vector_size=32)[:, 0, 0].tolist()   # two vectors of 32 x (1 * 2)
    [64, 64]
  """
  g0 = -(-a_codes.shape[1] // vector_size)
  m, k, n, g = _check_args(a_codes, jnp.zeros((a_codes.shape[0], g0)), w_codes,
                           jnp.zeros((g0, w_codes.shape[1])), vector_size)
  cfg = default_config(m, n, vector_size)
  bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
  if interpret is None:
    interpret = not on_gpu()
  min_dot_k = min_dot_k or cfg["min_dot_k"]
  check_choice("min_dot_k", min_dot_k, MIN_DOT_KS)
  kdot = max(vector_size, min_dot_k)
  w_layout = w_layout or cfg["w_layout"]
  check_choice("w_layout", w_layout, ("kn", "nk"))
  gp = -(-g // (kdot // vector_size)) * (kdot // vector_size)
  mp, np_, kp = -(-m // bm) * bm, -(-n // bn) * bn, gp * vector_size
  a = _pad_to(a_codes, (mp, kp))
  w = _pad_to(w_codes, (kp, np_))
  w_nk = w_layout == "nk"
  out = pl.pallas_call(
      functools.partial(_partials_kernel, v=vector_size, kdot=kdot, w_nk=w_nk),
      out_shape=jax.ShapeDtypeStruct((g, mp, np_), jnp.int32),
      grid=(mp // bm, np_ // bn, g),
      in_specs=[pl.BlockSpec((bm, kp), lambda i, j, gg: (i, 0)),
                (pl.BlockSpec((bn, kp), lambda i, j, gg: (j, 0)) if w_nk
                 else pl.BlockSpec((kp, bn), lambda i, j, gg: (0, j)))],
      out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, gg: (gg, i, j)),
      compiler_params=None if interpret else _compiler_params(None, None),
      interpret=interpret,
      name=f"vs_int8_partials_v{vector_size}",
  )(a, w.T if w_nk else w)
  return out[:, :m, :n]
