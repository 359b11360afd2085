"""Review s43 of PowerSGD / ACCORDION: 16-bit gradients (orthogonalize and warm start in range, the mean not
overflowing in the sum, a non-finite message skipped instead of poisoning the residual), ACCORDION's
detector sum in float32, size-0 Top-k leaves, gradients shaped unlike the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import accordion
from mlsys_jax.comm import lowrank as lr


def _gs64(p):
  """Gram-Schmidt in float64 (the reference's orthonormal P; columns of ``p`` are independent here)."""
  q, r = np.linalg.qr(p)
  return q * np.sign(np.diag(r))


def test_orthogonalize_float16_entries_whose_squares_overflow():
  p = np.random.default_rng(0).normal(size=(256, 2)) * 30   # squares ~ 1e3..1e4, column sums past 65504
  o = np.asarray(lr.orthogonalize(jnp.asarray(p, jnp.float16)), np.float64)
  assert o.dtype == np.float64 and lr.orthogonalize(jnp.asarray(p, jnp.float16)).dtype == jnp.float16
  np.testing.assert_allclose(o, _gs64(p.astype(np.float16).astype(np.float64)), atol=2e-3)


def test_powersgd_float16_under_shard_map_matches_float64_reference(devices):
  """8 workers, float16 gradients whose P and Q (the worker sums, and M Q with an unnormalised warm start)
  leave float16's range though the means do not: the same updates as float64 PowerSGD, the same on every
  replica, exact error feedback per worker, no step skipped."""
  mesh = Mesh(np.array(devices), ("d",))
  rng = np.random.default_rng(0)
  n, m, steps = 16, 256, 3
  base = rng.normal(size=(n, m))
  gs = [np.asarray((base + 0.3 * rng.normal(size=(8, n, m))) * 1500, np.float16) for _ in range(steps)]
  tx = lr.powersgd(1, axis_name="d")
  params = {"w": jnp.zeros((n, m), jnp.float16)}
  q0 = np.asarray(tx.init(params).q[0], np.float64)

  def run(*gs):
    st = tx.init(params)
    outs, res = [], []
    for g in gs:
      out, st = tx.update({"w": g[0]}, st)
      outs.append(out["w"][None])
      res.append(st.residual["w"][None])
    return outs, res, st.nonfinite_steps[None]

  spec = [P("d")] * steps
  outs, res, nf = jax.jit(shard_map(run, mesh=mesh, in_specs=tuple(spec), out_specs=(spec, spec, P("d")),
                                    check_vma=False))(*[jnp.asarray(g) for g in gs])
  assert np.all(np.asarray(nf) == 0)
  q, r64 = q0, np.zeros((8, n, m))
  prev_res = np.zeros((8, n, m))
  for s in range(steps):
    o, rs = np.asarray(outs[s], np.float64), np.asarray(res[s], np.float64)
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(rs))
    assert np.all(o == o[0])                                            # replicas agree bitwise
    accs = gs[s].astype(np.float64) + r64
    p = _gs64(np.mean(accs @ q, axis=0))
    q = np.mean(np.swapaxes(accs, 1, 2) @ p, axis=0)
    ref = p @ q.T
    r64 = accs - ref
    scale = np.abs(ref).max()
    np.testing.assert_allclose(o[0], ref, atol=2e-2 * scale)
    # error feedback: sent + new residual == gradient + old residual (float16 rounding)
    np.testing.assert_allclose(o + rs, gs[s].astype(np.float64) + prev_res, atol=4e-3 * scale)
    prev_res = rs


@pytest.mark.parametrize("make", [lambda: lr.powersgd(1), lambda: accordion("powersgd", low=2, high=1)],
                         ids=["powersgd", "accordion-powersgd"])
def test_float16_message_out_of_range_skips_the_step_and_keeps_the_residual(make):
  """Q = M^T P of a float16 matrix of 30000s is 120000 (inf): the step is skipped and counted; the residual
  stays finite, so the next steps are the float64 reference's (was NaN from then on, no step counted)."""
  tx = make()
  st = tx.init({"w": jnp.zeros((16, 8), jnp.float16)})
  up = jax.jit(tx.update)
  big = jnp.full((16, 8), 30000.0, jnp.float16)
  out, st = up({"w": big}, st)
  assert int(st.nonfinite_steps) == 1 and float(st.bytes_sent) == 0.0
  assert not np.any(np.asarray(out["w"])) and not np.any(np.asarray(st.residual["w"]))
  for _ in range(2):
    out, st = up({"w": jnp.ones((16, 8), jnp.float16)}, st)
    assert np.all(np.isfinite(np.asarray(st.residual["w"], np.float32)))
    np.testing.assert_allclose(np.asarray(out["w"], np.float64), 1.0, atol=2e-3)   # rank-1 ones: exact
  assert int(st.nonfinite_steps) == 1


