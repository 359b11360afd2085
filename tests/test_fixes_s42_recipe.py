"""Regression tests for session 42's review of the recipe helpers (mlsys_jax/comm/warmup.py and
mlsys_jax/comm/adaptive_ef.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import topk
from mlsys_jax.comm.adaptive_ef import gradient_units, rms_selection, spread_releases

_SPREAD_MODES = (dict(mode="linear", max_interval=16), dict(mode="leaky", max_interval=16),
                 dict(mode="rate", max_interval=16), dict(mode="hold", max_interval=16),
                 dict(mode="matched", max_interval=16, scale=0.25), dict(mode="linear", noise=0.5),
                 dict(mode="leaky", floor=0.5))


@pytest.mark.parametrize("kw", _SPREAD_MODES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_spread_releases_skips_a_nonfinite_step(kw):
  """A step the compressor skips (NaN gradient: nonfinite_steps grows) is skipped by the wrapper too: output 0
  and last / pending / rate / left kept (before: it delivered what was pending, 2.0 on the first entry in
  'linear', and drained pending). Finite steps are unchanged (same outputs as without the skip logic)."""
  tx = spread_releases(topk(0.5), **kw)
  upd = jax.jit(tx.update)
  g = {"w": jnp.array([2.0, 1.5])}
  st = tx.init({"w": jnp.zeros(2)})
  for _ in range(3):
    _, st = upd(g, st)
  # a delivery is under way (the old code went on delivering it on the skipped step)
  assert np.any(np.asarray(st.pending["w"]) != 0) or np.any(np.asarray(st.left["w"]) != 0), kw
  o, st2 = upd({"w": jnp.array([jnp.nan, 1.5])}, st)
  assert int(st2.inner_state.nonfinite_steps) == 1
  np.testing.assert_array_equal(np.asarray(o["w"]), np.zeros(2))
  for name in ("last", "pending", "rate", "left"):
    np.testing.assert_array_equal(np.asarray(getattr(st2, name)["w"]), np.asarray(getattr(st, name)["w"]),
                                  err_msg=f"{name} {kw}")
  assert int(st2.step) == int(st.step) + 1
  o, st3 = upd(g, st2)   # the next finite step goes on
  assert np.all(np.isfinite(np.asarray(o["w"]))) and np.any(np.asarray(o["w"]) != 0)


def test_spread_releases_linear_delivers_the_whole_mass_after_a_skip():
  """'linear' is mass-exact: with a skipped step in the middle, the sum of the outputs plus what is pending
  equals the sum of the released aggregates (the skipped step releases nothing and delivers nothing)."""
  tx = spread_releases(topk(0.5), mode="linear", max_interval=16)
  upd = jax.jit(tx.update)
  st = tx.init({"w": jnp.zeros(2)})
  inner = topk(0.5)
  ist = inner.init({"w": jnp.zeros(2)})
  total_out, total_rel = np.zeros(2), np.zeros(2)
  for t in range(8):
    g = {"w": jnp.array([jnp.nan if t == 4 else 2.0, 1.5])}
    o, st = upd(g, st)
    b, ist = inner.update(g, ist)
    total_out += np.asarray(o["w"], np.float64)
    total_rel += np.asarray(b["w"], np.float64)
    if t == 4:
      np.testing.assert_array_equal(np.asarray(o["w"]), np.zeros(2))
  np.testing.assert_allclose(total_out + np.asarray(st.pending["w"], np.float64), total_rel, rtol=1e-6)


def test_spread_releases_one_bad_worker_skips_on_every_replica(devices):
  """8 workers under shard_map, a NaN on worker 2 at step 3: every replica outputs 0 on that step (before:
  the pending deliveries, non-zero) and all outputs are identical across the replicas."""
  mesh = Mesh(np.array(devices), ("d",))
  tx = spread_releases(topk(0.25, axis_name="d"), mode="leaky", max_interval=4, until=5)
  rng = np.random.default_rng(0)
  gs = rng.normal(size=(8, 6, 16)).astype(np.float32)
  gs[2, 3, 5] = np.nan

  def body(g):
    st = tx.init({"w": jnp.zeros(16)})
    outs = []
    for t in range(g.shape[1]):
      o, st = tx.update({"w": g[0, t]}, st)
      outs.append(o["w"])
    return jnp.stack(outs)[None], st.inner_state.nonfinite_steps[None]

  o, bad = jax.jit(shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d"))))(jnp.asarray(gs))
  o = np.asarray(o)
  np.testing.assert_array_equal(np.asarray(bad), np.ones(8))
  for w in range(8):
    np.testing.assert_array_equal(o[w], o[0])
  np.testing.assert_array_equal(o[:, 3], np.zeros((8, 16)))
  assert np.any(o[:, 4] != 0) and np.all(np.isfinite(o))


def test_gradient_units_rejects_an_axis_other_than_the_compressors(devices):
  """gradient_units(axis_name=None) around a compressor that aggregates over 'd': each replica scaled the shared
  aggregate by its own RMS factor and the replicas silently drifted apart (before: outputs differed across
  the 8 workers); now a ValueError at trace time naming the axis. The matching axis still works and gives
  identical replicas."""
  mesh = Mesh(np.array(devices), ("d",))
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)[:, None])

  def make(axis):
    tx = gradient_units(topk(0.25, axis_name="d", precondition=rms_selection(True)), 0, axis_name=axis)

    def body(x):
      st = tx.init({"w": jnp.zeros(16)})
      o, _ = tx.update({"w": x[0]}, st)
      return o["w"][None]
    return jax.jit(shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))

  with pytest.raises(ValueError, match="axis_name='d'"):
    make(None)(g)
  with pytest.raises(ValueError, match="axis_name='d'"):
    _raise_for_other_axis(mesh, g)
  o = np.asarray(make("d")(g))
  for w in range(8):
    np.testing.assert_array_equal(o[w], o[0])
  assert np.any(o[0] != 0)


def _raise_for_other_axis(mesh, g):
  """gradient_units over axis 'e' (bound, size 1) around a compressor over 'd': rejected too."""
  mesh2 = Mesh(np.array(mesh.devices).reshape(8, 1), ("d", "e"))
  tx = gradient_units(topk(0.25, axis_name="d", precondition=rms_selection(True)), 0, axis_name="e")

  def body(x):
    st = tx.init({"w": jnp.zeros(16)})
    o, _ = tx.update({"w": x[0]}, st)
    return o["w"][None]
  jax.jit(shard_map(body, mesh=mesh2, in_specs=P("d"), out_specs=P("d")))(g)


def test_gradient_units_one_device_unchanged():
  """One device, compressor without an axis, axis_name=None: still accepted (the docstring example)."""
  import optax
  tx = gradient_units(topk(0.5, precondition=optax.scale_by_rms(decay=0.0, eps=0.0)), 0, axis_name=None)
  s = tx.init({"w": jnp.zeros(2)})
  out, s = tx.update({"w": jnp.array([4.0, -2.0])}, s)
  np.testing.assert_allclose(np.asarray(out["w"]), [np.sqrt(10.0), 0.0], rtol=1e-6)
