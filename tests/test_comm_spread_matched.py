"""comm.adaptive_ef.spread_releases(mode='matched'): each release B arriving T steps after the coordinate's
previous one is delivered linearly over S = clip(round(scale * B^2 / T), 1, min(T, max_interval)) steps from
step ``start`` on (at once before it, and from ``until`` on). Checked against a float64 numpy reference of the
delivery schedule (on scripted releases through a pass-through compressor, and on a float64 numpy Top-k with
error feedback over 8 workers under shard_map and pmap), conservation of the released mass, identical
replicas, bytes = the compressor's, non-finite releases, jit, a chain with the 0.1% recipe and Adam, and bad
input."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import density_warmup, topk
from mlsys_jax.comm.adaptive_ef import SpreadState, rms_selection, spread_releases

from _np_ref import topk_error_feedback as _np_topk_ef  # tests/_np_ref.py
from _trees import grads as _grads, params as _params  # tests/_trees.py

_W = 8
_STEPS = 12
_RATIO = 0.02


def _np_matched(b, max_interval=None, scale=1.0, start=0, until=None, noise=0.0, consistent=False):
  """float64 numpy reference of mode='matched', coordinate by coordinate: b (steps, n) released values ->
  delivered outputs (steps, n), the pending mass after the last step and the spread S chosen at each release
  (steps, n; 0 where nothing was released)."""
  steps, n = b.shape
  last, pending, rate, left = np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n, int)
  outs, chosen = np.zeros((steps, n)), np.zeros((steps, n), int)
  for t in range(steps):
    for i in range(n):
      if b[t, i] != 0:
        gap = max(t - last[i], 1)
        hi = gap if max_interval is None else min(gap, max_interval)
        s = int(min(max(np.round(scale * b[t, i] ** 2 / gap), 1), hi)) if np.isfinite(b[t, i]) else 1
        if t < start or (until is not None and t >= until):
          s = 1
        if consistent and not (rate[i] != 0 and np.sign(b[t, i]) == np.sign(rate[i])):
          s = 1   # the sign gate: only a release in the direction of the previous delivery is spread
        pending[i] += b[t, i]
        rate[i], left[i], last[i], chosen[t, i] = pending[i] / s, s, t, s
      live = left[i] > 0
      o = rate[i] if left[i] > 1 else (pending[i] if left[i] == 1 else 0.0)
      left[i] = max(left[i] - 1, 0)
      pending[i] -= o
      outs[t, i] = o + (((1 if t % 2 == 0 else -1) * noise) if live and noise else 0.0)
  return outs, pending, chosen


class _PassState(NamedTuple):
  bytes_sent: jax.Array
  total_bytes: jax.Array


def _pass_through():
  """A 'compressor' that releases its input unchanged (4 bytes per nonzero entry): drives the wrapper with
  scripted releases."""
  def init(params):
    del params
    return _PassState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def update(u, s, p=None):
    del p
    nb = 4.0 * sum(jnp.sum(x != 0).astype(jnp.float32) for x in jax.tree_util.tree_leaves(u))
    return u, _PassState(nb, s.total_bytes + nb)
  return optax.GradientTransformation(init, update)


def _scripted(tx, b):
  """All steps of ``tx`` (jit, one lax.scan) on releases b (steps, n) as one leaf {'w': (n,)}."""
  def run(bs):
    st, outs = jax.lax.scan(lambda st, x: tx.update({"w": x}, st)[::-1], tx.init({"w": bs[0]}), bs)
    return outs["w"], st
  return jax.jit(run)(jnp.asarray(b, jnp.float32))


def _script():
  """Releases chosen so that every branch of S is taken: B^2 / T below 1 (at once), between 1 and T, above T
  (S = T), above the cap; intervals 1 to 9, releases during a delivery, and a coordinate never released."""
  rng = np.random.default_rng(0)
  steps, n = 40, 12
  b = np.zeros((steps, n))
  for i in range(n - 1):
    every = 1 + i % 9
    for t in range(i % 3, steps, every):
      b[t, i] = rng.choice([-1, 1]) * rng.choice([0.3, 1.2, 2.5, 4.0, 7.0]) * np.sqrt(every) ** rng.choice([1, 2])
  return b


@pytest.mark.parametrize("kw", [dict(), dict(max_interval=3), dict(max_interval=None, scale=4.0),
                                dict(max_interval=5, scale=0.5, start=7),
                                dict(max_interval=None, scale=2.0, start=4, until=25, noise=0.25),
                                dict(max_interval=6, scale=4.0, start=3, consistent=True)])
def test_scripted_schedule_equals_float64_reference(kw):
  b = _script()
  outs, st = _scripted(spread_releases(_pass_through(), mode="matched", **kw), b)
  ref, pending, chosen = _np_matched(b, **{"max_interval": 100, **kw})
  np.testing.assert_allclose(np.asarray(outs), ref, rtol=1e-5, atol=1e-5, err_msg=str(kw))
  np.testing.assert_allclose(np.asarray(st.pending["w"]), pending, rtol=1e-5, atol=1e-5)
  # the script exercises both ends of the clip: at once (S = 1) and a real spread (S > 1) after `start`
  after = chosen[kw.get("start", 0):kw.get("until") or None]
  assert (after == 1).sum() > 0 and (after > 1).sum() > 0
  if kw.get("max_interval") == 3:
    assert after.max() == 3
  assert float(st.total_bytes) == 4.0 * np.count_nonzero(b)   # the wrapper sends nothing itself


def test_mass_is_conserved_and_pending_empties():
  """delivered + pending == released, step by step and coordinate by coordinate; pending is 0 wherever no
  delivery is running; after the releases stop, everything has been delivered."""
  b = np.concatenate([_script(), np.zeros((10, 12))])   # 10 quiet steps: every delivery (S <= 9) ends
  tx = spread_releases(_pass_through(), mode="matched", max_interval=None, scale=3.0, start=2)
  outs, st = _scripted(tx, b)
  outs = np.asarray(outs, np.float64)
  np.testing.assert_allclose(outs.sum(0), b.sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(st.left["w"]), 0)
  np.testing.assert_allclose(np.asarray(st.pending["w"]), 0.0, atol=1e-4)
  # step by step: the running sums differ by what is pending, never negative in count of steps
  cum_gap = np.cumsum(b, 0) - np.cumsum(outs, 0)
  assert np.abs(cum_gap).max() > 1.0          # a real spread happened (mass in flight)
  ref, _, _ = _np_matched(b, max_interval=None, scale=3.0, start=2)
  np.testing.assert_allclose(cum_gap, np.cumsum(b, 0) - np.cumsum(ref, 0), rtol=1e-4, atol=1e-4)


def test_hand_computed_case():
  """One coordinate: 6.0 at step 0 (T = 1: at once), 6.0 at step 4 (T = 4, 36 / 4 = 9 -> capped at 4: 1.5 for
  4 steps), -1.0 at step 10 (T = 6, 1 / 6 -> S = 1); with start=5 the release of step 4 goes at once."""
  b = np.zeros((12, 1))
  b[0, 0], b[4, 0], b[10, 0] = 6.0, 6.0, -1.0
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched", max_interval=None), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0, 1.5, 1.5, 1.5, 1.5, 0, 0, -1, 0])
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched", max_interval=2), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0, 3, 3, 0, 0, 0, 0, -1, 0])
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched", start=5), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0, 6, 0, 0, 0, 0, 0, -1, 0])
  # scale 0.25: 0.25 * 36 / 4 = 2.25 -> S = 2
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched", scale=0.25), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0, 3, 3, 0, 0, 0, 0, -1, 0])


def test_consistent_spreads_only_releases_that_keep_the_direction():
  """consistent=True: 6.0 at step 0 (first release: at once), +6.0 at step 4 (same sign as the last delivery:
  spread over 4), -6.0 at step 8 (reverses: at once, with nothing left pending), -6.0 at step 12 (spread)."""
  b = np.zeros((16, 1))
  b[0, 0], b[4, 0], b[8, 0], b[12, 0] = 6.0, 6.0, -6.0, -6.0
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched", consistent=True), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0] + [1.5] * 4 + [-6, 0, 0, 0] + [-1.5] * 4)
  outs, _ = _scripted(spread_releases(_pass_through(), mode="matched"), b)   # without the gate: all spread
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [6, 0, 0, 0] + [1.5] * 4 + [-1.5] * 4 + [-1.5] * 4)


def test_release_during_a_delivery_respreads_what_is_pending():
  """8.0 at step 3 (T = 4, 64 / 4 = 16 -> S = 4: 2.0 per step), then 0.5 at step 5 (T = 2, 0.125 -> S = 1):
  the 4.0 still pending plus 0.5 is delivered at once."""
  b = np.zeros((8, 1))
  b[3, 0], b[5, 0] = 8.0, 0.5
  outs, st = _scripted(spread_releases(_pass_through(), mode="matched"), b)
  np.testing.assert_allclose(np.asarray(outs)[:, 0], [0, 0, 0, 2, 2, 4.5, 0, 0])
  assert float(st.pending["w"][0]) == 0.0


def test_nonfinite_release_reaches_the_optimizer_at_once():
  for bad in (np.nan, np.inf):
    b = np.zeros((6, 2))
    b[1], b[4] = [8.0, 8.0], [bad, 1.0]
    outs, _ = _scripted(spread_releases(_pass_through(), mode="matched"), b)
    o = np.asarray(outs)
    assert not np.isfinite(o[4, 0])             # delivered on its own step, not held in pending
    np.testing.assert_allclose(o[:, 1], [0, 4, 4, 0, 1, 0])   # 8 after T = 2: S = 2; 1 after T = 3: S = 1
  # a finite release whose square overflows float32 is spread over the cap, not lost
  b = np.zeros((6, 1))
  b[3, 0] = 3e19
  o = np.asarray(_scripted(spread_releases(_pass_through(), mode="matched", max_interval=2), b)[0])[:, 0]
  np.testing.assert_allclose(o, [0, 0, 0, 1.5e19, 1.5e19, 0], rtol=1e-6)


# --- Top-k with error feedback over 8 workers: shard_map and pmap -----------------------------------------

def _worker_grads():
  per = [[_grads(1000 + 37 * s + w) for s in range(_STEPS)] for w in range(_W)]
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(_W, _STEPS, *x[0].shape),
                                *[g for row in per for g in row])


def _flat(tree, lead):
  return np.concatenate([np.asarray(x, np.float64).reshape(*lead, -1) for x in jax.tree_util.tree_leaves(tree)],
                        axis=-1)


_TOPK_VARIANTS = {"scale8_cap4": dict(max_interval=4, scale=8.0),
                  "scale2_start3": dict(max_interval=None, scale=2.0, start=3),
                  "scale8_consistent": dict(max_interval=None, scale=8.0, start=1, consistent=True)}


def _run(g, axis):
  res = {"bare": None}
  for name in ("bare",) + tuple(_TOPK_VARIANTS):
    tx = topk(_RATIO, axis_name=axis)
    if name != "bare":
      tx = spread_releases(tx, mode="matched", **_TOPK_VARIANTS[name])
    res[name] = jax.lax.scan(lambda st, gs, tx=tx: tx.update(gs, st)[::-1], tx.init(_params()), g)[::-1]
  return res


@pytest.fixture(scope="module")
def topk_runs(devices):
  g_w = _worker_grads()
  mesh = Mesh(np.array(devices), ("d",))
  by_sm = jax.jit(shard_map(lambda gw: jax.tree_util.tree_map(lambda x: x[None], _run(
      jax.tree_util.tree_map(lambda x: x[0], gw), "d")), mesh=mesh, in_specs=(P("d"),), out_specs=P("d"),
      check_vma=False))(g_w)
  by_pmap = jax.pmap(lambda g: _run(g, "d"), axis_name="d", devices=devices)(g_w)
  return g_w, by_sm, by_pmap


def test_topk_shard_map_equals_reference_and_replicas_are_identical(topk_runs):
  g_w, by_sm, by_pmap = topk_runs
  b = _np_topk_ef(_flat(g_w, (_W, _STEPS)), _RATIO)
  np.testing.assert_allclose(_flat(by_sm["bare"][0], (_W, _STEPS))[0], b, rtol=1e-5, atol=1e-6)
  for name, kw in _TOPK_VARIANTS.items():
    outs, st = by_sm[name]
    ref, pending, chosen = _np_matched(b, **{"max_interval": 100, **kw})
    assert (chosen > 1).sum() > 0 and (chosen == 1).sum() > 0, name   # both kinds of release occur
    got = _flat(outs, (_W, _STEPS))
    for w in range(_W):
      np.testing.assert_array_equal(got[w], got[0])                  # replicas bitwise identical
      np.testing.assert_allclose(got[w], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(_flat(st.pending, (_W,)), np.broadcast_to(_flat(st.pending, (_W,))[0],
                                                                              (_W, ref.shape[1])))
    np.testing.assert_allclose(_flat(st.pending, (_W,))[0], pending, rtol=1e-5, atol=1e-6)
    # mass: delivered + pending == released
    np.testing.assert_allclose(got[0].sum(0) + _flat(st.pending, (_W,))[0], b.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st.total_bytes, by_sm["bare"][1].total_bytes)   # no bytes of its own
    assert float(st.releases[0]) == float(np.count_nonzero(b))
    # pmap gives the same as shard_map
    np.testing.assert_allclose(_flat(by_pmap[name][0], (_W, _STEPS)), got, rtol=1e-6, atol=1e-7)


def test_chain_with_the_recipe_and_adam():
  """The 0.1% recipe's shape (density_warmup with rms_selection from stage 1) inside the matched spread
  from the switch step, before optax.adam: runs under jit, stays finite, and releases before ``start`` are
  delivered at once (nothing pending at the switch)."""
  c = density_warmup(lambda r: topk(r, precondition=rms_selection(r < 0.1)), 0.02, steps=4, ratios=[0.1, 0.05])
  tx = optax.chain(spread_releases(c, mode="matched", max_interval=8, scale=8.0, start=2), optax.adam(1e-3))
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for t in range(8):
    upd, state = step(_grads(t), state, params)
    params = optax.apply_updates(params, upd)
    if t == 1:
      assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(state[0].pending))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
  assert isinstance(state[0], SpreadState) and int(state[0].step) == 8


def test_bad_input():
  c = topk(0.1)
  for bad in (0, 0.0, -1.0, float("nan"), float("inf"), True, "8"):
    with pytest.raises(ValueError, match="scale"):
      spread_releases(c, mode="matched", scale=bad)
  for bad in (-1, 1.5, "3", True):
    with pytest.raises((ValueError, TypeError), match="start"):
      spread_releases(c, mode="matched", start=bad)
  for mode in ("linear", "leaky", "hold", "rate"):
    with pytest.raises(ValueError, match="mode='matched'"):
      spread_releases(c, mode=mode, scale=2.0)
    with pytest.raises(ValueError, match="mode='matched'"):
      spread_releases(c, mode=mode, start=3)
    with pytest.raises(ValueError, match="mode='matched'"):
      spread_releases(c, mode=mode, consistent=True)
  with pytest.raises(TypeError, match="consistent"):
    spread_releases(c, mode="matched", consistent=1)
  with pytest.raises(ValueError, match="until"):
    spread_releases(c, mode="matched", start=10, until=10)
  with pytest.raises(ValueError, match="max_interval"):
    spread_releases(c, mode="matched", max_interval=0)
  with pytest.raises(ValueError, match="mode"):
    spread_releases(c, mode="matching")
  with pytest.raises(TypeError, match="compressor"):
    spread_releases(lambda g: g, mode="matched")
