"""sidco's error-compensated buffer built by one Pallas kernel per group of leaves (``sparse._SUM_BUILD``):
the kernel against the XLA buffer and the statistics kernel, and the transform against its XLA build, bitwise
(Pallas interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps, pmap_one_bad_worker_under_modes, vmapped_under_modes  # tests/_trees.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

pp_sum_leaves = pp.sum_leaves
bits = lambda x: np.asarray(x).view(np.int32) if np.asarray(x).dtype == np.float32 else np.asarray(x)


SIZES = [100, 5000, 64, 7, 9000, 3, 4096, 12000, 1, 33]
ALIGNED = [64, 8320, 16, 8192, 48, 4096]   # (every offset a multiple of 16: the aligned loads)


@pytest.mark.parametrize("per_tensor,flat_residual,sizes,configs", [
    (False, False, SIZES, ((48, True), (1, True))), (False, True, SIZES, ((3, True), (48, False))),
    (True, False, SIZES, ((48, True), (3, True))), (True, True, SIZES, ((1, True), (48, False))),
    (False, False, ALIGNED, ((48, True), (3, True))), (True, True, ALIGNED, ((48, True), (1, True)))])
def test_sum_leaves_is_the_xla_buffer_and_its_statistics(per_tensor, flat_residual, sizes, configs):
  """The padded buffer (one segment, or per-tensor segments each padded to whole tiles) of the leafwise sums,
  and per tile / per block the statistics kernel's sums and maxima, bitwise; leaves that straddle tiles and
  blocks, tiles inside one leaf (no masks), a tile touching many leaves, kernels split into groups of 1, 3 or
  48 leaves, with and without the whole-tile and aligned loads."""
  rng = np.random.default_rng(3)
  lay = sp._Layout(sizes, sp._segments(sizes, per_tensor, 0.01, 16))
  a = [jnp.asarray(rng.normal(size=s) * 10.0 ** rng.integers(-3, 3), jnp.float32) for s in sizes]
  r = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in sizes]
  want = lay.flatten([x + y for x, y in zip(a, r)], jnp.float32)
  ws1, ws2, wb = pp.tile_stats(want, interpret=True, tile_blocks=pp.THR_BLOCKS)
  res = jnp.concatenate(r) if flat_residual else r
  for group, fast in configs:   # (every layout meets two of the four kernel configurations; each meets several)
    flat, s1, s2, bmax = pp.sum_leaves(a, res, lay.tile_shift, lay.tile_limit, interpret=True, group=group,
                                       whole_tiles=fast, align=fast)
    for got, ref in ((flat, want), (s1, ws1), (s2, ws2), (bmax, wb)):
      np.testing.assert_array_equal(bits(got), bits(ref))
  if per_tensor:
    assert lay.num_segments > 1 and float(jnp.abs(want).min()) == 0.0   # (padding between the segments)
  p0 = np.arange(lay.num_tiles) * pp.THR_BLOCKS * pp.BLOCK
  roff = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  inside = [p + 4096 <= lim and any(o <= p + sh and p + sh + 4096 <= o + n for o, n in zip(roff, sizes))
            for p, sh, lim in zip(p0, lay.tile_shift, lay.tile_limit)]
  assert any(inside)   # (some tile lies inside one leaf: the unmasked loads ran)


def test_sum_groups_cover_every_tile_once():
  """The kernels' tile runs: consecutive, disjoint, covering every tile, each within its leaf budget unless one
  tile alone touches more leaves."""
  lo = np.asarray([0, 0, 1, 5, 5, 9, 1, 12])   # (tile 6: lo > hi, no leaf)
  hi = np.asarray([0, 1, 5, 5, 9, 12, 0, 12])
  runs = pp._sum_groups(lo, hi, 4)
  assert runs[0][0] == 0 and runs[-1][1] == len(lo)
  assert all(r0[1] == r1[0] for r0, r1 in zip(runs, runs[1:]))
  for t0, t1, l0, l1 in runs:
    used = [t for t in range(t0, t1) if lo[t] <= hi[t]]
    assert l0 == min(lo[used]) and l1 == max(hi[used])
    assert l1 - l0 + 1 <= 4 or len(used) == 1


def test_sum_leaves_bad_input():
  lay = sp._Layout([10, 20], [[0, 1]])
  a = [jnp.ones(10), jnp.ones(20)]
  with pytest.raises(ValueError, match="one dtype"):
    pp.sum_leaves([a[0], a[1].astype(jnp.float16)], [jnp.ones(10), jnp.ones(20)], lay.tile_shift, lay.tile_limit)
  with pytest.raises(ValueError, match="concatenated"):
    pp.sum_leaves(a, jnp.ones(29), lay.tile_shift, lay.tile_limit)
  with pytest.raises(ValueError, match="same size"):
    pp.sum_leaves(a, [jnp.ones(10), jnp.ones(21)], lay.tile_shift, lay.tile_limit)
  with pytest.raises(ValueError, match="outside"):
    pp.sum_leaves(a, jnp.ones(30), lay.tile_shift, lay.tile_limit + 5)
  with pytest.raises(ValueError, match="at least one"):
    pp.sum_leaves([], [], lay.tile_shift, lay.tile_limit)
  with pytest.raises(ValueError, match="non-empty"):
    pp.sum_leaves([jnp.ones(0)], [jnp.ones(0)], lay.tile_shift, lay.tile_limit)


@pytest.mark.parametrize("kw", [dict(), dict(per_tensor=True), dict(flat_state=True),   # (three forms slow, ~8 s)
                                pytest.param(dict(per_tensor=True, flat_state=True), marks=pytest.mark.slow),
                                pytest.param(dict(exact=False, per_tensor=True), marks=pytest.mark.slow),
                                pytest.param(dict(momentum=0.9, per_tensor=True), marks=pytest.mark.slow)])
def test_sidco_with_the_sum_kernel_is_bitwise_the_xla_build(kw, monkeypatch):
  """sidco (tree or flat residual, one threshold or per tensor, exact or the estimator) with the buffer and
  statistics from the sum kernel: updates and states bitwise those of the XLA build, over a NaN step and a
  step with ties; the kernel really runs (a pallas_call with the leaves' count of inputs)."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  res = {}
  for mode in ("pallas", "xla"):
    monkeypatch.setattr(sp, "_SUM_BUILD", mode)
    res[mode] = nan_and_tie_steps(sp.sidco(0.02, **kw), 5)
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  st = res["pallas"][1][1]
  assert int(st.nonfinite_steps) == 1 and float(res["pallas"][2][1].density) > 0
  calls = []   # (the kernel really builds the buffer in the pallas rows)
  monkeypatch.setattr(pp, "sum_leaves", lambda *a, **k: calls.append(1) or pp_sum_leaves(*a, **k))
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,))}
  tx = sp.sidco(0.02, **kw)
  jax.make_jaxpr(tx.update)(g, tx.init(g))
  assert calls == [1]


