"""Weight-only int4 quantization (W4A16): packed int4 weights with per-group scales, and their matmul.

Per-group (per-vector) scaling along the contraction axis is VS-Quant's idea (Dai, Venkatesan, Ren,
Zimmer, Dally and Khailany, "VS-Quant: Per-vector Scaled Quantization for Accurate Low-Precision Neural
Network Inference", MLSys 2021, Sec. 3, Eq. 1-2): each vector of V = ``group_size`` consecutive weights
along K gets its own scale ``s = amax / 7`` and symmetric 4-bit codes ``c = clip(round(w / s), -7, 7)``;
a dot product of length K becomes K / V partial sums each multiplied by its scale. Here only the weights
are quantized (activations stay bf16/float32), which is what small-batch decoding wants: at batch 1-16 the
matmul is bound by reading the weights, and packed int4 reads 4x fewer bytes than bf16.

Format (:class:`Int4Weights`): ``words (K/8, N)`` uint32, eight codes per word in offset binary
(``c + 8``); K is cut into blocks of 128 and in block ``t`` word row ``16 t + j`` holds, in nibble ``i``
(bits ``4i .. 4i+3``), element ``k = 128 t + 16 i + j``; ``scales (K / group_size, N)`` in bfloat16
(default) or float32. K must be a multiple of 128 and of ``group_size`` (pad W with zero rows and x with
zero columns otherwise).

:func:`w4a16_matmul` computes ``x @ dequantize(packed)`` in float32: on a GPU with batch <= 16 through a
Pallas Triton GEMV kernel (:mod:`mlsys_jax.quant._pallas_gemv`) after a once-per-process self-test
against the XLA path, otherwise (and as reference) by dequantizing to float32 and one XLA dot at
``Precision.HIGHEST``.

Non-finite weights: concrete arrays raise ``ValueError`` in :func:`pack_int4`; under tracing a group
holding NaN/inf gets a NaN scale, so every output that touches it is NaN (never a silent zero).
"""

from __future__ import annotations

import functools
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mlsys_jax._checks import check_choice, check_finite, check_rank
from mlsys_jax._compat import run_outside_traces
from mlsys_jax.quant import _pallas_gemv

__all__ = ["Int4Weights", "dequantize_int4", "kernel_self_test", "pack_int4", "w4a16_matmul"]

BLOCK_K = _pallas_gemv.BLOCK_K
QMAX = 7
MAX_KERNEL_BATCH = 16


class Int4Weights(typing.NamedTuple):
  """Packed symmetric int4 weights ``(K, N)`` with per-group scales along K (a pytree of two arrays).

  Attributes:
    words: ``(K / 8, N)`` uint32, eight offset-binary codes per word (layout in the module docstring).
    scales: ``(K / group_size, N)`` float scales; element ``k`` of column ``n`` is
      ``(code - 8) * scales[k // group_size, n]``.

  Example:
    >>> p = pack_int4(jnp.ones((256, 4)), group_size=64)
    >>> p.words.shape, p.scales.shape, p.k, p.n, p.group_size
    ((32, 4), (4, 4), 256, 4, 64)
  """
  words: jax.Array
  scales: jax.Array

  @property
  def k(self) -> int:
    return 8 * self.words.shape[-2]

  @property
  def n(self) -> int:
    return self.words.shape[-1]

  @property
  def group_size(self) -> int:
    return self.k // self.scales.shape[-2]

  def nbytes(self) -> int:
    """Bytes of the packed words plus the scales (what a matmul reads from memory)."""
    return int(np.prod(self.words.shape)) * 4 + int(np.prod(self.scales.shape)) * jnp.dtype(
        self.scales.dtype).itemsize


def _check_group_size(group_size, k: int) -> int:
  if group_size is None:
    return k
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise TypeError(f"group_size must be an int (a power of two >= 16) or None (one scale per output "
                    f"column), got {type(group_size).__name__}.")
  if group_size < 16 or group_size & (group_size - 1):
    raise ValueError(f"group_size must be a power of two >= 16 (or None for one scale per column), got "
                     f"{group_size}.")
  if k % group_size:
    raise ValueError(f"the contraction length K={k} is not a multiple of group_size={group_size}; use a "
                     f"group size dividing K, or pad W with zero rows to a multiple of it.")
  return int(group_size)


