"""Tests of mlsys_jax.comm.lowrank: orthogonalization, PowerSGD steps, error feedback, collectives, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import lowrank as lr

from _trees import grads as _grads, params as _params  # tests/_trees.py


def _low_rank_matrix(n, m, svals, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(n, len(svals))))
  v, _ = np.linalg.qr(rng.normal(size=(m, len(svals))))
  return (u * np.asarray(svals)) @ v.T


def test_matrix_shape_convention():
  assert lr.matrix_shape((3, 3, 16, 32)) == (144, 32)   # HWIO -> (H*W*I, O)
  assert lr.matrix_shape((64, 10)) == (64, 10)
  with pytest.raises(ValueError, match="rank >= 2"):
    lr.matrix_shape((5,))


def test_orthogonalize_full_rank_and_rank_deficient():
  a = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
  q = np.asarray(lr.orthogonalize(jnp.asarray(a)), np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)
  np.testing.assert_allclose(q @ (q.T @ a), a, atol=1e-4)          # same column space
  # rank-deficient: a repeated (scaled) column and a zero column
  b = np.stack([a[:, 0], 2 * a[:, 0], a[:, 1], np.zeros(50, np.float32)], axis=1)
  qb = np.asarray(lr.orthogonalize(jnp.asarray(b)), np.float64)
  assert np.all(np.isfinite(qb))
  norms = np.linalg.norm(qb, axis=0)
  np.testing.assert_allclose(norms, [1, 0, 1, 0], atol=1e-6)
  np.testing.assert_allclose(qb.T @ qb, np.diag([1, 0, 1, 0]), atol=1e-5)
  np.testing.assert_allclose(qb @ (qb.T @ b), b, atol=1e-4)


def test_one_step_matches_numpy_float64():
  m = np.random.default_rng(1).normal(size=(30, 12))
  q0 = np.random.default_rng(2).normal(size=(12, 3))
  approx, p, qn = lr.powersgd_step(jnp.asarray(m, jnp.float32), jnp.asarray(q0, jnp.float32))
  pq, _ = np.linalg.qr(m @ q0)                  # orthonormal basis of span(M Q0)
  ref = pq @ (pq.T @ m)                         # P P^T M == P Q^T with Q = M^T P
  np.testing.assert_allclose(np.asarray(approx), ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(qn), m.T @ np.asarray(p, np.float64), atol=1e-4)


@pytest.mark.parametrize("r", [1, 3])
def test_warm_start_iterations_reach_best_rank_r(r):
  svals = [10.0, 7.0, 5.0, 2.0, 1.0, 0.5]
  m64 = _low_rank_matrix(60, 25, svals)
  best = np.sqrt(np.sum(np.square(svals[r:])))     # Eckart-Young: error of the truncated SVD
  m = jnp.asarray(m64, jnp.float32)
  q = jax.random.normal(jax.random.PRNGKey(0), (25, r))
  step = jax.jit(lr.powersgd_step)
  errs = []
  for _ in range(40):
    approx, _, q = step(m, q)
    errs.append(np.linalg.norm(np.asarray(approx, np.float64) - m64))
  assert errs[0] > best * (1 + 1e-3)       # one step from a random start is not yet optimal
  np.testing.assert_allclose(errs[-1], best, rtol=1e-3)


def test_error_feedback_invariant_and_bytes():
  tx = lr.powersgd(2)
  params = _params()
  st = tx.init(params)
  upd = jax.jit(tx.update)
  per_step = (36 + 8) * 2 * 4 + (40 + 10) * 2 * 4 + 10 * 4
  assert lr.powersgd_bytes(params, 2) == per_step
  for i in range(4):
    g = _grads(i)
    before = st.residual
    out, st = upd(g, st)
    for k in g:
      acc = np.asarray(g[k] + before[k])
      # residual is exactly the float32 difference accumulated - sent, so no gradient mass is lost
      np.testing.assert_array_equal(np.asarray(st.residual[k]), acc - np.asarray(out[k]))
      np.testing.assert_allclose(np.asarray(out[k] + st.residual[k]), acc, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["bias"]), np.asarray(g["bias"]))   # dense leaf
    assert not np.any(np.asarray(st.residual["bias"]))
    # the compressed leaves really are rank 2
    assert np.linalg.matrix_rank(np.asarray(out["dense"]), tol=1e-4) == 2
    assert float(st.bytes_sent) == per_step
  assert float(st.total_bytes) == 4 * per_step and lr.total_bytes(st) == 4 * per_step
  assert lr.total_bytes(optax.chain(tx, optax.sgd(0.1)).init(params)) == 0.0


def test_fixed_gradient_converges_with_error_feedback():
  # With a constant gradient, error feedback makes the average update approach the gradient.
  g = {"w": jnp.asarray(_low_rank_matrix(30, 20, [5.0, 4.0, 3.0, 2.0, 1.0]), jnp.float32)}
  tx = lr.powersgd(1)
  st = tx.init(g)
  upd = jax.jit(tx.update)
  total = jnp.zeros_like(g["w"])
  for _ in range(200):
    out, st = upd(g, st)
    total = total + out["w"]
  rel = float(jnp.linalg.norm(total / 200 - g["w"]) / jnp.linalg.norm(g["w"]))
  assert rel < 0.05, rel


def test_collective_equals_single_device_on_mean(devices):
  mesh = Mesh(np.array(devices), ("d",))
  params = _params()
  steps = 3
  per_worker = [[_grads(10 * s + w) for w in range(8)] for s in range(steps)]
  stacked = [jax.tree_util.tree_map(lambda *x: jnp.stack(x), *gs) for gs in per_worker]
  tx = lr.powersgd(2, axis_name="d")
  ref_tx = lr.powersgd(2)

  def run(gs):
    st = tx.init(params)
    outs = []
    for g in gs:
      out, st = tx.update(jax.tree_util.tree_map(lambda x: x[0], g), st)
      outs.append(jax.tree_util.tree_map(lambda x: x[None], out))
    return outs, st.bytes_sent[None]

  spec = jax.tree_util.tree_map(lambda _: P("d"), params)
  f = shard_map(run, mesh=mesh, in_specs=([spec] * steps,), out_specs=([spec] * steps, P("d")),
                check_vma=False)
  outs, nbytes = jax.jit(f)(stacked)
  st = ref_tx.init(params)
  for s in range(steps):
    mean_g = jax.tree_util.tree_map(lambda x: x.mean(0), stacked[s])
    ref, st = ref_tx.update(mean_g, st)
    for k in params:
      o = np.asarray(outs[s][k])
      np.testing.assert_allclose(o, np.broadcast_to(o[0], o.shape), rtol=0, atol=0)   # devices agree
      np.testing.assert_allclose(o[0], np.asarray(ref[k]), rtol=2e-4, atol=2e-5)
  assert np.all(np.asarray(nbytes) == lr.powersgd_bytes(params, 2))


def test_nonfinite_step_is_skipped_everywhere(devices):
  tx = lr.powersgd(2)
  params = _params()
  _, st = tx.update(_grads(0), tx.init(params))
  bad = _grads(1)
  bad["dense"] = bad["dense"].at[3, 4].set(jnp.inf)
  out, st2 = jax.jit(tx.update)(bad, st)
  assert int(st2.nonfinite_steps) == 1 and float(st2.bytes_sent) == 0.0
  assert all(float(jnp.abs(o).sum()) == 0.0 for o in jax.tree_util.tree_leaves(out))
  for a, b in zip(jax.tree_util.tree_leaves((st.residual, st.q)), jax.tree_util.tree_leaves((st2.residual, st2.q))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # with a collective: one NaN worker makes every worker skip (parameters stay in sync)
  mesh = Mesh(np.array(devices), ("d",))
  txd = lr.powersgd(1, axis_name="d")
  g = jax.random.normal(jax.random.PRNGKey(3), (8, 12, 6)).at[5, 0, 0].set(jnp.nan)

  def step(g):
    out, s = txd.update({"w": g[0]}, txd.init({"w": g[0]}))
    return out["w"][None], s.nonfinite_steps[None]

  o, nf = jax.jit(shard_map(step, mesh=mesh, in_specs=(P("d"),), out_specs=(P("d"), P("d")),
                            check_vma=False))(g)
  assert np.all(np.asarray(nf) == 1) and not np.any(np.asarray(o))


def test_zero_gradient_keeps_warm_start():
  tx = lr.powersgd(2)
  p = {"w": jnp.zeros((20, 6))}
  st = tx.init(p)
  out, st2 = tx.update({"w": jnp.zeros((20, 6))}, st)
  assert not np.any(np.asarray(out["w"])) and np.all(np.isfinite(np.asarray(st2.q[0])))
  np.testing.assert_array_equal(np.asarray(st2.q[0]), np.asarray(st.q[0]))
  g = {"w": jnp.asarray(_low_rank_matrix(20, 6, [3.0]), jnp.float32)}   # rank 1 < requested 2
  out, st3 = tx.update(g, st2)
  np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(g["w"]), atol=1e-5)
  out_jit, _ = jax.jit(tx.update)(g, st2)    # jit and eager agree (up to fusion rounding)
  np.testing.assert_allclose(np.asarray(out_jit["w"]), np.asarray(out["w"]), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="rank"):
    lr.powersgd(0)
  with pytest.raises(TypeError, match="rank"):
    lr.powersgd(1.5)
  with pytest.raises(ValueError, match="clamp_rank"):
    lr.powersgd(4).init({"w": jnp.zeros((3, 100))})
  st = lr.powersgd(4, clamp_rank=True).init({"w": jnp.zeros((3, 100))})
  assert st.q[0].shape == (100, 3)
  assert lr.powersgd(4, min_size=301).init({"w": jnp.zeros((3, 100))}).q[0] is None   # sent dense
  with pytest.raises(TypeError, match="floating-point"):
    lr.powersgd(1).init({"w": jnp.zeros((4, 4), jnp.int32)})
  with pytest.raises(ValueError, match="empty"):
    lr.powersgd(1).init({})
  tx = lr.powersgd(1, axis_name="batch")
  with pytest.raises(NameError, match="not bound"):
    tx.update({"w": jnp.ones((4, 4))}, tx.init({"w": jnp.ones((4, 4))}))
  with pytest.raises(ValueError, match="matrix"):
    lr.orthogonalize(jnp.ones((3,)))


def test_powersgd_layout_ranks_dense_leaves_and_errors():
  params = {"b": jnp.zeros((10,)), "d": jnp.zeros((5, 2)), "w": jnp.zeros((3, 3, 4, 8))}   # flatten: b, d, w
  assert lr.powersgd_layout(params, 2) == [0, 2, 2]
  assert lr.powersgd_layout(params, 2, min_size=50) == [0, 0, 2]     # d has 10 < 50 entries
  with pytest.raises(ValueError, match="rank"):
    lr.powersgd_layout(params, 3)                                    # d is 5 x 2
  assert lr.powersgd_layout(params, 3, clamp_rank=True) == [0, 2, 3]
