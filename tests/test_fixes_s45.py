"""Session 45's fixes, each with a test that fails on the code before it."""

import json

from tests.test_fixes_s44_pack import RUN, _pool_child

DGC = "dgc 0.01 chain"
SAMPLE_NOW = {"base_fraction": 0.01, "min_count": 16}
SAMPLE_OLD = {"base_fraction": 0.01, "min_count": 64}


def _dgc_run(seeds, sample, arm=DGC):
  run = {**RUN, "compressors": [arm.split()[0]], "seeds": seeds,
         "accuracy": {"adam": RUN["accuracy"]["adam"], arm: [0.88, 0.9]},
         "bytes_per_worker": {"adam": [1.0, 1.0], arm: [0.2, 0.2]}}
  return {**run, "dgc_default_sample": sample} if sample is not None else run


def test_pools_refuse_dgc_runs_trained_with_another_default_sample(tmp_path):
  """A pool put DGC runs of two default samples (min_count 16 and 64: both are in experiments/results/) together as
  one setting's seeds, silently; now a ValueError names both samples. Runs without the record (older) and Top-k
  arms are not compared."""
  cases = {"other": (SAMPLE_NOW, SAMPLE_OLD, DGC), "same": (SAMPLE_NOW, SAMPLE_NOW, DGC),
           "unrecorded": (SAMPLE_NOW, None, DGC), "topk": (SAMPLE_NOW, SAMPLE_OLD, "topk 0.01 chain")}
  for name, (a, b, arm) in cases.items():
    for D in ("mnist1d", "digits"):
      (tmp_path / f"{name}_{D}_a.json").write_text(json.dumps({**_dgc_run([0, 1], a, arm), "dataset": D}))
      (tmp_path / f"{name}_{D}_b.json").write_text(json.dumps({**_dgc_run([2, 3], b, arm), "dataset": D}))
  r = _pool_child(f"""
      cap.R = {str(tmp_path) + '/'!r}
      for name, arm in {[(n, c[2]) for n, c in cases.items()]!r}:
        cap.POOLS[name] = (arm, [name + "_{{D}}_a.json", name + "_{{D}}_b.json"], name + "_out.json")
        try:
          cap.pool(name)
          print(name, "POOLED")
        except ValueError as e:
          print(name, "REFUSED", e)
      """)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in cases}
  assert "REFUSED" in lines["other"] and "other_mnist1d_b.json" in lines["other"], r.stdout
  assert "'min_count': 64" in lines["other"] and "'min_count': 16" in lines["other"], r.stdout
  for name in ("same", "unrecorded", "topk"):
    assert "POOLED" in lines[name], r.stdout


def test_accordion_full_rank_level_updates_no_slice_of_the_warm_start():
  """ACCORDION's PowerSGD level whose rank is the whole warm start (the low-compression level, ``q`` of width
  ``low``) wrote it through ``q.at[:, :r].set``, a scatter with an empty index array: under ``shard_map`` / ``pmap``
  jax 0.11.2's Shardy partitioner crashes the compiler on it (segfault, seen on CPU; tests of this file pass on jax
  0.10). That level now takes the new warm start whole: no scatter in the step, the same values."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mlsys_jax.comm import accordion
  from mlsys_jax.comm import lowrank as lr

  params = {"w": jnp.arange(40.0).reshape(8, 5) / 7 - 2.0, "b": jnp.ones((5,))}
  grads = jax.tree_util.tree_map(lambda x: jnp.cos(3.0 * x), params)
  # every leaf at the low-compression level (a static regime: no conditional), whose rank 2 is the warm start's width
  tx = accordion("powersgd", low=2, high=1, interval=1, regime=(True, True))
  state = tx.init(params)
  jaxpr = str(jax.make_jaxpr(lambda g, s: tx.update(g, s))(grads, state))
  assert "scatter" not in jaxpr
  out, state2 = jax.jit(tx.update)(grads, state)
  # the same values as PowerSGD of rank 2 on the same warm start (one step, nothing accumulated yet)
  ref_tx = lr.powersgd(2)
  ref_state = ref_tx.init(params)._replace(q=state.q)
  ref, ref_state2 = jax.jit(ref_tx.update)(grads, ref_state)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                         out, ref)
  np.testing.assert_allclose(np.asarray(state2.q[1]), np.asarray(ref_state2.q[1]), rtol=1e-6, atol=1e-6)


def _mixed_params():
  import jax.numpy as jnp
  return {"w": jnp.arange(40.0).reshape(8, 5) / 7 - 2.0, "b": jnp.linspace(-1.0, 1.0, 5),
          "k": jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)}


def _comm_transforms():
  from mlsys_jax.comm import accordion, powersgd, sidco, topk
  return {"sidco flat_state": sidco(0.2, flat_state=True, axis_name="d"),
          "topk flat_state": topk(0.2, flat_state=True, axis_name="d"),
          "powersgd": powersgd(1, axis_name="d"),
          "accordion powersgd": accordion("powersgd", low=2, high=1, interval=1, axis_name="d"),
          "accordion topk": accordion("topk", low=0.5, high=0.1, interval=1, axis_name="d")}


def test_comm_states_hold_no_zero_size_arrays():
  """jax 0.11.2's Shardy partitioner crashes the compiler (segfault) when a zero-size array enters a ``pmap`` /
  ``shard_map`` body; ``sidco(flat_state=True)``'s layout (zero-size arrays (0, *shape)) and PowerSGD's /
  ACCORDION's warm start of a dense leaf ((0, 0)) put one in every state mapped as a whole. Now neither holds one:
  the layout is static data, a dense leaf's warm start is None."""
  import jax
  import numpy as np
  import optax

  from mlsys_jax import comm as c
  params = _mixed_params()
  more = {"dgc": c.dgc(0.2), "randomk": c.randomk(0.2), "sidco per tensor flat": c.sidco(0.2, per_tensor=True,
                                                                                          flat_state=True),
          "sidco momentum flat": c.sidco(0.2, momentum=0.9, flat_state=True),
          "sidco raveled rms flat": c.sidco(0.2, precondition=optax.flatten(c.rms_selection(True)), flat_state=True),
          "leader_topk": c.leader_topk(0.2, axis_name="d"), "union_topk": c.union_topk(0.2, axis_name="d"),
          "staleness_topk": c.staleness_topk(0.2), "spread_releases": c.spread_releases(c.topk(0.2)),
          "density_warmup flat": c.density_warmup(lambda r: c.sidco(r, flat_state=True), 0.01, steps=10, ratios=[0.1]),
          "dense_warmup": c.dense_warmup(c.topk(0.2), 3), "decay_residual": c.decay_residual(c.topk(0.2), 0.99)}
  for name, tx in {**_comm_transforms(), **more}.items():
    sizes = [int(np.size(x)) for x in jax.tree_util.tree_leaves(tx.init(params))]
    assert min(sizes) > 0, (name, sizes)


