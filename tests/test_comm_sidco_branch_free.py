"""SIDCo's estimator (``sidco(exact=False)``) without data-dependent control flow (``sparse._BRANCHES``):
the adaptive stages unrolled to their static bound and masked, the floor and the ceiling computed every step and
kept elementwise. Every output and state field must be bitwise those of the ``while_loop`` / ``lax.cond``
path, on steps where the stage count adapts, the floor binds and the payload overflows; and the compiled update
must hold no conditional and no loop whose trip count is unknown (each returns a predicate to the host on a
GPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mlsys_jax.comm import sidco
from mlsys_jax.comm import sparse as sp

from _trees import replicated_updates  # tests/_trees.py

_SHAPES = {"a": (3, 3, 16, 32), "b": (32,), "c": (256, 128), "d": (1000,), "e": (5000,)}


def _grad(rng, k):
  # heavy tails every third step (the fit undershoots: overflow and ceiling), else Gaussian at a growing scale
  if k % 3 == 0:
    return {n: jnp.asarray(rng.standard_cauchy(s), jnp.float32) for n, s in _SHAPES.items()}
  return {n: jnp.asarray(rng.standard_normal(s) * (1 + k), jnp.float32) for n, s in _SHAPES.items()}


def _run(mode, monkeypatch, steps=12, ceiling="search", **kw):
  monkeypatch.setattr(sp, "_BRANCHES", mode)
  monkeypatch.setattr(sp, "_CEILING", ceiling)
  rng = np.random.default_rng(0)
  params = {n: jnp.zeros(s, jnp.float32) for n, s in _SHAPES.items()}
  tx = sidco(0.01, exact=False, **kw)
  st = tx.init(params)
  upd = jax.jit(tx.update)
  hlo = upd.lower(_grad(np.random.default_rng(1), 1), st).compile().as_text()
  outs, stages = [], []
  for k in range(steps):
    u, st = upd(_grad(rng, k), st)
    outs.append((u, st))
    stages.append(int(st.stages))
  return outs, stages, hlo


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _host_round_trips(hlo: str) -> tuple[int, int]:
  """(conditionals, while loops without a known trip count) in a compiled HLO module's text."""
  conds = len(re.findall(r"\bconditional\(", hlo))
  whiles = [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line)]
  unknown = sum("known_trip_count" not in w for w in whiles)
  return conds, unknown


@pytest.mark.parametrize("kw,ceiling", [   # (the flat-state and the tight ceiling: slow suite, ~7 s)
    pytest.param(dict(adapt_every=2), "search", id="tree"),
    pytest.param(dict(per_tensor=True, adapt_every=2), "search", id="per_tensor"),
    pytest.param(dict(flat_state=True, capacity_factor=1.1, adapt_every=2), "blocks", id="flat_blocks",
                 marks=pytest.mark.slow),
    pytest.param(dict(capacity_factor=1.2, max_fraction=1.0, min_fraction=0.5, adapt_every=2), "blocks",
                 id="tight_blocks", marks=pytest.mark.slow)])
def test_where_equals_cond_bitwise(kw, ceiling, monkeypatch):
  """The cond path with the ceiling's bit search (the CPU default) against the branch-free path (the GPU default),
  with the ceiling's search (the default) or its block select (an option, ``_CEILING = "blocks"``)."""
  a, stages_a, hlo_a = _run("cond", monkeypatch, **kw)
  b, stages_b, hlo_b = _run("where", monkeypatch, ceiling=ceiling, **kw)
  assert stages_a == stages_b
  for k, (x, y) in enumerate(zip(a, b)):
    assert _same(x, y), f"step {k}: the branch-free estimator (ceiling: {ceiling}) differs from the cond path"
  # the same steps without the ceiling overflow: with it, its branch ran (and changed the payloads)
  off, _, _ = _run("cond", monkeypatch, **{**kw, "max_fraction": 0.0})
  assert int(off[-1][1].overflow_steps) > 0, "no overflow step: the ceiling's branch was not exercised"
  assert not _same(off, a)
  assert len(set(stages_a)) > 1, f"the stage count never adapted: {stages_a}"
  conds, unknown = _host_round_trips(hlo_a)
  assert conds == 2 and unknown == 1          # the floor's and the ceiling's cond, the stage loop
  assert _host_round_trips(hlo_b) == (0, 0)


