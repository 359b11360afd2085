"""Bit errors in quantized weights, weight clipping and random bit error training (RandBET).

Stutz, Chandramoorthy, Hein and Schiele, "Bit Error Robustness for Energy-Efficient DNN Accelerators",
MLSys 2021. Lowering an accelerator's SRAM voltage saves energy but flips stored bits. The paper models
this as independent random bit flips with probability p in the stored integer codes of the weights
(Sec. 3), and makes networks robust with three ingredients:

1. robust fixed-point quantization: per-layer, asymmetric, proper rounding, *unsigned* codes (an offset
   representation, so a flipped MSB does not turn a small weight into a huge one of the other sign);
2. weight clipping: projecting weights into [-w_max, w_max] after every step, which spreads information
   over more weights and makes each bit matter less;
3. RandBET: training on the clean quantized weights and on the same weights with freshly sampled random
   bit errors each step, with straight-through gradients, averaging the two gradients (the perturbed
   one clamped to +-0.05).

Robustness is measured by the robust test error RErr: the fraction of test examples misclassified by the
clean quantized model or by the model with a bit-error pattern, averaged over many fixed patterns.

Fault model conventions (as in the paper's code): bit 0 is the LSB; only the low ``bits`` bits of each
code are faulty; a pattern is one uniform draw per (code, bit); a bit is faulty at rate p iff its draw is
below p, so for a fixed pattern key the faults at a lower rate are a subset of those at a higher rate.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_int, check_range, is_concrete
from mlsys_jax.quant import QuantizedTensor, dequantize, quantize
from mlsys_jax.robust import _pallas_bits

__all__ = [
    "ErrorMap",
    "apply_error_map",
    "apply_error_mask",
    "bit_error_rate",
    "clip_weights",
    "dequantize_params",
    "error_mask",
    "inject_bit_errors",
    "inject_stuck_at",
    "perturb_params",
    "profiled_error_map",
    "quantize_params",
    "randbet_value_and_grad",
    "robust_error",
]

_U32 = 2 ** 32


def _check_codes(codes, bits: int) -> None:
  check_int("bits", bits, 1, 16)
  dtype = jnp.result_type(codes)
  if not jnp.issubdtype(dtype, jnp.unsignedinteger):
    hint = (" Quantize first: mlsys_jax.quant.quantize(x, bits, symmetric=False, unsigned=True).codes"
            if jnp.issubdtype(dtype, jnp.floating) else " Use the unsigned (offset) representation.")
    raise TypeError(f"codes must be unsigned integers (uint8/uint16), got dtype {dtype}.{hint}")
  if bits > jnp.iinfo(dtype).bits:
    raise ValueError(f"bits={bits} exceeds the width of codes of dtype {dtype}.")
  if is_concrete(codes) and np.size(codes) and int(np.max(np.asarray(codes))) >= 2 ** bits:
    raise ValueError(f"codes hold values >= 2**{bits} = {2 ** bits}: they are wider than bits={bits}.")


def _check_p(p) -> None:
  if is_concrete(p):
    if np.ndim(p) != 0:
      raise ValueError(f"p must be a scalar probability, got shape {np.shape(p)}.")
    check_range("p", float(p), 0.0, 1.0)


def _threshold(p) -> jax.Array:
  """p as a uint32 threshold t with P(u < t) = p for u uniform on 32 bits (p = 1 maps to always).

  A NaN p (reachable only when traced: concrete p is checked) also maps to always: every bit is faulty,
  never none (NaN would otherwise convert to threshold 0 and act silently like p = 0)."""
  pf = jnp.asarray(p, jnp.float32)
  t = jnp.clip(jnp.floor(pf * np.float32(_U32)), 0.0, np.float32(4294967040.0))  # largest f32 < 2^32
  return t.astype(jnp.uint32), (pf >= 1.0) | jnp.isnan(pf)


def _plane_mask(u: jax.Array, p, codes_dtype) -> jax.Array:
  """OR of (1 << i) over bit planes i whose draw u[..., i] falls below p."""
  t, always = _threshold(p)
  hit = (u < t) | always
  shifts = jnp.arange(u.shape[-1], dtype=jnp.uint32)
  return jnp.sum(jnp.where(hit, jnp.left_shift(jnp.uint32(1), shifts), jnp.uint32(0)),
                 axis=-1, dtype=jnp.uint32).astype(codes_dtype)


def _flip_params(kw: jax.Array, p) -> jax.Array:
  t, always = _threshold(p)
  return jnp.stack([kw[0], kw[1], t, always.astype(jnp.uint32)])


def _inject(key: jax.Array, codes: jax.Array, p, bits: int, p_one=None, impl: str | None = None,
            **kernel_args) -> jax.Array:
  """Flips (``p_one`` None) or stuck-at faults through the counter-based hash of ``_pallas_bits``;
  ``impl``: None (Pallas kernel on GPU, XLA elsewhere), ``'xla'``, ``'pallas'`` or ``'interpret'``."""
  impl = impl or _pallas_bits.default_impl(kernel_args.get("method"))
  if p_one is None:
    return _pallas_bits.inject(codes, bits, _flip_params(_pallas_bits.key_words(key), p), impl=impl,
                               **kernel_args)
  kw = jax.random.bits(key, (4,), jnp.uint32)
  return _pallas_bits.inject(codes, bits, _flip_params(kw[:2], p), _flip_params(kw[2:], p_one),
                             impl=impl, **kernel_args)


def inject_bit_errors(key: jax.Array, codes: jax.Array, p: float | jax.Array, bits: int) -> jax.Array:
  """Flip every one of the low ``bits`` bits of every code independently with probability ``p``.

  Stutz et al. (MLSys 2021), Sec. 3: random bit errors model low-voltage SRAM. Bits flip independently
  at rate ``floor(p * 2^32) / 2^32``; for a fixed ``key`` the flips at a lower ``p`` are a subset of those
  at a higher ``p``, and 1->0 and 0->1 flips are equally likely.

  The draws are never stored: a counter-based hash (Philox, Salmon et al. 2011) of the key and the
  position is evaluated where it is needed (``mlsys_jax/robust/_pallas_bits.py``). The default stream
  (``_pallas_bits.METHOD = 'binomial'``) draws, per 32-bit word of codes, the number of faulty bits from
  its binomial distribution and then which bits (a uniform subset), so the bits are independent with
  rate p (to float32 precision of the binomial CDF, about 1e-6 relative); ``'levels'`` (the stream
  until 2026-12-02) compares one 32-bit draw per bit exactly. On GPU this runs as one Pallas (Triton)
  kernel that reads the codes once and writes them once; elsewhere the same hash runs in XLA, and the
  two give identical flips for the same key. The pattern is a function of the key, the flat index of
  the code, the bit and the code dtype; it differs from ``jax.random.bits(key, ...)``.

  Args:
    key: PRNG key of the error pattern (any key type).
    codes: unsigned integer codes (uint8/uint16), any shape, values < 2**bits.
    p: bit error rate in [0, 1] (may be traced). A concrete p outside [0, 1] or NaN raises
      ``ValueError``. A traced p cannot be checked: below 0 it flips nothing, above 1 every bit, and a
      NaN p flips *every* one of the low ``bits`` bits (as p = 1), never none: integer codes cannot
      hold NaN, so the result is poisoned visibly instead (``bit_error_rate(codes, out, bits) == 1``,
      every code replaced by its complement ``(2**bits - 1) ^ code``); :func:`perturb_params`, whose
      output is float, returns NaN for a NaN p.
    bits: number of stored bits per code (1..16).

  Returns:
    Codes of the same shape and dtype with flipped bits.

  Example:
    >>> w = jnp.linspace(-1.0, 1.0, 1000)
    >>> qt = quantize(w, 8, symmetric=False, unsigned=True)
    >>> noisy = inject_bit_errors(jax.random.PRNGKey(0), qt.codes, 0.01, 8)
    >>> flips = jnp.unpackbits((noisy ^ qt.codes)[:, None], axis=1).sum()   # about 1% of 8000 bits
    >>> 40 < int(flips) < 120
    True
  """
  _check_codes(codes, bits)
  _check_p(p)
  return _inject(key, codes, p, bits)


def inject_stuck_at(key: jax.Array, codes: jax.Array, p: float | jax.Array, bits: int,
                    p_one: float = 0.5) -> jax.Array:
  """Stuck-at faults: each of the low ``bits`` bits is faulty with probability ``p``; a faulty bit
  reads 1 with probability ``p_one`` (stuck-at-1) and 0 otherwise (stuck-at-0).

  Unlike flips, a stuck bit only changes the code when it differs from the stored bit, so the
  effective flip rate is about ``p / 2`` for ``p_one = 0.5``. Faulty bits and stuck values come from
  two independent streams of the counter-based hash of :func:`inject_bit_errors` (one kernel on GPU),
  so the faulty bits at a lower ``p`` are a subset of those at a higher ``p`` for a fixed key.

  Example:
    >>> codes = jnp.zeros(4, jnp.uint8)
    >>> inject_stuck_at(jax.random.PRNGKey(0), codes, 1.0, 4, p_one=1.0).tolist()   # every low bit stuck at 1
    [15, 15, 15, 15]
  """
  _check_codes(codes, bits)
  _check_p(p)
  check_range("p_one", p_one, 0.0, 1.0)
  return _inject(key, codes, p, bits, p_one=p_one)


class ErrorMap(NamedTuple):
  """A fixed ("profiled") fault map of a memory holding codes of some shape.

  ``rate_draw[..., i]`` is the uniform 32-bit draw of bit i: the bit is faulty at rate p iff it is below
  p, so the faults at a lower rate are exactly a subset of those at a higher rate, as for a chip whose
  weakest cells fail first as the voltage drops. ``stuck`` holds the value (0/1 in bit i) a faulty bit
  reads; ``flip=True`` maps use flips instead of stuck values.

  Example:
    >>> m = profiled_error_map(jax.random.PRNGKey(0), (1000,), 8, flip=True)
    >>> m.rate_draw.shape, str(m.stuck.dtype), m.flip
    ((1000, 8), 'uint8', True)
  """
  rate_draw: jax.Array  # uint32, shape codes.shape + (bits,)
  stuck: jax.Array      # codes dtype, codes.shape
  flip: bool


def profiled_error_map(key: jax.Array, shape: tuple[int, ...], bits: int, *, flip: bool = False,
                       p_one: float = 0.5, dtype=jnp.uint8) -> ErrorMap:
  """Draw a persistent fault map for codes of ``shape`` (see :class:`ErrorMap`).

  Example:
    >>> m = profiled_error_map(jax.random.PRNGKey(0), (1000,), 8, flip=True)
    >>> low, high = error_mask(m, 0.01), error_mask(m, 0.1)
    >>> bool(jnp.all(low & ~high == 0))          # weakest cells fail first: 1% faults are among the 10% ones
    True
  """
  check_int("bits", bits, 1, 16)
  check_range("p_one", p_one, 0.0, 1.0)
  dtype = jnp.dtype(dtype)
  if bits > jnp.iinfo(dtype).bits:
    raise ValueError(f"bits={bits} exceeds the width of dtype {dtype}.")
  k1, k2 = jax.random.split(key)
  draw = jax.random.bits(k1, tuple(shape) + (bits,), jnp.uint32)
  stuck = _plane_mask(jax.random.bits(k2, draw.shape, jnp.uint32), p_one, dtype)
  return ErrorMap(draw, stuck, flip)


def error_mask(error_map: ErrorMap, p: float | jax.Array) -> jax.Array:
  """The faulty-bit mask of ``error_map`` at rate ``p`` (codes dtype, shape of the codes).

  For a fixed chip and voltage the mask is fixed: compute it once and apply it with
  :func:`apply_error_mask`, which then only reads the codes and the mask (memory-bandwidth bound).

  Example:
    >>> m = profiled_error_map(jax.random.PRNGKey(0), (1000,), 8, flip=True)
    >>> mask = error_mask(m, 0.1)
    >>> round(float(bit_error_rate(mask, jnp.zeros_like(mask), 8)), 3)    # about 10% of the 8000 bits
    0.104
  """
  _check_p(p)
  return _plane_mask(error_map.rate_draw, p, error_map.stuck.dtype)


def apply_error_mask(codes: jax.Array, mask: jax.Array, stuck: jax.Array | None = None) -> jax.Array:
  """Apply a precomputed fault ``mask``: flip the masked bits (``stuck=None``) or force them to the bits
  of ``stuck``.

  Example:
    >>> codes, mask = jnp.array([0b1010], jnp.uint8), jnp.array([0b0011], jnp.uint8)
    >>> ones = jnp.array([0xFF], jnp.uint8)
    >>> apply_error_mask(codes, mask).tolist(), apply_error_mask(codes, mask, stuck=ones).tolist()
    ([9], [11])
  """
  if codes.shape != mask.shape or codes.dtype != mask.dtype:
    raise ValueError(f"mask {mask.shape} {mask.dtype} must match codes {codes.shape} {codes.dtype}.")
  if stuck is None:
    return jnp.bitwise_xor(codes, mask)
  return (codes & ~mask) | (mask & stuck.astype(codes.dtype))


def apply_error_map(codes: jax.Array, error_map: ErrorMap, p: float | jax.Array, bits: int) -> jax.Array:
  """Apply the faults of ``error_map`` that are active at rate ``p`` to ``codes``.

  Example:
    >>> codes = jnp.arange(0, 256, 51, dtype=jnp.uint8)
    >>> m = profiled_error_map(jax.random.PRNGKey(0), codes.shape, 8, flip=True)
    >>> apply_error_map(codes, m, 0.0, 8).tolist(), apply_error_map(codes, m, 1.0, 8).tolist()   # p=0, p=1
    ([0, 51, 102, 153, 204, 255], [255, 204, 153, 102, 51, 0])
  """
  _check_codes(codes, bits)
  _check_p(p)
  if error_map.rate_draw.shape != tuple(codes.shape) + (bits,):
    raise ValueError(f"error map of shape {error_map.rate_draw.shape[:-1]} with "
                     f"{error_map.rate_draw.shape[-1]} bits does not match codes {codes.shape} and "
                     f"bits={bits}.")
  faulty = _plane_mask(error_map.rate_draw, p, codes.dtype)
  if error_map.flip:
    return jnp.bitwise_xor(codes, faulty)
  return (codes & ~faulty) | (faulty & error_map.stuck.astype(codes.dtype))


def bit_error_rate(a: jax.Array, b: jax.Array, bits: int) -> jax.Array:
  """Fraction of the low ``bits`` bits that differ between two code arrays.

  Args:
    a, b: non-empty integer code arrays of the same shape and dtype (no broadcasting).
    bits: how many low bits of each code to compare, 1 to the dtype's width (8 for uint8).

  Example:
    >>> a, b = jnp.array([0, 255], jnp.uint8), jnp.array([1, 255], jnp.uint8)
    >>> float(bit_error_rate(a, b, 8))                   # 1 of 16 bits differs
    0.0625
  """
  da, db = jnp.result_type(a), jnp.result_type(b)
  if not (jnp.issubdtype(da, jnp.integer) and jnp.issubdtype(db, jnp.integer)):
    raise TypeError(f"bit_error_rate compares integer codes, got dtypes {da} and {db}; pass the codes "
                    "(e.g. QuantizedTensor.codes), not dequantized values.")
  if da != db:
    raise TypeError(f"a and b must have the same dtype, got {da} and {db}; compare codes of one format.")
  if np.shape(a) != np.shape(b):
    raise ValueError(f"a and b must have the same shape, got {np.shape(a)} and {np.shape(b)}; compare each "
                     "code with its own (possibly faulty) copy.")
  if np.size(a) == 0:
    raise ValueError("a and b are empty: there are no bits to compare.")
  width = np.dtype(da).itemsize * 8
  check_int("bits", bits, 1)
  if bits > width:
    raise ValueError(f"bits must be at most {width}, the width of the codes' dtype {da}, got {bits}; pass the "
                     "code width the codes were quantized to.")
  udt = jnp.uint64 if width > 32 else jnp.uint32
  diff = jnp.bitwise_xor(a, b).astype(udt) & udt(2 ** bits - 1)
  return jnp.sum(jax.lax.population_count(diff)) / (np.size(a) * bits)


# ----------------------------------------------------------------------------------------------------
# Parameter trees.


def _is_float(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def quantize_params(params: Any, bits: int, w_max: float | None = None, symmetric: bool = False) -> Any:
  """Robust quantization of every float leaf (RQuant, Stutz et al. Sec. 4.1).

  Per tensor, asymmetric range ``[min, max]`` (after clipping to ``[-w_max, w_max]`` when given),
  round-to-nearest, unsigned codes. Non-float leaves are kept as they are. ``symmetric=True`` gives the
  less robust per-tensor symmetric range ``[-max|w|, max|w|]`` (still unsigned offset codes), for
  comparison.

  Returns:
    A pytree with a :class:`mlsys_jax.quant.QuantizedTensor` in place of each float leaf.

  Example:
    >>> qp = quantize_params({"w": jnp.linspace(-1.0, 1.0, 5), "step": jnp.int32(3)}, 8)
    >>> qp["w"].codes.tolist(), str(qp["w"].codes.dtype), int(qp["step"])   # unsigned codes; ints kept
    ([0, 63, 127, 191, 254], 'uint8', 3)
  """
  check_int("bits", bits, 2, 16)
  if w_max is not None:
    check_range("w_max", w_max, 0.0, low_inclusive=False)

  def q(x):
    if not _is_float(x):
      return x
    if w_max is not None:
      x = jnp.clip(x, -w_max, w_max)
    return quantize(x, bits, symmetric=symmetric, unsigned=True)

  return jax.tree_util.tree_map(q, params)


def _is_qt(x) -> bool:
  return isinstance(x, QuantizedTensor)


def dequantize_params(qparams: Any) -> Any:
  """Inverse of :func:`quantize_params` (float32 leaves).

  Example:
    >>> qp = quantize_params({"w": jnp.linspace(-1.0, 1.0, 5)}, 8)
    >>> np.asarray(dequantize_params(qp)["w"], float).round(3).tolist()
    [-0.996, -0.502, 0.0, 0.502, 0.996]
  """
  return jax.tree_util.tree_map(lambda x: dequantize(x) if _is_qt(x) else x, qparams, is_leaf=_is_qt)


def perturb_params(key: jax.Array, params: Any, p: float | jax.Array, bits: int,
                   w_max: float | None = None, quantized: Any | None = None,
                   symmetric: bool = False) -> Any:
  """Quantize ``params``, flip bits of every code with rate ``p``, and dequantize.

  The quantization ranges come from the clean weights, so errors do not change them (as in the paper).
  Each leaf gets its own key folded from ``key`` by its position in the tree.

  Args:
    key: the error pattern's key.
    params: float parameter pytree.
    p: bit error rate. A traced NaN p makes every quantized leaf NaN (it cannot be checked in Python,
      and it must not act like p = 0); a concrete NaN p raises ``ValueError``.
    bits: code width.
    w_max: clipping bound used for quantization (None = no clipping).
    quantized: optional precomputed :func:`quantize_params` result (saves work in loops).

  Returns:
    A float pytree of the same structure as ``params``.

  Example:
    >>> params, key = {"w": jnp.linspace(-1.0, 1.0, 5)}, jax.random.PRNGKey(0)
    >>> clean = dequantize_params(quantize_params(params, 8))["w"]
    >>> at = lambda p: perturb_params(key, params, p, 8)["w"]
    >>> bool(jnp.all(at(0.0) == clean)), bool(jnp.any(at(0.5) != clean))
    (True, True)
  """
  qp = quantized if quantized is not None else quantize_params(params, bits, w_max, symmetric)
  leaves, treedef = jax.tree_util.tree_flatten(qp, is_leaf=_is_qt)
  out = []
  for i, leaf in enumerate(leaves):
    if _is_qt(leaf):
      leaf = leaf.replace(codes=inject_bit_errors(jax.random.fold_in(key, i), leaf.codes, p, bits))
      val = dequantize(leaf)
      if not is_concrete(p):   # a traced NaN p: the float output says so (the codes cannot)
        val = jnp.where(jnp.isnan(p), jnp.nan, val)
      out.append(val)
    else:
      out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def _straight_through(params, values):
  """``values`` forward, identity gradient to ``params`` (the paper's gradient copying)."""
  return jax.tree_util.tree_map(lambda w, v: w + jax.lax.stop_gradient(v - w) if _is_float(w) else w,
                                params, values)


# ----------------------------------------------------------------------------------------------------
# Training.


def clip_weights(w_max: float) -> optax.GradientTransformation:
  """Weight clipping as an optax transform: the updated parameters land in ``[-w_max, w_max]``.

  Stutz et al., Sec. 4.2: after every step the weights are projected onto the box. Use it *last* in a
  chain, after the optimizer, and pass ``params`` to ``update``:
  ``optax.chain(optax.adam(1e-3), clip_weights(0.1))``. It returns
  ``clip(params + updates, -w_max, w_max) - params`` for float leaves.

  Example:
    >>> tx = optax.chain(optax.sgd(1.0), clip_weights(0.1))
    >>> w, g = jnp.array([0.05, 0.5]), jnp.array([-1.0, 1.0])
    >>> updates, _ = tx.update(g, tx.init(w), w)
    >>> np.asarray(optax.apply_updates(w, updates), float).round(3).tolist()     # [1.05, -0.5] projected
    [0.1, -0.1]
  """
  check_range("w_max", w_max, 0.0, low_inclusive=False)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("clip_weights needs params: call tx.update(grads, state, params).")
    new = jax.tree_util.tree_map(
        lambda u, w: (jnp.clip(w + u, -w_max, w_max) - w) if _is_float(w) else u, updates, params)
    return new, state

  return optax.GradientTransformation(init_fn, update_fn)


def randbet_value_and_grad(loss_fn: Callable[..., jax.Array], params: Any, key: jax.Array, *,
                           p: float | jax.Array, bits: int, w_max: float | None = None,
                           grad_clamp: float = 0.05, loss_threshold: float | None = None,
                           perturbed: bool = True):
  """Loss and gradient of random bit error training (RandBET, Stutz et al. Sec. 5).

  Computes the loss on the clean quantized weights ``L(Q(w))`` and on the same codes with freshly drawn
  random bit errors ``L(BE(Q(w)))``, both with straight-through gradients to the float weights ``w``,
  and returns the average gradient ``(g_clean + clip(g_perturbed, -grad_clamp, grad_clamp)) / 2``.
  With ``loss_threshold`` tau, the perturbed term is used only when the clean loss is below 1.15 tau and
  the mean of both losses at most tau (the paper's curriculum, evaluated on the current step).

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` (close over the batch).
    params: float parameters.
    key: key of this step's error pattern (draw a fresh one every step).
    p: training bit error rate (e.g. 0.01).
    bits: code width.
    w_max: clipping bound used by quantization (combine with :func:`clip_weights`).
    grad_clamp: clamp of the perturbed gradient.
    loss_threshold: optional tau of the curriculum.
    perturbed: False gives plain quantization-aware training with clipping (the "Clipping" model).

  Returns:
    ``((clean_loss, perturbed_loss), grads)``.

  Example:
    >>> w = {"w": jnp.array([0.5, -0.25, 1.0])}
    >>> loss = lambda q: jnp.sum(q["w"] ** 2)
    >>> (clean, perturbed), g = randbet_value_and_grad(loss, w, jax.random.PRNGKey(0), p=0.01, bits=8)
    >>> round(float(clean), 3), np.asarray(g["w"], float).round(3).tolist()   # (2w + clip(g_pert)) / 2
    (1.312, [0.525, -0.275, 1.025])
  """
  check_range("grad_clamp", grad_clamp, 0.0, low_inclusive=False)
  qp = quantize_params(params, bits, w_max)
  clean_vals = dequantize_params(qp)
  clean_loss, g_clean = jax.value_and_grad(lambda w: loss_fn(_straight_through(w, clean_vals)))(params)
  if not perturbed:
    return (clean_loss, jnp.zeros_like(clean_loss)), g_clean
  noisy_vals = perturb_params(key, params, p, bits, quantized=qp)
  pert_loss, g_pert = jax.value_and_grad(lambda w: loss_fn(_straight_through(w, noisy_vals)))(params)
  combined = jax.tree_util.tree_map(lambda a, b: (a + jnp.clip(b, -grad_clamp, grad_clamp)) / 2,
                                    g_clean, g_pert)
  if loss_threshold is not None:
    on = (clean_loss < 1.15 * loss_threshold) & ((clean_loss + pert_loss) / 2 <= loss_threshold)
    combined = jax.tree_util.tree_map(lambda c, g: jnp.where(on, c, g), combined, g_clean)
  return (clean_loss, pert_loss), combined


class RobustError(NamedTuple):
  """Outcome of :func:`robust_error`: clean error, per-pattern RErr, their mean and std."""
  err: float
  rerr_per_pattern: np.ndarray
  rerr_mean: float
  rerr_std: float


def robust_error(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array,
                 y: jax.Array, *, p: float, bits: int, num_patterns: int = 25, seed: int = 100,
                 w_max: float | None = None, symmetric: bool = False) -> RobustError:
  """Robust test error RErr under random bit errors (Stutz et al., Sec. 6).

  For each of ``num_patterns`` fixed error patterns (keys ``seed``, ``seed + 1``, ... so every model
  sees the same patterns), RErr is the fraction of examples misclassified by the clean quantized model or
  by the perturbed one; the mean and std over patterns are reported with the clean quantized error Err.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: float parameters (quantized here with :func:`quantize_params`).
    x, y: test inputs and integer labels.
    p: bit error rate.
    bits: code width.
    num_patterns: error patterns to average over.
    seed: key of the first pattern.
    w_max: the clipping bound the model was trained with (None = no clipping).
    symmetric: quantize with the symmetric scheme instead of RQuant (see :func:`quantize_params`).

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
    >>> params = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 4))}
    >>> y = jnp.argmax(x @ params["w"], -1)                          # labels of the float model
    >>> r = robust_error(lambda p, x: x @ p["w"], params, x, y, p=0.02, bits=4, num_patterns=3)
    >>> round(r.err, 3), r.rerr_per_pattern.shape, r.rerr_mean > r.err      # 4-bit error, then RErr at p = 2%
    (0.031, (3,), True)
  """
  check_int("num_patterns", num_patterns, 1)
  _check_p(p)
  if len(x) != len(y):
    raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
  qp = quantize_params(params, bits, w_max, symmetric)
  clean_wrong = jnp.argmax(apply_fn(dequantize_params(qp), x), -1) != y

  @jax.jit
  def one(k):
    noisy = perturb_params(k, params, p, bits, quantized=qp)
    wrong = jnp.argmax(apply_fn(noisy, x), -1) != y
    return jnp.mean(wrong | clean_wrong)

  keys = [jax.random.PRNGKey(seed + i) for i in range(num_patterns)]
  r = np.array([float(one(k)) for k in keys])
  return RobustError(float(jnp.mean(clean_wrong)), r, float(r.mean()), float(r.std()))
