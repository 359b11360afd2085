"""Bit-packed binary inference: XOR-popcount dense and convolution with LCE's fused output transform.

Bannink et al., "Larq Compute Engine", MLSys 2021, Sec. 3-4 (``core/bitpacking/bitpack.h``,
``core/bconv2d/output_transform.h``, ``zero_padding_correction.h``):

- **layout**: +-1 values are packed along the reduction axis (channels, for activations) into uint32
  words; element ``i`` of a word is bit ``i`` (LSB first), bit 1 means -1, the tail bits of the last word
  are 0 (value +1, contributing nothing: both operands have 0 there);
- **accumulator**: ``acc = popcount(a XOR w)`` summed over words; the +-1 dot product over the true
  length ``K`` is ``K - 2 acc``, an integer, so the packed path is *bit-exact* against the float +-1
  computation;
- **output transform** per output channel ``c``: ``y = clip(dot, lo, hi) mul_c + bias_c`` (a fused
  ReLU is ``lo = 0``; a following BatchNorm folds into ``mul``/``bias``), or, when the next layer is
  binary, the bits of ``sign(y)`` directly from an integer threshold on ``dot`` (exact, derived from the
  float32 formula), packed for the next layer;
- **padding**: ``pad_value=+1`` is free (padding words are 0); ``pad_value=0`` pads with +1 and
  subtracts a precomputed per-position correction (the kernel taps that fell into the padding).

Convolutions use im2col on the packed words (channels are padded to a multiple of 32 per pixel, as in
LCE). Everything runs under ``jit`` on any backend; ``lax.population_count`` does the counting.
:func:`convert_quicknet` turns trained :class:`QuickNet` variables into a packed inference function.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mlsys_jax._checks import check_choice, check_int, check_range, check_rank, is_concrete
from mlsys_jax.quant.binary import pallas_dense as pd
from mlsys_jax.quant.binary.quicknet import QuickNetBlock

__all__ = [
    "PackedConv2D",
    "PackedDense",
    "convert_quicknet",
    "fold_batchnorm",
    "pack_bits",
    "pack_conv2d",
    "pack_dense",
    "packed_conv2d",
    "packed_dense",
    "packed_nbytes",
    "unpack_bits",
]

WORD = 32


def _check_pm1(name: str, x) -> None:
  if is_concrete(x):
    a = np.asarray(x)
    ok = (a == 1) | (a == -1)
    if not np.all(ok):
      bad = a[~ok].ravel()[:3]
      raise ValueError(f"{name} must hold only +-1 values to be bit-packed, found e.g. {bad.tolist()}; "
                       "binarize first (e.g. ste_sign(x)).")


def _pack_negative(neg: jax.Array) -> jax.Array:
  """Pack a boolean 'is -1' mask ``(..., K)`` with K % 32 == 0 into uint32 words ``(..., K // 32)``."""
  bits = neg.astype(jnp.uint32).reshape(*neg.shape[:-1], neg.shape[-1] // WORD, WORD)
  shifts = jnp.arange(WORD, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def _pad_to_word(neg: jax.Array, pad: bool, what: str) -> jax.Array:
  k = neg.shape[-1]
  if k % WORD:
    if not pad:
      raise ValueError(f"{what}: the packed axis has length {k}, not a multiple of {WORD}; pass "
                       "pad=True to fill the last word with zero bits (value +1, LCE's layout).")
    neg = jnp.pad(neg, [(0, 0)] * (neg.ndim - 1) + [(0, -k % WORD)])
  return neg


def pack_bits(x: jax.Array, axis: int = -1, pad: bool = False) -> jax.Array:
  """Pack +-1 entries along ``axis`` into uint32 words (LCE layout), moving that axis last.

  Args:
    x: array of +-1 values (checked when concrete; under ``jit`` an entry packs as -1 iff ``x < 0``).
    axis: the axis to pack (the reduction axis of the following product).
    pad: allow a length that is not a multiple of 32 (tail bits 0, i.e. +1).

  Returns:
    uint32 array with ``axis`` replaced by ``ceil(K / 32)`` words, as the last axis.

  >>> pack_bits(jnp.array([-1.0, 1, 1, -1] + [1] * 28))
  Array([9], dtype=uint32)
  """
  _check_pm1("pack_bits input", x)
  if is_concrete(x):  # host-side packing (conversion of trained weights): no per-op compilation
    neg = np.moveaxis(np.asarray(x), axis, -1) < 0
    k = neg.shape[-1]
    if k % WORD:
      if not pad:
        _pad_to_word(jnp.zeros(k, bool), pad, "pack_bits")  # raises the usual error
      neg = np.pad(neg, [(0, 0)] * (neg.ndim - 1) + [(0, -k % WORD)])
    bits = neg.astype(np.uint32).reshape(*neg.shape[:-1], -1, WORD)
    return jnp.asarray(np.sum(bits << np.arange(WORD, dtype=np.uint32), axis=-1, dtype=np.uint32))
  x = jnp.moveaxis(jnp.asarray(x), axis, -1)
  return _pack_negative(_pad_to_word(x < 0, pad, "pack_bits"))


def unpack_bits(words: jax.Array, length: int, dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`pack_bits` along the last axis: ``(..., W)`` words -> ``(..., length)`` +-1 values."""
  check_int("length", length, 1)
  if words.shape[-1] * WORD < length:
    raise ValueError(f"{words.shape[-1]} words hold at most {words.shape[-1] * WORD} values, "
                     f"asked for {length}.")
  bits = (words[..., None] >> jnp.arange(WORD, dtype=jnp.uint32)) & 1
  bits = bits.reshape(*words.shape[:-1], -1)[..., :length]
  return (1 - 2 * bits.astype(jnp.int32)).astype(dtype)


def _popcount_dot(a: jax.Array, w: jax.Array, k: int) -> jax.Array:
  """``a (..., W) x w (N, W) -> (..., N)`` int32 +-1 dot products of true length ``k``."""
  x = jnp.bitwise_xor(a[..., None, :], w)
  acc = jnp.sum(jax.lax.population_count(x).astype(jnp.int32), axis=-1)
  return k - 2 * acc


# ----------------------------------------------------------------------------------------------------
# Output transform.


def fold_batchnorm(scale, bias, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """Fold inference BatchNorm ``(y - mean) scale / sqrt(var + eps) + bias`` into ``y mul + add``.

  The per-channel output transform of a binary convolution absorbs a following BatchNorm (Bannink et
  al., "Larq Compute Engine", MLSys 2021, Sec. 4, fused output transform): ``mul = scale / sqrt(var +
  eps)``, ``add = bias - mean mul``, computed in float64 and returned as float32 (the inference-time
  BatchNorm with running statistics: Ioffe and Szegedy, ICML 2015, Alg. 2).

  Args:
    scale, bias: the BatchNorm's learned affine parameters, broadcastable to ``mean``'s shape, finite,
      or None (``use_scale``/``use_bias=False``: 1 and 0).
    mean, var: running statistics, finite, same shape (``(C,)``); ``var >= 0``.
    eps: the BatchNorm's epsilon (flax's default 1e-5), finite, ``>= 0``, with ``var + eps > 0``.

  Returns:
    ``(mul, add)``: float32 arrays of ``mean``'s shape.

  Example:
    >>> mul, add = fold_batchnorm(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]), 0.0)
    >>> mul.tolist(), add.tolist()          # (y - 3) * 2 / 2 + 1 = y - 2
    ([1.0], [-2.0])
  """
  mean = np.asarray(mean, np.float64)
  var = np.asarray(var, np.float64)
  check_range("eps", eps, 0.0)
  if mean.shape != var.shape:
    raise ValueError(f"mean and var must have the same shape (one entry per channel), got {mean.shape} and "
                     f"{var.shape}.")
  named = {"mean": mean, "var": var}
  for name, a in (("scale", scale), ("bias", bias)):
    if a is None:
      continue
    a = np.asarray(a, np.float64)
    if not _broadcasts_to(a.shape, mean.shape):
      raise ValueError(f"{name} of shape {a.shape} does not broadcast to the statistics' shape {mean.shape}.")
    named[name] = a
  for name, a in named.items():
    if not np.all(np.isfinite(a)):
      raise ValueError(f"BatchNorm {name} holds {int(np.sum(~np.isfinite(a)))} NaN/inf value(s); the "
                       "folded transform would be meaningless. Check the trained variables.")
  if np.any(var < 0) or np.any(var + eps <= 0):
    raise ValueError(f"var must be >= 0 with var + eps > 0 (a variance), got min(var) = {float(var.min())} "
                     f"and eps = {eps}; pass the running variance and the BatchNorm's epsilon.")
  inv = 1.0 / np.sqrt(var + eps)
  mul = inv * (1.0 if scale is None else named["scale"])
  add = (0.0 if bias is None else named["bias"]) - mean * mul
  return mul.astype(np.float32), np.broadcast_to(add, mul.shape).astype(np.float32)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
  """Whether an array of ``shape`` broadcasts to exactly ``target`` (no growth of ``target``)."""
  try:
    return np.broadcast_shapes(shape, target) == tuple(target)
  except ValueError:
    return False


def _thresholds(mul: np.ndarray, bias: np.ndarray, k: int, lo, hi):
  """Integer thresholds so that ``dot`` gives the sign bit of ``clip(dot, lo, hi) mul + bias`` (float32).

  The float32 map is monotone in ``dot`` (float32 rounding is monotone), so ``y < 0`` holds on a prefix
  (``mul >= 0``) or a suffix (``mul < 0``) of the dot values. The boundary is found by bisection over
  *every integer* in ``[-K, K]``, not only the ``K + 1`` values of K's parity: after the zero-padding
  correction of :func:`pack_conv2d` (``pad_value=0``) a border dot sums fewer than ``K`` taps and can
  have the other parity. Each probe evaluates the float32 formula itself, so the thresholds are exact for
  every reachable dot (ties ``y == 0`` give +1; ``mul = 0`` thresholds ``bias`` alone).
  Returns ``(thr, flip)``: -1 iff ``dot < thr`` (``flip`` False) or ``dot > thr`` (``flip`` True).
  """
  mul, bias = mul.astype(np.float32), bias.astype(np.float32)
  flip = mul < 0
  lo = -np.inf if lo is None else lo
  hi = np.inf if hi is None else hi

  def settled(d):              # monotone in d, False then True: +1 (mul >= 0) or -1 (mul < 0) from d on
    y = np.clip(d, lo, hi).astype(np.float32) * mul + bias
    return np.where(flip, y < 0, y >= 0)

  a = np.full(mul.shape, -k - 1, np.int64)      # settled(a) taken False, settled(b) taken True
  b = np.full(mul.shape, k + 1, np.int64)
  while np.any(b - a > 1):
    open_ = b - a > 1
    m = (a + b) // 2                            # in [-K, K] where open_
    s = settled(m)
    a, b = np.where(open_ & ~s, m, a), np.where(open_ & s, m, b)
  thr = np.where(flip, b - 1, b)                # b: the first dot in [-K, K + 1] where settled holds
  return thr.astype(np.int32), flip


def _check_transform(c: int, mul, bias, threshold: bool):
  if (mul is None) != (bias is None):
    raise ValueError("pass both mul and bias (the per-channel output transform) or neither.")
  if mul is None:
    if threshold:
      raise ValueError("threshold=True needs mul and bias (the transform whose sign is thresholded).")
    return None, None
  mul = np.broadcast_to(np.asarray(mul, np.float32), (c,)).copy()
  bias = np.broadcast_to(np.asarray(bias, np.float32), (c,)).copy()
  if not (np.all(np.isfinite(mul)) and np.all(np.isfinite(bias))):
    raise ValueError("mul and bias must be finite (a NaN scale would make the thresholds meaningless).")
  return mul, bias


@struct.dataclass
class _Transform:
  mul: Any = None          # (C,) float32 or None
  bias: Any = None
  thr: Any = None          # (C,) int32 or None (threshold -> packed bits)
  flip: Any = None         # (C,) bool
  lo: float | None = struct.field(pytree_node=False, default=None)
  hi: float | None = struct.field(pytree_node=False, default=None)

  def __call__(self, dot):
    if self.thr is not None:
      neg = jnp.where(self.flip, dot > self.thr, dot < self.thr)
      return _pack_negative(_pad_to_word(neg, True, "threshold output"))
    if self.mul is None:
      return dot
    lo = -jnp.inf if self.lo is None else self.lo
    hi = jnp.inf if self.hi is None else self.hi
    return jnp.clip(dot, lo, hi).astype(jnp.float32) * self.mul + self.bias


def _transform(c, k, mul, bias, clamp, threshold) -> _Transform:
  mul, bias = _check_transform(c, mul, bias, threshold)
  lo, hi = clamp
  if threshold:
    thr, flip = _thresholds(mul, bias, k, lo, hi)
    return _Transform(thr=jnp.asarray(thr), flip=jnp.asarray(flip), lo=lo, hi=hi)
  if mul is None:
    return _Transform(lo=lo, hi=hi)
  return _Transform(mul=jnp.asarray(mul), bias=jnp.asarray(bias), lo=lo, hi=hi)


# ----------------------------------------------------------------------------------------------------
# Dense.


@struct.dataclass
class PackedDense:
  """A packed binary dense layer: weights ``(N, W)`` uint32 and its fused output transform."""
  words: jax.Array
  transform: _Transform
  k: int = struct.field(pytree_node=False)


def pack_dense(kernel: jax.Array, mul=None, bias=None, clamp=(None, None),
               threshold: bool = False, pad: bool = False) -> PackedDense:
  """Pack a +-1 dense kernel ``(K, N)`` (flax layout) with an optional fused output transform.

  Args:
    kernel: +-1 values (binarize a trained kernel with ``larq_sign`` first).
    mul, bias: per-output-channel float transform ``clip(dot, *clamp) mul + bias`` (None: int32 dots).
    clamp: ``(lo, hi)`` clamp of the integer dot (``(0, None)`` fuses a ReLU).
    threshold: output the packed sign bits of the transform (for a following binary layer).
    pad: allow K % 32 != 0.

  >>> w = jnp.array([[1.0, -1.0]] * 32)
  >>> a = pack_bits(-jnp.ones((1, 32)))
  >>> packed_dense(a, pack_dense(w))
  Array([[-32,  32]], dtype=int32)
  """
  check_rank("kernel", kernel, 2)
  _check_pm1("kernel", kernel)
  k, n = kernel.shape
  words = pack_bits(jnp.asarray(kernel).T, axis=-1, pad=pad)
  return PackedDense(words, _transform(n, k, mul, bias, clamp, threshold), k)


def packed_dense(a_words: jax.Array, layer: PackedDense, kernel: str = "auto") -> jax.Array:
  """``(..., W)`` packed activations -> ``(..., N)`` int32 dots or float outputs, or, for a layer packed
  with ``threshold=True``, the outputs' sign bits packed as uint32 words ``(..., ceil(N / 32))``.

  ``kernel``: ``'auto'`` runs the Pallas kernel (:mod:`~mlsys_jax.quant.binary.pallas_dense`) on a GPU
  when it applies (at most 8 activation rows, N and W multiples of 16) and passed its once-per-process
  self-test, else XLA's XOR-popcount; ``'xla'`` always XLA; ``'pallas'`` always the kernel (in Pallas
  interpret mode off GPU, for tests). The integer dots are identical on every path.
  """
  if a_words.dtype != jnp.uint32 or a_words.shape[-1] != layer.words.shape[-1]:
    raise ValueError(f"activations must be uint32 words (..., {layer.words.shape[-1]}), got "
                     f"{a_words.dtype} {a_words.shape}; pack them with pack_bits.")
  check_choice("kernel", kernel, ("auto", "xla", "pallas"))
  n, wn = layer.words.shape
  rows = int(np.prod(a_words.shape[:-1], dtype=np.int64))
  use = kernel == "pallas" or (kernel == "auto" and jax.default_backend() == "gpu"
                               and pd.kernel_applies(rows, n, wn) and pd.kernel_self_test())
  if use and rows > 0:
    dot = pd.pallas_packed_dense(a_words.reshape(rows, wn), layer.words, layer.k,
                                 interpret=jax.default_backend() != "gpu")
    dot = dot.reshape(*a_words.shape[:-1], n)
  else:
    dot = _popcount_dot(a_words, layer.words, layer.k)
  return layer.transform(dot)


# ----------------------------------------------------------------------------------------------------
# Convolution.


@struct.dataclass
class PackedConv2D:
  """A packed binary 2-D convolution (NHWC activations, channels packed per pixel)."""
  words: jax.Array           # (O, kh * kw * Cw) uint32
  correction: Any            # (Ho, Wo, O) int32 zero-padding correction, or None
  transform: _Transform
  kernel_size: tuple[int, int] = struct.field(pytree_node=False)
  cin: int = struct.field(pytree_node=False)
  strides: tuple[int, int] = struct.field(pytree_node=False)
  pads: tuple[tuple[int, int], tuple[int, int]] = struct.field(pytree_node=False)


def _pair(v, name):
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2:
    raise ValueError(f"{name} must be an int or a pair, got {v}.")
  return v


def pack_conv2d(kernel: jax.Array, input_hw: tuple[int, int], strides=1, padding="SAME",
                pad_value: float = 1.0, mul=None, bias=None, clamp=(None, None),
                threshold: bool = False) -> PackedConv2D:
  """Pack a +-1 HWIO kernel for :func:`packed_conv2d` (one input size, known at conversion).

  Args:
    kernel: ``(kh, kw, Cin, O)`` of +-1 values.
    input_hw: the input's spatial size (fixes the padding and its correction).
    strides, padding: as in ``lax.conv_general_dilated`` (``'SAME'``, ``'VALID'`` or pairs).
    pad_value: +1 (free) or 0 (zero padding, corrected exactly).
    mul, bias, clamp, threshold: the fused output transform, as in :func:`pack_dense`.

  >>> w = jnp.ones((3, 3, 32, 1))
  >>> layer = pack_conv2d(w, (4, 4), pad_value=0.0)
  >>> x = pack_bits(jnp.ones((1, 4, 4, 32)))
  >>> packed_conv2d(x, layer)[0, :2, :2, 0]      # corners see 4 taps, edges 6 (x 32 channels)
  Array([[128, 192],
         [192, 288]], dtype=int32)
  """
  check_rank("kernel", kernel, 4)
  _check_pm1("kernel", kernel)
  if pad_value not in (0.0, 1.0):
    raise ValueError(f"the packed path supports pad_value +1 (free) or 0 (corrected), got {pad_value}.")
  kh, kw, cin, o = kernel.shape
  strides = _pair(strides, "strides")
  h, w = _pair(input_hw, "input_hw")
  if isinstance(padding, str):
    check_choice("padding", padding, ("SAME", "VALID"))
    pads = tuple(tuple(int(v) for v in p)
                 for p in jax.lax.padtype_to_pads((h, w), (kh, kw), strides, padding))
  else:
    pads = tuple(tuple(int(v) for v in p) for p in padding)
  words = pack_bits(kernel, axis=2, pad=True)                      # (kh, kw, O, Cw)
  words = jnp.transpose(words, (2, 0, 1, 3)).reshape(o, -1)         # (O, kh*kw*Cw)
  kernel = jnp.asarray(kernel, jnp.float32)
  correction = None
  if pad_value == 0.0 and any(p != (0, 0) for p in pads):
    # Packed padding is +1; subtract what the padded taps added: T - S, with S the sum over valid taps.
    ones = jnp.ones((1, h, w, cin), jnp.float32)
    s = jax.lax.conv_general_dilated(ones, kernel, strides, pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)[0]
    t = jnp.sum(kernel, axis=(0, 1, 2))
    correction = jnp.round(t - s).astype(jnp.int32)
  k = kh * kw * cin
  return PackedConv2D(words, correction, _transform(o, k, mul, bias, clamp, threshold), (kh, kw), cin,
                      strides, pads)


def _im2col_words(x: jax.Array, kernel_size, strides, pads) -> jax.Array:
  """``(N, H, W, Cw)`` words -> ``(N, Ho, Wo, kh * kw * Cw)``, padding with zero words (+1)."""
  (kh, kw), (sh, sw) = kernel_size, strides
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def packed_conv2d(x_words: jax.Array, layer: PackedConv2D) -> jax.Array:
  """Packed binary convolution: ``(N, H, W, Cw)`` uint32 -> int32 dots, float, or packed bits (NHWC)."""
  cw = -(-layer.cin // WORD)
  if x_words.dtype != jnp.uint32 or x_words.ndim != 4 or x_words.shape[-1] != cw:
    raise ValueError(f"input must be uint32 words (N, H, W, {cw}) from pack_bits(x, pad=True), got "
                     f"{x_words.dtype} {x_words.shape}.")
  cols = _im2col_words(x_words, layer.kernel_size, layer.strides, layer.pads)
  dot = _popcount_dot(cols, layer.words, layer.kernel_size[0] * layer.kernel_size[1] * layer.cin)
  if layer.correction is not None:
    if dot.shape[1:] != layer.correction.shape:
      raise ValueError(f"this layer was packed for another input size (output {layer.correction.shape[:2]},"
                       f" got {dot.shape[1:3]}); pack it again with the right input_hw.")
    dot = dot - layer.correction
  return layer.transform(dot)


def packed_nbytes(tree: Any) -> int:
  """Bytes of every array in ``tree`` (packed words count 4 bytes per 32 weights)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------------
