"""``precondition=`` for PowerSGD and ACCORDION (issue 18 item 1: the compressor acts on the local Adam direction, as
1-bit Adam compresses after the moment update, for every compressor, not only the sparsifiers): the same updates as
``optax.chain(precondition, compressor)`` on finite steps, the detector still on the raw gradient, the local state
kept per worker and left unchanged on a skipped step, replicas identical under ``jax.pmap``, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlsys_jax.comm import accordion, powersgd

from _trees import grads as _grads, params as _params  # tests/_trees.py

_MAKERS = {
    "powersgd": lambda p, **kw: powersgd(2, precondition=p, **kw),
    "accordion_powersgd": lambda p, **kw: accordion("powersgd", low=2, high=1, interval=3, regime=(True, False, True),
                                                    precondition=p, **kw),
    "accordion_topk": lambda p, **kw: accordion("topk", low=0.5, high=0.1, interval=3, regime=(False, True, False),
                                                precondition=p, **kw),
}


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_precondition_equals_the_chain_on_finite_steps(name):
  """With a static regime the detector cannot change a level, so the updates are ``chain(precondition, tx)``'s."""
  make = _MAKERS[name]
  params = _params()
  inside, chained = make(optax.scale_by_adam()), optax.chain(optax.scale_by_adam(), make(None))
  si, sc = inside.init(params), chained.init(params)
  ui, uc = jax.jit(inside.update), jax.jit(chained.update)
  for t in range(5):
    g = _grads(t)
    oi, si = ui(g, si, params)
    oc, sc = uc(g, sc, params)
    for k in params:
      np.testing.assert_array_equal(np.asarray(oi[k]), np.asarray(oc[k]), err_msg=f"{name} step {t} {k}")
      assert oi[k].dtype == g[k].dtype
  for a, b in zip(jax.tree_util.tree_leaves(si.precondition), jax.tree_util.tree_leaves(sc[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(si.step) == 5 and float(si.total_bytes) == float(sc[1].total_bytes) > 0


def test_accordion_detector_accumulates_the_raw_gradient():
  params = _params()
  tx = accordion("topk", low=0.5, high=0.1, interval=4, precondition=optax.scale_by_adam())
  st = tx.init(params)
  g1, g2 = _grads(1), _grads(2, scale=3.0)
  _, st = tx.update(g1, st, params)
  _, st = tx.update(g2, st, params)
  for k in params:   # the window's sum of what the workers computed, not of the Adam directions (~ +-1 entries)
    np.testing.assert_allclose(np.asarray(st.accum[k]), np.asarray(g1[k] + g2[k]), rtol=1e-6, atol=1e-6)


def test_under_pmap_a_nan_worker_leaves_every_local_state_and_replicas_agree(devices):
  """8 workers (jax.pmap), PowerSGD on each worker's local Adam direction: step 2 has a NaN on worker 5, so every
  worker skips it (zero update, ``nonfinite_steps`` 1) and keeps its own moments; steps 1 and 3 equal a single-device
  reference (each worker's Adam on its own gradients, skipping step 2, then PowerSGD of their mean)."""
  params = _params()
  n = len(devices)
  per_step = [[_grads(100 * s + w) for w in range(n)] for s in range(3)]
  per_step[1][5]["dense"] = per_step[1][5]["dense"].at[2, 3].set(jnp.nan)
  stacked = [jax.tree_util.tree_map(lambda *x: jnp.stack(x), *gs) for gs in per_step]
  tx = powersgd(2, axis_name="d", precondition=optax.scale_by_adam())

  def run(g0, g1, g2):
    st = tx.init(params)
    outs, pres, nf = [], [], []
    for g in (g0, g1, g2):
      o, st = tx.update(g, st, params)
      outs.append(o)
      pres.append(st.precondition)
      nf.append(st.nonfinite_steps)
    return outs, pres, nf

  outs, pres, nf = jax.pmap(run, axis_name="d", devices=devices)(*stacked)
  assert [np.asarray(x).tolist() for x in nf] == [[0] * n, [1] * n, [1] * n]
  for s in range(3):
    for k in params:
      o = np.asarray(outs[s][k])
      np.testing.assert_array_equal(o, np.broadcast_to(o[0], o.shape))          # replicas identical
  assert not any(np.any(np.asarray(outs[1][k])) for k in params)                # the NaN step sends nothing
  for a, b in zip(jax.tree_util.tree_leaves(pres[0]), jax.tree_util.tree_leaves(pres[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))                 # every worker's moments kept
  mu = np.asarray(pres[2].mu["dense"])
  assert not np.allclose(mu[0], mu[1])                                          # local: one state per worker
  # reference: each worker's own Adam (steps 1 and 3), PowerSGD of the mean on one device
  adam, ref = optax.scale_by_adam(), powersgd(2)
  a_states = [adam.init(params) for _ in range(n)]
  r_state = ref.init(params)
  for s in (0, 2):
    dirs = []
    for w in range(n):
      d, a_states[w] = adam.update(per_step[s][w], a_states[w], params)
      dirs.append(d)
    mean = jax.tree_util.tree_map(lambda *x: jnp.mean(jnp.stack(x), 0), *dirs)
    r_out, r_state = ref.update(mean, r_state)
    for k in params:
      np.testing.assert_allclose(np.asarray(outs[s][k])[0], np.asarray(r_out[k]), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("make", [lambda p: powersgd(2, precondition=p),
                                  lambda p: accordion("powersgd", precondition=p)])
def test_a_precondition_that_is_not_a_transform_is_refused(make):
  for bad in ("adam", optax.adam, 0.9):
    with pytest.raises(TypeError, match="precondition must be None or an optax.GradientTransformation"):
      make(bad)


@pytest.mark.parametrize("name", ["powersgd", "accordion_powersgd"])
def test_a_nan_the_precondition_hides_still_skips_the_step(name):
  """A precondition that maps NaN to a finite value (here to zero) does not hide a NaN gradient: the step is skipped
  and the transform's state kept."""
  zero_nans = optax.stateless(lambda u, p=None: jax.tree_util.tree_map(jnp.nan_to_num, u))
  count = optax.chain(zero_nans, optax.scale_by_adam())
  params = _params()
  tx = _MAKERS[name](count)
  st = tx.init(params)
  _, st = tx.update(_grads(0), st, params)
  bad = _grads(1)
  bad["bias"] = bad["bias"].at[0].set(jnp.nan)
  out, st2 = jax.jit(tx.update)(bad, st, params)
  assert int(st2.nonfinite_steps) == 1 and not any(np.any(np.asarray(o)) for o in jax.tree_util.tree_leaves(out))
  for a, b in zip(jax.tree_util.tree_leaves(st.precondition), jax.tree_util.tree_leaves(st2.precondition)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
