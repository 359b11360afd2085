"""sidco(flat_state=True)'s one-segment writers (``sparse._FLAT_KEPT``, ``sparse._FLAT_OUT``): the new flat residual
from the padded buffer by :func:`_pallas_pack.kept_from_padded` (fresh or in place) and the per-leaf outputs by
:func:`_pallas_pack.write_sent` (reading only the blocks whose maximum reaches the threshold), against numpy and
against the XLA writers bitwise (Pallas interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps  # tests/_trees.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

bits = lambda x: np.asarray(x).view(np.int32)


def _case(seed: int, sizes):
  """One segment's padded buffer with ties at the threshold 3 (integers), a tie cut and a last packed index that
  both bite; block maxima of the buffer."""
  rng = np.random.default_rng(seed)
  lay = sp._Layout(sizes, sp._segments(sizes, False, 0.01, 16))
  real = np.round(rng.normal(size=lay.n_real) * 1.6).astype(np.float32)
  flat = np.asarray(lay.pad(jnp.asarray(real)))
  bmax = np.abs(flat).reshape(-1, pp.BLOCK).max(axis=1)
  tie = int(lay.n_real // 3)
  last = int(lay.n_real * 3 // 4)
  return lay, real, flat, bmax, np.float32(3.0), tie, last


def _sent(v, pos, t, tie, last):
  a = np.abs(v)
  return ((a > t) | ((a == t) & (pos <= tie))) & (pos <= last)


@pytest.mark.parametrize("finite", [True, False])
def test_write_sent_is_the_sent_entries(finite):
  """Every leaf's output: its sent entries (ties up to the cut, nothing past the last packed index), zeros elsewhere,
  and all zeros on a non-finite step; leaves that straddle blocks and tiles, a leaf of one entry, a 1-leaf group."""
  sizes = [100, 5000, 64, 7, 9000, 1, 4096, 33]
  lay, real, flat, bmax, t, tie, last = _case(1, sizes)
  nl = len(sizes)
  for group in (96, 3, 1):
    outs = pp.write_sent(jnp.asarray(flat), sizes, lay.offsets, jnp.full((nl,), t), jnp.full((nl,), tie), last,
                         finite, jnp.asarray(bmax), interpret=True, group=group)
    for i, (o, n) in enumerate(zip(outs, sizes)):
      off = lay.offsets[i]
      v = flat[off:off + n]
      want = np.where(_sent(v, off + np.arange(n), t, tie, last), v, np.float32(0)) if finite else np.zeros(n)
      np.testing.assert_array_equal(bits(o), bits(want.astype(np.float32)))
  assert 0 < int((np.abs(real) == t).sum())   # (ties at the threshold exist, on both sides of the cut)


def test_write_sent_reads_only_candidate_blocks():
  """Entries of blocks whose maximum is below the threshold are never read: a buffer with garbage (NaN) in a block
  whose stated maximum is low gives zeros there (the kernel trusts ``block_max``, as its docstring says)."""
  sizes = [4096, 200]
  lay, real, flat, bmax, t, tie, last = _case(2, sizes)
  flat = flat.copy()
  flat[64:128] = np.nan          # (block 1)
  bmax = bmax.copy()
  bmax[1] = 0.5                  # (said to be below t: not read)
  outs = pp.write_sent(jnp.asarray(flat), sizes, lay.offsets, jnp.full((2,), t), jnp.full((2,), tie), last, True,
                       jnp.asarray(bmax), interpret=True)
  assert not np.isnan(np.asarray(outs[0])).any()
  np.testing.assert_array_equal(np.asarray(outs[0])[64:128], 0)


def test_write_sent_bad_input():
  sizes = [10, 20]
  lay = sp._Layout(sizes, [[0, 1]])
  flat = jnp.zeros((lay.n_pad,))
  bmax = jnp.zeros((lay.n_pad // pp.BLOCK,))
  with pytest.raises(ValueError, match="one maximum per 64"):
    pp.write_sent(flat, sizes, lay.offsets, jnp.zeros(2), jnp.zeros(2, jnp.int32), 5, True, bmax[:-1])
  with pytest.raises(ValueError, match="same length"):
    pp.write_sent(flat, sizes, lay.offsets[:1], jnp.zeros(2), jnp.zeros(2, jnp.int32), 5, True, bmax)
  with pytest.raises(ValueError, match="inside flat"):
    pp.write_sent(flat[:16], sizes, lay.offsets, jnp.zeros(2), jnp.zeros(2, jnp.int32), 5, True, bmax[:1])
  with pytest.raises(ValueError, match="one entry per leaf"):
    pp.write_sent(flat, sizes, lay.offsets, jnp.zeros(3), jnp.zeros(2, jnp.int32), 5, True, bmax)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("finite", [True, False])
def test_kept_from_padded_one_segment_fresh_or_in_place(in_place, finite):
  """One segment (the flat residual of ``per_tensor=False``): the kept entries, 0 where sent; a non-finite step
  keeps the old residual, read by the fresh form, untouched by the in-place one."""
  sizes = [5000, 64, 7, 9000, 3]
  lay, real, flat, bmax, t, tie, last = _case(3, sizes)
  old = np.random.default_rng(4).normal(size=lay.n_real).astype(np.float32)
  got = pp.kept_from_padded(jnp.asarray(flat), lay.seg_n, lay.seg_start, jnp.asarray([t]), jnp.asarray([tie]), last,
                            finite, jnp.asarray(old), in_place=in_place, interpret=True)
  want = np.where(_sent(real, np.arange(lay.n_real), t, tie, last), np.float32(0), real) if finite else old
  np.testing.assert_array_equal(bits(got), bits(want))


_XLA_RUNS = {}   # the XLA writers' run by per_tensor, shared by the cases below (the same program and steps)


@pytest.mark.parametrize("kept,out,per_tensor", [("pallas", "pallas", False), ("pallas_inplace", "xla", False),
                                                 ("xla", "pallas", False), ("xla", "pallas", True)])
def test_flat_state_writers_are_bitwise_the_xla_writers(kept, out, per_tensor, monkeypatch):
  """sidco(flat_state=True) with the Pallas residual and/or output writers: every output and state bitwise the XLA
  writers', over a NaN step (skipped everywhere, residual kept) and a step with ties at the cut; the kernels run.
  Per tensor (padded segments, one threshold each) the residual is always the in-place kernel's; the output writer
  reads each leaf's segment threshold."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  res = {}
  for mode in ((kept, out), ("xla", "xla")):
    if mode == ("xla", "xla") and per_tensor in _XLA_RUNS:   # (the reference, once per layout)
      res[mode] = _XLA_RUNS[per_tensor]
      continue
    monkeypatch.setattr(sp, "_FLAT_KEPT", mode[0])
    monkeypatch.setattr(sp, "_FLAT_OUT", mode[1])
    res[mode] = nan_and_tie_steps(sp.sidco(0.02, flat_state=True, per_tensor=per_tensor), 5)
  _XLA_RUNS[per_tensor] = res[("xla", "xla")]
  for x, y in zip(jax.tree_util.tree_leaves(res[(kept, out)]), jax.tree_util.tree_leaves(res[("xla", "xla")])):
    np.testing.assert_array_equal(bits(x), bits(y))
  st = res[(kept, out)][2][1]
  assert int(st.nonfinite_steps) == 1 and float(st.density) > 0
  calls = []
  for name in ("kept_from_padded", "write_sent"):
    fn = getattr(pp, name)
    monkeypatch.setattr(pp, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
  monkeypatch.setattr(sp, "_FLAT_KEPT", kept)
  monkeypatch.setattr(sp, "_FLAT_OUT", out)
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,))}
  tx = sp.sidco(0.02, flat_state=True, per_tensor=per_tensor)
  jax.make_jaxpr(tx.update)(g, tx.init(g))
  assert ("write_sent" in calls) == (out != "xla")
  if not per_tensor:   # (per tensor the trace's segments decide: the kernel in place for several)
    assert ("kept_from_padded" in calls) == (kept != "xla")


def test_flat_writer_switches_are_checked(monkeypatch):
  monkeypatch.setattr(sp, "_FLAT_OUT", "kernel")
  g = {"a": jnp.ones((30, 40))}
  tx = sp.sidco(0.02, flat_state=True)
  with pytest.raises(ValueError, match="pallas"):
    tx.update(g, tx.init(g))