def test_sum_build_is_gpu_only_under_auto_and_checked(monkeypatch):
  """"auto" builds with the kernel only compiled (GPU), float32, outside shard_map; an unknown mode names the
  choices; float16 leaves keep the XLA build."""
  monkeypatch.setattr(sp, "_SUM_BUILD", "auto")
  x = [jnp.ones(8)]
  if jax.default_backend() != "gpu":
    assert sp._sum_build_mode(x, x, jnp.float32) == (False, False)
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  assert sp._sum_build_mode(x, x, jnp.float32)[0]
  assert sp._sum_build_mode([jnp.ones(8, jnp.float16)], [jnp.ones(8, jnp.float16)], jnp.float16) == (False, False)
  assert sp._sum_build_mode(x, x, jnp.float32, computed=True)[0]   # ("pallas": also for computed addends)
  monkeypatch.setattr(sp, "_SUM_BUILD", "auto")
  assert sp._sum_build_mode(x, x, jnp.float32, computed=True) == (False, False)   # (auto: the timed cases only)
  monkeypatch.setattr(sp, "_SUM_BUILD", "pallas")
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "xla")
  assert sp._sum_build_mode(x, x, jnp.float32) == (False, False)
  monkeypatch.setattr(sp, "_SUM_BUILD", "kernel")
  with pytest.raises(ValueError, match="pallas"):
    sp._sum_build_mode(x, x, jnp.float32)


