"""comm.adaptive_ef.spread_releases: each error-feedback release delivered as a rate over the interval it
stands for (issue 18, density 0.1% before Adam). Checked against a float64 numpy reference of the spread
applied to a float64 numpy Top-k with error feedback (8 workers under shard_map and pmap), conservation of
the released mass, identical replicas, bytes = the compressor's, jit/vmap, chained with Adam and
density_warmup, and bad input."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import density_warmup, topk
from mlsys_jax.comm.adaptive_ef import SpreadState, decay_residual, scale_by_leaf_rms, spread_releases

from _np_ref import topk_error_feedback as _np_topk_ef, topk_rows as _np_topk_rows  # tests/_np_ref.py
from _trees import grads as _grads, params as _params  # tests/_trees.py

_W = 8
_STEPS = 9
_RATIO = 0.02


def _np_spread(b, mode, max_interval=None, floor=0.0, noise=0.0, sizes=None, until=None, hold=None):
  """float64 numpy reference of the spread, coordinate by coordinate: b (steps, n) released aggregates ->
  outputs (steps, n) and the pending mass after the last step."""
  steps, n = b.shape
  last, pending, rate, left = np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n, int)
  outs = np.zeros((steps, n))
  for t in range(steps):
    for i in range(n):
      if b[t, i] != 0:
        T = t - last[i]
        if max_interval is not None:
          T = min(T, max_interval)
        spreading = until is None or t < until
        if not spreading:
          T = 1
        pending[i] += b[t, i]
        last[i], left[i] = t, T
        if mode == "linear":
          rate[i] = pending[i] / T
        elif mode == "leaky":
          rate[i] = 1.0 / T
        elif mode == "rate":
          rate[i] = b[t, i] / T
        else:
          rate[i] = b[t, i] / T
          left[i] = (max_interval if max_interval is not None else 10 ** 9) if spreading else 1
      live = left[i] > 0
      if mode == "rate":   # left[i]: T of the latest release; rate[i] = B / T (set above for 'hold')
        s = t - last[i]
        emitting = hold is None or s < max(left[i], hold)
        o = (rate[i] if emitting else 0.0) + (pending[i] - rate[i] * max(left[i] - s, 0)) / max(left[i], 1)
      elif mode == "linear":
        o = rate[i] if left[i] > 1 else (pending[i] if left[i] == 1 else 0.0)
        left[i] = max(left[i] - 1, 0)
      elif mode == "leaky":
        o = pending[i] * rate[i]
      else:
        o = rate[i] if left[i] > 0 else 0.0
        left[i] = max(left[i] - 1, 0)
      pending[i] -= o
      outs[t, i] = o + (((1 if t % 2 == 0 else -1) * noise) if live and noise else 0.0)
    if floor:
      start = 0
      for size in sizes:
        seg = outs[t, start:start + size]
        seg += (1 if t % 2 == 0 else -1) * floor * np.sqrt(np.mean(np.square(seg)))
        start += size
  return outs, pending


def _worker_grads():
  """(workers, steps, ...) gradients, each worker and step its own draw."""
  per = [[_grads(100 * s + w) for s in range(_STEPS)] for w in range(_W)]
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(_W, _STEPS, *x[0].shape),
                                *[g for row in per for g in row])


def _flat(tree, lead):
  return np.concatenate([np.asarray(x, np.float64).reshape(*lead, -1) for x in jax.tree_util.tree_leaves(tree)],
                        axis=-1)


_VARIANTS = {"linear": dict(mode="linear"), "leaky_cap2_floor": dict(mode="leaky", max_interval=2, floor=0.5),
             "hold_cap3": dict(mode="hold", max_interval=3),
             "linear_cap4_noise": dict(mode="linear", max_interval=4, noise=0.25),
             "leaky_cap3_until4": dict(mode="leaky", max_interval=3, until=4),
             "rate_cap4": dict(mode="rate", max_interval=4), "rate_hold2_floor": dict(mode="rate", hold=2, floor=0.5)}


def _run(g, axis, names=tuple(_VARIANTS) + ("bare", "decay")):
  """All steps (one lax.scan) of the variants ``names`` ('bare': Top-k alone; 'decay': decay_residual(topk,
  0.7)) on one worker's gradients."""
  res = {}
  for name in names:
    tx = topk(_RATIO, axis_name=axis)
    if name == "decay":
      tx = decay_residual(tx, 0.7)
    elif name != "bare":
      tx = spread_releases(tx, **_VARIANTS[name])
    res[name] = jax.lax.scan(lambda st, gs, tx=tx: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]
  return res


def _per_worker(run, g_w, devices):
  """``run`` on each worker's slice of ``g_w`` (leading axis: workers) under ``shard_map`` over axis "d";
  the outputs stacked on a leading worker axis."""
  mesh = Mesh(np.array(devices), ("d",))
  return jax.jit(shard_map(lambda gw: jax.tree_util.tree_map(lambda x: x[None], run(
      jax.tree_util.tree_map(lambda x: x[0], gw))), mesh=mesh, in_specs=(P("d"),), out_specs=P("d"),
      check_vma=False))(g_w)


@pytest.fixture(scope="module")
def runs(devices):
  g_w = _worker_grads()
  by_sm = _per_worker(lambda g: _run(g, "d"), g_w, devices)
  by_pmap = jax.pmap(lambda g: _run(g, "d", ("leaky_cap2_floor", "hold_cap3", "linear_cap4_noise",
                                             "leaky_cap3_until4", "rate_cap4", "rate_hold2_floor", "decay")),
                     axis_name="d", devices=devices)(g_w)
  return g_w, by_sm, by_pmap


