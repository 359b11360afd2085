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

**Exactness of computed tiles.** On XLA:CPU the tile convolution (batched VALID convolution of
tile-plus-halo patches) gives *bitwise* the same numbers as the full-frame convolution (checked in
``tests/test_infer_video.py`` against the flax model itself); on other backends it is the same
convolution on the same inputs, and any difference is float32 rounding only, which
``max_abs_diff_vs_dense`` in ``experiments/video_eval.py`` reports.

Example (a 2-layer ReLU CNN over 3 frames; every output equals the flax model's, bit for bit):

>>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
>>> from mlsys_jax.infer import video
>>> net = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Conv(4, (3, 3)), nn.relu])
>>> frames = video.synthetic_video(0, num_frames=3, height=16, width=16, activity="low")
>>> variables = net.init(jax.random.PRNGKey(0), frames[:1])
>>> rb = video.range_bound_model(net, variables, frames.shape[1:], tile=4)
>>> state, y = rb.init(frames[0])
>>> step = jax.jit(rb.step)
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
    "RangeBoundModel",
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
  """One stride-1 convolution + bias (+ ReLU). ``kernel``: ``(kh, kw, c_in, c_out)`` (HWIO);
  ``bias``: ``(c_out,)``; ``padding``: ``"SAME"`` (odd kernels) or ``"VALID"``; ``relu``: whether a
  ReLU follows (without it, only bit-identical reuse is possible); ``precision``: passed to the conv."""
  kernel: jax.Array
  bias: jax.Array
  padding: str = "SAME"
  relu: bool = True
  precision: Any = None
  name: str = "conv"


class LayerState(NamedTuple):
  """Per-layer state after a frame: its input ``x`` ``(H, W, c_in)``, output ``y`` ``(H', W', c_out)``
  ``ub`` ``(nH, nW, c_out)``, an upper bound on the real pre-activation over each output tile, and
  ``amax`` ``(nH, nW, 1)``, the largest ``|x|`` (all channels) over each tile's receptive field."""
  x: jax.Array
  y: jax.Array
  ub: jax.Array
  amax: jax.Array


class LayerStats(NamedTuple):
  """Tile counts of one layer on one frame: ``reused`` (receptive field unchanged), ``skipped`` (proved
  zero), ``computed`` (all other tiles), ``dense`` (1 when the layer fell back to the dense conv),
  ``zero_tiles`` (tiles whose outputs are all 0, the most any exact skip could reach) and
  ``zero_fraction`` (fraction of exactly-zero outputs)."""
  reused: jax.Array
  skipped: jax.Array
  computed: jax.Array
  dense: jax.Array
  zero_tiles: jax.Array
  zero_fraction: jax.Array


class RangeBoundModel(NamedTuple):
  """``init(frame) -> (state, output)`` (dense) and ``step(state, frame) -> (state, output, stats)``
  (jit-able; ``stats`` is a tuple of :class:`LayerStats`, one per layer)."""
  init: Callable
  step: Callable
  layers: tuple


# ----------------------------------------------------------------------------------------------------
# geometry


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


def _canvas(x: jax.Array, layer: ConvLayer, tile: int) -> jax.Array:
  """Zero-padded input whose VALID conv gives ``(nH*T, nW*T)`` outputs (the first ``(H', W')`` valid)."""
  kh, kw = layer.kernel.shape[:2]
  ho, wo, nh, nw, ph, pw = _geometry(layer, x.shape[:2], tile)
  hc, wc = nh * tile + kh - 1, nw * tile + kw - 1
  return jnp.pad(x, ((ph, hc - x.shape[0] - ph), (pw, wc - x.shape[1] - pw), (0, 0)))


def _window_reduce(a: jax.Array, layer: ConvLayer, tile: int, op: str) -> jax.Array:
  """Max (``op='max'``) or min over each tile's receptive field of a canvas, per channel: windows
  ``[i*T, i*T + T + k - 1)`` per spatial axis, as two separable ``reduce_window`` passes (the 2-D
  overlapping window is several times slower on XLA:CPU)."""
  kh, kw = layer.kernel.shape[:2]
  init, fn = (-jnp.inf, lax.max) if op == "max" else (jnp.inf, lax.min)
  a = lax.reduce_window(a, jnp.asarray(init, a.dtype), fn, (tile + kh - 1, 1, 1), (tile, 1, 1), "VALID")
  return lax.reduce_window(a, jnp.asarray(init, a.dtype), fn, (1, tile + kw - 1, 1), (1, tile, 1),
                           "VALID")