def pack_int4(w: jax.Array, group_size: int | None = 128, *, axis: int = 0,
              scale_dtype=jnp.bfloat16) -> Int4Weights:
  """Quantize a 2-D weight to symmetric int4 codes with one scale per ``group_size`` elements along K.

  VS-Quant (Dai et al., MLSys 2021), Sec. 3: per group ``s = amax / 7`` (rounded to ``scale_dtype``;
  an all-zero group gets ``s = 1``), ``c = clip(round(w / s), -7, 7)``, packed eight per uint32.

  Args:
    w: float weight, ``(K, N)`` with ``axis=0`` (flax ``Dense`` kernels) or ``(N, K)`` with ``axis=1``.
    group_size: elements per scale along K, a power of two >= 16 dividing K; None: one scale per column.
    axis: which axis of ``w`` is the contraction axis K.
    scale_dtype: ``jnp.bfloat16`` (default) or ``jnp.float32``.

  Returns:
    :class:`Int4Weights` for ``(K, N)``.

  Raises:
    ValueError: not 2-D, K not a multiple of 128 or of ``group_size``, bad ``group_size``, NaN/inf
      (concrete arrays only).

  Example:
    >>> w = jnp.array([[0.7], [-0.35]] * 64)                   # K=128, N=1; s = bf16(0.1)
    >>> p = pack_int4(w, 16)
    >>> float(p.scales[0, 0]), dequantize_int4(p)[:2, 0].tolist()   # codes 7 and -3 (-0.35 / s = -3.497)
    (0.10009765625, [0.70068359375, -0.30029296875])
  """
  w = jnp.asarray(w)
  check_rank("w", w, 2)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"w must be a floating-point weight, got dtype {w.dtype}.")
  check_choice("axis", axis, (0, 1, -1, -2))
  check_choice("scale_dtype", jnp.dtype(scale_dtype).name, ("bfloat16", "float32"))
  if axis in (1, -1):
    w = w.T
  k, n = w.shape
  if k == 0 or n == 0:
    raise ValueError(f"w must be non-empty, got shape {w.shape}.")
  if k % BLOCK_K:
    raise ValueError(f"the contraction length K={k} must be a multiple of {BLOCK_K} (the packing block); "
                     f"pad W with zero rows to {-(-k // BLOCK_K) * BLOCK_K} and x with zero columns.")
  gs = _check_group_size(group_size, k)
  check_finite("w", w)
  return _pack(w, gs, jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack(w: jax.Array, gs: int, scale_dtype) -> Int4Weights:
  k, n = w.shape
  wf = w.astype(jnp.float32).reshape(k // gs, gs, n)
  amax = jnp.max(jnp.abs(wf), axis=1)                                   # (G, N)
  s = (amax / QMAX).astype(scale_dtype)
  s = jnp.where(amax == 0, jnp.ones_like(s), s)
  # Under tracing a non-finite group cannot raise: its scale is NaN (an XLA max may skip NaN).
  s = jnp.where(jnp.all(jnp.isfinite(wf), axis=1), s, jnp.full_like(s, jnp.nan))
  codes = jnp.clip(jnp.round(wf / s.astype(jnp.float32)[:, None, :]), -QMAX, QMAX)
  u = ((codes.astype(jnp.int32) + 8) & 15).astype(jnp.uint32).reshape(k // BLOCK_K, 8, 16, n)
  words = functools.reduce(jnp.bitwise_or, [u[:, i] << jnp.uint32(4 * i) for i in range(8)])
  return Int4Weights(words.reshape(k // 8, n), s)


def _unpack_codes(words: jax.Array) -> jax.Array:
  """``(K/8, N)`` uint32 -> ``(K, N)`` int32 signed codes (XLA)."""
  k8, n = words.shape
  w = words.reshape(k8 // 16, 1, 16, n)
  shifts = (4 * jnp.arange(8, dtype=jnp.uint32)).reshape(1, 8, 1, 1)
  u = jnp.bitwise_and(jnp.right_shift(w, shifts), jnp.uint32(15))       # (K/128, 8, 16, N)
  return u.astype(jnp.int32).reshape(8 * k8, n) - 8


def dequantize_int4(packed: Int4Weights, dtype=jnp.float32) -> jax.Array:
  """The ``(K, N)`` weight that :class:`Int4Weights` represents: ``code * scale`` (float32, then cast).

  Example:
    >>> dequantize_int4(pack_int4(jnp.full((128, 2), -3.0), None))[0].tolist()   # 7 * bf16(3 / 7)
    [-2.994140625, -2.994140625]
  """
  _check_packed(packed)
  return _dequantize(packed, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(packed: Int4Weights, dtype) -> jax.Array:
  c = _unpack_codes(packed.words).astype(jnp.float32)
  s = jnp.repeat(packed.scales.astype(jnp.float32), packed.group_size, axis=0)
  return (c * s).astype(dtype)


def _check_packed(packed) -> None:
  if not isinstance(packed, Int4Weights):
    raise TypeError(f"packed must be an Int4Weights from pack_int4, got {type(packed).__name__}.")
  if packed.words.ndim != 2 or packed.scales.ndim != 2 or packed.words.dtype != jnp.uint32:
    raise ValueError(f"packed.words must be 2-D uint32 and packed.scales 2-D, got {packed.words.dtype} "
                     f"{packed.words.shape} and {packed.scales.shape}.")
  k, n = packed.k, packed.n
  g = packed.scales.shape[0]
  if packed.scales.shape[1] != n or g == 0 or k % g or k % BLOCK_K:
    raise ValueError(f"packed.scales {packed.scales.shape} does not match packed.words {packed.words.shape} "
                     f"(expected (K / group_size, N) with K={k}, N={n}).")


@functools.partial(jax.jit, static_argnums=2)
def _xla_matmul(x: jax.Array, packed: Int4Weights, out_dtype) -> jax.Array:
  w = _dequantize(packed, jnp.dtype(jnp.float32))
  y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST,
              preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


@functools.lru_cache(maxsize=None)
def kernel_self_test(variant: str | None = None) -> bool:
  """Once per process (and variant): run the Pallas GEMV with its default launch parameters on a small
  problem (K=512 so that the default K split and step both apply, two column blocks, group size 64, N
  not a multiple of the block) at batch 1, 2 and 3 (the three kernels the defaults pick,
  see :func:`mlsys_jax.quant._pallas_gemv.default_config`; ``variant`` forces one kernel variant for
  both) and compare it with the XLA path (relative error < 1e-5). On failure warn (``RuntimeWarning``)
  and return False, and :func:`w4a16_matmul` keeps the XLA path.

  Example:
    >>> kernel_self_test()               # in the interpreter here; compiled through Triton on a GPU
    True
  """
  def check():
    kw, kx = jax.random.split(jax.random.PRNGKey(4))
    p = pack_int4(jax.random.normal(kw, (512, 80), jnp.float32), 64)
    x = jax.random.normal(kx, (3, 512), jnp.float32).astype(jnp.bfloat16)
    ref = _xla_matmul(x, p, jnp.dtype(jnp.float32))
    out = jnp.concatenate([_pallas_gemv.int4_gemv(x[:1], p.words, p.scales, variant=variant),
                           _pallas_gemv.int4_gemv(x[:2], p.words, p.scales, variant=variant),
                           _pallas_gemv.int4_gemv(x, p.words, p.scales, variant=variant)])
    ref = jnp.concatenate([ref[:1], ref[:2], ref])
    return jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)

  try:
    err = float(run_outside_traces(jax.jit(check)))
    if not err < 1e-5:
      raise RuntimeError(f"kernel and XLA differ (relative error {err:.3g})")
    return True
  except Exception as e:  # a compile error or a mismatch: keep the XLA path
    warnings.warn(f"mlsys_jax.quant: the W4A16 GEMV kernel ({variant}) failed its self-test ({e!r:.300}); "
                  "using the XLA path.", RuntimeWarning, stacklevel=3)
    return False


def w4a16_matmul(x: jax.Array, packed: Int4Weights, *, out_dtype=jnp.float32, impl: str = "auto",
                 **kernel_config) -> jax.Array:
  """``x @ W`` for int4 weights ``W`` packed by :func:`pack_int4`, activations bf16 or float32.

  The result equals ``x.astype(float32) @ dequantize_int4(packed)`` computed in float32 (up to the
  order of the float32 sums). Weight-only quantization as in VS-Quant (Dai et al., MLSys 2021, Sec. 3)
  with float per-group scales.

  Args:
    x: ``(..., K)`` float activations (leading axes are flattened into the batch).
    packed: :class:`Int4Weights` ``(K, N)``.
    out_dtype: dtype of the result (float32 by default: the accumulator).
    impl: ``'auto'`` (the Pallas kernel on a GPU for batch <= 16 after its self-test, else XLA),
      ``'xla'`` (dequantize then one float32 dot) or ``'pallas'`` (the kernel; in the interpreter off
      the GPU).
    **kernel_config: launch parameters for the kernel (``variant``, ``block_n``, ``blocks_per_step``,
      ``split_k``, ``num_warps``, ``num_stages``, ``interpret``); see
      :func:`mlsys_jax.quant._pallas_gemv.int4_gemv`.

  Returns:
    ``(..., N)`` in ``out_dtype``.

  Example:
    >>> w = jax.random.normal(jax.random.PRNGKey(0), (256, 32))
    >>> p = pack_int4(w, group_size=64)
    >>> x = jnp.ones((1, 256), jnp.bfloat16)
    >>> y = w4a16_matmul(x, p)
    >>> bool(jnp.allclose(y, x.astype(jnp.float32) @ dequantize_int4(p), rtol=1e-5, atol=1e-4))
    True
  """
  _check_packed(packed)
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != packed.k:
    raise ValueError(f"x must be (..., K) with K={packed.k} (the packed weight is ({packed.k}, "
                     f"{packed.n})), got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating point (bfloat16 or float32), got {x.dtype}.")
  check_choice("impl", impl, ("auto", "xla", "pallas"))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, packed.k)
  m = x2.shape[0]
  if impl == "auto":
    use = _pallas_gemv.on_gpu() and 0 < m <= MAX_KERNEL_BATCH and kernel_self_test()
    impl = "pallas" if use else "xla"
  if impl == "pallas":
    if m == 0:
      y = jnp.zeros((0, packed.n), out_dtype)
    else:
      y = _pallas_gemv.int4_gemv(x2, packed.words, packed.scales, out_dtype=out_dtype, **kernel_config)
  else:
    if kernel_config:
      raise ValueError(f"kernel launch parameters {sorted(kernel_config)} apply only to impl='pallas'.")
    y = _xla_matmul(x2, packed, jnp.dtype(out_dtype))
  return y.reshape(*lead, packed.n)