def test_shard_map_equals_float64_reference_and_replicas_agree(runs):
  g_w, by_sm, _ = runs
  flat_g = _flat(g_w, (_W, _STEPS))
  b = _np_topk_ef(flat_g, _RATIO)
  sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(_params())]
  bare = _flat(by_sm["bare"][0], (_W, _STEPS))
  np.testing.assert_allclose(bare[0], b, rtol=1e-5, atol=1e-6)     # the compressor itself
  for name, kw in _VARIANTS.items():
    outs, st = by_sm[name]
    ref, pending = _np_spread(b, sizes=sizes, **kw)
    got = _flat(outs, (_W, _STEPS))
    for w in range(_W):                       # every replica the same, and equal to the reference
      np.testing.assert_array_equal(got[w], got[0])
      np.testing.assert_allclose(got[w], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(_flat(st.pending, (_W,))[0], pending, rtol=1e-5, atol=1e-6, err_msg=name)
    # the wrapper sends nothing itself: its bytes are the compressor's
    np.testing.assert_array_equal(st.total_bytes, by_sm["bare"][1].total_bytes)
    assert float(st.total_bytes[0]) > 0
    # releases counted: the non-zero entries of the compressor's output
    assert float(st.releases[0]) == float(np.count_nonzero(b))


def test_linear_conserves_the_released_mass(runs):
  """'linear' (no floor): delivered + pending == released, coordinate by coordinate; the spread really
  spreads (some release is delivered over more than one step)."""
  _, by_sm, _ = runs
  for name in ("linear",):
    outs, st = by_sm[name]
    delivered = _flat(outs, (_W, _STEPS))[0].sum(0)
    released = _flat(by_sm["bare"][0], (_W, _STEPS))[0].sum(0)
    np.testing.assert_allclose(delivered + _flat(st.pending, (_W,))[0], released, rtol=1e-5, atol=1e-5)
  outs = _flat(by_sm["linear"][0], (_W, _STEPS))[0]
  bare = _flat(by_sm["bare"][0], (_W, _STEPS))[0]
  assert np.count_nonzero(outs) > 2 * np.count_nonzero(bare)


def test_rate_conserves_mass_and_borrows_at_most_one_release(runs):
  """'rate' (session 17): delivered + pending == released coordinate by coordinate (pending may be
  negative: mass delivered ahead of the next release), |pending| never above the largest release of that
  coordinate plus what the latest release still owes; the stream is denser than the releases."""
  _, by_sm, _ = runs
  outs, st = by_sm["rate_cap4"]
  got = _flat(outs, (_W, _STEPS))[0]
  bare = _flat(by_sm["bare"][0], (_W, _STEPS))[0]
  pend = _flat(st.pending, (_W,))[0]
  np.testing.assert_allclose(got.sum(0) + pend, bare.sum(0), rtol=1e-5, atol=1e-5)
  assert (pend < -1e-6).any()                       # some coordinate borrowed ahead of its next release
  assert np.all(np.abs(pend) <= 2 * np.abs(bare).max(0) + 1e-5)
  assert np.count_nonzero(got) > 2 * np.count_nonzero(bare)


def test_rate_mode_tiny_case_by_hand():
  """One device, Top-k of 1 in 2 with constant gradients (2, 1.5): the plain releases alternate (2, 0),
  (0, 3), (4, 0), ...; 'rate' turns them back into the per-step gradient: the second entry gets 1.5 on
  every step from its first release on, the first converges to 2 (its correction halves per step), and
  delivered + pending equals the released mass."""
  tx = spread_releases(topk(0.5), mode="rate", max_interval=16)
  st = tx.init({"w": jnp.zeros(2)})
  outs, released = [], np.zeros(2)
  bare, bst = topk(0.5), topk(0.5).init({"w": jnp.zeros(2)})
  for _ in range(8):
    o, st = tx.update({"w": jnp.array([2.0, 1.5])}, st)
    b, bst = bare.update({"w": jnp.array([2.0, 1.5])}, bst)
    outs.append(np.asarray(o["w"], np.float64))
    released += np.asarray(b["w"], np.float64)
  outs = np.stack(outs)
  np.testing.assert_allclose(outs[:, 0], [2.0, 2.0, 1.0, 1.5, 1.75, 1.875, 1.9375, 1.96875])
  np.testing.assert_allclose(outs[:, 1], [0.0] + [1.5] * 7)
  np.testing.assert_allclose(outs.sum(0) + np.asarray(st.pending["w"]), released, rtol=1e-6)


def test_rate_hold_horizon_stops_the_rate_and_repays():
  """hold=3 after a single release of 6 over T=2 (max_interval 2): rate 3 for max(2, 3) = 3 steps with the
  correction, then only the correction, which moves the borrowed mass back; in total exactly 6."""
  b = np.zeros((40, 1))
  b[5, 0] = 6.0
  ref, pending = _np_spread(b, "rate", max_interval=2, hold=3)
  assert ref[:5].sum() == 0 and ref[5, 0] == 3.0
  assert ref[8:].max() <= 0 < -ref[8:].min()        # after the horizon: repayment only
  np.testing.assert_allclose(ref.sum() + pending.sum(), 6.0)
  assert abs(pending[0]) < 1e-3                      # repaid (geometrically) within the run
  # the transform on the same stream (a one-entry 'compressor' releasing b) equals the reference
  tx = spread_releases(_ReplayCompressor(b), mode="rate", max_interval=2, hold=3)
  st = tx.init({"w": jnp.zeros(1)})
  got = []
  for t in range(40):
    o, st = tx.update({"w": jnp.zeros(1)}, st)
    got.append(float(o["w"][0]))
  np.testing.assert_allclose(got, ref[:, 0], rtol=1e-5, atol=1e-6)


class _ReplayState(NamedTuple):
  t: jax.Array
  bytes_sent: jax.Array
  total_bytes: jax.Array


def _ReplayCompressor(b):
  """A stand-in compressor that outputs row t of ``b`` (steps, 1) as leaf 'w' on step t, with the bytes
  fields the wrapper reads."""
  table = jnp.asarray(b, jnp.float32)

  def init(params):
    z = jnp.zeros((), jnp.float32)
    return _ReplayState(jnp.zeros((), jnp.int32), z, z)

  def update(u, st, params=None):
    return {"w": table[st.t]}, _ReplayState(st.t + 1, jnp.ones((), jnp.float32), st.total_bytes + 1)
  return optax.GradientTransformation(init, update)


def test_until_spreads_the_early_releases_only(runs):
  """until=4 ('leaky', cap 3): steps 0-3 equal the spread without ``until``; from step 4 on a coordinate
  released there is delivered at once with all its pending mass (its pending drops to 0), one not released
  keeps draining; nothing is lost (delivered + pending == released)."""
  g_w, by_sm, _ = runs
  b = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  got = _flat(by_sm["leaky_cap3_until4"][0], (_W, _STEPS))[0]
  pend = _flat(by_sm["leaky_cap3_until4"][1].pending, (_W,))[0]
  always, _ = _np_spread(b, "leaky", max_interval=3)
  np.testing.assert_allclose(got[:4], always[:4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(got[4:], always[4:], atol=1e-6)     # the switch changes what is delivered
  late = b[4:] != 0
  assert late.any()
  # a late release delivers the coordinate's whole remaining mass: the released total up to that step
  # minus what was delivered before it
  for t, i in zip(*np.nonzero(late)):
    np.testing.assert_allclose(got[4 + t, i], b[:5 + t, i].sum() - got[:4 + t, i].sum(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(0) + pend, b.sum(0), rtol=1e-5, atol=1e-6)


def test_noise_is_a_zero_mass_alternation_on_live_deliveries(runs):
  """noise=0.25 ('linear', cap 4): the output minus the spread without noise is +-0.25 (sign of the step
  parity) exactly where a delivery runs and 0 elsewhere, so the released mass is still conserved up to
  the alternation; the pending mass is the noiseless spread's."""
  g_w, by_sm, _ = runs
  b = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  plain, pending = _np_spread(b, "linear", max_interval=4)
  got = _flat(by_sm["linear_cap4_noise"][0], (_W, _STEPS))[0]
  extra = got - plain
  sign = np.where(np.arange(_STEPS) % 2 == 0, 1.0, -1.0)[:, None]
  live = np.abs(extra) > 0.125
  np.testing.assert_allclose(extra[live], (0.25 * sign * np.ones_like(extra))[live], rtol=1e-5)
  np.testing.assert_allclose(extra[~live], 0.0, atol=1e-5)
  assert live.sum() > np.count_nonzero(b)   # deliveries last longer than the release step
  np.testing.assert_allclose(_flat(by_sm["linear_cap4_noise"][1].pending, (_W,))[0], pending, rtol=1e-5,
                             atol=1e-6)


def test_decay_residual_equals_float64_reference(runs):
  """decay_residual(topk, 0.7) under shard_map: every replica's output equals a float64 numpy Top-k whose
  residual is multiplied by 0.7 before each step, and each worker's residual is its reference's
  (sent + residual == g + 0.7 * previous residual); the bytes are Top-k's."""
  g_w, by_sm, _ = runs
  ref, res = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO, decay=0.7, with_residual=True)
  outs, st = by_sm["decay"]
  got = _flat(outs, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_allclose(got[w], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(st.residual, (_W,)), res, rtol=1e-5, atol=1e-6)
  plain = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  assert not np.allclose(ref, plain)          # the decay changes what is sent
  np.testing.assert_array_equal(st.total_bytes, by_sm["bare"][1].total_bytes)


def test_decay_residual_inside_density_warmup_and_bad_input():
  """Wrapping density_warmup scales the shared residual (one step's residual times 0.5 is what the next
  step adds); decay 1 is the compressor itself; bad input raises."""
  inner = density_warmup(topk, 0.25, steps=1, ratios=[0.5])
  tx = decay_residual(inner, 0.5)
  g = {"w": jnp.array([1.0, -3.0, 0.5, 2.0])}
  _, s = tx.update(g, tx.init(g))
  np.testing.assert_allclose(s.inner_state.residual["w"], [1.0, 0.0, 0.5, 0.0])
  out, s = tx.update({"w": jnp.zeros(4)}, s)        # stage 1 (1 slot): sends the largest of 0.5 * residual
  np.testing.assert_allclose(out["w"], [0.5, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(s.inner_state.residual["w"], [0.0, 0.0, 0.25, 0.0])
  same, ref = decay_residual(topk(0.5), 1.0), topk(0.5)
  o1, _ = same.update(g, same.init(g))
  o2, _ = ref.update(g, ref.init(g))
  np.testing.assert_array_equal(o1["w"], o2["w"])
  with pytest.raises(ValueError, match="decay"):
    decay_residual(topk(0.1), 0.0)
  with pytest.raises(ValueError, match="decay"):
    decay_residual(topk(0.1), 1.5)
  with pytest.raises(TypeError, match="GradientTransformation"):
    decay_residual(lambda g: g, 0.9)
  with pytest.raises(TypeError, match="residual"):
    decay_residual(optax.identity(), 0.9).init(g)


def test_pmap_equals_shard_map(runs):
  _, by_sm, by_pmap = runs
  for name in by_pmap:
    for a, b in zip(jax.tree_util.tree_leaves(by_sm[name]), jax.tree_util.tree_leaves(by_pmap[name])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_one_device_jit_and_vmap():
  """One device (axis_name None): vmap over 2 independent runs equals each run under jit."""
  tx = spread_releases(topk(0.05), mode="leaky", max_interval=4)
  update = jax.jit(tx.update)
  batched = [jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_grads(10 * r + s) for r in range(2)])
             for s in range(2)]
  st = jax.vmap(tx.init)(jax.tree_util.tree_map(lambda x: jnp.stack([x] * 2), _params()))
  vupd = jax.jit(jax.vmap(tx.update))
  for g in batched:
    o_v, st = vupd(g, st)
  for r in range(2):
    st_r = tx.init(_params())
    for s in range(2):
      o_r, st_r = update(_grads(10 * r + s), st_r)
    for a, b in zip(jax.tree_util.tree_leaves((o_r, st_r)), jax.tree_util.tree_leaves((o_v, st))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b)[r], rtol=1e-6, atol=1e-7)


def test_chains_with_adam_and_density_warmup():
  """Placed where the compressor goes: chain(spread(density_warmup(topk)), adam) runs, its bytes are the
  warm-up's stage by stage, and every output is finite."""
  inner = density_warmup(topk, 0.02, steps=2, ratios=[0.5])
  tx = optax.chain(spread_releases(inner, max_interval=8), optax.adam(1e-3))
  ref = density_warmup(topk, 0.02, steps=2, ratios=[0.5])
  st, ref_st = tx.init(_params()), ref.init(_params())
  for s in range(4):
    o, st = jax.jit(tx.update)(_grads(s), st)
    _, ref_st = jax.jit(ref.update)(_grads(s), ref_st)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(o))
  assert isinstance(st[0], SpreadState)
  assert float(st[0].total_bytes) == float(ref_st.total_bytes) > 0


def test_nonfinite_gradient_propagates_or_is_counted():
  """A NaN gradient: the compressor skips the step (counts it); the wrapper releases nothing new and
  outputs no NaN (since session 42 it skips the step too: tests/test_fixes_s42_recipe.py)."""
  for kw in (dict(), dict(mode="rate", max_interval=16)):
    tx = spread_releases(topk(0.05), **kw)
    st = tx.init(_params())
    _, st = tx.update(_grads(0), st)
    bad = {**_grads(1), "dense": _grads(1)["dense"].at[0, 0].set(jnp.nan)}
    o, st = tx.update(bad, st)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(o)), kw
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(st.pending)), kw
    assert int(st.inner_state.nonfinite_steps) == 1


def test_bad_input():
  with pytest.raises(TypeError, match="GradientTransformation"):
    spread_releases(lambda g: g)
  with pytest.raises(ValueError, match="mode"):
    spread_releases(topk(0.1), mode="burst")
  with pytest.raises(ValueError, match="max_interval"):
    spread_releases(topk(0.1), max_interval=0)
  with pytest.raises(ValueError, match="floor"):
    spread_releases(topk(0.1), floor=-1.0)
  with pytest.raises(ValueError, match="until"):
    spread_releases(topk(0.1), until=0)
  with pytest.raises(ValueError, match="noise"):
    spread_releases(topk(0.1), mode="linear", noise=-0.5)
  with pytest.raises(ValueError, match="noise needs"):
    spread_releases(topk(0.1), mode="leaky", noise=0.5)
  with pytest.raises(ValueError, match="hold= is for mode='rate'"):
    spread_releases(topk(0.1), mode="leaky", hold=4)
  with pytest.raises(ValueError, match="hold"):
    spread_releases(topk(0.1), mode="rate", hold=0)
  with pytest.raises(ValueError, match="until= needs"):
    spread_releases(topk(0.1), mode="rate", until=3)
  with pytest.raises(ValueError, match="noise needs"):
    spread_releases(topk(0.1), mode="rate", noise=0.5)
  with pytest.raises(TypeError, match="bytes_sent"):
    spread_releases(optax.identity()).init(_params())
  with pytest.raises(TypeError, match="floating"):
    spread_releases(topk(0.1)).init({"w": jnp.zeros(3, jnp.int32)})


def test_scale_by_leaf_rms_matches_numpy():
  """Each leaf over the root of its bias-corrected EMA of the mean square (float64 numpy), under jit; inside
  a sparsifier's precondition= it changes what is selected, not the bytes."""
  tx = scale_by_leaf_rms(decay=0.8, eps=1e-8)
  st = tx.init(_params())
  update = jax.jit(tx.update)
  nu = {k: 0.0 for k in _params()}
  for s in range(3):
    g = _grads(s, scale=1.0 + s)
    out, st = update(g, st)
    for k, x in g.items():
      x = np.asarray(x, np.float64)
      nu[k] = 0.8 * nu[k] + 0.2 * np.mean(x ** 2)
      np.testing.assert_allclose(np.asarray(out[k]), x / np.sqrt(nu[k] / (1 - 0.8 ** (s + 1)) + 1e-8),
                                 rtol=1e-5)
  plain, pre = topk(0.05), topk(0.05, precondition=scale_by_leaf_rms())
  _, s_plain = plain.update(_grads(0), plain.init(_params()))
  _, s_pre = pre.update(_grads(0), pre.init(_params()))
  assert float(s_pre.bytes_sent) == float(s_plain.bytes_sent) > 0
  with pytest.raises(ValueError, match="decay"):
    scale_by_leaf_rms(decay=1.0)
  with pytest.raises(ValueError, match="eps"):
    scale_by_leaf_rms(eps=0.0)


def _np_frozen_rms(g, freeze_after, decay=0.9, eps=1e-8):
  """float64 numpy reference: g (steps, n) -> g / sqrt(nu + eps), nu's EMA frozen after freeze_after steps."""
  nu, out = np.zeros(g.shape[1]), []
  for t in range(g.shape[0]):
    if t < freeze_after:
      nu = decay * nu + (1 - decay) * g[t] ** 2
    out.append(g[t] / np.sqrt(nu + eps))
  return np.stack(out)


def test_scale_by_frozen_rms_matches_numpy_and_optax_before_the_freeze():
  """Equal to optax.scale_by_rms for the first freeze_after steps and to a float64 numpy reference on all
  steps (nu constant afterwards), under jit and vmap."""
  from mlsys_jax.comm.adaptive_ef import scale_by_frozen_rms
  tx, ref = scale_by_frozen_rms(2, decay=0.8), optax.scale_by_rms(decay=0.8)
  gs = [_grads(s, scale=1.0 + s) for s in range(4)]
  st, st_ref = tx.init(_params()), ref.init(_params())
  update = jax.jit(tx.update)
  outs = []
  for s, g in enumerate(gs):
    o, st = update(g, st)
    o_ref, st_ref = ref.update(g, st_ref)
    if s < 2:
      for a, b in zip(jax.tree_util.tree_leaves(o), jax.tree_util.tree_leaves(o_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    outs.append(_flat(o, ()))
  want = _np_frozen_rms(np.stack([_flat(g, ()) for g in gs]), 2, decay=0.8)
  np.testing.assert_allclose(np.stack(outs), want, rtol=1e-5, atol=1e-6)
  batched = jax.tree_util.tree_map(lambda *x: jnp.stack(x), gs[0], gs[1])
  o_v, _ = jax.vmap(tx.update)(batched, jax.vmap(tx.init)(batched))
  np.testing.assert_allclose(_flat(o_v, (2,)), np.stack(
      [_np_frozen_rms(_flat(g, ())[None], 2, decay=0.8)[0] for g in gs[:2]]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="freeze_after"):
    scale_by_frozen_rms(0)
  with pytest.raises(ValueError, match="decay"):
    scale_by_frozen_rms(5, decay=1.0)


def test_frozen_rms_inside_topk_under_shard_map(devices):
  """topk(precondition=scale_by_frozen_rms(2, eps=1)) over 8 workers (shard_map): each worker normalises its own
  gradient with its own frozen RMS before error feedback; the aggregate equals the float64 numpy Top-k with
  error feedback on the per-worker normalised gradients, and pmap gives the same."""
  from mlsys_jax.comm.adaptive_ef import scale_by_frozen_rms
  g_w = _worker_grads()
  flat = _flat(g_w, (_W, _STEPS))
  # eps=1: with a tiny eps every entry of the first step is +-sqrt(1 / (1 - decay)), all tied for Top-k
  norm = np.stack([_np_frozen_rms(flat[w], 2, eps=1.0) for w in range(_W)])
  want = _np_topk_ef(norm, _RATIO)

  def run(g):
    tx = topk(_RATIO, axis_name="d", precondition=scale_by_frozen_rms(2, eps=1.0))
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[1]

  sm = _per_worker(run, g_w, devices)
  got = _flat(sm, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_allclose(got[w], want, rtol=1e-4, atol=1e-5)
  pm = _flat(jax.pmap(run, axis_name="d", devices=devices)(g_w), (_W, _STEPS))
  np.testing.assert_allclose(pm, got, rtol=1e-6, atol=1e-7)


def test_rms_selection_is_scale_by_rms_or_tracks_it():
  """active=True is optax.scale_by_rms (same outputs and state); active=False (under jit) returns the gradient
  unchanged with the same state; bad input."""
  from mlsys_jax.comm.adaptive_ef import rms_selection
  on, off, ref = rms_selection(True, decay=0.8), rms_selection(False, decay=0.8), optax.scale_by_rms(decay=0.8)
  s_on, s_off, s_ref = on.init(_params()), off.init(_params()), ref.init(_params())
  off_update = jax.jit(off.update)
  for s in range(3):
    g = _grads(s, scale=1.0 + s)
    o_on, s_on = on.update(g, s_on)
    o_off, s_off = off_update(g, s_off)
    o_ref, s_ref = ref.update(g, s_ref)
    for a, b, c, x in zip(*(jax.tree_util.tree_leaves(t) for t in (o_on, o_ref, o_off, g))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      np.testing.assert_array_equal(np.asarray(c), np.asarray(x))
  for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (s_on, s_off, s_ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6)
  with pytest.raises(TypeError, match="active"):
    rms_selection(0.01)
  with pytest.raises(ValueError, match="decay"):
    rms_selection(decay=1.0)
  with pytest.raises(ValueError, match="eps"):
    rms_selection(eps=0.0)


def _np_rms_warmup_topk(flat, raw_steps=2):
  """float64 numpy reference of density_warmup(lambda r: topk(r, precondition=rms_selection(r < 0.1)),
  0.02, steps=4, ratios=[0.1, 0.04]): flat (workers, steps, n) -> the workers' mean sent (steps, n)."""
  w_, steps, n = flat.shape
  per_step = [0.1, 0.1, 0.04, 0.04] + [0.02] * (steps - 4)
  res, nu, want = np.zeros((w_, n)), np.zeros((w_, n)), []
  for t in range(steps):
    nu = 0.9 * nu + 0.1 * flat[:, t] ** 2
    x = flat[:, t] if t < raw_steps else flat[:, t] / np.sqrt(nu + 1e-8)
    acc = x + res
    sent = _np_topk_rows(acc, max(1, int(round(per_step[t] * n))))
    res = acc - sent
    want.append(sent.mean(0))
  return np.stack(want)


def test_rms_selection_stages_of_density_warmup_under_shard_map(devices):
  """Issue 18's 0.1% recipe shape: density_warmup(lambda r: topk(r, precondition=rms_selection(r < r0))):
  the first stage selects on the raw gradient, the later ones on each worker's gradient over its own RMS
  (tracked from step 0), one residual carried through; equal to a float64 numpy reference (8 workers,
  shard_map), replicas identical."""
  from mlsys_jax.comm.adaptive_ef import rms_selection
  ratios, final, steps = [0.1, 0.04], 0.02, 4       # stages: steps 0-1 at 10% (raw), 2-3 at 4%, then 2%
  g_w = _worker_grads()
  want = _np_rms_warmup_topk(_flat(g_w, (_W, _STEPS)))

  def run(g):
    tx = density_warmup(lambda r: topk(r, axis_name="d", precondition=rms_selection(r < ratios[0])), final,
                        steps=steps, ratios=ratios)
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[1]

  sm = _per_worker(run, g_w, devices)
  got = _flat(sm, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_allclose(got[w], want, rtol=1e-4, atol=1e-5)


def test_documented_one_percent_option_with_sidco_under_pmap(devices):
  """docs/comm.md's 1% option, ``spread_releases(sidco(r, axis_name='d'), mode='leaky', max_interval=16)``:
  under pmap (8 workers) every replica's output equals the float64 reference (the leaky spread of numpy
  Top-k with error feedback: sidco's default sends Top-k's set), and the bytes are sidco's own. (The
  wrapper under shard_map = pmap is checked on Top-k above; one compile here keeps the file fast.)"""
  from mlsys_jax.comm import sidco
  g_w = _worker_grads()

  def run(g):
    tx = spread_releases(sidco(_RATIO, axis_name="d"), mode="leaky", max_interval=16)
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]

  by_pmap = jax.pmap(run, axis_name="d", devices=devices)(g_w)
  b = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  ref, pending = _np_spread(b, "leaky", max_interval=16)
  outs, st = by_pmap
  got = _flat(outs, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_array_equal(got[w], got[0])
    np.testing.assert_allclose(got[w], ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(st.pending, (_W,))[0], pending, rtol=1e-5, atol=1e-6)
  assert float(st.total_bytes[0]) == float(st.inner_state.total_bytes[0]) > 0


def test_rate_mode_with_sidco_and_dgc_under_pmap(devices):
  """Session 17's arm, ``spread_releases(c, mode='rate', max_interval=16)`` with ``c`` = sidco or dgc under pmap
  (8 workers): every replica identical; with sidco equal to the float64 reference (rate spread of numpy Top-k
  with error feedback); with dgc delivered + pending == dgc's own released aggregate, coordinate by coordinate;
  the bytes are the compressor's."""
  from mlsys_jax.comm import dgc, sidco
  g_w = _worker_grads()

  def run(g):
    res = {}
    for name, c in (("sidco", sidco(_RATIO, axis_name="d")), ("dgc", dgc(_RATIO, axis_name="d"))):
      for wrap in (False, True):
        tx = spread_releases(c, mode="rate", max_interval=16) if wrap else c
        res[(name, wrap)] = jax.lax.scan(lambda st, gs, tx=tx: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]
    return res

  by_pmap = jax.pmap(run, axis_name="d", devices=devices)(g_w)
  b = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  ref, pending = _np_spread(b, "rate", max_interval=16)
  for name in ("sidco", "dgc"):
    outs, st = by_pmap[(name, True)]
    got = _flat(outs, (_W, _STEPS))
    for w in range(_W):
      np.testing.assert_array_equal(got[w], got[0])
    released = _flat(by_pmap[(name, False)][0], (_W, _STEPS))[0].sum(0)
    np.testing.assert_allclose(got[0].sum(0) + _flat(st.pending, (_W,))[0], released, rtol=1e-5, atol=1e-5)
    assert float(st.total_bytes[0]) == float(by_pmap[(name, False)][1].total_bytes[0]) > 0
    if name == "sidco":
      np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(_flat(st.pending, (_W,))[0], pending, rtol=1e-5, atol=1e-6)


def test_tenth_percent_recipe_spread_until_under_pmap(devices):
  """The 0.1% warm-up recipe's shape (raw selection in the first stage, the Adam-aware RMS selection after
  it) inside ``spread_releases(..., mode='leaky', max_interval=16, until=<end of the raw stage>)`` (session
  13's screen, docs/comm.md), with Top-k: under pmap (8 workers) every replica equals the float64 reference
  (the leaky spread, with ``until``, of the numpy warm-up recipe); the bytes are the compressor's."""
  from mlsys_jax.comm.adaptive_ef import rms_selection
  g_w = _worker_grads()

  def run(g):
    c = density_warmup(lambda r: topk(r, axis_name="d", precondition=rms_selection(r < 0.1)), 0.02, steps=4,
                       ratios=[0.1, 0.04])
    tx = spread_releases(c, mode="leaky", max_interval=16, until=2)
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]

  outs, st = jax.pmap(run, axis_name="d", devices=devices)(g_w)
  b = _np_rms_warmup_topk(_flat(g_w, (_W, _STEPS)))
  ref, pending = _np_spread(b, "leaky", max_interval=16, until=2)
  assert not np.allclose(ref, _np_spread(b, "leaky", max_interval=16)[0], atol=1e-5)   # until matters here
  got = _flat(outs, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_array_equal(got[w], got[0])
    np.testing.assert_allclose(got[w], ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(_flat(st.pending, (_W,))[0], pending, rtol=1e-4, atol=1e-5)
  assert float(st.total_bytes[0]) == float(st.inner_state.total_bytes[0]) > 0


def test_gradient_units_equals_float64_reference_under_shard_map_and_pmap(devices):
  """gradient_units(density_warmup(topk(r, precondition=rms_selection(r < 0.1))), start=2): steps 0-1 (raw
  selection) unchanged, from step 2 on each leaf of the aggregate times the workers' mean of
  sqrt(mean over the leaf of each worker's nu) (float64 numpy reference, 8 workers); replicas identical,
  pmap = shard_map; the scale's pmean is counted (4 bytes per leaf on every step: it runs before ``start`` too)."""
  from mlsys_jax.comm.adaptive_ef import GradientUnitsState, gradient_units, rms_selection
  g_w = _worker_grads()
  flat = _flat(g_w, (_W, _STEPS))
  want = _np_rms_warmup_topk(flat)
  sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(_params())]
  nu = np.zeros_like(flat[:, 0])
  for t in range(_STEPS):
    nu = 0.9 * nu + 0.1 * flat[:, t] ** 2
    if t >= 2:
      start = 0
      for size in sizes:
        want[t, start:start + size] *= np.sqrt(nu[:, start:start + size].mean(1)).mean()
        start += size

  def run(g):
    c = density_warmup(lambda r: topk(r, axis_name="d", precondition=rms_selection(r < 0.1)), 0.02, steps=4,
                       ratios=[0.1, 0.04])
    tx = gradient_units(c, 2, axis_name="d")
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]

  outs, st = _per_worker(run, g_w, devices)
  got = _flat(outs, (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_array_equal(got[w], got[0])
    np.testing.assert_allclose(got[w], want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got[0], _np_rms_warmup_topk(flat), atol=1e-3)   # the scale matters here
  assert isinstance(st, GradientUnitsState)
  np.testing.assert_allclose(float(st.total_bytes[0]),
                             float(st.inner_state.total_bytes[0]) + 4 * len(sizes) * _STEPS)
  pm_outs, pm_st = jax.pmap(run, axis_name="d", devices=devices)(g_w)
  np.testing.assert_allclose(_flat(pm_outs, (_W, _STEPS)), got, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(pm_st.scale), jax.tree_util.tree_leaves(st.scale)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_gradient_units_freeze_keeps_the_factor_of_the_switch(devices):
  """freeze=True: from step 2 on every step uses the factor of step 2 (float64 reference, 8 workers under
  shard_map); replicas identical; differs from the unfrozen factor."""
  from mlsys_jax.comm.adaptive_ef import gradient_units, rms_selection
  g_w = _worker_grads()
  flat = _flat(g_w, (_W, _STEPS))
  base = _np_rms_warmup_topk(flat)
  want = base.copy()
  sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(_params())]
  nu, frozen = np.zeros_like(flat[:, 0]), None
  for t in range(_STEPS):
    nu = 0.9 * nu + 0.1 * flat[:, t] ** 2
    if t == 2:
      frozen, start = [], 0
      for size in sizes:
        frozen.append(np.sqrt(nu[:, start:start + size].mean(1)).mean())
        start += size
    if t >= 2:
      start = 0
      for size, f in zip(sizes, frozen):
        want[t, start:start + size] *= f
        start += size

  def run(g):
    c = density_warmup(lambda r: topk(r, axis_name="d", precondition=rms_selection(r < 0.1)), 0.02, steps=4,
                       ratios=[0.1, 0.04])
    tx = gradient_units(c, 2, axis_name="d", freeze=True)
    return jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)[1]

  got = _flat(_per_worker(run, g_w, devices), (_W, _STEPS))
  for w in range(_W):
    np.testing.assert_array_equal(got[w], got[0])
    np.testing.assert_allclose(got[w], want, rtol=1e-4, atol=1e-6)
  with pytest.raises(TypeError, match="freeze"):
    gradient_units(topk(0.1, precondition=optax.scale_by_rms()), 0, axis_name=None, freeze=1)


def test_gradient_units_bad_input():
  from mlsys_jax.comm.adaptive_ef import gradient_units
  with pytest.raises(TypeError, match="GradientTransformation"):
    gradient_units(lambda g: g, 0, axis_name=None)
  with pytest.raises(ValueError, match="start"):
    gradient_units(topk(0.1, precondition=optax.scale_by_rms()), -1, axis_name=None)
  with pytest.raises(TypeError, match="start"):
    gradient_units(topk(0.1, precondition=optax.scale_by_rms()), 1.5, axis_name=None)
  with pytest.raises(TypeError, match="axis_name"):
    gradient_units(topk(0.1, precondition=optax.scale_by_rms()), 0, axis_name=1)
  with pytest.raises(TypeError, match="axis_name"):     # required: a replica without the mean would drift
    gradient_units(topk(0.1, precondition=optax.scale_by_rms()), 0)
  with pytest.raises(ValueError, match="until= needs mode"):
    spread_releases(topk(0.1), mode="hold", until=3)
  with pytest.raises(TypeError, match="nu"):
    gradient_units(topk(0.1), 0, axis_name=None).init(_params())
  with pytest.raises(TypeError, match="bytes_sent"):
    gradient_units(optax.scale_by_rms(), 0, axis_name=None).init(_params())


# ----------------------------------------------------------------------------------------------------
# staleness_topk: Top-k with error feedback on |acc| * (1 + age / tau).


def _np_stale_topk(flat_g, ratio, tau):
  """float64 numpy reference of staleness_topk on one worker: flat_g (steps, n) -> sent (steps, n), the
  final residual and ages. Scores |acc| * (1 + age / tau); the k largest, ties in index order."""
  steps, n = flat_g.shape
  k = max(1, int(round(ratio * n)))
  res, age, outs = np.zeros(n), np.zeros(n, np.int64), []
  for s in range(steps):
    acc = flat_g[s] + res
    score = np.abs(acc) * (1.0 + age / tau)
    top = np.argsort(-score, kind="stable")[:k]
    sent = np.zeros(n)
    sent[top] = acc[top]
    res = acc - sent
    age = age + 1
    age[top] = 0
    outs.append(sent)
  return np.stack(outs), res, age


def _stale_scan(tx, g):
  """All steps of ``tx`` (one lax.scan) on one worker's gradients ``g`` (leading axis: steps)."""
  st, outs = jax.lax.scan(lambda st, gs: tx.update(gs, st)[::-1], tx.init(_params()), g)
  return outs, st


def test_staleness_topk_matches_float64_reference_on_one_device():
  """One device, 9 steps, tau 2 (ages matter): outputs, residual and ages equal the numpy reference; the
  selection differs from plain Top-k (the test would not pass with the ages ignored); bytes are Top-k's."""
  from mlsys_jax.comm.adaptive_ef import staleness_topk
  g = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_grads(7 + s) for s in range(_STEPS)])
  flat = _flat(g, (_STEPS,))
  outs, st = jax.jit(lambda g: _stale_scan(staleness_topk(0.05, tau=2.0), g))(g)
  want, want_res, want_age = _np_stale_topk(flat, 0.05, 2.0)
  np.testing.assert_allclose(_flat(outs, (_STEPS,)), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_flat(st.residual, ()), want_res, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(_flat(st.age, ()), want_age)
  plain = _np_topk_ef(flat[None], 0.05)
  assert not np.allclose(want, plain)   # the ages changed the selection
  ref_outs, ref_st = jax.jit(lambda g: _stale_scan(topk(0.05), g))(g)
  assert float(st.total_bytes) == float(ref_st.total_bytes) > 0
  assert float(st.density) == pytest.approx(float(ref_st.density))
  # error feedback keeps every bit of mass: sum of what was sent + residual = sum of the gradients
  np.testing.assert_allclose(want.sum(0) + want_res, flat.sum(0), rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(_flat(outs, (_STEPS,)).sum(0) + _flat(st.residual, ()), flat.sum(0),
                             rtol=1e-5, atol=1e-5)


def test_staleness_topk_age_reset_and_bounded_wait():
  """A constant gradient [8, 4, 2, 1], one entry per step, 40 steps: the age resets on each send (0 for the
  sent entry, +1 for the rest); the sends follow the numpy reference; with tau 1 the smallest entry's
  longest wait is 7 steps where plain Top-k (tau = inf) makes it wait 15."""
  from mlsys_jax.comm.adaptive_ef import staleness_scores, staleness_topk
  g = {"w": jnp.array([8.0, 4.0, 2.0, 1.0])}
  waits = {}
  for tau in (1.0, float("inf")):
    tx = staleness_topk(0.25, tau=tau)
    st = tx.init(g)
    update = jax.jit(tx.update)
    sends = []
    for _ in range(40):
      before = np.asarray(st.age["w"])
      out, st = update(g, st)
      hit = np.flatnonzero(np.asarray(out["w"]))
      assert len(hit) == 1
      np.testing.assert_array_equal(np.asarray(st.age["w"]), np.where(np.arange(4) == hit[0], 0, before + 1))
      sends.append(int(hit[0]))
    want, _, _ = _np_stale_topk(np.tile(np.asarray(g["w"], np.float64), (40, 1)), 0.25, tau)
    assert sends == [int(np.flatnonzero(row)[0]) for row in want]
    last, longest = {}, {}
    for t, i in enumerate(sends):
      longest[i] = max(longest.get(i, 0), t - last.get(i, -1))
      last[i] = t
    waits[tau] = longest
  assert waits[1.0][3] == 7 and waits[float("inf")][3] == 15
  assert max(waits[1.0].values()) < max(waits[float("inf")].values())
  np.testing.assert_allclose(staleness_scores(jnp.array([-2.0, 1.0]), jnp.array([3, 0]), 2.0), [5.0, 1.0])
  np.testing.assert_array_equal(staleness_scores(jnp.array([-2.0, 1.0]), jnp.array([3, 0]), float("inf")),
                                [2.0, 1.0])


def test_staleness_topk_infinite_tau_is_topk_bitwise(devices):
  """tau = inf (and a tau so large that 1 + age / tau rounds to 1): bitwise topk's outputs, residuals and
  bytes, on one device under jit and for 8 workers under shard_map."""
  from mlsys_jax.comm.adaptive_ef import staleness_topk
  g = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_grads(3 + s) for s in range(_STEPS)])
  ref = jax.jit(lambda g: _stale_scan(topk(_RATIO), g))(g)
  for tau in (float("inf"), 1e30):
    got = jax.jit(lambda g, tau=tau: _stale_scan(staleness_topk(_RATIO, tau=tau), g))(g)
    for a, b in zip(jax.tree_util.tree_leaves((ref[0], ref[1].residual, ref[1].total_bytes)),
                    jax.tree_util.tree_leaves((got[0], got[1].residual, got[1].total_bytes))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  g_w = _worker_grads()
  ref_w = _per_worker(lambda g: _stale_scan(topk(_RATIO, axis_name="d"), g)[0], g_w, devices)
  got_w = _per_worker(lambda g: _stale_scan(staleness_topk(_RATIO, tau=float("inf"), axis_name="d"), g)[0],
                      g_w, devices)
  for a, b in zip(jax.tree_util.tree_leaves(ref_w), jax.tree_util.tree_leaves(got_w)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_staleness_topk_collectives_equal_the_single_device_simulation(devices):
  """8 workers: under shard_map, pmap and a named vmap, every replica's output is the mean of the 8
  single-device runs' sent values (each worker's own selection, residual and ages), replicas bitwise equal,
  and each worker's residual and ages equal its single-device run's."""
  from mlsys_jax.comm.adaptive_ef import staleness_topk
  g_w = _worker_grads()
  run = lambda g: _stale_scan(staleness_topk(_RATIO, tau=3.0, axis_name="d"), g)
  single = [jax.jit(lambda g: _stale_scan(staleness_topk(_RATIO, tau=3.0), g))(
      jax.tree_util.tree_map(lambda x, w=w: x[w], g_w)) for w in range(_W)]
  want = np.mean([_flat(o, (_STEPS,)) for o, _ in single], axis=0)
  sm = _per_worker(run, g_w, devices)
  pm = jax.pmap(run, axis_name="d", devices=devices)(g_w)
  vm = jax.jit(jax.vmap(run, axis_name="d"))(g_w)
  for outs, st in (sm, pm, vm):
    got = _flat(outs, (_W, _STEPS))
    for w in range(_W):
      np.testing.assert_array_equal(got[w], got[0])
      np.testing.assert_allclose(got[w], want, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(_flat(st.residual, (_W,))[w], _flat(single[w][1].residual, ()), rtol=1e-6,
                                 atol=1e-6)
      np.testing.assert_array_equal(_flat(st.age, (_W,))[w], _flat(single[w][1].age, ()))
    np.testing.assert_array_equal(np.asarray(st.total_bytes), float(single[0][1].total_bytes))
  np.testing.assert_allclose(_flat(pm[0], (_W, _STEPS)), _flat(sm[0], (_W, _STEPS)), rtol=1e-6, atol=1e-7)


def test_staleness_topk_nonfinite_is_skipped_on_every_replica(devices):
  """A NaN on one worker at step 1: every replica skips that step (output 0, residual and ages unchanged,
  nonfinite_steps 1), and the next steps are finite; on one device the same, counted."""
  from mlsys_jax.comm.adaptive_ef import staleness_topk
  g_w = jax.tree_util.tree_map(lambda x: x[:, :3], _worker_grads())
  g_w = {**g_w, "bias": g_w["bias"].at[5, 1, 0].set(jnp.nan)}

  def run(g):
    tx = staleness_topk(_RATIO, tau=2.0, axis_name="d")
    st0 = tx.init(_params())
    o0, st1 = tx.update(jax.tree_util.tree_map(lambda x: x[0], g), st0)
    o1, st2 = tx.update(jax.tree_util.tree_map(lambda x: x[1], g), st1)
    o2, st3 = tx.update(jax.tree_util.tree_map(lambda x: x[2], g), st2)
    return o1, o2, st1, st2, st3

  o1, o2, st1, st2, st3 = _per_worker(run, g_w, devices)
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(o1))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(o2))
  np.testing.assert_array_equal(np.asarray(st3.nonfinite_steps), np.ones(_W))
  for a, b in zip(jax.tree_util.tree_leaves((st1.residual, st1.age)), jax.tree_util.tree_leaves((st2.residual,
                                                                                                st2.age))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tx = staleness_topk(0.05, tau=2.0)
  st = tx.init(_params())
  bad = {**_grads(1), "dense": _grads(1)["dense"].at[0, 0].set(jnp.inf)}
  o, st = jax.jit(tx.update)(bad, st)
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(o))
  assert int(st.nonfinite_steps) == 1 and float(st.total_bytes) == 0.0


def test_staleness_topk_chains_and_wraps():
  """chain(spread_releases(staleness_topk), adam) under jit: finite outputs, bytes = the compressor's."""
  from mlsys_jax.comm.adaptive_ef import StalenessTopkState, staleness_topk
  tx = optax.chain(spread_releases(staleness_topk(0.05, tau=8.0), mode="leaky", max_interval=16), optax.adam(1e-3))
  st = tx.init(_params())
  for s in range(3):
    o, st = jax.jit(tx.update)(_grads(s), st, _params())
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(o))
  assert isinstance(st[0].inner_state, StalenessTopkState)
  assert float(st[0].total_bytes) == float(st[0].inner_state.total_bytes) > 0


def test_staleness_topk_bad_input():
  from mlsys_jax.comm.adaptive_ef import staleness_topk
  for r in (0.0, 1.0, -0.1, 1.5, True, "0.1", float("nan")):
    with pytest.raises(ValueError, match="ratio"):
      staleness_topk(r)
  for t in (0.0, -1.0, float("nan"), True, "8", None):
    with pytest.raises(ValueError, match="tau"):
      staleness_topk(0.1, tau=t)
  with pytest.raises(TypeError, match="axis_name"):
    staleness_topk(0.1, axis_name=0)
  with pytest.raises(TypeError, match="floating"):
    staleness_topk(0.1).init({"w": jnp.zeros(3, jnp.int32)})
  tx = staleness_topk(0.1)
  st = tx.init(_params())
  with pytest.raises(ValueError, match="shape"):
    tx.update({**_grads(0), "bias": jnp.zeros(11)}, st)
  with pytest.raises(NameError, match="not bound"):
    staleness_topk(0.1, axis_name="d").update(_grads(0), st)
