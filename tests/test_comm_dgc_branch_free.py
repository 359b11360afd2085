"""DGC's second round without a ``lax.cond`` (``sparse._BRANCHES = "where"``, the GPU default since session 24).

On steps where more than DGC's payload capacity exceed the sampled threshold, the second round keeps Top-k's set
(magnitude descending, ties to the lower index, as ``lax.top_k``). It is now the block select of
``sidco(exact=True)`` on one segment (:func:`sparse._topk_set_payload`), run under ``lax.cond`` (CPU default) or
every step and selected elementwise (GPU default, no predicate to the host). Both paths must give bitwise the same
updates and states, the set must be ``lax.top_k``'s, and the branch-free update must compile with no conditional.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mlsys_jax.comm import dgc
from mlsys_jax.comm import sparse as sp

from _trees import replicated_updates  # tests/_trees.py

_SHAPES = {"a": (3, 3, 16, 32), "b": (32,), "c": (256, 128), "d": (1000,)}


def _grad(rng, k):
  # every other step one leaf holds +-1 everywhere and the rest less: the sampled threshold is 1, every entry
  # of that leaf reaches it, far more than the 2k payload slots: the second round runs and cuts the ties to
  # the lower index; the other steps heavy-tailed
  if k % 2 == 0:
    g = {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in _SHAPES.items()}
    g["c"] = np.where(rng.random(_SHAPES["c"]) < 0.5, -1.0, 1.0).astype(np.float32)
    return {n: jnp.asarray(v) for n, v in g.items()}
  return {n: jnp.asarray(rng.standard_cauchy(s), jnp.float32) for n, s in _SHAPES.items()}


def _run(mode, monkeypatch, steps=8, **kw):
  monkeypatch.setattr(sp, "_BRANCHES", mode)
  params = {n: jnp.zeros(s, jnp.float32) for n, s in _SHAPES.items()}
  tx = dgc(0.01, **kw)
  st = tx.init(params)
  upd = jax.jit(tx.update)
  hlo = upd.lower(_grad(np.random.default_rng(1), 1), st).compile().as_text()
  rng = np.random.default_rng(0)
  outs = []
  for k in range(steps):
    u, st = upd(_grad(rng, k), st)
    outs.append((u, st))
  return outs, hlo


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("kw", [dict(), dict(per_tensor=True), pytest.param(dict(exact=True), marks=pytest.mark.slow),
                                pytest.param(dict(flat_state=True), marks=pytest.mark.slow)],
                         ids=["flat", "per_tensor", "exact", "flat_state"])   # (exact, flat_state: slow suite, ~5 s)
def test_where_equals_cond_bitwise(kw, monkeypatch):
  (cond_out, cond_hlo), (where_out, where_hlo) = (_run(m, monkeypatch, **kw) for m in ("cond", "where"))
  assert len(re.findall(r"\bconditional\(", cond_hlo)) >= 1
  assert len(re.findall(r"\bconditional\(", where_hlo)) == 0
  for (u1, s1), (u2, s2) in zip(cond_out, where_out):
    assert _same(u1, u2) and _same(s1, s2)
  # the second round ran: on the step with the block of large entries DGC sent exactly k entries
  n = sum(int(np.prod(s)) for s in _SHAPES.values())
  first = cond_out[0][1]
  if not kw:
    assert int(first.density * n + 0.5) == max(1, round(0.01 * n))


def test_second_round_is_top_k_set(monkeypatch):
  """On an overflow step the updates are the aggregate of ``lax.top_k``'s entries of the gradient."""
  monkeypatch.setattr(sp, "_BRANCHES", "where")
  rng = np.random.default_rng(3)
  g = _grad(rng, 0)
  params = {n: jnp.zeros(s, jnp.float32) for n, s in _SHAPES.items()}
  tx = dgc(0.01)
  u, _ = jax.jit(tx.update)(g, tx.init(params))
  flat = np.concatenate([np.asarray(g[n]).reshape(-1) for n in sorted(_SHAPES)])
  got = np.concatenate([np.asarray(u[n]).reshape(-1) for n in sorted(_SHAPES)])
  k = max(1, round(0.01 * flat.size))
  idx = np.asarray(jax.lax.top_k(jnp.abs(jnp.asarray(flat)), k)[1])
  want = np.zeros_like(flat)
  want[idx] = flat[idx]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(10))