def _to_tiles(y: jax.Array, tile: int, nh: int, nw: int) -> jax.Array:
  """``(H', W', C)`` -> ``(nH, nW, T, T, C)`` (zero-padded at the bottom/right)."""
  c = y.shape[-1]
  y = jnp.pad(y, ((0, nh * tile - y.shape[0]), (0, nw * tile - y.shape[1]), (0, 0)))
  return y.reshape(nh, tile, nw, tile, c).transpose(0, 2, 1, 3, 4)


def _from_tiles(t: jax.Array, ho: int, wo: int) -> jax.Array:
  nh, nw, tile, _, c = t.shape
  return t.transpose(0, 2, 1, 3, 4).reshape(nh * tile, nw * tile, c)[:ho, :wo]


def _conv_valid(x: jax.Array, layer: ConvLayer) -> jax.Array:
  """Batched VALID conv + bias (the same op for the full canvas and the tile patches)."""
  z = lax.conv_general_dilated(x, layer.kernel, (1, 1), "VALID", dimension_numbers=_DN,
                               precision=layer.precision)
  return z + layer.bias


def _conv_canvas(x: jax.Array, layer: ConvLayer, tile: int) -> jax.Array:
  """Conv + bias over the whole canvas, ``(nH*T, nW*T, c_out)``, with the zero padding done by the
  convolution itself (a VALID conv of the pre-padded canvas is about 2x slower on XLA:CPU)."""
  kh, kw = layer.kernel.shape[:2]
  ho, wo, nh, nw, ph, pw = _geometry(layer, x.shape[:2], tile)
  hc, wc = nh * tile + kh - 1, nw * tile + kw - 1
  pad = ((ph, hc - x.shape[0] - ph), (pw, wc - x.shape[1] - pw))
  z = lax.conv_general_dilated(x[None], layer.kernel, (1, 1), pad, dimension_numbers=_DN,
                               precision=layer.precision)
  return z[0] + layer.bias


def _act(layer: ConvLayer, z: jax.Array) -> jax.Array:
  return jax.nn.relu(z) if layer.relu else z


def dense_conv(layer: ConvLayer, x: jax.Array) -> jax.Array:
  """Dense conv + bias (+ ReLU) of one frame ``(H, W, c_in)``, as ``flax.linen.Conv`` computes it."""
  ph, pw = _pads(layer)
  z = lax.conv_general_dilated(x[None], layer.kernel, (1, 1), ((ph, ph), (pw, pw)),
                               dimension_numbers=_DN, precision=layer.precision)
  return _act(layer, z[0] + layer.bias)


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


def _tile_ub_from_z(z_tiles: jax.Array, dense_margin: jax.Array) -> jax.Array:
  """Upper bound on the real pre-activation of computed tiles ``(..., T, T, c)``: max zhat + margin."""
  return _up(jnp.max(z_tiles, axis=(-3, -2)) + dense_margin)


def conv_layer_init(layer: ConvLayer, x: jax.Array, tile: int,
                    unit_roundoff: float = 2.0 ** -24) -> tuple[LayerState, jax.Array]:
  """Dense first frame: returns the layer state and the output."""
  ho, wo, nh, nw, _, _ = _geometry(layer, x.shape[:2], tile)
  xc = _canvas(x, layer, tile)
  z = _conv_canvas(x, layer, tile)
  zt = _to_tiles(z, tile, nh, nw)  # z already covers (nh*T, nw*T): reshape only
  amax = _window_reduce(jnp.max(jnp.abs(xc), axis=-1, keepdims=True), layer, tile, "max")
  cin = layer.kernel.shape[2]
  _, dm = range_upper_bound(layer, jnp.broadcast_to(-amax, (nh, nw, cin)),
                            jnp.broadcast_to(amax, (nh, nw, cin)), unit_roundoff)
  ub = _tile_ub_from_z(_valid_mask_tiles(zt, ho, wo, tile), dm)
  y = _act(layer, z[:ho, :wo])
  return LayerState(x=x, y=y, ub=ub, amax=amax), y


