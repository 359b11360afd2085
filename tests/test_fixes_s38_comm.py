"""Session 38's review of mlsys_jax.comm beside sparse.py: a skipped step under decay_residual kept the decay
(gradient mass lost), dense_warmup averaged over another axis than its compressor (replicas drifted),
orthogonalize zeroed NaN columns, critical_regime read a NaN norm as "not critical" and took any eta, and
powersgd_layout took any rank. Each test fails on the code before the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from mlsys_jax._compat import shard_map
from mlsys_jax.comm import (critical_regime, decay_residual, dense_warmup, orthogonalize, powersgd_bytes,
                            powersgd_layout, topk)


@pytest.mark.parametrize("warm", [0, 1])
def test_decay_residual_keeps_the_residual_undecayed_on_a_skipped_step(warm):
  """A NaN step is skipped (nonfinite_steps counts it) and leaves the residual as it was: the compressor alone
  does that, and the decay must not shrink it either; the next finite step then decays it once."""
  inner = topk(0.5) if warm == 0 else dense_warmup(topk(0.5), steps=1)
  tx = jax.jit(decay_residual(inner, 0.5).update)
  s = decay_residual(inner, 0.5).init({"w": jnp.zeros(2)})
  for g in [[2.0, 1.0]] * (1 + warm):
    _, s = tx({"w": jnp.asarray(g)}, s)
  res = s.residual if warm == 0 else s.inner_state.residual
  np.testing.assert_array_equal(res["w"], [0.0, 1.0])
  _, s = tx({"w": jnp.asarray([np.nan, 1.0])}, s)
  res = s.residual if warm == 0 else s.inner_state.residual
  np.testing.assert_array_equal(res["w"], [0.0, 1.0])          # not [0, 0.5]
  out, s = tx({"w": jnp.asarray([0.0, 1.0])}, s)
  np.testing.assert_array_equal(out["w"], [0.0, 1.5])           # 0.5 * 1 + 1: decayed once


def test_dense_warmup_refuses_an_axis_other_than_its_compressors(devices):
  """Under shard_map (and vmap) a warm-up without the compressor's axis returned each replica's own gradient."""
  mesh = Mesh(np.array(devices), ("d",))
  g = jnp.arange(16.0).reshape(8, 2)

  def run(tx):
    s = tx.init({"w": jnp.zeros(2)})
    f = shard_map(lambda x: tx.update({"w": x[0]}, s)[0]["w"][None], mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    return jax.jit(f)(g)
  with pytest.raises(ValueError, match=r"axis_name=None\) wraps a compressor that communicates over \['d'\]"):
    run(dense_warmup(topk(0.5, axis_name="d"), steps=2))
  with pytest.raises(ValueError, match="communicates over no axis"):
    jax.vmap(lambda x: dense_warmup(topk(0.5), steps=2, axis_name="d").update(
        {"w": x}, dense_warmup(topk(0.5), steps=2).init({"w": x}))[0], axis_name="d")(g)
  tx = dense_warmup(topk(0.5, axis_name="d"), steps=2, axis_name="d")
  out = jax.vmap(lambda x: tx.update({"w": x}, tx.init({"w": x}))[0]["w"], axis_name="d")(g)
  np.testing.assert_array_equal(out, np.broadcast_to(np.arange(16.0).reshape(8, 2).mean(0), (8, 2)))


def test_orthogonalize_propagates_nan_and_inf_columns():
  for bad in (np.nan, np.inf):
    p = jnp.asarray([[bad, 1.0], [1.0, 2.0], [0.0, 1.0]])
    q = jax.jit(orthogonalize)(p)
    assert not np.isfinite(np.asarray(q[:, 0])).all()        # not zeroed
  q = orthogonalize(jnp.asarray([[1.0, 2.0], [2.0, 4.0], [0.0, 0.0]]))   # rank-deficient: zero column, no NaN
  assert np.isfinite(np.asarray(q)).all() and float(jnp.abs(q[:, 1]).max()) == 0.0


def test_critical_regime_non_finite_norms_are_critical_and_eta_is_checked():
  got = jax.jit(critical_regime, static_argnums=2)(jnp.asarray([jnp.nan, 1.0, 10.0, jnp.inf]),
                                                   jnp.asarray([1.0, jnp.nan, 9.0, 1.0]), 0.5)
  np.testing.assert_array_equal(got, [True, True, False, True])
  for eta in (-1.0, 0.0, 1.0, 5.0):
    with pytest.raises(ValueError, match="eta"):
      critical_regime(10.0, 10.0, eta)


def test_powersgd_layout_and_bytes_check_the_rank():
  p = {"w": jnp.zeros((8, 6))}
  assert powersgd_layout(p, 2) == [2] and powersgd_bytes(p, 2) == 4 * 2 * (8 + 6)
  for rank in (0, -2, 2.5):
    with pytest.raises((ValueError, TypeError), match="rank"):
      powersgd_layout(p, rank)
    with pytest.raises((ValueError, TypeError), match="rank"):
      powersgd_bytes(p, rank)