def test_states_map_whole_through_pmap_and_keep_replicas_identical():
  import jax
  import jax.numpy as jnp
  import numpy as np
  n = 8
  params = _mixed_params()
  grads = {k: jnp.stack([jnp.sin(v * (w + 1)) for w in range(n)]) for k, v in params.items()}
  for name, tx in _comm_transforms().items():
    st = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tx.init(params))
    step = jax.pmap(tx.update, axis_name="d")
    out, st = step(grads, st)
    out, st = step(grads, st)
    for leaf in jax.tree_util.tree_leaves(out):
      a = np.asarray(leaf)
      assert np.isfinite(a).all() and all(np.array_equal(a[0], a[i]) for i in range(1, n)), name


def test_states_of_earlier_sessions_still_update_the_same():
  """A ``flat_state=True`` state holding session 43's zero-size layout arrays is still checked, and a PowerSGD /
  ACCORDION state with (0, 0) warm starts for dense leaves updates as the new states do."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest

  from mlsys_jax.comm import accordion, powersgd, sidco
  params = _mixed_params()
  grads = jax.tree_util.tree_map(lambda x: jnp.sin(2.0 * x), params)
  tx = sidco(0.2, flat_state=True)
  st = tx.init(params)
  old = st._replace(layout=jax.tree_util.tree_map(lambda p: jnp.zeros((0,) + p.shape, jnp.float32), params))
  (o1, s1), (o2, s2) = tx.update(grads, st), tx.update(grads, old)
  for a, b in zip(jax.tree_util.tree_leaves((o1, s1.residual)), jax.tree_util.tree_leaves((o2, s2.residual))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="has shape"):
    tx.update(dict(grads, w=grads["w"].reshape(5, 8)), old)
  with pytest.raises(ValueError, match="has shape"):
    tx.update(dict(grads, w=grads["w"].reshape(5, 8)), st)
  for tx in (powersgd(1), accordion("powersgd", low=2, high=1, interval=1)):
    st = tx.init(params)
    assert [q is None for q in st.q] == [True, False, False]   # leaves in key order: b (dense), k, w
    old = st._replace(q=tuple(jnp.zeros((0, 0)) if q is None else q for q in st.q))
    (o1, s1), (o2, s2) = jax.jit(tx.update)(grads, st), jax.jit(tx.update)(grads, old)
    for a, b in zip(jax.tree_util.tree_leaves((o1, s1.residual)), jax.tree_util.tree_leaves((o2, s2.residual))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_state_layout_survives_flax_serialization():
  import jax
  import numpy as np
  from flax import serialization

  from mlsys_jax.comm import ParamLayout, sidco
  params = _mixed_params()
  tx = sidco(0.2, flat_state=True)
  st = tx.update(jax.tree_util.tree_map(lambda x: 0.5 * x, params), tx.init(params))[1]
  back = serialization.from_bytes(tx.init(params), serialization.to_bytes(st))
  assert isinstance(back.layout, ParamLayout) and back.layout == st.layout
  np.testing.assert_array_equal(np.asarray(back.residual), np.asarray(st.residual))
  assert hash(back.layout) == hash(st.layout) and "shapes=((5,), (2, 3, 4), (8, 5))" in repr(st.layout)


def test_param_layout_refuses_shapes_that_do_not_fit_its_tree():
  import jax
  import jax.numpy as jnp
  import pytest

  from mlsys_jax.comm import ParamLayout
  treedef = jax.tree_util.tree_structure({"a": 0, "b": 0})
  with pytest.raises(ValueError, match="1 shapes .* for a tree of 2 leaves"):
    ParamLayout(treedef, [(2, 3)])
  with pytest.raises(ValueError, match="non-negative"):
    ParamLayout(treedef, [(2, 3), (-1,)])
  with pytest.raises(TypeError, match="PyTreeDef"):
    ParamLayout({"a": 0}, [(2,)])
  lay = ParamLayout(treedef, [(2, 3), (4,)])
  assert lay == ParamLayout.of({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}) and lay != "x"