# Converter for QuickNet.


def _quicknet_modules(model, variables: dict, input_shape) -> dict:
  """``{path: (module, input shape)}`` of every :class:`QuickNetBlock`, ``BatchNorm``, ``Conv`` and ``Dense``
  that ``model.apply`` calls on one ``(1, *input_shape)`` image (under ``eval_shape``), in call order."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (QuickNetBlock, nn.BatchNorm, nn.Conv, nn.Dense)):
      seen.setdefault(mod.path, (mod, args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.apply(variables, x), jnp.zeros((1, *input_shape), jnp.float32))
  return seen


def _sub(tree, path):
  """``tree[path[0]][path[1]]...``: a module's entry in a flax variable collection."""
  for name in path:
    tree = tree[name]
  return tree


def _pack_quicknet_block(params, stats, modules: dict, path) -> tuple[PackedConv2D, np.ndarray, np.ndarray]:
  """Binarize, fold and pack the :class:`QuickNetBlock` at ``path`` (from :func:`_quicknet_modules`).

  The kernel is binarized with ``sign`` (``0 -> +1``), the block's ``ReLU -> BatchNorm`` becomes the fused
  transform ``clip(dot, 0, .) mul + add`` with the BatchNorm's own ``epsilon``. Returns the packed layer
  (``pad_value=+1``, 'SAME', stride 1: the block's convolution) and the float32 ``(mul, add)``.
  """
  p, s = _sub(params, path), _sub(stats, path)
  w = np.where(np.asarray(p["BinaryConv"]["kernel"]) < 0, -1.0, 1.0)
  bn, bn_mod = p["BatchNorm"], modules[(*path, "BatchNorm")][0]
  mul, add = fold_batchnorm(bn.get("scale"), bn.get("bias"), s["BatchNorm"]["mean"], s["BatchNorm"]["var"],
                            bn_mod.epsilon)
  shape = modules[path][1]
  return pack_conv2d(w, shape[1:3], 1, "SAME", 1.0, mul, add, clamp=(0, None)), mul, add


