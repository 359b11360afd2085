"""Dense warm-up for any gradient compressor, as an optax wrapper.

Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression", ICLR 2018, Sec. 3.3 (warm-up training):
early in training the gradients change fast and the model is far from any basin, so delaying most of
each update (what error feedback does to the entries a compressor leaves out) hurts most there; DGC
therefore starts with dense (or lightly compressed) communication and compresses hard only later.

:func:`dense_warmup` runs the first ``steps`` updates uncompressed (the gradients are averaged with one
``pmean`` over ``axis_name``) and hands every later step to the wrapped compressor, whose state (residual,
thresholds, warm-start factors) starts at the end of the warm-up. It wraps any transform of
:mod:`mlsys_jax.comm` (``sidco``, ``topk``, ``dgc``, ``randomk``, ``powersgd``, ``accordion``):

    out_t = pmean(g_t)                 for t < steps
    out_t = compressor.update(g_t)     for t >= steps

Measured (``experiments/compressed_adam.py --warmup``, digits, 8 workers, density 1%): at a short horizon
a dense start narrows the gap to dense Adam (150 steps, one seed: ``chain(topk, adam)`` 88.9% -> 92.9% with
15 dense steps, Adam 98.7%; ``experiments/results/exploratory/``). It costs ``steps`` dense all-reduces.

:func:`density_warmup` is DGC's own schedule (Sec. 3.3: "we exponentially increased the sparsity from 75%,
93.75%, 98.4375%, 99.6%, to 99.9%" over the warm-up epochs): the density falls 0.25 -> 0.0625 -> 0.0156 ->
0.0039 over ``steps`` steps, then stays at the target. Each stage is the same compressor built at a fixed
(static) density, so each stage's payload has its own capacity and the bytes are counted stage by stage;
the error-feedback residual carries over from one stage to the next.

Non-finite gradients during the warm-up: one ``pmax`` of a flag makes every device agree; the step sends
nothing, returns zeros and counts ``nonfinite_steps`` (after the warm-up the compressor counts its own).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlsys_jax._checks import check_floating, check_int, check_range
from mlsys_jax.comm.lowrank import _init_counted, _state_field
from mlsys_jax.comm.sparse import _check_axis, _global_finite

__all__ = ["DensityWarmupState", "WarmupState", "dense_warmup", "density_warmup", "dgc_density_schedule",
           "stage_boundaries"]


class WarmupState(NamedTuple):
  """State of :func:`dense_warmup`.

  Attributes:
    step: steps taken (int32).
    inner_state: the wrapped compressor's state (unchanged during the warm-up).
    bytes_sent: bytes this device passed to the collectives in the last step (the dense gradient during
      the warm-up, then the compressor's ``bytes_sent``).
    total_bytes: cumulative ``bytes_sent`` (warm-up and compressed steps together).
    nonfinite_steps: warm-up steps skipped because some device's gradient held NaN/inf.
  """
  step: jax.Array
  inner_state: Any
  bytes_sent: jax.Array
  total_bytes: jax.Array
  nonfinite_steps: jax.Array


def _compressor_axes(compressor, updates, inner_state, params) -> set:
  """The mapped axes ``compressor.update`` communicates over, traced abstractly at trace time (nothing runs)."""
  from mlsys_jax.comm.distributed import collective_axes   # (imports this module)
  return set(collective_axes(lambda u, s: compressor.update(u, s, params)[0], updates, inner_state))


def _check_same_axis(compressor, axis_name, updates, inner_state, params) -> None:
  """ValueError unless ``compressor.update`` communicates over ``axis_name`` (or over nothing when it is None):
  a warm-up that averages over another axis than the compressor (or not at all) leaves the replicas different
  from each other."""
  axes = _compressor_axes(compressor, updates, inner_state, params)
  if axis_name is None and axes:
    raise ValueError(f"dense_warmup(axis_name=None) wraps a compressor that communicates over {sorted(axes)}: "
                     f"the warm-up would return each replica's own gradient, so the replicas drift apart; pass "
                     f"axis_name={sorted(axes)[0]!r} to dense_warmup.")
  if axis_name is not None and axis_name not in axes:
    got = f"over {sorted(axes)}" if axes else "over no axis (built without axis_name)"
    raise ValueError(f"dense_warmup(axis_name={axis_name!r}) wraps a compressor that communicates {got}: build "
                     f"the compressor with axis_name={axis_name!r} (e.g. sidco(0.01, axis_name={axis_name!r})).")


def dense_warmup(compressor: optax.GradientTransformation, steps: int, *,
                 axis_name: str | None = None) -> optax.GradientTransformation:
  """Average the gradients densely for the first ``steps`` steps, then compress with ``compressor``.

  Args:
    compressor: a compression transform of this package built with the same ``axis_name`` (e.g.
      ``sidco(0.01, axis_name='d')``; checked when the update is traced: ``ValueError`` if it communicates
      over another axis, or over one while ``axis_name`` is None); its state must report ``bytes_sent``
      (every transform here does).
    steps: number of dense steps (>= 0; 0 makes the wrapper a pass-through to ``compressor``). DGC
      warms up for the first few epochs of ~100; at short horizons ~10% of the steps is a good start.
    axis_name: the mapped axis of the data-parallel workers (None: one device, the warm-up returns the
      gradient itself).

  Returns:
    An ``optax.GradientTransformation``; chain it like the compressor it wraps.

  Example:
    >>> from mlsys_jax.comm import topk
    >>> tx = dense_warmup(topk(0.5), steps=1)
    >>> g = {'w': jnp.array([1.0, -3.0, 0.5, 2.0])}
    >>> s = tx.init(g)
    >>> out, s = tx.update(g, s)          # warm-up: dense
    >>> out['w'].tolist()
    [1.0, -3.0, 0.5, 2.0]
    >>> out, s = tx.update(g, s)          # then Top-k with error feedback
    >>> out['w'].tolist()
    [0.0, -3.0, 0.0, 2.0]
  """
  if not isinstance(compressor, optax.GradientTransformation):
    raise TypeError(f"compressor must be an optax.GradientTransformation (e.g. sidco(0.01)), got "
                    f"{type(compressor).__name__}.")
  check_int("steps", steps, 0)

  def init_fn(params):
    check_floating("dense_warmup.init", params)
    inner = _init_counted("dense_warmup", compressor, params, "wrap a compressor of mlsys_jax.comm (sidco, "
                          "topk, dgc, randomk, powersgd, accordion)")
    f = jnp.zeros((), jnp.float32)
    return WarmupState(jnp.zeros((), jnp.int32), inner, f, f, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    check_floating("dense_warmup.update", updates)
    _check_axis(axis_name)
    if steps > 0:
      _check_same_axis(compressor, axis_name, updates, state.inner_state, params)
    if steps == 0:
      out, inner = compressor.update(updates, state.inner_state, params)
      sent = jnp.asarray(_state_field(inner, "bytes_sent"), jnp.float32)
      return out, WarmupState(state.step + 1, inner, sent, state.total_bytes + sent, state.nonfinite_steps)
    leaves = jax.tree_util.tree_leaves(updates)
    dense_bytes = float(sum(int(np.size(l)) * jnp.dtype(l.dtype).itemsize for l in leaves))

    def dense(_):
      finite = _global_finite(leaves, axis_name)
      g = jax.tree_util.tree_map(lambda x: jnp.where(finite, x, 0), updates)
      if axis_name is not None:
        g = jax.lax.pmean(g, axis_name)
      return g, state.inner_state, jnp.where(finite, dense_bytes, 0.0).astype(jnp.float32), ~finite

    def compressed(_):
      out, inner = compressor.update(updates, state.inner_state, params)
      out = jax.tree_util.tree_map(lambda o, g: o.astype(g.dtype), out, updates)
      return out, inner, jnp.asarray(_state_field(inner, "bytes_sent"), jnp.float32), jnp.asarray(False)

    out, inner, sent, bad = jax.lax.cond(state.step < steps, dense, compressed, None)
    return out, WarmupState(state.step + 1, inner, sent, state.total_bytes + sent,
                            state.nonfinite_steps + bad.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def dgc_density_schedule(final_ratio: float, start: float = 0.25, factor: float = 4.0) -> list[float]:
  """DGC's warm-up densities above ``final_ratio``: ``start, start / factor, ...`` while > ``final_ratio``.

  Lin et al., ICLR 2018, Sec. 3.3: 25%, 6.25%, 1.5625%, 0.390625% before the final 0.1%.

  >>> dgc_density_schedule(0.001)
  [0.25, 0.0625, 0.015625, 0.00390625]
  >>> dgc_density_schedule(0.01)
  [0.25, 0.0625, 0.015625]
  """
  check_range("final_ratio", final_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_range("start", start, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_range("factor", factor, 1.0, None, low_inclusive=False)
  out, r = [], float(start)
  while r > final_ratio * (1 + 1e-9):
    out.append(r)
    r /= factor
  return out


def stage_boundaries(steps: int, n_ratios: int) -> list[int]:
  """The step at which each warm-up stage of :func:`density_warmup` ends (equal shares of ``steps``, the
  remainder to the first stages); the final density runs from the last one on.

  >>> stage_boundaries(150, 4)
  [38, 76, 113, 150]
  """
  check_int("steps", steps, 0)
  check_int("n_ratios", n_ratios, 0)
  if not n_ratios:
    return []
  base, extra = divmod(steps, n_ratios)
  return np.cumsum([base + (1 if j < extra else 0) for j in range(n_ratios)]).astype(int).tolist()


class DensityWarmupState(NamedTuple):
  """State of :func:`density_warmup`.

  Attributes:
    step: steps taken (int32).
    inner_state: the compressors' shared state (every stage's compressor has the same state layout; the
      residual carries over between stages).
    stage: index of the stage the last step ran in (0 .. len(ratios); len(ratios) = the final density).
    bytes_sent: bytes this device passed to the collectives in the last step (that stage's payload).
    total_bytes: cumulative ``bytes_sent`` over all stages.
    off_schedule_steps: steps run by a ``fixed_stage`` transform whose stage is not the one the step counter
      gives (0 when the stages are dispatched at ``stage_boundaries``; a count above 0 says the caller switched
      the compiled steps at the wrong steps).
  """
  step: jax.Array
  inner_state: Any
  stage: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array
  off_schedule_steps: jax.Array


def _layout(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, [(tuple(np.shape(l)), jnp.result_type(l)) for l in leaves]


def density_warmup(make_compressor: Callable[[float], optax.GradientTransformation], final_ratio: float, *,
                   steps: int, ratios: Sequence[float] | None = None,
                   fixed_stage: int | None = None) -> optax.GradientTransformation:
  """Compress at decreasing densities for the first ``steps`` steps, then at ``final_ratio`` (DGC's warm-up).

  Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression", ICLR 2018, Sec. 3.3: the density is
  decreased exponentially (25% -> 6.25% -> 1.56% -> 0.39% -> 0.1%) over the first epochs, so that the
  error-feedback residual is not left to accumulate the fast-changing early gradients.

  The warm-up densities ``ratios`` each run for an equal share of ``steps`` (the first stages take the
  remainder), then ``final_ratio`` for every later step. Each stage is ``make_compressor(ratio)`` at a
  static density: its payload has that density's capacity, and ``bytes_sent`` / ``total_bytes`` count
  what each stage really passed to the collectives (a schedule through ``optax.inject_hyperparams``
  would instead send the largest density's capacity on every step). All stages share one state (the
  residual, momentum velocity, counters carry over), so ``make_compressor`` must build the same kind of
  transform at every density (checked at ``init``).

  Args:
    make_compressor: ``ratio -> GradientTransformation``, e.g. ``lambda r: topk(r, axis_name='d')``.
    final_ratio: the density after the warm-up, in (0, 1).
    steps: warm-up steps (>= 0; 0 is ``make_compressor(final_ratio)`` itself, with this wrapper's state).
    ratios: the warm-up densities, each in (0, 1), in non-increasing order and none below ``final_ratio``; default DGC's
      ``dgc_density_schedule(final_ratio)`` (0.25, 0.0625, ... down to the last one above the target).
      ``steps`` must be at least their number.
    fixed_stage: None (default): the stage follows the step counter. An int j runs stage j on every call
      (``len(ratios)`` = the final density), for callers that dispatch the stages outside ``jit``: under
      ``vmap`` with a per-worker step counter ``lax.switch`` computes every stage and selects one, which
      costs the sum of the stages, and on a GPU the ``lax.switch`` hands its index to the host every step
      (any data-dependent conditional in a jitted step cost ~3 ms of device idle per f32 ResNet-50 step on
      an H100, session 24); compile one step per ``fixed_stage`` and switch between them at
      ``stage_boundaries(...)``. The state is the same for every ``fixed_stage``, so one state passes
      through all of them; ``off_schedule_steps`` counts steps run at a stage other than the counter's.

  Returns:
    An ``optax.GradientTransformation``; chain it like the compressor, e.g.
    ``optax.chain(density_warmup(lambda r: sidco(r, axis_name='d'), 0.001, steps=100), optax.adam(1e-3))``.
    Under ``vmap`` (simulated workers) with a per-worker step counter every stage is computed and one is
    selected (``lax.switch`` on a batched index); under ``shard_map``/``pmap`` only the current stage runs.

  Example:
    >>> from mlsys_jax.comm import topk
    >>> tx = density_warmup(topk, 0.25, steps=1, ratios=[0.5])
    >>> g = {'w': jnp.array([1.0, -3.0, 0.5, 2.0])}
    >>> s = tx.init(g)
    >>> out, s = tx.update(g, s)          # stage 0: density 0.5
    >>> out['w'].tolist(), float(s.bytes_sent)
    ([0.0, -3.0, 0.0, 2.0], 20.0)
    >>> out, s = tx.update(g, s)          # then 0.25 (1 slot), with the residual of stage 0
    >>> out['w'].tolist(), float(s.bytes_sent), s.inner_state.residual['w'].tolist()
    ([0.0, -3.0, 0.0, 0.0], 12.0, [2.0, 0.0, 1.0, 2.0])
  """
  if not callable(make_compressor) or isinstance(make_compressor, optax.GradientTransformation):
    raise TypeError("make_compressor must be a function ratio -> GradientTransformation, e.g. "
                    "lambda r: topk(r, axis_name='d'); got " + type(make_compressor).__name__ + ".")
  check_range("final_ratio", final_ratio, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
  check_int("steps", steps, 0)
  if ratios is None:
    ratios = dgc_density_schedule(final_ratio) if steps else []
  ratios = [float(r) for r in ratios]
  for i, r in enumerate(ratios):
    check_range(f"ratios[{i}]", r, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    if r < final_ratio:
      raise ValueError(f"density_warmup: ratios[{i}]={r} is sparser than final_ratio={final_ratio}; a warm-up "
                       f"runs at densities >= the final one (e.g. ratios={dgc_density_schedule(final_ratio)}).")
    if i and r > ratios[i - 1]:
      raise ValueError(f"density_warmup: ratios[{i}]={r} is denser than ratios[{i - 1}]={ratios[i - 1]}; a warm-up "
                       f"goes from dense to sparse, so give the ratios in non-increasing order (e.g. "
                       f"{sorted(ratios, reverse=True)}).")
  if steps and not ratios:
    raise ValueError("density_warmup: steps > 0 needs at least one warm-up density in ratios (e.g. "
                     "dgc_density_schedule(final_ratio)); pass steps=0 for no warm-up.")
  if steps < len(ratios):
    raise ValueError(f"density_warmup: steps={steps} is fewer than the {len(ratios)} warm-up densities "
                     f"{ratios}; give each stage at least one step (raise steps or shorten ratios).")
  if not steps:
    ratios = []
  if fixed_stage is not None:
    check_int("fixed_stage", fixed_stage, 0)
    if fixed_stage > len(ratios):
      raise ValueError(f"density_warmup: fixed_stage={fixed_stage} but there are only {len(ratios) + 1} "
                       f"stages (0 .. {len(ratios)}, the last one is final_ratio).")
  stages = [make_compressor(r) for r in ratios] + [make_compressor(float(final_ratio))]
  for r, c in zip(ratios + [final_ratio], stages):
    if not isinstance(c, optax.GradientTransformation):
      raise TypeError(f"make_compressor({r}) returned {type(c).__name__}, not an optax.GradientTransformation.")
  ends = stage_boundaries(steps, len(ratios))   # stage j covers steps [ends[j-1], ends[j])

  def init_fn(params):
    check_floating("density_warmup.init", params)
    inits = [c.init(params) for c in stages]
    ref = _layout(inits[-1])
    for r, st in zip(ratios, inits[:-1]):
      if _layout(st) != ref:
        raise TypeError(f"density_warmup: make_compressor({r}) has a different state layout than "
                        f"make_compressor({final_ratio}); build the same transform (same options) at "
                        f"every density.")
    if _state_field(inits[-1], "bytes_sent") is None:
      raise TypeError("density_warmup: the compressor's state has no bytes_sent field; use a compressor "
                      "of mlsys_jax.comm (sidco, topk, dgc, randomk).")
    f = jnp.zeros((), jnp.float32)
    z = jnp.zeros((), jnp.int32)
    return DensityWarmupState(z, inits[0], z, f, f, z)

  def update_fn(updates, state, params=None):
    check_floating("density_warmup.update", updates)
    stage = jnp.zeros((), jnp.int32)
    for e in ends:
      stage = stage + (state.step >= e).astype(jnp.int32)

    def branch(c):
      def run(inner):
        out, new = c.update(updates, inner, params)
        return jax.tree_util.tree_map(lambda o, g: o.astype(g.dtype), out, updates), new
      return run

    off = state.off_schedule_steps
    if fixed_stage is not None:
      off = off + (stage != fixed_stage).astype(jnp.int32)
      stage = jnp.asarray(fixed_stage, jnp.int32)
      out, inner = branch(stages[fixed_stage])(state.inner_state)
    elif len(stages) == 1:
      out, inner = branch(stages[0])(state.inner_state)
    else:
      out, inner = jax.lax.switch(stage, [branch(c) for c in stages], state.inner_state)
    sent = jnp.asarray(_state_field(inner, "bytes_sent"), jnp.float32)
    return out, DensityWarmupState(state.step + 1, inner, stage, sent, state.total_bytes + sent, off)

  return optax.GradientTransformation(init_fn, update_fn)
