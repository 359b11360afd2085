"""The speed paths of mlsys_jax.comm.sparse (issue 18 item 4) against their slow references: the W-way
threshold search (same bits as the 31-pass bisection and as the closed form: the float just below the
k-th largest magnitude), the Pallas per-tile multi-threshold count (interpret mode) against numpy, and the
flat error-compensated sum (two concatenations and one add) against the leafwise sums, bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp


def _segments_data(seed):
  rng = np.random.default_rng(seed)
  a = (np.abs(rng.standard_normal((3, 700))) * 10.0 ** rng.integers(-5, 3, (3, 1))).astype(np.float32)
  a[1, :690] = 0.0             # fewer non-zeros than k: the answer is 0
  a[2, 40:60] = a[2, 7]        # ties at (maybe) the cut
  return a


def _prev_kth(a, k):
  """Closed form of the exact search: the float just below the k-th largest (0 when that is 0)."""
  kth = np.sort(a, axis=1)[:, ::-1][np.arange(a.shape[0]), k - 1]
  return np.maximum(kth.view(np.int32) - 1, 0).view(np.float32)


@pytest.mark.parametrize("seed,ways", [(0, (4, 16)), pytest.param(1, (4, 16, 64, 256), marks=pytest.mark.slow)])
def test_search_ways_equal_bisection_and_closed_form(seed, ways):
  a = _segments_data(seed)
  k = np.array([37, 30, 15])
  aj, kj = jnp.asarray(a), jnp.asarray(k)
  top = jax.lax.bitcast_convert_type(jnp.asarray(a.max(1)), jnp.int32)
  counts = lambda tm: jnp.sum(aj[:, :, None] > tm[:, None, :], axis=1)
  ref_low = np.asarray(sp._search_bits(lambda tm: counts(tm) >= kj[:, None], top, True, ways=2))
  ref_high = np.asarray(sp._search_bits(lambda tm: counts(tm) <= kj[:, None], top, False, ways=2))
  np.testing.assert_array_equal(ref_low.view(np.int32), _prev_kth(a, k).view(np.int32))
  # the ceiling: the smallest threshold keeping at most k (the (k+1)-th largest, unless tied above)
  assert np.all(np.sum(a > ref_high[:, None], axis=1) <= k)
  below = np.maximum(ref_high.view(np.int32) - 1, 0).view(np.float32)
  assert np.all((np.sum(a > below[:, None], axis=1) > k) | (ref_high == 0))
  for w in ways:
    low = jax.jit(lambda: sp._search_bits(lambda tm: counts(tm) >= kj[:, None], top, True, ways=w))()
    high = sp._search_bits(lambda tm: counts(tm) <= kj[:, None], top, False, ways=w)
    np.testing.assert_array_equal(np.asarray(low).view(np.int32), ref_low.view(np.int32))
    np.testing.assert_array_equal(np.asarray(high).view(np.int32), ref_high.view(np.int32))


def test_search_ways_must_be_power_of_two():
  with pytest.raises(ValueError, match="power of two"):
    sp._search_bits(lambda tm: tm > 0, jnp.zeros((1,), jnp.int32), True, ways=12)


def test_tile_counts_above_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.standard_normal(3 * 4096).astype(np.float32)
  thr = np.abs(rng.standard_normal((3, 16))).astype(np.float32)
  thr[1, 3] = np.abs(x[4096 + 5])                      # a threshold equal to an entry: strict >
  c = pp.tile_counts_above(jnp.asarray(x), jnp.asarray(thr), interpret=True)
  ref = np.sum(np.abs(x).reshape(3, 4096, 1) > thr[:, None, :], axis=1)
  np.testing.assert_array_equal(np.asarray(c), ref)
  # skipping the blocks whose maximum is not above the tile's smallest threshold: the same counts
  thr2 = np.sort(np.abs(rng.standard_normal((3, 8))).astype(np.float32) + 2.6, axis=1)
  thr2[0, 0] = np.abs(x[100])                           # a block maximum equal to the smallest threshold
  bmax = np.abs(x).reshape(-1, 64).max(1)
  c2 = pp.tile_counts_above(jnp.asarray(x), jnp.asarray(thr2), jnp.asarray(bmax), interpret=True)
  np.testing.assert_array_equal(np.asarray(c2), np.sum(np.abs(x).reshape(3, 4096, 1) > thr2[:, None, :], axis=1))
  assert np.mean(bmax > thr2.min(1).repeat(64)) < 0.9   # (some blocks were skipped)
  with pytest.raises(ValueError, match="multiple of 4096"):
    pp.tile_counts_above(jnp.zeros(100), jnp.zeros((1, 16)), interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pp.tile_counts_above(jnp.zeros(4096), jnp.zeros((1, 12)), interpret=True)


@pytest.mark.parametrize("per_tensor,impls", [
    (True, ((2, "bisect"), (16, "xla"))),
    pytest.param(True, ((8, "pallas"),), marks=pytest.mark.slow),
    pytest.param(False, ((2, "bisect"), (16, "xla"), (8, "pallas")), marks=pytest.mark.slow)])
def test_seg_exact_is_closed_form_per_segment(per_tensor, impls, monkeypatch):
  """The exact-count fallback's thresholds on a flat buffer: just below each segment's k-th largest,
  for the bisection, the XLA W-way count and the Pallas count (interpret)."""
  rng = np.random.default_rng(3)
  sizes = [5000, 300, 9000]
  leaves = [jnp.asarray(rng.laplace(size=n).astype(np.float32)) for n in sizes]
  lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, 0.01, 1.0))
  flat = lay.flatten(leaves, jnp.float32)
  a_tiles = jnp.abs(flat).reshape(lay.num_tiles, sp._TILE)
  bmax = sp._block_stats(jnp.abs(flat))[2]
  k = np.array([max(1, round(0.01 * n)) for n in lay.seg_n])
  out = {}
  for ways, impl in impls:
    monkeypatch.setattr(sp, "_SEARCH_WAYS", ways)
    monkeypatch.setattr(sp, "_COUNT_IMPL", impl)
    # ("pallas" off GPU: the Triton kernel in the Pallas interpreter)
    out[(ways, impl)] = np.asarray(sp._seg_exact(a_tiles, bmax, lay, jnp.asarray(k, jnp.int32), flat))
    monkeypatch.undo()
  segs = [np.concatenate([np.abs(np.asarray(leaves[i])) for i in g]) for g in lay.groups]
  ref = np.array([_prev_kth(s[None], np.array([kk]))[0] for s, kk in zip(segs, k)])
  for key, t in out.items():
    np.testing.assert_array_equal(t.view(np.int32), ref.view(np.int32), err_msg=str(key))


def test_flat_sum_equals_leafwise_sum():
  rng = np.random.default_rng(4)
  a = {"x": jnp.asarray(rng.standard_normal((30, 7)), jnp.float32), "y": jnp.asarray(rng.standard_normal(5), jnp.float32)}
  r = {"x": jnp.asarray(rng.standard_normal((30, 7)), jnp.float32), "y": jnp.full((5,), jnp.inf, jnp.float32)}
  flat, unravel = sp._ravel_sum(a, r)
  ref = jnp.concatenate([(a["x"] + r["x"]).reshape(-1), a["y"] + r["y"]])
  np.testing.assert_array_equal(np.asarray(flat), np.asarray(ref))
  assert unravel(flat)["x"].shape == (30, 7)
  # mixed dtypes: each sum in its leaf's dtype (float16 overflow kept), then promoted
  a16 = {"x": a["x"], "y": jnp.full((5,), 60000.0, jnp.float16)}
  r16 = {"x": r["x"], "y": jnp.full((5,), 60000.0, jnp.float16)}
  flat16, _ = sp._ravel_sum(a16, r16)
  assert np.all(np.isinf(np.asarray(flat16)[-5:]))
  lay = sp._Layout([210, 5], [[0, 1]])
  got = sp._flat_sum(lay.flatten, jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(r), jnp.float32)
  want = lay.flatten([x + y for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(r))], jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _jitted_steps(tx, grads, fields):
  """Each step's output and the named state fields of ``tx`` run over ``grads`` with a jitted update."""
  st = tx.init(grads[0])
  up = jax.jit(tx.update)
  outs = []
  for g in grads:
    o, st = up(g, st)
    outs.append((o,) + tuple(getattr(st, f) for f in fields))
  return outs