def _packed_block_call(block, x: jax.Array, layer: PackedConv2D) -> jax.Array:
  """A :class:`QuickNetBlock`'s output computed packed: ``[x +] packed_conv2d(pack(sign(x)), layer)``."""
  y = packed_conv2d(pack_bits(jnp.where(x < 0, -1.0, 1.0), pad=True), layer)
  return x + y if block.shortcut else y


def convert_quicknet(model, variables: dict, input_shape: tuple[int, int, int]) -> tuple[Callable, dict]:
  """Trained :class:`QuickNet` variables -> ``(infer(x) -> logits, packed_layers)``.

  Each binary residual block ``x + BN(ReLU(bconv(x)))`` runs packed: ``sign(x)`` is packed per pixel,
  the kernel was packed once, the XOR-popcount accumulator goes through the fused transform
  ``clip(dot, 0, .) mul + bias`` (ReLU and the folded BatchNorm), then the shortcut is added; with
  ``shortcut=False`` the same. Every other layer (stem, transitions, head) runs as in flax. The binary
  accumulators are bit-exact; float outputs differ from flax's BatchNorm only by float rounding of the
  fold.

  Args:
    model: the :class:`QuickNet` (any variant, ``binary=True``).
    variables: ``{'params', 'batch_stats'}`` after training.
    input_shape: ``(H, W, C)`` of the images the function will be called with (fixes the padding).

  Returns:
    The jitted inference function and ``{module_path: PackedConv2D}``.
  """
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}.")
  if not model.binary:
    raise ValueError("convert_quicknet needs a binary model (binary=True).")
  modules = _quicknet_modules(model, variables, input_shape)
  layers = {path: _pack_quicknet_block(variables["params"], variables["batch_stats"], modules, path)[0]
            for path, (mod, _) in modules.items() if isinstance(mod, QuickNetBlock)}

  def intercept(next_fun, args, kwargs, context):
    if isinstance(context.module, QuickNetBlock) and context.method_name == "__call__":
      return _packed_block_call(context.module, args[0], layers[context.module.path])
    return next_fun(*args, **kwargs)

  @jax.jit
  def infer(x):
    with nn.intercept_methods(intercept):
      return model.apply(variables, x, train=False)

  return infer, layers