def _valid_mask_tiles(zt: jax.Array, ho: int, wo: int, tile: int) -> jax.Array:
  """Set the padding positions of edge tiles (beyond ``(H', W')``) to -inf: they are no outputs."""
  nh, nw = zt.shape[:2]
  r = (jnp.arange(nh)[:, None] * tile + jnp.arange(tile)[None, :]) < ho  # (nh, T)
  c = (jnp.arange(nw)[:, None] * tile + jnp.arange(tile)[None, :]) < wo  # (nw, T)
  valid = r[:, None, :, None] & c[None, :, None, :]  # (nh, nw, T, T)
  return jnp.where(valid[..., None], zt, -jnp.inf)


def conv_layer_step(layer: ConvLayer, state: LayerState, x: jax.Array, *, tile: int, capacity: int,
                    unit_roundoff: float = 2.0 ** -24) -> tuple[LayerState, jax.Array, LayerStats]:
  """One frame through one layer: reuse unchanged tiles, skip provably-zero tiles, compute the rest.

  ``capacity`` (static int, or a tuple of ints: buckets) is the number of tiles the sparse path
  computes; the smallest bucket that holds every tile to compute is used (``lax.switch``) and no conv at
  all runs when no tile must be computed. When more tiles *changed* than the largest bucket holds, the
  layer runs the dense convolution without evaluating the bounds (``lax.cond``; the change test and
  ``max |x|`` are two cheap channel-collapsed passes), so full-activity frames pay little over dense.
  Jit-able.
  """
  if x.shape != state.x.shape:
    raise ValueError(f"layer {layer.name}: input shape {x.shape} differs from the previous frame's "
                     f"{state.x.shape}; start a new stream with init() for a new frame size.")
  kh, kw, cin, cout = layer.kernel.shape
  ho, wo, nh, nw, _, _ = _geometry(layer, x.shape[:2], tile)
  xc = _canvas(x, layer, tile)
  pc = _canvas(state.x, layer, tile)
  # receptive fields that changed bit for bit (-0.0 vs 0.0 and NaN payloads count as changes) and the
  # largest |x| per receptive field: channels are collapsed first, then one 1-channel window pass each
  bits = lambda a: lax.bitcast_convert_type(a, jnp.int32)
  mx = lambda a: _window_reduce(a, layer, tile, "max")
  mn = lambda a: _window_reduce(a, layer, tile, "min")
  diff = jnp.any(bits(xc) != bits(pc), axis=-1, keepdims=True).astype(xc.dtype)
  changed = mx(diff)[..., 0] > 0  # (nh, nw)
  amax = mx(jnp.max(jnp.abs(xc), axis=-1, keepdims=True))  # (nh, nw, 1)
  n_changed = jnp.sum(changed)
  caps = sorted(set(int(c) for c in capacity)) if isinstance(capacity, (tuple, list)) else [capacity]
  caps = [c for c in caps if c >= 1]
  all_tiles = jnp.asarray(nh * nw)

  def dense_all(_):  # too many changed tiles: dense conv, no bounds to evaluate
    z = _conv_canvas(x, layer, tile)
    _, dm = range_upper_bound(layer, jnp.broadcast_to(-amax, (nh, nw, cin)),
                              jnp.broadcast_to(amax, (nh, nw, cin)), unit_roundoff)
    zt = _to_tiles(z, tile, nh, nw)
    ub = _tile_ub_from_z(_valid_mask_tiles(zt, ho, wo, tile), dm)
    zero = jnp.zeros((), jnp.int32)
    return _act(layer, z[:ho, :wo]), ub, (zero, zero, all_tiles.astype(jnp.int32), jnp.ones((), jnp.int32))

  def bounded(_):
    d = xc - pc
    dmax, dmin, xmax, xmin = mx(d), mn(d), mx(xc), mn(xc)
    amax_t = jnp.maximum(jnp.abs(xmax), jnp.abs(xmin))
    ub_r, dense_margin = range_upper_bound(layer, xmin, xmax, unit_roundoff)
    ub_t = temporal_upper_bound(layer, state.ub, dmin, dmax, amax_t + state.amax, unit_roundoff)
    ub = jnp.where(jnp.isnan(ub_t), ub_r, jnp.minimum(ub_t, ub_r))
    if layer.relu:
      zero = _up(ub + dense_margin) < 0  # (nh, nw, cout): every output of the tile is +0.0
      skip = changed & jnp.all(zero, axis=-1)
    else:
      skip = jnp.zeros_like(changed)
    compute = changed & ~skip
    count = jnp.sum(compute)
    prev_y_tiles = _to_tiles(state.y, tile, nh, nw)
    kept = jnp.where(skip[..., None, None, None], jnp.zeros_like(prev_y_tiles), prev_y_tiles)

    def sparse(cap):
      def run(_):
        (idx,) = jnp.nonzero(compute.reshape(-1), size=cap, fill_value=nh * nw)  # fill: dropped
        ti, tj = idx // nw, idx % nw
        ph, pw = tile + kh - 1, tile + kw - 1
        take = lambda i, j: lax.dynamic_slice(xc, (i * tile, j * tile, 0), (ph, pw, cin))
        patches = jax.vmap(take)(jnp.minimum(ti, nh - 1), tj)
        z = _conv_valid(patches, layer)  # (cap, T, T, cout)
        yt = kept.reshape(nh * nw, tile, tile, cout).at[idx].set(_act(layer, z), mode="drop")
        zt = jnp.full((nh * nw, tile, tile, cout), -jnp.inf, z.dtype).at[idx].set(z, mode="drop")
        ub_c = _tile_ub_from_z(_valid_mask_tiles(zt.reshape(nh, nw, tile, tile, cout), ho, wo, tile),
                               dense_margin)
        return yt.reshape(nh, nw, tile, tile, cout), ub_c
      return run

    def nothing(_):  # no tile to compute: reuse and skip only
      return kept, jnp.full((nh, nw, cout), -jnp.inf, xc.dtype)

    branch = jnp.sum(jnp.asarray([count > c for c in caps], jnp.int32)) + (count > 0)
    yt, ub_c = lax.switch(jnp.minimum(branch, len(caps)), [nothing] + [sparse(c) for c in caps], None)
    new_ub = jnp.where(compute[..., None], ub_c, jnp.where(skip[..., None], ub, state.ub))
    st = (jnp.sum(~changed).astype(jnp.int32), jnp.sum(skip).astype(jnp.int32),
          count.astype(jnp.int32), jnp.zeros((), jnp.int32))
    return _from_tiles(yt, ho, wo), new_ub, st

  y, new_ub, (reused, skipped, computed, used_dense) = lax.cond(n_changed > caps[-1], dense_all,
                                                               bounded, None)
  nz = jnp.all(_to_tiles(y, tile, nh, nw) == 0, axis=(2, 3, 4))
  stats = LayerStats(reused=reused, skipped=skipped, computed=computed, dense=used_dense,
                     zero_tiles=jnp.sum(nz), zero_fraction=jnp.mean((y == 0).astype(jnp.float32)))
  return LayerState(x=x, y=y, ub=new_ub, amax=amax), y, stats


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