@pytest.mark.parametrize("kw", [pytest.param(dict(per_tensor=True), marks=pytest.mark.slow),
                                pytest.param(dict(), marks=pytest.mark.slow),
                                pytest.param(dict(exact=False, max_fraction=1.0), marks=pytest.mark.slow)])
def test_transform_same_with_any_search(kw, monkeypatch):
  """Whole updates (the fallback searches run under lax.cond on the steps where the fit misses: Gaussian
  gradients under the exponential fit) are bitwise the same with the bisection and the 16-way search."""
  rng = np.random.default_rng(5)
  grads = [{"w": jnp.asarray(rng.standard_normal((40, 50)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(50) * 0.1, jnp.float32)} for _ in range(3)]
  res = []
  for ways in (2, 16):
    monkeypatch.setattr(sp, "_SEARCH_WAYS", ways)
    monkeypatch.setattr(sp, "_COUNT_IMPL", "xla")
    res.append(_jitted_steps(sp.sidco(0.01, **kw), grads, ("residual",)))
  for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(res[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("segments", [1, 4, 300])
def test_trim_sort_equals_three_key_sort(segments, monkeypatch):
  """The correction stage's order (segment, magnitude descending, slot) from stable one-key sorts equals
  the 3-key lexicographic sort, ties and zeros included."""
  rng = np.random.default_rng(6)
  cap = 2000
  seg = jnp.asarray(rng.integers(0, segments + 1, cap), jnp.int32)
  a = np.abs(rng.standard_normal(cap)).astype(np.float32)
  a[:300] = a[400]
  a[500:600] = 0.0
  a = jnp.asarray(a)
  slot = jnp.arange(cap, dtype=jnp.int32)
  monkeypatch.setattr(sp, "_TRIM_SORT", "lexsort")
  ref = sp._sort_seg_desc(seg, a, slot, segments)
  monkeypatch.setattr(sp, "_TRIM_SORT", "radix")
  for key in ("int32", "narrow"):   # the second sort's key: int32, or uint8 (uint16 from 255 segments)
    monkeypatch.setattr(sp, "_SEG_KEY", key)
    got = jax.jit(sp._sort_seg_desc, static_argnums=3)(seg, a, slot, segments)
    for x, y in zip(got, ref):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_collective_packings_agree(monkeypatch):
  """sidco under pmap (the Pallas packing) and under shard_map (whose varying arrays pallas_call cannot take
  without declared axes: the XLA path even when Pallas is asked for) gives bitwise the XLA packing's result."""
  from jax.sharding import Mesh, PartitionSpec as P
  from mlsys_jax._compat import shard_map
  rng = np.random.default_rng(8)
  shapes = {"a": (30, 40), "b": (40,), "c": (900,)}
  st0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  g2 = {k: jnp.asarray(rng.standard_normal((2,) + s), jnp.float32) for k, s in shapes.items()}
  sq = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
  ex = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
  res = []
  for packing in ("xla", "pallas"):
    monkeypatch.setattr(sp, "_TRANSFORM_PACKING", packing)
    tx = sp.sidco(0.02, axis_name="d")
    st = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tx.init(st0))
    pm = jax.pmap(tx.update, axis_name="d")(g2, st)
    sm = jax.jit(shard_map(lambda g, s: ex(tx.update(sq(g), sq(s))), mesh=mesh, in_specs=(P("d"), P("d")),
                           out_specs=P("d")))(g2, st)
    res.append((pm, sm))
  for r in res[1:]:
    for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(r)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("per_tensor,min_count", [(True, 1.0), pytest.param(True, 16.0, marks=pytest.mark.slow),
                                                   pytest.param(False, 1.0, marks=pytest.mark.slow)])
def test_flatten_gather_equals_concatenation(per_tensor, min_count, monkeypatch):
  """The padded flat buffer from one concatenation of the leaves and a gather equals the concatenation with
  zero pieces between the segments (leaves ending on, before and after tile boundaries)."""
  rng = np.random.default_rng(10)
  sizes = [5000, 7, 3000, 1, 9000, 30, 4096, 4097]
  leaves = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in sizes]
  lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, 0.01, min_count))
  monkeypatch.setattr(sp, "_FLATTEN", "concat")
  ref = lay.flatten(leaves, jnp.float32)
  monkeypatch.setattr(sp, "_FLATTEN", "gather")
  got = jax.jit(lambda *ls: lay.flatten(list(ls), jnp.float32))(*leaves)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert per_tensor == (lay.num_segments > 1)


