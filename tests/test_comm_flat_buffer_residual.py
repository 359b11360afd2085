"""sidco(flat_state=True)'s residual kept in the padded buffer (``sparse._FLAT_KEPT = "buffer"``): the new residual
is the buffer with its sent entries zeroed in its own memory (:func:`_pallas_pack.zero_sent`), against numpy and
against the default writers bitwise in the real entries (Pallas interpret mode on CPU); the padding stays zero."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps  # tests/_trees.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

bits = lambda x: np.asarray(x).view(np.int32)
TILE = pp.THR_BLOCKS * pp.BLOCK


def _case(seed: int, n_real: int, tiles: int):
  """A padded one-segment buffer of integers (ties at the threshold 3) and an old residual, zero past ``n_real``."""
  rng = np.random.default_rng(seed)
  flat = np.zeros(tiles * TILE, np.float32)
  flat[:n_real] = np.round(rng.normal(size=n_real) * 1.6)
  old = np.zeros_like(flat)
  old[:n_real] = rng.normal(size=n_real)
  return flat, old, np.abs(flat).reshape(-1, pp.BLOCK).max(axis=1)


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("tie,last", [(5000, 9000), (-1, 20000), (3 * TILE, -1)])
def test_zero_sent_is_the_new_residual(finite, tie, last):
  """``where(finite, where(sent, 0, flat), old)`` in numpy: above 3, ties at 3 up to the tie cut, nothing past the
  last packed index (-1: nothing sent); a non-finite step gives the old residual back."""
  flat, old, bmax = _case(0, 2 * TILE + 1234, 3)
  got = pp.zero_sent(jnp.asarray(flat), jnp.float32(3.0), jnp.int32(tie), jnp.int32(last), jnp.asarray(finite),
                     jnp.asarray(bmax), jnp.asarray(old))
  p = np.arange(flat.shape[0])
  a = np.abs(flat)
  sent = ((a > 3) | ((a == 3) & (p <= tie))) & (p <= last)
  want = np.where(sent, 0, flat) if finite else old
  np.testing.assert_array_equal(bits(got), bits(want.astype(np.float32)))
  if finite and last >= 0:
    assert 0 < sent.sum() < flat.shape[0] // 2


def test_zero_sent_reads_only_blocks_that_reach_the_threshold():
  """An entry in a block whose given maximum is below the threshold is never written: the kernel trusts the
  block maxima (what makes it read a few percent of the buffer), so a block maximum set below its true value
  leaves that block's large entries in place."""
  flat, old, bmax = _case(1, TILE, 1)
  flat[:64] = 10.0
  bmax[0] = 1.0   # (a stale maximum for block 0: its entries are not candidates)
  got = np.asarray(pp.zero_sent(jnp.asarray(flat), jnp.float32(3.0), jnp.int32(-1), jnp.int32(TILE),
                                jnp.asarray(True), jnp.asarray(bmax), jnp.asarray(old)))
  np.testing.assert_array_equal(got[:64], flat[:64])
  assert np.all(got[64:][np.abs(flat[64:]) > 3] == 0)


def test_zero_sent_bad_input():
  flat, old, bmax = _case(2, TILE, 1)
  f, o, b = jnp.asarray(flat), jnp.asarray(old), jnp.asarray(bmax)
  args = (jnp.float32(1.0), jnp.int32(-1), jnp.int32(10), jnp.asarray(True))
  with pytest.raises(ValueError, match="whole tiles"):
    pp.zero_sent(f[:100], *args, b, o[:100])
  with pytest.raises(ValueError, match="old must be"):
    pp.zero_sent(f, *args, b, o[:-64])
  with pytest.raises(ValueError, match="block_max"):
    pp.zero_sent(f, *args, b[:-1], o)
  with pytest.raises(ValueError, match="one segment"):
    pp.zero_sent(f, jnp.ones(2), jnp.int32(-1), jnp.int32(10), jnp.asarray(True), b, o)


def _run(monkeypatch, kept, seed=3, **kw):
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  monkeypatch.setattr(sp, "_FLAT_KEPT", kept)
  return nan_and_tie_steps(sp.sidco(0.02, flat_state=True, **kw), seed)


@pytest.mark.parametrize("build,kw", [("pallas", {}), ("xla", {}), ("pallas", {"momentum": 0.9}), ("dus", {})],
                         ids=["pallas", "xla", "momentum", "dus"])