def test_accordion_bfloat16_detector_window_sum_is_not_saturated():
  """Window 1: 180 steps of 1.0 then 120 of 0; window 2: 300 of 1.0. Norms 180 and 300 (x sqrt(32)), a
  relative change of 0.67 >= eta: critical. Summed in bfloat16 the second window stopped at 256 (0.42: not
  critical)."""
  interval = 300
  tx = accordion("powersgd", low=2, high=1, interval=interval, eta=0.5)
  st = tx.init({"w": jnp.zeros((8, 4), jnp.bfloat16)})
  scale = jnp.concatenate([jnp.ones(180), jnp.zeros(120), jnp.ones(300)])

  def body(st, s):
    _, st = tx.update({"w": jnp.full((8, 4), s, jnp.bfloat16)}, st)
    return st, st.prev_norm[0]

  st, norms = jax.jit(lambda st: jax.lax.scan(body, st, scale))(st)
  np.testing.assert_allclose([float(norms[interval - 1]), float(norms[2 * interval - 1])],
                             [180 * np.sqrt(32), 300 * np.sqrt(32)], rtol=1e-6)
  assert int(st.decisions) == 2 and bool(st.critical[0])


def test_accordion_topk_size_zero_leaf_is_sent_dense():
  params = {"e": jnp.zeros((0, 5)), "w": jnp.zeros((4, 3))}
  g = {"e": jnp.zeros((0, 5)), "w": jnp.arange(12.0).reshape(4, 3)}
  tx = accordion("topk", low=0.5, high=0.25)
  out, st = jax.jit(tx.update)(g, tx.init(params))
  ref, st_ref = tx.update({"w": g["w"]}, tx.init({"w": params["w"]}))
  assert out["e"].shape == (0, 5)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(ref["w"]))
  assert float(st.bytes_sent) == float(st_ref.bytes_sent) and not bool(st.levels_differ[0])


@pytest.mark.parametrize("make", [lambda: lr.powersgd(1), lambda: accordion("topk"),
                                  lambda: accordion("powersgd", low=2, high=1)],
                         ids=["powersgd", "accordion-topk", "accordion-powersgd"])
def test_gradient_shaped_unlike_the_state_is_refused(make):
  tx = make()
  st = tx.init({"w": jnp.zeros((8, 6))})
  with pytest.raises(ValueError, match=r"gradient\['w'\] has shape \(1, 6\).*initialised with shape \(8, 6\)"):
    tx.update({"w": jnp.ones((1, 6))}, st)   # (broadcast silently to an (8, 6) update before)


@pytest.mark.parametrize("make", [lambda: lr.powersgd(1, axis_name="d"),
                                  lambda: accordion("powersgd", low=2, high=1, axis_name="d")],
                         ids=["powersgd", "accordion"])
def test_float16_dense_leaf_mean_in_range_under_shard_map(devices, make):
  """8 workers' float16 biases of ~10000: the mean is in range, the sum (80000) is not (was inf)."""
  mesh = Mesh(np.array(devices), ("d",))
  tx = make()
  g = (10000 + np.arange(8 * 6).reshape(8, 6)).astype(np.float16)

  def step(g):
    out, st = tx.update({"b": g[0]}, tx.init({"b": g[0]}))
    return out["b"][None], st.nonfinite_steps[None]

  o, nf = jax.jit(shard_map(step, mesh=mesh, in_specs=(P("d"),), out_specs=(P("d"), P("d")),
                            check_vma=False))(jnp.asarray(g))
  o = np.asarray(o, np.float64)
  assert np.all(np.asarray(nf) == 0) and np.all(o == o[0])
  np.testing.assert_allclose(o[0], g.astype(np.float64).mean(0), rtol=1e-3)


def test_accordion_topk_float16_mean_in_range_under_shard_map(devices):
  """8 workers' float16 Top-k payloads of ~10^4 at the same indices: their mean is in range (was inf, sent)."""
  mesh = Mesh(np.array(devices), ("d",))
  tx = accordion("topk", low=0.5, high=0.25, axis_name="d")
  g = (10000 + 8 * np.arange(8 * 24).reshape(8, 4, 6)).astype(np.float16)   # distinct in float16

  def step(g):
    out, st = tx.update({"w": g[0]}, tx.init({"w": g[0]}))
    return out["w"][None], st.nonfinite_steps[None]

  o, nf = jax.jit(shard_map(step, mesh=mesh, in_specs=(P("d"),), out_specs=(P("d"), P("d")),
                            check_vma=False))(jnp.asarray(g))
  ref = np.zeros(24)
  for w in range(8):   # critical at the start: each worker keeps its 12 largest entries
    v = g[w].reshape(-1).astype(np.float64)
    keep = np.argsort(-np.abs(v))[:12]
    ref[keep] += v[keep] / 8
  o = np.asarray(o, np.float64)
  assert np.all(np.asarray(nf) == 0) and np.all(o == o[0])
  np.testing.assert_allclose(o[0].reshape(-1), ref, rtol=1e-3)