def _kth_case(per_tensor, ratio, seed=7):
  rng = np.random.default_rng(seed)
  sizes = [5000, 300, 9000, 70]
  leaves = [rng.laplace(size=n).astype(np.float32) for n in sizes]
  leaves[1][:290] = 0.0                     # fewer non-zeros than k in that leaf
  leaves[2][100:400] = leaves[2][7]         # ties, maybe at the cut
  leaves = [jnp.asarray(x) for x in leaves]
  lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, ratio, 1.0))
  flat = lay.flatten(leaves, jnp.float32)
  segs = [np.concatenate([np.abs(np.asarray(leaves[i])) for i in g]) for g in lay.groups]
  return lay, flat, segs


@pytest.mark.parametrize("per_tensor,ratio", [(True, 0.05), (False, 0.01),
                                              pytest.param(True, 0.3, marks=pytest.mark.slow),
                                              pytest.param(False, 0.3, marks=pytest.mark.slow)])
def test_kth_blocks_is_closed_form_per_segment(per_tensor, ratio):
  """The block select's thresholds (three small sorts, no pass over the buffer) are the float just below
  each segment's k-th largest magnitude (0 when that is 0), as the bit search's: static k, a smaller traced
  k under the static bound, and k above the number of 64-entry blocks (ratio 0.3)."""
  lay, flat, segs = _kth_case(per_tensor, ratio)
  bmax = sp._block_stats(jnp.abs(flat))[2]
  k_max = np.array([max(1, round(ratio * n)) for n in lay.seg_n])
  for keys_only in (False, True):   # (the third level's sort of the keys alone: one segment only)
    sp_keys = sp._KTH_KEYS_ONLY
    sp._KTH_KEYS_ONLY = keys_only
    try:
      fn = jax.jit(lambda f, b, kk: sp._seg_kth_blocks(f, b, lay, kk, k_max))
      for k in (k_max, np.maximum(1, k_max // 3)):
        got = np.asarray(fn(flat, bmax, jnp.asarray(k, jnp.int32)))
        ref = np.array([_prev_kth(s[None], np.array([kk]))[0] for s, kk in zip(segs, k)])
        np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))
    finally:
      sp._KTH_KEYS_ONLY = sp_keys


@pytest.mark.parametrize("per_tensor,ratio", [(True, 0.05), (False, 0.01),
                                              pytest.param(True, 0.3, marks=pytest.mark.slow),
                                              pytest.param(False, 0.3, marks=pytest.mark.slow)])
def test_kth_counts_equals_block_select(per_tensor, ratio):
  """The count search over the block maxima and then over the k candidate blocks (no sort) gives the block
  select's thresholds bit for bit (the float just below each segment's k-th largest magnitude): static k,
  a smaller traced k, and k above the number of 64-entry blocks (ratio 0.3)."""
  lay, flat, segs = _kth_case(per_tensor, ratio)
  bmax = sp._block_stats(jnp.abs(flat))[2]
  k_max = np.array([max(1, round(ratio * n)) for n in lay.seg_n])
  fn = jax.jit(lambda f, b, kk: sp._seg_kth_counts(f, b, lay, kk, k_max))
  for k in (k_max, np.maximum(1, k_max // 3)):
    got = np.asarray(fn(flat, bmax, jnp.asarray(k, jnp.int32)))
    ref = np.array([_prev_kth(s[None], np.array([kk]))[0] for s, kk in zip(segs, k)])
    np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))