def test_floor_binds_in_both_modes(monkeypatch):
  """Small Gaussian-like leaves: the exponential fit lands above every entry of some segments, and only the floor
  (``min_fraction``) makes them send; its search then runs in both modes with the same result."""
  def sent(mode, min_fraction):
    monkeypatch.setattr(sp, "_BRANCHES", mode)
    rng = np.random.default_rng(3)
    g = {n: jnp.asarray(rng.uniform(0.9, 1.0, s), jnp.float32) for n, s in _SHAPES.items()}
    tx = sidco(0.01, exact=False, per_tensor=True, stages=1, min_fraction=min_fraction)
    u, st = jax.jit(tx.update)(g, tx.init(g))
    return u, st

  without, _ = sent("cond", 0.0)
  with_cond, st_cond = sent("cond", 1.0)
  with_where, st_where = sent("where", 1.0)
  assert not _same(without, with_cond), "the floor did not bind: the test does not exercise it"
  assert _same((with_cond, st_cond), (with_where, st_where))


def test_where_under_shard_map(monkeypatch):
  """Four simulated devices, one axis: replicas identical and equal to the cond path."""
  devs = jax.devices()[:4]
  if len(devs) < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.asarray(devs), ("d",))
  rng = np.random.default_rng(5)
  grads = {n: jnp.asarray(rng.standard_cauchy((4,) + s), jnp.float32) for n, s in _SHAPES.items()}

  def run(mode):
    monkeypatch.setattr(sp, "_BRANCHES", mode)
    return replicated_updates(sidco(0.01, exact=False, axis_name="d", adapt_every=1), {n: jnp.zeros(s, jnp.float32) for n, s in _SHAPES.items()}, grads, mesh)

  a, b = run("cond"), run("where")
  assert _same(a, b)
  for leaf in jax.tree_util.tree_leaves(b):
    np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[3])


def test_auto_is_the_cond_path_off_gpu():
  assert sp._BRANCHES == "auto"
  assert sp._branch_free() == (jax.default_backend() == "gpu")


def test_bad_switch(monkeypatch):
  monkeypatch.setattr(sp, "_BRANCHES", "maybe")
  with pytest.raises(ValueError, match="_BRANCHES"):
    sidco(0.01, exact=False).update({"a": jnp.ones((64,))}, sidco(0.01, exact=False).init({"a": jnp.ones((64,))}))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ceiling_is_the_next_largest_magnitude(seed, monkeypatch):
  """``_seg_ceiling`` raises each segment's threshold to its ``(hi + 1)``-th largest magnitude (numpy), by the
  block select and by the bit search alike; with ties (quantized values), zeros and a segment with fewer than
  ``hi + 1`` non-zero entries (ceiling 0: the threshold is kept)."""
  rng = np.random.default_rng(seed)
  sizes = [5000, 300, 9000, 40]
  lay = sp._Layout(sizes, [[0], [1, 2], [3]])
  leaves = [np.round(rng.standard_normal(n) * 4) / 4 for n in sizes]   # many ties
  leaves[0][rng.random(5000) < 0.5] = 0.0
  leaves[2] = leaves[2].astype(np.float32) * rng.choice([1.0, -1.0], 9000)
  leaves[3][:] = 0.0
  leaves[3][:3] = [0.5, -0.25, 0.5]                                    # 3 non-zero entries, hi >= 3
  flat = lay.flatten([jnp.asarray(v, jnp.float32) for v in leaves], jnp.float32)
  a_tiles = jnp.abs(flat).reshape(lay.num_tiles, sp._TILE)
  _, _, bmax = sp._block_stats(jnp.abs(flat))
  hi_max = np.asarray([60, 90, 7], np.int64)
  hi = jnp.asarray(rng.integers(3, hi_max + 1), jnp.int32)
  t = jnp.asarray([0.1, 0.0, 0.2], jnp.float32)
  want = []
  for g, (lo_leaf, n_leaves) in enumerate([(0, 1), (1, 2), (3, 1)]):
    seg = np.abs(np.concatenate([np.asarray(leaves[i], np.float32) for i in range(lo_leaf, lo_leaf + n_leaves)]))
    h = int(hi[g])
    v = np.sort(seg)[::-1][h] if seg.size > h else 0.0
    assert np.sum(seg > v) <= h and (v == 0 or np.sum(seg >= v) > h)
    want.append(max(float(t[g]), float(v)))
  for mode in ("blocks", "search"):
    monkeypatch.setattr(sp, "_CEILING", mode)
    got = np.asarray(sp._seg_ceiling(t, a_tiles, bmax, lay, hi, flat, hi_max))
    np.testing.assert_array_equal(got, np.asarray(want, np.float32), err_msg=mode)
  assert want[2] == pytest.approx(0.2)   # fewer than hi + 1 non-zero entries: the threshold stays
  monkeypatch.setattr(sp, "_CEILING", "sort")
  with pytest.raises(ValueError, match="_CEILING"):
    sp._seg_ceiling(t, a_tiles, bmax, lay, hi, flat, hi_max)


