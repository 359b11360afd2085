"""Exact video CNN inference that skips only what ReLU provably zeroes (range-bound-aware convolution).

Wakatsuki, Kanai and Fujiwara, *Accelerate Inference of CNNs for Video Analysis While Preserving
Exactness Exploiting Activation Sparsity*, MLSys 2021. Consecutive video frames are similar and ReLU
CNN activations are sparse: for a convolution + bias + ReLU layer, an upper bound on each output's
pre-activation that is ``< 0`` proves the output is exactly ``0`` and the output need not be computed;
an output whose receptive field did not change (bit for bit) equals the previous frame's output. The
paper's own bound was not available to us (only its first page); the bounds here are derived below
and are sound by construction (see ``/work/shared/papers/wave2.md`` section 8).

**Bounds** (per output tile ``t`` of ``T x T`` positions and output channel ``o``). Let
``W+[c, o] = sum_{i,j} max(w[i,j,c,o], 0)``, ``W-[c, o] = sum_{i,j} min(w[i,j,c,o], 0)`` and
``|W|[c, o] = sum_{i,j} |w[i,j,c,o]|``. All per-tile quantities below are maxima/minima over the tile's
*receptive field* (the tile plus its halo, padding zeros included), per input channel ``c``:

* range bound (no temporal information), from ``x in [xmin_c, xmax_c]``:
  ``z <= b + sum_c xmax_c W+[c,o] + xmin_c W-[c,o]``;
* temporal bound, from ``z_t = z_{t-1} + sum_k w_k (x_t - x_{t-1})_k`` with the input change
  ``d in [dmin_c, dmax_c]``:
  ``z_t <= P_{t-1} + sum_c dmax_c W+[c,o] + dmin_c W-[c,o]``, where ``P_{t-1}`` is this module's
  stored upper bound on the *real* pre-activation of the previous frame over the tile (computed tiles:
  the tile maximum of the computed pre-activation plus its error bound; skipped tiles: their bound).

The tile is skipped when ``min(range, temporal) + margin < 0``; tiles whose receptive field is
bit-identical to the previous frame's reuse the previous outputs; every other tile is computed by the
same convolution as dense inference, on the tile plus halo.

**Floating-point margin** (why a skipped output is exactly 0 in dense float32 inference). Let
``n = kh * kw * c_in``, ``u`` the unit roundoff of the products/sums (``2**-24`` for float32) and
``A_c = max |x_c|`` over the receptive field, ``S = |b| + sum_c A_c |W|[c,o]``
``>= |b| + sum_k |w_k x_k|``. Dense inference computes ``zhat = fl(conv) + b``, a dot product of
``n + 1`` terms in *some* order (with or without FMA); the classical bound (Higham, *Accuracy and
Stability of Numerical Algorithms*, eq. 3.5, valid for any summation order) gives
``|zhat - z| <= gamma_{n+1} S`` with ``gamma_m = m u / (1 - m u) <= 1.01 m u`` for ``m u <= 0.01``,
plus at most ``2(n+2) * 2**-126`` if products or partial sums underflow (flush-to-zero included).
The bounds themselves are evaluated in float32: a sum of ``c_in + 2`` terms, each bounded in
magnitude by ``|P_{t-1}|``, ``|b|`` or ``(A_t + A_{t-1}) |W|`` (temporal) / ``A |W|`` (range), so
their evaluation error is ``<= gamma_{c_in+3}`` times the sum of those magnitudes; rounding the
float32 difference ``fl(x_t - x_{t-1})`` adds ``<= u (A_t + A_{t-1}) |W|``. The module adds
``2 u [(n + 1) S + (c_in + 3) (|P_{t-1}| + |b| + 2 D)] + 4 (n + 2) 2**-126`` with
``D = sum_c (A_{t,c} + A_{t-1,c}) |W|[c,o]`` (``D = sum_c A_c |W|`` for the range bound): the factor
2 instead of 1.01 also covers the few roundings of evaluating the margin itself (all its terms are
non-negative, relative error ``<= 10 u``), and every sum that must be an upper bound is finally
rounded up by one ulp (``nextafter(., +inf)``). Hence ``bound + margin < 0`` implies ``zhat < 0`` and
``relu(zhat) = +0.0`` exactly, the same bits as the skipped output.

*Assumption*: the convolution is computed as a dot product per output (im2col/direct, as XLA does on
CPU) in float32. Winograd/FFT algorithms or TF32 tensor cores (GPU, default precision) have other error
bounds: pass ``unit_roundoff=2**-10`` for TF32 and use ``precision=HIGHEST`` where cuDNN might pick
Winograd. NaN/inf inputs never satisfy a bound test, so they are computed and propagate as in dense
inference.

**Execution** (per frame). One pass over the frame compares it bit for bit with the previous one and
records, per ``T x T`` tile, whether anything changed in the tile and in its border strips (the rows
and columns the neighbouring output tiles' receptive fields read): the receptive-field change test
of every output tile is then exact and costs nothing per pixel. From there on change is tracked per
tile through the layers: a layer's output tile counts as changed only if its new bits differ, so a
change that ReLU zeroes (or a proved-zero tile that was zero before) stops there, and a layer whose
receptive fields did not change does no work at all (change propagation across layers). Once per
frame, when more of the first layer's tiles changed than its sparse capacity holds, the whole network
runs densely (plain convs, nothing else; counted in ``ModelState.dense_frames``). Otherwise, per
layer, the number of changed tiles picks one path before any bound is evaluated:
nothing (reuse everything), the sparse path at the smallest static capacity that holds them
(gather tile-plus-halo patches of the input, evaluate the bounds on them, convolve the tiles not
proved zero as one batch, scatter the new tiles into the previous output), or the plain dense
convolution when more tiles changed than the largest capacity (a per-layer threshold, measured by
:func:`calibrate_active_fraction`). The temporal bound of the first layer reads the previous frame's
patches; later layers read the per-tile ranges of their input's change (``LayerState.dmax/dmin`` of
the layer before, over the 3 x 3 neighbouring tiles), so no layer re-reads a previous output. Each
choice is a ``lax.while_loop`` of 0 or 1 trips (:func:`_when`), not a ``lax.cond``: XLA updates a
loop's carry in place, so no path copies a layer's output (with ``lax.switch`` it copied every
output once per frame); under ``jax.jit(step, donate_argnums=0)`` the state is updated in place.

**Exactness of computed tiles.** The dense fallback is the flax model's own convolution (same padding,
same op). On XLA:CPU the tile convolution (batched convolution of tile-plus-halo patches) gives
*bitwise* the same numbers as the full-frame convolution (checked in ``tests/test_infer_video.py``
against the flax model itself); on other backends it is the same convolution on the same inputs, and
any difference is float32 rounding only, which ``benchmarks/video_conv.py`` counts.

Example (a 2-layer ReLU CNN over 3 frames; every output equals the flax model's, bit for bit):

>>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
>>> from mlsys_jax.infer import video
>>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Conv(4, (3, 3)), nn.relu])
>>> frames = video.synthetic_video(0, num_frames=3, height=16, width=16, activity="low")
>>> variables = net.init(jax.random.PRNGKey(0), frames[:1])
>>> rb = video.range_bound_model(net, variables, frames.shape[1:], tile=4)
>>> state, y = rb.init(frames[0])
>>> step = jax.jit(rb.step, donate_argnums=0)  # the state's buffers are updated in place
>>> for f in frames[1:]:
...   state, y, stats = step(state, f)
>>> bool(jnp.all(y == net.apply(variables, frames[-1:])[0]))
True
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlsys_jax._checks import check_choice, check_finite, check_int, check_range

__all__ = [
    "ConvLayer",
    "LayerState",
    "LayerStats",
    "ModelState",
    "RangeBoundModel",
    "calibrate_active_fraction",
    "conv_layer_init",
    "conv_layer_step",
    "dense_conv",
    "dense_model",
    "fp_margin_factor",
    "highpass_variables",
    "layers_from_flax",
    "load_frames",
    "range_bound_model",
    "range_upper_bound",
    "relu_cnn",
    "synthetic_video",
    "temporal_upper_bound",
]

_TINY = 2.0 ** -126
_DN = ("NHWC", "HWIO", "NHWC")


class ConvLayer(NamedTuple):
  """One stride-1 convolution + bias (+ ReLU). ``kernel``: ``(kh, kw, c_in, c_out)`` (HWIO) float32;
  ``bias``: ``(c_out,)`` float32; ``padding``: ``"SAME"`` (odd ``kh`` and ``kw`` only: an even kernel's
  SAME padding is asymmetric) or ``"VALID"``; ``relu``: whether a ReLU follows (without it, only
  bit-identical reuse is possible); ``precision``: passed to the conv. The functions that take a layer
  refuse anything else with a ``ValueError``/``TypeError`` (the float32 margin, :func:`fp_margin_factor`,
  covers float32 arithmetic only)."""
  kernel: jax.Array
  bias: jax.Array
  padding: str = "SAME"
  relu: bool = True
  precision: Any = None
  name: str = "conv"


class LayerState(NamedTuple):
  """Per-layer state after a frame: its output ``y`` ``(H', W', c_out)``, ``ub`` ``(nH, nW, c_out)``, an
  upper bound on the real pre-activation over each output tile (``+inf``: unknown), ``amax``
  ``(nH, nW, c_out)``, an upper bound on ``|y|`` over each output tile (the next layer's input range for
  its dense-path margin), and ``dmax``/``dmin`` ``(nH, nW, c_out)``, the range of this frame's output
  change ``y_t - y_{t-1}`` per tile (0 where unchanged, ``+-inf`` after a dense frame: unknown), which
  the next layer's temporal bound reads instead of the previous output (so that output can be
  updated in place)."""
  y: jax.Array
  ub: jax.Array
  amax: jax.Array
  dmax: jax.Array
  dmin: jax.Array


class ModelState(NamedTuple):
  """State of a stream: the previous frame ``x`` ``(H, W, C)``, one :class:`LayerState` per layer and
  ``dense_frames``, the number of frames so far that ran the whole network densely (the network-level
  fallback, taken when the first layer's changed tiles exceed its sparse capacity)."""
  x: jax.Array
  layers: tuple
  dense_frames: Any = 0


class LayerStats(NamedTuple):
  """Tile counts of one layer on one frame: ``reused`` (receptive field unchanged), ``skipped`` (proved
  zero), ``computed`` (all other tiles), ``dense`` (1 when the layer ran the dense conv), ``zero_tiles``
  (tiles whose outputs are all 0, the most any exact skip could reach) and ``zero_fraction`` (fraction
  of exactly-zero outputs). Unused fields cost nothing under ``jit`` (dead code)."""
  reused: jax.Array
  skipped: jax.Array
  computed: jax.Array
  dense: jax.Array
  zero_tiles: jax.Array
  zero_fraction: jax.Array


class RangeBoundModel(NamedTuple):
  """``init(frame) -> (state, output)`` (dense) and ``step(state, frame) -> (state, output, stats)``
  (jit-able; ``stats`` is a tuple of :class:`LayerStats`, one per layer); ``capacities``: per layer,
  the static tile capacities of the sparse path (above the largest one the layer runs densely)."""
  init: Callable
  step: Callable
  layers: tuple
  capacities: tuple


# ----------------------------------------------------------------------------------------------------
# geometry


def _check_layer(layer: Any) -> None:
  """Raise unless ``layer`` is a :class:`ConvLayer` this module computes exactly: a 4-D float32 kernel,
  a ``(c_out,)`` float32 bias, ``"SAME"`` (odd kernel) or ``"VALID"`` padding. Static checks only (shapes,
  dtypes), so they also run on traced layers."""
  if not isinstance(layer, ConvLayer):
    raise TypeError(f"expected a video.ConvLayer, got {type(layer).__name__}.")
  name = layer.name
  for what, a, rank in (("kernel", layer.kernel, 4), ("bias", layer.bias, 1)):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise TypeError(f"layer {name}: {what} must be an array, got {type(a).__name__}.")
    if jax.dtypes.canonicalize_dtype(a.dtype) != jnp.float32:
      raise TypeError(f"layer {name}: {what} must be float32, got {a.dtype} (the exactness margin covers "
                      f"float32 arithmetic only); cast it, e.g. layer._replace({what}=layer.{what}"
                      ".astype(jnp.float32)).")
    if a.ndim != rank:
      raise ValueError(f"layer {name}: {what} must have rank {rank} "
                       f"({'(kh, kw, c_in, c_out) HWIO' if rank == 4 else '(c_out,)'}), got shape {a.shape}.")
  kh, kw, _, c_out = layer.kernel.shape
  if tuple(layer.bias.shape) != (c_out,):
    raise ValueError(f"layer {name}: bias must have shape ({c_out},) (one per output channel of the kernel "
                     f"{tuple(layer.kernel.shape)}), got {tuple(layer.bias.shape)}.")
  check_choice(f"layer {name} padding", layer.padding, ("SAME", "VALID"))
  if layer.padding == "SAME" and (kh % 2 == 0 or kw % 2 == 0):
    raise ValueError(f"layer {name}: SAME padding with an even kernel {(kh, kw)} is not supported (its padding is "
                     "asymmetric, flax pads one more row/column after than before); use an odd kernel size, or "
                     "padding='VALID' with the input padded as you need.")


def _pads(layer: ConvLayer) -> tuple[int, int]:
  kh, kw = layer.kernel.shape[:2]
  if layer.padding == "VALID":
    return 0, 0
  return (kh - 1) // 2, (kw - 1) // 2


def _geometry(layer: ConvLayer, hw: tuple[int, int], tile: int):
  kh, kw = layer.kernel.shape[:2]
  ph, pw = _pads(layer)
  ho, wo = hw[0] + 2 * ph - kh + 1, hw[1] + 2 * pw - kw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"layer {layer.name}: a {kh}x{kw} VALID convolution does not fit a {hw} input.")
  if kh - 1 > tile or kw - 1 > tile:
    raise ValueError(f"layer {layer.name}: tile={tile} is smaller than the {kh}x{kw} kernel's halo; "
                     f"use tile >= {max(kh, kw) - 1}.")
  nh, nw = -(-ho // tile), -(-wo // tile)
  return ho, wo, nh, nw, ph, pw


def _strips(layer: ConvLayer) -> tuple[int, int, int, int]:
  """Widths of the input-tile border strips this layer's output tiles read from their neighbours:
  (top strip of the tile below, bottom strip of the tile above, left strip of the tile to the right,
  right strip of the tile to the left) = ``(kh - 1 - ph, ph, kw - 1 - pw, pw)``."""
  kh, kw = layer.kernel.shape[:2]
  ph, pw = _pads(layer)
  return kh - 1 - ph, ph, kw - 1 - pw, pw


def _bits(a: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(a, jnp.int32)


def _tile_grid(a: jax.Array, tile: int, nh: int, nw: int, fill) -> jax.Array:
  """``(H, W, ...)`` -> ``(nH, T, nW, T, ...)`` (a reshape, no transpose), padded with ``fill``."""
  h, w = a.shape[:2]
  pad = ((0, nh * tile - h), (0, nw * tile - w)) + ((0, 0),) * (a.ndim - 2)
  return jnp.pad(a, pad, constant_values=fill).reshape((nh, tile, nw, tile) + a.shape[2:])


def _tile_max(a: jax.Array, tile: int, nh: int, nw: int, fill) -> jax.Array:
  """Per-tile, per-channel max of ``(H, W, C)`` -> ``(nH, nW, C)``."""
  return jnp.max(_tile_grid(a, tile, nh, nw, fill), axis=(1, 3))


def _region_flags(m: jax.Array, strips: tuple[int, int, int, int], axes=(-2, -1)) -> jax.Array:
  """Change flags of tiles ``m`` (bool, tile rows/columns on ``axes``): each axis becomes 3 entries,
  any change in the (top strip, whole tile, bottom strip) rows and (left strip, whole, right strip)
  columns; ``(..., T, T)`` -> ``(..., 3, 3)``."""
  top, bottom, left, right = strips
  ra, ca = (a % m.ndim for a in axes)
  def parts(a, axis, lo, hi):
    n = a.shape[axis]
    zero = jnp.zeros(a.shape[:axis] + a.shape[axis + 1:], bool)
    part = lambda s, e: jnp.any(lax.slice_in_dim(a, s, e, axis=axis), axis=axis) if e > s else zero
    return jnp.stack([part(0, lo), part(0, n), part(n - hi, n)], axis=axis)
  return parts(parts(m, ra, top, bottom), ca, left, right)


def _grid_flags(m: jax.Array, tile: int, nh: int, nw: int, strips) -> jax.Array:
  """Region flags ``(nH, nW, 3, 3)`` of a full change map ``(H, W)`` (bool)."""
  f = _region_flags(_tile_grid(m, tile, nh, nw, False), strips, axes=(1, 3))  # (nh, 3, nw, 3)
  return f.transpose(0, 2, 1, 3)


def _rf_changed(flags: jax.Array, nh: int, nw: int) -> jax.Array:
  """Output tiles ``(nh, nw)`` whose receptive field holds a changed input, from the input tiles'
  region flags ``(nhi, nwi, 3, 3)`` (same tile grid): tile ``(i, j)`` reads the whole input tile
  ``(i, j)``, the bottom strip of ``(i-1, j)``, the top strip of ``(i+1, j)``, and so on."""
  nhi, nwi = flags.shape[:2]
  f = jnp.pad(flags, ((1, 1 + max(0, nh - nhi)), (1, 1 + max(0, nw - nwi)), (0, 0), (0, 0)))
  out = jnp.zeros((nh, nw), bool)
  for di in (-1, 0, 1):
    for dj in (-1, 0, 1):
      out = out | f[1 + di:1 + di + nh, 1 + dj:1 + dj + nw, 1 - di, 1 - dj]
  return out


def _tile_index(x: jax.Array, ti: jax.Array, tj: jax.Array, tile: int, size: tuple[int, int],
                offset: tuple[int, int]):
  """Row/column index arrays ``(k, sh, 1)``, ``(k, 1, sw)`` of the windows starting at
  ``(ti * T + offset[0], tj * T + offset[1])``; out-of-range rows/columns (negative included) are
  mapped past the end so that ``mode='fill'`` reads 0 and ``mode='drop'`` writes nothing."""
  h, w = x.shape[:2]
  r = ti[:, None] * tile + offset[0] + jnp.arange(size[0])[None]
  c = tj[:, None] * tile + offset[1] + jnp.arange(size[1])[None]
  r = jnp.where((r < 0) | (r >= h), h, r)
  c = jnp.where((c < 0) | (c >= w), w, c)
  return r[:, :, None], c[:, None, :]


def _gather_windows(x, ti, tj, tile, size, offset):
  """``(k, sh, sw, C)`` windows of ``x`` ``(H, W, C)``, zero outside (the convolution's padding)."""
  r, c = _tile_index(x, ti, tj, tile, size, offset)
  return x.at[r, c].get(mode="fill", fill_value=0)


def _conv_valid(x: jax.Array, layer: ConvLayer) -> jax.Array:
  """Batched VALID conv + bias of tile-plus-halo patches ``(k, T+kh-1, T+kw-1, c_in)`` -> ``(k, T, T,
  c_out)``. On XLA:CPU a VALID conv with a large batch is several times slower than a padded one, so
  there the patches are convolved with SAME-style padding and the ring of outputs that read padding is
  cut off (the kept outputs read no padding; bitwise the dense conv's values, tested); other backends
  run the VALID conv."""
  kh, kw = layer.kernel.shape[:2]
  if jax.default_backend() == "cpu" and (kh > 1 or kw > 1):
    lo_h, lo_w = (kh - 1) // 2, (kw - 1) // 2
    z = lax.conv_general_dilated(x, layer.kernel, (1, 1), ((lo_h, kh - 1 - lo_h), (lo_w, kw - 1 - lo_w)),
                                 dimension_numbers=_DN, precision=layer.precision)
    z = z[:, lo_h:lo_h + x.shape[1] - kh + 1, lo_w:lo_w + x.shape[2] - kw + 1]
  else:
    z = lax.conv_general_dilated(x, layer.kernel, (1, 1), "VALID", dimension_numbers=_DN,
                                 precision=layer.precision)
  return z + layer.bias


def _act(layer: ConvLayer, z: jax.Array) -> jax.Array:
  return jax.nn.relu(z) if layer.relu else z


def _dense_pre(layer: ConvLayer, x: jax.Array) -> jax.Array:
  """Conv + bias of one frame, exactly as ``flax.linen.Conv`` computes it (same padding, same op);
  ``x``: ``(H, W, c_in)`` or ``(1, H, W, c_in)``, the result has the same rank."""
  ph, pw = _pads(layer)
  z = lax.conv_general_dilated(x if x.ndim == 4 else x[None], layer.kernel, (1, 1),
                               ((ph, ph), (pw, pw)), dimension_numbers=_DN, precision=layer.precision)
  return (z if x.ndim == 4 else z[0]) + layer.bias


def dense_conv(layer: ConvLayer, x: jax.Array) -> jax.Array:
  """Dense conv + bias (+ ReLU) of one frame ``(H, W, c_in)``, as ``flax.linen.Conv`` computes it.
  ``layer`` is checked as described in :class:`ConvLayer` (``ValueError``/``TypeError``)."""
  _check_layer(layer)
  return _act(layer, _dense_pre(layer, x))


# ----------------------------------------------------------------------------------------------------
# bounds


def _kernel_sums(kernel: jax.Array):
  wp = jnp.sum(jnp.maximum(kernel, 0), axis=(0, 1))
  wn = jnp.sum(jnp.minimum(kernel, 0), axis=(0, 1))
  wa = jnp.sum(jnp.abs(kernel), axis=(0, 1))
  return wp, wn, wa  # each (c_in, c_out)


def fp_margin_factor(n: int, unit_roundoff: float = 2.0 ** -24) -> float:
  """``2 (n + 1) u``: the relative dense-conv error factor of the margin (see the module docstring);
  requires ``(n + 1) u <= 0.01`` so that ``gamma_{n+1} <= 1.01 (n + 1) u``."""
  check_int("n", n, 1)
  check_range("unit_roundoff", unit_roundoff, 0.0, 0.01, low_inclusive=False)
  if (n + 1) * unit_roundoff > 0.01:
    raise ValueError(f"(n + 1) * unit_roundoff = {(n + 1) * unit_roundoff:.3g} > 0.01: the margin "
                     "derivation does not hold; use a smaller kernel or a more precise dtype.")
  return 2.0 * (n + 1) * unit_roundoff


def _up(a: jax.Array) -> jax.Array:
  return jnp.nextafter(a, jnp.asarray(jnp.inf, a.dtype))


def range_upper_bound(layer: ConvLayer, xmin: jax.Array, xmax: jax.Array,
                      unit_roundoff: float = 2.0 ** -24) -> tuple[jax.Array, jax.Array]:
  """Upper bound on the *real* pre-activation and the dense-error margin, from the input range.

  Args:
    layer: the convolution.
    xmin, xmax: ``(..., c_in)`` per-channel minimum/maximum of the input over the receptive field.
    unit_roundoff: ``u`` of the arithmetic (``2**-24`` for float32).
  Returns:
    ``(ub, dense_margin)``, each ``(..., c_out)``: ``z <= ub`` and ``|zhat - z| <= dense_margin``.
  """
  kh, kw, cin, _ = layer.kernel.shape
  n = kh * kw * cin
  wp, wn, wa = _kernel_sums(layer.kernel)
  a = jnp.maximum(jnp.abs(xmin), jnp.abs(xmax))
  babs = jnp.abs(layer.bias)
  s = babs + a @ wa
  dense_margin = fp_margin_factor(n, unit_roundoff) * s + 4 * (n + 2) * _TINY
  u = unit_roundoff
  ub = layer.bias + xmax @ wp + xmin @ wn
  ub = _up(ub + 2 * u * (cin + 3) * (babs + s) + 4 * (n + 2) * _TINY)
  return ub, dense_margin


def temporal_upper_bound(layer: ConvLayer, prev_ub: jax.Array, dmin: jax.Array, dmax: jax.Array,
                         amax: jax.Array, unit_roundoff: float = 2.0 ** -24) -> jax.Array:
  """Upper bound on the real pre-activation from the previous frame's bound ``prev_ub``
  ``(..., c_out)``, the per-channel range ``[dmin, dmax]`` of the float32 input change and ``amax``,
  ``max |x_t| + max |x_{t-1}|`` per channel over the receptive field (all ``(..., c_in)``)."""
  kh, kw, cin, _ = layer.kernel.shape
  n = kh * kw * cin
  wp, wn, wa = _kernel_sums(layer.kernel)
  u = unit_roundoff
  d = amax @ wa
  ub = prev_ub + dmax @ wp + dmin @ wn
  margin = 2 * u * (cin + 3) * (jnp.abs(prev_ub) + jnp.abs(layer.bias) + 2 * d) + 4 * (n + 2) * _TINY
  return _up(ub + margin)


# ----------------------------------------------------------------------------------------------------
# one layer


def _input_tile_stats(x: jax.Array, x_prev: jax.Array, tile: int, strips) -> tuple[jax.Array, jax.Array]:
  """Region change flags ``(nH, nW, 3, 3)`` and per-tile ``max |x|`` ``(nH, nW, C)`` of a frame (the
  first layer's input), on the ``T``-tile grid of the frame: one pass over the frame."""
  nh, nw = -(-x.shape[0] // tile), -(-x.shape[1] // tile)
  flags = _grid_flags(jnp.any(_bits(x) != _bits(x_prev), axis=-1), tile, nh, nw, strips)
  return flags, _tile_max(jnp.abs(x), tile, nh, nw, 0)


def _dense_outputs(layer: ConvLayer, x: jax.Array, in_amax: jax.Array, tile: int, unit_roundoff: float,
                   bounds: bool = True):
  """Dense conv of one layer and its per-tile state: ``(y, ub, amax)``. The margin of ``ub`` uses the
  frame's per-channel ``max |x|`` (from the per-tile maxima ``in_amax``): looser than per tile by a
  relative ~1e-4 of ``sum |w||x|``, and a handful of tiny ops instead of per-tile work. Without
  ``bounds``: the plain dense conv, ``ub = +inf`` (unknown) and ``amax`` the analytic bound
  ``(|b| + sum_c max|x_c| |W|[c, o]) (1 + 2 (n + c_in + 2) u)`` rounded up (``|y| <= |zhat|``, which
  exceeds ``|b| + sum |w||x|`` by at most ``gamma_{n+1}`` relatively; the bound's own evaluation errs by
  at most ``gamma_{c_in + 1}``): no pass over the output. ``x`` may be ``(1, H, W, c_in)``; ``y``
  then has the batch dimension too."""
  if x.ndim == 4 and bounds:
    y, ub, amax = _dense_outputs(layer, x[0], in_amax, tile, unit_roundoff, bounds)
    return y[None], ub, amax
  ho, wo, nh, nw, _, _ = _geometry(layer, x.shape[-3:-1], tile)
  if not bounds:
    kh, kw, cin, cout = layer.kernel.shape
    a = jnp.max(in_amax, axis=(0, 1))
    s = (jnp.abs(layer.bias) + a @ _kernel_sums(layer.kernel)[2]) * (
        1 + 2 * (kh * kw * cin + cin + 2) * unit_roundoff)
    amax = jnp.broadcast_to(_up(s + 4 * (kh * kw * cin + 2) * _TINY), (nh, nw, cout))
    return dense_conv(layer, x), jnp.full((nh, nw, cout), jnp.inf, x.dtype), amax
  z = _dense_pre(layer, x)
  zmax = _tile_max(z, tile, nh, nw, -jnp.inf)  # (nh, nw, cout)
  a = jnp.max(in_amax, axis=(0, 1))
  _, dm = range_upper_bound(layer, -a, a, unit_roundoff)
  y = _act(layer, z)
  amax = jax.nn.relu(zmax) if layer.relu else _tile_max(jnp.abs(z), tile, nh, nw, 0)
  return y, _up(zmax + dm), amax


def conv_layer_init(layer: ConvLayer, x: jax.Array, tile: int, unit_roundoff: float = 2.0 ** -24, *,
                    in_amax: jax.Array | None = None) -> tuple[LayerState, jax.Array]:
  """Dense first frame of one layer: returns its state and output. ``in_amax`` ``(nHi, nWi, c_in)``:
  per-input-tile ``max |x|`` (computed from ``x`` when omitted)."""
  _check_layer(layer)
  if in_amax is None:
    in_amax = _input_tile_stats(x, x, tile, _strips(layer))[1]
  y, ub, amax = _dense_outputs(layer, x, in_amax, tile, unit_roundoff)
  zeros = jnp.zeros_like(ub)
  return LayerState(y=y, ub=ub, amax=amax, dmax=zeros, dmin=zeros), y


def _neighbours(m: jax.Array, ti: jax.Array, tj: jax.Array) -> jax.Array:
  """``(k, 3, 3, C)``: the 3 x 3 neighbourhood of tiles ``(ti, tj)`` in a per-tile map ``(nH, nW, C)``
  (0 outside the map: padding never changes)."""
  r = ti[:, None] + jnp.arange(-1, 2)[None]
  c = tj[:, None] + jnp.arange(-1, 2)[None]
  nh, nw = m.shape[:2]
  r = jnp.where((r < 0) | (r >= nh), nh, r)
  c = jnp.where((c < 0) | (c >= nw), nw, c)
  return m.at[r[:, :, None], c[:, None, :]].get(mode="fill", fill_value=0)


def _layer_stats(y, tile, nh, nw, reused, skipped, computed, dense) -> LayerStats:
  """:class:`LayerStats` of one layer's output ``y`` (the zero counts are dead code unless used)."""
  return LayerStats(reused=reused, skipped=skipped, computed=computed, dense=dense,
                    zero_tiles=jnp.sum(jnp.all(_tile_grid(y, tile, nh, nw, 0) == 0, axis=(1, 3, 4)))
                    .astype(jnp.int32),
                    zero_fraction=jnp.mean((y == 0).astype(jnp.float32)))


def _when(pred: jax.Array, fn: Callable, carry: Any) -> Any:
  """``fn(carry) if pred else carry`` as a ``lax.while_loop`` of 0 or 1 trips. XLA updates a while
  loop's carry in place, but copies the buffers a ``lax.cond``/``lax.switch`` passes through or updates
  (its outputs never share buffers with its operands): with a chain of these, a branch that leaves a
  layer's output alone, rewrites a few tiles or writes a fresh dense output costs no copy of it."""
  def body(c):
    return jnp.zeros((), bool), fn(c[1])
  return lax.while_loop(lambda c: c[0], body, (jnp.asarray(pred, bool), carry))[1]


def _buckets_for(caps, count):
  """Branch index into ``[nothing, caps[0], ..., caps[-1], dense]`` for ``count`` tiles to process."""
  b = jnp.sum(jnp.asarray([count > c for c in caps], jnp.int32)) if caps else jnp.zeros((), jnp.int32)
  return jnp.where(count == 0, 0, 1 + b)


def conv_layer_step(layer: ConvLayer, state: LayerState, x: jax.Array, x_prev: jax.Array | None,
                    changed: jax.Array, in_amax: jax.Array, *, tile: int, capacity: Sequence[int],
                    unit_roundoff: float = 2.0 ** -24, next_strips=(0, 0, 0, 0),
                    dense_bounds: bool = True, in_change: tuple | None = None,
                    with_stats: bool = True):
  """One frame through one layer: reuse unchanged tiles, skip provably-zero tiles, compute the rest.

  Args:
    layer: the convolution.
    state: the layer's :class:`LayerState` after the previous frame.
    x, x_prev: this and the previous frame's input ``(H, W, c_in)``; ``x_prev`` may be ``None`` when
      ``in_change`` is given.
    changed: ``(nH, nW)`` bool, output tiles whose receptive field changed (a superset is fine; see
      :func:`_rf_changed`); every other tile keeps its previous output.
    in_amax: ``(nHi, nWi, c_in)`` per-input-tile ``max |x|`` (used by the dense path's margin).
    tile: tile size ``T``.
    capacity: static tile capacities of the sparse path (buckets); the smallest bucket holding every
      changed tile is used (exactly one path runs). Nothing runs when no tile changed;
      the dense convolution runs, before any bound is evaluated, when more tiles changed than the
      largest bucket holds (``()``: dense whenever anything changed).
    unit_roundoff: ``u`` of the conv arithmetic.
    next_strips: the next layer's :func:`_strips` (which border strips of this layer's output tiles
      its receptive fields read).
    dense_bounds: whether the dense path computes the per-tile bound ``ub`` (a pass over the
      pre-activation); ``False``: ``ub = +inf`` (sound: the next sparse frame uses the range bound for
      those tiles) and an analytic ``amax``, the plain dense conv.
    in_change: ``(dmax, dmin)`` ``(nHi, nWi, c_in)``, the per-input-tile range of ``x - x_prev`` (the
      previous layer's :class:`LayerState` fields); the temporal bound then takes the range over the
      3 x 3 neighbouring input tiles (a superset of the receptive field) and ``x_prev`` is not read.
    with_stats: return :class:`LayerStats`; ``False``: only the tile counts ``(reused, skipped,
      computed, dense)``.
  Returns:
    ``(state, y, flags, stats)``: ``flags`` ``(nH, nW, 3, 3)`` are the region change flags of this
    layer's *output* tiles (bit-exact on the sparse path: a recomputed tile with the same bits is
    unchanged; all set after the dense path, which never reads the previous output, so that XLA can
    write the new output over it without a copy).
  """
  _check_layer(layer)
  if x_prev is not None and x.shape != x_prev.shape:
    raise ValueError(f"layer {layer.name}: input shape {x.shape} differs from the previous frame's "
                     f"{x_prev.shape}; start a new stream with init() for a new frame size.")
  kh, kw, cin, cout = layer.kernel.shape
  ho, wo, nh, nw, ph, pw = _geometry(layer, x.shape[:2], tile)
  n_tiles = nh * nw
  caps = sorted({int(c) for c in capacity if 1 <= int(c)})
  caps = sorted({min(c, n_tiles) for c in caps})
  count = jnp.sum(changed)
  zero = jnp.zeros((), jnp.int32)

  fill = lambda v: jnp.full((nh, nw, cout), v, x.dtype)

  nothing = (state.y, state.ub, state.amax, fill(0), fill(0), jnp.zeros((nh, nw, 3, 3), bool),
             (zero, zero))

  def dense(_):  # the plain conv; the previous output is not read (it is overwritten in place)
    y, ub, amax = _dense_outputs(layer, x, in_amax, tile, unit_roundoff, dense_bounds)
    return (y, ub, amax, fill(jnp.inf), fill(-jnp.inf), jnp.ones((nh, nw, 3, 3), bool),
            (zero, jnp.asarray(n_tiles, jnp.int32)))

  def sparse(cap):
    def run(carry):  # reads the previous state from the loop carry, so XLA updates it in place
      prev = LayerState(carry[0], carry[1], carry[2], None, None)
      (idx,) = jnp.nonzero(changed.reshape(-1), size=cap, fill_value=n_tiles)
      valid = idx < n_tiles
      ti = jnp.where(valid, idx // nw, nh + jnp.arange(cap))  # fill entries: distinct, out of range
      tj = jnp.where(valid, idx % nw, 0)
      size = (tile + kh - 1, tile + kw - 1)
      pc = _gather_windows(x, ti, tj, tile, size, (-ph, -pw))  # (cap, T+kh-1, T+kw-1, cin)
      xmax, xmin = jnp.max(pc, axis=(1, 2)), jnp.min(pc, axis=(1, 2))
      a_t = jnp.max(jnp.abs(pc), axis=(1, 2))
      if in_change is None:  # exact receptive-field change range from the previous input
        pp = _gather_windows(x_prev, ti, tj, tile, size, (-ph, -pw))
        d = pc - pp
        dmax, dmin = jnp.max(d, axis=(1, 2)), jnp.min(d, axis=(1, 2))
        a2 = a_t + jnp.max(jnp.abs(pp), axis=(1, 2))
      else:  # per-tile change ranges of the 3 x 3 neighbouring input tiles; |x_prev| <= |x| + |d|
        dmax = jnp.max(_neighbours(in_change[0], ti, tj), axis=(1, 2))
        dmin = jnp.min(_neighbours(in_change[1], ti, tj), axis=(1, 2))
        a2 = 2 * a_t + jnp.maximum(jnp.abs(dmax), jnp.abs(dmin))
      ub_r, dm = range_upper_bound(layer, xmin, xmax, unit_roundoff)
      prev_ub = prev.ub.reshape(n_tiles, cout)[jnp.minimum(idx, n_tiles - 1)]
      ub_t = temporal_upper_bound(layer, prev_ub, dmin, dmax, a2, unit_roundoff)
      ub = jnp.where(jnp.isnan(ub_t), ub_r, jnp.minimum(ub_t, ub_r))
      if layer.relu:  # every output of the tile is +0.0 in dense float32 inference
        skip = valid & jnp.all(_up(ub + dm) < 0, axis=-1)
      else:
        skip = jnp.zeros_like(valid)
      comp = valid & ~skip
      n_comp = jnp.sum(comp)
      inner = [c for c in caps if c < cap] + [cap]

      def conv_some(c2):
        def f(_):
          if c2 == cap:
            return _conv_valid(pc, layer)
          (pos,) = jnp.nonzero(comp, size=c2, fill_value=cap)
          z = _conv_valid(pc.at[pos].get(mode="fill", fill_value=0), layer)
          return jnp.full((cap, tile, tile, cout), -jnp.inf, z.dtype).at[pos].set(z, mode="drop")
        return f

      def no_conv(_):
        return jnp.full((cap, tile, tile, cout), -jnp.inf, x.dtype)

      z = lax.switch(jnp.minimum(_buckets_for(inner, n_comp), len(inner)),
                     [no_conv] + [conv_some(c) for c in inner], None)  # (cap, T, T, cout)
      ro, co = _tile_index(prev.y, ti, tj, tile, (tile, tile), (0, 0))
      vm = (ro < ho) & (co < wo)  # (cap, T, T): real output positions
      zmax = jnp.max(jnp.where(vm[..., None], z, -jnp.inf), axis=(1, 2))
      new_ub = jnp.where(comp[:, None], _up(zmax + dm), jnp.where(skip[:, None], ub, prev_ub))
      yt = jnp.where(comp[:, None, None, None], _act(layer, z), jnp.zeros((), z.dtype))
      yt = jnp.where(vm[..., None], yt, jnp.zeros((), z.dtype))
      old = prev.y.at[ro, co].get(mode="fill", fill_value=0)
      same = _bits(yt) == _bits(old)
      flags = _region_flags(jnp.any(~same, axis=-1), next_strips)  # (cap, 3, 3)
      amax_t = jnp.max(jnp.abs(yt), axis=(1, 2))
      dy = yt - old  # 0 at padding positions (both 0)
      dmax_t, dmin_t = jnp.max(dy, axis=(1, 2)), jnp.min(dy, axis=(1, 2))
      # the same bits either way; the data dependency makes XLA read the old tiles before the in-place
      # write below (unordered, it copies the whole output instead)
      yt = jnp.where(same, old, yt)
      y = prev.y.at[ro, co].set(yt, mode="drop", unique_indices=True)
      iu = jnp.where(valid, idx, n_tiles + jnp.arange(cap))  # distinct indices, fill ones dropped
      put = lambda full, v: full.reshape((n_tiles,) + full.shape[2:]).at[iu].set(
          v, mode="drop", unique_indices=True).reshape(full.shape)
      return (y, put(prev.ub, new_ub), put(prev.amax, amax_t), put(fill(0), dmax_t),
              put(fill(0), dmin_t), put(jnp.zeros((nh, nw, 3, 3), bool), flags),
              (jnp.sum(skip).astype(jnp.int32), n_comp.astype(jnp.int32)))
    return run

  branch = _buckets_for(caps, count)  # 0: nothing changed (the carry as it is), then caps, dense
  out = nothing
  for b, fn in enumerate([sparse(c) for c in caps] + [dense]):
    out = _when(branch == b + 1, fn, out)
  y, ub, amax, dmax, dmin, flags, (skipped, computed) = out
  used_dense = (count > (caps[-1] if caps else 0)).astype(jnp.int32)
  reused = jnp.where(used_dense > 0, 0, n_tiles - count).astype(jnp.int32)
  counts = (reused, skipped, computed, used_dense)
  stats = _layer_stats(y, tile, nh, nw, *counts) if with_stats else counts
  return LayerState(y=y, ub=ub, amax=amax, dmax=dmax, dmin=dmin), y, flags, stats


# ----------------------------------------------------------------------------------------------------
# model transform


def layers_from_flax(module: Any, variables: Any) -> tuple[ConvLayer, ...]:
  """Read a ``flax.linen.Sequential`` of stride-1 ``nn.Conv`` layers each followed by ``nn.relu``
  (the last conv may have no activation) into :class:`ConvLayer` s. Anything else is refused by name."""
  import flax.linen as nn
  if not isinstance(module, nn.Sequential):
    raise TypeError(f"range_bound_model supports flax.linen.Sequential ReLU CNNs, got "
                    f"{type(module).__name__}; rebuild the network as nn.Sequential([nn.Conv, nn.relu, "
                    "...]) or pass a list of ConvLayer.")
  params = variables.get("params", variables) if isinstance(variables, dict) else variables["params"]
  layers: list[ConvLayer] = []
  items = list(module.layers)
  i = 0
  while i < len(items):
    m = items[i]
    name = f"layers_{i}"
    if not isinstance(m, nn.Conv) or isinstance(m, nn.ConvTranspose):
      what = getattr(m, "__name__", type(m).__name__)
      raise ValueError(f"layer {name} is {what}: only nn.Conv followed by nn.relu is covered by the "
                       "bound; compute other layers densely after this model.")
    strides = m.strides if m.strides is not None else 1
    for attr, val in (("strides", strides), ("kernel_dilation", m.kernel_dilation),
                      ("input_dilation", m.input_dilation)):
      vals = (val,) if isinstance(val, int) else tuple(val)
      if any(v != 1 for v in vals):
        raise ValueError(f"layer {name}: {attr}={val} is not supported (stride-1, undilated convs only).")
    if m.feature_group_count != 1:
      raise ValueError(f"layer {name}: feature_group_count={m.feature_group_count} is not supported.")
    padding = m.padding if isinstance(m.padding, str) else None
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"layer {name}: padding={m.padding!r} is not supported; use 'SAME' or 'VALID'.")
    if m.dtype not in (None, jnp.float32) or m.param_dtype != jnp.float32:
      raise ValueError(f"layer {name}: only float32 convolutions are covered by the margin.")
    p = params[name]
    kernel = jnp.asarray(p["kernel"])
    if kernel.ndim != 4:
      raise ValueError(f"layer {name}: only 2-D convolutions (HWIO kernels) are supported.")
    if padding == "SAME" and (kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0):
      raise ValueError(f"layer {name}: SAME padding with an even kernel {kernel.shape[:2]} is not "
                       "supported (asymmetric padding); use odd kernels.")
    bias = jnp.asarray(p["bias"]) if m.use_bias else jnp.zeros((kernel.shape[-1],), kernel.dtype)
    relu = False
    if i + 1 < len(items) and not isinstance(items[i + 1], nn.Module):
      act = items[i + 1]
      if act is not nn.relu and act is not jax.nn.relu:
        raise ValueError(f"layer layers_{i + 1}: activation "
                         f"{getattr(act, '__name__', repr(act))} is not ReLU; the skip bound needs "
                         "ReLU (use nn.relu).")
      relu = True
      i += 1
    elif i + 1 < len(items):
      raise ValueError(f"layer {name} is not followed by nn.relu; only the last conv may lack ReLU.")
    layers.append(ConvLayer(kernel, bias, padding, relu, m.precision, name))
    i += 1
  if not layers:
    raise ValueError("the Sequential holds no layers.")
  return tuple(layers)




def _layer_list(module: Any, variables: Any) -> tuple[ConvLayer, ...]:
  if isinstance(module, (list, tuple)):
    layers = tuple(module)
    if not layers or not all(isinstance(l, ConvLayer) for l in layers):
      raise TypeError("a layer list must be a non-empty sequence of ConvLayer.")
    for l in layers:
      _check_layer(l)
    return layers
  return layers_from_flax(module, variables)


def _layer_shapes(layers, frame_shape, tile, unit_roundoff):
  """Input shape and ``(nH, nW)`` of every layer; validates channels, padding and the margin."""
  shapes, grids, hw, c = [], [], tuple(frame_shape[:2]), frame_shape[2]
  for l in layers:   # (checked by _layer_list)
    if l.kernel.shape[2] != c:
      raise ValueError(f"layer {l.name} expects {l.kernel.shape[2]} input channels, gets {c}.")
    ho, wo, nh, nw, _, _ = _geometry(l, hw, tile)
    fp_margin_factor(int(np.prod(l.kernel.shape[:3])), unit_roundoff)
    shapes.append(hw + (c,))
    grids.append((nh, nw))
    hw, c = (ho, wo), l.kernel.shape[3]
  return shapes, grids


def range_bound_model(module: Any, variables: Any, frame_shape: Sequence[int], *, tile: int = 8,
                      max_active_fraction: float | Sequence[float] = 0.25,
                      buckets: Sequence[float] = (1 / 32, 1 / 8),
                      unit_roundoff: float = 2.0 ** -24, dense_bounds: bool = False) -> RangeBoundModel:
  """Exact frame-by-frame inference of a ReLU CNN that skips provably-zero and unchanged tiles.

  Per frame, one pass over the input frame finds the changed tiles (bit comparison); from there on
  change is tracked per tile through the layers (a recomputed tile whose bits did not change stops
  the propagation), so a layer whose receptive fields did not change does no work at all, and the
  choice between the sparse path and the dense convolution is made from the number of changed tiles
  *before* any bound, gather or scatter runs: once per frame for the whole network (the first layer's
  changed tiles exceed its capacity, and no later layer's capacity holds all its tiles: every layer
  runs its plain conv, nothing else), otherwise per layer (only one path runs; each choice is a 0/1-trip
  while loop, so XLA updates the state in place instead of copying it). The dense path is the plain
  convolution: it keeps no per-tile bounds (unless ``dense_bounds``) and never reads the previous
  output; every tile of a dense layer counts as changed for the next layer, which then falls back too.
  Step with ``jax.jit(rb.step, donate_argnums=0)`` (or inside a ``lax.scan``) so that the state's
  buffers are reused; without donation XLA writes a fresh state every frame.

  Args:
    module: a ``flax.linen.Sequential`` of ``nn.Conv`` + ``nn.relu`` (see :func:`layers_from_flax`),
      or a sequence of :class:`ConvLayer`.
    variables: the module's variables (ignored for a ConvLayer sequence).
    frame_shape: ``(H, W, C)`` of every frame of the stream.
    tile: output tile size ``T`` (tiles are ``T x T`` positions, all channels).
    max_active_fraction: the sparse path handles at most this fraction of a layer's tiles (a static
      capacity); above it the layer runs densely. One float, or one per layer (e.g. from
      :func:`calibrate_active_fraction`); ``0`` makes a layer dense whenever its input changed.
    buckets: smaller static capacities (fractions of the tiles) for frames with few active tiles.
    unit_roundoff: ``u`` of the conv arithmetic for the margin (``2**-24`` float32; ``2**-10`` TF32).
    dense_bounds: whether a layer that ran densely also computes its per-tile pre-activation bound
      (one more pass), so that the next frame's temporal bound is available for every tile; without
      it those tiles use the range bound until they are computed on the sparse path.
  Returns:
    :class:`RangeBoundModel` with ``init(frame) -> (state, y)`` and
    ``step(state, frame) -> (state, y, stats)``; outputs are ``(H', W', c_out)``.
  """
  check_int("tile", tile, 1)
  layers = _layer_list(module, variables)
  frame_shape = tuple(int(s) for s in frame_shape)
  if len(frame_shape) != 3:
    raise ValueError(f"frame_shape must be (H, W, C), got {frame_shape}.")
  fracs = (tuple(max_active_fraction) if isinstance(max_active_fraction, (list, tuple))
           else (max_active_fraction,) * len(layers))
  if len(fracs) != len(layers):
    raise ValueError(f"max_active_fraction has {len(fracs)} entries for {len(layers)} layers.")
  for f in fracs:
    check_range("max_active_fraction", f, 0.0, 1.0)
  for f in buckets:
    check_range("buckets[i]", f, 0.0, 1.0, low_inclusive=False)
  _, grids = _layer_shapes(layers, frame_shape, tile, unit_roundoff)
  caps = []
  for (nh, nw), frac in zip(grids, fracs):
    top = int(math.floor(frac * nh * nw))
    caps.append(tuple(sorted({int(math.ceil(f * nh * nw)) for f in buckets if f * nh * nw < top} |
                             ({top} if top >= 1 else set()))))
  strips = [_strips(l) for l in layers] + [(0, 0, 0, 0)]

  def _check_frame(frame):
    dtype = getattr(frame, "dtype", None)
    if dtype is None or dtype != np.float32:
      raise TypeError(f"frames must be float32 arrays, got {dtype}; cast with .astype(np.float32).")
    frame = jnp.asarray(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
      frame = frame[0]
    if tuple(frame.shape) != frame_shape:
      raise ValueError(f"frame shape {tuple(frame.shape)} differs from the stream's {frame_shape}; "
                       "build a new range_bound_model for another frame size.")
    check_finite("frame", frame)  # concrete frames only; under jit NaN/inf propagate like dense
    return frame

  @jax.jit
  def _init(x):
    states, frame = [], x
    in_amax = _input_tile_stats(x, x, tile, strips[0])[1]
    for l in layers:
      st, x = conv_layer_init(l, x, tile, unit_roundoff, in_amax=in_amax)
      states.append(st)
      in_amax = st.amax
    return ModelState(frame, tuple(states), jnp.zeros((), jnp.int32)), x

  def init(frame):
    return _init(_check_frame(frame))

  # a layer after a dense one sees every tile changed: it falls back too unless its sparse capacity
  # holds all its tiles; when none does, a dense first layer means a dense network (one decision)
  net_dense = all(not c or c[-1] < nh * nw for c, (nh, nw) in zip(caps[1:], grids[1:]))

  def dense_network(x, in_amax):
    """Every layer's plain dense conv (no switch, no bound, no read of a previous output)."""
    # batch-1 outputs (1, H, W, C) throughout: the state holds exactly what the next conv reads (with
    # (H, W, C) states XLA computes bias + ReLU twice, into the state and into the next conv's input)
    new, counts, x = [], [], x[None]
    for l, (nh, nw), cap in zip(layers, grids, caps):
      y, ub, amax = _dense_outputs(l, x, in_amax, tile, unit_roundoff, dense_bounds and bool(cap))
      full = lambda v: jnp.full(ub.shape, v, x.dtype)
      new.append(LayerState(y=y, ub=ub, amax=amax, dmax=full(jnp.inf), dmin=full(-jnp.inf)))
      zero = jnp.zeros((), jnp.int32)
      counts.append((zero, zero, jnp.asarray(nh * nw, jnp.int32), jnp.ones((), jnp.int32)))
      x, in_amax = y, amax
    return tuple(new), tuple(counts)

  def skip_network(layer_states, x, x_prev, flags, in_amax):
    in_change, new, counts = None, [], []
    for i, (l, st, cap) in enumerate(zip(layers, layer_states, caps)):
      nh, nw = grids[i]
      st_new, y, flags, s = conv_layer_step(
          l, st, x, x_prev, _rf_changed(flags, nh, nw), in_amax, tile=tile,
          capacity=cap, unit_roundoff=unit_roundoff, next_strips=strips[i + 1],
          dense_bounds=dense_bounds and bool(cap), in_change=in_change, with_stats=False)
      new.append(st_new)
      counts.append(s)
      x, x_prev, in_amax, in_change = y, None, st_new.amax, (st_new.dmax, st_new.dmin)
    return tuple(new), tuple(counts)

  def step(state, frame):
    x = _check_frame(frame)
    if not isinstance(state, ModelState) or len(state.layers) != len(layers):
      raise ValueError(f"state must be the ModelState of this model ({len(layers)} layers); "
                       "get it from init().")
    flags, in_amax = _input_tile_stats(x, state.x, tile, strips[0])
    count0 = jnp.sum(_rf_changed(flags, *grids[0]))
    go_dense = (count0 > (caps[0][-1] if caps[0] else 0)) & net_dense
    zero = jnp.zeros((), jnp.int32)
    batch = lambda sts, f: tuple(st._replace(y=f(st.y)) for st in sts)  # bitcasts, no copies
    carry = (batch(state.layers, lambda y: y[None]), tuple((zero, zero, zero, zero) for _ in layers))
    carry = _when(go_dense, lambda c: dense_network(x, in_amax), carry)
    carry = (batch(carry[0], lambda y: y[0]), carry[1])
    new, counts = _when(~go_dense, lambda c: skip_network(c[0], x, state.x, flags, in_amax), carry)
    stats = tuple(_layer_stats(st.y, tile, nh, nw, *c) for st, (nh, nw), c in zip(new, grids, counts))
    return (ModelState(x=x, layers=new, dense_frames=state.dense_frames + go_dense.astype(jnp.int32)),
            new[-1].y, stats)

  return RangeBoundModel(init=init, step=step, layers=layers, capacities=tuple(caps))


def calibrate_active_fraction(module: Any, variables: Any, frame_shape: Sequence[int], *,
                              tile: int = 8,
                              fractions: Sequence[float] = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2),
                              repeats: int = 5, slack: float = 1.0, seed: int = 0,
                              unit_roundoff: float = 2.0 ** -24, return_timings: bool = False,
                              network: bool = True,
                              buckets: Sequence[float] = (1 / 32, 1 / 8)):
  """Per-layer dense-fallback threshold from measured costs on this machine.

  For every layer and candidate fraction ``f`` (ascending, stopping at the first that loses), times
  (``mlsys_jax.stats.time_interleaved``, jitted, the layer state donated and carried from call to call)
  one layer step whose changed tiles are a random ``f`` of all tiles, on the sparse path, against the
  same layer's plain dense convolution, on random inputs (no tile provably zero: the sparse path's
  worst case). The threshold is the largest ``f`` whose sparse step took ``<= slack`` times the dense
  step (no interpolation; ``0.0`` when even the smallest fraction loses). Pass the result as
  ``max_active_fraction``: a frame then takes the sparse path only where it measured cheaper.

  The first layer's threshold is the network-level switch (a dense first layer makes the whole network
  dense), so with ``network`` (default, more than one layer) it is measured end to end instead: the
  whole :func:`range_bound_model` step (the later layers at their measured thresholds, ``buckets``
  as given) against the dense network, on two random frames that differ in one block of whole first-
  layer tiles covering the fraction ``f`` (a moving object; the change stays a halo away from the
  block's border, so exactly those tiles' receptive fields change); each timed call steps through
  both frames (and back). A cheap first layer that loses on its own (e.g. 3 input channels on a GPU)
  then still takes the sparse path when the whole network wins.

  Returns:
    a tuple of per-layer fractions; with ``return_timings``, also a list (per layer) of dicts with
    ``dense_s`` and ``sparse_s`` (fraction -> median seconds); the first one also holds
    ``network`` (the same for whole steps) when measured.
  """
  check_int("repeats", repeats, 1)
  check_range("slack", slack, 0.0, None, low_inclusive=False)
  layers = _layer_list(module, variables)
  frame_shape = tuple(int(s) for s in frame_shape)
  shapes, grids = _layer_shapes(layers, frame_shape, tile, unit_roundoff)
  rng = np.random.default_rng(seed)
  out, timings = [], []
  for l, shp, (nh, nw) in zip(layers, shapes, grids):
    x0 = jnp.asarray(rng.uniform(-1, 1, shp), jnp.float32)
    x1 = jnp.asarray(rng.uniform(-1, 1, shp), jnp.float32)
    st, _ = conv_layer_init(l, x0, tile, unit_roundoff)
    in_amax = _input_tile_stats(x1, x0, tile, _strips(l))[1]

    def timed(cap, n):
      mask = np.zeros(nh * nw, bool)
      mask[rng.choice(nh * nw, n, replace=False)] = True
      mask = jnp.asarray(mask.reshape(nh, nw))
      # the state is donated and carried from call to call, as in a stream: the sparse path then
      # rewrites its tiles in place instead of copying the whole output into a fresh buffer
      f = jax.jit(lambda st, x, xp, m: conv_layer_step(l, st, x, xp, m, in_amax, tile=tile,
                                                       capacity=cap, unit_roundoff=unit_roundoff,
                                                       dense_bounds=False)[0], donate_argnums=0)
      box = [jax.tree_util.tree_map(jnp.copy, st)]

      def call():
        box[0] = f(box[0], x1, x0, mask)
        return box[0].y
      return call

    dense_fn = timed((), nh * nw)
    best, rec = _sweep_fractions(fractions, nh * nw, lambda frac, n: (timed((n,), n), dense_fn),
                                 repeats, slack)
    out.append(float(min(best, 1.0)))
    timings.append(rec)
  if network and len(layers) > 1:
    out[0], timings[0]["network"] = _calibrate_network(
        layers, frame_shape, tile, grids[0], out, fractions, repeats, slack, rng, unit_roundoff,
        buckets)
  return (tuple(out), timings) if return_timings else tuple(out)


def _changed_block(x0: np.ndarray, n: int, tile: int, grid: tuple[int, int], margin: int,
                   rng: np.random.Generator) -> np.ndarray:
  """``x0`` with new random values in one block of at most ``n`` whole tiles (as square as the grid
  allows; ``floor(sqrt(n)) x floor(n / floor(sqrt(n)))``, at least ``n / 2`` tiles),
  ``margin`` pixels inside the block's border (so no neighbouring tile's receptive field changes)."""
  nh, nw = grid
  a = min(nh, max(1, int(math.isqrt(n))))  # a x b <= n tiles (never more than the capacity)
  b = min(nw, n // a)
  a = min(nh, n // b)
  i, j = int(rng.integers(0, nh - a + 1)), int(rng.integers(0, nw - b + 1))
  r0, r1 = i * tile + margin, min((i + a) * tile, x0.shape[0]) - margin
  c0, c1 = j * tile + margin, min((j + b) * tile, x0.shape[1]) - margin
  x1 = x0.copy()
  if r1 > r0 and c1 > c0:
    x1[r0:r1, c0:c1] = rng.uniform(-1, 1, (r1 - r0, c1 - c0) + x0.shape[2:]).astype(x0.dtype)
  return x1


def _calibrate_network(layers, frame_shape, tile, grid, fracs, fractions, repeats, slack, rng,
                       unit_roundoff, buckets):
  """The first layer's threshold from whole steps (see :func:`calibrate_active_fraction`)."""
  nh, nw = grid
  margin = max(_strips(layers[0]))  # the widest border strip a neighbouring tile reads
  x0 = rng.uniform(-1, 1, frame_shape).astype(np.float32)
  dm = dense_model(layers)
  dense2 = jax.jit(lambda y, a, b: (dm(a), dm(b)), donate_argnums=0)

  def pair(frac, n):
    x1 = jnp.asarray(_changed_block(x0, n, tile, grid, margin, rng))
    rb = range_bound_model(list(layers), None, frame_shape, tile=tile, unit_roundoff=unit_roundoff,
                           max_active_fraction=(frac,) + tuple(fracs[1:]), buckets=buckets)
    step2 = jax.jit(lambda st, a, b: rb.step(rb.step(st, a)[0], b)[0], donate_argnums=0)
    sbox, dbox, xa, xb = [rb.init(x0)[0]], [(dm(x0), dm(x0))], x1, jnp.asarray(x0)

    def sparse_call():
      sbox[0] = step2(sbox[0], xa, xb)
      return sbox[0].x

    def dense_call():
      dbox[0] = dense2(dbox[0], xa, xb)
      return dbox[0]
    return sparse_call, dense_call

  best, rec = _sweep_fractions(fractions, nh * nw, pair, repeats, slack)
  return float(best), rec


def _sweep_fractions(fractions, n_tiles: int, pair: Callable, repeats: int, slack: float):
  """The calibration sweep shared by the per-layer and whole-network thresholds: for each fraction in
  ascending order (``n = floor(frac * n_tiles) >= 1`` tiles), ``pair(frac, n)`` gives ``(sparse_call,
  dense_call)``, timed interleaved; the largest fraction before the first one whose sparse median exceeds
  ``slack`` times the dense median. Returns ``(best, {"dense_s": median dense seconds, "sparse_s":
  {fraction: median sparse seconds}})``."""
  from mlsys_jax import stats as _stats
  best, rec = 0.0, {"dense_s": [], "sparse_s": {}}
  for frac in sorted(fractions):
    n = int(math.floor(frac * n_tiles))
    if n < 1:
      continue
    t = _stats.time_interleaved(*pair(frac, n), repeats=repeats, warmup=1)
    rec["dense_s"].append(t.median_b)
    rec["sparse_s"][frac] = t.median_a
    if t.median_a > slack * t.median_b:
      break
    best = frac
  rec["dense_s"] = float(np.median(rec["dense_s"])) if rec["dense_s"] else None
  return best, rec


def dense_model(layers: Sequence[ConvLayer]) -> Callable:
  """The dense per-frame reference ``frame -> y`` of a layer list (same convs, no skipping)."""
  def f(x):
    for l in layers:
      x = dense_conv(l, x)
    return x
  return f


def relu_cnn(channels: Sequence[int], kernel_size: int = 3) -> Any:
  """A ``flax.linen.Sequential`` of SAME ``kernel_size`` convolutions, each followed by ``nn.relu``.

  The network class the range-bound convolution covers (Wakatsuki et al., MLSys 2021: stride-1 conv +
  bias + ReLU layers); :func:`range_bound_model` / :func:`layers_from_flax` read it directly. Layer
  ``i`` is ``nn.Conv(channels[i], (kernel_size, kernel_size), padding='SAME')`` with a bias, then ReLU
  (also after the last conv). The input channel count is set by ``init``.

  Args:
    channels: output channels per conv layer, a non-empty sequence of integers ``>= 1``.
    kernel_size: odd spatial size ``>= 1`` (SAME padding with an even kernel is asymmetric, which the
      bound does not cover).

  Example:
    >>> net = relu_cnn([4, 2])
    >>> [getattr(m, "features", getattr(m, "__name__", None)) for m in net.layers]
    [4, 'relu', 2, 'relu']
  """
  import flax.linen as nn
  if isinstance(channels, (str, bytes)) or not hasattr(channels, "__len__"):
    raise TypeError(f"channels must be a sequence of output channel counts, one per conv layer, got "
                    f"{type(channels).__name__} ({channels!r}); e.g. relu_cnn([16, 32]).")
  if len(channels) == 0:
    raise ValueError("channels must name at least one conv layer, e.g. relu_cnn([16, 32]).")
  check_int("kernel_size", kernel_size, 1)
  if kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be odd (SAME padding with an even kernel is asymmetric, which "
                     f"range_bound_model refuses), got {kernel_size}; use {kernel_size + 1}.")
  mods: list = []
  for i, c in enumerate(channels):
    check_int(f"channels[{i}]", c, 1)
    mods += [nn.Conv(int(c), (kernel_size, kernel_size), padding="SAME"), nn.relu]
  return nn.Sequential(mods)


def highpass_variables(variables: Any, bias: float = -0.05) -> Any:
  """Conv variables made zero-mean over each kernel's spatial taps, with every bias set to ``bias < 0``.

  A stand-in for trained detector layers when measuring the range-bound convolution (Wakatsuki et al.,
  MLSys 2021, whose speed-up depends on activation sparsity): for every ``kernel`` leaf ``w`` (HWIO,
  rank 4), ``w[:, :, c, o] - mean(w[:, :, c, o])`` (an edge/blob filter: its taps sum to 0), and every
  ``bias`` leaf filled with ``bias``. A constant input region then gives pre-activation ``bias`` (up to
  rounding) and an exactly-zero ReLU output, so only structure (objects, edges) activates. Random-init
  CNNs have no such spatial sparsity; state wherever this is used that it models trained networks.
  Other leaves are returned unchanged; the input is not modified.

  Args:
    variables: flax variables (a pytree) of a conv network such as :func:`relu_cnn`; it must hold at
      least one ``kernel`` leaf, every ``kernel`` rank 4 (a conv, not a dense layer), all finite.
    bias: the value of every bias, finite and ``< 0``.

  Example:
    >>> k = jnp.arange(9.0).reshape(3, 3, 1, 1)                   # taps 0..8, mean 4
    >>> v = highpass_variables({"params": {"layers_0": {"kernel": k, "bias": jnp.zeros(1)}}}, -0.1)
    >>> v["params"]["layers_0"]["kernel"][:, :, 0, 0].tolist()     # taps sum to 0
    [[-4.0, -3.0, -2.0], [-1.0, 0.0, 1.0], [2.0, 3.0, 4.0]]
    >>> bool(v["params"]["layers_0"]["bias"][0] == np.float32(-0.1))
    True
  """
  check_range("bias", bias, None, 0.0, high_inclusive=False)
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  kernels = [(jax.tree_util.keystr(p), a) for p, a in leaves
             if jax.tree_util.keystr(p).endswith("['kernel']")]
  if not kernels:
    raise ValueError("variables hold no 'kernel' leaf; pass the flax variables of a conv network, e.g. "
                     "relu_cnn([8]).init(key, frame).")
  for name, a in kernels:
    if np.ndim(a) != 4:
      raise ValueError(f"variables{name} has shape {np.shape(a)}; highpass_variables expects conv "
                       "kernels (kh, kw, c_in, c_out) only. Apply it to the conv layers' variables.")
  check_finite("variables", variables)

  def fix(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return a - jnp.mean(a, axis=(0, 1), keepdims=True)
    if name.endswith("['bias']"):
      return jnp.full_like(a, bias)
    return a
  return jax.tree_util.tree_map_with_path(fix, variables)


# ----------------------------------------------------------------------------------------------------
# data

_ACTIVITY = {  # objects, object size (fraction of min(H, W)), noisy pixel fraction, lighting drift
    "static": (0, 0.0, 0.0, 0.0),
    "low": (1, 0.08, 0.0, 0.0),
    "medium": (3, 0.15, 0.002, 0.0),
    "high": (6, 0.2, 0.02, 0.002),
    "full": (8, 0.25, 1.0, 0.01),
}


def synthetic_video(seed: int, num_frames: int = 16, height: int = 64, width: int = 64,
                    channels: int = 3, activity: str = "low") -> np.ndarray:
  """Surveillance-like frames ``(num_frames, H, W, C)`` float32 in ``[0, 1]``, 8-bit quantised.

  A static smooth background, moving rectangles with constant velocities (bouncing off the borders),
  sensor noise (``+-1..2`` grey levels on a random fraction of pixels per frame) and a global lighting
  drift (gain per frame). ``activity``: ``static`` (identical frames), ``low`` (one small object),
  ``medium``, ``high``, ``full`` (every pixel changes every frame: noise on all pixels + lighting).
  """
  check_int("seed", seed, 0)
  check_int("num_frames", num_frames, 1)
  check_int("height", height, 4)
  check_int("width", width, 4)
  check_int("channels", channels, 1)
  check_choice("activity", activity, tuple(_ACTIVITY))
  n_obj, size, noise, drift = _ACTIVITY[activity]
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  bg = np.zeros((height, width, channels))
  for c in range(channels):
    for _ in range(3):
      fy, fx, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
      bg[..., c] += np.sin(2 * np.pi * (fy * yy + fx * xx) + ph) / 6
  bg = 0.5 + bg
  s = max(2, int(round(size * min(height, width))))
  pos = rng.uniform(0, [height - s, width - s], (n_obj, 2))
  vel = rng.uniform(-0.04, 0.04, (n_obj, 2)) * min(height, width)
  col = rng.uniform(0, 1, (n_obj, channels))
  frames = np.empty((num_frames, height, width, channels), np.float32)
  for t in range(num_frames):
    f = bg.copy()
    for k in range(n_obj):
      r, c = pos[k].astype(int)
      f[r:r + s, c:c + s] = col[k]
    f = f * (1.0 + drift * t)
    q = np.round(np.clip(f, 0, 1) * 255)
    if noise > 0:
      m = rng.uniform(size=q.shape[:2]) < noise
      e = rng.choice(np.array([-2, -1, 1, 2]), size=q.shape)
      q = np.where(m[..., None], np.clip(q + e, 0, 255), q)
    frames[t] = (q / 255.0).astype(np.float32)
    pos += vel
    for k in range(n_obj):
      for a, lim in ((0, height - s), (1, width - s)):
        if pos[k, a] < 0 or pos[k, a] > lim:
          vel[k, a] = -vel[k, a]
          pos[k, a] = np.clip(pos[k, a], 0, lim)
  return frames


def load_frames(path: str) -> np.ndarray:
  """Frames from a ``.npy`` file: ``(T, H, W)`` or ``(T, H, W, C)``; uint8 is scaled to ``[0, 1]``.
  Returns float32 ``(T, H, W, C)``; non-finite values raise ``ValueError``."""
  if not str(path).endswith(".npy"):
    raise ValueError(f"load_frames reads .npy files, got {path!r}; save frames with np.save first.")
  a = np.load(path, allow_pickle=False)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4:
    raise ValueError(f"{path}: frames must be (T, H, W) or (T, H, W, C), got shape {a.shape}.")
  if a.dtype == np.uint8:
    a = a.astype(np.float32) / 255.0
  elif np.issubdtype(a.dtype, np.floating):
    a = a.astype(np.float32)
  else:
    raise TypeError(f"{path}: frames must be uint8 or floating point, got {a.dtype}.")
  check_finite("frames", a)
  return a