def test_kth_counts_ties_zeros_and_few_blocks():
  """Ties at the k-th largest block maximum spread over many blocks (a block above them at a high index
  must stay a candidate), a segment with fewer non-zero blocks than k, and an all-zero segment: the count
  search equals numpy's k-th largest (just below it; 0 when that is 0)."""
  n0, n1, n2 = 64 * 300, 64 * 40, 5000
  x0 = np.zeros(n0, np.float32)
  x0[::64] = 2.0                          # 300 blocks tied at 2.0
  x0[-1] = 5.0                            # the last block holds the largest entry
  x0[64 * 7 + 3] = 3.0
  x1 = np.zeros(n1, np.float32)
  x1[[5, 70, 200]] = [1.0, -4.0, 0.5]     # 3 non-zero blocks, k = 10
  x2 = np.zeros(n2, np.float32)
  lay = sp._Layout([n0, n1, n2], [[0], [1], [2]])
  flat = lay.flatten([jnp.asarray(x) for x in (x0, x1, x2)], jnp.float32)
  bmax = sp._block_stats(jnp.abs(flat))[2]
  k = np.array([20, 10, 4])
  got = np.asarray(jax.jit(lambda f, b: sp._seg_kth_counts(f, b, lay, jnp.asarray(k, jnp.int32), k))(flat, bmax))
  for s, (x, kk) in enumerate(zip((x0, x1, x2), k)):
    v = np.sort(np.abs(x))[::-1][kk - 1]
    want = np.float32(0) if v == 0 else np.nextafter(np.float32(v), np.float32(0))
    assert got[s] == want, (s, got[s], want)
  ref = np.asarray(jax.jit(lambda f, b: sp._seg_kth_blocks(f, b, lay, jnp.asarray(k, jnp.int32), k))(flat, bmax))
  np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))


def _random_segments_case(seed):
  """A random layout (1-4 segments of 1-3 leaves, sizes from 1 to 9000) whose leaves are zeros, Laplace
  noise, a few values with many ties, a few non-zeros, one tied value per 64-entry block with a larger one
  at a random place, or a wide dynamic range; a random static ``k_max`` per segment (above the number of
  blocks for some) and a random traced ``k <= k_max``."""
  rng = np.random.default_rng(seed)
  sizes, groups = [], []
  for _ in range(int(rng.integers(1, 5))):
    groups.append(list(range(len(sizes), len(sizes) + int(rng.integers(1, 4)))))
    sizes += [int(rng.choice([1, 3, 64, 100, 700, 4096, 5000, 9000])) for _ in groups[-1]]
  leaves = []
  for n in sizes:
    kind = int(rng.integers(0, 6))
    x = np.zeros(n, np.float32)
    if kind == 1:
      x = rng.laplace(size=n).astype(np.float32)
    elif kind == 2:
      x = rng.choice(np.float32([0, 1, 2, -2, 3]), size=n).astype(np.float32)
    elif kind == 3:
      m = int(rng.integers(1, 5))
      x[rng.integers(0, n, m)] = rng.standard_normal(m)
    elif kind == 4:
      x[::64] = 2.0
      x[rng.integers(0, n)] = -5.0
    elif kind == 5:
      x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    leaves.append(x)
  lay = sp._Layout(sizes, groups)
  segs = [np.concatenate([np.abs(leaves[i]) for i in g]) for g in groups]
  k_max = np.array([int(rng.integers(1, len(s) + 1)) if rng.random() < 0.4
                    else max(1, round(len(s) * float(rng.choice([0.001, 0.01, 0.1, 0.5])))) for s in segs])
  k = np.array([int(rng.integers(1, km + 1)) for km in k_max])
  return lay, lay.flatten([jnp.asarray(x) for x in leaves], jnp.float32), segs, k_max, k


@pytest.mark.parametrize("seeds", [range(0, 3), pytest.param(range(3, 40), marks=pytest.mark.slow)])
def test_kth_counts_random_layouts_against_numpy(seeds):
  """Property: for random layouts, contents (zeros, ties across blocks, few non-zero blocks, a wide range)
  and k (static ``k_max``, a smaller traced ``k``, ``k`` above the number of blocks), the count search's
  thresholds are numpy's: the float just below each segment's k-th largest magnitude, 0 when that is 0."""
  for seed in seeds:
    lay, flat, segs, k_max, k = _random_segments_case(seed)
    bmax = sp._block_stats(jnp.abs(flat))[2]
    fn = jax.jit(lambda f, b, kk: sp._seg_kth_counts(f, b, lay, kk, k_max))
    for kk in (k_max, k):
      got = np.asarray(fn(flat, bmax, jnp.asarray(kk, jnp.int32)))
      ref = np.array([_prev_kth(s[None], np.array([c]))[0] for s, c in zip(segs, kk)])
      np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32), err_msg=f"seed {seed}, k {kk}")


