"""Small parameter/gradient pytrees shared by the comm tests (a conv kernel, a dense kernel, a bias)."""

import jax
import jax.numpy as jnp


def params():
  return {"conv": jnp.zeros((3, 3, 4, 8)), "dense": jnp.zeros((40, 10)), "bias": jnp.zeros((10,))}


def grads(seed, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"conv": scale * jax.random.normal(ks[0], (3, 3, 4, 8)),
          "dense": scale * jax.random.normal(ks[1], (40, 10)),
          "bias": scale * jax.random.normal(ks[2], (10,))}


def replicated_updates(tx, params, grads, mesh, axis="d"):
  """One ``tx.update`` per device under ``shard_map`` over ``mesh``'s ``axis``: ``grads`` carries a leading
  device axis (one gradient per device), the state starts at ``tx.init(params)``; returns the updates with the
  device axis in front (for replica-equality checks)."""
  from jax.sharding import PartitionSpec as P
  from mlsys_jax._compat import shard_map

  st = tx.init(params)

  def body(g, st):
    u, _ = tx.update(jax.tree_util.tree_map(lambda x: x[0], g), st)
    return jax.tree_util.tree_map(lambda x: x[None], u)

  return jax.jit(shard_map(body, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis), check_vma=False))(grads, st)


def vmapped_under_modes(monkeypatch, module, switch: str, modes, make_tx):
  """``{mode: (updates, residual)}`` of one jitted, vmapped ``tx.update`` (three workers' states, a (30, 40) and a
  (900,) leaf) with ``module.<switch>`` set to each of ``modes`` in turn (``make_tx()`` builds the transform)."""
  import numpy as np

  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.normal(size=(3, 30, 40)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(3, 900)), jnp.float32)}
  res = {}
  for mode in modes:
    monkeypatch.setattr(module, switch, mode)
    tx = make_tx()
    o, st = jax.jit(jax.vmap(tx.update))(g, jax.vmap(tx.init)(g))
    res[mode] = (o, st.residual)
  return res
