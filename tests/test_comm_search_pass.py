"""The counting search of sidco's exact selection with one Pallas kernel per pass (``sparse._COUNT_PASS``):
``_pallas_pack.search_pass`` / ``search_bits`` / ``search_finish`` (one segment; per tensor:
tests/test_comm_seg_search_pass.py) against ``sparse._search_bits``, and the transform against its XLA passes and
against the block select, bitwise (Pallas interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.comm import _pallas_pack as pp
from mlsys_jax.comm import sparse as sp
from _trees import nan_and_tie_steps, pmap_one_bad_worker_under_modes, vmapped_under_modes  # tests/_trees.py
from _triton import triton_ir  # tests/_triton.py

pytestmark = pytest.mark.skipif(not pp.available(), reason="needs jax.experimental.pallas.triton")

bits = lambda x: np.asarray(x).view(np.int32) if np.asarray(x).dtype == np.float32 else np.asarray(x)


def _xla_search(x, k, ways):
  top = jax.lax.bitcast_convert_type(jnp.nanmax(x), jnp.int32)
  ok = lambda tm: jnp.sum(x[:, None] > tm[0][None, :], axis=0)[None] >= k
  return sp._search_bits(ok, top[None], keep_low=True, ways=ways)[0], top


@pytest.mark.parametrize("n,k,ways", [(3 * pp.PASS_CHUNK + 77, 500, 16), (5000, 7, 8),
                                      pytest.param(20000, 1, 16, marks=pytest.mark.slow),   # (~5 s in the slow suite)
                                      (9000, 9000, 16),   # (k = n: also above the positives, as 12000 below)
                                      pytest.param(9000, 12000, 16, marks=pytest.mark.slow),
                                      pytest.param(64, 3, 4, marks=pytest.mark.slow),   # (4 ways: no default; ~7 s)
                                      pytest.param(pp.PASS_CHUNK, 40, 32, marks=pytest.mark.slow)])
def test_search_bits_is_the_xla_search(n, k, ways):
  """The largest threshold with at least k entries above it: the XLA search's bits, with zeros, ties, a NaN
  (never counted), k = 1, k = n and k above the positives (0); one program or several, a ragged last one."""
  rng = np.random.default_rng(n + k)
  x = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(10.0 ** rng.integers(-4, 2))
  x[:: 7] = np.round(x[:: 7], 1)          # ties
  x[5] = 0.0
  x[11] = np.nan
  x = jnp.asarray(x)
  want, top = _xla_search(x, k, ways)
  run = jax.jit(lambda x, k, top, lo: pp.search_bits(x, k, top, lo, ways=ways, interpret=True))
  got = run(x, jnp.int32(k), top, jnp.int32(0))
  assert bits(got) == bits(want)
  # from any start with at least k entries above it (every bits <= the answer's): the same answer
  assert bits(run(x, jnp.int32(k), top, jnp.int32(max(0, int(bits(want)) - 1000)))) == bits(want)
  above = int(jnp.sum(x > got))
  assert above >= min(k, int(jnp.sum(x > 0))) and (k > int(jnp.sum(x > 0)) or float(got) > 0 or above >= k)


def test_search_pass_replays_the_earlier_passes_and_fills_its_row():
  """Pass j: the bounds replayed from the earlier rows' totals exactly as ``_search_bits``' body narrows them, the
  entries above this pass's thresholds counted into row j (atomics over several programs and a ragged last one),
  the other rows untouched."""
  x = jnp.asarray(np.linspace(0.0, 1.0, 2 * pp.PASS_CHUNK + 5, dtype=np.float32))
  top = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
  tk = jnp.stack([jnp.int32(0), top, jnp.int32(100)])
  c0 = jnp.zeros((3 * 8,), jnp.int32)
  c1 = pp.search_pass(x, tk, c0, 0, ways=8, interpret=True)
  mids0 = pp._search_mids(jnp.int32(0), top, 8)
  want0 = (x[:, None] > jax.lax.bitcast_convert_type(mids0, jnp.float32)[None, :]).sum(0)
  np.testing.assert_array_equal(np.asarray(c1[:8]), np.asarray(want0))
  assert not np.asarray(c1[8:]).any()
  c2 = pp.search_pass(x, tk, c1, 1, ways=8, interpret=True)
  lo, hi = pp._search_step(jnp.int32(0), top, want0, 100, 8)
  mids1 = jax.lax.bitcast_convert_type(pp._search_mids(lo, hi, 8), jnp.float32)
  np.testing.assert_array_equal(np.asarray(c2[8:16]), np.asarray((x[:, None] > mids1[None, :]).sum(0)))
  np.testing.assert_array_equal(np.asarray(c2[:8]), np.asarray(c1[:8]))
  assert int(lo) < int(hi) and not np.asarray(c2[16:]).any()


def test_closed_bounds_read_nothing_and_keep_the_answer():
  """A pass whose replayed bounds have closed (hi - lo <= 1: the answer is lo) adds nothing, one segment and per
  segment, and the finish returns lo; a segment still open beside a closed one is counted."""
  x = jnp.asarray(np.linspace(0.0, 1.0, 3000, dtype=np.float32))
  b = jax.lax.bitcast_convert_type(jnp.float32(0.5), jnp.int32)
  bounds = jnp.stack([b, b + 1, jnp.int32(10)])
  c = pp.search_pass(x, bounds, jnp.zeros((16,), jnp.int32), 0, ways=8, interpret=True)
  assert not np.asarray(c).any()
  assert bits(pp.search_finish(bounds, c, ways=8, interpret=True)) == int(b)
  rows = x[:2048].reshape(32, 64)
  seg = jnp.asarray(np.repeat([0, 1], 16), jnp.int32)
  top = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)
  sb = jnp.stack([jnp.stack([b, jnp.int32(0)]), jnp.stack([b + 1, top]), jnp.asarray([10, 10], jnp.int32)])
  c = pp.seg_search_pass(rows, seg, sb, jnp.zeros((2 * 3 * 8,), jnp.int32), 0, ways=8, interpret=True)
  c = np.asarray(c).reshape(2, 3, 8)
  assert not c[0, 0].any() and c[0, 1].sum() > 0 and not c[1].any()


def test_search_pass_bad_input():
  x = jnp.ones((100,), jnp.float32)
  tk = jnp.asarray([0, 100, 3], jnp.int32)
  c = jnp.zeros((16,), jnp.int32)
  with pytest.raises(ValueError, match="1-D float32"):
    pp.search_pass(x.astype(jnp.bfloat16), tk, c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pp.search_pass(x, tk, c, 0, ways=6, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pp.search_bits(x, 3, 100, ways=1, interpret=True)
  with pytest.raises(ValueError, match="bounds must be int32"):
    pp.search_pass(x, tk.astype(jnp.float32), c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="bounds must be int32"):
    pp.search_pass(x, tk[1:], c, 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="counters must be int32"):
    pp.search_pass(x, tk, c, 2, ways=8, interpret=True)
  with pytest.raises(ValueError, match="counters must be int32"):
    pp.search_pass(x, tk, jnp.zeros((12,), jnp.int32), 0, ways=8, interpret=True)
  with pytest.raises(ValueError, match="counters must be int32"):
    pp.search_finish(tk, jnp.zeros((12,), jnp.int32), ways=8, interpret=True)


@pytest.mark.parametrize("kw", [dict(), pytest.param(dict(flat_state=True), marks=pytest.mark.slow),   # (the same
                                pytest.param(dict(ratio=0.3), marks=pytest.mark.slow)])           # search, ~8 s)
def test_sidco_with_one_kernel_per_pass_is_bitwise_the_xla_passes_and_the_block_select(kw, monkeypatch):
  """sidco (tree or flat residual; one segment) with the counting search's passes as kernels: updates and
  states bitwise those of the block select (the default, which the XLA passes equal), over a NaN step and a step
  with ties at the cut; the kernels really run."""
  kw = dict(kw)
  ratio = kw.pop("ratio", 0.02)
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  res = {}
  for search, passes in (("counts", "pallas"), ("blocks", "xla")):   # (counts with XLA's passes = blocks:
    monkeypatch.setattr(sp, "_EXACT_SEARCH", search)                    # tests/test_comm_sparse.py)
    monkeypatch.setattr(sp, "_COUNT_PASS", passes)
    res[search, passes] = nan_and_tie_steps(sp.sidco(ratio, **kw), 7)
  for x, y in zip(jax.tree_util.tree_leaves(res["counts", "pallas"]), jax.tree_util.tree_leaves(res["blocks", "xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  assert int(res["counts", "pallas"][1][1].nonfinite_steps) == 1
  calls = []
  real = pp.search_pass
  monkeypatch.setattr(pp, "search_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "counts")
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")
  g = {"a": jnp.ones((30, 40)), "b": jnp.ones((40,))}
  tx = sp.sidco(0.02, **kw)
  jax.make_jaxpr(tx.update)(g, tx.init(g))
  assert sp._PASS_WAYS == 16 and sp._SEARCH_WAYS == 8   # (the kernels' ways, not the XLA passes')
  assert len(calls) == 2 * -(-31 // 4)   # two levels, ceil(31 / log2 16) passes each


def test_one_kernel_per_pass_under_vmap(monkeypatch):
  """Vmapped (three workers' states): bitwise the XLA passes (per tensor: tests/test_comm_seg_search_pass.py); an
  unknown mode is refused by name."""
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "counts")
  monkeypatch.setattr(sp, "_SEARCH_WAYS", 16)
  res = vmapped_under_modes(monkeypatch, sp, "_COUNT_PASS", ("pallas", "xla"), lambda: sp.sidco(0.02))
  for x, y in zip(jax.tree_util.tree_leaves(res["pallas"]), jax.tree_util.tree_leaves(res["xla"])):
    np.testing.assert_array_equal(bits(x), bits(y))
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")
  assert sp._count_pass_mode(jnp.ones(8))[0]
  monkeypatch.setattr(sp, "_COUNT_PASS", "kernel")
  with pytest.raises(ValueError, match="_COUNT_PASS"):
    sp._count_pass_mode(jnp.ones(8))


def test_zero_counters_are_zero_for_every_k():
  """The counters' zero init is computed from the bounds (not folded to a constant): zero for every k (negative,
  zero, positive)."""
  for k in (-5, 0, 7):
    z = jax.jit(lambda b: pp._zero_counters(12, b))(jnp.asarray([0, 9, k], jnp.int32))
    assert z.dtype == jnp.int32 and z.shape == (12,) and not np.any(np.asarray(z))


def test_auto_runs_the_kernels_compiled_on_a_gpu_for_one_segment_only(monkeypatch):
  """The defaults (``_EXACT_SEARCH = _COUNT_PASS = "auto"``): on a GPU the counting search with one compiled kernel
  per pass for one segment, the block select for several segments and inside ``shard_map``; off a GPU the block
  select and the XLA passes (never the interpreter); an explicit choice is kept; a bad one is refused by name."""
  assert (sp._EXACT_SEARCH, sp._COUNT_PASS) == ("auto", "auto")
  x = jnp.ones(8)
  assert sp._count_pass_mode(x) == (False, False)
  assert [sp._exact_search(x, n) for n in (1, 3)] == ["blocks", "blocks"]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert sp._count_pass_mode(x) == (True, False)
  assert [sp._exact_search(x, n) for n in (1, 3)] == ["counts", "blocks"]
  monkeypatch.setattr(sp, "_varying", lambda v: True)                 # (inside shard_map: the XLA path)
  assert sp._count_pass_mode(x) == (False, False) and sp._exact_search(x, 1) == "blocks"
  monkeypatch.undo()
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")                    # (explicit: the interpreter off a GPU)
  assert sp._count_pass_mode(x) == (True, True) and sp._exact_search(x, 1) == "blocks"
  for name in ("bits", "counts", "blocks"):
    monkeypatch.setattr(sp, "_EXACT_SEARCH", name)
    assert sp._exact_search(x, 1) == sp._exact_search(x, 4) == name
  monkeypatch.setattr(sp, "_EXACT_SEARCH", "sorts")
  with pytest.raises(ValueError, match="_EXACT_SEARCH"):
    sp._exact_search(x, 1)


def test_auto_on_a_gpu_traces_the_pass_kernels_for_one_segment(monkeypatch):
  """With the defaults on a GPU (the backend forced here; traced only, nothing compiled) a one-segment sidco traces
  the counting search's pass kernels (two levels of ceil(31 / log2 16) passes) and a per-tensor one traces none."""
  segs, resolve = [], sp._exact_search
  monkeypatch.setattr(sp, "_exact_search", lambda flat, n: segs.append(n) or resolve(flat, n))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  calls, seg_calls = [], []
  real, seg_real = pp.search_pass, pp.seg_search_pass
  monkeypatch.setattr(pp, "search_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
  monkeypatch.setattr(pp, "seg_search_pass", lambda *a, **k: seg_calls.append(1) or seg_real(*a, **k))
  g = {"a": jnp.ones((300, 40)), "b": jnp.ones((40, 100))}
  for per_tensor, want in ((False, 2 * 8), (True, 0)):
    calls.clear()
    segs.clear()
    tx = sp.sidco(0.02, per_tensor=per_tensor)
    jax.make_jaxpr(tx.update)(g, tx.init(g))
    assert (len(calls), len(seg_calls)) == (want, 0)
    assert set(segs) == ({2} if per_tensor else {1})   # (per tensor: one segment per leaf)


def test_one_kernel_per_pass_compiled_on_a_gpu_interpreted_elsewhere(monkeypatch):
  """The switch runs the compiled kernels on a GPU (checked there in session 35; session 34's refusal removed) and
  the interpreter elsewhere; the XLA passes are unaffected."""
  monkeypatch.setattr(sp, "_COUNT_PASS", "pallas")
  assert sp._count_pass_mode(jnp.ones(8)) == (True, True)          # (CPU: the interpreter)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert sp._count_pass_mode(jnp.ones(8)) == (True, False)
  monkeypatch.setattr(sp, "_COUNT_PASS", "xla")
  assert sp._count_pass_mode(jnp.ones(8)) == (False, False)


def test_integer_atomics_lower_to_an_integer_add(monkeypatch):
  """Both pass kernels add their int32 counts with ``tt.atomic_rmw add``. Session 35's device check found every
  compiled count zero: ``plgpu.atomic_add`` of an int32 vector lowers to ``fadd`` (the counts' bits added as
  floats), which the interpreter, the only place the CPU tests run the kernels, does not show."""
  b1 = jnp.asarray([0, 2**30, 100], jnp.int32)
  one = triton_ir(lambda x, b, c: pp.search_pass(x, b, c, 1, ways=16, interpret=False),
                  jnp.ones((8192,), jnp.float32), b1, jnp.zeros((8 * 16,), jnp.int32), monkeypatch=monkeypatch)
  seg = triton_ir(lambda r, s, b, c: pp.seg_search_pass(r, s, b, c, 1, ways=16, interpret=False),
                  jnp.ones((64, 64), jnp.float32), jnp.zeros((64,), jnp.int32), jnp.zeros((3, 5), jnp.int32),
                  jnp.zeros((8 * 6 * 16,), jnp.int32), monkeypatch=monkeypatch)
  for name, ir in (("search_pass", one), ("seg_search_pass", seg)):
    ops = [ln.split("tt.atomic_rmw", 1)[1].split(",")[0].strip() for ln in ir.splitlines() if "tt.atomic_rmw" in ln]
    assert ops == ["add"], (name, ops)


@pytest.mark.parametrize("kw", [dict(), pytest.param(dict(flat_state=True), marks=pytest.mark.slow)])   # (~10 s)
def test_pass_kernels_under_pmap_with_one_bad_worker(kw, monkeypatch):
  """The GPU default for one segment (the counting search, one kernel per pass; interpreted here) under pmap (2
  devices) with a NaN on one worker: every replica skips the step, the averaged updates are identical across
  replicas, and updates and states equal the block select's bitwise."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  monkeypatch.setattr(sp, "_TRANSFORM_PACKING", "pallas")
  calls, real = [], pp.search_pass
  monkeypatch.setattr(pp, "search_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
  res = pmap_one_bad_worker_under_modes(
      monkeypatch, sp, {"counts": {"_EXACT_SEARCH": "counts", "_COUNT_PASS": "pallas"},
                        "blocks": {"_EXACT_SEARCH": "blocks", "_COUNT_PASS": "xla"}},
      lambda: sp.sidco(0.02, axis_name="d", **kw), seed=5)
  assert calls and len(calls) % (2 * 8) == 0   # (the kernels ran under pmap: two levels of 8 passes per trace)
  for x, y in zip(jax.tree_util.tree_leaves(res["counts"]), jax.tree_util.tree_leaves(res["blocks"])):
    np.testing.assert_array_equal(bits(x), bits(y))