@pytest.mark.parametrize("trim,base", [("sort", "fused"), ("quota", "fill")])
def test_block_select_alone_sends_numpy_topk(trim, base, monkeypatch):
  """The fastest exact configurations (no fit, block select; the tie cut by the sort trim, skipped when
  nothing is tied, or by the quota; the buffer's zeros fused or a fill of their own) against a numpy
  float32 reference over 3 steps: the update is the k largest of gradient + residual (ties to the lower
  index of the raveled tree), the residual the rest."""
  rng = np.random.default_rng(12)
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "blocks")
  monkeypatch.setattr(sp, "_EXACT_FIT", False)
  monkeypatch.setattr(sp, "_TRIM_SKIP", True)
  monkeypatch.setattr(sp, "_TRIM", trim)
  monkeypatch.setattr(sp, "_DUS_BASE", base)
  monkeypatch.setattr(sp, "_GROUP_LEAVES", 1)   # (three chunks: the buffer is written by dus)
  tx = sp.sidco(0.01)
  shapes = {"a": (40, 50), "b": (50,), "t": (3000,)}
  g0 = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
  st = tx.init(g0)
  up = jax.jit(tx.update)
  res = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
  k = round(0.01 * sum(int(np.prod(s)) for s in shapes.values()))
  for step in range(3):
    g = {"a": rng.standard_normal((40, 50)).astype(np.float32), "b": rng.standard_normal(50).astype(np.float32),
         "t": np.round(rng.laplace(size=3000) * (3 if step else 1000)).astype(np.float32)}   # ties, then none
    out, st = up({n: jnp.asarray(v) for n, v in g.items()}, st)
    acc = {n: g[n] + res[n] for n in sorted(g)}
    flat = np.concatenate([acc[n].reshape(-1) for n in sorted(acc)])
    keep = np.zeros(flat.size, bool)
    keep[np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]] = True
    off = 0
    for n in sorted(acc):
      m = keep[off:off + acc[n].size].reshape(acc[n].shape)
      off += acc[n].size
      np.testing.assert_array_equal(np.asarray(out[n]), np.where(m, acc[n], 0), err_msg=f"{n} step {step}")
      res[n] = np.where(m, 0, acc[n])
      np.testing.assert_array_equal(np.asarray(st.residual[n]), res[n])


@pytest.mark.parametrize("kw,modes", [
    pytest.param(dict(per_tensor=True), (("bits", True, False), ("blocks", False, True)), marks=pytest.mark.slow),
    pytest.param(dict(per_tensor=True), (("bits", True, False), ("blocks", True, False), ("blocks", True, True)),
                 marks=pytest.mark.slow),
    pytest.param(dict(), (("bits", True, False), ("blocks", True, False), ("blocks", False, False),
                          ("blocks", False, True), ("counts", False, True)), marks=pytest.mark.slow),
    (dict(per_tensor=True), (("blocks", False, True), ("counts", False, True))),
    pytest.param(dict(distribution="gpareto", momentum=0.9), (("bits", True, False), ("blocks", True, True),
                                                              ("blocks", False, True)), marks=pytest.mark.slow)])
def test_transform_same_with_block_select_and_without_fit(kw, modes, monkeypatch):
  """Whole updates (Gaussian gradients: the exponential fit misses and the fallback runs; a leaf of
  rounded values: ties at the cut, so the correction stage trims) are bitwise the same with the bit search,
  the block select, the block select alone on every step (no fit), with and without the trim's skip."""
  rng = np.random.default_rng(5)
  grads = [{"w": jnp.asarray(rng.standard_normal((40, 50)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(50) * 0.1, jnp.float32),
            "c": jnp.asarray(rng.laplace(size=3000), jnp.float32),
            "t": jnp.asarray(np.round(rng.laplace(size=2000) * 3), jnp.float32)} for _ in range(3)]
  res = []
  for search, fit, skip in modes:
    monkeypatch.setattr(sp, "_EXACT_SEARCH", search)
    monkeypatch.setattr(sp, "_EXACT_FIT", fit)
    monkeypatch.setattr(sp, "_TRIM_SKIP", skip)
    res.append(_jitted_steps(sp.sidco(0.01, **kw), grads, ("residual", "density", "velocity")))
  for other in res[1:]:
    for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(other)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sum_flatten_chunks_equal_two_concatenations(monkeypatch):
  """The error-compensated buffer by chunked concatenations of the leafwise sums, or chunks written in
  place, equals flatten(addend) + flatten(residual) bitwise (padding between segments included), and the
  raveled one equals the leafwise sums raveled (mixed dtypes: each sum in its leaf's dtype)."""
  rng = np.random.default_rng(8)
  sizes = [700, 5, 9000, 33, 64, 4097]
  a = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in sizes]
  r = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in sizes]
  monkeypatch.setattr(sp, "_GROUP_LEAVES", 2)
  for per_tensor in (False, True):
    lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, 0.01, 1.0))
    want = np.asarray(sp._flat_sum(lay.flatten, a, r, jnp.float32))
    for how, base, gsize in (("groups", "fused", 0), ("dus", "fused", 0), ("dus", "fill", 0), ("dus", "fill", 4000),
                             ("groups", "fused", 600)):
      monkeypatch.setattr(sp, "_DUS_BASE", base)   # (dus's zero buffer: fused into the first write, or a fill)
      monkeypatch.setattr(sp, "_GROUP_SIZE", gsize)   # (leaves of >= gsize entries: chunks of their own)
      got = jax.jit(lambda a, r: lay.flatten_sum(a, r, jnp.float32, how))(a, r)
      np.testing.assert_array_equal(np.asarray(got), want)
    monkeypatch.setattr(sp, "_DUS_BASE", "fused")
    monkeypatch.setattr(sp, "_GROUP_SIZE", 0)
  tree_a = {"x": a[0], "y": jnp.full((5,), 60000.0, jnp.float16)}
  tree_r = {"x": r[0], "y": jnp.full((5,), 60000.0, jnp.float16)}
  want, _ = sp._ravel_sum(tree_a, tree_r)
  for how in ("groups", "dus"):
    monkeypatch.setattr(sp, "_RAVEL_SUM_FLATTEN", how)   # _ravel_sum (topk, dgc, randomk) reads this one
    got, unravel = sp._ravel_sum(tree_a, tree_r)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.all(np.isinf(np.asarray(got)[-5:])) and unravel(got)["x"].shape == (700,)