def range_bound_model(module: Any, variables: Any, frame_shape: Sequence[int], *, tile: int = 8,
                      max_active_fraction: float = 0.5,
                      buckets: Sequence[float] = (1 / 32, 1 / 8),
                      unit_roundoff: float = 2.0 ** -24) -> RangeBoundModel:
  """Exact frame-by-frame inference of a ReLU CNN that skips provably-zero and unchanged tiles.

  Args:
    module: a ``flax.linen.Sequential`` of ``nn.Conv`` + ``nn.relu`` (see :func:`layers_from_flax`),
      or a sequence of :class:`ConvLayer`.
    variables: the module's variables (ignored for a ConvLayer sequence).
    frame_shape: ``(H, W, C)`` of every frame of the stream.
    tile: output tile size ``T`` (tiles are ``T x T`` positions, all channels).
    max_active_fraction: the sparse path computes at most this fraction of tiles (a static capacity);
      above it the layer runs densely.
    buckets: smaller static capacities (fractions of the tiles) for frames with few active tiles.
    unit_roundoff: ``u`` of the conv arithmetic for the margin (``2**-24`` float32; ``2**-10`` TF32).
  Returns:
    :class:`RangeBoundModel` with ``init(frame) -> (state, y)`` and
    ``step(state, frame) -> (state, y, stats)``; outputs are ``(H', W', c_out)``.
  """
  check_int("tile", tile, 1)
  check_range("max_active_fraction", max_active_fraction, 0.0, 1.0, low_inclusive=False)
  if isinstance(module, (list, tuple)):
    layers = tuple(module)
    if not all(isinstance(l, ConvLayer) for l in layers) or not layers:
      raise TypeError("a layer list must be a non-empty sequence of ConvLayer.")
  else:
    layers = layers_from_flax(module, variables)
  frame_shape = tuple(int(s) for s in frame_shape)
  if len(frame_shape) != 3:
    raise ValueError(f"frame_shape must be (H, W, C), got {frame_shape}.")
  shapes, caps, hw = [], [], frame_shape[:2]
  c = frame_shape[2]
  for l in layers:
    if l.kernel.shape[2] != c:
      raise ValueError(f"layer {l.name} expects {l.kernel.shape[2]} input channels, gets {c}.")
    check_choice(f"layer {l.name} padding", l.padding, ("SAME", "VALID"))
    ho, wo, nh, nw, _, _ = _geometry(l, hw, tile)
    fp_margin_factor(int(np.prod(l.kernel.shape[:3])), unit_roundoff)
    shapes.append(hw + (c,))
    top = max(1, int(math.floor(max_active_fraction * nh * nw)))
    caps.append(tuple(sorted({max(1, min(top, int(math.ceil(f * nh * nw)))) for f in buckets} | {top})))
    hw, c = (ho, wo), l.kernel.shape[3]

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
    states = []
    for l in layers:
      st, x = conv_layer_init(l, x, tile, unit_roundoff)
      states.append(st)
    return tuple(states), x

  def init(frame):
    return _init(_check_frame(frame))

  def step(state, frame):
    x = _check_frame(frame)
    if len(state) != len(layers):
      raise ValueError(f"state has {len(state)} layers, the model {len(layers)}.")
    new, stats = [], []
    for l, st, cap in zip(layers, state, caps):
      st, x, s = conv_layer_step(l, st, x, tile=tile, capacity=cap, unit_roundoff=unit_roundoff)
      new.append(st)
      stats.append(s)
    return tuple(new), x, tuple(stats)

  return RangeBoundModel(init=init, step=step, layers=layers)


def dense_model(layers: Sequence[ConvLayer]) -> Callable:
  """The dense per-frame reference ``frame -> y`` of a layer list (same convs, no skipping)."""
  def f(x):
    for l in layers:
      x = dense_conv(l, x)
    return x
  return f


def relu_cnn(channels: Sequence[int], kernel_size: int = 3) -> Any:
  """A ``flax.linen.Sequential`` of SAME ``kernel_size`` convolutions, each followed by ``nn.relu``."""
  import flax.linen as nn
  if not channels:
    raise ValueError("channels must name at least one conv layer.")
  mods: list = []
  for c in channels:
    check_int("channels[i]", c, 1)
    mods += [nn.Conv(c, (kernel_size, kernel_size)), nn.relu]
  return nn.Sequential(mods)


def highpass_variables(variables: Any, bias: float = -0.05) -> Any:
  """A stand-in for trained detector layers: every kernel made zero-mean over its spatial taps (an
  edge/blob filter) and every bias set to ``bias`` (< 0), so flat regions give exactly-zero ReLU
  outputs and only structure (objects, edges) activates. Random-init CNNs have no such spatial
  sparsity; use this to model the activation sparsity of trained networks (stated wherever used)."""
  check_range("bias", bias)
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