def test_buffer_residual_is_bitwise_the_default(build, kw, monkeypatch):
  """Every output bitwise the default writers', over a NaN step (nothing sent, residual kept) and steps with ties at
  the cut; the residual's real entries bitwise the default's, its padding zero; the kernel runs with the Pallas
  build, the XLA form of the same selection with XLA's (and with momentum, whose velocity keeps the real layout)."""
  ref = _run(monkeypatch, "xla", **kw)
  if build == "dus":   # (the buffer written leaf by leaf, _FLAT_BUILD = "dus": its residual padded afterwards)
    monkeypatch.setattr(sp, "_FLAT_BUILD", "dus")
  monkeypatch.setattr(sp, "_SUM_BUILD", build if build != "dus" else "xla")
  calls = []
  real = pp.zero_sent
  monkeypatch.setattr(pp, "zero_sent", lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(sp, "_FLAT_KEPT", "buffer")
  got = nan_and_tie_steps(sp.sidco(0.02, flat_state=True, **kw), 3)
  assert bool(calls) == (build == "pallas" and not kw)   # (momentum: XLA's build, the velocity fused into it)
  n = ref[0][1].residual.shape[0]
  assert got[0][1].residual.shape == (sp._padded_size(n),)
  for (o_r, s_r), (o_g, s_g) in zip(ref, got):
    for x, y in zip(jax.tree_util.tree_leaves(o_r), jax.tree_util.tree_leaves(o_g)):
      np.testing.assert_array_equal(bits(x), bits(y))
    np.testing.assert_array_equal(bits(s_r.residual), bits(s_g.residual[:n]))
    assert not np.any(np.asarray(s_g.residual[n:]))
    for f in ("density", "bytes_sent", "nonfinite_steps", "overflow_steps", "stages", "velocity"):
      np.testing.assert_array_equal(np.asarray(getattr(s_r, f)), np.asarray(getattr(s_g, f)))
  assert int(got[-1][1].nonfinite_steps) == 1 and float(got[-1][1].density) > 0


def test_buffer_residual_with_the_pallas_output_writer_in_a_chain_with_adam(monkeypatch):
  """With ``_FLAT_OUT = "pallas"`` (the outputs read the buffer before it is overwritten) inside
  ``optax.chain(sidco, adam)``: the parameters after three steps bitwise the default writers'."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.normal(size=(50, 90)), jnp.float32), "b": jnp.asarray(rng.normal(size=70),
                                                                                        jnp.float32)}
  grads = [jax.tree_util.tree_map(lambda p, s=s: jnp.asarray(np.round(
      np.random.default_rng(s).normal(size=p.shape) * 2), jnp.float32), params) for s in range(3)]

  def train(kept, out):
    monkeypatch.setattr(sp, "_FLAT_KEPT", kept)
    monkeypatch.setattr(sp, "_FLAT_OUT", out)
    tx = optax.chain(sp.sidco(0.01, flat_state=True), optax.adam(1e-2))
    p, st = params, tx.init(params)

    @jax.jit
    def step(p, st, g):
      u, st = tx.update(g, st, p)
      return optax.apply_updates(p, u), st

    for g in grads:
      p, st = step(p, st, g)
    return p

  want = train("xla", "xla")
  got = train("buffer", "pallas")
  for x, y in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(bits(x), bits(y))


def test_buffer_residual_state_checks(monkeypatch):
  """The padded state belongs to the setting it was built with: an update under another setting (or a state of the
  other layout) raises, naming the setting; per tensor keeps the real layout."""
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,))}
  monkeypatch.setattr(sp, "_FLAT_KEPT", "buffer")
  tx = sp.sidco(0.02, flat_state=True)
  st = tx.init(g)
  assert st.residual.shape == (TILE,)
  assert sp.sidco(0.02, flat_state=True, per_tensor=True).init(g).residual.shape == (1240,)
  monkeypatch.setattr(sp, "_FLAT_KEPT", "xla")
  with pytest.raises(ValueError, match="_FLAT_KEPT"):
    tx.update(g, st)
  st_real = tx.init(g)
  monkeypatch.setattr(sp, "_FLAT_KEPT", "buffer")
  with pytest.raises(ValueError, match="_FLAT_KEPT = 'buffer' needs"):
    tx.update(g, st_real)


def test_buffer_residual_under_vmap_and_pmap_with_a_bad_worker(monkeypatch):
  """Under ``vmap`` (three independent workers) and under ``pmap`` with an axis (the outputs are then the
  all-gathered mean; worker 1's NaN step skipped by every replica): the same values as the default writers."""
  from _trees import pmap_one_bad_worker_under_modes, vmapped_under_modes  # tests/_trees.py
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  res = vmapped_under_modes(monkeypatch, sp, "_FLAT_KEPT", ("buffer", "xla"), lambda: sp.sidco(0.02, flat_state=True))
  (o_b, r_b), (o_x, r_x) = res["buffer"], res["xla"]
  n = r_x.shape[1]
  assert r_b.shape == (3, sp._padded_size(n))
  for x, y in zip(jax.tree_util.tree_leaves(o_b), jax.tree_util.tree_leaves(o_x)):
    np.testing.assert_array_equal(bits(x), bits(y))
  np.testing.assert_array_equal(bits(r_b[:, :n]), bits(r_x))
  res = pmap_one_bad_worker_under_modes(monkeypatch, sp, {m: {"_FLAT_KEPT": m} for m in ("buffer", "xla")},
                                        lambda: sp.sidco(0.02, flat_state=True, axis_name="d"), seed=6)
  for (o_b, s_b), (o_x, s_x) in zip(res["buffer"], res["xla"]):
    for x, y in zip(jax.tree_util.tree_leaves(o_b), jax.tree_util.tree_leaves(o_x)):
      np.testing.assert_array_equal(bits(x), bits(y))
    n = s_x.residual.shape[1]
    np.testing.assert_array_equal(bits(s_b.residual[:, :n]), bits(s_x.residual))
    assert not np.any(np.asarray(s_b.residual[:, n:]))


def test_zero_sent_lowers_for_triton_with_unread_arguments(monkeypatch):
  """The kernel lowers for CUDA (no GPU needed) with ``after`` arrays of several shapes passed unread: they order
  the kernel, and its loads and stores are masked (a finite step touches only candidate blocks)."""
  from _triton import triton_ir  # tests/_triton.py
  n = 2 * TILE
  f32 = jax.ShapeDtypeStruct((n,), jnp.float32)
  ir = triton_ir(lambda f, o, b, a1, a2: pp.zero_sent(f, jnp.float32(1.0), jnp.int32(-1), jnp.int32(n - 1),
                                                      jnp.asarray(True), b, o, after=(a1, a2), interpret=False),
                 f32, f32, jax.ShapeDtypeStruct((n // pp.BLOCK,), jnp.float32),
                 jax.ShapeDtypeStruct((30, 40), jnp.float32), jax.ShapeDtypeStruct((7,), jnp.bool_),
                 monkeypatch=monkeypatch)
  assert "tt.store" in ir and "tt.load" in ir
