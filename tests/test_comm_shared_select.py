"""comm.shared_select.leader_topk (ScaleCom's cyclic local Top-k) and union_topk (exact means on the union of the
workers' Top-k sets): against a float64 numpy reference over several
steps with 8 workers (a named vmap and an 8-device shard_map), mass conservation per worker, leader rotation, the
shared non-finite skip, byte counts, one-worker equality with topk, density_warmup composition, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import density_warmup, leader_topk, rms_selection, topk, union_topk

from _trees import grads as _grads, params as _params  # tests/_trees.py
from _np_ref import topk_index  # tests/_np_ref.py

_W = 8
_STEPS = 4
_RATIO = 0.05          # 698 entries -> k = 35
_N = 698
_K = 35


def _worker_grads(bad=None):
  """(steps, workers, ...) gradients; ``bad = (step, worker)`` puts a NaN there."""
  g = [[_grads(100 * s + w) for w in range(_W)] for s in range(_STEPS)]
  if bad is not None:
    s, w = bad
    g[s][w] = {**g[s][w], "dense": g[s][w]["dense"].at[3, 4].set(jnp.nan)}
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x).reshape(_STEPS, _W, *x[0].shape), *sum(g, []))


def _flat(g_all):
  """(steps, workers, n) float64 in ravel_pytree's leaf order."""
  leaves = jax.tree_util.tree_leaves(g_all)
  return np.concatenate([np.asarray(l, np.float64).reshape(_STEPS, _W, -1) for l in leaves], axis=2)


_KINDS = {"leader": leader_topk, "union": union_topk}


def _reference(G, ratio=_RATIO, kind="leader", beta=1.0):
  """Float64 CLT-k (``kind='leader'``) or union exchange (``'union'``): outputs (steps, n), residuals after each
  step (steps, workers, n), leaders, bytes (steps, workers)."""
  n = G.shape[2]
  k = max(1, int(round(ratio * n)))
  e = np.zeros((_W, n))
  outs, res, leaders, nbytes = [], [], [], []
  for t in range(G.shape[0]):
    acc = G[t] + e
    lead = t % _W
    leaders.append(lead)
    if not np.all(np.isfinite(acc)):   # any worker: every worker skips
      outs.append(np.zeros(n))
      res.append(e.copy())
      nbytes.append(np.zeros(_W))
      continue
    if kind == "leader":
      S = topk_index(acc[lead], k)
    else:
      S = np.unique(np.concatenate([topk_index(a, k) for a in acc]))
    out = np.zeros(n)
    out[S] = acc[:, S].mean(axis=0)
    new = acc.copy()
    new[:, S] = 0.0
    e = (1.0 - beta) * e + beta * new                  # ScaleCom's low-pass filter (beta = 1: plain EF)
    outs.append(out)
    res.append(e.copy())
    nbytes.append(np.where(np.arange(_W) == lead, 8.0 * k, 4.0 * k) if kind == "leader"
                  else np.full(_W, 4.0 * k + 4.0 * S.size))
  if kind == "union":
    leaders = [-1] * len(leaders)
  return np.stack(outs), np.stack(res), np.asarray(leaders), np.stack(nbytes)


def _steps(tx, g_all):
  """All steps of one worker (its gradients ``g_all`` (steps, ...)): per-step outputs and states."""
  st = tx.init(_params())
  outs, states = [], []
  for s in range(_STEPS):
    u, st = tx.update(jax.tree_util.tree_map(lambda x: x[s], g_all), st)
    outs.append(u)
    states.append(st)
  return outs, states


def _by_vmap(tx, g_all):
  run = jax.jit(jax.vmap(lambda g: _steps(tx, g), in_axes=1, axis_name="d"))
  return run(g_all)


def _by_shard_map(devices, tx, g_all):
  mesh = Mesh(np.array(devices), ("d",))

  def sm(gw):   # gw: (1, steps, ...) of this device
    res = _steps(tx, jax.tree_util.tree_map(lambda x: x[0], gw))
    return jax.tree_util.tree_map(lambda x: x[None], res)

  g_w = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), g_all)
  return jax.jit(shard_map(sm, mesh=mesh, in_specs=(P("d"),), out_specs=P("d"), check_vma=False))(g_w)


def _flat_run(outs, states):
  """(steps, workers, n) outputs and residuals, (steps, workers) leaders / bytes / nonfinite counts."""
  o = np.stack([np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(u)) for u in outs])
  r = np.stack([np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(s.residual)) for s in states])
  return (o, r, np.stack([np.asarray(s.leader) for s in states]),
          np.stack([np.asarray(s.bytes_sent) for s in states]),
          np.stack([np.asarray(s.nonfinite_steps) for s in states]))


@pytest.fixture(scope="module")
def bad_grads():
  return _worker_grads(bad=(1, 5))


