"""Review fixes (session 40) of the leaf writers and the level handoff kernel of :mod:`mlsys_jax.comm._pallas_pack`
(Pallas interpret mode on CPU):

- :func:`write_sent` and :func:`write_leaves` with an empty leaf among non-empty ones: the kernels had an output
  (and, with ``old``, an input) of size 0, which the Pallas interpreter cannot take (it failed while tracing); the
  empty leaves are now taken out of the kernels and get empty arrays.
- :func:`kth_blocks` with a 0-d ``block_max``: its named ``ValueError`` (was an ``IndexError`` from ``shape[0]``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

bits = lambda x: np.asarray(x, np.float32).view(np.int32)


def _case():
  """A 300-entry buffer with integer values (ties at every threshold), leaves of 0, 10, 130 and 1 entries (empty
  ones first, between and last), per-leaf thresholds and tie cuts, a last packed index inside the 130-entry leaf."""
  rng = np.random.default_rng(0)
  flat = np.round(rng.normal(size=300) * 2).astype(np.float32)
  bmax = np.abs(np.pad(flat, (0, 20))).reshape(-1, pp.BLOCK).max(axis=1)
  sizes = [0, 10, 0, 0, 130, 1, 0]
  offs = [0, 0, 10, 10, 10, 140, 141]
  t = np.asarray([9, 2, 9, 9, 3, 0.5, 9], np.float32)
  tie = np.asarray([0, 5, 0, 0, 60, 200, 0], np.int32)
  old = [rng.normal(size=n).astype(np.float32) for n in sizes]
  return flat, bmax, sizes, offs, t, tie, 120, old


def _want(flat, sizes, offs, t, tie, last, old, finite):
  """numpy: every leaf's output and residual."""
  outs, ress = [], []
  for i, (n, o) in enumerate(zip(sizes, offs)):
    v = flat[o:o + n]
    a, p = np.abs(v), o + np.arange(n)
    sent = ((a > t[i]) | ((a == t[i]) & (p <= tie[i]))) & (p <= last)
    outs.append(np.where(sent, v, np.float32(0)) if finite else np.zeros(n, np.float32))
    ress.append(np.where(sent, np.float32(0), v) if finite else old[i])
  return outs, ress


@pytest.mark.parametrize("finite", [True, False])
def test_write_sent_with_empty_leaves(finite):
  flat, bmax, sizes, offs, t, tie, last, old = _case()
  want, _ = _want(flat, sizes, offs, t, tie, last, old, finite)
  for group in (96, 2):
    got = pp.write_sent(jnp.asarray(flat), sizes, offs, t, tie, last, finite, jnp.asarray(bmax), interpret=True,
                        group=group)
    assert [g.shape for g in got] == [(n,) for n in sizes]
    for g, w in zip(got, want):
      np.testing.assert_array_equal(bits(g), bits(w))


@pytest.mark.parametrize("in_place", [False, True])
def test_write_leaves_with_empty_leaves(in_place):
  flat, bmax, sizes, offs, t, tie, last, old = _case()
  for finite in (True, False):
    want_o, want_r = _want(flat, sizes, offs, t, tie, last, old, finite)
    outs, ress = pp.write_leaves(jnp.asarray(flat), sizes, offs, t, tie, last, finite, [jnp.asarray(o) for o in old],
                                 in_place=in_place, interpret=True, group=3)
    assert [o.shape for o in outs] == [r.shape for r in ress] == [(n,) for n in sizes]
    for g, w in zip(outs + ress, want_o + want_r):
      np.testing.assert_array_equal(bits(g), bits(w))
  _, ress = pp.write_leaves(jnp.asarray(flat), sizes, offs, t, tie, last, True, write_out=False, interpret=True)
  for g, w in zip(ress, _want(flat, sizes, offs, t, tie, last, old, True)[1]):
    np.testing.assert_array_equal(bits(g), bits(w))


def test_kth_blocks_refuses_a_scalar_block_max_by_name():
  with pytest.raises(ValueError, match="1-D"):
    pp.kth_blocks(jnp.float32(1.0), 1.0, 1, 4)


def _selects_after(jaxpr, prim_name: str) -> int:
  """Number of selects (``select_n``, or ``jnp.where``'s ``jit`` of name ``_where``) of the top-level jaxpr that read an
  output of a ``prim_name`` call (through reshapes and dtype conversions)."""
  made, n = set(), 0
  var = lambda v: type(v).__name__ != "Literal"   # (jax.core.Literal moved between jax versions)
  reads = lambda eqn: any(id(v) in made for v in eqn.invars if var(v))
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == prim_name:
      made.update(id(v) for v in eqn.outvars)
    elif name in ("reshape", "convert_element_type") and reads(eqn):
      made.update(id(v) for v in eqn.outvars)
    elif (name == "select_n" or (name in ("jit", "pjit") and eqn.params.get("name") == "_where")) and reads(eqn):
      n += 1
  return n


def test_flat_state_pallas_outputs_are_not_selected_again(monkeypatch):
  """``sparse._FLAT_OUT = "pallas"``: write_sent already writes zeros on a non-finite step, so the update does not
  apply ``where(finite, out, 0)`` to each leaf afterwards (on an H100 that was one extra read+write kernel per leaf,
  161 kernels, and made the switch slower than XLA's writer: benchmarks/results/sidco_tree_h100_s40a.json); the
  outputs are still the XLA writer's bitwise, on a NaN step too."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  monkeypatch.setattr(sp, "_FLAT_OUT", "pallas")
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,)), "c": jnp.ones((5, 5, 3))}
  tx = sp.sidco(0.02, flat_state=True)
  jaxpr = jax.make_jaxpr(tx.update)(g, tx.init(g)).jaxpr
  assert any(e.primitive.name == "pallas_call" for e in jaxpr.eqns)
  assert _selects_after(jaxpr, "pallas_call") == 0
  nan = {k: v.at[(0,) * v.ndim].set(jnp.nan) for k, v in g.items()}
  out, state = jax.jit(tx.update)(nan, tx.init(g))
  assert all(np.all(np.asarray(o) == 0) for o in jax.tree_util.tree_leaves(out))
  assert int(state.nonfinite_steps) == 1
