"""Regression tests for session 42's review of the sparsifying transforms' own logic (mlsys_jax/comm/sparse.py)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax.comm import sparse

try:
  from jax import shard_map as _shard_map

  def shard_map(f, mesh, in_specs, out_specs):
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
except ImportError:   # (older jax)
  from jax.experimental.shard_map import shard_map as _shard_map

  def shard_map(f, mesh, in_specs, out_specs):
    return _shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _run_adaptive(nan_at, steps):
  """sidco's estimator with adaptive stages over ``steps`` steps; a NaN gradient at step ``nan_at`` (None: none).
  Returns the (stages, ratio_sum, output) rows of the finite steps, and the last state."""
  tx = sparse.sidco(0.01, exact=False, adapt_every=4)
  st = tx.init({"w": jnp.zeros((4096,))})
  upd = jax.jit(tx.update)
  rows, j = [], 0
  for i in range(steps):
    if i == nan_at:
      _, st = upd({"w": jnp.full((4096,), jnp.nan)}, st)
      continue
    g = {"w": jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), j), (4096,))}
    j += 1
    o, st = upd(g, st)
    rows.append((int(st.stages), float(st.ratio_sum), np.asarray(o["w"])))
  return rows, st


@pytest.mark.parametrize("nan_at", [1, 3])   # inside a window; at the step that ends it
def test_sidco_adaptation_window_ignores_skipped_steps(nan_at):
  """A skipped (non-finite) step leaves the stage adaptation as it was: the adaptation windows are ``adapt_every``
  finite steps. Before, the window followed the step counter, so a skipped step inside a window averaged 3 terms
  over 4, and one skipped where the window ends postponed the adaptation by a window and averaged 7 terms over 4
  (est ~1.75x the achieved density): the stages then moved differently from the run without the bad step."""
  ref, _ = _run_adaptive(None, 11)
  got, st = _run_adaptive(nan_at, 12)
  assert int(st.nonfinite_steps) == 1
  assert [r[0] for r in got] == [r[0] for r in ref]
  for (s1, r1, o1), (s2, r2, o2) in zip(got, ref):
    assert r1 == r2
    np.testing.assert_array_equal(o1, o2)


@pytest.mark.parametrize("make", [
    lambda: sparse.topk(0.5), lambda: sparse.topk(0.5, per_tensor=True, momentum=0.5),
    lambda: sparse.randomk(0.5, flat_state=True), lambda: sparse.dgc(0.5, exact=True),
    lambda: sparse.sidco(0.5), lambda: sparse.sidco(0.5, flat_state=True, momentum=0.5)],
    ids=["topk", "topk_pt_mom", "randomk_flat", "dgc", "sidco", "sidco_flat_mom"])
def test_float16_gradients_over_float32_state_never_output_inf(make):
  """float16 gradients with float32 parameters (residual): an error-compensated entry above float16's largest
  float (65504) is finite in the float32 sum but became inf in the float16 output, silently (``nonfinite_steps``
  0, and the residual had already dropped the entry). Such a step is now skipped as a non-finite one: zero
  output, residual and velocity kept, counted."""
  tx = make()
  st = tx.init({"w": jnp.zeros((4,), jnp.float32)})
  g = {"w": jnp.full((4,), 40000.0, jnp.float16)}
  upd = jax.jit(tx.update)
  o1, st1 = upd(g, st)                      # 40000 sent: fits float16
  assert bool(jnp.all(jnp.isfinite(o1["w"]))) and int(st1.nonfinite_steps) == 0
  o2, st2 = upd(g, st1)                     # 80000 would be sent: inf in float16
  assert o2["w"].dtype == jnp.float16
  assert bool(jnp.all(o2["w"] == 0)), o2["w"]
  assert int(st2.nonfinite_steps) == 1
  assert float(st2.bytes_sent) == 0.0 and float(st2.density) == 0.0
  for a, b in zip(jax.tree_util.tree_leaves((st2.residual, st2.velocity)),
                  jax.tree_util.tree_leaves((st1.residual, st1.velocity))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float16_output_overflow_skips_on_every_replica():
  """Under shard_map: when the all-gathered mean overflows float16, every worker skips the step (zero output,
  residuals kept, counted on all); before, every worker output inf and counted nothing."""
  n = 4
  mesh = Mesh(np.array(jax.devices()[:n]), ("d",))
  tx = sparse.topk(0.5, axis_name="d")
  st = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)),
                              tx.init({"w": jnp.zeros((4,), jnp.float32)}))

  def step(g, s):
    g, s = jax.tree_util.tree_map(lambda x: x[0], (g, s))
    o, s2 = tx.update(g, s)
    return jax.tree_util.tree_map(lambda x: x[None], (o, s2))

  fn = jax.jit(shard_map(step, mesh, (P("d"), P("d")), (P("d"), P("d"))))
  g = {"w": jnp.full((n, 4), 60000.0, jnp.float16)}
  o1, st1 = fn(g, st)    # every worker sends two entries of 60000: the mean fits float16
  assert bool(jnp.all(jnp.isfinite(o1["w"]))) and bool(jnp.all(st1.nonfinite_steps == 0))
  o2, st2 = fn(g, st1)   # every worker sends two entries of 120000: inf in float16
  assert bool(jnp.all(o2["w"] == 0)), o2["w"]
  assert bool(jnp.all(st2.nonfinite_steps == 1))
  np.testing.assert_array_equal(np.asarray(st2.residual["w"]), np.asarray(st1.residual["w"]))
