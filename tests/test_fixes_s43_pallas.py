"""Review fixes (session 43) of :mod:`mlsys_jax.comm._pallas_pack` (Pallas interpret mode on CPU):

- :func:`zero_sent`: a sent entry at flat position 0 was left unzeroed in the interpreter. Its masked store sent
  the masked-off lanes to index 0, and the interpreter's masked store writes every lane (the masked-off ones with
  the value they read), so those lanes wrote ``flat[0]`` back over the zero. The store now uses the positions
  themselves (always in range; on the GPU the index is unchanged).
- :func:`tile_counts_above` with ``block_max`` (the block skip): a block whose maximum is NaN was skipped, so its
  other entries above a threshold were not counted, and a NaN among a tile's thresholds made the tile's smallest
  threshold NaN, so no block was read and every threshold counted 0. Both now count what the kernel without the
  skip counts (NaN entries and NaN thresholds never count).
- :func:`sum_leaves` with an empty leaf among non-empty ones: the empty leaf's operand (size 0) made the Pallas
  interpreter fail (``ZeroDivisionError``); empty leaves are now left out of the kernels (they hold no position).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

TILE = pp.THR_BLOCKS * pp.BLOCK
bits = lambda x: np.asarray(x, np.float32).view(np.int32)


def _bmax(flat):
  a = np.abs(np.asarray(flat, np.float32))
  return a.reshape(-1, pp.BLOCK).max(axis=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_sent_zeroes_a_sent_entry_at_position_0(dtype):
  flat = np.zeros(2 * TILE, np.float32)
  flat[[0, 1, 5, TILE, TILE + 3]] = [5.0, 1.0, -3.0, 7.0, 2.0]
  flat = jnp.asarray(flat, dtype)
  old = jnp.full(flat.shape, 9.0, dtype)
  t, tie, last = np.float32(2.0), 3, 2 * TILE
  got = pp.zero_sent(flat, t, tie, last, True, jnp.asarray(_bmax(flat)), old, interpret=True)
  f = np.asarray(flat, np.float32)
  p = np.arange(f.shape[0])
  a = np.abs(f)
  sent = ((a > t) | ((a == t) & (p <= tie))) & (p <= last)
  want = np.where(sent, np.float32(0), f)
  np.testing.assert_array_equal(bits(np.asarray(got, np.float32)), bits(want))
  assert float(got[0]) == 0.0   # (was 5.0: the sent entry 0 written back)


def test_tile_counts_above_block_skip_counts_as_without_it_with_nan():
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=2 * TILE) * 3).astype(np.float32)
  x[10] = np.nan                          # block 0 of tile 0: its maximum is NaN
  thr = np.asarray([[1.0, 2.0], [np.nan, 1.0]], np.float32)   # tile 1: a NaN threshold among them
  a = np.abs(x).reshape(2, TILE)
  want = (a[:, :, None] > thr[:, None, :]).sum(axis=1)
  bm = jnp.asarray(_bmax(x))
  plain = pp.tile_counts_above(jnp.asarray(x), jnp.asarray(thr), interpret=True)
  skip = pp.tile_counts_above(jnp.asarray(x), jnp.asarray(thr), bm, interpret=True)
  np.testing.assert_array_equal(np.asarray(plain), want)
  np.testing.assert_array_equal(np.asarray(skip), want)


def test_sum_leaves_with_empty_leaves():
  rng = np.random.default_rng(1)
  sizes = [0, 10, 0, 0, 130, 1, 0]
  adds = [jnp.asarray(rng.normal(size=n).astype(np.float32)) for n in sizes]
  ress = [jnp.asarray(rng.normal(size=n).astype(np.float32)) for n in sizes]
  n_real = sum(sizes)
  shift, limit = np.zeros(1, np.int64), np.full(1, n_real, np.int64)
  want = np.zeros(TILE, np.float32)
  want[:n_real] = np.concatenate([np.asarray(a) + np.asarray(r) for a, r in zip(adds, ress)])
  ref = pp.tile_stats(jnp.asarray(want), interpret=True, tile_blocks=pp.THR_BLOCKS)
  for res in (ress, jnp.concatenate(ress)):   # (leaves, and flat_state's one vector)
    flat, s1, s2, bm = pp.sum_leaves(adds, res, shift, limit, interpret=True)
    np.testing.assert_array_equal(bits(flat), bits(want))
    for g, w in zip((s1, s2, bm), ref):
      np.testing.assert_array_equal(bits(g), bits(w))