@pytest.mark.slow
@pytest.mark.parametrize("make", [lambda: sp.sidco(0.01, per_tensor=True), lambda: sp.topk(0.01)])
def test_transform_same_with_sum_flatten(make, monkeypatch):
  """Whole updates with the buffer written by chunks equal those with two concatenations, bitwise."""
  rng = np.random.default_rng(9)
  grads = [{"w": jnp.asarray(rng.standard_normal((40, 50)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(50), jnp.float32),
            "c": jnp.asarray(rng.laplace(size=3000), jnp.float32)} for _ in range(2)]
  monkeypatch.setattr(sp, "_GROUP_LEAVES", 2)
  res = []
  for how in ("two", "dus"):
    monkeypatch.setattr(sp, "_SUM_FLATTEN", how)        # sidco's buffer
    monkeypatch.setattr(sp, "_RAVEL_SUM_FLATTEN", how)  # topk's buffer
    tx = make()
    st = tx.init(grads[0])
    up = jax.jit(tx.update)
    res.append([up(g, st)[0] for g in grads] + [st])
    for g in grads:
      _, st = up(g, st)
    res[-1].append(st)
  for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(res[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _quota_case(per_tensor, ratio, seed):
  """A tree's flat buffer with ties at every segment's cut (rounded values), a leaf with fewer non-zeros
  than its k, and the block select's thresholds."""
  rng = np.random.default_rng(seed)
  sizes = [5000, 300, 9000, 70, 4096]
  leaves = [np.round(rng.laplace(size=n) * 2).astype(np.float32) for n in sizes]
  leaves[1][:295] = 0.0                     # fewer non-zeros than k in that leaf
  leaves = [jnp.asarray(x) for x in leaves]
  lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, ratio, 1.0))
  flat = lay.flatten(leaves, jnp.float32)
  bmax = sp._block_stats(jnp.abs(flat))[2]
  k_max = np.array([max(1, round(ratio * n)) for n in lay.seg_n])
  return lay, flat, bmax, k_max


def _topk_sets(flat, lay, k):
  """numpy Top-k of every segment (magnitude descending, ties to the lower index), zeros never sent."""
  a = np.abs(np.asarray(flat))
  out = []
  for s in range(lay.num_segments):
    pos = np.arange(lay.seg_start[s], lay.seg_start[s] + lay.seg_n[s])
    order = np.lexsort((pos, -a[pos]))[:k[s]]
    out.append(pos[order][a[pos[order]] > 0])
  return np.sort(np.concatenate(out))


@pytest.mark.parametrize("per_tensor,ratio,cap_factor", [(True, 0.05, 2.0), (False, 0.01, 2.0), (True, 0.05, 0.6),
                                                         pytest.param(False, 0.3, 2.0, marks=pytest.mark.slow)])
def test_seg_quota_equals_sort_trim_and_numpy_topk(per_tensor, ratio, cap_factor):
  """The tie quota by prefix counts (no sort, no cond) gives bitwise the sort trim's payload and the same
  sent set entry by entry (through (threshold, tie_last)); without overflow that is numpy's Top-k of every
  segment. cap_factor 0.6: the packing overflows (a prefix of the selection), where both keep the k largest
  of what was packed. Static k and a smaller traced k."""
  lay, flat, bmax, k_max = _quota_case(per_tensor, ratio, 3)
  cap = max(1, int(cap_factor * k_max.sum()))
  send = int(k_max.sum())

  def both(f, b, kk):
    t = sp._seg_kth_blocks(f, b, lay, kk, k_max)
    p, _ = sp._pack_xla(f, lay.per_tile(t), cap, b)
    return sp._seg_quota(p, t, lay, kk, send), sp._seg_trim(p, t, lay, kk, send), p

  fn = jax.jit(both)
  pos = np.arange(lay.n_pad)
  a = np.abs(np.asarray(flat))
  seg_of = lay.tile_seg[pos // 4096]
  cut = 0
  for k in (k_max, np.maximum(1, k_max // 3)):
    (pq, vq, lq), (ps, ts, ls), p0 = fn(flat, bmax, jnp.asarray(k, jnp.int32))
    for x, y in zip(pq, ps):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sent = np.asarray(pq.indices)[:int(pq.count)]
    for thr, tl in ((vq, lq), (ts, ls)):   # the transform's rule names the sent entries
      thr, tl = np.asarray(thr)[seg_of], np.asarray(tl)[seg_of]
      last = sent[-1] if sent.size else -1
      sel = ((a > thr) | ((a == thr) & (pos <= tl))) & (pos <= last)
      np.testing.assert_array_equal(np.nonzero(sel)[0], sent)
    if not bool(p0.overflow):
      np.testing.assert_array_equal(sent, _topk_sets(flat, lay, k))
    else:
      assert cap_factor < 1
    cut += int(np.sum(np.asarray(ls) >= 0))
  assert cut, "no segment was cut: the case does not exercise the quota"


@pytest.mark.slow   # (the sort trim is the path before session 10; the quota and the sort agree in
@pytest.mark.parametrize("per_tensor", [False, True])   # test_seg_quota_equals_sort_trim_and_numpy_topk)
def test_transform_same_with_quota_and_sort_trim(per_tensor, monkeypatch):
  """Whole jitted updates (3 steps, ties at the cut on some) are bitwise the same with the quota (and dus's
  zeros as a fill of their own, narrow segment keys) and the sort trim (with and without its skip, int32
  and narrow segment keys); the quota path traces no lax.cond."""
  rng = np.random.default_rng(4)
  grads = [{"w": jnp.asarray(rng.standard_normal((40, 50)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(50) * 0.1, jnp.float32),
            "t": jnp.asarray(np.round(rng.laplace(size=2000) * 3), jnp.float32)} for _ in range(3)]
  res = []
  monkeypatch.setattr(sp, "_GROUP_LEAVES", 1)   # (three chunks: the buffer is written by dus)
  for trim, skip, base, key in (("quota", True, "fill", "narrow"), ("sort", True, "fused", "int32"),
                                ("sort", False, "fused", "narrow")):
    monkeypatch.setattr(sp, "_TRIM", trim)
    monkeypatch.setattr(sp, "_TRIM_SKIP", skip)
    monkeypatch.setattr(sp, "_DUS_BASE", base)
    monkeypatch.setattr(sp, "_SEG_KEY", key)
    tx = sp.sidco(0.01, per_tensor=per_tensor)
    if trim == "quota":
      assert "cond" not in str(jax.make_jaxpr(tx.update)(grads[0], tx.init(grads[0])))
    res.append(_jitted_steps(tx, grads, ("residual", "density", "bytes_sent")))
  for other in res[1:]:
    for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(other)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="_TRIM"):
    monkeypatch.setattr(sp, "_TRIM", "heap")
    tx = sp.sidco(0.01, per_tensor=per_tensor)
    tx.update(grads[0], tx.init(grads[0]))


@pytest.mark.parametrize("per_tensor", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_quota_under_pmap_and_shard_map(per_tensor, monkeypatch):
  """The quota tie cut (no lax.cond) under pmap and under shard_map (varying payloads) gives bitwise the sort
  trim's updates and states; rounded gradients put ties at the cut."""
  from jax.sharding import Mesh, PartitionSpec as P
  from mlsys_jax._compat import shard_map
  rng = np.random.default_rng(8)
  shapes = {"a": (30, 40), "b": (40,), "c": (900,)}
  st0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  g2 = {k: jnp.asarray(np.round(rng.standard_normal((2,) + s) * 2), jnp.float32) for k, s in shapes.items()}
  sq = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
  ex = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))
  res = []
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "xla")
  for trim in ("sort", "quota"):
    monkeypatch.setattr(sp, "_TRIM", trim)
    tx = sp.sidco(0.02, axis_name="d", per_tensor=per_tensor)
    st = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tx.init(st0))
    pm = jax.pmap(tx.update, axis_name="d")(g2, st)
    sm = jax.jit(shard_map(lambda g, s: ex(tx.update(sq(g), sq(s))), mesh=mesh, in_specs=(P("d"), P("d")),
                           out_specs=P("d")))(g2, st)
    res.append((pm, sm))
  for x, y in zip(jax.tree_util.tree_leaves(res[0]), jax.tree_util.tree_leaves(res[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(np.asarray(res[1][0][1].density).max()) > 0


def test_write_leaves_matches_elementwise():
  """The Pallas leaf writer (interpret mode) writes bitwise the elementwise residual and output of every leaf
  (ties at the cut up to the last kept index, nothing after the last packed one), and on a non-finite step
  keeps the old residual and outputs zeros; a bad layout is refused."""
  rng = np.random.default_rng(3)
  sizes, offsets = [5, 300, 4200], [0, 5, 4096]
  f = rng.standard_normal(8448).astype(np.float32)
  f[4100:4110] = 2.0                       # tied at leaf 2's threshold
  f[80:90] = -1.5                          # tied at leaf 1's
  f[7] = -0.0
  t = np.asarray([0.5, 1.5, 2.0], np.float32)
  tie = np.asarray([3, 85, 4105], np.int32)
  last = 8000
  old = [rng.standard_normal(s).astype(np.float32) for s in sizes]
  run = jax.jit(lambda fin: pp.write_leaves(jnp.asarray(f), sizes, offsets, jnp.asarray(t), jnp.asarray(tie), last,
                                            fin, [jnp.asarray(o) for o in old], interpret=True, group=2))
  inplace = jax.jit(lambda fin, old: pp.write_leaves(jnp.asarray(f), sizes, offsets, jnp.asarray(t), jnp.asarray(tie),
                                                    last, fin, old, in_place=True, interpret=True, group=2))
  for fin in (True, False):
    outs, ress = run(jnp.asarray(fin))
    for x, y in zip(inplace(jnp.asarray(fin), [jnp.asarray(o) for o in old]), (outs, ress)):   # (aliased residuals)
      for a, b in zip(x, y):
        np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))
    for i, (n, o) in enumerate(zip(sizes, offsets)):
      v, pos = f[o:o + n], o + np.arange(n)
      a = np.abs(v)
      sel = ((a > t[i]) | ((a == t[i]) & (pos <= tie[i]))) & (pos <= last)
      want_out = np.where(sel, v, np.float32(0)) if fin else np.zeros(n, np.float32)
      want_res = np.where(sel, np.float32(0), v) if fin else old[i]
      np.testing.assert_array_equal(np.asarray(outs[i]).view(np.int32), want_out.view(np.int32))
      np.testing.assert_array_equal(np.asarray(ress[i]).view(np.int32), want_res.view(np.int32))
      if fin and i == 2:   # the tie cut and the last index both bite here
        assert 0 < sel.sum() < (a >= t[i]).sum()
  with pytest.raises(ValueError, match="same length"):
    pp.write_leaves(jnp.asarray(f), sizes, offsets[:2], jnp.asarray(t), jnp.asarray(tie), last, True)
  with pytest.raises(ValueError, match="in_place"):
    pp.write_leaves(jnp.asarray(f), sizes, offsets, jnp.asarray(t), jnp.asarray(tie), last, True, in_place=True)
  with pytest.raises(ValueError, match="inside flat"):
    pp.write_leaves(jnp.asarray(f), [9000], [0], jnp.asarray(t[:1]), jnp.asarray(tie[:1]), last, True)
  with pytest.raises(ValueError, match="one entry per leaf"):   # (each group indexes the whole t / tie)
    pp.write_leaves(jnp.asarray(f), sizes, offsets, jnp.asarray(t[:2]), jnp.asarray(tie), last, True)


def _writer_steps(per_tensor, axis=False):
  """Two sidco updates (a NaN step, then rounded gradients with ties at the cut), jitted or under pmap (2
  devices): outputs and states."""
  rng = np.random.default_rng(11)
  shapes = {"a": (30, 40), "b": (40,), "c": (900,), "d": (1,)}
  st0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  gs = [{k: jnp.asarray(np.round(rng.standard_normal((2,) + s) * 2), jnp.float32) for k, s in shapes.items()}
        for _ in range(2)]
  gs[0]["b"] = gs[0]["b"].at[0, 3].set(jnp.nan)
  tx = sp.sidco(0.02, per_tensor=per_tensor, axis_name="d" if axis else None)
  if axis:
    st = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tx.init(st0))
    step = jax.pmap(tx.update, axis_name="d")
  else:
    gs = [jax.tree_util.tree_map(lambda x: x[0], g) for g in gs]
    st, step = tx.init(st0), jax.jit(tx.update)
  res = []
  for g in gs:
    o, st = step(g, st)
    res.append((o, st))
  return res


@pytest.mark.parametrize("per_tensor,axis", [(True, False), pytest.param(False, False, marks=pytest.mark.slow),
                                             pytest.param(True, True, marks=pytest.mark.slow)])
def test_pallas_leaf_writer_same_transform(per_tensor, axis, monkeypatch):
  """sidco with the Pallas leaf writer (interpret mode; fresh or in-place residuals, or in-place residuals
  with the outputs left to XLA) gives bitwise the
  elementwise path's updates and states over a NaN step (nothing sent, residual kept) and a step with ties at
  the cut; under pmap (the writer then writes the residuals only) the replicas' updates stay identical."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "xla")
  res = {}
  for mode in ("pallas", "pallas_inplace", "pallas_res", "xla"):
    monkeypatch.setattr(sp, "_OUT_WRITE", mode)
    res[mode] = _writer_steps(per_tensor, axis)
  bits = lambda x: np.asarray(x).view(np.int32) if np.asarray(x).dtype == np.float32 else np.asarray(x)
  for mode in ("pallas", "pallas_inplace", "pallas_res"):
    for x, y in zip(jax.tree_util.tree_leaves(res[mode]), jax.tree_util.tree_leaves(res["xla"])):
      np.testing.assert_array_equal(bits(x), bits(y))
  (o0, s0), (o1, s1) = res["pallas"]
  assert int(np.asarray(s0.nonfinite_steps).max()) == 1 and float(np.asarray(s1.density).max()) > 0
  if axis:   # (the residuals are each worker's own; the averaged update is every replica's)
    for leaf in jax.tree_util.tree_leaves(o1):
      np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])
  # (the writer really ran: a pallas_call in the traced update)
  monkeypatch.setattr(sp, "_OUT_WRITE", "pallas")
  tx = sp.sidco(0.02, per_tensor=per_tensor)
  g = {"a": jnp.ones((3, 4))}
  assert "pallas_call" in str(jax.make_jaxpr(tx.update)(g, tx.init(g)))


@pytest.mark.parametrize("mode", ["auto_inplace", "auto_res"])
def test_auto_leaf_writers_are_gpu_only_and_checked(mode, monkeypatch):
  """The "auto" leaf writers (in place, or residuals only) pick the Pallas writer only where the packing's
  "auto" would (GPU, outside shard_map): off the GPU the traced update has no pallas_call (no interpreter on
  a CPU host); an unknown mode names the choices."""
  monkeypatch.setattr(sp, "_OUT_WRITE", mode)
  tx = sp.sidco(0.02)
  g = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  jaxpr = str(jax.make_jaxpr(tx.update)(g, tx.init(g)))
  if jax.default_backend() != "gpu":
    assert "pallas_call" not in jaxpr
    assert sp._write_mode(jnp.zeros(8), [jnp.zeros(8)], 0.0) == (False, False)
  monkeypatch.setattr(sp, "_OUT_WRITE", "inplace")
  with pytest.raises(ValueError, match="auto_res"):
    sp._write_mode(jnp.zeros(8), [jnp.zeros(8)], 0.0)
