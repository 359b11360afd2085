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
import numpy as np
from jax.experimental import pallas as pl

from mlsys_jax._compat import run_outside_traces, triton_compiler_params
from mlsys_jax._checks import check_choice, check_int
from mlsys_jax.quant import _mgpu_gemm, _triton_hooks

__all__ = ["SUPPORTED_VECTOR_SIZES", "default_config", "fp8_vector_quantize", "kernel_self_test", "on_gpu",
           "pack_int4_vectors", "vs_fp8_matmul", "vs_int8_matmul", "vs_int8_partial_sums",
           "vs_w4a8_matmul"]

SUPPORTED_VECTOR_SIZES = (16, 32, 64, 128)
CONVERSIONS = ("magic", "magic_fma", "cast")
MIN_DOT_KS = (32, 64, 128)
_MAGIC_I = 0x4B400000          # bit pattern of 1.5 * 2^23
_MAGIC_F = 12582912.0          # 1.5 * 2^23: float(p) = bitcast(p + _MAGIC_I) - _MAGIC_F for |p| < 2^22


def on_gpu() -> bool:
  """Whether the default JAX backend is a GPU (where the kernel compiles through Triton)."""
  return jax.default_backend() == "gpu"


@functools.lru_cache(maxsize=None)
def kernel_self_test(vector_size: int) -> bool:
  """Once per process and V: compile the GEMM with its default launch parameters on a ragged problem
  (several tiles, K not a multiple of V) and check it against XLA: int32 partial sums identical, float32
  output within 1e-5 (relative norm) of XLA's per-vector product. On failure (a compile error or a
  mismatch) warn and return False, and ``quantized_dot_general`` keeps the XLA integer path.

  Example:
    >>> kernel_self_test(64)          # in the interpreter here; compiled through Triton on a GPU
    True
  """
  import warnings
  v = vector_size

  def check():
    m, k, n = 160, 4 * v + 24, 144
    ka, kw, ks, kt = jax.random.split(jax.random.PRNGKey(21), 4)
    a = jax.random.randint(ka, (m, k), -127, 128, jnp.int32).astype(jnp.int8)
    w = jax.random.randint(kw, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    g = -(-k // v)
    sa = jax.random.randint(ks, (m, g), 1, 256, jnp.int32).astype(jnp.float32)
    sw = jax.random.randint(kt, (g, n), 1, 256, jnp.int32).astype(jnp.float32)
    ca, cw = jnp.float32(0.01), jnp.linspace(0.5, 2.0, n, dtype=jnp.float32)
    ap = jnp.pad(a, ((0, 0), (0, g * v - k))).reshape(m, g, v)
    wp = jnp.pad(w, ((0, g * v - k), (0, 0))).reshape(g, v, n)
    ref_p = jax.lax.dot_general(ap, wp, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)
    ref = jnp.sum(ref_p.astype(jnp.float32) * sa.T[:, :, None] * sw[:, None, :], axis=0) * ca * cw
    out = vs_int8_matmul(a, sa, w, sw, vector_size=v, a_coarse=ca, w_coarse=cw, integer_scales=True)
    same_p = jnp.array_equal(vs_int8_partial_sums(a, w, vector_size=v), ref_p)
    return same_p, jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)

  try:
    same_p, err = run_outside_traces(jax.jit(check))
    if not (bool(same_p) and float(err) < 1e-5):
      raise RuntimeError(f"kernel and XLA differ (int32 partial sums identical: {bool(same_p)}, "
                         f"relative error of the output {float(err):.3g})")
    return True
  except Exception as e:
    warnings.warn(f"mlsys_jax.quant: the per-vector GEMM kernel (V={v}) failed its self-test ({e!r:.300});"
                  " using the XLA integer path.", RuntimeWarning, stacklevel=3)
    return False


def _pow2_at_least(x: int, low: int) -> int:
  return max(low, 1 << max(0, (x - 1).bit_length()))


# Launch parameters per V for large products. Run 1 on an H200 (2026-12-02,
# benchmarks/results/vsquant_gemm_h200.json) verified 256 x 128 'kn' tiles without prefetch (6.6 ms at
# 8192^3); offline sm_90a compiles of that configuration show the weight tile and the scales loaded
# synchronously every K step and register spills, while the one below pipelines both tiles, prefetches
# the scales and does not spill. It is not yet timed on a GPU: benchmarks/vsquant_gemm.py sweeps both
# and prints `best_config` to put here. The layer path only uses the kernel after `kernel_self_test`.
# H200 sweep of 2026-12-02 (benchmarks/results/vsquant_gemm_h200.json, best_config at V = 64, 8192^3)
_TUNED = {v: dict(block_m=64, block_n=128, vectors_per_step=1, num_warps=4, num_stages=3,
                  min_dot_k=32, convert="magic", convert_integer_scales="magic_fma",
                  w_layout="nk", prefetch=1, overlap=False)
          for v in SUPPORTED_VECTOR_SIZES}


def default_config(m: int, n: int, vector_size: int) -> dict:
  """Launch parameters for an ``M x N`` output: the tuned tile for V, shrunk to the next power of two
  (at least 16, the smallest tensor-core tile) for small M or N (decode shapes)."""
  cfg = dict(_TUNED.get(vector_size, _TUNED[64]))
  cfg["block_m"] = min(cfg["block_m"], _pow2_at_least(m, 16))
  cfg["block_n"] = min(cfg["block_n"], _pow2_at_least(n, 16))
  return cfg


_KINDS = {"int8": (jnp.int8, jnp.int8), "w4a8": (jnp.int8, jnp.int8),
          "fp8": (jnp.float8_e4m3fn, jnp.float8_e4m3fn)}


def _check_codes(name: str, x, dtype) -> None:
  if not hasattr(x, "dtype") or x.ndim != 2:
    raise ValueError(f"{name} must be a 2-D array of codes, got {getattr(x, 'shape', type(x))}.")
  if x.dtype != dtype:
    hint = ("quantize with bits <= 8 and cast with .astype(jnp.int8)" if dtype == jnp.int8 else
            "quantize with fp8_vector_quantize")
    raise TypeError(f"{name} must hold {jnp.dtype(dtype).name} codes, got {x.dtype}; {hint}.")


def _check_args(a_codes, a_scale, w_codes, w_scale, vector_size: int, kind: str = "int8"):
  _check_codes("a_codes", a_codes, _KINDS[kind][0])
  _check_codes("w_codes", w_codes, _KINDS[kind][1])
  if vector_size not in SUPPORTED_VECTOR_SIZES:
    raise ValueError(f"vector_size must be one of {SUPPORTED_VECTOR_SIZES} for the Pallas kernel, got "
                     f"{vector_size}; use the XLA integer path (quantized_dot_general) for other V.")
  if kind == "w4a8" and vector_size < 64:
    raise ValueError(f"W4A8 needs vector_size 64 or 128 (each vector's two packed halves are separate "
                     f"tensor-core products of K = V / 2 >= 32), got {vector_size}.")
  m, k = a_codes.shape
  g = -(-k // vector_size)
  k2, n = w_codes.shape
  if kind == "w4a8":
    if k2 != g * vector_size // 2:
      raise ValueError(f"w_codes must be int4 pairs packed by pack_int4_vectors: {g * vector_size // 2} "
                       f"rows for K={k} and V={vector_size}, got shape {w_codes.shape}.")
  elif k != k2:
    raise ValueError(f"contraction lengths differ: a_codes is {a_codes.shape} (K={k}) but w_codes is "
                     f"{w_codes.shape} (K={k2}).")
  if tuple(a_scale.shape) != (m, g):
    raise ValueError(f"a_scale must have shape (M, ceil(K / V)) = {(m, g)}, got {tuple(a_scale.shape)}.")
  if tuple(w_scale.shape) != (g, n):
    raise ValueError(f"w_scale must have shape (ceil(K / V), N) = {(g, n)}, got {tuple(w_scale.shape)}.")
  return m, k, n, g


def _pad_to(x, shape):
  widths = [(0, t - s) for s, t in zip(x.shape, shape)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _unpack_int4(b):
  """Signed int4 pairs in int8 bytes -> (low nibbles, high nibbles), each sign-extended to int8."""
  four = jnp.int8(4)
  lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(b, four), four)
  return lo, jax.lax.shift_right_arithmetic(b, four)


def _vector_dot(a_ref, w_ref, g, v: int, kdot: int, w_nk: bool, w4: bool = False):
  """Partial sum of vector ``g``: ``A[:, gV:(g+1)V] @ W[gV:(g+1)V, :]`` on the tensor cores (int32
  for int8 codes, float32 for fp8 codes).

  ``w_nk``: the weight block is stored ``(block_n, K)`` (K-major, the operand layout Hopper's 8-bit
  tensor-core instructions read) instead of ``(K, block_n)``. With ``kdot > v`` the product runs over
  the ``kdot``-wide K block holding vector ``g`` with the weight entries of the other vectors zeroed:
  exact, at ``kdot / v`` times the tensor-core work. (Triton's int8 products need K >= 32: with K = 16
  the H200 returned wrong sums, so ``kdot`` is at least 32.) ``w4``: the weights are int4 pairs (see
  :func:`pack_int4_vectors`): byte row ``j`` of vector ``g`` holds elements ``j`` (low nibble) and
  ``V/2 + j`` (high nibble), so the vector is two products of K = V/2 on the unpacked halves.
  """
  acc_t = jnp.int32 if a_ref.dtype == jnp.int8 else jnp.float32

  def multiple_of(x, m):   # an alignment hint for traced offsets (a Python int needs none)
    return x if isinstance(x, int) else pl.multiple_of(x, m)

  if w4:
    h = v // 2
    lo, hi = _unpack_int4(w_ref[pl.ds(multiple_of(g * h, h), h), :])
    k0 = multiple_of(g * v, v)
    return (jax.lax.dot(a_ref[:, pl.ds(k0, h)], lo, preferred_element_type=acc_t)
            + jax.lax.dot(a_ref[:, pl.ds(k0 + h, h)], hi, preferred_element_type=acc_t))
  dn = (((1,), (1,)), ((), ())) if w_nk else (((1,), (0,)), ((), ()))
  r = kdot // v
  if r == 1:
    k0 = multiple_of(g * v, v)
  elif isinstance(g, int):
    k0 = (g // r) * kdot
  else:
    k0 = pl.multiple_of(jax.lax.div(g, jnp.int32(r)) * kdot, kdot)
  a = a_ref[:, pl.ds(k0, kdot)]
  w = w_ref[:, pl.ds(k0, kdot)] if w_nk else w_ref[pl.ds(k0, kdot), :]
  if r > 1:
    axis = 1 if w_nk else 0
    sub = jax.lax.broadcasted_iota(jnp.int32, w.shape, axis) // v
    w = jnp.where(sub == (g % r if isinstance(g, int) else jax.lax.rem(g, jnp.int32(r))), w,
                  jnp.zeros_like(w))
  return jax.lax.dot_general(a, w, dn, preferred_element_type=acc_t)


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
  if p.dtype == jnp.float32:       # fp8 products arrive in float32
    return p * sa
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
                 steps: int, per_step: int, convert: str, use_asm: bool, w_nk: bool, prefetch: int,
                 w4: bool, overlap: bool):
  bm, bn = o_ref.shape

  def scales(s):  # the vector scales of loop step s: per_step columns of sa, per_step rows of sw
    gs = [s * per_step + u for u in range(per_step)]
    return (tuple(sa_ref[:, pl.ds(g, 1)] for g in gs), tuple(sw_ref[pl.ds(g, 1), :] for g in gs))

  def dot(g):
    return _vector_dot(a_ref, w_ref, g, v, kdot, w_nk, w4)                # (bm, bn)

  def body(s, carry):
    acc, nxt, pending = carry[0], carry[1], carry[2:]
    if prefetch:   # load the scales of step s + prefetch now; use those loaded `prefetch` steps ago
      cur, pending = pending[0], pending[1:] + (scales(s + prefetch),)
    else:
      cur = scales(s)
    if overlap:    # issue the product of step s + 1 before scaling the one of step s (one vector/step)
      p_now, nxt = nxt, dot(s + 1)
      return (acc + _scaled_f32(p_now, cur[0][0], convert, use_asm) * cur[1][0], nxt) + pending
    for u in range(per_step):                       # unrolled: per_step vectors per loop iteration
      acc = acc + _scaled_f32(dot(s * per_step + u), cur[0][u], convert, use_asm) * cur[1][u]
    return (acc, nxt) + pending

  first = dot(0) if overlap else jnp.zeros((), jnp.int32)
  init = (jnp.zeros((bm, bn), jnp.float32), first) + tuple(scales(i) for i in range(prefetch))
  acc = jax.lax.fori_loop(0, steps, body, init)[0]
  o_ref[...] = acc * ca_ref[...] * cw_ref[...]


def vs_int8_matmul(a_codes: jax.Array, a_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                   *, vector_size: int, **kwargs) -> jax.Array:
  """Per-vector scaled int8 GEMM ``(M, K) x (K, N) -> float32 (M, N)`` (VS-Quant, Sec. 3) in Pallas.

  ``out[m, n] = a_coarse[m] * w_coarse[n] * sum_g a_scale[m, g] * w_scale[g, n] * P_g[m, n]`` where
  ``P_g`` is the exact int32 product of vector ``g`` (V consecutive elements of K). Keyword arguments
  as in :func:`_vs_gemm`.

  Args:
    a_codes: int8 activation codes ``(M, K)``.
    a_scale: per-vector activation scales ``(M, ceil(K / V))`` (integer-valued for two-level scales,
      or the float scales themselves).
    w_codes: int8 weight codes ``(K, N)``.
    w_scale: per-vector weight scales ``(ceil(K / V), N)``.
    vector_size: V, one of 16, 32, 64, 128.

  Returns:
    float32 ``(M, N)``.

  Example:
    >>> a = jnp.arange(-64, 64, dtype=jnp.int8).reshape(2, 64)
    >>> w = jnp.ones((64, 16), jnp.int8)
    >>> sa, sw = jnp.array([[1.0, 2.0], [3.0, 1.0]]), jnp.ones((2, 16))    # V=32: two vectors
    >>> out = vs_int8_matmul(a, sa, w, sw, vector_size=32)
    >>> out[:, 0].tolist()   # 1 * sum(-64..-33) + 2 * sum(-32..-1); 3 * sum(0..31) + sum(32..63)
    [-2608.0, 3008.0]
  """
  return _vs_gemm(a_codes, a_scale, w_codes, w_scale, vector_size=vector_size, kind="int8", **kwargs)


def vs_w4a8_matmul(a_codes: jax.Array, a_scale: jax.Array, w_packed: jax.Array, w_scale: jax.Array,
                   *, vector_size: int, **kwargs) -> jax.Array:
  """W4A8 per-vector GEMM: int8 activation codes times int4 weight codes packed two per byte
  (:func:`pack_int4_vectors`), unpacked in the kernel (shift, sign-extend) and multiplied as int8 on
  the tensor cores; half the weight bytes of :func:`vs_int8_matmul`, the same int32 partial sums.
  VS-Quant's 4-bit weights with 8-bit activations (Dai et al., MLSys 2021, Sec. 5). ``vector_size``
  64 or 128; other arguments as in :func:`vs_int8_matmul`.

  Example:
    >>> w4 = (jnp.arange(64 * 16) % 15 - 7).astype(jnp.int8).reshape(64, 16)       # int4 codes
    >>> a = jnp.ones((2, 64), jnp.int8)
    >>> sa, sw = jnp.ones((2, 1)), jnp.ones((1, 16))
    >>> out = vs_w4a8_matmul(a, sa, pack_int4_vectors(w4, 64), sw, vector_size=64)
    >>> bool(jnp.array_equal(out, vs_int8_matmul(a, sa, w4, sw, vector_size=64)))
    True
  """
  return _vs_gemm(a_codes, a_scale, w_packed, w_scale, vector_size=vector_size, kind="w4a8", **kwargs)


def vs_fp8_matmul(a_codes: jax.Array, a_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
                  *, vector_size: int = 128, w_block: int | None = None, **kwargs) -> jax.Array:
  """FP8 (E4M3) GEMM with per-block scales along K, as deployed on Hopper (DeepSeek-V3 / DeepGEMM:
  1 x 128 activation tiles, 128 x 128 weight blocks): each K block's float32 tensor-core product is
  scaled by ``a_scale[:, g] * w_scale[g, n]`` and accumulated in float32. Codes from
  :func:`fp8_vector_quantize` (per-vector weight scales, ``w_scale`` of shape ``(G, N)``) or, with
  ``w_block=128``, from :func:`fp8_block_quantize` (one weight scale per ``V x w_block`` block, ``w_scale``
  of shape ``(G, ceil(N / w_block))``): the same sum with ``w_scale[g, n // w_block]``. On Hopper the
  Mosaic kernel then folds each block with one fused multiply-add per element (H200, 8192^3, one run:
  1.018 ms vs 1.230 ms with per-vector weight scales; ``benchmarks/results/vsquant_mgpu_h200_s12b.json``);
  elsewhere the block scales are repeated per column and the per-vector path runs (the same result).

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (16, 256))
    >>> w = jax.random.normal(jax.random.PRNGKey(1), (256, 16))
    >>> (ca, sa), (cw, sw) = fp8_vector_quantize(x, 1, 128), fp8_vector_quantize(w, 0, 128)
    >>> y = vs_fp8_matmul(ca, sa, cw, sw)
    >>> bool(jnp.linalg.norm(y - x @ w) < 0.05 * jnp.linalg.norm(x @ w))        # E4M3: ~3% error
    True
  """
  return _vs_gemm(a_codes, a_scale, w_codes, w_scale, vector_size=vector_size, kind="fp8", w_block=w_block,
                  **kwargs)


def fp8_block_quantize(w: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
  """E4M3 codes of a ``(K, N)`` weight with one float32 scale per ``block x block`` tile (DeepGEMM's weight
  format; the input of ``vs_fp8_matmul(..., w_block=block)`` with ``vector_size=block``). Returns
  ``(codes (K, N), scales (ceil(K / block), ceil(N / block)))``.

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (16, 256))
    >>> w = jax.random.normal(jax.random.PRNGKey(1), (256, 200))
    >>> (ca, sa), (cw, sw) = fp8_vector_quantize(x, 1, 128), fp8_block_quantize(w)
    >>> sw.shape
    (2, 2)
    >>> y = vs_fp8_matmul(ca, sa, cw, sw, w_block=128)
    >>> bool(jnp.linalg.norm(y - x @ w) < 0.05 * jnp.linalg.norm(x @ w))
    True
  """
  return _mgpu_gemm.fp8_block_quantize(w, block)


def pack_int4_vectors(w_codes: jax.Array, vector_size: int) -> jax.Array:
  """Pack int4 weight codes ``(K, N)`` (values in [-8, 7], any integer dtype) two per int8 byte, in
  the layout :func:`vs_w4a8_matmul` reads: K is zero-padded to whole vectors; byte row ``j`` of vector
  ``g`` holds element ``gV + j`` in its low nibble and ``gV + V/2 + j`` in its high nibble. Returns
  ``(ceil(K / V) * V / 2, N)`` int8.

  Example:
    >>> pack_int4_vectors(jnp.array([[1], [-2], [3], [-8]]), 2)[:, 0].tolist()   # (1, -2) and (3, -8)
    [-31, -125]
  """
  if vector_size % 2:
    raise ValueError(f"vector_size must be even to pack int4 pairs, got {vector_size}.")
  w = jnp.asarray(w_codes)
  if not jnp.issubdtype(w.dtype, jnp.integer):
    raise TypeError(f"w_codes must be integer int4 codes, got {w.dtype}.")
  k, n = w.shape
  g = -(-k // vector_size)
  w = _pad_to(w.astype(jnp.int32), (g * vector_size, n)).reshape(g, 2, vector_size // 2, n)
  byte = (w[:, 0] & 15) | ((w[:, 1] & 15) << 4)
  return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8).reshape(-1, n)


def fp8_vector_quantize(x: jax.Array, axis: int, vector_size: int = 128):
  """E4M3 codes and float32 per-vector scales (``amax / 448`` per V elements along ``axis``) of a 2-D
  ``x``: returns ``(codes, scales)`` with codes shaped like ``x`` (K zero-padded to whole vectors is
  not kept) and scales ``(M, G)`` for ``axis=1`` (activations) or ``(G, N)`` for ``axis=0`` (weights).

  Example:
    >>> codes, scales = fp8_vector_quantize(jnp.arange(8.0).reshape(1, 8), 1, 4)
    >>> str(codes.dtype), scales.shape
    ('float8_e4m3fn', (1, 2))
  """
  from mlsys_jax.quant.vsquant import _merge, _split
  xs, k = _split(jnp.asarray(x, jnp.float32), axis, vector_size, True)
  amax = jnp.max(jnp.abs(xs), axis=axis + 1, keepdims=True)
  s = jnp.where(amax > 0, amax / 448.0, 1.0)
  codes = _merge((xs / s).astype(jnp.float8_e4m3fn), axis, k)
  return codes, jnp.squeeze(s, axis + 1)


def _vs_gemm(a_codes: jax.Array, a_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array,
             *, vector_size: int, kind: str = "int8", a_coarse: jax.Array | float = 1.0,
             w_coarse: jax.Array | float = 1.0, block_m: int | None = None,
             block_n: int | None = None, vectors_per_step: int | None = None, group_m: int = 8,
             num_warps: int | None = None, num_stages: int | None = None,
             integer_scales: bool = False, convert: str | None = None,
             min_dot_k: int | None = None, w_layout: str | None = None,
             prefetch: int | None = None, overlap: bool | None = None,
             imprecise_acc: int | None = None, interpret: bool | None = None,
             backend: str | None = None, w_block: int | None = None) -> jax.Array:
  """The kernels' shared wrapper: checks, padding, launch. Public entry points: :func:`vs_int8_matmul`,
  :func:`vs_w4a8_matmul`, :func:`vs_fp8_matmul` (``kind`` 'int8', 'w4a8', 'fp8').

  Args:
    a_codes, a_scale, w_codes, w_scale, vector_size: see :func:`vs_int8_matmul`.
    kind: operand format.
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
    overlap: issue the tensor-core product of the next K step before scaling and accumulating the
      current one (the int32 partial sum is carried across the loop), so the float epilogue can run
      while the product is in flight; needs ``vectors_per_step=1``.
    imprecise_acc: FP8 only: Triton's ``maxNumImpreciseAcc`` for each tensor-core product (one K block
      of ``max(V, min_dot_k)``), set through :mod:`mlsys_jax.quant._triton_hooks`: 0 keeps Triton's
      default for Pallas (a float32 accumulator inside the MMA, which rules out Hopper's ``wgmma``:
      ``mma.sync``); ``>= 32`` allows ``wgmma`` with its FP8 accumulator, promoted to float32 every
      ``imprecise_acc`` elements (each block's product is then scaled and summed in float32, as in
      DeepGEMM).
    interpret: run in Pallas's interpreter; default: on every backend but the GPU.
    w_block: FP8 only: ``w_scale`` holds one scale per ``V x w_block`` weight block, shape ``(G, ceil(N /
      w_block))`` (see :func:`vs_fp8_matmul`); the Mosaic kernel reads it as is (``w_block`` a multiple of 128),
      the other paths repeat it per column.
    backend: ``'triton'`` (this module's kernel), ``'mosaic'`` (:mod:`._mgpu_gemm`: Hopper ``wgmma`` fed by a
      TMA ring, two compute warpgroups; int8 with V = 64 / 128 and FP8 with V = 128; the launch knobs above do
      not apply to it) or None / ``'auto'``: Mosaic on a Hopper GPU where it passed its once-per-process
      self-test (:func:`._mgpu_gemm.kernel_self_test`) and no Triton knob or ``interpret`` was given, else
      Triton. H200, 8192^3 (``benchmarks/vsquant_mgpu.py``): the Mosaic kernel (persistent CTAs, the default
      since session 12) FP8 per-block 1.19-1.27 ms, int8 V=64 2.06-2.11 ms; the Triton kernel (session 10)
      2.08-2.19 ms and 3.40 ms.

  Returns:
    float32 ``(M, N)``.

  Example:
    >>> a, w = jnp.ones((2, 64), jnp.int8), jnp.full((64, 16), 3, jnp.int8)
    >>> _vs_gemm(a, jnp.ones((2, 1)), w, jnp.ones((1, 16)), vector_size=64, w_coarse=0.5)[0, 0].tolist()
    96.0
  """
  check_choice("kind", kind, tuple(_KINDS))
  w_block_scale = None
  if w_block is not None:
    if kind != "fp8":
      raise ValueError(f"w_block (one scale per weight block) is an FP8 format; got kind={kind!r}. Pass per-vector "
                       f"weight scales of shape (G, N) instead.")
    check_int("w_block", w_block, 1)
    if w_codes.ndim != 2:
      raise ValueError(f"w_codes must be 2-D (K, N), got shape {w_codes.shape}.")
    nb = -(-w_codes.shape[1] // w_block)
    w_block_scale = jnp.asarray(w_scale, jnp.float32)
    if w_block_scale.ndim != 2 or w_block_scale.shape[1] != nb:
      raise ValueError(f"with w_block={w_block}, w_scale must be (G, ceil(N / w_block)) = (G, {nb}) for N = "
                       f"{w_codes.shape[1]}, got shape {w_block_scale.shape}. fp8_block_quantize(w, {w_block}) "
                       f"makes such scales.")
    w_scale = jnp.repeat(w_block_scale, w_block, axis=1)[:, :w_codes.shape[1]]   # the per-vector equivalent
  m, k, n, g = _check_args(a_codes, a_scale, w_codes, w_scale, vector_size, kind)
  backend = backend or "auto"
  check_choice("backend", backend, ("auto", "triton", "mosaic"))
  knobs = {name: val for name, val in dict(block_m=block_m, block_n=block_n, vectors_per_step=vectors_per_step,
                                           num_warps=num_warps, num_stages=num_stages, convert=convert,
                                           min_dot_k=min_dot_k, w_layout=w_layout, prefetch=prefetch,
                                           overlap=overlap, imprecise_acc=imprecise_acc,
                                           interpret=interpret).items() if val is not None}
  mosaic_runs = vector_size in _mgpu_gemm.VECTOR_SIZES.get(kind, ())
  if backend == "mosaic":
    if not mosaic_runs or knobs:
      raise ValueError(f"backend='mosaic' runs int8 (V = 64, 128) and fp8 (V = 128) without Triton launch knobs; "
                       f"got kind={kind!r}, vector_size={vector_size}, knobs={sorted(knobs)}. Use "
                       f"backend='triton' for these.")
    if not _mgpu_gemm.available():
      raise ValueError("backend='mosaic' needs a Hopper GPU (compute capability 9.x); use backend='triton' or "
                       "leave backend=None to pick automatically.")
  use_mosaic = backend == "mosaic" or (
      backend == "auto" and not knobs and mosaic_runs and _mgpu_gemm.kernel_self_test(kind, vector_size))
  if use_mosaic:
    if w_block_scale is not None and w_block % _mgpu_gemm.default_config(kind, vector_size).tile_n == 0:
      out = _mgpu_gemm.scaled_matmul(a_codes, jnp.asarray(a_scale, jnp.float32), w_codes, w_block_scale,
                                     vector_size=vector_size, w_block=w_block)
    else:
      out = _mgpu_gemm.scaled_matmul(a_codes, jnp.asarray(a_scale, jnp.float32), w_codes,
                                     jnp.asarray(w_scale, jnp.float32), vector_size=vector_size)
    ca = jnp.reshape(jnp.asarray(a_coarse, jnp.float32), (-1, 1))
    cw = jnp.reshape(jnp.asarray(w_coarse, jnp.float32), (1, -1))
    return out * ca * cw
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
  w4 = kind == "w4a8"
  if w4:
    w_layout, kdot = "kn", v       # packed halves: two products of K = V/2 per vector
  prefetch = cfg["prefetch"] if prefetch is None else prefetch
  check_int("prefetch", prefetch, 0, 2)
  overlap = cfg["overlap"] if overlap is None else bool(overlap)
  if imprecise_acc and kind != "fp8":
    raise ValueError(f"imprecise_acc applies to FP8 products only (kind='fp8'), got kind={kind!r}; leave it "
                     f"None.")
  imprecise_acc = cfg.get("imprecise_acc", 0) if imprecise_acc is None or kind != "fp8" else imprecise_acc
  check_int("imprecise_acc", imprecise_acc, 0, 1 << 30)
  if imprecise_acc and not interpret:
    _triton_hooks.install()
  if overlap and vectors_per_step != 1:
    raise ValueError(f"overlap=True needs vectors_per_step=1, got {vectors_per_step}.")
  unit = math.lcm(vectors_per_step, kdot // v)
  gp = -(-g // unit) * unit                                 # whole loop steps and whole dot blocks
  steps = gp // vectors_per_step
  # overlap: the last step issues one product past the end, which reads a zero-padded K block.
  kp = (gp + (kdot // v if overlap else 0)) * v
  mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
  a = _pad_to(a_codes, (mp, kp))
  w = _pad_to(w_codes, (kp // 2 if w4 else kp, np_))
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
                             prefetch=prefetch, w4=w4, overlap=overlap)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.float32),
      grid=(nm * nn,),
      in_specs=[
          pl.BlockSpec((bm, kp), lambda p: (row(p), 0)),
          (pl.BlockSpec((bn, kp), lambda p: (col(p), 0)) if w_layout == "nk"
           else pl.BlockSpec((w.shape[0], bn), lambda p: (0, col(p)))),
          pl.BlockSpec((bm, gs), lambda p: (row(p), 0)),
          pl.BlockSpec((gs, bn), lambda p: (0, col(p))),
          pl.BlockSpec((bm, 1), lambda p: (row(p), 0)),
          pl.BlockSpec((1, bn), lambda p: (0, col(p))),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda p: (row(p), col(p))),
      compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name=_triton_hooks.kernel_name(f"vs_{kind}_gemm_v{v}_{w_layout}", 0,
                                     imprecise_acc if kind == "fp8" else 0),
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
      compiler_params=None if interpret else triton_compiler_params(None, None),
      interpret=interpret,
      name=f"vs_int8_partials_v{vector_size}",
  )(a, w.T if w_nk else w)
  return out[:, :m, :n]
