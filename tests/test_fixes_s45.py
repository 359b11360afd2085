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