def test_topk_set_payload_matches_lax_top_k(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 20000)) if seed < 6 else int(rng.integers(1, 300))
  k_max = max(1, int(rng.integers(1, max(2, n // 8))))
  k = int(rng.integers(1, k_max + 1))
  x = rng.standard_normal(n).astype(np.float32)
  if seed % 2:
    x = np.round(x * 4) / 4                      # many ties at the cut
  if seed % 3 == 0:
    x[rng.random(n) < 0.7] = 0.0                 # fewer nonzeros than k sometimes
  if seed >= 8:                                  # most entries tied at the cut, larger ones after them
    x = np.ones(n, np.float32)
    x[rng.integers(0, n, size=max(1, n // 50))] = 3.0 * np.sign(rng.standard_normal(max(1, n // 50)))
  p = jax.jit(lambda v, kk: sp._topk_set_payload(v, kk, k_max, 2 * k_max))(jnp.asarray(x), jnp.int32(k))
  count = int(p.count)
  idx = np.asarray(p.indices)[:count]
  assert count <= k and not bool(p.overflow) and len(set(idx.tolist())) == count
  np.testing.assert_array_equal(np.asarray(p.values)[:count], x[idx])
  ref = np.asarray(jax.lax.top_k(jnp.abs(jnp.asarray(x)), k)[1])
  # lax.top_k also returns zeros when fewer than k entries are nonzero; those carry nothing
  assert set(i for i in idx if x[i] != 0) == set(i for i in ref if x[i] != 0)


def test_where_under_shard_map(monkeypatch):
  """Four simulated devices, one axis, an overflow on every worker: replicas identical and equal to the cond
  path."""
  devs = jax.devices()[:4]
  if len(devs) < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = Mesh(np.asarray(devs), ("d",))
  rng = np.random.default_rng(5)
  per = [_grad(rng, 2 * w) for w in range(4)]
  grads = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per)

  def run(mode):
    monkeypatch.setattr(sp, "_BRANCHES", mode)
    return replicated_updates(dgc(0.01, axis_name="d"), {n: jnp.zeros(s, jnp.float32) for n, s in _SHAPES.items()}, grads, mesh)

  a, b = run("cond"), run("where")
  assert _same(a, b)
  for leaf in jax.tree_util.tree_leaves(b):
    for w in range(1, 4):
      np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[w])


@pytest.mark.parametrize("mode", ["cond", "where"])
@pytest.mark.parametrize("capacity_factor", [1.0, 2.0])
def test_second_round_keeps_the_largest_behind_a_block_of_ties(mode, capacity_factor, monkeypatch):
  """More entries tie at the k-th magnitude than the payload holds, and the largest entries lie after them in
  index order: the second round must still send them (review of session 24: a pack of everything >= the k-th
  magnitude kept only its first slots in index order and dropped them)."""
  monkeypatch.setattr(sp, "_BRANCHES", mode)
  g = np.ones(10000, np.float32)
  g[-1], g[5000] = 100.0, -50.0
  tx = dgc(0.01, capacity_factor=capacity_factor)
  u, st = jax.jit(tx.update)({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros(10000)}))
  u = np.asarray(u["w"])
  idx = np.asarray(jax.lax.top_k(jnp.abs(jnp.asarray(g)), 100)[1])
  want = np.zeros_like(g)
  want[idx] = g[idx]
  np.testing.assert_array_equal(u, want)
  assert u[-1] == 100.0 and u[5000] == -50.0 and int(st.overflow_steps) == 0