@pytest.fixture(scope="module", params=sorted(_KINDS))
def runs(request, devices, bad_grads):
  """vmap and shard_map runs of leader_topk / union_topk on clean gradients and on gradients with a NaN (step 1,
  worker 5)."""
  tx = _KINDS[request.param](_RATIO, axis_name="d")
  clean = _worker_grads()
  return {"vmap": _flat_run(*_by_vmap(tx, clean)), "shard_map": _flat_run(*_by_shard_map(devices, tx, clean)),
          "vmap_bad": _flat_run(*_by_vmap(tx, bad_grads)),
          "shard_map_bad": _flat_run(*_by_shard_map(devices, tx, bad_grads)), "G": _flat(clean),
          "G_bad": _flat(bad_grads), "kind": request.param}


@pytest.mark.parametrize("how", ["vmap", "shard_map"])
def test_matches_float64_reference_over_steps(runs, how):
  o, r, lead, nb, nf = runs[how]
  ref_o, ref_r, ref_lead, ref_b = _reference(runs["G"], kind=runs["kind"])
  for w in range(_W):   # every replica returns the reference mean
    np.testing.assert_allclose(o[:, w], ref_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r, ref_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(lead, np.repeat(ref_lead[:, None], _W, 1))
  np.testing.assert_array_equal(nb, ref_b)
  np.testing.assert_array_equal(nf, 0)
  released = (o[:, 0] != 0).sum(axis=1)
  np.testing.assert_array_equal(released, (ref_o != 0).sum(axis=1))
  if runs["kind"] == "leader":
    assert np.all(released == _K)                    # exactly k coordinates released per step
  else:
    assert np.all((released > _K) & (released <= _W * _K))   # the union of 8 sets of k


def test_vmap_and_shard_map_agree_and_replicas_are_identical(runs):
  ov, rv = runs["vmap"][:2]
  os_, rs = runs["shard_map"][:2]
  np.testing.assert_allclose(os_, ov, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(rs, rv, rtol=1e-6, atol=1e-7)
  for o in (ov, os_):
    np.testing.assert_array_equal(o, np.repeat(o[:, :1], _W, axis=1))


def test_mass_conservation_per_worker(runs):
  """Per worker: sent + new residual == previous residual + gradient (exactly, in float32), the sent entries
  lie on the released coordinates only, and the mean of what the workers sent is the output."""
  o, r = runs["vmap"][:2]
  G = runs["G"].astype(np.float32)
  prev = np.zeros_like(r[0], np.float32)
  for t in range(_STEPS):
    acc = G[t] + prev                                    # the transform's float32 buffer
    sent = acc - r[t].astype(np.float32)
    support = o[t, 0] != 0
    assert np.all(sent[:, ~support] == 0), t             # everything not released stays in the residual
    np.testing.assert_array_equal(sent[:, support], acc[:, support])   # released entries are sent whole
    np.testing.assert_allclose(sent.mean(axis=0), o[t, 0], rtol=1e-6, atol=1e-7)
    prev = r[t].astype(np.float32)


def test_low_pass_filter_matches_reference():
  """beta < 1 (ScaleCom's memory filter): e <- (1 - beta) e + beta (acc - sent), against the float64 reference."""
  tx = leader_topk(_RATIO, axis_name="d", beta=0.3)
  G = _worker_grads()
  o, r, lead, nb, nf = _flat_run(*_by_vmap(tx, G))
  ref_o, ref_r, ref_lead, ref_b = _reference(_flat(G), beta=0.3)
  np.testing.assert_allclose(o[:, 0], ref_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(r, ref_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(nb, ref_b)
  assert not np.allclose(ref_r, _reference(_flat(G))[1])   # the filter changes the memory


def test_leader_rotates_and_its_top_k_is_what_everyone_sends():
  """Worker w's gradient is large on its own block of k coordinates: at step t exactly the block of worker
  t mod 8 is released (9 steps: the rotation wraps), with the mean of all workers' values there."""
  n, k = 160, 4
  tx = leader_topk(k / n, axis_name="d")
  rng = np.random.default_rng(0)
  steps = 9
  g = 0.01 * rng.standard_normal((steps, _W, n)).astype(np.float32)
  for w in range(_W):
    g[:, w, w * k:(w + 1) * k] += 100.0
  run = jax.jit(jax.vmap(lambda gw, s: tx.update({"w": gw}, s), axis_name="d"))
  st = jax.vmap(lambda _: tx.init({"w": jnp.zeros(n)}))(jnp.arange(_W))
  e = np.zeros((_W, n))
  for t in range(steps):
    out, st = run(jnp.asarray(g[t]), st)
    lead = t % _W
    np.testing.assert_array_equal(np.asarray(st.leader), np.full(_W, lead))
    released = np.flatnonzero(np.asarray(out["w"][0]))
    np.testing.assert_array_equal(released, np.arange(lead * k, (lead + 1) * k))
    acc = g[t] + e
    np.testing.assert_allclose(np.asarray(out["w"][0])[released], acc[:, released].mean(0), rtol=1e-6)
    e = acc
    e[:, released] = 0
  # bytes: each worker led once in steps 0-7 and worker 0 again at step 8
  np.testing.assert_array_equal(np.asarray(st.total_bytes), 4.0 * k * steps + 4.0 * k * np.array([2] + [1] * 7))


@pytest.mark.parametrize("how", ["vmap_bad", "shard_map_bad"])
def test_one_nonfinite_worker_skips_the_step_on_every_replica(runs, how):
  o, r, lead, nb, nf = runs[how]
  ref_o, ref_r, _, ref_b = _reference(runs["G_bad"], kind=runs["kind"])
  np.testing.assert_array_equal(o[1], 0)                 # nothing delivered at the bad step, on any replica
  np.testing.assert_array_equal(r[1], r[0])              # every residual unchanged
  np.testing.assert_array_equal(nb[1], 0)
  np.testing.assert_array_equal(nf[-1], np.ones(_W))     # counted once on every replica
  if runs["kind"] == "leader":
    np.testing.assert_array_equal(lead[:, 0], np.arange(_STEPS) % _W)   # the rotation moves on
  assert np.all(np.isfinite(o)) and np.all(np.isfinite(r[:1])) and np.all(np.isfinite(r[2:, np.arange(_W) != 5]))
  np.testing.assert_allclose(o[:, 0], ref_o, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(nb, ref_b)


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_nonfinite_step_keeps_the_precondition_state(bad_grads, kind):
  tx = _KINDS[kind](_RATIO, axis_name="d", precondition=optax.scale_by_rms())
  _, states = _by_vmap(tx, bad_grads)
  nu0, nu1 = states[0].precondition.nu, states[1].precondition.nu
  for a, b in zip(jax.tree_util.tree_leaves(nu0), jax.tree_util.tree_leaves(nu1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(states[2].nonfinite_steps[0]) == 1
  assert not np.array_equal(np.asarray(states[2].precondition.nu["bias"]), np.asarray(nu1["bias"]))


@pytest.mark.parametrize("kind", sorted(_KINDS))
@pytest.mark.parametrize("pre", [None, "rms"])
def test_one_worker_is_topk_bitwise(pre, kind):
  """axis_name=None: the one worker leads every step (its set is the union); the update and residual are topk's."""
  mk = (lambda: None) if pre is None else (lambda: optax.scale_by_rms())
  a, b = _KINDS[kind](_RATIO, precondition=mk()), topk(_RATIO, precondition=mk())
  sa, sb = a.init(_params()), b.init(_params())
  for s in range(3):
    g = _grads(7 + s)
    oa, sa = jax.jit(a.update)(g, sa)
    ob, sb = jax.jit(b.update)(g, sb)
    for x, y in zip(jax.tree_util.tree_leaves((oa, sa.residual)), jax.tree_util.tree_leaves((ob, sb.residual))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(sa.bytes_sent) == 8.0 * _K and float(sb.bytes_sent) == 8.0 * _K + 4
    assert int(sa.leader) == (0 if kind == "leader" else -1) and float(sa.density) == pytest.approx(_K / _N)


def test_composes_with_density_warmup_and_rms_selection():
  """The session-8 recipe's shape (raw first stage, RMS after) with the leader's selection: one state layout
  across stages, bytes of each stage's k, outputs identical on every worker."""
  n = 200
  tx = density_warmup(lambda r: leader_topk(r, axis_name="d", precondition=rms_selection(r < 0.2)), 0.05,
                      steps=2, ratios=[0.2])
  rng = np.random.default_rng(1)
  g = rng.standard_normal((3, _W, n)).astype(np.float32)
  run = jax.jit(jax.vmap(lambda gw, s: tx.update({"w": gw}, s), axis_name="d"))
  st = jax.vmap(lambda _: tx.init({"w": jnp.zeros(n)}))(jnp.arange(_W))
  for t, k in enumerate([40, 40, 10]):
    out, st = run(jnp.asarray(g[t]), st)
    o = np.asarray(out["w"])
    np.testing.assert_array_equal(o, np.repeat(o[:1], _W, 0))
    assert (o[0] != 0).sum() == k
    np.testing.assert_array_equal(np.asarray(st.bytes_sent), np.where(np.arange(_W) == t % _W, 8.0 * k, 4.0 * k))


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_bad_input_raises(kind):
  make = _KINDS[kind]
  for r in (0.0, 1.0, -0.1, 1.5, True, "0.1", None):
    with pytest.raises(ValueError, match="ratio"):
      make(r)
  with pytest.raises(TypeError, match="axis_name"):
    make(0.1, axis_name=3)
  if kind == "leader":
    for b in (0.0, 1.5, -1.0, True, "0.5"):
      with pytest.raises(ValueError, match="beta"):
        make(0.1, beta=b)
  with pytest.raises(TypeError, match="precondition"):
    make(0.1, precondition="rms")
  tx = make(0.1)
  with pytest.raises(TypeError, match="floating"):
    tx.init({"w": jnp.zeros(4, jnp.int32)})
  st = tx.init({"w": jnp.zeros(4)})
  with pytest.raises(ValueError, match="shape"):
    tx.update({"w": jnp.zeros(5)}, st)
  with pytest.raises(NameError, match="not bound"):
    make(0.1, axis_name="d").update({"w": jnp.zeros(4)}, st)