@pytest.mark.parametrize("keys_only", [False, True])
def test_ceiling_of_a_full_segment_below_its_count_is_zero(keys_only, monkeypatch):
  """A segment of exactly one tile (no padding zeros) and ``hi >= `` its size: every entry may be kept, so the
  ceiling is 0 and the threshold stays (the block select must not return the segment's smallest entry)."""
  monkeypatch.setattr(sp, "_KTH_KEYS_ONLY", keys_only)
  rng = np.random.default_rng(7)
  lay = sp._Layout([4096], [[0]])
  flat = lay.flatten([jnp.asarray(rng.uniform(1.0, 2.0, 4096), jnp.float32)], jnp.float32)
  a_tiles = jnp.abs(flat).reshape(lay.num_tiles, sp._TILE)
  _, _, bmax = sp._block_stats(jnp.abs(flat))
  t = jnp.asarray([0.5], jnp.float32)
  for hi in (4096, 4095):
    want = 0.5 if hi == 4096 else float(np.sort(np.abs(np.asarray(flat)))[0])   # the 4096-th largest = the smallest
    for mode in ("blocks", "search"):
      monkeypatch.setattr(sp, "_CEILING", mode)
      got = sp._seg_ceiling(t, a_tiles, bmax, lay, jnp.asarray([hi], jnp.int32), flat, np.asarray([hi]))
      assert float(got[0]) == np.float32(want), (hi, mode)


def test_traced_ratio_schedule_and_a_stage_count_above_the_bound(monkeypatch):
  """A traced ratio (``optax.inject_hyperparams``, ``max_ratio``): the ceiling's count is traced, so the block select
  is not used (the search is), and the stages keep their ``while_loop``; the payloads stay those of the cond path.
  A state whose stage count is above the bound (another ratio's state) runs the bound's stages in both paths."""
  import optax

  # one 9000-entry leaf: k = 90 and max_fraction * k = 31.5, which float32 rounds to 32 and float64 to 31 (a bound
  # computed in float64 would be one short of the traced count)
  shapes = {"a": (9000,)}

  def grad(rng, k):
    return {"a": jnp.asarray(rng.standard_cauchy(9000) if k % 2 == 0 else rng.standard_normal(9000), jnp.float32)}

  def run(mode, stages_override=None, ceiling="blocks"):
    monkeypatch.setattr(sp, "_BRANCHES", mode)
    monkeypatch.setattr(sp, "_CEILING", ceiling)
    rng = np.random.default_rng(11)
    params = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
    if stages_override is None:
      tx = optax.inject_hyperparams(sidco, static_args=("max_ratio", "exact", "max_fraction", "capacity_factor"))(
          ratio=0.01, max_ratio=0.01, exact=False, max_fraction=0.35, capacity_factor=1.2)
    else:
      tx = sidco(0.01, exact=False)
    st = tx.init(params)
    if stages_override is not None:
      st = st._replace(stages=jnp.asarray(stages_override, st.stages.dtype))
    upd = jax.jit(tx.update)
    outs = []
    for k in range(4):
      u, st = upd(grad(rng, k), st)
      outs.append((u, st))
    return outs

  a = run("cond", ceiling="search")
  assert int(a[-1][1].inner_state.overflow_steps) == 0          # the ceiling holds every payload
  assert _same(a, run("where", ceiling="blocks")) and _same(a, run("cond", ceiling="blocks"))
  bound = sp.max_stages(0.01)
  above = run("cond", bound + 2)
  assert _same(above, run("where", bound + 2))
  assert _same(above[0][0], run("cond", bound)[0][0])   # clipped to the bound