@pytest.mark.parametrize("finite", [True, False])
def test_kept_from_padded_is_the_elementwise_residual(finite):
  """The per-tensor flat residual written from the padded buffer (segments of several tiles, tiles inside one
  segment and across several, a tie cut and a last packed index that both bite) equals the numpy reference;
  a non-finite step leaves the old residual."""
  rng = np.random.default_rng(9)
  sizes = [5000, 64, 7, 9000, 3, 4096, 12000, 33]
  lay = sp._Layout(sizes, sp._segments(sizes, True, 0.01, 16))
  real = np.round(rng.normal(size=lay.n_real) * 4).astype(np.float32)   # (ties)
  flat = np.asarray(lay.pad(jnp.asarray(real)))
  t = np.full(lay.num_segments, 3.0, np.float32)
  src0 = np.concatenate([[0], np.cumsum(lay.seg_n)[:-1]])
  tie = (lay.seg_start + lay.seg_n // 2).astype(np.int32)
  last = int(lay.seg_start[-1] + lay.seg_n[-1] // 2)
  old = rng.normal(size=lay.n_real).astype(np.float32)
  got = pp.kept_from_padded(jnp.asarray(flat), lay.seg_n, lay.seg_start, jnp.asarray(t), jnp.asarray(tie), last,
                            finite, jnp.asarray(old), interpret=True)
  want = old.copy()
  if finite:
    for s in range(lay.num_segments):
      q = src0[s] + np.arange(lay.seg_n[s])
      p = q - src0[s] + lay.seg_start[s]
      v, a = real[q], np.abs(real[q])
      sel = ((a > t[s]) | ((a == t[s]) & (p <= tie[s]))) & (p <= last)
      want[q] = np.where(sel, np.float32(0), v)
      assert 0 < sel.sum() < (a >= t[s]).sum() or s != 0   # (the tie cut bites in the first segment)
  np.testing.assert_array_equal(bits(got), bits(want))
  with pytest.raises(ValueError, match="shape"):
    pp.kept_from_padded(jnp.asarray(flat), lay.seg_n, lay.seg_start, jnp.asarray(t), jnp.asarray(tie), last, True,
                        jnp.asarray(old[:-1]))
  with pytest.raises(ValueError, match="inside flat"):
    pp.kept_from_padded(jnp.asarray(flat[:100]), lay.seg_n, lay.seg_start, jnp.asarray(t), jnp.asarray(tie), last,
                        True, jnp.asarray(old))


@pytest.mark.parametrize("kw", [dict(), dict(per_tensor=True, flat_state=True)])
def test_sum_kernel_under_vmap_is_bitwise_the_xla_build(kw, monkeypatch):
  """A vmapped update (three independent workers' states) with the sum kernel (and, per tensor with a flat residual,
  the in-place residual writer) equals the XLA build's bitwise."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  res = vmapped_under_modes(monkeypatch, sp, "_SUM_BUILD", ("pallas", "xla"), lambda: sp.sidco(0.02, **kw))
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  assert float(jnp.abs(jax.tree_util.tree_leaves(res["pallas"][0])[0]).max()) > 0   # (something was sent)


def test_tile_ranges_and_alignment_helpers():
  """The pieces each tile touches (empty pieces skipped, a tile with no position gets lo > hi) and the declared load
  alignment (the largest power of two up to 16 dividing every offset)."""
  starts, sizes = np.asarray([0, 10, 10, 4106]), np.asarray([10, 0, 4096, 5])
  lo, hi = pp._tile_ranges(starts, sizes, np.asarray([0, 4096, 5000]), np.asarray([4096, 4111, 5000]))
  assert lo.tolist() == [0, 2, 1] and hi.tolist() == [2, 3, 0]
  assert pp._pow2_divisor([4096, 64, 1000]) == 8 and pp._pow2_divisor([4096, 0]) == 16
  assert pp._pow2_divisor([4096, 3]) == 1 and pp._pow2_divisor([]) == 16


@pytest.mark.parametrize("kw", [dict(per_tensor=True), pytest.param(dict(per_tensor=True, flat_state=True),
                                                                    marks=pytest.mark.slow)])   # (the flat
# buffer's segments, ~4 s; the same kernel per tensor stays in the default suite)
def test_sum_kernel_under_pmap_with_one_bad_worker(kw, monkeypatch):
  """Under pmap (2 devices) with a NaN on one worker only: the step is skipped on every replica (the agreed flag),
  the averaged updates are identical across replicas, and updates and states equal the XLA build's bitwise."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  res = pmap_one_bad_worker_under_modes(monkeypatch, sp, {m: {"_SUM_BUILD": m} for m in ("pallas", "xla")},
                                        lambda: sp.sidco(0.02, axis_name="d", **kw), seed=4)
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
